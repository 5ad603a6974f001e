"""InstructBrush's protocol on diffusers models (tests, the toy benchmark, library use).

:class:`DiffusersIP2P` is the ``predict_eps`` of :func:`.instructbrush.learn` over a diffusers
InstructPix2Pix ``UNet2DConditionModel`` with PhotoOps' attention hooks installed; the ComfyUI
counterpart is ``nodes/comfy/ip2p.py`` (``ComfyIP2PEps``).  Sits next to
``concept_diffusers.py`` (Concept Learn's diffusers adapter).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .diffusers_adapter import cross_attention_layers, install_attention_hooks
from .instructbrush import KVCapture
from .protocol import CallInfo

__all__ = ["DiffusersIP2P"]


class DiffusersIP2P:
    """``predict_eps`` over a diffusers InstructPix2Pix ``UNet2DConditionModel`` with hooks.

    ``cond`` / ``uncond``: text features [1, L, D] of P0 and of the empty prompt. Calls are
    ``unet(cat([z_t, image]), t, text)``; ``image=None`` is the zero image. The hook registry's
    CallInfo carries the timestep (``extra["timestep"]``) for the time-aware copies: rows are
    batched per ``range_fn(t)`` (default: per distinct t; pass ``instruction.range_of`` to batch
    all rows of one time range in one call).
    """

    def __init__(self, unet, cond, uncond, hooks, schedule=None, range_fn: Callable | None = None):
        self.unet, self.cond, self.uncond, self.hooks = unet, cond, uncond, hooks
        self.holder = install_attention_hooks(unet, hooks)
        self.schedule = schedule
        self.range_fn = range_fn or (lambda t: t)

    def _ensure_installed(self):
        """Re-install our processors if another adapter took over the same UNet since."""
        procs = self.unet.attn_processors
        if not any(getattr(p, "holder", None) is self.holder for p in procs.values()):
            self.holder = install_attention_hooks(self.unet, self.hooks)

    def __call__(self, zt, t, image, text: bool):
        self._ensure_installed()
        b = zt.shape[0]
        img = torch.zeros_like(zt[:, : self.image_channels]) if image is None else image
        ctx = (self.cond if text else self.uncond).expand(b, -1, -1)
        t = torch.as_tensor(t).reshape(-1).expand(b)
        # one call per time range (``range_fn``), so the time-aware copy is exact for every row
        groups = {}
        for i, tv in enumerate(t.tolist()):
            groups.setdefault(self.range_fn(tv), []).append(i)
        if len(groups) == 1:
            return self._call(zt, t, img, ctx)
        outs = torch.empty_like(zt)
        for rows in groups.values():
            sel = torch.tensor(rows, device=zt.device)
            outs = outs.index_copy(0, sel, self._call(zt[sel], t[sel], img[sel], ctx[sel]).to(outs.dtype))
        return outs

    def _call(self, zt, t, img, ctx):
        t0 = float(t[0])
        self.holder.call = CallInfo(sigma=float(self.schedule.sigma(t0)) if self.schedule is not None else 0.0,
                                    chunks=[0], rows_per_chunk=zt.shape[0], latent_hw=tuple(zt.shape[-2:]),
                                    extra={"timestep": t0})
        try:
            return self.unet(torch.cat([zt, img], 1), t, ctx).sample
        finally:
            self.holder.call = None

    @property
    def image_channels(self) -> int:
        return self.unet.config.in_channels - self.unet.config.out_channels

    def layers(self):
        return cross_attention_layers(self.unet)

    def capture(self, positions: Sequence[int]) -> tuple:
        """(k0, v0) of P0's tokens ``positions`` in every layer: one forward with a KVCapture hook."""
        cap = KVCapture(positions)
        self.hooks.add(cap)
        try:
            with torch.no_grad():
                c = self.unet.config
                h = w = c.sample_size
                p = next(self.unet.parameters())
                z = torch.zeros(1, c.out_channels, h, w, device=p.device, dtype=p.dtype)
                self(z, torch.tensor([0], device=p.device), None, True)
        finally:
            self.hooks.remove(cap)
        return cap.k, cap.v
