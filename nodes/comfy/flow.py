"""Rectified-flow models (SD3 / SD3.5 / Flux): family checks, sigma lists, fingerprints, flow inversion and replay,
and the FlowEdit GUIDER / sampler function.

Touches ``comfy.model_sampling`` (``CONST``: ComfyUI's flow parameterisation, spec ``rectified-flow.md``
§1.1), the BaseModel's latent format (``process_latent_in`` / ``out``) and, through
:mod:`.sampling`, a core CFGGuider.  The maths is in ``kernels/flow_inversion.py``.

Why flow inversion does not read the sampler's ``x``: ComfyUI hands a sampler
``noise_scaling(s_0, noise, latent) = s_0 noise + (1 - s_0) latent`` (``model_sampling.py`` l.70-72),
which is 0 for the flow list's ``s_0 = 1`` and zero noise; the photo latent is taken from the
LATENT through the model's own ``process_latent_in`` instead, and the start latent is returned
through ``process_latent_out`` (not through the sampler's ``inverse_noise_scaling``).
"""
from __future__ import annotations

import comfy.model_sampling
import comfy.samplers
import torch

from ...kernels import flow_inversion as kflow
from ...kernels import flowedit as kfe
from ...kernels.files import content_hash
from ...kernels.inversion_state import Inversion
from ...kernels.protocol import UnsupportedModelError
from ...kernels.schedule import invertible_sigmas
from .sampling import interrupt_check, progress_bar, run_with_guider

FLOW_METHODS = ("flow_ode", "flow_noise_maps", "rf_inversion")


def is_flow(model) -> bool:
    """Whether ``model`` (a ModelPatcher) samples as a rectified flow (``model_sampling`` is CONST)."""
    return isinstance(model.get_model_object("model_sampling"), comfy.model_sampling.CONST)


def family(model) -> str:
    """The model's family as ComfyUI's detection named it (``SD3``, ``Flux``, ``SD15``, ...)."""
    base = model.model if hasattr(model, "model") else model
    cfg = getattr(base, "model_config", None)
    return type(cfg).__name__ if cfg is not None else type(base).__name__


def check_method_fits(model, method: str) -> None:
    """Flow methods need a CONST model, the VP methods a VP one; the message names the family."""
    flow = is_flow(model)
    if method in FLOW_METHODS and not flow:
        raise UnsupportedModelError(
            f"Invert method '{method}' is for rectified-flow models (SD3, SD3.5, Flux); this model is "
            f"{family(model)}, a VP (eps / v-prediction) model: use ddpm, eta, ddim or dpmpp_2m_sde")
    if method == "eta" and flow:
        raise UnsupportedModelError(
            f"Eta Inversion is defined for VP (DDIM) schedules; this model is {family(model)}, a rectified-flow "
            f"model: use Invert method 'flow_noise_maps' (exact, edit-friendly), 'rf_inversion' or the FlowEdit sampler")
    if method not in FLOW_METHODS and flow:
        raise UnsupportedModelError(
            f"Invert method '{method}' is defined for VP (eps / v-prediction) UNets; this model is {family(model)}, "
            f"a rectified-flow model: use flow_noise_maps (exact, edit-friendly), flow_ode or rf_inversion")


def _prediction(model) -> str:
    ms = model.get_model_object("model_sampling")
    kind = next((c.__name__ for c in type(ms).__mro__ if c.__module__ == comfy.model_sampling.__name__
                 and c.__name__.startswith("ModelSampling")), type(ms).__name__)
    return f"flow ({kind}, shift {float(getattr(ms, 'shift', 1.0)):.6g})"


def flow_fingerprint(model) -> dict:
    """Family, the sampling shift (a replay with another shift changes ``timestep(s)``, spec §2.6) and a
    hash of the diffusion model's first and last parameters (taken from the patcher's backup when a
    LoRA patches them)."""
    base = model.model if hasattr(model, "model") else model
    params = list(base.diffusion_model.named_parameters())
    backup = getattr(model, "backup", {}) or {}
    ws = []
    for name, w in (params[0], params[-1]):
        key = "diffusion_model." + name
        ws.append((backup[key].weight if key in backup else w).detach().float())
    fp = {"family": type(base).__name__, "weights": content_hash(*ws, length=16, stride_to=4096)}
    if hasattr(model, "get_model_object"):
        fp["prediction"] = _prediction(model)
    return fp


