"""PhotoOps workflows in ComfyUI's real frontend, headless Chromium (issue 2 item 5e, issue 15).

Needs $COMFYUI_DIR, Debian's ``chromium`` and the ``playwright`` Python package
(its browser download is never used); otherwise every test is skipped with the reason.

Two frontends, one module-scoped server and page each, one Chromium for both:

* the one ComfyUI 0.3.64 pins (1.27.10);
* the newest we test, :data:`comfy_harness.frontend.NEW_FRONTEND` (1.58.1), served with
  ``--front-end-root`` from the wheel's ``static`` folder (``comfy_harness/frontend.py``: fetched
  with pip into ``$PHOTOOPS_CI_CACHE`` or ``~/.cache/photoops-ci`` when absent; when it cannot be
  fetched these tests skip saying why, except under CI (``$CI`` / ``$PHOTOOPS_CI`` set), where
  they fail; ``.ci/run`` fetches it up front).

The servers load this pack and, when present in ``$COMFYUI_DIR/custom_nodes``, the third-party
packs of ``comfy_harness/third_party.py`` (so every shipped workflow loads here).  For each
workflows/*.json (and the core-only harness graphs), in each frontend, ``app.loadGraphData`` once, then:

* no missing or broken node (unregistered type, error flag, no Comfy class, an UNKNOWN widget;
  in 1.58.1 the error flag the frontend sets on a loader whose model file is absent from the
  server is expected when its own missing-models list names that node);
* ``app.graphToPrompt()`` gives a class_type everywhere and equals our converter's output;
* no page errors, console errors, HTTP errors or requests off the loopback host (§10.7 step 6;
  the known-harmless ones are listed by name in ``comfy_harness/browser.py``);
* shipped files: no two nodes' rendered rectangles (title bar included, after the frontend
  enlarged nodes to their minimum size) overlap; Notes count, groups are not nodes;
* shipped files naming models in ``properties.models`` that the server lacks: the frontend
  offers them for download (1.27.10: the "Missing Models" dialog; 1.58.1: its error card's
  "View details" panel with a Download button per model);
* the Eta Schedule node draws its curve (web/eta_schedule.js): its onDrawForeground runs and the
  curve's colour appears inside the plot box;
* a screenshot of each shipped workflow, the whole graph fitted in view (the viewport sized to
  the graph: drawn at up to 70 %, 1400-2400 x 640-1500 px; PNGs over 400 KB get a palette), goes to
  ``$PHOTOOPS_SCREENSHOTS/<stem>.png`` (``tools/dev.py screenshots`` sets it to
  docs/screenshots) from the pinned frontend, else to a temporary folder (path printed);
  1.58.1's go to a temporary folder.

Self-tests: an invented node type must be reported missing; a loader naming an absent model
with ``properties.models`` (graphs/missing_model_download.json) must get the download offer.
With 1.58.1's Vue nodes ("Nodes 2.0", switched on for one test) the Eta Schedule's curve comes
from a DOM widget instead (web/eta_schedule.js); it must draw and stay out of prompt and file.
"""
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import pytest

_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:  # conftest normally does this; keep the module runnable alone
    sys.path.insert(0, _TESTS)

from comfy_harness import browser as br
from comfy_harness import frontend as fe
from comfy_harness import pytest_fixtures as _fx
from comfy_harness import third_party
from comfy_harness.convert import ui_to_api
from comfy_harness.server import DEFAULT_SETTINGS, ComfyServer

# Fixtures shared with other modules (pytest finds them as module attributes);
# require_comfyui is overridden below to also need Chromium and Playwright.
fixture_checkpoint = _fx.fixture_checkpoint

ROOT = Path(__file__).resolve().parents[1]
HARNESS_GRAPHS = ROOT / "tests" / "comfy_harness" / "graphs"
SHOTS_ENV = "PHOTOOPS_SCREENSHOTS"
ETA_CURVE_RGB = (0xF5, 0xC5, 0x42)   # web/eta_schedule.js: the curve's strokeStyle "#f5c542"
ETA_PLOT_H, ETA_PAD = 110, 10        # web/eta_schedule.js: PLOT_H and the plot's padding
DOWNLOAD_SELFTEST = HARNESS_GRAPHS / "missing_model_download.json"
SHOT_MAX_BYTES = 400_000             # larger screenshots are re-saved with a 256-colour palette


