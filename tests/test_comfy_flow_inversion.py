"""Invert / Inversion Sampler on rectified-flow models (SD3, Flux) through a real ComfyUI in-process (issue 19).

Skipped (with the reason printed) when COMFYUI_DIR is unset.  The models are the seeded tiny
files of ``comfy_harness/flow_fixtures.py`` loaded by ComfyUI's stock diffusion-model loader;
conditioning is random tensors of the text encoders' shapes.  Exactness claims hold for any
weights; tolerance 1e-6 relative (float32; measured 4e-8 SD3, 1.3e-7 Flux) unless stated.
"""
import pytest
import torch
from comfy_harness import inprocess

inprocess.require("test_comfy_flow_inversion")

import comfy.model_detection
import comfy.model_sampling as cms
import comfy.samplers
from comfy_extras.nodes_custom_sampler import Noise_EmptyNoise, SamplerCustomAdvanced
from comfy_harness import flow_fixtures as ff
from photoops.kernels.inversion_state import InversionMismatchError, load_inversion, save_inversion
from photoops.kernels.protocol import UnsupportedModelError
from photoops.nodes import inversion as ninv


@pytest.fixture(scope="module")
def sd3():
    model = ff.load_flow_model("sd3")
    g = torch.Generator().manual_seed(2)
    return {"model": model, "pos": ff.sd3_conditioning(1), "neg": ff.sd3_conditioning(2),
            "tgt": ff.sd3_conditioning(3), "latent": {"samples": torch.randn(1, 16, 8, 8, generator=g)}}


def _sigmas(model, steps, scheduler="simple"):
    return comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, steps).cpu()


def _invert(env, method, steps=5, cfg=1.0, skip=0, **kw):
    return ninv.InvertNode.execute(env["model"], env["pos"], env["neg"], env["latent"], _sigmas(env["model"], steps),
                                   method, skip, cfg, 3, **kw).result


def _replay(env, inv, positive, cfg=1.0, steps=5, model=None, **sampler_kw):
    """Core SamplerCustomAdvanced with Disable Noise, a CFGGuider and the Inversion Sampler."""
    model = model or env["model"]
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, env["neg"])
    guider.set_cfg(cfg)
    sampler = ninv.InversionSamplerNode.execute(inv, **sampler_kw).result[0]
    out, _ = SamplerCustomAdvanced().sample(Noise_EmptyNoise(), guider, sampler, _sigmas(model, steps), env["latent"])
    return out["samples"]


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_fixtures_are_detected_as_sd3_and_flux(sd3):                            # R15
    m = sd3["model"]
    assert type(m.model.model_config).__name__ == "SD3" and m.model.model_type.name == "FLOW"
    ms = m.get_model_object("model_sampling")
    assert isinstance(ms, cms.CONST) and isinstance(ms, cms.ModelSamplingDiscreteFlow) and ms.shift == 3.0
    flux_sd = ff.state_dict_shapes("flux")
    assert type(comfy.model_detection.model_config_from_unet(flux_sd, "")).__name__ == "Flux"
    schnell = ff.state_dict_shapes("flux", schnell=True)
    assert type(comfy.model_detection.model_config_from_unet(schnell, "")).__name__ == "FluxSchnell"
    assert sum(v.numel() for v in ff.state_dict_shapes("sd3").values()) == 2_006_336   # depth 2, hidden 128


@pytest.mark.parametrize("cfg,skip", [(1.0, 0), (3.5, 2)])
def test_sd3_noise_maps_reconstruct_exactly(sd3, cfg, skip, tmp_path):
    inv, start = _invert(sd3, "flow_noise_maps", cfg=cfg, skip=skip)
    # 'simple' ends [..., 1/5 shifted, 0]: the final 0 becomes sigma_min (0.003), 5 invertible steps
    assert inv.info["final_zero_replaced"] and inv.noises.shape == (5, 1, 16, 8, 8)
    assert start["samples"].shape == (1, 16, 8, 8) and inv.fingerprint["family"] == "SD3"
    assert inv.fingerprint["prediction"] == "flow (ModelSamplingDiscreteFlow, shift 3)"
    save_inversion(inv, tmp_path / "inv.safetensors")                     # files round-trip flow inversions
    loaded = load_inversion(tmp_path / "inv.safetensors")
    assert _rel(_replay(sd3, loaded, sd3["pos"], cfg=cfg), sd3["latent"]["samples"]) < 1e-6
    if skip == 0:
        assert _rel(_replay(sd3, inv, sd3["tgt"], cfg=cfg), sd3["latent"]["samples"]) > 1e-2   # another prompt edits


