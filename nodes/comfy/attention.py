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


def _sigma_of(extra_options, default: float) -> float:
    """The step's sigma from an attention patch's ``extra_options`` (``default`` when absent)."""
    sig = extra_options.get("sigmas")
    if isinstance(sig, torch.Tensor):
        return float(sig.flatten()[0])
    return default if sig is None else float(sig)


def _call_info(q, extra_options) -> CallInfo:
    # row indices in the guider's conditioning list: our CombineGuider keeps them under
    # "photoops_rows" (it shows other packs core's 0/1 flags); other guiders use the indices
    chunks = list(extra_options.get("photoops_rows") or extra_options.get("cond_or_uncond") or [0])
    sigma = _sigma_of(extra_options, 0.0)
    step, total = step_of_sigma(sigma, extra_options.get("sample_sigmas"))
    shape = extra_options.get("original_shape")
    return CallInfo(sigma=sigma, chunks=chunks, rows_per_chunk=q.shape[0] // max(len(chunks), 1),
                    latent_hw=tuple(shape[-2:]), step=step, total_steps=total)


class PhotoOpsAttn2Replace:
    """The ``attn2`` replace PhotoOps installs on one cross-attention block.

    Computes the layer's attention (through ``previous``, another pack's replace that was there
    first, else core's ``optimized_attention``) and lets the kernels' hooks record or modify it.

    It also speaks the patch protocol other packs use to *add* to an existing replace
    (ComfyUI_IPAdapter_plus calls ``replace.add(callback, **kwargs)`` when the block already has
    one): added callbacks run after the attention, ``out += callback(out, q, k, v, extra_options,
    **kwargs)`` while the step's sigma is in ``[sigma_end, sigma_start]``, as in that pack's own
    patch, so an IP-Adapter applied *after* a PhotoOps node works.

    ``ModelPatcher.clone()`` deep-copies the model options: a copy shares ``hooks`` (the recorders
    and overrides the PhotoOps node holds keep seeing every call of every clone) but gets its own
    list of added callbacks, so another pack adding to a clone leaves the original MODEL as it was.
    """

    def __init__(self, hooks: AttentionHooks, layer: LayerInfo, previous=None):
        self.hooks, self.photoops_layer, self.previous = hooks, layer, previous
        self.callbacks, self.kwargs = [], []

    def __deepcopy__(self, memo):
        import copy

        new = PhotoOpsAttn2Replace(self.hooks, self.photoops_layer, copy.deepcopy(self.previous, memo))
        new.callbacks, new.kwargs = list(self.callbacks), [dict(k) for k in self.kwargs]
        memo[id(self)] = new
        return new

    def add(self, callback, **kwargs):
        self.callbacks.append(callback)
        self.kwargs.append(kwargs)

    def to(self, device, *args, **kwargs):
        if self.previous is not None and hasattr(self.previous, "to"):
            self.previous.to(device, *args, **kwargs)
        return self

    def _attend(self, q, k, v, extra_options):
        if self.previous is not None:
            return self.previous(q, k, v, extra_options)
        return optimized_attention(q, k, v, extra_options["n_heads"], attn_precision=extra_options.get("attn_precision"),
                                   transformer_options=extra_options)

    def __call__(self, q, k, v, extra_options):
        if len(self.hooks):
            out = self.hooks(q, k, v, extra_options["n_heads"], self.photoops_layer, _call_info(q, extra_options),
                             lambda q_, k_, v_: self._attend(q_, k_, v_, extra_options))
        else:
            out = self._attend(q, k, v, extra_options)
        if self.callbacks:
            sigma = _sigma_of(extra_options, float("inf"))
            dtype = out.dtype
            for cb, kw in zip(self.callbacks, self.kwargs):
                if kw.get("sigma_end", -float("inf")) <= sigma <= kw.get("sigma_start", float("inf")):
                    out = out + cb(out, q, k, v, extra_options, **kw)
            out = out.to(dtype)
        return out


def attach_attention_hooks(model, hooks: AttentionHooks, on_run_start=None):
    """A clone of ``model`` whose cross-attention layers dispatch to ``hooks``.

    ``on_run_start()`` is called when a sampling run with the clone starts (ComfyUI's
    ON_PRE_RUN callback), e.g. to reset recorders.  The input model is not touched.
    """
    layers = cross_attention_layers(model)
    m = model.clone()
    existing = dict(m.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {}))
    per_block = {}
    for layer in layers:
        per_block[layer.key[:2]] = per_block.get(layer.key[:2], 0) + 1
    for layer in layers:
        key = layer.key
        previous = existing.get(key, existing.get(key[:2]))
        replace = PhotoOpsAttn2Replace(hooks, layer, previous)
        m.set_model_attn2_replace(replace, key[0], key[1], key[2])
        if per_block[key[:2]] == 1:
            # blocks with one transformer are also keyed (block, number), as other packs key them
            # (IPAdapter_plus on SD1.x): they then find this replace and add to it
            m.set_model_attn2_replace(replace, key[0], key[1])
    if on_run_start is not None:
        m.add_callback_with_key(comfy.patcher_extension.CallbacksMP.ON_PRE_RUN, HOOK_KEY,
                                lambda patcher: on_run_start())
    return m


class ContextWatch:
    """Compares, on the first model call of each sampling run that evaluates cond ``cond_index``,
    the text context the UNet receives for that cond with ``reference`` (the encoding of the
    prompt a node was given); calls ``on_mismatch(message)`` once per run when they differ.

    Installed as a ``DIFFUSION_MODEL`` wrapper (several wrappers compose; nothing is replaced).
    The tolerance (1 % of the reference's largest value) absorbs fp16 / bf16 casts, not another
    prompt.  Call :meth:`reset` when a run starts.
    """

    def __init__(self, reference: torch.Tensor, cond_index: int, on_mismatch):
        self.reference = reference.detach().float().cpu()
        self.cond_index, self.on_mismatch = cond_index, on_mismatch
        self.checked = False
        self.mismatch = None

    def reset(self):
        self.checked = False

    def describe(self, ctx: torch.Tensor):
        ref = self.reference[0]
        if tuple(ctx.shape) != tuple(ref.shape):
            return (f"the conditioning has {ctx.shape[0]} tokens of width {ctx.shape[-1]}, the prompt's encoding "
                    f"{ref.shape[0]} of width {ref.shape[-1]}")
        diff = float((ctx.float().cpu() - ref).abs().max())
        if diff > 1e-2 * float(ref.abs().max()):
            return f"the conditioning differs from the prompt's encoding (max difference {diff:.3g})"
        return None

    def __call__(self, executor, x, timesteps, context, *args, **kwargs):
        if not self.checked and isinstance(context, torch.Tensor):
            opts = args[2] if len(args) > 2 else kwargs.get("transformer_options", {})
            rows = list(opts.get("photoops_rows") or opts.get("cond_or_uncond") or [])
            if self.cond_index in rows:
                self.checked = True
                per = context.shape[0] // max(len(rows), 1)
                problem = self.describe(context[rows.index(self.cond_index) * per])
                self.mismatch = problem
                if problem is not None:
                    self.on_mismatch(problem)
        return executor(x, timesteps, context, *args, **kwargs)


def watch_context(model, watch: ContextWatch) -> None:
    """Install ``watch`` on ``model`` (a clone the caller owns) as a DIFFUSION_MODEL wrapper."""
    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, HOOK_KEY + "_context", watch)


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
