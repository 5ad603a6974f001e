"""Full-size, seeded, random-weight SD1.5 / SDXL / SD1.5-InstructPix2Pix model files for the full-size bench.

Generated at bench (or opt-in test) time, cached outside the repository in
``$PHOTOOPS_BENCH_CACHE`` (default ``~/.cache/photoops-bench/``), never committed.  ComfyUI's
stock loaders detect them by key names and shapes (``comfy/model_detection.py``):

* ``sd15_full_fp16.safetensors``: one SD1.5 checkpoint (CheckpointLoaderSimple): the real SD1.5
  UNet layout (860M parameters) under ``model.diffusion_model.``, CLIP-L (transformers
  ``CLIPTextModel`` keys) under ``cond_stage_model.transformer.``, the KL-f8 VAE under
  ``first_stage_model.``; fp16, as SD1.5 checkpoints are usually shipped.
* ``sd15_ip2p_unet_fp16.safetensors``: the SD1.5 UNet with 8 input channels (UNETLoader; detected
  as ``SD15_instructpix2pix``); use the SD1.5 checkpoint's CLIP and VAE with it.
* ``sdxl_unet_bf16.safetensors`` (UNETLoader, 2.57B parameters), ``sdxl_clip_l_bf16.safetensors`` +
  ``sdxl_clip_g_bf16.safetensors`` (DualCLIPLoader ``sdxl``; transformers key layout, both with their
  ``text_projection``), ``sdxl_vae_bf16.safetensors`` (VAELoader); bf16 to save RAM and disk.

How: the layouts come from the model classes themselves, built on the ``meta`` device (no memory):
ComfyUI's ``UNetModel`` with the configs ComfyUI's own detection yields for SD1.5 / SDXL, its KL VAE
``Encoder`` / ``Decoder``, and transformers' CLIP text models.  Each tensor is then drawn from its
own seeded generator (seed, name) with PyTorch's default initialisation for its module type
(Linear / Conv: U(-1/sqrt(fan_in), 1/sqrt(fan_in)); norms: 1 / 0; embeddings: N(0, 0.02),
positions N(0, 0.01)) and streamed into a safetensors file one tensor at a time, so the
generator's peak memory is one tensor, whatever the model size.

    python bench/full_size_fixtures.py [--which sd15 ip2p sdxl] [--seed 0]
"""
from __future__ import annotations

import json
import math
import os
import struct
import sys
import time
import zlib
from pathlib import Path

import torch

GENERATOR_VERSION = 1   # files of another version are regenerated (the version is in the file name)

SD15_UNET = {'use_checkpoint': False, 'image_size': 32, 'out_channels': 4, 'use_spatial_transformer': True,
             'legacy': False, 'adm_in_channels': None, 'in_channels': 4, 'model_channels': 320,
             'num_res_blocks': [2, 2, 2, 2], 'transformer_depth': [1, 1, 1, 1, 1, 1, 0, 0],
             'channel_mult': [1, 2, 4, 4], 'transformer_depth_middle': 1, 'use_linear_in_transformer': False,
             'context_dim': 768, 'num_heads': 8, 'transformer_depth_output': [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
             'use_temporal_attention': False, 'use_temporal_resblock': False}
SDXL_UNET = {'use_checkpoint': False, 'image_size': 32, 'out_channels': 4, 'use_spatial_transformer': True,
             'legacy': False, 'num_classes': 'sequential', 'adm_in_channels': 2816, 'in_channels': 4,
             'model_channels': 320, 'num_res_blocks': [2, 2, 2], 'transformer_depth': [0, 0, 2, 2, 10, 10],
             'channel_mult': [1, 2, 4], 'transformer_depth_middle': 10, 'use_linear_in_transformer': True,
             'context_dim': 2048, 'num_head_channels': 64,
             'transformer_depth_output': [0, 0, 0, 2, 2, 2, 10, 10, 10],
             'use_temporal_attention': False, 'use_temporal_resblock': False}
VAE_DDCONFIG = {'double_z': True, 'z_channels': 4, 'resolution': 256, 'in_channels': 3, 'out_ch': 3, 'ch': 128,
                'ch_mult': [1, 2, 4, 4], 'num_res_blocks': 2, 'attn_resolutions': [], 'dropout': 0.0}
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, projection_dim=768, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
              pad_token_id=1, bos_token_id=49406, eos_token_id=49407)
CLIP_G = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, projection_dim=1280, num_hidden_layers=32,
              num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5,
              pad_token_id=1, bos_token_id=49406, eos_token_id=49407)

_ST_DTYPE = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def cache_dir() -> Path:
    d = Path(os.environ.get("PHOTOOPS_BENCH_CACHE") or Path.home() / ".cache" / "photoops-bench")
    d.mkdir(parents=True, exist_ok=True)
    return d


# ----------------------------------------------------------------------------- layouts (meta device)

def _comfy_unet_layout(config: dict):
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    return UNetModel(**config, dtype=torch.float32, device="meta", operations=comfy.ops.disable_weight_init)


