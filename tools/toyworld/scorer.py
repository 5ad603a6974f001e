"""Ground-truth scorer: reads foreground colour, shape, background colour, object mask and
centroid from a toy-world image. No learning involved; pure torch + numpy.

Algorithm (per image, values in [-1, 1]):

1. classify every pixel by the nearest of the 8 palette colours;
2. background = majority class on the 1-px border;
3. foreground colour = most frequent *foreground-palette* class in the image (blurred
   edges between two colours often land on a background-palette colour such as gray,
   so only the 4 foreground colours can win); fewer than ``MIN_OBJECT_PIXELS`` such
   pixels means "no object";
4. object mask = largest 8-connected component of that colour;
5. shape = the template (ellipse / rectangle / upright triangle inscribed in the mask's
   bounding box) with the highest IoU against the mask.

``blur3`` is the 3x3 box blur used to score generated samples a second time, with less
pixel noise.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .world import BG_COLOURS, FG_COLOURS, IMAGE_SIZE, PALETTE, PALETTE_NAMES, SHAPES, Scene

MIN_OBJECT_PIXELS = 12
_BOX_SLACK = (-0.5, -0.25, 0.0, 0.25, 0.5)

_PAL = torch.tensor([PALETTE[n] for n in PALETTE_NAMES], dtype=torch.float32) * 2 - 1  # [8, 3]
_N_FG = len(FG_COLOURS)


def blur3(images: torch.Tensor) -> torch.Tensor:
    """3x3 box blur with replicate padding; [B,3,H,W] or [3,H,W]."""
    single = images.dim() == 3
    x = images.unsqueeze(0) if single else images
    x = F.pad(x.float(), (1, 1, 1, 1), mode="replicate")
    k = torch.full((x.shape[1], 1, 3, 3), 1.0 / 9.0)
    y = F.conv2d(x, k, groups=x.shape[1])
    return y[0] if single else y


def classify_pixels(images: torch.Tensor) -> torch.Tensor:
    """Nearest-palette index per pixel, [B,H,W] int64 (index into ``PALETTE_NAMES``)."""
    x = images.float().clamp(-1, 1)
    d = ((x.unsqueeze(1) - _PAL.view(1, -1, 3, 1, 1)) ** 2).sum(2)  # [B, 8, H, W]
    return d.argmin(1)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """Largest 8-connected component of a boolean [H, W] array."""
    h, w = mask.shape
    labels = np.zeros((h, w), dtype=np.int32)
    best_label, best_size, cur = 0, 0, 0
    ys, xs = np.nonzero(mask)
    for y0, x0 in zip(ys.tolist(), xs.tolist()):
        if labels[y0, x0]:
            continue
        cur += 1
        labels[y0, x0] = cur
        stack = [(y0, x0)]
        size = 0
        while stack:
            y, x = stack.pop()
            size += 1
            for dy in (-1, 0, 1):
                yy = y + dy
                if yy < 0 or yy >= h:
                    continue
                for dx in (-1, 0, 1):
                    xx = x + dx
                    if 0 <= xx < w and mask[yy, xx] and not labels[yy, xx]:
                        labels[yy, xx] = cur
                        stack.append((yy, xx))
        if size > best_size:
            best_label, best_size = cur, size
    return labels == best_label if best_size else np.zeros_like(mask)


def _templates(x0: float, x1: float, y0: float, y1: float, size: int = IMAGE_SIZE) -> np.ndarray:
    """[3, H, W] boolean templates (circle/ellipse, square/rectangle, upright triangle)
    inscribed in the pixel bounding box [x0, x1) x [y0, y1)."""
    c = np.arange(size) + 0.5
    x = c[None, :]
    y = c[:, None]
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    rx, ry = (x1 - x0) / 2, (y1 - y0) / 2
    dx, dy = (x - cx) / rx, (y - cy) / ry  # normalised to [-1, 1] inside the box
    ellipse = dx * dx + dy * dy <= 1.0
    rect = (np.abs(dx) <= 1.0) & (np.abs(dy) <= 1.0)
    tri = (dy >= -1.0) & (dy <= 1.0) & (np.abs(dx) <= (dy + 1.0) / 2)
    return np.stack([ellipse, rect, tri])


def _score_one(labels: np.ndarray) -> dict:
    h, w = labels.shape
    border = np.concatenate([labels[0], labels[-1], labels[1:-1, 0], labels[1:-1, -1]])
    counts = np.bincount(border, minlength=len(PALETTE_NAMES))
    bg_idx = int(counts.argmax())
    out = {
        "bg": PALETTE_NAMES[bg_idx],
        "fg": None,
        "shape": None,
        "mask": np.zeros((h, w), dtype=bool),
        "centroid": None,
        "bbox": None,
        "ious": None,
    }
    fg_counts = np.bincount(labels.ravel(), minlength=len(PALETTE_NAMES))[:_N_FG].copy()
    if bg_idx < _N_FG:
        fg_counts[bg_idx] = 0
    fg_idx = int(fg_counts.argmax())
    if fg_counts[fg_idx] < MIN_OBJECT_PIXELS:
        return out
    mask = _largest_component(labels == fg_idx)
    if mask.sum() < MIN_OBJECT_PIXELS:
        return out
    ys, xs = np.nonzero(mask)
    x0, x1, y0, y1 = int(xs.min()), int(xs.max()) + 1, int(ys.min()), int(ys.max()) + 1
    # fit each template to the box, allowing the true outline to lie up to half a pixel
    # beyond / inside the outermost mask pixels (pixelation makes the box inexact)
    ious = np.zeros(3)
    for e in _BOX_SLACK:
        t = _templates(x0 - e, x1 + e, y0 - e, y1 + e, size=h)
        inter = (t & mask[None]).sum((1, 2))
        union = (t | mask[None]).sum((1, 2))
        ious = np.maximum(ious, inter / np.maximum(union, 1))
    out.update(
        fg=FG_COLOURS[fg_idx],
        shape=SHAPES[int(ious.argmax())],
        mask=mask,
        centroid=(float(xs.mean() + 0.5), float(ys.mean() + 0.5)),
        bbox=(x0, y0, x1, y1),
        ious=tuple(float(v) for v in ious),
    )
    return out


def score_batch(images: torch.Tensor, blur: bool = False) -> list[dict]:
    """Score images [B,3,H,W] in [-1,1]. Each result has keys ``fg``, ``shape``, ``bg``
    (names, ``fg``/``shape`` None when no object is found), ``mask`` (bool numpy [H,W]),
    ``centroid`` ((x, y) pixels or None), ``bbox`` ((x0, y0, x1, y1) or None), ``ious``."""
    if blur:
        images = blur3(images)
    labels = classify_pixels(images).numpy()
    return [_score_one(lab) for lab in labels]


def score(image: torch.Tensor, blur: bool = False) -> dict:
    """Score one image [3,H,W] in [-1,1]; see ``score_batch``."""
    return score_batch(image.unsqueeze(0), blur=blur)[0]


def scene_accuracy(images: torch.Tensor, scenes: list[Scene], blur: bool = False) -> dict:
    """Fraction of images whose fg colour / shape / bg colour / all three match ``scenes``."""
    res = score_batch(images, blur=blur)
    n = len(scenes)
    fg = sum(r["fg"] == s.fg for r, s in zip(res, scenes))
    sh = sum(r["shape"] == s.shape for r, s in zip(res, scenes))
    bg = sum(r["bg"] == s.bg for r, s in zip(res, scenes))
    al = sum(r["fg"] == s.fg and r["shape"] == s.shape and r["bg"] == s.bg for r, s in zip(res, scenes))
    return {"fg": fg / n, "shape": sh / n, "bg": bg / n, "all": al / n, "n": n}


__all__ = [
    "BG_COLOURS",
    "MIN_OBJECT_PIXELS",
    "blur3",
    "classify_pixels",
    "scene_accuracy",
    "score",
    "score_batch",
]
