"""InstructPix2Pix: model checks, pair encoding and the eps prediction InstructBrush learns through.

Touches ``comfy.model_base.IP2P``, the VAE (image latents as ``InstructPixToPixConditioning``
attaches them), ``process_latent_in``, ``BaseModel.apply_model`` with ``c_concat`` and
``comfy.model_management.load_models_gpu``.
"""
from __future__ import annotations

import torch

import comfy.model_management

from ...kernels.protocol import UnsupportedModelError
from .models import ensure_supported, prediction_type, vp_schedule
from .training import grad_safe_attention


def ip2p_check(model) -> None:
    """Raise unless ``model`` is an eps-prediction InstructPix2Pix UNet (image latent concatenated)."""
    import comfy.model_base

    ensure_supported(model)
    base = model.model
    if not isinstance(base, comfy.model_base.IP2P):
        raise UnsupportedModelError(
            f"InstructBrush needs an InstructPix2Pix model (a UNet whose input takes the image latent, e.g. "
            f"instruct-pix2pix.safetensors); this model is {type(base).__name__}")
    if prediction_type(model) != "epsilon":
        raise UnsupportedModelError("InstructBrush supports eps-prediction InstructPix2Pix models only")


def ip2p_encode_pairs(model, vae, before: torch.Tensor, after: torch.Tensor) -> tuple:
    """(image-conditioning latents, target latents): ``vae.encode`` of the before images as
    InstructPixToPixConditioning attaches them (unscaled), ``process_latent_in`` of the after images."""
    with torch.no_grad():
        c_img = vae.encode(before[..., :3]).float()
        z0 = model.model.process_latent_in(vae.encode(after[..., :3]).float()).float()
    return c_img.detach(), z0.detach()


class ComfyIP2PEps:
    """``predict_eps(z_t, t, image, text)`` of :func:`..kernels.instructbrush.learn` over a hooked
    IP2P ModelPatcher: ``BaseModel.apply_model`` at ``sigma(t)`` with the k-space input
    ``z_t * sqrt(1 + sigma^2)`` and ``c_concat`` = the image latent (zeros for ``None``);
    eps = (x - x0) / sigma. Runs with gradients (call inside ``torch.enable_grad()``)."""

    def __init__(self, patcher, cond: torch.Tensor, uncond: torch.Tensor):
        ip2p_check(patcher)
        self.patcher = patcher
        self.schedule = vp_schedule(patcher)
        self.cond, self.uncond = cond, uncond
        comfy.model_management.load_models_gpu([patcher])
        self.device = patcher.load_device

    def __call__(self, zt, t, image, text: bool):
        B = zt.shape[0]
        sigma = self.schedule.sigma(torch.as_tensor(t).reshape(-1).expand(B).double()).float().to(self.device)
        s = sigma.view(-1, 1, 1, 1)
        x = zt.to(self.device) * (1.0 + s ** 2).sqrt()
        img = torch.zeros_like(x) if image is None else image.to(self.device, x.dtype)
        ctx = (self.cond if text else self.uncond).to(self.device).expand(B, -1, -1)
        opts = dict(self.patcher.model_options.get("transformer_options", {}))
        opts.update({"cond_or_uncond": [0], "sigmas": sigma, "uuids": [None]})
        # training: attention calls that have a backward (see training.grad_safe_attention)
        opts["optimized_attention_override"] = grad_safe_attention(opts.get("optimized_attention_override"))
        x0 = self.patcher.model.apply_model(x, sigma, c_concat=img, c_crossattn=ctx, transformer_options=opts).float()
        return ((x - x0) / s).float()
