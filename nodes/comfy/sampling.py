"""Sampling: guiders, KSAMPLER objects, progress, interrupt and sampling-run callbacks.

Touches ``comfy.samplers`` (``CFGGuider``, ``calc_cond_batch``, ``KSAMPLER``), ``comfy.utils.ProgressBar``,
``comfy.model_management``'s interrupt flag, the ON_CLEANUP patcher callback and the server's
progress text.
"""
from __future__ import annotations

import torch

import comfy.model_management
import comfy.patcher_extension
import comfy.samplers
import comfy.utils

from ...kernels.protocol import step_of_sigma


def progress_bar(total: int):
    return comfy.utils.ProgressBar(total)


def run_with_guider(model, positive, negative, cfg: float, latent: torch.Tensor, sigmas: torch.Tensor, fn,
                    seed: int = 0):
    """Run ``fn(denoise, x, sigmas)`` as the sampler function of a core CFGGuider.

    ComfyUI prepares everything as for a normal run (conds, LoRA and hook patches, device
    placement, ``process_latent_in``); ``x`` is the k-space latent (``noise`` is zero, so
    ``x = latent``) and ``denoise(x, sigma)`` the CFG-guided x0 prediction.  ``fn`` returns
    ``(result, x_out)``; returns ``(result, latent_out)`` with ``process_latent_out`` applied.
    """
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    box = {}

    def sampler_fn(model_k, x, sigmas, extra_args=None, callback=None, disable=None):
        extra_args = extra_args or {}

        def denoise(xx, s):
            return model_k(xx, s, **extra_args)

        box["result"], x_out = fn(denoise, x, sigmas)
        return x_out

    out = guider.sample(torch.zeros_like(latent), latent, comfy.samplers.KSAMPLER(sampler_fn), sigmas,
                        disable_pbar=True, seed=seed)
    return box["result"], out


def ksampler(fn, **extra_options):
    """A SAMPLER object for core SamplerCustomAdvanced over a k-diffusion function."""
    return comfy.samplers.KSAMPLER(fn, extra_options=extra_options)


def interrupt_check():
    """For kernels' ``interrupt`` hooks: raises ComfyUI's interrupt exception."""
    comfy.model_management.throw_exception_if_processing_interrupted()
    return False


class CombineGuider(comfy.samplers.CFGGuider):
    """A GUIDER over several named conditionings, evaluated in ONE batched model call per step
    (as core PerpNegGuider does) and combined by a kernel function.

    ``combine(x, sigma, outs, step)`` gets the denoised predictions in ``order`` and the
    0-based step counted from the first step this run evaluates (so skipped steps of an
    inversion replay do not count toward warm-ups); it returns the guided denoised.
    Pre- and post-CFG hooks of other nodes are replayed around it.  ``on_run_start(sigmas)``
    is called when a sampling run starts (reset momentum, validate step counts).
    """

    def __init__(self, model_patcher, conds: dict, order: list, combine, cfg: float, on_run_start=None):
        super().__init__(model_patcher)
        self.inner_set_conds(conds)
        self.order, self.combine, self.cfg = list(order), combine, float(cfg)
        self.on_run_start = on_run_start
        self._first = None

    def sample(self, noise, latent_image, sampler, sigmas, *args, **kwargs):
        self._first = None
        if self.on_run_start is not None:
            self.on_run_start(sigmas)
        return super().sample(noise, latent_image, sampler, sigmas, *args, **kwargs)

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        conds = [self.conds.get(k) for k in self.order]
        out = comfy.samplers.calc_cond_batch(self.inner_model, conds, x, timestep, model_options)
        for fn in model_options.get("sampler_pre_cfg_function", []):
            out = fn({"conds": conds, "conds_out": out, "cond_scale": self.cfg, "timestep": timestep, "input": x,
                      "sigma": timestep, "model": self.inner_model, "model_options": model_options})
        step, _ = step_of_sigma(float(timestep.flatten()[0]),
                                model_options.get("transformer_options", {}).get("sample_sigmas"))
        step = 0 if step is None else step
        if self._first is None:
            self._first = step
        result = self.combine(x, timestep, out, step - self._first)
        for fn in model_options.get("sampler_post_cfg_function", []):
            result = fn({"denoised": result, "cond": conds[1], "uncond": conds[0], "model": self.inner_model,
                         "uncond_denoised": out[0], "cond_denoised": out[1], "sigma": timestep,
                         "model_options": model_options, "input": x, "cond_scale": self.cfg})
        return result


def progress_text(node_id, text: str) -> None:
    """Text under the node in the UI (the current loss); silently nothing without a server."""
    try:
        from server import PromptServer

        if node_id is not None and PromptServer.instance is not None:
            PromptServer.instance.send_progress_text(text, node_id)
    except Exception:  # noqa: BLE001 - no server (tests, scripts)
        pass


def on_run_end(model, callback) -> None:
    """Call ``callback()`` when a sampling run with ``model`` (a ModelPatcher, patched in place) ends,
    normally or not (ComfyUI's ON_CLEANUP callback, which ``outer_sample`` runs in its ``finally``)."""
    model.add_callback_with_key(comfy.patcher_extension.CallbacksMP.ON_CLEANUP, "photoops_instructbrush",
                                lambda patcher: callback())
