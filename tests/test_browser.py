"""PhotoOps workflows in ComfyUI's real frontend, headless Chromium (issue 2, item 5e).

Needs $COMFYUI_DIR, Debian's ``chromium`` and the ``playwright`` Python package
(its browser download is never used); otherwise every test is skipped with the reason.

For each workflows/*.json (and the core-only harness graphs; the files needing a third-party
pack, per comfy_harness/third_party.py, load in tests/test_comfy_ipadapter.py): app.loadGraphData, walk
all nodes; fail on a missing or broken node (unregistered type, error flag, no Comfy
class, an UNKNOWN widget); app.graphToPrompt() must give a class_type everywhere and
must equal our own converter's output; fail on page errors, console errors, HTTP
errors and requests off the loopback host (§10.7 step 6).  A screenshot of each goes
to a temporary folder (path printed).  A self-test loads an invented node type and
must see it reported missing.
"""
import json
import sys
import tempfile
import time
from pathlib import Path

import pytest

_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:  # conftest normally does this; keep the module runnable alone
    sys.path.insert(0, _TESTS)

from comfy_harness import browser as br
from comfy_harness import pytest_fixtures as _fx
from comfy_harness import third_party
from comfy_harness.convert import ui_to_api

# Fixtures shared with other modules (pytest finds them as module attributes);
# require_comfyui is overridden below to also need Chromium and Playwright.
fixture_checkpoint = _fx.fixture_checkpoint
comfyui_server = _fx.comfyui_server

ROOT = Path(__file__).resolve().parents[1]
HARNESS_GRAPHS = ROOT / "tests" / "comfy_harness" / "graphs"


@pytest.fixture(scope="module")
def require_comfyui():
    """Overrides the plain ComfyUI check: also needs Chromium and Playwright."""
    reason = br.browser_skip_reason()
    if reason:
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    return br.comfyenv.comfyui_dir()


pytestmark = pytest.mark.usefixtures("require_comfyui")


def _workflow_files():
    # files needing a third-party pack (tests/comfy_harness/third_party.py) run in test_comfy_ipadapter.py
    shipped = third_party.core_only(sorted((ROOT / "workflows").glob("*.json")))
    harness = sorted(HARNESS_GRAPHS.glob("core_*.json"))
    return [pytest.param(p, id=f"{p.parent.name}/{p.name}") for p in shipped + harness]


@pytest.fixture(scope="module")
def shots_dir(request):
    d = Path(tempfile.mkdtemp(prefix="photoops-screenshots-"))
    yield d
    _fx.report(request, f"[test_browser] screenshots in {d}")


@pytest.fixture(scope="module")
def frontend(request, comfyui_server):
    from playwright.sync_api import sync_playwright

    t0 = time.perf_counter()
    with br.Chromium() as chrome, sync_playwright() as pw:
        page = br.FrontendPage.open(pw, chrome, comfyui_server.url)
        comfyui_server.timings["chromium start"] = chrome.startup_seconds
        comfyui_server.timings["chromium + page ready"] = time.perf_counter() - t0
        try:
            yield page
        finally:
            page.close()


def test_frontend_boots_cleanly(frontend, comfyui_server):
    assert frontend.version, "window.__COMFYUI_FRONTEND_VERSION__ not set"
    failures = frontend.failures_since(0)
    assert not failures, "while the page booted:\n" + "\n".join(failures)
    # Our web extension files (if any) are listed for the frontend to load.
    web_dir = ROOT / "web"
    web = sorted(p.relative_to(web_dir).as_posix() for p in web_dir.rglob("*.js")) if web_dir.is_dir() else []
    if web:
        listed = comfyui_server.get_json("/extensions")
        for rel in web:
            assert f"/extensions/photoops/{rel}" in listed, f"web/{rel} not served; /extensions lists {listed}"


@pytest.mark.parametrize("wf_path", _workflow_files())
def test_workflow_loads_without_missing_or_broken_nodes(frontend, comfyui_server, shots_dir, wf_path):
    wf = json.loads(wf_path.read_text())
    mark = frontend.mark()
    t0 = time.perf_counter()
    report = frontend.load_workflow(wf)
    shot = frontend.screenshot(shots_dir / f"{wf_path.stem}.png")
    comfyui_server.timings[f"browser {wf_path.name}"] = time.perf_counter() - t0

    assert not report.problems, (
        f"missing/broken nodes in {wf_path.name} (screenshot {shot}):\n" + "\n".join(report.problems))
    assert report.prompt, "graphToPrompt gave an empty prompt"
    assert not report.missing_class_type, f"graphToPrompt entries without class_type: {report.missing_class_type}"
    failures = frontend.failures_since(mark)
    assert not failures, f"while loading {wf_path.name} (screenshot {shot}):\n" + "\n".join(failures)

    # Our converter must agree with the frontend's (titles aside: the frontend
    # uses the node's current title, we fall back to the display name).
    ours = ui_to_api(wf, comfyui_server.object_info())

    def strip(p):
        return {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in p.items()}

    assert strip(ours) == strip(report.prompt), (
        f"converter differs from graphToPrompt for {wf_path.name}:\n"
        f"ours:     {json.dumps(strip(ours), sort_keys=True)}\n"
        f"frontend: {json.dumps(strip(report.prompt), sort_keys=True)}")


def test_self_test_invented_node_is_reported_missing(frontend, shots_dir):
    wf = json.loads((HARNESS_GRAPHS / "invalid_unknown_node.json").read_text())
    report = frontend.load_workflow(wf)
    shot = frontend.screenshot(shots_dir / "selftest_invalid_unknown_node.png")
    bad = [n for n in report.nodes if n["type"] == "PhotoOps_DoesNotExist_SelfTest"]
    assert bad, report.nodes
    assert "unregistered type" in bad[0]["problems"], bad[0]
    assert any(p.startswith("20:PhotoOps_DoesNotExist_SelfTest") for p in report.problems), report.problems
    assert "20" in report.missing_class_type, report.prompt
    # The loader node next to it is fine.
    assert not [n for n in report.nodes if n["type"] == "CheckpointLoaderSimple" and n["problems"]]
    frontend.close_dialogs()
    print(f"self-test screenshot: {shot}")
