"""Drive ComfyUI's frontend in a headless Debian Chromium we start ourselves (docs §10.6-10.7).

    with Chromium() as chrome, sync_playwright() as pw:
        page = FrontendPage.open(pw, chrome, server.url)
        report = page.load_workflow(workflow_dict)   # nodes, problems, prompt
        page.screenshot(path)

* Chromium runs with the flags of §10.6, a fresh profile, and remote debugging
  on 127.0.0.1 port 0; the port is read from the profile's DevToolsActivePort
  and Playwright attaches with ``connect_over_cdp``.  Playwright never
  downloads a browser (never run ``playwright install``), and we know the PID,
  so :meth:`Chromium.stop` kills exactly that browser.
* Console, page-error, response and request listeners are attached before
  navigation; :meth:`FrontendPage.mark` / :meth:`FrontendPage.failures_since`
  apply the §10.7 step 6 rules to what happened since a mark (the known-harmless
  404s, console errors and off-host requests are listed by name below).
* Layout: :meth:`FrontendPage.node_rects` / :meth:`FrontendPage.layout` give each node's
  rendered rectangle (title bar included, after the frontend's minimum-size pass), and
  :func:`overlaps` the overlapping pairs; :meth:`FrontendPage.screenshot` with ``fit=True``
  sizes the viewport to the graph and fits it in view (tools/measure_workflows.py uses both).
* Missing models: :meth:`FrontendPage.missing_models_dialog` (1.27.10's dialog),
  :meth:`FrontendPage.missing_models_panel` (1.58.1's "View details" panel),
  :meth:`FrontendPage.missing_models` (1.58.1's own list).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from . import comfyenv

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,900",
]
VIEWPORT = {"width": 1400, "height": 900}
#: the pages of the browser tests (screenshots of whole workflows resize it to the graph's shape)
SCREENSHOT_VIEWPORT = {"width": 1600, "height": 1000}
#: whole-workflow screenshots: the graph drawn at up to 70 % in a viewport between these sizes,
#: fitted below the top bar and right of the side bar
SCREENSHOT_SCALE = 0.7
SCREENSHOT_MIN, SCREENSHOT_MAX = (1400, 640), (2400, 1500)
SCREENSHOT_TOP, SCREENSHOT_LEFT = 80, 40
#: settings for pages that take screenshots: no minimap over the graph, no canvas info text, the
#: list of opened workflows in the side bar (not one tab per loaded file across the top)
SCREENSHOT_SETTINGS = {"Comfy.Minimap.Visible": False, "Comfy.Graph.CanvasInfo": False,
                       "Comfy.Workflow.WorkflowTabsPosition": "Sidebar"}


def panel_requests(workflow: dict) -> list[str]:
    """The GET requests off the loopback host that frontend 1.58.1 makes when its missing-models
    panel opens: it asks the Comfy registry (api.comfy.org) for the pack of core nodes and for
    each custom node type of the graph.  Allowed, by exact URL, only in that check."""
    types = sorted({n.get("type") for n in workflow.get("nodes", []) if n.get("type")})
    return (["https://api.comfy.org/nodes?node_id=comfy-core"]
            + [f"https://api.comfy.org/comfy-nodes/{t}/node" for t in types])


def find_chromium() -> str | None:
    """$PHOTOOPS_CHROMIUM, else chromium / chromium-browser on PATH (Debian package)."""
    env = os.environ.get("PHOTOOPS_CHROMIUM")
    if env:
        return env if Path(env).exists() else None
    for name in ("chromium", "chromium-browser"):
        p = shutil.which(name)
        if p:
            return p
    return None


def browser_skip_reason() -> str | None:
    """Why the browser test cannot run (ComfyUI, Chromium or Playwright missing), or None."""
    r = comfyenv.comfyui_skip_reason()
    if r:
        return r
    if find_chromium() is None:
        return "Chromium not found (apt-get install chromium, or set PHOTOOPS_CHROMIUM)"
    try:
        import playwright.sync_api  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the machine
        return f"Playwright for Python not importable ({e}); pip install playwright (no 'playwright install' needed)"
    return None


class Chromium:
    """A headless Chromium process with remote debugging on a loopback port."""

    def __init__(self, executable: str | None = None, extra_flags=(), start_timeout: float = 60.0):
        self.executable = executable or find_chromium()
        if not self.executable:
            raise RuntimeError("Chromium not found")
        self.extra_flags = list(extra_flags)
        self.start_timeout = start_timeout
        self.profile: Path | None = None
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self.log_path: Path | None = None
        self._log = None
        self.startup_seconds: float | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def cdp_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Chromium:
        t0 = time.perf_counter()
        self.profile = Path(tempfile.mkdtemp(prefix="photoops-chromium-"))
        self.log_path = self.profile.parent / (self.profile.name + ".log")
        self._log = open(self.log_path, "wb")
        cmd = [
            self.executable, *CHROMIUM_FLAGS, *self.extra_flags,
            f"--user-data-dir={self.profile}",
            "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
            "about:blank",
        ]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self._log, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        port_file = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                msg = f"Chromium exited with {self.proc.returncode}: {self._log_tail()}"
                self.stop()
                raise RuntimeError(msg)
            if port_file.exists():
                lines = port_file.read_text().split()
                if lines and lines[0].isdigit():
                    self.port = int(lines[0])
                    self.startup_seconds = time.perf_counter() - t0
                    return self
            time.sleep(0.05)
        msg = f"Chromium wrote no DevToolsActivePort within {self.start_timeout:.0f} s: {self._log_tail()}"
        self.stop()
        raise RuntimeError(msg)

    def _log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except Exception:
            return ""

    def stop(self) -> None:
        comfyenv.terminate(self.proc)      # its renderer/zygote children share the session we created
        self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None
        if self.log_path is not None:
            with contextlib.suppress(OSError):
                self.log_path.unlink()
        if self.profile is not None:
            shutil.rmtree(self.profile, ignore_errors=True)
            self.profile = None

    def __enter__(self) -> Chromium:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# JS: walk every node (subgraphs included) and flag missing/broken ones.
_INSPECT_JS = r"""
() => {
  const app = window.app, LG = window.LiteGraph;
  const registered = (LG && LG.registered_node_types) || {};
  const out = [];
  const seen = new Set();
  const walk = (graph, path) => {
    if (!graph || seen.has(graph)) return;
    seen.add(graph);
    const nodes = graph.nodes || graph._nodes || [];
    for (const n of nodes) {
      const widgets = (n.widgets || []).map(w => w.name);
      const rec = {
        id: n.id, path, type: n.type, title: n.title, comfyClass: n.comfyClass || null,
        registered: !!registered[n.type], has_errors: !!n.has_errors,
        virtual: !!n.isVirtualNode, subgraph: !!n.subgraph, mode: n.mode, widgets,
      };
      const problems = [];
      if (!rec.registered && !rec.subgraph) problems.push("unregistered type");
      if (rec.has_errors) problems.push("error flag set");
      if (!rec.virtual && !rec.subgraph && !rec.comfyClass) problems.push("no Comfy class");
      if (widgets.includes("UNKNOWN")) problems.push("UNKNOWN widget");
      rec.problems = problems;
      out.push(rec);
      if (n.subgraph) walk(n.subgraph, path.concat([n.id]));
    }
  };
  walk(app.graph, []);
  if (app.graph && app.graph.subgraphs && app.graph.subgraphs.values) {
    for (const sg of app.graph.subgraphs.values()) walk(sg, ["subgraph:" + (sg.id || "?")]);
  }
  return out;
}
"""

_READY_JS = "() => !!(window.app && window.app.graph && window.app.vueAppReady)"

# JS: each node's rendered rectangle in graph coordinates, title bar included.  Drawn once first,
# so the frontend has computed the sizes it renders (on load it enlarges nodes to their computed
# minimum size; LiteGraph refreshes ``boundingRect`` while drawing).  ``getBounding`` (title bar
# included, no slots/shadow) when the node has it, else ``boundingRect``, else pos/size plus the
# title height.  Top-level graph only (the graph on the canvas); groups are listed apart.
_RECTS_JS = r"""
() => {
  const app = window.app, LG = window.LiteGraph, c = app.canvas;
  if (c && c.setDirty) c.setDirty(true, true);
  if (c && c.draw) c.draw(true, true);
  const TH = (LG && LG.NODE_TITLE_HEIGHT) || 30;
  const graph = c.graph || app.graph;
  const rect = (n) => {
    if (typeof n.getBounding === "function") {
      try { const r = n.getBounding(new Float32Array(4)); if (r && r.length >= 4) return Array.from(r).slice(0, 4); }
      catch (e) {}
    }
    if (n.boundingRect && n.boundingRect.length >= 4) return Array.from(n.boundingRect).slice(0, 4);
    const collapsed = n.flags && n.flags.collapsed;
    const w = collapsed ? (n._collapsed_width || LG.NODE_COLLAPSED_WIDTH || 80) : n.size[0];
    const h = collapsed ? 0 : n.size[1];
    return [n.pos[0], n.pos[1] - TH, w, h + TH];
  };
  const nodes = (graph.nodes || graph._nodes || []).map((n) => {
    const [x, y, w, h] = rect(n);
    return {id: n.id, type: n.type, title: n.title, x, y, w, h,
            pos: Array.from(n.pos), size: Array.from(n.size), collapsed: !!(n.flags && n.flags.collapsed)};
  });
  const groups = (graph.groups || graph._groups || []).map((g) => {
    const b = g._bounding || g.bounding || [g.pos[0], g.pos[1], g.size[0], g.size[1]];
    return {title: g.title, x: b[0], y: b[1], w: b[2], h: b[3]};
  });
  return {title_height: TH, nodes, groups};
}
"""

# JS: set the canvas view so that every node and group is visible (rects in graph coordinates).
_FIT_JS = r"""
([x0, y0, x1, y1, margin, top, left]) => {
  const c = window.app.canvas, ds = c.ds, el = c.canvas;
  const W = el.clientWidth || el.width, H = el.clientHeight || el.height;
  const aw = W - 2 * margin - left, ah = H - 2 * margin - top;
  const scale = Math.max(0.05, Math.min(aw / Math.max(1, x1 - x0), ah / Math.max(1, y1 - y0), 1.5));
  ds.scale = scale;
  ds.offset[0] = (left + margin) / scale + (aw / scale - (x1 - x0)) / 2 - x0;
  ds.offset[1] = (top + margin) / scale + (ah / scale - (y1 - y0)) / 2 - y0;
  c.setDirty(true, true);
  c.draw(true, true);
  return {scale, W, H};
}
"""


def real_problems(report: WorkflowReport, missing) -> list[str]:
    """``report.problems`` minus the error flag that frontend 1.58.1 sets on a loader whose model
    file the server lacks, accepted only when the frontend's own missing-models list
    (:meth:`FrontendPage.missing_models`) names that node."""
    flagged = {str(m["node"]) for m in (missing or []) if m.get("missing")}
    out = []
    for n in report.nodes:
        probs = [p for p in n["problems"] if not (p == "error flag set" and str(n["id"]) in flagged)]
        if probs:
            out.append(f"{n['id']}:{n['type']}: {', '.join(probs)}")
    return out


def rect_overlap(a: dict, b: dict) -> tuple | None:
    """The intersection (x, y, w, h) of two rects ({x, y, w, h}) when it has an area, else None
    (rects that only touch do not overlap)."""
    x0, y0 = max(a["x"], b["x"]), max(a["y"], b["y"])
    x1, y1 = min(a["x"] + a["w"], b["x"] + b["w"]), min(a["y"] + a["h"], b["y"] + b["h"])
    if x1 - x0 > 0.5 and y1 - y0 > 0.5:
        return (x0, y0, x1 - x0, y1 - y0)
    return None


def overlaps(rects: list) -> list[dict]:
    """Every pair of node rects (from :meth:`FrontendPage.node_rects`) that overlap, with the
    intersection: [{a: rect, b: rect, intersection: [x, y, w, h]}]."""
    out = []
    for i, a in enumerate(rects):
        for b in rects[i + 1:]:
            r = rect_overlap(a, b)
            if r:
                out.append({"a": a, "b": b, "intersection": [round(v, 1) for v in r]})
    return out


def describe_overlaps(pairs: list) -> str:
    def one(r):
        return f"#{r['id']} {r['type']} {r['title']!r} at x={r['x']:.0f} y={r['y']:.0f} w={r['w']:.0f} h={r['h']:.0f}"

    return "\n".join(f"  {one(p['a'])}\n    overlaps {one(p['b'])}\n    by {p['intersection']}" for p in pairs)

#: 404s the frontend provokes on a fresh server/user dir that are not failures (§10.7 step 6):
#: * ``/api/userdata``, ``/userdata``, ``/user.css``, ``/api/user.css``: user files a fresh user
#:   directory does not have yet (both frontends);
#: * ``/api/jobs`` and ``/api/global_subgraphs``: endpoints that newer frontends (1.58.1) ask for and
#:   server 0.3.64 does not have (the queue/history panel stays empty; docs §10.7).
ALLOWED_404_PREFIXES = ("/api/userdata", "/userdata", "/user.css", "/api/user.css",
                        "/api/jobs", "/api/global_subgraphs")

#: Console errors that are not failures, by the start of their text:
#: * frontend 1.58.1 on server 0.3.64: its queue/history code logs the /api/jobs 404s above;
#: * frontend 1.27.10's missing-models dialog logs this when its HEAD request for a model's file
#:   size (to a URL from ``properties.models``) cannot reach the host (tests run offline).
ALLOWED_CONSOLE_ERRORS = (
    "[Jobs API] Error fetching jobs: JobsApiError: Failed to fetch jobs: 404",
    "Failed to fetch queue: JobsApiError: Failed to fetch jobs: 404",
    "Error fetching file size: TypeError: Failed to fetch",
)

# JS: the model URLs (node ``properties.models``) of the graph on the canvas, subgraphs included.
_MODEL_URLS_JS = r"""
() => {
  const urls = [], seen = new Set();
  const walk = (g) => {
    if (!g || seen.has(g)) return; seen.add(g);
    for (const n of (g.nodes || g._nodes || [])) {
      for (const m of ((n.properties && n.properties.models) || [])) if (m && m.url) urls.push(m.url);
      if (n.subgraph) walk(n.subgraph);
    }
  };
  walk(window.app.graph);
  return urls;
}
"""


def workflow_models(wf: dict) -> list[dict]:
    """Every ``properties.models`` entry ({name, url, directory}) of a UI-format workflow, with the
    node id and type; nodes inside subgraph definitions included."""
    out = []
    graphs = [wf] + list((wf.get("definitions") or {}).get("subgraphs") or [])
    for g in graphs:
        for n in g.get("nodes", []):
            for m in (n.get("properties") or {}).get("models") or []:
                if isinstance(m, dict) and m.get("name"):
                    out.append({"node": n.get("id"), "type": n.get("type"), **m})
    return out


# JS (frontends with a Pinia ``missingModel`` store, 1.58.1): the models the frontend found missing,
# or null when there is no such store (1.27.10 shows a dialog instead, see missing_models_dialog()).
_MISSING_MODELS_JS = r"""
() => {
  const el = document.querySelector('#vue-app') || document.querySelector('[data-v-app]');
  const pinia = el && el.__vue_app__ && el.__vue_app__.config.globalProperties.$pinia;
  const store = pinia && pinia._s && pinia._s.get('missingModel');
  if (!store) return null;
  const list = store.missingModelCandidates || [];
  return JSON.parse(JSON.stringify(list)).map(c => ({node: String(c.nodeId), type: c.nodeType, name: c.name,
    directory: c.directory, url: c.url || null, missing: c.isMissing !== false}));
}
"""

# JS: dismiss toasts and close the right-side panel (frontends with those Pinia stores).
_CLOSE_PANELS_JS = r"""
() => {
  const el = document.querySelector('#vue-app') || document.querySelector('[data-v-app]');
  const pinia = el && el.__vue_app__ && el.__vue_app__.config.globalProperties.$pinia;
  if (!pinia || !pinia._s) return;
  const panel = pinia._s.get('rightSidePanel'), toast = pinia._s.get('toast'), errs = pinia._s.get('executionError');
  try { if (panel && panel.isOpen && panel.closePanel) panel.closePanel(); } catch (e) {}
  // 1.58.1's "<model> is missing ... View details" card is its error overlay, not a toast
  try { if (errs && errs.isErrorOverlayOpen && errs.dismissErrorOverlay) errs.dismissErrorOverlay(); } catch (e) {}
  try { if (toast && toast.dismissAll) toast.dismissAll(); else if (toast && toast.removeAll) toast.removeAll(); } catch (e) {}
}
"""

# JS: wait until the image previews of the graph's nodes are decoded (LoadImage etc.).
_IMAGES_READY_JS = r"""
() => (window.app.graph.nodes || []).every(n => !n.imgs || n.imgs.every(i => !i || (i.complete && i.naturalWidth > 0)))
"""

# JS: draw one node at 100 % in the middle of the canvas and count, inside its own box
# [x0, y0, x1, y1] (node coordinates, y down from pos), the pixels within ``tol`` of ``rgb``;
# also count the node's onDrawForeground calls during that draw.
_NODE_PIXELS_JS = r"""
([nodeId, box, rgb, tol]) => {
  const app = window.app, c = app.canvas, ds = c.ds, el = c.canvas;
  const n = app.graph.getNodeById ? app.graph.getNodeById(nodeId) : app.graph.nodes.find(x => String(x.id) === String(nodeId));
  if (!n) return {error: "no node " + nodeId};
  const W = el.clientWidth || el.width, H = el.clientHeight || el.height;
  const saved = {scale: ds.scale, offset: [ds.offset[0], ds.offset[1]]};
  ds.scale = 1;
  ds.offset[0] = W / 2 - (n.pos[0] + n.size[0] / 2);
  ds.offset[1] = H / 2 - (n.pos[1] + n.size[1] / 2);
  let calls = 0;
  const own = Object.prototype.hasOwnProperty.call(n, "onDrawForeground");
  const orig = n.onDrawForeground;
  if (typeof orig === "function") n.onDrawForeground = function () { calls++; return orig.apply(this, arguments); };
  let count = 0, total = 0;
  try {
    c.setDirty(true, true);
    c.draw(true, true);
    const dpr = (el.width / (el.clientWidth || el.width)) || 1;
    const sx = (n.pos[0] + box[0] + ds.offset[0]) * dpr, sy = (n.pos[1] + box[1] + ds.offset[1]) * dpr;
    const sw = Math.max(1, Math.round((box[2] - box[0]) * dpr)), sh = Math.max(1, Math.round((box[3] - box[1]) * dpr));
    const data = el.getContext("2d").getImageData(Math.round(sx), Math.round(sy), sw, sh).data;
    total = sw * sh;
    for (let i = 0; i < data.length; i += 4) {
      if (Math.abs(data[i] - rgb[0]) <= tol && Math.abs(data[i + 1] - rgb[1]) <= tol && Math.abs(data[i + 2] - rgb[2]) <= tol) count++;
    }
  } finally {
    if (own) n.onDrawForeground = orig; else delete n.onDrawForeground;
    ds.scale = saved.scale; ds.offset[0] = saved.offset[0]; ds.offset[1] = saved.offset[1];
    c.setDirty(true, true);
  }
  return {calls, pixels: count, total, size: Array.from(n.size)};
}
"""


@dataclass
class Event:
    t: float
    kind: str  # console-error | console-warning | pageerror | http | external-request
    text: str


@dataclass
class WorkflowReport:
    nodes: list
    problems: list  # "id:type: reason, reason"
    prompt: dict  # graphToPrompt().output
    missing_class_type: list = field(default_factory=list)


class FrontendPage:
    """A ComfyUI page in a CDP-attached Chromium, with its error events recorded."""

    def __init__(self, page, base_url: str):
        self.page = page
        self.base_url = base_url.rstrip("/")
        self.events: list[Event] = []
        self.version: str | None = None
        #: model URLs named in ``properties.models`` of graphs this page loaded: the frontend sends a
        #: HEAD request to each (file size for its download offer); those requests are not failures
        self.model_urls: set[str] = set()
        host = urllib.parse.urlsplit(self.base_url).hostname
        self._local_hosts = {host, "127.0.0.1", "localhost"}
        page.on("console", self._on_console)
        page.on("pageerror", lambda e: self._add("pageerror", str(e)))
        page.on("response", self._on_response)
        page.on("request", self._on_request)

    # -- events ---------------------------------------------------------------

    def _add(self, kind, text):
        self.events.append(Event(time.monotonic(), kind, text))

    def _on_console(self, msg):
        if msg.type == "error":
            self._add("console-error", msg.text)
        elif msg.type == "warning":
            self._add("console-warning", msg.text)

    def _on_response(self, resp):
        if resp.status >= 400:
            self._add("http", f"{resp.status} {resp.request.method} {resp.url}")

    def _on_request(self, req):
        u = urllib.parse.urlsplit(req.url)
        if u.scheme in ("http", "https", "ws", "wss") and u.hostname not in self._local_hosts:
            self._add("external-request", f"{req.method} {req.url}")

    def mark(self) -> int:
        return len(self.events)

    def failures_since(self, mark: int = 0, allow_external: bool = False, allow_urls=()) -> list[str]:
        """§10.7 step 6: uncaught page errors, console errors other than the
        'Failed to load resource' echoes and :data:`ALLOWED_CONSOLE_ERRORS`, HTTP 5xx, HTTP 4xx
        except the known 404s; and (unless allowed) any request leaving the loopback host other
        than the HEAD requests for the model URLs of loaded graphs (:attr:`model_urls`) and
        the requests to ``allow_urls``."""
        bad = []
        allowed_requests = {f"HEAD {u}" for u in self.model_urls} | {f"GET {u}" for u in allow_urls}
        for ev in self.events[mark:]:
            if ev.kind == "pageerror":
                bad.append(f"page error: {ev.text}")
            elif ev.kind == "console-error":
                if not ev.text.startswith(("Failed to load resource",) + ALLOWED_CONSOLE_ERRORS):
                    bad.append(f"console error: {ev.text}")
            elif ev.kind == "http":
                status = int(ev.text.split()[0])
                path = urllib.parse.urlsplit(ev.text.split()[2]).path
                if status >= 500 or not (status == 404 and path.startswith(ALLOWED_404_PREFIXES)):
                    bad.append(f"HTTP {ev.text}")
            elif ev.kind == "external-request" and not allow_external and ev.text not in allowed_requests:
                bad.append(f"request off the loopback host: {ev.text}")
        return bad

    # -- page -----------------------------------------------------------------

    @classmethod
    def open(cls, playwright, chrome: Chromium, base_url: str, timeout_ms: int = 120_000,
             new_tab: bool = False, viewport: dict | None = None) -> FrontendPage:
        """Attach to ``chrome`` and open the ComfyUI page at ``base_url`` (in its first tab, or in
        a new one with ``new_tab``: one browser can hold the pages of several servers)."""
        browser = playwright.chromium.connect_over_cdp(chrome.cdp_url)
        ctx = browser.contexts[0] if browser.contexts else browser.new_context()
        page = ctx.new_page() if new_tab or not ctx.pages else ctx.pages[0]
        page.set_viewport_size(viewport or VIEWPORT)
        self = cls(page, base_url)
        self.browser = browser
        self._own_tab = new_tab
        page.goto(self.base_url + "/", wait_until="commit", timeout=timeout_ms)
        page.wait_for_function(_READY_JS, timeout=timeout_ms, polling=100)
        self.version = page.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__ || null")
        # the graph the frontend opens with (1.58.1: a template naming its models) is probed too
        self.model_urls.update(page.evaluate(_MODEL_URLS_JS))
        return self

    def close_dialogs(self) -> None:
        """Escape (closes 1.27.10's dialogs); also dismiss toasts and close 1.58.1's right-side panel."""
        self.page.keyboard.press("Escape")
        self.page.evaluate(_CLOSE_PANELS_JS)

    def load_workflow(self, workflow: dict, name: str | None = None) -> WorkflowReport:
        """Escape, app.loadGraphData (as workflow ``name``: the tab's title), inspect every node,
        app.graphToPrompt()."""
        with contextlib.suppress(Exception):
            self.page.bring_to_front()  # one browser may hold several pages; draw in the active one
        self.close_dialogs()
        self.model_urls.update(m["url"] for m in workflow_models(workflow) if m.get("url"))
        self.page.evaluate("async ([wf, name]) => { await window.app.loadGraphData(wf, true, true, name); }",
                           [workflow, name])
        nodes = self.page.evaluate(_INSPECT_JS)
        prompt = self.page.evaluate("async () => (await window.app.graphToPrompt()).output")
        problems = [f"{n['id']}:{n['type']}: {', '.join(n['problems'])}" for n in nodes if n["problems"]]
        missing = sorted(k for k, v in prompt.items() if not v.get("class_type"))
        return WorkflowReport(nodes=nodes, problems=problems, prompt=prompt, missing_class_type=missing)

    def wait_images(self, timeout_ms: int = 5000) -> bool:
        """Wait until the nodes' image previews (LoadImage ...) are decoded; False on timeout."""
        from playwright.sync_api import TimeoutError as PlaywrightTimeout

        try:
            self.page.wait_for_function(_IMAGES_READY_JS, timeout=timeout_ms, polling=100)
            return True
        except PlaywrightTimeout:
            return False

    def missing_models(self) -> list[dict] | None:
        """The models the frontend reports missing ([{node, type, name, directory, url, missing}]),
        from its ``missingModel`` store (1.58.1); None when the frontend has no such store."""
        return self.page.evaluate(_MISSING_MODELS_JS)

    def problems(self, report: WorkflowReport, wait_ms: int = 3000) -> list[str]:
        """:func:`real_problems` of ``report`` (just loaded); waits up to ``wait_ms`` for the
        frontend's missing-models list to name the flagged loaders."""
        deadline = time.monotonic() + wait_ms / 1000
        while True:
            missing = self.missing_models()
            out = real_problems(report, missing)
            if not out or missing is None or time.monotonic() > deadline:
                return out
            self.page.wait_for_timeout(200)

    def missing_models_dialog(self, timeout_ms: int = 5000) -> list[dict] | None:
        """Frontend 1.27.10's "Missing Models" dialog (``.comfy-missing-models``): one
        {text: "<directory> / <name>", url, download} per row (``download``: the row has a
        "Download" button); None when the dialog did not appear within ``timeout_ms``."""
        from playwright.sync_api import TimeoutError as PlaywrightTimeout

        loc = self.page.locator(".comfy-missing-models")
        try:
            loc.first.wait_for(state="visible", timeout=timeout_ms)
        except PlaywrightTimeout:
            return None
        return self.page.evaluate("""() => Array.from(document.querySelectorAll('.comfy-missing-models li')).map(li => {
            const s = li.querySelector('span[title]');
            return {text: s ? s.textContent.trim() : li.textContent.trim(), url: s ? s.getAttribute('title') : null,
                    download: Array.from(li.querySelectorAll('button')).some(b => /Download/.test(b.textContent))};
        })""")

    def missing_models_panel(self, timeout_ms: int = 8000) -> list[dict] | None:
        """Frontend 1.58.1's download offer: its error card "<model> is missing ... View details" opens
        the right-side "Workflow Overview / Issues" panel whose "Missing Models" rows each carry a
        ``[data-testid=missing-model-download]`` button labelled "Download <name>".  Clicks
        "View details" and returns [{name, directory, download}] per row, or None when no toast
        or panel appeared.  (Opening the panel makes the frontend ask api.comfy.org about the
        node packs: :func:`panel_requests`.)"""
        from playwright.sync_api import TimeoutError as PlaywrightTimeout

        btn = self.page.get_by_role("button", name="View details")
        try:
            btn.first.wait_for(state="visible", timeout=timeout_ms)
            btn.first.click()
            self.page.locator("[data-testid=missing-model-download]").first.wait_for(state="visible",
                                                                                    timeout=timeout_ms)
        except PlaywrightTimeout:
            return None
        return self.page.evaluate("""() => Array.from(document.querySelectorAll('[data-testid=missing-model-download]')).map(b => {
            const row = b.parentElement;
            const name = row.querySelector('button[title]');
            const spans = row.querySelectorAll('span.block');
            return {name: name ? name.getAttribute('title') : null, directory: spans.length ? spans[0].textContent.trim() : null,
                    download: (b.getAttribute('aria-label') || b.textContent || '').trim()};
        })""")

    def node_pixels(self, node_id, box, rgb, tol: int = 40) -> dict:
        """Draw node ``node_id`` at 100 % and count the pixels of colour ``rgb`` (within ``tol``) in
        ``box`` = [x0, y0, x1, y1] in node coordinates; also how often its ``onDrawForeground``
        ran in that draw.  {calls, pixels, total, size}."""
        return self.page.evaluate(_NODE_PIXELS_JS, [node_id, list(box), list(rgb), tol])

    def layout(self) -> dict:
        """{title_height, nodes: [{id, type, title, x, y, w, h, pos, size, collapsed}], groups: [{title, x, y, w, h}]}
        of the graph on the canvas, as rendered (graph coordinates, title bars included)."""
        return self.page.evaluate(_RECTS_JS)

    def node_rects(self) -> list[dict]:
        """Each node's rendered rectangle: [{id, type, title, x, y, w, h, ...}] (see :meth:`layout`)."""
        return self.layout()["nodes"]

    def fit_view(self, margin: float = 24, top: float = 0, left: float = 0) -> dict:
        """Zoom and pan the canvas so that every node and group is visible (at most 150 %)."""
        lay = self.layout()
        boxes = lay["nodes"] + lay["groups"]
        if not boxes:
            return {}
        x0 = min(b["x"] for b in boxes)
        y0 = min(b["y"] for b in boxes)
        x1 = max(b["x"] + b["w"] for b in boxes)
        y1 = max(b["y"] + b["h"] for b in boxes)
        return self.page.evaluate(_FIT_JS, [x0, y0, x1, y1, margin, top, left])

    def screenshot(self, path, fit: bool = False, max_bytes: int | None = None) -> Path:
        """A PNG of the page.  ``fit``: close dialogs, size the viewport to the graph's shape
        (:data:`SCREENSHOT_SCALE`, between :data:`SCREENSHOT_MIN` and :data:`SCREENSHOT_MAX`), fit
        the whole graph in view, take the shot, restore the viewport.  ``max_bytes``: a larger
        PNG is re-saved with a 256-colour palette."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if not fit:
            self.page.screenshot(path=str(path))
            return path
        self.close_dialogs()
        self.wait_images()
        saved = self.page.viewport_size
        lay = self.layout()
        boxes = lay["nodes"] + lay["groups"]
        if boxes:
            bw = max(b["x"] + b["w"] for b in boxes) - min(b["x"] for b in boxes)
            bh = max(b["y"] + b["h"] for b in boxes) - min(b["y"] for b in boxes)
            m = 2 * 24
            w = int(min(max(bw * SCREENSHOT_SCALE + SCREENSHOT_LEFT + m, SCREENSHOT_MIN[0]), SCREENSHOT_MAX[0]))
            scale = min((w - SCREENSHOT_LEFT - m) / max(bw, 1), SCREENSHOT_SCALE)
            h = int(min(max(bh * scale + SCREENSHOT_TOP + m, SCREENSHOT_MIN[1]), SCREENSHOT_MAX[1]))
            self.page.set_viewport_size({"width": w, "height": h})
            self.page.wait_for_timeout(300)  # the frontend resizes its canvas
        try:
            self.fit_view(top=SCREENSHOT_TOP, left=SCREENSHOT_LEFT)
            self.page.wait_for_timeout(150)
            self.page.screenshot(path=str(path))
        finally:
            if saved:
                self.page.set_viewport_size(saved)
        if max_bytes and path.stat().st_size > max_bytes:
            from PIL import Image

            with Image.open(path) as im:
                q = im.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT,
                                               dither=Image.Dither.FLOYDSTEINBERG)
            q.save(path, optimize=True)
        return path

    def close(self) -> None:
        if getattr(self, "_own_tab", False):
            with contextlib.suppress(Exception):
                self.page.close()
        with contextlib.suppress(Exception):
            self.browser.close()  # over CDP this only disconnects; Chromium.stop() ends the browser
