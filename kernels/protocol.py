"""The small protocol every PhotoOps method runs against.

Methods in ``kernels`` never touch a concrete model.  They see

* a :class:`Denoiser` view: x0 (and from it eps) predictions at a sigma for a batch
  of conditionings, in the k-diffusion form ``x = x0 + sigma * eps`` that ComfyUI's
  samplers use, plus the model's :class:`~.schedule.VPSchedule`;
* an attention-hook registry (:mod:`.attention`) that adapters call from inside every
  cross-attention layer, described by a :class:`LayerInfo` and a :class:`CallInfo`.

Two adapters implement it: ``nodes/comfy_adapter.py`` (ComfyUI ModelPatcher) and
``kernels/diffusers_adapter.py`` (diffusers ``UNet2DConditionModel``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable, Optional, Protocol, Sequence, runtime_checkable

import torch

from .schedule import VPSchedule

__all__ = ["Denoiser", "LayerInfo", "CallInfo", "UnsupportedModelError", "eps_from_x0", "x0_from_eps"]


class UnsupportedModelError(ValueError):
    """Raised for model families the methods are not defined for (Flux, SD3, ...)."""


def eps_from_x0(x: torch.Tensor, x0: torch.Tensor, sigma) -> torch.Tensor:
    """eps = (x - x0) / sigma   (k-diffusion form; sigma > 0)."""
    return (x - x0) / sigma


def x0_from_eps(x: torch.Tensor, eps: torch.Tensor, sigma) -> torch.Tensor:
    """x0 = x - sigma * eps."""
    return x - sigma * eps


@runtime_checkable
class Denoiser(Protocol):
    """x0 predictions for a batch of conditionings.

    ``predict_x0(x, sigma, conds)`` returns one tensor shaped like ``x`` per entry of
    ``conds``; an adapter should evaluate them in as few model calls as it can (one
    batched call where memory allows).  ``sigma`` is a 0-d or 1-element tensor.
    """

    schedule: VPSchedule

    def predict_x0(self, x: torch.Tensor, sigma: torch.Tensor, conds: Sequence) -> list:
        ...


@dataclass(frozen=True)
class LayerInfo:
    """Identity of one cross-attention layer, the same in both adapters.

    ``place`` is ``"down"``, ``"mid"`` or ``"up"``; ``order`` is the layer's position in
    the UNet's forward pass (0-based over cross-attention layers); ``key`` is the
    adapter's own name (a ComfyUI block tuple or a diffusers module path).
    """

    key: Hashable
    place: str
    order: int


@dataclass
class CallInfo:
    """What an attention hook knows about the current model call.

    ``chunks`` lists, per batch chunk of ``rows_per_chunk`` rows, which conditioning it
    belongs to: 0 = positive, 1 = negative (ComfyUI's ``cond_or_uncond``), 2+ = extra
    conditionings (e.g. SEGA concepts).  ``latent_hw`` is the latent's spatial size,
    used to fold a layer's query sequence back into a 2-D map.
    """

    sigma: float
    chunks: list
    rows_per_chunk: int
    latent_hw: tuple
    step: Optional[int] = None
    total_steps: Optional[int] = None
    extra: dict = field(default_factory=dict)

    def rows_of(self, cond_index: int) -> list:
        """Row indices of the batch that belong to conditioning ``cond_index``."""
        rows = []
        for c, idx in enumerate(self.chunks):
            if idx == cond_index:
                rows.extend(range(c * self.rows_per_chunk, (c + 1) * self.rows_per_chunk))
        return rows

    @property
    def progress(self) -> Optional[float]:
        """Fraction of sampling done at this call (0 at the first step), if known."""
        if self.step is None or not self.total_steps:
            return None
        return self.step / max(self.total_steps, 1)


def step_of_sigma(sigma: float, sample_sigmas: Optional[torch.Tensor]) -> tuple:
    """(step index, number of steps) of ``sigma`` in a sampler's sigma list.

    Keyed by the nearest entry, since samplers evaluate at exactly the listed sigmas
    (second-order samplers also evaluate in between; those calls map to the nearest).
    """
    if sample_sigmas is None or len(sample_sigmas) < 2:
        return None, None
    s = torch.as_tensor(sample_sigmas, dtype=torch.float64).flatten()
    steps = len(s) - 1
    i = int((s[:steps] - float(sigma)).abs().argmin())
    return i, steps
