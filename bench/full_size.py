"""Full-size readiness bench (issue 16): our node families beside plain sampling of the same model, in-process
ComfyUI on the CPU, at SD1.5 512x512 and SDXL 1024x1024, per compute dtype.

    COMFYUI_DIR=... nice -n 15 .venv/bin/python bench/full_size.py --models sd15 --dtypes fp32 bf16
    COMFYUI_DIR=... nice -n 15 .venv/bin/python bench/full_size.py --models sdxl --dtypes bf16 --families capture
    .venv/bin/python bench/full_size.py --table          # only print / write the table from the cached rows

Models: the seeded random-weight files of ``bench/full_size_fixtures.py`` (generated on first use, cached in
``$PHOTOOPS_BENCH_CACHE``, default ``~/.cache/photoops-bench/``), loaded with ComfyUI's own loader functions
(``load_checkpoint_guess_config`` / ``load_diffusion_model`` / ``load_clip`` / ``VAE``: what
CheckpointLoaderSimple, UNETLoader, DualCLIPLoader and VAELoader call) with ``model_options={"dtype": ...}``
(the in-process form of ``--bf16-unet`` / ``--fp16-unet``).

Each (model, dtype) group runs in its own child process: load once, run plain sampling (core ``CFGGuider``
+ ``euler``, what KSampler / SamplerCustomAdvanced do, at the same size, steps and CFG), then each node family,
one after the other, side by side in that process.  Every finished row is cached as JSON under
``<cache>/rows/`` so a killed run resumes where it stopped (``--fresh`` re-measures).

Columns: wall time per sampling step (ours / plain), peak resident memory of the process during the run
(ours / plain, both including the loaded weights; and the peak above the RSS just before the run), the bytes
of our own state (INVERSION noise maps, attention stores, mask stores, learned tensors), NaN/Inf in the
result.  CPU peak = VmHWM after resetting it (``/proc/self/clear_refs``) just before the run.
"""
from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
import json
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _common
import full_size_fixtures as F

FAMILIES = ["plain_4rows", "capture", "invert_ddpm", "invert_eta", "invert_dpmpp_2m_sde", "sega", "ledits++", "ptp",
            "ptp_split", "concept_learn",
            "concept_learn_gc", "crf", "instruct_apply", "pops"]
EXTRA_FAMILIES = ["edit_lock"]    # not run by default: --families edit_lock (bench/full_size_gpu.py runs it)
SIZES = {"sd15": 512, "sdxl": 1024, "tiny": 64}   # tiny: the CI fixture, a quick dtype sweep
PROMPT = "a photo of a cat sitting on a red sofa"
PTP_TARGET = "a photo of a cat sitting on a blue sofa"    # Prompt-to-Prompt Guide rows: one word swapped (replace)
CFG = 5.0
# bf16 / fp16: the UNet's weights in that dtype, loaded as ComfyUI's loaders do (--bf16-unet / --fp16-unet); on a
# CPU ComfyUI then computes in fp32 (its manual cast: model_management.unet_manual_cast). bf16c / fp16c: weights AND
# compute in that dtype, as on a GPU, set with ComfyUI's own ModelPatcher.set_model_compute_dtype (core's
# ModelComputeDtype node), so our kernels see half-precision activations here too.
DTYPES = ["fp32", "bf16", "fp16", "bf16c", "fp16c"]
DTYPE_LABELS = {"fp32": "fp32", "bf16": "bf16 weights, fp32 compute", "fp16": "fp16 weights, fp32 compute",
                "bf16c": "bf16 weights + compute", "fp16c": "fp16 weights + compute"}


def torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name.rstrip("c")]


def with_compute_dtype(patcher, name: str):
    """``patcher`` itself, or for ``bf16c`` / ``fp16c`` a clone computing in that dtype (ModelComputeDtype)."""
    if not name.endswith("c"):
        return patcher
    m = patcher.clone()
    m.set_model_compute_dtype(torch_dtype(name))
    return m


# ----------------------------------------------------------------------------- memory / state helpers

def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def rss() -> int:
    return _status_kb("VmRSS") * 1024


def reset_peak() -> int:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return rss()


def peak() -> int:
    return _status_kb("VmHWM") * 1024


def state_bytes(*objs) -> int:
    """Bytes of the tensors reachable from ``objs`` (dicts, lists, plain objects), not entering torch modules or
    ComfyUI model patchers (those hold the model weights), each storage counted once."""
    import torch

    seen, ptrs, total = set(), set(), 0
    stack = list(objs)
    while stack:
        o = stack.pop()
        if id(o) in seen or o is None:
            continue
        seen.add(id(o))
        if isinstance(o, torch.Tensor):
            if o.device.type == "meta":
                continue
            key = (o.untyped_storage().data_ptr(), o.untyped_storage().nbytes())
            if key not in ptrs:
                ptrs.add(key)
                total += o.untyped_storage().nbytes()
        elif isinstance(o, torch.nn.Module) or type(o).__name__ in ("ModelPatcher", "CLIP", "VAE"):
            continue
        elif isinstance(o, dict):
            stack.extend(o.values())
        elif isinstance(o, (list, tuple, set)):
            stack.extend(o)
        elif hasattr(o, "__dict__") and not isinstance(o, type):
            stack.extend(vars(o).values())
        elif hasattr(o, "__slots__"):
            stack.extend(getattr(o, s, None) for s in o.__slots__)
    return total


def bad_values(*ts) -> bool:
    import torch

    return any(bool((~torch.isfinite(t.float())).any()) for t in ts if isinstance(t, torch.Tensor))


class UNetCalls:
    """Counts UNet forward calls and rows (a forward hook on the diffusion model)."""

    def __init__(self, model):
        self.calls = self.rows = 0
        self.dtypes = set()     # the UNet's output dtypes: the compute dtype it ran in
        self.h = model.model.diffusion_model.register_forward_hook(self._hook)

    def _hook(self, mod, args, out):
        self.calls += 1
        self.rows += int(out.shape[0])
        self.dtypes.add(str(out.dtype).replace("torch.", ""))

    def close(self):
        self.h.remove()


