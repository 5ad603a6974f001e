"""ConceptLearn token steps vs a plain diffusers textual-inversion loop, same model, side by side.

Ours: the ConceptLearn kernel (kernels/concept_learn.py) through the protocol (hooked
cross-attention processors, spliced concept row, masked diffusion + attention loss, only the
concept vector optimised).  Baseline: the loop of diffusers' ``examples/textual_inversion``
(re-written here): add a placeholder token, resize the token table, optimise the WHOLE
input-embedding table with AdamW and copy every other row back after each step, plain MSE
on eps; UNet and the rest of the text encoder frozen (``requires_grad_(False)``).

Each (model, method) runs in its own subprocess so that its peak memory can be read
(``ru_maxrss`` growth over the loaded-model baseline on CPU; ``max_memory_allocated`` on
CUDA).  Step rate = 1 / median time between optimiser steps (E-steps excluded); ours also
reports the end-to-end time including its E-steps.

Models: ``toy`` (tools/toyworld, 32x32 pixel space, 2-layer CLIP with 530 tokens) and
``sd`` (the SD1.5-shaped test UNet of tests/comfy_harness/fixtures.py, 320 channels, with a
full-size random CLIP-L text encoder and 49408-token table, 4x32x32 latents) and ``sd15`` (full
size: diffusers' UNet2DConditionModel in SD1.5's layout, 860 M random seeded weights, the same
CLIP-L, 4x64x64 latents = 512 px photos).

    python bench/concept_learn.py [--models toy,sd] [--steps 30] [--threads 1] [--json out.json]
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
import torch


def _current_rss_mb() -> float:
    """The process's resident set now (Linux /proc; falls back to the high-water mark elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class _PeakRSS:
    """Peak resident set between :meth:`start` and :meth:`peak`, sampled every 5 ms by a thread.

    ``ru_maxrss`` cannot measure a phase: it is the process's all-time high, which model loading (and
    the TI recipe's deep copies) had already set, so the TI loop read +0.0 MB.
    """

    def __init__(self):
        import threading

        self.max, self._stop = 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.max = max(self.max, _current_rss_mb())
            self._stop.wait(0.005)

    def start(self) -> float:
        import gc

        gc.collect()
        self.base = _current_rss_mb()
        self.max = self.base
        self._thread.start()
        return self.base

    def peak(self) -> float:
        self._stop.set()
        self._thread.join()
        return max(self.max, _current_rss_mb())


_SAMPLER = {}


