"""Concept Learn on SDXL, SD2.x's text side and v-prediction models, through ComfyUI in-process.

SDXL: the tiny SDXL-family UNet of ``comfy_harness/pops_fixtures.py`` (detected as KOALA_700M:
context 2048, ADM 2816) with a small SDXL CLIP built from ComfyUI's own ``SDXLClipModel`` /
``SDXLTokenizer`` classes (``comfy_harness/tiny_clip.py``: real widths 768 + 1280, real
vocabulary and tokenizers, 3 layers).  Random weights: these tests check the SDXL plumbing
(two-encoder splicing, pooled output and ADM, the ``clip_l``/``clip_g`` file read back through
ComfyUI's tokenizers, frozen weights), not learning quality.
Skipped (with the reason printed) when COMFYUI_DIR is unset.
"""
import os

import pytest
import torch
from comfy_harness import inprocess

inprocess.require("test_comfy_concept_learn_sdxl")

import comfy.samplers
import comfy.sd
import comfy.utils
from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete
from comfy_harness.pops_fixtures import cached_pops_fixtures
from comfy_harness.tiny_clip import tiny_sd1_clip, tiny_sd2_clip, tiny_sdxl_clip
from photoops.kernels.attention import AttentionHooks
from photoops.nodes.comfy.attention import attach_attention_hooks
from photoops.nodes.comfy.concepts import ComfyConceptText, read_concept_embedding, save_concept_embedding
from photoops.nodes.comfy.models import normal_weight_copies
from comfy_harness.probe import lookup_embedding
from photoops.nodes.comfy.training import ComfyGradDenoiser
from photoops.nodes import concept_learn as ncl
from safetensors.torch import load_file
from tiny import one_thread  # noqa: F401


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    files = cached_pops_fixtures()
    with torch.inference_mode():        # as the executor loads models
        unet = comfy.sd.load_diffusion_model(str(files["diffusion_models"][0]))
        vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(files["vae"][0])))
    assert type(unet.model).__name__ == "SDXL" and unet.model.adm_channels == 2816
    clip = tiny_sdxl_clip()
    images = torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    with inprocess.private_embeddings_output(tmp_path_factory.mktemp("output")) as emb_dir:
        yield {"model": unet, "clip": clip, "vae": vae, "dir": emb_dir, "images": images}


def _run(env, names, words, model=None, clip=None, steps=2, **kw):
    args = {"steps": steps, "learning_rate": 2e-2, "em_rounds": 1, "seed": 0, "resolution": 64, "save_every": 0}
    args.update(kw)
    return ncl.ConceptLearnNode.execute(model or env["model"], clip or env["clip"], env["vae"], env["images"],
                                        names, words, **args)


def _bits(module) -> dict:
    return {k: v.detach().clone().reshape(-1).view(torch.uint8) for k, v in module.state_dict().items()}


def test_sdxl_splicing_a_word_equals_prompting_it_in_both_encoders(env):
    clip = env["clip"]
    text = ComfyConceptText(clip)
    assert text.widths == [768, 1280] and text.width == 2048
    vec = torch.stack([text.init_vector("dog"), text.init_vector("cat")])[:, None]
    emb_l = clip.cond_stage_model.clip_l.transformer.get_input_embeddings().weight
    emb_g = clip.cond_stage_model.clip_g.transformer.get_input_embeddings().weight
    dog = clip.tokenize("dog")["l"][0][1][0]
    assert torch.equal(vec[0, 0, :768], emb_l[dog].float()) and torch.equal(vec[0, 0, 768:], emb_g[dog].float())
    with torch.no_grad():
        got, pos = text.encode(["a photo of", 0, "and", 1], vec)
        ref, pooled = clip.encode_from_tokens(clip.tokenize("a photo of dog and cat"), return_pooled=True)
    assert pos == {0: [4], 1: [6]}
    assert got["c_crossattn"].shape == (1, 77, 2048) and got["pooled_output"].shape == (1, 1280)
    assert torch.allclose(got["c_crossattn"], ref, atol=1e-5)
    assert torch.allclose(got["pooled_output"], pooled, atol=1e-5)
    with pytest.raises(ValueError, match="2048"):
        text.encode(["a", 0], torch.zeros(1, 1, 768))


