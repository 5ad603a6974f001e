"""Joint-attention capture on SD3 and Flux through a real ComfyUI in-process (issue 19 item 3, spec §3, R11/R12).

The tiny SD3 (2 joint blocks) and Flux-dev (1 double block) files of ``comfy_harness/flow_fixtures.py``;
conditioning is random tensors of the text encoders' shapes, so the "word" is a set of text positions
the test chooses.  The test captures q / k itself (wrapping the ``optimized_attention`` name the DiT
calls, upstream of the override) and recomputes the map with an explicit float64 softmax.
Tolerances: maps 1e-6 absolute (float32 scores, measured ~1e-7); capture on/off bit-identical.
"""
import math

import pytest
import torch
from comfy_harness import inprocess

inprocess.require("test_comfy_flow_attention")

import comfy.samplers
from comfy_harness import flow_fixtures as ff
from photoops.kernels.joint_attention import JointTokenMapRecorder
from photoops.kernels.protocol import LayerInfo, UnsupportedModelError
from photoops.nodes.comfy import flow_attention as fa


@pytest.fixture(scope="module")
def sd3():
    return ff.load_flow_model("sd3")


@pytest.fixture(scope="module")
def flux():
    return ff.load_flow_model("flux")


def _sample(model, pos, neg, cfg, steps=2, seed=7):
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(1, 16, 8, 8, generator=g)
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(pos, neg)
    guider.set_cfg(cfg)
    sig = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", steps).cpu()
    noise = torch.randn(1, 16, 8, 8, generator=g)
    return guider.sample(noise, latent, comfy.samplers.ksampler("euler"), sig, disable_pbar=True, seed=seed)


class QKSpy:
    """Wraps the ``optimized_attention`` a DiT module calls; keeps (q, k, heads, skip_reshape, cond_or_uncond)."""

    def __init__(self, monkeypatch, module):
        self.calls, orig = [], module.optimized_attention

        def spy(q, k, v, heads, *a, **kw):
            to = kw.get("transformer_options") or {}
            self.calls.append((q.detach().clone(), k.detach().clone(), heads, kw.get("skip_reshape", False),
                               list(to.get("cond_or_uncond", [0]))))
            return orig(q, k, v, heads, *a, **kw)

        monkeypatch.setattr(module, "optimized_attention", spy)


