"""Eta schedules (kernels/eta.py): eta-inversion.md §4 properties E6, E7, E8, E10.

No diffusers needed; pure torch, float64 where the spec asks for 1e-12.
"""
import math

import pytest
import torch

from photoops.kernels.eta import PRESETS, EtaFunction, custom_points, eta_time_function, eta_with_mask, per_step_eta
from photoops.kernels.inversion import ancestral_split, ddim_eta_step
from photoops.kernels.schedule import VPSchedule

SCHED = VPSchedule.scaled_linear()
DDIM50 = torch.arange(981, 0, -20)          # diffusers DDIM leading + offset 1, N = 50 (spec P25)


def _ddim_sigmas(timesteps):
    """Sampling list at the given timesteps, ending at s_final = sigma(t=0) (DDPM §1.6)."""
    return torch.cat([SCHED.sigmas[timesteps], SCHED.sigmas[:1]])


# ------------------------------------------------------------------------------- E6

def _reference_eta(t, u1, y1, u2, y2, q):
    """(E-1) written out independently in Python floats."""
    u = t / 999.0
    uc = min(max(u, u1), u2)
    return max(0.0, y1 + (y2 - y1) * ((uc - u1) / (u2 - u1)) ** q)


@pytest.mark.parametrize("params", [(0.6, 0.0, 1.0, 0.7, 1.0), (0.3, 0.0, 1.0, 0.2, 1.0), (0.2, 0.1, 0.8, 0.9, 2.0),
                                    (0.1, 0.8, 0.5, 0.1, 0.5)])
def test_e6_time_function_shape(params):
    """E6: == y1 for u <= u1, == y2 for u >= u2, the formula in between, monotone, never negative."""
    u1, y1, u2, y2, q = params
    f = eta_time_function(u1, y1, u2, y2, power=q)
    ts = torch.arange(0, 1000, dtype=torch.float64)
    vals = f(ts)
    assert vals.dtype == torch.float64 and vals.shape == (1000,)
    u = ts / 999
    assert torch.all(vals[u <= u1] == y1)
    assert torch.all((vals[u >= u2] - y2).abs() <= 1e-12)
    ref = torch.tensor([_reference_eta(float(t), u1, y1, u2, y2, q) for t in ts], dtype=torch.float64)
    assert (vals - ref).abs().max() <= 1e-12
    d = vals[1:] - vals[:-1]
    assert torch.all(d >= -1e-15) if y2 >= y1 else torch.all(d <= 1e-15)
    assert torch.all(vals >= 0)
    # scalars in, floats out; fractional timesteps evaluate the same formula
    assert isinstance(f(500), float) and f(500) == pytest.approx(_reference_eta(500.0, u1, y1, u2, y2, q), abs=1e-12)
    assert f(700.5) == pytest.approx(_reference_eta(700.5, u1, y1, u2, y2, q), abs=1e-12)


def test_e6_linear_between_points_for_power_one():
    f = eta_time_function(0.2, 0.1, 0.6, 0.5)
    t = torch.linspace(0.2 * 999, 0.6 * 999, 41, dtype=torch.float64)
    v = f(t)
    second_diff = v[2:] - 2 * v[1:-1] + v[:-2]
    assert second_diff.abs().max() <= 1e-12
    # power 2: halfway in u is a quarter of the way in eta
    g = eta_time_function(0.2, 0.1, 0.6, 0.5, power=2.0)
    assert g(0.4 * 999) == pytest.approx(0.1 + 0.4 * 0.25, abs=1e-12)


def test_e6_integer_timesteps_equal_the_reference_table():
    """(E-u): the reference indexes linspace(0, 1, 1000) by integer t; u = t/999 is that table."""
    table_u = torch.linspace(0, 1, 1000, dtype=torch.float64)
    f = PRESETS["paper_A"]
    ref = torch.tensor([max(0.0, 0.7 * (min(max(float(u), 0.6), 1.0) - 0.6) / 0.4) for u in table_u],
                       dtype=torch.float64)
    assert (f(torch.arange(1000)) - ref).abs().max() <= 1e-12


