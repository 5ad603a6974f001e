"""PhotoOps inside a real ComfyUI, over HTTP (issue 2, item 5c).

Needs $COMFYUI_DIR (a ComfyUI checkout whose requirements are installed, see
tools/install_comfyui_deps.sh); otherwise every test is skipped with the reason.

* /object_info lists every PhotoOps_ node the pack defines, each input with a tooltip,
  and the pack imported without errors;
* every workflows/*.json (and the core-only harness graphs in
  tests/comfy_harness/graphs/) is converted to API format with our converter, queued
  via POST /prompt, polled on /history until done, must finish without error, and
  each image its SaveImage/PreviewImage nodes declare is fetched via /view and is a
  valid PNG;
* a workflow naming a node type nobody defines fails loudly in the converter.
"""
import io
import json
import re
import sys
import time
from pathlib import Path

import pytest

_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:  # conftest normally does this; keep the module runnable alone
    sys.path.insert(0, _TESTS)

from comfy_harness import pytest_fixtures as _fx
from comfy_harness.convert import ConversionError, ui_to_api
from comfy_harness.overrides import apply_overrides

# Fixtures shared with other modules (pytest finds them as module attributes).
require_comfyui = _fx.require_comfyui
fixture_checkpoint = _fx.fixture_checkpoint
comfyui_server = _fx.comfyui_server
from comfy_harness.server import output_images

pytestmark = pytest.mark.usefixtures("require_comfyui")

ROOT = Path(__file__).resolve().parents[1]
HARNESS_GRAPHS = ROOT / "tests" / "comfy_harness" / "graphs"
PACK_PREFIX = "PhotoOps_"
IMAGE_OUTPUT_TYPES = {"SaveImage", "PreviewImage"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _workflow_files():
    shipped = sorted((ROOT / "workflows").glob("*.json"))
    harness = sorted(HARNESS_GRAPHS.glob("core_*.json"))
    return [pytest.param(p, id=f"{p.parent.name}/{p.name}") for p in shipped + harness]


def _declared_node_ids():
    """PhotoOps_ node ids written in the pack's source (node_id="PhotoOps_...")."""
    ids = set()
    for py in ROOT.rglob("*.py"):
        rel = py.relative_to(ROOT).parts
        if rel[0] in (".venv", "tests", "tools", "bench", ".cache") or rel[0].startswith("."):
            continue
        ids |= set(re.findall(r"node_id\s*=\s*[\"'](" + PACK_PREFIX + r"\w+)[\"']", py.read_text(errors="replace")))
    return ids


def test_object_info_lists_pack_nodes_with_tooltips(comfyui_server):
    srv = comfyui_server
    log = srv.log_text()
    # the pack's folder (and the test stubs) as a path component; ComfyUI's own path may contain "photoops"
    ours_re = re.compile(r"custom_nodes[/\\](photoops|photoops_test_stubs)(?![\w-])")
    bad = [ln for ln in log.splitlines() if ("Cannot import" in ln or "IMPORT FAILED" in ln) and ours_re.search(ln)]
    assert not bad, "the pack failed to import:\n" + "\n".join(bad) + "\n" + srv.log_tail(60)

    info = srv.object_info()
    ours = {k: v for k, v in info.items() if v.get("python_module", "").split(".")[-1] == "photoops"}
    assert ours, f"no node of the pack in /object_info\n{srv.log_tail(60)}"
    assert "PhotoOps_AttentionMask" in ours
    assert all(k.startswith(PACK_PREFIX) for k in ours), sorted(ours)
    missing = _declared_node_ids() - set(ours)
    assert not missing, f"node ids in the pack's source but not registered: {sorted(missing)}"

    no_tip = []
    for node_id, node in sorted(ours.items()):
        for section in ("required", "optional"):
            for name, spec in ((node.get("input") or {}).get(section) or {}).items():
                has_opts = isinstance(spec, (list, tuple)) and len(spec) > 1 and isinstance(spec[1], dict)
                opts = spec[1] if has_opts else {}
                tip = opts.get("tooltip")
                if not (isinstance(tip, str) and tip.strip()):
                    no_tip.append(f"{node_id}.{name}")
    assert not no_tip, f"inputs without a tooltip: {no_tip}"


@pytest.mark.parametrize("wf_path", _workflow_files())
def test_workflow_runs_and_writes_pngs(comfyui_server, wf_path):
    from PIL import Image

    srv = comfyui_server
    wf = json.loads(wf_path.read_text())
    prompt = apply_overrides(ui_to_api(wf, srv.object_info()))
    assert prompt, "empty prompt"

    # the SD1.5 fixture, or another seeded fixture checkpoint the harness links in (IP2P, issue 8)
    available = sorted(p.name for p in srv.path("checkpoints").iterdir())
    for node in prompt.values():
        if node["class_type"] == "CheckpointLoaderSimple":
            assert node["inputs"]["ckpt_name"] in available, (
                f"{wf_path.name} names checkpoint {node['inputs']['ckpt_name']!r}; CI only has {available}")

    t0 = time.perf_counter()
    entry = srv.run_prompt(prompt, timeout=240)
    srv.timings[f"run {wf_path.name}"] = time.perf_counter() - t0

    declared = [nid for nid, n in prompt.items() if n["class_type"] in IMAGE_OUTPUT_TYPES]
    assert declared, f"{wf_path.name} has no SaveImage/PreviewImage node"
    got = {}
    for nid, img in output_images(entry):
        got.setdefault(nid, []).append(img)
    for nid in declared:
        assert got.get(nid), (
            f"node {nid} ({prompt[nid]['class_type']}) produced no image; outputs: {entry.get('outputs')}")
        for img in got[nid]:
            data = srv.view(img)
            assert data[:8] == PNG_MAGIC, f"{img} is not a PNG"
            im = Image.open(io.BytesIO(data))
            im.verify()
            im = Image.open(io.BytesIO(data))
            assert im.width > 0 and im.height > 0

    if wf_path.name == "attention_mask.json":
        # the mask preview: binary, image-sized, keeping the top 20 % (quantile 0.8) of the map
        import numpy as np

        mask_node = next(nid for nid, n in prompt.items() if n["_meta"].get("title") == "Mask")
        m = np.asarray(Image.open(io.BytesIO(srv.view(got[mask_node][0]))).convert("L"))
        assert m.shape == (64, 64)
        assert set(np.unique(m).tolist()) <= {0, 255}
        assert 0.1 <= (m == 255).mean() <= 0.35, (m == 255).mean()

    if wf_path.name == "core_frontend_features.json":
        # PrimitiveNode value used, bypassed x1.5 upscale skipped, muted preview dropped.
        assert prompt["3"]["inputs"]["steps"] == 3
        im = Image.open(io.BytesIO(srv.view(got["9"][0])))
        assert im.size == (64, 64)
        assert "15" not in prompt and "15" not in (entry.get("outputs") or {})


def test_unknown_node_type_fails_loudly_in_converter(comfyui_server):
    wf = json.loads((HARNESS_GRAPHS / "invalid_unknown_node.json").read_text())
    with pytest.raises(ConversionError, match=r"unknown node type.*PhotoOps_DoesNotExist_SelfTest"):
        ui_to_api(wf, comfyui_server.object_info())
