"""PhotoOps combined with other packs' patches inside a real ComfyUI (in-process).  Issue: interop matrix.

Every combination must run to completion AND PhotoOps' part must still act:

* Attention Capture: the recorder saw calls and its map has nonzero values;
* Semantic Guide: a concept changes the result (vs. the same run with the concepts at scale 0);
* Instruction Apply: the learned instruction changes the result (vs. strength 0);
* exactness: with the other patch at weight 0, an inversion replays the photo (relative error < 1e-4,
  as ``test_comfy_semantic_guide.py`` / ``test_comfy_inversion.py`` measure it), or, where nothing is
  inverted (Instruction Apply), the combination equals our node alone.

The other patch must act too (weight > 0 changes the result), so a combination in which one side
silently drops the other fails.  ComfyUI_IPAdapter_plus is driven in-process (``IPAdapterEmbeds`` with
seeded stand-in image embeddings; no CLIP vision model) on the tiny SD1.5 IP-Adapter of
``comfy_harness/interop_fixtures.py``.  "before" = IPAdapter patches the MODEL and our node gets the
patched MODEL; "after" = our node's output MODEL goes into IPAdapter.

Skipped (reason printed) when COMFYUI_DIR is unset; the IPAdapter tests also when the pack is not in
``$COMFYUI_DIR/custom_nodes``.  The README's "Interop matrix" lists every combination tested here.
"""
import pytest
import torch

from comfy_harness import inprocess

inprocess.require("test_comfy_interop")

import comfy.controlnet  # noqa: E402
import comfy.samplers  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.utils  # noqa: E402

from comfy_harness import comfyenv, interop_fixtures as ix  # noqa: E402
from comfy_harness.ipadapter_fixtures import pack_skip_reason  # noqa: E402
from photoops.nodes import inversion as ninv  # noqa: E402
from photoops.nodes import semantic_guide as nsg  # noqa: E402
from photoops.nodes.attention_mask import AttentionCaptureNode  # noqa: E402
from tiny import one_thread  # noqa: E402,F401

PROMPT = "a photo of a red circle"
IPA_REASON = pack_skip_reason(comfyenv.comfyui_dir())
needs_ipadapter = pytest.mark.skipif(IPA_REASON is not None, reason=str(IPA_REASON))

# Pack bugs these tests found, now fixed (README, Interop matrix): PhotoOpsAttn2Replace had no __deepcopy__
# (a node cloning our MODEL afterwards got a copy of our hooks, so our recorders stayed empty); SD1.x blocks
# were keyed (block, id, index) only, so IPAdapter_plus (keys (block, id)) never found our replace to add to;
# the Semantic Guide ignored the MODEL's sampler_cfg_function (PerpNeg was silently dropped).
ORDERS = ["before", "after"]


@pytest.fixture(scope="module")
def env():
    model, clip, _, info = inprocess.load_fixture()
    enc = lambda t: clip.encode_from_tokens_scheduled(clip.tokenize(t))  # noqa: E731
    g = torch.Generator().manual_seed(0)
    return {"model": model, "clip": clip, "info": info, "src": enc(PROMPT), "neg": enc(""),
            "latent": torch.randn(1, 4, 8, 8, generator=g) * 5.0}


@pytest.fixture(scope="module")
def ipa():
    if IPA_REASON is not None:
        pytest.skip(IPA_REASON)
    plus = ix.load_ipadapter_plus(comfyenv.comfyui_dir())
    import photoops_interop_ipadapter_plus.utils as ipa_utils

    weights = ipa_utils.ipadapter_model_loader(str(ix.cached_ipadapter_sd15()))
    embeds = ix.image_embeds()

    def apply(model, weight):
        """IPAdapterEmbeds (the node's own method: it clones the MODEL) with our embeddings and zero
        negative embeddings, weight type linear, whole schedule."""
        return plus.IPAdapterEmbeds().apply_ipadapter(model, weights, embeds, weight, "linear", 0.0, 1.0,
                                                      neg_embed=torch.zeros_like(embeds))[0]

    return apply


# ----------------------------------------------------------------------------- helpers

