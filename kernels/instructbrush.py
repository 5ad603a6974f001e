"""InstructBrush: attention-based instruction optimisation for InstructPix2Pix.

Zhao et al., "InstructBrush: Learning Attention-based Instruction Optimization for Image
Editing", arXiv 2403.18660; spec ``shared/docs/algorithms/instructbrush.md`` (cited as §x).
The paper's code is not public; what the spec marks [ours] is decided here and flagged.

Pieces
------
* :class:`LearnedInstruction` — the learned keys/values (§4.1). For the conditional text
  branch of every cross-attention layer ``l``::

      K^l = [K_0^l ; gamma_K^l ; W_K^l c_{m+1..}]      V^l = [V_0^l ; gamma_V^l ; W_V^l c_{m+1..}]   (IB1)

  BOS (row 0) and the rows after the instruction's m word tokens (EOS, padding) keep the
  frozen projections of the initial instruction P0; ``gamma^l in R^{m x d_l}`` start at
  ``W_K^l c_{1..m}``, ``W_V^l c_{1..m}`` (so step 0 is plain IP2P with P0). Optional
  time-aware copies (§4.2): ``j`` independent copies, copy ``k = floor(t j / T)`` at timestep t
  (IB2, [ours] the inference rule the paper does not state). Parameters: ``2 m sum_l d_l`` per copy.
* :class:`InstructionHook` — an :class:`~.attention.AttentionHook` that writes (IB1) into the
  projected K/V. [ours] It finds the rows that carry P0 *by content*: a batch chunk is patched
  when its keys at the instruction positions equal the stored frozen projections ``K_0`` (within
  ``rtol`` of their scale). This works under any guider (CFG, DualCFG, whatever the chunk
  labels), leaves unconditional branches (``∅_T``) untouched as §4.1 requires, and makes a
  conditioning from a different P0 (misaligned rows, §11) detectable: ``hits`` stays 0.
  ``strength`` s blends ``K_0 + s (gamma - K_0)`` (s = 1: gamma exactly; s = 0: plain IP2P).
* :func:`diffusion_loss` (§4.3, IB3) and :func:`learn` — AdamW on gamma only, VISII-style
  schedule (§4.4): one distinct timestep per sample from a seeded permutation of 0..T-1, pairs
  cycled, gradient values clipped to ``±max|gamma_0|``.
* :func:`transformation_oriented_init` — TII (§5, IB4-IB6) on CLIP-like embeddings.

Model access is through small callables (``predict_eps``) so the same code runs on a diffusers
UNet (``instructbrush_diffusers.DiffusersIP2P``, tests and the toy benchmark) and on a ComfyUI
model (``nodes/comfy/ip2p.py``).  :func:`save_checkpoint` / :func:`load_checkpoint` keep a
resumable run (gamma + the AdamW state) in one file.
"""
from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .attention import AttentionHook
from .files import read_safetensors, save_safetensors_atomic
from .protocol import CallInfo

__all__ = [
    "FORMAT",
    "InstructionHook",
    "KVCapture",
    "LearnResult",
    "LearnedInstruction",
    "CheckpointMismatch",
    "check_pairs",
    "load_checkpoint",
    "save_checkpoint",
    "diffusion_loss",
    "instruction_template",
    "ip2p_guided_eps",
    "learn",
    "lr_at",
    "range_index",
    "timestep_weights",
    "transformation_oriented_init",
]

FORMAT = "photoops-instructbrush-v1"
LOG = logging.getLogger("photoops.instructbrush")


# ----------------------------------------------------------------------------- time ranges
def range_index(t, time_ranges: int, num_train_timesteps: int = 1000) -> int:
    """(IB2) copy index ``floor(t j / T)`` clamped to ``[0, j-1]`` (t may be fractional)."""
    if time_ranges < 1:
        raise ValueError(f"time_ranges must be >= 1, got {time_ranges}")
    k = math.floor(float(t) * time_ranges / num_train_timesteps)
    return min(max(k, 0), time_ranges - 1)


