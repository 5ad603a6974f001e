"""The random SD1.5-format fixture checkpoint: key mapping, determinism, and (with
$COMFYUI_DIR) that ComfyUI loads it as SD1.5 with no missing/unexpected keys and its
UNet computes exactly what the diffusers UNet computes."""
import pytest
import torch

try:
    from . import comfyenv, fixtures
except ImportError:  # collected as a top-level module
    from comfy_harness import comfyenv, fixtures


@pytest.fixture(scope="module")
def unet0():
    return fixtures.build_diffusers_unet(0)


def test_mapping_is_one_to_one_and_loud_on_unknown_keys(unet0):
    sd = unet0.state_dict()
    ldm = fixtures.diffusers_unet_to_ldm(sd, fixtures.UNET_CONFIG)
    assert len(ldm) == len(sd)
    # shapes survive, every LDM key is of the expected families
    assert sorted(v.shape for v in ldm.values()) == sorted(v.shape for v in sd.values())
    roots = {k.split(".")[0] for k in ldm}
    assert roots == {"input_blocks", "middle_block", "output_blocks", "time_embed", "out"}
    assert ldm["input_blocks.0.0.weight"].shape[0] == 320
    assert ldm["input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"].shape == (320, 768)
    assert ldm["input_blocks.1.1.proj_in.weight"].dim() == 4  # 1x1 conv, not linear
    assert "input_blocks.2.0.op.weight" in ldm and "output_blocks.1.2.conv.weight" in ldm
    with pytest.raises(KeyError):
        fixtures.diffusers_unet_to_ldm({"add_embedding.linear_1.weight": torch.zeros(1)}, fixtures.UNET_CONFIG)


def test_builders_are_seeded(unet0):
    a = unet0.state_dict()
    r = fixtures.build_diffusers_unet(0, weights_dtype=torch.float16).state_dict()
    k = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    # same seed -> same weights (here: rounded through fp16)
    assert torch.equal(r[k], a[k].half().float())
    assert fixtures.params_hash(0) == fixtures.params_hash(0) != fixtures.params_hash(1)


def test_taesd_mapping():
    vae = fixtures.taesd_to_ldm(fixtures.build_taesd(0).state_dict())
    assert "taesd_decoder.1.weight" in vae and vae["taesd_decoder.1.weight"].shape[1] == 4
    assert "taesd_encoder.0.weight" in vae and "vae_scale" in vae


@pytest.fixture(scope="module")
def comfy_loaded():
    reason = comfyenv.comfyui_skip_reason()
    if reason:
        pytest.skip(reason)
    comfyenv.ensure_comfy_importable()
    import comfy.sd

    info = fixtures.cached_sd15_checkpoint(seed=0, dtype=torch.float32)
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(
        info["path"], output_vae=True, output_clip=True, embedding_directory=None)
    return info, model, clip, vae


def _file_keys(path, prefix):
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return {k[len(prefix):] for k in f.keys() if k.startswith(prefix)}


def test_comfy_detects_sd15_and_loads_every_key(comfy_loaded):
    import comfy.model_base
    import comfy.supported_models

    info, model, clip, vae = comfy_loaded
    assert type(model.model.model_config) is comfy.supported_models.SD15
    assert model.model.model_type == comfy.model_base.ModelType.EPS
    unet_keys = set(model.model.diffusion_model.state_dict().keys())
    file_keys = _file_keys(info["path"], fixtures.UNET_PREFIX)
    assert sorted(unet_keys - file_keys) == [], "UNet keys missing from the checkpoint"
    assert sorted(file_keys - unet_keys) == [], "checkpoint UNet keys ComfyUI does not know"

    vae_keys = set(vae.first_stage_model.state_dict().keys())
    assert type(vae.first_stage_model).__name__ == "TAESD"
    assert vae_keys == _file_keys(info["path"], fixtures.VAE_PREFIX)

    clip_keys = set(clip.cond_stage_model.state_dict().keys())
    file_clip = {"clip_l.transformer." + k for k in _file_keys(info["path"], fixtures.CLIP_PREFIX)}
    assert all(k.startswith("clip_l.transformer.text_model.") for k in file_clip)
    # ComfyUI's CLIP-L has logit_scale and text_projection, which SD1 checkpoints lack (it ignores both).
    extra = {k.split("clip_l.")[-1] for k in clip_keys - file_clip}
    assert extra <= {"logit_scale", "transformer.text_projection.weight"}
    assert file_clip <= clip_keys


def test_comfy_unet_matches_diffusers_unet(comfy_loaded):
    info, model, clip, vae = comfy_loaded
    dm = model.model.diffusion_model
    assert next(dm.parameters()).dtype == torch.float32
    unet = fixtures.build_diffusers_unet(info["seed"], weights_dtype=info["dtype"])
    g = torch.Generator().manual_seed(123)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ctx = torch.randn(2, 77, 768, generator=g)
    t = torch.tensor([999.0, 37.0])
    with torch.no_grad():
        ref = unet(x, t, encoder_hidden_states=ctx).sample
        out = dm(x, timesteps=t, context=ctx)
    err = (out - ref).abs().max().item()
    assert err <= 1e-4 * max(1.0, ref.abs().max().item()), f"max abs diff {err}"


def test_comfy_clip_and_vae_run(comfy_loaded):
    info, model, clip, vae = comfy_loaded
    cond = clip.encode_from_tokens(clip.tokenize("a photo of a red circle"))
    assert cond.shape == (1, 77, 768) and torch.isfinite(cond).all()
    img = vae.decode(torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)))
    assert img.shape[-3:] == (64, 64, 3) and torch.isfinite(img).all()
