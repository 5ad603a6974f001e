"""Tiny seeded diffusers components and an offline byte-level CLIP tokenizer."""
from __future__ import annotations

import torch


def _bytes_to_unicode() -> dict:
    """GPT-2's reversible byte -> printable-character map, in CLIP's order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def byte_tokenizer(max_length: int = 77):
    """CLIPTokenizer with the 512 base symbols and no merges (testing-offline.md §3)."""
    from transformers import CLIPTokenizer
    base = list(_bytes_to_unicode().values())
    vocab = {}
    for s in base:
        vocab[s] = len(vocab)
    for s in base:
        vocab[s + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def tiny_unet(seed: int = 0, cross_dim: int = 32, in_channels: int = 4):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(32, 64, 64), layers_per_block=2, sample_size=32,
        in_channels=in_channels, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_dim, norm_num_groups=32,
    ).eval()