@pytest.fixture(scope="module")
def require_comfyui():
    """Overrides the plain ComfyUI check: also needs Chromium and Playwright."""
    reason = br.browser_skip_reason()
    if reason:
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    return br.comfyenv.comfyui_dir()


pytestmark = pytest.mark.usefixtures("require_comfyui")


def _shipped():
    return sorted((ROOT / "workflows").glob("*.json"))


def _workflow_files():
    harness = sorted(HARNESS_GRAPHS.glob("core_*.json"))
    return [pytest.param(p, id=f"{p.parent.name}/{p.name}") for p in _shipped() + harness]


def _in_ci() -> bool:
    return any(os.environ.get(k, "").lower() not in ("", "0", "false", "no") for k in ("CI", "PHOTOOPS_CI"))


def _start_server(request, comfy_dir, checkpoint, extra_args=(), label="1.27.10"):
    """A harness server with this pack, the present third-party packs and screenshot settings;
    prints the log tail (and keeps the files) when a test of the module failed."""
    packs = [p for p in third_party.PACKS if (Path(comfy_dir) / "custom_nodes" / p).is_dir()]
    srv = ComfyServer(comfy_dir, checkpoint=checkpoint, third_party_nodes=packs, extra_args=list(extra_args),
                      settings={**DEFAULT_SETTINGS, **br.SCREENSHOT_SETTINGS})
    srv.start()
    srv.timings[f"server start ({label})"] = srv.startup_seconds
    return srv


def _stop_server(request, srv, failed_before, label):
    if request.session.testsfailed > failed_before:
        srv.keep = True
        _fx.report(request, f"[test_browser {label}] a test failed; ComfyUI server {srv.url} (pid {srv.pid})\n"
                            f"{srv.log_tail(80)}\nserver files kept in {srv.root}")
    srv.stop()
    _fx.report(request, f"[test_browser {label}] timings: " + ", ".join(
        f"{k} {v:.1f} s" for k, v in srv.timings.items() if v is not None))


@pytest.fixture(scope="module")
def comfyui_server(request, require_comfyui, fixture_checkpoint):
    failed_before = request.session.testsfailed
    srv = _start_server(request, require_comfyui, fixture_checkpoint)
    try:
        yield srv
    finally:
        _stop_server(request, srv, failed_before, "1.27.10")


@pytest.fixture(scope="module")
def new_frontend_static():
    static, why = fe.get()
    if static is None:
        if _in_ci():
            pytest.fail(f"{why} (CI must not skip this; .ci/run fetches it up front)")
        print(f"SKIP: {why}")
        pytest.skip(why)
    return static


@pytest.fixture(scope="module")
def new_server(request, require_comfyui, fixture_checkpoint, new_frontend_static):
    failed_before = request.session.testsfailed
    srv = _start_server(request, require_comfyui, fixture_checkpoint,
                        ["--front-end-root", str(new_frontend_static)], label=fe.NEW_FRONTEND)
    try:
        yield srv
    finally:
        _stop_server(request, srv, failed_before, fe.NEW_FRONTEND)


@pytest.fixture(scope="module")
def chrome(request, require_comfyui):
    """One Chromium for both frontends' pages."""
    from playwright.sync_api import sync_playwright

    t0 = time.perf_counter()
    with br.Chromium() as c, sync_playwright() as pw:
        _fx.report(request, f"[test_browser] chromium started in {time.perf_counter() - t0:.1f} s (pid {c.pid})")
        yield c, pw


@pytest.fixture(scope="module")
def shots_dir(request):
    env = os.environ.get(SHOTS_ENV)
    d = Path(env).resolve() if env else Path(tempfile.mkdtemp(prefix="photoops-screenshots-"))
    d.mkdir(parents=True, exist_ok=True)
    yield d
    _fx.report(request, f"[test_browser] screenshots in {d}")


@pytest.fixture(scope="module")
def scratch_dir(request):
    d = Path(tempfile.mkdtemp(prefix="photoops-screenshots-other-"))
    yield d
    _fx.report(request, f"[test_browser] self-test and {fe.NEW_FRONTEND} screenshots in {d}")


