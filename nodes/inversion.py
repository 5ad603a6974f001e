"""Invert, the replay SAMPLER, EtaSchedule, and saving/loading inversions.

Invert runs one of three inversions of a photo's latent along the user's SIGMAS inside
ComfyUI's own sampling machinery (a core CFGGuider with the source conditioning and CFG):

* ``ddim`` — deterministic DDIM inversion (Eta Inversion spec §2);
* ``ddpm`` — edit-friendly DDPM inversion with per-step noise maps (DDPM spec §1);
* ``eta``  — Eta Inversion: DDIM ladder, then per-step noise chosen among seeded
  candidates (or the optimal noise itself) with a time- and region-dependent eta.

The INVERSION it returns is replayed by **Inversion Sampler** inside core
``SamplerCustomAdvanced``, so any GUIDER edits: CFGGuider with a target prompt is
DDPM-inversion editing; SemanticGuide gives LEDITS.
"""
from __future__ import annotations

import os

import torch
from comfy_api.latest import io

from ..kernels import eta as keta
from ..kernels import inversion as kinv
from ..kernels import maps as kmaps
from ..kernels.inversion_state import Inversion, load_inversion, save_inversion
from ..kernels.schedule import invertible_sigmas
from .attention_mask import CAPTURE, VAE_FACTOR
from .comfy.files import folder_file_path, folder_files, next_save_path, register_folder
from .comfy.flow import FLOW_METHODS, check_method_fits, family, flow_fingerprint, invert_flow, is_flow, replay_flow
from .comfy.models import check_latent, ensure_supported, fingerprint, patcher_of, vp_schedule
from .comfy.sampling import interrupt_check, ksampler, progress_bar, run_with_guider
from .eta_schedule import ETA_SCHEDULE, EtaScheduleNode, build_schedule, parse_points  # noqa: F401 (re-exported)

CONCEPT_MASKS = io.Custom("PHOTOOPS_CONCEPT_MASKS")   # Semantic Guide's second output
AUTO_LOCKS = ("off", "edit")      # Inversion Sampler auto_lock: "edit" = kernels.inversion.EditLock
INVERSION = io.Custom("PHOTOOPS_INVERSION")
FOLDER = "photoops_inversions"


def steps_note(sigmas, n_run: int, skip: int = 0) -> str:
    """Step counts as the user set them: ``"7 steps"``, or ``"7 steps set, 6 run: ..."`` when the
    schedule's last step to 0 is not a step of its own (it ends at sigma_min), or steps are skipped."""
    n_set = int(torch.as_tensor(sigmas).numel()) - 1
    parts = []
    if n_run != n_set:
        parts.append("the last step to 0 starts at the model's smallest sigma, so it is not run")
    if skip:
        parts.append(f"Invert's skip leaves out the first {skip}")
    runs = n_run - skip
    if not parts:
        return f"{n_set} steps"
    return f"{n_set} steps set, {runs} run: " + "; ".join(parts)


def replay_steps(sampler, sigmas) -> tuple:
    """``(steps that run, note)`` when ``sampler`` replays an INVERSION (Inversion Sampler), else
    ``(len(sigmas) - 1, note)``; the note gives the counts as the user set them (:func:`steps_note`)."""
    inv = (getattr(sampler, "extra_options", None) or {}).get("inversion")
    n_set = int(torch.as_tensor(sigmas).numel()) - 1
    if not isinstance(inv, Inversion):
        return n_set, f"{n_set} steps"
    return inv.steps - inv.skip, steps_note(sigmas, inv.steps, inv.skip)


def _prepare_sigmas(model, sigmas: torch.Tensor) -> tuple:
    """Validate SIGMAS; a final 0 is made invertible (``kernels.schedule.invertible_sigmas`` with the
    model's smallest sigma).  Returns ``(sigmas, info)``."""
    return invertible_sigmas(sigmas, float(vp_schedule(model).sigma_min))


def _region_mask(capture, latent_hw, threshold: float, mode: str = "threshold") -> torch.Tensor:
    """Eta §4.2: mean inversion-time map, max-normalised, bicubic to latent size, > threshold.

    ``mode="quantile"`` (our addition) keeps the top ``1 - threshold`` of the map instead:
    with flat maps (small or toy models) the paper's fixed threshold keeps every pixel.
    """
    rec = capture.recorder
    if rec.calls == 0:
        raise RuntimeError(f"the region capture recorded nothing for {capture.word!r}: give Invert the MODEL "
                           f"that comes out of Attention Capture")
    a = kmaps.normalize_max(rec.result())
    a = torch.nn.functional.interpolate(a[:, None], size=tuple(latent_hw), mode="bicubic", align_corners=False)
    a = a.clamp(0, 1)
    if mode == "quantile":
        return kmaps.binarize(a[:, 0], "quantile", threshold)[:, None]
    return (a > threshold).float()


class InvertNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PhotoOps_Invert",
            display_name="Invert",
            category="PhotoOps/inversion",
            description="Inverts a photo's latent along your SIGMAS (DDIM, edit-friendly DDPM or Eta Inversion; on "
                        "SD3 / Flux: flow noise maps, flow ODE or RF-Inversion). "
                        "Replay the INVERSION with Inversion Sampler in SamplerCustomAdvanced and any guider.",
            inputs=[
                io.Model.Input("model", tooltip="SD1.x / SD2.x / SDXL model, or SD3 / SD3.5 / Flux for the flow_* and "
                                                "rf_inversion methods (cloned, never changed)."),
                io.Conditioning.Input("positive", tooltip="Source prompt describing the photo (may be empty)."),
                io.Conditioning.Input("negative", tooltip="Negative / unconditional prompt, used when source_cfg != 1."),
                io.Latent.Input("latent", tooltip="The photo encoded with VAE Encode."),
                io.Sigmas.Input("sigmas", tooltip="The sampling schedule (e.g. BasicScheduler). Replay with the same "
                                                  "SIGMAS. A final 0 is replaced by the model's smallest sigma (or dropped "
                                                  "if the schedule already reaches it) so the "
                                                  "last step can be inverted exactly."),
                io.Combo.Input("method", options=["ddpm", "eta", "ddim", "dpmpp_2m_sde", *FLOW_METHODS], default="ddpm",
                               tooltip="ddpm: edit-friendly DDPM inversion (exact, stores noise maps; LEDITS). eta: "
                                       "Eta Inversion (time/region-dependent eta). ddim: deterministic DDIM inversion. "
                                       "dpmpp_2m_sde: the LEDITS++ inversion (SDE DPM-Solver++ 2M, exact, fewer "
                                       "steps; only the steps after skip are inverted). SD3 / Flux: flow_noise_maps "
                                       "(edit-friendly noise maps for the RF euler_ancestral step, exact), flow_ode "
                                       "(Euler ODE inversion), rf_inversion (RF-Inversion's controlled ODE)."),
                io.Int.Input("skip", default=0, min=0, max=1000,
                             tooltip="Steps to skip at the start of replay (DDPM paper: 36 of 100). More skip keeps "
                                     "more of the photo's structure. If the edit keeps the old colour or attribute, "
                                     "lower it (some models settle colour early: toy worlds C and D needed 20 % of "
                                     "the steps, not 30 %); the Inversion Sampler's auto_lock edit then keeps the "
                                     "background."),
                io.Float.Input("source_cfg", default=1.0, min=0.0, max=30.0, step=0.1,
                               tooltip="CFG of the source prompt during inversion (1 = positive only). Replaying with "
                                       "the same prompt and CFG reconstructs the photo."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of the noise ladder (ddpm, flow_noise_maps), of the candidate noises (eta) "
                                     "or of RF-Inversion's target noise."),
                ETA_SCHEDULE.Input("eta_schedule", optional=True,
                                   tooltip="From Eta Schedule. eta method: its eta(t) (default: linear 0 -> 0.4). "
                                           "ddpm method: per-step eta (default 1)."),
                CAPTURE.Input("region", optional=True,
                              tooltip="eta method: an Attention Capture of the edit word, recorded during this "
                                      "inversion (give Invert that capture's MODEL); eta is 0 outside its mask."),
                io.Combo.Input("region_mode", options=["threshold", "quantile"], default="threshold", optional=True,
                               tooltip="eta method: threshold = max-normalised map > region_threshold (the paper); "
                                       "quantile = keep the top (1 - region_threshold) of the map (for flat maps)."),
                io.Float.Input("region_threshold", default=0.2, min=0.0, max=1.0, step=0.01, optional=True,
                               tooltip="eta method: the threshold (paper: 0.2) or the quantile, see region_mode."),
                io.Int.Input("candidates", default=10, min=1, max=1000, optional=True,
                             tooltip="eta method: noise candidates per step (paper: 10); 1 = plain random noise."),
                io.Boolean.Input("store_optimal_noise", default=False, optional=True,
                                 tooltip="eta method: store the optimal noise instead of the best candidate; replay "
                                         "then reconstructs the photo exactly wherever eta > 0."),
                io.Int.Input("batch", default=1, min=1, max=64, optional=True,
                             tooltip="ddpm method, advanced: predict this many steps' noisy rungs in one model call "
                                     "(faster, more memory). 1 = bit-exact replay; >1 = exact up to rounding "
                                     "(measured 1e-6..2e-4 relative on CPU)."),
                io.Float.Input("gamma", default=0.5, min=0.0, max=1.0, step=0.05, optional=True,
                               tooltip="rf_inversion: controller strength toward the seeded noise (paper: 0.5); "
                                       "0 = plain flow_ode inversion."),
                io.Int.Input("fixed_point", default=0, min=0, max=20, optional=True,
                             tooltip="flow_ode: fixed-point iterations per step (exact-Euler inversion; each costs one "
                                     "model call per step); 0 = explicit Euler."),
            ],
            outputs=[
                INVERSION.Output(display_name="inversion", tooltip="Replay with Inversion Sampler; save with Save "
                                                                   "Inversion."),
                io.Latent.Output(display_name="start_latent", tooltip="The inverted latent where replay starts "
                                                                      "(after skip)."),
            ],
        )

    @classmethod
    def execute(cls, model, positive, negative, latent, sigmas, method, skip, source_cfg, seed,
                eta_schedule=None, region=None, region_mode="threshold", region_threshold=0.2, candidates=10,
                store_optimal_noise=False, batch=1, gamma=0.5, fixed_point=0) -> io.NodeOutput:
        check_method_fits(model, method)
        if method in FLOW_METHODS:
            if region is not None or eta_schedule is not None:
                raise ValueError(f"region captures and Eta Schedules (Eta Inversion, defined for VP / DDIM schedules) "
                                 f"do not apply to the {method} method of this rectified-flow model ("
                                 f"{family(model)}); flow_noise_maps runs with eta 1, leave eta_schedule unconnected")
            inv, out = invert_flow(model, positive, negative, latent["samples"], sigmas, method, skip, source_cfg,
                                   seed, gamma=gamma, fixed_point=fixed_point)
            return io.NodeOutput(inv, {"samples": out})
        ensure_supported(model)
        samples = latent["samples"]
        check_latent(model, samples)
        s, zero_info = _prepare_sigmas(model, sigmas)
        n = s.numel() - 1
        if not 0 <= skip < n:
            raise ValueError(f"skip ({skip}) must be smaller than the number of steps ({steps_note(sigmas, n)})")
        if region is not None and method != "eta":
            raise ValueError("a region capture only applies to the eta method")
        if method == "dpmpp_2m_sde" and eta_schedule is not None:
            raise ValueError("an Eta Schedule applies to the ddpm and eta methods, not to dpmpp_2m_sde (eta 1)")
        if method == "eta" and region is not None and eta_schedule is not None and eta_schedule.get("mask") is not None:
            raise ValueError("give either a region capture or an Eta Schedule mask, not both")
        schedule = vp_schedule(model)
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        pbar = progress_bar(2 * n if method == "eta" else n)

        def tick(_):
            pbar.update(1)

        def work(denoise, x, sig):
            x = x.float()
            if method == "dpmpp_2m_sde":
                # LEDITS++: the 2M history restarts with each run, so only the replayed steps
                # are inverted (DDPM §4.2); the skipped steps keep zero maps (never used).
                x_start, z, ladder = kinv.dpmpp_2m_sde_invert(denoise, x, sig[skip:], generator=gen, callback=tick,
                                                              interrupt=interrupt_check)
                noises = z.new_zeros((n, *z.shape[1:]))
                noises[skip:] = z
                return (x_start, noises, torch.ones(n), ladder.flip(0)), x_start  # cpu: per-step eta (metadata)
            if method == "ddpm":
                eta = 1.0
                if eta_schedule is not None:
                    eta = keta.per_step_eta(eta_schedule["fn"], s, schedule)
                x_start, zs, ladder = kinv.ddpm_invert(denoise, x, sig, eta=eta, generator=gen, callback=tick,
                                                       interrupt=interrupt_check, batch=batch)
                noises, etas = zs, torch.as_tensor(eta, dtype=torch.float32).expand(n).clone()
            elif method == "ddim":
                ladder = kinv.ddim_invert(denoise, x, sig, callback=tick, interrupt=interrupt_check)
                noises, etas = None, torch.zeros(n)     # cpu: per-step eta (stored metadata)
            else:
                ladder = kinv.ddim_invert(denoise, x, sig, callback=tick, interrupt=interrupt_check)
                fn = eta_schedule["fn"] if eta_schedule is not None else keta.PRESETS["linear_default"]
                mask = None
                if region is not None:
                    mask = _region_mask(region, x.shape[-2:], region_threshold, region_mode)
                elif eta_schedule is not None and eta_schedule.get("mask") is not None:
                    mask = kmaps.resize_map(eta_schedule["mask"].float(), x.shape[-2:], mode="bilinear")[:, None]
                    mask = (mask > 0.5).float()
                    if mask.shape[0] not in (1, x.shape[0]):
                        raise ValueError(f"the eta mask has {mask.shape[0]} images, the latent {x.shape[0]}")
                noises, etas = kinv.eta_inversion_noises(
                    denoise, ladder, sig, keta.per_step_eta(fn, s, schedule), eta_mask=mask,
                    candidates=candidates, generator=gen, store_optimal=store_optimal_noise, callback=tick,
                    interrupt=interrupt_check)
            x_start = ladder[n - skip].clone()
            return (x_start, noises, etas, ladder[: n - skip + 1].flip(0)), x_start

        (x_start, noises, etas, source_ladder), out = run_with_guider(model, positive, negative, source_cfg, samples,
                                                           s.float(), work, seed=seed)
        source = {"positive": positive[0][0].detach().float().cpu()} if positive else {}
        inv = Inversion(method=method, sigmas=s, x_start=x_start.float().cpu(), skip=int(skip),
                        noises=None if noises is None else noises.float().cpu(),
                        eta=etas.float().cpu() if etas is not None else None, source_cfg=float(source_cfg),
                        seed=int(seed), fingerprint=fingerprint(model), source=source,
                        info={**zero_info, "candidates": int(candidates),
                              "store_optimal_noise": bool(store_optimal_noise)},
                        source_ladder=source_ladder.float().cpu())
        return io.NodeOutput(inv, {"samples": out})