@pytest.mark.parametrize("bad", [dict(u1=0.5, u2=0.5), dict(u1=0.7, u2=0.3), dict(power=0.0), dict(power=-1.0),
                                 dict(y1=-0.1), dict(y2=1.5), dict(u2=1.2), dict(y1=float("nan"))])
def test_time_function_rejects_bad_parameters(bad):
    p = dict(u1=0.2, y1=0.0, u2=0.8, y2=0.5, power=1.0)
    p.update(bad)
    with pytest.raises(ValueError):
        eta_time_function(**p)


# ------------------------------------------------------------------------------- E7

TABLE_T = [981, 901, 801, 701, 601, 581]
TABLE = {
    "paper_A": [0.6685, 0.5283, 0.3532, 0.1780, 0.0028, 0.0],
    "paper_B": [0.1949, 0.1720, 0.1434, 0.1148, 0.0862, 0.0805],
    "linear_default": [0.3928, 0.3608, 0.3207, 0.2807, 0.2406, 0.2326],
}
POSITIVE_STEPS = {"paper_A": 20, "paper_B": 35, "linear_default": 50}


@pytest.mark.parametrize("name", sorted(TABLE))
def test_e7_presets_reproduce_the_spec_table(name):
    """E7: eta-inversion.md §4.1 table at t = 981 ... 581 (<= 1e-4), and the steps with eta > 0 of 50."""
    f = PRESETS[name]
    for t, want in zip(TABLE_T, TABLE[name]):
        assert f(t) == pytest.approx(want, abs=1e-4), (name, t)
    steps = per_step_eta(f, _ddim_sigmas(DDIM50), SCHED)
    assert steps.shape == (50,) and steps.dtype == torch.float32
    assert int((steps > 0).sum()) == POSITIVE_STEPS[name]


def test_preset_parameters_and_linear_default_end_points():
    assert PRESETS["paper_A"] == EtaFunction(0.6, 0.0, 1.0, 0.7)
    assert PRESETS["paper_B"] == EtaFunction(0.3, 0.0, 1.0, 0.2)
    lin = PRESETS["linear_default"]
    assert lin(0) == 0.0 and lin(999) == pytest.approx(0.4, abs=1e-15)


# ------------------------------------------------------------------------------- per-step / custom

def test_per_step_eta_uses_each_steps_starting_timestep():
    ts = torch.tensor([901, 701, 503, 250, 40])
    sig = _ddim_sigmas(ts).to(torch.float32)          # float32 sigmas as ComfyUI passes them
    f = eta_time_function(0.0, 0.05, 1.0, 0.95)
    got = per_step_eta(f, sig, SCHED)
    want = torch.tensor([f(int(t)) for t in ts], dtype=torch.float32)
    assert torch.equal(got, want)
    # a sigma between table entries maps to the nearest timestep (S4), like ComfyUI
    mid = float((SCHED.sigmas[500] * SCHED.sigmas[501]).sqrt() * 1.0001)   # slightly closer to 501 in log
    got2 = per_step_eta(f, torch.tensor([mid, 0.0]), SCHED)
    assert float(got2[0]) == pytest.approx(f(501), abs=1e-7)
    with pytest.raises(ValueError):
        per_step_eta(f, torch.tensor([1.0]), SCHED)


