"""Concepts: differentiable CLIP encoding with spliced concept rows, and embedding files.

Touches ComfyUI's CLIP objects (``cond_stage_model``, the SD1/SD2/SDXL tokenizers, ``encode_from_tokens``
with embedding rows in the token list, ``comfy.clip_model.CLIPLayer``) for Concept Learn, and writes
the standard embedding files ComfyUI's ``embedding:NAME`` reads.
"""
from __future__ import annotations

import contextlib

import torch

from ...kernels.files import read_safetensors, save_safetensors_atomic
from ...kernels.protocol import UnsupportedModelError
from .text import _real_tokens, _sub_tokenizer


CONCEPT_EMBED_KEY = "emb_params"


class ConceptClipPart:
    """One text encoder of a CLIP object: tokens key, model, tokenizer, width, file key."""

    def __init__(self, key: str, model, tokenizer, file_key: str):
        self.key, self.model, self.tok, self.file_key = key, model, tokenizer, file_key
        self.width = int(model.transformer.get_input_embeddings().weight.shape[1])


def concept_clip_parts(clip) -> list:
    """The text encoders a concept vector is spliced into, as :class:`ConceptClipPart` s.

    SD1.x / SD2.x: one encoder, file key ``emb_params`` (spec §8.2).  SDXL: ``clip_l`` and
    ``clip_g`` (ComfyUI's SDXL tokenizers look these keys up in an embedding file, as A1111 and
    diffusers' SDXL loaders do); one concept vector is the two rows side by side, ``[768 + 1280]``.
    Everything else (SDXL refiner's lone clip_g, T5 families) is refused.
    """
    csm = clip.cond_stage_model
    if hasattr(csm, "clip_l") and hasattr(csm, "clip_g") and hasattr(csm.clip_l, "transformer") \
            and hasattr(csm.clip_g, "transformer") and len([n for n, _ in csm.named_children()]) == 2:
        return [ConceptClipPart("l", csm.clip_l, _sub_tokenizer(clip, "l"), "clip_l"),
                ConceptClipPart("g", csm.clip_g, _sub_tokenizer(clip, "g"), "clip_g")]
    name = getattr(csm, "clip", None)
    sub = getattr(csm, name, None) if isinstance(name, str) else None
    if sub is None or not hasattr(sub, "transformer") or hasattr(csm, "clip_g") or name == "clip_g":
        raise UnsupportedModelError(
            f"ConceptLearn trains SD1.x / SD2.x (one CLIP text encoder) and SDXL (clip_l + clip_g) embeddings; "
            f"this CLIP is {type(csm).__name__}")
    key = name.replace("clip_", "")
    return [ConceptClipPart(key, sub, _sub_tokenizer(clip, key), CONCEPT_EMBED_KEY)]


class ComfyConceptText:
    """:class:`~..kernels.concept_learn.ConceptText` over a ComfyUI CLIP object.

    A prompt is assembled, per text encoder, as one 77-item chunk ``BOS, tokens..., EOS, PAD...``
    (each encoder's own special tokens: SDXL's clip_g pads with 0); each concept slot is ``m``
    items holding (that encoder's slice of) the learnable rows, which ComfyUI's
    ``process_tokens`` splices into the input embeddings with ``torch.cat`` (differentiable).
    The text encoders' weights and embedding tables are never touched; the CLIP object's
    clip-skip setting is respected (``encode_from_tokens``).

    ``encode`` returns the cross-attention context ``[1, 77, d_ctx]`` for one-encoder CLIPs and,
    for SDXL, ``{"c_crossattn": [1, 77, 2048], "pooled_output": [1, 1280]}`` (the pooled clip_g
    output feeds SDXL's ADM vector; :class:`ComfyGradDenoiser` builds it).
    """

    def __init__(self, clip):
        self.clip = clip
        self.parts = concept_clip_parts(clip)
        self.subs = [p.model for p in self.parts]
        self.widths = [p.width for p in self.parts]
        self.width = sum(self.widths)
        self.pooled = len(self.parts) > 1
        self.max_length = int(getattr(self.parts[0].tok, "max_length", 77))

    def _ids(self, text: str) -> list:
        if not text.strip():
            return []
        real, _, _ = _real_tokens(self.clip, text)
        if any(isinstance(t, torch.Tensor) for t in real):
            raise ValueError(f"the text {text!r} contains an embedding; ConceptLearn prompts take plain words")
        return [int(t) for t in real]

    def init_vector(self, word: str) -> torch.Tensor:
        ids = self._ids(word)
        if not ids:
            raise ValueError(f"the init word {word!r} tokenizes to nothing")
        rows = [p.model.transformer.get_input_embeddings().weight[ids[0]] for p in self.parts]
        return torch.cat([r.detach().float().cpu() for r in rows]).clone()

    def is_single_token(self, name: str) -> bool:
        return len(self._ids(name)) == 1

    def split(self, vectors: torch.Tensor) -> list:
        """``[..., width]`` -> one ``[..., width_i]`` slice per text encoder."""
        if vectors.shape[-1] != self.width:
            raise ValueError(f"concept vectors are {vectors.shape[-1]} wide; this CLIP takes {self.width} "
                             f"({' + '.join(str(w) for w in self.widths)})")
        return list(torch.split(vectors, self.widths, dim=-1))

    def file_tensors(self, vectors: torch.Tensor) -> dict:
        """The embedding file's tensors for one concept's ``[m, width]`` vectors."""
        return {p.file_key: v.detach().float().cpu().contiguous() for p, v in zip(self.parts, self.split(vectors))}

    def encode(self, parts, vectors: torch.Tensor):
        m = vectors.shape[1]
        slices = self.split(vectors)
        ids = [self._ids(p) if isinstance(p, str) else None for p in parts]
        tokens, positions = {}, {}
        for part, vec in zip(self.parts, slices):
            tok = part.tok
            start, end = getattr(tok, "start_token", None), tok.end_token
            pad = getattr(tok, "pad_token", end)
            items, pos = ([] if start is None else [(start, 1.0)]), {}
            for p, p_ids in zip(parts, ids):
                if p_ids is not None:
                    items += [(t, 1.0) for t in p_ids]
                else:
                    k = int(p)
                    pos.setdefault(k, [])
                    for i in range(m):
                        pos[k].append(len(items))
                        items.append((vec[k, i], 1.0))
            if len(items) + 1 > self.max_length:
                raise ValueError(f"the prompt needs {len(items) + 1} tokens; one chunk holds {self.max_length}")
            items.append((end, 1.0))
            items += [(pad, 1.0)] * (self.max_length - len(items))
            tokens[part.key] = [items]
            positions = positions or pos
        with contextlib.ExitStack() as stack:
            for sub in self.subs:
                stack.enter_context(_out_of_place_clip_layers(sub))
            if self.pooled:
                cond, pooled = self.clip.encode_from_tokens(tokens, return_pooled=True)
                return {"c_crossattn": cond, "pooled_output": pooled}, positions
            cond = self.clip.encode_from_tokens(tokens)
        return cond, positions


