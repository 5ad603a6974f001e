"""DDIM / edit-friendly DDPM / Eta Inversion kernels (kernels/inversion.py).

Spec properties: ddpm-inversion-sega-ledits.md §5 (P1-P5, P23, P24) and eta-inversion.md §8
(E1, E3-E5, E9, E11-E14; E6-E8, E10 are in test_eta.py).  Parity with diffusers 0.42.1
(issue 4 "Must show"): LEdits++ ``invert`` with a DDIM scheduler, ``DDIMInverseScheduler``
step by step, ``DDIMScheduler.step`` with eta and variance noise.

Two denoisers: a deterministic toy (x0-prediction = tanh of a fixed channel mix, pointwise
in space, float32 or float64) and a tiny random diffusers UNet through
``DiffusersDenoiser`` (float32).  The diffusers components are built once per module.
"""
import math

import pytest
import torch

from photoops.kernels.eta import PRESETS, per_step_eta
from photoops.kernels.inversion import (
    ancestral_split,
    ddim_eta_step,
    ddim_invert,
    ddim_invert_step,
    ddpm_invert,
    dpmpp_2m_sde_invert,
    dpmpp_2m_sde_step,
    eta_inversion_noises,
    replay_dpmpp_2m_sde,
    replay_sample,
    select_candidate,
)
from photoops.kernels.schedule import VPSchedule

SCHED = VPSchedule.scaled_linear()
N = 10


from tiny import one_thread  # noqa: E402,F401  (autouse fixture: one torch thread in this module)


def ddim_sigmas(timesteps, final="s_final", sched=SCHED, dtype=torch.float64):
    """Sampling list at integer timesteps, ending at sigma(t=0) (diffusers abar_final = abar_0) or 0."""
    end = sched.sigmas[:1] if final == "s_final" else torch.zeros(1, dtype=torch.float64)
    return torch.cat([sched.sigmas[torch.as_tensor(timesteps)], end]).to(dtype)


def karras_sigmas(n=12, smin=0.0292, smax=14.6, rho=7.0):
    r = torch.linspace(0, 1, n, dtype=torch.float64)
    return (smax ** (1 / rho) + r * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho


DDIM10 = ddim_sigmas(torch.arange(901, 0, -100))            # 901, 801, ..., 1, then s_final
SIGMA_LISTS = {"ddim10": DDIM10, "karras12": karras_sigmas()}


class Toy:
    """k-diffusion denoiser: D(x, s) = tanh(W x / sqrt(1 + s^2) + b log s), W a fixed 4x4 channel mix.

    Pointwise in space (pixels are independent, used by E9).  ``eps_vp(v, s)`` is the same
    network seen as a VP epsilon model fed the VP input ``v`` at noise level ``s``.
    """

    def __init__(self, dtype=torch.float64, seed=0, channels=4):
        g = torch.Generator().manual_seed(seed)
        self.W = (torch.randn(channels, channels, generator=g, dtype=torch.float64) * 0.6).to(dtype)
        self.b = (torch.randn(channels, generator=g, dtype=torch.float64) * 0.1).to(dtype)
        self.calls = 0

    def net(self, v, s):
        return torch.tanh(torch.einsum("oc,bchw->bohw", self.W.to(v.dtype), v)
                          + self.b.to(v.dtype)[:, None, None] * math.log(s))

    def __call__(self, x, sigma):
        assert sigma.shape == (x.shape[0],)
        self.calls += 1
        s = float(sigma[0])
        return self.net(x / math.sqrt(1.0 + s * s), s)

    def eps_vp(self, v, s):
        return (v * math.sqrt(1.0 + s * s) - self.net(v, s)) / s


def latent(dtype=torch.float64, seed=0, shape=(2, 4, 16, 16)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def rel(a, b):
    return float((a - b).norm() / b.norm())


# ============================================================================ VP formulas (own, float64)

def abar_of(s):
    return 1.0 / (1.0 + s * s)


def vp_var(ab_t, ab_p):
    """var(t, p) of DDPM §0."""
    return (1 - ab_p) / (1 - ab_t) * (1 - ab_t / ab_p)


def vp_ddim_step(x_vp, ab_t, ab_p, e, eta, z):
    """DDIMstep(x, t, p, e, eta, z) of DDPM §0 (Song et al. eq. 12), eta may be a map."""
    std = eta * math.sqrt(vp_var(ab_t, ab_p))
    x0_hat = (x_vp - math.sqrt(1 - ab_t) * e) / math.sqrt(ab_t)
    return math.sqrt(ab_p) * x0_hat + (1 - ab_p - std ** 2) ** 0.5 * e + std * z


# ============================================================================ the step

def kdiff_get_ancestral_step(sigma_from, sigma_to, eta=1.0):
    """k-diffusion's formula, written out: returns (down, up)."""
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2) ** 0.5)
    sigma_down = (sigma_to ** 2 - sigma_up ** 2) ** 0.5
    return sigma_down, sigma_up


@pytest.mark.parametrize("s,sn", [(14.6, 9.7), (1.3, 1.1), (0.0413, 0.0292), (3.0, 0.0)])
@pytest.mark.parametrize("eta", [0.0, 0.3, 0.7, 1.0, 1.5])
def test_ancestral_split_is_k_diffusions(s, sn, eta):
    down, up = kdiff_get_ancestral_step(s, sn, eta)
    assert ancestral_split(s, sn, eta) == (up, down)
    f64 = torch.float64
    assert ancestral_split(torch.tensor(s, dtype=f64), torch.tensor(sn, dtype=f64), torch.tensor(eta, dtype=f64)) == (up, down)


def test_ancestral_split_rejects_bad_input():
    for args in [(1.0, 2.0, 1.0), (0.0, 0.0, 1.0), (1.0, 0.5, -0.1), (1.0, 0.5, torch.tensor([[0.2, -0.1]]))]:
        with pytest.raises(ValueError):
            ancestral_split(*args)


