"""Inversions for rectified-flow models (SD3 / SD3.5 / Flux): Euler ODE, RF ancestral noise maps, RF-Inversion.

Spec ``rectified-flow.md`` (cited "RF §").  Everything works on ComfyUI's flow parameterisation
(``CONST``, ``comfy/model_sampling.py`` l.62-76 of ComfyUI 0.3.64): sigma is the flow time
``s in [0, 1]``, ``x_s = (1 - s) x0 + s n``, and a *denoiser* ``denoise(x, sigma) -> D`` returns
``D = x - s v`` (a k-diffusion model callable, ``sigma`` a ``[B]`` tensor, guidance applied).
Sigma lists are SAMPLING lists (descending, ``sigmas[0]`` noisiest, usually 1) as in
:mod:`.inversion`; ladders are ``[N+1, B, C, H, W]`` with ``ladder[k]`` at ``sigmas[N-k]``
(``ladder[0]`` the clean end, ``ladder[N]`` the start latent).

Velocity and Euler (RF §1.1; ComfyUI ``to_d`` / ``sample_euler``, ``k_diffusion/sampling.py`` l.60-62,
l.184-207)::

    v(x, s) = (x - D(x, s)) / s                                                   (F1)
    x' = x + (s' - s) v(x, s)                  (sampling s -> s' < s: sample_euler) (F2)

Deterministic Euler inversion (RF §2.1), ascending ``u_0 < ... < u_N`` = the list read backwards::

    x_{k+1} = x_k + (u_{k+1} - u_k) v(x_k, u_k)                                    (F3)

Fixed-point ("exact Euler", ReNoise-style, RF §2.1 [inference]): find ``y`` such that the Euler
SAMPLING step (F2) from ``u_{k+1}`` lands on ``x_k``, i.e. ``y = x_k + (u_{k+1} - u_k) v(y, u_{k+1})``::

    y^0 = (F3),   y^j = x_k + (u_{k+1} - u_k) v(y^{j-1}, u_{k+1}),  j = 1..K         (F4)
    r_k = max |y^K - y^{K-1}|        (the step's replay error is h |v(y^{K-1}) - v(y^K)| <= h Lip(v) r_k)

RF ancestral step (RF §1.4; ComfyUI ``sample_euler_ancestral_RF`` l.234-259), ``s -> s' > 0``::

    s_down = s' (1 + (s'/s - 1) eta),  a' = 1 - s',  a_down = 1 - s_down            (F5)
    c = sqrt(s'^2 - s_down^2 a'^2 / a_down^2)                                        (F6)
    x' = (a'/a_down) [(s_down/s) x + (1 - s_down/s) D] + c s_noise z                 (F7)

and ``x' = D`` for ``s' = 0``.  Edit-friendly noise maps for it (RF §2.2 [inference, exact by
construction]; the flow analogue of DDPM §1.2)::

    x_{s_i} = (1 - s_i) x0 + s_i n_i,  n_i ~ N(0, I) i.i.d.,  x_{s_N} = x0            (F8)
    z_i = (x_{s_{i+1}} - m_i) / (c_i s_noise),   m_i = the mean part of (F7)          (F9)
    x_{s_{i+1}} := (F7) with z_i                                   ("correction")    (F10)

RF-Inversion (Rout et al., arXiv 2410.10792, RF §2.3 from diffusers' community
``examples/community/pipeline_flux_rf_inversion.py``: ``invert`` = Algorithm 1, ``__call__`` =
Algorithm 2), in sigma form.  Controlled forward ODE, ``y1 ~ N(0, I)`` drawn once::

    v_hat = v(Y, u_k) + gamma_k ((y1 - Y)/(1 - u_k) - v(Y, u_k))                   (F11)
    Y <- Y + (u_{k+1} - u_k) v_hat                                                  (F12)

Controlled reverse ODE toward the source latent ``y0`` (RF §2.3 "ComfyUI form")::

    D_tilde = (1 - eta_i) D + eta_i y0,   x' = x + (s' - s) (x - D_tilde)/s          (F13)

(F13) is (F2) with ``D_tilde`` and equals ``v_hat = v + eta_i ((x - y0)/s - v)``.

Open points of RF §2.3 / §9, settled here (after reading the community pipeline itself):

1. Its ``invert`` evaluates the model (and ``v_cond``'s ``1 - t``) at the unshifted
   ``t_i = i / (T + 1)`` (its ``N = len(sigmas)`` counts the terminal 0) while stepping by
   ``sigmas[i] - sigmas[i+1]`` of the shifted DESCENDING list in sampling order: the levels it
   evaluates are not the levels it reaches.  Its ``__call__`` (Algorithm 2) is consistent (model
   at the shifted ``sigma_i``, ``v_cond = (y0 - X)/sigma_i`` in our sign, steps
   ``sigma_i - sigma_{i+1}``) and equals (F13).  We evaluate the forward ODE at the level of the
   current state ``u_k`` and step to ``u_{k+1}``, the grid the replay visits, so ``gamma = 0`` is
   exactly Euler inversion on that grid; ``model_times`` reproduces the community evaluation
   times (not its step order) for a parity check.
2. ``gamma`` is constant over the steps unless a per-step sequence is given (as ``invert``).
3. ``eta`` acts on steps ``int(start * N) <= i < int(stop * N)`` of the full schedule (the
   pipeline's ``start_timestep`` / ``stop_timestep`` fractions), 0 elsewhere (:func:`rf_eta_per_step`).
4. ``y1`` comes from the caller's seeded generator, drawn once in the latent's shape (the pipeline
   uses the global RNG).
5. Velocities are always obtained from ``D`` by (F1) (no patched ``model_sampling``): at
   ``u_0 = sigma_min`` this loses ~``1e-7 |x| / u_0`` of ``v`` in float32, the same in inversion
   and replay.
6. ``gamma = 0`` is exactly plain Euler inversion (F3); ``eta = 0`` exactly plain Euler sampling
   (F2) (tested).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from .inversion import _check_interrupt, _ladder_noise, _sigma_in, _work_dtype, sigma_list

__all__ = [
    "euler_invert",
    "euler_step",
    "flow_euler_sample",
    "flow_sigma_list",
    "rf_ancestral_coeffs",
    "rf_ancestral_invert",
    "rf_ancestral_sample",
    "rf_ancestral_step",
    "rf_eta_per_step",
    "rf_inversion_invert",
    "velocity",
]


def flow_sigma_list(sigmas) -> list:
    """A validated flow sampling list (descending, ``1 >= s_0``, ``s_N >= 0``) as Python floats."""
    s = sigma_list(sigmas)
    if s[0] > 1.0 + 1e-6:
        raise ValueError(f"a rectified-flow sigma list lies in [0, 1] (flow time), got sigmas[0] = {s[0]:.6g}; "
                         f"is this a VP (eps / v) schedule?")
    return s


def _per_step(value, n: int, name: str) -> list:
    if isinstance(value, (list, tuple)) or (isinstance(value, torch.Tensor) and value.ndim == 1):
        vals = [float(v) for v in value]
        if len(vals) < n:
            raise ValueError(f"{name} has {len(vals)} per-step values for {n} steps")
        return vals[:n]
    return [float(value)] * n


def velocity(x: torch.Tensor, denoised: torch.Tensor, sigma: float) -> torch.Tensor:
    """(F1): ``v = (x - D) / s`` (k-diffusion's ``to_d``, equal to the flow velocity for CONST)."""
    return (x - denoised) / sigma


def euler_step(x: torch.Tensor, denoised: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """(F2), computed in ComfyUI ``sample_euler``'s order: ``x + (x - D)/s * (s' - s)`` (no special case at 0)."""
    return x + velocity(x, denoised, sigma) * (sigma_next - sigma)


# ----------------------------------------------------------------------------- (a) Euler ODE inversion

@torch.no_grad()
def euler_invert(denoise: Callable, x0: torch.Tensor, sigmas, fixed_point: int = 0, callback: Callable | None = None,
                 interrupt: Callable | None = None):
    """Deterministic flow-ODE inversion (RF §2.1): ``(ladder, residuals)``.

    ``sigmas`` is the SAMPLING list the replay will use; its last entry is where ``x0`` is taken to
    live and must be ``> 0`` (``v`` divides by it: replace a final 0 by ``sigma_min`` first).
    ``fixed_point = 0``: explicit Euler (F3), 1 model call per step; global error ``O(1/N)``,
    exact only for straight (constant-velocity) trajectories.  ``fixed_point = K > 0``: (F4),
    ``K + 1`` calls per step; each rung is the point from which Euler sampling (F2) lands on the
    rung below up to ``h Lip(v) r_k``, so the replay error shrinks geometrically with ``K`` when
    ``h Lip(v) < 1``.  ``residuals``: float64 ``[N]`` ``r_k`` (max-abs), ordered as sampling steps
    (``residuals[i]`` for the step ``sigmas[i] -> sigmas[i+1]``); zeros for ``K = 0``.
    ``callback(dict)`` after each step (``i`` inversion step, ``x``, ``sigma``, ``residual``, ``total``);
    ``interrupt()`` before each step.
    """
    s = flow_sigma_list(sigmas)
    n = len(s) - 1
    if not s[-1] > 0:
        raise ValueError("Euler inversion starts at the last sigma, which must be > 0 (v = (x - D)/s)")
    k_fp = int(fixed_point)
    if k_fp < 0:
        raise ValueError(f"fixed_point must be >= 0, got {fixed_point}")
    x0 = _work_dtype(x0)
    ladder = x0.new_empty((n + 1, *x0.shape))
    ladder[0] = x0
    res = torch.zeros(n, dtype=torch.float64)      # cpu: per-step residuals (Python numbers, metadata)
    x = x0
    for k in range(n):
        _check_interrupt(interrupt)
        u, u_next = s[n - k], s[n - k - 1]
        y = x + (u_next - u) * velocity(x, denoise(x, _sigma_in(u, x)), u)                      # (F3)
        for _ in range(k_fp):
            y_new = x + (u_next - u) * velocity(y, denoise(y, _sigma_in(u_next, y)), u_next)    # (F4)
            res[n - k - 1] = float((y_new - y).abs().max())
            y = y_new
        x = y
        ladder[k + 1] = x
        if callback is not None:
            callback({"i": k, "x": x, "sigma": u_next, "residual": float(res[n - k - 1]), "total": n})
    return ladder, res


# ----------------------------------------------------------------------------- (b) RF ancestral noise maps

def rf_ancestral_coeffs(sigma, sigma_next, eta):
    """(F5), (F6): ``(ratio, scale, c)`` with ``ratio = s_down/s``, ``scale = a'/a_down`` for a step ``s -> s'``.

    ``s' = 0`` gives ``(0, 1, 0)`` (the step returns ``D``).  ``eta`` in ``[0, 1]``: 0 is a plain Euler
    step (``c = 0``), 1 the full ancestral step (``s_down = s'^2 / s``).
    """
    s, sn, e = float(sigma), float(sigma_next), float(eta)
    if not (0 < s <= 1.0 + 1e-6 and 0 <= sn < s):
        raise ValueError(f"an RF step needs 1 >= sigma > sigma_next >= 0, got {s} -> {sn}")
    if not (math.isfinite(e) and 0 <= e <= 1):
        raise ValueError(f"the RF ancestral eta must be in [0, 1], got {eta}")
    if sn == 0:
        return 0.0, 1.0, 0.0
    s_down = sn * (1.0 + (sn / s - 1.0) * e)                                                     # (F5)
    a_next, a_down = 1.0 - sn, 1.0 - s_down
    c = max(sn ** 2 - s_down ** 2 * a_next ** 2 / a_down ** 2, 0.0) ** 0.5                      # (F6)
    return s_down / s, a_next / a_down, c


def _rf_mean(x, denoised, sigma, sigma_next, eta):
    ratio, scale, c = rf_ancestral_coeffs(sigma, sigma_next, eta)
    if float(sigma_next) == 0:
        return denoised, 0.0
    m = ratio * x + (1.0 - ratio) * denoised
    return (scale * m if float(eta) > 0 else m), c


def rf_ancestral_step(x, denoised, sigma, sigma_next, eta=1.0, noise: torch.Tensor | None = None,
                      s_noise: float = 1.0) -> torch.Tensor:
    """(F7): one step of ComfyUI's ``sample_euler_ancestral_RF`` with the given noise ``z``.

    ``sigma_next == 0`` returns ``denoised``; ``eta == 0`` is the Euler step to ``s_down = s'`` (no
    noise, as ComfyUI skips the renoise then).
    """
    m, c = _rf_mean(x, denoised, sigma, sigma_next, eta)
    if float(sigma_next) == 0 or not float(eta) > 0:
        return m
    if noise is None or noise.shape != x.shape:
        raise ValueError(f"an RF ancestral step with eta > 0 needs a noise map of shape {tuple(x.shape)}")
    return m + (c * float(s_noise)) * noise.to(dtype=x.dtype, device=x.device)                  # (F7)


@torch.no_grad()
def rf_ancestral_invert(denoise: Callable, x0: torch.Tensor, sigmas, eta=1.0, s_noise: float = 1.0,
                        generator: torch.Generator | None = None, noise: torch.Tensor | None = None,
                        callback: Callable | None = None, interrupt: Callable | None = None):
    """Edit-friendly noise-map inversion for the RF ancestral sampler (RF §2.2): ``(x_start, zs, ladder)``.

    Ladder (F8) with independent rungs drawn exactly as :func:`~.inversion.ddpm_invert` draws its
    ladder noise (one ``x0``-shaped draw per step, least noisy first; or pass ``noise [N, ...]``).
    For ``i = 0..N-1``: ``D_i`` at the corrected rung ``i``, ``z_i`` by (F9), then (F10) overwrites
    rung ``i+1`` with exactly what :func:`rf_ancestral_step` (so :func:`rf_ancestral_sample`)
    computes: a replay of ``zs`` from ``x_start`` with the same denoiser visits every rung bit for
    bit and returns ``ladder[0]``, ``x0`` up to one rounding of (F10).
    ``eta``: float or per-step values, each in ``(0, 1]`` (``z`` is divided by ``c``, which is 0 for
    ``eta = 0``).  The last sigma must be ``> 0`` (a step to 0 is deterministic: not exact).
    Works in float32 at least (``z`` divides by small ``c``; RF §2.5 keeps maps fp32).
    """
    s = flow_sigma_list(sigmas)
    n = len(s) - 1
    if not s[-1] > 0:
        raise ValueError("noise-map inversion needs a last sigma > 0: a step to 0 is deterministic (RF §2.6)")
    etas = _per_step(eta, n, "eta")
    if not all(0 < e <= 1 for e in etas):
        raise ValueError(f"noise-map inversion needs 0 < eta <= 1 on every step (z is divided by the renoise "
                         f"coefficient, RF §2.6), got {etas}")
    if not float(s_noise) > 0:
        raise ValueError(f"s_noise must be > 0, got {s_noise}")
    x0 = _work_dtype(x0)
    noise = _ladder_noise(x0, n, generator, noise)
    ladder = x0.new_empty((n + 1, *x0.shape))
    ladder[0] = x0
    for i in range(n):
        ladder[n - i] = (1.0 - s[i]) * x0 + s[i] * noise[i]                                    # (F8)
    zs = x0.new_zeros((n, *x0.shape))
    for i in range(n):
        _check_interrupt(interrupt)
        x = ladder[n - i]
        denoised = denoise(x, _sigma_in(s[i], x))
        m, c = _rf_mean(x, denoised, s[i], s[i + 1], etas[i])
        zs[i] = (ladder[n - i - 1] - m) / (c * float(s_noise))                                  # (F9)
        ladder[n - i - 1] = rf_ancestral_step(x, denoised, s[i], s[i + 1], etas[i], zs[i], s_noise)  # (F10)
        if callback is not None:
            callback({"i": i, "x": x, "sigma": s[i], "denoised": denoised, "z": zs[i], "total": n})
    return ladder[n].clone(), zs, ladder


def _lock_at(lock, x, level):
    return x if lock is None else lock(x, level)


@torch.no_grad()
def rf_ancestral_sample(model, x, sigmas, extra_args=None, callback=None, disable=None, noises=None, eta=1.0,
                        s_noise: float = 1.0, start: int = 0, lock=None):
    """k-diffusion sampler: ComfyUI's RF ancestral steps (F7) fed the stored ``noises`` (replay).

    Signature and callback as ``sample_euler_ancestral``; ``noises[start + j]`` / per-step
    ``eta[start + j]`` for step ``j`` of this call (``start`` = full-schedule index of ``sigmas[0]``,
    as :func:`~.inversion.replay_sample`).  ``lock(x, level)`` (a ``BackgroundLock``) after each step.
    Equal (to float rounding: ComfyUI computes the coefficients in the sigmas' dtype) to
    ``sample_euler_ancestral`` on a CONST model with a ``noise_sampler`` returning the maps in order.
    """
    extra_args = {} if extra_args is None else extra_args
    s = flow_sigma_list(sigmas)
    n, start = len(s) - 1, int(start)
    etas = _per_step(eta, start + n, "eta")
    if noises is None or len(noises) < start + n:
        raise ValueError(f"replay needs noise maps for steps {start}..{start + n - 1} but "
                         f"{0 if noises is None else len(noises)} are stored")
    for j in range(n):
        denoised = model(x, _sigma_in(s[j], x), **extra_args)
        if callback is not None:
            callback({"x": x, "i": j, "sigma": sigmas[j], "sigma_hat": sigmas[j], "denoised": denoised})
        x = rf_ancestral_step(x, denoised, s[j], s[j + 1], etas[start + j], noises[start + j], s_noise)
        x = _lock_at(lock, x, start + j + 1)
    return x


# ----------------------------------------------------------------------------- (c) RF-Inversion

@torch.no_grad()
def rf_inversion_invert(denoise: Callable, x0: torch.Tensor, sigmas, gamma=0.5,
                        generator: torch.Generator | None = None, y1: torch.Tensor | None = None,
                        model_times: Sequence[float] | None = None, callback: Callable | None = None,
                        interrupt: Callable | None = None) -> torch.Tensor:
    """RF-Inversion's controlled forward ODE (Algorithm 1; (F11), (F12)): the ladder ``[N+1, ...]``.

    Ascending over the sampling list read backwards (its last entry must be ``> 0``).  ``y1``: the
    target noise (drawn once, ``randn`` in ``x0``'s shape with ``generator``, when not given).
    ``gamma``: float or per-step values (indexed by the SAMPLING step ``i`` of the rung reached),
    in ``[0, 1]``; ``gamma = 0`` is exactly :func:`euler_invert`, ``gamma = 1`` the straight line
    to ``y1`` (``ladder[N] = y1`` when ``sigmas[0] = 1``).  ``model_times``: the time passed to
    the model at inversion step ``k`` (default ``u_k``; the community pipeline's unshifted ``k/N``
    for parity).
    """
    s = flow_sigma_list(sigmas)
    n = len(s) - 1
    if not s[-1] > 0:
        raise ValueError("RF-Inversion starts at the last sigma, which must be > 0 (v = (x - D)/s)")
    gammas = _per_step(gamma, n, "gamma")
    if not all(0 <= g <= 1 for g in gammas):
        raise ValueError(f"gamma must be in [0, 1], got {gammas}")
    times = None if model_times is None else [float(t) for t in model_times]
    if times is not None and (len(times) != n or not all(0 < t <= 1 for t in times)):
        raise ValueError(f"model_times must hold {n} times in (0, 1]")
    x0 = _work_dtype(x0)
    if y1 is None:
        dev = generator.device if generator is not None else x0.device
        y1 = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=dev).to(x0.device)
    elif y1.shape != x0.shape:
        raise ValueError(f"y1 must have the latent's shape {tuple(x0.shape)}, got {tuple(y1.shape)}")
    y1 = y1.to(dtype=x0.dtype, device=x0.device)
    ladder = x0.new_empty((n + 1, *x0.shape))
    ladder[0] = x0
    y = x0
    for k in range(n):
        _check_interrupt(interrupt)
        u, u_next = s[n - k], s[n - k - 1]
        t = u if times is None else times[k]
        v = velocity(y, denoise(y, _sigma_in(t, y)), t)
        g = gammas[n - k - 1]
        if g:
            v = v + g * ((y1 - y) / (1.0 - u) - v)                                              # (F11)
        y = y + (u_next - u) * v                                                                 # (F12)
        ladder[k + 1] = y
        if callback is not None:
            callback({"i": k, "x": y, "sigma": u_next, "total": n})
    return ladder


def rf_eta_per_step(n: int, eta: float, start: float = 0.0, stop: float = 1.0) -> list:
    """Per-step controller strengths of Algorithm 2: ``eta`` on steps ``int(start n) <= i < int(stop n)``, else 0."""
    if not (0 <= float(eta) <= 1 and 0 <= float(start) <= float(stop) <= 1):
        raise ValueError(f"need 0 <= eta <= 1 and 0 <= start <= stop <= 1, got eta {eta}, start {start}, stop {stop}")
    a, b = int(float(start) * n), int(float(stop) * n)
    return [float(eta) if a <= i < b else 0.0 for i in range(n)]


@torch.no_grad()
def flow_euler_sample(model, x, sigmas, extra_args=None, callback=None, disable=None, start: int = 0, lock=None,
                      y0: torch.Tensor | None = None, eta=0.0):
    """k-diffusion sampler: Euler (F2), or RF-Inversion's controlled reverse ODE (F13) toward ``y0``.

    ``eta``: float or per-step values of the FULL schedule (``eta[start + j]`` for step ``j``; see
    :func:`rf_eta_per_step`); with ``eta == 0`` everywhere (or ``y0 None``) this is exactly
    ComfyUI's ``sample_euler``.  ``eta = 1`` on a step makes it land on ``(1 - s') y0 + s' x/s``
    (the straight line to ``y0``); on a last step to 0 it returns ``y0`` (to rounding).
    ``start`` / ``lock`` as :func:`rf_ancestral_sample`.
    """
    extra_args = {} if extra_args is None else extra_args
    s = flow_sigma_list(sigmas)
    n, start = len(s) - 1, int(start)
    etas = _per_step(eta, start + n, "eta")
    if y0 is not None:
        y0 = y0.to(dtype=x.dtype, device=x.device)
    for j in range(n):
        denoised = model(x, _sigma_in(s[j], x), **extra_args)
        if callback is not None:
            callback({"x": x, "i": j, "sigma": sigmas[j], "sigma_hat": sigmas[j], "denoised": denoised})
        e = etas[start + j]
        if y0 is not None and e:
            denoised = torch.lerp(denoised, y0, e)                                                # (F13)
        x = euler_step(x, denoised, s[j], s[j + 1])
        x = _lock_at(lock, x, start + j + 1)
    return x
