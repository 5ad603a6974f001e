"""Newer ComfyUI frontends for the browser tests, served with ``--front-end-root`` (docs §10.7).

ComfyUI 0.3.64 pins ``comfyui-frontend-package`` 1.27.10; users run newer ones.  The browser
tests also load every workflow in :data:`NEW_FRONTEND` (the newest on PyPI when this was written).
Its ``static`` folder is taken from the wheel, never installed into the venv:

    pip download comfyui-frontend-package==<version> --no-deps -d <cache>/wheels
    unzip comfyui_frontend_package/static/* -> <cache>/frontend-<version>/static

``<cache>`` is ``$PHOTOOPS_CI_CACHE`` or ``~/.cache/photoops-ci`` (as ``.ci/run``).
``.ci/run`` fetches it up front and stops when it cannot (``python -m comfy_harness.frontend``);
the test fetches it lazily and skips, saying why, when pip cannot get it (outside CI).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

NEW_FRONTEND = "1.58.1"
PACKAGE = "comfyui-frontend-package"


def cache_root() -> Path:
    return Path(os.environ.get("PHOTOOPS_CI_CACHE") or Path.home() / ".cache" / "photoops-ci")


def static_dir(version: str = NEW_FRONTEND) -> Path:
    """Where the ``static`` folder of ``version`` lives (whether present or not)."""
    return cache_root() / f"frontend-{version}" / "static"


def _complete(static: Path) -> bool:
    return (static / "index.html").is_file() and (static.parent / ".complete").is_file()


def fetch(version: str = NEW_FRONTEND, python: str | None = None, quiet: bool = True) -> Path:
    """The ``static`` folder of frontend ``version``: downloaded (pip, no deps, no install) and
    unpacked into the cache unless already there.  Raises RuntimeError saying why it could not."""
    static = static_dir(version)
    if _complete(static):
        return static
    dest = static.parent
    wheels = cache_root() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    py = python or sys.executable
    cmd = [py, "-m", "pip", "download", f"{PACKAGE}=={version}", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--retries", "1", "--timeout", "30", "-d", str(wheels)]
    if quiet:
        cmd.append("-q")
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RuntimeError(f"could not run pip download for {PACKAGE}=={version}: {e}") from e
    whl = sorted(wheels.glob(f"comfyui_frontend_package-{version}-*.whl"))
    if r.returncode != 0 or not whl:
        raise RuntimeError(f"pip download {PACKAGE}=={version} failed (exit {r.returncode}):\n"
                           f"{(r.stdout + r.stderr)[-2000:]}")
    tmp = Path(tempfile.mkdtemp(prefix=f"frontend-{version}-", dir=str(cache_root())))
    try:
        prefix = "comfyui_frontend_package/static/"
        with zipfile.ZipFile(whl[-1]) as z:
            members = [m for m in z.namelist() if m.startswith(prefix) and not m.endswith("/")]
            if not members:
                raise RuntimeError(f"{whl[-1].name} has no {prefix} folder")
            for m in members:
                target = tmp / "static" / m[len(prefix):]
                target.parent.mkdir(parents=True, exist_ok=True)
                with z.open(m) as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out)
        if not (tmp / "static" / "index.html").is_file():
            raise RuntimeError(f"{whl[-1].name}: static/index.html missing")
        (tmp / ".complete").write_text(f"{whl[-1].name}\n")
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return static


def get(version: str = NEW_FRONTEND) -> tuple[Path | None, str | None]:
    """(static folder, None), or (None, why not) when it is absent and cannot be fetched."""
    try:
        return fetch(version), None
    except (RuntimeError, OSError, zipfile.BadZipFile) as e:  # pragma: no cover - depends on the network
        return None, f"frontend {version} not available: {e}"


if __name__ == "__main__":  # .ci/run: fetch up front, fail loudly
    v = sys.argv[1] if len(sys.argv) > 1 else NEW_FRONTEND
    try:
        print(fetch(v, quiet=False))
    except RuntimeError as e:
        sys.exit(f"error: {e}")
