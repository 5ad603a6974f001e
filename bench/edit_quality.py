"""Edit quality on the toy world, where every edit has a known right answer.

For a fixed set of rendered toy photos (seeded), each inversion / editing method the pack
has is run through the PhotoOps kernels and the diffusers adapter on the trained toy model:

* reconstruction PSNR — invert with the source caption, replay with it (same CFG);
* edit success — replay with the caption naming a new colour; the ground-truth scorer must
  read the new colour AND the source shape and background;
* background PSNR — edited vs source photo outside the object (the object's mask in the
  source and in the exact ground-truth edit, dilated by one pixel).

Prints one table (and writes it as JSON with ``--json``).  The README shows it.

    python bench/edit_quality.py [--model tools/toyworld/model] [--n 12] [--steps 50]
    python bench/edit_quality.py --flow [--model tools/toyworld/model_flow]   # the toy rectified-flow model

``--flow`` (issue 19 item 5) runs the same 12-photo protocol and scorer on the toy rectified-flow model
(``tools/toyworld/flow.py``) with the flow kernels instead: see :func:`flow_run`.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from _common import ROOT, import_pack

import_pack()
import torch  # noqa: E402

from photoops.kernels import eta as keta  # noqa: E402
from photoops.kernels import maps as kmaps  # noqa: E402
from photoops.kernels import prompt_to_prompt as kptp  # noqa: E402
from photoops.kernels.attention import AttentionHooks, TokenMapRecorder  # noqa: E402
from photoops.kernels.diffusers_adapter import DiffusersDenoiser  # noqa: E402
from photoops.kernels.inversion import (BackgroundLock, EditLock, ddim_invert, ddpm_invert,  # noqa: E402
                                        dpmpp_2m_sde_invert, eta_inversion_noises, replay_dpmpp_2m_sde, replay_sample)
from photoops.kernels.schedule import VPSchedule  # noqa: E402

# colour swaps with exact ground truth (fg palette: red, green, blue, yellow)
SWAPS = {"red": "blue", "green": "yellow", "blue": "red", "yellow": "green"}


def photos(n: int, seed: int, which: str = "A"):
    from tools.toyworld import world

    scenes = world.sample_scenes(n, seed=seed, world=which)
    src = world.render_batch(scenes)
    tgt_scenes = [world.with_colour(s, SWAPS[s.fg]) for s in scenes]
    tgt = world.render_batch(tgt_scenes)
    obj = torch.stack([torch.as_tensor(world.object_mask(s)) | torch.as_tensor(world.object_mask(t))
                       for s, t in zip(scenes, tgt_scenes)])
    bg = ~(torch.nn.functional.max_pool2d(obj[:, None].float(), 3, 1, 1)[:, 0] > 0)   # dilate by 1 px
    return scenes, tgt_scenes, src, tgt, bg


def psnr(a, b, mask=None):
    """PSNR in dB of images in [-1, 1] mapped to [0, 1]; optional per-pixel mask [B, H, W]."""
    d = ((a.clamp(-1, 1) - b.clamp(-1, 1)) / 2) ** 2
    if mask is not None:
        m = mask[:, None].expand_as(d).float()
        mse = (d * m).flatten(1).sum(1) / m.flatten(1).sum(1).clamp_min(1)
    else:
        mse = d.flatten(1).mean(1)
    return (10 * torch.log10(1 / mse.clamp_min(1e-10))).clamp(max=100.0)


def edit_strength(images, tgt_scenes) -> list[float]:
    """Per photo, the share of the true edit's object pixels that the scorer reads as the new colour (1: the object
    fully recoloured; 0: none of it).  Rule P's measure (issue 18)."""
    from tools.toyworld import scorer, world

    obj = world.object_masks(tgt_scenes)                                        # [B, H, W]
    idx = torch.tensor([world.PALETTE_NAMES.index(t.fg) for t in tgt_scenes]).view(-1, 1, 1)
    hit = (scorer.classify_pixels(images.clamp(-1, 1)) == idx) & obj
    return (hit.flatten(1).sum(1) / obj.flatten(1).sum(1).clamp_min(1)).tolist()


class ToyDenoiser:
    """Guided x0 predictions of the toy model for a fixed pair of captions per image."""

    def __init__(self, model, hooks=None):
        sched = model.scheduler
        self.schedule = VPSchedule(sched.alphas_cumprod)
        self.den = DiffusersDenoiser(model.unet, self.schedule, hooks=hooks)
        self.model = model
        self.uncond = model.encode_prompts([""])

    def guided(self, captions, cfg):
        cond = self.model.encode_prompts(captions)

        def f(x, s):
            if cfg == 1.0:
                return self.den.predict_x0(x, s, [cond])[0]
            c, u = self.den.predict_x0(x, s, [cond, self.uncond], cond_ids=[0, 1])
            return u + cfg * (c - u)
        return f


def ddim_sigmas(schedule: VPSchedule, steps: int) -> torch.Tensor:
    """diffusers DDIM (leading, offset 1) timesteps; final level abar_0 (set_alpha_to_one=False)."""
    ratio = 1000 // steps
    t = torch.arange(steps - 1, -1, -1) * ratio + 1
    return torch.cat([schedule.sigmas[t], schedule.sigmas[:1]]).float()


