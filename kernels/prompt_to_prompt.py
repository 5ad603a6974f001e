"""Prompt-to-Prompt attention control (Hertz et al. 2022, arXiv 2208.01626) on the attention hooks.

A source and a target prompt are denoised side by side in one batched model call; the
target's attention is taken from the source's where the edit says so.  Notation: ``P_s``,
``P_t`` are the source and target rows' attention probabilities ``[heads, queries, keys]``
(``P = softmax(Q K^T / sqrt(d))``, :mod:`.attention` A1) at the same layer and step, ``V_t``
the target's values, ``T`` the context length (77 per chunk), step ``i`` counted from the
first step the run evaluates, ``N`` the run's steps.

Cross-attention (paper §3.2 "Edit(M_t, M*_t, t)", the reference's ``AttentionControlEdit``)::

    P_t' = a_i R(P_s, P_t) + (1 - a_i) P_t                                    (P1)
    a_i  = 1  if  floor(c0 (N + 1)) <= i < floor(c1 (N + 1))  else 0         (P2)

with ``(c0, c1)`` the cross-attention step range (``cross_replace_steps``; the reference's
``get_time_words_attention_alpha`` has N + 1 rows) and ``R`` one of

* replace / word swap (paper "Word Swap"): ``R = P_s M``, ``M [T, T]`` maps each source
  token to the target token(s) at the same word (a word of n target tokens receives 1/n of
  its source word's attention on each), identity elsewhere                        (P3)
* refine / words added (paper "Prompt Refinement"): ``R[:, :, j] = P_s[:, :, A(j)]``
  where the global alignment ``A`` pairs target token ``j`` with a source token, and
  ``R[:, :, j] = P_t[:, :, j]`` where ``A(j)`` is none (a new word)                 (P4)
* reweight / equalizer (paper "Attention Re-weighting"), on top of either:
  ``R' = R * e``, ``e [T]`` = the given factor at the chosen target words, 1 elsewhere (P5)

The target's output is ``P_t' V_t``.  Outside the range (``a_i = 0``) the layer's own
attention runs untouched (reweight included, as in the reference).

Self-attention (the reference's ``replace_self_attention``, steps ``floor(s0 N) <= i <
floor(s1 N)``, layers at 1/2 of the latent size or coarser)::

    out_t = softmax(Q_s K_s^T / sqrt(d)) V_t  = attend(Q_s, K_s, V_t)              (P6)

computed with the layer's own attention function, so no probability matrix is formed.
The reference's rule is "at most 32^2 queries" on SD1.x's 64^2 latent, i.e. factor >= 2;
we state it relative to the latent so it holds at every size [ours].

Local blend (paper §3.2 "local editing", the reference's ``LocalBlend``): per prompt, the
attention of its blend words summed over their tokens, averaged over heads, summed over the
down/up layers at 1/4 of the latent size (or the coarsest non-middle size a model has) and
over the steps so far, is max-normalised and thresholded; the union over source and target,
grown by one attention pixel and upsampled (nearest) to the latent, keeps the target::

    m = dilate([A_s / max A_s > th] OR [A_t' / max A_t' > th])                     (P7)
    x_t <- x_s + m (x_t - x_s)           after every step i >= floor(start N)      (P8)

``A_t'`` is the target's *controlled* map (P1) — the reference's attention store holds the
probabilities after its in-place edit.  (P8) is the Inversion Sampler's background lock
with the source branch at the inversion's level (:class:`LocalBlend` speaks its protocol).

Rows: the hook finds the source and target rows of a call by their conditioning indices
(:class:`~.protocol.CallInfo`); when both indices are the same, the first half of that
conditioning's rows is the source batch and the second the target batch (one model call on
``[x_s, x_t]``, as the reference batches).  Only those rows are controlled: the negative
(unconditional) rows run untouched, as in the reference.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .attention import AttentionHooks, ProbabilityCache, fold_sequence
from .maps import binarize

__all__ = [
    "ControlledHooks",
    "LocalBlend",
    "PromptToPromptControl",
    "PromptToPromptError",
    "SourceAnchoredPtP",
    "align_tokens",
    "equalizer",
    "install_self_attention_hooks",
    "ptp_predict",
    "refinement_mapper",
    "replacement_mapper",
    "step_windows",
    "word_token_spans",
]

MODES = ("replace", "refine")


class PromptToPromptError(ValueError):
    """Prompts or words that Prompt-to-Prompt cannot align; raised before any model call."""


# ----------------------------------------------------------------------------- token bookkeeping

def align_tokens(src: Sequence, tgt: Sequence) -> list:
    """Global alignment of two token sequences (Needleman-Wunsch; gap 0, match +1, mismatch -1).

    Returns, per target token, the index of its source token or -1 (an inserted token).  Ties
    are broken as Prompt-to-Prompt's ``seq_aligner`` does: a target-only token first, then a
    source-only token, then the pair.
    """
    n, m = len(src), len(tgt)
    score = [[0] * (m + 1) for _ in range(n + 1)]
    move = [[0] * (m + 1) for _ in range(n + 1)]     # 1 target-only (left), 2 source-only (up), 3 pair
    for j in range(1, m + 1):
        move[0][j] = 1
    for i in range(1, n + 1):
        move[i][0] = 2
        for j in range(1, m + 1):
            left, up = score[i][j - 1], score[i - 1][j]
            diag = score[i - 1][j - 1] + (1 if src[i - 1] == tgt[j - 1] else -1)
            best = max(left, up, diag)
            score[i][j] = best
            move[i][j] = 1 if best == left else (2 if best == up else 3)
    out = [-1] * m
    i, j = n, m
    while i > 0 or j > 0:
        if move[i][j] == 3:
            i, j = i - 1, j - 1
            out[j] = i
        elif move[i][j] == 1:
            j -= 1
        else:
            i -= 1
    return out


def refinement_mapper(src_tokens: Sequence, tgt_tokens: Sequence, context_len: int):
    """(P4): ``(index [T] long, keep [T] float)`` for refine.

    ``src_tokens`` / ``tgt_tokens`` are the prompts' token ids from BOS to EOS (no padding).
    Target token ``j`` of the prompt takes source column ``index[j]`` where ``keep[j] = 1``;
    padding columns after the target prompt map to themselves.
    """
    if len(tgt_tokens) > context_len or len(src_tokens) > context_len:
        raise PromptToPromptError(f"refine aligns tokens inside one {context_len}-token context; the source has "
                                  f"{len(src_tokens)} and the target {len(tgt_tokens)} tokens")
    a = align_tokens(list(src_tokens), list(tgt_tokens))
    index = torch.arange(context_len)     # cpu: token bookkeeping, moved to the attention's device where used
    keep = torch.ones(context_len)        # cpu: as above
    for j, i in enumerate(a):
        index[j] = i if i >= 0 else j
        keep[j] = 1.0 if i >= 0 else 0.0
    if not bool(keep[1:len(tgt_tokens) - 1].any()) and len(tgt_tokens) > 2:
        raise PromptToPromptError("refine: no word of the target prompt aligns with the source prompt, so there is "
                                  "no attention to carry over; use replace or a closer target prompt")
    return index, keep


def word_token_spans(words: Sequence[Sequence]) -> list:
    """Token positions (BOS = 0) of each word, given each whitespace word's token ids in order."""
    spans, pos = [], 1
    for toks in words:
        spans.append(list(range(pos, pos + len(toks))))
        pos += len(toks)
    return spans