@pytest.fixture(scope="module")
def frontend(chrome, comfyui_server):
    c, pw = chrome
    t0 = time.perf_counter()
    page = br.FrontendPage.open(pw, c, comfyui_server.url, viewport=br.SCREENSHOT_VIEWPORT)
    comfyui_server.timings["page ready"] = time.perf_counter() - t0
    try:
        yield page
    finally:
        page.close()


@pytest.fixture(scope="module")
def new_frontend(chrome, new_server):
    c, pw = chrome
    t0 = time.perf_counter()
    page = br.FrontendPage.open(pw, c, new_server.url, new_tab=True, viewport=br.SCREENSHOT_VIEWPORT)
    new_server.timings["page ready"] = time.perf_counter() - t0
    try:
        yield page
    finally:
        page.close()


# -- shared checks ----------------------------------------------------------------------------


def _strip(p):
    return {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in p.items()}


def _absent_models(srv, wf) -> list[dict]:
    """The ``properties.models`` entries of ``wf`` whose file the server's model folder lacks
    (``GET /models/<directory>``; an unknown folder counts as lacking it)."""
    out, listing = [], {}
    for m in br.workflow_models(wf):
        d = m.get("directory") or ""
        if d not in listing:
            status, body, _ = srv.request("GET", f"/models/{d}")
            listing[d] = set(json.loads(body)) if status == 200 else set()
        if m["name"] not in listing[d]:
            out.append(m)
    return out


def _check_eta_curve(page, label):
    """Every Eta Schedule node of the graph on the canvas draws its curve."""
    lay = page.layout()
    etas = [n for n in lay["nodes"] if n["type"] == "PhotoOps_EtaSchedule"]
    for n in etas:
        w, h = n["size"]
        box = [ETA_PAD, h - ETA_PLOT_H - ETA_PAD, w - ETA_PAD, h - ETA_PAD]
        got = page.node_pixels(n["id"], box, ETA_CURVE_RGB, tol=40)
        assert "error" not in got, got
        assert got["calls"] >= 1, f"{label}: Eta Schedule #{n['id']}: onDrawForeground never ran ({got})"
        assert got["pixels"] >= 30, f"{label}: Eta Schedule #{n['id']}: no curve pixels in the plot box {box} ({got})"
    return etas


def _load_and_check(page, srv, wf_path, shot_dir, before_shot=None):
    """Load once and run the checks listed in the module docstring (``before_shot(wf, absent,
    where)`` runs right after loading); returns (wf, report, absent models, event mark, where)."""
    wf = json.loads(wf_path.read_text())
    shipped = wf_path.parent == ROOT / "workflows"
    absent = _absent_models(srv, wf)
    mark = page.mark()
    t0 = time.perf_counter()
    report = page.load_workflow(wf, name=wf_path.stem)
    if before_shot is not None:
        before_shot(wf, absent, f"{wf_path.name} in frontend {page.version}")
    problems = page.problems(report)
    layout = page.layout()
    shot = page.screenshot(shot_dir / f"{wf_path.stem}.png", fit=True, max_bytes=SHOT_MAX_BYTES) if shipped else None
    srv.timings[f"{wf_path.name}"] = time.perf_counter() - t0
    where = f"{wf_path.name} in frontend {page.version}" + (f" (screenshot {shot})" if shot else "")

    assert not problems, f"missing/broken nodes in {where}:\n" + "\n".join(problems)
    assert report.prompt, "graphToPrompt gave an empty prompt"
    assert not report.missing_class_type, f"graphToPrompt entries without class_type: {report.missing_class_type}"

    if shipped:
        pairs = br.overlaps(layout["nodes"])
        assert not pairs, (f"{where}: nodes overlap as rendered (graph coordinates, title bar included; "
                           f"tools/measure_workflows.py prints every rect):\n" + br.describe_overlaps(pairs))

    _check_eta_curve(page, where)

    # Our converter must agree with the frontend's (titles aside: the frontend
    # uses the node's current title, we fall back to the display name).
    ours = ui_to_api(wf, srv.object_info())
    assert _strip(ours) == _strip(report.prompt), (
        f"converter differs from graphToPrompt for {where}:\n"
        f"ours:     {json.dumps(_strip(ours), sort_keys=True)}\n"
        f"frontend: {json.dumps(_strip(report.prompt), sort_keys=True)}")
    return wf, report, absent, mark, where