def test_sd3_noise_map_replay_is_comfys_euler_ancestral_rf(sd3):
    """Our replay == ComfyUI's own ``euler_ancestral`` (its CONST branch, ``sample_euler_ancestral_RF``) fed the
    stored maps through ``noise_sampler``; ComfyUI computes the step coefficients from float32 sigmas: 1e-5."""
    inv, _ = _invert(sd3, "flow_noise_maps", steps=3)
    ours = _replay(sd3, inv, sd3["tgt"], steps=3)
    maps = iter(inv.noises)
    sampler = comfy.samplers.ksampler("euler_ancestral", {"noise_sampler": lambda s, sn: next(maps)})
    guider = comfy.samplers.CFGGuider(sd3["model"])
    guider.set_conds(sd3["tgt"], sd3["neg"])
    guider.set_cfg(1.0)
    # s_0 = 1: the sampler starts at ``noise`` itself; its output is divided by 1 - s_final (inverse_noise_scaling)
    theirs = guider.sample(inv.x_start.clone(), torch.zeros_like(inv.x_start), sampler, inv.sigmas.float(),
                           disable_pbar=True, seed=0)
    base = sd3["model"].model
    a = base.process_latent_in(ours)
    b = base.process_latent_in(theirs) * (1 - float(inv.sigmas[-1]))
    assert _rel(a, b) < 1e-5


def test_sd3_flow_ode_fixed_point_and_rf_inversion(sd3):
    x = sd3["latent"]["samples"]
    plain, _ = _invert(sd3, "flow_ode", steps=4)
    exact, _ = _invert(sd3, "flow_ode", steps=4, fixed_point=3)
    e_plain = _rel(_replay(sd3, plain, sd3["pos"], steps=4), x)
    e_exact = _rel(_replay(sd3, exact, sd3["pos"], steps=4), x)
    assert len(exact.info["residuals"]) == 4
    assert e_exact < e_plain / 5, (e_plain, e_exact)
    # rf_inversion with gamma 0 is flow_ode, bit for bit (its eta-0 replay is Euler: test_flow_inversion.py)
    rf0, _ = _invert(sd3, "rf_inversion", steps=4, gamma=0.0)
    assert torch.equal(rf0.x_start, plain.x_start)
    # eta 1 on every step: the straight line to the photo's latent, x_final = s_min x_start + (1 - s_min) y0
    rf, _ = _invert(sd3, "rf_inversion", steps=4, gamma=0.5)
    out = _replay(sd3, rf, sd3["tgt"], steps=4, rf_eta=1.0, rf_start=0.0, rf_stop=1.0)
    base, s_min = sd3["model"].model, float(rf.sigmas[-1])
    expect = s_min * rf.x_start + (1 - s_min) * base.process_latent_in(x)
    assert _rel(base.process_latent_in(out), expect) < 1e-5


def test_methods_refuse_the_other_family(sd3):
    with pytest.raises(UnsupportedModelError, match="defined for VP .* this model is SD3, a rectified-flow model"):
        _invert(sd3, "ddpm")
    vp = sd3["model"].clone()       # the same model with SD1.5's eps sampling: a VP model
    vp.add_object_patch("model_sampling", type("VP", (cms.ModelSamplingDiscrete, cms.EPS), {})(None))
    with pytest.raises(UnsupportedModelError, match="'flow_noise_maps' is for rectified-flow models .* VP"):
        ninv.InvertNode.execute(vp, sd3["pos"], sd3["neg"], sd3["latent"], torch.tensor([14.6, 1.0, 0.0]),
                                "flow_noise_maps", 0, 1.0, 0)
    const = ninv.EtaScheduleNode.execute("constant", 0.5, "", 1.0).result[0]
    with pytest.raises(ValueError, match="do not apply to the flow_noise_maps method"):
        _invert(sd3, "flow_noise_maps", eta_schedule=const)
    with pytest.raises(ValueError, match="VP schedule"):
        ninv.InvertNode.execute(sd3["model"], sd3["pos"], sd3["neg"], sd3["latent"], torch.tensor([14.6, 1.0, 0.0]),
                                "flow_ode", 0, 1.0, 0)


