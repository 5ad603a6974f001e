"""Noise schedules and the sigma <-> alpha-bar <-> timestep conversions.

Two parameterisations are in use:

* VP (papers, diffusers):  x_vp = sqrt(abar_t) * x0 + sqrt(1 - abar_t) * eps
* VE / k-diffusion (ComfyUI samplers): x = x0 + sigma * eps

They are related by (spec ``ddpm-inversion-sega-ledits.md`` §0)::

    sigma_t = sqrt((1 - abar_t) / abar_t)         (S1)
    abar_t  = 1 / (1 + sigma_t**2)                (S2)
    x       = x_vp / sqrt(abar_t) = x_vp * sqrt(1 + sigma_t**2)   (S3)

For discrete VP models (SD1.x, SD2.x, SDXL) a continuous sigma maps to a training
timestep the way ComfyUI's ``ModelSamplingDiscrete`` does it: ``timestep(sigma)`` is
the index of the nearest table entry in log-sigma (S4), and ``sigma(t)`` interpolates
log-sigma linearly between table entries (S5).  Both adapters use these functions,
so the same sigma reaches the UNet as the same integer timestep on both sides.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["VPSchedule", "sigma_to_abar", "abar_to_sigma", "vp_to_k", "k_to_vp", "invertible_sigmas"]


def sigma_to_abar(sigma):
    """(S2) alpha-bar for a sigma (tensor or float)."""
    return 1.0 / (1.0 + sigma * sigma)


def abar_to_sigma(abar):
    """(S1) sigma for an alpha-bar (tensor or float)."""
    if isinstance(abar, torch.Tensor):
        return ((1.0 - abar) / abar).sqrt()
    return math.sqrt((1.0 - abar) / abar)


def vp_to_k(x_vp: torch.Tensor, sigma) -> torch.Tensor:
    """(S3) VP sample -> k-diffusion sample at the same noise level."""
    return x_vp * math.sqrt(1.0 + float(sigma) ** 2)


def k_to_vp(x: torch.Tensor, sigma) -> torch.Tensor:
    """(S3) inverse: k-diffusion sample -> VP sample."""
    return x / math.sqrt(1.0 + float(sigma) ** 2)


@dataclass
class VPSchedule:
    """A discrete variance-preserving schedule with ``T`` training steps.

    ``alphas_cumprod[t]`` is abar_t for integer t in [0, T-1], stored in float64 so
    that conversions are exact to float32 precision after rounding.
    """

    alphas_cumprod: torch.Tensor

    def __post_init__(self):
        a = torch.as_tensor(self.alphas_cumprod, dtype=torch.float64).flatten()
        if a.numel() < 2 or not torch.all((a > 0) & (a < 1)):
            raise ValueError("alphas_cumprod must hold at least two values strictly inside (0, 1)")
        if not torch.all(a[1:] <= a[:-1]):
            raise ValueError("alphas_cumprod must be non-increasing in t")
        self.alphas_cumprod = a
        self.sigmas = abar_to_sigma(a)
        self.log_sigmas = self.sigmas.log()

    # -- constructors -------------------------------------------------------------
    @classmethod
    def from_betas(cls, betas) -> "VPSchedule":
        betas = torch.as_tensor(betas, dtype=torch.float64)
        return cls(torch.cumprod(1.0 - betas, dim=0))

    @classmethod
    def scaled_linear(cls, beta_start=0.00085, beta_end=0.012, steps=1000) -> "VPSchedule":
        """The SD1.x/SD2.x/SDXL schedule: betas = linspace(sqrt(b0), sqrt(b1), T)**2."""
        return cls.from_betas(torch.linspace(beta_start ** 0.5, beta_end ** 0.5, steps,  # cpu: schedules live on the CPU
                                             dtype=torch.float64) ** 2)

    @classmethod
    def cosine(cls, steps=1000, s=0.008, max_beta=0.999) -> "VPSchedule":
        """Nichol & Dhariwal's cosine schedule (diffusers ``squaredcos_cap_v2``)."""
        def f(t):
            return math.cos((t / steps + s) / (1 + s) * math.pi / 2) ** 2
        betas = [min(1 - f(i + 1) / f(i), max_beta) for i in range(steps)]
        return cls.from_betas(betas)

    # -- conversions --------------------------------------------------------------
    @property
    def num_train_timesteps(self) -> int:
        return self.alphas_cumprod.numel()

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def timestep(self, sigma) -> torch.Tensor:
        """(S4) nearest discrete timestep (as float, like ComfyUI) for each sigma."""
        s = torch.as_tensor(sigma, dtype=torch.float64)
        dev = s.device                      # computed where the schedule lives, returned on the input's device
        dists = s.to(self.log_sigmas.device).clamp_min(1e-30).log().reshape(-1, 1) - self.log_sigmas.reshape(1, -1)
        return dists.abs().argmin(dim=1).reshape(s.shape).to(dev, torch.float32)

    def sigma(self, timestep) -> torch.Tensor:
        """(S5) sigma at a (possibly fractional) timestep, log-linear interpolation."""
        t = torch.as_tensor(timestep, dtype=torch.float64)
        dev = t.device                      # computed where the schedule lives, returned on the input's device
        t = t.to(self.log_sigmas.device).clamp(0, self.num_train_timesteps - 1)
        lo = t.floor().long()
        hi = t.ceil().long()
        w = t - lo
        return ((1 - w) * self.log_sigmas[lo] + w * self.log_sigmas[hi]).exp().to(dev)

    def abar(self, sigma):
        return sigma_to_abar(torch.as_tensor(sigma, dtype=torch.float64))


def invertible_sigmas(sigmas, sigma_min: float) -> tuple:
    """A sampling schedule made invertible: ``(sigmas float64, info)`` (exact replay needs s_final > 0).

    A final 0 becomes ``sigma_min`` (``final_zero_replaced``), unless the schedule already ends at
    that minimum before the 0 (ComfyUI's ``normal``, ``karras`` ... put sigma_min there, rounded to
    float32): the replacement would be a step of one float32 ulp, whose noise map divides by ~0 and
    whose DPM-Solver step size is rounding noise; the final 0 is then dropped instead
    (``final_zero_dropped``, the replay drops it too).  Our choice; the papers sample on their own
    timestep lists.  The same rule for VP sigmas and rectified-flow times.
    """
    s = torch.as_tensor(sigmas, dtype=torch.float64).flatten().cpu()
    if s.numel() < 2:
        raise ValueError("SIGMAS must hold at least two values (one step)")
    info = {"final_zero_replaced": False, "final_zero_dropped": False}
    if s[-1] == 0:
        if s.numel() > 2 and s[-2] <= sigma_min * (1 + 1e-4):
            s = s[:-1].clone()
            info["final_zero_dropped"] = True
        elif s.numel() == 2 and s[0] <= sigma_min * (1 + 1e-4):
            raise ValueError("a single step from the model's smallest sigma to 0 cannot be inverted")
        else:
            s = s.clone()
            s[-1] = sigma_min
            info["final_zero_replaced"] = True
    if not torch.all(s[:-1] > s[1:]):
        raise ValueError(f"SIGMAS must be strictly decreasing (a sampling schedule), got {s.tolist()[:6]}...")
    return s, info
