"""pOps nodes inside a real ComfyUI, in-process (skipped with the reason when COMFYUI_DIR is unset).

Uses the tiny fixtures of ``comfy_harness/pops_fixtures.py``: a 1280-wide operator, a
1280-projection CLIP vision tower (core ClipVisionModel + core CLIPVisionEncode) and a
UNet that ComfyUI detects as an SDXL-family model.
"""
import pytest
import torch
from comfy_harness import inprocess

inprocess.require("test_comfy_pops")

import comfy.model_management
import comfy.sd
import folder_paths
from comfy_harness.pops_fixtures import cached_pops_fixtures
from comfy_harness.stub_nodes.clip_vision_any import load_clip_vision_any
from photoops.kernels import pops as kp
from photoops.kernels import pops_weights as pw
from photoops.nodes.comfy.files import register_model_folder
from photoops.nodes.comfy.models import load_on_device
from photoops.nodes.comfy.pops import make_clip_vision_output
from photoops.nodes import pops as npops
from tiny import one_thread  # noqa: F401

import nodes as core_nodes


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    files = cached_pops_fixtures()
    register_model_folder(npops.FOLDER, npops.FOLDER)
    folder_paths.add_model_folder_path(npops.FOLDER, str(files["pops"][0].parent))
    folder_paths.add_model_folder_path("clip_vision", str(files["clip_vision"][0].parent))
    op = npops.PopsOperatorLoaderNode.execute(files["pops"][0].name, npops.IN_FILE, "auto").result[0]
    cv = load_clip_vision_any(str(files["clip_vision"][0]))
    g = torch.Generator().manual_seed(0)
    img_a = torch.rand(1, 64, 64, 3, generator=g)
    img_b = torch.rand(1, 48, 80, 3, generator=g)
    enc = core_nodes.CLIPVisionEncode()
    a = enc.encode(cv, img_a, "center")[0]
    b = enc.encode(cv, img_b, "center")[0]
    return {"files": files, "op": op, "cv": cv, "a": a, "b": b}


@pytest.fixture(scope="module")
def sd15():
    """(model, clip, info) of the SD1.5-format fixture checkpoint, loaded once."""
    model, clip, _, info = inprocess.load_fixture()
    return model, clip, info


def _apply(env, a=None, b=None, **kw):
    args = {"steps": 6, "guidance": -1.0, "seed": 42, "drop_a": False, "drop_b": False}
    args.update(kw)
    return npops.OperatorApplyNode.execute(env["op"], a if a is not None else env["a"], input_b=b, **args).result


def test_loader_and_operator_apply_equal_the_kernel(env):
    op = env["op"]
    assert op.name == "texturing" and op.default_guidance == 8.0 and op.config.embedding_dim == 1280
    assert env["a"].image_embeds.shape == (1, 1280)
    cvo, pos, neg = _apply(env, b=env["b"])
    assert cvo.image_embeds.shape == (1, 1280) and cvo.last_hidden_state is None
    assert torch.equal(pos, cvo.image_embeds) and torch.equal(neg, torch.zeros_like(pos))
    # the node is exactly the kernel sampler with the operator's default guidance (texturing: 8)
    A = kp.normalize(env["a"].image_embeds, op.mean, op.std)
    B = kp.normalize(env["b"].image_embeds, op.mean, op.std)
    H, Hn, M = kp.build_condition([A, B])
    prior = load_on_device(op.patcher)
    want = kp.sample(prior, H, M, op.mean, op.std, steps=6, guidance=8.0, seed=42, H_neg=Hn)
    torch.testing.assert_close(cvo.image_embeds.float().cpu(), want.cpu(), rtol=0, atol=0)
    # the prior is managed by ComfyUI's model management
    assert any(lm.model is op.patcher for lm in comfy.model_management.current_loaded_models)
    # chaining: the output is a valid input, and B unconnected = dropped B (zero token, mask kept)
    out2 = _apply(env, a=cvo, b=env["a"])[0]
    assert out2.image_embeds.shape == (1, 1280) and not torch.equal(out2.image_embeds, cvo.image_embeds)
    dropped = _apply(env, b=env["b"], drop_b=True)[0].image_embeds
    unconnected = _apply(env)[0].image_embeds
    torch.testing.assert_close(dropped, unconnected, rtol=0, atol=0)
    assert not torch.equal(dropped, cvo.image_embeds)