def prepare_sigmas(model, sigmas) -> tuple:
    """Flow SIGMAS for inversion: ``(sigmas, info)``; a final 0 becomes the model's ``sigma_min`` (its
    smallest table entry) or is dropped when the list already reaches it, as the VP ``Invert`` does
    (``kernels.schedule.invertible_sigmas``)."""
    s = torch.as_tensor(sigmas, dtype=torch.float64).flatten().cpu()
    if s.numel() and float(s[0]) > 1.0 + 1e-6:
        raise ValueError(f"these SIGMAS start at {float(s[0]):.4g}, a VP schedule; a rectified-flow model "
                         f"({family(model)}) samples flow times in [0, 1]: build them with this model")
    return invertible_sigmas(s, float(model.get_model_object("model_sampling").sigma_min))


def invert_flow(model, positive, negative, latent: torch.Tensor, sigmas, method: str, skip: int, cfg: float,
                seed: int, gamma: float = 0.5, fixed_point: int = 0) -> tuple:
    """Run a flow inversion inside a core CFGGuider; ``(Inversion, start latent in LATENT space)``."""
    check_method_fits(model, method)
    s, info = prepare_sigmas(model, sigmas)
    n = s.numel() - 1
    if not 0 <= skip < n:
        raise ValueError(f"skip ({skip}) must be smaller than the number of steps ({n})")
    base = model.model
    x_photo = base.process_latent_in(latent.float())
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    pbar = progress_bar(n * (1 + int(fixed_point)) if method == "flow_ode" else n)

    def tick(_):
        pbar.update(1 + (int(fixed_point) if method == "flow_ode" else 0))

    def work(denoise, x, sig):
        x0 = x_photo.to(device=x.device, dtype=torch.float32)
        noises, etas = None, torch.zeros(n)          # cpu: stored metadata
        if method == "flow_noise_maps":
            _, noises, ladder = kflow.rf_ancestral_invert(denoise, x0, sig, eta=1.0, generator=gen, callback=tick,
                                                          interrupt=interrupt_check)
            etas = torch.ones(n)                     # cpu: stored metadata
        elif method == "flow_ode":
            ladder, res = kflow.euler_invert(denoise, x0, sig, fixed_point=fixed_point, callback=tick,
                                             interrupt=interrupt_check)
            info["residuals"] = [float(r) for r in res]
        else:
            ladder = kflow.rf_inversion_invert(denoise, x0, sig, gamma=gamma, generator=gen, callback=tick,
                                               interrupt=interrupt_check)
        return (ladder[n - skip].clone(), noises, etas, ladder[: n - skip + 1].flip(0)), x

    (x_start, noises, etas, src), _ = run_with_guider(model, positive, negative, cfg, latent, s.float(), work,
                                                      seed=seed)
    inv = Inversion(method=method, sigmas=s, x_start=x_start.float().cpu(), skip=int(skip),
                    noises=None if noises is None else noises.float().cpu(), eta=etas.float(), source_cfg=float(cfg),
                    seed=int(seed), fingerprint=flow_fingerprint(model),
                    source={"positive": positive[0][0].detach().float().cpu()} if positive else {},
                    info={**info, "gamma": float(gamma), "fixed_point": int(fixed_point)},
                    source_ladder=src.float().cpu())
    out = base.process_latent_out(x_start.to(latent.device)).to(latent.dtype)
    return inv, out


