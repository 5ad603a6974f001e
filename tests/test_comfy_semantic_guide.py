"""SemanticGuide (SEGA / LEDITS / LEDITS++) as a GUIDER in a real ComfyUI, in-process.

Skipped (with the reason printed) when COMFYUI_DIR is unset.
"""
import pytest
import torch

from comfy_harness import inprocess

inprocess.require("test_comfy_semantic_guide")

import comfy.samplers  # noqa: E402

from photoops.nodes import inversion as ninv  # noqa: E402
from photoops.nodes import semantic_guide as nsg  # noqa: E402


@pytest.fixture(scope="module")
def env():
    model, clip, _, _ = inprocess.load_fixture()
    torch.manual_seed(0)
    enc = lambda t: clip.encode_from_tokens_scheduled(clip.tokenize(t))  # noqa: E731
    return {"model": model, "clip": clip, "src": enc("a photo of a red circle"), "neg": enc(""),
            "latent": {"samples": torch.randn(1, 4, 8, 8) * 5.0}}


def _sigmas(model, steps=8):
    return comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", steps).cpu()


def _concept(env, text="blue", scale=5.0, **kw):
    args = dict(direction="add", scale=scale, threshold=0.9, warmup=0, cooldown=-1, weight=1.0)
    args.update(kw)
    return nsg.EditConceptNode.execute(env["clip"], text, **args).result[0]


def _run(env, guider, inv):
    sampler = ninv.InversionSamplerNode.execute(inv).result[0]
    lat = env["latent"]["samples"]
    steps = inv.steps + int(bool(inv.info.get("final_zero_dropped")))     # the user's SIGMAS end with 0
    return guider.sample(torch.zeros_like(lat), lat, sampler, _sigmas(env["model"], steps), disable_pbar=True, seed=0)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_zero_scale_is_plain_cfg_and_reconstructs(env):
    """P8 + LEDITS with no edit: concepts at scale 0 give exactly CFG, which replays the photo exactly."""
    inv, _ = ninv.InvertNode.execute(env["model"], env["src"], env["neg"], env["latent"], _sigmas(env["model"]),
                                     "ddpm", 0, 2.0, 0).result
    concepts = _concept(env, "blue", scale=0.0)
    g = nsg.SemanticGuideNode.execute(env["model"], env["src"], env["neg"], concepts, "sega", 2.0, True, 0.3, 0.6,
                                      "intersect").result[0]
    cfg = comfy.samplers.CFGGuider(env["model"])
    cfg.set_conds(env["src"], env["neg"])
    cfg.set_cfg(2.0)
    out_sega, out_cfg = _run(env, g, inv), _run(env, cfg, inv)
    # bit-exact at the kernel level (tests/test_sega.py); here the UNet batch holds one more
    # conditioning than core CFG's, and batched convolutions round differently on CPU (~1e-5)
    assert _rel(out_sega, out_cfg) < 1e-5
    assert _rel(out_sega, env["latent"]["samples"]) < 1e-4


@pytest.mark.parametrize("mode", ["sega", "ledits++"])
def test_concepts_edit_and_stay_finite(env, mode):
    inv, _ = ninv.InvertNode.execute(env["model"], env["neg"], env["neg"], env["latent"], _sigmas(env["model"]),
                                     "ddpm", 0, 1.0, 0).result
    concepts = _concept(env, "blue circle", scale=7.0, previous=_concept(env, "red", scale=5.0, direction="remove"))
    assert len(concepts) == 2 and concepts[0].concept.reverse and concepts[1].n_tokens == 2
    guider, recorders = nsg.build_guider(env["model"], env["neg"], env["neg"], concepts, 1.0, mode, 0.3, 0.6, False)
    out = _run(env, guider, inv)
    assert torch.isfinite(out).all()
    assert _rel(out, env["latent"]["samples"]) > 1e-3           # the edit changed the photo
    if mode == "ledits++":
        assert len(recorders) == 2                              # masks came from recorded concept attention
    # without concepts the same guider reconstructs
    plain, _ = nsg.build_guider(env["model"], env["neg"], env["neg"], [], 1.0, mode, 0.3, 0.6, False)
    assert _rel(_run(env, plain, inv), env["latent"]["samples"]) < 1e-4