# ----------------------------------------------------------------------------- the learned K/V
class LearnedInstruction(torch.nn.Module):
    """Learned instruction keys/values for every cross-attention layer (IB1).

    ``k0[l]``, ``v0[l]``: ``[m, d_l]`` frozen projections of P0's word tokens in layer ``l``
    (layer order = forward order of the cross-attention layers). ``gamma_k[l]`` /
    ``gamma_v[l]``: ``[j, m, d_l]`` parameters, initialised to ``k0`` / ``v0``.
    ``positions`` are the token positions 1..m (BOS = 0).
    """

    def __init__(self, prompt: str, positions: Sequence[int], k0: dict, v0: dict, time_ranges: int = 1,
                 num_train_timesteps: int = 1000, meta: dict | None = None):
        super().__init__()
        if time_ranges < 1:
            raise ValueError(f"time_ranges must be >= 1, got {time_ranges}")
        positions = [int(p) for p in positions]
        if not positions:
            raise ValueError("the initial instruction has no word tokens to learn (m = 0); give a non-empty "
                             "instruction or let the initialisation choose one")
        if sorted(k0) != sorted(v0) or not k0:
            raise ValueError("k0 and v0 must name the same, non-empty set of layers")
        self.prompt = prompt
        self.positions = positions
        self.time_ranges = int(time_ranges)
        self.num_train_timesteps = int(num_train_timesteps)
        self.meta = dict(meta or {})
        self.layers = sorted(int(o) for o in k0)
        for o in self.layers:
            for name, t in (("k0", k0[o]), ("v0", v0[o])):
                if t.ndim != 2 or t.shape[0] != len(positions):
                    raise ValueError(f"{name}[{o}] must be [m={len(positions)}, d], got {tuple(t.shape)}")
        self.k0 = {o: k0[o].detach().float().clone() for o in self.layers}
        self.v0 = {o: v0[o].detach().float().clone() for o in self.layers}
        self.gamma_k = torch.nn.ParameterDict(
            {str(o): torch.nn.Parameter(self.k0[o][None].repeat(self.time_ranges, 1, 1)) for o in self.layers})
        self.gamma_v = torch.nn.ParameterDict(
            {str(o): torch.nn.Parameter(self.v0[o][None].repeat(self.time_ranges, 1, 1)) for o in self.layers})

    # -- facts
    @property
    def m(self) -> int:
        return len(self.positions)

    @property
    def widths(self) -> list:
        return [int(self.k0[o].shape[1]) for o in self.layers]

    def n_params(self) -> int:
        """``2 m sum_l d_l`` per time range (§4.1)."""
        return sum(p.numel() for p in self.parameters())

    def range_of(self, t) -> int:
        return range_index(t, self.time_ranges, self.num_train_timesteps)

    def kv(self, order: int, t) -> tuple:
        k = self.range_of(t)
        return self.gamma_k[str(order)][k], self.gamma_v[str(order)][k]

    def init_scale(self) -> float:
        """max |gamma_0| over all layers (VISII's gradient-value clip, §4.4)."""
        return max(max(float(self.k0[o].abs().max()), float(self.v0[o].abs().max())) for o in self.layers)

    # -- file format
    def to_tensors(self) -> dict:
        out = {}
        for o in self.layers:
            out[f"k0.{o}"] = self.k0[o].contiguous()
            out[f"v0.{o}"] = self.v0[o].contiguous()
            for r in range(self.time_ranges):
                out[f"k.{o}.r{r}"] = self.gamma_k[str(o)][r].detach().float().contiguous()
                out[f"v.{o}.r{r}"] = self.gamma_v[str(o)][r].detach().float().contiguous()
        return out

    def metadata(self) -> dict:
        return {"format": FORMAT, "prompt": self.prompt, "positions": json.dumps(self.positions),
                "time_ranges": str(self.time_ranges), "num_train_timesteps": str(self.num_train_timesteps),
                "layers": json.dumps(self.layers), "widths": json.dumps(self.widths),
                "meta": json.dumps(self.meta, sort_keys=True)}

    def save(self, path: str) -> None:
        """Write the instruction file atomically, with a content checksum (``kernels/files.py``)."""
        save_safetensors_atomic(path, self.to_tensors(), self.metadata())

    @classmethod
    def from_tensors(cls, tensors: dict, metadata: dict) -> LearnedInstruction:
        if (metadata or {}).get("format") != FORMAT:
            raise ValueError(f"not an InstructBrush instruction file (format {metadata.get('format') if metadata else None!r}, "
                             f"expected {FORMAT!r})")
        layers = json.loads(metadata["layers"])
        j = int(metadata["time_ranges"])
        k0 = {o: tensors[f"k0.{o}"] for o in layers}
        v0 = {o: tensors[f"v0.{o}"] for o in layers}
        inst = cls(metadata["prompt"], json.loads(metadata["positions"]), k0, v0, time_ranges=j,
                   num_train_timesteps=int(metadata["num_train_timesteps"]), meta=json.loads(metadata.get("meta", "{}")))
        with torch.no_grad():
            for o in layers:
                for r in range(j):
                    inst.gamma_k[str(o)][r].copy_(tensors[f"k.{o}.r{r}"])
                    inst.gamma_v[str(o)][r].copy_(tensors[f"v.{o}.r{r}"])
        return inst

    @classmethod
    def load(cls, path: str) -> LearnedInstruction:
        """Read an instruction file; a file whose checksum does not match raises :class:`~.files.ChecksumError`."""
        tensors, md = read_safetensors(path)
        return cls.from_tensors({k: v for k, v in tensors.items() if not k.startswith("adam.")}, md)

    def check_layers(self, widths: Sequence[int]) -> None:
        """Raise unless the model's cross-attention widths (forward order) match the learned ones."""
        widths = [int(w) for w in widths]
        if widths != self.widths:
            raise ValueError(f"this instruction was learned on a model with cross-attention widths {self.widths}; "
                             f"the model given has {widths}. Use the InstructPix2Pix model it was learned on.")