def _explicit_map(q, k, heads, skip, txt_len, cols):
    """softmax(q k^T / sqrt(d)) over all keys (float64), image rows, summed over cols, mean over heads."""
    if not skip:
        b, L, c = q.shape
        q = q.reshape(b, L, heads, c // heads).transpose(1, 2)
        k = k.reshape(b, L, heads, c // heads).transpose(1, 2)
    p = torch.softmax(q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    return p[:, :, txt_len:, cols].sum(-1).mean(1)


@pytest.mark.parametrize("cond_index", [0, 1])
def test_sd3_capture_is_exact_and_does_not_change_sampling(sd3, monkeypatch, cond_index):
    from comfy.ldm.modules.diffusionmodules import mmdit

    pos, neg = ff.sd3_conditioning(1, tokens=8), ff.sd3_conditioning(2, tokens=8)
    plain = _sample(sd3, pos, neg, cfg=3.0)
    cols = [1, 2, 5]
    rec = JointTokenMapRecorder(cols, cond_index=cond_index, layer_range=(0, 1))    # joint block 0 only
    every = JointTokenMapRecorder(cols, cond_index=cond_index)                         # both joint blocks
    before = repr(sd3.model_options)
    patched = fa.attach_joint_capture(sd3, [rec, every])
    assert repr(sd3.model_options) == before                                          # input MODEL untouched
    spy = QKSpy(monkeypatch, mmdit)
    captured = _sample(patched, pos, neg, cfg=3.0)
    assert torch.equal(captured, plain)                                              # R12: bit-identical
    assert len(spy.calls) == 2 * 2 and rec.calls == 2 and every.calls == 4           # 2 steps x 2 blocks
    assert rec.latent_hw == (8, 8) and rec.result().shape == (1, 4, 4) and rec.state_numel() == 16
    ref = []
    for q, k, heads, skip, cou in spy.calls[0::2]:                                   # block 0 of each step
        row = cou.index(cond_index)
        ref.append(_explicit_map(q[row:row + 1], k[row:row + 1], heads, skip, 8, cols))
    ref = torch.stack(ref).mean(0).reshape(1, 4, 4)
    got = rec.result()
    assert float((got.double() - ref).abs().max()) < 1e-6
    assert float(got.min()) > 0 and float(got.max()) < 1
    assert float((every.result() - got).abs().max()) > 1e-4                          # block 1 differs
    # every text key: more mass than three of them, less than one (image keys share the normaliser)
    text = JointTokenMapRecorder(list(range(8)), cond_index=cond_index, layer_range=(0, 1))
    _sample(fa.attach_joint_capture(sd3, [text]), pos, neg, cfg=3.0)
    assert bool((text.result() > got).all()) and float(text.result().max()) < 1


def test_flux_capture_is_exact_and_does_not_change_sampling(flux, monkeypatch):
    import comfy.ldm.flux.math as fmath

    pos, neg = ff.flux_conditioning(1, tokens=8), ff.flux_conditioning(2, tokens=8)
    plain = _sample(flux, pos, neg, cfg=1.0, steps=2)
    cols = [0, 4]
    rec = JointTokenMapRecorder(cols, layers=("double", "single"))
    spy = QKSpy(monkeypatch, fmath)
    captured = _sample(fa.attach_joint_capture(flux, [rec]), pos, neg, cfg=1.0, steps=2)
    assert torch.equal(captured, plain)
    assert len(spy.calls) == 2 and rec.calls == 2 and rec.result().shape == (1, 4, 4)
    ref = torch.stack([_explicit_map(q, k, h, s, 8, cols) for q, k, h, s, _ in spy.calls]).mean(0).reshape(1, 4, 4)
    assert spy.calls[0][3] is True                                                   # Flux: [B, H, L, d] layout
    assert float((rec.result().double() - ref).abs().max()) < 1e-6


def test_previous_override_and_replace_patches_are_chained(sd3):
    pos, neg = ff.sd3_conditioning(1), ff.sd3_conditioning(2)
    plain = _sample(sd3, pos, neg, cfg=3.0)
    seen = {"override": 0, "replace": 0}

    def other_override(func, *args, **kwargs):
        seen["override"] += 1
        return func(*args, **kwargs)

    def other_replace(args, extra):
        seen["replace"] += 1
        assert fa.LAYER_KEY in args["transformer_options"]                     # our tag reaches their patch
        return extra["original_block"](args)

    base = sd3.clone()
    base.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = other_override
    base.set_model_patch_replace(other_replace, "dit", "double_block", 1)
    rec = JointTokenMapRecorder([3])
    out = _sample(fa.attach_joint_capture(base, [rec]), pos, neg, cfg=3.0)
    assert torch.equal(out, plain) and rec.calls == 4
    assert seen == {"override": 4, "replace": 2}


def test_untagged_or_image_only_calls_are_not_recorded():
    """SD3.5's second, image-only attention call has L = L_img: the tag's total does not match, nothing is recorded."""
    rec = JointTokenMapRecorder([0])
    cap = fa.JointCapture([rec])
    cap.latent_hw = (8, 8)
    q = torch.randn(1, 16, 8)
    layer = LayerInfo(("double_block", 0), "double", 0)
    out = cap.override(lambda *a, **k: "attn", q, q, q, 2, transformer_options={fa.LAYER_KEY: (layer, 8, 24)})
    assert out == "attn" and rec.calls == 0
    cap.override(lambda *a, **k: None, q, q, q, 2, transformer_options={})
    assert rec.calls == 0


def test_joint_layers_refuse_vp_models(sd3):
    import comfy.model_sampling as cms

    vp = sd3.clone()              # the same model with SD1.5's eps sampling: a VP model
    vp.add_object_patch("model_sampling", type("VP", (cms.ModelSamplingDiscrete, cms.EPS), {})(None))
    with pytest.raises(UnsupportedModelError, match="rectified-flow DiTs .* this model is SD3"):
        fa.joint_layers(vp)
    assert [(l.key, l.place) for l in fa.joint_layers(sd3)] == [(("double_block", 0), "double"),
                                                                (("double_block", 1), "double")]


class TokenizerClip:
    """A CLIP stand-in with ComfyUI's own SD3 / Flux tokenizers and no encoder (the test builds the context)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def tokenize(self, text):
        return self.tokenizer.tokenize_with_weights(text)


def test_attention_capture_and_mask_nodes_on_flux_and_sd3(flux, sd3):
    from comfy.text_encoders.flux import FluxTokenizer
    from comfy.text_encoders.sd3_clip import SD3Tokenizer
    from photoops.nodes import attention_mask as nam

    prompt = "a photo of a cat"
    where = fa.flow_word_positions(TokenizerClip(FluxTokenizer()), prompt, "cat")
    assert where == {"positions": [6], "optional_positions": [], "prompt_len": 256}     # T5: _ a _photo _of _ a _cat
    sd3_where = fa.flow_word_positions(TokenizerClip(SD3Tokenizer()), prompt, "cat")
    assert sd3_where["positions"] == [5] and sd3_where["optional_positions"] == [77 + 6]  # CLIP (BOS first), T5
    rec = fa.make_recorder(sd3_where)
    assert rec.columns(77) == [5] and rec.columns(77 + 7) == [5, 83]                  # T5 part only when present

    for model, clip, cond in ((flux, TokenizerClip(FluxTokenizer()), ff.flux_conditioning(3, tokens=8)),
                              (sd3, TokenizerClip(SD3Tokenizer()), ff.sd3_conditioning(3, tokens=84))):
        patched, capture = nam.AttentionCaptureNode.execute(model, clip, prompt, "cat", "all", 0.0, 1.0).result
        out = _sample(patched, cond, cond, cfg=1.0, steps=2)      # (a short context: the columns only need < L_txt)
        assert capture.recorder.calls == 2 * len(fa.joint_layers(model))                   # steps x blocks
        mask, heat = nam.AttentionMaskNode.execute(capture, {"samples": out}, "quantile", 0.75, 0.0, "latent").result
        assert mask.shape == (1, 8, 8) and heat.shape == (1, 64, 64, 3)
        # 4 of the 16 tokens kept, each token 2x2 latent pixels (nearest upsampling of the token grid)
        assert int(mask.sum()) == 16 and torch.equal(mask[0, ::2, ::2].repeat_interleave(2, 0).repeat_interleave(2, 1),
                                                     mask[0])


# ----------------------------------------------------------------------------- refusals (spec §5, R16)

def _refusals(model):
    from photoops.nodes import concept_learn as ncl
    from photoops.nodes import instructbrush as nib
    from photoops.nodes import inversion as ninv
    from photoops.nodes import prompt_to_prompt as nptp

    fam = type(model.model.model_config).__name__
    pos = ff.flux_conditioning(1) if fam == "Flux" else ff.sd3_conditioning(1)
    lat = {"samples": torch.zeros(1, 16, 8, 8)}
    sig = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", 3).cpu()
    flow = f"this model is {fam}, a rectified-flow model"
    with pytest.raises(UnsupportedModelError, match=f"Eta Inversion is defined for VP \\(DDIM\\) schedules; {flow}: "
                                                    f"use Invert method 'flow_noise_maps'"):
        ninv.InvertNode.execute(model, pos, pos, lat, sig, "eta", 0, 1.0, 0)
    const = ninv.EtaScheduleNode.execute("constant", 0.5, "", 1.0).result[0]
    with pytest.raises(ValueError, match=f"Eta Schedules \\(Eta Inversion, defined for VP / DDIM schedules\\) do not "
                                         f"apply to the flow_noise_maps method of this rectified-flow model \\({fam}\\)"):
        ninv.InvertNode.execute(model, pos, pos, lat, sig, "flow_noise_maps", 0, 1.0, 0, eta_schedule=const)
    family = f"{flow} \\(SD3 / SD3.5 / Flux family\\)"
    with pytest.raises(UnsupportedModelError, match=f"Concept Learn .* UNet cross-attention .*; {family}: on Flux a "
                                                    f"learned CLIP embedding would barely act .* train a LoRA"):
        ncl.ConceptLearnNode.execute(model, None, None, None, "cat", "cat", 10, 1e-3, 1, 0, 512)
    with pytest.raises(UnsupportedModelError, match=f"Instruction Learn \\(InstructBrush\\) .* InstructPix2Pix .*; "
                                                    f"{family}: .* use the FlowEdit Guider"):
        nib.InstructionLearnNode.execute(model, None, None, None, None, "make it winter", "w", 10, 1e-4, 0, 1, 1,
                                         False, 0, False)
    with pytest.raises(UnsupportedModelError, match=f"Instruction Apply \\(InstructBrush\\) .*; {family}: .*FlowEdit"):
        nib.InstructionApplyNode.execute(model, None, None, 1.0)
    with pytest.raises(UnsupportedModelError, match=f"Prompt-to-Prompt Guide edits UNet cross-attention maps .*; "
                                                    f"{family}: .* FlowEdit Guider"):
        nptp.PromptToPromptGuideNode.execute(model, None, "a cat", "a dog", pos, 7.0, "replace", 0.8, 0.4)


def test_methods_without_a_flow_form_refuse_sd3(sd3):
    _refusals(sd3)


def test_methods_without_a_flow_form_refuse_flux(flux):
    _refusals(flux)
