"""Seeded random-weight fixture files for the pOps workflows (issue 6).  Nothing is downloaded.

The real pieces are far too big for CI (ViT-bigG 1.8 B, SDXL 2.6 B + 0.8 B text encoders,
the operator 1.03 B parameters), so each is replaced by the smallest file that the same
ComfyUI code path accepts:

* ``pops/photoops_tiny_texturing.safetensors`` (and ``..._scene``, another seed) — a PriorTransformer with the real
  embedding width 1280 (so it takes bigG-width embeddings and feeds SDXL's 1280-d pooled
  input) but inner width 64, 1 head, 2 layers; ``clip_mean``/``clip_std`` and the
  ``pops_operator=texturing`` metadata included (the layout ``tools/convert_pops.py`` writes).
* ``clip_vision/photoops_tiny_clip_vision_g.safetensors`` — a transformers
  ``CLIPVisionModelWithProjection`` (hidden 32, 2 layers, 224 px, patch 14) with a
  1280-d projection.  Core ``CLIPVisionLoader`` only recognises full-size towers (it
  detects them by layer count), so workflows load it with the pack's *Load CLIP Vision
  (any size)*, which builds core's own ``ClipVisionModel`` from the shapes; encoding is
  then core *CLIP Vision Encode*.
* ``diffusion_models/photoops_tiny_sdxl_unet.safetensors`` — a UNet that ComfyUI's model
  detection classifies as an SDXL-family model (``KOALA_700M``: model_channels 320,
  transformer depth [0,2,5], context 2048, ADM 2816, linear projections) with channel
  multipliers [1,1,1], one res block per level and no output/middle transformers
  (62 M parameters instead of 700 M); built with
  ComfyUI's own ``UNetModel`` class (in a subprocess, so the calling process need not
  import ComfyUI).  SDXL's text encoders (0.8 B) are left out: the workflow uses *pOps
  Revision Conditioning*, which needs no text encoder.
* ``vae/photoops_tiny_vae.safetensors`` — the TAESD-layout random VAE of the SD1.5 fixture.

Public API::

    cached_pops_fixtures(cache_dir=None) -> {"pops": [Path], "clip_vision": [Path],
                                             "diffusion_models": [Path], "vae": [Path]}
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

GENERATOR_VERSION = 1
SEED = 6

OPERATOR_NAME = "photoops_tiny_texturing.safetensors"
OPERATOR2_NAME = "photoops_tiny_scene.safetensors"
CLIP_VISION_NAME = "photoops_tiny_clip_vision_g.safetensors"
UNET_NAME = "photoops_tiny_sdxl_unet.safetensors"
VAE_NAME = "photoops_tiny_vae.safetensors"

PRIOR_CONFIG = {"num_attention_heads": 1, "attention_head_dim": 64, "num_layers": 2, "embedding_dim": 1280}
CLIP_VISION_CONFIG = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                      "image_size": 224, "patch_size": 14, "projection_dim": 1280, "hidden_act": "gelu"}
UNET_CONFIG = {"image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 320,
               "num_res_blocks": [1, 1, 1], "channel_mult": [1, 1, 1], "transformer_depth": [0, 2, 5],
               "transformer_depth_middle": -1, "transformer_depth_output": [0, 0, 0, 0, 0, 0],
               "context_dim": 2048, "use_linear_in_transformer": True, "adm_in_channels": 2816,
               "num_classes": "sequential", "num_head_channels": 64, "use_spatial_transformer": True,
               "legacy": False}


def _hash() -> str:
    blob = json.dumps({"v": GENERATOR_VERSION, "seed": SEED, "prior": PRIOR_CONFIG, "cv": CLIP_VISION_CONFIG,
                       "unet": UNET_CONFIG, "torch": torch.__version__.split("+")[0]}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _save(sd: dict, path: Path, meta: dict | None = None) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".part", dir=str(path.parent))
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in sd.items()}, tmp, metadata=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _randomize(params, gen: torch.Generator, dtype=None) -> dict:
    """Fan-in scaled normal weights, LayerNorm/GroupNorm weights 1, biases small."""
    out = {}
    for k, v in params:
        if v.ndim >= 2:
            fan_in = v[0].numel()
            t = torch.randn(v.shape, generator=gen) / fan_in ** 0.5
        elif k.endswith("weight") and ("norm" in k or "ln" in k):
            t = torch.ones(v.shape)
        else:
            t = torch.randn(v.shape, generator=gen) * 0.02
        out[k] = t.to(dtype or torch.float32)
    return out


def _kernel_pops():
    """kernels/pops.py (plain torch, no relative imports), loaded by file path."""
    import importlib.util

    f = Path(__file__).resolve().parents[2] / "kernels" / "pops.py"
    spec = importlib.util.spec_from_file_location("_photoops_fixture_pops", f)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def make_operator(path: Path, name: str = "texturing", seed: int = SEED) -> None:
    pops = _kernel_pops()
    gen = torch.Generator().manual_seed(seed)
    cfg = pops.PriorConfig(**PRIOR_CONFIG)
    with torch.device("meta"):
        m = pops.OperatorPrior(cfg)
    sd = _randomize(((k, v) for k, v in m.state_dict().items()), gen)
    for k in ("positional_embedding", "prd_embedding"):
        sd[k] = torch.randn(sd[k].shape, generator=gen) * 0.5
    sd = {k: v.half() for k, v in sd.items()}
    sd["clip_mean"] = (torch.randn(1, 1280, generator=gen) * 0.3).float()
    sd["clip_std"] = (0.5 + torch.rand(1, 1280, generator=gen)).float()
    _save(sd, path, {"pops_operator": name, "num_attention_heads": str(cfg.num_attention_heads),
                     "format": "photoops-pops-operator-v1", "photoops_fixture": "tiny random weights"})


def make_clip_vision(path: Path) -> None:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(SEED)
    m = CLIPVisionModelWithProjection(CLIPVisionConfig(**CLIP_VISION_CONFIG))
    sd = {k: v.detach().half() for k, v in m.state_dict().items() if not k.endswith("position_ids")}
    _save(sd, path, {"num_attention_heads": str(CLIP_VISION_CONFIG["num_attention_heads"]),
                     "hidden_act": CLIP_VISION_CONFIG["hidden_act"], "photoops_fixture": "tiny random weights"})


def make_vae(path: Path) -> None:
    from .fixtures import build_taesd, taesd_to_ldm

    _save({k: v.detach().float() for k, v in taesd_to_ldm(build_taesd(SEED).state_dict()).items()}, path,
          {"photoops_fixture": "tiny random weights"})


def make_sdxl_unet(path: Path) -> None:
    """Runs in a subprocess that imports ComfyUI (see module doc)."""
    code = (
        "import sys, json, torch\n"
        f"sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})\n"
        "from comfy_harness import comfyenv\n"
        "comfyenv.ensure_comfy_importable(cpu=True)\n"
        "import comfy.ops\n"
        "from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel\n"
        "from comfy_harness.pops_fixtures import UNET_CONFIG, SEED, _randomize, _save\n"
        "from pathlib import Path\n"
        "with torch.device('meta'):\n"
        "    m = UNetModel(**UNET_CONFIG, operations=comfy.ops.disable_weight_init)\n"
        "gen = torch.Generator().manual_seed(SEED)\n"
        "sd = _randomize(m.state_dict().items(), gen, torch.float16)\n"
        f"_save(sd, Path({str(path)!r}), {{'photoops_fixture': 'tiny random weights'}})\n"
    )
    r = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"could not build the tiny SDXL UNet fixture:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")


def cached_pops_fixtures(cache_dir=None) -> dict:
    """Generate (once, cached by a hash of the generator) and return the fixture files by model folder."""
    from .fixtures import default_cache_dir

    root = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / f"pops-{_hash()}"
    files = [("pops", root / OPERATOR_NAME, make_operator),
             ("pops", root / OPERATOR2_NAME, lambda p: make_operator(p, "scene", SEED + 1)),
             ("clip_vision", root / CLIP_VISION_NAME, make_clip_vision),
             ("diffusion_models", root / UNET_NAME, make_sdxl_unet), ("vae", root / VAE_NAME, make_vae)]
    out: dict = {}
    for folder, path, make in files:
        if not path.is_file():
            make(path)
        out.setdefault(folder, []).append(path)
    return out


if __name__ == "__main__":
    print(json.dumps({k: [str(p) for p in v] for k, v in cached_pops_fixtures().items()}, indent=1))
