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

**Files for the shipped SD3.5 / Flux workflows** (issue 19 item 6; the override table maps the
user's files to these, ``tests/test_comfy_flow_workflows.py`` runs the workflows):

* ``photoops_tiny_clip_l.safetensors``, ``photoops_tiny_clip_g.safetensors``,
  ``photoops_tiny_t5xxl.safetensors`` — the three text encoders, keys as in the real
  ``clip_l`` / ``clip_g`` / ``t5xxl_fp16`` files, fp16.  ComfyUI builds its text encoders from
  fixed full-size configs (``sd1_clip_config.json``, ``clip_config_bigg.json``,
  ``t5_config_xxl.json``: T5-XXL alone is 4.7 B parameters), so no stock loader *node* can load a
  small file; its encoder classes take per-encoder config overrides,
  ``model_options["<clip_l|clip_g|t5xxl>_model_config"]`` (``comfy/sd1_clip.py`` l.106).  Each
  file names its encoder and carries the overrides (:data:`TE_MODEL_OPTIONS`) in its metadata; the
  test stub ``PhotoOpsTest_FlowTextEncoders`` (``comfy_harness/flow_stub_nodes``) builds
  ComfyUI's own ``sd3_clip`` (TripleCLIPLoader's recipe) / ``flux_clip`` (DualCLIPLoader type flux)
  with them in a core ``comfy.sd.CLIP`` (:func:`load_tiny_text_encoders`; T5 prompts padded to
  :data:`T5_MIN_LENGTH` = 16 tokens through core's ``t5xxl_min_length`` option, for speed), so tokenizers
  (ComfyUI's local ``sd1_tokenizer`` / ``t5_tokenizer`` folders, nothing downloaded), encoding,
  padding and pooling are ComfyUI's.  Widths that reach the DiTs are the real ones: CLIP-L 768
  (its pooled output is Flux's ``vec_in_dim`` and the first 768 of SD3's pooled 2048), CLIP-G 1280
  (the other 1280), T5 ``d_model`` 4096 (the context width of SD3 and Flux) with the full
  32128-token vocabulary.  Depth and MLPs are cut: CLIP-L / CLIP-G 3 layers (SD3 reads the
  penultimate) with a 64-wide MLP, T5 2 blocks of 2 heads x 8 with a 16-wide gated MLP.  What
  that costs: core's key-based routing (``SD3ClipModel.load_sd`` takes a file with
  ``layers.30`` for CLIP-G; ``detect_te_model`` wants T5 block 23) does not recognise these
  depths, so the stub routes each file by its metadata; a CLIP-G deep enough for core's routing
  would be 32 layers of 1280 (273 M parameters), a detectable T5 24 blocks (7 s per prompt on a
  CI CPU).  265 M parameters in all, most of them the three token embeddings (527 MB fp16).
* ``photoops_tiny_vae16.safetensors`` — a 16-channel VAE for core ``VAELoader`` in the TAESD
  layout (``taesd_encoder.*`` / ``taesd_decoder.*``, ``latent_channels`` read from the file: core
  builds ``TAESD(latent_channels=16)``, as for its own ``taesd3`` / ``taef1``), 2.4 M parameters.
  Core reads only ``z_channels`` from an ``ae.safetensors``-layout file and fixes the rest
  (``ch 128, ch_mult [1,2,4,4]``: 84 M parameters, ~10 s per encode + decode at 64 px on a CI CPU).
* ``photoops_tiny_sd35.safetensors`` — a single-file checkpoint like ``sd3.5_medium.safetensors``:
  the tiny SD3 above under ``model.diffusion_model.`` plus that VAE under ``first_stage_model.``,
  no text encoders; core ``CheckpointLoaderSimple`` detects SD3 and the 16-channel VAE.

Public API::

    cached_flow_fixture(kind, cache_dir=None) -> Path          # kind: "sd3" | "flux"
    cached_workflow_fixtures(cache_dir=None) -> {model folder: [Path]}   # everything the workflows name
    load_tiny_text_encoders(paths, clip_type, embedding_directory=None) -> comfy.sd.CLIP
    state_dict_shapes(kind, schnell=False) -> {key: meta tensor}
    SD3_CONFIG, FLUX_CONFIG, TE_MODEL_OPTIONS
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


# ---------------------------------------------------------------- text encoders, 16-channel VAE, SD3.5 checkpoint
TE_VERSION = 1
TE_SEED = 20
CLIP_L_NAME = "photoops_tiny_clip_l.safetensors"
CLIP_G_NAME = "photoops_tiny_clip_g.safetensors"
T5_NAME = "photoops_tiny_t5xxl.safetensors"
VAE16_NAME = "photoops_tiny_vae16.safetensors"
SD35_NAME = "photoops_tiny_sd35.safetensors"

#: ComfyUI's per-encoder config overrides (merged into its full-size configs, comfy/sd1_clip.py l.106)
TE_MODEL_OPTIONS = {"clip_l_model_config": {"num_hidden_layers": 3, "intermediate_size": 64},
                    "clip_g_model_config": {"num_hidden_layers": 3, "intermediate_size": 64},
                    "t5xxl_model_config": {"num_layers": 2, "d_ff": 16, "d_kv": 8, "num_heads": 2}}
META_OPTIONS, META_ENCODER = "photoops_model_options", "photoops_encoder"
#: T5 prompts padded to this many tokens (core pads to 256 for Flux, 77 for SD3) through core's own
#: tokenizer option ``t5xxl_min_length`` (``comfy/sd1_clip.py`` l.533): the tiny Flux's double block costs
#: ~0.35 GFLOP per token, so CI's prompts are 16 tokens, not 256
T5_MIN_LENGTH = 16


def _te_hash() -> str:
    blob = json.dumps({"v": TE_VERSION, "seed": TE_SEED, "te": TE_MODEL_OPTIONS, "vae": "taesd16",
                       "sd3": _hash("sd3"), "torch": torch.__version__.split("+")[0]}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def te_state_dict_shapes(which: str) -> dict:
    """Keys and shapes (meta tensors) of ComfyUI's own ``clip_l`` / ``clip_g`` / ``t5xxl`` encoder with
    :data:`TE_MODEL_OPTIONS` -- what its ``load_sd`` expects from a file."""
    import comfy.sd1_clip
    import comfy.sdxl_clip
    import comfy.text_encoders.sd3_clip

    opts = dict(TE_MODEL_OPTIONS)
    with torch.device("meta"):
        if which == "clip_l":
            m = comfy.sd1_clip.SDClipModel(device="meta", dtype=torch.float16, model_options=opts)
        elif which == "clip_g":
            m = comfy.sdxl_clip.SDXLClipG(device="meta", dtype=torch.float16, model_options=opts)
        elif which == "t5xxl":
            m = comfy.text_encoders.sd3_clip.T5XXLModel(device="meta", dtype=torch.float16, model_options=opts)
        else:
            raise ValueError(f"unknown text encoder {which!r}")
    return dict(m.transformer.state_dict())


def vae16_state_dict_shapes() -> dict:
    """Keys and shapes of core's 16-channel TAESD (what core ``VAE`` builds for ``taesd_decoder.*`` files)."""
    from comfy.taesd.taesd import TAESD

    with torch.device("meta"):
        m = TAESD(latent_channels=16)
    return dict(m.state_dict())


def _randomize(shapes: dict, gen: torch.Generator, dtype) -> dict:
    """The module's law (matrices N(0,1)/sqrt(fan_in), norm scales 1 + 0.1 N, the rest 0.02 N), sorted keys."""
    out = {}
    for k, v in sorted(shapes.items()):
        t = torch.randn(v.shape, generator=gen, dtype=torch.float32)
        if v.ndim >= 2:
            t.mul_(1.0 / v[0].numel() ** 0.5)
        elif v.ndim == 1 and ("norm" in k or ".ln_" in k) and k.endswith(("scale", "weight")):
            t.mul_(0.1).add_(1.0)
        else:
            t.mul_(0.02)
        out[k] = t.to(dtype).contiguous()
    return out


def cached_workflow_fixtures(cache_dir=None) -> dict:
    """{model folder: [Path]} of every fixture the shipped SD3.5 / Flux workflows need (generated on first use)."""
    from .fixtures import default_cache_dir
    from .pops_fixtures import _save  # the harness' one atomic fixture write

    folder = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / f"flow-te-{_te_hash()}"
    files = {"text_encoders": [folder / CLIP_L_NAME, folder / CLIP_G_NAME, folder / T5_NAME],
             "vae": [folder / VAE16_NAME], "checkpoints": [folder / SD35_NAME]}
    if not all(p.is_file() for ps in files.values() for p in ps):
        gen = torch.Generator().manual_seed(TE_SEED)
        meta = {META_OPTIONS: json.dumps(TE_MODEL_OPTIONS, sort_keys=True),
                "photoops_fixture": json.dumps({"seed": TE_SEED, "version": TE_VERSION})}
        for which, name in (("clip_l", CLIP_L_NAME), ("clip_g", CLIP_G_NAME), ("t5xxl", T5_NAME)):
            sd = _randomize(te_state_dict_shapes(which), gen, torch.float16)
            if not (folder / name).is_file():
                _save(sd, folder / name, {**meta, META_ENCODER: which})
        vae = _randomize(vae16_state_dict_shapes(), gen, torch.float32)
        vae["vae_scale"], vae["vae_shift"] = torch.tensor(1.0), torch.tensor(0.0)   # core's TAESD defaults
        if not (folder / VAE16_NAME).is_file():
            _save(vae, folder / VAE16_NAME, {"photoops_fixture": meta["photoops_fixture"]})
        if not (folder / SD35_NAME).is_file():
            ckpt = {"model.diffusion_model." + k: v for k, v in random_state_dict("sd3").items()}
            ckpt.update({"first_stage_model." + k: v for k, v in vae.items()})
            _save(ckpt, folder / SD35_NAME, {"photoops_fixture": meta["photoops_fixture"]})
    files["diffusion_models"] = [cached_flow_fixture("flux", cache_dir)]
    return files


def load_tiny_text_encoders(paths, clip_type: str, embedding_directory=None):
    """A core ``comfy.sd.CLIP`` of the tiny encoder files ``paths``, built with the recipe core's loader picks
    for TripleCLIPLoader (``clip_type`` "sd3": CLIP-L + CLIP-G + T5, ``sd3_clip``) / DualCLIPLoader type
    flux (CLIP-L + T5, ``flux_clip``) (``comfy/sd.py`` l.1078-1127: ``t5xxl_detect``, ``CLIP(...)``, one
    ``load_sd`` per file) and the config overrides the files carry as ``model_options``.  Each file goes
    to the encoder its metadata names (see the module doc: core's key-based routing does not recognise
    the cut depths).  ``comfy.sd.load_clip`` itself is not used: its long-CLIP probe
    (``model_options_long_clip``) would replace the CLIP config overrides with
    ``{"max_position_embeddings": 77}``."""
    from types import SimpleNamespace

    import comfy.sd
    import comfy.text_encoders.flux
    import comfy.text_encoders.sd3_clip
    import comfy.utils
    from safetensors import safe_open

    opts, data = {}, {}
    for p in paths:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
        which = meta.get(META_ENCODER)
        if which not in ("clip_l", "clip_g", "t5xxl") or which in data:
            raise ValueError(f"{p}: not one tiny clip_l / clip_g / t5xxl file of comfy_harness.flow_fixtures "
                             f"(encoder {which!r})")
        for k, v in json.loads(meta.get(META_OPTIONS, "{}")).items():
            opts[k] = {**opts.get(k, {}), **v}
        data[which] = comfy.utils.load_torch_file(str(p), safe_load=True)
    want = {"sd3": {"clip_l", "clip_g", "t5xxl"}, "flux": {"clip_l", "t5xxl"}}[clip_type]
    if set(data) != want:
        raise ValueError(f"{clip_type} text encoders are {sorted(want)}; got {sorted(data)}")
    t5 = comfy.sd.t5xxl_detect([data["t5xxl"]])
    if clip_type == "flux":
        target = SimpleNamespace(params={}, tokenizer=comfy.text_encoders.flux.FluxTokenizer,
                                 clip=comfy.text_encoders.flux.flux_clip(**t5))
    else:
        target = SimpleNamespace(params={}, tokenizer=comfy.text_encoders.sd3_clip.SD3Tokenizer,
                                 clip=comfy.text_encoders.sd3_clip.sd3_clip(**t5))
    clip = comfy.sd.CLIP(target, embedding_directory=embedding_directory,
                         parameters=sum(comfy.utils.calculate_parameters(sd) for sd in data.values()),
                         model_options=opts)
    for which, sd in data.items():
        missing, _ = getattr(clip.cond_stage_model, which).load_sd(sd)
        if missing:
            raise ValueError(f"tiny {which} weights do not fit ComfyUI's encoder: missing {list(missing)[:3]}")
    clip.set_tokenizer_option("t5xxl_min_length", T5_MIN_LENGTH)
    return clip