def run(args):
    from tools.toyworld import model as tm
    from tools.toyworld import scorer

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model = tm.load_model(args.model)
    scenes, tgt_scenes, src, tgt, bg = photos(args.n, args.seed, args.world)
    src_caps = [f"a {s.fg} {s.shape} on a {s.bg} background" for s in scenes]
    tgt_caps = [f"a {t.fg} {t.shape} on a {t.bg} background" for t in tgt_scenes]
    x0 = src.clone()                                       # identity VAE, scaling 1: the latent is the image
    td = ToyDenoiser(model)
    sig = ddim_sigmas(td.schedule, args.steps)
    skip = int(round(args.skip * args.steps))
    rows = []

    def score_edit(name, out, recon):
        res = scorer.score_batch(out.clamp(-1, 1))
        strength = edit_strength(out, tgt_scenes)
        ok = [r["fg"] == t.fg and r["shape"] == s.shape and r["bg"] == s.bg
              for r, s, t in zip(res, scenes, tgt_scenes)]
        if args.dump:      # rows: the photos, the true edits, this result (a grid per method)
            from tools.toyworld.sample import save_grid
            Path(args.dump).mkdir(parents=True, exist_ok=True)
            save_grid(torch.cat([src, tgt, out.clamp(-1, 1)]), str(Path(args.dump) / f"{len(rows):02d}.png"),
                      ncol=len(src))
            print(f"{len(rows):02d}.png: {name}; wrong: " + ", ".join(
                f"{i} read {r['fg']} {r['shape']} on {r['bg']}" for i, (r, g) in enumerate(zip(res, ok)) if not g))
        vs_truth = psnr(out, tgt)
        rows.append({"method": name, "recon_psnr": float(psnr(recon, src).mean()) if recon is not None else None,
                     "edit_success": sum(ok) / len(ok), "bg_psnr": float(psnr(out, src, bg).mean()),
                     "edit_psnr_vs_truth": float(vs_truth.mean()),
                     "vs_truth_photos": vs_truth.tolist(),      # per photo, for paired comparisons
                     "edit_strength_photos": strength,          # per photo, for rule P (issue 18)
                     # why edits failed: the scorer's reading of each attribute (colour kept = not edited)
                     "wrong": {"colour": sum(r["fg"] != t.fg for r, t in zip(res, tgt_scenes)),
                               "colour_kept": sum(r["fg"] == s.fg for r, s in zip(res, scenes)),
                               "shape": sum(r["shape"] != s.shape for r, s in zip(res, scenes)),
                               "background": sum(r["bg"] != s.bg for r, s in zip(res, scenes))}})

    g_src, g_tgt = td.guided(src_caps, args.src_cfg), td.guided(tgt_caps, args.cfg)
    t0 = time.perf_counter()
    tried = None
    if args.skip_rule == "swap":
        args.skip, tried = swap_skip(args, g_src, g_tgt, x0, sig, scenes, tgt_scenes)
        skip = int(round(args.skip * args.steps))

    def meta():
        return {"n": args.n, "steps": args.steps, "skip": skip, "cfg": args.cfg, "src_cfg": args.src_cfg,
                "skip_rule": args.skip_rule, "skip_tried": tried, "seconds": round(time.perf_counter() - t0, 1)}

    if args.swap_only:      # the DDPM caption swap, without and with the edit lock (issue 17)
        n = len(sig) - 1
        x_start, zs, lad = ddpm_invert(g_src, x0, sig, generator=torch.Generator().manual_seed(args.seed))
        recon = replay_sample(g_src, x_start, sig, noises=zs)
        score_edit(f"DDPM inversion + target caption (skip {skip})",
                   replay_sample(g_tgt, lad[n - skip], sig[skip:], noises=zs, start=skip), recon)
        for st in args.lock_start:
            lock = EditLock(lad[: n - skip + 1].flip(0), skip=skip, start=st)
            out = replay_sample(g_tgt, lad[n - skip], sig[skip:], noises=zs, start=skip, lock=lock)
            score_edit(f"DDPM inversion + target caption + edit lock (from {st:g} of the steps, otsu, +1 px)", out,
                       None)
            rows[-1]["mask_fraction"] = float(lock.last.mean())
        return rows, meta()
    if args.goals:          # issue 17 / 18: one setting per method, chosen on world A (GOAL_PICKS)
        goal_rows(args, model, td, g_src, g_tgt, src_caps, tgt_caps, x0, sig, skip, scenes, tgt_scenes, score_edit,
                  rows)
        return rows, meta()
    if args.ptp_only:
        ptp_rows(args, model, td, g_src, g_tgt, src_caps, tgt_caps, x0, sig, skip, scenes, score_edit)
        return rows, meta()
    if args.semantic_only:
        x_start, zs, lad = ddpm_invert(g_src, x0, sig, generator=torch.Generator().manual_seed(args.seed))
        dpm = dpm_inversion(g_src, x0, sig, skip, args.seed)
        for scale in args.edit_scale:
            for mode in ("sega", "ledits++", "ledits++ dpm"):
                out = semantic_edit(model, mode.split()[0], src_caps, scenes, tgt_scenes, lad, zs, sig, skip, args,
                                    scale, dpm=dpm if mode.endswith("dpm") else None)
                score_edit(f"{SEMANTIC_NAMES[mode]} (scale {scale:g}, threshold "
                           f"{args.edit_threshold:g}, concepts as {args.concepts}, skip {skip})", out, None)
        return rows, meta()
    # 1. DDIM inversion, deterministic replay
    ladder = ddim_invert(g_src, x0, sig)
    recon = replay_sample(g_src, ladder[-1], sig, eta=0.0)
    out = replay_sample(g_tgt, ladder[len(sig) - 1 - skip], sig[skip:], eta=0.0)
    score_edit(f"DDIM inversion (skip {skip})", out, recon)
    # 2. edit-friendly DDPM inversion
    x_start, zs, lad = ddpm_invert(g_src, x0, sig, generator=torch.Generator().manual_seed(args.seed))
    recon = replay_sample(g_src, x_start, sig, noises=zs)
    out = replay_sample(g_tgt, lad[len(sig) - 1 - skip], sig[skip:], noises=zs, start=skip)
    score_edit(f"DDPM inversion (skip {skip})", out, recon)
    # 3. Eta Inversion, paper config A, time-only and with the region mask of the source colour word
    etas = keta.per_step_eta(keta.PRESETS["paper_A"], sig, td.schedule)
    n = len(sig) - 1

    def eta_rows(label, mask=None, optimal=False):
        noises, e = eta_inversion_noises(g_src, ladder, sig, etas, eta_mask=mask, candidates=10,
                                         generator=torch.Generator().manual_seed(args.seed), store_optimal=optimal)
        recon = replay_sample(g_src, ladder[n], sig, noises=noises, eta=e)
        out = replay_sample(g_tgt, ladder[n - skip], sig[skip:], noises=noises, eta=e, start=skip)
        score_edit(f"Eta Inversion (paper A{label}, skip {skip})", out, recon)
        if mask is not None:
            rows[-1]["mask_fraction"] = float(mask.mean())

    eta_rows("")
    eta_rows(", optimal noise", optimal=True)
    region = region_maps(model, x0, src_caps, scenes, sig)
    eta_rows(", region > 0.2", (region > 0.2).float())
    eta_rows(", region top 25 %", kmaps.binarize(region[:, 0], "quantile", 0.75)[:, None])
    # 2b. the DDPM caption swap with a background lock from the source colour word's attention during the
    #     inversion (Attention Capture on Invert's model -> Attention Mask otsu -> Inversion Sampler lock_mask)
    lock_m = kmaps.dilate(kmaps.binarize(region[:, 0], "otsu"))[:, None]
    out = replay_sample(g_tgt, lad[n - skip], sig[skip:], noises=zs, start=skip,
                        lock=BackgroundLock(lad[: n - skip + 1].flip(0), lock_m, skip=skip))
    score_edit(f"DDPM inversion + lock from the colour word's attention (otsu, +1 px) (skip {skip})", out, None)
    rows[-1]["mask_fraction"] = float(lock_m.mean())
    # 2c. the same caption swap with the edit lock (the Inversion Sampler's auto_lock "edit"): the mask is
    #     where the replay has moved away from the photo's ladder (otsu), from 25 % of the replayed steps
    lock = EditLock(lad[: n - skip + 1].flip(0), skip=skip, start=args.lock_start[0])
    out = replay_sample(g_tgt, lad[n - skip], sig[skip:], noises=zs, start=skip, lock=lock)
    score_edit(f"DDPM inversion + edit lock (from {args.lock_start[0]:g} of the steps, otsu, +1 px) (skip {skip})",
               out, None)
    rows[-1]["mask_fraction"] = float(lock.last.mean())
    # 4. LEDITS (DDPM inversion + SEGA) and LEDITS++ (implicit masks): concepts "<old colour> <shape>"
    #    removed and "<new colour> <shape>" added (testing-offline.md §7.6), source prompt kept as target
    dpm = dpm_inversion(g_src, x0, sig, skip, args.seed)
    recon = replay_dpmpp_2m_sde(g_src, dpm[0], sig[skip:], noises=dpm[1])
    rows.append({"method": f"LEDITS++ inversion (SDE DPM-Solver++ 2M over the last {len(sig) - 1 - skip} steps), "
                           "source replay", "recon_psnr": float(psnr(recon, src).mean()), "edit_success": None,
                 "bg_psnr": float(psnr(recon, src, bg).mean()), "edit_psnr_vs_truth": float(psnr(recon, tgt).mean())})
    for scale in args.edit_scale:
        for mode in ("sega", "ledits++", "ledits++ dpm"):
            out = semantic_edit(model, mode.split()[0], src_caps, scenes, tgt_scenes, lad, zs, sig, skip, args, scale,
                                dpm=dpm if mode.endswith("dpm") else None)
            score_edit(f"{SEMANTIC_NAMES[mode]}, concepts as {args.concepts}, scale {scale:g}, skip {skip}", out, None)
    ptp_rows(args, model, td, g_src, g_tgt, src_caps, tgt_caps, x0, sig, skip, scenes, score_edit)
    return rows, meta()


# Chosen on world A only (never on B): the paper's PtP (cross 0.4, self 0.6) gave 11/12 on A; a sweep on A
# (skip 0; cross 0.6 / 0.8; self 0.8; blend 0.5; reweight 1 / 3; eta paper_B) put cross 0.6 + self 0.8 first
# (12/12, 43.2 dB background, 33.1 dB vs the true edit); the node keeps the paper's 0.4 / 0.6 as defaults.  Rule 1's
# pick from the 36-setting edit-lock sweep on A (bench/results/ptp_sweep.md) is this setting, the bench's default
# until 2026-12-06; it is kept as rule 1's Eta + PtP row of --goals (GOAL_PICKS).
PTP_RULE_1 = {"mode": "refine", "cross": 0.6, "self": 0.8, "reweight": 2.0, "blend": 0.3, "blend_start": 0.2,
              "blend_rule": "otsu", "eta": "paper_A", "region": "q0.75", "cfg": 3.0}
PTP_SWEPT = ("cross", "self", "reweight", "cfg")      # the keys bench/ptp_sweep.py sweeps
# Rule P [ours], stated on 2026-12-06 before the sweep's edit strengths were read on world A, before world F's
# model was trained and before any other setting than rule 1's was run on world E.  Rule 1 (above and in
# bench/ptp_sweep.py) picks, on A, the setting closest to the exact true edit; on A that favours a long
# self-attention replace, which on B left small objects in their old colour (README, issue 18).  Rule P reads the
# goal instead: among the 36 sweep settings (bench/results/ptp_sweep.md) that meet the goal on A, the one whose edit
# at the goal's rank is strongest (the goal asks 11 of 12 photos, so the second-weakest photo decides it; a photo's
# edit strength is the share of its true edited object's pixels the scorer reads as the new colour), ties by rule 1
# (ptp_sweep.pick_rule_p).  Why: the goal counts photos over a threshold, and the setting that clears it on A with
# the most room is the one least likely to fall below it on another model.  Rule P was written after world B's
# sweep had been seen, so B cannot test it.  Stated before F: rule P's pick replaces rule 1's (PTP_RULE_1, the
# default then) if, on world E and on world F, each with skip rule S and the edit lock, its Eta + PtP row
# edits at least as many of the 12 photos as rule 1's row and meets the goal wherever rule 1's does
# (rule2_loses_nothing, the same no-loss test); else it is rejected.  World F (sides 6-12 px) is to be trained:
# Min-SNR 3, batch 20, peak LR 1.8e-3, warm-up 300, EMA 0.998, 12 % empty captions, offset noise 0.1, seed 211,
# 5,000 steps, 2 threads (tools/toyworld/README.md).


def ptp_setting(args) -> dict:
    """The Prompt-to-Prompt setting of this run: PTP_DEFAULTS (rule B's, chosen on world B) unless overridden."""
    d = dict(PTP_DEFAULTS)
    for k in d:
        v = getattr(args, "ptp_" + k.replace("-", "_"), None)
        if v is not None:
            d[k] = v
    return d


