"""FlowEdit kernel (kernels/flowedit.py) against the reference maths: spec ``rectified-flow.md`` §2.4, §7 R7-R8.

The reference below is our own transcription of the spec's pseudo-code (the official
``FlowEdit_utils.py`` loop as the spec states it) in velocity form, with separate source / target
velocity functions; the kernel works on CONST denoisers ``D = z - s v`` as ComfyUI hands them.
Toy velocities ``v(z, s) = tanh(W z + b s)`` (fixed 4x4 channel mixes), float64 latents,
float32 noise draws (as the kernel and the official ``randn_like``).
"""
import pytest
import torch
from photoops.kernels.flowedit import flowedit_sample
from tiny import one_thread  # noqa: F401  (autouse fixture: one torch thread in this module)


def velocity_fn(seed):
    g = torch.Generator().manual_seed(seed)
    w, b = torch.randn(4, 4, generator=g).double() * 0.6, torch.randn(4, generator=g).double()

    def v(z, s):
        return torch.tanh(torch.einsum("oc,bchw->bohw", w, z) + b.view(1, 4, 1, 1) * s)
    return v


def as_denoiser(v):
    def d(z, sigma):
        s = float(sigma.flatten()[0])
        return z - s * v(z, s)
    return d


def sigmas(t, shift=3.0):
    u = 1.0 - torch.arange(t, dtype=torch.float64) / t
    return torch.cat([shift * u / (1 + (shift - 1) * u), torch.zeros(1, dtype=torch.float64)])


def reference(v_src, v_tar, x_src, sig, n_max, n_min, n_avg, seed):
    """The spec's loop, literally (RF §2.4)."""
    g = torch.Generator().manual_seed(seed)
    big_t = len(sig) - 1
    zt_edit = x_src.clone()
    xt_tar = None
    for i in range(big_t):
        if big_t - i > n_max:
            continue
        t_i, t_next = float(sig[i]), float(sig[i + 1])
        if big_t - i > n_min:
            acc = torch.zeros_like(x_src)
            for _ in range(n_avg):
                fwd = torch.randn(x_src.shape, generator=g, dtype=torch.float32).to(x_src)
                zt_src = (1 - t_i) * x_src + t_i * fwd
                zt_tar = zt_edit + zt_src - x_src
                acc = acc + (v_tar(zt_tar, t_i) - v_src(zt_src, t_i)) / n_avg
            zt_edit = zt_edit + (t_next - t_i) * acc
        else:
            if i == big_t - n_min:
                fwd = torch.randn(x_src.shape, generator=g, dtype=torch.float32).to(x_src)
                xt_tar = zt_edit + ((1 - t_i) * x_src + t_i * fwd) - x_src
            xt_tar = xt_tar + (t_next - t_i) * v_tar(xt_tar, t_i)
    return zt_edit if n_min == 0 else xt_tar


X = torch.randn(2, 4, 5, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


@pytest.mark.parametrize("t,n_max,n_min,n_avg", [(8, 6, 0, 1), (8, 6, 2, 3), (6, 6, 0, 2), (7, 5, 5, 1)])
def test_matches_the_reference_loop(t, n_max, n_min, n_avg):
    v_src, v_tar = velocity_fn(2), velocity_fn(3)
    ref = reference(v_src, v_tar, X, sigmas(t), n_max, n_min, n_avg, seed=4)
    got = flowedit_sample(as_denoiser(v_src), as_denoiser(v_tar), X, sigmas(t), n_max, n_min, n_avg,
                          generator=torch.Generator().manual_seed(4))
    assert float((got - ref).abs().max()) <= 1e-12
    assert float((got - X).abs().max()) > 1e-2                             # it edits


def test_identical_prompts_return_the_source_bit_for_bit():                  # R7
    v = velocity_fn(2)
    out = flowedit_sample(as_denoiser(v), as_denoiser(v), X, sigmas(8), 6, 0, 2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, X)


def test_limits_nmax_zero_and_sdedit():                                       # R8
    v_src, v_tar = velocity_fn(2), velocity_fn(3)
    sig = sigmas(8)
    assert torch.equal(flowedit_sample(as_denoiser(v_src), as_denoiser(v_tar), X, sig, 0), X)
    # n_min = n_max = 5: SDEdit from s_3 with the first noise draw
    got = flowedit_sample(as_denoiser(v_src), as_denoiser(v_tar), X, sig, 5, 5, generator=torch.Generator().manual_seed(9))
    n = torch.randn(X.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float32).double()
    x = (1 - float(sig[3])) * X + float(sig[3]) * n
    for i in range(3, 8):
        x = x + (float(sig[i + 1]) - float(sig[i])) * v_tar(x, float(sig[i]))
    assert float((got - x).abs().max()) <= 1e-12


def test_seeded_and_checked():
    v_src, v_tar = velocity_fn(2), velocity_fn(3)
    run = [flowedit_sample(as_denoiser(v_src), as_denoiser(v_tar), X, sigmas(6), 5, generator=torch.Generator().manual_seed(s))
           for s in (1, 1, 2)]
    assert torch.equal(run[0], run[1]) and not torch.equal(run[0], run[2])
    with pytest.raises(ValueError, match="n_min"):
        flowedit_sample(as_denoiser(v_src), as_denoiser(v_tar), X, sigmas(6), 3, 4)
    with pytest.raises(ValueError, match="n_avg"):
        flowedit_sample(as_denoiser(v_src), as_denoiser(v_tar), X, sigmas(6), 3, 0, 0)
    with pytest.raises(ValueError, match="flow time"):
        flowedit_sample(as_denoiser(v_src), as_denoiser(v_tar), X, torch.tensor([14.6, 2.0, 0.0]), 2)


def test_takes_its_device_from_the_inputs():
    meta = torch.device("meta")
    x = torch.empty(1, 4, 5, 6, device=meta)
    out = flowedit_sample(lambda z, s: z * 0.5, lambda z, s: z * 0.25, x, sigmas(5), 4, 1, 2,
                          generator=torch.Generator().manual_seed(0))
    assert out.device == meta
