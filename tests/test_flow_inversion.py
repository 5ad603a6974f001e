"""Rectified-flow inversions (kernels/flow_inversion.py): spec ``rectified-flow.md`` §7 R1, R3-R5, R9.

Velocity models: a straight-line field (constant ``v``: Euler is exact both ways) and a smooth
toy ``v(x, s) = tanh(W x + b s)`` (a fixed 4x4 channel mix, pointwise in space), seen as the
CONST denoiser ``D = x - s v`` that ComfyUI's flow models return.  float64 and float32.
"""
import math

import pytest
import torch
from photoops.kernels.flow_inversion import (
    euler_invert,
    euler_step,
    flow_euler_sample,
    rf_ancestral_coeffs,
    rf_ancestral_invert,
    rf_ancestral_sample,
    rf_eta_per_step,
    rf_inversion_invert,
)
from tiny import one_thread  # noqa: F401  (autouse fixture: one torch thread in this module)


def shifted(n, shift=3.0, final=0.003, dtype=torch.float64):
    """SD3-style list: time_snr_shift(shift, 1 - k/n) for k < n, then ``final`` (ComfyUI 'simple' with 0 -> s_min)."""
    t = 1.0 - torch.arange(n, dtype=dtype) / n
    return torch.cat([shift * t / (1 + (shift - 1) * t), torch.tensor([final], dtype=dtype)])


class Toy:
    """CONST denoiser of the velocity ``v(x, s) = a tanh(W x + b s) + c`` (``[B, 4, H, W]`` latents)."""

    def __init__(self, seed=0, dtype=torch.float64, gain=1.0, straight=False):
        g = torch.Generator().manual_seed(seed)
        self.w = (torch.randn(4, 4, generator=g) * 0.6).to(dtype)
        self.b = torch.randn(4, generator=g).to(dtype)
        self.c = torch.randn(1, 4, 1, 1, generator=g).to(dtype)
        self.gain, self.straight, self.calls = gain, straight, 0

    def v(self, x, s):
        if self.straight:
            return self.c.to(x.dtype).expand_as(x)
        h = torch.einsum("oc,bchw->bohw", self.w.to(x.dtype), x) + self.b.to(x.dtype).view(1, 4, 1, 1) * s
        return self.gain * torch.tanh(h)

    def __call__(self, x, sigma, **kw):
        self.calls += 1
        s = sigma.to(x.dtype).view(-1, 1, 1, 1)
        return x - s * self.v(x, s)