# ----------------------------------------------------------------------------- hooks
class KVCapture(AttentionHook):
    """Record the projected K/V of token ``positions`` (first row of chunk ``cond_index``) per layer."""

    def __init__(self, positions: Sequence[int], cond_index: int = 0):
        self.positions = list(positions)
        self.cond_index = cond_index
        self.k, self.v, self.heads = {}, {}, {}

    def active(self, layer, call):
        return bool(call.rows_of(self.cond_index))

    def modify_kv(self, k, v, heads, layer, call):
        r = call.rows_of(self.cond_index)[0]
        if max(self.positions) >= k.shape[1]:
            raise ValueError(f"token position {max(self.positions)} is outside the layer's {k.shape[1]} keys")
        self.k[layer.order] = k[r, self.positions].detach().float().clone()
        self.v[layer.order] = v[r, self.positions].detach().float().clone()
        self.heads[layer.order] = heads
        return k, v


class InstructionHook(AttentionHook):
    """Write a :class:`LearnedInstruction` into the conditional branch's K/V (IB1).

    ``timestep_of(call)`` gives the model timestep of a call (for the time-aware copy):
    ``call.extra["timestep"]`` when the caller set it, else ``schedule.timestep(call.sigma)``.
    Chunks are matched by content (module docstring); ``hits`` counts patched (layer, chunk)
    pairs since the last :meth:`reset_counts`, ``misses`` counts layer calls where no chunk matched.
    """

    def __init__(self, instruction: LearnedInstruction, strength: float = 1.0, schedule=None, rtol: float = 2e-2):
        self.instruction = instruction
        self.strength = float(strength)
        self.schedule = schedule
        self.rtol = float(rtol)
        self.reset_counts()

    def reset_counts(self):
        self.hits = 0
        self.misses = 0
        self.ranges_used = set()

    def end_run(self) -> str | None:
        """Call once when a sampling run ends. If the hook saw cross-attention calls but never found
        the instruction's rows (``hits == 0 < misses``: the conditioning is not P0 as encoded when
        learning — another prompt, another text encoder, a prompt edited after Apply), log one
        warning and return its text; otherwise return None. Counts are left for inspection
        (:meth:`reset_counts` starts the next run)."""
        if self.hits or not self.misses:
            return None
        msg = (f"InstructBrush: the learned instruction was never applied in this sampling run "
               f"({self.misses} cross-attention calls, none with the conditioning of its initial instruction "
               f"{self.instruction.prompt!r}). Use the conditioning that Instruction Apply outputs (same prompt, "
               f"same CLIP) as the positive of InstructPixToPixConditioning; the result is plain InstructPix2Pix.")
        LOG.warning(msg)
        return msg

    def active(self, layer, call):
        return layer.order in self.instruction.k0

    def _timestep(self, call: CallInfo) -> float:
        if "timestep" in call.extra:
            return float(call.extra["timestep"])
        if self.schedule is None:
            raise RuntimeError("InstructionHook needs a schedule to map sigma to a timestep")
        return float(self.schedule.timestep(call.sigma))

    def matching_rows(self, k: torch.Tensor, order: int, call: CallInfo) -> list:
        k0 = self.instruction.k0[order].to(k.device, torch.float32)
        pos = self.instruction.positions
        if max(pos) >= k.shape[1]:
            return []
        tol = self.rtol * float(k0.abs().max()) + 1e-6
        rows = []
        n = call.rows_per_chunk
        for c in range(len(call.chunks)):
            blk = k[c * n:(c + 1) * n, pos].detach().float()
            if blk.shape[0] and float((blk - k0).abs().amax()) <= tol:
                rows.extend(range(c * n, (c + 1) * n))
        return rows

    def modify_kv(self, k, v, heads, layer, call):
        inst = self.instruction
        rows = self.matching_rows(k, layer.order, call)
        if not rows:
            self.misses += 1
            return k, v
        t = self._timestep(call)
        self.ranges_used.add(inst.range_of(t))
        gk, gv = inst.kv(layer.order, t)
        if self.strength != 1.0:
            k0 = inst.k0[layer.order].to(gk.device)
            v0 = inst.v0[layer.order].to(gv.device)
            gk = k0 + self.strength * (gk - k0)
            gv = v0 + self.strength * (gv - v0)
        r = torch.as_tensor(rows, device=k.device)
        p = torch.as_tensor(inst.positions, device=k.device)
        k = k.clone()
        v = v.clone()
        k[r[:, None], p[None, :]] = gk.to(k.device, k.dtype)
        v[r[:, None], p[None, :]] = gv.to(v.device, v.dtype)
        self.hits += len(rows) // max(call.rows_per_chunk, 1)
        return k, v