def ptp_rows(args, model, td, g_src, g_tgt, src_caps, tgt_caps, x0, sig, skip, scenes, score_edit):
    """Eta + PtP, Eta alone, DDIM + PtP, DDPM + PtP (the Eta Inversion paper's comparison), ONE setting.

    PtP = ``kernels/prompt_to_prompt.py`` with the source branch anchored to each inversion's source
    ladder (``SourceAnchoredPtP``) and both branches on the inversion's noise; local blend on the colour
    word through the background lock (as the Inversion Sampler's ``concept_masks`` does).  The toy
    captions share one layout (``a <colour> <shape> on a <bg> background``, one token per word), so
    one control serves the batch; the colour word (token 2) is the blend and reweight word.
    """
    st = ptp_setting(args)
    if st["cfg"] != args.cfg:               # the PtP rows' own target CFG (Eta alone too, as the paper compares)
        g_tgt = td.guided(tgt_caps, st["cfg"])
    tok = model.tokenizer
    ids_s = [tok(c)["input_ids"] for c in src_caps]
    ids_t = [tok(c)["input_ids"] for c in tgt_caps]
    T = tok.model_max_length
    if st["mode"] == "refine":
        maps = [kptp.refinement_mapper(a, b, T) for a, b in zip(ids_s, ids_t)]
        assert all(torch.equal(m[0], maps[0][0]) and torch.equal(m[1], maps[0][1]) for m in maps), "captions differ"
        mapper = maps[0]
    else:
        words = lambda c: [tok(w)["input_ids"][1:-1] for w in c.split()]  # noqa: E731
        mapper = kptp.replacement_mapper(words(src_caps[0]), words(tgt_caps[0]), T)
    for s_, i_ in zip(scenes, ids_s):
        assert i_[2] == tok(s_.fg)["input_ids"][1], "the colour word is not token 2"
    n = len(sig) - 1
    c_src, c_tgt = model.encode_prompts(src_caps), model.encode_prompts(tgt_caps)
    unet = model.unet
    saved = dict(unet.attn_processors)

    def edit(start, src_ladder, noises, eta, chooser=None):
        blend = (kptp.LocalBlend([2], [2], st["blend"], st["blend_start"], st["blend_rule"])
                 if st["blend"] > 0 and args.lock != "edit" else None)
        eq = kptp.equalizer(T, [[2]], [st["reweight"]]) if st["reweight"] != 1.0 else None
        control = kptp.PromptToPromptControl(st["mode"], mapper, T, equalizer=eq, cross_steps=(0.0, st["cross"]),
                                             self_steps=(0.0, st["self"]), blend=blend)
        den = DiffusersDenoiser(unet, td.schedule, hooks=control.cross_hooks)
        kptp.install_self_attention_hooks(unet, control.self_hooks, den.holder)
        try:
            anchored = kptp.SourceAnchoredPtP(
                lambda xs, xt, s: kptp.ptp_predict(den, xs, xt, s, c_src, c_tgt, td.uncond, st["cfg"]),
                control, src_ladder, sig, skip, noise=chooser)
            lock = None
            if args.lock == "edit":          # the edit lock instead of the blend's
                lock = EditLock(src_ladder, skip=skip, start=args.lock_start[0])
            elif blend is not None:
                lock = BackgroundLock(src_ladder, lambda i: blend.mask(x0.shape[-2:]), skip=skip)
            with torch.no_grad():
                return replay_sample(anchored, start, sig[skip:], noises=noises if chooser is None else chooser,
                                     eta=eta, start=skip, lock=lock)
        finally:
            unet.set_attn_processor(dict(saved))   # (diffusers empties the dict it is given)

    label = (f"{st['mode']}, target CFG {st['cfg']:g}, cross {st['cross']:g}, self {st['self']:g}, reweight {st['reweight']:g}, "
             + (f"edit lock from {args.lock_start[0]:g}, no local blend" if args.lock == "edit" else
                f"blend {st['blend_rule'] if st['blend_rule'] == 'otsu' else format(st['blend'], 'g')} "
                f"from {st['blend_start']:g}"))
    ladder = ddim_invert(g_src, x0, sig)
    src_ladder = ladder[: n - skip + 1].flip(0)
    etas = keta.per_step_eta(keta.PRESETS[st["eta"]], sig, td.schedule)
    mask = None
    if st["region"] != "none":
        region = region_maps(model, x0, src_caps, scenes, sig)
        mask = (kmaps.binarize(region[:, 0], "quantile", float(st["region"][1:]))[:, None]
                if st["region"].startswith("q") else (region > float(st["region"])).float())
    noises, e = eta_inversion_noises(g_src, ladder, sig, etas, eta_mask=mask, candidates=10,
                                     generator=torch.Generator().manual_seed(args.seed))
    region_label = {"none": "no region"}.get(st["region"], f"region {st['region']}")
    # the node's default (noise_selection "editing"): Eta's noise chosen during the edit at the editing CFG,
    # from the same candidate stream as Invert's; "inversion": the noise chosen at the source CFG
    chooser = None
    if args.ptp_noise == "editing":
        chooser = kptp.EditTimeNoise(src_ladder, sig, etas, skip, 10, args.seed)
    ptp_label = f"{region_label}, noise chosen at {args.ptp_noise}"
    if args.ptp_eta_only:
        score_edit(f"**Eta + PtP** ({st['eta']}, {ptp_label}; {label}; skip {skip})",
                   edit(ladder[n - skip], src_ladder, noises, e, chooser), None)
        return
    score_edit(f"Eta alone ({st['eta']}, {region_label}, target CFG {st['cfg']:g}, skip {skip})",
               replay_sample(g_tgt, ladder[n - skip], sig[skip:], noises=noises, eta=e, start=skip), None)
    score_edit(f"**Eta + PtP** ({st['eta']}, {ptp_label}; {label}; skip {skip})",
               edit(ladder[n - skip], src_ladder, noises, e, chooser), None)
    score_edit(f"DDIM + PtP ({label}; skip {skip})", edit(ladder[n - skip], src_ladder, None, 0.0), None)
    x_start, zs, lad = ddpm_invert(g_src, x0, sig, generator=torch.Generator().manual_seed(args.seed))
    score_edit(f"DDPM + PtP ({label}; skip {skip})", edit(lad[n - skip], lad[: n - skip + 1].flip(0), zs, 1.0), None)


# Issue 17's goals (>= 11/12 edits; background >= 30 dB, >= 38 dB for the caption swap) and issue 18's (Eta + PtP
# >= 11/12 at >= 30 dB), one setting per method, each chosen on world A only by one rule [ours], applied as stated
# with no tolerance: among the cells that meet the goal on A, the one closest to the exact true edit (PSNR vs
# truth).  Cells searched on A: lock none / concepts / edit, masks intersect / noise (M2 alone), scales 2 / 3 / 4 /
# 5 / 7.5 / 10 / 15 (2, 3 and 4 added on 2026-12-04/05 because the pick sat at the grid's lowest scale, 5); the
# edit lock's start (0 / 0.25 / 0.5 / 0.75) with the caption swap; PtP: the 36-setting sweep
# (bench/results/ptp_sweep.md).  World B is reported, never used.
GOAL_PICKS = (
    ("DDPM caption swap", dict(kind="swap", lock="edit", lock_start=0.25)),
    ("LEDITS", dict(kind="sega", lock="none", masks="intersect", scale=3.0)),
    ("LEDITS++ masks on the DDPM inversion", dict(kind="ledits++", lock="none", masks="noise", scale=4.0)),
    ("LEDITS++ (its inversion)", dict(kind="ledits++ dpm", lock="edit", lock_start=0.25, masks="noise", scale=4.0)),
    ("Eta + PtP", dict(kind="ptp", lock="edit", lock_start=0.25, **{"ptp_" + k: PTP_RULE_1[k] for k in PTP_SWEPT})),
)
# Rule 2 [ours], fixed on 2026-12-05 before world C's model was trained or any edit was run on world C: the rule-1
# pick above, unless the edit lock at the pick's method, masks and scale also meets the goal on A and is within one
# paired standard error of the pick in closeness to the true edit over A's photos (rule2_takes_lock); then that
# locked cell.  Why: where A's photos cannot tell two cells apart, take the one that protects the background, since
# the issue reports that the maintainers' model tints the whole background under guidance.  Rule 2 was written
# after world B had been seen (on B its cells meet the goal where rule 1's miss it), so B cannot test it; world C
# does.  Stated before C: rule 2's picks replace rule 1's if, on world C, they meet the goal for every method for
# which rule 1's picks meet it.  On A it changes two picks (paired gap, pick minus lock: LEDITS +0.17 dB, standard
# error 0.37; LEDITS++ on the DDPM inversion +0.14 dB, 0.36; ``--goals --world A`` prints them); the other
# methods' rule-1 picks already have the edit lock.  On world C (2026-12-05) neither rule's picks met any goal (all
# methods edited 5-8 of 12), so the criterion held only vacuously: C did not test rule 2.  These are rule 2's picks
# for those two:
GOAL_COMPARE = (
    ("LEDITS", dict(kind="sega", lock="edit", lock_start=0.25, masks="intersect", scale=3.0)),
    ("LEDITS++ masks on the DDPM inversion", dict(kind="ledits++", lock="edit", lock_start=0.25, masks="noise",
                                                  scale=4.0)),
)
# Skip rule S [ours], fixed on 2026-12-05 after world C's ``--goals`` run had been seen (every method missed its
# goal there at the skip of 0.3: the model settles the colour early, so edits kept the old one; the plain swap
# edited 7 of 12 photos at 0.3 and 12 of 12 at 0.2) and before world D's model was trained: the skip is the largest
# of SKIP_LADDER at which the plain DDPM caption swap (no lock, the target CFG) edits at least 11 of 12 photos
# (``--skip-rule swap``).  Why: a model that settles an attribute earlier needs more of the steps replayed under the
# target caption; the rule reads only whether the plain edit takes, as a user lowers the skip until it does, not the
# backgrounds or the methods it then sets.  The picks above stay as chosen on A at 0.3 (the skip S gives on A).
# Stated before world D: (i) rule 2 is checked on D as it was on C (skip 0.3); the check is undecided where rule 1
# meets no goal for the two methods the rules differ on; (ii) the same check with skip rule S; (iii) skip rule S is
# kept if it gives 0.3 on A and, on D, rule 2's picks meet at least as many goals with it as at 0.3; else dropped.
# Outcome on D (2026-12-05): at 0.3 no method met its goal under either rule (the plain swap edited 5 of 12), so
# (i) is undecided; S gave 0.2 there, where both rules' picks met one goal (the caption swap) and LEDITS and LEDITS++
# on the DDPM inversion edited 10 of 12 under both, so (ii) is undecided too; (iii) held (0.3 on A and B; 1 goal
# against 0), so S is kept: ``--goals`` uses it.  Rule 2 stays untested and is not adopted.
# Stated on 2026-12-05 before world E's model was trained or any edit run on E (E: sides 8-15 px, near B's; its own
# recipe and seed): with skip rule S, rule 2 is adopted if, for each of the two methods it changes, its row edits at
# least as many of E's 12 photos as rule 1's row and meets the goal wherever rule 1's does; else it is rejected.
# This check is decided whatever E's edits are (the checks on C and D could not be): it asks only that the lock lose
# nothing that rule 1 gets, since on every world the lock's rows kept more background than rule 1's.
# Outcome on E (2026-12-06, model f144ddc; S gave 0.3): both rules' rows edit 11 of 12 photos for both methods;
# rule 2's rows meet the goal (LEDITS 58.4 dB, LEDITS++ on the DDPM inversion 45.2 dB), rule 1's do not (29.1 /
# 28.2 dB).  The test holds, so rule 2 is ADOPTED (ADOPTED_RULE): its picks are the bench's defaults (rule 1's rows
# are still run and printed, for the record of the choice).  Rule 2's picks met 5 of 5 goals on E, rule 1's 3.
ADOPTED_RULE = "rule 2"
# Rule P's pick (see PTP_DEFAULTS) from the sweep on world A (2026-12-06, bench/results/ptp_sweep.md: the
# second-weakest edit strengths span only 0.88-0.95 over the 36 settings; this one's is the largest), run beside
# rule 1's Eta + PtP row by --goals, which prints the no-loss test stated before world F off world A.  On world B,
# already swept, this setting edits 9 of 12 (rule 1's: 10): B cannot test rule P, but it does not favour it.
# Outcome (2026-12-06, world F's model 08b1033; skip rule S gave 0.3 on E and F): on F rule P's row edits 12 of 12
# at 63.5 dB against rule 1's 11 at 85.5 (both meet the goal); on E it edits 10 of 12 at 56.2 dB against rule 1's
# 11 at 64.2, losing the goal.  The test asked for no loss on both, so rule P is REJECTED: PTP_DEFAULTS (rule 1)
# stay the bench's Eta + PtP setting, and this row is printed for the record.
GOAL_RULE_P = ("Eta + PtP", dict(kind="ptp", lock="edit", lock_start=0.25, ptp_cross=0.8, ptp_self=0.6,
                                 ptp_reweight=4.0, ptp_cfg=3.0))
