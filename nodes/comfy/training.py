"""Training: running a loaded ComfyUI model with gradients (Concept Learn).

Touches ``BaseModel.apply_model`` (k-diffusion input, x0 output: ComfyUI's own
``calculate_input`` / ``calculate_denoised``), SDXL's ``encode_adm``, ``process_latent_in``,
``comfy.model_management.load_models_gpu`` and, for gradient checkpointing, the UNet's
``ResBlock`` / ``BasicTransformerBlock`` classes.
"""
from __future__ import annotations

import torch
import torch.utils.checkpoint

import comfy.model_management

from ...kernels.protocol import UnsupportedModelError
from .models import ensure_supported, prediction_type, vp_schedule


class ComfyGradDenoiser:
    """:class:`~..kernels.concept_learn.GradDenoiser` over a (hooked) ModelPatcher.

    Calls ``BaseModel.apply_model`` (k-diffusion input, x0 output: ComfyUI's own
    ``calculate_input`` / ``calculate_denoised``) with the patcher's transformer options, so
    the attn2 replace patches of :func:`attach_attention_hooks` see the call as cond 0.
    Call :meth:`load` first (weights patched and on the device).
    """

    def __init__(self, patcher):
        ensure_supported(patcher)
        self.patcher = patcher
        self.schedule = vp_schedule(patcher)
        self.prediction_type = prediction_type(patcher)
        self.device = comfy.model_management.get_torch_device()

    def load(self):
        comfy.model_management.load_models_gpu([self.patcher])
        self.device = self.patcher.load_device

    def predict_x0_grad(self, x, sigma, cond):
        """``cond``: a context tensor, or SDXL's ``{"c_crossattn", "pooled_output"}`` (:class:`ComfyConceptText`).

        SDXL's ADM vector is built by the model's own ``encode_adm`` from the pooled output
        (differentiable) and the size conditioning: original = target size = the latent's
        pixel size (``x`` x the VAE factor 8), crop (0, 0) [D: the training crops are centre
        crops resized to the training resolution, so this is what the model sees].
        """
        model = self.patcher.model
        B = x.shape[0]
        x = x.to(self.device)
        sigma = torch.as_tensor(sigma).to(self.device, torch.float32).reshape(-1).expand(B)
        opts = dict(self.patcher.model_options.get("transformer_options", {}))
        opts.update({"cond_or_uncond": [0], "sigmas": sigma, "uuids": [None]})
        opts["optimized_attention_override"] = grad_safe_attention(opts.get("optimized_attention_override"))
        extra = {}
        if isinstance(cond, dict):
            pooled = cond.get("pooled_output")
            cond = cond["c_crossattn"]
            if getattr(model, "adm_channels", 0):
                if pooled is None:
                    raise UnsupportedModelError(f"{type(model).__name__} needs a pooled text output (SDXL CLIP)")
                h, w = int(x.shape[-2]) * 8, int(x.shape[-1]) * 8
                y = model.encode_adm(pooled_output=pooled.to(self.device), width=w, height=h,
                                     target_width=w, target_height=h, crop_w=0, crop_h=0, device=self.device)
                extra["y"] = y.to(self.device).expand(B, -1)
        elif getattr(model, "adm_channels", 0):
            raise UnsupportedModelError(f"{type(model).__name__} needs the pooled output of an SDXL CLIP "
                                        f"(ADM conditioning); connect the checkpoint's own CLIP")
        ctx = cond.to(self.device).expand(B, -1, -1)
        out = model.apply_model(x, sigma, c_crossattn=ctx, transformer_options=opts, **extra)
        return out.float()


# ComfyUI attention functions whose code is not differentiable: sub-quadratic attention writes
# exp(..., out=...) into its score chunks once memory is short (found at SDXL 1024² on a CPU, where
# it is ComfyUI's default), split attention softmaxes in place, SageAttention has no backward
NOT_DIFFERENTIABLE = ("attention_sub_quad", "attention_split", "attention_sage")


def grad_safe_attention(previous=None):
    """A ``transformer_options["optimized_attention_override"]`` for training: while autograd records,
    a call to one of :data:`NOT_DIFFERENTIABLE` goes to core's ``attention_pytorch`` (the same maths
    through ``scaled_dot_product_attention``, which has a backward); every other call, and every call
    without grad (E-steps, sampling), runs the function ComfyUI chose.  ``previous``: an override
    installed before (another pack's), still called."""
    import comfy.ldm.modules.attention as attn

    def override(func, *args, **kwargs):
        if torch.is_grad_enabled() and getattr(func, "__name__", "") in NOT_DIFFERENTIABLE:
            func = attn.attention_pytorch          # wrapped; the caller's _inside_attn_wrapper flag skips overrides
        if previous is not None:
            return previous(func, *args, **kwargs)
        return func(*args, **kwargs)

    return override


def encode_images_for_training(model, vae, images: torch.Tensor) -> torch.Tensor:
    """``[N, H, W, 3]`` in [0,1] -> model-space latents ``[N, C, h, w]`` (``process_latent_in``), float32."""
    with torch.no_grad():
        lat = vae.encode(images[..., :3])
        return model.model.process_latent_in(lat.float()).float().clone()


def _frozen(v):
    # UNet blocks share one transformer_options dict that SpatialTransformer rewrites before each
    # block ("block_index"); the backward's recomputation must see the values of the forward call
    return dict(v) if isinstance(v, dict) else v


def _checkpointed(fn):
    """``fn`` (a block's forward) recomputed in the backward pass instead of keeping its activations."""

    def forward(*args, **kwargs):
        if not torch.is_grad_enabled():
            return fn(*args, **kwargs)
        args = tuple(_frozen(a) for a in args)
        kwargs = {k: _frozen(v) for k, v in kwargs.items()}
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False, **kwargs)

    forward.__wrapped__ = fn
    return forward


class gradient_checkpointing:
    """For the ``with`` block: the UNet recomputes each ``ResBlock`` and ``BasicTransformerBlock`` in
    the backward pass (activation memory: one block's instead of the whole UNet's).

    Like :class:`~.models.normal_weight_copies`, it swaps something on the loaded model for the
    node's own run and puts it back on exit: each block gets a ``forward`` attribute that calls the
    block's own forward through ``torch.utils.checkpoint`` (non-reentrant: gradients through
    attention maps recorded inside a block still flow, and a recomputation that diverges from the
    forward raises); on exit the attribute is removed (or the one that was there is restored), so
    the caller's MODEL runs exactly as before.  The blocks' ``transformer_options`` are copied at
    call time.  Gradients equal the plain backward's to float rounding
    (tests/test_comfy_concept_learn.py).  Without grad (E-steps) the blocks run as usual.
    """

    def __init__(self, diffusion_model, enabled: bool = True):
        self.root = diffusion_model if enabled else None
        self.swapped = []

    def __enter__(self):
        if self.root is None:
            return self
        from comfy.ldm.modules.attention import BasicTransformerBlock
        from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock

        for mod in self.root.modules():
            if isinstance(mod, (ResBlock, BasicTransformerBlock)):
                had = mod.__dict__.get("forward")
                self.swapped.append((mod, had))
                mod.forward = _checkpointed(had if had is not None else type(mod).forward.__get__(mod))
        if not self.swapped:
            raise UnsupportedModelError("gradient checkpointing: the model's UNet has no ResBlock / transformer "
                                        "blocks")
        return self

    def __exit__(self, *exc):
        for mod, had in reversed(self.swapped):
            if had is None:
                del mod.forward
            else:
                mod.forward = had
        self.swapped = []
        return False
