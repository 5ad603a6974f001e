"""The ComfyUI adapter in-process against a real ComfyUI (skipped without COMFYUI_DIR).

* parity (issue 2, 5d): the same UNet weights through ComfyUI (checkpoint loader, model
  sampling, calc_cond_batch, our attn2 replace) and through diffusers (our processor)
  give the same x0/eps predictions and the same attention maps;
* the input MODEL is never mutated;
* the AttentionCapture/AttentionMask nodes' execute(), and their errors.
"""
import asyncio

import pytest
import torch

from comfy_harness import inprocess

inprocess.require("test_comfy_adapter")

import comfy.sample  # noqa: E402
import comfy.samplers  # noqa: E402
import comfy.sd  # noqa: E402

from comfy_harness import fixtures  # noqa: E402
from photoops.kernels.attention import AttentionHooks, TokenMapRecorder  # noqa: E402
from photoops.kernels.diffusers_adapter import DiffusersDenoiser  # noqa: E402
from photoops.kernels.protocol import UnsupportedModelError  # noqa: E402
from photoops.nodes.comfy.attention import attach_attention_hooks, cross_attention_layers  # noqa: E402
from photoops.nodes.comfy.models import check_latent, ensure_supported, prediction_type, vp_schedule  # noqa: E402
from comfy_harness.probe import ProbeGuider  # noqa: E402
from photoops.nodes.attention_mask import AttentionCaptureNode, AttentionMaskNode  # noqa: E402


@pytest.fixture(scope="module")
def ckpt():
    model, clip, vae, info = inprocess.load_fixture(vae=True)
    return {"model": model, "clip": clip, "vae": vae, "info": info}


def _cond(ctx):
    return [[ctx, {}]]


def _sample(model, positive, negative, latent, seed=0, steps=2, cfg=5.0):
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, steps, cfg, "euler", "normal", positive, negative, latent,
                               disable_pbar=True, seed=seed)


def test_entrypoint_lists_nodes():
    import photoops

    ext = asyncio.run(photoops.comfy_entrypoint())
    ids = [n.define_schema().node_id for n in asyncio.run(ext.get_node_list())]
    assert "PhotoOps_AttentionCapture" in ids and "PhotoOps_AttentionMask" in ids
    for n in asyncio.run(ext.get_node_list()):
        for i in n.define_schema().inputs:
            assert i.tooltip, f"{n.__name__}.{i.id} has no tooltip"


def test_parity_with_diffusers_predictions_and_maps(ckpt):
    model = ckpt["model"]
    ensure_supported(model)
    assert prediction_type(model) == "epsilon"
    torch.manual_seed(0)
    ctx = torch.randn(1, 77, 768)
    latent = torch.randn(2, 4, 16, 16)
    sigma = 3.0
    positions = [3, 4]

    hooks_c = AttentionHooks()
    rec_c = hooks_c.add(TokenMapRecorder(positions, 77, layers="all"))
    patched = attach_attention_hooks(model, hooks_c)
    guider = ProbeGuider(patched, [_cond(ctx)])
    x, x0_c = guider.run(lambda den, x, s: (x.clone(), den.predict_x0(x, s[0], [0])[0]), latent,
                         torch.tensor([sigma, 0.0]))

    unet = fixtures.build_diffusers_unet(seed=0)
    hooks_d = AttentionHooks()
    rec_d = hooks_d.add(TokenMapRecorder(positions, 77, layers="all"))
    den_d = DiffusersDenoiser(unet, vp_schedule(model), hooks=hooks_d)
    x0_d = den_d.predict_x0(x, torch.tensor(sigma), [ctx])[0]

    eps_c, eps_d = (x - x0_c) / sigma, (x - x0_d) / sigma
    err = float(((eps_c - eps_d).abs().max() / eps_d.abs().max()).detach())
    assert err < 1e-4, f"eps relative max error {err}"
    assert rec_c.calls == rec_d.calls > 0
    torch.testing.assert_close(rec_c.result(), rec_d.result(), atol=1e-5, rtol=1e-4)
    rec_c.layers = rec_d.layers = "lowres"
    torch.testing.assert_close(rec_c.result(), rec_d.result(), atol=1e-5, rtol=1e-4)


def _parity(model, unet, latent_shape, sigma, positions, seed=0):
    torch.manual_seed(seed)
    ctx, latent = torch.randn(1, 77, 768), torch.randn(*latent_shape)
    hooks_c, hooks_d = AttentionHooks(), AttentionHooks()
    rec_c = hooks_c.add(TokenMapRecorder(positions, 77, layers="all"))
    rec_d = hooks_d.add(TokenMapRecorder(positions, 77, layers="all"))
    guider = ProbeGuider(attach_attention_hooks(model, hooks_c), [_cond(ctx)])
    x, x0_c = guider.run(lambda den, x, s: (x.clone(), den.predict_x0(x, s[0], [0])[0].detach()), latent,
                         torch.tensor([sigma, 0.0]))
    x0_d = DiffusersDenoiser(unet, vp_schedule(model), hooks=hooks_d).predict_x0(x, torch.tensor(sigma), [ctx])[0]
    return x, x0_c, x0_d, rec_c, rec_d