def _sigmas(model, steps=8):
    return comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", steps).cpu()


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _invert(model, positive, negative, latent, method="ddpm", cfg=1.0):
    return ninv.InvertNode.execute(model, positive, negative, {"samples": latent}, _sigmas(model), method, 0, cfg,
                                   0).result[0]


def _replay(guider, inv, latent):
    sampler = ninv.InversionSamplerNode.execute(inv).result[0]
    steps = inv.steps + int(bool(inv.info.get("final_zero_dropped")))      # the user's SIGMAS end with 0
    return guider.sample(torch.zeros_like(latent), latent, sampler, _sigmas(guider.model_patcher, steps),
                         disable_pbar=True, seed=0)


def _cfg_sample(model, positive, negative, latent_shape, cfg=3.0, steps=4, seed=0):
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    noise = torch.randn(latent_shape, generator=torch.Generator().manual_seed(seed))
    return guider.sample(noise, torch.zeros(latent_shape), comfy.samplers.sampler_object("euler"),
                         _sigmas(model, steps), disable_pbar=True, seed=seed)


def _concepts(env, scale_a=7.0, scale_b=5.0):
    """Two chained concepts: add "blue circle", remove "red"."""
    def one(text, scale, **kw):
        args = dict(direction="add", scale=scale, threshold=0.9, warmup=0, cooldown=-1, weight=1.0)
        args.update(kw)
        return nsg.EditConceptNode.execute(env["clip"], text, **args).result[0]

    return one("blue circle", scale_a, previous=one("red", scale_b, direction="remove"))


def _capture_map_ok(capture):
    rec = capture.recorder
    m = rec.result()
    return rec.calls > 0 and m is not None and bool(torch.isfinite(m).all()) and float(m.abs().max()) > 0


# ----------------------------------------------------------------------------- 1. IPAdapter_plus

@needs_ipadapter
@pytest.mark.parametrize("order", ORDERS)
def test_ipadapter_with_attention_capture(env, ipa, order):
    """IPAdapter_plus x Attention Capture (word "circle", layers all).

    before: IPAdapterEmbeds(MODEL) -> Attention Capture -> sampler (the capture wraps the adapter's
    attn2 replace); after: Attention Capture -> IPAdapterEmbeds -> sampler (the adapter adds its callback
    to the capture's replace through ``.add``).  Checks: the capture records (calls > 0, nonzero map) in
    the combination; the adapter still acts (weight 1 vs 0 differ) and the capture leaves the adapter's
    sample unchanged; with the adapter at weight 0 an inversion through the combined MODEL replays the
    photo (< 1e-4) while the capture records."""
    model, lat = env["model"], env["latent"]

    def combo(weight):
        if order == "before":
            return AttentionCaptureNode.execute(ipa(model, weight), env["clip"], PROMPT, "circle", "all", 0.0,
                                                1.0).result
        patched, cap = AttentionCaptureNode.execute(model, env["clip"], PROMPT, "circle", "all", 0.0, 1.0).result
        return ipa(patched, weight), cap

    m1, cap1 = combo(1.0)
    out1 = _cfg_sample(m1, env["src"], env["neg"], lat.shape)
    assert torch.isfinite(out1).all()
    assert _capture_map_ok(cap1)
    m0, cap0 = combo(0.0)
    out0 = _cfg_sample(m0, env["src"], env["neg"], lat.shape)
    assert _rel(out1, out0) > 1e-3, "the IP-Adapter did not act in the combination"
    # the capture only records: the combination samples what the adapter alone samples
    assert _rel(out1, _cfg_sample(ipa(model, 1.0), env["src"], env["neg"], lat.shape)) < 1e-5
    # weight 0: exact reconstruction through the combined MODEL, with the capture recording the replay
    inv = _invert(m0, env["src"], env["neg"], lat, cfg=2.0)
    guider = comfy.samplers.CFGGuider(m0)
    guider.set_conds(env["src"], env["neg"])
    guider.set_cfg(2.0)
    assert _rel(_replay(guider, inv, lat), lat) < 1e-4
    assert _capture_map_ok(cap0)


