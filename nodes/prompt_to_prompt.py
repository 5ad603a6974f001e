"""Prompt-to-Prompt Guide: Prompt-to-Prompt attention control (Hertz et al. 2022) over any inversion.

Eta Inversion as the paper runs it = Invert (``eta``, region from the source word's Attention Capture)
+ Inversion Sampler + this GUIDER in core SamplerCustomAdvanced; the same guide over a ``ddim`` or
``ddpm`` inversion gives the paper's DDIM+PtP and DDPM+PtP baselines.  The maths is in
``kernels/prompt_to_prompt.py``; the batching, the source anchoring and the noise sharing are in
``nodes/comfy/prompt_to_prompt.py``.  Local blend goes through the Inversion Sampler's background
lock: connect ``blend`` to its ``concept_masks`` (feather 0 = the paper's hard blend).

Choices where the papers are silent [ours]: the source branch is anchored to the inversion for every
inversion method (Eta spec §3 step 8; for DDIM this is Direct-Inversion-style anchoring); Eta
Inversion's noise is chosen during the edit from the anchored source at this guide's CFG, as the
reference does (``noise_selection="editing"``), or is the one Invert chose at its ``source_cfg``
(``"inversion"``; the two agree when the CFGs are equal); both branches share it; step ranges count the steps that run
(after Invert's skip); blend and reweight words are comma-separated and located with the CLIP tokenizer.
"""
from __future__ import annotations

from comfy_api.latest import io

from ..kernels import prompt_to_prompt as kptp
from .checks import first_error, refuse_flow
from .comfy.models import ensure_supported
from .comfy.prompt_to_prompt import NOISE_SELECTION, PromptToPromptGuider, attach_control, prompt_tokens, word_positions
from .comfy.text import encode_text
from .semantic_guide import MASKS


def _words(text):
    return [w.strip() for w in (text or "").split(",") if w.strip()]


def _check_numbers(cross_replace=None, self_replace=None, blend_threshold=None, blend_start=None,
                   blend_source_words=None, blend_target_words=None):
    for name, v in (("cross_replace", cross_replace), ("self_replace", self_replace), ("blend_start", blend_start)):
        if v is not None and not 0.0 <= v <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {v}")
    if blend_threshold is not None and not 0.0 <= blend_threshold < 1.0:
        raise ValueError(f"blend_threshold must be in [0, 1), got {blend_threshold}")
    if blend_source_words is not None and blend_target_words is not None and \
            bool(_words(blend_source_words)) != bool(_words(blend_target_words)):
        raise ValueError("local blend needs words in both blend_source_words and blend_target_words (or neither)")


def build_control(clip, source_prompt, target_prompt, mode, cross_replace, self_replace, reweight_words,
                  reweight_value, blend_source_words, blend_target_words, blend_threshold, blend_start,
                  blend_rule="threshold"):
    """The kernel control for the prompts; every error is raised here, before any model is touched."""
    _check_numbers(cross_replace, self_replace, blend_threshold, blend_start, blend_source_words, blend_target_words)
    src = prompt_tokens(clip, source_prompt, "source")
    tgt = prompt_tokens(clip, target_prompt, "target")
    if src["chunks"] != 1 or tgt["chunks"] != 1:
        raise kptp.PromptToPromptError(
            f"Prompt-to-Prompt aligns tokens inside one 77-token chunk; the source prompt takes {src['chunks']} "
            f"and the target {tgt['chunks']} chunks")
    T = tgt["context"]
    if mode == "replace":
        mapper = kptp.replacement_mapper(src["words"], tgt["words"], T, source_prompt.split(), target_prompt.split())
        if sum(len(w) for w in src["words"]) + 2 != len(src["ids"]) or \
                sum(len(w) for w in tgt["words"]) + 2 != len(tgt["ids"]):
            raise kptp.PromptToPromptError("replace needs plain prompts (words tokenized on their own must give the "
                                           "prompt's tokens: no weights, embeddings or punctuation syntax)")
    else:
        mapper = kptp.refinement_mapper(src["ids"], tgt["ids"], T)
    eq = None
    if _words(reweight_words):
        pos = word_positions(clip, target_prompt, reweight_words, "reweight (a word of the target prompt)")
        eq = kptp.equalizer(T, pos, [reweight_value] * len(pos))
    blend = None
    if _words(blend_source_words):
        ps = word_positions(clip, source_prompt, blend_source_words, "blend_source_words")
        pt = word_positions(clip, target_prompt, blend_target_words, "blend_target_words")
        blend = kptp.LocalBlend([p for x in ps for p in x], [p for x in pt for p in x], blend_threshold, blend_start,
                                blend_rule)
    # source and target rows are distinct conditionings: indices in the guider's order (target, negative, source)
    return kptp.PromptToPromptControl(mode, mapper, T, equalizer=eq, cross_steps=(0.0, cross_replace),
                                      self_steps=(0.0, self_replace), blend=blend, source_index=2, target_index=0)


class PromptToPromptGuideNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PhotoOps_PromptToPromptGuide",
            display_name="Prompt-to-Prompt Guide",
            category="PhotoOps/editing",
            description="Prompt-to-Prompt editing of an inverted photo as a GUIDER for SamplerCustomAdvanced with "
                        "the Inversion Sampler: the source prompt's attention is injected into the target prompt's "
                        "(replace / refine / reweight, self-attention early on, local blend). With an eta inversion "
                        "this is Eta Inversion as the paper runs it.",
            inputs=[
                io.Model.Input("model", tooltip="SD1.x / SD2.x / SDXL model (cloned, never changed)."),
                io.Clip.Input("clip", tooltip="The model's CLIP: encodes both prompts and aligns their tokens."),
                io.String.Input("source_prompt", multiline=True, default="",
                                tooltip="The prompt describing the photo (as given to Invert)."),
                io.String.Input("target_prompt", multiline=True, default="",
                                tooltip="The edited prompt, e.g. the source with one word swapped (replace) or words "
                                        "added (refine)."),
                io.Conditioning.Input("negative", tooltip="Negative / unconditional prompt (usually empty)."),
                io.Float.Input("cfg", default=7.5, min=0.0, max=30.0, step=0.1,
                               tooltip="CFG of both branches (paper 7.5); with noise_selection 'editing' also the CFG "
                                       "the eta noise is chosen at."),
                io.Combo.Input("mode", options=list(kptp.MODES), default="refine",
                               tooltip="replace: word swap, prompts with the same number of words. refine: words "
                                       "added or changed, tokens aligned (the Eta Inversion evaluation's default)."),
                io.Float.Input("cross_replace", default=0.4, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the steps (from the first) in which the target's cross-attention "
                                       "comes from the source (paper 0.4)."),
                io.Float.Input("self_replace", default=0.6, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the steps (from the first) in which the target's self-attention "
                                       "at 1/2 size and coarser comes from the source (paper 0.6). Higher keeps more "
                                       "of the photo's layout; lower it if small objects get lost or keep their old "
                                       "colour."),
                io.String.Input("reweight_words", default="",
                                tooltip="Comma-separated words of the target prompt whose attention is scaled by "
                                        "reweight_value (equalizer). Empty = off."),
                io.Float.Input("reweight_value", default=2.0, min=-10.0, max=10.0, step=0.1,
                               tooltip="Attention factor for reweight_words (Eta Inversion evaluation: 2)."),
                io.String.Input("blend_source_words", default="",
                                tooltip="Local blend: comma-separated words of the source prompt (e.g. the object "
                                        "being changed). Empty = no blend."),
                io.String.Input("blend_target_words", default="",
                                tooltip="Local blend: comma-separated words of the target prompt (e.g. the new "
                                        "word)."),
                io.Float.Input("blend_threshold", default=0.3, min=0.0, max=0.99, step=0.01,
                               tooltip="Local blend: keep the target where the max-normalised word attention "
                                       "exceeds this (paper 0.3)."),
                io.Float.Input("blend_start", default=0.2, min=0.0, max=1.0, step=0.01,
                               tooltip="Local blend starts after this fraction of the steps (paper 0.2)."),
                io.Combo.Input("noise_selection", options=list(NOISE_SELECTION), default="editing", optional=True,
                               tooltip="Eta inversions only. editing (the paper's): choose the noise during the edit "
                                       "from the source branch at this guide's cfg (one more row per step). "
                                       "inversion: replay the noise Invert chose at its source_cfg (the same when "
                                       "the two CFGs are equal)."),
                io.Combo.Input("blend_rule", options=list(kptp.LocalBlend.RULES), default="threshold", optional=True,
                               tooltip="Local blend: how the word attention becomes a mask. threshold (the paper's): "
                                       "above blend_threshold of its maximum. otsu: split by the map's own histogram "
                                       "(ignores blend_threshold); for models whose word maps are flat, where the "
                                       "threshold keeps the whole image and the blend does nothing."),
            ],
            outputs=[io.Guider.Output(display_name="GUIDER", tooltip="Connect to SamplerCustomAdvanced, with the "
                                                                     "Inversion Sampler as SAMPLER."),
                     MASKS.Output(display_name="blend", tooltip="Local blend mask: connect to the Inversion Sampler's "
                                                                "concept_masks (feather 0 = the paper's blend).")],
        )

    @classmethod
    def validate_inputs(cls, cross_replace=None, self_replace=None, blend_threshold=None, blend_start=None,
                        blend_source_words=None, blend_target_words=None):
        """Widget checks before the queue runs (a linked input arrives as None)."""
        return first_error(lambda: _check_numbers(cross_replace, self_replace, blend_threshold, blend_start,
                                                  blend_source_words, blend_target_words))

    @classmethod
    def execute(cls, model, clip, source_prompt, target_prompt, negative, cfg, mode, cross_replace, self_replace,
                reweight_words="", reweight_value=2.0, blend_source_words="", blend_target_words="",
                blend_threshold=0.3, blend_start=0.2, noise_selection="editing",
                blend_rule="threshold") -> io.NodeOutput:
        refuse_flow(model, "Prompt-to-Prompt Guide edits UNet cross-attention maps (SD1.x / SD2.x / SDXL)",
                    "text and image share joint attention there; use the FlowEdit Guider + Sampler (source and target "
                    "prompts) or Invert (flow_noise_maps) + Inversion Sampler with a Semantic Guide")
        ensure_supported(model)
        control = build_control(clip, source_prompt, target_prompt, mode, cross_replace, self_replace,
                                reweight_words, reweight_value, blend_source_words, blend_target_words,
                                blend_threshold, blend_start, blend_rule)
        patched = attach_control(model, control)
        guider = PromptToPromptGuider(patched, encode_text(clip, target_prompt), negative,
                                      encode_text(clip, source_prompt), cfg, control, noise_selection)
        return io.NodeOutput(guider, control.blend)


NODES = [PromptToPromptGuideNode]