def _clip_layer_forward(layer, x, mask=None, optimized_attention=None):
    """ComfyUI's ``CLIPLayer.forward`` without the in-place residual adds (same math; autograd-safe)."""
    x = x + layer.self_attn(layer.layer_norm1(x), mask, optimized_attention)
    return x + layer.mlp(layer.layer_norm2(x))


class _out_of_place_clip_layers:
    """For one encode: give each CLIP layer of ``sub`` an instance-level out-of-place forward.

    ComfyUI's CLIP layers add residuals in place (``x += ...``), which autograd rejects when
    gradients must reach the input embeddings.  Only this model's instances are touched,
    and only until the ``with`` block ends.
    """

    def __init__(self, sub):
        import functools

        from comfy.clip_model import CLIPLayer

        self.layers = [m for m in sub.modules() if isinstance(m, CLIPLayer)]
        self.partial = functools.partial

    def __enter__(self):
        for layer in self.layers:
            layer.forward = self.partial(_clip_layer_forward, layer)
        return self

    def __exit__(self, *exc):
        for layer in self.layers:
            layer.__dict__.pop("forward", None)
        return False


def save_concept_embedding(path: str, vectors, metadata: dict) -> None:
    """One concept per file, written atomically with string metadata (and a content checksum).

    ``vectors``: ``[m, d]`` -> ``{"emb_params": [m, d] float32}`` (SD1.x/SD2.x, spec §8.2), or a
    dict of tensors (SDXL: ``{"clip_l": [m, 768], "clip_g": [m, 1280]}``, see
    :meth:`ComfyConceptText.file_tensors`).
    """
    tensors = vectors if isinstance(vectors, dict) else {CONCEPT_EMBED_KEY: vectors}
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}
    save_safetensors_atomic(path, tensors, metadata)


def read_concept_embedding(path: str) -> tuple:
    """``(vectors [m, d], metadata)``.

    An SDXL file (``clip_l`` + ``clip_g``) reads as the two rows side by side ``[m, 768 + 1280]``
    (the concept vector layout of :class:`ComfyConceptText`); otherwise ``emb_params`` or the
    alphabetically first tensor (ComfyUI's rule for other files).
    """
    tensors, meta = read_safetensors(path)
    keys = sorted(tensors)
    if not keys:
        raise ValueError(f"{path} holds no tensor")
    if "clip_l" in keys and "clip_g" in keys:
        l, g = tensors["clip_l"], tensors["clip_g"]
        l, g = l.reshape(-1, l.shape[-1]), g.reshape(-1, g.shape[-1])
        if l.shape[0] != g.shape[0]:
            raise ValueError(f"{path}: clip_l holds {l.shape[0]} vectors, clip_g {g.shape[0]}")
        return torch.cat([l, g], -1).float(), meta
    t = tensors[CONCEPT_EMBED_KEY if CONCEPT_EMBED_KEY in keys else keys[0]]
    return t.reshape(-1, t.shape[-1]).float(), meta