def latent(dtype=torch.float64, seed=1, shape=(2, 4, 5, 6)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def rel(a, b):
    return float((a - b).norm() / b.norm())


# ----------------------------------------------------------------------------- (a) Euler ODE inversion

def test_straight_field_euler_inversion_is_exact():                          # R5
    toy, x0, s = Toy(straight=True), latent(), shifted(7)
    ladder, res = euler_invert(toy, x0, s)
    assert ladder.shape == (8, *x0.shape) and torch.count_nonzero(res) == 0
    torch.testing.assert_close(ladder[-1], x0 + (1.0 - 0.003) * toy.c.expand_as(x0), atol=1e-12, rtol=0)
    out = flow_euler_sample(toy, ladder[-1], s)
    assert float((out - x0).abs().max()) < 1e-12


def test_euler_round_trip_converges_first_order():                           # R4
    toy, x0 = Toy(gain=1.5), latent()
    errs = []
    for n in (10, 20, 40):
        ladder, _ = euler_invert(toy, x0, shifted(n))
        errs.append(rel(flow_euler_sample(toy, ladder[-1], shifted(n)), x0))
    assert errs[0] > errs[1] > errs[2] > 0
    ratios = [errs[0] / errs[1], errs[1] / errs[2]]
    assert all(1.6 < r < 2.6 for r in ratios), (errs, ratios)       # O(h): ~2 per doubling


def test_fixed_point_is_exact_within_its_residual():
    toy, x0, s = Toy(gain=1.5), latent(), shifted(8)
    errs = []
    for k in (0, 1, 3, 6):
        ladder, res = euler_invert(toy, x0, s, fixed_point=k)
        out = flow_euler_sample(toy, ladder[-1], s)
        errs.append(rel(out, x0))
        if k:
            assert res.shape == (8,) and float(res.max()) > 0
            # the whole round trip is off by at most the summed residuals (measured 0.27-0.72 of it)
            assert float((out - x0).abs().max()) <= float(res.sum())
            # one Euler sampling step from each rung lands on the rung below within h*Lip*r <= r
            for i in range(8):
                lvl = 8 - i
                step = euler_step(ladder[lvl], toy(ladder[lvl], torch.full((2,), s[i].item(), dtype=x0.dtype)),
                                  float(s[i]), float(s[i + 1]))
                assert float((step - ladder[lvl - 1]).abs().max()) <= float(res[i]) + 1e-15
    assert errs[0] > 1e-3 and errs[1] < errs[0] and errs[2] < errs[1] and errs[3] < errs[2]
    assert errs[3] < 2e-3 * errs[0], errs                                # ~10x per 2 iterations here
    # cost: K + 1 model calls per step
    toy.calls = 0
    euler_invert(toy, x0, s, fixed_point=3)
    assert toy.calls == 8 * 4


def test_euler_inversion_checks_inputs():
    toy, x0 = Toy(), latent()
    with pytest.raises(ValueError, match="must be > 0"):
        euler_invert(toy, x0, torch.tensor([1.0, 0.5, 0.0]))
    with pytest.raises(ValueError, match="flow time"):
        euler_invert(toy, x0, torch.tensor([14.6, 1.0, 0.03]))      # a VP (k-diffusion) list
    with pytest.raises(ValueError, match="fixed_point"):
        euler_invert(toy, x0, shifted(3), fixed_point=-1)


# ----------------------------------------------------------------------------- (b) RF ancestral noise maps

def test_rf_ancestral_marginal_identity():                                   # R3
    for s, sn in ((1.0, 0.9), (0.7, 0.3), (0.05, 0.003)):
        for eta in (0.25, 0.5, 1.0):
            ratio, scale, c = rf_ancestral_coeffs(s, sn, eta)
            assert abs((scale * ratio * s) ** 2 + c ** 2 - sn ** 2) < 1e-12
            assert abs(scale * (1 - ratio * s) - (1 - sn)) < 1e-12        # mean coefficient of x0
    assert rf_ancestral_coeffs(0.5, 0.0, 1.0) == (0.0, 1.0, 0.0)
    assert rf_ancestral_coeffs(0.5, 0.2, 0.0)[2] == 0.0


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("eta", [1.0, 0.6])
def test_noise_map_replay_reconstructs_exactly(dtype, tol, eta):            # R1
    toy, x0, s = Toy(gain=1.5, dtype=dtype), latent(dtype), shifted(9, dtype=dtype)
    x_start, zs, ladder = rf_ancestral_invert(toy, x0, s, eta=eta, generator=torch.Generator().manual_seed(4))
    assert zs.shape == (9, *x0.shape) and x_start.dtype == dtype
    out = rf_ancestral_sample(toy, x_start, s, noises=zs, eta=eta)
    assert torch.equal(out, ladder[0])                                   # the replay visits the ladder bit for bit
    assert float((out - x0).abs().max()) <= tol * float(x0.abs().max())
    for skip in (3, 8):                                                  # from a stored rung, full-schedule indices
        out = rf_ancestral_sample(toy, ladder[9 - skip], s[skip:], noises=zs, eta=eta, start=skip)
        assert float((out - x0).abs().max()) <= tol * float(x0.abs().max())
    # another model edits: the result moves
    assert rel(rf_ancestral_sample(Toy(seed=5, gain=1.5, dtype=dtype), x_start, s, noises=zs, eta=eta), x0) > 1e-2


def test_noise_maps_are_seeded_and_standard_normal_like():
    toy, x0, s = Toy(), latent(shape=(1, 4, 16, 16)), shifted(6)
    a = rf_ancestral_invert(toy, x0, s, generator=torch.Generator().manual_seed(7))
    b = rf_ancestral_invert(toy, x0, s, generator=torch.Generator().manual_seed(7))
    c = rf_ancestral_invert(toy, x0, s, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a[1], b[1]) and torch.equal(a[0], b[0]) and not torch.equal(a[1], c[1])
    # the maps solve for the fresh rung noise: roughly unit variance, except the last step's, which absorbs
    # the model's error at the clean end divided by c ~ s_final (std 190 here; the replay stays exact)
    assert all(0.3 < float(z.std()) < 3.0 for z in a[1][:-1]) and float(a[1][-1].std()) > 10


def test_noise_map_inversion_rejects_bad_settings():
    toy, x0 = Toy(), latent()
    with pytest.raises(ValueError, match="last sigma > 0"):
        rf_ancestral_invert(toy, x0, torch.tensor([1.0, 0.5, 0.0]))
    with pytest.raises(ValueError, match="0 < eta <= 1"):
        rf_ancestral_invert(toy, x0, shifted(3), eta=0.0)
    with pytest.raises(ValueError, match="noise maps for steps"):
        rf_ancestral_sample(toy, x0, shifted(3), noises=torch.zeros(2, *x0.shape))


# ----------------------------------------------------------------------------- (c) RF-Inversion

def test_rf_inversion_gamma_zero_is_euler_inversion_and_gamma_one_reaches_y1():   # R9
    toy, x0 = Toy(gain=1.5), latent()
    s = torch.cat([shifted(6)])
    ref, _ = euler_invert(toy, x0, s)
    torch.testing.assert_close(rf_inversion_invert(toy, x0, s, gamma=0.0, generator=torch.Generator().manual_seed(1)),
                               ref, atol=0, rtol=0)
    y1 = latent(seed=9)
    top = rf_inversion_invert(toy, x0, s, gamma=1.0, y1=y1)[-1]
    assert float((top - y1).abs().max()) < 1e-12                         # the straight line to y1, s_0 = 1
    mid = rf_inversion_invert(toy, x0, s, gamma=0.5, y1=y1)[-1]
    assert rel(mid, y1) < rel(ref[-1], y1)                               # the controller pulls toward y1


def test_rf_inversion_is_seeded_and_model_times_are_used():
    toy, x0, s = Toy(gain=1.5), latent(), shifted(5)
    a = rf_inversion_invert(toy, x0, s, generator=torch.Generator().manual_seed(3))
    b = rf_inversion_invert(toy, x0, s, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == (6, *x0.shape)
    quirk = rf_inversion_invert(toy, x0, s, generator=torch.Generator().manual_seed(3),
                                model_times=[(k + 1) / 5 for k in range(5)])
    assert not torch.equal(quirk, a)
    with pytest.raises(ValueError, match="gamma"):
        rf_inversion_invert(toy, x0, s, gamma=1.5)


def test_controlled_reverse_limits():                                        # R9
    toy, x0, s = Toy(gain=1.5), latent(), shifted(6)
    full = torch.cat([s, torch.zeros(1, dtype=s.dtype)])                 # sampling all the way to 0
    x1 = latent(seed=3)
    # eta = 0: exactly Euler sampling (ComfyUI sample_euler)
    plain = flow_euler_sample(toy, x1, full)
    x = x1
    for i in range(7):
        x = euler_step(x, toy(x, torch.full((2,), float(full[i]), dtype=x.dtype)), float(full[i]), float(full[i + 1]))
    assert torch.equal(plain, x)
    assert torch.equal(flow_euler_sample(toy, x1, full, y0=x0, eta=0.0), plain)
    # eta = 1 on every step: reaches y0 exactly at sigma 0 (to rounding)
    out = flow_euler_sample(toy, x1, full, y0=x0, eta=1.0)
    assert float((out - x0).abs().max()) < 1e-12
    # D_tilde form == velocity form v + eta ((x - y0)/s - v)
    eta, xs, si, sn = 0.7, latent(seed=4), 0.6, 0.45
    d = toy(xs, torch.full((2,), si, dtype=xs.dtype))
    v = (xs - d) / si
    ref = xs + (sn - si) * (v + eta * ((xs - x0) / si - v))
    got = flow_euler_sample(toy, xs, torch.tensor([si, sn], dtype=xs.dtype), y0=x0, eta=eta)
    assert float((got - ref).abs().max()) < 1e-12


def test_rf_eta_window():
    assert rf_eta_per_step(10, 0.9, 0.0, 0.38) == [0.9, 0.9, 0.9] + [0.0] * 7
    assert rf_eta_per_step(4, 1.0) == [1.0] * 4
    with pytest.raises(ValueError):
        rf_eta_per_step(4, 0.5, 0.6, 0.2)
    assert math.isclose(sum(rf_eta_per_step(28, 0.9, 0.0, 0.38)), 0.9 * 10)


def test_background_lock_keeps_the_source_outside_the_mask():
    """The Inversion Sampler's lock (kernels.inversion.BackgroundLock) on a flow replay: with a hard mask and
    another model, the source trajectory is kept exactly where the mask is 0."""
    from photoops.kernels.inversion import BackgroundLock

    toy, x0, s = Toy(gain=1.5), latent(), shifted(6)
    x_start, zs, ladder = rf_ancestral_invert(toy, x0, s, generator=torch.Generator().manual_seed(2))
    mask = torch.zeros(1, 1, 5, 6, dtype=x0.dtype)
    mask[..., :, 3:] = 1
    lock = BackgroundLock(ladder.flip(0), mask)
    edit = Toy(seed=5, gain=1.5)
    out = rf_ancestral_sample(edit, x_start, s, noises=zs, lock=lock)
    assert torch.equal(out[..., :3], ladder[0][..., :3])
    assert rel(out[..., 3:], x0[..., 3:]) > 1e-2
    ode, _ = euler_invert(toy, x0, s)                                   # an ODE replay keeps its own trajectory
    out = flow_euler_sample(edit, ode[-1], s, lock=BackgroundLock(ode.flip(0), mask))
    assert torch.equal(out[..., :3], ode[0][..., :3])


def test_edit_lock_on_a_flow_replay():
    """The edit lock (kernels.inversion.EditLock) on a flow replay: where its last mask is 0 the result is the
    photo's latent bit for bit, where it is 1 the other model's edit; the inverting model itself moves nothing,
    so it replays the photo."""
    from photoops.kernels.inversion import EditLock

    toy, x0, s = Toy(gain=1.5), latent(), shifted(6)
    x_start, zs, ladder = rf_ancestral_invert(toy, x0, s, generator=torch.Generator().manual_seed(2))
    lock = EditLock(ladder.flip(0), start=0.0)
    out = rf_ancestral_sample(Toy(seed=5, gain=1.5), x_start, s, noises=zs, lock=lock)
    kept = (lock.last == 0).expand_as(out)
    assert 0 < int(kept.sum()) < kept.numel()
    assert torch.equal(out[kept], ladder[0][kept]) and rel(out[~kept], ladder[0][~kept]) > 1e-2
    same = rf_ancestral_sample(toy, x_start, s, noises=zs, lock=EditLock(ladder.flip(0), start=0.0))
    assert rel(same, x0) < 1e-5


def test_kernels_take_their_device_from_the_inputs():
    """Every path on the meta device (as tests/test_device_discipline.py does for the VP kernels): a tensor
    made on the CPU and mixed in would raise "expected device meta", as it would on CUDA."""
    meta = torch.device("meta")
    x0, s = torch.empty(1, 4, 5, 6, device=meta), shifted(4)

    def den(x, sigma):
        assert sigma.device == meta
        return x * 0.5

    gen = torch.Generator().manual_seed(0)
    x_start, zs, ladder = rf_ancestral_invert(den, x0, s, generator=gen)
    assert rf_ancestral_sample(den, x_start, s, noises=zs).device == meta and ladder.device == meta
    assert euler_invert(den, x0, s)[0].device == meta
    assert rf_inversion_invert(den, x0, s, generator=gen).device == meta
    assert flow_euler_sample(den, x0, s, y0=x0, eta=0.5).device == meta
