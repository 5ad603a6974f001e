"""DDIM inversion, edit-friendly DDPM inversion and Eta Inversion in sigma form.

Everything here works on k-diffusion samples ``x = x0 + sigma * eps`` (ComfyUI's
samplers) and on a *denoiser* ``denoise(x, sigma) -> x0 prediction`` (a k-diffusion
model callable: ``sigma`` is a ``[B]`` tensor, the (guided) prediction is returned).
Sigma lists are SAMPLING lists: descending, ``sigmas[0]`` the noisiest level, ending at a
small ``s_final > 0`` (diffusers DDIM with ``set_alpha_to_one=False``: ``s_final =
sigma(t=0)``) or at 0.  Step ``i`` goes from ``sigmas[i]`` to ``sigmas[i+1]``.

Specs: ``ddpm-inversion-sega-ledits.md`` (cited "DDPM §") and ``eta-inversion.md``
(cited "Eta §").  Equations:

Ancestral split of a step ``s -> s'`` with stochasticity ``eta`` (DDPM §0, identical to
k-diffusion's ``get_ancestral_step``)::

    s_up   = min(s', eta * sqrt(s'^2 (s^2 - s'^2) / s^2))                     (I1)
    s_down = sqrt(s'^2 - s_up^2)                                              (I2)

Generalized DDIM step (Song et al. eq. 12) in sigma form, DDPM §0 key identity::

    eps_hat = (x - D) / s                                                     (I3)
    x'      = D + s_down * eps_hat + s_up * z                                 (I4)

which equals ``DDIMstep(x_vp, t, p, e, eta, z) / sqrt(abar_p)``; ``s_up * sqrt(abar_p) =
eta * sqrt(var(t, p))`` and ``s_down * sqrt(abar_p) = sqrt(1 - abar_p - std^2)``.  With an
eta *map* (Eta §6) (I1), (I2), (I4) are applied element-wise.

DDIM inversion, "sameshift" (Eta §2, §6): from level ``u`` up to level ``t`` the model
sees the current latent but is told ``t``.  A k-diffusion model feeds
``x / sqrt(1 + sigma^2)`` to the network, so we call it at ``s_t`` on the rescaled input::

    x_in = x_k(u) * sqrt((1 + s_t^2) / (1 + s_u^2))                           (I5)
    e    = (x_in - D(x_in, s_t)) / s_t                                        (I6)
    x_k(t) = x_k(u) + (s_t - s_u) * e                                         (I7)

(I7) is the VP step ``x_t = sqrt(abar_t) x0_hat(x_u, u, e) + sqrt(1 - abar_t) e`` divided by
``sqrt(abar_t)``.

Edit-friendly DDPM inversion (DDPM §1.2, sigma form §1.6)::

    x_k(t_i) = x0 + s_i * n_i,  n_i ~ N(0, I) i.i.d.,  x_k(final) = x0          (I8)
    z_i = (x_k(t_{i+1}) - D_i - s_down eps_hat_i) / s_up                        (I9)
    x_k(t_{i+1}) := D_i + s_down eps_hat_i + s_up z_i        ("correction")    (I10)

Eta Inversion optimal noise (Eta §3 step 4 in sigma form §6), with the source
prediction at the anchored inverted latent ``L[N-i]``::

    n*_i = (L[N-i-1] - D_src - s_down(eta_i) eps_hat_src) / s_up(eta_i)        (I11)
    k*   = argmin_k mean((n_k - n*_i)^2),   n_1..n_K ~ N(0, I) seeded draws     (I12)

LEDITS++ inversion with the SDE DPM-Solver++ 2M, midpoint (DDPM §4.3, k-space form §4.7),
a step ``s -> s'`` with ``h = log(s / s')``, ``q = (s'/s)^2 = e^{-2h}``, and, from the second
step of a run on, the previous step's prediction ``D_prev`` and ``r = h_prev / h``::

    m  = q x + (1 - q) D  [+ 0.5 (1 - q) (D - D_prev) / r]                      (I13)
    x' = m + s' sqrt(1 - q) z                                                 (I14)
    z_i = (x_k(t_{i+1}) - m_i) / (s' sqrt(1 - q))    on the ladder (I8)         (I15)

(I13)-(I14) is ComfyUI's ``sample_dpmpp_2m_sde`` with eta 1, s_noise 1, midpoint; a step to
sigma 0 returns ``D``.  The history restarts at the first step of every run, so an
inversion and its replay must start at the same step (LEdits++ inverts only the steps it
will replay, DDPM §4.2).

Ladders are returned as ``[N+1, B, C, H, W]`` with ``ladder[k]`` at level
``sigmas[N-k]``: ``ladder[0]`` the clean end, ``ladder[N]`` the start latent.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from einops import reduce

from .eta import eta_with_mask, per_step_eta

__all__ = [
    "BackgroundLock",
    "EditLock",
    "ancestral_split",
    "ddim_eta_step",
    "ddim_invert",
    "ddim_invert_step",
    "ddpm_invert",
    "dpmpp_2m_sde_invert",
    "dpmpp_2m_sde_step",
    "replay_dpmpp_2m_sde",
    "eta_inversion_noises",
    "replay_sample",
    "select_candidate",
    "sigma_list",
]


# ----------------------------------------------------------------------------- helpers

def sigma_list(sigmas) -> list:
    """Validated Python-float copy of a sampling sigma list (descending, >= 0, >= 2 entries)."""
    s = torch.as_tensor(sigmas).detach().to("cpu", torch.float64).flatten().tolist()
    if len(s) < 2:
        raise ValueError("sigmas must hold at least two values (one step)")
    if not all(math.isfinite(v) for v in s) or s[-1] < 0:
        raise ValueError(f"sigmas must be finite and >= 0, got {s}")
    if any(b >= a for a, b in zip(s, s[1:])):
        raise ValueError("sigmas must be strictly descending (a sampling list such as ComfyUI SIGMAS)")
    return s


def _sigma_in(sigma: float, x: torch.Tensor) -> torch.Tensor:
    """``[B]`` sigma tensor for a model call (k-diffusion's ``sigma * s_in``).

    At least float32 even for half-precision latents, so a sigma is never rounded to fp16.
    Inversion and replay both build it here, so the model sees identical inputs.
    """
    dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    return torch.full((x.shape[0],), sigma, dtype=dtype, device=x.device)


def _work_dtype(x: torch.Tensor) -> torch.Tensor:
    """Inversions run in float32 at least: z and n* divide by small s_up (DDPM §1.5, §1.7; Eta §7)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _check_interrupt(interrupt):
    if interrupt is not None and interrupt():
        raise InterruptedError("interrupted")


def _eta_at(eta, i: int, x: torch.Tensor):
    """eta for (full-schedule) step ``i``: scalar, per-step sequence/``[N]`` tensor, one map, or per-step maps.

    * float / 0-d tensor: the same scalar every step;
    * list/tuple: entry ``i`` (each a scalar or a map);
    * 1-d tensor ``[N]``: per-step scalars;
    * tensor with ``x.ndim`` dims (e.g. ``[B, 1, h, w]``): one map for every step;
    * tensor with ``x.ndim + 1`` dims (``[N, B, 1, h, w]``): per-step maps.
    """
    if isinstance(eta, (list, tuple)):
        e = eta[i]
    elif isinstance(eta, torch.Tensor):
        if eta.ndim == 0:
            e = eta
        elif eta.ndim == 1:
            e = eta[i]
        elif eta.ndim == x.ndim:
            e = eta
        elif eta.ndim == x.ndim + 1:
            e = eta[i]
        else:
            raise ValueError(f"eta tensor of shape {tuple(eta.shape)} does not fit latents of shape {tuple(x.shape)}")
    else:
        e = eta
    if isinstance(e, torch.Tensor) and e.ndim == 0:
        e = float(e)
    return e


def _n_eta_steps(eta, x: torch.Tensor) -> Optional[int]:
    """Number of per-step entries an eta argument holds (None if it is the same every step)."""
    if isinstance(eta, (list, tuple)):
        return len(eta)
    if isinstance(eta, torch.Tensor) and (eta.ndim == 1 or eta.ndim == x.ndim + 1):
        return eta.shape[0]
    return None


# ----------------------------------------------------------------------------- the step

def ancestral_split(sigma, sigma_next, eta):
    """(I1), (I2): ``(s_up, s_down)`` for a step ``sigma -> sigma_next`` with stochasticity ``eta``.

    ``eta`` is a float (or 0-d tensor) -> Python floats, bit-identical to k-diffusion's
    ``get_ancestral_step`` (which returns them in the order ``(down, up)``); or a tensor
    map broadcastable to the latent (Eta §6 per-pixel split) -> float64 tensors of the
    map's shape.  ``eta > 1`` is clipped by the ``min`` in (I1) (``s_down`` becomes 0),
    as in k-diffusion.  ``sigma_next == 0`` gives ``(0, 0)``.
    """
    s, sn = float(sigma), float(sigma_next)
    if not (s > 0 and 0 <= sn <= s):
        raise ValueError(f"an ancestral step needs sigma > 0 and 0 <= sigma_next <= sigma, got {s} -> {sn}")
    if isinstance(eta, torch.Tensor) and eta.ndim == 0:
        eta = float(eta)
    c = (sn ** 2 * (s ** 2 - sn ** 2) / s ** 2) ** 0.5
    if not isinstance(eta, torch.Tensor):
        eta = float(eta)
        if not math.isfinite(eta) or eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        if not eta:
            return 0.0, sn
        s_up = min(sn, eta * c)
        s_down = (sn ** 2 - s_up ** 2) ** 0.5
        return s_up, s_down
    e = eta.to(torch.float64)
    if not torch.isfinite(e).all() or (e < 0).any():
        raise ValueError("eta maps must be finite and >= 0")
    s_up = torch.clamp(e * c, max=sn)
    s_down = (sn ** 2 - s_up ** 2).clamp_min(0.0) ** 0.5
    return s_up, s_down


def _coef(v, x: torch.Tensor):
    """A split coefficient ready to multiply ``x``: Python float, or a map cast to x's dtype/device."""
    return v.to(dtype=x.dtype, device=x.device) if isinstance(v, torch.Tensor) else v


def ddim_eta_step(x: torch.Tensor, denoised: torch.Tensor, sigma, sigma_next, eta, noise: Optional[torch.Tensor]):
    """(I3), (I4): one generalized DDIM step in sigma form, ``x' = D + s_down eps_hat + s_up noise``.

    Equals the VP step of DDPM §0 (``DDIMScheduler.step(eta=eta, variance_noise=noise)``)
    divided by ``sqrt(abar_p)``.  ``eta``: float or a map broadcastable to ``x`` (per
    pixel, Eta §6).  ``sigma_next == 0`` returns ``denoised`` (deterministic; the noise
    is unused).  ``noise`` may be None only where ``s_up == 0`` (eta 0).
    """
    sn = float(sigma_next)
    if sn == 0.0:
        return denoised
    s = float(sigma)
    s_up, s_down = ancestral_split(s, sn, eta)
    eps_hat = (x - denoised) / s                                              # (I3)
    out = denoised + _coef(s_down, x) * eps_hat
    has_noise = bool((s_up > 0).any()) if isinstance(s_up, torch.Tensor) else s_up > 0
    if has_noise:
        if noise is None:
            raise ValueError("this step has eta > 0 and needs a noise map")
        if noise.shape != x.shape:
            raise ValueError(f"noise map of shape {tuple(noise.shape)} does not match the latent {tuple(x.shape)}")
        out = out + _coef(s_up, x) * noise.to(dtype=x.dtype, device=x.device)  # (I4)
    return out


# ----------------------------------------------------------------------------- DDIM inversion

def ddim_invert_step(denoise: Callable, x: torch.Tensor, sigma_from, sigma_to):
    """(I5)-(I7): one "sameshift" DDIM inversion step ``sigma_from -> sigma_to`` (upwards).

    Returns ``(x_next, denoised)``; ``denoised`` is the model's x0 prediction for the
    rescaled input ``x_in`` at ``sigma_to``.  ``sigma_from`` may be 0 (a sampling list
    ending at 0: the inversion then starts at the clean latent, as diffusers'
    ``DDIMInverseScheduler`` with ``set_alpha_to_one=True``).
    """
    s_u, s_t = float(sigma_from), float(sigma_to)
    if not (0 <= s_u < s_t):
        raise ValueError(f"an inversion step goes up: need 0 <= sigma_from < sigma_to, got {s_u} -> {s_t}")
    x_in = x * math.sqrt((1.0 + s_t ** 2) / (1.0 + s_u ** 2))                 # (I5)
    denoised = denoise(x_in, _sigma_in(s_t, x))
    e = (x_in - denoised) / s_t                                               # (I6)
    return x + (s_t - s_u) * e, denoised                                      # (I7)


@torch.no_grad()
def ddim_invert(denoise: Callable, x0: torch.Tensor, sigmas, callback: Optional[Callable] = None,
                interrupt: Optional[Callable] = None) -> torch.Tensor:
    """Deterministic DDIM inversion ("sameshift", Eta §2 / §6) along a sampling sigma list.

    Walks the sampling list backwards: from ``sigmas[-1]`` (the clean end, ``x0`` is taken
    to be the k-space sample there) up to ``sigmas[0]`` with (I5)-(I7).  Returns the
    ladder ``[N+1, *x0.shape]``: ``ladder[0] = x0`` at ``sigmas[-1]`` ... ``ladder[N]`` = the
    start latent at ``sigmas[0]``.

    Equals diffusers' ``DDIMInverseScheduler`` (0.42.x, which steps from ``t - ratio`` to
    ``t`` with the UNet called at ``t``) on the same timesteps after the VP <-> k scaling
    (S3); its initial level ``initial_alpha_cumprod`` corresponds to ``sigmas[-1]``
    (``set_alpha_to_one=False`` -> ``s_final = sigma(t=0)``, ``True`` -> sigma 0).

    ``callback(dict)`` is called after every step with ``i`` (0-based inversion step),
    ``x`` (the new latent), ``sigma`` (its level), ``sigma_from``, ``denoised``, ``total``.
    ``interrupt()`` is called before every model evaluation; it may raise, or return True
    to raise ``InterruptedError``.  Nothing is returned on interruption.
    """
    s = sigma_list(sigmas)
    n = len(s) - 1
    x0 = _work_dtype(x0)
    ladder = x0.new_empty((n + 1, *x0.shape))
    ladder[0] = x0
    x = x0
    for k in range(n):
        _check_interrupt(interrupt)
        s_from, s_to = s[n - k], s[n - k - 1]
        x, denoised = ddim_invert_step(denoise, x, s_from, s_to)
        ladder[k + 1] = x
        if callback is not None:
            callback({"i": k, "x": x, "sigma": s_to, "sigma_from": s_from, "denoised": denoised, "total": n})
    return ladder


# ----------------------------------------------------------------------------- DDPM inversion

def _ladder_noise(x0: torch.Tensor, n: int, generator: Optional[torch.Generator], noise):
    """The ``[n, *x0.shape]`` rung noise of (I8): given, or drawn one x0-shaped map per step with
    ``generator``, least noisy rung first (diffusers LEdits++ order)."""
    if noise is None:
        dev = generator.device if generator is not None else x0.device
        drawn = [None] * n
        for i in reversed(range(n)):
            drawn[i] = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=dev).to(x0.device)
        noise = torch.stack(drawn)
    elif tuple(noise.shape) != (n, *x0.shape):
        raise ValueError(f"ladder noise must have shape {(n, *x0.shape)}, got {tuple(noise.shape)}")
    return noise.to(dtype=x0.dtype, device=x0.device)