def replay_flow(model, x0, run_sigmas, inv: Inversion, start: int, extra_args=None, callback=None, disable=None,
                lock=None, rf=None):
    """The flow replay of ``inv`` from ``x0`` (its start latent) over ``run_sigmas`` (k-diffusion sampler body).

    ``flow_noise_maps``: ComfyUI's RF ancestral steps with the stored maps; ``flow_ode``: Euler;
    ``rf_inversion``: RF-Inversion's controlled reverse ODE toward the photo's latent with
    ``rf = (eta, start, stop)`` (fractions of the full schedule; eta 0 = plain Euler).
    """
    if inv.method == "flow_noise_maps":
        noises = inv.noises.to(device=x0.device, dtype=x0.dtype)
        return kflow.rf_ancestral_sample(model, x0, run_sigmas, extra_args=extra_args, callback=callback,
                                         disable=disable, noises=noises, eta=inv.eta.tolist(), start=start, lock=lock)
    y0, eta = None, 0.0
    if inv.method == "rf_inversion" and rf is not None and float(rf[0]) > 0:
        if inv.source_ladder is None:
            raise ValueError("this rf_inversion INVERSION holds no source latent (saved by an older PhotoOps)")
        y0 = inv.source_ladder[-1].to(device=x0.device, dtype=x0.dtype)
        eta = kflow.rf_eta_per_step(inv.steps, *rf)
    return kflow.flow_euler_sample(model, x0, run_sigmas, extra_args=extra_args, callback=callback, disable=disable,
                                   start=start, lock=lock, y0=y0, eta=eta)


FLOWEDIT_KEY = "photoops_flowedit"     # transformer_options flag: which FlowEdit branch a model call is for


class FlowEditGuider(comfy.samplers.CFGGuider):
    """Source and target conditionings with their own CFG (spec §2.4; Flux: cfg 1, FluxGuidance on each prompt).

    A model call whose ``transformer_options[FLOWEDIT_KEY]`` is ``"source"`` is guided with the source
    prompt and CFG, any other call with the target (so with an ordinary sampler this is a CFGGuider
    for the target prompt).  Both go through core's ``sampling_function`` (CFG rules and pre/post-CFG
    hooks of other nodes apply per branch).
    """

    def __init__(self, model_patcher, source_positive, source_negative, source_cfg: float, target_positive,
                 target_negative, target_cfg: float):
        if not is_flow(model_patcher):
            raise UnsupportedModelError(f"FlowEdit is for rectified-flow models (SD3, SD3.5, Flux); this model is "
                                        f"{family(model_patcher)}, a VP model: use Invert + Inversion Sampler")
        super().__init__(model_patcher)
        self.inner_set_conds({"positive": target_positive, "negative": target_negative,
                              "source_positive": source_positive, "source_negative": source_negative})
        self.cfg, self.source_cfg = float(target_cfg), float(source_cfg)

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        if model_options.get("transformer_options", {}).get(FLOWEDIT_KEY) == "source":
            return comfy.samplers.sampling_function(self.inner_model, x, timestep, self.conds.get("source_negative"),
                                                    self.conds.get("source_positive"), self.source_cfg,
                                                    model_options=model_options, seed=seed)
        return super().predict_noise(x, timestep, model_options=model_options, seed=seed)


def _branch(model, extra_args: dict, name: str):
    mo = dict(extra_args.get("model_options", {}))
    mo["transformer_options"] = {**mo.get("transformer_options", {}), FLOWEDIT_KEY: name}
    args = {**extra_args, "model_options": mo}
    return lambda z, s: model(z, s, **args)


def flowedit_sampler(model, x, sigmas, extra_args=None, callback=None, disable=None, n_max=24, n_min=0, n_avg=1,
                     seed=0):
    """k-diffusion sampler function: FlowEdit from the photo (SamplerCustomAdvanced's ``latent_image``)."""
    if not isinstance(getattr(model, "inner_model", None), FlowEditGuider):
        raise ValueError("the FlowEdit Sampler needs the FlowEdit Guider (it holds the source and target prompts)")
    x_src = getattr(model, "latent_image", None)
    if x_src is None or not bool(torch.count_nonzero(x_src)):
        raise ValueError("FlowEdit edits a photo: give SamplerCustomAdvanced the photo's latent (VAE Encode) as "
                         "latent_image, with Disable Noise")
    extra_args = extra_args or {}
    cb = None
    if callback is not None:
        def cb(d):
            callback({"x": d["x"], "i": d["i"], "sigma": d["sigma"], "sigma_hat": d["sigma"],
                      "denoised": d["denoised"]})
    out = kfe.flowedit_sample(_branch(model, extra_args, "source"), _branch(model, extra_args, "target"),
                              x_src.to(device=x.device, dtype=torch.float32), sigmas, n_max, n_min, n_avg,
                              generator=torch.Generator(device="cpu").manual_seed(int(seed)), callback=cb,
                              interrupt=interrupt_check)
    return out.to(x.dtype)