def test_custom_points_piecewise_linear():
    c = custom_points([(0.8, 0.6), (0.2, 0.0), (0.5, 0.3)])          # unsorted on purpose
    assert c.points == ((0.2, 0.0), (0.5, 0.3), (0.8, 0.6))
    for u, e in c.points:
        assert c(u * 999) == pytest.approx(e, abs=1e-12)
    assert c(0.35 * 999) == pytest.approx(0.15, abs=1e-12)
    assert c(0.65 * 999) == pytest.approx(0.45, abs=1e-12)
    assert c(0) == pytest.approx(0.0) and c(999) == pytest.approx(0.6)     # constant outside
    t = torch.linspace(0, 999, 101, dtype=torch.float64)
    ref = torch.tensor([c(float(v)) for v in t], dtype=torch.float64)
    assert (c(t) - ref).abs().max() <= 1e-12
    one = custom_points([(0.3, 0.25)])
    assert one(0) == one(999) == 0.25
    for bad in ([], [(0.2, 0.1), (0.2, 0.3)], [(1.5, 0.1)], [(0.5, -0.1)]):
        with pytest.raises(ValueError):
            custom_points(bad)


# ------------------------------------------------------------------------------- E8

def test_e8_masked_maps():
    """E8: binary mask from A > 0.2, same for all channels, 0 outside M and eta inside (bit-exact)."""
    g = torch.Generator().manual_seed(0)
    attn = torch.rand(2, 1, 8, 8, generator=g)
    mask = (attn > 0.2).float()
    steps = per_step_eta(PRESETS["paper_A"], _ddim_sigmas(torch.arange(981, 0, -100)), SCHED)
    maps = eta_with_mask(steps, mask)
    assert maps.shape == (10, 2, 1, 8, 8) and maps.dtype == torch.float32
    inside = mask.bool().expand_as(maps)
    assert torch.all(maps[~inside] == 0)
    want = steps.reshape(-1, 1, 1, 1, 1).expand_as(maps)
    assert torch.equal(maps[inside], want[inside])
    assert torch.all((attn > 0.2).expand_as(maps)[maps != 0])          # support of the maps within [A > 0.2]
    assert set(torch.unique(mask).tolist()) == {0.0, 1.0}
    # [B, h, w] masks (ComfyUI MASK layout) give the same maps
    assert torch.equal(eta_with_mask(steps, mask[:, 0]), maps)
    # one map per step broadcasts over 4 latent channels in the step (checked in E10)
    for bad in (torch.full((2, 1, 8, 8), 1.5), torch.zeros(2, 3, 8, 8), torch.zeros(8)):
        with pytest.raises(ValueError):
            eta_with_mask(steps, bad)


# ------------------------------------------------------------------------------- E10

@pytest.mark.parametrize("eta", [0.0, 0.35, 1.0])
def test_e10_per_pixel_step_equals_scalar_step(eta):
    """E10: where the eta map is constant the per-pixel step is bit-identical to the scalar step."""
    g = torch.Generator().manual_seed(1)
    x, d, n = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    s, sn = float(SCHED.sigmas[601]), float(SCHED.sigmas[501])
    ref = ddim_eta_step(x, d, s, sn, eta, n)
    const = torch.full((2, 1, 8, 8), eta, dtype=torch.float32)
    assert torch.equal(ddim_eta_step(x, d, s, sn, const, n), ref)
    # a map holding eta in one region and 0.8 elsewhere matches each scalar step on its region
    region = torch.zeros(2, 1, 8, 8, dtype=torch.bool)
    region[:, :, 2:6, 1:5] = True
    mixed = torch.where(region, torch.tensor(eta), torch.tensor(0.8)).float()
    out = ddim_eta_step(x, d, s, sn, mixed, n)
    other = ddim_eta_step(x, d, s, sn, 0.8, n)
    r = region.expand_as(x)
    assert torch.equal(out[r], ref[r]) and torch.equal(out[~r], other[~r])
    if eta != 0.8:
        assert not torch.equal(out, ref)


def test_e10_split_maps_equal_scalar_splits():
    s, sn = 2.5, 1.1
    etas = torch.tensor([0.0, 0.2, 0.5, 1.0, 1.7], dtype=torch.float64)
    up, down = ancestral_split(s, sn, etas)
    for k, e in enumerate(etas.tolist()):
        su, sd = ancestral_split(s, sn, e)
        assert float(up[k]) == su and math.isclose(float(down[k]), sd, rel_tol=0, abs_tol=4e-16)
