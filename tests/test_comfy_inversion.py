"""Invert / Inversion Sampler / Eta Schedule / Save+Load through a real ComfyUI in-process.

Skipped (with the reason printed) when COMFYUI_DIR is unset.  Uses the SD1.5-format
random-weight fixture checkpoint; exactness claims hold for any weights.
"""
import pytest
import torch

from comfy_harness import inprocess

inprocess.require("test_comfy_inversion")

import comfy.sd  # noqa: E402
import comfy.samplers  # noqa: E402

from comfy_harness import fixtures  # noqa: E402
from photoops.kernels.inversion_state import InversionMismatchError  # noqa: E402
from photoops.nodes import inversion as ninv  # noqa: E402
from photoops.nodes.attention_mask import AttentionCaptureNode  # noqa: E402


@pytest.fixture(scope="module")
def env():
    model, clip, _, _ = inprocess.load_fixture()
    torch.manual_seed(0)
    return {"model": model, "clip": clip,
            "pos": clip.encode_from_tokens_scheduled(clip.tokenize("a photo of a red circle")),
            "tgt": clip.encode_from_tokens_scheduled(clip.tokenize("a photo of a blue circle")),
            "neg": clip.encode_from_tokens_scheduled(clip.tokenize("")),
            "latent": {"samples": torch.randn(1, 4, 8, 8) * 5.0}}


def _sigmas(model, steps=8):
    return comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", steps).cpu()


def _invert(env, method="ddpm", steps=8, cfg=1.0, skip=0, **kw):
    return ninv.InvertNode.execute(env["model"], env["pos"], env["neg"], env["latent"], _sigmas(env["model"], steps),
                                   method, skip, cfg, 3, **kw).result


def _replay(env, inv, positive, cfg=1.0, sigmas=None, latent=None, model=None):
    model = model or env["model"]
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, env["neg"])
    guider.set_cfg(cfg)
    sampler = ninv.InversionSamplerNode.execute(inv).result[0]
    lat = latent if latent is not None else env["latent"]["samples"]
    sig = sigmas if sigmas is not None else _sigmas(model, _user_steps(inv))
    return guider.sample(torch.zeros_like(lat), lat, sampler, sig, disable_pbar=True, seed=0)


def _user_steps(inv):
    """Steps of the SIGMAS the user gave Invert (a final 0 after sigma_min is dropped there)."""
    return inv.steps + int(bool(inv.info.get("final_zero_dropped")))


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("cfg", [1.0, 3.5])
def test_ddpm_replay_reconstructs_exactly(env, cfg):
    inv, start = _invert(env, "ddpm", cfg=cfg)
    # "normal" ends [..., sigma_min, 0]: the final 0 is dropped (7 invertible steps)
    assert inv.info["final_zero_dropped"] and not inv.info["final_zero_replaced"]
    assert inv.noises.shape == (7, 1, 4, 8, 8) and start["samples"].shape == (1, 4, 8, 8)
    out = _replay(env, inv, env["pos"], cfg=cfg)
    assert _rel(out, env["latent"]["samples"]) < 1e-4
    # with skip, from the stored rung
    inv2, _ = _invert(env, "ddpm", cfg=cfg, skip=3)
    assert _rel(_replay(env, inv2, env["pos"], cfg=cfg), env["latent"]["samples"]) < 1e-4
    # another prompt edits (changes the result)
    assert _rel(_replay(env, inv, env["tgt"], cfg=cfg), env["latent"]["samples"]) > 1e-3


def test_eta_with_optimal_noise_reconstructs_and_zero_eta_is_ddim(env):
    const = ninv.EtaScheduleNode.execute("constant", 0.5, "", 1.0).result[0]
    inv, _ = _invert(env, "eta", eta_schedule=const, store_optimal_noise=True)
    assert _rel(_replay(env, inv, env["pos"]), env["latent"]["samples"]) < 1e-4
    zero = ninv.EtaScheduleNode.execute("constant", 0.0, "", 1.0).result[0]
    inv_eta0, _ = _invert(env, "eta", eta_schedule=zero)
    inv_ddim, _ = _invert(env, "ddim")
    assert torch.equal(inv_eta0.x_start, inv_ddim.x_start)
    assert torch.count_nonzero(inv_eta0.noises) == 0
    torch.testing.assert_close(_replay(env, inv_eta0, env["tgt"]), _replay(env, inv_ddim, env["tgt"]), atol=0, rtol=0)