# Rule B [ours], stated on 2026-12-06 (third session) after rule P's rejection, before world G's model was trained and
# before its setting was run on worlds C, D, E or F: rule 1 (12 of 12 edits, then the closest to the exact true edit)
# applied to world B's column of the same 36-setting edit-lock sweep (bench/results/ptp_sweep.md, 2026-12-04)
# instead of A's (ptp_sweep.pick(results, "B")).  Why: the guide asks for defaults chosen on one world and reported
# on another, and names no world; A's large objects reward a long self-attention replace (keeping the layout), B's
# small objects and flat word maps need the edit to get through (README, issue 18), so the setting chosen where the
# edit is hard is reported where it is easy.  Its pick: cross 0.6, self 0.6 (the paper's), reweight 2, target CFG 5
# (the sweep: B 12/12 at 74.2 dB, 24.1 dB vs the truth; A, reported, 12/12 at 88.7 dB, 29.8 dB vs the truth).  The
# world to choose on was changed after A's pick had failed on B, so A and B cannot test rule B; the test, stated
# before it: rule B's pick replaces rule 1's (PTP_DEFAULTS at the bench's CFG 3) if (i) re-run on A and B with this
# code it meets the goal on both, and (ii) on worlds E, F and G, each with skip rule S and the edit lock, its Eta +
# PtP row edits at least as many of the 12 photos as rule 1's row and meets the goal wherever rule 1's does
# (rule2_loses_nothing, rule P's test with G added); else it is rejected.  C and D are reported, not part of the
# test (rule 1 misses there for the inversion's reasons, README).  World G (sides 6-20 px, small and large objects
# in one world) is to be trained: Min-SNR 4, batch 20, peak LR 1.5e-3, warm-up 250, EMA 0.998, 10 % empty
# captions, offset noise 0.1, seed 389, 5,000 steps, 2 threads (tools/toyworld/README.md).
# Outcome (2026-12-06, world G's model 5752fa8, trained by that recipe before any edit ran on it; its own evaluation
# 100 % all three): (i) re-run with this code, A 12 of 12 at 88.7 dB and B 12 of 12 at 74.2 dB, the goal met on
# both (equal to the sweep); (ii) skip rule S gave 0.3 on E, F and G; rule B's row against rule 1's: E 12 against
# 11 of 12 (52.4 against 64.2 dB), F 12 against 11 (75.5 against 85.5 dB), G 11 against 10 (75.8 against 86.7 dB;
# rule 1 misses the goal on G), the goal met wherever rule 1's is and on G where it is not.  The test holds, so rule
# B is ADOPTED (ADOPTED_PTP_RULE): PTP_DEFAULTS is its setting, and its row is the adopted Eta + PtP pick of --goals
# (rule 1's row is still run and printed, for the record).  The cost it shows: 10-12 dB less background on E, F
# and G than rule 1's (still 52-76 dB) and farther from the true edit on A (29.8 against 33.8 dB).
GOAL_RULE_B = ("Eta + PtP", dict(kind="ptp", lock="edit", lock_start=0.25, ptp_cross=0.6, ptp_self=0.6,
                                 ptp_reweight=2.0, ptp_cfg=5.0))
# The candidate settings --goals runs beside rule 1's Eta + PtP row: rule, setting, the worlds its test is decided
# on, the world it was stated before.
GOAL_CANDIDATES = (("P", GOAL_RULE_P, "E and F", "F"), ("B", GOAL_RULE_B, "E, F and G", "G"))
ADOPTED_PTP_RULE = "B"      # the candidate whose Eta + PtP row replaces rule 1's among the adopted picks
# The bench's default since 2026-12-06: rule B's pick (chosen on world B), adopted by the test stated before world G
# was trained: the paper's self-attention replace (0.6) and target CFG 5; the rest as rule 1's.
PTP_DEFAULTS = dict(PTP_RULE_1, **{k[4:]: v for k, v in GOAL_RULE_B[1].items() if k.startswith("ptp_")})
SKIP_LADDER = (0.3, 0.2, 0.1)
GOALS = {"swap": (11, 38.0), "sega": (11, 30.0), "ledits++": (11, 30.0), "ledits++ dpm": (11, 30.0), "ptp": (11, 30.0)}


def goal_met(row, kind):
    """Issue 17 / 18's goal for ``kind`` (GOALS: edits out of 12, as a fraction of the photos; background dB)."""
    edits, db = GOALS[kind]
    return bool(row["edit_success"] >= edits / 12 - 1e-9 and row["bg_psnr"] >= db)


def goal_rows(args, model, td, g_src, g_tgt, src_caps, tgt_caps, x0, sig, skip, scenes, tgt_scenes, score_edit,
              rows):
    """``--goals``: each method once at its GOAL_PICKS setting (rule 1), then the GOAL_COMPARE settings (rule 2's
    picks where they differ), then the GOAL_CANDIDATES' Eta + PtP rows; each row gets ``goal`` (edits of 12, dB),
    ``met``, ``pick`` (rule 1's) and ``pick2`` (the adopted ones: rule 2's, with ADOPTED_PTP_RULE's Eta + PtP)."""
    n = len(sig) - 1
    _, zs, lad = ddpm_invert(g_src, x0, sig, generator=torch.Generator().manual_seed(args.seed))
    dpm = None
    settings = ([(name, pick, True) for name, pick in GOAL_PICKS] + [(nm, p, False) for nm, p in GOAL_COMPARE]
                + [(setting[0], setting[1], rule) for rule, setting, _, _ in GOAL_CANDIDATES])
    for base, pick, is_pick in settings:
        own = {k: v for k, v in pick.items() if k.startswith("ptp_")}      # a candidate's PtP setting
        a = argparse.Namespace(**{**vars(args), "lock": pick["lock"], "lock_start": [pick.get("lock_start", 0.25)],
                                  "masks": pick.get("masks", args.masks), "ptp_eta_only": True, **own})
        kind = pick["kind"]
        label = ", ".join(f"{k} {v}" for k, v in pick.items() if k != "kind" and not (k == "lock_start" and
                                                                                       pick["lock"] != "edit"))
        changed = any(b == base for b, _ in GOAL_COMPARE)
        candidate = isinstance(is_pick, str)
        name = (f"rule {is_pick}: " if candidate else f"rule 2 only: {base} ({label})" if not is_pick else
                f"rule 1 only: {base} ({label})" if changed else f"{base} ({label})")
        if kind == "swap":
            lock = EditLock(lad[: n - skip + 1].flip(0), skip=skip, start=a.lock_start[0]) if a.lock == "edit" else None
            score_edit(name, replay_sample(g_tgt, lad[n - skip], sig[skip:], noises=zs, start=skip, lock=lock), None)
        elif kind == "ptp":
            ptp_rows(a, model, td, g_src, g_tgt, src_caps, tgt_caps, x0, sig, skip, scenes, score_edit)
            rows[-1]["method"] = name.split(base)[0] + rows[-1]["method"]   # its own full label
        else:
            if kind.endswith("dpm") and dpm is None:
                dpm = dpm_inversion(g_src, x0, sig, skip, args.seed)
            out = semantic_edit(model, kind.split()[0], src_caps, scenes, tgt_scenes, lad, zs, sig, skip, a,
                                pick["scale"], dpm=dpm if kind.endswith("dpm") else None)
            score_edit(name, out, None)
        r = rows[-1]
        r["goal"], r["met"], r["goal_method"] = list(GOALS[kind]), goal_met(r, kind), base
        if candidate:
            r["pick"], r["pick2"], r["candidate"] = False, is_pick == ADOPTED_PTP_RULE, is_pick
        else:     # rule 1's picks; the adopted ones: rule 2's, but for Eta + PtP, whose adopted row is a candidate's
            r["pick"], r["pick2"] = is_pick, not (is_pick and (changed or kind == "ptp"))