def measure(fn, unet_model=None):
    """Run ``fn()`` -> (result, {time_s, peak, base, calls, rows})."""
    base = reset_peak()
    cnt = UNetCalls(unet_model) if unet_model is not None else None
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        res = fn()
    finally:
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        if cnt is not None:
            cnt.close()
    # cpu_s: this process's CPU time (all its threads); with --threads 1 on a shared or paused machine it is the
    # fairer speed measure (wall time also counts the time other jobs had the cores)
    m = {"time_s": dt, "cpu_s": dc, "peak": peak(), "base": base}
    if cnt is not None:
        m.update(calls=cnt.calls, rows=cnt.rows, compute=sorted(cnt.dtypes))
    return res, m


# ----------------------------------------------------------------------------- child: one (model, dtype) group

def rows_dir() -> Path:
    d = F.cache_dir() / "rows"
    d.mkdir(parents=True, exist_ok=True)
    return d


def row_path(model: str, dtype: str, family: str, steps: int) -> Path:
    return rows_dir() / f"{model}_{dtype}_{family}_s{steps}.json"


def load_models(model: str, dtype, log, unet: bool = True):
    import comfy.sd
    import comfy.utils

    out = {}
    if model == "sd15":
        p = F.ensure("sd15", log=log)["sd15_full"]
        m, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(p), output_vae=True, output_clip=True,
                                                                output_model=unet, model_options={"dtype": dtype})
        out.update(model=m, clip=clip, vae=vae)
    elif model == "sdxl":
        ps = F.ensure("sdxl", log=log)
        out["clip"] = comfy.sd.load_clip([str(ps["sdxl_clip_l"]), str(ps["sdxl_clip_g"])],
                                         clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION)
        out["vae"] = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(ps["sdxl_vae"])))
        out["model"] = comfy.sd.load_diffusion_model(str(ps["sdxl_unet"]), model_options={"dtype": dtype})
    elif model == "tiny":
        from comfy_harness import fixtures

        info = fixtures.cached_sd15_checkpoint()
        m, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(info["path"]), output_vae=True, output_clip=True,
                                                                model_options={"dtype": dtype})
        out.update(model=m, clip=clip, vae=vae)
    else:
        raise ValueError(model)
    return out


def _finisher(args, log):
    px = SIZES[args.model]

    def finish(family, ours, base_m, out, state, note="", steps_ours=None, steps_plain=None):
        so = steps_ours or args.steps
        sp = steps_plain or args.steps
        row = {"model": args.model, "dtype": args.dtype, "family": family, "steps": args.steps, "px": px,
               "threads": args.threads, "ours": ours, "plain": base_m,
               "time_per_step_ours": ours["time_s"] / so, "time_per_step_plain": base_m["time_s"] / sp,
               "cpu_per_step_ours": ours["cpu_s"] / so if "cpu_s" in ours else None,
               "cpu_per_step_plain": base_m["cpu_s"] / sp if "cpu_s" in base_m else None,
               "state_bytes": state, "nan": bad_values(*out) if out else None, "note": note,
               "when": time.strftime("%Y-%m-%d %H:%M:%S")}
        row_path(args.model, args.dtype, family, args.steps).write_text(json.dumps(row, indent=1))
        log(f"[{args.model} {args.dtype}] {family}: {fmt_row(row)}")
    return finish


def _failer(args, log):
    px = SIZES[args.model]

    def fail(family, e):
        row = {"model": args.model, "dtype": args.dtype, "family": family, "steps": args.steps, "px": px,
               "threads": args.threads, "mem_cap_gib": args.mem_cap_gib,
               "error": f"{type(e).__name__}: {str(e)[:300]}",
               "when": time.strftime("%Y-%m-%d %H:%M:%S")}
        row_path(args.model, args.dtype, family, args.steps).write_text(json.dumps(row, indent=1))
        log(f"[{args.model} {args.dtype}] {family}: FAILED {row['error']}\n{traceback.format_exc()}")
    return fail