def test_eta_region_from_attention_capture(env):
    patched, capture = AttentionCaptureNode.execute(env["model"], env["clip"], "a photo of a red circle", "circle",
                                                    "lowres", 0.0, 1.0).result
    sched = ninv.EtaScheduleNode.execute("paper_A", 0.4, "", 1.0).result[0]

    def run(thr):
        return ninv.InvertNode.execute(patched, env["pos"], env["neg"], env["latent"], _sigmas(env["model"]), "eta",
                                       0, 1.0, 0, eta_schedule=sched, region=capture, region_threshold=thr).result[0]

    ninv.InvertNode.execute(patched, env["pos"], env["neg"], env["latent"], _sigmas(env["model"]), "ddim", 0, 1.0, 0)
    # the map recorded during a (deterministic) DDIM ladder pass, the same pass Eta Inversion makes before it
    # builds its mask; threshold at the median -> a partial mask
    raw = capture.recorder.result()
    a = torch.nn.functional.interpolate((raw / raw.amax())[:, None], size=(8, 8), mode="bicubic",
                                        align_corners=False).clamp(0, 1)   # Eta §4.2: max-normalise, bicubic
    thr = float(a.median())
    inv = run(thr)
    expected = (a > thr).float()
    assert 0 < float(expected.mean()) < 1
    assert inv.eta.shape == (7, 1, 1, 8, 8)
    per_step = inv.eta.flatten(1).amax(1)
    assert float(per_step.max()) > 0 and float(per_step.min()) == 0.0      # paper_A is 0 late in sampling
    # eta = M * eta(t): 0 outside the capture's mask at every step, eta(t) inside
    torch.testing.assert_close(inv.eta, per_step.view(-1, 1, 1, 1, 1) * expected.view(1, 1, 1, 8, 8))
    # quantile mode keeps the top quarter of the same map
    invq = ninv.InvertNode.execute(patched, env["pos"], env["neg"], env["latent"], _sigmas(env["model"]), "eta", 0,
                                   1.0, 0, eta_schedule=sched, region=capture, region_mode="quantile",
                                   region_threshold=0.75).result[0]
    assert abs(float((invq.eta.amax(0) > 0).float().mean()) - 0.25) <= 1 / 64


def test_mismatches_are_named(env):
    inv, _ = _invert(env, "ddpm")
    with pytest.raises(InversionMismatchError, match="sigma mismatch"):
        _replay(env, inv, env["pos"], sigmas=_sigmas(env["model"], 6))
    with pytest.raises(InversionMismatchError, match="latent size mismatch"):
        _replay(env, inv, env["pos"], latent=torch.zeros(1, 4, 16, 16))
    cfg = dict(fixtures.UNET_CONFIG, transformer_layers_per_block=2)
    unet = fixtures.build_diffusers_unet(seed=3, config=cfg)
    other = comfy.sd.load_diffusion_model_state_dict(fixtures.diffusers_unet_to_ldm(unet.state_dict(), cfg))
    with pytest.raises(InversionMismatchError, match="model mismatch"):
        _replay(env, inv, env["pos"], model=other)


def test_bad_inputs(env):
    with pytest.raises(ValueError, match="skip \\(8\\) must be smaller"):
        _invert(env, "ddpm", skip=8)
    with pytest.raises(ValueError, match="expects \\[batch, 4"):
        ninv.InvertNode.execute(env["model"], env["pos"], env["neg"], {"samples": torch.zeros(1, 16, 8, 8)},
                                _sigmas(env["model"]), "ddpm", 0, 1.0, 0)
    with pytest.raises(ValueError, match="strictly decreasing"):
        ninv.InvertNode.execute(env["model"], env["pos"], env["neg"], env["latent"], torch.tensor([1.0, 2.0, 0.0]),
                                "ddpm", 0, 1.0, 0)
    zero = ninv.EtaScheduleNode.execute("constant", 0.0, "", 1.0).result[0]
    with pytest.raises(ValueError, match="eta > 0"):
        _invert(env, "ddpm", eta_schedule=zero)
    with pytest.raises(ValueError, match="not 'u:eta'"):
        ninv.EtaScheduleNode.execute("custom", 0.0, "0.5", 1.0)


def test_interrupt_leaves_nothing_and_model_untouched(env, monkeypatch):
    before = repr(env["model"].model_options)
    calls = {"n": 0}

    class Stop(Exception):
        pass

    def boom():
        calls["n"] += 1
        if calls["n"] == 3:
            raise Stop()
        return False

    monkeypatch.setattr(ninv, "interrupt_check", boom)
    with pytest.raises(Stop):
        _invert(env, "ddpm")
    monkeypatch.undo()
    assert repr(env["model"].model_options) == before
    inv, _ = _invert(env, "ddpm")     # works again afterwards
    assert inv.steps == 7


