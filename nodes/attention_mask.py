"""AttentionCapture + AttentionMask: a word's cross-attention map as a MASK and a heat map.

AttentionCapture patches a clone of the user's MODEL; the capture then happens during
whatever sampler the user runs with it (KSampler, SamplerCustomAdvanced, our inversion).
AttentionMask reads the recorded map after sampling (its LATENT input orders it after
the sampler) and turns it into a MASK and a heat-map IMAGE.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from comfy_api.latest import io

from ..kernels import maps as kmaps
from ..kernels.attention import AttentionHooks, TokenMapRecorder
from .comfy.attention import ContextWatch, attach_attention_hooks, watch_context
from .comfy.flow import is_flow
from .comfy.flow_attention import attach_joint_capture, flow_word_positions, make_recorder
from .comfy.models import ensure_supported
from .comfy.sampling import progress_text
from .comfy.text import text_condition, tokenize_word

LOG = logging.getLogger("photoops.attention")

CAPTURE = io.Custom("PHOTOOPS_ATTENTION_CAPTURE")
VAE_FACTOR = 8  # SD1.x / SD2.x / SDXL and SD3 / Flux VAEs; other families are refused


@dataclass
class AttentionCapture:
    """What flows on a PHOTOOPS_ATTENTION_CAPTURE wire."""

    recorder: TokenMapRecorder
    word: str
    prompt: str
    positions: list
    vae_factor: int = VAE_FACTOR
    watch: object = None        # the ContextWatch: ``watch.mismatch`` says why the prompt did not match


class AttentionCaptureNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PhotoOps_AttentionCapture",
            display_name="Attention Capture",
            category="PhotoOps/attention",
            description="Records the cross-attention map of one word of the prompt while the returned MODEL "
                        "samples. Use the returned MODEL in your sampler, then read the map with Attention Mask. "
                        "The input MODEL is not changed.",
            inputs=[
                io.Model.Input("model", tooltip="The model to watch (SD1.x, SD2.x, SDXL, SD3 / SD3.5 or Flux). It is "
                                                "cloned, not modified."),
                io.Clip.Input("clip", tooltip="The CLIP used to encode the prompt; its tokenizer locates the word."),
                io.String.Input("prompt", multiline=True, default="a photo of a cat",
                                tooltip="The positive prompt text exactly as given to CLIP Text Encode "
                                        "(weights like (word:1.2) and embedding:NAME are understood)."),
                io.String.Input("word", default="cat",
                                tooltip="Word (or several words) of the prompt whose attention to record. "
                                        "Multi-token words are summed over their tokens; every occurrence counts."),
                io.Combo.Input("layers", options=["lowres", "all"], default="lowres",
                               tooltip="lowres: down/up layers at 1/4 of the latent size, as LEDITS++ and Eta "
                                       "Inversion use (sharpest semantics). all: every cross-attention layer, "
                                       "averaged at the finest recorded size (DAAM-style). SD3 / Flux have one "
                                       "token size: lowres = every SD3 joint block / Flux double block, all = "
                                       "Flux single blocks too."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Record from this fraction of the sampling steps (0 = first step)."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Record until this fraction of the sampling steps (1 = last step)."),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="A patched clone; sample with it."),
                CAPTURE.Output(display_name="capture", tooltip="The recording; connect to Attention Mask."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, start_percent=None, end_percent=None, word=None):
        """Checked before the queue runs (no **kwargs: ComfyUI keeps its own min/max checks of the other
        inputs; a linked input arrives as None)."""
        for name, v in (("start_percent", start_percent), ("end_percent", end_percent)):
            if v is not None and not 0.0 <= v <= 1.0:
                return f"{name} must be in [0, 1], got {v}"
        if start_percent is not None and end_percent is not None and end_percent <= start_percent:
            return f"end_percent ({end_percent}) must be greater than start_percent ({start_percent})"
        if word is not None and not str(word).strip():
            return "the word to capture is empty"
        return True

    @classmethod
    def execute(cls, model, clip, prompt, word, layers, start_percent, end_percent) -> io.NodeOutput:
        if end_percent <= start_percent:
            raise ValueError(f"end_percent ({end_percent}) must be greater than start_percent ({start_percent})")
        if is_flow(model):
            return cls._execute_flow(model, clip, prompt, word, layers, start_percent, end_percent)
        ensure_supported(model)
        tok = tokenize_word(clip, prompt, word)
        recorder = TokenMapRecorder(tok["positions"], tok["prompt_len"], cond_index=0, layers=layers,
                                    steps=(start_percent, end_percent))
        hidden = getattr(cls, "hidden", None)
        node_id = getattr(hidden, "unique_id", None) if hidden is not None else None

        def mismatch(problem):
            msg = (f"Attention Capture: {problem}: the sampler's positive prompt is not {prompt!r}, so the recorded "
                   f"token positions {tok['positions']} may not be {word!r}. Give Attention Capture the exact text of "
                   f"the CLIP Text Encode that feeds the sampler's positive input.")
            LOG.warning(msg)
            progress_text(node_id, msg)

        watch = ContextWatch(text_condition(clip, prompt), 0, mismatch)

        def on_run_start():
            recorder.reset()
            watch.reset()

        patched = attach_attention_hooks(model, AttentionHooks([recorder]), on_run_start=on_run_start)
        watch_context(patched, watch)
        return io.NodeOutput(patched, AttentionCapture(recorder, word, prompt, tok["positions"], watch=watch))

    @classmethod
    def _execute_flow(cls, model, clip, prompt, word, layers, start_percent, end_percent) -> io.NodeOutput:
        """SD3 / SD3.5 / Flux: image-query -> text-key joint attention (spec ``rectified-flow.md`` §3); positions
        from the CLIP's tokenizer (Flux: T5 tokens; SD3: CLIP tokens, and T5 tokens when the context has them).
        No prompt check here (the text context is compared only on UNet models)."""
        where = flow_word_positions(clip, prompt, word)
        recorder = make_recorder(where, cond_index=0, layers=("double",) if layers == "lowres" else ("double", "single"),
                                 steps=(start_percent, end_percent))
        patched = attach_joint_capture(model, [recorder])
        return io.NodeOutput(patched, AttentionCapture(recorder, word, prompt, where["positions"]))


class AttentionMaskNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PhotoOps_AttentionMask",
            display_name="Attention Mask",
            category="PhotoOps/attention",
            description="Turns the map recorded by Attention Capture into a MASK and a heat-map IMAGE.",
            inputs=[
                CAPTURE.Input("capture", tooltip="From Attention Capture."),
                io.Latent.Input("samples", tooltip="The sampler's output LATENT; it makes this node run after sampling "
                                                   "and sets the mask size."),
                io.Combo.Input("mode", options=["quantile", "threshold", "otsu", "soft"], default="quantile",
                               tooltip="quantile: keep the top (1 - value) of the map (LEDITS++), a fixed share of "
                                       "the image. threshold: keep the max-normalised map above value (Eta "
                                       "Inversion uses 0.2). otsu: split the map's own histogram in two (follows the "
                                       "object's size; value unused; a good background-lock mask). soft: the "
                                       "max-normalised map itself, no binarisation."),
                io.Float.Input("value", default=0.8, min=0.0, max=1.0, step=0.01,
                               tooltip="Quantile (mode quantile) or threshold (mode threshold), in [0, 1]; unused "
                                       "by otsu and soft."),
                io.Float.Input("blur", default=0.5, min=0.0, max=16.0, step=0.1,
                               tooltip="Gaussian blur sigma, in pixels of the recorded map, before binarising "
                                       "(LEDITS++ uses 0.5). 0 = none."),
                io.Combo.Input("size", options=["image", "latent"], default="image",
                               tooltip="Output the mask at image size (latent x 8) or latent size."),
                io.Image.Input("image", optional=True,
                               tooltip="Optional decoded image to draw the heat map over."),
            ],
            outputs=[
                io.Mask.Output(display_name="mask", tooltip="The word's mask, one per batch image."),
                io.Image.Output(display_name="heatmap", tooltip="The map as a heat map (over the image if given)."),
            ],
        )

    @classmethod
    def execute(cls, capture, samples, mode, value, blur, size, image=None) -> io.NodeOutput:
        rec = capture.recorder
        if rec.calls == 0:
            raise RuntimeError(
                f"nothing was recorded for {capture.word!r}: sample with the MODEL from Attention Capture and "
                f"connect that sampler's LATENT here (recording window may also exclude every step)")
        latent = samples["samples"]
        if tuple(latent.shape[-2:]) != rec.latent_hw:
            raise ValueError(
                f"the LATENT is {tuple(latent.shape[-2:])} but the capture was recorded while sampling a "
                f"{rec.latent_hw} latent: connect the LATENT of the sampler that used the captured MODEL")
        raw = rec.result()
        if raw.shape[0] != latent.shape[0] and raw.shape[0] != 1:
            raise ValueError(f"the recording holds {raw.shape[0]} images but the latent batch has {latent.shape[0]}")
        if blur > 0:
            raw = kmaps.gaussian_blur(raw, blur, size=3 if blur <= 0.5 else None)
        if mode == "soft":
            m = kmaps.normalize_max(raw)
        else:
            m = kmaps.binarize(raw, mode, value)
        lat_hw = tuple(latent.shape[-2:])
        out_hw = lat_hw if size == "latent" else (lat_hw[0] * capture.vae_factor, lat_hw[1] * capture.vae_factor)
        mask = kmaps.resize_map(m, out_hw, mode="nearest" if mode != "soft" else "bilinear").clamp(0, 1)
        if image is not None:
            heat = kmaps.overlay(image, kmaps.normalize_max(raw))
        else:
            heat = kmaps.heatmap(kmaps.resize_map(raw, (lat_hw[0] * capture.vae_factor, lat_hw[1] * capture.vae_factor)))
        return io.NodeOutput(mask.float().cpu(), heat.float().cpu())


NODES = [AttentionCaptureNode, AttentionMaskNode]
