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
  apply the §10.7 step 6 rules to what happened since a mark.
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

#: 404s the frontend provokes on a fresh server/user dir that are not failures (§10.7 step 6).
ALLOWED_404_PREFIXES = ("/api/userdata", "/userdata", "/user.css", "/api/user.css",
                        "/api/jobs", "/api/global_subgraphs")


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

    def failures_since(self, mark: int = 0, allow_external: bool = False) -> list[str]:
        """§10.7 step 6: uncaught page errors, console errors other than the
        'Failed to load resource' echoes, HTTP 5xx, HTTP 4xx except the known
        404s; and (unless allowed) any request leaving the loopback host."""
        bad = []
        for ev in self.events[mark:]:
            if ev.kind == "pageerror":
                bad.append(f"page error: {ev.text}")
            elif ev.kind == "console-error":
                if not ev.text.startswith("Failed to load resource"):
                    bad.append(f"console error: {ev.text}")
            elif ev.kind == "http":
                status = int(ev.text.split()[0])
                path = urllib.parse.urlsplit(ev.text.split()[2]).path
                if status >= 500 or not (status == 404 and path.startswith(ALLOWED_404_PREFIXES)):
                    bad.append(f"HTTP {ev.text}")
            elif ev.kind == "external-request" and not allow_external:
                bad.append(f"request off the loopback host: {ev.text}")
        return bad

    # -- page -----------------------------------------------------------------

    @classmethod
    def open(cls, playwright, chrome: Chromium, base_url: str, timeout_ms: int = 120_000) -> FrontendPage:
        browser = playwright.chromium.connect_over_cdp(chrome.cdp_url)
        ctx = browser.contexts[0] if browser.contexts else browser.new_context()
        page = ctx.pages[0] if ctx.pages else ctx.new_page()
        page.set_viewport_size(VIEWPORT)
        self = cls(page, base_url)
        self.browser = browser
        page.goto(self.base_url + "/", wait_until="commit", timeout=timeout_ms)
        page.wait_for_function(_READY_JS, timeout=timeout_ms, polling=100)
        self.version = page.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__ || null")
        return self

    def close_dialogs(self) -> None:
        self.page.keyboard.press("Escape")

    def load_workflow(self, workflow: dict) -> WorkflowReport:
        """Escape, app.loadGraphData, inspect every node, app.graphToPrompt()."""
        self.close_dialogs()
        self.page.evaluate("async (wf) => { await window.app.loadGraphData(wf); }", workflow)
        nodes = self.page.evaluate(_INSPECT_JS)
        prompt = self.page.evaluate("async () => (await window.app.graphToPrompt()).output")
        problems = [f"{n['id']}:{n['type']}: {', '.join(n['problems'])}" for n in nodes if n["problems"]]
        missing = sorted(k for k, v in prompt.items() if not v.get("class_type"))
        return WorkflowReport(nodes=nodes, problems=problems, prompt=prompt, missing_class_type=missing)

    def screenshot(self, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(path))
        return path

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.browser.close()  # over CDP this only disconnects; Chromium.stop() ends the browser
