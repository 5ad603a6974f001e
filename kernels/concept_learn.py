"""ConceptLearn: concept tokens and their masks by EM (spec ``concept-learning.md``).

Rahman et al., "Visual Concept-driven Image Generation with Text-to-Image Diffusion Model"
(arXiv 2402.11487) learn one token per concept jointly with a latent mask per concept and
image, alternating (EM-like) between learning the tokens with the masks fixed and
re-estimating the masks from the UNet's cross-attention (refined by a DenseCRF) with the
tokens fixed [P].  The paper's equations could not be read; the losses below are Break-A-Scene's
(Avrahami et al. 2023) [B], the schedule and mask rules are ours [D] (spec §0, §3, §4).

M-step (spec §3), for one drawn image ``n``, concept subset ``S`` (union sampling §3.1),
timestep ``t`` and noise ``eps``::

    x      = z + sigma_t * eps                       (k-diffusion form of z_t, S1)
    U_S    = max_{k in S} M_{n,k}                     (union mask, latent size)
    L_mask = mean( (U_S * (target - pred))^2 )        (§3.2; target = eps, or v for v-models)
    A~_k   = A^_k / max(A^_k)                         (§3.3; 16x16 cross-attention, mean heads+layers)
    L_attn = lambda_attn * sum_{k in S} mean( (M16_k - A~_k)^2 )
    L      = L_mask + L_attn                          (§3.5)

Only the concept vectors ``e`` (``[K, m, d]``, a separate parameter spliced into the
text encoder's input embeddings, §3.6 [D]) receive gradients; the model is frozen.

E-step (spec §4), per image: mean cross-attention of every present concept over the
fixed timesteps (default 200/400/600 of 1000) -> bilinear to the latent size -> min-max
to [0,1] -> label scores (concepts + an "unassigned" label of constant score tau_bg) ->
softmax at temperature T -> dense CRF (:func:`dense_crf`) -> argmax -> binary masks,
with the area guards of step 8.

Everything runs against the protocol: a :class:`ConceptText` (differentiable text
encoding with spliced vectors), a :class:`GradDenoiser` (x0 prediction that keeps the
autograd graph) and an :class:`~.attention.AttentionHooks` registry the denoiser's
cross-attention layers dispatch to.  ``kernels/concept_diffusers.py`` implements them on
diffusers/transformers models; ``nodes/comfy_adapter.py`` (ConceptLearn section) on
ComfyUI's.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F

from .maps import otsu_threshold  # noqa: F401  (re-exported: part of this module's API)
from .attention import AttentionHook, fold_sequence
from .schedule import VPSchedule

__all__ = [
    "NAME_RE",
    "ConceptAttention",
    "ConceptConfig",
    "ConceptResult",
    "ConceptText",
    "GradDenoiser",
    "attention_loss",
    "dense_crf",
    "draw_subset",
    "e_step",
    "learn_concepts",
    "mask_iou",
    "loss_region_mask",
    "masked_loss",
    "masks_from_attention",
    "otsu_threshold",
    "parse_caption",
    "prediction_and_target",
    "parse_presence",
    "stack_images",
    "subset_prompt",
    "validate_names",
]

NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]+$")


# ----------------------------------------------------------------------------- protocol
class ConceptText(Protocol):
    """Differentiable text side.

    ``width``: embedding width ``d``.  ``init_vector(word)`` -> ``[d]`` frozen row of the
    word's first token (spec §4 init 2).  ``is_single_token(name)`` -> whether ``name``
    is already one vocabulary token.  ``encode(parts, vectors)``: ``parts`` mixes text
    (str) and concept slots (int k); returns ``(cond, positions)`` where ``cond`` is what
    the denoiser takes and ``positions[k]`` the key positions of slot k's ``m`` vectors.
    Gradients must flow from ``cond`` to ``vectors`` ([K, m, d]).
    """

    width: int

    def init_vector(self, word: str) -> torch.Tensor: ...

    def is_single_token(self, name: str) -> bool: ...

    def encode(self, parts: Sequence, vectors: torch.Tensor): ...


class GradDenoiser(Protocol):
    """x0 prediction with the autograd graph kept (k-diffusion form, see protocol.Denoiser).

    ``predict_x0_grad(x, sigma, cond)`` with ``x`` ``[B, C, H, W]``, ``sigma`` ``[B]``
    and one conditioning for all rows; the attention hooks see the call as cond index 0.
    """

    schedule: VPSchedule
    prediction_type: str

    def predict_x0_grad(self, x: torch.Tensor, sigma: torch.Tensor, cond) -> torch.Tensor: ...


# ----------------------------------------------------------------------------- config
@dataclass
class ConceptConfig:
    """Hyper-parameters (spec §5).  Defaults are the spec's unless noted."""

    steps: int = 400                   # total M-step optimiser steps (phase 1)
    em_rounds: int = 4
    lr: float = 5e-4
    weight_decay: float = 1e-2
    grad_clip: float = 1.0
    lambda_attn: float = 0.01
    vectors_per_token: int = 1
    flip_p: float = 0.5
    union_sampling: bool = True
    mask_normalize: str = "none"       # "none" (Break-A-Scene mean) or "area" [D]
    loss_region: str = "union"         # "union" of the prompt's concepts (spec §3.2) or "not_others" [D]
    attention_factors: tuple = (4,)   # layers at latent/4 (16x16 for SD at 512); fallback: coarsest non-mid [D]
    estep_timesteps: tuple = (200, 400, 600)   # of a 1000-step schedule; rescaled to the model's T [D]
    estep_seed: int = 1234
    tau_bg: float = 0.35
    temperature: float = 0.1
    unassigned: bool = True            # the "unassigned" label (turn off when concepts cover the image)
    use_crf: bool = True
    crf_iters: int = 5
    crf_smooth: tuple = (1.0, 3.0)     # (sigma_xy in latent pixels, weight)
    crf_appearance: tuple = (10.0, 13.0, 5.0)   # (sigma_xy in latent pixels, sigma_rgb in 0..255, weight)
    area_min: float = 0.005
    area_max: float = 0.98
    early_stop_iou: float = 0.95
    init_from_words: bool = True       # spec §4 init 3b (E-step with the init words before training)
    seed: int = 0
    save_every: int = 0

    def validate(self):
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        if self.em_rounds < 1:
            raise ValueError(f"em_rounds must be >= 1, got {self.em_rounds}")
        if not self.lr > 0:
            raise ValueError(f"learning rate must be > 0, got {self.lr}")
        if self.vectors_per_token < 1:
            raise ValueError("vectors_per_token must be >= 1")
        if self.loss_region not in ("union", "not_others"):
            raise ValueError(f"loss_region must be 'union' or 'not_others', got {self.loss_region!r}")
        if self.mask_normalize not in ("none", "area"):
            raise ValueError(f"mask_normalize must be 'none' or 'area', got {self.mask_normalize!r}")
        if not 0 <= self.flip_p <= 1:
            raise ValueError("flip_p must be in [0, 1]")


