"""The toy rectified-flow model: flow-matching objective, Euler sampler, evaluation, denoiser view.

Same world, tokenizer, text encoder and UNet as the eps toy model (``model.py``); only the
objective and the sampler differ.  Parameterisation: ComfyUI's ``CONST`` / SD3 (spec
``rectified-flow.md`` §1.1, cited "RF §")::

    x_s = (1 - s) x0 + s n,    n ~ N(0, I),   s in [0, 1] (sigma = flow time)      (T1)
    target v = n - x0          (the network output; D = x - s v)                   (T2)
    model time t = 1000 s      (SD3's ``ModelSamplingDiscreteFlow``, multiplier 1000)  (T3)

Choices where the spec is silent (ours):

* Training times ``s ~ U(0, 1)`` (SD3 trains on a logit-normal; it puts ~0.2 % of the samples
  above ``s = 0.95``, where a 32x32 model decides the background colour from the caption alone:
  uniform keeps that end trained).  Plain MSE on ``v``, no loss weighting, no offset noise
  (at ``s = 1`` the input is pure noise, so the background cannot be read off the noise's
  mean as it was at the eps model's first DDIM step, see ``train.py``).
* Time shift 1.0 (none), for training and sampling.  SD3's rule ``alpha = sqrt(m / n)``
  against its 256 px base (32x32x16 = 16,384 latent values, shift 1) gives
  ``sqrt(3072 / 16384) = 0.43`` for the 3,072 values of a toy image; Flux's
  resolution-dependent ``mu`` (RF §1.2) extrapolated to a 32 px image (4 tokens) gives
  ``e^0.457 = 1.58``.  They bracket 1, so the toy uses the plain linear list
  ``s_i = 1 - i/N`` (``flow_sigmas(N, shift)`` applies ``time_snr_shift`` if one is wanted).
* The scheduler saved with the model is diffusers' ``FlowMatchEulerDiscreteScheduler``
  (``num_train_timesteps=1000``, ``shift``), which is what ``model.load_model`` dispatches on.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .model import ToyModel, build_model
from .sample import _accuracy, eval_prompts
from .scorer import score_batch
from .world import IMAGE_SIZE

MULTIPLIER = 1000.0           # (T3)
DEFAULT_SHIFT = 1.0
DEFAULT_CFG = 3.0
DEFAULT_STEPS = 25

__all__ = ["MULTIPLIER", "build_flow_model", "flow_pair", "flow_sigmas", "time_snr_shift", "model_time",
           "ToyFlowDenoiser", "flow_euler_sample", "evaluate_flow", "is_flow_model"]


def build_flow_scheduler(shift: float = DEFAULT_SHIFT):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=int(MULTIPLIER), shift=float(shift))


def build_flow_model(seed: int = 0, shift: float = DEFAULT_SHIFT) -> ToyModel:
    """A freshly initialised toy model (``model.build_model``) with a flow-matching scheduler."""
    m = build_model(seed=seed)
    m.scheduler = build_flow_scheduler(shift)
    return m


def is_flow_model(model: ToyModel) -> bool:
    return type(model.scheduler).__name__.startswith("FlowMatch")


def flow_pair(x0: torch.Tensor, noise: torch.Tensor, s: torch.Tensor) -> tuple:
    """(T1), (T2): the noised sample ``x_s`` and the velocity target ``v = n - x0`` (``s`` per row)."""
    sv = s.view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
    return (1.0 - sv) * x0 + sv * noise, noise - x0


def time_snr_shift(shift: float, t):
    """SD3's shift (RF §1.2): ``a t / (1 + (a - 1) t)``; ``a = 1`` is the identity."""
    return shift * t / (1 + (shift - 1) * t)


def flow_sigmas(steps: int, shift: float = DEFAULT_SHIFT, final: float = 0.0) -> torch.Tensor:
    """Sampling list ``shift(1 - i/N)``, ``i = 0..N-1``, then ``final`` (0, or ``> 0`` for exact inversion).

    Float64.  Equals ComfyUI's ``simple`` list for a flow model whose table divides ``N`` (RF §1.3).
    """
    u = 1.0 - torch.arange(steps, dtype=torch.float64) / steps
    return torch.cat([time_snr_shift(float(shift), u), torch.tensor([float(final)], dtype=torch.float64)])


def model_time(s: torch.Tensor) -> torch.Tensor:
    """(T3) ``t = 1000 s`` (continuous; the UNet's sinusoidal embedding takes any float)."""
    return s * MULTIPLIER


