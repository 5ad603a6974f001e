"""pOps: CLIP vision outputs, the models that read an image embedding, the prior's dtype.

Touches ``comfy.clip_vision.Output`` (the CLIP_VISION_OUTPUT type), ``comfy.model_base``
(SDXL / SD2.1-unCLIP read an embedding through unCLIP conditioning) and
``comfy.model_management``'s fp16 / bf16 advice.
"""
from __future__ import annotations

import torch

import comfy.model_management

from ...kernels.protocol import UnsupportedModelError


def pops_compute_dtype(choice: str, n_params: int = 0) -> torch.dtype:
    """``auto``: fp16 (or bf16) where ComfyUI's model management says the device supports it, else fp32."""
    if choice != "auto":
        return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[choice]
    dev = comfy.model_management.get_torch_device()
    if comfy.model_management.should_use_fp16(dev, model_params=n_params):
        return torch.float16
    if comfy.model_management.should_use_bf16(dev, model_params=n_params):
        return torch.bfloat16
    return torch.float32


def make_clip_vision_output(image_embeds: torch.Tensor, **extra):
    """A core CLIP_VISION_OUTPUT carrying only ``image_embeds`` (hidden states set to None)."""
    import comfy.clip_vision

    out = comfy.clip_vision.Output()
    out["image_embeds"] = image_embeds
    out["last_hidden_state"] = None
    out["penultimate_hidden_states"] = None
    for k, v in extra.items():
        out[k] = v
    return out


def image_embedding_consumer(model) -> tuple:
    """``(family, width)`` of the image embedding a MODEL reads through unCLIP conditioning, or raises.

    SDXL-family models (SDXL, SSD-1B, Vega, KOALA...) read the first 1280 values of the
    unCLIP ADM vector as their pooled embedding ("revision"); SD2.x-unCLIP reads 1024/768.
    SD1.x and other families ignore unCLIP conditioning silently, so they are refused.
    """
    import comfy.model_base

    base = model.model
    if isinstance(base, (comfy.model_base.SDXL, comfy.model_base.SDXLRefiner)):
        return type(base).__name__, 1280
    if isinstance(base, comfy.model_base.SD21UNCLIP):
        return "SD21UNCLIP", int(base.noise_augmentor.time_embed.dim)
    raise UnsupportedModelError(
        f"{type(base).__name__} models do not read an image embedding through unCLIP conditioning (it would be "
        f"ignored); render pOps embeddings with an SDXL model (revision) or SDXL + IP-Adapter (ip-adapter_sdxl)")
