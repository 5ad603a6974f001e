"""Locate a ComfyUI checkout and make it importable in this process.

ComfyUI's ``comfy/sd.py`` imports ``torchvision`` at module level, but no
torchvision wheel imports beside the CPU torch 2.13 wheel.  SD1.x never calls
it, so an (almost) empty placeholder package is enough.  This module writes
that placeholder into a temporary folder and puts it on ``sys.path`` (in-process)
or ``PYTHONPATH`` (for a server subprocess) when a real torchvision does not
import.

Pitfall: transformers decides ``is_torchvision_available()`` by
``importlib.util.find_spec`` and caches the answer.  With the placeholder
visible it says True, and then ``from diffusers import UNet2DConditionModel``
fails (transformers imports ``torchvision.transforms.InterpolationMode``).  So
:func:`launch_comfyui.install_transformers_guard` makes transformers evaluate
those checks with the placeholder hidden, and the cached False sticks.
(diffusers also finds the placeholder but requires package metadata, which it
has none of, so diffusers says False by itself.)  The server is started
through ``launch_comfyui.py``, which does the same.
"""
from __future__ import annotations

import atexit
import importlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

from .launch_comfyui import install_transformers_guard

_PLACEHOLDER_DIR: Path | None = None


def comfyui_dir() -> Path | None:
    """The ComfyUI checkout named by $COMFYUI_DIR, or None when unset/invalid."""
    d = os.environ.get("COMFYUI_DIR")
    if not d:
        return None
    p = Path(d).expanduser().resolve()
    if not (p / "main.py").is_file() or not (p / "comfy").is_dir():
        return None
    return p


def comfyui_skip_reason() -> str | None:
    """A human-readable reason why ComfyUI tests cannot run, or None."""
    d = os.environ.get("COMFYUI_DIR")
    if not d:
        return "COMFYUI_DIR is not set (point it at a ComfyUI checkout to run the integration tests)"
    if comfyui_dir() is None:
        return f"COMFYUI_DIR={d!r} is not a ComfyUI checkout (no main.py / comfy/)"
    return None


def real_torchvision_imports(python: str | None = None) -> bool:
    """Whether ``import torchvision`` works (in this process, or in ``python``)."""
    if python is not None and os.path.realpath(python) != os.path.realpath(sys.executable):
        import subprocess

        return subprocess.run([python, "-c", "import torchvision"], capture_output=True).returncode == 0
    if "torchvision" in sys.modules:
        mod = sys.modules["torchvision"]
        return not getattr(mod, "__photoops_placeholder__", False)
    try:
        importlib.import_module("torchvision")
        return True
    except Exception:
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        return False


def torchvision_placeholder_dir() -> Path:
    """A folder holding a two-file ``torchvision`` placeholder package (created once per process)."""
    global _PLACEHOLDER_DIR
    if _PLACEHOLDER_DIR is not None and (_PLACEHOLDER_DIR / "torchvision" / "__init__.py").is_file():
        return _PLACEHOLDER_DIR
    root = Path(tempfile.mkdtemp(prefix="photoops-tvstub-"))
    pkg = root / "torchvision"
    (pkg / "transforms").mkdir(parents=True)
    (pkg / "__init__.py").write_text(
        '"""Placeholder torchvision for tests: ComfyUI imports it at module level;\n'
        'SD1.x never uses it.  Any real use fails with AttributeError."""\n'
        "__version__ = '0.0.0+photoops.placeholder'\n"
        "__photoops_placeholder__ = True\n"
        "from . import transforms\n"
    )
    (pkg / "transforms" / "__init__.py").write_text('"""Placeholder."""\n')
    _PLACEHOLDER_DIR = root
    atexit.register(shutil.rmtree, root, True)
    return root


def ensure_comfy_importable(cpu: bool | None = None) -> Path:
    """Put $COMFYUI_DIR on sys.path (and a torchvision placeholder when needed).

    ``cpu``: set ComfyUI's ``--cpu`` flag (``comfy.cli_args.args.cpu``) for this
    process; None = only when torch has no CUDA (ComfyUI otherwise asks CUDA
    for a device at import and crashes on a CPU-only torch).  Must run before
    ``comfy.model_management`` is first imported.

    Returns the ComfyUI directory.  Raises RuntimeError when COMFYUI_DIR is
    unusable.  Call this before importing any ``comfy.*`` module.
    """
    d = comfyui_dir()
    if d is None:
        raise RuntimeError(comfyui_skip_reason() or "ComfyUI not found")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if not real_torchvision_imports():
        ph = str(torchvision_placeholder_dir())
        if ph not in sys.path:
            sys.path.insert(0, ph)
            install_transformers_guard(ph)
    if str(d) not in sys.path:
        # Appended, not prepended: ComfyUI's top level has generic names
        # (utils, app, tests) that must not shadow anything of ours.
        sys.path.append(str(d))
    if cpu is None:
        import torch

        cpu = not torch.cuda.is_available()
    if cpu:
        if "comfy.model_management" in sys.modules and not sys.modules["comfy.cli_args"].args.cpu:
            raise RuntimeError("comfy.model_management was imported before ensure_comfy_importable(cpu=True)")
        import comfy.cli_args  # parses no argv unless ComfyUI's main enabled it

        comfy.cli_args.args.cpu = True
    return d


def terminate(proc) -> None:
    """SIGTERM ``proc`` (SIGKILL after 10 s), then SIGKILL its session (children it spawned).

    Both the ComfyUI server and Chromium are started with ``start_new_session``, so the
    session id is the child's PID.
    """
    import contextlib
    import signal
    import subprocess

    if proc is None:
        return
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        except ProcessLookupError:
            pass
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
