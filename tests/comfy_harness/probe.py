"""Test-only views over a ComfyUI sampling run (moved out of the shipped pack).

* :class:`ComfyDenoiser` — the kernels Denoiser view over ``comfy.samplers.calc_cond_batch``
  inside a sampling run (conds already processed);
* :class:`ProbeGuider` — a guider over N conditionings whose sampler function gets a
  :class:`ComfyDenoiser`, so adapter tests run kernels exactly where a sampler runs;
* :func:`lookup_embedding` — what ComfyUI's ``embedding:NAME`` prompt syntax loads.

Import only inside an in-process ComfyUI (``inprocess.comfy_env``).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

import comfy.samplers

from photoops.kernels.schedule import VPSchedule


class ComfyDenoiser:
    """Denoiser view inside a ComfyUI sampling run (conds already processed)."""

    def __init__(self, inner_model, conds: Sequence, model_options: dict):
        self.inner_model, self.conds, self.model_options = inner_model, list(conds), model_options
        ms = inner_model.model_sampling
        self.schedule = VPSchedule(1.0 / (1.0 + ms.sigmas.double() ** 2))

    def predict_x0(self, x, sigma, conds: Optional[Sequence[int]] = None) -> list:
        sel = [self.conds[i] for i in (conds if conds is not None else range(len(self.conds)))]
        s = torch.as_tensor(sigma, device=x.device, dtype=x.dtype).reshape(-1).expand(x.shape[0])
        return comfy.samplers.calc_cond_batch(self.inner_model, sel, x, s, self.model_options)


class ProbeGuider(comfy.samplers.CFGGuider):
    """A guider over N conditionings whose sampler function gets a :class:`ComfyDenoiser`.

    ``run(fn, latent, sigmas)`` prepares the model exactly as a normal sampling run does
    (LoRA patches, hooks, device placement), then calls ``fn(denoiser, x, sigmas)``.
    """

    def __init__(self, model_patcher, conditionings: Sequence):
        super().__init__(model_patcher)
        self.inner_set_conds({f"c{i}": c for i, c in enumerate(conditionings)})
        self.n = len(conditionings)

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        return comfy.samplers.calc_cond_batch(self.inner_model, [self.conds["c0"]], x, timestep, model_options)[0]

    def run(self, fn, latent: torch.Tensor, sigmas: torch.Tensor, seed: int = 0):
        out = {}
        guider = self

        def sampler_fn(model, x, sigmas, extra_args=None, callback=None, disable=None):
            den = ComfyDenoiser(guider.inner_model, [guider.conds[f"c{i}"] for i in range(guider.n)],
                                extra_args["model_options"])
            out["result"] = fn(den, x, sigmas)
            return x

        sampler = comfy.samplers.KSAMPLER(sampler_fn)
        self.sample(torch.zeros_like(latent), latent, sampler, sigmas, disable_pbar=True, seed=seed)
        return out["result"]


def lookup_embedding(name: str, width: int, key: str = "clip_l"):
    """What ComfyUI's prompt syntax ``embedding:NAME`` loads (``comfy.sd1_clip.load_embed``), or None."""
    import comfy.sd1_clip
    import folder_paths

    return comfy.sd1_clip.load_embed(name, folder_paths.get_folder_paths("embeddings"), width, key)