def replacement_mapper(src_words: Sequence[Sequence], tgt_words: Sequence[Sequence], context_len: int,
                       src_text: Sequence[str] = (), tgt_text: Sequence[str] = ()) -> torch.Tensor:
    """(P3): ``M [T, T]`` for replace, from each prompt's words as token-id lists (whitespace words).

    Prompts must have the same number of words.  A changed word's source tokens map to its
    target tokens: one to one when the counts agree, else each target token gets 1/n from
    every source token of the word (the reference's rule).  Unchanged tokens, BOS, EOS and the
    padding map along the diagonal of the aligned positions.  [ours: the reference maps the
    tokens after the last changed word j -> j even when an earlier word changed length; we
    keep the alignment i -> j.  They agree whenever changed words keep their token counts.]
    """
    if len(src_words) != len(tgt_words):
        a = " ".join(src_text) if src_text else f"{len(src_words)} words"
        b = " ".join(tgt_text) if tgt_text else f"{len(tgt_words)} words"
        raise PromptToPromptError(
            f"replace swaps words one for one: the source prompt has {len(src_words)} words ({a!r}) and the target "
            f"{len(tgt_words)} ({b!r}); use the same number of words, or refine to add words")
    n_src = 2 + sum(len(w) for w in src_words)
    n_tgt = 2 + sum(len(w) for w in tgt_words)
    if max(n_src, n_tgt) > context_len:
        raise PromptToPromptError(f"replace maps tokens inside one {context_len}-token context; the source has "
                                  f"{n_src} and the target {n_tgt} tokens")
    m = torch.zeros(context_len, context_len)     # cpu: moved to the attention's device where used
    m[0, 0] = 1.0                                                  # BOS
    i = j = 1
    for ws, wt in zip(src_words, tgt_words):
        ws, wt = list(ws), list(wt)
        if ws == wt or len(ws) == len(wt):
            for k in range(len(ws)):
                m[i + k, j + k] = 1.0
        else:
            for jj in range(j, j + len(wt)):
                m[i:i + len(ws), jj] = 1.0 / len(wt)
        i, j = i + len(ws), j + len(wt)
    while i < context_len and j < context_len:                     # EOS and padding
        m[i, j] = 1.0
        i, j = i + 1, j + 1
    return m


