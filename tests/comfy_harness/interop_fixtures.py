"""Seeded random-weight files for the interop tests (``tests/test_comfy_interop.py``).  Nothing is downloaded.

Each file is sized for the tiny SD1.5-format checkpoint of :mod:`.fixtures` (320-wide UNet, context 768,
cross-attention in input blocks 1 and 3, the middle block and output blocks 0-3, one transformer each),
generated at test time and cached in ``.cache/comfy-fixtures/interop-<hash>/`` (git-ignored), never
committed:

* ``photoops_tiny_ip-adapter_sd15.safetensors`` — the *ip-adapter_sd15* layout (the non-plus SD1.5
  adapter for ViT-H image embeddings):

  - ``image_proj.proj.{weight,bias}`` ``[4 * 768, 1024]`` / ``[4 * 768]`` and ``image_proj.norm.{weight,bias}``
    ``[768]``: 4 extra context tokens of width 768 from a 1024-d image embedding.  IPAdapter_plus reads
    "SD1.5" from ``ip_adapter.1.to_k_ip.weight.shape[1] == 768`` (not 2048) and "not plus / full / face" from
    the absence of ``latents``, ``proj.3.weight``, ``proj.2.weight`` and LoRA keys;
  - ``ip_adapter.<n>.to_{k,v}_ip.weight`` ``[320, 768]`` for the 16 keys n = 1, 3, ..., 31 of the real
    file.  For SD1.5 the pack patches ``("input", b)`` for b in 1, 2, 4, 5, 7, 8 (keys 1..11),
    ``("output", b)`` for b in 3..11 (keys 13..29) and ``("middle", 1)`` (key 31) — two-element keys, so
    they match any transformer index.  Of these the tiny UNet has cross-attention at ``("input", 1)``
    (key 1), ``("output", 3)`` (key 13) and the middle block (key 31); those three layers run, all 320
    wide.  The other keys are kept (at width 320) so the file has the real file's 16 layers.

* ``photoops_tiny_lora_sd15.safetensors`` — a rank-4 LoRA in the kohya ``lora_unet_<ldm name>`` layout
  (``.lora_down.weight``, ``.lora_up.weight``, ``.alpha``) on ``to_q/to_k/to_v/to_out.0`` of every attn1
  and attn2 of the UNet, which core ``comfy.lora.model_lora_keys_unet`` maps onto the checkpoint's
  ``diffusion_model.*`` weights.  :func:`lora_targets` lists the weights it patches.

* ``photoops_tiny_controlnet_sd15.safetensors`` — an LDM-format ControlNet (``zero_convs.0.0.weight``,
  ``input_hint_block.*``, the UNet's input and middle blocks, ``middle_block_out``) built on the shapes of
  ``comfy.cldm.cldm.ControlNet`` for the fixture UNet's own ``unet_config`` (so
  ``comfy.controlnet.load_controlnet`` detects it as SD1.5 from the same key shapes the checkpoint is
  detected by); every tensor seeded random (fan-in scaled), including the zero convs, so control acts.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch

GENERATOR_VERSION = 1
SEED = 71
IPADAPTER_NAME = "photoops_tiny_ip-adapter_sd15.safetensors"
LORA_NAME = "photoops_tiny_lora_sd15.safetensors"
CONTROLNET_NAME = "photoops_tiny_controlnet_sd15.safetensors"

IP_EMBED_DIM = 1024        # ViT-H image_embeds, what the real ip-adapter_sd15 takes
IP_CONTEXT_DIM = 768       # SD1.5 cross-attention context width
IP_TOKENS = 4              # non-plus IP-Adapter: 4 extra context tokens
IP_LAYER_WIDTH = 320       # the tiny UNet's transformer width
IP_LAYER_KEYS = tuple(range(1, 32, 2))      # the real file's 16 layers
IP_V_GAIN = 4.0            # to_v_ip gain, so the adapter's effect is well above float noise in a few steps
LORA_RANK = 4
LORA_GAIN = 2.0


def _hash(extra) -> str:
    blob = json.dumps({"v": GENERATOR_VERSION, "seed": SEED, "ip": [IP_EMBED_DIM, IP_CONTEXT_DIM, IP_TOKENS,
                                                                    IP_LAYER_WIDTH, IP_LAYER_KEYS, IP_V_GAIN],
                       "lora": [LORA_RANK, LORA_GAIN], "extra": extra,
                       "torch": torch.__version__.split("+")[0]}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _root(cache_dir, extra=None) -> Path:
    from .fixtures import default_cache_dir

    return (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / f"interop-{_hash(extra)}"


def _save(sd: dict, path: Path, what: str) -> None:
    from .pops_fixtures import _save as save_atomic

    save_atomic(sd, path, {"photoops_fixture": what})


# --------------------------------------------------------------------------- IP-Adapter (SD1.5)

def make_ipadapter_sd15(path: Path, seed: int = SEED) -> None:
    g = torch.Generator().manual_seed(seed)
    sd = {
        "image_proj.proj.weight": torch.randn(IP_TOKENS * IP_CONTEXT_DIM, IP_EMBED_DIM, generator=g)
        / IP_EMBED_DIM ** 0.5,
        "image_proj.proj.bias": torch.randn(IP_TOKENS * IP_CONTEXT_DIM, generator=g) * 0.02,
        "image_proj.norm.weight": torch.ones(IP_CONTEXT_DIM),
        "image_proj.norm.bias": torch.zeros(IP_CONTEXT_DIM),
    }
    for n in IP_LAYER_KEYS:
        for kv, gain in (("k", 1.0), ("v", IP_V_GAIN)):
            sd[f"ip_adapter.{n}.to_{kv}_ip.weight"] = (torch.randn(IP_LAYER_WIDTH, IP_CONTEXT_DIM, generator=g)
                                                      * (gain / IP_CONTEXT_DIM ** 0.5))
    _save({k: v.half() for k, v in sd.items()}, path, "tiny random weights, ip-adapter_sd15 layout")


def cached_ipadapter_sd15(cache_dir=None) -> Path:
    path = _root(cache_dir) / IPADAPTER_NAME
    if not path.is_file():
        make_ipadapter_sd15(path)
    return path


def image_embeds(seed: int = SEED, n: int = 1) -> torch.Tensor:
    """A seeded stand-in for CLIP-vision ``image_embeds`` (``[n, 1024]``, unit-ish scale)."""
    return torch.randn(n, IP_EMBED_DIM, generator=torch.Generator().manual_seed(seed + 1))


# --------------------------------------------------------------------------- LoRA (SD1.5)

_ATTN_WEIGHT = re.compile(r"model\.diffusion_model\.(.+\.attn[12]\.(?:to_q|to_k|to_v|to_out\.0))\.weight")


def lora_targets(checkpoint_path) -> dict:
    """{ldm name without ``.weight``: (out, in)} of the attention projections the LoRA patches."""
    from safetensors import safe_open

    out = {}
    with safe_open(str(checkpoint_path), "pt") as f:
        for k in f.keys():
            m = _ATTN_WEIGHT.fullmatch(k)
            if m:
                shape = f.get_slice(k).get_shape()
                out[m[1]] = (int(shape[0]), int(shape[1]))
    if not out:
        raise ValueError(f"no attention projections found in {checkpoint_path}")
    return dict(sorted(out.items()))


def make_lora_sd15(path: Path, checkpoint_path, seed: int = SEED) -> None:
    g = torch.Generator().manual_seed(seed + 2)
    sd = {}
    for name, (n_out, n_in) in lora_targets(checkpoint_path).items():
        key = "lora_unet_" + name.replace(".", "_")
        sd[key + ".lora_down.weight"] = torch.randn(LORA_RANK, n_in, generator=g) / n_in ** 0.5
        sd[key + ".lora_up.weight"] = torch.randn(n_out, LORA_RANK, generator=g) * (LORA_GAIN / LORA_RANK ** 0.5)
        sd[key + ".alpha"] = torch.tensor(float(LORA_RANK))
    _save({k: v.half() if v.ndim else v for k, v in sd.items()}, path, "tiny random rank-4 LoRA, kohya layout")


def cached_lora_sd15(checkpoint_path, cache_dir=None) -> Path:
    path = _root(cache_dir, extra=Path(checkpoint_path).parent.name) / LORA_NAME
    if not path.is_file():
        make_lora_sd15(path, checkpoint_path)
    return path


# --------------------------------------------------------------------------- ControlNet (SD1.5)

def _controlnet_config(unet_config: dict) -> dict:
    cfg = {k: v for k, v in unet_config.items() if k not in ("dtype", "device", "operations", "out_channels")}
    cfg["hint_channels"] = 3
    return cfg


def make_controlnet_sd15(path: Path, unet_config: dict, seed: int = SEED) -> None:
    """``unet_config``: the loaded fixture's ``model.model.model_config.unet_config`` (needs comfy importable)."""
    import comfy.cldm.cldm
    import comfy.ops

    net = comfy.cldm.cldm.ControlNet(**_controlnet_config(unet_config), device="meta",
                                     operations=comfy.ops.disable_weight_init)
    g = torch.Generator().manual_seed(seed + 3)
    sd = {}
    for k, v in net.state_dict().items():
        if v.ndim >= 2:
            sd[k] = torch.randn(tuple(v.shape), generator=g) / v[0].numel() ** 0.5
        elif k.endswith("weight") and ("norm" in k or re.search(r"\.(in_layers|out_layers)\.0\.", k)):
            sd[k] = torch.ones(tuple(v.shape))
        else:
            sd[k] = torch.randn(tuple(v.shape), generator=g) * 0.02
    _save({k: v.half() for k, v in sd.items()}, path, "tiny random ControlNet, LDM layout")


def cached_controlnet_sd15(unet_config: dict, cache_dir=None) -> Path:
    path = _root(cache_dir, extra=_controlnet_config(unet_config)) / CONTROLNET_NAME
    if not path.is_file():
        make_controlnet_sd15(path, unet_config)
    return path


# --------------------------------------------------------------------------- IPAdapter_plus in-process

def load_ipadapter_plus(comfy_dir):
    """Import the installed ComfyUI_IPAdapter_plus package in-process (under a private module name, so
    nothing named like a top-level module is shadowed).  Returns its ``IPAdapterPlus`` module."""
    import importlib.util
    import sys

    from .ipadapter_fixtures import PACK_NAME, pack_dir

    d = pack_dir(comfy_dir)
    if d is None:
        raise RuntimeError(f"{PACK_NAME} is not installed in {comfy_dir}/custom_nodes")
    name = "photoops_interop_ipadapter_plus"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, d / "__init__.py", submodule_search_locations=[str(d)])
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        try:
            spec.loader.exec_module(mod)
        except BaseException:
            del sys.modules[name]
            raise
    return sys.modules[name + ".IPAdapterPlus"]
