"""Word -> token-position bookkeeping for cross-attention maps.

A prompt reaches the UNet as a sequence of ``chunk_len``-token chunks (77 for CLIP),
each ``BOS ... EOS PAD...``; longer prompts get more chunks, concatenated along the
key axis.  A word's key positions are therefore ``chunk * chunk_len + offset`` for every
place where the word's own token sequence occurs in a chunk.

:func:`tokenize_prompt` reproduces ComfyUI's SD1 tokenizer layout (``comfy/sd1_clip.py``
``tokenize_with_weights``): prompt weighting ``(word:1.2)`` / ``(word)`` (x1.1) with
``\\(`` escapes, ``embedding:NAME`` segments, segments of 8+ tokens split across chunks,
shorter ones moved whole to the next chunk.  The ComfyUI adapter uses ComfyUI's own
tokenizer output instead; both feed :func:`find_word_positions`.

Items of a tokenized chunk are ``(token, weight)`` pairs (extra fields ignored) where
``token`` is an int id or an embedding vector (tensor).
"""
from __future__ import annotations

import re
from typing import Callable, Optional, Sequence

import torch

__all__ = ["parse_weights", "tokenize_prompt", "find_word_positions", "WordNotFoundError", "describe_tokens"]


class WordNotFoundError(ValueError):
    """The word does not occur in the prompt; the message lists the prompt's tokens."""


def _split_parentheses(text: str) -> list:
    out, cur, depth = [], "", 0
    for ch in text:
        if ch == "(":
            if depth == 0:
                if cur:
                    out.append(cur)
                cur = "("
            else:
                cur += ch
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth == 0:
                out.append(cur + ")")
                cur = ""
            else:
                cur += ch
        else:
            cur += ch
    if cur:
        out.append(cur)
    return out


def parse_weights(text: str, weight: float = 1.0) -> list:
    """Split ComfyUI prompt syntax into ``(segment, weight)`` pairs.

    ``(a b)`` multiplies the weight by 1.1, ``(a b:1.3)`` sets it, nesting compounds,
    ``\\(`` and ``\\)`` are literal parentheses.
    """
    text = text.replace("\\)", "\0\1").replace("\\(", "\0\2")
    return [(s.replace("\0\1", ")").replace("\0\2", "("), w) for s, w in _parse(text, weight)]


def _parse(text, weight):
    out = []
    for part in _split_parentheses(text):
        if len(part) >= 2 and part[0] == "(" and part[-1] == ")":
            inner = part[1:-1]
            w = weight * 1.1
            colon = inner.rfind(":")
            if colon > 0:
                try:
                    w = float(inner[colon + 1:])
                    inner = inner[:colon]
                except ValueError:
                    pass
            out += _parse(inner, w)
        else:
            out.append((part, weight))
    return out


def tokenize_prompt(text: str, encode: Callable[[str], list], bos: int, eos: int, pad: Optional[int] = None,
                    chunk_len: int = 77, embeddings: Optional[Callable[[str], Optional[torch.Tensor]]] = None,
                    embedding_prefix: str = "embedding:", max_word_length: int = 8) -> list:
    """Tokenize ``text`` into chunks of ``chunk_len`` ``(token, weight)`` items.

    ``encode(segment)`` returns the segment's token ids without BOS/EOS.  ``embeddings(name)``
    returns an ``[n, dim]`` tensor for ``embedding:name`` or None (then the name is
    dropped, as ComfyUI does, with its warning left to the caller).
    """
    pad = eos if pad is None else pad
    groups = []
    for segment, weight in parse_weights(text):
        pieces = re.split(" {0}|\n{0}".format(re.escape(embedding_prefix)), segment)
        pieces = [pieces[0]] + [embedding_prefix + p for p in pieces[1:]]
        for piece in (p for p in pieces if p != ""):
            if piece.startswith(embedding_prefix) and embeddings is not None:
                name = piece[len(embedding_prefix):].strip("\n")
                leftover = ""
                if " " in name:
                    name, leftover = name.split(" ", 1)
                emb = embeddings(name)
                if emb is not None:
                    emb = emb.reshape(-1, emb.shape[-1])
                    groups.append([(emb[i], weight) for i in range(emb.shape[0])])
                if not leftover:
                    continue
                piece = leftover
            groups.append([(t, weight) for t in encode(piece)])

    chunks, chunk = [], [(bos, 1.0)]
    chunks.append(chunk)
    for group in groups:
        large = len(group) >= max_word_length
        while group:
            if len(group) + len(chunk) > chunk_len - 1:
                room = chunk_len - len(chunk) - 1
                if large:
                    chunk.extend(group[:room])
                    chunk.append((eos, 1.0))
                    group = group[room:]
                else:
                    chunk.append((eos, 1.0))
                    chunk.extend([(pad, 1.0)] * room)
                chunk = [(bos, 1.0)]
                chunks.append(chunk)
            else:
                chunk.extend(group)
                group = []
    chunk.append((eos, 1.0))
    chunk.extend([(pad, 1.0)] * (chunk_len - len(chunk)))
    return chunks


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and bool(torch.equal(a, b))
    return a == b


def describe_tokens(chunks: Sequence[Sequence], decode: Optional[Callable[[int], str]] = None,
                    skip: Sequence[int] = ()) -> str:
    words = []
    for chunk in chunks:
        for item in chunk:
            t = item[0]
            if isinstance(t, torch.Tensor):
                words.append("<embedding>")
            elif t in skip:
                continue
            else:
                words.append(decode(t) if decode else str(t))
    return " ".join(repr(w) for w in words)


def find_word_positions(chunks: Sequence[Sequence], word_tokens: Sequence, *, decode=None,
                        special: Sequence[int] = (), word: str = "") -> list:
    """Key positions of every occurrence of ``word_tokens`` in a tokenized prompt.

    ``chunks`` is the prompt as returned by :func:`tokenize_prompt` or ComfyUI's
    ``tokenize_with_weights`` (items ``(token, weight[, word_id])``); the positions
    index the concatenated chunks.  A word split across a chunk boundary is found in
    its parts.  Raises :class:`WordNotFoundError` listing the prompt's tokens.
    """
    query = [t[0] if isinstance(t, tuple) else t for t in word_tokens]
    if not query:
        raise WordNotFoundError(f"the word {word!r} tokenizes to nothing")
    flat = []
    for ci, chunk in enumerate(chunks):
        for j, item in enumerate(chunk):
            flat.append((ci, j, item[0]))
    positions = []
    n = len(query)
    i = 0
    chunk_len = len(chunks[0]) if chunks else 0
    while i < len(flat):
        # match query against a run that may skip one EOS/BOS pair at a chunk boundary
        k, j, matched = 0, i, []
        while k < n and j < len(flat):
            tok = flat[j][2]
            if _same(tok, query[k]):
                matched.append(j)
                k += 1
                j += 1
            elif matched and flat[j][0] != flat[matched[-1]][0] and not isinstance(tok, torch.Tensor) and tok in special:
                j += 1  # skip BOS of the next chunk
            elif matched and not isinstance(tok, torch.Tensor) and tok in special and j + 1 < len(flat) and flat[j + 1][0] != flat[j][0]:
                j += 1  # skip EOS at the end of a chunk
            else:
                break
        if k == n:
            positions.extend(flat[m][0] * chunk_len + flat[m][1] for m in matched)
            i = matched[-1] + 1
        else:
            i += 1
    if not positions:
        raise WordNotFoundError(
            f"the word {word!r} is not in the prompt; its tokens are: "
            + describe_tokens(chunks, decode, special))
    return positions
