"""Semantic Guide (SEGA / LEDITS++) on rectified-flow models (issue 19 item 4, spec rectified-flow.md §4, R10).

Kernel property first (no model): without momentum, SEGA combined on eps, on v and on D gives the same
D; with momentum, D-space with ``unit = -(1-s)/s`` equals the eps-space run (momentum lives in eps units).
Then through a real ComfyUI on the tiny SD3 / Flux files with random conditioning tensors: concept scale 0
replays a flow_noise_maps inversion exactly; concepts act; the guided D of every step equals the
kernel's eps-space recomputation from the branch rows the model produced.
Tolerances: float64 kernel identities 1e-10; ComfyUI float32 replays 1e-5 relative (measured ~1e-7).
"""
import pytest
import torch
from comfy_harness import inprocess

inprocess.require("test_comfy_flow_semantic_guide")

import comfy.samplers
from comfy_extras.nodes_custom_sampler import Noise_EmptyNoise, SamplerCustomAdvanced
from comfy_harness import flow_fixtures as ff
from photoops.kernels import sega as ksega
from photoops.nodes import inversion as ninv
from photoops.nodes import semantic_guide as nsg


def _rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("momentum", [0.0, 0.5])
def test_sega_on_eps_v_and_d_agree(momentum):
    """R10 / §4.1: e = (x - (1-s) D)/s, v = (x - D)/s are affine in D; same weights give the same D."""
    concepts = [ksega.EditConcept(scale=4.0, threshold=0.7), ksega.EditConcept(scale=2.0, reverse=True, warmup=1)]
    runs = {k: ksega.SemanticGuidance(concepts, momentum_scale=momentum, momentum_beta=0.6) for k in "evdn"}
    x = _rand(1, 4, 6, 6, seed=0)
    for step, s in enumerate([0.9, 0.7, 0.4, 0.2]):
        ds = [_rand(1, 4, 6, 6, seed=10 * step + i) for i in range(4)]                 # u, t, c1, c2
        eps = [(x - (1 - s) * d) / s for d in ds]
        vel = [(x - d) / s for d in ds]
        e_hat = runs["e"].guide(eps[0], eps[1], eps[2:], step, 3.0)
        d_from_e = (x - s * e_hat) / (1 - s)
        v_hat = runs["v"].guide(vel[0], vel[1], vel[2:], step, 3.0, unit=(1 - s) / 1.0)   # e-diff = (1-s) v-diff
        d_from_v = x - s * v_hat
        d_hat = runs["d"].guide(ds[0], ds[1], ds[2:], step, 3.0, unit=-(1 - s) / s)
        naive = runs["n"].guide(ds[0], ds[1], ds[2:], step, 3.0)                        # momentum in D units
        assert float((d_hat - d_from_e).abs().max()) < 1e-10
        assert float((d_from_v - d_from_e).abs().max()) < 1e-10
        if momentum == 0.0:
            assert float((naive - d_from_e).abs().max()) < 1e-10                        # parameterisation-free
        elif step > 0:
            assert float((naive - d_from_e).abs().max()) > 1e-3                         # momentum is not
    # s = 1: eps = x whatever D is; the step is guided on D without momentum, nu is left unchanged
    g = ksega.SemanticGuidance(concepts[:1], momentum_scale=0.5, momentum_beta=0.6)
    ds = [_rand(1, 4, 6, 6, seed=90 + i) for i in range(2)]
    out = g.guide(ds[0], None, ds[1:], 0, 1.0, unit=0.0)
    psi = ksega.concept_direction(ds[1], ds[0], concepts[0])
    assert torch.equal(out, ds[0] + torch.where(ksega.percentile_mask(psi, 0.7), psi, torch.zeros_like(psi)))
    assert not bool(g.momentum.any())


@pytest.fixture(scope="module")
def sd3():
    model = ff.load_flow_model("sd3")
    g = torch.Generator().manual_seed(2)
    return {"model": model, "pos": ff.sd3_conditioning(1), "neg": ff.sd3_conditioning(2),
            "blue": ff.sd3_conditioning(5), "latent": {"samples": torch.randn(1, 16, 8, 8, generator=g)}}


def _concept(cond, scale, **kw):
    return nsg.ConceptInput("concept", cond, 3, ksega.EditConcept(scale=scale, **kw),
                            {"positions": [0, 1, 2], "optional_positions": [], "prompt_len": None})


def _sigmas(model, steps):
    return comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", steps).cpu()


def _rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


def _invert(env, cfg, steps):
    return ninv.InvertNode.execute(env["model"], env["pos"], env["neg"], env["latent"], _sigmas(env["model"], steps),
                                   "flow_noise_maps", 0, cfg, 3).result[0]


def _replay(env, inv, concepts, mode, cfg, use_target, steps=3, momentum=0.3):
    guider, masks = nsg.SemanticGuideNode.execute(env["model"], env["pos"], env["neg"], concepts, mode, cfg,
                                                  use_target, momentum, 0.6, "intersect", "percentile", 0.5).result
    sampler = ninv.InversionSamplerNode.execute(inv).result[0]
    out, _ = SamplerCustomAdvanced().sample(Noise_EmptyNoise(), guider, sampler, _sigmas(env["model"], steps),
                                            env["latent"])
    return out["samples"], guider, masks


