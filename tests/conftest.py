"""Test setup: offline hub, the pack importable as ``photoops``, repo root on sys.path.

The repository root is the pack (ComfyUI loads it as a package named after its folder),
so tests import it through a symlink named ``photoops`` in a temporary folder; relative
imports inside the pack then work exactly as under ComfyUI.
"""
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

ROOT = Path(__file__).resolve().parents[1]
_PKG_DIR = Path(tempfile.mkdtemp(prefix="photoops_pkg_"))
(_PKG_DIR / "photoops").symlink_to(ROOT, target_is_directory=True)
sys.path.insert(0, str(_PKG_DIR))
for p in (str(ROOT), str(ROOT / "tests")):
    if p not in sys.path:
        sys.path.insert(1, p)
