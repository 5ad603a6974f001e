"""The Eta Schedule widget's curve (web/eta_schedule.js, ``etaAt``) equals the Python one.

The widget draws eta(t) from its own JavaScript copy of the formulas; the node computes the schedule
in Python (``kernels/eta.py``, chosen by ``build_schedule`` in ``nodes/inversion.py``).  Here the
unchanged JS file runs in Node.js: its one import (ComfyUI's ``app``, which only exists in the
browser) is replaced by a stub, so ``etaAt`` and ``parsePoints`` are the shipped code.  Both sides are
fed the same timestep ``t`` and compute ``u = t / 999`` themselves (one correctly rounded IEEE
division on both), then the same float64 operations; only ``pow`` may come from different libm
implementations (<= 1 ulp), so |JS - Python| <= 1e-9 is far above the possible rounding differences
and far below any formula difference (a wrong preset constant, clamp or power changes eta by > 1e-3).

* ``test_js_curve_matches_kernels`` (Node.js only): every preset (linear_default, paper_A, paper_B,
  constant, custom) and several eta / points / power values at 1000+ t per case, against
  ``kernels.eta`` (``PRESETS``, ``eta_time_function``, ``custom_points``);
* ``test_js_curve_matches_the_node_build_schedule`` (Node.js and $COMFYUI_DIR): the same cases
  through the node's own ``build_schedule(preset, eta, points, power)``, point strings parsed on
  both sides (``parsePoints`` / ``parse_points``), with the separators the tooltip allows;
* an empty custom curve: JS draws nothing (NaN, "invalid points"), Python raises.

Skipped, printing why, when ``node`` is not on PATH.
"""
from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

from photoops.kernels import eta as keta

ROOT = Path(__file__).resolve().parents[1]
JS = ROOT / "web" / "eta_schedule.js"
TOL = 1e-9
IMPORT_RE = re.compile(r'^import \{ app \} from "\.\./\.\./scripts/app\.js";$', re.M)

# t: every integer timestep, fractional ones, and the preset knots (u = 0.3, 0.6) hit from both sides
T_VALUES = ([float(t) for t in range(1000)] + [k * 999 / 997 for k in range(998)]
            + [0.3 * 999, 0.6 * 999, 299.7 - 1e-9, 299.7 + 1e-9, 599.4 - 1e-9, 599.4 + 1e-9, 1e-7, 998.9999])

PRESET_NAMES = ["linear_default", "paper_A", "paper_B"]
POWERS = [1.0, 0.05, 0.5, 2.0, 3.7, 10.0]
ETAS = [0.0, 0.05, 0.4, 0.73, 1.0]
# (the widget string, the points it means)
POINTS = [
    ("0:0, 0.6:0, 1:0.7", [(0, 0), (0.6, 0), (1, 0.7)]),                   # the node's default
    ("0.5:0.3", [(0.5, 0.3)]),                                            # one point: constant
    ("0.2:0.1; 0.9:0.8", [(0.2, 0.1), (0.9, 0.8)]),                       # constant outside [0.2, 0.9]
    ("1:1, 0:0.25, 0.4=0.9", [(1, 1), (0, 0.25), (0.4, 0.9)]),            # unsorted, '=' separator
    ("0:1\n0.33:0\n0.66:1\n1:0", [(0, 1), (0.33, 0), (0.66, 1), (1, 0)]),  # newlines, zig-zag
]

DRIVER = r"""
import { readFileSync } from "node:fs";
const mod = await import(process.argv[2]);
const cases = JSON.parse(readFileSync(0, "utf8"));
const out = cases.map(([preset, eta, points, power, ts]) =>
    ts.map((t) => { const e = mod.etaAt(preset, eta, points, power, t / 999); return Number.isFinite(e) ? e : null; }));
process.stdout.write(JSON.stringify(out));
"""


def _node():
    node = shutil.which("node")
    if node is None:
        reason = "Node.js (`node`) not on PATH: cannot run web/eta_schedule.js"
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    return node


