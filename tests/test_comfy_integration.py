"""PhotoOps inside a real ComfyUI, over HTTP (issue 2, item 5c).

Needs $COMFYUI_DIR (a ComfyUI checkout whose requirements are installed, see
tools/install_comfyui_deps.sh); otherwise every test is skipped with the reason.

* /object_info lists every PhotoOps_ node the pack defines, each input with a tooltip,
  and the pack imported without errors;
* every workflows/*.json (and the core-only harness graphs in
  tests/comfy_harness/graphs/) is converted to API format with our converter, queued
  via POST /prompt, polled on /history until done, must finish without error, and
  each image its SaveImage/PreviewImage nodes declare is fetched via /view and is a
  valid PNG; files needing a third-party pack (comfy_harness/third_party.py) are left
  to tests/test_comfy_ipadapter.py, the SD3.5 / Flux files (``overrides.needs_flow_fixtures``) to
  tests/test_comfy_flow_workflows.py (its server has their fixtures and text-encoder stub);
* GET /workflow_templates (the template browser's list) names every shipped
  workflows/*.json under the pack's folder "photoops", and each is served unchanged;
* inversion_reconstruct.json reconstructs its input: its output equals the VAE decode of
  the encoded photo (added to the run as an extra branch) within one 8-bit level, while
  the same replay at CFG 7.5 does not;
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
from comfy_harness import third_party
from comfy_harness.convert import ConversionError, ui_to_api
from comfy_harness.overrides import apply_overrides, needs_flow_fixtures

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
    # files needing a third-party pack (tests/comfy_harness/third_party.py) run in test_comfy_ipadapter.py
    shipped = third_party.core_only(sorted((ROOT / "workflows").glob("*.json")))
    # SD3.5 / Flux files run in tests/test_comfy_flow_workflows.py (flow fixtures + text-encoder stub)
    shipped = [p for p in shipped if not needs_flow_fixtures(json.loads(p.read_text()))]
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

    if wf_path.name == "inversion_eta_edit.json":
        # the saved inversion holds the Eta Schedule's maps exactly: per step i, mask * eta_i with
        # eta_i = paper_A at the step's starting timestep (kernels/eta.py per_step_eta, float32), so
        # every value is 0 or eta_i; paper_A is 0 below u = 0.6, so the first steps are non-zero
        # (ddim_uniform's first timestep is above 600 for any step count) and the late ones all 0.
        import torch
        from photoops.kernels import eta as keta
        from photoops.kernels.inversion_state import load_inversion
        from photoops.kernels.schedule import VPSchedule

        save_inv = next(nid for nid, n in prompt.items() if n["class_type"] == "PhotoOps_SaveInversion")
        (name,) = entry["outputs"][save_inv]["text"]
        inv = load_inversion(srv.path("output") / "photoops_inversions" / name)
        # the scheduler's steps after the override table; the last one (to sigma 0) is not stored
        # (info final_zero_dropped)
        steps = next(n["inputs"]["steps"] for n in prompt.values() if n["class_type"] == "BasicScheduler")
        assert inv.method == "eta" and inv.steps in (steps - 1, steps) and inv.eta is not None
        want = keta.per_step_eta(keta.PRESETS["paper_A"], inv.sigmas, VPSchedule.scaled_linear())
        assert want[0] > 0 and want[-1] == 0, want
        maps = inv.eta.reshape(inv.steps, -1)
        for i in range(inv.steps):
            vals = set(torch.unique(maps[i]).tolist())
            assert vals <= {0.0, float(want[i])}, (i, vals, float(want[i]))
        inside = (maps[0] > 0).float().mean().item()
        print(f"inversion_eta_edit: eta region {inside:.3f} of the latent, eta_0 {float(want[0]):.4f}")
        # (with the random-weight fixture the source word's region covers the whole 8x8 latent)
        assert inside > 0, "eta is 0 everywhere at the first step: the region is empty"

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


PACK_FOLDER = "photoops"  # the pack's custom_nodes folder name in the test server (server.PACK_LINK_NAME)


def test_template_browser_lists_every_shipped_workflow(comfyui_server):
    """ComfyUI's GET /workflow_templates maps each custom_nodes folder to the stems of its
    ``<folder>/{example_workflows,example,examples,workflow,workflows}/*.json`` (one level only);
    the frontend opens one via /api/workflow_templates/<module>/<stem>.json."""
    from comfy_harness.server import PACK_LINK_NAME

    assert PACK_LINK_NAME == PACK_FOLDER
    # rglob: a workflow in a subfolder of workflows/ is not listed, so it must fail here
    shipped = sorted((ROOT / "workflows").rglob("*.json"), key=lambda p: p.stem)
    assert shipped
    listed = comfyui_server.get_json("/workflow_templates")
    assert PACK_FOLDER in listed, f"/workflow_templates has no {PACK_FOLDER!r} entry: {sorted(listed)}"
    assert sorted(listed[PACK_FOLDER]) == [p.stem for p in shipped], listed[PACK_FOLDER]
    for p in shipped:
        status, body, _ = comfyui_server.request("GET", f"/api/workflow_templates/{PACK_FOLDER}/{p.name}")
        assert status == 200, (p.name, status, body[:200])
        assert json.loads(body) == json.loads(p.read_text()), f"{p.name} served differently"


def _node_id(prompt, cls):
    (nid,) = [k for k, v in prompt.items() if v["class_type"] == cls]
    return nid


def test_inversion_reconstruct_output_equals_the_decoded_input(comfyui_server):
    """Edit-friendly DDPM inversion replayed with the same prompt, the same CFG and the same SIGMAS gives
    back the encoded latent up to float32 rounding, so the workflow's PNG must equal the VAE decode of
    the VAE Encode output (added to the same run as an extra branch) up to a flip of the last 8-bit
    level where a value sits at a rounding boundary: at most 1 level anywhere, on < 1 % of the values.
    A negative control (replay at CFG 7.5: another image) shows the check can fail."""
    import copy

    import numpy as np
    from PIL import Image

    srv = comfyui_server
    wf = json.loads((ROOT / "workflows" / "inversion_reconstruct.json").read_text())
    prompt = apply_overrides(ui_to_api(wf, srv.object_info()))
    enc, dec, save = _node_id(prompt, "VAEEncode"), _node_id(prompt, "VAEDecode"), _node_id(prompt, "SaveImage")
    guider = _node_id(prompt, "CFGGuider")
    inv = _node_id(prompt, "PhotoOps_Invert")
    # the replay uses the inversion's prompt and CFG (the user's file: 3.5 both)
    assert prompt[guider]["inputs"]["cfg"] == prompt[inv]["inputs"]["source_cfg"] > 1
    assert prompt[guider]["inputs"]["positive"] == prompt[inv]["inputs"]["positive"]
    vae = prompt[dec]["inputs"]["vae"]
    prompt["900"] = {"class_type": "VAEDecode", "inputs": {"samples": [enc, 0], "vae": vae}}
    prompt["901"] = {"class_type": "SaveImage", "inputs": {"images": ["900", 0],
                                                           "filename_prefix": "photoops_reference"}}

    def run(p):
        imgs = dict(output_images(srv.run_prompt(p, timeout=240)))
        return {nid: np.asarray(Image.open(io.BytesIO(srv.view(imgs[nid]))).convert("RGB")).astype(int)
                for nid in (save, "901")}

    got = run(prompt)
    out, ref = got[save], got["901"]
    assert out.shape == ref.shape == (64, 64, 3)
    diff = np.abs(out - ref)
    p5 = copy.deepcopy(prompt)
    p5[guider]["inputs"]["cfg"] = 7.5
    got5 = run(p5)
    assert np.array_equal(got5["901"], ref)                      # the reference branch is deterministic
    diff5 = np.abs(got5[save] - ref)
    print(f"inversion_reconstruct vs decoded input: max {diff.max()}, mean {diff.mean():.4f}, "
          f"differing {(diff > 0).mean():.4f}; at CFG 7.5: max {diff5.max()}, mean {diff5.mean():.3f}")
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())
    assert diff5.max() > 1, "the CFG-7.5 control matches too: the check cannot tell a reconstruction"