# ----------------------------------------------------------------------------- loss and guidance
def ip2p_guided_eps(e_it, e_i, e_0, s_text: float, s_image: float):
    """IP2P three-branch guidance (§3): ``e(0,0) + s_I (e(I,0) - e(0,0)) + s_T (e(I,T) - e(I,0))``."""
    return e_0 + s_image * (e_i - e_0) + s_text * (e_it - e_i)


def diffusion_loss(predict_eps: Callable, z0, image, t, noise, alphas_cumprod, guided: tuple | None = None,
                   weights=None):
    """(IB3) ``|| eps - eps_theta(z_t, t, E(x), c_T(gamma)) ||^2`` with ``z_t = sqrt(abar) z0 + sqrt(1-abar) eps``.

    ``predict_eps(z_t, t, image, text)``: ``text`` is True for the instruction, False for the empty
    prompt; ``image`` None means the zero image. ``guided=(s_T, s_I)`` uses the guided prediction
    times 4 instead (VISII variant, §4.3). ``weights`` [B]: per-sample loss weights (e.g.
    :func:`timestep_weights`); None = the plain mean (IB3).
    """
    a = alphas_cumprod.to(z0.device, torch.float32)[t.long()].view(-1, *([1] * (z0.ndim - 1)))
    zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
    if guided is None:
        pred = predict_eps(zt, t, image, True)
        err = (pred.float() - noise) ** 2
    else:
        s_t, s_i = guided
        e = ip2p_guided_eps(predict_eps(zt, t, image, True), predict_eps(zt, t, image, False),
                            predict_eps(zt, t, None, False), s_t, s_i)
        err = 4.0 * (e.float() - noise) ** 2
    if weights is None:
        return err.mean()
    per = err.flatten(1).mean(1)
    return (per * weights.to(per.device, per.dtype)).mean()


