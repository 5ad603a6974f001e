"""Run a real ComfyUI headless, with the PhotoOps pack loaded, for tests.

    from comfy_harness.server import ComfyServer, comfy_server

    with comfy_server() as srv:              # starts, waits for /object_info
        srv.url                              # "http://127.0.0.1:<port>"
        srv.object_info()                    # dict, cached
        entry = srv.run_prompt(api_prompt)   # POST /prompt, poll /history; raises on error
        png = srv.view(entry["outputs"]["9"]["images"][0])
    # the server is killed (by PID) here, whatever happened

The server gets:

* ``--cpu --listen 127.0.0.1 --port <free> --disable-auto-launch
  --disable-api-nodes --database-url sqlite:///:memory:``;
* throw-away user/input/output/temp directories (one temp root, removed at
  the end unless ``keep=True`` or $PHOTOOPS_KEEP_COMFY_TMP is set);
* an extra-model-paths YAML whose ``custom_nodes`` root holds a symlink
  ``photoops`` -> the repository root and one ``photoops_test_stubs`` ->
  ``stub_nodes/`` (test-only nodes: the any-size CLIP vision loader and, when
  spandrel is missing, a placeholder ``UpscaleModelLoader``, see
  docs/comfyui-integration.md §10.7), and whose ``checkpoints`` folder holds
  the random SD1.5 fixture checkpoint (``fixtures.FIXTURE_CHECKPOINT_NAME``);
* a seeded user settings file (tutorial done, canvas navigation "custom",
  no font LOD), so the frontend opens cleanly;
* the torchvision placeholder when the server's python has no working
  torchvision (see comfyenv.py, launch_comfyui.py);
* ``--disable-all-custom-nodes --whitelist-custom-nodes photoops ...``: only
  the pack, the test stubs and the third-party packs named in
  ``third_party_nodes`` load, so packs installed in ``$COMFYUI_DIR/custom_nodes``
  (e.g. ComfyUI_IPAdapter_plus for the pOps IP-Adapter test) are opt-in per
  server; ``extra_models`` ({model folder: [files]}) are linked like the fixtures.

On a failed start, or when a prompt fails, the exception message carries the
tail of the server log.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

from . import comfyenv

REPO_ROOT = Path(__file__).resolve().parents[2]
PACK_LINK_NAME = "photoops"
STUB_NODES_DIR = "photoops_test_stubs"
STUB_NODES_SRC = Path(__file__).resolve().parent / "stub_nodes"

#: Settings written to user/default/comfy.settings.json before the page opens.
DEFAULT_SETTINGS = {
    "Comfy.TutorialCompleted": True,
    "Comfy.Canvas.NavigationMode": "custom",
    "LiteGraph.Canvas.MinFontSizeForLOD": 0,
}



def _fixture_model_files() -> dict:
    """{model folder: [files]} of the extra fixtures (generated once, cached like the checkpoint)."""
    from .ip2p_fixtures import cached_ip2p_fixture_files
    from .pops_fixtures import cached_pops_fixtures

    files = cached_pops_fixtures()
    for sub, extra in cached_ip2p_fixture_files().items():     # InstructBrush (issue 8): the IP2P checkpoint
        files.setdefault(sub, []).extend(extra)
    return files


class ComfyError(RuntimeError):
    """A ComfyUI request or prompt failed; the message includes details and the log tail."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _python_can_import(python: str, module: str, env: dict | None = None) -> bool:
    r = subprocess.run([python, "-c", f"import {module}"], capture_output=True, env=env, timeout=120)
    return r.returncode == 0


