"""Attention: PhotoOps' cross-attention hooks as ComfyUI ``attn2`` replace patches.

Touches ``transformer_options["patches_replace"]["attn2"]`` (``ModelPatcher.set_model_attn2_replace``),
``comfy.ldm.modules.attention.optimized_attention`` and the ON_PRE_RUN patcher callback.
:func:`attach_attention_hooks` clones the ModelPatcher and installs, on every cross-attention
block, a replace that dispatches to a kernels :class:`~...kernels.attention.AttentionHooks`;
another pack's replace on the same block is wrapped and still computes the layer's output.
"""
from __future__ import annotations

import torch

import comfy.patcher_extension
from comfy.ldm.modules.attention import optimized_attention

from ...kernels.attention import AttentionHooks
from ...kernels.protocol import CallInfo, LayerInfo, UnsupportedModelError, step_of_sigma
from .models import ensure_supported


HOOK_KEY = "photoops_attention"
_PLACES = {"input": "down", "middle": "mid", "output": "up"}


def cross_attention_layers(model) -> list:
    """LayerInfo for each cross-attention transformer block, in forward order."""
    from comfy.ldm.modules.attention import SpatialTransformer

    ensure_supported(model)
    dm = model.get_model_object("diffusion_model")
    keys = []
    for name, blocks in (("input", dm.input_blocks), ("middle", [dm.middle_block]), ("output", dm.output_blocks)):
        for i, blk in enumerate(blocks):
            for mod in blk:
                if isinstance(mod, SpatialTransformer):
                    for j, tb in enumerate(mod.transformer_blocks):
                        if getattr(tb, "attn2", None) is not None:
                            keys.append((name, 0 if name == "middle" else i, j))
    if not keys:
        raise UnsupportedModelError("the model's UNet has no cross-attention layers")
    return [LayerInfo(key=k, place=_PLACES[k[0]], order=n) for n, k in enumerate(keys)]


def _call_info(q, extra_options) -> CallInfo:
    # row indices in the guider's conditioning list: our CombineGuider keeps them under
    # "photoops_rows" (it shows other packs core's 0/1 flags); other guiders use the indices
    chunks = list(extra_options.get("photoops_rows") or extra_options.get("cond_or_uncond") or [0])
    sig = extra_options.get("sigmas")
    sigma = float(sig.flatten()[0]) if isinstance(sig, torch.Tensor) else float(sig or 0.0)
    step, total = step_of_sigma(sigma, extra_options.get("sample_sigmas"))
    shape = extra_options.get("original_shape")
    return CallInfo(sigma=sigma, chunks=chunks, rows_per_chunk=q.shape[0] // max(len(chunks), 1),
                    latent_hw=tuple(shape[-2:]), step=step, total_steps=total)


def _make_replace(hooks: AttentionHooks, layer: LayerInfo, previous):
    def attn2_replace(q, k, v, extra_options):
        heads = extra_options["n_heads"]

        def attend(q, k, v):
            if previous is not None:
                return previous(q, k, v, extra_options)
            return optimized_attention(q, k, v, heads, attn_precision=extra_options.get("attn_precision"),
                                       transformer_options=extra_options)

        if not len(hooks):
            return attend(q, k, v)
        return hooks(q, k, v, heads, layer, _call_info(q, extra_options), attend)

    attn2_replace.photoops_layer = layer
    return attn2_replace


def attach_attention_hooks(model, hooks: AttentionHooks, on_run_start=None):
    """A clone of ``model`` whose cross-attention layers dispatch to ``hooks``.

    ``on_run_start()`` is called when a sampling run with the clone starts (ComfyUI's
    ON_PRE_RUN callback), e.g. to reset recorders.  The input model is not touched.
    """
    layers = cross_attention_layers(model)
    m = model.clone()
    existing = m.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
    for layer in layers:
        key = layer.key
        previous = existing.get(key, existing.get(key[:2]))
        m.set_model_attn2_replace(_make_replace(hooks, layer, previous), key[0], key[1], key[2])
    if on_run_start is not None:
        m.add_callback_with_key(comfy.patcher_extension.CallbacksMP.ON_PRE_RUN, HOOK_KEY,
                                lambda patcher: on_run_start())
    return m


def cross_attention_widths(model) -> list:
    """Output width of ``to_k`` of every cross-attention layer, in forward order."""
    dm = model.get_model_object("diffusion_model")
    out = []
    for layer in cross_attention_layers(model):
        name, i, j = layer.key
        blk = dm.middle_block if name == "middle" else (dm.input_blocks if name == "input" else dm.output_blocks)[i]
        st = next(m for m in blk if hasattr(m, "transformer_blocks"))
        out.append(int(st.transformer_blocks[j].attn2.to_k.weight.shape[0]))
    return out