WEIGHTINGS = ("eps", "inv_snr")


def timestep_weights(t, alphas_cumprod, weighting: str = "eps", weight_max: float = 50.0):
    """Per-sample weights of the eps-MSE at timesteps ``t`` [ours, off by default].

    ``eps``: 1 (IB3 as in the spec / VISII). ``inv_snr``: ``clamp(1/snr(t), 1, weight_max)`` with
    ``snr = abar / (1 - abar)``, i.e. the eps error converted to the x0 error where the noise
    dominates. Why it exists: the eps-MSE of a pixel/latent denoiser is largest at small t, where
    z_t already shows the content and the text matters little, so with a few samples per step
    the gradient on gamma is mostly low-t noise; the instruction's effect (which colour, which
    layout) is decided at large t, where the eps-MSE is tiny. ``inv_snr`` is the weighting the
    toy InstructPix2Pix was trained with (``tools/toyworld/ip2p_train.py``); use the weighting
    the model was trained with (plain eps for Stable Diffusion's IP2P).
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    t = torch.as_tensor(t).long()
    if weighting == "eps":
        return torch.ones(t.shape, dtype=torch.float32, device=t.device)
    a = alphas_cumprod.double().cpu()[t.cpu()]
    return ((1 - a) / a).clamp(1.0, float(weight_max)).float().to(t.device)


def check_pairs(before: torch.Tensor, after: torch.Tensor, what: str = "images") -> None:
    """Clear errors for before/after sets that cannot be pairs."""
    if before.ndim != 4 or after.ndim != 4:
        raise ValueError(f"before and after {what} must be batches [N, ...] of 4 dimensions, got "
                         f"{tuple(before.shape)} and {tuple(after.shape)}")
    if before.shape[0] == 0:
        raise ValueError(f"no before {what} given")
    if before.shape[0] != after.shape[0]:
        raise ValueError(f"got {before.shape[0]} before {what} but {after.shape[0]} after {what}: InstructBrush "
                         f"learns from pairs, give the same number of each, in matching order")
    if before.shape[1:] != after.shape[1:]:
        raise ValueError(f"before {what} are {tuple(before.shape[1:])} but after {what} are "
                         f"{tuple(after.shape[1:])}: each pair must have the same size")


@dataclass
class LearnResult:
    instruction: LearnedInstruction
    losses: list
    steps_done: int
    interrupted: bool = False


LR_SCHEDULES = ("constant", "cosine")


def lr_at(step: int, steps: int, lr: float, schedule: str = "constant") -> float:
    """Learning rate of step ``step`` (0-based) of ``steps`` [ours]: ``constant``, or ``cosine``
    decay ``lr (1 + cos(pi step / steps)) / 2`` to 0 (a pure function of the step, so resume is exact)."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {schedule!r}")
    if schedule == "constant":
        return float(lr)
    return float(lr) * 0.5 * (1.0 + math.cos(math.pi * min(step, steps) / max(steps, 1)))