def swap_skip(args, g_src, g_tgt, x0, sig, scenes, tgt_scenes):
    """Skip rule S: the largest fraction in SKIP_LADDER at which the plain DDPM caption swap edits at least 11 of 12
    photos (the smallest if none does).  Returns (fraction, [(fraction, photos edited right), ...] as tried)."""
    from tools.toyworld import scorer

    n = len(sig) - 1
    _, zs, lad = ddpm_invert(g_src, x0, sig, generator=torch.Generator().manual_seed(args.seed))
    tried = []
    for frac in SKIP_LADDER:
        k = int(round(frac * args.steps))
        out = replay_sample(g_tgt, lad[n - k], sig[k:], noises=zs, start=k).clamp(-1, 1)
        ok = sum(r["fg"] == t.fg and r["shape"] == s.shape and r["bg"] == s.bg
                 for r, s, t in zip(scorer.score_batch(out), scenes, tgt_scenes))
        tried.append((frac, ok))
        if ok * 12 >= GOALS["swap"][0] * len(scenes):
            break
    return frac, tried


def rule2_takes_lock(pick, lock, kind):
    """Rule 2 on world A's rows: the edit-lock row replaces the rule-1 pick when it meets ``kind``'s goal and the
    pick's paired lead in closeness to the true edit (:func:`paired_gap`) is under one standard error."""
    if not goal_met(lock, kind):
        return False
    m, se, _, _ = paired_gap(pick, lock)
    return m < se


def rule2_loses_nothing(pick, lock, kind):
    """The test of rule 2 stated before world E: rule 2's row (``lock``) edits at least as many photos as rule 1's
    (``pick``) and meets ``kind``'s goal wherever rule 1's does."""
    return lock["edit_success"] >= pick["edit_success"] - 1e-9 and (goal_met(lock, kind) or not goal_met(pick, kind))


def paired_gap(pick, other):
    """Closeness to the true edit, ``pick`` minus ``other``, paired over the photos: (mean dB, standard error dB,
    photos where the pick is closer, photos)."""
    d = torch.tensor(pick["vs_truth_photos"]) - torch.tensor(other["vs_truth_photos"])
    se = float(d.std() / len(d) ** 0.5) if len(d) > 1 else float("nan")
    return float(d.mean()), se, int((d > 0).sum()), len(d)


SEMANTIC_NAMES = {"sega": "LEDITS (DDPM inversion + SEGA)", "ledits++": "LEDITS++ masks on the DDPM inversion",
                  "ledits++ dpm": "LEDITS++ (its DPM-Solver++ 2M SDE inversion + masks)"}


def dpm_inversion(g_src, x0, sig, skip, seed):
    """LEDITS++ inversion of the replayed steps only (the 2M history starts there)."""
    x_start, zs, lad = dpmpp_2m_sde_invert(g_src, x0, sig[skip:], generator=torch.Generator().manual_seed(seed))
    return x_start, zs, lad


def semantic_edit(model, mode, src_caps, scenes, tgt_scenes, ladder, zs, sig, skip, args, scale, dpm=None):
    """Replay the DDPM inversion with SEGA (momentum 0.3/0.6, LEDITS demo) or LEDITS++ guidance.

    Concepts (``--concepts``): ``words`` = "<old colour> <shape>" removed and "<new colour>
    <shape>" added (testing-offline.md §7.6); ``captions`` = the whole source caption removed
    and the whole target caption added (the toy model saw only whole captions in training).
    The attention maps of LEDITS++ use the concept's colour word.  ``dpm = (x_start, zs)``: replay
    a LEDITS++ inversion (SDE DPM-Solver++ 2M over ``sig[skip:]``) instead of the DDPM one.
    """
    from photoops.kernels import sega as ksega

    tok = model.tokenizer
    hooks = AttentionHooks()
    td = ToyDenoiser(model, hooks=hooks)
    if args.concepts == "words":
        old = [f"{s.fg} {s.shape}" for s in scenes]
        new = [f"{t.fg} {t.shape}" for t in tgt_scenes]
        positions = [1]                                   # the colour word
    else:
        old = [f"a {s.fg} {s.shape} on a {s.bg} background" for s in scenes]
        new = [f"a {t.fg} {t.shape} on a {t.bg} background" for t in tgt_scenes]
        positions = [2]
    for o, nw, s in zip(old, new, scenes):             # the colour word sits at the same place in every prompt
        assert tok(o)["input_ids"][positions[0]] == tok(s.fg)["input_ids"][1], (o, s.fg)
    c_old, c_new = model.encode_prompts(old), model.encode_prompts(new)
    cond = model.encode_prompts(src_caps)
    recs = [hooks.add(TokenMapRecorder(positions, tok.model_max_length, cond_index=2 + i, layers="lowres"))
            for i in range(2)]
    concepts = [ksega.EditConcept(scale=scale, reverse=True, threshold=args.edit_threshold, warmup=args.edit_warmup),
                ksega.EditConcept(scale=scale, threshold=args.edit_threshold, warmup=args.edit_warmup)]
    sg = ksega.SemanticGuidance(concepts, momentum_scale=0.3, momentum_beta=0.6, mask_rule=args.mask_rule,
                                mask_mass=args.mask_mass)
    state = {"step": 0}
    acted = kmaps.StepMasks(len(concepts))     # where each concept acted, per step (the Semantic Guide's masks)
    remember = acted.add

    def lock_mask(step):                       # the Inversion Sampler's one-pass lock (concept_masks input)
        region = acted.lock_region(args.lock_threshold)
        if region is None:
            return None
        return kmaps.soften_mask(kmaps.dilate(region), args.lock_feather / 8.0)   # image px, x8 as SD

    def guided(x, s):
        for r in recs:
            r.reset()
        outs = td.den.predict_x0(x, s, [td.uncond.expand(x.shape[0], -1, -1), cond, c_old, c_new],
                                 cond_ids=[0, 1, 2, 3])
        sv = s.view(-1, 1, 1, 1)
        e = [(x - d) / sv for d in outs]
        pp = dict(timestep=float(td.schedule.timestep(s[0])), return_masks=True, mask_rule=args.mask_rule,
                  mask_mass=args.mask_mass, use_intersect=args.masks == "intersect",
                  use_cross_attn=args.masks in ("intersect", "cross_attention"))
        if mode == "sega":
            e_hat = sg.guide(e[0], e[1], e[2:], state["step"], args.src_cfg)
            if args.masks == "noise":      # SEGA's own per-channel masks (any channel)
                remember(torch.stack([ksega.percentile_mask(ksega.concept_direction(ec, e[0], c), c.threshold,
                                                            args.mask_rule, args.mask_mass).any(1)
                                      & torch.tensor(c.warm(state["step"]) and not c.cooled(state["step"]))
                                      for c, ec in zip(concepts, e[2:])]))
            else:                          # the Semantic Guide's region for sega: LEDITS++'s masks, reported only
                remember(ksega.ledits_pp_guidance(e[0], e[2:], concepts, [r.result() for r in recs], state["step"],
                                                  **pp)[1].amax(2))
        else:
            e_hat, masks = ksega.ledits_pp_guidance(e[0], e[2:], concepts, [r.result() for r in recs], state["step"],
                                                    **pp)
            remember(masks.amax(2))
            e_hat = e_hat + args.src_cfg * (e[1] - e[0])     # replay the inversion's own prediction (Rule 2)
        state["step"] += 1
        return x - sv * e_hat

    n = len(sig) - 1
    lock = None
    if args.lock != "none":         # the source levels the replay visits: the DPM ladder covers sig[skip:] only
        src_ladder = (dpm[2] if dpm is not None else ladder[: n - skip + 1]).flip(0)
        lock = (BackgroundLock(src_ladder, lock_mask, skip=0 if dpm is not None else skip) if args.lock == "concepts"
                else EditLock(src_ladder, skip=0 if dpm is not None else skip, start=args.lock_start[0]))
    if dpm is not None:
        return replay_dpmpp_2m_sde(guided, dpm[0], sig[skip:], noises=dpm[1], lock=lock)
    return replay_sample(guided, ladder[n - skip], sig[skip:], noises=zs, start=skip, lock=lock)


