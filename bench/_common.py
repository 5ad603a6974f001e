"""Shared helpers for the bench scripts: make the pack importable as ``photoops``."""
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]


def import_pack():
    """Put a temporary folder holding ``photoops`` (the pack) and ``tools`` links first on sys.path.
    The repository root itself never goes on sys.path: its ``kernels`` / ``nodes`` packages would
    shadow the PyPI ``kernels`` package (imported by transformers >= 5.25) and ComfyUI's ``nodes``."""
    d = Path(tempfile.mkdtemp(prefix="photoops_bench_"))
    (d / "photoops").symlink_to(ROOT, target_is_directory=True)
    (d / "tools").symlink_to(ROOT / "tools", target_is_directory=True)
    sys.path[:] = [p for p in sys.path if p not in ("", ".") and Path(p).resolve() != ROOT]
    sys.path.insert(0, str(d))
    sys.path.insert(1, str(ROOT / "tests"))
    import photoops  # noqa: F401
    return d