@torch.no_grad()
def ddpm_invert(denoise: Callable, x0: torch.Tensor, sigmas, eta=1.0, generator: Optional[torch.Generator] = None,
                noise: Optional[torch.Tensor] = None, callback: Optional[Callable] = None,
                interrupt: Optional[Callable] = None, *, vp_final: bool = False, batch: int = 1):
    """Edit-friendly DDPM inversion in sigma form (DDPM §1.2, §1.6): ``(x_start, zs, ladder)``.

    ``batch > 1`` (our speed-up): the rungs are independent draws, so the model predictions
    of ``batch`` consecutive steps are made in ONE call (rows with per-row sigmas) at the
    rungs as drawn, instead of one call per step at the corrected rungs.  The correction
    (I10) then moves a rung by float rounding only, so a replay differs from ``x0`` by
    rounding amplified through the model (measured ~1e-7..1e-6 relative in float32)
    instead of being bit-exact.  ``denoise`` must accept a ``[rows]`` sigma tensor with
    different values per row (k-diffusion models and ComfyUI's guiders do).

    1. Ladder (I8): independent rungs ``x0 + sigmas[i] * n_i`` for ``i < N``; the bottom
       (level ``sigmas[N]``) is ``x0`` itself.  Noise ``n_i`` is drawn in ``x0.dtype`` with
       ``generator`` in diffusers' LEdits++ order: one ``x0``-shaped draw per step, from
       the least noisy step (``i = N-1``) upwards.  Or pass ``noise`` ``[N, *x0.shape]``
       (``noise[i]`` for the rung at ``sigmas[i]``) and no draw happens.
    2. For ``i = 0..N-1`` (noisiest first, as the official code): ``D_i = denoise(rung_i)``,
       ``z_i`` from (I9), then the "correction" (I10) overwrites rung ``i+1`` with exactly
       what :func:`ddim_eta_step` (and so :func:`replay_sample`) computes, so a replay
       reproduces every rung bit for bit and ends at ``ladder[0]``.

    Returns ``x_start = ladder[N]`` (the uncorrected top rung, where sampling starts),
    ``zs [N, *x0.shape]`` with ``zs[i]`` for sampling step ``i`` (= diffusers ``pipe.zs``),
    and the corrected ladder ``[N+1, ...]`` (``ladder[k]`` at ``sigmas[N-k]``).

    ``eta``: float, per-step sequence / ``[N]`` tensor, or maps (see :func:`replay_sample`);
    every value must be > 0 (z is divided by ``s_up``): ``ValueError`` otherwise.
    The papers use eta = 1; other values follow the standard eta^2 DDIM form (DDPM §1.2,
    not the official code's ``legacy`` direction term).

    Half-precision ``x0`` is upcast: ladder and ``zs`` are float32 at least (DDPM §1.5, §1.7).
    The official repos zero the last step's z (DDPM §1.2 ``zero_last_noise``); do
    ``zs[-1].zero_()`` on the result for that behaviour (reconstruction is then not exact).

    Exactness: replaying ``zs`` from ``x_start`` with the same denoiser returns
    ``ladder[0]``, equal to ``x0`` up to one rounding of (I10) (P1-P3).  If the list ends at
    sigma 0 the last step is deterministic (``s_up = 0``): ``z = 0`` and ``ladder[0] = D``,
    so the round trip is NOT exact (DDPM §1.6, testing-offline §6 rule 1).

    ``vp_final=True`` (diffusers parity, DDPM §1.6 "final-level scaling"): diffusers
    treats ``x0`` as the VP sample at ``abar_final``; in k-space that is
    ``x0 * sqrt(1 + sigmas[N]^2)`` (S3), which then is the ladder bottom (the rungs stay
    ``x0 + s_i n_i``).  A replay then returns ``x0 * sqrt(1 + sigmas[N]^2)``; multiply by
    ``sqrt(abar_final)`` (``k_to_vp``) to get ``x0``.

    ``callback`` gets ``i``, ``x`` (rung i), ``sigma``, ``denoised``, ``z``, ``total`` after
    every step; ``interrupt`` as in :func:`ddim_invert`.
    """
    s = sigma_list(sigmas)
    n = len(s) - 1
    x0 = _work_dtype(x0)
    m = _n_eta_steps(eta, x0)
    if m is not None and m < n:
        raise ValueError(f"eta has {m} per-step values for {n} steps")
    etas = [_eta_at(eta, i, x0) for i in range(n)]
    for i, e in enumerate(etas):
        bad = bool((e <= 0).any()) if isinstance(e, torch.Tensor) else not float(e) > 0
        if bad:
            raise ValueError(f"edit-friendly DDPM inversion needs eta > 0 everywhere (z is divided by "
                             f"s_up, DDPM §1.7); step {i} has eta <= 0")

    noise = _ladder_noise(x0, n, generator, noise)

    ladder = x0.new_empty((n + 1, *x0.shape))
    ladder[0] = x0 * math.sqrt(1.0 + s[n] ** 2) if vp_final else x0
    for i in range(n):
        ladder[n - i] = x0 + s[i] * noise[i]                                  # (I8)

    zs = x0.new_zeros((n, *x0.shape))
    batch = max(1, int(batch))
    pre = {}
    for i in range(n):
        _check_interrupt(interrupt)
        if batch > 1 and i not in pre:
            idx = list(range(i, min(n, i + batch)))
            xs = torch.cat([ladder[n - j] for j in idx])
            sig = torch.cat([_sigma_in(s[j], x0) for j in idx])
            ds = denoise(xs, sig).chunk(len(idx))
            pre = {j: (xs_j, d_j) for j, xs_j, d_j in zip(idx, xs.chunk(len(idx)), ds)}
        if batch > 1:
            x, denoised = pre.pop(i)
        else:
            x = ladder[n - i]
            denoised = denoise(x, _sigma_in(s[i], x))
        s_up, s_down = ancestral_split(s[i], s[i + 1], etas[i])
        if s[i + 1] > 0:
            mean = denoised + _coef(s_down, x) * ((x - denoised) / s[i])
            zs[i] = (ladder[n - i - 1] - mean) / _coef(s_up, x)               # (I9)
        ladder[n - i - 1] = ddim_eta_step(x, denoised, s[i], s[i + 1], etas[i], zs[i])   # (I10)
        if callback is not None:
            callback({"i": i, "x": x, "sigma": s[i], "denoised": denoised, "z": zs[i], "total": n})
    return ladder[n].clone(), zs, ladder