def _lock(inv: Inversion, spec: dict | None, latent_hw):
    """The :class:`~..kernels.inversion.BackgroundLock` for an Inversion Sampler's lock inputs, or None."""
    if spec is None:
        return None
    if inv.source_ladder is None:
        raise ValueError("this INVERSION holds no source ladder (it was saved by an older PhotoOps): invert the "
                         "photo again to use the background lock")
    feather = float(spec["feather"]) / VAE_FACTOR                    # image pixels -> latent pixels
    if spec.get("auto") == "edit":   # the mask the edit draws: where it moved away from the photo (otsu, +1 px)
        return kinv.EditLock(inv.source_ladder, skip=inv.skip, start=float(spec["start"]), grow=1, feather=feather)
    if spec.get("mask") is not None:
        m = kmaps.soften_mask(kmaps.resize_map(spec["mask"].float(), latent_hw, mode="area"), feather)
        return kinv.BackgroundLock(inv.source_ladder, m, skip=inv.skip)
    store, thr = spec["concept_masks"], float(spec["threshold"])

    def from_concepts(step):           # where the concepts acted in >= thr of the steps so far, +1 latent px
        region = store.lock_region(thr)
        if region is None:
            return None
        return kmaps.soften_mask(kmaps.resize_map(kmaps.dilate(region), latent_hw, mode="nearest"), feather)

    return kinv.BackgroundLock(inv.source_ladder, from_concepts, skip=inv.skip)