@needs_ipadapter
@pytest.mark.parametrize("mode, order", [("sega", "before"), ("sega", "after"), ("ledits++", "before"),
                                         ("ledits++", "after")])
def test_ipadapter_with_semantic_guide(env, ipa, mode, order):
    """IPAdapter_plus x Semantic Guide with 2 concepts ("blue circle" add, "red" remove).

    sega: LEDITS (Invert ddpm) with the target CFG on (rows positive, negative, 2 concepts);
    ledits++: LEDITS++ (Invert dpmpp_2m_sde) without target (rows negative, 2 concepts: 3 rows).
    before: IPAdapterEmbeds(MODEL) -> Semantic Guide (in ledits++ the guide's attention replace wraps the
    adapter's).  after: Semantic Guide has no MODEL output, so the adapter is applied to the MODEL the
    guider samples with (``guider.model_patcher``, which in ledits++ carries the guide's attn2 replace):
    the adapter comes after our patch, as a pack patching that MODEL would.
    Inverted once through the MODEL with the adapter at weight 0.  Checks: weight 0 + concepts at scale 0
    replays the photo (< 1e-4); weight 1 moves the replay (the adapter acts); with weight 1 the concepts
    change the result vs. scale 0 (in ledits++ through the recorded concept attention maps)."""
    model, lat = env["model"], env["latent"]
    use_target = mode == "sega"
    method = "ddpm" if mode == "sega" else "dpmpp_2m_sde"
    pos, neg, cfg = (env["src"], env["neg"], 2.0) if use_target else (env["neg"], env["neg"], 1.0)

    def guide(weight, concepts):
        base = ipa(model, weight) if order == "before" else model
        guider, recorders = nsg.build_guider(base, pos, neg, concepts, cfg, mode, 0.3, 0.6, use_target)
        if order == "after":
            guider.model_patcher = ipa(guider.model_patcher, weight)
            guider.model_options = guider.model_patcher.model_options
        return guider, recorders

    inv = _invert(ipa(model, 0.0), pos, neg, lat, method=method, cfg=cfg)
    still = _concepts(env, 0.0, 0.0)
    recon = _replay(guide(0.0, still)[0], inv, lat)
    assert _rel(recon, lat) < 1e-4
    moved = _replay(guide(1.0, still)[0], inv, lat)
    assert torch.isfinite(moved).all()
    assert _rel(moved, lat) > 1e-3, "the IP-Adapter did not act in the combination"
    guider, recorders = guide(1.0, _concepts(env))
    edited = _replay(guider, inv, lat)
    assert torch.isfinite(edited).all()
    assert _rel(edited, moved) > 1e-3, "the concepts did not act in the combination"
    if mode == "ledits++":
        assert len(recorders) == 2        # masks from recorded concept attention (reset after every step)


@pytest.fixture(scope="module")
def ip2p():
    from comfy_harness.ip2p_fixtures import cached_ip2p_checkpoint
    from photoops.kernels import instructbrush as ib
    from photoops.nodes import instructbrush as nib
    from photoops.nodes.comfy.attention import attach_attention_hooks
    from photoops.nodes.comfy.text import count_prompt_tokens, encode_text

    with torch.inference_mode():          # as ComfyUI's executor loads it
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(cached_ip2p_checkpoint()["path"],
                                                                    output_vae=True, output_clip=True,
                                                                    embedding_directory=None)
    prompt = "make it blue"
    image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    env = {"model": model, "clip": clip, "vae": vae, "image": image, "empty": encode_text(clip, "")}

    def edit(m, positive, steps=3):
        """InstructPixToPixConditioning -> DualCFGGuider -> SamplerCustomAdvanced (euler), inference mode."""
        from comfy_extras.nodes_custom_sampler import Guider_DualCFG
        from comfy_extras.nodes_ip2p import InstructPixToPixConditioning

        with torch.inference_mode():
            p, n, lat = InstructPixToPixConditioning.execute(positive, env["empty"], image, vae).result
            guider = Guider_DualCFG(m)
            guider.set_conds(p, n, env["empty"])
            guider.set_cfg(7.5, 1.5)
            noise = torch.randn(lat["samples"].shape, generator=torch.Generator().manual_seed(0))
            return guider.sample(noise, lat["samples"], comfy.samplers.sampler_object("euler"),
                                 _sigmas(m, steps), disable_pbar=True, seed=0)

    # a learned-instruction stand-in: the instruction's own K/V (identity), moved by seeded noise
    cap = ib.KVCapture(ib.prompt_positions(count_prompt_tokens(clip, prompt)))
    edit(attach_attention_hooks(model, nib.AttentionHooks([cap])), encode_text(clip, prompt), steps=1)
    inst = ib.LearnedInstruction(prompt, cap.positions, cap.k, cap.v, time_ranges=2)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in inst.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=g).to(p.dtype))
    env.update(edit=edit, inst=inst, apply=nib.InstructionApplyNode.execute)
    return env


