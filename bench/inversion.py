"""Inversion + replay cost vs diffusers' LEdits++ pipeline, side by side in one run.

Same tiny weights (UNet, VAE, text encoder built in code), same image, same DDIM
timesteps, empty source prompt, no edit concepts:

* diffusers: ``LEditsPPPipelineStableDiffusion.invert`` + ``__call__`` (output latent);
* ours: VAE encode + ``ddpm_invert`` + ``replay_sample`` through ``DiffusersDenoiser``,
  sequential (bit-exact replay) and batched (``--batch`` steps' rungs per model call;
  replay exact to rounding).

Prints the median wall and CPU time of each over interleaved repeats, the ratio ours /
diffusers (goal <= 0.8), and the size of an INVERSION for 50 steps at SD1.5's 64x64
latent and at the bench's latent.

    python bench/inversion.py [--steps 50] [--repeats 3] [--size 64]
"""
from __future__ import annotations

import argparse
import math
import statistics
import time

from _common import import_pack

import_pack()
import torch  # noqa: E402

from photoops.kernels.diffusers_adapter import DiffusersDenoiser  # noqa: E402
from photoops.kernels.inversion import ddpm_invert, replay_sample  # noqa: E402
from photoops.kernels.inversion_state import Inversion  # noqa: E402
from photoops.kernels.schedule import VPSchedule  # noqa: E402
from tiny import tiny_ledits_pipeline  # noqa: E402


def ddim_sigmas(schedule: VPSchedule, timesteps) -> torch.Tensor:
    t = torch.as_tensor(timesteps).long()
    s = schedule.sigmas[t]
    return torch.cat([s, schedule.sigmas[:1]]).float()      # final level abar_0 (set_alpha_to_one=False)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--size", type=int, default=64, help="image size (latent = size / 2 for the tiny VAE)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=10, help="steps per model call in the batched inversion")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from PIL import Image

    pipe, uncond = tiny_ledits_pipeline(0)
    schedule = VPSchedule(pipe.scheduler.alphas_cumprod)
    den = DiffusersDenoiser(pipe.unet, schedule)
    g = torch.Generator().manual_seed(0)
    img = Image.fromarray((torch.rand(a.size, a.size, 3, generator=g) * 255).to(torch.uint8).numpy())

    def run_diffusers():
        pipe.invert(image=img, source_prompt="", num_inversion_steps=a.steps, skip=0.0,
                    generator=torch.Generator().manual_seed(1))
        return pipe(output_type="latent", editing_prompt=None).images

    def run_ours(batch=1):
        with torch.no_grad():
            x0 = pipe.encode_image(img)[0]
        pipe.scheduler.set_timesteps(a.steps)
        sig = ddim_sigmas(schedule, pipe.scheduler.timesteps)

        def denoise(x, s):
            return den.predict_x0(x, s, [uncond])[0]

        x_start, zs, _ = ddpm_invert(denoise, x0, sig, generator=torch.Generator().manual_seed(1), batch=batch)
        out = replay_sample(denoise, x_start, sig, noises=zs)
        return out, x0, x_start, zs, sig

    run_diffusers()
    run_ours()   # warm-up
    wall = {"diffusers": [], "ours": [], "batched": []}
    cpu = {"diffusers": [], "ours": [], "batched": []}
    res = {}
    for r in range(a.repeats):
        order = [("diffusers", run_diffusers), ("ours", run_ours), ("batched", lambda: run_ours(a.batch))]
        if r % 2:
            order.reverse()
        for name, fn in order:
            w0, c0 = time.perf_counter(), time.process_time()
            res[name] = fn()
            wall[name].append(time.perf_counter() - w0)
            cpu[name].append(time.process_time() - c0)
    out, x0, x_start, zs, sig = res["ours"]
    rel = float((out - x0).norm() / x0.norm())
    rel_b = float((res["batched"][0] - x0).norm() / x0.norm())
    wm = {k: statistics.median(v) for k, v in wall.items()}
    cm = {k: statistics.median(v) for k, v in cpu.items()}
    print(f"{a.steps} steps, {a.size}x{a.size} image ({tuple(x0.shape)} latent), median of {a.repeats}, "
          f"{a.threads} thread(s):")
    print(f"  diffusers LEdits++ invert+call: wall {wm['diffusers']:.3f} s, CPU {cm['diffusers']:.3f} s")
    print(f"  ours ddpm_invert+replay:        wall {wm['ours']:.3f} s, CPU {cm['ours']:.3f} s")
    print(f"  ours batched ({a.batch} steps/call):    wall {wm['batched']:.3f} s, CPU {cm['batched']:.3f} s")
    print(f"  ratio ours/diffusers: sequential wall {wm['ours'] / wm['diffusers']:.3f}, CPU "
          f"{cm['ours'] / cm['diffusers']:.3f}; batched wall {wm['batched'] / wm['diffusers']:.3f}, CPU "
          f"{cm['batched'] / cm['diffusers']:.3f} (goal <= 0.8)")
    print(f"  reconstruction rel. error: sequential {rel:.2e}, batched {rel_b:.2e}")
    inv = Inversion(method="ddpm", sigmas=sig.double(), x_start=x_start, noises=zs, eta=torch.ones(a.steps))
    sd15 = Inversion(method="ddpm", sigmas=torch.linspace(14.6, 0.03, 51, dtype=torch.float64),
                     x_start=torch.zeros(1, 4, 64, 64), noises=torch.zeros(50, 1, 4, 64, 64), eta=torch.ones(50))
    print(f"  INVERSION size: {inv.nbytes() / 2**20:.3f} MiB here; {sd15.nbytes() / 2**20:.3f} MiB for 50 steps of "
          f"an SD1.5 512x512 photo (spec: 3.125 MiB of noise maps + start latent)")
    assert math.isfinite(rel)


if __name__ == "__main__":
    main()