# ----------------------------------------------------------------------------- replay sampler

class BackgroundLock:
    """Keep the source trajectory outside a mask while an edit is replayed (issue 17) [ours].

    After every replayed step that lands on level ``sigmas[i + 1]`` (full-schedule index)::

        x <- m_i * x + (1 - m_i) * L_src(i + 1)                                     (I16)

    ``source``: the source latents at the levels a replay visits, ``[N - skip + 1, B, C, H, W]``,
    ``source[j]`` at ``sigmas[skip + j]`` (``source[0]`` the start latent, ``source[-1]`` the clean
    photo latent, i.e. the inversion's ladder read downwards).  Edit-friendly DDPM, Eta (optimal
    noise) and DPM-Solver++ 2M inversions reproduce this ladder when replayed with the source
    prompt; for DDIM it is the inversion's own trajectory, which the replay only approximates.
    ``mask``: ``[B or 1, 1, h, w]`` in [0, 1] (1 = edit here), or ``mask(i) -> mask | None`` for a
    mask that changes during the run (``None``: no lock at that step).  With a hard 0/1 mask the
    result equals the source latent exactly where the mask is 0.
    """

    def __init__(self, source: torch.Tensor, mask, skip: int = 0):
        self.source, self.mask, self.skip = source, mask, int(skip)

    def __call__(self, x: torch.Tensor, level: int) -> torch.Tensor:
        m = self.mask(level - 1) if callable(self.mask) else self.mask
        if m is None:
            return x
        j = level - self.skip
        if not 0 <= j < self.source.shape[0]:
            raise ValueError(f"the background lock holds source levels {self.skip}..{self.skip + self.source.shape[0] - 1}"
                             f", the replay reached level {level}")
        src = self.source[j].to(device=x.device, dtype=x.dtype)
        m = m.to(device=x.device, dtype=x.dtype)
        return torch.lerp(src, x, m)                                                  # (I16)


