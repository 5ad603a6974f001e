"""Small SDXL (clip_l + clip_g) and SD1 CLIPs built from ComfyUI's own classes, for in-process tests.

ComfyUI's SDXL text side is ``comfy.sdxl_clip.SDXLClipModel`` (clip_l: 768 wide, penultimate
layer, no final norm; clip_g: 1280 wide, same, pads with 0, projected pooled output) with the
``SDXLTokenizer`` (real CLIP BPE, shipped with ComfyUI; embedding keys ``clip_l`` / ``clip_g``).
A full clip_g has 32 layers (694 M parameters); here each encoder has ``layers`` layers and a
narrow MLP, everything else (widths, vocabulary, special tokens, layer choice, pooling,
``encode_token_weights``, the tokenizers and their embedding lookup) is ComfyUI's. Weights are
seeded random (LayerNorms identity); built under ``inference_mode`` like the executor's loads.
Nothing is downloaded; nothing is written.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch

SEED = 7


def _config(width: int, heads: int, act: str, layers: int, mlp: int) -> dict:
    return {"architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0,
            "eos_token_id": 49407, "hidden_act": act, "hidden_size": width, "initializer_factor": 1.0,
            "initializer_range": 0.02, "intermediate_size": mlp, "layer_norm_eps": 1e-05,
            "max_position_embeddings": 77, "model_type": "clip_text_model", "num_attention_heads": heads,
            "num_hidden_layers": layers, "pad_token_id": 1, "projection_dim": width, "torch_dtype": "float32",
            "vocab_size": 49408}


def tiny_sdxl_clip(layers: int = 3, mlp: int = 64, seed: int = SEED, embedding_directory=None):
    """A ``comfy.sd.CLIP`` with an SDXL text side of ``layers`` layers per encoder (float32)."""
    import comfy.sd1_clip
    import comfy.sdxl_clip

    cfg_l = _config(768, 12, "quick_gelu", layers, mlp)
    cfg_g = _config(1280, 20, "gelu", layers, mlp)

    class TinySDXLClipModel(comfy.sdxl_clip.SDXLClipModel):
        """``SDXLClipModel`` with the same two encoders' arguments but small configs."""

        def __init__(self, device="cpu", dtype=None, model_options={}):  # noqa: B006 - ComfyUI's signature
            torch.nn.Module.__init__(self)
            self.clip_l = comfy.sd1_clip.SDClipModel(layer="hidden", layer_idx=-2, device=device, dtype=dtype,
                                                     layer_norm_hidden_state=False, textmodel_json_config=cfg_l,
                                                     model_options=model_options)
            self.clip_g = comfy.sd1_clip.SDClipModel(
                device=device, layer="hidden", layer_idx=-2, textmodel_json_config=cfg_g, dtype=dtype,
                special_tokens={"start": 49406, "end": 49407, "pad": 0}, layer_norm_hidden_state=False,
                return_projected_pooled=True, model_options={**model_options, "model_name": "clip_g"})
            self.dtypes = {dtype}

    target = SimpleNamespace(clip=TinySDXLClipModel, tokenizer=comfy.sdxl_clip.SDXLTokenizer, params={})
    return _build(target, seed, embedding_directory)


def tiny_sd1_clip(layers: int = 3, mlp: int = 64, seed: int = SEED, embedding_directory=None):
    """A ``comfy.sd.CLIP`` with ComfyUI's SD1 text side (``SD1ClipModel`` / ``SD1Tokenizer``), small config."""
    import comfy.sd1_clip

    cfg_l = _config(768, 12, "quick_gelu", layers, mlp)

    class TinyClipL(comfy.sd1_clip.SDClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}, **kw):  # noqa: B006
            super().__init__(device=device, dtype=dtype, textmodel_json_config=cfg_l, model_options=model_options, **kw)

    class TinySD1ClipModel(comfy.sd1_clip.SD1ClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}, **kw):  # noqa: B006
            super().__init__(device=device, dtype=dtype, model_options=model_options, clip_model=TinyClipL, **kw)

    target = SimpleNamespace(clip=TinySD1ClipModel, tokenizer=comfy.sd1_clip.SD1Tokenizer, params={})
    return _build(target, seed, embedding_directory)


def tiny_sd2_clip(layers: int = 3, mlp: int = 64, seed: int = SEED, embedding_directory=None):
    """A ``comfy.sd.CLIP`` with ComfyUI's SD2 text side (``SD2ClipModel`` arguments, ``SD2Tokenizer``), small config."""
    import comfy.sd1_clip
    from comfy.text_encoders import sd2_clip

    cfg_h = _config(1024, 16, "gelu", layers, mlp)

    class TinyClipH(comfy.sd1_clip.SDClipModel):
        """``SD2ClipHModel``'s arguments (penultimate layer, pad 0, projected pooled) with a small config."""

        def __init__(self, device="cpu", dtype=None, model_options={}, **kw):  # noqa: B006
            super().__init__(device=device, layer="hidden", layer_idx=-2, textmodel_json_config=cfg_h, dtype=dtype,
                             special_tokens={"start": 49406, "end": 49407, "pad": 0}, return_projected_pooled=True,
                             model_options=model_options)

    class TinySD2ClipModel(comfy.sd1_clip.SD1ClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}, **kw):  # noqa: B006
            super().__init__(device=device, dtype=dtype, model_options=model_options, clip_name="h",
                             clip_model=TinyClipH, **kw)

    target = SimpleNamespace(clip=TinySD2ClipModel, tokenizer=sd2_clip.SD2Tokenizer, params={})
    return _build(target, seed, embedding_directory)


def _build(target, seed, embedding_directory):
    import comfy.sd

    with torch.inference_mode():
        clip = comfy.sd.CLIP(target, embedding_directory=embedding_directory, model_options={"dtype": torch.float32})
        g = torch.Generator().manual_seed(seed)
        for name, p in clip.cond_stage_model.named_parameters():
            if "layer_norm" in name:
                p.copy_(torch.ones_like(p) if name.endswith("weight") else torch.zeros_like(p))
            else:
                std = 0.02 if p.ndim > 1 else 0.01
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return clip