def test_bad_inputs(env):
    with pytest.raises(ValueError, match="tokenizes to nothing"):
        _concept(env, "   ")
    with pytest.raises(ValueError, match="threshold must be in"):
        _concept(env, "blue", threshold=1.0)
    inv, _ = ninv.InvertNode.execute(env["model"], env["src"], env["neg"], env["latent"], _sigmas(env["model"]),
                                     "ddpm", 0, 1.0, 0).result
    late = _concept(env, "blue", warmup=50)
    g = nsg.SemanticGuideNode.execute(env["model"], env["src"], env["neg"], late, "sega", 2.0, True, 0.3, 0.6,
                                      "intersect").result[0]
    # counts as the user set them: 8 normal steps, of which the last (sigma_min -> 0) is not run
    with pytest.raises(ValueError, match=r"warmup 50 is not below the 7 steps that run \(8 steps set, 7 run: the "
                                         r"last step to 0"):
        _run(env, g, inv)
    before = repr(env["model"].model_options)
    nsg.build_guider(env["model"], env["src"], env["neg"], _concept(env, "blue"), 2.0, "ledits++", 0.3, 0.6, False)
    assert repr(env["model"].model_options) == before           # input MODEL untouched


@pytest.mark.parametrize("mode", ["sega", "ledits++"])
def test_concept_masks_preview(env, mode):
    inv, _ = ninv.InvertNode.execute(env["model"], env["neg"], env["neg"], env["latent"], _sigmas(env["model"]),
                                     "ddpm", 0, 1.0, 0).result
    concepts = _concept(env, "blue circle", scale=7.0, warmup=2)
    guider, store = nsg.SemanticGuideNode.execute(env["model"], env["neg"], env["neg"], concepts, mode, 1.0, False,
                                                  0.3, 0.6, "intersect").result
    with pytest.raises(RuntimeError, match="no guidance step has run yet"):
        nsg.ConceptMasksNode.execute(store, env["latent"], 0)
    out = _run(env, guider, inv)
    mask, heat = nsg.ConceptMasksNode.execute(store, {"samples": out}, 0).result
    assert mask.shape == (1, 64, 64) and heat.shape == (1, 64, 64, 3)
    # applied from step 2 of 8 on, keeping ~10 % per step: values are fractions of steps, never above 6/8
    assert 0 < float(mask.max()) <= 6 / 8 + 1e-6 and float(mask.min()) >= 0
    with pytest.raises(ValueError, match="out of range"):
        nsg.ConceptMasksNode.execute(store, {"samples": out}, 3)


@pytest.mark.parametrize("use_target", [True, False])
def test_guided_result_recomputed_from_the_rows_it_expects(env, use_target):
    """Record every row the model computes during one guider step, identify each row by its text
    conditioning (positive, negative, concept k) — not by its position — and recompute the guided
    result with the kernel.  A mistake in row order or in ``cond_or_uncond`` fails here; so does a
    positive row computed while the target CFG is off."""
    from photoops.kernels import sega as ksega

    concepts = _concept(env, "blue circle", scale=7.0, previous=_concept(env, "red", scale=5.0, direction="remove"))
    texts = {"positive": env["src"][0][0], "negative": env["neg"][0][0],
             "concept0": concepts[0].conditioning[0][0], "concept1": concepts[1].conditioning[0][0]}
    seen = []

    def recorder(apply_model, args):
        out = apply_model(args["input"], args["timestep"], **args["c"])
        ctx = args["c"]["c_crossattn"]
        n = len(args["cond_or_uncond"])
        rows = args["c"]["transformer_options"].get("photoops_rows")
        for j, (flag, ctx_j, out_j) in enumerate(zip(args["cond_or_uncond"], ctx.chunk(n), out.chunk(n))):
            name = next(k for k, t in texts.items() if t[0].shape == ctx_j[0].shape and torch.equal(t[0], ctx_j[0].cpu()))
            seen.append((name, flag, rows[j] if rows else None, out_j.clone()))
        return out

    model = env["model"].clone()
    model.set_model_unet_function_wrapper(recorder)
    guider, _ = nsg.build_guider(model, env["src"], env["neg"], concepts, 3.0, "sega", 0.3, 0.6, use_target)
    lat = env["latent"]["samples"]
    sigmas = _sigmas(env["model"], 4)[:2]
    box = {}

    def one_step(model_k, x, sig, extra_args=None, callback=None, disable=None):
        box["x"], box["den"] = x.clone(), model_k(x, sig[0] * x.new_ones([x.shape[0]]), **(extra_args or {}))
        return box["den"]

    guider.sample(torch.zeros_like(lat), lat, comfy.samplers.KSAMPLER(one_step), sigmas, disable_pbar=True, seed=0)
    names = [s[0] for s in seen]              # in the order calc_cond_batch packed them into the batch
    want = (["positive"] if use_target else []) + ["negative", "concept0", "concept1"]     # core's order
    assert sorted(names) == sorted(want), names                          # no unused positive row
    assert [s[1] for s in seen] == [1 if n == "negative" else 0 for n in names]   # core's cond/uncond flags
    assert [want[s[2]] for s in seen] == names    # the row index our hooks see is the conditioning's place
    rows = {s[0]: s[3] for s in seen}
    x, sigma = box["x"], float(sigmas[0])
    eps = {k: (x - v) / sigma for k, v in rows.items()}
    sega = ksega.SemanticGuidance([c.concept for c in concepts], momentum_scale=0.3, momentum_beta=0.6,
                                  mask_rule=nsg.DEFAULT_MASK_RULE)          # the node's default rule
    e_hat = sega.guide(eps["negative"], eps["positive"] if use_target else None,
                       [eps["concept0"], eps["concept1"]], 0, 3.0)
    expect = x - sigma * e_hat
    assert float((box["den"] - expect).abs().max()) <= 1e-5 * float(expect.abs().max())
    # and the concepts did act: without them the result differs
    plain = x - sigma * (eps["negative"] + (3.0 * (eps["positive"] - eps["negative"]) if use_target else 0))
    assert float((box["den"] - plain).abs().max()) > 1e-3 * float(expect.abs().max())