def learn(instruction: LearnedInstruction, predict_eps: Callable, before, after, alphas_cumprod, *,
          steps: int = 1000, lr: float = 1e-3, seed: int = 0, batch_size: int = 1,
          loss_on_guided_prediction: bool = False, guidance: tuple = (7.5, 1.5), clip_grad: bool = True,
          t_range: tuple | None = None, weighting: str = "eps", weight_max: float = 50.0,
          lr_schedule: str = "constant",
          callback: Callable | None = None, start_step: int = 0, optimizer_state: dict | None = None) -> LearnResult:
    """Optimise ``instruction``'s gamma on before/after latent pairs (§4.3-4.4).

    ``before``: image-conditioning latents ``E(x_i)`` [N, Ci, h, w]; ``after``: target latents
    ``z0_i`` [N, C, h, w] (already scaled as the model expects). Only gamma is optimised (AdamW,
    betas 0.9/0.999, wd 0, fp32). Sample ``s`` of the run uses pair ``s mod N`` and the timestep
    ``perm[s mod T]`` of a seeded permutation of the timesteps (a fresh permutation every T
    samples) with seeded noise [visii]. ``batch_size`` samples per step [ours: default 1 = VISII].
    [ours, defaults = the spec] ``t_range=(lo, hi)`` draws the timesteps from ``lo..hi-1`` only;
    ``weighting`` / ``weight_max``: per-timestep loss weights (:func:`timestep_weights`);
    ``lr_schedule``: :func:`lr_at`.
    ``callback(step, loss, instruction)`` runs after every step; it may raise to stop (ComfyUI
    interrupt) — the instruction then holds the last completed step. [ours] The result is the
    last step's gamma (VISII's "lowest single-step MSE" mostly picks a step with tiny t).
    ``start_step`` / ``optimizer_state`` resume a run: the schedule of samples is a pure function
    of (seed, step), so a resumed run sees the same samples as an uninterrupted one.
    """
    check_pairs(before, after, "latents")
    if steps < 1:
        raise ValueError("steps must be >= 1")
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    n = before.shape[0]
    T = int(alphas_cumprod.numel())
    lo, hi = (0, T) if t_range is None else (int(t_range[0]), int(t_range[1]))
    if not 0 <= lo < hi <= T:
        raise ValueError(f"t_range must satisfy 0 <= lo < hi <= {T}, got {t_range}")
    timestep_weights(torch.zeros(1), alphas_cumprod, weighting, weight_max)     # cpu: only validates the name
    lr_at(0, steps, lr, lr_schedule)
    span = hi - lo
    params = list(instruction.parameters())
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
    if optimizer_state is not None:
        opt.load_state_dict(optimizer_state)
    instruction._optimizer = opt          # callbacks may checkpoint ``opt.state_dict()``
    clip = instruction.init_scale() if clip_grad else None
    guided = tuple(guidance) if loss_on_guided_prediction else None
    losses = []
    step = start_step
    perms = {}

    def sample(s):
        epoch, i = divmod(s, span)
        if epoch not in perms:
            g = torch.Generator().manual_seed(int(seed) * 1_000_003 + epoch)
            perms[epoch] = torch.randperm(span, generator=g) + lo     # cpu: seeded; read as Python ints
        g = torch.Generator().manual_seed(int(seed) * 7_919 + 1_000_000 * (epoch + 1) + i)
        noise = torch.randn(after.shape[1:], generator=g)       # cpu: seeded draw, stacked and moved below
        return s % n, int(perms[epoch][i]), noise

    with torch.enable_grad():
        while step < steps:
            idx, ts, noises = zip(*[sample(step * batch_size + b) for b in range(batch_size)])
            idx = list(idx)
            t = torch.tensor(ts, dtype=torch.long, device=after.device)
            noise = torch.stack(noises).to(after.device, after.dtype)
            w = None if weighting == "eps" else timestep_weights(t, alphas_cumprod, weighting, weight_max)
            loss = diffusion_loss(predict_eps, after[idx], before[idx], t, noise, alphas_cumprod, guided=guided,
                                  weights=w)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if clip is not None:
                torch.nn.utils.clip_grad_value_(params, clip)
            for group in opt.param_groups:
                group["lr"] = lr_at(step, steps, lr, lr_schedule)
            opt.step()
            step += 1
            losses.append(float(loss.detach()))
            if callback is not None:
                callback(step, losses[-1], instruction)
    instruction._optimizer_state = opt.state_dict()
    return LearnResult(instruction, losses, step)


