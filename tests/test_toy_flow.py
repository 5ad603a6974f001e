"""The toy rectified-flow model (issue 19 item 5): objective, export / load, exact noise-map replay on it."""
from pathlib import Path

import pytest
import torch

from tools.toyworld import flow, flow_train
from tools.toyworld import model as tm
from tools.toyworld import world

ROOT = Path(__file__).resolve().parents[1]
MODEL_FLOW = ROOT / "tools" / "toyworld" / "model_flow"
# Photo 1 of the bench's 12 (seed 123, a caption swap on 20 steps, skip 6) is edited right with each of
# six noise-map seeds (123, 0-4) on the committed model (photos 0, 6, 9 are not: 3/6, 5/6, 1/6).
FIXED_PHOTO = 1


class _SpyUNet(torch.nn.Module):
    """Records its inputs and returns a fixed 'prediction'."""

    def __init__(self, out):
        super().__init__()
        self.out, self.seen = out, None

    def forward(self, x, t, emb):
        self.seen = (x.clone(), t.clone(), emb)
        return type("O", (), {"sample": self.out})()


def test_flow_loss_targets_the_velocity():
    """x_s = (1-s) x0 + s n, model time 1000 s, target v = n - x0 (RF §1.1), plain MSE."""
    torch.manual_seed(0)
    m = flow.build_flow_model(seed=0)
    scenes = world.sample_scenes(4, seed=3)
    x0 = world.render_batch(scenes)
    noise = torch.randn_like(x0)
    s = torch.tensor([0.0, 0.25, 0.5, 1.0])
    pred = torch.randn_like(x0)
    spy = _SpyUNet(pred)
    m.unet = spy
    ids = m.tokenize([world.caption(sc) for sc in scenes])
    loss, p, target = flow_train.flow_loss(m, x0, ids, s, noise)
    xs, t, _ = spy.seen
    sv = s.view(-1, 1, 1, 1)
    torch.testing.assert_close(xs, (1 - sv) * x0 + sv * noise)
    torch.testing.assert_close(xs[0], x0[0])           # s = 0: the clean image
    torch.testing.assert_close(xs[3], noise[3])        # s = 1: pure noise
    torch.testing.assert_close(t, 1000 * s)
    torch.testing.assert_close(target, noise - x0)
    torch.testing.assert_close(loss, ((pred - (noise - x0)) ** 2).mean())
    # the exact velocity is a zero-loss prediction, and D = x - s v recovers x0
    spy.out = noise - x0
    loss0, _, _ = flow_train.flow_loss(m, x0, ids, s, noise)
    assert float(loss0) == 0.0
    torch.testing.assert_close(xs - sv * (noise - x0), x0, atol=1e-6, rtol=0)


def test_sample_times_distributions():
    g = torch.Generator().manual_seed(0)
    u = flow_train.sample_times(20000, g, "uniform")
    ln = flow_train.sample_times(20000, g, "lognorm")
    assert 0 <= float(u.min()) and float(u.max()) < 1 and abs(float(u.mean()) - 0.5) < 0.01
    assert 0 < float(ln.min()) and float(ln.max()) < 1 and float((ln > 0.95).float().mean()) < 0.01
    with pytest.raises(ValueError):
        flow_train.sample_times(3, g, "beta")


def test_flow_sigmas_and_shift():
    s = flow.flow_sigmas(4)
    assert s.tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    s3 = flow.flow_sigmas(4, shift=3.0)
    assert s3[0] == 1.0 and s3[-1] == 0.0 and abs(float(s3[2]) - 0.75) < 1e-12   # 3*0.5/(1+2*0.5)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A few steps of the real trainer, exported: ``(dir, model)``."""
    out = tmp_path_factory.mktemp("flow_run")
    args = ["--out", str(out), "--steps", "2", "--batch", "4", "--warmup", "1", "--eval-every", "0",
            "--final-eval-n", "0", "--threads", "1"]
    assert flow_train.main(args) == 0
    d = out / "model"
    return d, tm.load_model(str(d))


