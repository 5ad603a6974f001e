"""pOps prior: step time and peak memory, ours vs diffusers' PriorTransformer, fp32 vs fp16/bf16.

    .venv/bin/python bench/pops.py                 # Kandinsky width (32 heads x 64, 1280-d), 4 of 20 layers
    .venv/bin/python bench/pops.py --layers 20     # the full 1.03 B-parameter prior (4.1 GB fp32 per copy)

Both networks get the same random weights (diffusers' PriorTransformer builds them, ours
loads its state dict).  Measured side by side in one run, interleaved, median of repeats:

* ``full``: one prior call of the CFG batch (2 rows, 81 tokens) — diffusers vs our
  full pass (the same maths; goal: ratio ours/diffusers <= 1.05);
* ``sample``: a whole 25-step CFG sample — diffusers' prior + ``UnCLIPScheduler`` (the
  pipeline loop) vs ``kernels.pops.sample`` (prefix K/V computed once, 3 tokens per step);
* memory of one sampling run per (implementation, dtype), in a child process that builds
  the model directly in that dtype: the weights, and the run's peak above what was
  resident before it (CUDA: max allocated minus allocated before; CPU: the RSS high-water
  mark, reset just before the run, minus the RSS then).

Per-layer cost is the same at every depth, so the default 4 layers give the ratios of the
full prior at a fifth of the memory; ``--layers 20`` measures the real size.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import import_pack

import_pack()
from photoops.kernels import pops as kp

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def config(layers: int) -> kp.PriorConfig:
    return kp.PriorConfig(num_layers=layers)


def build_pair(cfg, device, seed=0):
    from diffusers import PriorTransformer

    torch.manual_seed(seed)
    with torch.device("meta"):
        ref = PriorTransformer(**cfg.diffusers_kwargs())
    ref = ref.to_empty(device=device)
    g = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for k, p in ref.named_parameters():
            if k in ("clip_std", "norm_out.weight") or k.endswith(("norm1.weight", "norm3.weight")):
                p.copy_(torch.ones_like(p))
            else:
                p.copy_((torch.randn(p.shape, generator=g) * (0.02 if p.ndim < 2 else p.shape[-1] ** -0.5)).to(device))
        n = cfg.num_embeddings + cfg.additional_embeddings
        ref.causal_attention_mask = torch.full([n, n], -10000.0, device=device).triu_(1)[None]
    ours = kp.OperatorPrior(cfg).to(device).eval()
    ours.load_state_dict({k: v for k, v in ref.state_dict().items() if k not in ("clip_mean", "clip_std")})
    return ref.eval().requires_grad_(False), ours.requires_grad_(False)


def inputs(cfg, device, dtype):
    g = torch.Generator().manual_seed(1)
    d = cfg.embedding_dim
    H, Hn, M = kp.build_condition([torch.randn(1, d, generator=g), torch.randn(1, d, generator=g)])
    Hb = torch.cat([Hn, H]).to(device, dtype)
    Mb = torch.cat([M, M]).to(device)
    x = torch.randn(2, d, generator=g).to(device, dtype)
    return H, M, Hb, Mb, x


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def diffusers_sample(ref, H, M, steps, guidance, seed, device, dtype):
    """The pipeline loop of the spec §7 with diffusers' prior and UnCLIPScheduler."""
    from diffusers import UnCLIPScheduler

    sch = UnCLIPScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="sample",
                          variance_type="fixed_small_log", clip_sample=True, clip_sample_range=10.0)
    sch.set_timesteps(steps)
    gen = torch.Generator("cpu").manual_seed(seed)
    d = H.shape[-1]
    x = torch.randn(1, d, generator=gen).to(device)
    Hb = torch.cat([torch.zeros_like(H), H]).to(device, dtype)
    Mb = torch.cat([M, M]).to(device)
    P = torch.zeros(2, d, device=device, dtype=dtype)
    ts = sch.timesteps
    with torch.no_grad():
        for i, t in enumerate(ts):
            pred = ref(torch.cat([x, x]).to(dtype), t, P, Hb, attention_mask=Mb).predicted_image_embedding.float()
            un, co = pred.chunk(2)
            pred = un + guidance * (co - un)
            prev = None if i + 1 == len(ts) else ts[i + 1]
            x = sch.step(pred, t, x, prev_timestep=prev, generator=gen).prev_sample
    return x * ref.clip_std.float() + ref.clip_mean.float()


