"""Developer entry point: set up a venv, run the demo (main job) or the tests.

    python3 tools/dev.py demo    # set up .venv, then run the main job (writes out/)
    python3 tools/dev.py test    # set up .venv, then run the whole test suite
    python3 tools/dev.py setup   # only set up
    python3 tools/dev.py screenshots   # (needs COMFYUI_DIR) the browser test, writing docs/screenshots/*.png

The venv is ``.venv`` in the repository (CPU torch 2.13.0 from the local wheel, the pack's
dependencies and the test extras).  With ``COMFYUI_DIR`` pointing at a ComfyUI checkout,
its requirements are installed too and the real-ComfyUI tests run; without it they skip
with a printed reason.  Nothing is downloaded but packages from the package index.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv"
PY = VENV / "bin" / "python"
TORCH = "torch==2.13.0"
PACKAGES = ["diffusers>=0.30", "transformers>=4.37", "safetensors>=0.4.2", "numpy>=1.25", "einops",
            "pytest>=8", "pillow", "scipy", "accelerate", "tokenizers"]


def run(cmd, **kw):
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, **kw)


def stamp_ok(name: str, content: str) -> bool:
    f = VENV / f".photoops-{name}"
    return f.exists() and f.read_text() == hashlib.sha256(content.encode()).hexdigest()


def write_stamp(name: str, content: str) -> None:
    (VENV / f".photoops-{name}").write_text(hashlib.sha256(content.encode()).hexdigest())


def setup() -> None:
    if not PY.exists():
        run([sys.executable, "-m", "venv", VENV])
    spec = " ".join([TORCH] + PACKAGES)
    if not stamp_ok("deps", spec):
        run([PY, "-m", "pip", "install", "-q", "--upgrade", "pip"])
        run([PY, "-m", "pip", "install", "-q", TORCH])
        # keep the CPU torch: constrain it while installing the rest
        cons = VENV / "constraints.txt"
        cons.write_text(TORCH + "\n")
        run([PY, "-m", "pip", "install", "-q", "-c", cons, *PACKAGES])
        write_stamp("deps", spec)
    comfy = os.environ.get("COMFYUI_DIR")
    if comfy:
        req = Path(comfy) / "requirements.txt"
        if not req.exists():
            sys.exit(f"COMFYUI_DIR={comfy} has no requirements.txt: not a ComfyUI checkout")
        if not stamp_ok("comfy", req.read_text()):
            env = dict(os.environ, PATH=f"{VENV / 'bin'}:{os.environ.get('PATH', '')}")
            run(["bash", ROOT / "tools" / "install_comfyui_deps.sh", comfy], env=env)
            run([PY, "-m", "pip", "install", "-q", "-c", VENV / "constraints.txt", "playwright"], env=env)
            write_stamp("comfy", req.read_text())


def env() -> dict:
    e = dict(os.environ)
    e.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONDONTWRITEBYTECODE="1")
    return e


def test(args) -> int:
    setup()
    if not os.environ.get("COMFYUI_DIR"):
        print("note: COMFYUI_DIR is not set; the real-ComfyUI and browser tests will be skipped", flush=True)
    cmd = [PY, "-m", "pytest", "-ra", "--durations=15", *args]
    print("+", " ".join(str(c) for c in cmd), flush=True)
    return subprocess.call([str(c) for c in cmd], cwd=ROOT, env=env())


def screenshots(args) -> int:
    """Run the browser test with PHOTOOPS_SCREENSHOTS=docs/screenshots (or the folder that variable
    already names): one PNG per shipped workflow, the whole graph fitted in view, from the
    frontend ComfyUI pins; PNGs of workflows that no longer exist are removed."""
    setup()
    if not os.environ.get("COMFYUI_DIR"):
        print("error: set COMFYUI_DIR to a ComfyUI checkout (bash .ci/run unpacks the vendored one into "
              "~/.cache/photoops-ci/ComfyUI)", file=sys.stderr)
        return 2
    out = Path(os.environ.get("PHOTOOPS_SCREENSHOTS") or ROOT / "docs" / "screenshots").resolve()
    out.mkdir(parents=True, exist_ok=True)
    stems = {p.stem for p in (ROOT / "workflows").glob("*.json")}
    for old in out.glob("*.png"):      # a screenshot of a workflow that is gone
        if old.stem not in stems:
            print(f"removing {old} (no workflows/{old.stem}.json)", flush=True)
            old.unlink()
    e = env()
    e["PHOTOOPS_SCREENSHOTS"] = str(out)
    cmd = [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_browser.py",
           "-k", "test_workflow_loads_without_missing_or_broken_nodes and workflows/", *args]
    print("+", " ".join(str(c) for c in cmd), flush=True)
    rc = subprocess.call([str(c) for c in cmd], cwd=ROOT, env=e)
    shots = sorted(out.glob("*.png"))
    print(f"{len(shots)} screenshots in {out}: " + ", ".join(
        f"{p.name} ({p.stat().st_size // 1024} KB)" for p in shots), flush=True)
    return rc


def demo(args) -> int:
    setup()
    cmd = [PY, ROOT / "tools" / "demo.py", *args]
    print("+", " ".join(str(c) for c in cmd), flush=True)
    return subprocess.call([str(c) for c in cmd], cwd=ROOT, env=env())


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in ("setup", "test", "demo", "screenshots"):
        print(__doc__)
        return 2
    cmd, rest = sys.argv[1], sys.argv[2:]
    if cmd == "setup":
        setup()
        return 0
    if cmd == "screenshots":
        return screenshots(rest)
    return test(rest) if cmd == "test" else demo(rest)


if __name__ == "__main__":
    sys.exit(main())