class ComfyServer:
    """A ComfyUI server subprocess.  Use :func:`comfy_server` or ``with ComfyServer(...)``."""

    def __init__(
        self,
        comfy_dir=None,
        *,
        checkpoint: dict | str | None = None,
        python: str | None = None,
        extra_args: list[str] = (),
        settings: dict | None = None,
        with_pack: bool = True,
        upscale_stub: bool | None = None,
        keep: bool | None = None,
        start_timeout: float = 180.0,
        third_party_nodes=(),
        extra_models: dict | None = None,
    ):
        """
        comfy_dir   ComfyUI checkout (default $COMFYUI_DIR).
        checkpoint  fixture info dict from ``fixtures.cached_sd15_checkpoint()``,
                    or a path; linked into the checkpoints folder under its own
                    file name.  None = no checkpoint.
        python      interpreter to run ComfyUI with (default: this one).
        settings    user settings to seed (default DEFAULT_SETTINGS).
        with_pack   link the pack into the custom_nodes root.
        upscale_stub  install the UpscaleModelLoader placeholder; None = when
                    ``import spandrel`` fails in the server's python.
        keep        keep the temp root after stopping (default: $PHOTOOPS_KEEP_COMFY_TMP).
        third_party_nodes  folder names in ``<comfy_dir>/custom_nodes`` to load too
                    (all other custom nodes there are skipped).
        extra_models  {model folder: [files]} linked into the models folders.
        """
        d = Path(comfy_dir) if comfy_dir else comfyenv.comfyui_dir()
        if d is None:
            raise RuntimeError(comfyenv.comfyui_skip_reason() or "no ComfyUI directory")
        self.comfy_dir = Path(d).resolve()
        self.python = python or sys.executable
        self.extra_args = list(extra_args)
        self.settings = dict(DEFAULT_SETTINGS if settings is None else settings)
        self.with_pack = with_pack
        self.upscale_stub = upscale_stub
        self.keep = bool(os.environ.get("PHOTOOPS_KEEP_COMFY_TMP")) if keep is None else keep
        self.start_timeout = start_timeout
        self.third_party_nodes = list(third_party_nodes)
        self.extra_models = dict(extra_models or {})
        if isinstance(checkpoint, dict):
            checkpoint = checkpoint["path"]
        self.checkpoint = Path(checkpoint) if checkpoint else None

        self.root: Path | None = None
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self.host = "127.0.0.1"
        self.log_path: Path | None = None
        self._log_file = None
        self._object_info = None
        self.client_id = uuid.uuid4().hex
        self.startup_seconds: float | None = None
        #: free-form {label: seconds} that tests fill in; the pytest fixture prints it
        self.timings: dict[str, float] = {}

    # -- layout -------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def path(self, name: str) -> Path:
        """One of: user, input, output, temp, custom_nodes, models, checkpoints."""
        assert self.root is not None
        if name == "checkpoints":
            return self.root / "models" / "checkpoints"
        return self.root / name

    @property
    def checkpoint_name(self) -> str | None:
        """The file name workflows must give CheckpointLoaderSimple."""
        return self.checkpoint.name if self.checkpoint else None

    def _prepare(self) -> dict:
        self.root = Path(tempfile.mkdtemp(prefix="photoops-comfy-"))
        for sub in ("user", "input", "output", "temp", "custom_nodes"):
            (self.root / sub).mkdir()
        # example photos the shipped workflows load with LoadImage
        for img in sorted(p for ext in ("*.png", "*.jpg") for p in (REPO_ROOT / "workflows").glob(ext)):
            shutil.copy(img, self.root / "input" / img.name)
        models = self.root / "models"
        for sub in ("checkpoints", "vae", "loras", "embeddings", "text_encoders", "diffusion_models", "upscale_models"):
            (models / sub).mkdir(parents=True)
        if self.checkpoint is not None:
            if not self.checkpoint.is_file():
                raise FileNotFoundError(self.checkpoint)
            (models / "checkpoints" / self.checkpoint.name).symlink_to(self.checkpoint.resolve())
            # other seeded fixture files the shipped workflows name (pOps, issue 6: pops_fixtures.py)
            for sub, files in _fixture_model_files().items():
                (models / sub).mkdir(exist_ok=True)
                for f in files:
                    (models / sub / f.name).symlink_to(Path(f).resolve())
        for sub, files in self.extra_models.items():
            (models / sub).mkdir(exist_ok=True)
            for f in files:
                (models / sub / Path(f).name).symlink_to(Path(f).resolve())

        cn = self.root / "custom_nodes"
        if self.with_pack:
            (cn / PACK_LINK_NAME).symlink_to(REPO_ROOT, target_is_directory=True)

        env = dict(os.environ)
        env.update(
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            PYTHONUNBUFFERED="1",
            PYTHONDONTWRITEBYTECODE="1",
            DO_NOT_TRACK="1",
        )
        env.pop("PHOTOOPS_TORCHVISION_PLACEHOLDER", None)
        if not _python_can_import(self.python, "torchvision", env):
            env["PHOTOOPS_TORCHVISION_PLACEHOLDER"] = str(comfyenv.torchvision_placeholder_dir())

        stub = self.upscale_stub
        if stub is None:
            probe_env = dict(env)
            if "PHOTOOPS_TORCHVISION_PLACEHOLDER" in env:
                probe_env["PYTHONPATH"] = os.pathsep.join(
                    [env["PHOTOOPS_TORCHVISION_PLACEHOLDER"]] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
                )
            stub = not _python_can_import(self.python, "spandrel", probe_env)
        # the test-only nodes (tests/comfy_harness/stub_nodes): the any-size CLIP vision loader, and
        # the UpscaleModelLoader placeholder when ``stub``
        (cn / STUB_NODES_DIR).symlink_to(STUB_NODES_SRC, target_is_directory=True)
        env["PHOTOOPS_TEST_UPSCALE_STUB"] = "1" if stub else "0"
        # only these custom node folders load (ComfyUI also scans <comfy_dir>/custom_nodes)
        self.custom_node_whitelist = sorted(p.name for p in cn.iterdir()) + self.third_party_nodes

        yaml_lines = ["photoops_test:", f"    base_path: {json.dumps(str(models))}"]
        for sub in sorted(p.name for p in models.iterdir()):
            yaml_lines.append(f"    {sub}: {sub}")
        yaml_lines.append(f"    custom_nodes: {json.dumps(str(cn))}")
        (self.root / "extra_model_paths.yaml").write_text("\n".join(yaml_lines) + "\n")

        settings_dir = self.root / "user" / "default"
        settings_dir.mkdir(parents=True)
        (settings_dir / "comfy.settings.json").write_text(json.dumps(self.settings, indent=1))
        return env

    # -- lifecycle ----------------------------------------------------------

    def start(self) -> ComfyServer:
        try:
            env = self._prepare()
        except BaseException:
            self.stop()
            raise
        launcher = Path(__file__).with_name("launch_comfyui.py")
        self.log_path = self.root / "server.log"
        last_error = None
        for _attempt in range(3):
            self.port = free_port(self.host)
            cmd = [
                self.python, str(launcher), str(self.comfy_dir),
                "--cpu", "--listen", self.host, "--port", str(self.port),
                "--disable-auto-launch", "--disable-api-nodes",
                "--database-url", "sqlite:///:memory:",
                "--user-directory", str(self.path("user")),
                "--input-directory", str(self.path("input")),
                "--output-directory", str(self.path("output")),
                "--temp-directory", str(self.path("temp")),
                "--extra-model-paths-config", str(self.root / "extra_model_paths.yaml"),
                "--disable-all-custom-nodes",
                *(["--whitelist-custom-nodes", *self.custom_node_whitelist] if self.custom_node_whitelist else []),
                *self.extra_args,
            ]
            self._log_file = open(self.log_path, "ab")
            self._log_file.write(f"$ {' '.join(cmd)}\n".encode())
            self._log_file.flush()
            t0 = time.perf_counter()
            self.proc = subprocess.Popen(
                cmd, cwd=str(self.comfy_dir), env=env, stdout=self._log_file, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )
            try:
                self._wait_ready()
                self.startup_seconds = time.perf_counter() - t0
                return self
            except ComfyError as e:
                last_error = e
                port_clash = "address already in use" in self.log_tail(30).lower()
                self._kill()
                if not port_clash:
                    break
        self.stop()
        raise last_error

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ComfyError(f"ComfyUI exited with code {self.proc.returncode} during start-up\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/object_info", timeout=30) as r:
                    if r.status == 200:
                        self._object_info = json.loads(r.read())
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.25)
        raise ComfyError(f"ComfyUI did not answer /object_info within {self.start_timeout:.0f} s\n{self.log_tail()}")

    def _kill(self) -> None:
        comfyenv.terminate(self.proc)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def stop(self) -> None:
        """Kill the server (by PID) and remove the temp root (unless kept)."""
        self._kill()
        self.proc = None
        if self.root is not None and not self.keep:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> ComfyServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def log_text(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        if self._log_file is not None:
            self._log_file.flush()
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 60) -> str:
        text = self.log_text().splitlines()
        return "---- ComfyUI log (last %d lines) ----\n%s\n---- end of log ----" % (
            min(lines, len(text)), "\n".join(text[-lines:]))

    # -- HTTP ---------------------------------------------------------------

    def request(self, method: str, path: str, data=None, timeout: float = 60.0):
        """(status, body bytes, content type).  Does not raise on HTTP errors."""
        body = None
        headers = {}
        if data is not None:
            body = json.dumps(data).encode()
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.read(), r.headers.get("Content-Type", "")
        except urllib.error.HTTPError as e:
            return e.code, e.read(), e.headers.get("Content-Type", "")

    def get_json(self, path: str, timeout: float = 60.0):
        status, body, _ = self.request("GET", path, timeout=timeout)
        if status != 200:
            raise ComfyError(f"GET {path} -> {status}: {body[:2000]!r}")
        return json.loads(body)

    def object_info(self, refresh: bool = False) -> dict:
        if self._object_info is None or refresh:
            self._object_info = self.get_json("/object_info")
        return self._object_info

    def queue_prompt(self, prompt: dict, extra_data: dict | None = None) -> str:
        """POST /prompt; returns prompt_id.  A 400 raises with the node_errors."""
        payload = {"prompt": prompt, "client_id": self.client_id}
        if extra_data:
            payload["extra_data"] = extra_data
        status, body, _ = self.request("POST", "/prompt", payload)
        if status != 200:
            try:
                detail = json.dumps(json.loads(body), indent=1)
            except Exception:
                detail = body[:4000].decode(errors="replace")
            raise ComfyError(f"POST /prompt -> {status}:\n{detail}")
        return json.loads(body)["prompt_id"]

    def wait_for(self, prompt_id: str, timeout: float = 300.0, poll: float = 0.2) -> dict:
        """Poll /history/<id> until done; returns the history entry.  Raises on error/timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise ComfyError(
                    f"ComfyUI died (exit {self.proc.returncode}) while running {prompt_id}\n{self.log_tail()}")
            hist = self.get_json(f"/history/{prompt_id}")
            entry = hist.get(prompt_id)
            if entry:
                st = entry.get("status") or {}
                if st.get("status_str") == "error" or any(
                    m[0] in ("execution_error", "execution_interrupted") for m in st.get("messages", [])
                ):
                    msgs = [m for m in st.get("messages", []) if m[0] in ("execution_error", "execution_interrupted")]
                    raise ComfyError(
                        f"prompt {prompt_id} failed: {json.dumps(msgs, indent=1)[:6000]}\n{self.log_tail(40)}"
                    )
                if st.get("completed"):
                    return entry
            time.sleep(poll)
        self.request("POST", "/interrupt", {})
        raise ComfyError(f"prompt {prompt_id} did not finish within {timeout:.0f} s\n{self.log_tail(40)}")

    def run_prompt(self, prompt: dict, timeout: float = 300.0, extra_data: dict | None = None) -> dict:
        """Queue ``prompt`` (API format) and wait; returns the history entry."""
        return self.wait_for(self.queue_prompt(prompt, extra_data), timeout=timeout)

    def view(self, image: dict) -> bytes:
        """Fetch an output image ({filename, subfolder, type}) through /view."""
        q = urllib.parse.urlencode({
            "filename": image["filename"],
            "subfolder": image.get("subfolder", ""),
            "type": image.get("type", "output"),
        })
        status, body, _ = self.request("GET", "/view?" + q)
        if status != 200:
            raise ComfyError(f"GET /view?{q} -> {status}")
        return body


def output_images(history_entry: dict) -> list[tuple[str, dict]]:
    """[(node_id, {filename, subfolder, type}), ...] for every image in a history entry."""
    out = []
    for node_id, node_out in (history_entry.get("outputs") or {}).items():
        for img in node_out.get("images", []) or []:
            out.append((node_id, img))
    return out


@contextlib.contextmanager
def comfy_server(checkpoint="fixture", **kwargs):
    """Start a server for a ``with`` block.  ``checkpoint="fixture"`` (default)
    links the cached random SD1.5 checkpoint; pass None for none, or an info
    dict/path."""
    if checkpoint == "fixture":
        from .fixtures import cached_sd15_checkpoint

        checkpoint = cached_sd15_checkpoint()
    srv = ComfyServer(checkpoint=checkpoint, **kwargs)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()
