"""pytest fixtures for tests that need a real ComfyUI.  Import them into a test module:

    from comfy_harness.pytest_fixtures import (  # noqa: F401
        require_comfyui, fixture_checkpoint, comfyui_server)

* ``require_comfyui`` (module): skips with a printed reason when $COMFYUI_DIR is
  unset or not a ComfyUI checkout; returns the ComfyUI directory.  Make it
  autouse in a module with ``pytestmark = pytest.mark.usefixtures("require_comfyui")``.
* ``fixture_checkpoint`` (module): the cached random SD1.5 checkpoint info dict
  (``fixtures.cached_sd15_checkpoint()``: path, filename, unet_config, seed, dtype...).
* ``comfyui_server`` (module): a started :class:`server.ComfyServer` with the
  pack and the fixture checkpoint; ``.url``, ``.object_info()``,
  ``.run_prompt(api)``, ``.view(image)``, ``.checkpoint_name``, ``.timings``.
  Killed at module end; if a test of the module failed, the server log tail is
  printed and the temp folder kept (its path printed).
"""
from __future__ import annotations

import contextlib
import sys

import pytest

from . import comfyenv
from .fixtures import cached_sd15_checkpoint
from .server import ComfyServer


def report(request, text: str) -> None:
    """Print to the terminal even while pytest captures output."""
    capman = request.config.pluginmanager.getplugin("capturemanager")
    ctx = capman.global_and_fixture_disabled() if capman is not None else contextlib.nullcontext()
    with ctx:
        sys.stdout.write("\n" + text + "\n")
        sys.stdout.flush()


@pytest.fixture(scope="module")
def require_comfyui():
    reason = comfyenv.comfyui_skip_reason()
    if reason:
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    return comfyenv.comfyui_dir()


@pytest.fixture(scope="module")
def fixture_checkpoint(require_comfyui):
    return cached_sd15_checkpoint()


@pytest.fixture(scope="module")
def comfyui_server(request, require_comfyui, fixture_checkpoint):
    srv = ComfyServer(require_comfyui, checkpoint=fixture_checkpoint)
    failed_before = request.session.testsfailed
    srv.start()  # raises ComfyError with the log tail when it cannot start
    srv.timings["server start"] = srv.startup_seconds
    try:
        yield srv
    finally:
        failed = request.session.testsfailed > failed_before
        if failed:
            srv.keep = True
            report(request, f"[{request.module.__name__}] a test failed; ComfyUI server {srv.url} (pid {srv.pid})\n"
                             f"{srv.log_tail(80)}\nserver files kept in {srv.root}")
        srv.stop()
        if srv.timings:
            report(request, f"[{request.module.__name__}] timings: " + ", ".join(
                f"{k} {v:.1f} s" for k, v in srv.timings.items() if v is not None))