# ----------------------------------------------------------------------------- resumable checkpoints
class CheckpointMismatch(ValueError):
    """A checkpoint made with other settings, pairs or initial instruction (not resumable)."""


#: Settings that may change between an interrupted run and its resumption: the sample schedule
#: is a pure function of (seed, step), so only the number of steps still to run differs.
RESUMABLE_CHANGES = ("steps",)


def save_checkpoint(path: str, instruction: LearnedInstruction, settings: dict, step: int,
                    optimizer_state: dict | None = None) -> None:
    """One resumable file: gamma (the instruction file's tensors), the AdamW state and ``settings``.

    ``optimizer_state`` defaults to the optimiser :func:`learn` is running (``instruction._optimizer``).
    Written atomically with a checksum, so an interrupt while saving leaves the previous checkpoint.
    """
    tensors = instruction.to_tensors()
    if optimizer_state is None:
        opt = getattr(instruction, "_optimizer", None)
        optimizer_state = opt.state_dict() if opt is not None else None
    meta = instruction.metadata()
    meta.update(partial_step=str(int(step)), settings=json.dumps(settings, sort_keys=True))
    if optimizer_state is not None:
        for i, st in optimizer_state["state"].items():
            for k, v in st.items():
                v = torch.as_tensor(v).detach().float().cpu()
                tensors[f"adam.{i}.{k}"] = v.reshape(-1) if k == "step" else v.contiguous()
        meta["adam_groups"] = json.dumps(optimizer_state["param_groups"])
    save_safetensors_atomic(path, tensors, meta)


def load_checkpoint(path: str, instruction: LearnedInstruction, settings: dict) -> tuple:
    """Copy a checkpoint's gamma into ``instruction``; returns ``(step, optimizer_state or None)``.

    Raises :class:`CheckpointMismatch` when the checkpoint was made with other settings (those in
    :data:`RESUMABLE_CHANGES` aside), pairs or initial instruction, and
    :class:`~.files.ChecksumError` when its bytes were altered.
    """
    tensors, meta = read_safetensors(path)
    saved = json.loads(meta.get("settings", "{}"))
    want = json.loads(json.dumps(settings, sort_keys=True))
    for k in RESUMABLE_CHANGES:
        saved.pop(k, None)
        want.pop(k, None)
    if saved != want or meta.get("prompt") != instruction.prompt:
        diff = sorted(k for k in set(saved) | set(want) if saved.get(k) != want.get(k))
        raise CheckpointMismatch(f"{path} was made with other settings, pairs or instruction "
                                 f"({', '.join(diff) or 'prompt'} differ)")
    loaded = LearnedInstruction.from_tensors({k: v for k, v in tensors.items() if not k.startswith("adam.")}, meta)
    with torch.no_grad():
        for p, q in zip(instruction.parameters(), loaded.parameters()):
            p.copy_(q)
    opt = None
    if "adam_groups" in meta:
        state = {}
        for k, v in tensors.items():
            if k.startswith("adam."):
                _, i, name = k.split(".", 2)
                state.setdefault(int(i), {})[name] = v.reshape(()) if name == "step" else v
        opt = {"state": state, "param_groups": json.loads(meta["adam_groups"])}
    return int(meta["partial_step"]), opt


