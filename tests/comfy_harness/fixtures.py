"""A seeded, random-weight, SD1.5-format single-file checkpoint for tests.

ComfyUI's ``CheckpointLoaderSimple`` detects it as SD1.5 (EPS):

* UNet: a small diffusers ``UNet2DConditionModel`` (model_channels 320,
  context 768, 8 heads, 1x1-conv ``proj_in``, two cross-attention levels, one
  res block per level, a middle block), converted to LDM key names by
  :func:`diffusers_unet_to_ldm` and stored under ``model.diffusion_model.``.
* Text encoder: a full-size CLIP-L text model (ComfyUI always builds the full
  SD1 CLIP, so no weight may be left out), random, seeded, under
  ``cond_stage_model.transformer.text_model.``.
* VAE: the TAESD layout (diffusers ``AutoencoderTiny``), random, seeded, under
  ``first_stage_model.``.

Nothing is downloaded.  The file is generated at test time; use
:func:`cached_sd15_checkpoint` to reuse it across runs.

Public API::

    make_sd15_checkpoint(path, seed=0, dtype=torch.float32, te_dtype=torch.float16) -> dict
    cached_sd15_checkpoint(seed=0, dtype=torch.float32, te_dtype=torch.float16, cache_dir=None) -> dict
    build_diffusers_unet(seed=0, weights_dtype=None) -> UNet2DConditionModel (fp32)
    build_clip_text_model(seed=0) -> transformers.CLIPTextModel (fp32)
    build_taesd(seed=0) -> diffusers.AutoencoderTiny (fp32)
    diffusers_unet_to_ldm(state_dict, unet_config) -> dict
    UNET_CONFIG, CLIP_TEXT_CONFIG, FIXTURE_CHECKPOINT_NAME
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

# Bump when anything below changes what bytes are written.
GENERATOR_VERSION = 2

#: File name the integration tests give the fixture inside the checkpoints folder.
FIXTURE_CHECKPOINT_NAME = "photoops_tiny_sd15.safetensors"

#: diffusers UNet2DConditionModel config.  In diffusers' SD1.x configs
#: ``attention_head_dim`` is really the number of heads (8, i.e. 40 wide).
UNET_CONFIG: dict = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 320],
    "layers_per_block": 1,
    "transformer_layers_per_block": 1,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "use_linear_projection": False,
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "act_fn": "silu",
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "upcast_attention": False,
    "center_input_sample": False,
}

#: CLIP-L text encoder as used by SD1.x (openai/clip-vit-large-patch14).
CLIP_TEXT_CONFIG: dict = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "projection_dim": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "attention_dropout": 0.0,
    "dropout": 0.0,
    "initializer_range": 0.02,
    "initializer_factor": 1.0,
    "pad_token_id": 1,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
}

#: diffusers AutoencoderTiny defaults = the TAESD architecture (latent 4 ch).
TAESD_CONFIG: dict = {
    "in_channels": 3,
    "out_channels": 3,
    "encoder_block_out_channels": [64, 64, 64, 64],
    "decoder_block_out_channels": [64, 64, 64, 64],
    "act_fn": "relu",
    "latent_channels": 4,
    "upsampling_scaling_factor": 2,
    "num_encoder_blocks": [1, 3, 3, 3],
    "num_decoder_blocks": [3, 3, 3, 1],
}

UNET_PREFIX = "model.diffusion_model."
CLIP_PREFIX = "cond_stage_model.transformer."
VAE_PREFIX = "first_stage_model."

_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}


def _as_dtype(d) -> torch.dtype:
    if isinstance(d, torch.dtype):
        return d
    return _DTYPES[str(d).replace("torch.", "")]


def _dtype_name(d) -> str:
    return str(_as_dtype(d)).replace("torch.", "")


# --------------------------------------------------------------------------
# Model builders (all seeded, all fp32)
# --------------------------------------------------------------------------

def _seed_offset(seed: int, part: int) -> int:
    # Distinct but reproducible streams per component.
    return int(seed) * 1000 + part


def build_diffusers_unet(seed: int = 0, weights_dtype=None, config: dict | None = None):
    """The diffusers UNet whose weights :func:`make_sd15_checkpoint` writes.

    Always returned in fp32, in eval mode.  ``weights_dtype``: round the weights
    through this dtype first (pass the checkpoint's ``dtype`` to reproduce
    exactly what ComfyUI loads from an fp16/bf16 file).
    """
    from diffusers import UNet2DConditionModel

    cfg = dict(UNET_CONFIG if config is None else config)
    torch.manual_seed(_seed_offset(seed, 1))
    unet = UNet2DConditionModel(**cfg)
    unet = unet.eval()
    if weights_dtype is not None and _as_dtype(weights_dtype) != torch.float32:
        wd = _as_dtype(weights_dtype)
        with torch.no_grad():
            for p in unet.parameters():
                p.copy_(p.to(wd).to(torch.float32))
    return unet


def build_clip_text_model(seed: int = 0, weights_dtype=None):
    """Full-size random CLIP-L text model (transformers ``CLIPTextModel``), fp32."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(_seed_offset(seed, 2))
    model = CLIPTextModel(CLIPTextConfig(**CLIP_TEXT_CONFIG)).to(torch.float32).eval()
    if weights_dtype is not None and _as_dtype(weights_dtype) != torch.float32:
        wd = _as_dtype(weights_dtype)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.to(wd).to(torch.float32))
    return model