def test_interrupt_leaves_nothing_and_model_untouched(sd3, monkeypatch):
    from photoops.nodes.comfy import flow as cflow

    before, calls = repr(sd3["model"].model_options), {"n": 0}

    class Stop(Exception):
        pass

    def boom():
        calls["n"] += 1
        if calls["n"] == 2:
            raise Stop()
        return False

    monkeypatch.setattr(cflow, "interrupt_check", boom)
    with pytest.raises(Stop):
        _invert(sd3, "flow_noise_maps", steps=3)
    assert repr(sd3["model"].model_options) == before


def test_replay_with_another_shift_is_refused(sd3):
    inv, _ = _invert(sd3, "flow_noise_maps", steps=3)
    cls = type("MS", (cms.ModelSamplingDiscreteFlow, cms.CONST), {})
    ms = cls(sd3["model"].model.model_config)
    ms.set_parameters(shift=2.0)
    other = sd3["model"].clone()
    other.add_object_patch("model_sampling", ms)
    with pytest.raises(InversionMismatchError, match="model mismatch \\(prediction\\).*shift 3.*shift 2"):
        guider = comfy.samplers.CFGGuider(other)
        guider.set_conds(sd3["pos"], sd3["neg"])
        guider.set_cfg(1.0)
        sampler = ninv.InversionSamplerNode.execute(inv).result[0]
        guider.sample(torch.zeros(1, 16, 8, 8), sd3["latent"]["samples"], sampler, _sigmas(sd3["model"], 3),
                      disable_pbar=True, seed=0)


def test_flux_noise_maps_reconstruct_exactly_and_flowedit_runs(sd3):
    """The tiny Flux-dev file (404 M parameters, the least ComfyUI's detection accepts): noise maps over 2 steps at
    guidance 3.5 reconstruct; FlowEdit runs with a guidance embed per branch."""
    model = ff.load_flow_model("flux")
    env = {"model": model, "pos": ff.flux_conditioning(1), "neg": ff.flux_conditioning(2),
           "latent": {"samples": torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(5))}}
    assert type(model.model.model_config).__name__ == "Flux" and isinstance(model.get_model_object("model_sampling"),
                                                                            cms.ModelSamplingFlux)
    inv, _ = _invert(env, "flow_noise_maps", steps=2)
    assert inv.fingerprint["family"] == "Flux" and inv.noises.shape == (2, 1, 16, 8, 8)
    assert _rel(_replay(env, inv, env["pos"], steps=2), env["latent"]["samples"]) < 1e-6
    # FlowEdit on Flux-dev: cfg 1 on both branches; prompts that differ only in the guidance embed (FluxGuidance)
    from photoops.nodes import flowedit as nfe

    def flowedit(g_src, g_tar):
        guider = nfe.FlowEditGuiderNode.execute(model, ff.flux_conditioning(1, guidance=g_src), env["neg"], 1.0,
                                                ff.flux_conditioning(1, guidance=g_tar), env["neg"], 1.0).result[0]
        sampler = nfe.FlowEditSamplerNode.execute(1, 0, 1, 0).result[0]
        return SamplerCustomAdvanced().sample(Noise_EmptyNoise(), guider, sampler, _sigmas(model, 2),
                                              env["latent"])[0]["samples"]

    assert _rel(flowedit(3.5, 3.5), env["latent"]["samples"]) < 1e-6          # V = 0
    assert _rel(flowedit(1.5, 5.5), env["latent"]["samples"]) > 1e-4          # each branch has its own embed
    sd3_inv, _ = _invert(sd3, "flow_noise_maps", steps=3)
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(env["pos"], env["neg"])
    guider.set_cfg(1.0)
    sampler = ninv.InversionSamplerNode.execute(sd3_inv).result[0]
    with pytest.raises(InversionMismatchError, match="model mismatch \\(family\\).*SD3.*Flux"):
        guider.sample(torch.zeros(1, 16, 8, 8), env["latent"]["samples"], sampler, _sigmas(sd3["model"], 3),
                      disable_pbar=True, seed=0)


