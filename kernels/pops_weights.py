"""pOps operator files: key layout, safe loading, validation, statistics, fp16 conversion.

Spec ``pops-operators.md`` §8.  The released operators (``models/<op>/learned_prior.pth``
in the ``pOpsPaper/operators`` repository) are fp32 ``torch.save`` pickles of the prior's
state dict: the diffusers ``PriorTransformer`` keys **without** ``clip_mean``/``clip_std``
(336 tensors for the Kandinsky 2.2 config).  μ and σ come from the base Kandinsky 2.2
prior file (``prior/diffusion_pytorch_model.safetensors`` or ``.bin``) or from a small
statistics file holding just ``clip_mean``/``clip_std``.

Rules [ours]:

* pickles are read only with ``torch.load(weights_only=True, mmap=True)`` (the safe
  unpickler; memory-mapped so a 4.1 GB file is not copied into RAM before conversion);
  safetensors through ``safetensors``;
* a leading ``module.`` is stripped; every expected key must be present with the
  expected shape, nothing else may be present (besides ``clip_mean``/``clip_std``);
* μ, σ must be found (operator file first, then the statistics file) and σ must be
  positive: zeros would silently collapse every output to μ (§12);
* every check runs before any network is built, so a bad file leaves nothing half-loaded.

The number of attention heads is not visible in the shapes; it is read from the
safetensors metadata written by :func:`convert` (``num_attention_heads``), else assumed
to be ``inner_dim // 64`` (the Kandinsky prior: 2048 / 64 = 32 heads).
"""
from __future__ import annotations

import json
import logging
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .files import ChecksumError, save_safetensors_atomic, verify_checksum
from .pops import OPERATOR_DEFAULTS, OperatorPrior, PriorConfig

LOG = logging.getLogger("photoops.pops")

__all__ = [
    "HEAD_DIM_DEFAULT",
    "STAT_KEYS",
    "OperatorFile",
    "PopsFileError",
    "build_prior",
    "convert",
    "expected_shapes",
    "infer_config",
    "load_operator",
    "load_statistics",
    "operator_name_from_path",
]

STAT_KEYS = ("clip_mean", "clip_std")
HEAD_DIM_DEFAULT = 64
FORMAT_TAG = "photoops-pops-operator-v1"
PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


class PopsFileError(ValueError):
    """A pOps operator or statistics file that cannot be used (with the reason)."""


@dataclass
class OperatorFile:
    """A validated operator: state dict (no stats), config, μ, σ (fp32 ``[D]``), name, metadata."""

    state_dict: dict
    config: PriorConfig
    mean: torch.Tensor
    std: torch.Tensor
    name: str
    path: str
    metadata: dict

    @property
    def default_guidance(self) -> float:
        return OPERATOR_DEFAULTS.get(self.name, 1.0)


def expected_shapes(config: PriorConfig) -> dict:
    """Key -> shape of the operator state dict (no stats), built on the meta device (no memory)."""
    with torch.device("meta"):
        m = OperatorPrior(config)
    return {k: tuple(v.shape) for k, v in m.state_dict().items()}