def region_maps(model, x0, captions, scenes, sig):
    """Eta §4.2: mean inversion-time cross-attention of the source colour word, max-normalised, bicubic.

    The paper keeps ``map > 0.2``.  On the toy model the maps are flat (inside the object
    ~0.8, outside ~0.6 after max-normalisation), so that keeps everything; the bench also
    reports a quantile mask (the top 25 %, about the object's area).
    """
    hooks = AttentionHooks()
    tok = model.tokenizer
    recs = []
    for cap, s in zip(captions, scenes):
        ids = tok(cap)["input_ids"]
        word = tok(s.fg)["input_ids"][1:-1]
        pos = [i for i in range(len(ids)) if ids[i:i + len(word)] == word][:1]
        recs.append(pos[0])
    # one recorder per position set would need per-image positions; the toy captions put the
    # colour word at the same place ("a <colour> ..."), which we check
    if len(set(recs)) != 1:
        raise RuntimeError("toy captions put the colour word at different positions")
    rec = hooks.add(TokenMapRecorder([recs[0]], prompt_len=tok.model_max_length, layers="lowres"))
    den = ToyDenoiser(model, hooks=hooks).guided(captions, 1.0)
    ddim_invert(den, x0, sig)
    a = kmaps.normalize_max(rec.result())
    a = torch.nn.functional.interpolate(a[:, None], size=x0.shape[-2:], mode="bicubic", align_corners=False)
    return a.clamp(0, 1)


# ----------------------------------------------------------------------------- the toy rectified-flow model (--flow)

FLOW_ROWS = ("ode", "noise_maps", "rf_inversion", "flowedit", "ledits++", "ledits")
# FlowEdit's SD3 settings (RF §2.4: T 50, n_max 33, n_min 0, n_avg 1, CFG 3.5 / 13.5) scaled to the toy: the same
# T and n_max / T, source CFG 3.5 / 2.3 = 1.5 (the toy's CFG 3 against SD3's ~7); target CFG: a sweep on the trained
# model (3 / 4.5 / 6, the last the same scaling of 13.5) gave 83 % everywhere and background 33.4 / 31.3 / 29.2 dB,
# so the toy's own CFG 3.
FLOWEDIT_DEFAULTS = {"src_cfg": 1.5, "tar_cfg": 3.0, "n_max": 0.66, "n_avg": 1}


def _flow_edit_row(rows, name, out, recon, src, tgt, bg, scenes, tgt_scenes, **extra):
    """One table row, scored exactly as ``run``'s ``score_edit`` (edit None: a reconstruction-only row)."""
    from tools.toyworld import scorer

    row = {"method": name, "recon_psnr": float(psnr(recon, src).mean()) if recon is not None else None,
           "edit_success": None, "bg_psnr": float(psnr(out, src, bg).mean()),
           "edit_psnr_vs_truth": float(psnr(out, tgt).mean()), **extra}
    res = scorer.score_batch(out.clamp(-1, 1))
    ok = [r["fg"] == t.fg and r["shape"] == s.shape and r["bg"] == s.bg for r, s, t in zip(res, scenes, tgt_scenes)]
    row["edit_success"] = sum(ok) / len(ok)
    row["wrong"] = {"colour": sum(r["fg"] != t.fg for r, t in zip(res, tgt_scenes)),
                    "colour_kept": sum(r["fg"] == s.fg for r, s in zip(res, scenes)),
                    "shape": sum(r["shape"] != s.shape for r, s in zip(res, scenes)),
                    "background": sum(r["bg"] != s.bg for r, s in zip(res, scenes))}
    rows.append(row)
    return row


def flow_ledits(model, src_caps, scenes, tgt_scenes, ladder, zs, sig, skip, args, scale, mode="ledits++"):
    """LEDITS++ on the toy flow model (RF §4): replay the RF-ancestral noise maps with implicit-mask guidance.

    ``mode="sega"``: LEDITS (SEGA with momentum 0.3/0.6, as :func:`semantic_edit`) instead; its momentum
    lives in eps units (RF §4.1's choice), so the predictions are converted to ``eps = x + (1 - s) v``
    and the guided eps back to ``D = (x - s eps) / (1 - s)``: defined for replayed steps with ``s < 1``
    (``skip >= 1``).

    The Semantic Guide kernel (``kernels/sega.ledits_pp_guidance``) is driven with VELOCITY predictions:
    LEDITS++ has no momentum, so its combination ``e_u + sum psi_c M_c`` (+ the replay's own source CFG)
    is the same in eps-, v- and D-space (RF §4.1: the maps are affine in ``v`` at fixed ``(x, s)``, the
    ``|psi|`` quantile masks are scale-invariant), and v-space has no ``1/(1-s)`` at ``s = 1``.
    ``M1`` comes from the toy UNet's cross-attention (it is a UNet: ``kernels.attention``'s
    ``TokenMapRecorder`` on the 1/4-resolution layers, unchanged); diffusers' ``t <= 800``
    intersection switch is ``s <= 0.8`` (``timestep = 1000 s``, RF §4.2).  Concepts as ``semantic_edit``.
    """
    from photoops.kernels import flow_inversion as kfi
    from photoops.kernels import sega as ksega
    from tools.toyworld.flow import ToyFlowDenoiser

    tok = model.tokenizer
    if args.concepts == "words":
        old = [f"{s.fg} {s.shape}" for s in scenes]
        new = [f"{t.fg} {t.shape}" for t in tgt_scenes]
        positions = [1]
    else:
        old = [f"a {s.fg} {s.shape} on a {s.bg} background" for s in scenes]
        new = [f"a {t.fg} {t.shape} on a {t.bg} background" for t in tgt_scenes]
        positions = [2]
    for o, s in zip(old, scenes):
        assert tok(o)["input_ids"][positions[0]] == tok(s.fg)["input_ids"][1], (o, s.fg)
    saved = dict(model.unet.attn_processors)
    hooks = AttentionHooks()
    fd = ToyFlowDenoiser(model, hooks=hooks)
    c_old, c_new, cond = model.encode_prompts(old), model.encode_prompts(new), model.encode_prompts(src_caps)
    recs = [hooks.add(TokenMapRecorder(positions, tok.model_max_length, cond_index=2 + i, layers="lowres"))
            for i in range(2)]
    concepts = [ksega.EditConcept(scale=scale, reverse=True, threshold=args.edit_threshold, warmup=args.edit_warmup),
                ksega.EditConcept(scale=scale, threshold=args.edit_threshold, warmup=args.edit_warmup)]
    state = {"step": 0}
    sg = ksega.SemanticGuidance(concepts, momentum_scale=0.3, momentum_beta=0.6, mask_rule=args.mask_rule,
                                mask_mass=args.mask_mass)
    if mode == "sega" and not float(sig[skip]) < 1:
        raise ValueError("SEGA on flow works in eps units: it needs the replay to start below s = 1 (skip >= 1)")

    def guided(x, s):
        for r in recs:
            r.reset()
        s_f = float(torch.as_tensor(s).flatten()[0])
        v = fd.predict_v(x, s, [fd.uncond, cond, c_old, c_new], cond_ids=[0, 1, 2, 3])
        if mode == "sega":
            e = [x + (1 - s_f) * vk for vk in v]
            e_hat = sg.guide(e[0], e[1], e[2:], state["step"], args.src_cfg)
            state["step"] += 1
            return (x - s_f * e_hat) / (1 - s_f)
        v_hat = ksega.ledits_pp_guidance(v[0], v[2:], concepts, [r.result() for r in recs], state["step"],
                                         timestep=1000.0 * s_f, mask_rule=args.mask_rule, mask_mass=args.mask_mass)
        v_hat = v_hat + args.src_cfg * (v[1] - v[0])       # replay the inversion's own prediction (Rule 2)
        state["step"] += 1
        return x - s_f * v_hat

    n = len(sig) - 1
    try:
        return kfi.rf_ancestral_sample(guided, ladder[n - skip], sig[skip:], noises=zs, start=skip, eta=args.flow_eta)
    finally:
        model.unet.set_attn_processor(dict(saved))


