"""Cross-attention hooks: record and modify attention per layer and step.

Adapters call :meth:`AttentionHooks.__call__` from inside every cross-attention layer
with the *projected* queries, keys and values (heads merged, ``[rows, seq, heads*d]``),
a :class:`~.protocol.LayerInfo`, a :class:`~.protocol.CallInfo` and ``attend``, the
attention function the layer would use anyway (ComfyUI's optimized attention, another
pack's replace patch, or SDPA).  The layer's output always comes from ``attend``, so a
recording hook never changes the sample; probabilities are computed on the side, only
for the rows a recorder asks for::

    P = softmax(Q K^T / sqrt(d))            (A1, per head; Vaswani et al. eq. 1)

Recorders aggregate on the fly.  :class:`TokenMapRecorder` keeps one running sum per
query resolution, so its memory is independent of steps x layers x heads.  Map of a
word at one layer and step (DAAM / LEDITS++ §4.4 step 3)::

    A = mean_heads sum_{j in word tokens} P[:, :, j]          (A2)

and the recorded map is the mean of (A2) over the selected layers and steps.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F

from .protocol import CallInfo, LayerInfo

__all__ = [
    "AttentionHook", "AttentionHooks", "TokenMapRecorder", "TokenKVOverride", "ProbabilityCache",
    "fold_sequence", "explicit_attention",
]


def fold_sequence(seq_len: int, latent_hw: Sequence[int]) -> tuple:
    """(h, w) of a layer whose query sequence has ``seq_len`` entries.

    UNet downsampling convs (kernel 3, stride 2, padding 1) give ceil(H / 2) per level,
    so the layer is at ceil(H/f) x ceil(W/f) for a power of two f.
    """
    H, W = int(latent_hw[0]), int(latent_hw[1])
    f = 1
    while f <= max(H, W) * 2:
        h, w = -(-H // f), -(-W // f)
        if h * w == seq_len:
            return h, w
        f *= 2
    raise ValueError(f"cannot fold an attention sequence of {seq_len} queries onto a {H}x{W} latent")


def explicit_attention(q, k, v, heads: int) -> torch.Tensor:
    """Reference attention (A1) with an explicit softmax; ``[B, L, heads*d]`` in and out."""
    b, L, c = q.shape
    d = c // heads
    qh = q.reshape(b, L, heads, d).transpose(1, 2)
    kh = k.reshape(b, -1, heads, d).transpose(1, 2)
    vh = v.reshape(b, -1, heads, d).transpose(1, 2)
    p = torch.softmax((qh.float() @ kh.float().transpose(-1, -2)) / math.sqrt(d), dim=-1)
    return (p @ vh.float()).to(q.dtype).transpose(1, 2).reshape(b, L, c)


class ProbabilityCache:
    """Attention probabilities (A1) of one layer call, computed once per row set."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor, heads: int):
        self.q, self.k, self.heads = q, k, heads
        self._cache = {}

    def rows(self, rows: Sequence[int]) -> torch.Tensor:
        """float32 probabilities ``[len(rows), heads, queries, keys]``."""
        key = tuple(rows)
        if key not in self._cache:
            if key == tuple(range(key[0], key[-1] + 1)):      # contiguous: a view, no copy
                q, k = self.q[key[0]:key[-1] + 1], self.k[key[0]:key[-1] + 1]
            else:
                idx = torch.as_tensor(rows, device=self.q.device, dtype=torch.long)
                q, k = self.q.index_select(0, idx), self.k.index_select(0, idx)
            r, L, c = q.shape
            d = c // self.heads
            qh = (q.float() * (1.0 / math.sqrt(d))).reshape(r, L, self.heads, d).transpose(1, 2)
            kh = k.float().reshape(r, k.shape[1], self.heads, d).transpose(1, 2)
            self._cache[key] = torch.softmax(qh @ kh.transpose(-1, -2), dim=-1)
        return self._cache[key]

    @property
    def queries(self) -> int:
        return self.q.shape[1]


class AttentionHook:
    """Base class.  Override any of ``active``, ``modify_kv``, ``record``, ``modify_out``."""

    records = False  # set True in recorders: they receive a ProbabilityCache

    def active(self, layer: LayerInfo, call: CallInfo) -> bool:
        return True

    def modify_kv(self, k, v, heads, layer: LayerInfo, call: CallInfo):
        return k, v

    def record(self, probs: ProbabilityCache, layer: LayerInfo, call: CallInfo) -> None:
        pass

    def modify_out(self, out, layer: LayerInfo, call: CallInfo):
        return out


