"""Turning attention maps into masks and heat maps.

* :func:`gaussian_blur` — separable Gaussian, reflect padding; a 3x3 kernel with
  sigma 0.5 is LEDITS++'s smoothing (spec §4.4 step 3).  The kernel sums to 1, so a
  constant map is unchanged (property P22).
* :func:`binarize` — ``"quantile"``: keep values >= the per-image ``q``-quantile
  (LEDITS++ M1, ``[A >= quantile(A, lambda)]``); ``"threshold"``: keep values of the
  per-image max-normalised map strictly above ``t`` (Eta Inversion §4.2, ``A > 0.2``).
* :func:`heatmap` / :func:`overlay` — a perceptually ordered colour ramp (dark blue ->
  yellow) blended over an image for previews.
* :func:`keep_mask` — which values of each row to keep, by a rule that does or does not depend on
  the size of what is kept (issue 17): ``percentile`` (the papers' rule: always the top
  ``1 - threshold`` of the pixels, whatever the object's size), ``otsu`` (a threshold from the
  row's own value histogram) and ``mass`` (the fewest pixels that hold ``mass`` of the row's total).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["gaussian_kernel1d", "gaussian_blur", "normalize_max", "binarize", "resize_map", "heatmap", "overlay",
           "otsu_threshold", "keep_mask", "MASK_RULES", "StepMasks", "dilate", "soften_mask"]

MASK_RULES = ("percentile", "otsu", "mass")


def otsu_threshold(values: torch.Tensor, bins: int = 64) -> float:
    """Otsu's threshold of values in [0, 1] (maximum between-class variance over a histogram)."""
    v = values.flatten().float().clamp(0, 1)
    hist = torch.histc(v, bins=bins, min=0.0, max=1.0).double()
    p = hist / hist.sum().clamp_min(1)
    centers = (torch.arange(bins, dtype=torch.float64, device=hist.device) + 0.5) / bins
    w0 = p.cumsum(0)
    mu = (p * centers).cumsum(0)
    w1 = 1 - w0
    between = (mu[-1] * w0 - mu) ** 2 / (w0 * w1).clamp_min(1e-12)
    between[(w0 <= 0) | (w1 <= 0)] = -1
    return float((int(between.argmax()) + 1) / bins)


def keep_mask(values: torch.Tensor, rule: str = "percentile", threshold: float = 0.9,
              mass: float = 0.5) -> torch.Tensor:
    """Boolean ``[B, N]``: the values of each row ``[B, N]`` to keep.

    * ``percentile``: ``v >= quantile(v, threshold)`` (LEDITS++ / SEGA, the top ``1 - threshold``);
    * ``otsu``: ``v' > otsu(v')`` with ``v'`` the row min-max normalised (two-class split of its
      histogram; no parameter);
    * ``mass``: the largest values until their sum reaches ``mass`` of the row's total (values
      must be non-negative; ties at the cut are kept).
    ``otsu`` and ``mass`` [ours, issue 17] keep a region whose size follows the map, not a fixed
    fraction of the image.
    """
    if rule not in MASK_RULES:
        raise ValueError(f"mask rule must be one of {MASK_RULES}, got {rule!r}")
    v = values.float()
    if rule == "percentile":
        if not 0.0 <= threshold < 1.0:
            raise ValueError(f"threshold must be in [0, 1), got {threshold}")
        q = torch.quantile(v, threshold, dim=1)
        return v >= q[:, None]
    if rule == "otsu":
        lo, hi = v.amin(1, keepdim=True), v.amax(1, keepdim=True)
        n = (v - lo) / (hi - lo).clamp_min(1e-12)
        if v.device.type == "meta":
            return n > 0.5
        t = torch.tensor([otsu_threshold(r) for r in n], device=v.device)[:, None]
        return n >= t
    if not 0.0 < mass <= 1.0:
        raise ValueError(f"mass must be in (0, 1], got {mass}")
    s, _ = v.clamp_min(0).sort(1, descending=True)
    c = s.cumsum(1)
    k = (c < mass * c[:, -1:]).sum(1, keepdim=True).clamp(max=v.shape[1] - 1)   # index of the last kept value
    cut = s.gather(1, k)
    return v >= cut


def gaussian_kernel1d(sigma: float, size: int | None = None) -> torch.Tensor:
    if sigma <= 0:
        raise ValueError("sigma must be > 0")
    if size is None:
        size = 2 * math.ceil(3 * sigma) + 1
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2    # cpu: a small filter, moved where used
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).float()


def gaussian_blur(maps: torch.Tensor, sigma: float, size: int | None = None) -> torch.Tensor:
    """Blur ``[B, H, W]`` maps; ``sigma`` in pixels of the map."""
    if sigma == 0:
        return maps
    k = gaussian_kernel1d(sigma, size).to(maps.device, maps.dtype)
    r = (k.numel() - 1) // 2
    x = maps[:, None]
    mode = "reflect" if min(maps.shape[-2:]) > r else "replicate"
    x = F.pad(x, (r, r, 0, 0), mode=mode)
    x = F.conv2d(x, k.view(1, 1, 1, -1))
    x = F.pad(x, (0, 0, r, r), mode=mode)
    x = F.conv2d(x, k.view(1, 1, -1, 1))
    return x[:, 0]


