"""SemanticGuide: SEGA / LEDITS++ guidance as a GUIDER for core SamplerCustomAdvanced.

LEDITS = Invert (ddpm) + Inversion Sampler + this guider in ``sega`` mode;
LEDITS++ = the same in ``ledits++`` mode (implicit masks from cross-attention and the noise
estimate, no momentum).  All conditionings — target (only when its CFG is on), negative, and
every concept, in core's order — are evaluated in one batched model call per step.  The maths is in ``kernels/sega.py``; this
file only converts between ComfyUI's denoised predictions and eps (spec §2.4:
``eps = (x - D) / sigma``, ``D_hat = x - sigma * e_hat``; momentum lives in eps units).

Rectified-flow models (SD3 / SD3.5 / Flux; spec ``rectified-flow.md`` §4): the combination runs on the
denoised predictions ``D`` themselves (exactly the eps-space result without momentum, §4.1), with the
momentum kept in eps units (``unit = -(1-s)/s``, kernels ``sega.py`` (S6')-(S7')).  LEDITS++ masks come
from the joint-attention capture of each concept's branch, over every SD3 joint block / Flux double
block (§3.4 default); the intersection switch ``t <= 800`` becomes ``s <= 0.8``.  Flux-dev is
guidance-distilled: option (A) of §4.2, conditional differences — every branch is conditional with the
same guidance embed (the negative's FluxGuidance value is given to the concepts), the "negative" is the
empty / source prompt, and the target prompt, if used, enters with ``cfg = 1`` (its embed steers it).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from comfy_api.latest import io

from ..kernels import maps as kmaps
from ..kernels import sega as ksega
from ..kernels.attention import AttentionHooks, TokenMapRecorder
from .attention_mask import VAE_FACTOR
from .checks import first_error, given
from .comfy.attention import attach_attention_hooks
from .comfy.flow import family, is_flow
from .comfy.flow_attention import attach_joint_capture, flow_word_positions, joint_layers, make_recorder
from .comfy.models import ensure_supported, vp_schedule
from .comfy.sampling import CombineGuider
from .comfy.text import count_prompt_tokens, encode_text
from .inversion import replay_steps

CONCEPTS = io.Custom("PHOTOOPS_EDIT_CONCEPTS")
MASKS = io.Custom("PHOTOOPS_CONCEPT_MASKS")


#: Per concept, the running mean over steps of where its guidance was applied (the masks output).
MaskStore = kmaps.StepMasks


@dataclass
class ConceptInput:
    text: str
    conditioning: list
    n_tokens: int
    concept: ksega.EditConcept
    flow_positions: dict | None = None   # text-key positions in an SD3 / Flux context (flow_word_positions)


class EditConceptNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PhotoOps_EditConcept",
            display_name="Edit Concept",
            category="PhotoOps/editing",
            description="One SEGA / LEDITS edit concept (e.g. 'glasses' to add, 'red' to remove). Chain several "
                        "through 'previous'.",
            inputs=[
                io.Clip.Input("clip", tooltip="The CLIP of your model; encodes the concept."),
                io.String.Input("text", default="", tooltip="The concept, a few words (e.g. 'blue circle')."),
                io.Combo.Input("direction", options=["add", "remove"], default="add",
                               tooltip="add: steer toward the concept; remove: away from it (SEGA reverse)."),
                io.Float.Input("scale", default=5.0, min=0.0, max=50.0, step=0.1,
                               tooltip="Edit guidance scale s_e (SEGA default 5; LEDITS paper 7; LEDITS++ 5-10)."),
                io.Float.Input("threshold", default=0.9, min=0.0, max=0.999, step=0.005,
                               tooltip="Keep the strongest (1 - threshold) of the guidance per channel "
                                       "(SEGA 0.9, LEDITS 0.95, LEDITS++ 0.9); higher = more local edit. Read "
                                       "only when the Semantic Guide's mask_rule is percentile (the papers' rule): "
                                       "otsu (the default) and mass size the mask from the map itself."),
                io.Int.Input("warmup", default=0, min=0, max=1000,
                             tooltip="Steps before the concept is applied, counted from the first step that "
                                     "runs (after an inversion's skip). LEDITS paper: 1; SEGA: 10."),
                io.Int.Input("cooldown", default=-1, min=-1, max=1000,
                             tooltip="Step from which the concept stops (-1 = never)."),
                io.Float.Input("weight", default=1.0, min=0.0, max=10.0, step=0.05,
                               tooltip="Relative weight among concepts (SEGA edit_weights)."),
                CONCEPTS.Input("previous", optional=True, tooltip="Concepts defined before this one."),
            ],
            outputs=[CONCEPTS.Output(display_name="concepts", tooltip="Connect to Semantic Guide or the next concept.")],
        )

    @classmethod
    def validate_inputs(cls, text=None, scale=None, threshold=None, warmup=None):
        def concept():
            if given(scale, threshold, warmup):
                ksega.EditConcept(scale=scale, threshold=threshold, warmup=warmup)

        def words():
            if text is not None and not str(text).strip():
                raise ValueError("the concept text is empty; give a word or two")

        return first_error(words, concept)

    @classmethod
    def execute(cls, clip, text, direction, scale, threshold, warmup, cooldown, weight,
                previous=None) -> io.NodeOutput:
        n_tok = count_prompt_tokens(clip, text) if text.strip() else 0
        if n_tok == 0:
            raise ValueError(f"the concept text {text!r} tokenizes to nothing; give a word or two")
        concept = ksega.EditConcept(scale=scale, reverse=direction == "remove", threshold=threshold,
                                    warmup=warmup, cooldown=None if cooldown < 0 else cooldown, weight=weight)
        where = flow_word_positions(clip, text, text) if "t5xxl" in clip.tokenize(text) else None
        item = ConceptInput(text, encode_text(clip, text), n_tok, concept, where)
        return io.NodeOutput(list(previous or []) + [item])


DEFAULT_MASK_RULE = "otsu"      # chosen on toy world A (README, Edit quality); the papers use percentile


def build_guider(model, positive, negative, concepts, cfg, mode, momentum_scale, momentum_beta, use_target,
                 mask_mode="intersect", mask_rule=DEFAULT_MASK_RULE, mask_mass=0.5):
    """The CombineGuider for ``mode`` in {"sega", "ledits++"} (see the module docstring)."""
    flow = is_flow(model)
    if flow:
        joint_layers(model)                      # SD3 / SD3.5 / Flux only; names the family otherwise
    else:
        ensure_supported(model)
    concepts = list(concepts or [])
    distilled = flow and _guidance_distilled(model)
    if distilled and use_target and cfg != 1.0:
        raise ValueError(f"{family(model)} is guidance-distilled (no trained unconditional branch): Semantic Guide "
                         f"uses conditional differences (spec option A), so set cfg to 1 (the target prompt's "
                         f"FluxGuidance embed steers it) or turn use_target off; cfg is {cfg}")
    kcs = [c.concept for c in concepts]
    # core's order (CFGGuider, PerpNegGuider): positive, negative, then the concepts; no positive row
    # when the target CFG is off (it would only cost UNet batch)
    order = (["positive"] if use_target else []) + ["negative"] + [f"concept{i}" for i in range(len(concepts))]
    i_pos, i_neg, i_c0 = (0, 1, 2) if use_target else (None, 0, 1)
    conds = {"negative": negative, **({"positive": positive} if use_target else {})}
    conds.update({f"concept{i}": c.conditioning for i, c in enumerate(concepts)})
    if distilled:   # option (A): every branch with the negative's guidance embed
        g = _guidance_of(negative)
        conds.update({f"concept{i}": [[t, {**d, "guidance": g}] for t, d in c.conditioning]
                      for i, c in enumerate(concepts)})
    recorders = []
    patched = model
    # masks from the concepts' attention: LEDITS++ gates its guidance with them; SEGA (which acts on
    # every pixel's strongest channels) only reports them, as its masks output and a background lock's
    # region [ours, issue 17]
    if flow and concepts and mask_mode != "noise":
        for i, c in enumerate(concepts):                       # spec §3.4: the concept's tokens, double blocks
            if c.flow_positions is None:
                raise ValueError(f"concept {i} ({c.text!r}) was encoded with a CLIP without an SD3 / Flux tokenizer: "
                                 f"use this model's text encoder in Edit Concept")
            recorders.append(make_recorder(c.flow_positions, cond_index=i_c0 + i, layers=("double",)))
        patched = attach_joint_capture(model, recorders)
    elif concepts and mask_mode != "noise":
        hooks = AttentionHooks()
        for i, c in enumerate(concepts):                       # spec §4.4 step 3: tokens 1..n_tok, 1/4-size layers
            recorders.append(hooks.add(TokenMapRecorder(list(range(1, c.n_tokens + 1)), prompt_len=77,
                                                        cond_index=i_c0 + i, layers="lowres")))
        patched = attach_attention_hooks(model, hooks)
    sega = ksega.SemanticGuidance(kcs, momentum_scale=momentum_scale, momentum_beta=momentum_beta,
                                  mask_rule=mask_rule, mask_mass=mask_mass)
    schedule = None if flow else vp_schedule(model)
    store = MaskStore(len(concepts))

    def on_run_start(sigmas, sampler=None):
        # a warm-up beyond the steps that run (after an Inversion Sampler's skip) would never apply
        ksega.check_steps(kcs, *replay_steps(sampler, sigmas))
        sega.reset()
        store.reset()
        for r in recorders:
            r.reset()

    def ledits_pp(base, preds, step, timestep):
        """LEDITS++'s guided prediction and its masks ``[K, B, h, w]`` at this step (recorders reset).
        SEGA uses only the masks: the region it reports."""
        maps = [r.result() for r in recorders] if recorders else None
        guided, masks = ksega.ledits_pp_guidance(base, preds, kcs, maps, step, timestep=timestep,
                                                 use_intersect=mask_mode == "intersect",
                                                 use_cross_attn=mask_mode in ("intersect", "cross_attention"),
                                                 return_masks=True, mask_rule=mask_rule, mask_mass=mask_mass)
        for r in recorders:
            r.reset()
        return guided, masks.amax(2)

    def sega_masks(base, preds, step, timestep):
        """``[K, B, h, w]``: the region SEGA reports (masks output, background lock): the ``masks`` input's
        (LEDITS++'s, when attention is recorded), else where each applied concept's own per-channel mask
        keeps guidance (any channel)."""
        if recorders:
            return ledits_pp(base, preds, step, timestep)[1]
        return torch.stack([ksega.percentile_mask(ksega.concept_direction(p, base, c), c.threshold, mask_rule,
                                                  mask_mass).any(1)
                            & torch.tensor(c.warm(step) and not c.cooled(step), device=base.device)
                            for c, p in zip(kcs, preds)])

    def combine_flow(x_in, sigma, outs, step, cfg_denoised=None):
        # [ours] spec §4.1: the combination on D (= the eps-space result without momentum), float64 for the
        # concept terms; momentum in eps units through ``unit``; the target-CFG part as core's cfg_function
        s = float(sigma.flatten()[0])
        ds = [d.double() for d in outs]
        d_u = outs[i_neg]
        d_cfg = d_u + (outs[i_pos] - d_u) * cfg if use_target else d_u
        if cfg_denoised is not None:
            d_cfg = cfg_denoised
        if mode == "sega":
            unit = -(1.0 - s) / s if s > 0 else 0.0          # eps difference per D difference (§4.1)
            sega.guide(ds[i_neg], ds[i_pos] if use_target else None, ds[i_c0:], step, cfg, unit=unit)
            semantic = sega.last_guidance
            if kcs:
                store.add(sega_masks(ds[i_neg], ds[i_c0:], step, 1000.0 * s))
        else:
            d_pp, masks = ledits_pp(ds[i_neg], ds[i_c0:], step, 1000.0 * s)
            semantic = d_pp - ds[i_neg]
            if kcs:
                store.add(masks)
        return (d_cfg + semantic.to(d_cfg.dtype)).nan_to_num()

    def combine(x_in, sigma, outs, step, cfg_denoised=None):
        # [ours] eps (§2.4) in float64 for the concept terms; the target CFG part is assembled in
        # denoised space exactly as core's cfg_function does (uncond + (cond - uncond) * cfg), so
        # concepts that do not act leave core CFG's result bit for bit (the tiny test UNet turns a
        # one-ulp difference into 1e-5 over a replay)
        x = x_in.double()
        s = sigma.reshape(-1, *([1] * (x.ndim - 1))).to(x.device, torch.float64)
        eps = [(x - d.double()) / s for d in outs]                      # §2.4
        e_u, e_t, e_cs = eps[i_neg], (eps[i_pos] if use_target else None), eps[i_c0:]
        d_u = outs[i_neg]
        d_cfg = d_u + (outs[i_pos] - d_u) * cfg if use_target else d_u
        if cfg_denoised is not None:                  # the MODEL's own CFG rule (PerpNeg, RescaleCFG, ...)
            d_cfg = cfg_denoised
        if mode == "sega":
            e_hat = sega.guide(e_u, e_t, e_cs, step, cfg)
            if sega.require_cfg_for_sega and cfg <= 1:      # the reference's no-CFG branch: e_t (or e_u)
                for r in recorders:                           # nothing reported: this step's maps are dropped
                    r.reset()
                return (x - s * e_hat).to(x_in.dtype).nan_to_num()
            semantic = sega.last_guidance                                   # (S9): e_hat = e_u + g_p + this
            if kcs:
                store.add(sega_masks(e_u, e_cs, step, float(schedule.timestep(sigma[0]))))
        else:
            e_pp, masks = ledits_pp(e_u, e_cs, step, float(schedule.timestep(sigma[0])))
            semantic = e_pp - e_u                                           # the masked concept guidance
            if kcs:
                store.add(masks)
        out = d_cfg - (s * semantic).to(d_cfg.dtype)
        return out.nan_to_num()                                        # guard: zero-norm guidance, 0/0

    guider = CombineGuider(patched, conds, order, combine_flow if flow else combine, cfg, on_run_start=on_run_start,
                           uncond_key="negative", cond_key="positive" if use_target else None)
    guider.photoops_masks = store
    return guider, recorders


def _guidance_distilled(model) -> bool:
    """Flux-dev style: the DiT has a guidance embed (FluxGuidance) and no trained unconditional branch."""
    return bool(getattr(getattr(model.get_model_object("diffusion_model"), "params", None), "guidance_embed", False))


def _guidance_of(conditioning, default: float = 3.5) -> float:
    """The FluxGuidance value of a CONDITIONING (ComfyUI's Flux default 3.5 when it has none)."""
    g = conditioning[0][1].get("guidance") if conditioning else None
    return default if g is None else float(g)


class SemanticGuideNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PhotoOps_SemanticGuide",
            display_name="Semantic Guide",
            category="PhotoOps/editing",
            description="SEGA semantic guidance (sega) or LEDITS++ masked guidance (ledits++) as a GUIDER for "
                        "SamplerCustomAdvanced. With Invert + Inversion Sampler it edits a real photo (LEDITS / "
                        "LEDITS++); with a normal sampler it edits generations.",
            inputs=[
                io.Model.Input("model", tooltip="SD1.x / SD2.x / SDXL, SD3 / SD3.5 or Flux model (cloned, never "
                                                "changed). Flux-dev: cfg 1 (conditional differences)."),
                io.Conditioning.Input("positive", tooltip="Target prompt (for LEDITS: often the source prompt or empty)."),
                io.Conditioning.Input("negative", tooltip="Unconditional / negative prompt (empty for LEDITS)."),
                CONCEPTS.Input("concepts", tooltip="From Edit Concept (chain several)."),
                io.Combo.Input("mode", options=["sega", "ledits++"], default="sega",
                               tooltip="sega: SEGA with momentum (LEDITS = DDPM inversion + sega). ledits++: "
                                       "implicit masks, no momentum."),
                io.Float.Input("cfg", default=7.5, min=0.0, max=30.0, step=0.1,
                               tooltip="Target-prompt CFG w (SEGA 7.5, LEDITS paper 15). Used in ledits++ only if "
                                       "use_target is on."),
                io.Boolean.Input("use_target", default=True,
                                 tooltip="Apply target-prompt CFG. Off = pure concept editing (LEDITS with an empty "
                                         "target; LEDITS++ default)."),
                io.Float.Input("momentum_scale", default=0.3, min=0.0, max=1.0, step=0.01,
                               tooltip="sega: momentum scale s_m (LEDITS demo 0.3, SEGA 0.1; 0 = off)."),
                io.Float.Input("momentum_beta", default=0.6, min=0.0, max=0.999, step=0.01,
                               tooltip="sega: momentum beta (LEDITS demo 0.6, SEGA 0.4)."),
                io.Combo.Input("masks", options=["intersect", "cross_attention", "noise"], default="intersect",
                               tooltip="ledits++: where guidance acts: cross-attention mask AND noise-estimate "
                                       "mask (default), cross-attention only, or noise-estimate only. sega (which "
                                       "acts on each channel's strongest values anywhere): the region the masks "
                                       "output and an Inversion Sampler's background lock use; noise = SEGA's own "
                                       "per-channel masks."),
                io.Combo.Input("mask_rule", options=list(kmaps.MASK_RULES), default=DEFAULT_MASK_RULE,
                               tooltip="How a mask keeps pixels. percentile: the papers' rule, always the top "
                                       "(1 - threshold) of the image, whatever the object's size. otsu: a threshold "
                                       "from the map's own histogram (follows the object's size). mass: the fewest "
                                       "pixels holding mask_mass of the map's total."),
                io.Float.Input("mask_mass", default=0.5, min=0.05, max=1.0, step=0.05,
                               tooltip="mask_rule mass: the fraction of the map's total the kept pixels hold."),
            ],
            outputs=[io.Guider.Output(display_name="GUIDER", tooltip="Connect to SamplerCustomAdvanced."),
                     MASKS.Output(display_name="masks", tooltip="Where each concept acted; read with Concept Masks "
                                                                "after sampling.")],
        )

    @classmethod
    def execute(cls, model, positive, negative, concepts, mode, cfg, use_target, momentum_scale, momentum_beta,
                masks, mask_rule=DEFAULT_MASK_RULE, mask_mass=0.5) -> io.NodeOutput:
        guider, _ = build_guider(model, positive, negative, concepts, cfg, mode, momentum_scale, momentum_beta,
                                 use_target, masks, mask_rule, mask_mass)
        return io.NodeOutput(guider, guider.photoops_masks)


class ConceptMasksNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PhotoOps_ConceptMasks",
            display_name="Concept Masks",
            category="PhotoOps/editing",
            description="After sampling with a Semantic Guide: where one concept's guidance acted, as the fraction "
                        "of steps per pixel (a soft MASK) and a heat map.",
            inputs=[
                MASKS.Input("masks", tooltip="From Semantic Guide."),
                io.Latent.Input("samples", tooltip="The sampler's output LATENT (runs this node after sampling)."),
                io.Int.Input("concept", default=0, min=0, max=63, tooltip="Which concept (0 = the first in the chain)."),
            ],
            outputs=[io.Mask.Output(display_name="mask", tooltip="Fraction of steps the concept acted, image size."),
                     io.Image.Output(display_name="heatmap", tooltip="The same as a heat map.")],
        )

    @classmethod
    def execute(cls, masks, samples, concept) -> io.NodeOutput:
        m = masks.mean(concept)
        hw = samples["samples"].shape[-2:]
        m = kmaps.resize_map(m, (hw[0] * VAE_FACTOR, hw[1] * VAE_FACTOR), mode="nearest")
        return io.NodeOutput(m.clamp(0, 1), kmaps.heatmap(m))


NODES = [EditConceptNode, SemanticGuideNode, ConceptMasksNode]