def test_exported_flow_model_loads(exported):
    d, m = exported
    assert flow.is_flow_model(m)
    assert type(m.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    import json
    info = json.loads((d / "toy_info.json").read_text())
    assert info["objective"] == "flow_matching" and info["trained_steps"] == 2
    # the eps toy model still loads with its DDIM scheduler
    eps_dir = ROOT / "tools" / "toyworld" / "model"
    if eps_dir.is_dir():
        assert type(tm.load_model(str(eps_dir)).scheduler).__name__ == "DDIMScheduler"
    # the weights round-trip: the denoiser of the reloaded model equals the one of a second load
    m2 = tm.load_model(str(d))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    c = m.encode_prompts(["a red circle on a white background"])
    v1 = flow.ToyFlowDenoiser(m).predict_v(x, 0.5, [c])[0]
    v2 = flow.ToyFlowDenoiser(m2).predict_v(x, 0.5, [c])[0]
    assert torch.equal(v1, v2) and v1.abs().sum() > 0


def test_denoiser_view_is_const(exported):
    """predict_x0 = x - s v (ComfyUI CONST), CFG callable combines D's."""
    _, m = exported
    fd = flow.ToyFlowDenoiser(m)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    c = m.encode_prompts(["a blue square on a gray background"])
    v = fd.predict_v(x, 0.3, [c])[0]
    d = fd.predict_x0(x, 0.3, [c])[0]
    torch.testing.assert_close(d, x - 0.3 * v)
    f = fd.guided(["a blue square on a gray background"], 2.0)
    d_u = fd.predict_x0(x, torch.tensor([0.3]), [fd.uncond])[0]
    torch.testing.assert_close(f(x, torch.tensor([0.3])), d_u + 2.0 * (d - d_u), atol=1e-5, rtol=1e-5)


def _model_for_replay(exported):
    return tm.load_model(str(MODEL_FLOW)) if (MODEL_FLOW / "unet").is_dir() else exported[1]


def test_noise_map_inversion_replays_exactly(exported):
    """RF-ancestral noise maps on the toy flow model: the replay returns the photo (< 1e-5 relative)."""
    from photoops.kernels import flow_inversion as kfi
    from photoops.kernels.schedule import invertible_sigmas

    m = _model_for_replay(exported)
    scenes = world.sample_scenes(2, seed=11)
    x0 = world.render_batch(scenes)
    fd = flow.ToyFlowDenoiser(m)
    g = fd.guided([world.caption(s) for s in scenes], 2.0)
    sig, info = invertible_sigmas(flow.flow_sigmas(12), flow.sigma_min())
    assert info["final_zero_replaced"] and float(sig[-1]) == pytest.approx(1e-3)
    x_start, zs, lad = kfi.rf_ancestral_invert(g, x0, sig, eta=1.0, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(x_start, x0, atol=0.1)          # it did go somewhere
    out = kfi.rf_ancestral_sample(g, x_start, sig, noises=zs)
    rel = float((out - x0).norm() / x0.norm())
    assert rel < 1e-5, rel
    # and a replay with another caption does not return the photo
    g2 = fd.guided(["a green triangle on a black background"] * 2, 2.0)
    out2 = kfi.rf_ancestral_sample(g2, x_start, sig, noises=zs)
    assert float((out2 - x0).norm() / x0.norm()) > 1e-3


@pytest.mark.skipif(not (MODEL_FLOW / "unet").is_dir(), reason="no committed toy flow model")
def test_caption_swap_on_trained_flow_model():
    """On the committed model, a caption swap on the noise maps turns a fixed photo's object the new colour."""
    from photoops.kernels import flow_inversion as kfi
    from photoops.kernels.schedule import invertible_sigmas
    from tools.toyworld import scorer

    m = tm.load_model(str(MODEL_FLOW))
    scene = world.sample_scenes(12, seed=123)[FIXED_PHOTO]
    target = world.with_colour(scene, {"red": "blue", "green": "yellow", "blue": "red", "yellow": "green"}[scene.fg])
    x0 = world.render_batch([scene])
    fd = flow.ToyFlowDenoiser(m)
    steps, skip = 20, 6
    sig, _ = invertible_sigmas(flow.flow_sigmas(steps), flow.sigma_min())
    x_start, zs, lad = kfi.rf_ancestral_invert(fd.guided([world.caption(scene)], 1.0), x0, sig, eta=1.0,
                                              generator=torch.Generator().manual_seed(123))
    out = kfi.rf_ancestral_sample(fd.guided([world.caption(target)], 3.0), lad[steps - skip], sig[skip:], noises=zs,
                                  start=skip)
    r = scorer.score(out[0].clamp(-1, 1))
    assert (r["fg"], r["shape"], r["bg"]) == (target.fg, scene.shape, scene.bg), r
    # the source caption on the same maps keeps the source colour
    back = kfi.rf_ancestral_sample(fd.guided([world.caption(scene)], 1.0), lad[steps - skip], sig[skip:], noises=zs,
                                   start=skip)
    assert scorer.score(back[0].clamp(-1, 1))["fg"] == scene.fg