def normalize_max(maps: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Divide each map by its maximum (maps are non-negative)."""
    m = maps.flatten(1).amax(1).clamp_min(eps)
    return maps / m.view(-1, 1, 1)


def binarize(maps: torch.Tensor, mode: str = "quantile", value: float = 0.9) -> torch.Tensor:
    """Binary float masks ``[B, H, W]`` in {0, 1}; see the module docstring."""
    if maps.ndim != 3:
        raise ValueError(f"maps must be [B, H, W], got {tuple(maps.shape)}")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{mode} value must be in [0, 1], got {value}")
    if mode == "quantile":
        q = torch.quantile(maps.flatten(1).float(), value, dim=1).view(-1, 1, 1)
        return (maps >= q).to(maps.dtype)
    if mode == "threshold":
        return (normalize_max(maps) > value).to(maps.dtype)
    if mode == "otsu":          # [ours, issue 17] the map's own two-class split; ``value`` unused
        return keep_mask(maps.flatten(1), "otsu").view_as(maps).to(maps.dtype)
    raise ValueError(f"mode must be 'quantile', 'threshold' or 'otsu', got {mode!r}")


def resize_map(maps: torch.Tensor, size, mode: str = "bilinear") -> torch.Tensor:
    size = (int(size[0]), int(size[1]))
    if tuple(maps.shape[-2:]) == size:
        return maps
    kw = {} if mode in ("nearest", "area") else {"align_corners": False}
    return F.interpolate(maps[:, None], size=size, mode=mode, **kw)[:, 0]


_RAMP = torch.tensor([  # cpu: a constant, moved to the map's device where used
    [0.050, 0.030, 0.330],
    [0.230, 0.320, 0.550],
    [0.130, 0.570, 0.550],
    [0.370, 0.790, 0.380],
    [0.990, 0.910, 0.150],
])


def heatmap(maps: torch.Tensor) -> torch.Tensor:
    """Colour ``[B, H, W]`` maps (max-normalised) -> ``[B, H, W, 3]`` images in [0, 1]."""
    m = normalize_max(maps.float()).clamp(0, 1)
    n = _RAMP.shape[0] - 1
    pos = m * n
    lo = pos.floor().clamp(max=n - 1).long()
    w = (pos - lo).unsqueeze(-1)
    ramp = _RAMP.to(maps.device)
    return ramp[lo] * (1 - w) + ramp[lo + 1] * w


def overlay(image: torch.Tensor, maps: torch.Tensor, alpha: float = 0.6) -> torch.Tensor:
    """Blend heat maps over ``[B, H, W, 3]`` images (ComfyUI IMAGE layout)."""
    hm = heatmap(resize_map(maps.float(), image.shape[1:3]))
    if image.shape[0] != hm.shape[0]:
        if image.shape[0] == 1:
            image = image.expand(hm.shape[0], -1, -1, -1)
        elif hm.shape[0] == 1:
            hm = hm.expand(image.shape[0], -1, -1, -1)
        else:
            raise ValueError(f"image batch {image.shape[0]} does not match map batch {hm.shape[0]}")
    return (image[..., :3].float() * (1 - alpha) + hm * alpha).clamp(0, 1)


class StepMasks:
    """Per concept, where guidance acted at each step of a run so far (the Semantic Guide's masks
    output, and the background lock's region).  ``add`` takes ``[K, B, h, w]`` in {0, 1} per step."""

    def __init__(self, k: int):
        self.k = k
        self.reset()

    def reset(self):
        self.sums, self.steps = [None] * self.k, 0

    def add(self, masks):
        self.steps += 1
        for i in range(self.k):
            m = masks[i].float().detach().cpu()
            self.sums[i] = m if self.sums[i] is None else self.sums[i] + m

    def mean(self, i: int):
        """``[B, h, w]``: the fraction of the steps concept ``i`` acted at each pixel."""
        if not 0 <= i < self.k:
            raise ValueError(f"concept index {i} is out of range: the guide has {self.k} concept(s)")
        if self.steps == 0 or self.sums[i] is None:
            raise RuntimeError("no guidance step has run yet: connect this node after the sampler that used the guide")
        return self.sums[i] / self.steps

    def lock_region(self, threshold: float):
        """``[B, h, w]``: where any concept acted in at least ``threshold`` of the steps so far (the
        Inversion Sampler's one-pass background lock); None before the first step."""
        if self.steps == 0 or all(s is None for s in self.sums):
            return None
        frac = torch.stack([s for s in self.sums if s is not None]) / self.steps
        return (frac >= max(float(threshold), 1e-6)).any(0).float()


def dilate(masks: torch.Tensor, px: int = 1) -> torch.Tensor:
    """``[B, H, W]`` masks grown by ``px`` pixels (square neighbourhood)."""
    return F.max_pool2d(masks.float()[:, None], 2 * px + 1, 1, px)[:, 0]


def soften_mask(masks: torch.Tensor, sigma: float) -> torch.Tensor:
    """``[B, H, W]`` in [0, 1] -> ``[B, 1, H, W]``, edges blurred with a Gaussian of ``sigma`` pixels (0: hard)."""
    m = gaussian_blur(masks.float(), sigma) if sigma > 0 else masks.float()
    return m.clamp(0, 1)[:, None]