def time_it(fn, device, repeats):
    out = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t0)
    return out


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak_rss() -> int:
    """Reset the RSS high-water mark (Linux clear_refs 5); returns the current RSS in bytes.

    (ru_maxrss is no use here: it survives fork+exec, so a child reports its parent's peak.)
    """
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kb("VmRSS") * 1024


def _peak_rss() -> int:
    return _status_kb("VmHWM") * 1024


def child(args) -> None:
    """Peak memory of one sampling run, building the model directly in the dtype (CPU: peak RSS)."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = config(args.layers)
    dt = DTYPES[args.dtype]
    torch.set_default_dtype(dt)
    if args.impl == "diffusers":
        from diffusers import PriorTransformer

        with torch.device("meta"):
            m = PriorTransformer(**cfg.diffusers_kwargs())
    else:
        with torch.device("meta"):
            m = kp.OperatorPrior(cfg)
    torch.set_default_dtype(torch.float32)
    m = m.to_empty(device=device).eval().requires_grad_(False)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.02)
        if args.impl == "diffusers":
            m.clip_std.fill_(1.0)
            n = cfg.num_embeddings + cfg.additional_embeddings
            m.causal_attention_mask = torch.full([n, n], -10000.0, device=device, dtype=dt).triu_(1)[None]
    weights = sum(p.numel() * p.element_size() for p in m.parameters())
    H, M, _, _, _ = inputs(cfg, device, dt)
    base = _reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    if args.impl == "diffusers":
        diffusers_sample(m, H, M, args.steps, 4.0, 0, device, dt)
    else:
        kp.sample(m, H, M, torch.zeros(cfg.embedding_dim), torch.ones(cfg.embedding_dim), steps=args.steps,
                  guidance=4.0, seed=0)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else _peak_rss()
    print(json.dumps({"weights": weights, "peak": peak, "before_run": base}))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtypes", default=None, help="comma list (default fp32,fp16 on CUDA; fp32,bf16,fp16 on CPU)")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--impl", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = config(args.layers)
    dtypes = (args.dtypes or ("fp32,fp16" if device.type == "cuda" else "fp32,bf16,fp16")).split(",")
    n_params = sum(torch.Size(s).numel() for s in __import__("photoops.kernels.pops_weights",
                                                                fromlist=["x"]).expected_shapes(cfg).values())
    print(f"# pOps prior bench: {args.layers} layers, width {cfg.inner_dim}, {n_params / 1e6:.1f} M params, "
          f"device {device}, {args.threads} threads, torch {torch.__version__}")
    ref32, ours32 = build_pair(cfg, device)
    rows = []
    for name in dtypes:
        dt = DTYPES[name]
        ref, ours = (ref32, ours32) if dt == torch.float32 else (ref32.to(dt), ours32.to(dt))
        H, M, Hb, Mb, x = inputs(cfg, device, dt)
        P = torch.zeros(2, cfg.embedding_dim, device=device, dtype=dt)
        t = torch.tensor([500], device=device)
        with torch.no_grad():
            a = ref(x, t, P, Hb, attention_mask=Mb).predicted_image_embedding
            b = ours(x, t, P, Hb, Mb)
            c = ours.step(x, t, ours.prefix(P, Hb, Mb))
            err_full = float((a.float() - b.float()).abs().max() / a.float().abs().max())
            err_cached = float((a.float() - c.float()).abs().max() / a.float().abs().max())
            fr, fo = [], []
            for _ in range(args.repeats):  # interleaved
                fr += time_it(lambda ref=ref, x=x, t=t, P=P, Hb=Hb, Mb=Mb: ref(x, t, P, Hb, attention_mask=Mb),
                              device, 1)
                fo += time_it(lambda ours=ours, x=x, t=t, P=P, Hb=Hb, Mb=Mb: ours(x, t, P, Hb, Mb), device, 1)
        sr, so = [], []
        outs = {}
        for _ in range(max(1, args.repeats // 2)):
            sr += time_it(lambda ref=ref, H=H, M=M, dt=dt, outs=outs: outs.__setitem__(
                "ref", diffusers_sample(ref, H, M, args.steps, 4.0, 0, device, dt)), device, 1)
            so += time_it(lambda ours=ours, H=H, M=M, outs=outs: outs.__setitem__(
                "ours", kp.sample(ours, H, M, ref32.clip_mean.detach()[0], ref32.clip_std.detach()[0],
                                  steps=args.steps, guidance=4.0, seed=0)), device, 1)
        err_sample = float((outs["ref"].float().cpu() - outs["ours"].float().cpu()).abs().max()
                           / outs["ref"].float().abs().max())
        row = {"dtype": name, "full_diffusers_ms": 1e3 * statistics.median(fr), "full_ours_ms": 1e3 * statistics.median(fo),
               "sample_diffusers_s": statistics.median(sr), "sample_ours_s": statistics.median(so),
               "rel_err_full": err_full, "rel_err_cached_step": err_cached, "rel_err_sample": err_sample}
        if not args.no_memory:
            for impl in ("diffusers", "ours"):
                r = subprocess.run([sys.executable, __file__, "--child", "--impl", impl, "--dtype", name, "--layers",
                                    str(args.layers), "--steps", str(args.steps), "--threads", str(args.threads),
                                    "--device", args.device], capture_output=True, text=True, check=False)
                try:
                    mem = json.loads(r.stdout.strip().splitlines()[-1])
                except (IndexError, json.JSONDecodeError):
                    mem = {"error": r.stderr[-300:]}
                row[f"mem_{impl}"] = mem
        rows.append(row)
        if dt != torch.float32:
            del ref, ours
    print(f"\n{'dtype':5} | {'full call (CFG batch 2, 81 tok)':>36} | {f'{args.steps}-step CFG sample':>32} | "
          f"{'memory MB: weights + run peak':>30} | rel. err vs diffusers")
    print(f"{'':5} | {'diffusers':>10} {'ours':>10} {'ratio':>12} | {'diffusers':>9} {'ours':>9} {'speedup':>11} | "
          f"{'diffusers':>12} {'ours':>16} | full / cached / sample")
    for r in rows:
        ratio = r["full_ours_ms"] / r["full_diffusers_ms"]
        sp = r["sample_diffusers_s"] / r["sample_ours_s"]
        md, mo = r.get("mem_diffusers", {}), r.get("mem_ours", {})

        def mb(m):
            if "peak" not in m:
                return "n/a"
            return f"{m['weights'] / 2**20:.0f} + {(m['peak'] - m['before_run']) / 2**20:.1f}"


        print(f"{r['dtype']:5} | {r['full_diffusers_ms']:8.1f}ms {r['full_ours_ms']:8.1f}ms {ratio:10.3f}x | "
              f"{r['sample_diffusers_s']:8.2f}s {r['sample_ours_s']:8.2f}s {sp:10.1f}x | {mb(md):>12} {mb(mo):>16} | "
              f"{r['rel_err_full']:.1e} / {r['rel_err_cached_step']:.1e} / {r['rel_err_sample']:.1e}")
    f32 = next((r for r in rows if r["dtype"] == "fp32"), None)
    for r in rows:
        if f32 is not None and r is not f32:
            print(f"{r['dtype']} vs fp32 (ours): full call {r['full_ours_ms'] / f32['full_ours_ms']:.2f}x time, "
                  f"sample {r['sample_ours_s'] / f32['sample_ours_s']:.2f}x time")
    print("ratio = ours / diffusers on the same weights (goal <= 1.05); speedup = diffusers / ours")


if __name__ == "__main__":
    main()
