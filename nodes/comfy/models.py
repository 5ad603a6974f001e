"""Models: the ModelPatcher, ``model_sampling``, model family and prediction type.

Touches ``comfy.model_sampling`` (which families we support), ``comfy.model_management``
(device placement, loading through ComfyUI's memory management) and ``comfy.model_patcher``
(wrapping our own modules so ComfyUI moves them on and off the GPU).  Also the weight
fingerprint stored with inversions and learned files, and the inference-tensor workaround
that lets autograd run through a loaded checkpoint.
"""
from __future__ import annotations

import comfy.model_management
import comfy.model_sampling
import torch
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

from ...kernels.files import content_hash
from ...kernels.protocol import UnsupportedModelError
from ...kernels.schedule import VPSchedule


def model_family(model) -> str:
    return type(model.model).__name__


def ensure_supported(model) -> None:
    """Raise :class:`UnsupportedModelError` unless ``model`` is an SD-style UNet we handle."""
    dm = model.get_model_object("diffusion_model")
    if not isinstance(dm, UNetModel):
        raise UnsupportedModelError(
            f"PhotoOps supports SD1.x, SD2.x and SDXL UNet models; this model is {model_family(model)} "
            f"({type(dm).__name__}), which has no UNet cross-attention to hook")
    ms = model.get_model_object("model_sampling")
    if not isinstance(ms, comfy.model_sampling.ModelSamplingDiscrete) or isinstance(ms, comfy.model_sampling.EDM) \
            or not isinstance(ms, comfy.model_sampling.EPS):
        raise UnsupportedModelError(
            f"PhotoOps supports discrete eps- and v-prediction sampling; this model uses "
            f"{type(ms).__name__} ({[c.__name__ for c in type(ms).__mro__[1:3]]})")


def prediction_type(model) -> str:
    ms = model.get_model_object("model_sampling")
    return "v_prediction" if isinstance(ms, comfy.model_sampling.V_PREDICTION) else "epsilon"


def vp_schedule(model) -> VPSchedule:
    ms = model.get_model_object("model_sampling")
    return VPSchedule(1.0 / (1.0 + ms.sigmas.double() ** 2))


def latent_channels(model) -> int:
    return int(model.get_model_object("latent_format").latent_channels)


def check_latent(model, latent: torch.Tensor) -> None:
    """Clear error for a LATENT that does not fit the model (channels, size)."""
    c = latent_channels(model)
    if latent.ndim != 4 or latent.shape[1] != c:
        raise ValueError(f"the latent has shape {tuple(latent.shape)}, but this model ({model_family(model)}) "
                         f"expects [batch, {c}, height, width]; encode the image with this model's VAE")
    if latent.shape[-1] < 2 or latent.shape[-2] < 2:
        raise ValueError(f"the latent {tuple(latent.shape[-2:])} is too small for this model")


def fingerprint(model) -> dict:
    """Family + a hash of weights LoRAs leave alone (conv_in and the output conv).

    Taken from the ModelPatcher's backup when those weights are currently patched, so a
    LoRA loaded on top does not change it.  The hash (:func:`~...kernels.files.content_hash`)
    reads about 4096 evenly strided values of each weight, in float32.
    """
    base = model.model if hasattr(model, "model") else model
    dm = base.diffusion_model
    backup = getattr(model, "backup", {}) or {}
    weights = []
    for key, w in (("diffusion_model.input_blocks.0.0.weight", dm.input_blocks[0][0].weight),
                   ("diffusion_model.out.2.weight", dm.out[2].weight)):
        if key in backup:
            w = backup[key].weight
        weights.append(w.detach().float())
    fp = {"family": type(base).__name__, "weights": content_hash(*weights, length=16, stride_to=4096)}
    if hasattr(model, "get_model_object"):
        fp["prediction"] = prediction_type(model)
    return fp


def patcher_of(model_k):
    """The ModelPatcher behind a KSAMPLER function's ``model`` (via the guider), or None."""
    guider = getattr(model_k, "inner_model", None)
    return getattr(guider, "model_patcher", None)


def module_patcher(module: torch.nn.Module):
    """A ModelPatcher so ComfyUI's model management moves ``module`` on and off the compute device."""
    import comfy.model_patcher

    return comfy.model_patcher.ModelPatcher(module, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


def load_on_device(patcher, extra_memory: int = 0):
    """Load the patched module on its compute device (unloading other models if needed); returns the module."""
    comfy.model_management.load_models_gpu([patcher], memory_required=extra_memory)
    return patcher.model


def intermediate_device():
    return comfy.model_management.intermediate_device()


def context_width(model) -> int:
    dm = model.get_model_object("diffusion_model")
    w = getattr(dm, "context_dim", None)
    if w is None:
        for name, mod in dm.named_modules():
            if name.endswith("attn2.to_k"):
                return int(mod.in_features)
        raise UnsupportedModelError("cannot find the cross-attention context width of this model")
    return int(w)


def _alias(t: torch.Tensor) -> torch.Tensor:
    """A normal (non-inference) tensor over ``t``'s storage: same bytes, no copy.  Call outside inference mode."""
    a = torch.empty(0, dtype=t.dtype, device=t.device)
    a.set_(t.untyped_storage(), t.storage_offset(), t.shape, t.stride())
    return a


class normal_weight_copies:
    """For the ``with`` block: swap the inference-mode parameters/buffers of ``modules`` for normal tensors.

    ComfyUI loads checkpoints under ``torch.inference_mode()``, so model weights are
    inference tensors, which autograd may not save for backward — even when only the
    input embeddings need gradients.  The stand-ins are normal tensors *aliasing the same
    storage* (``Tensor.set_``, no copy: a full copy was 3.4 GB for an fp32 SD1.5 UNet and
    5.1 GB for a bf16 SDXL one, issue 16); nothing writes to them while training (every
    weight is frozen).  The originals are put back on exit (the caller's MODEL/CLIP end up
    holding exactly the tensors they had).
    """

    def __init__(self, *modules):
        self.modules = [m for m in modules if m is not None]
        self.swapped = []

    def __enter__(self):
        with torch.inference_mode(False):
            for root in self.modules:
                for mod in root.modules():
                    for store in ("_parameters", "_buffers"):
                        d = getattr(mod, store)
                        for name, t in list(d.items()):
                            if t is not None and t.is_inference():
                                self.swapped.append((d, name, t))
                                c = _alias(t)
                                d[name] = torch.nn.Parameter(c, requires_grad=False) if store == "_parameters" else c
        return self

    def __exit__(self, *exc):
        for d, name, t in reversed(self.swapped):
            d[name] = t
        self.swapped = []
        return False