def test_released_layout_through_the_loader_node(env, tmp_path):
    """A .pth in the released layout (no stats) + a statistics file, listed from models/pops."""
    src = pw.load_operator(str(env["files"]["pops"][0]))
    d = tmp_path / "union"
    d.mkdir()
    torch.save({k: v.float() for k, v in src.state_dict.items()}, d / "learned_prior.pth")
    from safetensors.torch import save_file

    save_file({"clip_mean": src.mean[None], "clip_std": src.std[None]}, tmp_path / "kandinsky_stats.safetensors")
    folder_paths.add_model_folder_path(npops.FOLDER, str(tmp_path))
    listed = folder_paths.get_filename_list(npops.FOLDER)
    assert "union/learned_prior.pth" in listed and "kandinsky_stats.safetensors" in listed
    with pytest.raises(pw.PopsFileError, match="no clip_mean/clip_std"):
        npops.PopsOperatorLoaderNode.execute("union/learned_prior.pth", npops.IN_FILE, "fp32")
    op = npops.PopsOperatorLoaderNode.execute("union/learned_prior.pth", "kandinsky_stats.safetensors",
                                              "fp32").result[0]
    assert op.name == "union" and op.default_guidance == 8.0 and op.dtype == torch.float32
    # fp16 stored weights vs the fp32 copy: same network up to rounding of the embedding inputs
    o1 = npops.OperatorApplyNode.execute(op, env["a"], input_b=env["b"], steps=4, guidance=1.0, seed=1,
                                         drop_a=False, drop_b=False).result[0].image_embeds
    o2 = npops.OperatorApplyNode.execute(env["op"], env["a"], input_b=env["b"], steps=4, guidance=1.0, seed=1,
                                         drop_a=False, drop_b=False).result[0].image_embeds
    torch.testing.assert_close(o1.float(), o2.float(), rtol=1e-3, atol=1e-3)


def test_bad_inputs(env):
    vit_h = make_clip_vision_output(torch.randn(1, 1024))
    with pytest.raises(kp.EmbeddingWidthError, match=r"1024-d.*1280-d"):
        _apply(env, a=vit_h)
    with pytest.raises(kp.EmbeddingWidthError, match=r"input_b is a 1024-d"):
        _apply(env, b=vit_h)
    with pytest.raises(ValueError, match="batch sizes"):
        _apply(env, a=make_clip_vision_output(torch.randn(2, 1280)),
               b=make_clip_vision_output(torch.randn(3, 1280)))
    batched = _apply(env, a=make_clip_vision_output(torch.randn(3, 1280)), b=env["b"])[0]
    assert batched.image_embeds.shape == (3, 1280)


def test_interrupt_stops_the_sampler(env):
    comfy.model_management.interrupt_current_processing(True)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            _apply(env, b=env["b"], steps=20)
    finally:
        comfy.model_management.interrupt_current_processing(False)


def test_revision_conditioning_feeds_sdxl_pooled_input(env):
    unet = comfy.sd.load_diffusion_model(str(env["files"]["diffusion_models"][0]))
    assert type(unet.model).__name__ == "SDXL" and type(unet.model.model_config).__name__ == "KOALA_700M"
    cvo = _apply(env, b=env["b"])[0]
    pos, neg = npops.PopsRevisionConditioningNode.execute(unet, cvo, 1.0, 0.0).result
    assert pos[0][0].shape == (1, 77, 2048)
    y = unet.model.encode_adm(device="cpu", width=64, height=64, seed=0, **pos[0][1])
    assert y.shape == (1, 2816)
    e = cvo.image_embeds.float()
    # noise augmentation 0 = the embedding itself up to the unCLIP augmentor's level-0 noise
    assert torch.nn.functional.cosine_similarity(y[:, :1280], e).item() > 0.999
    y_neg = unet.model.encode_adm(device="cpu", width=64, height=64, **neg[0][1])
    assert y_neg[:, :1280].abs().max() == 0
    # sampling runs and the image embedding changes the result
    lat = {"samples": torch.zeros(1, 4, 8, 8)}
    s1 = core_nodes.common_ksampler(unet, 0, 2, 4.0, "euler", "normal", pos, neg, lat)[0]["samples"]
    other = npops.PopsRevisionConditioningNode.execute(unet, env["a"], 1.0, 0.0).result[0]
    s2 = core_nodes.common_ksampler(unet, 0, 2, 4.0, "euler", "normal", other, neg, lat)[0]["samples"]
    assert torch.isfinite(s1).all() and not torch.allclose(s1, s2)