@needs_ipadapter
@pytest.mark.parametrize("order", ORDERS)
def test_ipadapter_with_instruction_apply(ip2p, ipa, order):
    """IPAdapter_plus x Instruction Apply on the tiny InstructPix2Pix fixture (DualCFGGuider, 3 rows).

    before: IPAdapterEmbeds(MODEL) -> Instruction Apply (our replace wraps the adapter's); after:
    Instruction Apply -> IPAdapterEmbeds (the adapter adds its callback to our replace).  Checks: with the
    adapter at weight 0 the combination equals Instruction Apply alone (< 1e-4); with weight 1 the adapter
    acts (vs weight 0) and the instruction acts (strength 1 vs 0)."""
    model, clip, inst = ip2p["model"], ip2p["clip"], ip2p["inst"]

    def combo(weight, strength):
        if order == "before":
            patched, pos, _ = ip2p["apply"](ipa(model, weight), clip, inst, strength).result
            return patched, pos
        patched, pos, _ = ip2p["apply"](model, clip, inst, strength).result
        return ipa(patched, weight), pos

    alone_model, pos = ip2p["apply"](model, clip, inst, 1.0).result[:2]
    alone = ip2p["edit"](alone_model, pos)
    m, pos = combo(0.0, 1.0)
    assert _rel(ip2p["edit"](m, pos), alone) < 1e-4
    m, pos = combo(1.0, 1.0)
    both = ip2p["edit"](m, pos)
    assert torch.isfinite(both).all()
    assert _rel(both, alone) > 1e-3, "the IP-Adapter did not act in the combination"
    m, pos = combo(1.0, 0.0)
    assert _rel(both, ip2p["edit"](m, pos)) > 1e-3, "the instruction did not act in the combination"


# ----------------------------------------------------------------------------- 2. core patches + LEDITS

def _sag(env, active, monkeypatch):
    from comfy_extras.nodes_sag import SelfAttentionGuidance

    return SelfAttentionGuidance.execute(env["model"], 0.8 if active else 0.0, 2.0).result[0], env["src"], env["neg"]


def _perpneg(env, active, monkeypatch):
    from comfy_extras.nodes_perpneg import PerpNeg

    # PerpNeg removes from the positive direction the part of the negative's (relative to the empty prompt's)
    # that is perpendicular to it, so the negative must differ from the empty prompt for it to act; at
    # neg_scale 0 it is CFG against the empty prompt (its weight 0)
    if "perp_neg" not in env:
        env["perp_neg"] = env["clip"].encode_from_tokens_scheduled(env["clip"].tokenize("a photo of a green square"))
    m = PerpNeg.execute(env["model"], env["neg"], 1.0 if active else 0.0).result[0]
    return m, env["src"], env["perp_neg"]


def _freeu(env, active, monkeypatch):
    from comfy_extras.nodes_freelunch import FreeU_V2

    # FreeU_V2 keys its scales by channel count (model_channels * 4 and * 2); every block of the tiny
    # UNet is 320 wide, so it would never act.  It is built seeing model_channels 80: its first-stage
    # scales (b1, s1) then land on the fixture's 320-channel output blocks.
    with monkeypatch.context() as mp:
        mp.setitem(env["model"].model.model_config.unet_config, "model_channels", 80)
        b1, b2, s1, s2 = (1.3, 1.4, 0.9, 0.2) if active else (1.0, 1.0, 1.0, 1.0)
        m = FreeU_V2().patch(env["model"], b1, b2, s1, s2)[0]
    return m, env["src"], env["neg"]


