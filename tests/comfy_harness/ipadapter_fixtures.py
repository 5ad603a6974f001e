"""Opt-in third-party pack cubiq/ComfyUI_IPAdapter_plus for the pOps IP-Adapter workflow (issue 6).

The pack is never part of this repository and never downloaded by the tests.  When a copy sits in
``$COMFYUI_DIR/custom_nodes/ComfyUI_IPAdapter_plus`` the IP-Adapter test starts a server that also
loads it (``ComfyServer(third_party_nodes=[PACK_NAME], extra_models=...)``); otherwise it skips.

Fixture (seeded, cached in ``.cache/comfy-fixtures/ipadapter-<hash>/``, nothing downloaded):

* ``ipadapter/photoops_tiny_ip-adapter_sdxl.safetensors`` — a file in the *ip-adapter_sdxl*
  layout (the non-plus SDXL adapter for ViT-bigG image embeddings) sized for the tiny
  KOALA-detected SDXL UNet of ``pops_fixtures``:

  - ``image_proj.proj.{weight,bias}`` ``[4 * 2048, 1280]`` / ``[4 * 2048]`` and
    ``image_proj.norm.{weight,bias}`` ``[2048]``: 4 extra context tokens of width 2048 from a
    1280-d embedding (the pack reads "SDXL" from ``ip_adapter.1.to_k_ip.weight.shape[1] == 2048``
    and "not plus/full" from the absence of ``latents`` / ``proj.3.weight``);
  - ``ip_adapter.<n>.to_{k,v}_ip.weight`` ``[320, 2048]`` for n in 1, 3, 5, 7.  The pack patches
    SDXL's cross-attention layers in a fixed order (input blocks 4, 5 with two transformers each,
    then 7, 8, the output blocks and the middle block; layer i uses key ``2 i + 1``).  The tiny
    UNet has its cross-attention in input blocks 3 (2 transformers) and 5 (5 transformers), all
    320 wide, so the pack's patches for ("input", 5, 0) and ("input", 5, 1) — keys 5 and 7 — are
    the ones that run; keys 1 and 3 (input block 4, absent here) are kept so the file has the
    real file's first four layers.  The real ip-adapter_sdxl has keys 1..139 at widths 640/1280.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

PACK_NAME = "ComfyUI_IPAdapter_plus"
GENERATOR_VERSION = 2
SEED = 61
IPADAPTER_NAME = "photoops_tiny_ip-adapter_sdxl.safetensors"
EMBED_DIM = 1280           # ViT-bigG image_embeds (the width Operator Apply outputs)
CONTEXT_DIM = 2048         # SDXL cross-attention context width
TOKENS = 4                 # non-plus IP-Adapter: 4 extra context tokens
LAYER_WIDTH = 320          # the tiny UNet's transformer width (channel_mult [1, 1, 1])
LAYER_KEYS = (1, 3, 5, 7)  # the pack's keys for ("input", 4, 0/1), ("input", 5, 0/1)
V_GAIN = 4.0              # to_v_ip gain: makes the adapter's effect survive 2 steps + the tiny VAE + 8-bit PNG


def pack_dir(comfy_dir) -> Path | None:
    """The installed pack folder, or None."""
    if comfy_dir is None:
        return None
    d = Path(comfy_dir) / "custom_nodes" / PACK_NAME
    return d if (d / "__init__.py").is_file() and (d / "IPAdapterPlus.py").is_file() else None


def pack_skip_reason(comfy_dir) -> str | None:
    if comfy_dir is None:
        return "COMFYUI_DIR is not set"
    if pack_dir(comfy_dir) is None:
        return (f"third-party pack {PACK_NAME} is not installed in {Path(comfy_dir) / 'custom_nodes'} "
                "(cubiq/ComfyUI_IPAdapter_plus; optional, never vendored here)")
    return None


def _hash() -> str:
    blob = json.dumps({"v": GENERATOR_VERSION, "seed": SEED, "e": EMBED_DIM, "c": CONTEXT_DIM, "t": TOKENS,
                       "w": LAYER_WIDTH, "k": LAYER_KEYS, "g": V_GAIN, "torch": torch.__version__.split("+")[0]}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def make_ipadapter(path: Path, seed: int = SEED) -> None:
    from .pops_fixtures import _save

    g = torch.Generator().manual_seed(seed)
    sd = {
        "image_proj.proj.weight": torch.randn(TOKENS * CONTEXT_DIM, EMBED_DIM, generator=g) / EMBED_DIM ** 0.5,
        "image_proj.proj.bias": torch.randn(TOKENS * CONTEXT_DIM, generator=g) * 0.02,
        "image_proj.norm.weight": torch.ones(CONTEXT_DIM),
        "image_proj.norm.bias": torch.zeros(CONTEXT_DIM),
    }
    for n in LAYER_KEYS:
        for kv, gain in (("k", 1.0), ("v", V_GAIN)):
            w = torch.randn(LAYER_WIDTH, CONTEXT_DIM, generator=g) * (gain / CONTEXT_DIM ** 0.5)
            sd[f"ip_adapter.{n}.to_{kv}_ip.weight"] = w
    _save({k: v.half() for k, v in sd.items()}, path, {"photoops_fixture": "tiny random weights, ip-adapter_sdxl layout"})


def cached_ipadapter_fixtures(cache_dir=None) -> dict:
    """{"ipadapter": [Path]} (generated once, cached by a hash of the generator)."""
    from .fixtures import default_cache_dir

    root = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / f"ipadapter-{_hash()}"
    path = root / IPADAPTER_NAME
    if not path.is_file():
        make_ipadapter(path)
    return {"ipadapter": [path]}


if __name__ == "__main__":
    print(json.dumps({k: [str(p) for p in v] for k, v in cached_ipadapter_fixtures().items()}, indent=1))