def run_js(cases):
    """[[eta or None per t] per case] from the shipped ``etaAt`` for cases (preset, eta, points, power, ts)."""
    node = _node()
    src = JS.read_text()
    assert len(IMPORT_RE.findall(src)) == 1 and src.count("import ") == 1, (
        "web/eta_schedule.js no longer has exactly the one `import { app }` line this test stubs")
    stubbed = IMPORT_RE.sub("const app = { registerExtension() {} };", src)
    with tempfile.TemporaryDirectory(prefix="photoops-eta-js-") as d:
        (Path(d) / "eta_schedule.mjs").write_text(stubbed)
        (Path(d) / "driver.mjs").write_text(DRIVER)
        r = subprocess.run([node, str(Path(d) / "driver.mjs"), (Path(d) / "eta_schedule.mjs").as_uri()],
                           input=json.dumps(cases), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _py(fn, ts):
    return fn(torch.tensor(ts, dtype=torch.float64)).tolist()


def _compare(cases, py_fns):
    js = run_js(cases)
    assert len(js) == len(cases)
    worst = 0.0
    for (preset, eta, points, power, ts), fn, got in zip(cases, py_fns, js):
        want = _py(fn, ts)
        assert None not in got, (preset, eta, points, power)
        err = max(abs(a - b) for a, b in zip(got, want))
        worst = max(worst, err)
        assert err <= TOL, f"{preset} eta={eta} points={points!r} power={power}: max |JS - Python| = {err}"
        assert all(0.0 <= v <= 1.0 for v in got)
    print(f"{len(cases)} curves x {len(T_VALUES)} t: max |JS - Python| = {worst:.3g}")
    return worst


def _cases():
    cases = []
    for p in PRESET_NAMES:
        for q in POWERS:
            cases.append((p, 0.4, "", q, T_VALUES))
    for e in ETAS:
        cases.append(("constant", e, "", 1.0, T_VALUES))
    for text, _ in POINTS:
        cases.append(("custom", 0.4, text, 2.0, T_VALUES))       # power is ignored by custom curves
    return cases


def test_js_curve_matches_kernels():
    cases = _cases()
    fns = []
    for preset, eta, text, power, _ in cases:
        if preset == "constant":
            fns.append(keta.custom_points([(0.0, eta)]))
        elif preset == "custom":
            fns.append(keta.custom_points(dict(POINTS)[text]))
        else:
            f = keta.PRESETS[preset]
            fns.append(keta.eta_time_function(f.u1, f.y1, f.u2, f.y2, power))
    worst = _compare(cases, fns)
    assert math.isfinite(worst)
    # the curves are not all alike: the check compares something (paper_A at t=999 is 0.7, at t=0 is 0)
    js = run_js([("paper_A", 0.4, "", 1.0, [0.0, 999.0]), ("linear_default", 0.4, "", 1.0, [499.5])])
    assert js[0] == [0.0, pytest.approx(0.7, abs=1e-12)] and js[1] == [pytest.approx(0.2, abs=1e-12)]


def test_js_curve_matches_the_node_build_schedule():
    _node()
    from comfy_harness import comfyenv

    reason = comfyenv.comfyui_skip_reason()
    if reason:
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    comfyenv.ensure_comfy_importable()
    from photoops.nodes import eta_schedule as ninv

    assert set(ninv._PRESET_NAMES) == set(PRESET_NAMES) | {"constant", "custom"}
    cases = _cases()
    _compare(cases, [ninv.build_schedule(p, e, text, q) for p, e, text, q, _ in cases])
    # what neither side can draw: JS gives NaN ("invalid points"), the node refuses the input
    assert run_js([("custom", 0.4, "", 1.0, [0.0, 500.0]), ("custom", 0.4, "nonsense", 1.0, [0.0])]) == [
        [None, None], [None]]
    for text in ("", "nonsense"):
        with pytest.raises(ValueError):
            ninv.build_schedule("custom", 0.4, text, 1.0)