@pytest.mark.parametrize("mode", ["sega", "ledits++"])
def test_sd3_scale_zero_replays_exactly_and_concepts_act(sd3, mode):
    x = sd3["latent"]["samples"]
    cfg, use_target = (3.5, True) if mode == "sega" else (1.0, False)
    if not use_target:                                      # LEDITS++: the inversion's prompt is the "negative"
        sd3 = {**sd3, "pos": sd3["neg"]}
    inv = _invert(sd3, cfg, 3)
    zero, _, _ = _replay(sd3, inv, [_concept(sd3["blue"], 0.0)], mode, cfg, use_target)
    assert _rel(zero, x) < 1e-5
    edit, _, masks = _replay(sd3, inv, [_concept(sd3["blue"], 8.0, threshold=0.5)], mode, cfg, use_target)
    assert _rel(edit, x) > 1e-3 and bool(torch.isfinite(edit).all())
    m = masks.mean(0)
    assert m.shape == (1, 8, 8) and float(m.mean()) > 0                     # it acted
    if mode == "ledits++":                                                  # the masks keep part of the image
        assert float(m.mean()) < 1


def test_sd3_sega_equals_the_kernel_on_the_branch_rows(sd3):
    """Every step: the guider's D == eps-space SEGA (kernel, momentum on) recomputed from the rows the model gave
    each branch (recorded by a model_function_wrapper under the guider's own), converted back to D."""
    model = sd3["model"].clone()
    rows = []

    def spy(apply_model, args):
        out = apply_model(args["input"], args["timestep"], **args["c"])
        idx = args["c"]["transformer_options"]["photoops_rows"]
        rows.append({i: o for i, o in zip(idx, out.chunk(len(idx)))})
        return out

    model.set_model_unet_function_wrapper(spy)
    concepts = [_concept(sd3["blue"], 6.0, threshold=0.6)]
    guider, _ = nsg.build_guider(model, sd3["pos"], sd3["neg"], concepts, 3.0, "sega", 0.5, 0.6, True,
                                 mask_rule="percentile")
    guided = []

    def sampler_fn(m, x, sigmas, extra_args=None, callback=None, disable=None):
        for i in range(len(sigmas) - 1):
            d = m(x, sigmas[i] * x.new_ones([x.shape[0]]), **(extra_args or {}))
            guided.append((x.clone(), float(sigmas[i]), d))
            x = x + (sigmas[i + 1] - sigmas[i]) * (x - d) / sigmas[i]
        return x

    sig = torch.tensor([0.9, 0.6, 0.35, 0.1, 0.0])                  # s < 1: eps-space is defined at every step
    guider.sample(torch.zeros(1, 16, 8, 8), sd3["model"].model.process_latent_in(sd3["latent"]["samples"]),
                  comfy.samplers.KSAMPLER(sampler_fn), sig, disable_pbar=True, seed=0)
    ref = ksega.SemanticGuidance([c.concept for c in concepts], momentum_scale=0.5, momentum_beta=0.6,
                                 mask_rule="percentile")
    assert len(rows) == len(guided) == 4
    for step, ((x, s, d), r) in enumerate(zip(guided, rows)):
        e = {k: (x.double() - (1 - s) * v.double()) / s for k, v in r.items()}      # rows: 0 pos, 1 neg, 2 concept
        e_hat = ref.guide(e[1], e[0], [e[2]], step, 3.0)
        expect = (x.double() - s * e_hat) / (1 - s)
        assert _rel(d.double(), expect) < 1e-6, step
    assert float(ref.momentum.detach().abs().max()) > 0


def test_flux_option_a_conditional_differences():
    model = ff.load_flow_model("flux")
    env = {"model": model, "pos": ff.flux_conditioning(1, guidance=2.5), "neg": ff.flux_conditioning(2, guidance=2.5),
           "latent": {"samples": torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(5))}}
    blue = ff.flux_conditioning(6, guidance=7.0)
    with pytest.raises(ValueError, match="Flux is guidance-distilled .* set cfg to 1"):
        nsg.build_guider(model, env["pos"], env["neg"], [_concept(blue, 1.0)], 3.5, "sega", 0.3, 0.6, True)
    guider, _ = nsg.build_guider(model, env["pos"], env["neg"], [_concept(blue, 1.0)], 1.0, "sega", 0.3, 0.6, True)
    assert guider.original_conds["concept0"][0]["guidance"] == 2.5          # the negative's embed on every branch
    inv = _invert(env, 1.0, 2)
    zero, _, _ = _replay(env, inv, [_concept(blue, 0.0)], "ledits++", 1.0, True, steps=2)
    assert _rel(zero, env["latent"]["samples"]) < 1e-5
    edit, _, _ = _replay(env, inv, [_concept(blue, 8.0, threshold=0.5)], "ledits++", 1.0, True, steps=2)
    assert _rel(edit, env["latent"]["samples"]) > 1e-4