# ----------------------------------------------------------------------------- inputs
def validate_names(names: Sequence[str], init_words: Sequence[str], text: ConceptText | None = None) -> None:
    """Clear errors for concept names / init words (spec §7.1, §9)."""
    if not names:
        raise ValueError("give at least one concept name")
    if len(init_words) != len(names):
        raise ValueError(f"{len(names)} concept names but {len(init_words)} init words; give one init word per "
                         f"concept (comma-separated, same order)")
    seen = set()
    for n in names:
        if not n or not NAME_RE.match(n):
            raise ValueError(f"concept name {n!r} is not allowed: use only letters, digits, '_', '.', '-' "
                             f"(no spaces), so that 'embedding:{n}' can be typed in a prompt")
        if n.lower() in seen:
            raise ValueError(f"concept name {n!r} is given twice")
        seen.add(n.lower())
        if text is not None and text.is_single_token(n):
            raise ValueError(f"concept name {n!r} is already a word of the text encoder's vocabulary; other UIs "
                             f"use the file name as the trigger word, so pick a new name (e.g. 'cl_{n}')")
    for w in init_words:
        if not w or not w.strip():
            raise ValueError("an init word is empty; give a real word per concept (e.g. 'dog', 'object')")


def stack_images(images: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stack ``[C, H, W]`` photos; a clear error when there are none or their sizes differ."""
    if images is None or len(images) == 0:
        raise ValueError("ConceptLearn needs at least one image")
    sizes = [tuple(im.shape[-2:]) for im in images]
    for i, s in enumerate(sizes):
        if s != sizes[0]:
            raise ValueError(f"all photos must have the same size: image 0 is {sizes[0][1]}x{sizes[0][0]}, image {i} "
                             f"is {s[1]}x{s[0]} (width x height); resize or crop them to one size first")
    return torch.stack(list(images))


def parse_presence(spec: str, n_images: int, n_concepts: int) -> torch.Tensor:
    """``"0:0,1; 1:0"`` -> bool ``[N, K]`` (image: concepts); empty -> all present (spec §7.1)."""
    if not spec or not spec.strip():
        return torch.ones(n_images, n_concepts, dtype=torch.bool)   # cpu: presence table (indexed by Python)
    P = torch.zeros(n_images, n_concepts, dtype=torch.bool)   # cpu: presence table (indexed by Python)
    listed = set()
    for part in spec.split(";"):
        if not part.strip():
            continue
        if ":" not in part:
            raise ValueError(f"presence entry {part.strip()!r} must look like 'image: concept, concept'")
        a, b = part.split(":", 1)
        try:
            n = int(a)
            ks = [int(x) for x in b.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"presence entry {part.strip()!r}: image and concept indices must be integers") from None
        if not 0 <= n < n_images:
            raise ValueError(f"presence names image {n}, but there are {n_images} images (0-based)")
        for k in ks:
            if not 0 <= k < n_concepts:
                raise ValueError(f"presence names concept {k}, but there are {n_concepts} concepts (0-based)")
            P[n, k] = True
        listed.add(n)
    for n in range(n_images):
        if n not in listed:
            P[n] = True
    if (P.sum(1) == 0).any():
        raise ValueError("every image needs at least one concept in presence")
    return P


# ----------------------------------------------------------------------------- sampling helpers
def draw_subset(present: Sequence[int], g: torch.Generator, union: bool = True) -> list:
    """Union sampling (spec §3.1): size r ~ U{1..|present|}, then a uniform subset of that size."""
    present = list(present)
    if not union:
        return present
    r = int(torch.randint(1, len(present) + 1, (1,), generator=g))
    perm = torch.randperm(len(present), generator=g)[:r].tolist()
    return sorted(present[i] for i in perm)


def parse_caption(caption: str, n_concepts: int) -> list:
    """``"a red {0} on a white background"`` -> ``["a red", 0, "on a white background"]``.

    Our addition [D]: per-image captions with concept slots ``{k}`` replace the spec's
    ``"a photo of ..."`` prompt for that image (the toy model only knows its caption style).
    """
    parts = []
    pos = 0
    for mt in re.finditer(r"\{(\d+)\}", caption):
        k = int(mt.group(1))
        if not 0 <= k < n_concepts:
            raise ValueError(f"caption {caption!r} names concept {{{k}}}, but there are {n_concepts} concepts")
        if caption[pos:mt.start()].strip():
            parts.append(caption[pos:mt.start()].strip())
        parts.append(k)
        pos = mt.end()
    if caption[pos:].strip():
        parts.append(caption[pos:].strip())
    if not any(isinstance(p, int) for p in parts):
        raise ValueError(f"caption {caption!r} has no concept slot like {{0}}")
    return parts


def subset_prompt(subset: Sequence[int]) -> list:
    """``["a photo of", k1, "and", k2, ...]`` (spec §3.1)."""
    parts = ["a photo of"]
    for i, k in enumerate(subset):
        if i:
            parts.append("and")
        parts.append(int(k))
    return parts


# ----------------------------------------------------------------------------- losses
def masked_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, normalize: str = "none") -> torch.Tensor:
    """(§3.2) ``mean((U * (target - pred))^2)`` over every element; ``"area"`` divides by the mask area instead."""
    m = mask.to(pred.dtype)
    while m.ndim < pred.ndim:
        m = m.unsqueeze(1)
    sq = ((m * (target - pred)) ** 2)
    if normalize == "area":
        area = m.expand_as(sq).sum().clamp_min(1.0)
        return sq.sum() / area
    return sq.mean()


def prediction_and_target(x, x0, z, eps, sigma, prediction_type: str = "epsilon") -> tuple:
    """The model's own output space for the loss (spec §3.2: eps, or the velocity for v-models).

    From the denoiser's x0 at ``x = z + sigma * eps`` (k-diffusion): ``eps_pred = (x - x0) / sigma``;
    with ``abar = 1 / (1 + sigma^2)`` the velocity is ``v = sqrt(abar) eps - sqrt(1 - abar) z``
    (Salimans & Ho 2022), predicted as ``sqrt(abar) eps_pred - sqrt(1 - abar) x0``.
    Returns ``(prediction, target)``.
    """
    sg = torch.as_tensor(sigma).reshape(-1, *([1] * (x.ndim - 1))).to(x0.dtype)
    eps_pred = (x - x0) / sg
    if prediction_type == "v_prediction":
        ab = 1.0 / (1.0 + sg ** 2)
        return ab.sqrt() * eps_pred - (1 - ab).sqrt() * x0, ab.sqrt() * eps - (1 - ab).sqrt() * z
    if prediction_type != "epsilon":
        raise ValueError(f"prediction type {prediction_type!r} is not supported (epsilon, v_prediction)")
    return eps_pred, eps


def loss_region_mask(masks: torch.Tensor, subset: Sequence[int], present: Sequence[int], mode: str = "union"):
    """Where the diffusion loss counts, ``[H, W]`` from one image's masks ``[K, H, W]``.

    ``"union"`` (spec §3.2, Break-A-Scene): ``max_{k in S} M_k``.  ``"not_others"`` [D]: every
    pixel except those of present concepts NOT in the prompt, i.e. unassigned pixels count too.
    Why: with a tight mask the loss cannot see shape differences that lie outside the object —
    on the toy world a token learned from triangle photos with "union" drew squares (a square
    covers the triangle; 1/12 triangles sampled, loss gap to the true word closed 98 %), with
    "not_others" it drew triangles (11/12).  With one concept "not_others" is plain textual
    inversion's full-image loss.
    """
    if mode == "union":
        return masks[list(subset)].amax(0)
    if mode == "not_others":
        others = [k for k in present if k not in subset]
        return 1 - masks[others].amax(0) if others else torch.ones_like(masks[0])
    raise ValueError(f"unknown loss region {mode!r}")


def attention_loss(maps: torch.Tensor, masks: torch.Tensor, weight: float) -> torch.Tensor:
    """(§3.3) ``weight * sum_k mean_hw (M16_k - A_k / max A_k)^2``; ``maps``/``masks`` ``[S, h, w]``."""
    a = maps / maps.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1)
    return weight * ((masks.to(a.dtype) - a) ** 2).flatten(1).mean(1).sum()


# ----------------------------------------------------------------------------- attention capture
class ConceptAttention(AttentionHook):
    """Records the softmax cross-attention of each concept's key positions (spec §3.3, §4 E-step 2).

    Layers: down and up (never mid) at latent/``f`` for ``f`` in ``factors``; if the model
    has no such layer, the coarsest non-mid resolution it has [D].  Maps are averaged over
    heads, the concept's ``m`` positions and the selected layers; with ``keep_grad`` the
    graph is kept (M-step attention loss), else everything is detached.
    """

    records = True

    def __init__(self, factors: Sequence[int] = (4,)):
        self.factors = tuple(int(f) for f in factors)
        self.positions: dict = {}
        self.keep_grad = False
        self._sums: dict = {}
        self._chosen: dict = {}      # latent hw -> factors used, learnt from the first full call
        self._pending = None         # (hw, factors) from maps(), applied by the next start()
        self._hw = None

    def start(self, positions: dict, keep_grad: bool) -> None:
        if self._pending is not None:
            # the layout learnt by maps() takes effect only here, between model calls, so that a
            # gradient-checkpointed backward (which re-runs the forward) records exactly as the
            # forward did [D]
            self._chosen.setdefault(*self._pending)
            self._pending = None
        self.positions = {int(k): list(v) for k, v in positions.items()}
        self.keep_grad = keep_grad
        self._sums = {}

    def active(self, layer, call) -> bool:
        return bool(self.positions) and layer.place != "mid" and bool(call.rows_of(0))

    def record(self, probs, layer, call) -> None:
        h, w = fold_sequence(probs.queries, call.latent_hw)
        factor = -(-int(call.latent_hw[0]) // h)
        hw = tuple(int(v) for v in call.latent_hw)
        if hw in self._chosen and factor not in self._chosen[hw]:
            return                       # layout known: skip unused layers before any softmax
        self._hw = hw
        rows = call.rows_of(0)
        p = probs.rows(rows)                                          # [R, heads, L, T] float32
        if not self.keep_grad:
            p = p.detach()
        for k, pos in self.positions.items():
            cols = torch.as_tensor(pos, device=p.device)
            if int(cols.max()) >= p.shape[-1]:
                raise ValueError(f"concept position {int(cols.max())} is outside the layer's {p.shape[-1]} keys")
            a = p.index_select(-1, cols).mean(-1).mean(1).reshape(len(rows), h, w)   # mean over m and heads
            slot = self._sums.setdefault((factor, k), [0, 0])
            slot[0] = slot[0] + a
            slot[1] += 1

    def maps(self) -> dict:
        """``{k: [R, h, w]}`` mean over the selected layers."""
        if not self._sums:
            raise RuntimeError("no cross-attention was recorded for the concept tokens (are the hooks installed?)")
        factors = sorted({f for f, _ in self._sums})
        chosen = [f for f in factors if f in self.factors]
        if not chosen:
            chosen = [max(factors)]
        if self._hw not in self._chosen:
            self._pending = (self._hw, set(chosen))
        out = {}
        for k in self.positions:
            parts = [self._sums[(f, k)] for f in chosen if (f, k) in self._sums]
            size = max(tuple(p[0].shape[-2:]) for p in parts)
            tot, cnt = 0, 0
            for s, c in parts:
                if tuple(s.shape[-2:]) != size:
                    s = F.interpolate(s[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
                tot = tot + s
                cnt += c
            out[k] = tot / cnt
        return out


# ----------------------------------------------------------------------------- masks
CRF_CHUNK_BYTES = 64 * 2**20     # working memory of one block of kernel rows (3 such blocks live at once)


def dense_crf(unary: torch.Tensor, image: torch.Tensor, iters: int = 5, smooth=(1.0, 3.0),
              appearance=(10.0, 13.0, 5.0), chunk_bytes: int = CRF_CHUNK_BYTES) -> torch.Tensor:
    """Mean-field inference in a fully connected CRF with Potts compatibility (spec §4 step 6).

    ``unary``: ``[L, H, W]`` label probabilities; ``image``: ``[3, H, W]`` RGB in [0, 1].
    Kernels (Krähenbühl & Koltun 2011, eq. 3), exact all-pairs on the grid, self-pairs excluded::

        k(i,j) = w_a exp(-|p_i-p_j|^2 / 2 s_a^2 - |I_i-I_j|^2 / 2 s_rgb^2) + w_s exp(-|p_i-p_j|^2 / 2 s_s^2)
        Q_i(l) ∝ exp( log P_i(l) + sum_j k(i,j) Q_j(l) )      (Potts: the -sum over l' != l is
                                                                a per-pixel constant shift)

    Spatial sigmas are in grid (latent) pixels as the spec gives them for SD's 64x64 latent, and
    are NOT rescaled for other grids [D]: scaling them down with the grid (tried first) left
    background halos around objects on the 32x32 toy grid (mask IoU 0.76 vs 1.0 unscaled, same
    attention maps).  RGB is compared in 0..255.  Returns the marginals ``[L, H, W]``.

    Bounded memory [ours]: the N x N kernel (N = H W; 1 GiB in float32 at SDXL's 128 x 128 grid,
    6 GiB with the intermediates of the direct formula) is never held.  Each iteration computes
    the message ``sum_j k(i,j) Q_j`` block by block of rows ``i``, each block sized to
    ``chunk_bytes``, recomputing the kernel rows from positions and colours: the same sums as
    the all-pairs matrix (float noise), working memory ~3 ``chunk_bytes``, time O(N^2) per
    iteration as before.
    """
    L, H, W = unary.shape
    N = H * W
    dev = unary.device
    ys, xs = torch.meshgrid(torch.arange(H, dtype=torch.float32, device=dev),
                            torch.arange(W, dtype=torch.float32, device=dev), indexing="ij")
    pos = torch.stack([ys.flatten(), xs.flatten()], 1)
    rgb = image.float().reshape(3, -1).t().to(dev) * 255.0
    s_s, w_s = smooth[0], smooth[1]
    s_a, s_rgb, w_a = appearance[0], appearance[1], appearance[2]
    inv_s, inv_a, inv_rgb = 1 / (2 * max(s_s, 1e-6) ** 2), 1 / (2 * max(s_a, 1e-6) ** 2), 1 / (2 * s_rgb ** 2)
    rows = max(1, min(N, int(chunk_bytes) // (4 * N)))
    logp = unary.float().clamp_min(1e-8).log().reshape(L, -1)

    def message(q):                       # [L, N] -> sum_j k(i, j) q_j for every i, block by block
        out = torch.empty_like(q)
        for i0 in range(0, N, rows):
            i1 = min(N, i0 + rows)
            d2 = torch.cdist(pos[i0:i1], pos).pow_(2)
            k = torch.exp(-d2 * inv_a - torch.cdist(rgb[i0:i1], rgb).pow_(2) * inv_rgb).mul_(w_a)
            k.add_(torch.exp(d2.mul_(-inv_s)).mul_(w_s))
            del d2
            idx = torch.arange(i0, i1, device=dev)
            k[idx - i0, idx] = 0.0                                          # no self-pairs
            out[:, i0:i1] = q @ k.t()
            del k
        return out

    q = torch.softmax(logp, 0)
    for _ in range(int(iters)):
        q = torch.softmax(logp + message(q), 0)
    return q.reshape(L, H, W)


def _minmax(maps: torch.Tensor) -> torch.Tensor:
    a = maps.float()
    lo = a.flatten(1).amin(1).view(-1, 1, 1)
    hi = a.flatten(1).amax(1).view(-1, 1, 1)
    return (a - lo) / (hi - lo).clamp_min(1e-12)


def masks_from_attention(maps: torch.Tensor, image: torch.Tensor | None, cfg: ConceptConfig,
                         tau: float | None = None) -> torch.Tensor:
    """Binary masks ``[K', H, W]`` for the present concepts of one image (spec §4 steps 4-7).

    ``maps``: ``[K', H, W]`` non-negative attention at mask size.  Labels: the K'
    concepts plus, if ``cfg.unassigned``, an unassigned label of score ``tau`` (default
    ``cfg.tau_bg``).
    """
    a = _minmax(maps)
    scores = a
    if cfg.unassigned:
        scores = torch.cat([a, torch.full_like(a[:1], cfg.tau_bg if tau is None else tau)])
    probs = torch.softmax(scores / cfg.temperature, 0)
    if cfg.use_crf and image is not None:
        probs = dense_crf(probs, image, cfg.crf_iters, cfg.crf_smooth, cfg.crf_appearance)
    labels = probs.argmax(0)
    return torch.stack([(labels == k).float() for k in range(a.shape[0])])


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of binary masks (last two dims); 1 when both are empty."""
    a, b = a.bool(), b.bool()
    inter = (a & b).flatten(-2).sum(-1).float()
    union = (a | b).flatten(-2).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


def _noised(den: GradDenoiser, z: torch.Tensor, t: torch.Tensor, eps: torch.Tensor):
    sigma = den.schedule.sigmas[t.long().cpu()].to(z.device, torch.float32)
    return z + sigma.view(-1, 1, 1, 1) * eps, sigma


def e_step(den: GradDenoiser, text: ConceptText, rec: ConceptAttention, latents: torch.Tensor,
           images: torch.Tensor | None, vectors: torch.Tensor, presence: torch.Tensor, prev: torch.Tensor,
           cfg: ConceptConfig, captions: Sequence | None = None) -> tuple:
    """Re-estimate every mask (spec §4 E-step).  Returns ``(masks [N, K, H, W], info)``.

    Before training the vectors are the init words' own rows, so this E-step is the one
    "with the prompt built from the init words" (spec §4 init 3b; splicing a word's row
    equals prompting the word, §10.7).  Guards (step 8, [D]): if any present concept's new
    mask covers < ``area_min`` or > ``area_max`` of the image while the image has more
    than one label, the labelling is retried once with the unassigned score at Otsu's
    threshold (if that label exists), and if it still fails the image keeps all its
    previous masks (so they stay a partition).
    """
    N, K = presence.shape
    H, W = latents.shape[-2:]
    T = den.schedule.num_train_timesteps
    ts = torch.tensor([min(T - 1, round(t * T / 1000)) for t in cfg.estep_timesteps], device=latents.device)
    g = torch.Generator().manual_seed(int(cfg.estep_seed))
    new = prev.clone()
    info = {"kept_previous": [], "iou_prev": [], "adaptive_tau": []}
    for n in range(N):
        present = [k for k in range(K) if presence[n, k]]
        parts = captions[n] if captions is not None else subset_prompt(present)
        with torch.no_grad():
            cond, positions = text.encode(parts, vectors)
        eps = torch.randn((len(ts),) + tuple(latents.shape[1:]), generator=g).to(latents.device, latents.dtype)
        z = latents[n:n + 1].expand(len(ts), -1, -1, -1)
        x, sigma = _noised(den, z, ts, eps)
        rec.start({k: positions[k] for k in present}, keep_grad=False)
        with torch.no_grad():
            den.predict_x0_grad(x, sigma, cond)
        maps = rec.maps()
        rec.start({}, keep_grad=False)
        a = torch.stack([maps[k].mean(0) for k in present])                  # mean over timesteps
        a = F.interpolate(a[:, None].float(), size=(H, W), mode="bilinear", align_corners=False)[:, 0]
        img = images[n] if images is not None else None
        m = masks_from_attention(a, img, cfg)
        labels = len(present) + (1 if cfg.unassigned else 0)

        def failed(mm):
            area = mm.flatten(1).mean(1)
            return labels > 1 and bool(((area < cfg.area_min) | (area > cfg.area_max)).any())

        bad = failed(m)
        if bad and cfg.unassigned:
            # [D] before keeping the previous masks: flat maps (e.g. a token that attends
            # everywhere a little) put every pixel above the fixed tau_bg; retry once with
            # the unassigned score at Otsu's threshold of the normalised maps.
            tau = otsu_threshold(_minmax(a))
            m = masks_from_attention(a, img, cfg, tau=tau)
            bad = failed(m)
            if not bad:
                info["adaptive_tau"].append((n, tau))
        if bad:
            info["kept_previous"].append(n)
        else:
            for i, k in enumerate(present):
                new[n, k] = m[i].to(new.dtype)
        info["iou_prev"].extend(mask_iou(new[n, present], prev[n, present]).tolist())
    info["mean_iou_prev"] = float(sum(info["iou_prev"]) / max(len(info["iou_prev"]), 1))
    return new, info


# ----------------------------------------------------------------------------- training
@dataclass
class ConceptResult:
    vectors: torch.Tensor                 # [K, m, d] float32
    masks: torch.Tensor                   # [N, K, H, W] binary (latent size)
    losses: list = field(default_factory=list)
    mask_history: list = field(default_factory=list)   # masks after each E-step
    em_log: list = field(default_factory=list)         # per E-step info
    steps_done: int = 0
    early_stopped: bool = False         # masks converged: later E-steps skipped (but not the final one)


def _step_generator(seed: int, step: int) -> torch.Generator:
    """One generator per optimiser step, so a resumed run draws what the uninterrupted one would."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(step) * 7919 + 17) % (2 ** 63 - 1))


def learn_concepts(den: GradDenoiser, text: ConceptText, hooks, latents: torch.Tensor,
                   images: torch.Tensor | None, init_words: Sequence[str], cfg: ConceptConfig,
                   init_masks: torch.Tensor | None = None, presence: torch.Tensor | None = None,
                   init_vectors: torch.Tensor | None = None, start_step: int = 0,
                   progress: Callable | None = None, interrupt: Callable | None = None,
                   checkpoint: Callable | None = None, captions: Sequence[str] | None = None) -> ConceptResult:
    """The EM alternation (spec §4).

    ``latents`` ``[N, C, H, W]`` (scaled, model space); ``images`` ``[N, 3, H, W]`` RGB in
    [0,1] at latent size for the CRF (None: no CRF).  ``init_masks`` ``[N, K, H', W']``
    (binarised at 0.5, nearest-resized).  ``hooks``: the AttentionHooks registry the
    denoiser dispatches to (a :class:`ConceptAttention` is added and removed again).
    ``init_vectors`` ``[K, m, d]`` resume from saved vectors at ``start_step``.
    Callbacks: ``progress(step, total, loss)`` after every optimiser step;
    ``interrupt()`` raises to stop (checked once per step); ``checkpoint(step, vectors,
    reason)`` with ``reason`` ``"periodic"`` every ``save_every`` steps and
    ``"interrupted"`` (the last completed step's vectors) before an exception propagates.
    """
    cfg.validate()
    if latents is None or latents.ndim != 4 or latents.shape[0] == 0:
        raise ValueError("ConceptLearn needs at least one image")
    N = latents.shape[0]
    K = len(init_words)
    if K == 0:
        raise ValueError("give at least one concept")
    H, W = latents.shape[-2:]
    if presence is None:
        presence = torch.ones(N, K, dtype=torch.bool)   # cpu: presence table (indexed by Python)
    if tuple(presence.shape) != (N, K):
        raise ValueError(f"presence must be [{N}, {K}], got {tuple(presence.shape)}")
    if images is not None and (images.shape[0] != N or tuple(images.shape[-2:]) != (H, W)):
        raise ValueError(f"CRF images must be [{N}, 3, {H}, {W}], got {tuple(images.shape)}")
    cap_parts = None
    if captions is not None:
        if len(captions) != N:
            raise ValueError(f"{len(captions)} captions for {N} images")
        cap_parts = [parse_caption(c, K) for c in captions]
        presence = torch.tensor([[k in p for k in range(K)] for p in cap_parts], dtype=torch.bool)  # cpu: table
    m = cfg.vectors_per_token
    with torch.no_grad():
        if init_vectors is not None:
            e0 = init_vectors.detach().float().reshape(K, -1, text.width).clone()
            if e0.shape[1] != m:
                raise ValueError(f"the resumed embedding has {e0.shape[1]} vectors per token, config says {m}")
        else:
            e0 = torch.stack([text.init_vector(w).float() for w in init_words])[:, None].repeat(1, m, 1)
    vectors = torch.nn.Parameter(e0.to(latents.device))
    opt = torch.optim.AdamW([vectors], lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg.weight_decay)

    rec = ConceptAttention(cfg.attention_factors)
    hooks.add(rec)
    res = ConceptResult(vectors=e0.clone(), masks=torch.ones(N, K, H, W, device=latents.device))
    ones = presence[:, :, None, None].float().expand(N, K, H, W).clone().to(latents.device)
    target_type = getattr(den, "prediction_type", "epsilon")
    step = int(start_step)
    try:
        # ---- initial masks (spec §4 init 3)
        if init_masks is not None:
            im = init_masks.float()
            if im.ndim != 4 or im.shape[:2] != (N, K):
                raise ValueError(f"init masks must be [N={N}, K={K}, H, W], got {tuple(im.shape)}")
            masks = (F.interpolate(im, size=(H, W), mode="nearest") >= 0.5).float().to(latents.device)
            masks = masks * ones
        elif cfg.init_from_words or init_vectors is not None:
            # from the init words' rows (3b), or from the resumed vectors
            masks, info = e_step(den, text, rec, latents, images, vectors.detach(), presence, ones, cfg, cap_parts)
            res.em_log.append({"round": 0, **info})
            res.mask_history.append(masks.clone().cpu())
        else:
            masks = ones.clone()

        total = cfg.steps
        rounds = cfg.em_rounds
        per_round = [total // rounds + (1 if r < total % rounds else 0) for r in range(rounds)]
        bounds = []
        acc = 0
        for p in per_round:
            bounds.append((acc, acc + p))
            acc += p
        for r, (b0, b1) in enumerate(bounds):
            if b1 <= step:
                continue
            # ---- M-step
            for s in range(max(b0, step), b1):
                if interrupt is not None:
                    interrupt()
                g = _step_generator(cfg.seed, s)
                n = int(torch.randint(0, N, (1,), generator=g))
                present = [k for k in range(K) if presence[n, k]]
                S = draw_subset(present, g, cfg.union_sampling and cap_parts is None)
                t = torch.randint(0, den.schedule.num_train_timesteps, (1,), generator=g)  # cpu: seeded; _noised indexes the CPU schedule
                eps = torch.randn((1,) + tuple(latents.shape[1:]), generator=g).to(latents.device, latents.dtype)
                flip = bool(torch.rand(1, generator=g) < cfg.flip_p)
                z = latents[n:n + 1]
                mk = masks[n]
                if flip:
                    z, mk = z.flip(-1), mk.flip(-1)
                x, sigma = _noised(den, z, t, eps)
                cond, positions = text.encode(cap_parts[n] if cap_parts is not None else subset_prompt(S), vectors)
                rec.start({k: positions[k] for k in S}, keep_grad=cfg.lambda_attn > 0)
                x0 = den.predict_x0_grad(x, sigma, cond)
                pred, target = prediction_and_target(x, x0, z, eps, sigma, target_type)
                union = loss_region_mask(mk, S, [k for k in range(K) if presence[n, k]], cfg.loss_region)[None]
                loss = masked_loss(pred.float(), target.float(), union, cfg.mask_normalize)
                if cfg.lambda_attn > 0:
                    maps = rec.maps()
                    amap = torch.stack([maps[k][0] for k in S])
                    m16 = F.interpolate(mk[S][None].float(), size=amap.shape[-2:], mode="nearest")[0]
                    loss = loss + attention_loss(amap, m16, cfg.lambda_attn)
                opt.zero_grad(set_to_none=True)
                # gradient for the concept vectors only: frozen weights never get a .grad
                (vectors.grad,) = torch.autograd.grad(loss, [vectors])
                # the recorder keeps this step's state through the backward pass: with gradient
                # checkpointing the backward re-runs the UNet's blocks, and their attention calls
                # must take the same path as in the forward [D]
                rec.start({}, keep_grad=False)
                if cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_([vectors], cfg.grad_clip)
                opt.step()
                step = s + 1
                res.losses.append(float(loss.detach()))
                res.steps_done = step
                if progress is not None:
                    progress(step, total, res.losses[-1])
                if checkpoint is not None and cfg.save_every and step % cfg.save_every == 0 and step < total:
                    checkpoint(step, vectors.detach().clone(), "periodic")
            # ---- E-step (skipped once the masks have converged, except after the last round)
            if res.early_stopped and r < rounds - 1:
                continue
            masks_new, info = e_step(den, text, rec, latents, images, vectors.detach(), presence, masks, cfg, cap_parts)
            res.em_log.append({"round": r + 1, **info})
            masks = masks_new
            res.mask_history.append(masks.clone().cpu())
            # convergence (spec §4 schedule, "early stop" at mean IoU > 0.95 between consecutive
            # E-steps): we stop re-estimating the masks but still spend the whole token budget,
            # so ``steps`` means what it says [D]
            if len(res.mask_history) >= 2 and info["mean_iou_prev"] >= cfg.early_stop_iou:
                res.early_stopped = True
    except BaseException:
        if checkpoint is not None:
            checkpoint(step, vectors.detach().clone(), "interrupted")
        raise
    finally:
        hooks.remove(rec)
    res.vectors = vectors.detach().float().cpu().clone()
    res.masks = masks.detach().cpu()
    return res
