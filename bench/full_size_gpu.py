"""Full-size bench on a CUDA GPU (issue 16 / issue 18): plain CFG sampling vs Eta inversion + Prompt-to-Prompt Guide
replay, and the same with core's batch split forced, in ONE process per model, fp16 weights + compute.

    COMFYUI_DIR=... python bench/full_size_gpu.py --models sd15 sdxl --steps 10 --out results_dir
    COMFYUI_DIR=... python bench/full_size_gpu.py --models tiny --device cpu     # a quick check of the script

The models are ``bench/full_size.py``'s seeded random-weight fixtures (``bench/full_size_fixtures.py``, generated on
first use), loaded with ComfyUI's own loaders with ``model_options={"dtype": float16}``; on CUDA ComfyUI computes in
fp16 too.  Rows, one after the other in the same process (each run once unmeasured first, then measured):

* ``plain``: core ``CFGGuider`` + ``euler``, ``--steps`` karras steps, CFG 5 (2 UNet rows per call);
* ``plain_4rows``: the same on a batch of 2 latents (4 rows per call: the UNet work of a PtP step);
* ``ptp``: Invert (``eta``) + ``PhotoOps_PromptToPromptGuide`` (replace red -> blue, noise_selection ``editing``: 4
  rows per call, cross / self windows 0.4 / 0.6, the paper's) + Inversion Sampler replay (``full_size.run_ptp``);
* ``ptp_split``: the same with ComfyUI's free-memory figure reported as 0 inside core's ``_calc_cond_batch`` only
  (so each conditioning runs in its own model call; model loading and attention see the real figure).

Measured: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (ours / plain and above the
allocation before the run, which holds the weights), wall time between ``cuda.synchronize`` calls, UNet calls and
rows, the largest size of the control's split-batch store of source Q/K, NaN/Inf in the result.  Prints a markdown
table and writes it (and the rows as JSON) under ``--out``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _common
import full_size as FS


def calc_cond_batch_short():
    """ComfyUI's ``get_free_memory`` reports 0 B only when core's ``_calc_cond_batch`` asks (it then runs each
    conditioning in its own model call); on a GPU a global patch would also make model loading offload weights."""
    import comfy.model_management as mm

    @contextlib.contextmanager
    def cm():
        real = mm.get_free_memory

        def short(dev=None, torch_free_too=False):
            if not torch_free_too and sys._getframe(1).f_code.co_name == "_calc_cond_batch":
                return 0
            return real(dev, torch_free_too)
        mm.get_free_memory = short
        try:
            yield
        finally:
            mm.get_free_memory = real
    return cm()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["sd15"], choices=["sd15", "sdxl", "tiny"])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    ap.add_argument("--out", default="")
    args = ap.parse_args()

    import torch

    _common.import_pack()
    from comfy_harness import comfyenv

    comfyenv.ensure_comfy_importable(cpu=args.device == "cpu")
    import comfy.model_management as mm
    import comfy.samplers

    cuda = args.device == "cuda"
    dev_name = torch.cuda.get_device_name(0) if cuda else "cpu"
    header = (f"device {dev_name}, torch {torch.__version__}, ComfyUI device {mm.get_torch_device()}, "
              f"{args.dtype} weights + compute, {args.steps} steps (karras), CFG {FS.CFG}")
    print(header, flush=True)
    out_dir = Path(args.out) if args.out else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
    results = []

    def gpu_measure(fn, unet_model=None):
        cnt = FS.UNetCalls(unet_model) if unet_model is not None else None
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            base = FS.reset_peak()
        t0 = time.perf_counter()
        try:
            res = fn()
            if cuda:
                torch.cuda.synchronize()
        finally:
            dt = time.perf_counter() - t0
            if cnt is not None:
                cnt.close()
        pk = torch.cuda.max_memory_allocated() if cuda else FS.peak()
        m = {"time_s": dt, "peak": pk, "base": base}
        if cnt is not None:
            m.update(calls=cnt.calls, rows=cnt.rows, compute=sorted(cnt.dtypes))
        return res, m

    with torch.inference_mode():
        for model_name in args.models:
            t0 = time.time()
            dt = FS.torch_dtype(args.dtype)
            M = FS.load_models(model_name, dt, print)
            model, clip = M["model"], M["clip"]
            if not cuda and args.dtype != "fp32":
                model = FS.with_compute_dtype(model, args.dtype + "c")
            px = FS.SIZES[model_name]
            h = px // 8
            g = torch.Generator().manual_seed(0)
            latent = {"samples": torch.randn(1, 4, h, h, generator=g)}
            noise = torch.randn(1, 4, h, h, generator=g)
            enc = lambda t: clip.encode_from_tokens_scheduled(clip.tokenize(t))
            pos, neg = enc(FS.PROMPT), enc("")
            ms = model.get_model_object("model_sampling")
            sigmas = comfy.samplers.calculate_sigmas(ms, "karras", args.steps).cpu()
            print(f"[{model_name}] loaded in {time.time() - t0:.0f} s", flush=True)

            def plain(batch=1):
                gd = comfy.samplers.CFGGuider(model)
                gd.set_conds(pos, neg)
                gd.set_cfg(FS.CFG)
                return gd.sample(noise.expand(batch, -1, -1, -1).clone(),
                                 latent["samples"].expand(batch, -1, -1, -1).clone(),
                                 comfy.samplers.ksampler("euler"), sigmas, disable_pbar=True, seed=0)

            rows = {}
            for fam in ("plain", "plain_4rows", "ptp", "ptp_split"):
                try:
                    if fam.startswith("plain"):
                        b = 2 if fam == "plain_4rows" else 1
                        plain(b)                                                 # warm-up (loads the model)
                        o, m = gpu_measure(lambda b=b: plain(b), model)
                        note = ""
                    else:
                        kw = dict(measure_fn=gpu_measure, split_memory=calc_cond_batch_short, cross_replace=0.4,
                                  self_replace=0.6)
                        FS.run_ptp(fam, model, clip, pos, neg, latent, sigmas, **kw)              # warm-up
                        o, m, note, _ = FS.run_ptp(fam, model, clip, pos, neg, latent, sigmas, **kw)
                    m["nan"] = FS.bad_values(o)
                    m["note"] = note
                    rows[fam] = m
                    print(f"[{model_name}] {fam}: {m['time_s']:.3f} s, peak {m['peak'] / 2**30:.3f} GiB "
                          f"(+{(m['peak'] - m['base']) / 2**20:.0f} MiB), calls {m.get('calls')} rows {m.get('rows')}, "
                          f"store {m.get('store_max_bytes', 0) / 2**20:.1f} MiB, nan {m['nan']}", flush=True)
                except Exception as e:  # noqa: BLE001 - reported in the table
                    import traceback

                    traceback.print_exc()
                    rows[fam] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            results.append((model_name, px, rows))
            write(header, results, out_dir)              # after each model: a later one that fails keeps these
            del M, model, clip
            mm.unload_all_models()
            mm.soft_empty_cache()
    print(write(header, results, out_dir), flush=True)


def write(header, results, out_dir):
    table = [header, "", "| model | row | UNet calls (rows) | wall (s) | peak allocated (GiB) | above pre-run (MiB) | "
             "peak vs plain | peak vs plain_4rows | split store (MiB) | UNet ran in | NaN/Inf |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for model_name, px, rows in results:
        size = {"sd15": "SD1.5 512²", "sdxl": "SDXL 1024²"}.get(model_name, f"{model_name} {px}²")
        p, q = rows.get("plain", {}), rows.get("plain_4rows", {})
        for fam, m in rows.items():
            if "error" in m:
                table.append(f"| {size} | {fam} | – | – | – | – | – | – | – | – | **fails**: {m['error'].replace('|', '/')} |")
                continue
            r_p = f"{m['peak'] / p['peak']:.3f}" if "peak" in p else "–"
            r_q = f"{m['peak'] / q['peak']:.3f}" if "peak" in q else "–"
            table.append(f"| {size} | {fam} | {m.get('calls')} ({m.get('rows')}) | {m['time_s']:.3f} | "
                         f"{m['peak'] / 2**30:.3f} | {(m['peak'] - m['base']) / 2**20:+.0f} | {r_p} | {r_q} | "
                         f"{m.get('store_max_bytes', 0) / 2**20:.1f} | {'/'.join(m.get('compute') or [])} | "
                         f"{'**yes**' if m['nan'] else 'no'} |")
    text = "\n".join(table) + "\n"
    if out_dir:
        (out_dir / "full_size_gpu.md").write_text(text)
        (out_dir / "full_size_gpu.json").write_text(json.dumps(
            {"header": header, "results": [[a, b, c] for a, b, c in results]}, indent=1, default=str))
    return text


if __name__ == "__main__":
    main()
