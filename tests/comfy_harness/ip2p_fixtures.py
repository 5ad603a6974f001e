"""A seeded random-weight SD1.5 *InstructPix2Pix* checkpoint for the InstructBrush tests (issue 8).

Same recipe as :mod:`.fixtures` (the SD1.5 fixture: tiny 320-channel UNet, full-size random
CLIP-L text encoder, TAESD VAE), with an **8-channel** UNet input (4 noisy-latent + 4 image
latent channels), which is how ComfyUI's ``model_detection`` recognises ``SD15_instructpix2pix``
(``comfy/supported_models.py``: ``in_channels == 8``). Nothing is downloaded; the file is
cached under ``.cache/comfy-fixtures/<hash>/`` like the SD1.5 one.

Public API::

    cached_ip2p_checkpoint(seed=0, cache_dir=None) -> dict   # "path", "filename", "unet_config", ...
    IP2P_CHECKPOINT_NAME, IP2P_UNET_CONFIG
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from . import fixtures as fx

GENERATOR_VERSION = 1
IP2P_CHECKPOINT_NAME = "photoops_tiny_sd15_ip2p.safetensors"
IP2P_UNET_CONFIG = {**fx.UNET_CONFIG, "in_channels": 8}


def _params(seed: int) -> dict:
    p = fx._params(seed, torch.float32, torch.float16)
    p.update(ip2p_generator_version=GENERATOR_VERSION, unet_config=IP2P_UNET_CONFIG)
    return p


def params_hash(seed: int = 0) -> str:
    return hashlib.sha256(json.dumps(_params(seed), sort_keys=True).encode()).hexdigest()[:16]


def build_ip2p_state_dict(seed: int = 0) -> dict:
    """LDM-named single-file state dict: UNet fp32, text encoder fp16, TAESD fp32."""
    sd = {}
    unet = fx.build_diffusers_unet(seed, config=IP2P_UNET_CONFIG)
    for k, v in fx.diffusers_unet_to_ldm(unet.state_dict(), IP2P_UNET_CONFIG).items():
        sd[fx.UNET_PREFIX + k] = v.detach().float().contiguous()
    del unet
    clip = fx.build_clip_text_model(seed)
    for k, v in clip.state_dict().items():
        if k.endswith("position_ids"):
            continue
        if not k.startswith("text_model."):
            k = "text_model." + k
        sd[fx.CLIP_PREFIX + k] = v.detach().to(torch.float16).contiguous()
    del clip
    vae = fx.build_taesd(seed)
    for k, v in fx.taesd_to_ldm(vae.state_dict()).items():
        sd[fx.VAE_PREFIX + k] = v.detach().float().contiguous()
    return sd


def make_ip2p_checkpoint(path, seed: int = 0) -> dict:
    from safetensors.torch import save_file

    t0 = time.perf_counter()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = build_ip2p_state_dict(seed)
    meta = {"photoops_fixture": json.dumps(_params(seed), sort_keys=True)}
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".part", dir=str(path.parent))
    os.close(fd)
    try:
        save_file(sd, tmp, metadata=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return _info(path, seed, time.perf_counter() - t0)


def _info(path: Path, seed: int, seconds: float) -> dict:
    return {"path": str(path), "filename": path.name, "seed": int(seed), "unet_config": dict(IP2P_UNET_CONFIG),
            "params_hash": params_hash(seed), "bytes": path.stat().st_size, "seconds": seconds}


def cached_ip2p_checkpoint(seed: int = 0, cache_dir=None) -> dict:
    """The checkpoint in ``<cache>/<params_hash>/photoops_tiny_sd15_ip2p.safetensors`` (made once)."""
    cache = Path(cache_dir) if cache_dir is not None else fx.default_cache_dir()
    path = cache / params_hash(seed) / IP2P_CHECKPOINT_NAME
    if path.is_file():
        return _info(path, seed, 0.0)
    return make_ip2p_checkpoint(path, seed=seed)


def cached_ip2p_fixture_files(cache_dir=None) -> dict:
    """{model folder: [files]} for the test server (the workflows name the checkpoint)."""
    return {"checkpoints": [Path(cached_ip2p_checkpoint(cache_dir=cache_dir)["path"])]}


if __name__ == "__main__":
    print(json.dumps({k: v for k, v in cached_ip2p_checkpoint().items() if k != "unet_config"}, indent=1))