def test_parity_with_two_transformer_layers_per_block():
    """Blocks of depth > 1 (as in SDXL) are keyed (block, id, index) like ComfyUI does."""
    cfg = dict(fixtures.UNET_CONFIG, transformer_layers_per_block=2, block_out_channels=[320, 320])
    unet = fixtures.build_diffusers_unet(seed=3, config=cfg)
    model = comfy.sd.load_diffusion_model_state_dict(fixtures.diffusers_unet_to_ldm(unet.state_dict(), cfg))
    layers = cross_attention_layers(model)
    assert len(layers) == len([n for n in unet.attn_processors if n.endswith("attn2.processor")])
    assert any(layer.key[2] == 1 for layer in layers)
    x, x0_c, x0_d, rec_c, rec_d = _parity(model, unet, (1, 4, 16, 16), 2.0, [4, 9])
    torch.testing.assert_close(x0_c, x0_d, atol=1e-4, rtol=1e-4)
    assert rec_c.calls == rec_d.calls == len(layers)
    torch.testing.assert_close(rec_c.result(), rec_d.result(), atol=1e-5, rtol=1e-4)


def test_input_model_is_not_mutated(ckpt):
    model = ckpt["model"]
    before_opts = repr(model.model_options)
    torch.manual_seed(1)
    pos, neg = _cond(torch.randn(1, 77, 768)), _cond(torch.zeros(1, 77, 768))
    latent = torch.zeros(1, 4, 8, 8)
    ref = _sample(model, pos, neg, latent)
    hooks = AttentionHooks([TokenMapRecorder([1], 77, layers="all")])
    patched = attach_attention_hooks(model, hooks)
    out_patched = _sample(patched, pos, neg, latent)
    after = _sample(model, pos, neg, latent)
    assert repr(model.model_options) == before_opts
    assert "patches_replace" not in model.model_options.get("transformer_options", {})
    assert torch.equal(ref, after)
    # recording computes probabilities on the side: the sample itself is unchanged
    torch.testing.assert_close(out_patched, ref, atol=1e-5, rtol=1e-5)
    assert hooks.hooks[0].calls > 0


def test_attention_nodes_end_to_end(ckpt):
    model, clip = ckpt["model"], ckpt["clip"]
    prompt = "a photo of a (red:1.2) circle on grass"
    tokens = clip.tokenize(prompt)
    pos = clip.encode_from_tokens_scheduled(tokens)
    neg = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    patched, capture = AttentionCaptureNode.execute(model, clip, prompt, "red circle", "all", 0.0, 1.0).result
    assert capture.positions == [5, 6]   # BOS a photo of a red circle: real SD1 tokenizer
    latent = torch.zeros(2, 4, 8, 8)
    with pytest.raises(RuntimeError, match="nothing was recorded"):
        AttentionMaskNode.execute(capture, {"samples": latent}, "quantile", 0.8, 0.5, "image")
    out = _sample(patched, pos, neg, latent, steps=3)
    mask, heat = AttentionMaskNode.execute(capture, {"samples": out}, "quantile", 0.75, 0.0, "image").result
    assert mask.shape == (2, 64, 64) and heat.shape == (2, 64, 64, 3)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    frac = mask.flatten(1).mean(1)
    assert torch.all((frac - 0.25).abs() < 0.1)
    mask_l, _ = AttentionMaskNode.execute(capture, {"samples": out}, "threshold", 0.2, 0.5, "latent",
                                          image=torch.rand(2, 64, 64, 3)).result
    assert mask_l.shape == (2, 8, 8)
    # a second run with the same patched model starts from a fresh recording
    calls = capture.recorder.calls
    _sample(patched, pos, neg, latent, steps=3)
    assert capture.recorder.calls == calls
    # wrong latent size for this recording
    with pytest.raises(ValueError, match="recorded while sampling"):
        AttentionMaskNode.execute(capture, {"samples": torch.zeros(2, 4, 16, 16)}, "quantile", 0.8, 0.5, "image")


def test_bad_inputs(ckpt):
    model, clip = ckpt["model"], ckpt["clip"]
    with pytest.raises(ValueError, match="'dog' is not in the prompt; its tokens are: .*'circle'"):
        AttentionCaptureNode.execute(model, clip, "a red circle", "dog", "lowres", 0.0, 1.0)
    with pytest.raises(ValueError, match="empty"):
        AttentionCaptureNode.execute(model, clip, "a red circle", "  ", "lowres", 0.0, 1.0)
    with pytest.raises(ValueError, match="end_percent"):
        AttentionCaptureNode.execute(model, clip, "a red circle", "red", "lowres", 0.5, 0.5)
    with pytest.raises(ValueError, match="expects \\[batch, 4"):
        check_latent(model, torch.zeros(1, 16, 8, 8))


