"""Joint (MM-DiT) attention: memory-bounded image-query -> text-key probabilities, and their recorder.

Spec ``rectified-flow.md`` §3.  SD3's joint blocks and Flux's double / single blocks attend over ONE
sequence of ``L = L_txt + L_img`` tokens, **text first** (SD3 ``mmdit.py`` ``_block_mixing`` concatenates
context then image; Flux ``layers.py`` ``cat((txt_q, img_q))``, single blocks ``cat((txt, img))``).  A
word's map is the probability mass the image queries give to its text keys, normalised over **all**
keys (text and image)::

    LSE_i  = log sum_{j < L} exp(q_i . k_j / sqrt(d) + m_ij)                  (J1)  i: image query
    P_ij   = exp(q_i . k_j / sqrt(d) + m_ij - LSE_i)        for j in S         (J2)  S: chosen text keys
    A_i    = mean_heads sum_{j in S} P_ij                                      (J3)

(J1)-(J2) are the row softmax of Vaswani et al. eq. 1 restricted to the columns ``S``; ``m`` is an
additive mask (a boolean mask means SDPA's "True = attend", i.e. ``m = 0`` / ``-inf``).  (J1) runs in
float32 over query chunks and key chunks with an online log-sum-exp
(``LSE <- logaddexp(LSE, logsumexp(chunk))``), so the largest transient is one
``[B, heads, Q_c, K_c]`` score block; the ``L x L`` matrix is never formed.  The recorder keeps one
running ``[B, h, w]`` float32 sum of (J3) over layers and steps (mean = sum / count), whatever the
number of steps, layers and heads.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .protocol import CallInfo, LayerInfo

__all__ = [
    "DEFAULT_BLOCK_ELEMENTS",
    "JointTokenMapRecorder",
    "as_4d_mask",
    "explicit_image_text_attention",
    "image_text_attention",
    "split_heads",
]

#: score-block budget (elements of one ``[B, heads, Q_c, K_c]`` float32 block; 2**24 = 64 MiB)
DEFAULT_BLOCK_ELEMENTS = 1 << 24


def split_heads(t: torch.Tensor, heads: int, skip_reshape: bool) -> torch.Tensor:
    """``[B, heads, L, d]`` from ComfyUI's two layouts: ``[B, L, heads*d]`` (SD3) or already split
    (Flux calls ``optimized_attention`` with ``skip_reshape=True``)."""
    if skip_reshape:
        return t
    b, L, c = t.shape
    return t.reshape(b, L, heads, c // heads).transpose(1, 2)


def as_4d_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """``[B or 1, H or 1, L, L]`` as ComfyUI's attention reads masks: ``[L, L]`` -> ``[1, 1, L, L]``,
    ``[B, L, L]`` -> ``[B, 1, L, L]`` (``attention_pytorch`` unsqueezes 0 then 1)."""
    if mask is None:
        return None
    if mask.ndim == 2:
        mask = mask.unsqueeze(0)
    if mask.ndim == 3:
        mask = mask.unsqueeze(1)
    return mask


def _mask_block(mask: torch.Tensor | None, rows: slice, cols: slice, like: torch.Tensor):
    """The additive float32 mask for score block ``[B, H, rows, cols]`` (None = no mask)."""
    if mask is None:
        return None
    m = as_4d_mask(mask)[..., rows, cols]
    if m.dtype == torch.bool:
        return torch.zeros(m.shape, device=like.device, dtype=torch.float32).masked_fill(~m.to(like.device),
                                                                                          float("-inf"))
    return m.to(device=like.device, dtype=torch.float32)


def image_text_attention(q: torch.Tensor, k: torch.Tensor, txt_len: int, columns: Sequence[int],
                         mask: torch.Tensor | None = None, img_len: int | None = None,
                         query_chunk: int | None = None, key_chunk: int | None = None,
                         block_elements: int = DEFAULT_BLOCK_ELEMENTS) -> torch.Tensor:
    """(J1)-(J3): ``[B, img_len]`` float32 head-averaged probability of the ``columns`` keys.

    ``q``, ``k``: ``[B, heads, L, d]`` (post-RoPE / QK-norm, as the attention kernel sees them);
    image queries are rows ``txt_len .. txt_len + img_len`` (``img_len`` defaults to ``L - txt_len``);
    ``columns``: key indices (text positions, each ``< L``).  ``mask`` broadcasts to ``[B, heads, L, L]``.
    Chunk sizes default to the largest that keep one score block within ``block_elements``.
    """
    B, H, L, d = q.shape
    if k.shape[:2] != (B, H) or k.shape[-1] != d:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} do not match")
    Lk = k.shape[2]
    img_len = L - txt_len if img_len is None else int(img_len)
    if txt_len < 0 or img_len < 0 or txt_len + img_len > L:
        raise ValueError(f"txt_len {txt_len} + img_len {img_len} exceed the {L} queries")
    cols = torch.as_tensor(list(columns), dtype=torch.long, device=k.device)
    if cols.numel() == 0:
        raise ValueError("no text keys chosen")
    if int(cols.min()) < 0 or int(cols.max()) >= Lk:
        raise ValueError(f"key positions {cols.tolist()} outside the {Lk} keys")
    scale = 1.0 / math.sqrt(d)
    kc = key_chunk or max(1, min(Lk, block_elements // max(1, B * H * min(img_len, 256))))
    qc = query_chunk or max(1, min(img_len, block_elements // max(1, B * H * kc)))
    k_sel = k.index_select(2, cols).float()                                  # [B, H, |S|, d]
    out = torch.empty((B, img_len), device=q.device, dtype=torch.float32)
    for r0 in range(0, img_len, qc):
        r1 = min(img_len, r0 + qc)
        rows = slice(txt_len + r0, txt_len + r1)
        qb = q[:, :, rows].float() * scale                                   # [B, H, Qc, d]
        lse = None
        for c0 in range(0, Lk, kc):                                          # (J1), online over key chunks
            c1 = min(Lk, c0 + kc)
            s = qb @ k[:, :, c0:c1].float().transpose(-1, -2)
            m = _mask_block(mask, rows, slice(c0, c1), s)
            if m is not None:
                s = s + m
            part = torch.logsumexp(s, dim=-1)
            lse = part if lse is None else torch.logaddexp(lse, part)
        s_sel = qb @ k_sel.transpose(-1, -2)                                 # [B, H, Qc, |S|]
        if mask is not None:
            mm = as_4d_mask(mask)[..., rows, :]
            mm = mm.index_select(-1, cols.to(mm.device))
            s_sel = s_sel + _mask_block(mm, slice(None), slice(None), s_sel)
        p = torch.exp(s_sel - lse[..., None])                                # (J2)
        out[:, r0:r1] = p.sum(-1).mean(1)                                    # (J3)
    return out


def explicit_image_text_attention(q, k, txt_len: int, columns, mask=None) -> torch.Tensor:
    """Reference for tests: the full float64 softmax, then (J2)-(J3) by indexing (materialises ``L x L``)."""
    d = q.shape[-1]
    s = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(d)
    if mask is not None:
        m = as_4d_mask(mask)
        if m.dtype == torch.bool:
            m = torch.zeros(m.shape, dtype=torch.float64, device=s.device).masked_fill(~m.to(s.device), float("-inf"))
        s = s + m.double()
    p = torch.softmax(s, dim=-1)
    return p[:, :, txt_len:, list(columns)].sum(-1).mean(1)


class JointTokenMapRecorder:
    """Running mean of a word's joint-attention map (J3) over the selected layers and steps.

    Parameters
    ----------
    positions: text-key positions of the word (always used; each must be < ``L_txt``).
    optional_positions: positions used only where the call's text is long enough (SD3's T5 part:
        77 CLIP tokens, then T5 tokens when the T5 encoder was loaded, spec §3.1/§3.4).
    prompt_len: length of the prompt's own text sequence; when ComfyUI batches conditionings of other
        lengths it repeats the context to a common multiple, so a text of ``n * prompt_len`` keys holds
        the word at ``p + i * prompt_len`` too (every copy is summed, as the UNet recorder does).
        None = no repetition.
    cond_index: which conditioning's rows to record (0 = positive; the guider's row index).
    layers: the layer kinds to record (``"double"``: SD3 joint blocks / Flux double blocks, spec §3.4's
        default; ``"single"``: Flux single blocks); ``layer_range`` restricts to orders ``[lo, hi)``.
    steps: ``(start, end)`` fractions of sampling during which to record.

    Memory: one ``[B, h, w]`` float32 sum and a count; nothing per step or layer.
    """

    records = True

    def __init__(self, positions: Sequence[int], optional_positions: Sequence[int] = (),
                 prompt_len: int | None = None, cond_index: int = 0, layers=("double",),
                 layer_range: tuple | None = None, steps=(0.0, 1.0), patch_size: int = 2,
                 block_elements: int = DEFAULT_BLOCK_ELEMENTS):
        if not positions and not optional_positions:
            raise ValueError("JointTokenMapRecorder needs at least one token position")
        start, end = float(steps[0]), float(steps[1])
        if not 0.0 <= start < end <= 1.0:
            raise ValueError(f"steps must satisfy 0 <= start < end <= 1, got {steps}")
        self.positions = [int(p) for p in positions]
        self.optional_positions = [int(p) for p in optional_positions]
        self.prompt_len = None if prompt_len is None else int(prompt_len)
        self.cond_index = int(cond_index)
        self.layers = tuple(layers)
        self.layer_range = layer_range
        self.steps = (start, end)
        self.patch_size = int(patch_size)
        self.block_elements = int(block_elements)
        self.reset()

    def reset(self) -> None:
        """Forget everything recorded (called at the start of each sampling run)."""
        self._sum = None
        self.calls = 0
        self.latent_hw = None
        self.grid = None

    def wants(self, layer: LayerInfo, call: CallInfo) -> bool:
        """Whether this call of ``layer`` is recorded (before any probability is computed)."""
        if layer.place not in self.layers:
            return False
        if self.layer_range is not None and not self.layer_range[0] <= layer.order < self.layer_range[1]:
            return False
        p = call.progress
        if p is not None and not (self.steps[0] <= p < self.steps[1] or (p == 1.0 and self.steps[1] == 1.0)):
            return False
        return bool(call.rows_of(self.cond_index))

    def columns(self, txt_len: int) -> list:
        """The text keys (J2)'s ``S`` of a call whose text part has ``txt_len`` tokens."""
        base = [p for p in self.positions]
        if any(p >= txt_len for p in base):
            raise ValueError(f"token positions {base} are outside the model's {txt_len} text tokens: the "
                             f"sampler's conditioning is not the prompt the capture was set up for")
        base += [p for p in self.optional_positions if p < txt_len]
        reps = 1
        if self.prompt_len and txt_len % self.prompt_len == 0:
            reps = txt_len // self.prompt_len
        return sorted({p + i * self.prompt_len for i in range(reps) for p in base}) if reps > 1 else sorted(set(base))

    def grid_of(self, latent_hw, img_len: int) -> tuple:
        h = -(-int(latent_hw[0]) // self.patch_size)
        w = -(-int(latent_hw[1]) // self.patch_size)
        if h * w > img_len:
            raise ValueError(f"a {tuple(latent_hw)} latent has {h * w} image tokens, the call only {img_len}")
        return h, w

    def record(self, q, k, txt_len: int, img_len: int, layer: LayerInfo, call: CallInfo, mask=None) -> None:
        """Add (J3) of one attention call: ``q``, ``k`` ``[B, heads, L, d]``; image tokens after the text
        (only the first ``h*w`` are the latent's, e.g. Flux Kontext appends reference tokens)."""
        rows = call.rows_of(self.cond_index)
        h, w = self.grid_of(call.latent_hw, img_len)
        idx = torch.as_tensor(rows, device=q.device, dtype=torch.long)
        qr, kr = q.index_select(0, idx), k.index_select(0, idx)
        mr = None
        if mask is not None:
            mr = as_4d_mask(mask)
            if mr.shape[0] == q.shape[0]:
                mr = mr.index_select(0, idx.to(mr.device))
        a = image_text_attention(qr, kr, txt_len, self.columns(txt_len), mask=mr, img_len=h * w,
                                 block_elements=self.block_elements)
        a = a.reshape(-1, call.rows_per_chunk, h, w).mean(0)                 # average chunks of one cond
        if self._sum is None:
            self._sum = a.detach().clone()
        else:
            if self._sum.shape != a.shape:
                raise ValueError("batch or latent size changed while recording; reset the recorder between runs")
            self._sum += a.detach()
        self.calls += 1
        self.latent_hw = tuple(int(v) for v in call.latent_hw)
        self.grid = (h, w)

    def native_size(self) -> tuple:
        if self.grid is None:
            raise RuntimeError("no joint attention was recorded")
        return self.grid

    def result(self, size: Sequence[int] | None = None) -> torch.Tensor:
        """Mean map ``[B, h, w]`` on the image-token grid; ``size`` resamples it (bilinear)."""
        if self._sum is None:
            raise RuntimeError("no joint attention was recorded: the patched model has not sampled yet, or no "
                               "step fell inside the recording window")
        m = self._sum / self.calls
        if size is not None and tuple(size) != tuple(m.shape[-2:]):
            m = torch.nn.functional.interpolate(m[:, None], size=tuple(size), mode="bilinear",
                                                align_corners=False)[:, 0]
        return m

    def state_numel(self) -> int:
        """Number of tensor elements the recorder holds (the memory bound: one map)."""
        return 0 if self._sum is None else self._sum.numel()