def _assert_no_failures(page, mark, where, allow_urls=()):
    failures = page.failures_since(mark, allow_urls=allow_urls)
    assert not failures, f"while loading {where}:\n" + "\n".join(failures)


# -- frontend 1.27.10 (pinned by ComfyUI 0.3.64) -----------------------------------------------


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
    def offer(wf, absent, where):
        if absent:
            rows = frontend.missing_models_dialog()
            assert rows is not None, f"{where}: no Missing Models dialog for {[m['name'] for m in absent]}"
            _assert_offer_1_27(rows, absent, where)
            frontend.close_dialogs()

    _, _, _, mark, where = _load_and_check(frontend, comfyui_server, wf_path, shots_dir, before_shot=offer)
    _assert_no_failures(frontend, mark, where)


def _assert_offer_1_27(rows, models, where):
    for m in models:
        row = [r for r in rows if r["text"] == f"{m['directory']} / {m['name']}"]
        assert row, f"{where}: the Missing Models dialog does not list {m['directory']} / {m['name']}: {rows}"
        assert row[0]["url"] == m["url"] and row[0]["download"], (m, row[0])


def test_self_test_invented_node_is_reported_missing(frontend, scratch_dir):
    wf = json.loads((HARNESS_GRAPHS / "invalid_unknown_node.json").read_text())
    report = frontend.load_workflow(wf)
    shot = frontend.screenshot(scratch_dir / "selftest_invalid_unknown_node.png")
    bad = [n for n in report.nodes if n["type"] == "PhotoOps_DoesNotExist_SelfTest"]
    assert bad, report.nodes
    assert "unregistered type" in bad[0]["problems"], bad[0]
    assert any(p.startswith("20:PhotoOps_DoesNotExist_SelfTest") for p in report.problems), report.problems
    assert "20" in report.missing_class_type, report.prompt
    # The loader node next to it is fine.
    assert not [n for n in report.nodes if n["type"] == "CheckpointLoaderSimple" and n["problems"]]
    frontend.close_dialogs()
    print(f"self-test screenshot: {shot}")


def test_self_test_absent_model_is_offered_for_download_1_27(frontend, comfyui_server, scratch_dir):
    wf = json.loads(DOWNLOAD_SELFTEST.read_text())
    models = br.workflow_models(wf)
    assert _absent_models(comfyui_server, wf) == models
    mark = frontend.mark()
    frontend.load_workflow(wf)
    rows = frontend.missing_models_dialog()
    frontend.screenshot(scratch_dir / "selftest_download_offer_1.27.png")
    assert rows is not None, "frontend 1.27.10 showed no Missing Models dialog"
    _assert_offer_1_27(rows, models, DOWNLOAD_SELFTEST.name)
    frontend.close_dialogs()
    _assert_no_failures(frontend, mark, DOWNLOAD_SELFTEST.name)


# -- the newest frontend (1.58.1) through --front-end-root -------------------------------------


def test_new_frontend_boots_cleanly(new_frontend):
    assert new_frontend.version == fe.NEW_FRONTEND, new_frontend.version
    failures = new_frontend.failures_since(0)
    assert not failures, "while the page booted:\n" + "\n".join(failures)


def _assert_offer_new(page, models, where):
    rows = page.missing_models_panel()
    assert rows is not None, f"{where}: no missing-models toast / panel with a Download button"
    for m in models:
        row = [r for r in rows if r["name"] == m["name"]]
        assert row, f"{where}: the missing-models panel does not offer {m['name']}: {rows}"
        assert row[0]["directory"] == m["directory"] and row[0]["download"] == f"Download {m['name']}", (m, row[0])
    # the frontend's own list carries the URL the Download button fetches
    listed = {(c["name"], c["url"]) for c in (page.missing_models() or [])}
    for m in models:
        assert (m["name"], m["url"]) in listed, (m, listed)