class EditLock(BackgroundLock):
    """A background lock whose mask the edit itself draws, from the previous steps (issue 17) [ours].

    After every replayed step, before (I16), the candidate latent is compared with the source latent at
    the same level; where it has moved away from the photo's trajectory, the edit is acting::

        d_i(p)  = || x_i(p) - L_src(i + 1)(p) ||_2 over channels                               (I17)
        m_i     = grow(d_i' >= otsu(d_i')),   d_i' = d_i min-max normalised per image            (I18)
        x      <- m_i * x + (1 - m_i) * L_src(i + 1)                                          (I16)

    Otsu's threshold (``kernels.maps.keep_mask``, the rule chosen on toy world A for issue 17) splits the
    divergence map into the pixels the edit moved and the rest, so the region follows the size of what
    changes, not a fixed fraction of the image; ``grow`` widens it by that many latent pixels (1). The
    mask is recomputed at every step from the candidate, so a pixel locked at one step can be freed at
    the next if the edit moves it again; a background the edit does not move is snapped back to the
    photo's ladder every step and never drifts.  Nothing is locked in the first ``start`` fraction of
    the replayed steps (0.25, chosen on world A; the edit first needs to move away from the photo).
    A divergence map that is zero everywhere (no edit) locks everything: the result is the photo's
    own trajectory.  Choices where the papers are silent [ours]: the L2 norm over channels, Otsu on the
    per-image min-max normalised map, a per-step (not accumulated) mask — accumulating it kept 14 dB
    less background on world A.  Not for global edits (style, lighting): the lock keeps whatever
    moved least as the photo.

    ``feather``: the mask's edge blurred with a Gaussian of that many latent pixels (0: hard, and then
    the result equals the source latent exactly where the final mask is 0).  ``last`` holds the mask
    of the last step that locked (``[B, 1, h, w]``), for previews and tests.
    """

    def __init__(self, source: torch.Tensor, skip: int = 0, start: float = 0.25, grow: int = 1, feather: float = 0.0):
        if not 0.0 <= float(start) <= 1.0:
            raise ValueError(f"the edit lock's start is a fraction of the replayed steps in [0, 1], got {start}")
        if int(grow) < 0 or float(feather) < 0:
            raise ValueError(f"grow and feather must be >= 0, got {grow} and {feather}")
        super().__init__(source, None, skip)
        self.start, self.grow, self.feather = float(start), int(grow), float(feather)
        self.last = None

    def divergence_mask(self, x: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
        """``[B, 1, h, w]`` in [0, 1]: (I17)-(I18) for a candidate ``x`` and the source latent ``src``."""
        from .maps import dilate, keep_mask, soften_mask
        d = (x.float() - src.float()).pow(2).sum(1).sqrt()                          # (I17) [B, h, w]
        keep = keep_mask(d.flatten(1), "otsu").view_as(d).float()                   # (I18)
        if self.grow:
            keep = dilate(keep, self.grow)
        return soften_mask(keep, self.feather)

    def __call__(self, x: torch.Tensor, level: int) -> torch.Tensor:
        j = level - self.skip
        total = self.source.shape[0] - 1
        if not 0 <= j <= total:
            raise ValueError(f"the background lock holds source levels {self.skip}..{self.skip + total}"
                             f", the replay reached level {level}")
        if j < self.start * total:
            return x
        src = self.source[j].to(device=x.device, dtype=x.dtype)
        m = self.divergence_mask(x, src).to(device=x.device, dtype=x.dtype)
        self.last = m
        return torch.lerp(src, x, m)                                                  # (I16)


@torch.no_grad()
def replay_sample(model, x, sigmas, extra_args=None, callback=None, disable=None, noises=None, eta=1.0, start=0,
                  lock: Optional[BackgroundLock] = None):
    """k-diffusion sampler that replays stored noise maps with generalized DDIM steps (I4).

    Signature and callback as k-diffusion's ``sample_euler_ancestral``:
    ``model(x, sigma * s_in, **extra_args)`` returns the denoised prediction, and
    ``callback({"x", "i", "sigma", "sigma_hat", "denoised"})`` is called every step
    (``i`` counts the steps of *this* call from 0; ``sigma_hat == sigma``).  ``disable``
    (the progress-bar switch) is accepted and ignored: ComfyUI reports progress through
    the callback.

    Skipping: ``noises`` and per-step ``eta`` are indexed by the step index of the FULL
    schedule they were made for; ``start`` is the full-schedule index of ``sigmas[0]``.
    The caller passes ``sigmas[start:]`` (what ComfyUI hands a sampler after SplitSigmas
    or a start step) and the full ``noises``; step ``j`` of this call uses
    ``noises[start + j]`` and ``eta[start + j]``.  Keyed by index, never by sigma value.
    ``lock``: a :class:`BackgroundLock` applied after every step (I16).

    ``eta``: float; per-step sequence or ``[N]`` tensor; one map broadcastable to ``x``
    (``[B, 1, h, w]``); or per-step maps ``[N, B, 1, h, w]``.  ``noises``: ``[N, *x.shape]``
    (or a sequence); may be None only if every step has eta 0 (plain DDIM).  A step to
    sigma 0 returns the denoised prediction.
    """
    extra_args = {} if extra_args is None else extra_args
    s = sigma_list(sigmas)
    n = len(s) - 1
    start = int(start)
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    if noises is not None and len(noises) < start + n:
        raise ValueError(f"replay needs noise maps for steps {start}..{start + n - 1} but {len(noises)} are stored")
    m = _n_eta_steps(eta, x)
    if m is not None and m < start + n:
        raise ValueError(f"replay needs eta for steps {start}..{start + n - 1} but {m} are given")
    for j in range(n):
        i = start + j
        denoised = model(x, _sigma_in(s[j], x), **extra_args)
        if callback is not None:
            callback({"x": x, "i": j, "sigma": sigmas[j], "sigma_hat": sigmas[j], "denoised": denoised})
        x = ddim_eta_step(x, denoised, s[j], s[j + 1], _eta_at(eta, i, x), None if noises is None else noises[i])
        if lock is not None:
            x = lock(x, i + 1)
    return x


# ----------------------------------------------------------------------------- LEDITS++: SDE DPM-Solver++ 2M

def _dpm_mean(x, denoised, old_denoised, s: float, sn: float, s_prev: Optional[float]):
    """(I13): the deterministic part of a 2M SDE step; returns ``(m, noise_std)``."""
    q = (sn / s) ** 2
    m = q * x + (1.0 - q) * denoised
    if old_denoised is not None:
        r = math.log(s_prev / s) / math.log(s / sn)
        m = m + (0.5 * (1.0 - q) / r) * (denoised - old_denoised)
    return m, sn * math.sqrt(1.0 - q)


def dpmpp_2m_sde_step(x, denoised, old_denoised, sigma, sigma_next, sigma_prev, noise):
    """(I13), (I14): one SDE DPM-Solver++ 2M (midpoint) step ``sigma -> sigma_next``.

    ``old_denoised`` / ``sigma_prev``: the previous step of this run (None on its first
    step: first order).  ``sigma_next == 0`` returns ``denoised`` (no noise).
    """
    s, sn = float(sigma), float(sigma_next)
    if sn == 0.0:
        return denoised
    if not 0 < sn < s:
        raise ValueError(f"a sampling step needs sigma > sigma_next >= 0, got {s} -> {sn}")
    if old_denoised is not None and not float(sigma_prev) > s:
        raise ValueError("sigma_prev must be larger than sigma when a previous prediction is given")
    m, std = _dpm_mean(x, denoised, old_denoised, s, sn, None if sigma_prev is None else float(sigma_prev))
    if noise.shape != x.shape:
        raise ValueError(f"noise map of shape {tuple(noise.shape)} does not match the latent {tuple(x.shape)}")
    return m + std * noise.to(dtype=x.dtype, device=x.device)                # (I14)


@torch.no_grad()
def dpmpp_2m_sde_invert(denoise: Callable, x0: torch.Tensor, sigmas, generator: Optional[torch.Generator] = None,
                        noise: Optional[torch.Tensor] = None, callback: Optional[Callable] = None,
                        interrupt: Optional[Callable] = None):
    """LEDITS++ inversion (DDPM §4.3 / §4.7): ``(x_start, zs, ladder)`` like :func:`ddpm_invert`.

    Ladder (I8) with the same noise draws and order as :func:`ddpm_invert` (diffusers'
    LEdits++ ``invert``); then for ``i = 0..N-1`` (noisiest first) the prediction at the
    corrected rung ``i``, ``z_i`` from (I15) and the correction ``rung_{i+1} := m_i + S z_i``
    computed exactly as :func:`replay_dpmpp_2m_sde` does, so a replay of ``zs`` from
    ``x_start`` with the same denoiser returns ``ladder[0]`` (= ``x0`` up to one rounding).
    The multistep history is advanced exactly as in sampling: step ``i`` uses step ``i-1``'s
    prediction.  Invert only the sigmas you will replay (the history starts at ``sigmas[0]``).
    A list ending at sigma 0 makes the last step deterministic (``z = 0``, ``ladder[0] = D``):
    not exact, as diffusers' ``final_sigmas_type="zero"`` (DDPM §4.3).
    ``callback``/``interrupt`` as in :func:`ddpm_invert`.  Sequential only (each step needs
    the previous prediction).
    """
    s = sigma_list(sigmas)
    n = len(s) - 1
    x0 = _work_dtype(x0)
    noise = _ladder_noise(x0, n, generator, noise)
    ladder = x0.new_empty((n + 1, *x0.shape))
    ladder[0] = x0
    for i in range(n):
        ladder[n - i] = x0 + s[i] * noise[i]                                  # (I8)
    zs = x0.new_zeros((n, *x0.shape))
    old = None
    for i in range(n):
        _check_interrupt(interrupt)
        x = ladder[n - i]
        denoised = denoise(x, _sigma_in(s[i], x))
        if s[i + 1] > 0:
            m, std = _dpm_mean(x, denoised, old, s[i], s[i + 1], s[i - 1] if i else None)
            zs[i] = (ladder[n - i - 1] - m) / std                             # (I15)
        ladder[n - i - 1] = dpmpp_2m_sde_step(x, denoised, old, s[i], s[i + 1], s[i - 1] if i else None, zs[i])
        old = denoised
        if callback is not None:
            callback({"i": i, "x": x, "sigma": s[i], "denoised": denoised, "z": zs[i], "total": n})
    return ladder[n].clone(), zs, ladder


@torch.no_grad()
def replay_dpmpp_2m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, noises=None, start=0,
                        lock: Optional[BackgroundLock] = None):
    """k-diffusion sampler: SDE DPM-Solver++ 2M (midpoint) with stored noise maps (LEDITS++ edit).

    Signature, callback and ``start`` indexing as :func:`replay_sample`; step ``j`` uses
    ``noises[start + j]``.  The multistep history starts with this call, matching an
    inversion made over the same ``sigmas``.  ``lock``: a :class:`BackgroundLock` after every step.
    """
    extra_args = {} if extra_args is None else extra_args
    s = sigma_list(sigmas)
    n = len(s) - 1
    start = int(start)
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    if noises is None or len(noises) < start + n:
        have = 0 if noises is None else len(noises)
        raise ValueError(f"replay needs noise maps for steps {start}..{start + n - 1} but {have} are stored")
    old = None
    for j in range(n):
        denoised = model(x, _sigma_in(s[j], x), **extra_args)
        if callback is not None:
            callback({"x": x, "i": j, "sigma": sigmas[j], "sigma_hat": sigmas[j], "denoised": denoised})
        x = dpmpp_2m_sde_step(x, denoised, old, s[j], s[j + 1], s[j - 1] if j else None, noises[start + j])
        if lock is not None:
            x = lock(x, start + j + 1)
        old = denoised
    return x


