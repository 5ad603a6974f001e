"""The one way PhotoOps writes and fingerprints files (no ComfyUI import).

Every artifact the pack saves (inversions, concept embeddings and their checkpoints,
learned instructions and their resumable checkpoints, converted pOps operators) goes
through :func:`save_safetensors_atomic`; every content digest (of tensors, of inputs that
key a cache or a resume) through :func:`content_hash`; every user-given file name through
:func:`clean_name`.  The numbered-file counter that follows ComfyUI's
``folder_paths.get_save_image_path`` lives in ``nodes/comfy/files.py`` (it needs
``folder_paths``); :func:`counter_name` is its file-name half.

Atomic save: the file is written to a temporary name in the destination folder, flushed
to disk (``fsync``), given mode 0644 (what ComfyUI's own outputs get under the usual
umask) and renamed over the destination with ``os.replace``; on any failure the
temporary file is removed and the destination is untouched.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Mapping

import torch

__all__ = ["CHECKSUM_KEY", "ChecksumError", "FILE_MODE", "clean_name", "content_hash", "counter_name",
           "read_safetensors", "save_safetensors_atomic", "tensors_checksum", "verify_checksum"]

FILE_MODE = 0o644
#: Metadata key of the content checksum every saved file carries (sha256 of its tensors).
CHECKSUM_KEY = "photoops_checksum"


class ChecksumError(ValueError):
    """A saved file's tensors do not match the checksum in its metadata (altered or corrupt)."""


def save_safetensors_atomic(path, tensors: Mapping[str, torch.Tensor], metadata: Mapping | None = None) -> str:
    """Write ``tensors`` (+ string ``metadata``) to ``path`` atomically; returns the path.

    Tensors are moved to the CPU and made contiguous (their dtype is kept).  The folder
    is created when missing.  The metadata gets :data:`CHECKSUM_KEY`: the sha256
    :func:`content_hash` of all tensors (names, shapes, dtypes, bytes), which
    :func:`read_safetensors` / :func:`verify_checksum` check on loading.
    """
    from safetensors.torch import save_file

    path = str(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    data = {str(k): v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = {} if metadata is None else {str(k): str(v) for k, v in metadata.items()}
    meta[CHECKSUM_KEY] = tensors_checksum(data)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".part", dir=folder)
    os.close(fd)
    try:
        save_file(data, tmp, metadata=meta)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _update(h, item, stride_to: int | None) -> None:
    if isinstance(item, torch.Tensor):
        t = item.detach().cpu().contiguous()
        h.update(f"tensor{tuple(t.shape)}{t.dtype}".encode())
        flat = t.reshape(-1)
        if stride_to and flat.numel() > stride_to:
            flat = flat[:: flat.numel() // stride_to].contiguous()
        if flat.dtype == torch.bfloat16:
            flat = flat.view(torch.int16)
        h.update(flat.numpy().tobytes())
    elif isinstance(item, Mapping) and item and all(isinstance(v, torch.Tensor) for v in item.values()):
        for k in sorted(item):
            h.update(str(k).encode())
            _update(h, item[k], stride_to)
    else:
        h.update(json.dumps(item, sort_keys=True, default=str).encode())


def content_hash(*items, length: int = 24, stride_to: int | None = None) -> str:
    """Hex sha256 digest of tensors (shape, dtype and bytes), tensor dicts (by sorted key)
    and JSON-able values, in order; the first ``length`` hex digits.

    ``stride_to``: hash at most about that many evenly strided elements of each tensor
    (for large inputs whose digest only keys a cache; checksums of saved files hash every byte).
    """
    h = hashlib.sha256()
    for it in items:
        _update(h, it, stride_to)
    return h.hexdigest()[:length]


_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def clean_name(name: str, default: str) -> str:
    """A visible file-name stem: letters, digits, ``_ . -`` only; path parts and leading dots
    (``../x`` would become a hidden ``..x``) are stripped; empty -> ``default``."""
    s = _UNSAFE.sub("_", (name or "").strip())
    s = s.lstrip("._-").rstrip(".")
    return s or default


def counter_name(stem: str, counter: int, ext: str = ".safetensors") -> str:
    """``stem_00001_.ext``: ComfyUI's numbered output name (``folder_paths.get_save_image_path``)."""
    return f"{stem}_{counter:05}_{ext}"


def tensors_checksum(tensors: Mapping[str, torch.Tensor]) -> str:
    """The full sha256 (64 hex digits) of a name -> tensor dict, every byte hashed."""
    return content_hash(dict(tensors), length=64)


def verify_checksum(path, tensors: Mapping[str, torch.Tensor], metadata: Mapping | None) -> None:
    """Raise :class:`ChecksumError` (naming the file) when ``metadata`` carries a checksum that
    ``tensors`` do not match.  Files without one (written by other tools, or before checksums)
    pass."""
    want = (metadata or {}).get(CHECKSUM_KEY)
    if want is None:
        return
    got = tensors_checksum(tensors)
    if got != want:
        raise ChecksumError(f"{os.path.basename(str(path))} is corrupt or was altered after saving: its content "
                            f"checksum does not match the one stored in it ({got[:12]}... vs {want[:12]}...); "
                            f"save it again from its source ({path})")


def read_safetensors(path) -> tuple:
    """``(tensors, metadata)`` of a safetensors file, checksum verified (:func:`verify_checksum`)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    verify_checksum(path, tensors, meta)
    return tensors, meta