def _lora(env, active, monkeypatch):
    path = ix.cached_lora_sd15(env["info"]["path"])
    lora = comfy.utils.load_torch_file(str(path), safe_load=True)
    m, _ = comfy.sd.load_lora_for_models(env["model"], env["clip"], lora, 1.0 if active else 0.0, 0.0)
    # every LoRA target became a weight patch, also at strength 0
    assert len(m.patches) == len(ix.lora_targets(env["info"]["path"]))
    return m, env["src"], env["neg"]


_CN_CALLS = {"n": 0}


def _controlnet(env, active, monkeypatch):
    from nodes import ControlNetApplyAdvanced

    if "cn" not in env:
        env["cn"] = comfy.controlnet.load_controlnet(str(ix.cached_controlnet_sd15(
            env["model"].model.model_config.unet_config)))
        env["cn"].control_model.register_forward_hook(lambda *a: _CN_CALLS.__setitem__("n", _CN_CALLS["n"] + 1))
    hint = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(5))
    # strength 0 in the node returns the conditioning untouched; to run the ControlNet at weight 0 it is
    # applied at strength 1 and its (per-apply) copy is then set to strength 0
    pos, neg = ControlNetApplyAdvanced().apply_controlnet(env["src"], env["neg"], env["cn"], hint, 1.0, 0.0, 1.0)
    if not active:
        for c in {id(t[1]["control"]): t[1]["control"] for t in pos + neg}.values():
            c.strength = 0.0
    return env["model"], pos, neg


PATCHES = {"sag": _sag, "perpneg": _perpneg, "freeu_v2": _freeu, "lora": _lora, "controlnet": _controlnet}


@pytest.mark.parametrize("patch", list(PATCHES))
def test_core_patch_with_ledits(env, patch, monkeypatch):
    """Core patch x Invert (ddpm) + Inversion Sampler + Semantic Guide (sega, target CFG 2, 2 concepts).

    Order: the patch is applied first; the patched MODEL (and, for the ControlNet, the controlled
    positive / negative) go into both Invert and Semantic Guide.  Patches: Self-Attention Guidance (scale
    0.8; weight 0 = scale 0); PerpNeg, the deprecated *model patch* node (neg_scale 1; 0) — PerpNegGuider
    is a GUIDER like Semantic Guide and cannot be combined with it, only the model patch can; FreeU_V2
    (1.3, 1.4, 0.9, 0.2; all 1); a rank-4 LoRA through ``comfy.sd.load_lora_for_models`` (what
    LoraLoader calls; strength 1; 0); a ControlNet through ControlNetApplyAdvanced (strength 1; 0).
    Checks: at weight 0, concepts at scale 0 replay the photo (< 1e-4); at full weight the patch moves
    the replay (it acts) and the concepts change the result vs. scale 0."""
    build = PATCHES[patch]
    lat = env["latent"]
    m0, pos0, neg0 = build(env, False, monkeypatch)
    inv = _invert(m0, pos0, neg0, lat, cfg=2.0)
    still = _concepts(env, 0.0, 0.0)

    def run(m, pos, neg, concepts):
        g = nsg.SemanticGuideNode.execute(m, pos, neg, concepts, "sega", 2.0, True, 0.3, 0.6, "intersect").result[0]
        return _replay(g, inv, lat)

    calls = _CN_CALLS["n"]
    assert _rel(run(m0, pos0, neg0, still), lat) < 1e-4
    if patch == "controlnet":
        assert _CN_CALLS["n"] > calls          # the ControlNet ran (at strength 0)
    m1, pos1, neg1 = build(env, True, monkeypatch)
    moved = run(m1, pos1, neg1, still)
    assert torch.isfinite(moved).all()
    assert _rel(moved, lat) > 1e-3, f"{patch} did not act under Semantic Guide"
    edited = run(m1, pos1, neg1, _concepts(env))
    assert torch.isfinite(edited).all()
    assert _rel(edited, moved) > 1e-3, "the concepts did not act in the combination"
