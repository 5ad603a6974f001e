"""Cost of attention capture, measured side by side in one run.

Prints:
* sampling time with capture / without capture (goal <= 1.10), interleaved repeats,
  median of the per-repeat ratios, in process CPU time (robust when other jobs share the
  machine; one torch thread by default) and in wall time;
* peak memory of a capture run at 10 and at 50 steps (goal: equal), each measured in a
  fresh subprocess as peak RSS, plus the recorder's own state in bytes.

Backends: ``diffusers`` (a tiny seeded UNet2DConditionModel; always available) and
``comfy`` (the SD1.5-format fixture checkpoint through ComfyUI's own sampler with our
patch; needs COMFYUI_DIR).

    python bench/attention_capture.py [--backend diffusers|comfy|both] [--repeats 5]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from _common import ROOT, import_pack

import_pack()
import torch  # noqa: E402

from photoops.kernels.attention import AttentionHooks, TokenMapRecorder  # noqa: E402


# -- diffusers backend ------------------------------------------------------------------------
def _diffusers_setup(capture, layers="lowres"):
    from photoops.kernels.diffusers_adapter import DiffusersDenoiser
    from photoops.kernels.schedule import VPSchedule
    from tiny import tiny_unet

    unet = tiny_unet(0)
    hooks = AttentionHooks()
    rec = hooks.add(TokenMapRecorder([2, 3], prompt_len=77, layers=layers)) if capture else None
    den = DiffusersDenoiser(unet, VPSchedule.scaled_linear(), hooks=hooks)
    return den, rec


def _diffusers_sample(den, steps: int, rec=None):
    torch.manual_seed(0)
    x = torch.randn(1, 4, 64, 64) * 14.6
    pos, neg = torch.randn(1, 77, 32), torch.zeros(1, 77, 32)
    sigmas = den.schedule.sigma(torch.linspace(999, 0, steps)).float().tolist() + [0.0]
    if rec is not None:
        rec.reset()
    for i in range(steps):
        c, u = den.predict_x0(x, torch.tensor(sigmas[i]), [pos, neg], cond_ids=[0, 1], step=i, total_steps=steps)
        d = u + 7.0 * (c - u)
        x = d + (x - d) * (sigmas[i + 1] / sigmas[i])       # Euler (DDIM) step in sigma form
    return x


# -- comfy backend ----------------------------------------------------------------------------
_COMFY = {}


def _comfy_setup(capture, layers="lowres"):
    from comfy_harness import comfyenv, fixtures

    comfyenv.ensure_comfy_importable()
    import comfy.sd

    if "model" not in _COMFY:
        info = fixtures.cached_sd15_checkpoint(seed=0)
        m, clip, _, _ = comfy.sd.load_checkpoint_guess_config(str(info["path"]), output_vae=False, output_clip=True)
        _COMFY.update(model=m, clip=clip,
                      pos=clip.encode_from_tokens_scheduled(clip.tokenize("a photo of a red circle")),
                      neg=clip.encode_from_tokens_scheduled(clip.tokenize("")))
    from photoops.nodes.comfy.attention import attach_attention_hooks

    model = _COMFY["model"]
    rec = None
    if capture:
        rec = TokenMapRecorder([5], prompt_len=77, layers=layers)
        model = attach_attention_hooks(model, AttentionHooks([rec]), on_run_start=rec.reset)
    return model, rec


def _comfy_sample(model, steps: int, rec=None):
    import comfy.sample

    latent = torch.zeros(1, 4, 32, 32)
    noise = comfy.sample.prepare_noise(latent, 0)
    return comfy.sample.sample(model, noise, steps, 7.0, "euler", "normal", _COMFY["pos"], _COMFY["neg"], latent,
                               disable_pbar=True, seed=0)


BACKENDS = {"diffusers": (_diffusers_setup, _diffusers_sample), "comfy": (_comfy_setup, _comfy_sample)}


def time_ratio(backend: str, steps: int, repeats: int, layers: str) -> dict:
    setup, sample = BACKENDS[backend]
    plain, _ = setup(False)
    cap, rec = setup(True, layers)
    sample(plain, 2)
    sample(cap, 2, rec)  # warm-up
    t_plain, t_cap, ratios, w_plain, w_cap, wratios = [], [], [], [], [], []
    for r in range(repeats):
        order = [(plain, None, t_plain, w_plain), (cap, rec, t_cap, w_cap)]
        if r % 2:
            order.reverse()
        for m, rc, bucket, wbucket in order:
            t0, w0 = time.process_time(), time.perf_counter()
            sample(m, steps, rc)
            bucket.append(time.process_time() - t0)
            wbucket.append(time.perf_counter() - w0)
        ratios.append(t_cap[-1] / t_plain[-1])
        wratios.append(w_cap[-1] / w_plain[-1])
    return {"backend": backend, "steps": steps, "layers": layers, "plain_s": statistics.median(t_plain),
            "capture_s": statistics.median(t_cap), "ratio": statistics.median(ratios),
            "wall_ratio": statistics.median(wratios),
            "recorder_state_bytes": sum(s[0].numel() * s[0].element_size() for s in rec._sums.values())}


def peak_child(backend: str, steps: int, capture: bool) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", backend, str(steps), str(int(capture))],
                         capture_output=True, text=True, env=dict(os.environ), cwd=str(ROOT))
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def child(backend: str, steps: int, capture: bool):
    setup, sample = BACKENDS[backend]
    m, rec = setup(capture)
    sample(m, 1, rec)    # same warm-up in every configuration
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    sample(m, steps, rec)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    state = sum(s[0].numel() * s[0].element_size() for s in rec._sums.values()) if rec else 0
    print(json.dumps({"peak_rss_kib": peak, "growth_kib": peak - base, "state_bytes": state}))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", default="both", choices=["diffusers", "comfy", "both"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch default)")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
        os.environ["PHOTOOPS_BENCH_THREADS"] = str(a.threads)
    elif os.environ.get("PHOTOOPS_BENCH_THREADS"):
        torch.set_num_threads(int(os.environ["PHOTOOPS_BENCH_THREADS"]))
    if a.child:
        return child(a.child[0], int(a.child[1]), bool(int(a.child[2])))
    backends = ["diffusers", "comfy"] if a.backend == "both" else [a.backend]
    if "comfy" in backends and not os.environ.get("COMFYUI_DIR"):
        print("comfy backend skipped: COMFYUI_DIR is not set")
        backends.remove("comfy")
    for b in backends:
        for layers in ("lowres", "all"):
            r = time_ratio(b, a.steps, a.repeats, layers)
            print(f"[{b}] layers={layers}, {a.steps} steps, median of {a.repeats}: CPU time without capture "
                  f"{r['plain_s']:.3f} s, with capture {r['capture_s']:.3f} s, ratio with/without = "
                  f"{r['ratio']:.3f} (goal <= 1.10); wall-time ratio {r['wall_ratio']:.3f}", flush=True)
        p10, p50 = peak_child(b, 10, True), peak_child(b, 50, True)
        n10, n50 = peak_child(b, 10, False), peak_child(b, 50, False)
        print(f"[{b}] peak RSS with capture: 10 steps {p10['peak_rss_kib'] / 1024:.1f} MiB, 50 steps "
              f"{p50['peak_rss_kib'] / 1024:.1f} MiB, ratio 50/10 = {p50['peak_rss_kib'] / p10['peak_rss_kib']:.3f} "
              f"(goal 1.0); growth while sampling {p10['growth_kib']} / {p50['growth_kib']} KiB; without capture: "
              f"{n10['peak_rss_kib'] / 1024:.1f} / {n50['peak_rss_kib'] / 1024:.1f} MiB", flush=True)
        print(f"[{b}] recorder state: {p10['state_bytes']} bytes at 10 steps, {p50['state_bytes']} bytes at 50 steps")


if __name__ == "__main__":
    main()