def flow_run(args):
    """The flow rows on the 12-photo protocol (same photos, captions, scorer and masks as :func:`run`).

    Sigma list: the toy's linear flow list ``1 - i/N`` (shift 1, ``tools/toyworld/flow.py``), its final 0
    replaced by the model's ``sigma_min = 1/1000`` for the inversions (``kernels.schedule.invertible_sigmas``);
    FlowEdit samples to 0.  Source CFG ``--src-cfg`` (1) for inversion and reconstruction, target CFG ``--cfg`` (3)
    for the caption swaps; edits replay from ``skip = --skip * steps``.

    * flow ODE (Euler) inversion, caption swap by Euler sampling from its rung at ``skip``;
    * RF-ancestral noise-map inversion (``--flow-eta``, default 1), exact replay, caption swap on the maps;
    * RF-Inversion (gamma 0.5; reverse eta 0.9 on the first 38 % of the steps, the community docstring's
      example; no skip: it inverts to ``s = 1``), target caption;
    * FlowEdit (``FLOWEDIT_DEFAULTS``; no inversion: reconstruction is the identity by construction);
    * LEDITS++ on flow (:func:`flow_ledits`) on the noise maps; LEDITS (SEGA, ``mode="sega"``) likewise.
    """
    from photoops.kernels import flow_inversion as kfi
    from photoops.kernels.flowedit import flowedit_sample
    from photoops.kernels.schedule import invertible_sigmas
    from tools.toyworld import model as tm
    from tools.toyworld.flow import ToyFlowDenoiser, flow_sigmas, is_flow_model, sigma_min

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model = tm.load_model(args.model)
    if not is_flow_model(model):
        sys.exit(f"{args.model} is not a toy flow model (its scheduler is {type(model.scheduler).__name__})")
    scenes, tgt_scenes, src, tgt, bg = photos(args.n, args.seed, args.world)
    src_caps = [f"a {s.fg} {s.shape} on a {s.bg} background" for s in scenes]
    tgt_caps = [f"a {t.fg} {t.shape} on a {t.bg} background" for t in tgt_scenes]
    x0 = src.clone()
    fd = ToyFlowDenoiser(model)
    sig0 = flow_sigmas(args.steps)
    sig, _ = invertible_sigmas(sig0, sigma_min())
    n = len(sig) - 1
    skip = int(round(args.skip * args.steps))
    g_src, g_tgt = fd.guided(src_caps, args.src_cfg), fd.guided(tgt_caps, args.cfg)
    want = set(args.flow_only or FLOW_ROWS)
    rows = []
    t0 = time.perf_counter()

    def row(name, out, recon, **extra):
        return _flow_edit_row(rows, name, out, recon, src, tgt, bg, scenes, tgt_scenes, **extra)

    if "ode" in want:
        ladder, _ = kfi.euler_invert(g_src, x0, sig)
        recon = kfi.flow_euler_sample(g_src, ladder[n], sig)
        out = kfi.flow_euler_sample(g_tgt, ladder[n - skip], sig[skip:], start=skip)
        row(f"Flow ODE (Euler) inversion + caption swap (skip {skip})", out, recon)
    maps = None
    if want & {"noise_maps", "ledits++", "ledits"}:
        maps = kfi.rf_ancestral_invert(g_src, x0, sig, eta=args.flow_eta,
                                       generator=torch.Generator().manual_seed(args.seed))
    if "noise_maps" in want:
        x_start, zs, lad = maps
        recon = kfi.rf_ancestral_sample(g_src, x_start, sig, noises=zs, eta=args.flow_eta)
        rel = float((recon - x0).norm() / x0.norm())
        out = kfi.rf_ancestral_sample(g_tgt, lad[n - skip], sig[skip:], noises=zs, start=skip, eta=args.flow_eta)
        row(f"Flow noise maps (RF ancestral, eta {args.flow_eta:g}) + caption swap (skip {skip})", out, recon,
            replay_rel_err=rel)
    if "rf_inversion" in want:
        ladder = kfi.rf_inversion_invert(g_src, x0, sig, gamma=0.5, generator=torch.Generator().manual_seed(args.seed))
        etas = kfi.rf_eta_per_step(n, 0.9, 0.0, 0.38)
        recon = kfi.flow_euler_sample(g_src, ladder[n], sig, y0=x0, eta=etas)
        out = kfi.flow_euler_sample(g_tgt, ladder[n], sig, y0=x0, eta=etas)
        row("RF-Inversion (gamma 0.5; eta 0.9 on the first 38 % of steps) + target caption", out, recon)
    if "flowedit" in want:
        for frac in args.flowedit_nmax:
            n_max = int(round(frac * args.steps))
            for tar_cfg in args.flowedit_cfg:
                out = flowedit_sample(fd.guided(src_caps, args.flowedit_src_cfg), fd.guided(tgt_caps, tar_cfg), x0,
                                      sig0, n_max=n_max, n_min=0, n_avg=args.flowedit_navg,
                                      generator=torch.Generator().manual_seed(args.seed))
                row(f"FlowEdit (n_max {n_max} of {args.steps}, n_avg {args.flowedit_navg}, source CFG "
                    f"{args.flowedit_src_cfg:g}, target CFG {tar_cfg:g})", out, None)
    if "ledits++" in want:
        x_start, zs, lad = maps
        for scale in args.edit_scale:
            out = flow_ledits(model, src_caps, scenes, tgt_scenes, lad, zs, sig, skip, args, scale)
            row(f"LEDITS++ on flow (noise maps + cross-attention masks from the toy UNet), concepts as "
                f"{args.concepts}, scale {scale:g}, skip {skip}", out, None)
    if "ledits" in want:
        x_start, zs, lad = maps
        for scale in args.edit_scale:
            out = flow_ledits(model, src_caps, scenes, tgt_scenes, lad, zs, sig, skip, args, scale, mode="sega")
            row(f"LEDITS on flow (noise maps + SEGA, momentum 0.3/0.6 in eps units), concepts as {args.concepts}, "
                f"scale {scale:g}, skip {skip}", out, None)
    return rows, {"n": args.n, "steps": args.steps, "skip": skip, "cfg": args.cfg, "src_cfg": args.src_cfg,
                  "seconds": round(time.perf_counter() - t0, 1)}


def flow_main(a):
    rows, meta = flow_run(a)
    print(f"toy world {a.world}, rectified-flow model {a.model}: {meta['n']} photos, {meta['steps']} steps (linear "
          f"flow list), edit skip {meta['skip']}, target CFG {meta['cfg']}, source CFG {meta['src_cfg']}, "
          f"mask rule {a.mask_rule} ({meta['seconds']} s)")
    print("| method | reconstruction PSNR (dB) | edit success | background PSNR (dB) | PSNR vs true edit (dB) |")
    print("|---|---|---|---|---|")
    for r in rows:
        rp = "—" if r["recon_psnr"] is None else f"{r['recon_psnr']:.1f}"
        print(f"| {r['method']} | {rp} | {100 * r['edit_success']:.0f} % | {r['bg_psnr']:.1f} | "
              f"{r['edit_psnr_vs_truth']:.1f} |")
    for r in rows:
        extra = f", replay relative error {r['replay_rel_err']:.1e}" if "replay_rel_err" in r else ""
        print(f"failures of {r['method'][:40]}...: {r['wrong']}{extra}")
    if a.json:
        Path(a.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    assert all(math.isfinite(r["bg_psnr"]) for r in rows)


def build_parser():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world", choices=tuple("ABCDEFG"), default="A",
                    help="toy world: A (defaults are chosen here), B, C, D, E, F or G (other object sizes, their "
                         "own models)")
    ap.add_argument("--model", default=None, help="toy model folder (default: the world's model)")
    ap.add_argument("--n", type=int, default=12)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--skip", type=float, default=0.3, help="fraction of steps skipped when editing")
    ap.add_argument("--skip-rule", choices=("fixed", "swap"), default=None,
                    help="fixed: --skip; swap: skip rule S, the largest of 0.3 / 0.2 / 0.1 at which the plain "
                         "DDPM caption swap edits at least 11 of 12 photos (SKIP_LADDER). Default: swap with "
                         "--goals (kept on world D's test), fixed otherwise")
    ap.add_argument("--cfg", type=float, default=3.0, help="target CFG when editing")
    ap.add_argument("--src-cfg", type=float, default=1.0, help="source CFG during inversion and reconstruction")
    ap.add_argument("--seed", type=int, default=123)
    ap.add_argument("--edit-scale", type=float, nargs="+", default=[5.0, 10.0], help="SEGA / LEDITS++ concept scale(s)")
    ap.add_argument("--edit-threshold", type=float, default=0.9, help="SEGA / LEDITS++ threshold (percentile)")
    ap.add_argument("--edit-warmup", type=int, default=1, help="SEGA / LEDITS++ warm-up steps")
    ap.add_argument("--concepts", choices=("words", "captions"), default="captions",
                    help="concept prompts: '<colour> <shape>' or whole captions")
    ap.add_argument("--semantic-only", action="store_true", help="only the LEDITS / LEDITS++ rows (for sweeps)")
    ap.add_argument("--mask-rule", choices=("percentile", "otsu", "mass"), default="otsu",
                    help="SEGA / LEDITS++ mask rule (kernels.maps.keep_mask)")
    ap.add_argument("--mask-mass", type=float, default=0.5, help="mass fraction for --mask-rule mass")
    ap.add_argument("--lock", choices=("none", "concepts", "edit"), default="none",
                    help="background lock of the semantic (and, for 'edit', PtP) edits: from the concepts' own masks, "
                         "or from where the edit moved away from the photo (the edit lock), in one pass")
    ap.add_argument("--lock-start", type=float, nargs="+", default=[0.25],
                    help="edit lock: fraction of the replayed steps before it starts (--swap-only sweeps them)")
    ap.add_argument("--swap-only", action="store_true",
                    help="only the DDPM caption swap, with and without the edit lock")
    ap.add_argument("--lock-threshold", type=float, default=0.25, help="fraction of steps a concept acted")
    ap.add_argument("--masks", choices=("intersect", "cross_attention", "noise"), default="intersect",
                    help="the Semantic Guide's masks input: LEDITS++'s guidance masks; for LEDITS (SEGA) only the "
                         "region reported to the lock (noise = SEGA's own per-channel masks, the old behaviour)")
    ap.add_argument("--lock-feather", type=float, default=0.0, help="lock edge softness, image pixels")
    ap.add_argument("--goals", action="store_true",
                    help="issues 17 / 18: each method once, at its setting chosen on world A (GOAL_PICKS), with "
                         "its goal")
    ap.add_argument("--ptp-only", action="store_true", help="only the Prompt-to-Prompt rows (Eta/DDIM/DDPM + PtP)")
    ap.add_argument("--ptp-eta-only", action="store_true", help="with --ptp-only: only the Eta + PtP row (sweeps)")
    ap.add_argument("--ptp-mode", choices=kptp.MODES, default=None, help="PtP edit (default: PTP_DEFAULTS)")
    ap.add_argument("--ptp-cross", type=float, default=None, help="PtP cross-attention step fraction")
    ap.add_argument("--ptp-self", type=float, default=None, help="PtP self-attention step fraction")
    ap.add_argument("--ptp-reweight", type=float, default=None, help="PtP reweight of the target colour word")
    ap.add_argument("--ptp-cfg", type=float, default=None,
                    help="target CFG of the PtP rows and of Eta alone beside them (default: PTP_DEFAULTS)")
    ap.add_argument("--ptp-blend", type=float, default=None, help="PtP local blend threshold (0 = off)")
    ap.add_argument("--ptp-blend-start", type=float, default=None, help="PtP local blend start fraction")
    ap.add_argument("--ptp-blend-rule", choices=kptp.LocalBlend.RULES, default=None,
                    help="PtP local blend mask: threshold (the paper's, --ptp-blend of the max) or otsu")
    ap.add_argument("--ptp-eta", choices=list(keta.PRESETS), default=None, help="eta preset for the Eta rows")
    ap.add_argument("--ptp-noise", choices=["editing", "inversion"], default="editing",
                    help="Eta + PtP: choose Eta's noise during the edit at the editing CFG (the node's default, the "
                         "reference's) or replay the noise chosen at inversion (source CFG)")
    ap.add_argument("--ptp-region", default=None, help="Eta region: none, a threshold (0.2) or qQ (quantile Q)")
    ap.add_argument("--flow", action="store_true",
                    help="the toy rectified-flow model's rows (flow inversions, FlowEdit, LEDITS++ on flow)")
    ap.add_argument("--flow-only", nargs="+", default=None, choices=FLOW_ROWS,
                    help="with --flow: only these rows (sweeps)")
    ap.add_argument("--flow-eta", type=float, default=1.0, help="RF ancestral eta of the noise-map inversion")
    ap.add_argument("--flowedit-src-cfg", type=float, default=FLOWEDIT_DEFAULTS["src_cfg"],
                    help="FlowEdit source CFG")
    ap.add_argument("--flowedit-cfg", type=float, nargs="+", default=[FLOWEDIT_DEFAULTS["tar_cfg"]],
                    help="FlowEdit target CFG(s)")
    ap.add_argument("--flowedit-nmax", type=float, nargs="+", default=[FLOWEDIT_DEFAULTS["n_max"]],
                    help="FlowEdit n_max as a fraction of the steps (SD3: 33 of 50)")
    ap.add_argument("--flowedit-navg", type=int, default=FLOWEDIT_DEFAULTS["n_avg"], help="FlowEdit n_avg")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="also write the table here")
    ap.add_argument("--dump", default=None, help="write a PNG grid per method here (photos, true edits, results)")
    return ap