def _replay(model, x, sigmas, extra_args=None, callback=None, disable=None, inversion=None, lock=None, rf=None):
    """k-diffusion sampler function: replay ``inversion`` (see InversionSamplerNode)."""
    inv: Inversion = inversion
    s = torch.as_tensor(sigmas, dtype=torch.float64).flatten().cpu()
    if inv.info.get("final_zero_dropped") and s.numel() and s[-1] == 0:
        s = s[:-1]
    elif inv.info.get("final_zero_replaced") and s.numel() and s[-1] == 0:
        s = s.clone()
        s[-1] = inv.sigmas[-1]
    full = inv.steps + 1
    if s.numel() == full:
        inv.check_replay(s, x.shape)
        start = inv.skip
    elif s.numel() == full - inv.skip:
        inv.check_replay(torch.cat([inv.sigmas[: inv.skip].double(), s]), x.shape)
        start = inv.skip
    else:
        inv.check_replay(s, x.shape)          # raises, naming the sigma mismatch
        start = inv.skip
    patcher = patcher_of(model)
    if patcher is not None:
        inv.check_replay(inv.sigmas, fingerprint=(flow_fingerprint if is_flow(patcher) else fingerprint)(patcher))
    run = inv.sigmas[start:].to(sigmas.dtype).to(sigmas.device)
    x0 = inv.x_start.to(device=x.device, dtype=x.dtype)
    noises = None if inv.noises is None else inv.noises.to(device=x.device, dtype=x.dtype)
    chosen = getattr(getattr(model, "inner_model", None), "photoops_noises", None)
    if chosen is not None and inv.method == "eta":
        noises = chosen                  # Eta noise chosen during the edit by the guider (Prompt-to-Prompt Guide)
    eta = inv.eta.to(device=x.device) if inv.eta is not None else 0.0
    bg = _lock(inv, lock, x.shape[-2:])
    if inv.method in FLOW_METHODS:
        return replay_flow(model, x0, run, inv, start, extra_args, callback, disable, lock=bg, rf=rf)
    if inv.method == "dpmpp_2m_sde":
        return kinv.replay_dpmpp_2m_sde(model, x0, run, extra_args=extra_args, callback=callback, disable=disable,
                                        noises=noises, start=start, lock=bg)
    return kinv.replay_sample(model, x0, run, extra_args=extra_args, callback=callback, disable=disable,
                              noises=noises, eta=eta, start=start, lock=bg)


class InversionSamplerNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PhotoOps_InversionSampler",
            display_name="Inversion Sampler",
            category="PhotoOps/inversion",
            description="A SAMPLER for SamplerCustomAdvanced that replays an INVERSION: it starts from the inverted "
                        "latent and uses the stored noise maps, so with the source prompt it reconstructs the photo and "
                        "with another guider it edits it. Use Disable Noise and the SIGMAS given to Invert. Optional "
                        "background lock: outside a mask, every step keeps the photo's own trajectory.",
            inputs=[
                INVERSION.Input("inversion", tooltip="From Invert or Load Inversion."),
                io.Mask.Input("lock_mask", optional=True,
                              tooltip="Background lock: white = may change, black = kept as the photo (exactly, with "
                                      "feather 0). From Concept Masks, Attention Mask, or drawn. Image size."),
                CONCEPT_MASKS.Input("concept_masks", optional=True,
                                    tooltip="Background lock in one pass: the Semantic Guide's 'masks' output. At "
                                            "each step the lock frees where the concepts acted in at least "
                                            "concept_threshold of the steps so far (+1 latent pixel); nothing is "
                                            "locked before the first step."),
                io.Float.Input("feather", default=8.0, min=0.0, max=256.0, step=1.0,
                               tooltip="Soft edge of the lock, in image pixels (Gaussian sigma). 0 = hard edge."),
                io.Float.Input("concept_threshold", default=0.25, min=0.0, max=1.0, step=0.05,
                               tooltip="With concept_masks: the fraction of steps a concept must have acted on a "
                                       "pixel for it to be freed."),
                io.Float.Input("rf_eta", default=0.9, min=0.0, max=1.0, step=0.05, optional=True,
                               tooltip="rf_inversion: strength of the pull toward the photo's latent (RF-Inversion's "
                                       "eta; 0 = plain Euler replay, 1 on all steps = the photo exactly)."),
                io.Float.Input("rf_start", default=0.0, min=0.0, max=1.0, step=0.01, optional=True,
                               tooltip="rf_inversion: first step with the pull, as a fraction of the steps."),
                io.Float.Input("rf_stop", default=0.38, min=0.0, max=1.0, step=0.01, optional=True,
                               tooltip="rf_inversion: the pull stops at this fraction of the steps (0.38: the "
                                       "reference example); later steps follow the guider alone."),
                io.Combo.Input("auto_lock", options=list(AUTO_LOCKS), default="off", optional=True,
                               tooltip="Background lock with no mask to wire: 'edit' locks, at every step, all but "
                                       "where the edit has moved away from the photo's own trajectory (Otsu's split "
                                       "of that distance, +1 latent pixel). For local edits (a colour, an object); "
                                       "not for global ones (style, light). Instead of lock_mask / concept_masks."),
                io.Float.Input("auto_lock_start", default=0.25, min=0.0, max=1.0, step=0.05, optional=True,
                               tooltip="auto_lock 'edit': nothing is locked before this fraction of the steps "
                                       "(the edit first has to move away from the photo)."),
            ],
            outputs=[io.Sampler.Output(display_name="SAMPLER", tooltip="Connect to SamplerCustomAdvanced.")],
        )

    @classmethod
    def execute(cls, inversion, lock_mask=None, concept_masks=None, feather=8.0, concept_threshold=0.25, rf_eta=0.9,
                rf_start=0.0, rf_stop=0.38, auto_lock="off", auto_lock_start=0.25) -> io.NodeOutput:
        if auto_lock not in AUTO_LOCKS:
            raise ValueError(f"auto_lock must be one of {AUTO_LOCKS}, got {auto_lock!r}")
        given = [n for n, v in (("lock_mask", lock_mask), ("concept_masks", concept_masks),
                                ("auto_lock 'edit'", None if auto_lock == "off" else auto_lock)) if v is not None]
        if len(given) > 1:
            raise ValueError(f"give the background lock one of lock_mask, concept_masks or auto_lock, not "
                             f"{' and '.join(given)}")
        if auto_lock != "off" and not 0.0 <= float(auto_lock_start) <= 1.0:
            raise ValueError(f"auto_lock_start must be in [0, 1], got {auto_lock_start}")
        if given and inversion.source_ladder is None:
            raise ValueError("this INVERSION holds no source ladder (it was saved by an older PhotoOps): invert the "
                             "photo again to use the background lock")
        lock = None
        if lock_mask is not None:
            m = lock_mask if lock_mask.ndim == 3 else lock_mask[None]
            if m.shape[0] not in (1, inversion.latent_shape[0]):
                raise ValueError(f"lock_mask holds {m.shape[0]} masks, the inversion {inversion.latent_shape[0]} "
                                 f"image(s)")
            lock = {"mask": m.float().cpu(), "feather": feather}
        elif concept_masks is not None:
            lock = {"concept_masks": concept_masks, "feather": feather, "threshold": concept_threshold}
        elif auto_lock != "off":
            lock = {"auto": auto_lock, "start": float(auto_lock_start), "feather": feather}
        rf = (rf_eta, rf_start, rf_stop) if inversion.method == "rf_inversion" else None
        if rf is not None and not rf_start <= rf_stop:
            raise ValueError(f"rf_start ({rf_start}) must not exceed rf_stop ({rf_stop})")
        return io.NodeOutput(ksampler(_replay, inversion=inversion, lock=lock, **({"rf": rf} if rf else {})))


class SaveInversionNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PhotoOps_SaveInversion",
            display_name="Save Inversion",
            category="PhotoOps/inversion",
            description=f"Saves an INVERSION as safetensors into output/{FOLDER}, so a photo is inverted once and "
                        f"edited many times, or on another machine (copy it to models/{FOLDER} there).",
            inputs=[
                INVERSION.Input("inversion", tooltip="From Invert."),
                io.String.Input("filename_prefix", default="inversion",
                                tooltip="File name prefix; a counter is appended as ComfyUI numbers its outputs "
                                        "(prefix_00001_.safetensors)."),
            ],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, inversion, filename_prefix) -> io.NodeOutput:
        folder = register_folder(FOLDER, FOLDER)
        path = save_inversion(inversion, next_save_path(folder, filename_prefix, "inversion"))
        return io.NodeOutput(ui={"text": [os.path.basename(path)]})


class LoadInversionNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        register_folder(FOLDER, FOLDER)
        return io.Schema(
            node_id="PhotoOps_LoadInversion",
            display_name="Load Inversion",
            category="PhotoOps/inversion",
            description=f"Loads an INVERSION saved by Save Inversion (from output/{FOLDER} or models/{FOLDER}).",
            inputs=[io.Combo.Input("inversion_file", options=folder_files(FOLDER),
                                   tooltip=f"A .safetensors file in output/{FOLDER} or models/{FOLDER}.")],
            outputs=[INVERSION.Output(display_name="inversion", tooltip="Replay with Inversion Sampler.")],
        )

    @classmethod
    def execute(cls, inversion_file) -> io.NodeOutput:
        return io.NodeOutput(load_inversion(folder_file_path(FOLDER, inversion_file)))


NODES = [InvertNode, InversionSamplerNode, EtaScheduleNode, SaveInversionNode, LoadInversionNode]
