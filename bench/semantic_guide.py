"""Cost of semantic guidance, measured side by side in one run.

1. Per-step time of SEGA and LEDITS++ guidance with K = 1, 2, 4 concepts relative to one
   batched (2+K)-row UNet call (goal <= 1.1: the guidance maths and mask recording add at
   most 10 %), and relative to plain CFG (2 rows).
2. End to end: our DDPM inversion + LEDITS++ edit vs diffusers' LEdits++ pipeline
   (``invert`` + ``__call__`` with the same concepts), same tiny weights and steps
   (ratio; goal <= 0.8), with the bit-exact sequential inversion and with the batched one
   (``ddpm_invert(batch=10)``: ten inversion steps per model call, replay error ~1e-6).
   Each method runs with the attention processors it chooses: the LEdits++ pipeline puts
   its explicit-softmax processors on every layer, ours keep the model's own (SDPA) and
   hook only the cross-attention layers.

    python bench/semantic_guide.py [--steps 20] [--repeats 3]
"""
from __future__ import annotations

import argparse
import statistics
import time

from _common import import_pack

import_pack()
import torch  # noqa: E402

from photoops.kernels import sega as ksega  # noqa: E402
from photoops.kernels.attention import AttentionHooks, TokenMapRecorder  # noqa: E402
from photoops.kernels.diffusers_adapter import DiffusersDenoiser  # noqa: E402
from photoops.kernels.inversion import ddpm_invert, replay_sample  # noqa: E402
from photoops.kernels.schedule import VPSchedule  # noqa: E402
from tiny import tiny_ledits_pipeline  # noqa: E402


