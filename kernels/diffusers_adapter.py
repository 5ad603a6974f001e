"""The protocol on a diffusers ``UNet2DConditionModel`` (tests and library users).

* :class:`DiffusersDenoiser` implements :class:`~.protocol.Denoiser`: the k-diffusion
  sample ``x`` at ``sigma`` is fed to the UNet as ``x / sqrt(1 + sigma^2)`` (S3) at the
  discrete timestep nearest to ``sigma`` (S4), and the output is turned into x0 as
  ComfyUI's ``model_sampling`` does:

      eps:  x0 = x - sigma * eps                                   (D1)
      v:    x0 = x / (1 + sigma^2) - v * sigma / sqrt(1 + sigma^2)  (D2)

* :func:`install_attention_hooks` swaps the processors of the cross-attention layers
  (``attn2``) for :class:`HookedCrossAttnProcessor`, which projects q/k/v like diffusers'
  ``AttnProcessor2_0`` and dispatches to an :class:`~.attention.AttentionHooks`.

diffusers is imported lazily, so ``kernels`` itself does not depend on it.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .attention import AttentionHooks
from .protocol import CallInfo, LayerInfo, UnsupportedModelError
from .schedule import VPSchedule

__all__ = ["DiffusersDenoiser", "HookedCrossAttnProcessor", "install_attention_hooks", "cross_attention_layers"]

_PLACE_RANK = {"down": 0, "mid": 1, "up": 2}


def _place_of(name: str) -> str:
    if name.startswith("down_blocks"):
        return "down"
    if name.startswith("mid_block"):
        return "mid"
    if name.startswith("up_blocks"):
        return "up"
    raise UnsupportedModelError(f"unexpected attention layer {name!r}: not a UNet2DConditionModel layout")


def cross_attention_layers(unet) -> list:
    """LayerInfo of every cross-attention layer, in forward order (down, mid, up)."""
    names = [n[: -len(".processor")] for n in unet.attn_processors if n.endswith("attn2.processor")]
    if not names:
        raise UnsupportedModelError("the UNet has no cross-attention layers")

    def sort_key(name):
        parts = name.split(".")
        nums = [int(p) for p in parts if p.isdigit()]
        return (_PLACE_RANK[_place_of(name)], nums)

    ordered = sorted(names, key=sort_key)
    return [LayerInfo(key=n, place=_place_of(n), order=i) for i, n in enumerate(ordered)]


class _CallHolder:
    """Shared mutable slot: the current CallInfo, set by the denoiser around a UNet call."""

    def __init__(self):
        self.call: Optional[CallInfo] = None


class HookedCrossAttnProcessor:
    """Cross-attention processor that routes the attention math through the hooks."""

    def __init__(self, layer: LayerInfo, hooks: AttentionHooks, holder: _CallHolder):
        self.layer, self.hooks, self.holder = layer, hooks, holder

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs):
        residual = hidden_states
        if getattr(attn, "spatial_norm", None) is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        if attention_mask is not None:
            raise NotImplementedError("attention masks are not supported in hooked cross-attention")
        if getattr(attn, "group_norm", None) is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)

        q = attn.to_q(hidden_states)
        k = attn.to_k(encoder_hidden_states)
        v = attn.to_v(encoder_hidden_states)
        heads = attn.heads

        def attend(q, k, v):
            bsz, L, inner = q.shape
            d = inner // heads
            qh = q.view(bsz, -1, heads, d).transpose(1, 2)
            kh = k.view(bsz, -1, heads, d).transpose(1, 2)
            vh = v.view(bsz, -1, heads, d).transpose(1, 2)
            o = F.scaled_dot_product_attention(qh, kh, vh, dropout_p=0.0, is_causal=False)
            return o.transpose(1, 2).reshape(bsz, -1, heads * d).to(q.dtype)

        call = self.holder.call
        if call is None or not len(self.hooks):
            out = attend(q, k, v)
        else:
            out = self.hooks(q, k, v, heads, self.layer, call, attend)

        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def install_attention_hooks(unet, hooks: AttentionHooks) -> _CallHolder:
    """Install hooked processors on every cross-attention layer of ``unet``.

    Returns the holder whose ``call`` attribute the caller sets around each UNet call
    (:class:`DiffusersDenoiser` does this).  Self-attention layers keep their processor.
    """
    holder = _CallHolder()
    layers = {l.key: l for l in cross_attention_layers(unet)}
    procs = {}
    for name, proc in unet.attn_processors.items():
        key = name[: -len(".processor")]
        procs[name] = HookedCrossAttnProcessor(layers[key], hooks, holder) if key in layers else proc
    unet.set_attn_processor(procs)
    return holder


def _lcm_repeat(contexts: Sequence[torch.Tensor]) -> list:
    """Bring contexts of different lengths to their LCM by repetition (as ComfyUI does)."""
    lengths = [c.shape[1] for c in contexts]
    lcm = 1
    for n in lengths:
        lcm = lcm * n // math.gcd(lcm, n)
    return [c.repeat(1, lcm // c.shape[1], 1) if c.shape[1] != lcm else c for c in contexts]


class DiffusersDenoiser:
    """:class:`~.protocol.Denoiser` over a diffusers UNet2DConditionModel.

    ``conds`` entries are text-embedding tensors ``[B or 1, T, D]`` or dicts with
    ``encoder_hidden_states`` and optional ``added_cond_kwargs`` (SDXL).
    ``cond_ids`` (default ``0..n-1``) labels each entry for the attention hooks' CallInfo.
    """

    def __init__(self, unet, schedule: VPSchedule, prediction_type: str = "epsilon",
                 hooks: Optional[AttentionHooks] = None):
        if prediction_type not in ("epsilon", "v_prediction"):
            raise UnsupportedModelError(f"prediction type {prediction_type!r} is not supported (epsilon, v_prediction)")
        self.unet, self.schedule, self.prediction_type = unet, schedule, prediction_type
        self.hooks = hooks
        self.holder = install_attention_hooks(unet, hooks) if hooks is not None else None

    @torch.no_grad()
    def predict_x0(self, x, sigma, conds, cond_ids=None, step=None, total_steps=None) -> list:
        return self.predict_x0_keep_graph(x, sigma, conds, cond_ids, step, total_steps)

    def predict_x0_keep_graph(self, x, sigma, conds, cond_ids=None, step=None, total_steps=None) -> list:
        """:meth:`predict_x0` without ``no_grad``: the result keeps the autograd graph (for training)."""
        if not conds:
            raise ValueError("predict_x0 needs at least one conditioning")
        sig = torch.as_tensor(sigma, dtype=torch.float64).flatten().cpu()
        sigma_f = float(sig[0])
        B = x.shape[0]
        if sig.numel() not in (1, B):
            raise ValueError(f"sigma has {sig.numel()} values for a batch of {B}")
        per_row = sig.expand(B).clone()                      # per-row sigmas are allowed
        ctx, added = [], []
        for c in conds:
            if isinstance(c, dict):
                e, a = c["encoder_hidden_states"], c.get("added_cond_kwargs")
            else:
                e, a = c, None
            if e.shape[0] not in (1, B):
                raise ValueError(f"conditioning batch {e.shape[0]} does not match latent batch {B}")
            ctx.append(e.expand(B, -1, -1))
            added.append(a)
        ctx = _lcm_repeat(ctx)
        n = len(conds)
        shape = (-1,) + (1,) * (x.ndim - 1)
        s_row = per_row.to(x.dtype).to(x.device).view(shape)
        x_in = (x / (1.0 + s_row ** 2).sqrt()).repeat(n, *([1] * (x.ndim - 1)))
        t = self.schedule.timestep(per_row).to(x.device).repeat(n)
        kwargs = {}
        if any(a is not None for a in added):
            kwargs["added_cond_kwargs"] = {
                k: torch.cat([a[k].expand(B, *a[k].shape[1:]) for a in added]) for k in added[0]}
        if self.holder is not None:
            self.holder.call = CallInfo(sigma=sigma_f, chunks=list(cond_ids if cond_ids is not None else range(n)),
                                        rows_per_chunk=B, latent_hw=tuple(x.shape[-2:]), step=step,
                                        total_steps=total_steps)
        try:
            out = self.unet(x_in.to(self.unet.dtype), t, encoder_hidden_states=torch.cat(ctx).to(self.unet.dtype),
                            **kwargs).sample.to(x.dtype)
        finally:
            if self.holder is not None:
                self.holder.call = None
        xs = x.repeat(n, *([1] * (x.ndim - 1)))
        sr = s_row.repeat(n, *([1] * (x.ndim - 1)))
        if self.prediction_type == "epsilon":
            x0 = xs - sr * out                                                        # (D1)
        else:
            x0 = xs / (1.0 + sr ** 2) - out * sr / (1.0 + sr ** 2).sqrt()            # (D2)
        return list(x0.chunk(n))