@pytest.mark.parametrize("eta", [0.0, 0.3, 0.7, 1.0])
def test_p5_split_is_the_vp_std(eta):
    """P5: s_up sqrt(abar_p) = eta sqrt(var(t,p)); s_down sqrt(abar_p) = sqrt(1 - abar_p - std^2)."""
    for t, p in [(981, 961), (501, 481), (41, 21), (1, 0)]:
        ab_t, ab_p = float(SCHED.alphas_cumprod[t]), float(SCHED.alphas_cumprod[p])
        up, down = ancestral_split(float(SCHED.sigmas[t]), float(SCHED.sigmas[p]), eta)
        std = eta * math.sqrt(vp_var(ab_t, ab_p))
        assert abs(up * math.sqrt(ab_p) - std) <= 1e-12
        assert abs(down * math.sqrt(ab_p) - math.sqrt(1 - ab_p - std ** 2)) <= 1e-12


@pytest.mark.parametrize("eta", [0.0, 0.3, 0.7, 1.0, "map"])
def test_p4_e11_sigma_step_equals_vp_ddim_step(eta):
    """P4 / E11: ddim_eta_step(x_k) * sqrt(abar_p) == VP DDIMstep with the same z (float64, <= 1e-12).

    'map' uses a per-pixel eta (element-wise formula, Eta §1/§6).
    """
    g = torch.Generator().manual_seed(3)
    x_vp, e, z = (torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64) for _ in range(3))
    if eta == "map":
        eta = torch.rand(2, 1, 8, 8, generator=g, dtype=torch.float64)
        eta[:, :, :2] = 0.0
    for t, p in [(981, 881), (601, 581), (21, 1), (1, 0)]:
        ab_t, ab_p = float(SCHED.alphas_cumprod[t]), float(SCHED.alphas_cumprod[p])
        s_t, s_p = float(SCHED.sigmas[t]), float(SCHED.sigmas[p])
        x_k = x_vp / math.sqrt(ab_t)
        d = x_k - s_t * e                                   # D = x0_hat
        ours = ddim_eta_step(x_k, d, s_t, s_p, eta, z) * math.sqrt(ab_p)
        ref = vp_ddim_step(x_vp, ab_t, ab_p, e, eta, z)
        assert (ours - ref).abs().max() <= 1e-12, (t, p)


def test_ddim_eta_step_edges():
    x, d, n = latent(seed=1), latent(seed=2), latent(seed=3)
    assert ddim_eta_step(x, d, 1.5, 0.0, 1.0, n) is d                 # to sigma 0: deterministic, D
    det = ddim_eta_step(x, d, 1.5, 0.7, 0.0, None)                    # eta 0 needs no noise
    assert torch.allclose(det, d + 0.7 * (x - d) / 1.5, rtol=0, atol=1e-15)
    with pytest.raises(ValueError, match="noise"):
        ddim_eta_step(x, d, 1.5, 0.7, 0.5, None)
    with pytest.raises(ValueError, match="does not match"):
        ddim_eta_step(x, d, 1.5, 0.7, 0.5, n[:1])


# ============================================================================ DDPM inversion, toy