def cpu_time(fn, repeats):
    ts = []
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        ts.append(time.process_time() - t0)
    return statistics.median(ts)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    pipe, uncond = tiny_ledits_pipeline(0)
    # The LEdits++ pipeline installs its own attention processors (explicit softmax) on every
    # layer and leaves them there; our runs start from the model's own processors (SDPA).
    model_processors = dict(pipe.unet.attn_processors)
    schedule = VPSchedule(pipe.scheduler.alphas_cumprod)
    tok, te = pipe.tokenizer, pipe.text_encoder

    def embed(text):
        ids = tok([text], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            return te(ids)[0]

    words = ["blue", "glasses", "red", "hat"]
    concepts = [embed(w) for w in words]
    x = torch.randn(1, 4, 32, 32)
    sigma = torch.tensor(2.0)
    print(f"per-step CPU time, 32x32 latent, median of {a.repeats} (1 thread):")
    plain = DiffusersDenoiser(pipe.unet, schedule)
    t_cfg = cpu_time(lambda: plain.predict_x0(x, sigma, [uncond, uncond]), a.repeats)
    for k in (1, 2, 4):
        conds = [uncond, uncond] + concepts[:k]
        t_call = cpu_time(lambda: plain.predict_x0(x, sigma, conds), a.repeats)
        sg = ksega.SemanticGuidance([ksega.EditConcept(scale=5.0) for _ in range(k)])

        def sega_step():
            outs = plain.predict_x0(x, sigma, conds)
            e = [(x - d) / sigma for d in outs]
            sg.guide(e[0], e[1], e[2:], 3, 7.5)
        hooks = AttentionHooks()
        recs = [hooks.add(TokenMapRecorder([1], 77, cond_index=2 + i, layers="lowres")) for i in range(k)]
        hooked = DiffusersDenoiser(pipe.unet, schedule, hooks=hooks)
        kcs = [ksega.EditConcept(scale=5.0) for _ in range(k)]

        def ledits_step():
            for r in recs:
                r.reset()
            outs = hooked.predict_x0(x, sigma, conds)
            e = [(x - d) / sigma for d in outs]
            ksega.ledits_pp_guidance(e[0], e[2:], kcs, [r.result() for r in recs], 3, timestep=500.0)
        t_sega = cpu_time(sega_step, a.repeats)
        t_led = cpu_time(ledits_step, a.repeats)
        pipe.unet.set_attn_processor(dict(model_processors))
        print(f"  K={k}: UNet call of {2 + k} rows {t_call * 1e3:.1f} ms; SEGA step {t_sega * 1e3:.1f} ms "
              f"({t_sega / t_call:.3f} x the call, goal <= 1.1; {t_sega / t_cfg:.2f} x plain CFG); LEDITS++ step "
              f"{t_led * 1e3:.1f} ms ({t_led / t_call:.3f} x the call)")

    # end to end vs diffusers LEdits++
    from PIL import Image

    img = Image.fromarray((torch.rand(64, 64, 3, generator=torch.Generator().manual_seed(0)) * 255)
                          .to(torch.uint8).numpy())
    edit = ["blue", "red"]

    def run_diffusers():
        pipe.invert(image=img, source_prompt="", num_inversion_steps=a.steps, skip=0.0,
                    generator=torch.Generator().manual_seed(1))
        return pipe(editing_prompt=edit, reverse_editing_direction=[False, True], edit_guidance_scale=[5.0, 5.0],
                    edit_threshold=[0.9, 0.9], output_type="latent").images

    e_concepts = [embed(w) for w in edit]
    kcs = [ksega.EditConcept(scale=5.0, threshold=0.9), ksega.EditConcept(scale=5.0, threshold=0.9, reverse=True)]

    def run_ours(batch=1):
        pipe.unet.set_attn_processor(dict(model_processors))
        hooks = AttentionHooks()
        recs = [hooks.add(TokenMapRecorder([1], 77, cond_index=1 + i, layers="lowres")) for i in range(2)]
        den = DiffusersDenoiser(pipe.unet, schedule, hooks=hooks)
        with torch.no_grad():
            x0 = pipe.encode_image(img)[0]
        pipe.scheduler.set_timesteps(a.steps)
        t = pipe.scheduler.timesteps.long()
        sig = torch.cat([schedule.sigmas[t], schedule.sigmas[:1]]).float()
        x_start, zs, _ = ddpm_invert(lambda xx, s: den.predict_x0(xx, s, [uncond])[0], x0, sig,
                                     generator=torch.Generator().manual_seed(1), batch=batch)

        def guided(xx, s):
            for r in recs:
                r.reset()
            outs = den.predict_x0(xx, s, [uncond] + e_concepts)
            sv = s.view(-1, 1, 1, 1)
            e = [(xx - d) / sv for d in outs]
            e_hat = ksega.ledits_pp_guidance(e[0], e[1:], kcs, [r.result() for r in recs], 0,
                                             timestep=float(schedule.timestep(s[0])))
            return xx - sv * e_hat
        out = replay_sample(guided, x_start, sig, noises=zs)
        pipe.unet.set_attn_processor(dict(model_processors))
        return out

    runs = {"diffusers": run_diffusers, "ours": run_ours, "ours_batched": lambda: run_ours(batch=10)}
    for fn in runs.values():
        fn()
    w = {name: [] for name in runs}
    for r in range(a.repeats):
        order = list(runs.items())
        if r % 2:
            order.reverse()
        for name, fn in order:
            t0 = time.process_time()
            fn()
            w[name].append(time.process_time() - t0)
    d, o, ob = (statistics.median(w[n]) for n in ("diffusers", "ours", "ours_batched"))
    print(f"end to end, {a.steps} steps, 2 concepts, 64x64 image, median of {a.repeats}: diffusers LEdits++ "
          f"invert+edit {d:.2f} s CPU; ours {o:.2f} s CPU, ratio {o / d:.3f} (bit-exact inversion); ours with "
          f"batch=10 inversion {ob:.2f} s CPU, ratio {ob / d:.3f} (goal <= 0.8)")

if __name__ == "__main__":
    main()