def test_warmup_is_checked_against_the_steps_that_run_after_skip(env):
    """12 steps set, the last (sigma_min -> 0) not run, Invert skips 2: 9 steps run, so warm-up 9 can never
    act (an error naming all three counts) and warm-up 8 acts on the last step."""
    sig = _sigmas(env["model"], 12)
    inv, _ = ninv.InvertNode.execute(env["model"], env["neg"], env["neg"], env["latent"], sig, "ddpm", 2, 1.0,
                                     0).result
    sampler = ninv.InversionSamplerNode.execute(inv).result[0]
    lat = env["latent"]["samples"]

    def run(warmup):
        g = nsg.SemanticGuideNode.execute(env["model"], env["neg"], env["neg"], _concept(env, "blue", warmup=warmup),
                                          "sega", 1.0, False, 0.0, 0.6, "intersect").result[0]
        return g.sample(torch.zeros_like(lat), lat, sampler, sig, disable_pbar=True, seed=0)

    with pytest.raises(ValueError, match=r"warmup 9 is not below the 9 steps that run \(12 steps set, 9 run: .*"
                                         r"skip leaves out the first 2\)"):
        run(9)
    plain = nsg.SemanticGuideNode.execute(env["model"], env["neg"], env["neg"], [], "sega", 1.0, False, 0.0, 0.6,
                                          "intersect").result[0]
    base = plain.sample(torch.zeros_like(lat), lat, sampler, sig, disable_pbar=True, seed=0)
    assert _rel(run(8), base) > 1e-4          # the concept acted on the one step after its warm-up


@pytest.mark.parametrize("mode", ["sega", "ledits++"])
def test_mask_rules_reach_the_guide(env, mode):
    """The node's mask_rule decides the masks: percentile keeps the top 10 % (threshold 0.9) per step,
    otsu / mass keep what the maps' own distribution says; all edit and stay finite."""
    inv, _ = ninv.InvertNode.execute(env["model"], env["neg"], env["neg"], env["latent"], _sigmas(env["model"]),
                                     "ddpm", 0, 1.0, 0).result
    concepts = _concept(env, "blue circle", scale=7.0)
    fractions = {}
    for rule in ("percentile", "otsu", "mass"):
        guider, store = nsg.SemanticGuideNode.execute(env["model"], env["neg"], env["neg"], concepts, mode, 1.0,
                                                      False, 0.0, 0.6, "noise", rule, 0.5).result
        out = _run(env, guider, inv)
        assert torch.isfinite(out).all() and _rel(out, env["latent"]["samples"]) > 1e-3
        fractions[rule] = float(store.mean(0).mean())
    # ledits++: the top 10 % of one map; sega: the union over 4 channels of each channel's top 10 %
    assert fractions["percentile"] <= (0.41 if mode == "sega" else 0.11)
    assert len({round(v, 3) for v in fractions.values()}) == 3, fractions      # three different masks