def load(name: str):
    """``(tokenizer, text_encoder, unet, schedule, latents [N,C,H,W], masks [N,1,H,W])``."""
    from photoops.kernels.schedule import VPSchedule

    if name == "toy":
        import concept_toy as ct

        tm = ct.load()[0]
        _, imgs, _, gt = ct.photos("triangle", 4, seed=11)
        return tm.tokenizer, tm.text_encoder, tm.unet, VPSchedule(tm.scheduler.alphas_cumprod), imgs, gt[:, None].float()
    if name in ("sd", "sd15"):
        from comfy_harness import fixtures
        from transformers import CLIPTokenizer

        comfy = os.environ.get("COMFYUI_DIR", "/work/comfyui")
        tok_dir = os.path.join(comfy, "comfy", "sd1_tokenizer")
        if os.path.isdir(tok_dir):
            tok = CLIPTokenizer.from_pretrained(tok_dir)
        else:                                    # offline fallback: byte-level tokenizer, same CLIP-L table
            from tiny import byte_tokenizer
            tok = byte_tokenizer()
        te = fixtures.build_clip_text_model(0)
        if name == "sd15":                       # full size: SD1.5's UNet layout (860 M, random, seeded), 512 px
            from diffusers import UNet2DConditionModel

            torch.manual_seed(0)
            unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
            hw = 64
        else:
            unet = fixtures.build_diffusers_unet(0)
            hw = 32
        g = torch.Generator().manual_seed(0)
        lat = torch.randn(2, 4, hw, hw, generator=g)
        m = torch.zeros(2, 1, hw, hw)
        m[:, :, hw // 4:3 * hw // 4, hw * 3 // 16:hw * 13 // 16] = 1
        return tok, te, unet, VPSchedule.scaled_linear(), lat, m
    raise ValueError(name)


def run_ours(name, steps, device):
    from photoops.kernels import concept_learn as cl
    from photoops.kernels.attention import AttentionHooks
    from photoops.kernels.concept_diffusers import DiffusersGradDenoiser, HFConceptText

    tok, te, unet, sched, lat, masks = load(name)
    te.to(device)
    unet.to(device)
    hooks = AttentionHooks()
    den = DiffusersGradDenoiser(unet, sched, "epsilon", hooks)
    text = HFConceptText(tok, te)
    init = "circle" if name == "toy" else "dog"
    base = _mem(device, reset=True)
    times = []
    cfg = cl.ConceptConfig(steps=steps, em_rounds=2, lr=5e-3, seed=0, use_crf=True)
    t0 = time.perf_counter()
    cl.learn_concepts(den, text, hooks, lat.to(device), None, [init], cfg, init_masks=masks,
                      progress=lambda s, t, l: times.append(time.perf_counter()))
    total = time.perf_counter() - t0
    return _result(times, total, _mem(device) - base)


def run_ti(name, steps, device):
    """The diffusers textual-inversion recipe (whole table optimised, other rows restored)."""
    import copy

    tok, te, unet, sched, lat, masks = load(name)
    tok = copy.deepcopy(tok)
    te = copy.deepcopy(te)
    te.to(device)
    unet.to(device)
    init = "circle" if name == "toy" else "dog"
    placeholder = "<cl-concept>"
    tok.add_tokens([placeholder])
    pid = tok.convert_tokens_to_ids(placeholder)
    init_id = tok(init, add_special_tokens=False).input_ids[0]
    te.resize_token_embeddings(len(tok))
    emb = te.get_input_embeddings()
    with torch.no_grad():
        emb.weight[pid] = emb.weight[init_id].clone()
    unet.requires_grad_(False)
    te.requires_grad_(False)
    emb.weight.requires_grad_(True)
    orig = emb.weight.detach().clone()
    keep = torch.ones(len(tok), dtype=torch.bool, device=device)
    keep[pid] = False
    opt = torch.optim.AdamW([emb.weight], lr=5e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
    prompt = "a red " + placeholder + " on a white background" if name == "toy" else "a photo of " + placeholder
    ids = tok(prompt, padding="max_length", max_length=te.config.max_position_embeddings, truncation=True,
              return_tensors="pt").input_ids.to(device)
    abar = sched.alphas_cumprod.float().to(device)
    T = sched.num_train_timesteps
    g = torch.Generator().manual_seed(0)
    base = _mem(device, reset=True)
    times = []
    lat = lat.to(device)
    t0 = time.perf_counter()
    for s in range(steps):
        n = int(torch.randint(0, lat.shape[0], (1,), generator=g))
        z = lat[n:n + 1]
        t = torch.randint(0, T, (1,), generator=g)
        eps = torch.randn(z.shape, generator=g).to(device)
        a = abar[t.to(device)].view(-1, 1, 1, 1)
        noisy = a.sqrt() * z + (1 - a).sqrt() * eps                 # scheduler.add_noise
        ehs = te(ids)[0]
        pred = unet(noisy, t.to(device), encoder_hidden_states=ehs).sample
        loss = torch.nn.functional.mse_loss(pred.float(), eps.float())
        loss.backward()
        opt.step()
        opt.zero_grad()
        with torch.no_grad():                                        # restore every other row
            emb.weight[keep] = orig[keep]
        times.append(time.perf_counter())
    total = time.perf_counter() - t0
    return _result(times, total, _mem(device) - base)


def _mem(device, reset=False):
    if device.startswith("cuda"):
        if reset:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated() / 2 ** 20
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2 ** 20
    if reset:                                    # CPU: the peak of the current RSS over the measured phase
        _SAMPLER["s"] = _PeakRSS()
        return _SAMPLER["s"].start()
    return _SAMPLER.pop("s").peak()


def _result(times, total, peak_mb):
    dts = [b - a for a, b in zip(times, times[1:])]
    med = statistics.median(dts) if dts else float("nan")
    return {"steps_per_s": 1.0 / med, "median_step_s": med, "total_s": total, "peak_extra_mb": peak_mb,
            "steps": len(times)}


def child(args):
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    fn = run_ours if args.method == "ours" else run_ti
    res = fn(args.model, args.steps, args.device)
    print("RESULT " + json.dumps(res))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="toy,sd")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", default=None)
    ap.add_argument("--method", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--model", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.method:
        return child(args)
    rows = {}
    for model in args.models.split(","):
        for method in ("ti", "ours"):
            cmd = [sys.executable, __file__, "--method", method, "--model", model, "--steps", str(args.steps),
                   "--threads", str(args.threads), "--device", args.device]
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=str(ROOT))
            line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
            if out.returncode or not line:
                raise SystemExit(f"{model}/{method} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
            rows[(model, method)] = json.loads(line[0][7:])
        ti, ours = rows[(model, "ti")], rows[(model, "ours")]
        print(f"{model:4s} ({args.device}, {args.steps} steps, {args.threads} thread(s))")
        print(f"     diffusers TI loop : {ti['steps_per_s']:7.2f} steps/s  peak +{ti['peak_extra_mb']:7.1f} MB  "
              f"total {ti['total_s']:.1f}s")
        print(f"     ConceptLearn      : {ours['steps_per_s']:7.2f} steps/s  peak +{ours['peak_extra_mb']:7.1f} MB  "
              f"total {ours['total_s']:.1f}s (incl. init + 2 E-steps)")
        print(f"     speed ratio ours/TI {ours['steps_per_s'] / ti['steps_per_s']:.2f}   "
              f"memory ratio ours/TI {ours['peak_extra_mb'] / max(ti['peak_extra_mb'], 1e-6):.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({f"{m}/{k}": v for (m, k), v in rows.items()}, f, indent=1)


if __name__ == "__main__":
    main()
