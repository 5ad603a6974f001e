"""FlowEdit: inversion-free editing of a photo with a rectified-flow model (Kulikov et al., arXiv 2412.08629).

Spec ``rectified-flow.md`` §2.4 (cited "RF §2.4"), reconstructed there from the official
``fallenshock/FlowEdit`` (``FlowEdit_utils.py`` ``FlowEditSD3`` / ``FlowEditFLUX``); defaults from its
``SD3_exp.yaml`` / ``FLUX_exp.yaml``.  ComfyUI's flow parameterisation (``CONST``): a denoiser
returns ``D = z - s v`` at flow time ``s`` (``kernels/flow_inversion.py`` F1).

Sampling list ``s_0 = 1 > ... > s_T = 0`` (``T`` steps), source latent ``x_src``, ``z_edit = x_src``.
Step ``i`` (``s = s_i``, ``s' = s_{i+1}``) is skipped while ``T - i > n_max``; then, while
``T - i > n_min`` (the ODE on the velocity difference)::

    z_src = (1 - s) x_src + s n,     n ~ N(0, I) fresh for every step and repeat          (E1)
    z_tar = z_src + (z_edit - x_src)                                                      (E2)
    V     = mean over n_avg repeats of (v_tar(z_tar, s) - v_src(z_src, s))
          = mean of ((z_tar - D_tar) - (z_src - D_src)) / s                                 (E3)
    z_edit <- z_edit + (s' - s) V                                                         (E4)

and the last ``n_min`` steps sample the target alone from the edited trajectory (SDEdit-like)::

    at i = T - n_min:  x_tar = z_edit + ((1 - s) x_src + s n) - x_src,  n fresh           (E5)
    x_tar <- x_tar + (s' - s) v_tar(x_tar, s)                                            (E6)

Result: ``z_edit`` if ``n_min == 0`` else ``x_tar``.  (E2) is computed as ``z_src + (z_edit - x_src)``
(not ``z_edit + z_src - x_src``) so identical source and target give ``V = 0`` exactly and return
``x_src`` bit for bit (RF §7 R7).  Noise: one generator seeded once, drawn in step order, ``n_avg``
draws per ODE step then one for (E5); float32 ``randn`` in the latent's shape (the reference's
``randn_like`` order).  ``v`` is only evaluated at ``s > 0`` (never at the final 0).
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from .flow_inversion import euler_step, flow_sigma_list
from .inversion import _check_interrupt, _sigma_in

__all__ = ["check_flowedit_steps", "flowedit_sample"]


def check_flowedit_steps(steps: int, n_max: int, n_min: int, n_avg: int) -> None:
    """``0 <= n_min <= n_max <= steps`` and ``n_avg >= 1``; ValueError naming the rule otherwise."""
    if not 0 <= int(n_min) <= int(n_max) <= int(steps):
        raise ValueError(f"FlowEdit needs 0 <= n_min ({n_min}) <= n_max ({n_max}) <= steps ({steps})")
    if int(n_avg) < 1:
        raise ValueError(f"n_avg must be >= 1, got {n_avg}")


@torch.no_grad()
def flowedit_sample(denoise_src: Callable, denoise_tar: Callable, x_src: torch.Tensor, sigmas, n_max: int,
                    n_min: int = 0, n_avg: int = 1, generator: torch.Generator | None = None,
                    callback: Callable | None = None, interrupt: Callable | None = None) -> torch.Tensor:
    """(E1)-(E6) over the sampling list ``sigmas`` (``T = len(sigmas) - 1`` steps; usually ``s_0 = 1``, ``s_T = 0``).

    ``denoise_src`` / ``denoise_tar``: ``(z, sigma [B]) -> D`` with the source / target conditioning
    and guidance applied (CFG or Flux's guidance embed).  ``n_max = 0`` returns ``x_src``.
    ``callback(dict)`` after every evaluated step: ``i``, ``x`` (the current edit), ``sigma``,
    ``denoised`` (the target branch's ``D``).  ``interrupt()`` before every step.
    """
    s = flow_sigma_list(sigmas)
    t = len(s) - 1
    check_flowedit_steps(t, n_max, n_min, n_avg)
    x_src = x_src.float() if x_src.dtype in (torch.float16, torch.bfloat16) else x_src
    dev = generator.device if generator is not None else x_src.device

    def draw():
        return torch.randn(x_src.shape, generator=generator, dtype=torch.float32, device=dev).to(x_src)

    z_edit, x_tar = x_src, None
    for i in range(t):
        if t - i > n_max:
            continue
        _check_interrupt(interrupt)
        si, sn = s[i], s[i + 1]
        sig = _sigma_in(si, x_src)
        if t - i > n_min:
            v = torch.zeros_like(x_src)
            for _ in range(int(n_avg)):
                z_src = (1.0 - si) * x_src + si * draw()                                   # (E1)
                z_tar = z_src + (z_edit - x_src)                                            # (E2)
                d_src, d_tar = denoise_src(z_src, sig), denoise_tar(z_tar, sig)
                v = v + ((z_tar - d_tar) - (z_src - d_src)) / si / int(n_avg)            # (E3)
            z_edit = z_edit + (sn - si) * v                                                 # (E4)
            out = z_edit
        else:
            if x_tar is None:
                x_tar = z_edit + ((1.0 - si) * x_src + si * draw()) - x_src                 # (E5)
            d_tar = denoise_tar(x_tar, sig)
            x_tar = euler_step(x_tar, d_tar, si, sn)                                        # (E6)
            out = x_tar
        if callback is not None:
            callback({"i": i, "x": out, "sigma": si, "denoised": d_tar})
    return z_edit if n_min == 0 else x_tar