def test_sdxl_denoiser_builds_the_adm_vector_as_comfyui_sampling_does(env):
    """Our x0 equals the model's output on the conds ComfyUI's sampler builds (``encode_model_conds``)."""
    text = ComfyConceptText(env["clip"])
    vec = text.init_vector("dog")[None, None].clone().requires_grad_(True)
    patched = attach_attention_hooks(env["model"], AttentionHooks())
    den = ComfyGradDenoiser(patched)
    den.load()
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([2.0, 0.5])
    with normal_weight_copies(patched.model.diffusion_model, *text.subs):
        cond, _ = text.encode(["a photo of", 0], vec)
        x0 = den.predict_x0_grad(x, sigma, cond)
        (x0 ** 2).mean().backward()
    g = vec.grad[0, 0]
    assert g[:768].abs().sum() > 0 and g[768:].abs().sum() > 0          # both encoders get gradients
    conds = comfy.samplers.encode_model_conds(
        patched.model.extra_conds,
        [{"cross_attn": cond["c_crossattn"].detach(), "pooled_output": cond["pooled_output"].detach(),
          "model_conds": {}}], x, torch.device("cpu"), "positive")
    y = conds[0]["model_conds"]["y"].cond
    assert y.shape == (1, 2816)
    with torch.no_grad():
        ref = patched.model.apply_model(x, sigma, c_crossattn=cond["c_crossattn"].detach().expand(2, -1, -1),
                                        y=y.expand(2, -1))
    assert torch.allclose(x0.detach(), ref.float(), atol=1e-5)


def test_sdxl_learn_saves_clip_l_clip_g_that_comfyui_prompts_load(env):
    model, clip = env["model"], env["clip"]
    unet0, te0 = _bits(model.model.diffusion_model), _bits(clip.cond_stage_model)
    opts0 = repr(model.model_options)
    out = _run(env, "cl_xa, cl_xb", "dog, room", unassigned_label=False)
    clip_out, masks, _prev, _hint, loss = out.result
    assert clip_out is clip and masks.shape == (4, 64, 64) and len(loss["loss"]) == 2
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    for k, v in _bits(model.model.diffusion_model).items():
        assert torch.equal(v, unet0[k]), k
    for k, v in _bits(clip.cond_stage_model).items():
        assert torch.equal(v, te0[k]), k
    assert repr(model.model_options) == opts0
    path = os.path.join(env["dir"], "cl_xa.safetensors")
    raw = load_file(path)
    assert sorted(raw) == ["clip_g", "clip_l"]
    assert raw["clip_l"].shape == (1, 768) and raw["clip_g"].shape == (1, 1280)
    assert raw["clip_l"].dtype == raw["clip_g"].dtype == torch.float32
    vec, meta = read_concept_embedding(path)
    assert torch.equal(vec, torch.cat([raw["clip_l"], raw["clip_g"]], -1)) and meta["width"] == "2048"
    text = ComfyConceptText(clip)
    assert not torch.allclose(vec[0], text.init_vector("dog"))               # it learned something
    # ComfyUI's SDXL tokenizers find the file by name, each with its own key
    assert torch.equal(lookup_embedding("cl_xa", 768, "clip_l").float().reshape(1, 768), raw["clip_l"])
    assert torch.equal(lookup_embedding("cl_xa", 1280, "clip_g").float().reshape(1, 1280), raw["clip_g"])
    toks_l, toks_g = clip.tokenizer.clip_l, clip.tokenizer.clip_g
    old = toks_l.embedding_directory, toks_g.embedding_directory
    toks_l.embedding_directory = toks_g.embedding_directory = [env["dir"]]
    try:
        toks = clip.tokenize("a photo of embedding:cl_xa")
    finally:
        toks_l.embedding_directory, toks_g.embedding_directory = old
    for key, ref in (("l", raw["clip_l"]), ("g", raw["clip_g"])):
        items = [it[0] for it in toks[key][0]]
        at = [i for i, t in enumerate(items) if isinstance(t, torch.Tensor)]
        assert at == [4], key
        assert torch.equal(items[4].float(), ref[0]), key
    with torch.no_grad():
        c_emb, p_emb = clip.encode_from_tokens(toks, return_pooled=True)
        c_init, p_init = clip.encode_from_tokens(clip.tokenize("a photo of dog"), return_pooled=True)
        spliced, _ = text.encode(["a photo of", 0], vec[None])
    assert not torch.allclose(c_emb, c_init, atol=1e-4) and not torch.allclose(p_emb, p_init, atol=1e-4)
    assert torch.allclose(c_emb, spliced["c_crossattn"], atol=1e-5)       # what training saw
    assert torch.allclose(p_emb, spliced["pooled_output"], atol=1e-5)
    # resume reads the two-key checkpoint back as one 2048-wide vector
    vecs, step = ncl.ConceptLearnNode._resume("cl_xa.safetensors", ["cl_xa"], 2048, 1)
    assert step == 2 and torch.equal(vecs[0], vec)


