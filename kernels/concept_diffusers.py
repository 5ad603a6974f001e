"""ConceptLearn's protocol on diffusers / transformers models (tests, toy world, library use).

* :class:`HFConceptText` — a ``CLIPTokenizer`` + ``CLIPTextModel`` as a
  :class:`~.concept_learn.ConceptText`: the prompt is tokenised part by part, each
  concept slot gets ``m`` placeholder positions, and the input-embedding module is
  swapped (``set_input_embeddings``) for the duration of one call by :class:`SpliceEmbedding`,
  which writes the learnable vectors into those rows.  The text encoder's weights are
  never modified.
* :class:`DiffusersGradDenoiser` — :class:`~.diffusers_adapter.DiffusersDenoiser` with
  its graph-keeping prediction path exposed as ``predict_x0_grad``.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .attention import AttentionHooks
from .diffusers_adapter import DiffusersDenoiser
from .schedule import VPSchedule

__all__ = ["DiffusersGradDenoiser", "HFConceptText", "SpliceEmbedding"]


class SpliceEmbedding(torch.nn.Module):
    """``base(ids)`` with rows ``positions`` of batch row 0.. replaced by ``vectors`` (differentiable)."""

    def __init__(self, base: torch.nn.Embedding, positions: list, vectors: torch.Tensor):
        super().__init__()
        self.base, self.positions, self.vectors = base, positions, vectors

    @property
    def weight(self):
        return self.base.weight

    def forward(self, ids):
        e = self.base(ids)
        if not self.positions:
            return e
        pos = torch.as_tensor(self.positions, device=e.device)
        e = e.clone()
        e[:, pos] = self.vectors.to(e.dtype)[None].expand(e.shape[0], -1, -1)
        return e


class HFConceptText:
    """:class:`~.concept_learn.ConceptText` over a transformers CLIP text encoder."""

    def __init__(self, tokenizer, text_encoder, max_length: int | None = None):
        self.tok, self.te = tokenizer, text_encoder
        limit = getattr(getattr(text_encoder, "config", None), "max_position_embeddings", None)
        self.max_length = int(max_length or min(tokenizer.model_max_length, limit or tokenizer.model_max_length))
        self.width = int(text_encoder.get_input_embeddings().weight.shape[1])
        self.bos = tokenizer.bos_token_id
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos

    def _ids(self, text: str) -> list:
        return list(self.tok(text, add_special_tokens=False).input_ids) if text.strip() else []

    def init_vector(self, word: str) -> torch.Tensor:
        ids = self._ids(word)
        if not ids:
            raise ValueError(f"the init word {word!r} tokenizes to nothing")
        return self.te.get_input_embeddings().weight[ids[0]].detach().float().clone()

    def is_single_token(self, name: str) -> bool:
        return len(self._ids(name)) == 1 and name.lower() + "</w>" in self.tok.get_vocab()

    def layout(self, parts: Sequence, m: int) -> tuple:
        """``(ids [1, L], positions {k: [m positions]})``; slot rows hold the pad id until spliced."""
        ids, positions = [self.bos], {}
        for p in parts:
            if isinstance(p, str):
                ids += self._ids(p)
            else:
                positions.setdefault(int(p), [])
                positions[int(p)] += list(range(len(ids), len(ids) + m))
                ids += [self.pad] * m
        if len(ids) + 1 > self.max_length:
            raise ValueError(f"the prompt needs {len(ids) + 1} tokens, the text encoder takes {self.max_length}")
        ids += [self.eos] + [self.pad] * (self.max_length - len(ids) - 1)
        return torch.tensor([ids], device=self.te.get_input_embeddings().weight.device), positions

    def encode(self, parts: Sequence, vectors: torch.Tensor):
        """``(context [1, L, D], positions)`` with ``vectors[k]`` (``[m, d]``) at slot k's positions."""
        m = vectors.shape[1]
        ids, positions = self.layout(parts, m)
        order = sorted(positions)
        flat_pos = [p for k in order for p in positions[k]]
        flat_vec = torch.cat([vectors[k] for k in order]) if order else vectors[:0].reshape(0, vectors.shape[-1])
        base = self.te.get_input_embeddings()
        self.te.set_input_embeddings(SpliceEmbedding(base, flat_pos, flat_vec))
        try:
            dev = base.weight.device
            ctx = self.te(ids.to(dev))[0]
        finally:
            self.te.set_input_embeddings(base)
        return ctx, positions


class DiffusersGradDenoiser(DiffusersDenoiser):
    """DiffusersDenoiser whose x0 prediction keeps the autograd graph (for training)."""

    def __init__(self, unet, schedule: VPSchedule, prediction_type: str = "epsilon", hooks: AttentionHooks = None):
        super().__init__(unet, schedule, prediction_type, hooks if hooks is not None else AttentionHooks())

    def predict_x0_grad(self, x, sigma, cond):
        """x0 ``[B, ...]`` for per-row ``sigma`` ``[B]`` and one conditioning ``[1 or B, L, D]``."""
        return self.predict_x0_keep_graph(x, sigma, [cond])[0]