def test_revision_conditioning_refuses_sd15(env, sd15):
    model = sd15[0]
    from photoops.kernels.protocol import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match="SDXL"):
        npops.PopsRevisionConditioningNode.execute(model, env["a"], 1.0, 0.0)


def test_mean_baseline(env):
    op = env["op"]
    cvo, emb = npops.PopsMeanNode.execute(op, env["a"], env["b"], 0.5).result
    za = kp.normalize(env["a"].image_embeds, op.mean, op.std)
    zb = kp.normalize(env["b"].image_embeds, op.mean, op.std)
    torch.testing.assert_close(kp.normalize(cvo.image_embeds, op.mean, op.std), (za + zb) / 2, rtol=1e-5, atol=1e-5)
    assert torch.equal(emb, cvo.image_embeds)
    torch.testing.assert_close(npops.PopsMeanNode.execute(op, env["a"], env["b"], 0.0).result[0].image_embeds,
                               env["a"].image_embeds.float(), rtol=1e-5, atol=1e-5)


def test_pops_text_is_the_last_layer_after_final_layernorm(env, sd15):
    """pOps Text = last_hidden_state (not the penultimate layer) of the real tokens; checked against
    transformers' CLIPTextModel with the fixture checkpoint's (fp16-stored) text-encoder weights."""
    from comfy_harness import fixtures

    _, clip, info = sd15
    got = npops.PopsTextNode.execute(clip, "shiny").result[0]
    ids = [t[0] for t in clip.tokenize("shiny")["l"][0]]
    n = ids.index(49407) + 1
    assert got.shape == (1, n, 768) and n >= 3
    hf = fixtures.build_clip_text_model(info["seed"]).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(p.half().float())
        out = hf(torch.tensor([ids]), output_hidden_states=True)
    want, penult = out.last_hidden_state[:, :n], out.hidden_states[-2][:, :n]
    scale = want.abs().max()
    assert (got - want).abs().max() < 2e-2 * scale
    assert (got - penult).abs().max() > 0.1 * scale
    # causal attention: the padding after EOS does not matter
    assert torch.equal(got, npops.PopsTextNode.execute(clip, "shiny ").result[0])


def test_instruct_operator_takes_text_tokens(env, sd15, tmp_path):
    from safetensors.torch import save_file

    clip = sd15[1]
    cfg = kp.PriorConfig(num_attention_heads=1, attention_head_dim=64, num_layers=1, embedding_dim=768)
    torch.manual_seed(0)
    m = kp.OperatorPrior(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.1)
    (tmp_path / "instruct").mkdir()
    torch.save(m.state_dict(), tmp_path / "instruct" / "learned_prior.pth")
    save_file({"clip_mean": torch.zeros(1, 768), "clip_std": torch.ones(1, 768)}, tmp_path / "stats768.safetensors")
    folder_paths.add_model_folder_path(npops.FOLDER, str(tmp_path))
    op = npops.PopsOperatorLoaderNode.execute("instruct/learned_prior.pth", "stats768.safetensors", "fp32").result[0]
    assert op.name == "instruct" and op.default_guidance == 1.0
    a = make_clip_vision_output(torch.randn(1, 768))
    shiny = npops.PopsTextNode.execute(clip, "shiny").result[0]
    aged = npops.PopsTextNode.execute(clip, "aged").result[0]
    run = lambda t, **kw: npops.OperatorApplyNode.execute(op, a, steps=4, guidance=-1.0, seed=0, drop_a=False,
                                                          drop_b=False, text=t, **kw).result[0].image_embeds
    o1 = run(shiny)
    assert o1.shape == (1, 768) and not torch.equal(o1, run(aged))
    with pytest.raises(ValueError, match="pOps Text"):
        run(None)
    with pytest.raises(ValueError, match="not both"):
        run(shiny, input_b=a)
    with pytest.raises(kp.EmbeddingWidthError, match="text is a 1280-d"):
        run(torch.randn(1, 3, 1280))