def build_taesd(seed: int = 0):
    """Random TAESD-layout VAE (diffusers ``AutoencoderTiny``), fp32."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(_seed_offset(seed, 3))
    return AutoencoderTiny(**TAESD_CONFIG).eval()


# --------------------------------------------------------------------------
# diffusers -> LDM key conversion
# --------------------------------------------------------------------------

# Leaf renames inside a diffusers ResnetBlock2D -> LDM ResBlock.
_RESNET_LEAVES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}

_TOP_LEVEL = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def _resnet_rest(rest: str) -> str:
    """'conv1.weight' -> 'in_layers.2.weight' (raises on unknown leaves)."""
    leaf, _, param = rest.rpartition(".")
    if leaf not in _RESNET_LEAVES:
        raise KeyError(f"unknown resnet parameter {rest!r}")
    return f"{_RESNET_LEAVES[leaf]}.{param}"


def diffusers_unet_to_ldm(state_dict: dict, unet_config: dict) -> dict:
    """Rename a diffusers ``UNet2DConditionModel`` state dict to LDM (original SD) names.

    Supports the SD1.x-style layout: ``layers_per_block`` res blocks per level,
    optional cross-attention per level, a ``UNetMidBlock2DCrossAttn`` middle
    block, 1x1-conv transformer projections.  Attention/transformer internals
    keep their names (``transformer_blocks.N.attn1.to_q`` ...), which LDM
    shares.  Any key this mapping does not know raises ``KeyError``, so a new
    diffusers layout cannot slip through silently.
    """
    lpb = unet_config["layers_per_block"]
    if not isinstance(lpb, int):
        raise ValueError("per-level layers_per_block is not supported")
    n_levels = len(unet_config["block_out_channels"])
    up_types = unet_config["up_block_types"]

    out: dict = {}

    def put(new_key, value, old_key):
        if new_key in out:
            raise KeyError(f"two diffusers keys map to {new_key!r} (second: {old_key!r})")
        out[new_key] = value

    for key, value in state_dict.items():
        # Top-level layers.
        head, _, param = key.rpartition(".")
        if head in _TOP_LEVEL:
            put(f"{_TOP_LEVEL[head]}.{param}", value, key)
            continue

        m = re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key)
        if m:
            level, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            idx = 1 + level * (lpb + 1) + j
            if kind == "resnets":
                put(f"input_blocks.{idx}.0.{_resnet_rest(rest)}", value, key)
            else:
                put(f"input_blocks.{idx}.1.{rest}", value, key)
            continue

        m = re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(weight|bias)", key)
        if m:
            level = int(m[1])
            if level >= n_levels - 1:
                raise KeyError(f"unexpected downsampler on the last level: {key!r}")
            idx = 1 + level * (lpb + 1) + lpb
            put(f"input_blocks.{idx}.0.op.{m[2]}", value, key)
            continue

        m = re.fullmatch(r"mid_block\.resnets\.(\d)\.(.+)", key)
        if m:
            j, rest = int(m[1]), m[2]
            put(f"middle_block.{2 * j}.{_resnet_rest(rest)}", value, key)
            continue

        m = re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key)
        if m:
            put(f"middle_block.1.{m[1]}", value, key)
            continue

        m = re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key)
        if m:
            level, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            idx = level * (lpb + 1) + j
            if kind == "resnets":
                put(f"output_blocks.{idx}.0.{_resnet_rest(rest)}", value, key)
            else:
                put(f"output_blocks.{idx}.1.{rest}", value, key)
            continue

        m = re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(weight|bias)", key)
        if m:
            level = int(m[1])
            idx = level * (lpb + 1) + lpb
            # The upsampler follows the res block, and the transformer if the level has one.
            slot = 2 if up_types[level].startswith("CrossAttn") else 1
            put(f"output_blocks.{idx}.{slot}.conv.{m[2]}", value, key)
            continue

        raise KeyError(f"no LDM name for diffusers UNet key {key!r}")
    return out


def taesd_to_ldm(state_dict: dict) -> dict:
    """diffusers ``AutoencoderTiny`` keys -> TAESD (ComfyUI ``comfy.taesd``) keys.

    ``encoder.layers.N.*`` -> ``taesd_encoder.N.*``; the TAESD decoder starts
    with a parameter-free clamp module, so ``decoder.layers.N.*`` ->
    ``taesd_decoder.(N+1).*``.  Adds ``vae_scale`` = 1 and ``vae_shift`` = 0.
    """
    out = {}
    for key, value in state_dict.items():
        m = re.fullmatch(r"(encoder|decoder)\.layers\.(\d+)\.(.+)", key)
        if not m:
            raise KeyError(f"no TAESD name for AutoencoderTiny key {key!r}")
        n = int(m[2]) + (1 if m[1] == "decoder" else 0)
        out[f"taesd_{m[1]}.{n}.{m[3]}"] = value
    out["vae_scale"] = torch.tensor(1.0)
    out["vae_shift"] = torch.tensor(0.0)
    return out


# --------------------------------------------------------------------------
# Writing the checkpoint
# --------------------------------------------------------------------------

def _params(seed, dtype, te_dtype) -> dict:
    import diffusers
    import transformers

    return {
        "generator_version": GENERATOR_VERSION,
        "seed": int(seed),
        "dtype": _dtype_name(dtype),
        "te_dtype": _dtype_name(te_dtype),
        "unet_config": UNET_CONFIG,
        "clip_config": CLIP_TEXT_CONFIG,
        "taesd_config": TAESD_CONFIG,
        # Random init streams may differ between library versions.
        "torch": torch.__version__.split("+")[0],
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
    }


def params_hash(seed: int = 0, dtype=torch.float32, te_dtype=torch.float16) -> str:
    """Short hash of everything that determines the generated bytes."""
    blob = json.dumps(_params(seed, dtype, te_dtype), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def build_sd15_state_dict(seed: int = 0, dtype=torch.float32, te_dtype=torch.float16) -> dict:
    """The full single-file state dict (LDM names), without writing it."""
    dtype, te_dtype = _as_dtype(dtype), _as_dtype(te_dtype)
    sd: dict = {}

    unet = build_diffusers_unet(seed)
    for k, v in diffusers_unet_to_ldm(unet.state_dict(), UNET_CONFIG).items():
        sd[UNET_PREFIX + k] = v.detach().to(dtype).contiguous()
    del unet

    clip = build_clip_text_model(seed)
    for k, v in clip.state_dict().items():
        if k.endswith("position_ids"):
            continue
        # transformers 5 names them "encoder.layers..." (no "text_model."); SD1
        # checkpoints use the transformers 4 names.
        if not k.startswith("text_model."):
            k = "text_model." + k
        sd[CLIP_PREFIX + k] = v.detach().to(te_dtype).contiguous()
    del clip

    vae = build_taesd(seed)
    for k, v in taesd_to_ldm(vae.state_dict()).items():
        sd[VAE_PREFIX + k] = v.detach().to(dtype).contiguous()
    del vae
    return sd


def make_sd15_checkpoint(path, seed: int = 0, dtype=torch.float32, te_dtype=torch.float16) -> dict:
    """Write the random SD1.5-format checkpoint to ``path`` (a .safetensors file).

    ``dtype`` is the storage dtype of the UNet and the VAE, ``te_dtype`` that of
    the CLIP-L text encoder (fp16 keeps the file ~250 MB smaller).  Returns::

        {"path": str, "filename": str, "seed": int, "dtype": str, "te_dtype": str,
         "unet_config": dict,   # diffusers config: UNet2DConditionModel(**unet_config)
         "clip_config": dict, "taesd_config": dict, "params_hash": str,
         "bytes": int, "seconds": float}

    ``build_diffusers_unet(seed, weights_dtype=dtype)`` rebuilds the identical
    diffusers UNet.
    """
    from safetensors.torch import save_file

    t0 = time.perf_counter()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = build_sd15_state_dict(seed, dtype, te_dtype)
    meta = {"photoops_fixture": json.dumps(_params(seed, dtype, te_dtype), sort_keys=True)}
    # Write atomically: concurrent test processes may race on the cache.
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".part", dir=str(path.parent))
    os.close(fd)
    try:
        save_file(sd, tmp, metadata=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return _info(path, seed, dtype, te_dtype, seconds=time.perf_counter() - t0)


def _info(path: Path, seed, dtype, te_dtype, seconds: float) -> dict:
    return {
        "path": str(path),
        "filename": path.name,
        "seed": int(seed),
        "dtype": _dtype_name(dtype),
        "te_dtype": _dtype_name(te_dtype),
        "unet_config": dict(UNET_CONFIG),
        "clip_config": dict(CLIP_TEXT_CONFIG),
        "taesd_config": dict(TAESD_CONFIG),
        "params_hash": params_hash(seed, dtype, te_dtype),
        "bytes": path.stat().st_size,
        "seconds": seconds,
    }


def default_cache_dir() -> Path:
    """$PHOTOOPS_TEST_CACHE, else ``<repo>/.cache/comfy-fixtures`` (git-ignored)."""
    env = os.environ.get("PHOTOOPS_TEST_CACHE")
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parents[2]
    return repo / ".cache" / "comfy-fixtures"


def cached_sd15_checkpoint(
    seed: int = 0, dtype=torch.float32, te_dtype=torch.float16, cache_dir=None
) -> dict:
    """Like :func:`make_sd15_checkpoint`, but reuse a file generated earlier.

    The file lives in ``cache_dir/<params_hash>/photoops_tiny_sd15.safetensors``,
    so a change to the generator, its parameters or the library versions gives
    a new file.  ``info["seconds"]`` is 0 on a cache hit.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    h = params_hash(seed, dtype, te_dtype)
    path = cache / h / FIXTURE_CHECKPOINT_NAME
    if path.is_file():
        return _info(path, seed, dtype, te_dtype, seconds=0.0)
    _prune_outdated(cache)
    return make_sd15_checkpoint(path, seed=seed, dtype=dtype, te_dtype=te_dtype)


def _prune_outdated(cache: Path) -> None:
    """Delete cached files written by an older GENERATOR_VERSION (~430 MB each).

    Files of the current version (other seeds/dtypes/library versions) are kept."""
    import shutil

    from safetensors import safe_open

    if not cache.is_dir():
        return
    for f in cache.glob("*/" + FIXTURE_CHECKPOINT_NAME):
        try:
            with safe_open(str(f), "pt") as sf:
                meta = json.loads((sf.metadata() or {}).get("photoops_fixture", "{}"))
        except Exception:
            continue
        if meta.get("generator_version", GENERATOR_VERSION) < GENERATOR_VERSION:
            shutil.rmtree(f.parent, ignore_errors=True)


if __name__ == "__main__":  # manual use: python tests/comfy_harness/fixtures.py [out]
    import sys

    if len(sys.argv) > 1:
        info = make_sd15_checkpoint(sys.argv[1])
    else:
        info = cached_sd15_checkpoint()
    print(json.dumps({k: v for k, v in info.items() if not k.endswith("config")}, indent=1))
