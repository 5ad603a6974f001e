"""Full-size bench on a CUDA GPU (issue 16 / issue 18): plain CFG sampling beside each sampling node family (Attention
Capture, Invert + Inversion Sampler replay, the edit lock, Semantic Guide, Prompt-to-Prompt Guide) in ONE process per
model, fp16 weights + compute.

    COMFYUI_DIR=... python bench/full_size_gpu.py --models sd15 sdxl --steps 10 --out results_dir
    COMFYUI_DIR=... python bench/full_size_gpu.py --models tiny --device cpu --steps 3   # a quick check of the script

The models are ``bench/full_size.py``'s seeded random-weight fixtures (``bench/full_size_fixtures.py``, generated on
first use), loaded with ComfyUI's own loaders with ``model_options={"dtype": float16}``; on CUDA ComfyUI computes in
fp16 too.  Rows (``--families``), one after the other in the same process (each run once unmeasured first, then
measured); the family code is ``bench/full_size.py``'s (``FAMILY_RUNNERS``, ``run_ptp``), given this script's measure:

* ``plain``: core ``CFGGuider`` + ``euler``, ``--steps`` karras steps, CFG 5 (2 UNet rows per call);
* ``plain_4rows``: the same on a batch of 2 latents (4 rows per call: the UNet work of a Semantic Guide / PtP step);
* ``capture``: Attention Capture (word "cat", lowres) + the same CFG sampling;
* ``invert_ddpm`` / ``invert_eta`` / ``invert_dpmpp_2m_sde``: Invert (that method) + Inversion Sampler replay;
* ``sega`` / ``ledits++``: Semantic Guide with 2 concepts (4 rows per call: against ``plain_4rows``);
* ``edit_lock``: Invert ``ddpm`` + Inversion Sampler with ``auto_lock="edit"`` (feather 8) under a CFGGuider on the
  target prompt ("... blue sofa");
* ``ptp``: Invert (``eta``) + ``PhotoOps_PromptToPromptGuide`` (replace red -> blue, noise_selection ``editing``: 4
  rows per call, cross / self windows 0.4 / 0.6, the paper's) + Inversion Sampler replay (``full_size.run_ptp``);
* ``ptp_split``: the same with ComfyUI's free-memory figure reported as 0 inside core's ``_calc_cond_batch`` only
  (so each conditioning runs in its own model call; model loading and attention see the real figure).

Measured: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (ours / plain and above the
allocation before the run, which holds the weights), wall time between ``cuda.synchronize`` calls, UNet calls and
rows, the largest size of the control's split-batch store of source Q/K, NaN/Inf in the results.  Prints a markdown
table and writes it (and the rows as JSON) under ``--out`` after every row, so a run stopped at a time limit keeps
the rows it finished.
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _common
import full_size as FS


FAMILIES = ["plain", "plain_4rows", "capture", "invert_ddpm", "invert_eta", "invert_dpmpp_2m_sde", "sega", "ledits++",
            "edit_lock", "ptp", "ptp_split"]
FOUR_ROWS = ("sega", "ledits++", "ptp")   # 4 UNet rows per call: against plain_4rows (ptp_split: 1 row, vs plain)
TARGET = 1.10                             # issue 16: peak <= 1.10x plain sampling with the same UNet rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["sd15"], choices=["sd15", "sdxl", "tiny"])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    ap.add_argument("--out", default="")
    ap.add_argument("--families", nargs="+", default=FAMILIES, choices=FAMILIES,
                    help="rows, in this order (plain first: the others' ratios are to it)")
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

            def plain():
                return FS.cfg_sample(model, pos, neg, noise, latent["samples"], sigmas)

            rows = {}
            results.append((model_name, px, rows))

            def no_measure(fn, unet_model=None):
                return fn(), {}

            for fam in args.families:
                try:
                    if fam == "plain":
                        plain()                                                  # warm-up (loads the model)
                        o, m = gpu_measure(plain, model)
                        outs, note = [o], ""
                    elif fam in ("ptp", "ptp_split"):
                        kw = dict(split_memory=functools.partial(FS.ptp_split_memory, only_calc_cond_batch=True),
                                  cross_replace=0.4, self_replace=0.6)
                        FS.run_ptp(fam, model, clip, pos, neg, latent, sigmas, measure_fn=no_measure, **kw)  # warm-up
                        o, m, note, _ = FS.run_ptp(fam, model, clip, pos, neg, latent, sigmas, measure_fn=gpu_measure,
                                                   **kw)
                        outs = [o]
                    else:
                        run = FS.FAMILY_RUNNERS[fam]
                        run(fam, model, clip, pos, neg, latent, noise, sigmas, measure_fn=no_measure)     # warm-up
                        outs, m, note, _, _ = run(fam, model, clip, pos, neg, latent, noise, sigmas,
                                                  measure_fn=gpu_measure)
                    m["nan"] = FS.bad_values(*outs)
                    m["note"] = note
                    rows[fam] = m
                    print(f"[{model_name}] {fam}: {m['time_s']:.3f} s, peak {m['peak'] / 2**30:.3f} GiB "
                          f"(+{(m['peak'] - m['base']) / 2**20:.0f} MiB), calls {m.get('calls')} rows {m.get('rows')}, "
                          f"store {m.get('store_max_bytes', 0) / 2**20:.1f} MiB, nan {m['nan']}; {note}", flush=True)
                except Exception as e:  # noqa: BLE001 - reported in the table
                    import traceback

                    traceback.print_exc()
                    rows[fam] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
                write(header, results, out_dir)          # after each row: a run stopped at its limit keeps these
            del M, model, clip
            mm.unload_all_models()
            mm.soft_empty_cache()
    print(write(header, results, out_dir), flush=True)


def write(header, results, out_dir):
    table = [header, "", "| model | row | UNet calls (rows) | wall (s) | peak allocated (GiB) | above pre-run (MiB) | "
             "peak vs plain | peak vs plain_4rows | peak vs its reference (target <= 1.10) | split store (MiB) | "
             "UNet ran in | NaN/Inf |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for model_name, px, rows in results:
        size = {"sd15": "SD1.5 512²", "sdxl": "SDXL 1024²"}.get(model_name, f"{model_name} {px}²")
        p, q = rows.get("plain", {}), rows.get("plain_4rows", {})
        for fam, m in rows.items():
            if "error" in m:
                table.append(f"| {size} | {fam} | – | – | – | – | – | – | – | – | – | "
                             f"**fails**: {m['error'].replace('|', '/')} |")
                continue
            r_p = f"{m['peak'] / p['peak']:.3f}" if "peak" in p else "–"
            r_q = f"{m['peak'] / q['peak']:.3f}" if "peak" in q else "–"
            ref, rname = (q, "plain_4rows") if fam in FOUR_ROWS else (p, "plain")
            if fam in ("plain", "plain_4rows") or "peak" not in ref:
                r_t = "–"
            else:
                v = m["peak"] / ref["peak"]
                r_t = f"{'**' if v > TARGET else ''}{v:.3f}{' OVER' if v > TARGET else ''}" \
                      f"{'**' if v > TARGET else ''} ({rname})"
            table.append(f"| {size} | {fam} | {m.get('calls')} ({m.get('rows')}) | {m['time_s']:.3f} | "
                         f"{m['peak'] / 2**30:.3f} | {(m['peak'] - m['base']) / 2**20:+.0f} | {r_p} | {r_q} | {r_t} | "
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
