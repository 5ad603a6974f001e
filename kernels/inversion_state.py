"""The INVERSION object: what an inversion stores to be replayed, saved and loaded.

An inversion of a photo (spec ``ddpm-inversion-sega-ledits.md`` §1.5, ``eta-inversion.md`` §5)
is replayable by a sampler that knows:

* ``sigmas`` — the sampling sigma list it was made for (descending, k-diffusion form);
* ``x_start`` — the k-space latent at ``sigmas[skip]`` where replay starts;
* ``noises`` — per-step noise maps ``[N, B, C, H, W]`` (edit-friendly DDPM ``z_i``, or Eta
  Inversion's selected / optimal noise); absent for plain DDIM;
* ``eta`` — per-step eta, ``[N]`` or per-pixel ``[N, B, 1, H, W]``;
* the source conditioning and CFG it was made with (replaying with them reconstructs the
  photo; spec §1 "Rule 2"), a fingerprint of the model and the latent shape.

Files are safetensors: tensors plus a JSON metadata entry ``photoops_inversion``.  They
are written atomically, and :func:`load_inversion` checks everything before returning,
so a corrupt, truncated or foreign file gives :class:`InversionFileError` and nothing
half-loaded.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Optional

import torch

from .files import ChecksumError, read_safetensors, save_safetensors_atomic

__all__ = ["Inversion", "InversionFileError", "InversionMismatchError", "save_inversion", "load_inversion",
           "METHODS", "FORMAT_VERSION"]

METHODS = ("ddim", "ddpm", "eta", "dpmpp_2m_sde", "flow_ode", "flow_noise_maps", "rf_inversion")  # flow: issue 19
FORMAT_VERSION = 1
_META_KEY = "photoops_inversion"


class InversionFileError(ValueError):
    """A file that is not a readable PhotoOps inversion."""


class InversionMismatchError(ValueError):
    """Replaying an inversion with other sigmas, latent size or model."""


@dataclass
class Inversion:
    method: str
    sigmas: torch.Tensor
    x_start: torch.Tensor
    skip: int = 0
    noises: Optional[torch.Tensor] = None
    eta: Optional[torch.Tensor] = None
    source_cfg: float = 1.0
    seed: int = 0
    fingerprint: dict = field(default_factory=dict)
    source: dict = field(default_factory=dict)     # name -> tensor (source conditioning)
    info: dict = field(default_factory=dict)       # free-form (prompt text, settings) for the user
    # the source latents at the levels a replay visits, sigmas[skip..N] ([N - skip + 1, B, C, H, W]),
    # for the background lock (kernels.inversion.BackgroundLock); None in files written before it
    source_ladder: Optional[torch.Tensor] = None

    def __post_init__(self):
        self.validate()

    @property
    def steps(self) -> int:
        return int(self.sigmas.numel()) - 1

    @property
    def latent_shape(self) -> tuple:
        return tuple(self.x_start.shape)

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown inversion method {self.method!r}; expected one of {METHODS}")
        if self.sigmas.ndim != 1 or self.sigmas.numel() < 2:
            raise ValueError("an inversion needs a sigma list of at least two entries")
        if not torch.all(self.sigmas[:-1] > self.sigmas[1:]):
            raise ValueError("inversion sigmas must be strictly decreasing")
        if not 0 <= self.skip < self.steps:
            raise ValueError(f"skip must be in [0, {self.steps - 1}], got {self.skip}")
        if self.x_start.ndim != 4:
            raise ValueError(f"x_start must be [B, C, H, W], got {tuple(self.x_start.shape)}")
        if self.method in ("ddpm", "eta", "dpmpp_2m_sde", "flow_noise_maps"):
            if self.noises is None:
                raise ValueError(f"a {self.method} inversion needs its per-step noise maps")
            if tuple(self.noises.shape) != (self.steps, *self.x_start.shape):
                raise ValueError(f"noise maps {tuple(self.noises.shape)} do not match "
                                 f"{self.steps} steps of {tuple(self.x_start.shape)}")
        if self.eta is not None and self.eta.shape[0] != self.steps:
            raise ValueError(f"eta has {self.eta.shape[0]} entries for {self.steps} steps")
        if self.source_ladder is not None and tuple(self.source_ladder.shape) != (
                self.steps - self.skip + 1, *self.x_start.shape):
            raise ValueError(f"source ladder {tuple(self.source_ladder.shape)} does not match the "
                             f"{self.steps - self.skip + 1} replayed levels of {tuple(self.x_start.shape)}")

    def check_replay(self, sigmas: torch.Tensor, latent_shape=None, fingerprint: Optional[dict] = None) -> None:
        """Raise :class:`InversionMismatchError` naming what differs from the inversion."""
        s = torch.as_tensor(sigmas, dtype=torch.float64).flatten().cpu()
        mine = self.sigmas.double().cpu()
        if s.numel() != mine.numel() or not torch.allclose(s, mine, rtol=1e-5, atol=1e-7):
            raise InversionMismatchError(
                f"sigma mismatch: the inversion was made with {mine.numel() - 1} steps "
                f"(sigmas {_short(mine)}), the sampler got {s.numel() - 1} steps (sigmas {_short(s)}); "
                f"use the same scheduler, steps and denoise as for Invert")
        if latent_shape is not None and tuple(latent_shape)[1:] != self.latent_shape[1:]:
            raise InversionMismatchError(
                f"latent size mismatch: the inversion is {self.latent_shape[1:]} (C, H, W), "
                f"the latent given is {tuple(latent_shape)[1:]}")
        if latent_shape is not None and tuple(latent_shape)[0] not in (self.latent_shape[0],):
            raise InversionMismatchError(
                f"batch mismatch: the inversion holds {self.latent_shape[0]} image(s), the latent {latent_shape[0]}")
        if fingerprint:
            for key in ("family", "weights", "prediction"):
                a, b = self.fingerprint.get(key), fingerprint.get(key)
                if a is not None and b is not None and a != b:
                    raise InversionMismatchError(
                        f"model mismatch ({key}): the inversion was made with {a}, this model is {b}")

    def nbytes(self) -> int:
        ts = [self.sigmas, self.x_start, self.noises, self.eta, self.source_ladder, *self.source.values()]
        return sum(t.numel() * t.element_size() for t in ts if t is not None)


def _short(s: torch.Tensor) -> str:
    v = [f"{x:.4g}" for x in s.tolist()]
    return "[" + ", ".join(v if len(v) <= 6 else v[:3] + ["..."] + v[-2:]) + "]"


def save_inversion(inv: Inversion, path) -> str:
    """Write ``inv`` to ``path`` (``.safetensors``) atomically, with a content checksum; returns the path."""
    inv.validate()
    tensors = {"sigmas": inv.sigmas.double().cpu().contiguous(), "x_start": inv.x_start.float().cpu().contiguous()}
    if inv.noises is not None:
        tensors["noises"] = inv.noises.float().cpu().contiguous()
    if inv.eta is not None:
        tensors["eta"] = inv.eta.float().cpu().contiguous()
    if inv.source_ladder is not None:
        tensors["source_ladder"] = inv.source_ladder.float().cpu().contiguous()
    for k, v in inv.source.items():
        tensors[f"source.{k}"] = v.float().cpu().contiguous()
    meta = {"format_version": FORMAT_VERSION, "method": inv.method, "skip": inv.skip,
            "source_cfg": inv.source_cfg, "seed": inv.seed, "fingerprint": inv.fingerprint, "info": inv.info}
    path = str(path)
    save_safetensors_atomic(path, tensors, {_META_KEY: json.dumps(meta)})
    return path


def load_inversion(path) -> Inversion:
    """Read an inversion file; :class:`InversionFileError` on anything unexpected."""
    path = str(path)
    try:
        tensors, raw = read_safetensors(path)
    except ChecksumError as e:
        raise InversionFileError(str(e)) from e
    except Exception as e:  # safetensors raises several types on corrupt headers
        raise InversionFileError(f"cannot read {os.path.basename(path)} as an inversion: {e}") from e
    meta_raw = raw.get(_META_KEY)
    if meta_raw is None:
        raise InversionFileError(f"{os.path.basename(path)} is not a PhotoOps inversion file "
                                 f"(no '{_META_KEY}' metadata)")
    try:
        meta = json.loads(meta_raw)
    except json.JSONDecodeError as e:
        raise InversionFileError(f"{os.path.basename(path)}: corrupt inversion metadata ({e})") from e
    if meta.get("format_version") != FORMAT_VERSION:
        raise InversionFileError(f"{os.path.basename(path)}: inversion format version {meta.get('format_version')!r} "
                                 f"is not supported (expected {FORMAT_VERSION})")
    for k in ("sigmas", "x_start"):
        if k not in tensors:
            raise InversionFileError(f"{os.path.basename(path)}: missing tensor {k!r}")
    try:
        return Inversion(method=meta["method"], sigmas=tensors["sigmas"], x_start=tensors["x_start"],
                         skip=int(meta["skip"]), noises=tensors.get("noises"), eta=tensors.get("eta"),
                         source_cfg=float(meta["source_cfg"]), seed=int(meta["seed"]),
                         fingerprint=dict(meta.get("fingerprint") or {}),
                         source={k[len("source."):]: v for k, v in tensors.items() if k.startswith("source.")},
                         info=dict(meta.get("info") or {}), source_ladder=tensors.get("source_ladder"))
    except (KeyError, TypeError, ValueError) as e:
        raise InversionFileError(f"{os.path.basename(path)}: inconsistent inversion ({e})") from e
