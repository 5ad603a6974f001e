"""Seeded random-weight rectified-flow DiT files (SD3 MMDiT, Flux) for ComfyUI's stock loaders (issue 19).

Spec ``rectified-flow.md`` §6.  Both are diffusion-model files for ``UNETLoader`` (no prefix);
text encoders are left out: the inversion tests build CONDITIONING tensors of the right shapes
in-process (:func:`sd3_conditioning`, :func:`flux_conditioning`).

* ``photoops_tiny_sd3.safetensors`` — ComfyUI's ``MMDiT`` with depth 2 (hidden 128, 2 heads,
  ``patch_size 2``, 16 channels, ``adm_in_channels 2048``, a 4096 -> 128 context embedder,
  ``pos_embed_max_size 32``): ``comfy.model_detection`` reads ``depth = x_embedder.proj.weight.shape[0]
  // 64`` and picks ``supported_models.SD3`` (FLOW, ``ModelSamplingDiscreteFlow`` shift 3).
  2.0 M parameters, fp32 (8 MB).
* ``photoops_tiny_flux.safetensors`` — ComfyUI's ``Flux`` (dev: with ``guidance_in``).  Detection
  fixes ``hidden_size 3072``, ``num_heads 24`` and ``context_in_dim 4096`` (model_detection.py l.190-193),
  so the file cannot be small; it has the least detection allows: ONE double block and NO single
  block (``depth_single_blocks`` is counted from the keys and may be 0), ``vec_in_dim 768``.
  404 M parameters, stored bf16 (808 MB; upcast exactly to fp32 on loading).

Weights: built on the meta device with ComfyUI's own classes (so every key and shape is what the
loader expects), then filled from one seeded ``torch.Generator`` in sorted key order: matrices
``N(0, 1) / sqrt(fan_in)``, norm scales ``1 + 0.1 N(0, 1)``, biases / embeddings ``0.02 N(0, 1)``.
Generated at test time and cached under ``fixtures.default_cache_dir()`` (``$PHOTOOPS_TEST_CACHE``),
keyed by a hash of the generator; never committed.  Needs ComfyUI importable (``comfyenv``).

Public API::

    cached_flow_fixture(kind, cache_dir=None) -> Path          # kind: "sd3" | "flux"
    state_dict_shapes(kind, schnell=False) -> {key: meta tensor}
    SD3_CONFIG, FLUX_CONFIG
    sd3_conditioning(seed, tokens=8) / flux_conditioning(seed, tokens=8, guidance=3.5) -> CONDITIONING
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

GENERATOR_VERSION = 1
SEED = 19

SD3_NAME = "photoops_tiny_sd3.safetensors"
FLUX_NAME = "photoops_tiny_flux.safetensors"

#: kwargs of comfy.ldm.modules.diffusionmodules.mmdit.MMDiT as model_detection derives them
SD3_CONFIG = {"in_channels": 16, "patch_size": 2, "out_channels": 16, "depth": 2, "input_size": None,
              "adm_in_channels": 2048, "num_patches": 1024, "pos_embed_max_size": 32,
              "pos_embed_scaling_factor": None, "x_block_self_attn_layers": [],
              "context_embedder_config": {"target": "torch.nn.Linear",
                                          "params": {"in_features": 4096, "out_features": 128}}}
#: kwargs of comfy.ldm.flux.model.Flux (model_detection.py l.170-222 with 1 double, 0 single blocks)
FLUX_CONFIG = {"image_model": "flux", "in_channels": 16, "patch_size": 2, "out_channels": 16, "vec_in_dim": 768,
               "context_in_dim": 4096, "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "depth": 1,
               "depth_single_blocks": 0, "axes_dim": [16, 56, 56], "theta": 10000, "qkv_bias": True,
               "guidance_embed": True}
_DTYPES = {"sd3": torch.float32, "flux": torch.bfloat16}


def _hash(kind: str) -> str:
    cfg = SD3_CONFIG if kind == "sd3" else FLUX_CONFIG
    blob = json.dumps({"v": GENERATOR_VERSION, "seed": SEED, "kind": kind, "cfg": cfg,
                       "dtype": str(_DTYPES[kind]), "torch": torch.__version__.split("+")[0]}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def state_dict_shapes(kind: str, schnell: bool = False) -> dict:
    """The diffusion-model state dict of ComfyUI's own class, on the meta device (keys and shapes only)."""
    import comfy.ops

    ops = comfy.ops.disable_weight_init
    with torch.device("meta"):
        if kind == "sd3":
            from comfy.ldm.modules.diffusionmodules.mmdit import OpenAISignatureMMDITWrapper

            m = OpenAISignatureMMDITWrapper(**SD3_CONFIG, operations=ops, device="meta")
        elif kind == "flux":
            from comfy.ldm.flux.model import Flux

            m = Flux(**dict(FLUX_CONFIG, guidance_embed=not schnell), operations=ops, device="meta")
        else:
            raise ValueError(f"unknown flow fixture {kind!r}")
    return dict(m.state_dict())


def random_state_dict(kind: str, seed: int = SEED) -> dict:
    """Seeded weights for every key of :func:`state_dict_shapes` (see the module doc for the law)."""
    gen = torch.Generator().manual_seed(seed)
    dtype = _DTYPES[kind]
    out = {}
    for k, v in sorted(state_dict_shapes(kind).items()):
        t = torch.randn(v.shape, generator=gen, dtype=dtype)
        if v.ndim >= 2 and not k.endswith("pos_embed"):
            t.mul_(1.0 / v[0].numel() ** 0.5)
        elif v.ndim == 1 and (k.endswith("scale") or ".ln_" in k or "norm" in k) and k.endswith(("scale", "weight")):
            t.mul_(0.1).add_(1.0)
        else:
            t.mul_(0.02)
        out[k] = t.contiguous()
    return out


def cached_flow_fixture(kind: str, cache_dir=None) -> Path:
    """Path of the tiny ``kind`` ("sd3" / "flux") diffusion-model file, generated on first use."""
    from .fixtures import default_cache_dir

    name = {"sd3": SD3_NAME, "flux": FLUX_NAME}[kind]
    path = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / f"flow-{_hash(kind)}" / name
    if not path.is_file():
        from .pops_fixtures import _save  # the harness' one atomic fixture write

        _save(random_state_dict(kind), path, {"photoops_fixture": json.dumps({"kind": kind, "seed": SEED,
                                                                             "version": GENERATOR_VERSION})})
    return path


def sd3_conditioning(seed: int, tokens: int = 8, batch: int = 1):
    """CONDITIONING of an SD3 text encoder's shapes: context [B, tokens, 4096], pooled [B, 2048]."""
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(batch, tokens, 4096, generator=g),
             {"pooled_output": torch.randn(batch, 2048, generator=g)}]]


def flux_conditioning(seed: int, tokens: int = 8, guidance: float = 3.5, batch: int = 1):
    """CONDITIONING of Flux's shapes: T5 context [B, tokens, 4096], CLIP-L pooled [B, 768], guidance embed."""
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(batch, tokens, 4096, generator=g),
             {"pooled_output": torch.randn(batch, 768, generator=g), "guidance": float(guidance)}]]


def load_flow_model(kind: str):
    """ModelPatcher of the fixture through ComfyUI's stock diffusion-model loader (as UNETLoader), fp32."""
    import comfy.sd

    return comfy.sd.load_diffusion_model(str(cached_flow_fixture(kind)), model_options={"dtype": torch.float32})