def _read_safetensors(path: str, keys: tuple | None = None):
    """``(tensors, metadata)``; a whole-file read checks the content checksum our files carry."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            names = list(f.keys()) if keys is None else [k for k in keys if k in set(f.keys())]
            tensors = {k: f.get_tensor(k) for k in names}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise PopsFileError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from e
    if keys is None:
        try:
            verify_checksum(path, tensors, meta)
        except ChecksumError as e:
            raise PopsFileError(str(e)) from e
    return tensors, meta


def _read_pickle(path: str) -> dict:
    """The safe unpickler, memory-mapped when the file is a zip-format checkpoint.

    Every failure is a :class:`PopsFileError` naming the file; torch's own advice to retry with
    ``weights_only=False`` (which would run code from the file) is never passed on.
    """
    if os.path.getsize(path) == 0:
        raise PopsFileError(f"{path}: the file is empty (0 bytes): an interrupted download or copy? "
                            f"Fetch the operator file again")
    is_zip = zipfile.is_zipfile(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except Exception as e:  # UnpicklingError (non-tensor objects), RuntimeError/EOFError (truncated) ...
        text = str(e)
        refused = "weights_only" in text or "Weights only" in text or "Unsupported global" in text
        hint = ("it holds objects other than tensors, which the safe loader refuses; PhotoOps never loads "
                "such files" if refused else "truncated or corrupt?")
        detail = "" if refused else next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
        raise PopsFileError(f"{path}: cannot be read as a PyTorch weights file ({hint}): {type(e).__name__}"
                            + (f": {detail[:300]}" if detail else "")) from e
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise PopsFileError(f"{path}: holds a {type(obj).__name__}, not a state dict of tensors")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise PopsFileError(f"{path}: entries that are not tensors: {bad[:5]} (a state dict of tensors is expected)")
    return obj


def _read_any(path: str) -> tuple:
    path = str(path)
    if not os.path.isfile(path):
        raise PopsFileError(f"{path}: no such file")
    if path.endswith(".safetensors"):
        return _read_safetensors(path)
    if not path.endswith(PICKLE_SUFFIXES):
        raise PopsFileError(f"{path}: unknown file type (expected .safetensors or one of {PICKLE_SUFFIXES})")
    return _read_pickle(path), {}


def _strip_module(sd: dict) -> dict:
    if sd and all(k.startswith("module.") for k in sd):
        return {k[len("module."):]: v for k, v in sd.items()}
    return sd


def infer_config(shapes: dict, num_attention_heads: int | None = None) -> PriorConfig:
    """A :class:`PriorConfig` from state-dict shapes (+ the head count, see module doc)."""
    need = ("positional_embedding", "proj_in.weight", "proj_to_clip_embeddings.weight", "time_embedding.linear_1.weight")
    missing = [k for k in need if k not in shapes]
    if missing:
        raise PopsFileError(f"not a diffusion-prior state dict: keys {missing} are missing "
                            f"(found e.g. {sorted(shapes)[:4]})")
    pos = shapes["positional_embedding"]
    if len(pos) != 3 or pos[1] <= 4:
        raise PopsFileError(f"positional_embedding has shape {pos}; expected [1, num_embeddings + 4, inner_dim]")
    inner = pos[2]
    layers = 1 + max([int(k.split(".")[1]) for k in shapes if k.startswith("transformer_blocks.")], default=-1)
    if num_attention_heads is None:
        if inner % HEAD_DIM_DEFAULT:
            raise PopsFileError(f"inner width {inner} is not a multiple of {HEAD_DIM_DEFAULT}; the head count "
                                f"must be given (safetensors metadata 'num_attention_heads')")
        num_attention_heads = inner // HEAD_DIM_DEFAULT
    if inner % num_attention_heads:
        raise PopsFileError(f"inner width {inner} is not divisible by {num_attention_heads} heads")
    emb = shapes["proj_in.weight"][1]
    out = shapes["proj_to_clip_embeddings.weight"][0]
    ted = shapes["time_embedding.linear_1.weight"][0]
    return PriorConfig(num_attention_heads=num_attention_heads, attention_head_dim=inner // num_attention_heads,
                       num_layers=layers, embedding_dim=emb, num_embeddings=pos[1] - 4, additional_embeddings=4,
                       time_embed_dim=None if ted == inner else ted, clip_embed_dim=None if out == emb else out)


def _validate(sd: dict, config: PriorConfig, path: str) -> None:
    exp = expected_shapes(config)
    missing = sorted(set(exp) - set(sd))
    extra = sorted(set(sd) - set(exp))
    wrong = sorted(k for k in set(exp) & set(sd) if tuple(sd[k].shape) != exp[k])
    if missing or extra or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:3]})")
        if extra:
            parts.append(f"{len(extra)} unexpected (e.g. {extra[:3]})")
        if wrong:
            parts.append("wrong shapes: " + ", ".join(f"{k} {tuple(sd[k].shape)} != {exp[k]}" for k in wrong[:3]))
        raise PopsFileError(f"{path}: does not match the prior layout ({len(exp)} tensors expected): "
                            + "; ".join(parts))
    bad = [k for k, v in sd.items() if not v.is_floating_point()]
    if bad:
        raise PopsFileError(f"{path}: non-float tensors {bad[:3]}")


def _stats_from(tensors: dict, where: str, dim: int):
    if not all(k in tensors for k in STAT_KEYS):
        return None
    mean, std = (tensors[k].float().reshape(-1) for k in STAT_KEYS)
    if mean.numel() != dim or std.numel() != dim:
        raise PopsFileError(f"{where}: clip_mean/clip_std have {mean.numel()}/{std.numel()} values; the operator "
                            f"works on {dim}-d embeddings")
    if not torch.isfinite(mean).all() or not torch.isfinite(std).all() or (std <= 0).any():
        raise PopsFileError(f"{where}: clip_std must be finite and positive (zeros would collapse every output to "
                            f"the mean embedding)")
    return mean.clone(), std.clone()


def load_statistics(path: str, dim: int):
    """μ, σ ``[dim]`` fp32 from a statistics file or a base Kandinsky prior file (only those two keys are read)."""
    path = str(path)
    if path.endswith(".safetensors"):
        t, _ = _read_safetensors(path, STAT_KEYS)
    else:
        t, _ = _read_any(path)
        t = _strip_module(t)
    st = _stats_from(t, path, dim)
    if st is None:
        raise PopsFileError(f"{path}: holds no clip_mean/clip_std (use the Kandinsky 2.2 prior file or a statistics "
                            f"file with those two tensors)")
    return st


def operator_name_from_path(path: str, metadata: dict | None = None) -> str:
    """``pops_operator`` metadata, else the folder (``texturing/learned_prior.pth``) or file stem if known."""
    if metadata and metadata.get("pops_operator"):
        return str(metadata["pops_operator"])
    p = Path(path)
    for cand in (p.parent.name, p.stem):
        for name in OPERATOR_DEFAULTS:
            if name in cand.lower():
                return name
    return p.stem


def load_operator(path: str, stats_path: str | None = None, num_attention_heads: int | None = None) -> OperatorFile:
    """Read and validate an operator file (+ statistics).  Raises :class:`PopsFileError`."""
    path = str(path)
    sd, meta = _read_any(path)
    sd = _strip_module(sd)
    stats_in_file = {k: sd.pop(k) for k in STAT_KEYS if k in sd}
    heads = num_attention_heads or (int(meta["num_attention_heads"]) if meta.get("num_attention_heads") else None)
    config = infer_config({k: tuple(v.shape) for k, v in sd.items()}, heads)
    _validate(sd, config, path)
    st = _stats_from(stats_in_file, path, config.embedding_dim)
    if st is not None and stats_path:
        LOG.warning("pOps: %s carries its own clip_mean/clip_std; the chosen statistics file %s is not used",
                    os.path.basename(path), os.path.basename(str(stats_path)))
    if st is None:
        if not stats_path:
            raise PopsFileError(f"{path}: the operator file has no clip_mean/clip_std (the released pOps files do "
                                f"not); choose the Kandinsky 2.2 prior file or a statistics file holding them")
        st = load_statistics(stats_path, config.embedding_dim)
    return OperatorFile(sd, config, st[0], st[1], operator_name_from_path(path, meta), path, meta)


def build_prior(op: OperatorFile, dtype=torch.float32, device="cpu") -> OperatorPrior:
    """The network with the file's weights, cast to ``dtype`` (built on meta, no double allocation)."""
    with torch.device("meta"):
        m = OperatorPrior(op.config)
    sd = {k: v.to(device=device, dtype=dtype) for k, v in op.state_dict.items()}
    m.load_state_dict(sd, strict=True, assign=True)
    return m.eval().requires_grad_(False)


def convert(src: str, dst: str, stats_path: str | None = None, dtype=torch.float16,
            name: str | None = None, num_attention_heads: int | None = None) -> dict:
    """Write one safetensors file: weights in ``dtype``, μ/σ in fp32, metadata (operator name, heads).

    Written atomically with a content checksum (``kernels/files.py``), so a failed conversion
    leaves no partial file and an altered file is refused on loading.
    """
    op = load_operator(src, stats_path, num_attention_heads)
    out = {k: v.to(dtype).contiguous() for k, v in op.state_dict.items()}
    out["clip_mean"] = op.mean.reshape(1, -1).float().contiguous()
    out["clip_std"] = op.std.reshape(1, -1).float().contiguous()
    c = op.config
    meta = {"format": FORMAT_TAG, "pops_operator": name or op.name,
            "num_attention_heads": str(c.num_attention_heads), "attention_head_dim": str(c.attention_head_dim),
            "source": os.path.basename(src), "config": json.dumps(c.diffusers_kwargs())}
    dst = str(dst)
    save_safetensors_atomic(dst, out, meta)
    return {"path": dst, "tensors": len(out), "bytes": os.path.getsize(dst), "operator": meta["pops_operator"]}