def test_save_and_load_nodes(env, tmp_path, monkeypatch):
    import folder_paths

    monkeypatch.setitem(folder_paths.folder_names_and_paths, ninv.FOLDER, ([str(tmp_path)], {".safetensors"}))
    monkeypatch.setattr(ninv, "register_folder", lambda name, sub: str(tmp_path))
    inv, _ = _invert(env, "ddpm")
    ninv.SaveInversionNode.execute(inv, "photo")
    # ComfyUI's output numbering (folder_paths.get_save_image_path): stem_00001_, then one more than the largest
    assert (tmp_path / "photo_00001_.safetensors").exists()
    (tmp_path / "photo_00007_.safetensors").write_bytes(b"")
    ninv.SaveInversionNode.execute(inv, "../photo")                 # path parts stripped: no hidden / outside file
    assert (tmp_path / "photo_00008_.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    assert oct((tmp_path / "photo_00008_.safetensors").stat().st_mode & 0o777) == "0o644"
    folder_paths.filename_list_cache.clear() if hasattr(folder_paths, "filename_list_cache") else None
    loaded = ninv.LoadInversionNode.execute("photo_00001_.safetensors").result[0]
    assert _rel(_replay(env, loaded, env["pos"]), env["latent"]["samples"]) < 1e-4


def test_batched_ddpm_inversion_in_comfy(env):
    """Per-row sigmas through ComfyUI's guider: batched rungs reconstruct to rounding level."""
    inv, _ = _invert(env, "ddpm", batch=4)
    assert _rel(_replay(env, inv, env["pos"]), env["latent"]["samples"]) < 1e-4


def test_v_prediction_model_reconstructs(env):
    """Inversion runs through ComfyUI's model sampling, so v-prediction models (SD2.x-v) work unchanged."""
    import comfy.model_sampling as ms

    cls = type("VSampling", (ms.ModelSamplingDiscrete, ms.V_PREDICTION), {})
    vmodel = env["model"].clone()
    vmodel.add_object_patch("model_sampling", cls(env["model"].model.model_config))
    venv = dict(env, model=vmodel)
    inv, _ = _invert(venv, "ddpm", cfg=2.0)
    assert _rel(_replay(venv, inv, env["pos"], cfg=2.0), env["latent"]["samples"]) < 1e-4
    assert inv.fingerprint["prediction"] == "v_prediction"
    eps_inv, _ = _invert(env, "ddpm")
    with pytest.raises(InversionMismatchError, match="model mismatch \\(prediction\\)"):
        _replay(venv, eps_inv, env["pos"])


@pytest.mark.parametrize("cfg,skip", [(1.0, 0), (3.5, 3)])
def test_ledits_pp_dpm_inversion_reconstructs_and_is_comfys_sampler(env, cfg, skip):
    """LEDITS++ inversion (dpmpp_2m_sde) through ComfyUI: replay reconstructs the photo (< 1e-4,
    as the DDPM test), and our replay equals ComfyUI's own ``dpmpp_2m_sde`` sampler fed the
    stored noise maps through its ``noise_sampler`` (same maths, float32 rounding: 1e-5)."""
    inv, start = _invert(env, "dpmpp_2m_sde", cfg=cfg, skip=skip)
    assert inv.method == "dpmpp_2m_sde" and inv.noises.shape == (7, 1, 4, 8, 8)
    assert torch.all(inv.noises[:skip] == 0) and inv.noises[skip:].abs().amax() > 0
    out = _replay(env, inv, env["pos"], cfg=cfg)
    assert _rel(out, env["latent"]["samples"]) < 1e-4
    edited = _replay(env, inv, env["tgt"], cfg=cfg)
    assert _rel(edited, env["latent"]["samples"]) > 1e-3
    maps = iter(inv.noises[skip:])
    sampler = comfy.samplers.ksampler("dpmpp_2m_sde", {"noise_sampler": lambda s, sn: next(maps)})
    guider = comfy.samplers.CFGGuider(env["model"])
    guider.set_conds(env["tgt"], env["neg"])
    guider.set_cfg(cfg)
    theirs = guider.sample(torch.zeros_like(start["samples"]), start["samples"], sampler, inv.sigmas[skip:].float(),
                           disable_pbar=True, seed=0)
    assert _rel(edited, theirs) < 1e-5


def test_dpm_method_rejects_an_eta_schedule(env):
    const = ninv.EtaScheduleNode.execute("constant", 0.5, "", 1.0).result[0]
    with pytest.raises(ValueError, match="not to dpmpp_2m_sde"):
        _invert(env, "dpmpp_2m_sde", eta_schedule=const)


def test_final_zero_is_replaced_or_dropped(env):
    """A schedule ending well above sigma_min gets its final 0 replaced by sigma_min; one that already
    reaches sigma_min (ComfyUI's normal/karras) drops it.  Both reconstruct, both replay from the
    user's SIGMAS (with the 0)."""
    model = env["model"]
    custom = torch.tensor([14.6, 3.0, 0.5, 0.0])
    inv, _ = ninv.InvertNode.execute(model, env["pos"], env["neg"], env["latent"], custom, "ddpm", 0, 1.0, 3).result
    assert inv.info["final_zero_replaced"] and inv.steps == 3 and float(inv.sigmas[-1]) > 0
    assert _rel(_replay(env, inv, env["pos"], sigmas=custom), env["latent"]["samples"]) < 1e-4
    inv2, _ = _invert(env, "ddpm")
    assert inv2.info["final_zero_dropped"] and float(inv2.sigmas[-1]) == pytest.approx(float(_sigmas(model)[-2]))
    assert _rel(_replay(env, inv2, env["pos"], sigmas=_sigmas(model)), env["latent"]["samples"]) < 1e-4
    with pytest.raises(ValueError, match="single step"):
        ninv.InvertNode.execute(model, env["pos"], env["neg"], env["latent"], _sigmas(model)[-2:], "ddpm", 0, 1.0, 3)