def equalizer(context_len: int, positions: Sequence[Sequence[int]], values: Sequence[float]) -> torch.Tensor:
    """(P5): ``e [T]``, ``values[k]`` at ``positions[k]`` (token positions of word k), 1 elsewhere."""
    e = torch.ones(context_len)     # cpu: moved to the attention's device where used
    for pos, val in zip(positions, values):
        for p in pos:
            if not 0 <= p < context_len:
                raise PromptToPromptError(f"token position {p} is outside the {context_len}-token context")
            e[p] = float(val)
    return e


def step_windows(total: int, cross=(0.0, 0.4), self_=(0.0, 0.6)) -> tuple:
    """``((c_lo, c_hi), (s_lo, s_hi))`` integer step bounds of (P2) and the self-attention range."""
    c = (int(cross[0] * (total + 1)), int(cross[1] * (total + 1)))
    s = (int(self_[0] * total), int(self_[1] * total))
    return c, s


# ----------------------------------------------------------------------------- local blend

class LocalBlend:
    """(P7), (P8): records the blend words' maps during the run and gives the blend mask.

    ``src_positions`` / ``tgt_positions``: token positions of the blend words in each prompt.
    ``threshold`` (reference 0.3), ``start`` (fraction of the run's steps before blending,
    reference 0.2).  ``rule``: ``"threshold"`` (the reference: ``A / max A > threshold``) or
    ``"otsu"`` [ours, issue 17's size-independent rule]: each branch's map split in two by its own
    histogram (:func:`~.maps.binarize` ``otsu``), for models whose maps are flat, where a fixed
    fraction of the maximum keeps the whole image (``threshold`` is then not read).
    It also speaks the Inversion Sampler's background-lock protocol
    (``lock_region(threshold)``: the undilated union at attention size, or None before
    ``start``; the sampler dilates by one pixel and upsamples with nearest, which is (P7)),
    and ``mean(0)`` for Concept Masks.
    """

    RULES = ("threshold", "otsu")

    def __init__(self, src_positions: Sequence[int], tgt_positions: Sequence[int], threshold: float = 0.3,
                 start: float = 0.2, rule: str = "threshold"):
        if not src_positions or not tgt_positions:
            raise PromptToPromptError("local blend needs at least one word in each prompt")
        if not 0.0 <= threshold < 1.0:
            raise PromptToPromptError(f"the blend threshold must be in [0, 1), got {threshold}")
        if rule not in self.RULES:
            raise PromptToPromptError(f"the blend rule must be one of {self.RULES}, got {rule!r}")
        self.positions = (list(src_positions), list(tgt_positions))
        self.threshold, self.start, self.rule = float(threshold), float(start), rule
        self.k = 1
        self.reset()

    def reset(self):
        self.sums = {}            # (branch, factor) -> [B, h, w]
        self.step, self.total = None, None

    def set_step(self, step: int, total: int):
        self.step, self.total = int(step), int(total)

    def record(self, branch: int, probs: torch.Tensor, layer, call) -> None:
        """``probs [R, heads, L, T]`` of one branch (0 source, 1 target) at a cross-attention layer."""
        if layer.place == "mid":
            return
        cols = torch.as_tensor([p for p in self.positions[branch] if p < probs.shape[-1]], device=probs.device)
        a = probs.index_select(-1, cols).sum(-1).mean(1)                       # [R, L]
        h, w = fold_sequence(a.shape[-1], call.latent_hw)
        factor = -(-int(call.latent_hw[0]) // h)
        a = a.reshape(-1, h, w).float().detach()
        key = (branch, factor)
        self.sums[key] = a.clone() if key not in self.sums else self.sums[key] + a

    def _factor(self):
        factors = {f for _, f in self.sums}
        if not factors:
            return None
        return 4 if 4 in factors else max(factors)

    def region(self) -> torch.Tensor | None:
        """``[B, h, w]`` in {0, 1}: the thresholded union of (P7) before dilation; None if nothing recorded."""
        f = self._factor()
        if f is None or (0, f) not in self.sums or (1, f) not in self.sums:
            return None
        out = None
        for b in (0, 1):
            a = self.sums[(b, f)]
            a = a / a.flatten(1).amax(1).view(-1, 1, 1)
            m = binarize(a, "otsu") > 0 if self.rule == "otsu" else a > self.threshold
            out = m if out is None else out | m
        return out.float()

    def active(self) -> bool:
        return self.step is not None and self.step >= int(self.start * self.total)

    def lock_region(self, threshold: float = 0.0):
        """Background-lock protocol (the sampler's threshold is not used: ours is ``self.threshold``)."""
        if not self.active():
            return None
        return self.region()

    def mean(self, i: int = 0):
        r = self.region()
        if r is None:
            raise RuntimeError("no sampling step has run with the Prompt-to-Prompt guide yet")
        return r

    def mask(self, latent_hw) -> torch.Tensor | None:
        """``[B, 1, H, W]`` mask of (P7) at latent size, or None (before ``start`` / nothing recorded)."""
        r = self.lock_region()
        if r is None:
            return None
        r = F.max_pool2d(r[:, None], 3, 1, 1)
        return F.interpolate(r, size=tuple(int(v) for v in latent_hw), mode="nearest")

    def blend(self, x_tgt: torch.Tensor, x_src: torch.Tensor) -> torch.Tensor:
        """(P8) on latents (for loops that own both branches)."""
        m = self.mask(x_tgt.shape[-2:])
        if m is None:
            return x_tgt
        m = m.to(device=x_tgt.device, dtype=x_tgt.dtype)
        return x_src + m * (x_tgt - x_src)


# ----------------------------------------------------------------------------- the control

class PromptToPromptControl:
    """The attention edit of (P1)-(P6) for one source/target pair.

    ``mode``: ``"replace"`` (``mapper`` = ``M [T, T]`` of :func:`replacement_mapper`) or
    ``"refine"`` (``mapper`` = ``(index, keep)`` of :func:`refinement_mapper`).
    ``equalizer``: ``e [T]`` (P5) or None.  ``cross_steps``, ``self_steps``: fractions of the
    run, (P2) and (P6).  ``blend``: a :class:`LocalBlend` or None.  ``source_index`` /
    ``target_index``: the conditionings' indices in a call (see the module docstring).
    ``self_min_factor``: self-attention is replaced at layers ``factor >= this`` (2).
    Call :meth:`begin_step` before each model call; ``maps_log`` (a list, optional) receives
    ``(layer, step, P_t')`` of every controlled cross-attention call (tests).
    """

    def __init__(self, mode: str, mapper, context_len: int, equalizer: torch.Tensor | None = None,
                 cross_steps=(0.0, 0.4), self_steps=(0.0, 0.6), blend: LocalBlend | None = None,
                 source_index: int = 0, target_index: int = 0, self_min_factor: int = 2):
        if mode not in MODES:
            raise PromptToPromptError(f"mode must be one of {MODES}, got {mode!r}")
        for name, (a, b) in (("cross_steps", cross_steps), ("self_steps", self_steps)):
            if not 0.0 <= a <= b <= 1.0:
                raise PromptToPromptError(f"{name} must satisfy 0 <= start <= end <= 1, got {(a, b)}")
        self.mode, self.mapper, self.T = mode, mapper, int(context_len)
        self.eq = equalizer
        self.cross_steps, self.self_steps = tuple(cross_steps), tuple(self_steps)
        self.blend = blend
        self.source_index, self.target_index = source_index, target_index
        self.self_min_factor = int(self_min_factor)
        self.maps_log = None
        self.step, self.total = 0, 1
        self.stash = {}           # (cross, layer key) -> (Q_s, K_s) of a source-only call (split batches)
        self.cross_hooks = ControlledHooks(self, cross=True)
        self.self_hooks = ControlledHooks(self, cross=False)

    def reset(self):
        self.step, self.total = 0, 1
        self.stash = {}
        if self.blend is not None:
            self.blend.reset()

    def begin_step(self, step: int, total: int):
        if not 0 <= step < total:
            raise ValueError(f"step {step} is outside the run's {total} steps")
        self.step, self.total = int(step), int(total)
        self.stash = {}
        if self.blend is not None:
            self.blend.set_step(step, total)

    def windows(self):
        return step_windows(self.total, self.cross_steps, self.self_steps)

    def rows(self, call) -> tuple:
        """``(source rows, target rows)`` of a call, paired image by image."""
        if self.source_index == self.target_index:
            r = call.rows_of(self.source_index)
            half = len(r) // 2
            return r[:half], r[half:]
        return call.rows_of(self.source_index), call.rows_of(self.target_index)

    # (P3)-(P5)
    def edit(self, p_src: torch.Tensor, p_tgt: torch.Tensor) -> torch.Tensor:
        T = p_src.shape[-1]
        if T != self.T:
            raise PromptToPromptError(f"the context has {T} tokens, the edit was built for {self.T}: source and "
                                      f"target prompts must give contexts of the same length")
        if self.mode == "replace":
            r = torch.einsum("rhpw,wn->rhpn", p_src, self.mapper.to(p_src))
        else:
            index, keep = self.mapper
            keep = keep.to(p_src)
            r = p_src.index_select(-1, index.to(p_src.device)) * keep + p_tgt * (1 - keep)
        if self.eq is not None:
            r = r * self.eq.to(r)
        return r

    def _needs_source(self, q, call, cross: bool) -> bool:
        """Whether this layer, at this step, reads the source's queries and keys."""
        (c_lo, c_hi), (s_lo, s_hi) = self.windows()
        if cross:
            return c_lo <= self.step < c_hi or self.blend is not None
        h, _ = fold_sequence(q.shape[1], call.latent_hw)
        return s_lo <= self.step < s_hi and -(-int(call.latent_hw[0]) // h) >= self.self_min_factor

    def _source_qk(self, q, k, src, tgt, layer, cross: bool):
        """``(Q_s, K_s)`` of the source rows paired with ``tgt``: from this call, or from the source-only call
        that ran before it in the same step (a split batch, see :meth:`attend`)."""
        if src:
            if len(src) != len(tgt):
                raise PromptToPromptError(f"this model call holds {len(tgt)} target and {len(src)} source rows; "
                                          f"Prompt-to-Prompt pairs them image by image")
            idx = torch.as_tensor(src, device=q.device)
            return q.index_select(0, idx), k.index_select(0, idx)
        kept = self.stash.pop((cross, layer.key), None)
        if kept is None or kept[0].shape[0] != len(tgt):
            raise PromptToPromptError(
                "Prompt-to-Prompt needs the source rows in the same model call as the target rows, or in an earlier "
                f"one of the same step; this call holds {len(tgt)} target rows and no source rows were kept for this "
                "layer (ComfyUI split the batch and ran the target first)")
        return kept

    def attend(self, q, k, v, heads, layer, call, attend, cross: bool):
        """(P1)-(P6) on one layer call.

        Split batches [ours]: when ComfyUI runs the conditionings of a step in separate model calls
        (``calc_cond_batch`` splits the batch when free memory is short), a call holding the source rows but
        no target rows keeps the source's queries and keys of each layer the control will read (the model's
        dtype, source rows only, for the cross window or the blend and for the self-attention window); the
        target-only call of the same step takes them from there and computes (P1)-(P8) as if both had run
        together.  Core runs the conditionings with the highest indices first, and the guider gives the
        source a higher index than the target, so the source comes first; a target with nothing kept is an
        error.  The store is emptied at every :meth:`begin_step` and each entry when used.
        """
        src, tgt = self.rows(call)
        if not tgt:
            if src and self._needs_source(q, call, cross):
                idx = torch.as_tensor(src, device=q.device)
                self.stash[(cross, layer.key)] = (q.index_select(0, idx).detach(), k.index_select(0, idx).detach())
            return attend(q, k, v)
        (c_lo, c_hi), _ = self.windows()
        if not cross:
            out = attend(q, k, v)
            if self._needs_source(q, call, cross):
                q_s, k_s = self._source_qk(q, k, src, tgt, layer, cross)
                ts = torch.as_tensor(tgt, device=q.device)
                out = out.clone()
                out[ts] = attend(q_s, k_s, v.index_select(0, ts))                                  # (P6)
            return out
        active = c_lo <= self.step < c_hi
        out = attend(q, k, v)
        if not active and self.blend is None:
            return out
        q_s, k_s = self._source_qk(q, k, src, tgt, layer, cross)
        p_src = ProbabilityCache(q_s, k_s, heads).rows(range(len(tgt)))
        p_tgt = ProbabilityCache(q, k, heads).rows(tgt)
        if active:
            p_new = self.edit(p_src, p_tgt)                                              # (P1), a_i = 1
            L, c = q.shape[1], q.shape[2]
            d = c // heads
            ts = torch.as_tensor(tgt, device=q.device)
            vt = v.index_select(0, ts).float().reshape(len(tgt), v.shape[1], heads, d).transpose(1, 2)
            o = (p_new @ vt).transpose(1, 2).reshape(len(tgt), L, c).to(out.dtype)
            out = out.clone()
            out[ts] = o
        else:
            p_new = p_tgt
        if self.blend is not None:
            self.blend.record(0, p_src, layer, call)
            self.blend.record(1, p_new, layer, call)
        if self.maps_log is not None:
            self.maps_log.append((layer, self.step, p_new.detach().clone()))
        return out


class ControlledHooks(AttentionHooks):
    """An attention-hook registry whose attention function is the control's (P1)-(P6).

    Recorders and other hooks added to it work as in :class:`~.attention.AttentionHooks`
    (they see the layer's uncontrolled probabilities); ``cross`` says which kind of layer
    the registry is installed on (adapters install one on cross- and one on self-attention).
    """

    def __init__(self, control: PromptToPromptControl, cross: bool, hooks=()):
        super().__init__(hooks)
        self.control, self.cross = control, cross

    def __len__(self):
        return len(self.hooks) + 1

    def __call__(self, q, k, v, heads, layer, call, attend):
        def controlled(q_, k_, v_):
            return self.control.attend(q_, k_, v_, heads, layer, call, attend, self.cross)
        return super().__call__(q, k, v, heads, layer, call, controlled)


# ----------------------------------------------------------------------------- the guided prediction

def ptp_predict(denoiser, x_src, x_tgt, sigma, c_src, c_tgt, uncond, cfg: float):
    """Both branches in ONE call of a :class:`~.protocol.Denoiser` with ``cond_ids``
    (e.g. :class:`~.diffusers_adapter.DiffusersDenoiser`): rows ``[u@x_s, u@x_t, c_s@x_s,
    c_t@x_t]`` (the reference's batch), control indices 0 = the text rows (first half source).
    Returns ``(D_s, D_t)`` with CFG per branch, ``D = D_u + w (D_c - D_u)``.
    """
    x = torch.cat([x_src, x_tgt])
    sigma = torch.as_tensor(sigma).flatten()
    if sigma.numel() == x_src.shape[0] and sigma.numel() > 1:
        sigma = torch.cat([sigma, sigma])                     # per-row sigmas for both branches
    pair = torch.cat([c_src.expand(x_src.shape[0], -1, -1), c_tgt.expand(x_tgt.shape[0], -1, -1)])
    if cfg == 1.0:
        (d,) = denoiser.predict_x0(x, sigma, [pair], cond_ids=[0])
    else:
        d_u, d_c = denoiser.predict_x0(x, sigma, [uncond, pair], cond_ids=[1, 0])
        d = d_u + cfg * (d_c - d_u)
    return d[: x_src.shape[0]], d[x_src.shape[0]:]


class EditTimeNoise:
    """Eta Inversion's noise chosen DURING editing, as the reference runs it (Eta §3 steps 2-6 in sigma
    form, :func:`~.inversion.eta_inversion_noises` for the maths): at replayed step ``i`` the source
    branch is anchored at ``L_i`` (the inversion's ``source_ladder`` level) and its prediction ``D_s``
    comes from the editing call, at the EDITING CFG; then::

        mean = D_s + s_down (L_i - D_s) / sigma_i,   n* = (L_{i+1} - mean) / s_up        (I11)
        n    = argmin_k mean((c_k - n*)^2)  over the K candidates of step i             (I12)

    and both branches take ``n``.  Selecting at inversion time (:func:`eta_inversion_noises`, what
    Invert stores) uses the inversion's CFG instead; the two are the same computation only when the
    CFGs are equal (the paper inverts at CFG 1 and edits at 7.5).

    Candidates: the same stream as Invert's — one ``randn((K, *x.shape))`` float32 draw per step of
    the FULL schedule from ``torch.Generator("cpu").manual_seed(seed)``, skipped steps included — so
    with equal CFGs the choice is Invert's bit for bit (tested).  ``store_optimal`` uses ``n*``
    itself (anchored at the ladder, as the reference, not at the replayed rung).  ``etas``: the
    scalar eta per step (with an eta mask the reference still forms ``n*`` with the scalar).

    A sequence for :func:`~.inversion.replay_sample` (``noises=``): ``self[i]`` is step ``i``'s
    selected noise, available once :meth:`select` ran for it (the sampler asks after the model call).
    """

    def __init__(self, source_ladder: torch.Tensor, sigmas, etas, skip: int, candidates: int, seed: int,
                 store_optimal: bool = False):
        self.ladder, self.skip = source_ladder, int(skip)
        self.sigmas = [float(v) for v in torch.as_tensor(sigmas, dtype=torch.float64).flatten()]
        self.etas = [float(v) for v in torch.as_tensor(etas, dtype=torch.float64).flatten()]
        self.n = len(self.sigmas) - 1
        if len(self.etas) != self.n:
            raise ValueError(f"{len(self.etas)} per-step etas for {self.n} steps")
        if self.ladder.shape[0] != self.n - self.skip + 1:
            raise ValueError(f"the source ladder has {self.ladder.shape[0]} levels, the replay needs {self.n - self.skip + 1}")
        self.k, self.store_optimal, self.seed = int(candidates), bool(store_optimal), int(seed)
        if self.k < 1:
            raise ValueError(f"candidates must be >= 1, got {candidates}")
        self.reset()

    def reset(self):
        self.gen = torch.Generator(device="cpu").manual_seed(self.seed)
        self.drawn, self.cands, self.chosen = 0, None, {}

    def _candidates(self, i: int) -> torch.Tensor:
        if i < self.drawn - 1:
            self.reset()                                   # a step revisited: redraw the stream from the seed
        shape = tuple(self.ladder.shape[1:])
        while self.drawn <= i:
            self.cands = torch.randn((self.k, *shape), generator=self.gen, dtype=torch.float32)  # cpu: Invert's candidate stream (CPU generator), moved in select()
            self.drawn += 1
        return self.cands

    def select(self, i: int, x_src: torch.Tensor, d_src: torch.Tensor) -> torch.Tensor:
        """Choose step ``i``'s noise from the anchored source ``x_src`` (= ``L_i``) and its prediction."""
        from .inversion import ancestral_split, select_candidate

        cand = self._candidates(i)
        s_up, s_down = ancestral_split(self.sigmas[i], self.sigmas[i + 1], self.etas[i])
        if s_up <= 0:
            out = torch.zeros_like(x_src, dtype=torch.float32)          # coefficient 0 (the reference's 0/0)
        else:
            x_s, d_s = x_src.float(), d_src.float()
            mean = d_s + s_down * ((x_s - d_s) / self.sigmas[i])
            n_star = (self.ladder[i - self.skip + 1].to(x_s) - mean) / s_up                    # (I11)
            out = n_star if self.store_optimal else select_candidate(n_star, cand.to(x_s.device))[0]  # (I12)
        self.chosen[i] = out
        return out

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if i not in self.chosen:
            raise RuntimeError(f"the edit-time noise of step {i} was asked before the source branch ran")
        return self.chosen[i]


class SourceAnchoredPtP:
    """A ``denoise(x_t, sigma)`` for :func:`~.inversion.replay_sample` that runs PtP with the
    source branch anchored to an inversion's ladder (Eta §3 step 8): at step ``i`` the source
    latent is ``ladder[i - skip]`` (the inversion's ``source_ladder``, levels
    ``sigmas[skip..N]``), so no source state is carried and both branches share the replayed
    noise.  ``predict(x_s, x_t, sigma) -> (D_s, D_t)`` is the batched model call (e.g.
    :func:`ptp_predict` with its conditionings bound).  The step is found by sigma.  With ``noise``
    (an :class:`EditTimeNoise`, also given to the replay as ``noises``) Eta Inversion's noise is
    chosen from ``D_s`` at the editing CFG, as the reference does.
    """

    def __init__(self, predict, control: PromptToPromptControl, source_ladder: torch.Tensor, sigmas, skip: int = 0,
                 noise: EditTimeNoise | None = None):
        self.predict, self.control, self.noise = predict, control, noise
        self.ladder, self.skip = source_ladder, int(skip)
        self.sigmas = torch.as_tensor(sigmas, dtype=torch.float64).flatten().cpu()

    def level(self, sigma: float) -> int:
        i = int((self.sigmas[:-1] - float(sigma)).abs().argmin())
        if not math.isclose(float(self.sigmas[i]), float(sigma), rel_tol=1e-4, abs_tol=1e-7):
            raise ValueError(f"sigma {float(sigma):.5g} is not a step of the inversion "
                             f"({self.sigmas.numel() - 1} steps)")
        if i < self.skip:
            raise ValueError(f"step {i} comes before the inversion's skip ({self.skip})")
        return i

    def __call__(self, x, sigma):
        i = self.level(float(torch.as_tensor(sigma).flatten()[0]))
        self.control.begin_step(i - self.skip, self.sigmas.numel() - 1 - self.skip)
        x_src = self.ladder[i - self.skip].to(device=x.device, dtype=x.dtype)
        d_s, d_t = self.predict(x_src, x, sigma)
        if self.noise is not None:
            self.noise.select(i, x_src, d_s)
        return d_t


def install_self_attention_hooks(unet, hooks, holder) -> list:
    """diffusers: route every self-attention layer (``attn1``) of ``unet`` through ``hooks`` (e.g. a
    control's ``self_hooks``), sharing ``holder`` (the :class:`~.diffusers_adapter.DiffusersDenoiser`'s
    ``holder``, which sets the call info).  Cross-attention processors are kept.  Returns the layers."""
    from .diffusers_adapter import HookedCrossAttnProcessor, _place_of
    from .protocol import LayerInfo

    names = [n for n in unet.attn_processors if n.endswith("attn1.processor")]
    layers, procs = [], {}
    for name, proc in unet.attn_processors.items():
        if name in names:
            layer = LayerInfo(key=name[: -len(".processor")], place=_place_of(name), order=len(layers))
            layers.append(layer)
            procs[name] = HookedCrossAttnProcessor(layer, hooks, holder)
        else:
            procs[name] = proc
    unet.set_attn_processor(procs)
    return layers