def test_unsupported_family_is_refused(ckpt):
    """A non-UNet diffusion model (here: a stand-in object) gets a clear error, not a crash."""
    import comfy.model_patcher

    class FakeDiT(torch.nn.Module):
        pass

    m = ckpt["model"].clone()
    real = m.get_model_object

    def get_model_object(name):
        return FakeDiT() if name == "diffusion_model" else real(name)

    m.get_model_object = get_model_object
    assert isinstance(m, comfy.model_patcher.ModelPatcher)
    with pytest.raises(UnsupportedModelError, match=r"supports SD1.x, SD2.x and SDXL .*\(FakeDiT\)"):
        AttentionCaptureNode.execute(m, ckpt["clip"], "a red circle", "red", "lowres", 0.0, 1.0)


def _with_sampling(model, *bases):

    cls = type("PhotoOpsTestSampling", bases, {})
    m = model.clone()
    m.add_object_patch("model_sampling", cls(model.model.model_config))
    return m


def test_v_prediction_parity(ckpt):
    """The same UNet read as a v-prediction model (what SD2.x-v checkpoints are)."""
    import comfy.model_sampling as ms

    vmodel = _with_sampling(ckpt["model"], ms.ModelSamplingDiscrete, ms.V_PREDICTION)
    ensure_supported(vmodel)
    assert prediction_type(vmodel) == "v_prediction"
    torch.manual_seed(5)
    ctx, latent, sigma = torch.randn(1, 77, 768), torch.randn(1, 4, 8, 8), 1.7
    x, x0_c = ProbeGuider(vmodel, [_cond(ctx)]).run(
        lambda den, x, s: (x.clone(), den.predict_x0(x, s[0], [0])[0]), latent, torch.tensor([sigma, 0.0]))
    den = DiffusersDenoiser(fixtures.build_diffusers_unet(seed=0), vp_schedule(vmodel), prediction_type="v_prediction")
    x0_d = den.predict_x0(x, torch.tensor(sigma), [ctx])[0]
    torch.testing.assert_close(x0_c.detach(), x0_d, atol=1e-4, rtol=1e-4)


def test_flow_and_edm_sampling_are_refused(ckpt):
    import comfy.model_sampling as ms

    for bases in ((ms.ModelSamplingDiscreteFlow, ms.CONST), (ms.ModelSamplingContinuousEDM, ms.EDM)):
        m = _with_sampling(ckpt["model"], *bases)
        with pytest.raises(UnsupportedModelError, match="discrete eps- and v-prediction"):
            ensure_supported(m)


def test_capture_says_so_when_the_sampled_prompt_is_not_its_prompt(ckpt, caplog):
    """The capture locates the word in its own prompt text; a sampler fed another prompt is detected
    on the first model call (the context the UNet sees is compared with the prompt's encoding)."""
    model, clip = ckpt["model"], ckpt["clip"]
    enc = lambda t: clip.encode_from_tokens_scheduled(clip.tokenize(t))  # noqa: E731
    neg = enc("")
    patched, capture = AttentionCaptureNode.execute(model, clip, "a photo of a red circle", "circle", "lowres",
                                                    0.0, 1.0).result
    latent = torch.zeros(1, 4, 8, 8)
    with caplog.at_level("WARNING", logger="photoops.attention"):
        _sample(patched, enc("a photo of a red circle"), neg, latent, steps=2)
        assert capture.watch.mismatch is None
        assert not [r for r in caplog.records if "Attention Capture" in r.getMessage()]
        _sample(patched, enc("a photo of a blue square"), neg, latent, steps=2)
    assert "differs from the prompt's encoding" in capture.watch.mismatch
    warned = [r.getMessage() for r in caplog.records if "Attention Capture" in r.getMessage()]
    assert len(warned) == 1 and "'a photo of a red circle'" in warned[0]     # once per run, naming the prompt
    # a longer conditioning (a second 77-token chunk) is reported by its token count
    _sample(patched, enc("a photo of a red circle " + "and a square " * 30), neg, latent, steps=2)
    assert "154 tokens" in capture.watch.mismatch


def test_capture_validates_its_widgets_before_the_queue_runs():
    assert AttentionCaptureNode.validate_inputs(start_percent=0.0, end_percent=1.0, word="cat") is True
    assert "greater than start_percent" in AttentionCaptureNode.validate_inputs(start_percent=0.5, end_percent=0.5)
    assert "empty" in AttentionCaptureNode.validate_inputs(word="  ")
    assert AttentionCaptureNode.validate_inputs() is True          # linked inputs arrive as None