def child(args) -> None:
    """Loads and runs under ``torch.inference_mode()``, as ComfyUI's executor does (so model weights are
    inference tensors, as in a real graph)."""
    import torch

    if args.mem_cap_gib:
        # a family that needs more fails in its own row ("can't allocate memory") instead of driving a shared
        # machine into the kernel's OOM killer
        import resource

        cap = int(args.mem_cap_gib * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    with torch.inference_mode():
        _child(args)


def _child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    _common.import_pack()
    from comfy_harness import comfyenv

    comfyenv.ensure_comfy_importable()
    import comfy.samplers
    from photoops.nodes import concept_learn as ncl

    log = lambda s: print(s, flush=True)
    dt = torch_dtype(args.dtype)
    todo = [f for f in args.families if args.fresh or not row_path(args.model, args.dtype, f, args.steps).is_file()]
    todo = [f for f in todo if f not in ("pops", "crf")]
    if not todo:
        return
    t0 = time.time()
    if todo == ["instruct_apply"]:
        # its own process: the SD1.5 checkpoint's CLIP + VAE and the IP2P UNet only (both UNets plus Instruction
        # Learn's activations at 512 px in fp32 passed the 13 GiB budget)
        M = load_models(args.model, dt, log, unet=False)
        fam = "instruct_apply"
        try:
            run_instruct(args, fam, None, M["clip"], M["vae"], M, measure, _finisher(args, log), None, log, None)
        except Exception as e:  # noqa: BLE001
            _failer(args, log)(fam, e)
        return
    M = load_models(args.model, dt, log)
    model, clip, vae = with_compute_dtype(M["model"], args.dtype), M["clip"], M["vae"]
    log(f"[{args.model} {args.dtype}] loaded in {time.time() - t0:.0f} s, RSS {rss() / 2**30:.2f} GiB, "
        f"{type(model.model).__name__} / {type(model.model.model_config).__name__}, "
        f"unet weights {model.model.diffusion_model.input_blocks[0][0].weight.dtype}")
    px = SIZES[args.model]
    lat_hw = px // 8
    g = torch.Generator().manual_seed(0)
    latent = {"samples": torch.randn(1, 4, lat_hw, lat_hw, generator=g)}
    noise = torch.randn(1, 4, lat_hw, lat_hw, generator=g)
    enc = lambda t: clip.encode_from_tokens_scheduled(clip.tokenize(t))
    pos, neg = enc(PROMPT), enc("")
    ms = model.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(ms, "karras", args.steps).cpu()

    def plain(m=None, p=pos, n=neg, lat=None):
        gd = comfy.samplers.CFGGuider(m or model)
        gd.set_conds(p, n)
        gd.set_cfg(CFG)
        lt = latent["samples"] if lat is None else lat
        return gd.sample(noise, lt, comfy.samplers.ksampler("euler"), sigmas, disable_pbar=True, seed=0)

    finish, fail = _finisher(args, log), _failer(args, log)

    base_file = row_path(args.model, args.dtype, "plain", args.steps)
    plain()                     # warm-up (first-call allocations, oneDNN kernel creation), not measured
    out, base_m = measure(plain, model)
    base_m["nan"] = bad_values(out)
    base_file.write_text(json.dumps(base_m))
    log(f"[{args.model} {args.dtype}] plain: UNet computes in {base_m.get('compute')}, {args.steps} steps "
        f"{base_m['time_s']:.1f} s, peak "
        f"{base_m['peak'] / 2**30:.2f} GiB (+{(base_m['peak'] - base_m['base']) / 2**20:.0f} MiB), "
        f"nan {base_m['nan']}")

    ptp_joint = None            # the ptp row's result, for the ptp_split row to compare with
    for fam in todo:
        try:
            if fam in FAMILY_RUNNERS:
                outs, m, note, state, steps_ours = FAMILY_RUNNERS[fam](fam, model, clip, pos, neg, latent, noise,
                                                                       sigmas)
                finish(fam, m, base_m, outs, state, note=note, steps_ours=steps_ours)
            elif fam in ("ptp", "ptp_split"):
                o, m, note, state = run_ptp(fam, model, clip, pos, neg, latent, sigmas)
                if fam == "ptp":
                    ptp_joint = o
                elif ptp_joint is not None:
                    note += (f"; result vs the one-call ptp row: "
                             f"{float((o - ptp_joint).norm() / ptp_joint.norm()):.1e} relative")
                finish(fam, m, base_m, [o], state, note=note, steps_ours=2 * args.steps)   # ours: store_max_bytes
            elif fam in ("concept_learn", "concept_learn_gc"):
                from comfy_harness.inprocess import private_embeddings_output

                img = torch.rand(1, px, px, 3, generator=g)
                with tempfile.TemporaryDirectory() as td, private_embeddings_output(td):
                    res, m = measure(lambda img=img: ncl.ConceptLearnNode.execute(
                        model, clip, vae, img, "fs_a,fs_b", "cat,sofa", args.cl_steps, 5e-3, 1, 0, px,
                        save_every=0, overwrite=True, gradient_checkpointing=fam == "concept_learn_gc").result, model)
                finish(fam, m, base_m, [r for r in res if isinstance(r, torch.Tensor)], state_bytes(res),
                       note=f"{args.cl_steps} M-steps + E-steps (1 EM round, CRF on), batch 1, vs plain sampling"
                            + ("; gradient checkpointing on" if fam == "concept_learn_gc" else ""),
                       steps_ours=args.cl_steps)
            elif fam == "instruct_apply":
                run_instruct(args, fam, model, clip, vae, M, measure, finish, base_m, log, plain)
            else:
                raise ValueError(f"unknown family {fam}")
        except Exception as e:  # noqa: BLE001 - recorded in the row, the table says which failed and why
            fail(fam, e)
        gc.collect()


# ----------------------------------------------------------------------------- node families, one function each
# Each takes (fam, model, clip, pos, neg, latent, noise, sigmas) and, as run_ptp, a ``measure_fn`` (default
# :func:`measure`; bench/full_size_gpu.py passes its CUDA one) and returns (outputs to check for NaN/Inf,
# measurement, note, our state in bytes, steps of ours for the per-step time or None = the plain run's).

def cfg_sample(model, pos, neg, noise, lat, sigmas, sampler=None, batch=1):
    """Core ``CFGGuider`` + ``euler`` (or ``sampler``), CFG ``CFG``, on ``batch`` copies of ``noise`` / ``lat``."""
    import comfy.samplers

    gd = comfy.samplers.CFGGuider(model)
    gd.set_conds(pos, neg)
    gd.set_cfg(CFG)
    if batch > 1:
        noise, lat = (t.expand(batch, -1, -1, -1).clone() for t in (noise, lat))
    return gd.sample(noise, lat, sampler or comfy.samplers.ksampler("euler"), sigmas, disable_pbar=True, seed=0)


def run_plain_4rows(fam, model, clip, pos, neg, latent, noise, sigmas, measure_fn=None):
    """Core CFGGuider on a batch of 2 latents (4 UNet rows per call): the reference of the 4-row families."""
    o, m = (measure_fn or measure)(lambda: cfg_sample(model, pos, neg, noise, latent["samples"], sigmas, batch=2),
                                   model)
    return [o], m, ("core CFGGuider on a batch of 2 latents: the UNet work of a 2-concept Semantic Guide step "
                    "(4 rows per call)"), 0, None


def run_capture(fam, model, clip, pos, neg, latent, noise, sigmas, measure_fn=None):
    """Attention Capture (word "cat", lowres) on the model, then plain CFG sampling with the patched model."""
    from photoops.nodes.attention_mask import AttentionCaptureNode

    patched, cap = AttentionCaptureNode.execute(model, clip, PROMPT, "cat", "lowres", 0.0, 1.0).result
    o, m = (measure_fn or measure)(lambda: cfg_sample(patched, pos, neg, noise, latent["samples"], sigmas), model)
    return [o, cap.recorder.result()], m, "", state_bytes(cap), None


def _replay(model, pos, neg, latent, sigmas, inv, start, **sampler_kw):
    """Inversion Sampler replay of ``inv`` from ``start`` under a CFGGuider on (pos, neg), on the full sampling
    list (the sampler drops / replaces its final 0 as Invert did)."""
    import torch
    from photoops.nodes import inversion as ninv

    sampler = ninv.InversionSamplerNode.execute(inv, **sampler_kw).result[0]
    return cfg_sample(model, pos, neg, torch.zeros_like(latent["samples"]), start["samples"], sigmas, sampler)


def run_invert(fam, model, clip, pos, neg, latent, noise, sigmas, measure_fn=None):
    """``invert_<method>``: Invert (method, skip 0, CFG ``CFG``) + Inversion Sampler replay on the source prompt;
    notes the reconstruction error (for eta also the same ladder replayed as plain DDIM, not measured)."""
    import torch
    from photoops.nodes import inversion as ninv

    method = fam[len("invert_"):]

    def run():
        inv, start = ninv.InvertNode.execute(model, pos, neg, latent, sigmas, method, 0, CFG, 0).result
        return inv, start, _replay(model, pos, neg, latent, sigmas, inv, start)

    (inv, start, o), m = (measure_fn or measure)(run, model)
    rel = lambda y: float((y - latent["samples"]).norm() / latent["samples"].norm())
    err = rel(o)
    note = f"invert {inv.steps} + replay {inv.steps} steps; recon rel err {err:.1e}"
    if method == "eta":
        # Eta Inversion does not reconstruct by design: its replay is DDIM plus eta-scaled seeded noise (the best
        # of 10 candidates), so its error is DDIM inversion's. Not measured: the same ladder replayed as plain DDIM
        # (1 UNet call per step), which the eta error should match.
        ddim = dataclasses.replace(inv, method="ddim", noises=None, eta=torch.zeros(inv.steps))
        e_ddim = rel(_replay(model, pos, neg, latent, sigmas, ddim, start))
        rel_gap = abs(err - e_ddim) / max(e_ddim, 1e-12)
        note += (f"; the same DDIM ladder replayed without noise: {e_ddim:.1e} "
                 f"({'the same: ' if rel_gap < 1e-2 else ''}not exact by design, DDIM inversion's error, "
                 f"large with random weights at {inv.steps} step(s); store_optimal_noise replays exactly, "
                 f"tests/test_full_size_fixes.py)")
    return [o, inv.noises, start["samples"]], m, note, state_bytes(inv), 2 * inv.steps


def run_edit_lock(fam, model, clip, pos, neg, latent, noise, sigmas, measure_fn=None, feather=8.0):
    """Invert (ddpm) + Inversion Sampler with ``auto_lock="edit"`` (feather ``feather``) replayed under a CFGGuider
    on the target prompt (``PTP_TARGET``: the edit the lock follows)."""
    from photoops.nodes import inversion as ninv

    target = clip.encode_from_tokens_scheduled(clip.tokenize(PTP_TARGET))

    def run():
        inv, start = ninv.InvertNode.execute(model, pos, neg, latent, sigmas, "ddpm", 0, CFG, 0).result
        return inv, start, _replay(model, target, neg, latent, sigmas, inv, start, auto_lock="edit", feather=feather)

    (inv, start, o), m = (measure_fn or measure)(run, model)
    note = (f"invert ddpm {inv.steps} + replay {inv.steps} steps on the target prompt, auto_lock edit, feather "
            f"{feather:g}")
    return [o, inv.noises, start["samples"]], m, note, state_bytes(inv), 2 * inv.steps


def run_semantic(fam, model, clip, pos, neg, latent, noise, sigmas, measure_fn=None):
    """Semantic Guide (``sega`` / ``ledits++``) with 2 concepts ("dog" add, "cat" remove): 4 UNet rows per call."""
    import comfy.samplers
    from photoops.nodes import semantic_guide as nsg

    cs = None
    for text, d in (("dog", "add"), ("cat", "remove")):
        cs = nsg.EditConceptNode.execute(clip, text, d, 5.0, 0.9, 0, -1, 1.0, previous=cs).result[0]
    guider, store = nsg.SemanticGuideNode.execute(model, pos, neg, cs, fam, CFG, True, 0.3, 0.6, "intersect").result
    o, m = (measure_fn or measure)(lambda: guider.sample(noise, latent["samples"], comfy.samplers.ksampler("euler"),
                                                         sigmas, disable_pbar=True, seed=0), model)
    state = state_bytes(store) + state_bytes({k: v for k, v in vars(guider).items()
                                              if k not in ("model_patcher", "model_options", "conds",
                                                           "original_conds", "inner_model")})
    return [o], m, "2 concepts, target CFG: 4 rows per step vs 2", state, None


FAMILY_RUNNERS = {"plain_4rows": run_plain_4rows, "capture": run_capture, "invert_ddpm": run_invert,
                  "invert_eta": run_invert, "invert_dpmpp_2m_sde": run_invert, "edit_lock": run_edit_lock,
                  "sega": run_semantic, "ledits++": run_semantic}


def ptp_split_memory(only_calc_cond_batch: bool = False):
    """A context manager: ComfyUI's ``get_free_memory`` reports 0 B free (its own attention chunking still gets the
    real figure), so core's ``calc_cond_batch`` runs every conditioning in its own model call, as on a device whose
    memory is short (tests/test_comfy_prompt_to_prompt.py does the same).  ``only_calc_cond_batch``: 0 B only when
    core's ``_calc_cond_batch`` asks (on a GPU a global patch would also make model loading offload weights)."""
    import contextlib

    import comfy.model_management as mm

    @contextlib.contextmanager
    def cm():
        real = mm.get_free_memory

        def short(dev=None, torch_free_too=False):
            if torch_free_too or (only_calc_cond_batch and sys._getframe(1).f_code.co_name != "_calc_cond_batch"):
                return real(dev, torch_free_too)
            return 0
        mm.get_free_memory = short
        try:
            yield
        finally:
            mm.get_free_memory = real
    return cm()


def track_store(control):
    """Wraps ``control.attend`` (an instance attribute, so only this control) to record the largest size of its
    split-batch store of source queries / keys (``control.stash``) after any layer call: ``box["max"]`` bytes,
    ``box["entries"]`` layers at that moment."""
    box = {"max": 0, "entries": 0}
    inner = control.attend

    def attend(*a, **k):
        out = inner(*a, **k)
        n = sum(t.numel() * t.element_size() for qk in control.stash.values() for t in qk)
        if n > box["max"]:
            box["max"], box["entries"] = n, len(control.stash)
        return out
    control.attend = attend
    return box


def run_ptp(fam, model, clip, pos, neg, latent, sigmas, measure_fn=None, unet_model=None, split_memory=None,
            cross_replace=1.0, self_replace=1.0):
    """Invert (``eta``, as the invert_eta row) + Prompt-to-Prompt Guide (replace "red" -> "blue", noise_selection
    ``editing``: target, negative, source and the source's negative = 4 UNet rows per call) + Inversion Sampler
    replay through the guider's ``sample`` (what SamplerCustomAdvanced calls).  Both windows open over the whole
    run (cross_replace = self_replace = 1: at 1 step the paper's 0.4 / 0.6 open neither window, so the control would
    not act), no blend.  ``ptp_split``: the same with free memory reported as 0, so every conditioning runs in its
    own model call and the control keeps the source's Q/K between calls (``split_memory``: the context manager
    that makes it so, default :func:`ptp_split_memory`).  Returns (latent, measurement, note, state bytes); the
    measurement holds ``store_max_bytes``."""
    import torch
    from photoops.nodes import inversion as ninv
    from photoops.nodes import prompt_to_prompt as nptp

    measure_fn = measure_fn or measure
    guider = nptp.PromptToPromptGuideNode.execute(model, clip, PROMPT, PTP_TARGET, neg, CFG, "replace", cross_replace,
                                                  self_replace, noise_selection="editing").result[0]
    box = track_store(guider.control)

    def run():
        inv, start = ninv.InvertNode.execute(model, pos, neg, latent, sigmas, "eta", 0, CFG, 0).result
        sampler = ninv.InversionSamplerNode.execute(inv).result[0]
        o = guider.sample(torch.zeros_like(latent["samples"]), start["samples"], sampler, sigmas,
                          disable_pbar=True, seed=0)
        return inv, o

    if fam == "ptp_split":
        with (split_memory or ptp_split_memory)():
            (inv, o), m = measure_fn(run, unet_model or model)
    else:
        (inv, o), m = measure_fn(run, unet_model or model)
    m["store_max_bytes"] = box["max"]
    state = state_bytes(inv) + state_bytes(guider.control)
    note = (f"Invert eta {inv.steps} step(s) + PtP Guide replay (replace red->blue, cross / self "
            f"{cross_replace:g} / {self_replace:g}, "
            f"noise_selection editing: 4 rows per step); split-batch store of source Q/K: max "
            f"{box['max'] / 2**20:.1f} MiB ({box['entries']} layers)"
            + ("; free memory reported as 0: every conditioning in its own call" if fam == "ptp_split" else ""))
    return o, m, note, state


def run_instruct(args, fam, model, clip, vae, M, measure, finish, base_m, log, plain):
    """Instruction Learn (1 step, to get an instruction of the real layout) then Instruction Apply on an
    IP2P-shaped UNet (8 input channels) beside plain IP2P sampling (InstructPixToPixConditioning ->
    DualCFGGuider -> euler)."""
    import comfy.samplers
    import comfy.sd
    import torch
    from comfy_extras.nodes_ip2p import InstructPixToPixConditioning
    from photoops.nodes import instructbrush as nib
    from photoops.nodes.comfy.files import register_model_folder  # noqa: F401

    if args.model not in ("sd15", "tiny"):
        raise NotImplementedError("the IP2P fixture is SD1.5-shaped only")
    dt = torch_dtype(args.dtype)
    if args.model == "tiny":
        from comfy_harness.ip2p_fixtures import cached_ip2p_checkpoint

        ip2p = comfy.sd.load_checkpoint_guess_config(str(cached_ip2p_checkpoint()["path"]), output_vae=False,
                                                     output_clip=False, model_options={"dtype": dt})[0]
    else:
        p = F.ensure("ip2p", log=log)["sd15_ip2p_unet"]
        ip2p = comfy.sd.load_diffusion_model(str(p), model_options={"dtype": dt})
    ip2p = with_compute_dtype(ip2p, args.dtype)
    log(f"IP2P model: {type(ip2p.model).__name__} / {type(ip2p.model.model_config).__name__}")
    px = SIZES[args.model]
    g = torch.Generator().manual_seed(1)
    before = torch.rand(1, px, px, 3, generator=g)
    after = torch.rand(1, px, px, 3, generator=g)
    with tempfile.TemporaryDirectory() as td:
        import folder_paths

        old = folder_paths.get_output_directory()
        folder_paths.set_output_directory(td)
        try:
            inst = nib.InstructionLearnNode.execute(ip2p, clip, vae, before, after, "make it look like this", "fs",
                                                    1, 1e-3, 0, 1, 1, False, 0, False).result[0]
        finally:
            folder_paths.set_output_directory(old)
    patched, ipos, _ = nib.InstructionApplyNode.execute(ip2p, clip, inst, 1.0).result
    empty = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    ppos, pneg, lat = InstructPixToPixConditioning.execute(ipos, empty, before, vae).result
    g2 = torch.Generator().manual_seed(2)
    noise = torch.randn(lat["samples"].shape, generator=g2)
    ms = ip2p.get_model_object("model_sampling")
    sig = comfy.samplers.calculate_sigmas(ms, "karras", args.steps).cpu()

    def dual(m):
        from comfy_extras.nodes_custom_sampler import Guider_DualCFG

        gd = Guider_DualCFG(m)
        gd.set_conds(ppos, pneg, pneg)
        gd.set_cfg(CFG, 1.5)
        return gd.sample(noise, lat["samples"], comfy.samplers.ksampler("euler"), sig, disable_pbar=True, seed=0)

    dual(ip2p)                  # warm-up, not measured
    o_plain, mp = measure(lambda: dual(ip2p), ip2p)
    o, m = measure(lambda: dual(patched), ip2p)
    finish(fam, m, mp, [o, o_plain], state_bytes(dict(inst.named_parameters()), dict(inst.named_buffers())),
           note="IP2P (8 input channels), DualCFGGuider, 3 rows per step; plain = the same graph without Instruction "
                "Apply")


# ----------------------------------------------------------------------------- standalone rows (no UNet)

def run_crf(args) -> None:
    """Concept Learn's mask refinement (softmax labels + dense CRF) on the grid it gets at ``px``: 2 concepts +
    the unassigned label on a (px/8)^2 latent grid; peak above the RSS before the call."""
    import torch

    torch.set_num_threads(args.threads)
    _common.import_pack()
    from photoops.kernels import concept_learn as kcl

    px = SIZES[args.model]
    h = px // 8
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(2, h, h, generator=g)
    img = torch.rand(3, h, h, generator=g)
    cfg = kcl.ConceptConfig()
    res, m = measure(lambda: kcl.masks_from_attention(maps, img, cfg))
    _, m0 = measure(lambda: kcl.masks_from_attention(maps, img, kcl.ConceptConfig(use_crf=False)))
    row = {"model": args.model, "dtype": "fp32", "family": "crf", "steps": args.steps, "px": px,
           "threads": args.threads, "ours": m, "plain": m0, "time_per_step_ours": m["time_s"],
           "time_per_step_plain": m0["time_s"], "cpu_per_step_ours": m["cpu_s"], "cpu_per_step_plain": m0["cpu_s"],
           "state_bytes": state_bytes(res), "nan": bad_values(res),
           "note": f"mask refinement alone on the {h}x{h} grid: CRF on vs off (plain = softmax labels only)",
           "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    row_path(args.model, "fp32", "crf", args.steps).write_text(json.dumps(row, indent=1))
    print(f"[crf {h}x{h}] {fmt_row(row)}", flush=True)


def run_pops(args) -> None:
    """Operator Apply at the Kandinsky 2.2 prior's size (1.03 B parameters) beside diffusers' PriorTransformer +
    UnCLIPScheduler sampling the same weights (bench/pops.py's reference loop), ``args.pops_steps`` steps."""
    import torch

    torch.set_num_threads(args.threads)
    _common.import_pack()
    from comfy_harness import comfyenv

    comfyenv.ensure_comfy_importable()
    import pops as bp
    from photoops.nodes import pops as npops
    from photoops.nodes.comfy.models import module_patcher
    from photoops.nodes.comfy.pops import make_clip_vision_output

    dt = torch_dtype(args.dtype)
    cfg = bp.config(20)
    ref, ours = bp.build_pair(cfg, "cpu")
    ref, ours = ref.to(dt), ours.to(dt)
    d = cfg.embedding_dim
    g = torch.Generator().manual_seed(0)
    mean, std = torch.randn(d, generator=g) * 0.1, torch.rand(d, generator=g) + 0.5
    op = npops.PopsOperator(module_patcher(ours), cfg, mean, std, "texturing", dt, "<random>")
    a = make_clip_vision_output(torch.randn(1, d, generator=g))
    b = make_clip_vision_output(torch.randn(1, d, generator=g))
    steps = args.pops_steps
    o, m = measure(lambda: npops.OperatorApplyNode.execute(op, a, steps, 8.0, 0, False, False, input_b=b).result)
    H, M = bp.inputs(cfg, "cpu", dt)[:2]
    o2, m0 = measure(lambda: bp.diffusers_sample(ref, H, M, steps, 8.0, 0, "cpu", dt))
    row = {"model": "pops", "dtype": args.dtype, "family": "pops", "steps": steps, "px": 0,
           "threads": args.threads, "ours": m, "plain": m0, "time_per_step_ours": m["time_s"] / steps,
           "time_per_step_plain": m0["time_s"] / steps, "cpu_per_step_ours": m["cpu_s"] / steps,
           "cpu_per_step_plain": m0["cpu_s"] / steps, "state_bytes": 0,
           "nan": bad_values(o[0].image_embeds, o2 if isinstance(o2, torch.Tensor) else None),
           "note": "Kandinsky 2.2 prior size (1.03 B), CFG 8, both networks resident; plain = diffusers "
                   "PriorTransformer + UnCLIPScheduler",
           "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    row_path("pops", args.dtype, "pops", steps).write_text(json.dumps(row, indent=1))
    print(f"[pops {args.dtype}] {fmt_row(row)}", flush=True)


# ----------------------------------------------------------------------------- table

def _gib(b):
    return f"{b / 2**30:.2f}"


def _mib(b):
    return f"{b / 2**20:+.0f}"


def _calls(m: dict) -> str:
    return f"{m['calls']} ({m['rows']})" if "calls" in m else "–"


def _per_row(o: dict, p: dict) -> str:
    if not o.get("rows") or not p.get("rows"):
        return "–"
    return f"{(o['time_s'] / o['rows']) / (p['time_s'] / p['rows']):.2f}"


def _dt(r: dict) -> str:
    """The dtype label; where the row recorded the UNet's output dtype and it differs from the label's, that too."""
    lab = DTYPE_LABELS.get(r["dtype"], r["dtype"])
    if r["model"] == "pops" and r["dtype"] != "fp32":
        lab = f"{r['dtype']} weights + compute"     # the operator runs in its own dtype (no ComfyUI manual cast)
    got = (r.get("ours") or {}).get("compute")
    want = {"fp32": "float32", "bf16": "float32", "fp16": "float32", "bf16c": "bfloat16", "fp16c": "float16"}
    if got and got != [want.get(r["dtype"])]:
        lab += f" (**UNet ran in {'/'.join(got)}**)"
    return lab


def _cpu(r: dict) -> str:
    """CPU seconds per step, ours / plain (ratio), or – for rows measured before CPU time was recorded."""
    co, cp = r.get("cpu_per_step_ours"), r.get("cpu_per_step_plain")
    if co is None or cp is None:
        return "–"
    return f"{co:.1f} / {cp:.1f} ({co / max(cp, 1e-9):.2f})"


def fmt_row(r: dict) -> str:
    if "error" in r:
        return "FAILED " + r["error"]
    o, p = r["ours"], r["plain"]
    return (f"time/step {r['time_per_step_ours']:.1f} vs {r['time_per_step_plain']:.1f} s "
            f"({r['time_per_step_ours'] / max(r['time_per_step_plain'], 1e-9):.2f}x; CPU {_cpu(r)}), peak "
            f"{_gib(o['peak'])} vs "
            f"{_gib(p['peak'])} GiB ({o['peak'] / p['peak']:.3f}x; {_mib(o['peak'] - o['base'])} vs "
            f"{_mib(p['peak'] - p['base'])} MiB above the RSS before), state {r['state_bytes'] / 2**20:.2f} MiB, "
            f"nan {r['nan']}")


LABELS = {"plain_4rows": "(reference) plain CFG sampling, batch 2 = 4 rows per call", "capture": "Attention Capture (lowres) + CFG sampling", "invert_ddpm": "Invert ddpm + Inversion Sampler replay",
          "invert_eta": "Invert eta + replay", "invert_dpmpp_2m_sde": "Invert dpmpp_2m_sde + replay",
          "edit_lock": "Invert ddpm + Inversion Sampler auto_lock edit (feather 8), target-prompt CFG",
          "sega": "Semantic Guide sega, 2 concepts", "ledits++": "Semantic Guide ledits++, 2 concepts",
          "ptp": "Invert eta + Prompt-to-Prompt Guide replay (4 rows per call)",
          "ptp_split": "Invert eta + Prompt-to-Prompt Guide replay, batch split by core (1 row per call)",
          "concept_learn": "Concept Learn (E-steps + M-steps)",
          "concept_learn_gc": "Concept Learn, gradient checkpointing (E-steps + M-steps)", "crf": "Concept Learn mask refinement (CRF) alone",
          "instruct_apply": "Instruction Apply (IP2P, DualCFG)", "pops": "Operator Apply (pOps, 1.03 B prior)"}


FOUR_ROWS = ("sega", "ledits++", "ptp")   # families whose sampling call holds 4 UNet rows (vs plain CFG's 2)


def table() -> str:
    rows = []
    for p in sorted(rows_dir().glob("*.json")):
        r = json.loads(p.read_text())
        if "family" in r and r["model"] != "tiny":
            rows.append(r)
    ref4 = {(r["model"], r["dtype"]): r for r in rows if r["family"] == "plain_4rows" and "error" not in r}
    for r in rows:
        q = ref4.get((r["model"], r["dtype"]))
        if r["family"] in FOUR_ROWS + ("ptp_split",) and q is not None and "error" not in r:
            r["note"] = (r.get("note", "") + f"; peak vs plain with the same 4 rows: "
                         f"{r['ours']['peak'] / q['ours']['peak']:.3f}x, time per row "
                         f"{(r['ours']['time_s'] / r['ours']['rows']) / (q['ours']['time_s'] / q['ours']['rows']):.2f}x")
    order = {f: i for i, f in enumerate(FAMILIES)}
    rows.sort(key=lambda r: (["sd15", "sdxl", "pops"].index(r["model"]) if r["model"] in ("sd15", "sdxl", "pops")
                             else 9, order.get(r["family"], 99), r["dtype"]))
    out = [("| model, size | family | dtype | steps | time/step ours / plain (s) | ratio | CPU s/step ours / plain "
            "(ratio) | UNet calls (rows) ours / plain | time per UNet row, ratio | peak RSS ours / plain (GiB) | ratio "
            "| above pre-run RSS ours / plain (MiB) | our state (MiB) | NaN/Inf | note |"),
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        size = {"sd15": "SD1.5 512²", "sdxl": "SDXL 1024²", "pops": "Kandinsky prior"}.get(r["model"], r["model"])
        if r["family"] == "crf":
            size = f"{r['px'] // 8}² grid ({'SDXL 1024²' if r['px'] == 1024 else 'SD1.5 512²'})"
        lab = LABELS.get(r["family"], r["family"])
        if "error" in r:
            out.append(f"| {size} | {lab} | {_dt(r)} | {r['steps']} | – | – | – | – | – | – | – | – | – | – | "
                       f"**fails**: {r['error'].replace('|', '/')}"
                       + (f" (process capped at {r['mem_cap_gib']:g} GiB of address space; the machine has 24 GiB, "
                          f"shared)" if r.get("mem_cap_gib") else "") + " |")
            continue
        o, p = r["ours"], r["plain"]
        out.append(f"| {size} | {lab} | {_dt(r)} | {r['steps']} | {r['time_per_step_ours']:.1f} / "
                   f"{r['time_per_step_plain']:.1f} | {r['time_per_step_ours'] / max(r['time_per_step_plain'], 1e-9):.2f} | "
                   f"{_cpu(r)} | {_calls(o)} / {_calls(p)} | {_per_row(o, p)} | {_gib(o['peak'])} / {_gib(p['peak'])} | {o['peak'] / p['peak']:.3f} | "
                   f"{_mib(o['peak'] - o['base'])} / {_mib(p['peak'] - p['base'])} | "
                   f"{r['state_bytes'] / 2**20:.2f} | {'**yes**' if r['nan'] else 'no'} | {r.get('note', '')} |")
    threads = sorted({r.get("threads") for r in rows if r.get("threads")})
    head = (f"Full-size bench (`bench/full_size.py`), random weights, CPU (2 cores, AVX2, shared with other jobs: "
            f"times vary by more than 2x between equal runs, compare the per-row ratios), torch threads "
            f"{'/'.join(map(str, threads))}, in-process ComfyUI; plain = core CFGGuider + euler at the same size, "
            f"steps (karras) and CFG {CFG}; measured side by side in one process per (model, dtype).\n")
    return head + "\n" + "\n".join(out) + "\n" + tiny_table() + targets(rows)


SAMPLING = ("capture", "invert_ddpm", "invert_eta", "invert_dpmpp_2m_sde", "sega", "ledits++", "ptp", "ptp_split",
            "instruct_apply")


def _load_rows(model: str) -> list:
    out = []
    for p in sorted(rows_dir().glob(f"{model}_*.json")):
        r = json.loads(p.read_text())
        if "family" in r:
            out.append(r)
    return out


def tiny_table() -> str:
    """The dtype sweep on the tiny CI fixture (64x64 px, 8x8 latent): every family in each half precision."""
    rows = [r for r in _load_rows("tiny") if "error" in r or r["family"] in FAMILIES]
    if not rows:
        return ""
    order = {f: i for i, f in enumerate(FAMILIES)}
    rows.sort(key=lambda r: (r["dtype"], order.get(r["family"], 99)))
    out = ["", ("Half-precision sweep on the tiny CI fixture (SD1.5 format, 64x64 px, 1 step, `--models tiny`), "
                "every family in each dtype:"), "",
           ("| dtype | family | time/step ours / plain (s) | CPU s/step ours / plain (ratio) | peak RSS ratio | NaN/Inf "
           "| note |"), "|---|---|---|---|---|---|---|"]
    for r in rows:
        lab = LABELS.get(r["family"], r["family"])
        if "error" in r:
            out.append(f"| {_dt(r)} | {lab} | – | – | – | – | **fails**: {r['error'].replace('|', '/')} |")
            continue
        note = ""
        if r["family"].startswith("invert_"):
            m = re.search(r"recon rel err ([-+.0-9e]+)", r.get("note", ""))
            d = re.search(r"without noise: ([-+.0-9e]+)", r.get("note", ""))
            note = (f"recon rel err {m.group(1)}" if m else "") + (f"; DDIM replay of the same ladder {d.group(1)}"
                                                                    if d else "")
        out.append(f"| {_dt(r)} | {lab} | {r['time_per_step_ours']:.1f} / {r['time_per_step_plain']:.1f} | {_cpu(r)} | "
                   f"{r['ours']['peak'] / r['plain']['peak']:.3f} | {'**yes**' if r['nan'] else 'no'} | {note} |")
    return "\n".join(out) + "\n"


def targets(rows: list) -> str:
    """Issue 16's measurable targets, computed from the cached rows."""
    tiny = _load_rows("tiny")
    out = ["", "Targets, from the rows above:", ""]
    for lab in ("bf16 weights, fp32 compute", "fp16 weights, fp32 compute", "bf16 weights + compute",
                "fp16 weights + compute"):
        rs = [r for r in rows + tiny if _dt(r).startswith(lab)]
        bad = [f"{r['model']} {r['family']}" for r in rs if "error" in r or r.get("nan") or "UNet ran" in _dt(r)]
        where = sorted({r["model"] for r in rs})
        out.append(f"- {lab}: {len(rs)} rows ({', '.join(where) or 'none'}), "
                   + (f"**failing or NaN: {', '.join(bad)}**" if bad else "no dtype error, no NaN/Inf"))
    ref4 = {(r["model"], r["dtype"]): r for r in rows if r["family"] == "plain_4rows" and "error" not in r}
    worst = []
    for r in rows:
        if r["family"] not in SAMPLING or "error" in r:
            continue
        ratio = r["ours"]["peak"] / r["plain"]["peak"]
        q = ref4.get((r["model"], r["dtype"]))
        if r["family"] in FOUR_ROWS:       # ptp_split runs 1 row per call: against 2-row plain sampling
            if q is None:
                worst.append((ratio, (f"{r['model']} {r['dtype']} {r['family']} {ratio:.3f} (4 rows vs 2; no 4-row "
                                     f"plain measured)")))
                continue
            ratio = r["ours"]["peak"] / q["ours"]["peak"]
        worst.append((ratio, f"{r['model']} {r['dtype']} {r['family']} {ratio:.3f}"))
    if worst:
        worst.sort()
        over = [t for v, t in worst if v > 1.10]
        out.append(f"- Sampling nodes' peak RSS vs plain sampling with the same UNet rows (target <= 1.10): "
                   f"{len(worst)} rows, {worst[0][0]:.3f}-{worst[-1][0]:.3f}"
                   + (f"; **over: {'; '.join(over)}**" if over else ""))
    for r in rows:
        if r["family"] == "crf" and "error" not in r:
            add = (r["ours"]["peak"] - r["ours"]["base"]) - (r["plain"]["peak"] - r["plain"]["base"])
            out.append(f"- Concept Learn mask refinement (CRF) at the {r['px'] // 8}x{r['px'] // 8} grid: "
                       f"+{add / 2**20:.0f} MiB over the same refinement without CRF (target <= 1024 MiB at SDXL "
                       f"1024²), {r['time_per_step_ours']:.0f} s")
    return "\n".join(out) + "\n"


def write_table() -> str:
    t = table()
    d = HERE / "results"
    d.mkdir(exist_ok=True)
    (d / "full_size.md").write_text(t)
    return t


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["sd15"], choices=["sd15", "sdxl", "tiny"])
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=DTYPES,
                    help="bf16 / fp16: half-precision weights (ComfyUI computes in fp32 on a CPU); bf16c / fp16c: "
                         "weights and compute (set_model_compute_dtype, as on a GPU)")
    ap.add_argument("--families", nargs="+", default=FAMILIES, choices=FAMILIES + EXTRA_FAMILIES)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--cl-steps", type=int, default=2, help="Concept Learn M-steps")
    ap.add_argument("--pops-steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--mem-cap-gib", type=float, default=0,
                    help="cap each (model, dtype) process's address space (RLIMIT_AS); 0 = none")
    ap.add_argument("--fresh", action="store_true", help="re-measure rows that are cached")
    ap.add_argument("--table", action="store_true", help="only print/write the table of the cached rows")
    ap.add_argument("--child", nargs=2, metavar=("MODEL", "DTYPE"), help=argparse.SUPPRESS)
    ap.add_argument("--standalone", choices=["crf", "pops"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        args.model, args.dtype = args.child
        if args.standalone == "crf":
            return run_crf(args)
        if args.standalone == "pops":
            return run_pops(args)
        return child(args)
    if not args.table:
        base = [sys.executable, __file__, "--steps", str(args.steps), "--threads", str(args.threads),
                "--cl-steps", str(args.cl_steps), "--pops-steps", str(args.pops_steps),
                "--mem-cap-gib", str(args.mem_cap_gib)] + (["--fresh"] if args.fresh else [])
        for model in args.models:
            if "crf" in args.families and (args.fresh or not row_path(model, "fp32", "crf", args.steps).is_file()):
                subprocess.run(base + ["--child", model, "fp32", "--standalone", "crf"], check=False)
            for dtype in args.dtypes:
                fams = [f for f in args.families if f not in ("crf", "pops", "instruct_apply")]
                if fams:
                    subprocess.run(base + ["--child", model, dtype, "--families", *fams], check=False)
                if "instruct_apply" in args.families and model != "sdxl":
                    subprocess.run(base + ["--child", model, dtype, "--families", "instruct_apply"], check=False)
        if "pops" in args.families:
            for dtype in args.dtypes:
                if args.fresh or not row_path("pops", dtype, "pops", args.pops_steps).is_file():
                    subprocess.run(base + ["--child", "pops", dtype, "--standalone", "pops"], check=False)
    print(write_table())


if __name__ == "__main__":
    main()
