"""A CLIP vision loader for files of any size (test fixtures): core's loader when it knows the file.

Core ``comfy.clip_vision.load`` recognises only full-size towers (ViT-L/H/bigG, SigLIP, DINOv2);
every real file pOps needs (``clip_vision_g.safetensors``) is one of them, so users load it with
core *Load CLIP Vision*.  The CI's tiny ``photoops_tiny_clip_vision_g.safetensors`` is not, so the
test harness swaps core's loader for this one (``tests/comfy_harness/overrides.py``).
"""
from __future__ import annotations


def load_clip_vision_any(path: str, heads=None, hidden_act=None):
    """A core CLIP_VISION from a transformers-layout CLIP vision file of any size.

    Files core ComfyUI recognises (ViT-L/H/bigG, SigLIP, DINOv2) go through
    ``comfy.clip_vision.load`` unchanged.  Otherwise the config is read from the shapes
    (heads and activation from the safetensors metadata, else hidden/64 and gelu) and the
    model is built with core's ``ClipVisionModel`` (so encoding is core's code).
    """
    import json
    import os
    import tempfile

    import comfy.clip_vision
    import comfy.utils

    cv = comfy.clip_vision.load(path)
    if cv is not None:
        return cv
    sd, meta = comfy.utils.load_torch_file(path, return_metadata=True)
    meta = meta or {}
    pre = "vision_model."
    need = [pre + "embeddings.class_embedding", pre + "embeddings.patch_embedding.weight",
            pre + "embeddings.position_embedding.weight", "visual_projection.weight"]
    missing = [k for k in need if k not in sd]
    if missing:
        raise ValueError(f"{os.path.basename(path)} is not a CLIP vision model (missing {missing[:2]})")
    hidden = sd[pre + "embeddings.class_embedding"].shape[0]
    patch = sd[pre + "embeddings.patch_embedding.weight"].shape[-1]
    n_pos = sd[pre + "embeddings.position_embedding.weight"].shape[0]
    side = round((n_pos - 1) ** 0.5)
    layers = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith(pre + "encoder.layers."))
    heads = int(heads or meta.get("num_attention_heads") or max(1, hidden // 64))
    cfg = {"attention_dropout": 0.0, "dropout": 0.0, "hidden_act": hidden_act or meta.get("hidden_act", "gelu"),
           "hidden_size": hidden, "image_size": side * patch, "initializer_factor": 1.0,
           "initializer_range": 0.02,
           "intermediate_size": sd[pre + "encoder.layers.0.mlp.fc1.weight"].shape[0],
           "layer_norm_eps": 1e-5, "model_type": "clip_vision_model", "num_attention_heads": heads,
           "num_channels": 3, "num_hidden_layers": layers, "patch_size": patch,
           "projection_dim": sd["visual_projection.weight"].shape[0]}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(cfg, f)
    try:
        cv = comfy.clip_vision.ClipVisionModel(f.name)
    finally:
        os.unlink(f.name)
    m, _ = cv.load_sd(sd)
    if m:
        raise ValueError(f"{os.path.basename(path)}: CLIP vision weights do not fit the inferred config "
                         f"(missing {list(m)[:3]})")
    return cv
