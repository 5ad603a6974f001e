"""Eta schedules for Eta Inversion: time functions, presets and region masks.

Spec: ``eta-inversion.md`` §4 (shape of the time function, presets), §4.2 and §6
(region maps).  Equations referenced below:

    u = t / 999                                                        (E-u)
    eta(t) = max(0, y1 + (y2 - y1) * ((clip(u, u1, u2) - u1) / (u2 - u1)) ** q)   (E-1, §4.1)
    eta_map = M * eta(t),   M in {0, 1}^[B, 1, h, w]                   (E-2, §4.2)

(E-u): the reference builds a 1000-entry table ``linspace(0, 1, 1000)`` indexed by the
integer timestep, i.e. ``u = t / 999``.  We evaluate (E-1) directly at ``t / 999``, which
equals the table entry for integer ``t`` up to float rounding and extends it to
fractional timesteps (our choice; the reference has integer timesteps only).

Per-step values are evaluated at each sampling step's *starting* sigma, mapped to a
discrete timestep the way ComfyUI does (:meth:`VPSchedule.timestep`, S4): in the
reference the step ``t -> p`` uses ``eta(t)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .schedule import VPSchedule

__all__ = [
    "PRESETS",
    "T_SCALE",
    "EtaFunction",
    "EtaPoints",
    "custom_points",
    "eta_time_function",
    "eta_with_mask",
    "per_step_eta",
]

T_SCALE = 999.0
"""(E-u) normalised time ``u = t / T_SCALE``."""


def _as_u(t):
    if isinstance(t, torch.Tensor):
        return t.to(torch.float64) / T_SCALE, True
    return torch.as_tensor(float(t), dtype=torch.float64) / T_SCALE, False


def _check_unit(name: str, v: float, lo: float = 0.0, hi: float = 1.0) -> float:
    v = float(v)
    if not math.isfinite(v) or v < lo or v > hi:
        raise ValueError(f"{name} must be a number in [{lo}, {hi}], got {v}")
    return v


@dataclass(frozen=True)
class EtaFunction:
    """(E-1) clipped piecewise power: ``y1`` below ``u1``, power ramp to ``y2`` at ``u2``, ``y2`` above.

    Call it with a timestep ``t`` (int, float or tensor; fractional allowed).  Returns a
    Python float for a scalar, a float64 tensor for a tensor.  Parameters are kept so
    that a UI can draw the curve.  ``y`` values are restricted to [0, 1] (the range the
    papers use; eta > 1 has no meaning in the DDIM step).
    """

    u1: float
    y1: float
    u2: float
    y2: float
    power: float = 1.0

    def __post_init__(self):
        u1 = _check_unit("u1", self.u1)
        u2 = _check_unit("u2", self.u2)
        _check_unit("y1", self.y1)
        _check_unit("y2", self.y2)
        if not u1 < u2:
            raise ValueError(f"eta time function needs u1 < u2, got u1={u1}, u2={u2}")
        p = float(self.power)
        if not math.isfinite(p) or p <= 0:
            raise ValueError(f"eta power must be > 0, got {self.power}")

    def __call__(self, t):
        u, is_tensor = _as_u(t)
        w = ((u.clamp(self.u1, self.u2) - self.u1) / (self.u2 - self.u1)) ** self.power
        eta = (self.y1 + (self.y2 - self.y1) * w).clamp_min(0.0)        # (E-1)
        return eta if is_tensor else float(eta)


@dataclass(frozen=True)
class EtaPoints:
    """Piecewise-linear eta through user points ``(u, eta)``, constant outside them.

    Our extension for custom curves (the papers only use :class:`EtaFunction`).  Points
    are sorted by ``u``; ``u`` values must be distinct, ``u`` and ``eta`` in [0, 1].
    """

    points: tuple

    def __post_init__(self):
        pts = tuple(sorted((_check_unit("u", u), _check_unit("eta", e)) for u, e in self.points))
        if not pts:
            raise ValueError("custom eta curve needs at least one (u, eta) point")
        us = [u for u, _ in pts]
        if len(set(us)) != len(us):
            raise ValueError(f"custom eta points must have distinct u values, got {us}")
        object.__setattr__(self, "points", pts)

    def __call__(self, t):
        u, is_tensor = _as_u(t)
        us = torch.tensor([p[0] for p in self.points], dtype=torch.float64)   # cpu: curve knots (a schedule)
        ys = torch.tensor([p[1] for p in self.points], dtype=torch.float64)   # cpu: curve knots (a schedule)
        if len(self.points) == 1:
            out = torch.full_like(u, float(ys[0]))
        else:
            uc = u.clamp(float(us[0]), float(us[-1]))
            hi = torch.searchsorted(us, uc.contiguous(), right=False).clamp(1, len(us) - 1)
            lo = hi - 1
            w = (uc - us[lo]) / (us[hi] - us[lo])
            out = ys[lo] + w * (ys[hi] - ys[lo])
        return out if is_tensor else float(out)


def eta_time_function(u1: float, y1: float, u2: float, y2: float, power: float = 1.0) -> EtaFunction:
    """(E-1) eta(t) of eta-inversion.md §4.1 with points ``(u1, y1)``, ``(u2, y2)`` and power ``q``."""
    return EtaFunction(u1, y1, u2, y2, power)


def custom_points(points: Sequence) -> EtaPoints:
    """Piecewise-linear eta(t) through ``[(u, eta), ...]`` with ``u = t / 999`` (our extension)."""
    return EtaPoints(tuple((float(u), float(e)) for u, e in points))


PRESETS = {
    # eta-inversion.md §4.1 table (furiosa-ai/eta-inversion cfg/eval/paper_ptp.yaml and the class default)
    "paper_A": EtaFunction(0.6, 0.0, 1.0, 0.7),
    "paper_B": EtaFunction(0.3, 0.0, 1.0, 0.2),
    "linear_default": EtaFunction(0.0, 0.0, 1.0, 0.4),
}


def per_step_eta(fn: Callable, sigmas, schedule: VPSchedule) -> torch.Tensor:
    """eta for each sampling step: ``fn(schedule.timestep(sigmas[i]))`` for ``i < N``.

    ``sigmas`` is the sampling list (descending, length ``N + 1``); step ``i`` goes from
    ``sigmas[i]`` to ``sigmas[i+1]`` and uses the eta of its starting timestep (§3 step 2:
    ``eta_t = eta_fn(t)`` for the step ``t -> p``).  Returns float32 ``[N]`` (float32
    so that the masked maps of :func:`eta_with_mask` hold exactly the same values).
    """
    s = torch.as_tensor(sigmas).detach().to("cpu", torch.float64).flatten()
    if s.numel() < 2:
        raise ValueError("sigmas must hold at least two values (one step)")
    t = schedule.timestep(s[:-1]).to(torch.float64)
    vals = fn(t)
    vals = torch.as_tensor(vals, dtype=torch.float64).reshape(-1)
    if vals.numel() != s.numel() - 1:
        raise ValueError("the eta function must map a tensor of timesteps to one value per timestep")
    if not torch.isfinite(vals).all() or (vals < 0).any():
        raise ValueError("eta values must be finite and >= 0")
    return vals.to(torch.float32)


def eta_with_mask(eta_steps, mask: torch.Tensor) -> torch.Tensor:
    """(E-2) per-step eta maps ``[N, B, 1, h, w] = mask * eta_i``.

    ``mask`` is ``[B, 1, h, w]`` or ``[B, h, w]`` at latent size with values in [0, 1];
    the papers use a binary mask (``M = [A_src > 0.2]``), soft values scale eta linearly
    (our extension).  The maps broadcast over latent channels (§1: "eta(t, pixel)
    broadcast over channels").  Output dtype: float32 (float64 if the mask is float64).
    """
    e = torch.as_tensor(eta_steps).reshape(-1)
    m = torch.as_tensor(mask)
    if m.ndim == 3:
        m = m.unsqueeze(1)
    if m.ndim != 4 or m.shape[1] != 1:
        raise ValueError(f"eta mask must be [B, 1, h, w] or [B, h, w], got shape {tuple(mask.shape)}")
    dtype = torch.float64 if m.dtype == torch.float64 else torch.float32
    m = m.to(dtype)
    if not torch.isfinite(m).all() or (m < 0).any() or (m > 1).any():
        raise ValueError("eta mask values must lie in [0, 1]")
    e = e.to(dtype=dtype, device=m.device)
    return e.reshape(-1, 1, 1, 1, 1) * m.unsqueeze(0)