# ----------------------------------------------------------------------------- FlowEdit (spec §2.4)

def _flowedit(env, src, tar, src_cfg, tar_cfg, steps, n_max, n_min=0, n_avg=1, seed=4):
    from photoops.nodes import flowedit as nfe

    guider = nfe.FlowEditGuiderNode.execute(env["model"], src, env["neg"], src_cfg, tar, env["neg"], tar_cfg).result[0]
    sampler = nfe.FlowEditSamplerNode.execute(n_max, n_min, n_avg, seed).result[0]
    out, _ = SamplerCustomAdvanced().sample(Noise_EmptyNoise(), guider, sampler, _sigmas(env["model"], steps),
                                            env["latent"])
    return out["samples"]


def test_flowedit_matches_the_reference_loop_on_comfys_predictions(sd3):
    """FlowEdit Guider + Sampler in core SamplerCustomAdvanced == the spec's loop written out here on ComfyUI's
    own CFG predictions (a probe guider over the four conditionings); float32: 5e-6 relative (measured 6e-7)."""
    from comfy_harness.probe import ProbeGuider

    steps, n_max, n_min, w_src, w_tar, seed = 6, 4, 1, 3.5, 7.0, 4
    ours = _flowedit(sd3, sd3["pos"], sd3["tgt"], w_src, w_tar, steps, n_max, n_min, seed=seed)
    base = sd3["model"].model
    x_src = base.process_latent_in(sd3["latent"]["samples"])
    sig = _sigmas(sd3["model"], steps)

    @torch.no_grad()
    def loop(den, _x, _s):
        def v(z, s, c, u, w):                       # CFG velocity from the probe's predictions
            d = den.predict_x0(z, s, [c, u])
            return (z - (d[1] + w * (d[0] - d[1]))) / s

        g = torch.Generator().manual_seed(seed)
        z_edit, x_tar = x_src.clone(), None
        for i in range(steps):
            if steps - i > n_max:
                continue
            s, sn = float(sig[i]), float(sig[i + 1])
            if steps - i > n_min:
                z_src = (1 - s) * x_src + s * torch.randn(x_src.shape, generator=g)
                z_tar = z_edit + z_src - x_src
                z_edit = z_edit + (sn - s) * (v(z_tar, s, 2, 3, w_tar) - v(z_src, s, 0, 1, w_src))
            else:
                if i == steps - n_min:
                    x_tar = z_edit + ((1 - s) * x_src + s * torch.randn(x_src.shape, generator=g)) - x_src
                x_tar = x_tar + (sn - s) * v(x_tar, s, 2, 3, w_tar)
        return x_tar

    ref = ProbeGuider(sd3["model"], [sd3["pos"], sd3["neg"], sd3["tgt"], sd3["neg"]]).run(
        loop, torch.zeros_like(sd3["latent"]["samples"]), sig)
    assert _rel(base.process_latent_in(ours), ref) < 5e-6
    assert _rel(ours, sd3["latent"]["samples"]) > 1e-2                     # it edits


def test_flowedit_identity_and_refusals(sd3):
    same = _flowedit(sd3, sd3["pos"], sd3["pos"], 3.5, 3.5, 5, 4, n_avg=2)    # R7: V = 0, the photo comes back
    assert _rel(same, sd3["latent"]["samples"]) < 1e-6
    with pytest.raises(ValueError, match="n_max \\(9\\) <= steps \\(5\\)"):
        _flowedit(sd3, sd3["pos"], sd3["tgt"], 1.0, 1.0, 5, 9)
    vp = sd3["model"].clone()
    vp.add_object_patch("model_sampling", type("VP", (cms.ModelSamplingDiscrete, cms.EPS), {})(None))
    from photoops.nodes import flowedit as nfe
    with pytest.raises(UnsupportedModelError, match="FlowEdit is for rectified-flow models .* SD3, a VP model"):
        nfe.FlowEditGuiderNode.execute(vp, sd3["pos"], sd3["neg"], 1.0, sd3["tgt"], sd3["neg"], 1.0)