@pytest.mark.parametrize("wf_path", _workflow_files())
def test_new_frontend_loads_workflow(new_frontend, new_server, scratch_dir, wf_path):
    def offer(wf, absent, where):
        if absent:
            _assert_offer_new(new_frontend, absent, where)

    wf, _report, absent, mark, where = _load_and_check(new_frontend, new_server, wf_path,
                                                      scratch_dir / fe.NEW_FRONTEND, before_shot=offer)
    _assert_no_failures(new_frontend, mark, where, allow_urls=br.panel_requests(wf) if absent else ())


def test_self_test_absent_model_is_offered_for_download_new(new_frontend, new_server, scratch_dir):
    wf = json.loads(DOWNLOAD_SELFTEST.read_text())
    models = br.workflow_models(wf)
    assert _absent_models(new_server, wf) == models
    mark = new_frontend.mark()
    report = new_frontend.load_workflow(wf)
    missing = new_frontend.missing_models()
    assert missing and [m["name"] for m in missing] == [m["name"] for m in models], missing
    assert not br.real_problems(report, missing), report.problems
    _assert_offer_new(new_frontend, models, DOWNLOAD_SELFTEST.name)
    new_frontend.screenshot(scratch_dir / f"selftest_download_offer_{fe.NEW_FRONTEND}.png")
    _assert_no_failures(new_frontend, mark, DOWNLOAD_SELFTEST.name, allow_urls=br.panel_requests(wf))


def test_new_frontend_vue_nodes_draw_the_eta_curve(new_frontend, new_server):
    """With 1.58.1's Vue nodes ("Nodes 2.0") the canvas never calls onDrawForeground:
    web/eta_schedule.js then gives the node a DOM widget with its own <canvas>; it must show the
    curve and stay out of the prompt and the saved widget values."""
    wfs = [p for p in _shipped() if any(n.get("type") == "PhotoOps_EtaSchedule"
                                        for n in json.loads(p.read_text()).get("nodes", []))]
    if not wfs:
        pytest.skip("no shipped workflow has an Eta Schedule node")
    wf_path = wfs[0]
    wf = json.loads(wf_path.read_text())
    page = new_frontend
    mark = page.mark()
    page.page.evaluate("async () => await window.app.extensionManager.setting.set('Comfy.VueNodes.Enabled', true)")
    try:
        assert page.page.evaluate("() => !!window.LiteGraph.vueNodesMode")
        report = page.load_workflow(wf, name=f"{wf_path.stem} (Vue nodes)")
        assert not page.problems(report), report.problems
        etas = [n["id"] for n in report.nodes if n["type"] == "PhotoOps_EtaSchedule"]
        page.page.wait_for_function(
            "(n) => document.querySelectorAll('canvas.photoops-eta-curve').length >= n", arg=len(etas), timeout=10_000)
        page.page.wait_for_timeout(300)
        counts = page.page.evaluate("""([r, g, b]) => Array.from(document.querySelectorAll('canvas.photoops-eta-curve')).map(c => {
            const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; let k = 0;
            for (let i = 0; i < d.length; i += 4) if (Math.abs(d[i] - r) <= 40 && Math.abs(d[i + 1] - g) <= 40 && Math.abs(d[i + 2] - b) <= 40) k++;
            return {pixels: k, w: c.width, h: c.height, visible: c.getBoundingClientRect().width > 0};
        })""", list(ETA_CURVE_RGB))
        assert len(counts) == len(etas) and all(c["pixels"] >= 30 and c["visible"] for c in counts), counts
        for nid in etas:   # the DOM widget is no input of the prompt
            inputs = report.prompt[str(nid)]["inputs"]
            assert "eta_curve" not in inputs and {"preset", "eta", "points", "power"} <= set(inputs), inputs
        saved = page.page.evaluate("""() => window.app.graph.serialize().nodes
            .filter(n => n.type === 'PhotoOps_EtaSchedule').map(n => n.widgets_values)""")
        assert saved == [n["widgets_values"] for n in wf["nodes"] if n["type"] == "PhotoOps_EtaSchedule"], saved
    finally:
        page.page.evaluate("async () => await window.app.extensionManager.setting.set('Comfy.VueNodes.Enabled', false)")
    _assert_no_failures(page, mark, f"{wf_path.name} with Vue nodes", allow_urls=br.panel_requests(wf))