def default_model(a):
    """The world's toy model folder unless ``--model`` names one (exits if it is missing); the skip rule: S with
    ``--goals`` (kept on world D, see SKIP_LADDER), else the fixed ``--skip``, unless ``--skip-rule`` names one."""
    if a.skip_rule is None:
        a.skip_rule = "swap" if a.goals and not a.flow else "fixed"
    if a.model is None:
        if a.flow:
            if a.world != "A":
                sys.exit("--flow: there is a toy flow model for world A only (tools/toyworld/model_flow)")
            a.model = str(ROOT / "tools" / "toyworld" / "model_flow")
        else:
            a.model = str(ROOT / "tools" / "toyworld" / {"A": "model", "B": "model_b", "C": "model_c",
                                                              "D": "model_d", "E": "model_e",
                                                              "F": "model_f", "G": "model_g"}[a.world])
    if not Path(a.model).is_dir():
        sys.exit(f"no toy model at {a.model}: train it (tools/toyworld/README.md) or pass --model")
    return a


def main(argv=None):
    a = default_model(build_parser().parse_args(argv))
    if a.flow:
        if a.goals:
            sys.exit("--goals: the goals are for the UNet toy models (worlds A to F), not --flow")
        if a.skip_rule != "fixed":
            sys.exit("--skip-rule swap: for the UNet toy models, not --flow")
        return flow_main(a)
    rows, meta = run(a)
    print(f"toy world {a.world}: {meta['n']} photos, {meta['steps']} steps, edit skip {meta['skip']}, target CFG "
          f"{meta['cfg']}, source CFG {meta['src_cfg']}, mask rule {a.mask_rule}"
          f"{f' (mass {a.mask_mass:g})' if a.mask_rule == 'mass' else ''}, masks {a.masks}, lock {a.lock}"
          f"{f' (threshold {a.lock_threshold:g}, feather {a.lock_feather:g})' if a.lock == 'concepts' else ''}"
          f"{f' (from {a.lock_start[0]:g} of the steps)' if a.lock == 'edit' else ''} "
          f"({meta['seconds']} s)")
    if meta["skip_tried"]:
        print("skip rule S (the plain caption swap's edits of the photos at each skip tried): "
              + ", ".join(f"{f:g}: {k} of {meta['n']}" for f, k in meta["skip_tried"]) + f"; skip {a.skip:g}")
    if a.goals:
        print("(--goals: each row at its own setting, chosen on world A: rule 1 (GOAL_PICKS) and rule 2 (its "
              f"changes in GOAL_COMPARE), {ADOPTED_RULE}'s picks adopted on world E; the Eta + PtP candidates: rule P "
              f"(on A, rejected on E) and rule B (on world B), rule {ADOPTED_PTP_RULE}'s adopted on world G; the line "
              "above names the rest)")
    print("| method | reconstruction PSNR (dB) | edit success | background PSNR (dB) | PSNR vs true edit (dB) |"
          + (" goal |" if a.goals else ""))
    print("|---|---|---|---|---|" + ("---|" if a.goals else ""))
    for r in rows:
        rp = "—" if r["recon_psnr"] is None else f"{r['recon_psnr']:.1f}"
        extra = f" (mask {100 * r['mask_fraction']:.0f} % of pixels)" if "mask_fraction" in r else ""
        es = "—" if r["edit_success"] is None else f"{100 * r['edit_success']:.0f} %"
        goal = ("" if "goal" not in r else
                f" goal >= {r['goal'][0]}/12 at >= {r['goal'][1]:g} dB: {'met' if r['met'] else 'NOT met'} |")
        print(f"| {r['method']}{extra} | {rp} | {es} | {r['bg_psnr']:.1f} | "
              f"{r['edit_psnr_vs_truth']:.1f} |{goal}")
    if a.ptp_only:
        for r in rows:
            print(f"failures of {r['method'][:24]}...: {r['wrong']}")
    for r in rows if a.goals else ():
        if r.get("candidate"):
            pick = next(p for p in rows if p["pick"] and p["goal_method"] == r["goal_method"])
            _, _, test_worlds, before = next(c for c in GOAL_CANDIDATES if c[0] == r["candidate"])
            print(f"{r['goal_method']}: rule {r['candidate']}'s row "
                  + ("loses nothing" if rule2_loses_nothing(pick, r, "ptp") else "LOSES an edit or the goal")
                  + f" against rule 1's (the test stated before world {before}, decided on {test_worlds} together"
                  + ("" if a.world in test_worlds.replace(" and", ",").split(", ") else "; not one of them") + ")"
                  + f": {round(12 * r['edit_success'])} against {round(12 * pick['edit_success'])} of 12 edits "
                  f"right, goal {'met' if r['met'] else 'not met'} against {'met' if pick['met'] else 'not met'}")
        elif not r["pick"]:
            pick = next(p for p in rows if p["pick"] and p["goal_method"] == r["goal_method"])
            m, se, closer, k = paired_gap(pick, r)
            kind = next(p["kind"] for b, p in GOAL_COMPARE if b == r["goal_method"])
            verdict = (f"rule 2 {'takes the edit lock' if rule2_takes_lock(pick, r, kind) else 'keeps the pick'}"
                       if a.world == "A" else "rule 2 is decided on world A; its lock row "
                       + ("loses nothing" if rule2_loses_nothing(pick, r, kind) else "LOSES an edit or the goal")
                       + " against rule 1's (the test stated before world E"
                       + ("" if a.world == "E" else "; decided there, shown for the record") + ")")
            print(f"{r['goal_method']}: rule 1's pick minus the edit-lock row, PSNR vs the true edit paired over the "
                  f"photos: {m:+.2f} dB (standard error {se:.2f}); the pick is closer on {closer} of {k}: {verdict}")
    for rule, key in (("rule 1's picks", "pick"), (f"the adopted picks ({ADOPTED_RULE}'s; Eta + PtP: rule "
                                                   f"{ADOPTED_PTP_RULE}'s)", "pick2")) if a.goals else ():
        picked = [r for r in rows if r[key]]
        print(f"{rule} on world {a.world}: goal met by "
              f"{sum(r['met'] for r in picked)} of {len(picked)} "
              f"methods ({', '.join(r['goal_method'] for r in picked if not r['met']) or 'all'} "
              f"{'not met' if not all(r['met'] for r in picked) else 'met'})")
    if a.json:
        Path(a.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    assert all(math.isfinite(r["bg_psnr"]) for r in rows)


if __name__ == "__main__":
    main()
