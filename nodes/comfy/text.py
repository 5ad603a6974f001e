"""Text: ComfyUI CLIP objects' tokenizers and text encoders.

Touches ``CLIP.tokenize`` / ``encode_from_tokens`` / ``encode_from_tokens_scheduled`` and the
tokenizer objects behind them (``clip_l`` / ``clip_g`` for SDXL): word positions in a prompt,
token counts, encodings, and the last hidden states pOps' instruct operator reads.
"""
from __future__ import annotations

import torch

from ...kernels.tokens import find_word_positions


def tokenize_word(clip, prompt: str, word: str) -> dict:
    """Key positions of ``word`` in ``prompt`` as the CLIP object tokenizes it.

    Returns ``{"positions", "prompt_len", "tokens"}``; ``prompt_len`` is the length of
    the prompt's conditioning sequence (77 per chunk).  For SDXL the ``l`` and ``g``
    tokenizers give the same positions; ``l`` (or the only one) is used.
    """
    if not word or not word.strip():
        raise ValueError("the word to capture is empty")
    ptoks = clip.tokenize(prompt)
    key = "l" if "l" in ptoks else next(iter(ptoks))
    query, tok, special = _real_tokens(clip, word.strip())
    positions = find_word_positions(ptoks[key], query, decode=_decoder(tok), special=tuple(special), word=word)
    chunk_len = len(ptoks[key][0])
    return {"positions": positions, "prompt_len": chunk_len * len(ptoks[key]), "tokens": ptoks[key]}


def _real_tokens(clip, text: str):
    """``(tokens, tokenizer, special ids)``: the tokens of ``text`` without BOS/EOS/padding."""
    toks = clip.tokenize(text)
    key = "l" if "l" in toks else next(iter(toks))
    tok = _sub_tokenizer(clip, key)
    special = {t for t in (getattr(tok, "start_token", None), getattr(tok, "end_token", None),
                           getattr(tok, "pad_token", None)) if t is not None}
    real = [item[0] for chunk in toks[key] for item in chunk
            if isinstance(item[0], torch.Tensor) or item[0] not in special]
    return real, tok, special


def _sub_tokenizer(clip, key):
    t = clip.tokenizer
    for attr in ("clip_" + key, key, getattr(t, "clip", None)):
        if isinstance(attr, str) and hasattr(t, attr):
            return getattr(t, attr)
    return t


def _decoder(tok):
    inv = None
    inner = getattr(tok, "tokenizer", None)
    if inner is not None and hasattr(inner, "get_vocab"):
        inv = {v: k for k, v in inner.get_vocab().items()}
    return (lambda i: inv.get(i, str(i)).replace("</w>", "")) if inv else str


def count_prompt_tokens(clip, text: str) -> int:
    """Number of real tokens (no BOS/EOS/padding) the CLIP tokenizer makes of ``text``."""
    return len(_real_tokens(clip, text)[0])


def encode_text(clip, text: str):
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def text_last_hidden_states(clip, text: str) -> torch.Tensor:
    """``[1, L, D]``: the CLIP-G tower's **last** layer after the final LayerNorm for the real
    tokens of ``text`` (BOS, word pieces, EOS), as pOps' instruct operator uses them.

    SDXL CLIP objects: the ``g`` part (1280-d); a single-tower CLIP: its only tower.  CLIP
    text attention is causal, so the first L states do not depend on the padding.
    """
    toks = clip.tokenize(text)
    key = "g" if "g" in toks else ("l" if "l" in toks else next(iter(toks)))
    if len(toks[key]) != 1:
        raise ValueError(f"{text!r} is longer than one 77-token chunk; the instruct operator takes one word")
    ids = [t[0] for t in toks[key][0]]
    tok = _sub_tokenizer(clip, key)
    end = getattr(tok, "end_token", None)
    if end is None or end not in ids:
        raise ValueError("cannot find the end token in the tokenized text")
    n = ids.index(end) + 1
    c = clip.clone()
    c.clip_layer(-10_000)  # |idx| > number of layers -> ComfyUI's "last" layer (after the final LayerNorm)
    cond = c.encode_from_tokens(toks)
    width = cond.shape[-1]
    if key == "g" and width > 1280:
        cond = cond[..., width - 1280:]  # SDXL concatenates [clip_l, clip_g]
    return cond[:, :n].float()


def text_condition(clip, text: str) -> torch.Tensor:
    """The cross-attention context tensor ``[1, 77k, D]`` of ``text``."""
    with torch.no_grad():
        return clip.encode_from_tokens(clip.tokenize(text)).float().detach()
