"""Sampling: guiders, KSAMPLER objects, progress, interrupt and sampling-run callbacks.

Touches ``comfy.samplers`` (``CFGGuider``, ``calc_cond_batch``, ``KSAMPLER``), ``comfy.utils.ProgressBar``,
``comfy.model_management``'s interrupt flag, the ON_CLEANUP patcher callback and the server's
progress text.
"""
from __future__ import annotations

import logging

import torch

import comfy.model_management
import comfy.patcher_extension
import comfy.samplers
import comfy.utils

from ...kernels.protocol import step_of_sigma

LOG = logging.getLogger("photoops.semantic_guide")


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


ROWS_KEY = "photoops_rows"


def _flags_wrapper(flags: list, previous):
    """A ``model_function_wrapper`` that labels the batch's chunks as core's CFG does.

    ``calc_cond_batch`` sets ``cond_or_uncond`` to each chunk's index in the guider's list of
    conditionings; other packs' patches read it as core CFG's flags (0 = conditional, 1 =
    unconditional: IPAdapter_plus picks its cond/uncond keys by it, SAG finds the uncond rows).
    The wrapper rewrites it to those flags (``flags[index]``) and keeps the indices under
    ``transformer_options["photoops_rows"]`` for PhotoOps' own attention hooks.
    """

    def wrapper(apply_model, args):
        rows = list(args["cond_or_uncond"])
        c = dict(args["c"])
        opts = dict(c.get("transformer_options", {}))
        opts[ROWS_KEY] = rows
        opts["cond_or_uncond"] = [flags[i] for i in rows]
        c["transformer_options"] = opts
        args = {**args, "c": c, "cond_or_uncond": opts["cond_or_uncond"]}
        if previous is not None:
            return previous(apply_model, args)
        return apply_model(args["input"], args["timestep"], **args["c"])

    return wrapper


class CombineGuider(comfy.samplers.CFGGuider):
    """A GUIDER over several named conditionings, evaluated in ONE batched model call per step
    (as core PerpNegGuider does) and combined by a kernel function.

    ``order`` lists the conditionings in core's order: the positive / target (when there is
    one: ``cond_key``), then the negative (``uncond_key``), then the rest (concepts).  The
    model sees ``cond_or_uncond`` flags as core CFG sets them (:func:`_flags_wrapper`: 1 for the
    negative, 0 for every other row); PhotoOps' hooks see the row indices.

    ``combine(x, sigma, outs, step, cfg_denoised=None)`` gets the denoised predictions in ``order``
    and the 0-based step counted from the first step this run evaluates (so skipped steps of an
    inversion replay do not count toward warm-ups); it returns the guided denoised.  When the
    MODEL carries a ``sampler_cfg_function`` (core PerpNeg, RescaleCFG, ...) and there is a
    positive row, ``cfg_denoised`` is that function's CFG result, computed as core's
    ``cfg_function`` does, for the combine to use as its target-CFG part.
    Pre- and post-CFG hooks of other nodes are replayed around it: pre-CFG functions get the
    conditionings and outputs in ``order``; post-CFG functions get the negative as ``uncond``
    and the positive as ``cond`` (without a positive: the guided result as ``cond_denoised``,
    the negative as ``cond``) [ours].  ``on_run_start(sigmas, sampler)`` is called when a sampling
    run starts (reset momentum, validate step counts against the steps the sampler will run).
    """

    def __init__(self, model_patcher, conds: dict, order: list, combine, cfg: float, on_run_start=None,
                 uncond_key: str = "negative", cond_key: str | None = "positive"):
        super().__init__(model_patcher)
        self.inner_set_conds(conds)
        self.order, self.combine, self.cfg = list(order), combine, float(cfg)
        self.uncond_key, self.cond_key = uncond_key, cond_key if cond_key in order else None
        self.flags = [1 if k == uncond_key else 0 for k in self.order]
        self.on_run_start = on_run_start
        self._first = None
        self._warned = False

    def sample(self, noise, latent_image, sampler, sigmas, *args, **kwargs):
        self._first, self._warned = None, False
        if self.on_run_start is not None:
            self.on_run_start(sigmas, sampler)
        return super().sample(noise, latent_image, sampler, sigmas, *args, **kwargs)

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        conds = [self.conds.get(k) for k in self.order]
        opts = dict(model_options)
        opts["model_function_wrapper"] = _flags_wrapper(self.flags, model_options.get("model_function_wrapper"))
        out = comfy.samplers.calc_cond_batch(self.inner_model, conds, x, timestep, opts)
        for fn in model_options.get("sampler_pre_cfg_function", []):
            out = fn({"conds": conds, "conds_out": out, "cond_scale": self.cfg, "timestep": timestep, "input": x,
                      "sigma": timestep, "model": self.inner_model, "model_options": model_options})
        step, _ = step_of_sigma(float(timestep.flatten()[0]),
                                model_options.get("transformer_options", {}).get("sample_sigmas"))
        step = 0 if step is None else step
        if self._first is None:
            self._first = step
        u = self.order.index(self.uncond_key)
        c = self.order.index(self.cond_key) if self.cond_key is not None else None
        cfg_fn = model_options.get("sampler_cfg_function")
        kw = {}
        if cfg_fn is not None and c is not None:
            # another node's CFG rule (PerpNeg, RescaleCFG, ...) makes the target-CFG part, as core's cfg_function
            kw["cfg_denoised"] = x - cfg_fn({
                "cond": x - out[c], "uncond": x - out[u], "cond_scale": self.cfg, "timestep": timestep, "input": x,
                "sigma": timestep, "cond_denoised": out[c], "uncond_denoised": out[u], "model": self.inner_model,
                "model_options": model_options, "input_cond": conds[c], "input_uncond": conds[u]})
        elif cfg_fn is not None and not self._warned:
            self._warned = True
            LOG.warning("Semantic Guide: the MODEL carries a CFG function (PerpNeg, RescaleCFG, ...) that needs a "
                        "positive row; with use_target off there is none, so it is not applied")
        result = self.combine(x, timestep, out, step - self._first, **kw)
        for fn in model_options.get("sampler_post_cfg_function", []):
            result = fn({"denoised": result, "cond": conds[u if c is None else c], "uncond": conds[u],
                         "model": self.inner_model, "uncond_denoised": out[u],
                         "cond_denoised": result if c is None else out[c], "sigma": timestep,
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