@pytest.mark.parametrize("name", sorted(SIGMA_LISTS))
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_p1_p2_round_trip_exact_for_every_skip(name, dtype, tol):
    """P1 + P2: invert then replay returns x0 (float64 <= 1e-12 abs, float32 <= 1e-5 relative), from any rung.

    The replay also lands on every corrected rung bit for bit (the "correction" I10 uses the
    sampler's own step), which is what makes every skip exact.
    """
    sig = SIGMA_LISTS[name].to(dtype)
    n = len(sig) - 1
    toy, x0 = Toy(dtype), latent(dtype)
    x_start, zs, ladder = ddpm_invert(toy, x0, sig, generator=torch.Generator().manual_seed(5))
    seen = []
    out = replay_sample(toy, x_start, sig, noises=zs, callback=lambda d: seen.append(d["x"]))
    assert torch.equal(out, ladder[0])
    for j, x in enumerate(seen):
        assert torch.equal(x, ladder[n - j])
    err = (out - x0).abs().max() if dtype == torch.float64 else rel(out, x0)
    assert err <= tol
    for skip in (1, n // 2, n - 1):
        out_k = replay_sample(toy, ladder[n - skip], sig[skip:], noises=zs, start=skip)
        assert torch.equal(out_k, ladder[0])
    # negative control: mis-keyed noise maps (start forgotten) do not reconstruct
    wrong = replay_sample(toy, ladder[n - 3], sig[3:], noises=zs, start=0)
    assert rel(wrong, x0) > 1e-2


@pytest.mark.parametrize("eta", [0.1, 0.5, 0.9, 1.0, "per_step", "maps"])
def test_p3_round_trip_exact_for_any_eta(eta):
    """P3: any eta in (0, 1], per-step sequences and per-pixel maps too (float64)."""
    sig = DDIM10
    toy, x0 = Toy(), latent()
    if eta == "per_step":
        eta = [0.2 + 0.08 * i for i in range(N)]
    elif eta == "maps":
        eta = 0.05 + 0.95 * torch.rand(N, 2, 1, 16, 16, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    x_start, zs, _ = ddpm_invert(toy, x0, sig, eta=eta, generator=torch.Generator().manual_seed(1))
    out = replay_sample(toy, x_start, sig, noises=zs, eta=eta)
    assert (out - x0).abs().max() <= 1e-12
    # and the eta matters: replaying with another eta does not reconstruct
    assert (replay_sample(toy, x_start, sig, noises=zs, eta=0.05) - x0).abs().max() > 1e-3


@pytest.mark.parametrize("bad", [0.0, -0.5, [1.0] * (N - 1) + [0.0], "map0", [1.0] * (N - 1)])
def test_ddpm_rejects_eta_le_zero(bad):
    if bad == "map0":
        bad = torch.ones(N, 2, 1, 16, 16)
        bad[4, 1, 0, 3, 3] = 0.0
    with pytest.raises(ValueError, match="eta"):
        ddpm_invert(Toy(), latent(), DDIM10, eta=bad)


def test_last_step_to_sigma_zero_is_documented_inexact():
    """A list ending at sigma 0: z_last = 0 and the bottom becomes D; replay == ladder[0] != x0."""
    sig = ddim_sigmas(torch.arange(901, 0, -100), final="zero")
    toy, x0 = Toy(), latent()
    x_start, zs, ladder = ddpm_invert(toy, x0, sig, generator=torch.Generator().manual_seed(0))
    assert torch.all(zs[-1] == 0)
    out = replay_sample(toy, x_start, sig, noises=zs)
    assert torch.equal(out, ladder[0])
    assert (out - x0).abs().max() > 1e-3


def test_p23_shapes_dtypes_finite():
    for dtype in (torch.float32, torch.float64):
        x0 = latent(dtype, shape=(3, 4, 8, 12))
        x_start, zs, ladder = ddpm_invert(Toy(dtype), x0, DDIM10.to(dtype), generator=torch.Generator().manual_seed(0))
        assert x_start.shape == (3, 4, 8, 12) and zs.shape == (N, 3, 4, 8, 12) and ladder.shape == (N + 1, 3, 4, 8, 12)
        assert x_start.dtype == zs.dtype == ladder.dtype == dtype
        assert torch.isfinite(zs).all() and torch.isfinite(ladder).all()
    # half-precision latents are inverted in float32 (DDPM §1.5/§1.7: z divides by a small s_up)
    x_start, zs, ladder = ddpm_invert(Toy(torch.float32), latent(torch.float32).half(), DDIM10,
                                      generator=torch.Generator().manual_seed(0))
    assert zs.dtype == ladder.dtype == torch.float32 and torch.isfinite(zs).all()
    assert ddim_invert(Toy(torch.float32), latent(torch.float32).half(), DDIM10).dtype == torch.float32


def test_p24_determinism_and_rng_order():
    """P24: same seed -> identical ladder and z; another seed -> other z, still exact.

    RNG order (diffusers LEdits++): one x0-shaped draw per step, least noisy rung first.
    """
    toy, x0 = Toy(), latent()
    a = ddpm_invert(toy, x0, DDIM10, generator=torch.Generator().manual_seed(11))
    b = ddpm_invert(toy, x0, DDIM10, generator=torch.Generator().manual_seed(11))
    c = ddpm_invert(toy, x0, DDIM10, generator=torch.Generator().manual_seed(12))
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert (a[1] - c[1]).abs().max() > 0.1
    assert (replay_sample(toy, c[0], DDIM10, noises=c[1]) - x0).abs().max() <= 1e-12
    g = torch.Generator().manual_seed(11)
    draws = [torch.randn(x0.shape, generator=g, dtype=x0.dtype) for _ in range(N)]
    noise = torch.stack(draws[::-1])                 # noise[i] for the rung at sigmas[i]
    assert torch.equal(a[0], x0 + float(DDIM10[0]) * noise[0])
    d = ddpm_invert(toy, x0, DDIM10, noise=noise)
    assert all(torch.equal(u, v) for u, v in zip(a, d))
    with pytest.raises(ValueError, match="shape"):
        ddpm_invert(toy, x0, DDIM10, noise=noise[1:])


def test_vp_final_level_scaling():
    """vp_final=True: the ladder bottom is x0 sqrt(1 + s_final^2) (S3), rungs unchanged; replay returns it."""
    toy, x0 = Toy(), latent()
    a = ddpm_invert(toy, x0, DDIM10, generator=torch.Generator().manual_seed(2))
    b = ddpm_invert(toy, x0, DDIM10, generator=torch.Generator().manual_seed(2), vp_final=True)
    assert torch.equal(a[0], b[0])
    k = math.sqrt(1 + float(DDIM10[-1]) ** 2)
    out = replay_sample(toy, b[0], DDIM10, noises=b[1])
    assert (out - x0 * k).abs().max() <= 1e-12
    assert (out * math.sqrt(abar_of(float(DDIM10[-1]))) - x0).abs().max() <= 1e-12
    assert (a[1][-1] - b[1][-1]).abs().max() > 1e-4          # only a final-level difference, but a real one


def test_replay_sampler_interface():
    """k-diffusion signature: extra_args forwarded, callback keys every step, clear errors."""
    toy, x0 = Toy(), latent()
    x_start, zs, _ = ddpm_invert(toy, x0, DDIM10, generator=torch.Generator().manual_seed(0))
    got = []

    def model(x, sigma, cond=None):
        assert cond == "c"
        return toy(x, sigma)

    replay_sample(model, x_start, DDIM10.float(), extra_args={"cond": "c"}, callback=got.append, noises=zs,
                  disable=True)
    assert [d["i"] for d in got] == list(range(N))
    assert all(set(d) == {"x", "i", "sigma", "sigma_hat", "denoised"} for d in got)
    assert float(got[3]["sigma"]) == pytest.approx(float(DDIM10[3]), rel=1e-6)
    with pytest.raises(ValueError, match="noise maps"):
        replay_sample(toy, x_start, DDIM10, noises=zs[:5])
    with pytest.raises(ValueError, match="eta"):
        replay_sample(toy, x_start, DDIM10, noises=zs, eta=[1.0] * 4)
    with pytest.raises(ValueError, match="descending"):
        replay_sample(toy, x_start, DDIM10.flip(0), noises=zs)


def test_interrupt_and_callback_during_inversion():
    toy, x0 = Toy(), latent()
    calls = []
    ddim_invert(toy, x0, DDIM10, callback=calls.append)
    assert [c["i"] for c in calls] == list(range(N)) and calls[-1]["sigma"] == float(DDIM10[0])
    with pytest.raises(InterruptedError):
        ddpm_invert(toy, x0, DDIM10, interrupt=lambda: toy.calls >= 3)

    def boom():
        raise RuntimeError("stop")
    with pytest.raises(RuntimeError, match="stop"):
        ddim_invert(toy, x0, DDIM10, interrupt=boom)


# ============================================================================ DDIM inversion, toy

@pytest.mark.parametrize("final", ["s_final", "zero"])
def test_e12_ddim_inversion_equals_vp_sameshift(final):
    """E12: sigma-space sameshift inversion (input rescaling I5-I7) == VP reference, float64 <= 1e-10.

    VP reference (Eta §2): e = eps(x_u, t); x_t = sqrt(abar_t)(x_u - sqrt(1-abar_u) e)/sqrt(abar_u) + sqrt(1-abar_t) e,
    starting from abar_final = abar_0 ("s_final") or abar = 1 ("zero").
    """
    sig = ddim_sigmas(torch.arange(901, 0, -100), final=final)
    toy, x0 = Toy(), latent()
    ladder = ddim_invert(toy, x0, sig)
    levels = sig.flip(0).tolist()
    x_vp = x0 * math.sqrt(abar_of(levels[0]))
    assert torch.equal(ladder[0], x0)
    for k in range(N):
        s_u, s_t = levels[k], levels[k + 1]
        ab_u, ab_t = abar_of(s_u), abar_of(s_t)
        e = toy.eps_vp(x_vp, s_t)
        x_vp = math.sqrt(ab_t) * (x_vp - math.sqrt(1 - ab_u) * e) / math.sqrt(ab_u) + math.sqrt(1 - ab_t) * e
        assert (ladder[k + 1] * math.sqrt(ab_t) - x_vp).abs().max() <= 1e-10, k


# ============================================================================ Eta Inversion, toy

def _eta_setup(dtype=torch.float64):
    toy, x0 = Toy(dtype), latent(dtype, shape=(1, 4, 16, 16))
    sig = DDIM10.to(dtype)
    return toy, x0, sig, ddim_invert(toy, x0, sig)


def test_e1_eta_zero_is_exactly_ddim():
    """E1: eta == 0 everywhere (or an all-zero mask): zero noises, no model call, replay == deterministic DDIM."""
    toy, x0, sig, ladder = _eta_setup()
    calls = toy.calls
    noises, etas, idx = eta_inversion_noises(toy, ladder, sig, 0.0, generator=torch.Generator().manual_seed(0),
                                             return_indices=True)
    assert toy.calls == calls and torch.all(noises == 0) and torch.all(etas == 0) and torch.all(idx == -1)
    ddim = replay_sample(toy, ladder[N], sig, noises=None, eta=0.0)
    assert torch.equal(replay_sample(toy, ladder[N], sig, noises=noises, eta=etas), ddim)
    # the deterministic DDIM chain, written out in VP form (DDIMstep with eta 0), float64
    x_vp = ladder[N] * math.sqrt(abar_of(float(sig[0])))
    for i in range(N):
        s, sp = float(sig[i]), float(sig[i + 1])
        x_vp = vp_ddim_step(x_vp, abar_of(s), abar_of(sp), toy.eps_vp(x_vp, s), 0.0, 0.0)
    assert (ddim * math.sqrt(abar_of(float(sig[-1]))) - x_vp).abs().max() <= 1e-12
    # mask all zero: eta maps are zero, same DDIM result (the split goes through the map path)
    noises_m, etas_m = eta_inversion_noises(toy, ladder, sig, PRESETS["paper_A"], eta_mask=torch.zeros(1, 1, 16, 16),
                                            generator=torch.Generator().manual_seed(0), schedule=SCHED)
    assert etas_m.shape == (N, 1, 1, 16, 16) and torch.all(etas_m == 0)
    assert (replay_sample(toy, ladder[N], sig, noises=noises_m, eta=etas_m) - ddim).abs().max() <= 1e-12
    # DDIM inversion is not exact: the source is NOT reconstructed (documented, not a bug)
    assert (ddim - x0).abs().max() > 1e-4


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_e3_optimal_noise_lands_on_the_inverted_latent(dtype, tol):
    """E3: mu_eta(L[N-i]) + s_up n* == L[N-i-1] per step; store_optimal replay reconstructs the source."""
    toy, x0, sig, ladder = _eta_setup(dtype)
    eta_fn = PRESETS["linear_default"]                     # > 0 on every step of this list
    noises, etas = eta_inversion_noises(toy, ladder, sig, eta_fn, store_optimal=True, schedule=SCHED)
    assert torch.all(etas > 0)
    for i in range(N):
        x = ladder[N - i]
        d = toy(x, torch.full((1,), float(sig[i]), dtype=dtype))
        step = ddim_eta_step(x, d, sig[i], sig[i + 1], float(etas[i]), noises[i])
        assert (step - ladder[N - i - 1]).abs().max() <= tol * max(1.0, float(ladder[N - i - 1].abs().max()))
    out = replay_sample(toy, ladder[N], sig, noises=noises, eta=etas)
    assert rel(out, x0) <= tol
    # an all-ones mask gives the same reconstruction (maps path)
    noises1, etas1 = eta_inversion_noises(toy, ladder, sig, eta_fn, eta_mask=torch.ones(1, 1, 16, 16),
                                          store_optimal=True, schedule=SCHED)
    assert rel(replay_sample(toy, ladder[N], sig, noises=noises1, eta=etas1), x0) <= tol


def test_e4_e5_candidate_selection():
    """E4: the selected candidate's loss is non-increasing in K on a shared seed prefix; E5: K=1 -> first draw."""
    toy, _, sig, ladder = _eta_setup(torch.float32)
    one_step = sig[:2]
    lad1 = ladder[N - 1:]                                    # levels sig[1], sig[0]
    n_star, _ = eta_inversion_noises(toy, lad1, one_step, 0.6, store_optimal=True)
    draws = torch.randn((10, 1, 4, 16, 16), generator=torch.Generator().manual_seed(4))
    losses = []
    for k in range(1, 11):
        sel, _ = eta_inversion_noises(toy, lad1, one_step, 0.6, candidates=k, generator=torch.Generator().manual_seed(4))
        want = draws[int(((draws[:k] - n_star[0]) ** 2).mean(dim=(1, 2, 3, 4)).argmin())]
        assert torch.equal(sel[0], want)
        losses.append(float(((sel[0] - n_star[0]) ** 2).mean()))
    assert all(b <= a for a, b in zip(losses, losses[1:])) and losses[-1] < losses[0]
    # E5 over a whole run: K = 1 selects the first (only) draw of every step; eta-0 steps consume theirs too
    eta_steps = [0.5, 0.0, 0.3] + [0.2] * (N - 3)
    sel, _ = eta_inversion_noises(toy, ladder, sig, eta_steps, candidates=1, generator=torch.Generator().manual_seed(8))
    g = torch.Generator().manual_seed(8)
    first = [torch.randn((1, 1, 4, 16, 16), generator=g)[0] for _ in range(N)]
    for i in range(N):
        assert torch.equal(sel[i], first[i] if eta_steps[i] > 0 else torch.zeros_like(first[i]))


def test_select_candidate_per_image():
    g = torch.Generator().manual_seed(0)
    cand = torch.randn(8, 2, 4, 4, 4, generator=g)
    n_star = torch.stack([cand[3, 0], cand[6, 1]]) + 1e-3
    sel, idx, loss = select_candidate(n_star, cand)
    assert idx.tolist() == [3, 6] and loss.shape == (8, 2)
    assert torch.equal(sel, torch.stack([cand[3, 0], cand[6, 1]]))


def test_e9_background_follows_ddim_outside_the_mask():
    """E9: pointwise toy, mask on region R: pixels outside R follow the DDIM trajectory (<= 1e-6)."""
    toy, _, sig, ladder = _eta_setup(torch.float32)
    mask = torch.zeros(1, 1, 16, 16)
    mask[:, :, 4:12, 2:9] = 1
    noises, etas = eta_inversion_noises(toy, ladder, sig, PRESETS["paper_A"], eta_mask=mask,
                                        generator=torch.Generator().manual_seed(0), schedule=SCHED)
    edit = replay_sample(toy, ladder[N], sig, noises=noises, eta=etas)
    ddim = replay_sample(toy, ladder[N], sig, noises=None, eta=0.0)
    out = ~mask.bool().expand_as(edit)
    assert (edit - ddim)[out].abs().max() <= 1e-6
    assert (edit - ddim)[~out].abs().max() > 1e-3            # inside R the injected noise changes the result


def test_e13_e14_shapes_and_determinism():
    toy, _, sig, ladder = _eta_setup(torch.float32)
    mask = torch.ones(1, 1, 16, 16)
    a = eta_inversion_noises(toy, ladder, sig, PRESETS["paper_B"], eta_mask=mask, generator=torch.Generator().manual_seed(3),
                             schedule=SCHED, return_indices=True)
    b = eta_inversion_noises(toy, ladder, sig, PRESETS["paper_B"], eta_mask=mask, generator=torch.Generator().manual_seed(3),
                             schedule=SCHED, return_indices=True)
    c = eta_inversion_noises(toy, ladder, sig, PRESETS["paper_B"], eta_mask=mask, generator=torch.Generator().manual_seed(4),
                             schedule=SCHED, return_indices=True)
    assert ladder.shape == (N + 1, 1, 4, 16, 16)
    assert a[0].shape == (N, 1, 4, 16, 16) and a[0].dtype == torch.float32
    assert a[1].shape == (N, 1, 1, 16, 16) and a[2].shape == (N, 1) and a[2].dtype == torch.long
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a[2], c[2])
    positive = per_step_eta(PRESETS["paper_B"], sig, SCHED) > 0    # paper_B: 0 below t = 300 (last 3 steps)
    assert positive.tolist() == [True] * 7 + [False] * 3
    assert torch.all((a[2][positive] >= 0) & (a[2][positive] < 10)) and torch.all(a[2][~positive] == -1)
    assert torch.all(a[0][~positive] == 0)
    with pytest.raises(ValueError, match="schedule"):
        eta_inversion_noises(toy, ladder, sig, PRESETS["paper_B"])
    with pytest.raises(ValueError, match="levels"):
        eta_inversion_noises(toy, ladder[1:], sig, 0.5)


# ============================================================================ diffusers parity

class _World:
    """Tiny SD-shaped components built in code (testing-offline.md §2, byte tokenizer §3)."""

    def __init__(self):
        from photoops.kernels.diffusers_adapter import DiffusersDenoiser
        from tiny import tiny_ledits_pipeline

        self.pipe, self.uncond = tiny_ledits_pipeline(0)
        self.unet, self.scheduler = self.pipe.unet, self.pipe.scheduler
        self.config = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                           set_alpha_to_one=False, steps_offset=1)
        # the same alpha-bar table as diffusers (float32 cumprod), so sigmas hit its timesteps exactly
        self.schedule = VPSchedule(self.scheduler.alphas_cumprod)
        self.den = DiffusersDenoiser(self.unet, self.schedule)

    def denoise(self, x, sigma):
        return self.den.predict_x0(x, sigma, [self.uncond])[0]

    def sigmas(self, timesteps, final="s_final"):
        return ddim_sigmas(timesteps, final=final, sched=self.schedule)


