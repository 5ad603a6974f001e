"""Test setup: offline hub, the pack importable as ``photoops``, ``tools`` and ``tests`` helpers.

The repository root is the pack (ComfyUI loads it as a package named after its folder),
so tests import it through a symlink named ``photoops`` in a temporary folder; relative
imports inside the pack then work exactly as under ComfyUI.  The repository root itself
is NOT put on sys.path: its ``nodes`` package would shadow ComfyUI's top-level ``nodes``
module in the in-process ComfyUI tests.  ``tools`` gets its own symlink instead.
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
(_PKG_DIR / "tools").symlink_to(ROOT / "tools", target_is_directory=True)
sys.path.insert(0, str(_PKG_DIR))
if str(ROOT / "tests") not in sys.path:
    sys.path.insert(1, str(ROOT / "tests"))
# ``python -m pytest`` from the repository root puts the root (as '' or its path) on
# sys.path; drop it for the reason given above.
sys.path[:] = [p for p in sys.path if p not in ("", ".") and Path(p).resolve() != ROOT]


# Opt-in full-size runs (issue 16): ``@pytest.mark.full_size`` tests load real-size random-weight SD1.5 / SDXL
# files (bench/full_size_fixtures.py) and take minutes on a CPU; skipped, with the reason, unless
# PHOTOOPS_FULL_SIZE=1 or ``--full-size``.
def pytest_addoption(parser):
    parser.addoption("--full-size", action="store_true", default=False,
                     help="run the @pytest.mark.full_size tests (also: PHOTOOPS_FULL_SIZE=1)")


def pytest_configure(config):
    config.addinivalue_line("markers", "full_size: real-size SD1.5 / SDXL runs; opt-in (--full-size or "
                                       "PHOTOOPS_FULL_SIZE=1)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--full-size") or os.environ.get("PHOTOOPS_FULL_SIZE") == "1":
        return
    import pytest

    skip = pytest.mark.skip(reason="full-size test: opt in with --full-size or PHOTOOPS_FULL_SIZE=1")
    for item in items:
        if "full_size" in item.keywords:
            item.add_marker(skip)