# ----------------------------------------------------------------------------- TII
def instruction_template(px: str, py: str) -> str:
    """§5 step 6: ``turn {P_x} into {P_y}``; ``make it {P_y}`` without P_x [ours]; "" without P_y."""
    if not py:
        return ""
    if not px:
        return f"make it {py}"
    return f"turn {px} into {py}"


TII_MODES = ("relative", "absolute", "softmax")


def transformation_oriented_init(phrases: Sequence[str], phrase_emb, before_emb, after_emb, *, r: int = 5,
                                 eta: float = 0.15, mode: str = "relative", joiner: str = ", ",
                                 template: Callable = instruction_template) -> dict:
    """Transformation-oriented instruction initialisation (§5).

    Embeddings are CLIP-like (any dimension; they are L2-normalised here): ``phrase_emb`` [P, D],
    ``before_emb`` / ``after_emb`` [N, D].

    (IB4) ``s_X(v) = mean_i cos(E_T(v), E_I(x_i))``, ``s_Y`` likewise on the after images;
    (IB5) sensitivity ``Δ_X = s_X - s_Y``, ``Δ_Y = s_Y - s_X``; top-``r`` of each = unique phrases;
    (IB6) truncation: keep v when ``score(v) >= eta`` where [ours] ``relative`` = ``Δ(v) / s(v)``
    (s of its own side), ``absolute`` = ``Δ(v)``, ``softmax`` = softmax of Δ over all phrases.
    Survivors (best first) are joined with ``joiner`` into P_x, P_y and put into ``template``.
    Returns ``{"prompt", "px", "py", "before_phrases", "after_phrases", "scores_x", "scores_y"}``;
    prompt "" is the "None" fallback (no phrase of the after side survived).
    """
    if mode not in TII_MODES:
        raise ValueError(f"mode must be one of {TII_MODES}, got {mode!r}")
    if len(phrases) != phrase_emb.shape[0]:
        raise ValueError(f"{len(phrases)} phrases but {phrase_emb.shape[0]} phrase embeddings")
    if before_emb.shape[0] != after_emb.shape[0] or before_emb.shape[0] == 0:
        raise ValueError("before and after embeddings must be non-empty and equally many")
    if r < 1:
        raise ValueError("r must be >= 1")
    nrm = torch.nn.functional.normalize
    pe, be, ae = nrm(phrase_emb.double(), dim=-1), nrm(before_emb.double(), dim=-1), nrm(after_emb.double(), dim=-1)
    s_x = (pe @ be.T).mean(1)                                           # (IB4)
    s_y = (pe @ ae.T).mean(1)
    d_x, d_y = s_x - s_y, s_y - s_x                                     # (IB5)
    if mode == "relative":
        sc_x, sc_y = d_x / s_x.abs().clamp_min(1e-8), d_y / s_y.abs().clamp_min(1e-8)
    elif mode == "absolute":
        sc_x, sc_y = d_x, d_y
    else:
        sc_x, sc_y = torch.softmax(d_x, 0), torch.softmax(d_y, 0)

    def pick(delta, score):
        order = torch.argsort(delta, descending=True)[:r].tolist()      # unique phrases: top-r by Δ
        return [phrases[i] for i in order if float(score[i]) >= eta and float(delta[i]) > 0]   # (IB6)

    bx, by = pick(d_x, sc_x), pick(d_y, sc_y)
    px, py = joiner.join(bx), joiner.join(by)
    return {"prompt": template(px, py), "px": px, "py": py, "before_phrases": bx, "after_phrases": by,
            "scores_x": sc_x.float(), "scores_y": sc_y.float()}


def prompt_positions(n_tokens: int) -> list:
    """Positions 1..m of a prompt's word tokens (BOS at 0)."""
    return list(range(1, n_tokens + 1))

