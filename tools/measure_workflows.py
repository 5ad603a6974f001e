"""Load workflows in ComfyUI's real frontend and report each node's rendered rectangle.

    COMFYUI_DIR=/root/.cache/photoops-ci/ComfyUI .venv/bin/python tools/measure_workflows.py [options] [FILE.json ...]

Starts a throw-away headless ComfyUI (the test harness server: this pack, the seeded test
fixtures, ComfyUI_IPAdapter_plus too when it is in ``$COMFYUI_DIR/custom_nodes``) and a headless
Chromium, loads each workflow (default: every ``workflows/*.json``) with ``app.loadGraphData``
and prints JSON:

    {"frontend": "1.27.10", "workflows": {"<stem>": {
        "file": ..., "nodes": [{"id", "type", "title", "x", "y", "w", "h", "pos", "size", "collapsed"}],
        "groups": [{"title", "x", "y", "w", "h"}],
        "overlaps": [{"a": <node>, "b": <node>, "intersection": [x, y, w, h]}],
        "resized": [{"id", "title", "json_size", "size"}]   # nodes the frontend enlarged on load
    }}}

``problems``: missing or broken nodes (an absent model's error flag in 1.58.1 is not one).
Node ids are as the frontend holds them (numbers in 1.27.10, strings in 1.58.1).
Rectangles are in graph coordinates as rendered: x, y is the top-left corner of the title bar
(``pos[1]`` minus the 30 px title), w, h include the title bar; the frontend may enlarge a node
to its computed minimum size on load (``resized``).  Exit status 1 when any two nodes overlap.

Options:
  --frontend new      use the newest tested frontend (tests/comfy_harness/frontend.py, 1.58.1),
                      fetched with pip into the cache when absent; default: the server's own
  --frontend PATH     serve that frontend ``static`` folder (--front-end-root)
  --screenshots DIR   also write DIR/<stem>.png, the whole graph fitted in view
  --out FILE          write the JSON there instead of stdout; a summary goes to stderr
  --size WxH          browser viewport (default 1600x1000)

From Python (the tests/ folder on sys.path):  ``measure(paths, frontend=None, screenshots=None)``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _log(*a):
    print(*a, file=sys.stderr, flush=True)


def measure(paths=None, frontend: str | None = None, screenshots=None, viewport=(1600, 1000)) -> dict:
    """Rendered node rectangles of each workflow (see the module docstring for the format)."""
    from comfy_harness import browser as br
    from comfy_harness import comfyenv
    from comfy_harness import frontend as fe
    from comfy_harness.fixtures import cached_sd15_checkpoint
    from comfy_harness.server import ComfyServer
    from playwright.sync_api import sync_playwright

    reason = br.browser_skip_reason()
    if reason:
        raise SystemExit(f"cannot measure: {reason}")
    paths = [Path(p) for p in (paths or sorted((ROOT / "workflows").glob("*.json")))]
    extra_args = []
    if frontend == "new":
        extra_args = ["--front-end-root", str(fe.fetch())]
    elif frontend:
        extra_args = ["--front-end-root", str(Path(frontend).resolve())]

    comfy = comfyenv.comfyui_dir()
    third = []
    extra_models = {}
    try:
        from comfy_harness.ipadapter_fixtures import PACK_NAME, cached_ipadapter_fixtures

        if (comfy / "custom_nodes" / PACK_NAME).is_dir():
            third = [PACK_NAME]
            extra_models = cached_ipadapter_fixtures()
    except (ImportError, OSError, RuntimeError) as e:  # the pack's workflows then show missing nodes
        _log(f"note: ComfyUI_IPAdapter_plus not loaded ({e})")

    out = {"frontend": None, "workflows": {}}
    t0 = time.perf_counter()
    from comfy_harness.server import DEFAULT_SETTINGS

    srv = ComfyServer(comfy, checkpoint=cached_sd15_checkpoint(), extra_args=extra_args,
                      third_party_nodes=third, extra_models=extra_models,
                      settings={**DEFAULT_SETTINGS, **br.SCREENSHOT_SETTINGS})
    srv.start()
    try:
        with br.Chromium(extra_flags=[f"--window-size={viewport[0]},{viewport[1]}"]) as chrome, \
                sync_playwright() as pw:
            page = br.FrontendPage.open(pw, chrome, srv.url,
                                        viewport={"width": viewport[0], "height": viewport[1]})
            out["frontend"] = page.version
            _log(f"server + frontend {page.version} ready in {time.perf_counter() - t0:.1f} s")
            try:
                for p in paths:
                    wf = json.loads(p.read_text())
                    report = page.load_workflow(wf, name=p.stem)
                    lay = page.layout()
                    json_sizes = {n["id"]: n.get("size") for n in wf.get("nodes", [])}
                    resized = [
                        {"id": n["id"], "title": n["title"], "json_size": json_sizes.get(n["id"]), "size": n["size"]}
                        for n in lay["nodes"]
                        if json_sizes.get(n["id"])
                        and any(abs(a - b) > 0.5 for a, b in zip(n["size"], json_sizes[n["id"]], strict=False))
                    ]
                    entry = {"file": str(p), "nodes": lay["nodes"], "groups": lay["groups"],
                             "overlaps": br.overlaps(lay["nodes"]), "resized": resized,
                             "problems": page.problems(report)}
                    if screenshots:
                        entry["screenshot"] = str(page.screenshot(Path(screenshots) / f"{p.stem}.png", fit=True,
                                                                  max_bytes=400_000))
                    out["workflows"][p.stem] = entry
            finally:
                page.close()
    finally:
        srv.stop()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="*")
    ap.add_argument("--frontend", default=None)
    ap.add_argument("--screenshots", default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--size", default="1600x1000")
    a = ap.parse_args(argv)
    vw, vh = (int(v) for v in a.size.lower().split("x"))
    res = measure(a.files or None, frontend=a.frontend, screenshots=a.screenshots, viewport=(vw, vh))
    text = json.dumps(res, indent=1)
    if a.out:
        Path(a.out).write_text(text + "\n")
    else:
        print(text)
    from comfy_harness.browser import describe_overlaps

    bad = 0
    for stem, e in res["workflows"].items():
        msg = f"{stem}: {len(e['nodes'])} nodes, {len(e['overlaps'])} overlapping pairs, {len(e['resized'])} resized"
        if e["problems"]:
            msg += f", problems: {e['problems']}"
        _log(msg)
        if e["overlaps"]:
            bad += 1
            _log(describe_overlaps(e["overlaps"]))
        for r in e["resized"]:
            _log(f"    resized #{r['id']} {r['title']!r}: {r['json_size']} -> {[round(v) for v in r['size']]}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