@pytest.fixture(scope="module")
def world():
    pytest.importorskip("diffusers")
    return _World()


def test_ledits_pp_invert_parity(world):
    """Issue 4 (a): our ddpm_invert reproduces LEdits++ ``invert`` (DDIM) ``pipe.zs`` and ``pipe.init_latents``.

    Matched: the timestep list (``set_timesteps(int(N (1 + skip)))``, leading, offset 1, last N
    kept -> 811, 721, ..., 1), then the final level abar_0 (``set_alpha_to_one=False``) as
    ``s_final``; the RNG order (one x0-shaped draw per step from the least noisy up, with the
    passed generator); the empty-source unconditional prediction; and the final-level VP
    scaling (``vp_final=True``, DDPM §1.6): diffusers' ``x0`` is the VP sample at abar_0.

    Tolerances (measured on this setup in float32: |dz_i| std_i <= 1.6e-6, init <= 5e-7):
    diffusers builds the ladder in VP form (sqrt(abar) x0 + sqrt(1-abar) n) and we in k-form
    (x0 + s n, fed as x / sqrt(1+s^2)), so inputs differ by float32 rounding (~1e-7 relative);
    z_i divides those differences by std_i = eta sqrt(var_i) (0.02 at the last step), so we
    bound |dz_i| * std_i, i.e. the difference of the latents the z produce, by 1e-5 (spec §6
    asks <= 1e-4 abs on latents), and the start latent by 1e-5 absolute.
    """
    from PIL import Image

    w = world
    g = torch.Generator().manual_seed(0)
    img = Image.fromarray((torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy())
    n_inv, skip, seed = N, 0.15, 7
    w.pipe.invert(image=img, source_prompt="", num_inversion_steps=n_inv, skip=skip,
                  generator=torch.Generator().manual_seed(seed))
    ts = w.pipe.inversion_steps.long()
    assert ts.tolist() == [811, 721, 631, 541, 451, 361, 271, 181, 91, 1]
    x0 = w.pipe.encode_image(img)[0]
    sig = w.sigmas(ts).to(torch.float32)
    x_start, zs, _ = ddpm_invert(w.denoise, x0, sig, generator=torch.Generator().manual_seed(seed), vp_final=True)
    assert zs.shape == w.pipe.zs.shape
    for i in range(n_inv):
        up, _ = ancestral_split(sig[i], sig[i + 1], 1.0)
        std = up * math.sqrt(abar_of(float(sig[i + 1])))          # P5: VP std of step i
        assert float((zs[i] - w.pipe.zs[i]).abs().max()) * std <= 1e-5, i
    init_vp = x_start * math.sqrt(abar_of(float(sig[0])))
    assert (init_vp - w.pipe.init_latents).abs().max() <= 1e-5
    # sensitivity: without the final-level scaling the last step's z is off by far more
    _, zs_plain, _ = ddpm_invert(w.denoise, x0, sig, generator=torch.Generator().manual_seed(seed))
    assert (zs_plain[-1] - w.pipe.zs[-1]).abs().max() > 1e-3
    # and replaying our maps with the UNet returns the VP x0 after k_to_vp (P1 through diffusers)
    out = replay_sample(lambda x, s: w.denoise(x, s), x_start, sig, noises=zs)
    assert rel(out * math.sqrt(abar_of(float(sig[-1]))), x0) <= 1e-5


@pytest.mark.parametrize("set_alpha_to_one", [False, True])
def test_ddim_inverse_scheduler_parity(world, set_alpha_to_one):
    """Issue 4 (b): ddim_invert vs diffusers ``DDIMInverseScheduler``, step by step and over the trajectory.

    Timestep conventions: the inverse scheduler visits 1, 101, ..., 901 upwards; its
    ``step(eps, t, x)`` goes from level ``t - 100`` to ``t`` with the UNet called at ``t`` on the
    current latent - in diffusers 0.42.1 that IS "sameshift" (older diffusers, and what
    eta-inversion.md §10 warns about, stepped from ``t`` to ``t + 100``: "samesame").  Its first
    step starts at ``initial_alpha_cumprod``: abar_0 with ``set_alpha_to_one=False`` (our list
    ending at s_final = sigma(t=0)) or 1 with True (our list ending at 0).  So everything is
    comparable here after the VP <-> k scaling x_k = x_vp / sqrt(abar) (S3); a negative control
    shows that evaluating at the source level instead would be caught.

    Tolerances: per step 5e-6 absolute (measured <= 1e-6 on latents up to ~1.8: a few float32
    ulps through one UNet call); trajectory 5e-5 (measured <= 5e-6, 10 chained steps).
    """
    from diffusers import DDIMInverseScheduler

    w = world
    cfg = dict(w.config, set_alpha_to_one=set_alpha_to_one)
    inv = DDIMInverseScheduler(**cfg)
    inv.set_timesteps(N)
    assert inv.timesteps.tolist() == list(range(1, 1000, 100))
    x0 = latent(torch.float32, seed=3, shape=(1, 4, 16, 16)) * 0.5
    traj = [x0]
    with torch.no_grad():
        for t in inv.timesteps:
            eps = w.unet(traj[-1], t, encoder_hidden_states=w.uncond).sample
            traj.append(inv.step(eps, t, traj[-1]).prev_sample)
    sig = w.sigmas(inv.timesteps.flip(0), final="zero" if set_alpha_to_one else "s_final")
    levels = sig.flip(0).tolist()                                   # level of traj[k]
    k_of = [math.sqrt(1 + s * s) for s in levels]                   # x_k = x_vp * sqrt(1 + s^2)
    ladder = ddim_invert(w.denoise, x0 * k_of[0], sig.to(torch.float32))
    for k in range(N + 1):
        assert (ladder[k] / k_of[k] - traj[k]).abs().max() <= 5e-5, k
    for k in range(N):
        x_next, _ = ddim_invert_step(w.denoise, traj[k] * k_of[k], levels[k], levels[k + 1])
        assert (x_next / k_of[k + 1] - traj[k + 1]).abs().max() <= 5e-6, k
    # negative control: a "samesame" step (model at the source level) is far off
    k = 4
    x_src = traj[k] * k_of[k]
    d = w.denoise(x_src, torch.tensor([levels[k]]))
    samesame = x_src + (levels[k + 1] - levels[k]) * (x_src - d) / levels[k]
    assert (samesame / k_of[k + 1] - traj[k + 1]).abs().max() > 1e-3


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_scheduler_step_parity(world, eta):
    """Issue 4 (c): ddim_eta_step == ``DDIMScheduler.step(eta, variance_noise)`` after the sqrt(abar_p) scaling.

    Every step of a 10-step schedule including the last one to abar_final = abar_0.
    Tolerance 5e-6 absolute on VP samples of size up to ~5 (float32 ulp there is 4.8e-7;
    same formula, different operation order; measured <= 1.5e-6, i.e. ~3 ulps).
    """
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(**world.config)
    sched.set_timesteps(N)
    ts = sched.timesteps.tolist()
    sig = world.sigmas(torch.tensor(ts)).tolist()
    g = torch.Generator().manual_seed(1)
    for i, t in enumerate(ts):
        x_vp, eps, z = (torch.randn(2, 4, 16, 16, generator=g) for _ in range(3))
        ref = sched.step(eps, t, x_vp, eta=eta, variance_noise=z).prev_sample
        ab_t = float(sched.alphas_cumprod[t])
        x_k = x_vp / math.sqrt(ab_t)
        d = x_k - sig[i] * eps
        ours = ddim_eta_step(x_k, d, sig[i], sig[i + 1], eta, z) * math.sqrt(abar_of(sig[i + 1]))
        assert (ours - ref).abs().max() <= 5e-6, (t, eta)


def test_unet_round_trips_ddpm_and_eta_inversion(world):
    """Issue 4 "exact reconstruction" on the diffusers path (tiny random UNet, float32):
    DDPM inversion + replay, and Eta Inversion with stored optimal noise + replay, <= 1e-5 relative.
    """
    w = world
    sig = w.sigmas(torch.arange(901, 0, -100)).to(torch.float32)
    x0 = latent(torch.float32, seed=5, shape=(1, 4, 16, 16)) * 0.8
    x_start, zs, ladder = ddpm_invert(w.denoise, x0, sig, generator=torch.Generator().manual_seed(1))
    out = replay_sample(w.denoise, x_start, sig, noises=zs)
    assert torch.equal(out, ladder[0]) and rel(out, x0) <= 1e-5
    out_skip = replay_sample(w.denoise, ladder[N - 4], sig[4:], noises=zs, start=4)
    assert torch.equal(out_skip, ladder[0])
    lad = ddim_invert(w.denoise, x0, sig)
    eta = per_step_eta(PRESETS["linear_default"], sig, w.schedule)
    noises, etas = eta_inversion_noises(w.denoise, lad, sig, eta, store_optimal=True)
    out_eta = replay_sample(w.denoise, lad[N], sig, noises=noises, eta=etas)
    assert rel(out_eta, x0) <= 1e-5
    # with a random UNet plain DDIM inversion is far from exact (testing-offline.md §6): the noise matters
    assert rel(replay_sample(w.denoise, lad[N], sig, eta=0.0), x0) > 1e-2


@pytest.mark.parametrize("batch", [4, 10])
def test_batched_ddpm_inversion_reconstructs(world, batch):
    """Our batched variant: one model call for several steps' rungs; replay error stays at rounding level."""
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(1, 4, 16, 16, generator=g)
    sig = world.sigmas(torch.arange(901, 0, -100)).to(torch.float32)
    calls = {"n": 0}

    def counting(x, s):
        calls["n"] += 1
        return world.denoise(x, s)

    x_seq, zs_seq, _ = ddpm_invert(world.denoise, x0, sig, generator=torch.Generator().manual_seed(1))
    x_b, zs_b, _ = ddpm_invert(counting, x0, sig, generator=torch.Generator().manual_seed(1), batch=batch)
    assert calls["n"] == math.ceil((len(sig) - 1) / batch)
    assert torch.equal(x_seq, x_b)
    out = replay_sample(world.denoise, x_b, sig, noises=zs_b)
    assert rel(out, x0) <= 1e-5
    # same maps as the sequential inversion up to rounding amplified by 1/s_up
    assert rel(zs_b, zs_seq) <= 1e-4


# ============================================================================ LEDITS++ inversion (SDE DPM-Solver++ 2M)

def kdiff_dpmpp_2m_sde(model, x, sigmas, noises):
    """k-diffusion's ``sample_dpmpp_2m_sde`` (eta 1, s_noise 1, midpoint) written out from its
    published formulas, with the noise sampler returning the given maps (DDPM §4.7)."""
    old, h_last = None, None
    for i in range(len(sigmas) - 1):
        s, sn = sigmas[i], sigmas[i + 1]
        d = model(x, torch.full((x.shape[0],), float(s), dtype=x.dtype))
        if sn == 0:
            x = d
        else:
            t, u = -math.log(s), -math.log(sn)
            h = u - t
            x = (sn / s) * math.exp(-h) * x + (-math.expm1(-2 * h)) * d
            if old is not None:
                x = x + 0.5 * (-math.expm1(-2 * h)) * (h_last / h) ** -1 * (d - old)
            x = x + noises[i] * sn * math.sqrt(-math.expm1(-2 * h))
            h_last = h
        old = d
    return x


@pytest.mark.parametrize("name", sorted(SIGMA_LISTS))
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_p17_dpm_round_trip_exact(name, dtype, tol):
    """P17: LEDITS++ (SDE DPM-Solver++ 2M) inversion then replay returns x0; every corrected rung is hit
    bit for bit; the replay is k-diffusion's sample_dpmpp_2m_sde with the stored noise (float64 1e-12)."""
    sig = SIGMA_LISTS[name].to(dtype)
    n = len(sig) - 1
    toy, x0 = Toy(dtype), latent(dtype)
    x_start, zs, ladder = dpmpp_2m_sde_invert(toy, x0, sig, generator=torch.Generator().manual_seed(5))
    seen = []
    out = replay_dpmpp_2m_sde(toy, x_start, sig, noises=zs, callback=lambda d: seen.append(d["x"]))
    assert torch.equal(out, ladder[0])
    for j, x in enumerate(seen):
        assert torch.equal(x, ladder[n - j])
    err = (out - x0).abs().max() if dtype == torch.float64 else rel(out, x0)
    assert err <= tol
    if dtype == torch.float64:
        ref = kdiff_dpmpp_2m_sde(toy, x_start, sig.tolist(), zs)
        assert (ref - out).abs().max() <= 1e-12
    # the second-order term matters: a first-order replay of the same maps does not reconstruct
    first = x_start
    for i in range(n):
        first = dpmpp_2m_sde_step(first, toy(first, torch.full((2,), float(sig[i]), dtype=dtype)), None,
                                  sig[i], sig[i + 1], None, zs[i])
    assert rel(first, x0) > 1e-3
    # and the DDPM replay of the same maps does not either
    assert rel(replay_sample(toy, x_start, sig, noises=zs), x0) > 1e-3


def test_dpm_skip_means_inverting_the_replayed_steps_only():
    """The 2M history restarts with each run, so a skipped edit must be inverted over sigmas[skip:]
    (LEdits++, DDPM §4.2); replaying part of a full-schedule inversion is not exact."""
    sig, skip = DDIM10, 3
    toy, x0 = Toy(), latent()
    x_start, zs, _ = dpmpp_2m_sde_invert(toy, x0, sig[skip:], generator=torch.Generator().manual_seed(2))
    assert (replay_dpmpp_2m_sde(toy, x_start, sig[skip:], noises=zs) - x0).abs().max() <= 1e-12
    full = dpmpp_2m_sde_invert(toy, x0, sig, generator=torch.Generator().manual_seed(2))
    part = replay_dpmpp_2m_sde(toy, full[2][len(sig) - 1 - skip], sig[skip:], noises=full[1], start=skip)
    assert (part - x0).abs().max() > 1e-6


def test_dpm_bad_input_and_sigma_zero():
    toy, x0 = Toy(), latent()
    with pytest.raises(ValueError, match="noise maps"):
        replay_dpmpp_2m_sde(toy, x0, DDIM10, noises=None)
    with pytest.raises(ValueError, match="ladder noise"):
        dpmpp_2m_sde_invert(toy, x0, DDIM10, noise=torch.zeros(3, *x0.shape, dtype=x0.dtype))
    sig0 = ddim_sigmas(torch.arange(901, 0, -100), final="zero")
    x_start, zs, ladder = dpmpp_2m_sde_invert(toy, x0, sig0, generator=torch.Generator().manual_seed(0))
    assert torch.all(zs[-1] == 0)
    out = replay_dpmpp_2m_sde(toy, x_start, sig0, noises=zs)
    assert torch.equal(out, ladder[0]) and (out - x0).abs().max() > 1e-3   # documented: not exact at sigma 0


def test_ledits_pp_dpm_invert_parity(world):
    """LEDITS++ inversion parity: LEdits++ ``invert`` with its own scheduler,
    ``DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", solver_order=2)``, gives
    ``pipe.zs`` and ``pipe.init_latents`` equal to ours on the same sigmas (its timesteps, then
    sigma 0: diffusers' ``final_sigmas_type="zero"``), noise draws and empty source prompt.

    Tolerances as in the DDIM parity above: diffusers works in VP form, we in k-form, so
    inputs differ by float32 rounding; we bound |dz_i| * S_i (S_i the VP noise std of step i,
    the latent change the z makes) by 1e-5 and the start latent by 1e-5 absolute.  The last
    step goes to sigma 0 (z = 0 in both).
    """
    from diffusers import DPMSolverMultistepScheduler
    from PIL import Image

    w = world
    pipe = w.pipe
    old_sched = pipe.scheduler

    class LongAddNoiseDPM(DPMSolverMultistepScheduler):
        def add_noise(self, original_samples, noise, timesteps):
            return super().add_noise(original_samples, noise, timesteps.long())

    pipe.scheduler = LongAddNoiseDPM(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                     algorithm_type="sde-dpmsolver++", solver_order=2, steps_offset=1,
                                     timestep_spacing="leading")
    try:
        img = Image.fromarray((torch.rand(32, 32, 3, generator=torch.Generator().manual_seed(3)) * 255)
                              .to(torch.uint8).numpy())
        n_inv, seed = 8, 11
        pipe.invert(image=img, source_prompt="", num_inversion_steps=n_inv, skip=0.25,
                    generator=torch.Generator().manual_seed(seed))
        ts = pipe.inversion_steps.long()
        x0 = pipe.encode_image(img)[0]
        sig = w.sigmas(ts, final="zero").to(torch.float32)
        x_start, zs, _ = dpmpp_2m_sde_invert(w.denoise, x0, sig, generator=torch.Generator().manual_seed(seed))
        theirs = pipe.zs                  # sampling order: index 0 = the noisiest step
        assert zs.shape == theirs.shape == (n_inv, *x0.shape)
        assert torch.all(theirs[-1] == 0) and torch.all(zs[-1] == 0)
        worst = 0.0
        for i in range(n_inv - 1):
            q = (float(sig[i + 1]) / float(sig[i])) ** 2
            std = float(sig[i + 1]) * math.sqrt(1 - q) * math.sqrt(abar_of(float(sig[i + 1])))
            worst = max(worst, float((zs[i] - theirs[i]).abs().max()) * std)
        assert worst <= 1e-5, worst
        init_vp = x_start * math.sqrt(abar_of(float(sig[0])))
        assert (init_vp - pipe.init_latents).abs().max() <= 1e-5
        # sensitivity: the DDPM inversion of the same ladder gives other maps
        _, zs_ddpm, _ = ddpm_invert(w.denoise, x0, sig, generator=torch.Generator().manual_seed(seed))
        assert (zs_ddpm[1] - theirs[1]).abs().max() > 1e-2
    finally:
        pipe.scheduler = old_sched