class AttentionHooks:
    """The registry adapters dispatch to.  Cheap when no hook is active for a layer."""

    def __init__(self, hooks: Iterable[AttentionHook] = ()):
        self.hooks = list(hooks)

    def add(self, hook: AttentionHook) -> AttentionHook:
        self.hooks.append(hook)
        return hook

    def remove(self, hook: AttentionHook) -> None:
        self.hooks = [h for h in self.hooks if h is not hook]

    def __len__(self):
        return len(self.hooks)

    def __call__(self, q, k, v, heads: int, layer: LayerInfo, call: CallInfo,
                 attend: Callable) -> torch.Tensor:
        active = [h for h in self.hooks if h.active(layer, call)]
        if not active:
            return attend(q, k, v)
        for h in active:
            k, v = h.modify_kv(k, v, heads, layer, call)
        out = attend(q, k, v)
        recorders = [h for h in active if h.records]
        if recorders:
            cache = ProbabilityCache(q, k, heads)
            for h in recorders:
                h.record(cache, layer, call)
        for h in active:
            out = h.modify_out(out, layer, call)
        return out


LAYER_MODES = ("lowres", "all")


class TokenMapRecorder(AttentionHook):
    """Running mean of a word's cross-attention map (A2) over layers and steps.

    Parameters
    ----------
    positions: token positions of the word in the prompt's token sequence (BOS = 0).
    prompt_len: length of the prompt's token sequence.  ComfyUI pads shorter
        conditionings in a batch by repeating them, so a context of ``n * prompt_len``
        keys holds the word at ``p + i * prompt_len``; (A2) sums over every copy, which
        makes the map independent of such padding.
    cond_index: which conditioning's rows to record (0 = positive).
    layers: ``"lowres"`` = down and up layers at 1/4 of the latent size, the layers
        LEDITS++ (spec §4.4 step 3) and Eta Inversion (§4.2) use, the middle block
        excluded; if a model has none there (tiny test UNets), the coarsest non-middle
        resolution it has.  ``"all"`` = every cross-attention layer, each resampled
        bilinearly to the output size (DAAM-style).
    steps: ``(start, end)`` fractions of sampling during which to record; calls whose
        step is unknown are always recorded.

    Memory: one ``[B, h, w]`` float32 sum per query resolution, whatever the number of
    steps, layers and heads.
    """

    records = True

    def __init__(self, positions: Sequence[int], prompt_len: int, cond_index: int = 0,
                 layers: str = "lowres", steps=(0.0, 1.0)):
        if not positions:
            raise ValueError("TokenMapRecorder needs at least one token position")
        if layers not in LAYER_MODES:
            raise ValueError(f"layers must be one of {LAYER_MODES}, got {layers!r}")
        start, end = float(steps[0]), float(steps[1])
        if not 0.0 <= start < end <= 1.0:
            raise ValueError(f"steps must satisfy 0 <= start < end <= 1, got {steps}")
        self.positions = [int(p) for p in positions]
        self.prompt_len = int(prompt_len)
        # latent size -> the layer factor ``lowres`` uses there (4, or the coarsest non-mid
        # factor of a model without 1/4-size layers); learnt from the first full model call
        # and kept across resets, so that later calls skip every other layer before any
        # probability is computed.
        self._lowres_factor = {}
        self.cond_index = cond_index
        self.layers = layers
        self.steps = (start, end)
        self.reset()

    def reset(self) -> None:
        """Forget everything recorded (called at the start of each sampling run)."""
        if getattr(self, "_sums", None) and self.layers == "lowres" and self.latent_hw is not None:
            factors = [k[0] for k in self._sums if not k[1]]
            if factors:   # a full model call was seen: remember its coarsest level
                self._lowres_factor.setdefault(self.latent_hw, 4 if 4 in factors else max(factors))
        self._sums = {}    # (factor, place_is_mid) -> [sum tensor, count, (h, w)]
        self.calls = 0
        self.latent_hw = None

    def active(self, layer, call) -> bool:
        p = call.progress
        if p is not None and not (self.steps[0] <= p < self.steps[1] or (p == 1.0 and self.steps[1] == 1.0)):
            return False
        if self.layers == "lowres" and layer.place == "mid":
            return False
        return bool(call.rows_of(self.cond_index))

    def _columns(self, n_keys: int) -> list:
        if n_keys % self.prompt_len == 0:
            reps = n_keys // self.prompt_len
        else:
            reps = 1
        cols = [p + i * self.prompt_len for i in range(reps) for p in self.positions]
        if max(cols) >= n_keys:
            raise ValueError(f"token position {max(cols)} is outside the layer's {n_keys} keys")
        return cols

    def record(self, probs, layer, call) -> None:
        if self.layers == "lowres":
            # Only 1/4-size layers are used when the model has them (else the coarsest
            # non-mid level): skip the others before computing any probability once the
            # layout is known for this latent size (see ``_lowres_factor``).
            h, _ = fold_sequence(probs.queries, call.latent_hw)
            factor = -(-int(call.latent_hw[0]) // h)
            hw = tuple(int(v) for v in call.latent_hw)
            known = self._lowres_factor.get(hw)
            if known is not None and factor != known:
                return
            if factor == 4 and known is None:
                self._lowres_factor[hw] = 4
                self._sums = {k: v for k, v in self._sums.items() if k[0] == 4}
                self.calls = sum(v[1] for v in self._sums.values())
        rows = call.rows_of(self.cond_index)
        p = probs.rows(rows)                                   # [R, heads, L, T]
        cols = torch.as_tensor(self._columns(p.shape[-1]), device=p.device)
        a = p.index_select(-1, cols).sum(-1).mean(1)           # (A2): [R, L]
        h, w = fold_sequence(a.shape[-1], call.latent_hw)
        a = a.reshape(-1, call.rows_per_chunk, h, w).mean(0)   # average chunks of one cond
        factor = -(-int(call.latent_hw[0]) // h)
        key = (factor, layer.place == "mid")
        slot = self._sums.get(key)
        if slot is None:
            self._sums[key] = [a.detach().clone(), 1, (h, w)]
        else:
            if slot[0].shape != a.shape:
                raise ValueError("batch size changed while recording; reset the recorder between runs")
            slot[0] += a.detach()
            slot[1] += 1
        self.calls += 1
        self.latent_hw = tuple(int(v) for v in call.latent_hw)

    def selected(self) -> list:
        """The accumulator slots the ``layers`` mode uses."""
        if not self._sums:
            return []
        if self.layers == "all":
            return list(self._sums.values())
        non_mid = {k[0]: v for k, v in self._sums.items() if not k[1]}
        if not non_mid:
            return []
        factor = 4 if 4 in non_mid else max(non_mid)
        return [non_mid[factor]]

    def native_size(self) -> tuple:
        slots = self.selected()
        if not slots:
            raise RuntimeError("no cross-attention was recorded")
        return max(s[2] for s in slots)

    def result(self, size: Optional[Sequence[int]] = None) -> torch.Tensor:
        """Mean map ``[B, h, w]``; ``size`` resamples it (bilinear) to another size."""
        slots = self.selected()
        if not slots:
            raise RuntimeError(
                "no cross-attention was recorded: the patched model has not sampled yet, or "
                "no step fell inside the recording window")
        size = tuple(size) if size is not None else self.native_size()
        total, count = None, 0
        for s, n, hw in slots:
            m = s if tuple(hw) == size else F.interpolate(s[:, None], size=size, mode="bilinear",
                                                          align_corners=False)[:, 0]
            total = m if total is None else total + m
            count += n
        return total / count


class TokenKVOverride(AttentionHook):
    """Replace the keys/values of chosen token positions with given vectors.

    ``keys[layer.order]`` / ``values[layer.order]`` are ``[len(positions), heads*d]``
    tensors (already projected), used for the rows of ``cond_index``; layers absent from
    the dicts are left alone.  This is the mechanism of InstructBrush's learnable
    instruction keys/values (spec ``instructbrush.md`` §4.1).
    """

    def __init__(self, positions: Sequence[int], keys: dict, values: dict, cond_index: int = 0):
        self.positions = list(positions)
        self.keys, self.values = keys, values
        self.cond_index = cond_index

    def active(self, layer, call):
        return (layer.order in self.keys or layer.order in self.values) and bool(call.rows_of(self.cond_index))

    def modify_kv(self, k, v, heads, layer, call):
        rows = torch.as_tensor(call.rows_of(self.cond_index), device=k.device)
        pos = torch.as_tensor(self.positions, device=k.device)
        if layer.order in self.keys:
            k = k.clone()
            k[rows[:, None], pos[None, :]] = self.keys[layer.order].to(k.dtype)
        if layer.order in self.values:
            v = v.clone()
            v[rows[:, None], pos[None, :]] = self.values[layer.order].to(v.dtype)
        return k, v