def test_clip_that_does_not_fit_the_model_is_refused_before_any_work(env):
    with pytest.raises(ValueError, match="768-wide conditioning but the model reads 2048"):
        _run(env, "cl_bad", "dog", clip=tiny_sd1_clip())
    assert not os.path.exists(os.path.join(env["dir"], "cl_bad.safetensors"))
    assert not os.path.exists(os.path.join(env["dir"], "conceptlearn", "cl_bad-interrupted-1.safetensors"))


def test_v_prediction_model_trains_in_v_space(env, monkeypatch):
    """SDXL declared v-prediction (core ModelSamplingDiscrete): the loss compares the UNet's raw output (v)."""
    from photoops.kernels import concept_learn as kcl

    (vmodel,) = ModelSamplingDiscrete().patch(env["model"], "v_prediction", False)
    assert ComfyGradDenoiser(vmodel).prediction_type == "v_prediction"
    raw, checked = [], []
    handle = env["model"].model.diffusion_model.register_forward_hook(lambda m, a, o: raw.append(o.detach().float()))
    real = kcl.prediction_and_target

    def spy(x, x0, z, eps, sigma, prediction_type="epsilon"):
        pred, target = real(x, x0, z, eps, sigma, prediction_type)
        assert prediction_type == "v_prediction"
        # the kernel's v recovered from ComfyUI's x0 is the UNet's own output
        assert torch.allclose(pred.detach(), raw[-1], atol=1e-4), (pred.detach() - raw[-1]).abs().max()
        checked.append(1)
        return pred, target

    monkeypatch.setattr(kcl, "prediction_and_target", spy)
    opts0 = repr(env["model"].model_options)
    try:
        out = _run(env, "cl_v", "dog", model=vmodel, steps=1)
    finally:
        handle.remove()
    assert len(out.result[4]["loss"]) == 1 and torch.isfinite(torch.tensor(out.result[4]["loss"])).all()
    assert checked, "the v-prediction path was not used"
    assert repr(env["model"].model_options) == opts0
    assert os.path.exists(os.path.join(env["dir"], "cl_v.safetensors"))


def test_sd2_text_side_splices_and_its_file_loads_through_the_sd2_tokenizer(env, tmp_path):
    """SD2.x (OpenCLIP-H, 1024 wide, pads with 0): one ``emb_params`` file ComfyUI's SD2 tokenizer reads."""
    clip = tiny_sd2_clip(embedding_directory=[str(tmp_path)])
    text = ComfyConceptText(clip)
    assert text.width == 1024 and [p.file_key for p in text.parts] == ["emb_params"]
    vec = torch.stack([text.init_vector("dog")])[:, None]
    with torch.no_grad():
        got, pos = text.encode(["a photo of", 0], vec)
        ref = clip.encode_from_tokens(clip.tokenize("a photo of dog"))
    assert pos == {0: [4]} and torch.allclose(got, ref, atol=1e-5)
    learned = vec[0] + 0.05 * torch.randn(1, 1024, generator=torch.Generator().manual_seed(3))
    save_concept_embedding(str(tmp_path / "cl_h.safetensors"), text.file_tensors(learned), {"concept": "cl_h"})
    assert list(load_file(str(tmp_path / "cl_h.safetensors"))) == ["emb_params"]
    toks = clip.tokenize("a photo of embedding:cl_h")
    items = [it[0] for it in toks["h"][0]]
    assert [i for i, t in enumerate(items) if isinstance(t, torch.Tensor)] == [4]
    assert torch.equal(items[4].float(), learned[0])
    with torch.no_grad():
        spliced, _ = text.encode(["a photo of", 0], learned[None])
        assert torch.allclose(clip.encode_from_tokens(toks), spliced, atol=1e-5)