# ----------------------------------------------------------------------------- Eta Inversion

def select_candidate(n_star: torch.Tensor, candidates: torch.Tensor):
    """(I12): per batch element, the candidate closest to ``n_star`` in mean squared difference.

    ``candidates [K, B, ...]``, ``n_star [B, ...]`` -> ``(selected [B, ...], index [B], loss [K, B])``.
    The reference has batch 1; selecting per image is our choice (images are independent).
    Ties go to the lowest index (``argmin``).
    """
    loss = reduce((candidates - n_star.unsqueeze(0)) ** 2, "k b ... -> k b", "mean")
    idx = loss.argmin(dim=0)
    sel = candidates[idx, torch.arange(candidates.shape[1], device=candidates.device)]
    return sel, idx, loss


@torch.no_grad()
def eta_inversion_noises(denoise_src: Callable, ladder: torch.Tensor, sigmas, eta_fn_or_per_step,
                         eta_mask: Optional[torch.Tensor] = None, candidates: int = 10,
                         generator: Optional[torch.Generator] = None, store_optimal: bool = False, *,
                         schedule=None, return_indices: bool = False, callback: Optional[Callable] = None,
                         interrupt: Optional[Callable] = None):
    """Eta Inversion noise selection (Eta §3 steps 2-6 in sigma form, §6): ``(noises, etas)``.

    ``ladder`` is :func:`ddim_invert`'s output on the same ``sigmas``.  For each sampling
    step ``i`` (source anchored to ``ladder[N-i]``, Eta §3 step 8):

    1. ``eta_i``: ``eta_fn_or_per_step`` is a callable of the timestep (evaluated with
       :func:`~.eta.per_step_eta` at ``schedule.timestep(sigmas[i])``; ``schedule`` defaults
       to ``denoise_src.schedule``), a float, or ``N`` per-step scalars.
    2. ``K = candidates`` maps are drawn with ``generator`` as ONE ``randn((K, *x.shape))``
       call in the latent's dtype (the reference's stream for batch 1), every step, also
       when ``eta_i == 0``, so later draws do not depend on eta.
    3. If ``s_up(eta_i) > 0``: ``D_src = denoise_src(ladder[N-i])``, ``n*`` by (I11) with
       the scalar ``eta_i`` (as the reference, also in mask mode), and (I12) per image.
       With ``store_optimal=True`` (our extension, not in the paper) the source is
       anchored instead at the rung the replay computes, ``ddim_eta_step(.., n*)``, which is
       one rounding away from ``L[N-i-1]`` (as the DDPM "correction" I10), so the replay
       follows the chain bit for bit; after an eta-0 step the anchor is ``L`` again.
       If ``s_up == 0`` (``eta_i == 0`` or a step to sigma 0) the noise is irrelevant
       (coefficient 0; the reference's 0/0): no model call, the stored noise is zeros
       and the index -1 (our guard).

    Returns ``noises [N, *x.shape]`` (selected candidates, or ``n*`` itself with
    ``store_optimal=True``) and ``etas``: float32 ``[N]``, or with ``eta_mask`` (``[B, 1,
    h, w]``, binary in the paper) the maps ``[N, B, 1, h, w] = M * eta_i`` (E-2).  With
    ``return_indices=True`` also the selected indices ``[N, B]`` (long, -1 where skipped).

    Guarantees (tested): with ``eta == 0`` everywhere the noises are zeros and replaying
    them is exactly deterministic DDIM from ``ladder[N]``.  With ``store_optimal=True``,
    ``eta_i > 0`` on every step and no mask (or an all-ones mask), replaying reconstructs
    the ladder (the source) to float rounding, like DDPM inversion; where eta is 0 the
    replay is plain DDIM and inherits DDIM inversion's error (not exact).
    """
    s = sigma_list(sigmas)
    n = len(s) - 1
    ladder = _work_dtype(ladder)
    if ladder.shape[0] != n + 1:
        raise ValueError(f"ladder has {ladder.shape[0]} levels, sigmas need {n + 1}")
    k_count = int(candidates)
    if k_count < 1:
        raise ValueError(f"candidates must be >= 1, got {candidates}")

    if callable(eta_fn_or_per_step):
        sched = schedule if schedule is not None else getattr(denoise_src, "schedule", None)
        if sched is None:
            raise ValueError("an eta function of the timestep needs the model's schedule (schedule=...)")
        etas = per_step_eta(eta_fn_or_per_step, s, sched)
    else:
        e = torch.as_tensor(eta_fn_or_per_step, dtype=torch.float32).flatten()
        if e.numel() == 1:
            e = e.expand(n)
        if e.numel() != n:
            raise ValueError(f"eta has {e.numel()} per-step values for {n} steps")
        if not torch.isfinite(e).all() or (e < 0).any():
            raise ValueError("eta values must be finite and >= 0")
        etas = e.clone()

    x_shape = tuple(ladder.shape[1:])
    dev = generator.device if generator is not None else ladder.device
    noises = ladder.new_zeros((n, *x_shape))
    indices = torch.full((n, x_shape[0]), -1, dtype=torch.long)   # cpu: chosen candidate ids (stored metadata)
    x_src = ladder[n]
    for i in range(n):
        _check_interrupt(interrupt)
        cand = torch.randn((k_count, *x_shape), generator=generator, dtype=ladder.dtype, device=dev).to(ladder.device)
        eta_i = float(etas[i])
        s_up, s_down = ancestral_split(s[i], s[i + 1], eta_i)
        x_next = ladder[n - i - 1]
        if s_up > 0:
            d_src = denoise_src(x_src, _sigma_in(s[i], x_src))
            mean = d_src + s_down * ((x_src - d_src) / s[i])
            n_star = (ladder[n - i - 1] - mean) / s_up                         # (I11)
            if store_optimal:
                noises[i] = n_star
                # the rung a replay computes (one rounding away from L[N-i-1]); anchoring the
                # next step there makes the replay follow this chain bit for bit (cf. I10)
                x_next = ddim_eta_step(x_src, d_src, s[i], s[i + 1], eta_i, n_star)
            else:
                noises[i], idx, _ = select_candidate(n_star, cand)            # (I12)
                indices[i] = idx.cpu()
        x_src = x_next
        if callback is not None:
            callback({"i": i, "sigma": s[i], "eta": eta_i, "noise": noises[i], "total": n})
    if eta_mask is not None:
        etas = eta_with_mask(etas, eta_mask)
    if return_indices:
        return noises, etas, indices
    return noises, etas