class ToyFlowDenoiser:
    """The kernels' denoiser view of the toy flow model: ``D = x - s v`` (RF §1.1) per conditioning.

    ``predict_v(x, sigma, conds)`` / ``predict_x0(x, sigma, conds)`` return one tensor per entry
    of ``conds`` (text embeddings ``[1 or B, 16, 64]``) from one batched UNet call.  No input
    scaling (``calculate_input(s, x) = x`` for CONST).  With ``hooks`` the UNet's cross-attention
    layers route through ``kernels.attention`` (``DiffusersDenoiser``'s processors; the toy flow
    model is a UNet, so LEDITS++'s recorder works unchanged).  ``CallInfo.sigma`` is the flow time.
    """

    def __init__(self, model: ToyModel, hooks=None):
        self.model, self.unet = model, model.unet
        self.hooks, self.holder = hooks, None
        if hooks is not None:      # the pack is only needed for hooks (the trainer runs without it)
            from photoops.kernels.diffusers_adapter import install_attention_hooks

            self.holder = install_attention_hooks(model.unet, hooks)
        self.uncond = model.encode_prompts([""])

    @torch.no_grad()
    def predict_v(self, x, sigma, conds: Sequence, cond_ids=None) -> list:
        s = torch.as_tensor(sigma, dtype=x.dtype).flatten().to(x.device)
        B, n = x.shape[0], len(conds)
        if s.numel() not in (1, B):
            raise ValueError(f"sigma has {s.numel()} values for a batch of {B}")
        s = s.expand(B)
        ctx = torch.cat([c.expand(B, -1, -1) for c in conds])
        if self.holder is not None:
            from photoops.kernels.protocol import CallInfo

            self.holder.call = CallInfo(sigma=float(s[0]), chunks=list(cond_ids if cond_ids is not None else range(n)),
                                        rows_per_chunk=B, latent_hw=tuple(x.shape[-2:]))
        try:
            out = self.unet(x.repeat(n, 1, 1, 1), model_time(s).repeat(n), encoder_hidden_states=ctx).sample
        finally:
            if self.holder is not None:
                self.holder.call = None
        return list(out.chunk(n))

    def predict_x0(self, x, sigma, conds: Sequence, cond_ids=None) -> list:
        s = torch.as_tensor(sigma, dtype=x.dtype).flatten().to(x.device).view(-1, 1, 1, 1)
        return [x - s * v for v in self.predict_v(x, sigma, conds, cond_ids)]

    def guided(self, captions: Optional[Sequence[str]] = None, cfg: float = 1.0, cond: Optional[torch.Tensor] = None):
        """k-diffusion model callable ``f(x, sigma) -> D``, CFG ``D_u + cfg (D_c - D_u)`` (cfg 1: conditional only)."""
        if cond is None:
            cond = self.model.encode_prompts(list(captions))

        def f(x, sigma):
            if cfg == 1.0:
                return self.predict_x0(x, sigma, [cond])[0]
            c, u = self.predict_x0(x, sigma, [cond, self.uncond], cond_ids=[0, 1])
            return u + cfg * (c - u)
        return f


@torch.no_grad()
def flow_euler_sample(model: ToyModel, prompts: list, *, steps: int = DEFAULT_STEPS, cfg: float = DEFAULT_CFG,
                      seed: int = 0, generator: Optional[torch.Generator] = None, shift: float = DEFAULT_SHIFT,
                      negative_prompt: str = "", batch_size: int = 64) -> torch.Tensor:
    """Euler on the flow ODE (``sample_euler``: ``x <- x + (s' - s) v``) from ``x_1 = n``; one image per prompt.

    CFG on ``v`` (equal to CFG on ``D`` or eps, RF §4.1).  Noise for all prompts is drawn first
    (independent of ``batch_size``), as ``sample.ddim_sample``.  Returns ``[B, 3, 32, 32]``, not clamped.
    """
    if generator is None:
        generator = torch.Generator().manual_seed(int(seed))
    x_all = torch.randn(len(prompts), 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    sig = flow_sigmas(steps, shift).tolist()
    den = ToyFlowDenoiser(model)
    uncond = model.encode_prompts([negative_prompt])
    out = []
    for i0 in range(0, len(prompts), batch_size):
        chunk = list(prompts[i0:i0 + batch_size])
        x = x_all[i0:i0 + len(chunk)].clone()
        cond = model.encode_prompts(chunk)
        for s, s_next in zip(sig[:-1], sig[1:]):
            if cfg != 1.0:
                v_c, v_u = den.predict_v(x, s, [cond, uncond])
                v = v_u + cfg * (v_c - v_u)
            else:
                v = den.predict_v(x, s, [cond])[0]
            x = x + (s_next - s) * v
        out.append(x)
    return torch.cat(out)


@torch.no_grad()
def evaluate_flow(model: ToyModel, n: int = 96, seed: int = 0, cfg: float = DEFAULT_CFG,
                  steps: int = DEFAULT_STEPS, shift: float = DEFAULT_SHIFT, return_images: bool = False) -> dict:
    """As ``sample.evaluate`` (same prompts, accuracy dicts "raw" / "blurred"), sampled by :func:`flow_euler_sample`."""
    prompts, attrs = eval_prompts(n)
    imgs = flow_euler_sample(model, prompts, steps=steps, cfg=cfg, seed=seed, shift=shift)
    res = {"raw": _accuracy(score_batch(imgs), attrs), "blurred": _accuracy(score_batch(imgs, blur=True), attrs),
           "n": n, "cfg": cfg, "steps": steps, "seed": seed, "shift": shift}
    if return_images:
        res["images"], res["prompts"] = imgs, prompts
    return res


def sigma_min(steps: int = 1000) -> float:
    """Smallest nonzero flow time of a 1000-entry table (``1/1000``: ComfyUI's ``sigma_min`` for SD3 at shift 1)."""
    return 1.0 / steps

