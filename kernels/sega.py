"""SEGA semantic guidance and LEDITS++ implicit masks, in noise (eps) space.

Spec: ``ddpm-inversion-sega-ledits.md`` (cited "§").  Everything here combines noise
predictions ``[B, C, H, W]`` of one model call at one step: ``e_u`` (unconditional or
negative prompt), ``e_t`` (target prompt, optional) and ``e_c`` per edit concept.  A
ComfyUI guider that sees denoised predictions ``D`` converts them first with
``eps = (x - D) / sigma`` and back with ``D_hat = x - sigma * e_hat`` (§2.4): the momentum
lives in eps units, so SEGA must not be run on ``D`` differences.

SEGA (Brack et al. 2301.12247; §2.1), step ``i`` (0-based, counted over the steps that are
actually run), concept ``c``::

    g_p       = w (e_t - e_u)                                                    (S1)
    psi_c     = (-1 if reverse_c else 1) * s_e,c * (e_c - e_u)                   (S2)
    q_c[b,ch] = quantile(|psi_c[b,ch]| over H*W, lambda_c)   (linear, fp32)      (S3)
    gamma_c   = psi_c * [|psi_c| >= q_c]     (0 for i >= cooldown_c)              (S4)
    A         = {c : i >= warmup_c}          ("active", warmed up)                (S5)
    g_all     = sum_c w_c gamma_c + s_m nu                                        (S6)
    nu       := beta_m nu + (1 - beta_m) g_all         (every step, nu_0 = 0)     (S7)
    g_sem     = g_all                                   if A = all concepts
              = sum_{c in A} (w_c / sum_{c' in A} w_c') gamma_c   if 0 < |A| < C
              = 0                                       if A is empty             (S8)
    e_hat     = e_u + (g_p + g_sem)                                               (S9)

(S2) is the paper's eq. 6 direction with scale ``s_e``; (S3)-(S4) the per-channel
percentile threshold ``lambda`` (paper eq. 6 mask, §2.1 step 2; ``>=`` keeps ties); (S6)-(S7)
momentum, paper eqs. 7-9 with ``s_m`` and ``beta_m`` (note ``g_all`` already contains
``s_m nu`` when it is folded into ``nu``, as in the reference); (S8) the partial-warm-up
renormalisation of §2.1 step 4, no momentum there.  A concept past its cool-down has weight
0 in (S8)'s renormalisation (as in diffusers, where its weight is never set).  If the
renormalising sum is 0 (all active weights 0) the partial term is 0 instead of NaN (NaN
guard).  ``w`` and ``s_e`` are not coupled: with ``require_cfg_for_sega=True`` and
``w <= 1`` the reference pipeline skips guidance altogether and returns the target
prediction alone (§2.1 step 6); that is offered, off by default.

Other parameterisations (rectified flow, spec ``rectified-flow.md`` §4.1): at fixed ``(x, s)`` eps, v and the
denoised ``D`` are affine images of each other with scalar coefficients, so (S1)-(S5), (S8) and (S9)
give the same result in any of them (percentile masks are invariant to a per-step scalar); only the
momentum (S6)-(S7), which sums guidance across steps, is not.  :meth:`SemanticGuidance.guide` therefore
takes ``unit``: the factor that turns a difference of its inputs into an eps difference
(``e_c - e_u = unit * (in_c - in_u)``; 1 for eps inputs, ``-(1-s)/s`` for flow ``D`` inputs).  The
momentum ``nu`` is kept in eps units [spec §4.1's choice, so SD's ``s_m`` / ``beta_m`` keep their meaning]::

    g_all = sum_c w_c gamma_c + s_m nu / unit           (input units)             (S6')
    nu   := beta_m nu + (1 - beta_m) unit g_all          (eps units)               (S7')

At ``unit = 0`` (flow ``s = 1``: eps = x whatever D is, so no eps guidance can act) the step is guided
without momentum and ``nu`` is left unchanged [ours].

LEDITS++ (Brack et al. CVPR 2024, 2311.16711; §4.4), per concept, no target CFG, no momentum::

    psi_c  = (-1 if reverse_c else 1) * s_e,c * (e_c - e_u)                      (L1)
    A'     = blur3x3(A_c)            (A_c = token-summed cross-attention map)      (L2)
    M1     = up_nearest([A' >= quantile(A', lambda_c)])  per image, all channels  (L3)
    a      = sum_ch |psi_c|                                                       (L4)
    M2     = [a >= quantile(a, lambda_c)]                per image, all channels  (L5)
    M      = M1 * M2  if intersect and t <= t_max, else M1 (cross-attn) or M2     (L6)
    e_hat  = e_u + sum_{c: warmup_c <= i < cooldown_c} psi_c * M_c                (L7)

Blur: the reference builds its 3x3 kernel from ``exp(-((x - m) / (2 sigma))^2)`` with a
nominal ``sigma = 0.5``; that is a standard Gaussian ``exp(-(x-m)^2 / (2 s^2))`` with
``s = sigma * sqrt(2)``.  :data:`LEDITS_BLUR_SIGMA` is that effective value, so the masks
agree with diffusers' (reflect padding, kernel normalised to sum 1).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from einops import reduce, repeat

from .maps import gaussian_blur, keep_mask, resize_map

__all__ = [
    "EditConcept", "SemanticGuidance", "percentile_mask", "concept_direction",
    "cross_attention_mask", "noise_estimate_mask", "ledits_pp_guidance", "check_steps",
    "LEDITS_BLUR_SIGMA", "LEDITS_INTERSECT_MAX_T",
]

LEDITS_BLUR_SIGMA = 0.5 * math.sqrt(2.0)   # effective sigma of the reference's "sigma 0.5" kernel
LEDITS_INTERSECT_MAX_T = 800               # diffusers intersects M1 and M2 only for t <= 800


@dataclass
class EditConcept:
    """Settings of one edit concept (§2.2, §4.5).

    scale: ``s_e`` (S2); any finite value, a negative scale equals ``reverse=True``.
    reverse: remove the concept instead of adding it.
    threshold: ``lambda`` in [0, 1); 0.95 keeps about the top 5 % per channel.
    warmup: first step (0-based) at which the concept is applied.
    cooldown: step from which it is no longer applied (None = never); must be > warmup.
    weight: ``w_c`` >= 0 in (S6), (S8).
    """

    scale: float = 5.0
    reverse: bool = False
    threshold: float = 0.9
    warmup: int = 0
    cooldown: Optional[int] = None
    weight: float = 1.0

    def __post_init__(self):
        self.scale = float(self.scale)
        self.threshold = float(self.threshold)
        self.weight = float(self.weight)
        if not math.isfinite(self.scale):
            raise ValueError(f"concept scale must be finite, got {self.scale}")
        if not 0.0 <= self.threshold < 1.0:
            raise ValueError(f"concept threshold must be in [0, 1), got {self.threshold}")
        if int(self.warmup) != self.warmup or self.warmup < 0:
            raise ValueError(f"concept warmup must be a non-negative integer, got {self.warmup}")
        self.warmup = int(self.warmup)
        if self.cooldown is not None:
            if int(self.cooldown) != self.cooldown or self.cooldown < 0:
                raise ValueError(f"concept cooldown must be a non-negative integer or None, got {self.cooldown}")
            self.cooldown = int(self.cooldown)
            if self.cooldown <= self.warmup:
                raise ValueError(f"concept cooldown ({self.cooldown}) must be greater than its warmup "
                                 f"({self.warmup}), or the concept is never applied")
        if not math.isfinite(self.weight) or self.weight < 0:
            raise ValueError(f"concept weight must be finite and >= 0, got {self.weight}")

    def warm(self, step: int) -> bool:
        return step >= self.warmup

    def cooled(self, step: int) -> bool:
        return self.cooldown is not None and step >= self.cooldown


def check_steps(concepts: Sequence[EditConcept], total_steps: int, note: str = "") -> None:
    """ValueError if a concept's warm-up would never end within the ``total_steps`` steps that run
    (warm-ups count from the first step that runs).  ``note`` says how the user's step count
    became ``total_steps`` (e.g. steps skipped by an inversion replay)."""
    for n, c in enumerate(concepts):
        if c.warmup >= total_steps:
            raise ValueError(f"concept {n}: warmup {c.warmup} is not below the {total_steps} steps that run"
                             + (f" ({note})" if note else "") + ", so it would never be applied")


def _stack(e_cs, like: torch.Tensor) -> torch.Tensor:
    if isinstance(e_cs, torch.Tensor):
        e = e_cs if e_cs.ndim == like.ndim + 1 else e_cs[None]
    else:
        e = torch.stack(list(e_cs)) if len(e_cs) else like.new_zeros((0, *like.shape))
    if e.shape[1:] != like.shape:
        raise ValueError(f"concept predictions {tuple(e.shape[1:])} do not match e_u {tuple(like.shape)}")
    return e


def concept_direction(e_c: torch.Tensor, e_u: torch.Tensor, concept: EditConcept) -> torch.Tensor:
    """(S2)/(L1): ``psi_c``."""
    psi = e_c - e_u
    if concept.reverse:
        psi = psi * -1
    return psi * concept.scale


def percentile_mask(psi: torch.Tensor, threshold: float, rule: str = "percentile", mass: float = 0.5) -> torch.Tensor:
    """(S3)-(S4) keep mask: ``|psi| >= quantile(|psi|, threshold)`` per batch item and channel (bool).

    ``rule``: :func:`~.maps.keep_mask` (``otsu`` / ``mass``: a region whose size follows |psi| [ours])."""
    a = psi.abs()
    if rule == "percentile":
        q = torch.quantile(a.flatten(2).float(), threshold, dim=2).to(a.dtype)
        return a >= q[:, :, None, None]
    return keep_mask(a.flatten(2).flatten(0, 1), rule, threshold, mass).reshape(a.shape)


class SemanticGuidance:
    """SEGA (S1)-(S9) with its momentum state; one instance per generation.

    ``momentum_scale`` (``s_m``) and ``momentum_beta`` (``beta_m``) belong to the whole rule,
    not to a concept: one momentum ``nu`` accumulates the combined guidance (S6)-(S7).
    After each :meth:`guide`, ``last_guidance`` holds ``g_sem`` (diffusers ``sem_guidance[i]``;
    zeros when nothing was added) and ``last_active`` the warmed-up concept indices.
    """

    def __init__(self, concepts: Sequence[EditConcept], momentum_scale: float = 0.1,
                 momentum_beta: float = 0.4, require_cfg_for_sega: bool = False, mask_rule: str = "percentile",
                 mask_mass: float = 0.5):
        self.mask_rule, self.mask_mass = mask_rule, float(mask_mass)
        self.concepts = list(concepts)
        for c in self.concepts:
            if not isinstance(c, EditConcept):
                raise TypeError(f"concepts must be EditConcept, got {type(c).__name__}")
        self.momentum_scale = float(momentum_scale)
        self.momentum_beta = float(momentum_beta)
        if not (math.isfinite(self.momentum_scale) and self.momentum_scale >= 0):
            raise ValueError(f"momentum_scale must be finite and >= 0, got {momentum_scale}")
        if not 0.0 <= self.momentum_beta < 1.0:
            raise ValueError(f"momentum_beta must be in [0, 1), got {momentum_beta}")
        self.require_cfg_for_sega = bool(require_cfg_for_sega)
        self.reset()

    def reset(self) -> None:
        """Forget the momentum (start of a new generation)."""
        self.momentum = None
        self.last_guidance = None
        self.last_active = []

    def guide(self, e_u: torch.Tensor, e_t: Optional[torch.Tensor], e_cs, step: int, cfg: float,
              unit: float = 1.0) -> torch.Tensor:
        """Guided eps (S9) at step ``step`` (0-based) for target CFG scale ``cfg`` (``w``).

        ``e_t=None`` drops the target term (S1) ("pure SEGA"); ``e_cs`` is a list of
        ``[B, C, H, W]`` concept predictions, one per concept, or a stacked ``[K, B, C, H, W]``.
        ``unit``: inputs in another parameterisation (S6')-(S7') (the result is then in the inputs' units).
        """
        unit = float(unit)
        e_cs = _stack(e_cs, e_u)
        if e_cs.shape[0] != len(self.concepts):
            raise ValueError(f"{e_cs.shape[0]} concept predictions for {len(self.concepts)} concepts")
        if self.require_cfg_for_sega and cfg <= 1:
            # reference: no CFG batch at all, the model sees the target prompt only (§2.1 step 6)
            self.last_guidance = torch.zeros_like(e_u)
            self.last_active = []
            return e_u if e_t is None else e_t
        g_p = cfg * (e_t - e_u) if e_t is not None else torch.zeros_like(e_u)   # (S1)
        if not self.concepts:
            self.last_guidance = torch.zeros_like(e_u)
            return e_u + g_p
        if self.momentum is None:
            self.momentum = torch.zeros_like(e_u)
        K, B = e_cs.shape[0], e_u.shape[0]
        gammas = torch.zeros_like(e_cs)
        weights = e_u.new_zeros((K, B))
        active = []
        for k, (c, e_c) in enumerate(zip(self.concepts, e_cs)):
            if c.warm(step):                                                    # (S5)
                active.append(k)
            if c.cooled(step):                                                  # (S4) cool-down
                continue
            psi = concept_direction(e_c, e_u, c)                                # (S2)
            keep = percentile_mask(psi, c.threshold, self.mask_rule, self.mask_mass)
            gammas[k] = torch.where(keep, psi, torch.zeros_like(psi))                   # (S3)-(S4)
            weights[k] = c.weight
        g_sem = None
        if 0 < len(active) < K:                                                 # (S8) partial
            idx = torch.as_tensor(active, device=e_u.device)
            w_a = weights.index_select(0, idx)
            total = w_a.sum(0)
            w_a = torch.where(total > 0, w_a / torch.where(total > 0, total, torch.ones_like(total)),
                              torch.zeros_like(w_a))                            # NaN guard
            g_sem = torch.einsum("cb,cbijk->bijk", w_a, gammas.index_select(0, idx))
        g_all = torch.einsum("cb,cbijk->bijk", weights, gammas)                 # (S6)
        if unit == 1.0:
            g_all = g_all + self.momentum_scale * self.momentum
            self.momentum = self.momentum_beta * self.momentum + (1 - self.momentum_beta) * g_all   # (S7)
        elif unit != 0.0:                                                       # (S6')-(S7'): nu in eps units
            g_all = g_all + self.momentum_scale * self.momentum / unit
            self.momentum = self.momentum_beta * self.momentum + (1 - self.momentum_beta) * unit * g_all
        if len(active) == K:
            g_sem = g_all
        self.last_active = active
        self.last_guidance = g_sem if g_sem is not None else torch.zeros_like(e_u)
        if g_sem is None:
            return e_u + g_p
        return e_u + (g_p + g_sem)                                              # (S9)


# ----------------------------------------------------------------------------- LEDITS++

def cross_attention_mask(maps: torch.Tensor, threshold: float, latent_hw, channels: int = 4,
                         blur_sigma: float = LEDITS_BLUR_SIGMA, rule: str = "percentile",
                         mass: float = 0.5) -> torch.Tensor:
    """(L2)-(L3): ``M1`` ``[B, channels, H, W]`` in {0, 1} from token-summed maps ``[B, h, w]``.

    3x3 Gaussian (reflect padding), per-image quantile, nearest upsample to ``latent_hw``,
    the same mask for every channel.  ``rule``: :func:`~.maps.keep_mask` (``otsu`` / ``mass`` [ours]
    in place of the quantile).
    """
    if maps.ndim != 3:
        raise ValueError(f"attention maps must be [B, h, w], got {tuple(maps.shape)}")
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"threshold must be in [0, 1), got {threshold}")
    a = gaussian_blur(maps, blur_sigma, size=3) if blur_sigma > 0 else maps
    if rule == "percentile":
        q = torch.quantile(a.flatten(1).float(), threshold, dim=1).to(a.dtype)
        m = (a >= q[:, None, None]).to(maps.dtype)
    else:
        m = keep_mask(a.flatten(1), rule, threshold, mass).reshape(a.shape).to(maps.dtype)
    m = resize_map(m, latent_hw, mode="nearest")
    return repeat(m, "b h w -> b c h w", c=channels)


def noise_estimate_mask(psi: torch.Tensor, threshold: float, rule: str = "percentile",
                        mass: float = 0.5) -> torch.Tensor:
    """(L4)-(L5): ``M2`` ``[B, C, H, W]`` in {0, 1} from the channel-summed ``|psi|`` (``rule``: as
    :func:`cross_attention_mask`)."""
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"threshold must be in [0, 1), got {threshold}")
    a = reduce(psi.abs(), "b c h w -> b h w", "sum")
    if rule == "percentile":
        q = torch.quantile(a.flatten(1).float(), threshold, dim=1).to(a.dtype)
        m = (a >= q[:, None, None]).to(psi.dtype)
    else:
        m = keep_mask(a.flatten(1), rule, threshold, mass).reshape(a.shape).to(psi.dtype)
    return repeat(m, "b h w -> b c h w", c=psi.shape[1])


def ledits_pp_guidance(e_u: torch.Tensor, e_cs, concepts: Sequence[EditConcept], attn_maps, step: int,
                       timestep: Optional[float] = None, use_intersect: bool = True, use_cross_attn: bool = True,
                       intersect_max_t: Optional[float] = LEDITS_INTERSECT_MAX_T,
                       blur_sigma: float = LEDITS_BLUR_SIGMA, return_masks: bool = False,
                       mask_rule: str = "percentile", mask_mass: float = 0.5):
    """LEDITS++ guided eps (L1)-(L7): no target CFG, no momentum, weights 1.

    ``attn_maps``: per concept a ``[B, h, w]`` token-summed cross-attention map of the
    current step's concept branch (list or ``[K, B, h, w]``); may be None when
    ``use_cross_attn`` and ``use_intersect`` are both False.  Mask modes (§4.4 step 5):
    ``use_intersect`` -> ``M1 * M2`` (then ``use_cross_attn`` is implied), but only where
    ``timestep <= intersect_max_t`` (diffusers; ``M1`` alone above it).  ``intersect_max_t=None``
    intersects at every step (the authors' repository); so does ``timestep=None``.
    ``use_cross_attn`` alone -> ``M1``; neither -> ``M2``.

    ``return_masks=True`` returns ``(eps, masks)`` with masks ``[K, B, C, H, W]`` (zeros for
    concepts not applied at this step; above ``intersect_max_t`` the ``M1`` used).
    """
    e_cs = _stack(e_cs, e_u)
    concepts = list(concepts)
    if e_cs.shape[0] != len(concepts):
        raise ValueError(f"{e_cs.shape[0]} concept predictions for {len(concepts)} concepts")
    cross = use_cross_attn or use_intersect
    if cross and attn_maps is None and concepts:
        raise ValueError("cross-attention masks need attn_maps")
    intersect_now = use_intersect and (intersect_max_t is None or timestep is None or timestep <= intersect_max_t)
    guidance = torch.zeros_like(e_u)
    masks = torch.zeros_like(e_cs)
    for k, (c, e_c) in enumerate(zip(concepts, e_cs)):
        if not c.warm(step) or c.cooled(step):
            continue
        psi = concept_direction(e_c, e_u, c)                                     # (L1)
        if cross:
            m = cross_attention_mask(attn_maps[k], c.threshold, e_u.shape[-2:], e_u.shape[1], blur_sigma,
                                     mask_rule, mask_mass)
            if m.device.type != "meta" and float(m.sum()) == 0:      # (meta: device checks run without data)
                raise RuntimeError(f"concept {k}: cross-attention mask is empty (was attention recorded?)")
            if intersect_now:
                m = m * noise_estimate_mask(psi, c.threshold, mask_rule, mask_mass)  # (L6)
        else:
            m = noise_estimate_mask(psi, c.threshold, mask_rule, mask_mass)
        masks[k] = m
        guidance = guidance + psi * m
    out = e_u + guidance                                                         # (L7)
    return (out, masks) if return_masks else out