def _vae_layout():
    from comfy.ldm.modules.diffusionmodules.model import Decoder, Encoder

    class KL(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = Encoder(**VAE_DDCONFIG)
            self.decoder = Decoder(**VAE_DDCONFIG)
            self.quant_conv = torch.nn.Conv2d(8, 8, 1)
            self.post_quant_conv = torch.nn.Conv2d(4, 4, 1)

    with torch.device("meta"):
        return KL()


def _clip_layout(cfg: dict, projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        cls = CLIPTextModelWithProjection if projection else CLIPTextModel
        m = cls(CLIPTextConfig(**cfg))
    if not hasattr(m, "text_model"):
        # transformers 5's CLIPTextModel is the text transformer itself ("embeddings...", "encoder..."); SD
        # checkpoints and ComfyUI name these weights "text_model.embeddings..."
        wrap = torch.nn.Module()
        wrap.text_model = m
        return wrap
    return m


def _entries(module: torch.nn.Module, prefix: str):
    """(key, shape, init kind, fan_in) for every parameter / persistent buffer, in state_dict order."""
    kinds = {}
    for mname, mod in module.named_modules():
        for pname, p in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
            key = f"{mname}.{pname}" if mname else pname
            if isinstance(mod, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                kind = "one" if pname == "weight" else "zero"
            elif isinstance(mod, torch.nn.Embedding):
                kind = "pos" if "position" in mname else "emb"
            elif isinstance(mod, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
                kind = "uniform"
            elif pname == "position_ids":
                kind = "arange"
            else:
                kind = "uniform"
            w = getattr(mod, "weight", None)
            fan_in = int(math.prod(w.shape[1:])) if w is not None and w.ndim > 1 else int(p.shape[-1]) if p.ndim else 1
            kinds[key] = (tuple(p.shape), kind, fan_in)
    out = []
    for key in module.state_dict():
        if key in kinds:
            shape, kind, fan_in = kinds[key]
            out.append((prefix + key, shape, kind, fan_in))
    return out


def _tensor(seed: int, key: str, shape, kind: str, fan_in: int) -> torch.Tensor:
    if kind == "one":
        return torch.ones(shape)
    if kind == "zero":
        return torch.zeros(shape)
    if kind == "arange":
        return torch.arange(shape[-1]).expand(shape).clone()
    g = torch.Generator().manual_seed((int(seed) * 1_000_003 + zlib.crc32(key.encode())) & 0x7FFFFFFFFFFFFFFF)
    if kind == "emb":
        return torch.randn(shape, generator=g) * 0.02
    if kind == "pos":
        return torch.randn(shape, generator=g) * 0.01
    b = 1.0 / math.sqrt(max(fan_in, 1))
    return (torch.rand(shape, generator=g) * 2 - 1) * b


# ----------------------------------------------------------------------------- streaming writer

def write_safetensors(path: Path, entries, dtype: torch.dtype, seed: int, metadata: dict | None = None) -> int:
    """Write ``entries`` (from :func:`_entries`) as one safetensors file, one tensor in memory at a time."""
    header, off = {}, 0
    for key, shape, kind, _ in entries:
        dt = torch.int64 if kind == "arange" else dtype
        n = int(math.prod(shape)) * torch.empty((), dtype=dt).element_size()
        header[key] = {"dtype": "I64" if dt == torch.int64 else _ST_DTYPE[dt], "shape": list(shape),
                       "data_offsets": [off, off + n]}
        off += n
    if metadata:
        header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    n_params = 0
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for key, shape, kind, fan_in in entries:
            t = _tensor(seed, key, shape, kind, fan_in)
            t = t.to(torch.int64 if kind == "arange" else dtype).contiguous()
            n_params += t.numel()
            f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
            del t
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return n_params


# ----------------------------------------------------------------------------- the fixtures

def _spec(which: str):
    """{file stem: (dtype, [(module, prefix)])} for one fixture set."""
    if which == "sd15":
        return {"sd15_full": (torch.float16, [(lambda: _comfy_unet_layout(SD15_UNET), "model.diffusion_model."),
                                              (lambda: _clip_layout(CLIP_L, False), "cond_stage_model.transformer."),
                                              (_vae_layout, "first_stage_model.")])}
    if which == "ip2p":
        return {"sd15_ip2p_unet": (torch.float16, [(lambda: _comfy_unet_layout({**SD15_UNET, "in_channels": 8}), "")])}
    if which == "sdxl":
        return {"sdxl_unet": (torch.bfloat16, [(lambda: _comfy_unet_layout(SDXL_UNET), "")]),
                "sdxl_clip_l": (torch.bfloat16, [(lambda: _clip_layout(CLIP_L, True), "")]),   # as ComfyUI's clip_l
                "sdxl_clip_g": (torch.bfloat16, [(lambda: _clip_layout(CLIP_G, True), "")]),
                "sdxl_vae": (torch.bfloat16, [(_vae_layout, "")])}
    raise ValueError(which)


def ensure(which: str, seed: int = 0, log=print) -> dict:
    """Paths of the fixture set ``which`` (sd15 | ip2p | sdxl), generating what is missing."""
    d = cache_dir()
    out = {}
    for stem, (dtype, parts) in _spec(which).items():
        tag = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
        path = d / f"{stem}_{tag}_s{seed}_v{GENERATOR_VERSION}.safetensors"
        if not path.is_file():
            t0 = time.time()
            entries = []
            for build, prefix in parts:
                m = build()
                entries += _entries(m, prefix)
                del m
            n = write_safetensors(path, entries, dtype, seed,
                                  {"photoops_fixture": stem, "seed": seed, "generator_version": GENERATOR_VERSION})
            log(f"[fixtures] wrote {path} ({n / 1e6:.0f}M parameters, {path.stat().st_size / 2**30:.2f} GiB, "
                f"{time.time() - t0:.0f} s)")
        out[stem] = path
    return out


if __name__ == "__main__":
    import argparse

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import _common

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--which", nargs="+", default=["sd15", "ip2p", "sdxl"])
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    sys.path.insert(0, str(_common.ROOT / "tests"))
    from comfy_harness import comfyenv

    comfyenv.ensure_comfy_importable()
    for w in a.which:
        print(ensure(w, a.seed))
