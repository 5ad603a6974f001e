"""pOps operators (Richardson et al. 2024) on CLIP image embeddings.

* **Load pOps Operator** — an operator file from ``models/pops`` (the released
  ``<op>/learned_prior.pth`` pickles, or our fp16 safetensors from
  ``tools/convert_pops.py``) plus the μ/σ statistics; validated before anything is
  built; wrapped in a ModelPatcher so ComfyUI moves it on and off the GPU.
* **Operator Apply** — one or two CLIP_VISION_OUTPUTs (core *CLIP Vision Encode* with
  the ViT-bigG/14 model) -> a CLIP_VISION_OUTPUT whose ``image_embeds`` is the operator's
  result, so operators chain; also the IP-Adapter ``EMBEDS`` pair (positive = the
  result, negative = zeros, the non-plus IPAdapterEncoder format).
* **pOps Text** — the adjective's text tokens for the *instruct* operator (CLIP-G last
  layer after the final LayerNorm, real tokens only).
* **pOps Mean** — the paper's baseline: the mean of the two normalised embeddings.
* **pOps Revision Conditioning** — positive/negative CONDITIONING that feed an image
  embedding to an SDXL-family MODEL through its unCLIP ("revision") input, with an
  empty (zero) text context; refuses models that would silently ignore it.

Embeddings come from core *Load CLIP Vision* (``clip_vision_g.safetensors``, ViT-bigG/14) +
*CLIP Vision Encode*.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from comfy_api.latest import io

from ..kernels import pops as kp
from ..kernels import pops_weights as pw
from .comfy.files import folder_file_path, folder_files, register_model_folder
from .comfy.models import context_width, intermediate_device, load_on_device, module_patcher
from .comfy.pops import image_embedding_consumer, make_clip_vision_output, pops_compute_dtype
from .comfy.sampling import interrupt_check, progress_bar
from .comfy.text import text_last_hidden_states

FOLDER = "pops"
OPERATOR = io.Custom("PHOTOOPS_POPS_OPERATOR")
EMBEDS = io.Custom("EMBEDS")  # ComfyUI_IPAdapter_plus: a [B, D] image-embedding tensor
TEXT = io.Custom("PHOTOOPS_POPS_TEXT")
IN_FILE = "(in the operator file)"
BINARY = ("texturing", "scene", "union")


def _register():
    register_model_folder(FOLDER, FOLDER)


@dataclass
class PopsOperator:
    """What flows on a PHOTOOPS_POPS_OPERATOR wire."""

    patcher: object
    config: kp.PriorConfig
    mean: torch.Tensor
    std: torch.Tensor
    name: str
    dtype: torch.dtype
    path: str

    @property
    def default_guidance(self) -> float:
        return kp.OPERATOR_DEFAULTS.get(self.name, 1.0)


class PopsOperatorLoaderNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        _register()
        files = folder_files(FOLDER)
        return io.Schema(
            node_id="PhotoOps_PopsOperatorLoader",
            display_name="Load pOps Operator",
            category="PhotoOps/pops",
            description="Loads a pOps operator (texturing, scene, union, instruct) from models/pops. The released "
                        "learned_prior.pth files carry no statistics: pick the Kandinsky 2.2 prior file or a small "
                        "clip_mean/clip_std file as statistics, or convert once with tools/convert_pops.py.",
            inputs=[
                io.Combo.Input("operator_file", options=files,
                               tooltip="Operator weights in models/pops (e.g. texturing/learned_prior.pth or a "
                                       "converted .safetensors). The operator name comes from the folder/metadata."),
                io.Combo.Input("statistics", options=[IN_FILE, *files], default=IN_FILE,
                               tooltip="Where clip_mean / clip_std come from: the operator file itself (converted "
                                       "files), the Kandinsky 2.2 prior weights, or a small statistics file."),
                io.Combo.Input("dtype", options=["auto", "fp16", "bf16", "fp32"], default="auto",
                               tooltip="Compute precision of the prior. auto = fp16/bf16 where the device supports "
                                       "it, fp32 on CPU. The output embedding is always computed back in fp32."),
            ],
            outputs=[OPERATOR.Output(display_name="operator", tooltip="Feed to Operator Apply.")],
        )

    @classmethod
    def execute(cls, operator_file, statistics, dtype) -> io.NodeOutput:
        _register()
        path = folder_file_path(FOLDER, operator_file)
        stats = None if statistics == IN_FILE else folder_file_path(FOLDER, statistics)
        op = pw.load_operator(path, stats)  # validates everything before any network is built
        n_params = sum(v.numel() for v in op.state_dict.values())
        dt = pops_compute_dtype(dtype, n_params)
        prior = pw.build_prior(op, dtype=dt, device="cpu")
        op.state_dict = {}  # the prior holds the (cast) weights now
        return io.NodeOutput(PopsOperator(module_patcher(prior), op.config, op.mean, op.std, op.name, dt, path))


def _embeds(cvo, name: str, dim: int) -> torch.Tensor:
    e = getattr(cvo, "image_embeds", None)
    if e is None:
        raise ValueError(f"{name}: this CLIP_VISION_OUTPUT has no image_embeds (pOps needs the projected image "
                         f"embedding of a CLIP vision model)")
    return kp.check_width(name, e, dim).float().cpu()


def _broadcast(xs, names):
    sizes = {x.shape[0] for x in xs if x is not None}
    b = max(sizes)
    if sizes - {1, b}:
        raise ValueError(f"batch sizes {sorted(sizes)} of {names} do not match (use equal batches or batch 1)")
    return [None if x is None else x.expand(b, -1) for x in xs]


class OperatorApplyNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PhotoOps_OperatorApply",
            display_name="Operator Apply (pOps)",
            category="PhotoOps/pops",
            description="Samples a pOps operator on CLIP image embeddings (ViT-bigG/14 image_embeds from CLIP Vision "
                        "Encode, or another Operator Apply). The result is a CLIP_VISION_OUTPUT, so operators chain; "
                        "render it with pOps Revision Conditioning (SDXL) or IPAdapterEmbeds (ip-adapter_sdxl).",
            inputs=[
                OPERATOR.Input("operator", tooltip="From Load pOps Operator."),
                io.ClipVisionOutput.Input("input_a", tooltip="Input A (texturing: the object; scene: the object; "
                                                             "union: first image; instruct: the object)."),
                io.ClipVisionOutput.Input("input_b", optional=True,
                                          tooltip="Input B (texturing: texture patch; scene: background; union: "
                                                  "second image). Unconnected = dropped (the paper's partial input)."),
                io.Int.Input("steps", default=25, min=2, max=1000,
                             tooltip="Prior sampling steps (paper: 25, UnCLIP scheduler)."),
                io.Float.Input("guidance", default=-1.0, min=-1.0, max=30.0, step=0.1,
                               tooltip="Prior classifier-free guidance; -1 = the operator's default (texturing/union "
                                       "8, scene/instruct 1). <= 1 runs no CFG."),
                io.Int.Input("seed", default=42, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of the prior's noise (authors: 18, 42)."),
                io.Boolean.Input("drop_a", default=False,
                                 tooltip="Drop input A (a zero token in normalised space = the mean embedding) to "
                                         "sample completions from B alone."),
                io.Boolean.Input("drop_b", default=False, tooltip="Drop input B (see drop_a)."),
                TEXT.Input("text", optional=True,
                           tooltip="instruct operator: the adjective's text tokens from pOps Text (one word, "
                                   "e.g. 'shiny'). They fill the slots after input A."),
            ],
            outputs=[
                io.ClipVisionOutput.Output(display_name="clip_vision_output",
                                           tooltip="image_embeds = the operator's result (raw CLIP space); no "
                                                   "hidden states. Chain into another Operator Apply."),
                EMBEDS.Output(display_name="pos_embed", tooltip="IPAdapter_plus EMBEDS (= the result)."),
                EMBEDS.Output(display_name="neg_embed", tooltip="IPAdapter_plus EMBEDS: zeros, the pOps negative."),
            ],
        )

    @classmethod
    def execute(cls, operator: PopsOperator, input_a, steps, guidance, seed, drop_a, drop_b,
                input_b=None, text=None) -> io.NodeOutput:
        d = operator.config.embedding_dim
        ea = _embeds(input_a, "input_a", d)
        eb = _embeds(input_b, "input_b", d) if input_b is not None else None
        if operator.name == "instruct" and text is None:
            raise ValueError("the instruct operator needs the adjective's text tokens: connect pOps Text")
        if text is not None and eb is not None:
            raise ValueError("give either input_b (binary operators) or text (instruct), not both")
        if text is not None:
            text = kp.check_width("text", text[0], d)[None] if text.ndim == 3 else kp.check_width("text", text, d)
        ea, eb = _broadcast([ea, eb], ["input_a", "input_b"])
        a = kp.normalize(ea, operator.mean, operator.std)
        b = kp.normalize(eb, operator.mean, operator.std) if eb is not None else None
        if text is not None:
            slots, tt = [a], text.float().cpu().expand(a.shape[0], -1, -1)
        else:
            slots, tt = ([a, b] if (b is not None or operator.name in BINARY) else [a]), None
        H, H_neg, M = kp.build_condition(slots, operator.config.num_embeddings, text_tokens=tt,
                                         dropped=[drop_a, drop_b])
        w = operator.default_guidance if guidance < 0 else float(guidance)
        pbar = progress_bar(steps)

        def tick(i, n):
            interrupt_check()
            pbar.update_absolute(i, n)

        prior = load_on_device(operator.patcher)
        out = kp.sample(prior, H, M, operator.mean, operator.std, steps=steps, guidance=w, seed=seed,
                        H_neg=H_neg, callback=tick)
        out = out.to(intermediate_device())
        cvo = make_clip_vision_output(out, pops_operator=operator.name)
        return io.NodeOutput(cvo, out, torch.zeros_like(out))


class PopsTextNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PhotoOps_PopsText",
            display_name="pOps Text (instruct)",
            category="PhotoOps/pops",
            description="The text tokens of one adjective for the instruct operator: the CLIP ViT-bigG text tower's "
                        "last layer after the final LayerNorm, for the word's real tokens (BOS, word, EOS). With an "
                        "SDXL CLIP its clip_g part is used; that it equals the Kandinsky 2.2 prior's text encoder is "
                        "assumed (same OpenCLIP bigG model), not verified.",
            inputs=[io.Clip.Input("clip", tooltip="An SDXL CLIP (its clip_g tower is used)."),
                    io.String.Input("word", default="shiny",
                                    tooltip="One adjective (the operator was trained on single words), e.g. shiny, "
                                            "aged, wooden.")],
            outputs=[TEXT.Output(display_name="text", tooltip="For Operator Apply's text input (instruct).")],
        )

    @classmethod
    def validate_inputs(cls, word=None):
        return "the word is empty" if word is not None and not str(word).strip() else True

    @classmethod
    def execute(cls, clip, word) -> io.NodeOutput:
        if not word or not word.strip():
            raise ValueError("the word is empty")
        return io.NodeOutput(text_last_hidden_states(clip, word.strip()).cpu())


class PopsMeanNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PhotoOps_PopsMean",
            display_name="pOps Mean (baseline)",
            category="PhotoOps/pops",
            description="The paper's comparison baseline: mix two image embeddings in the operator's normalised space "
                        "(alpha 0.5 = the mean of the two).",
            inputs=[
                OPERATOR.Input("operator", tooltip="Only its statistics (clip_mean / clip_std) are used."),
                io.ClipVisionOutput.Input("input_a", tooltip="First image embedding."),
                io.ClipVisionOutput.Input("input_b", tooltip="Second image embedding."),
                io.Float.Input("alpha", default=0.5, min=0.0, max=1.0, step=0.01,
                               tooltip="Weight of input B (0 = A, 1 = B)."),
            ],
            outputs=[io.ClipVisionOutput.Output(display_name="clip_vision_output", tooltip="The mixed embedding."),
                     EMBEDS.Output(display_name="pos_embed", tooltip="The same, as IPAdapter_plus EMBEDS.")],
        )

    @classmethod
    def execute(cls, operator: PopsOperator, input_a, input_b, alpha) -> io.NodeOutput:
        d = operator.config.embedding_dim
        ea, eb = _broadcast([_embeds(input_a, "input_a", d), _embeds(input_b, "input_b", d)], ["input_a", "input_b"])
        z = (1 - alpha) * kp.normalize(ea, operator.mean, operator.std) + alpha * kp.normalize(eb, operator.mean,
                                                                                              operator.std)
        out = kp.denormalize(z, operator.mean, operator.std).to(intermediate_device())
        return io.NodeOutput(make_clip_vision_output(out), out)


class PopsRevisionConditioningNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PhotoOps_PopsRevisionConditioning",
            display_name="pOps Revision Conditioning (SDXL)",
            category="PhotoOps/pops",
            description="Renders an image embedding with an SDXL-family model through its unCLIP (revision) input: "
                        "positive = zero text context + the embedding (core unCLIPConditioning semantics), negative = "
                        "zero context and zero pooled embedding. Same as CLIP Text Encode('') -> Conditioning Zero Out "
                        "-> unCLIPConditioning, without a text encoder, and it refuses models that ignore unCLIP.",
            inputs=[
                io.Model.Input("model", tooltip="An SDXL-family MODEL (its pooled input is 1280-d). SD1.x is refused."),
                io.ClipVisionOutput.Input("clip_vision_output", tooltip="Operator Apply's result (or CLIP Vision "
                                                                        "Encode with ViT-bigG)."),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="unCLIP strength (scales the embedding's ADM input)."),
                io.Float.Input("noise_augmentation", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="unCLIP noise augmentation of the embedding (0 = use it as is)."),
            ],
            outputs=[io.Conditioning.Output(display_name="positive", tooltip="Zero text + the image embedding."),
                     io.Conditioning.Output(display_name="negative", tooltip="Zero text, zero pooled embedding.")],
        )

    @classmethod
    def execute(cls, model, clip_vision_output, strength, noise_augmentation) -> io.NodeOutput:
        _family, width = image_embedding_consumer(model)
        _embeds(clip_vision_output, "clip_vision_output", width)
        ctx = torch.zeros(1, 77, context_width(model))   # cpu: CONDITIONING lives on the CPU in ComfyUI
        pooled = torch.zeros(1, width)                   # cpu: CONDITIONING lives on the CPU in ComfyUI
        unclip = [{"clip_vision_output": clip_vision_output, "strength": float(strength),
                   "noise_augmentation": float(noise_augmentation)}]
        pos = [[ctx, {"pooled_output": pooled, "unclip_conditioning": unclip}]]
        neg = [[ctx.clone(), {"pooled_output": pooled.clone()}]]
        return io.NodeOutput(pos, neg)


NODES = [PopsOperatorLoaderNode, OperatorApplyNode, PopsTextNode, PopsMeanNode, PopsRevisionConditioningNode]

__all__ = ["NODES", "PopsOperator"]
