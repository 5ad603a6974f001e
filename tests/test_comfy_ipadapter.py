"""pOps -> cubiq/ComfyUI_IPAdapter_plus ``IPAdapterEmbeds`` on SDXL in a real ComfyUI (issue 6).

Needs $COMFYUI_DIR and the third-party pack installed as
``$COMFYUI_DIR/custom_nodes/ComfyUI_IPAdapter_plus`` (never vendored here); otherwise every test
but the first (file checks only) skips with the reason.  The server is the harness' usual one plus that pack (opt-in:
``third_party_nodes``) and a seeded tiny ip-adapter_sdxl-layout file in models/ipadapter
(``comfy_harness/ipadapter_fixtures.py``).

* the pack imports and registers IPAdapterModelLoader / IPAdapterEmbeds; the widget values of
  the shipped IP-Adapter workflow (the paper's settings) fit the pack's current signatures;
* the shipped workflows needing the pack (the rule of ``comfy_harness/third_party.py``, which
  makes the core-only tests skip them) are exactly this file in ``workflows/``, with a Note
  saying it needs the pack;
* ``workflows/pops_ipadapter_sdxl.json``, shrunk by the override table (tiny SDXL parts, 64 px,
  5 steps), runs over HTTP and writes a 64x64 PNG; with
  IPAdapterEmbeds' weight at 0 the image equals the same graph without the adapter, at weight 1
  it differs, and another pOps embedding (Operator Apply with input A dropped) gives another
  image: the embedding reaches the UNet through the pack's attention patch;
* (it loads in both frontends in tests/test_browser.py, whose servers also load the pack)
"""
import copy
import io
import json
import re
import sys
import time
from pathlib import Path

import pytest

_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

from comfy_harness import comfyenv, third_party
from comfy_harness import pytest_fixtures as _fx
from comfy_harness.convert import ui_to_api
from comfy_harness.ipadapter_fixtures import PACK_NAME, cached_ipadapter_fixtures, pack_skip_reason
from comfy_harness.overrides import apply_overrides
from comfy_harness.server import ComfyServer, output_images

ROOT = Path(__file__).resolve().parents[1]
WF = ROOT / "workflows" / "pops_ipadapter_sdxl.json"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def ipa_server(request):
    reason = comfyenv.comfyui_skip_reason() or pack_skip_reason(comfyenv.comfyui_dir())
    if reason:
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    from comfy_harness.fixtures import cached_sd15_checkpoint

    t0 = time.perf_counter()
    extra = cached_ipadapter_fixtures()
    t_fix = time.perf_counter() - t0
    srv = ComfyServer(comfyenv.comfyui_dir(), checkpoint=cached_sd15_checkpoint(), third_party_nodes=[PACK_NAME],
                      extra_models=extra)
    failed_before = request.session.testsfailed
    srv.start()
    srv.timings["ipadapter fixture"] = t_fix
    srv.timings["server start"] = srv.startup_seconds
    try:
        yield srv
    finally:
        if request.session.testsfailed > failed_before:
            srv.keep = True
            _fx.report(request, f"[test_comfy_ipadapter] a test failed\n{srv.log_tail(80)}\nkept {srv.root}")
        srv.stop()
        _fx.report(request, "[test_comfy_ipadapter] timings: " + ", ".join(
            f"{k} {v:.1f} s" for k, v in srv.timings.items() if v is not None))


def _run_image(srv, prompt, label):
    import numpy as np
    from PIL import Image

    t0 = time.perf_counter()
    entry = srv.run_prompt(prompt, timeout=240)
    srv.timings[label] = time.perf_counter() - t0
    imgs = output_images(entry)
    assert len(imgs) == 1, entry.get("outputs")
    data = srv.view(imgs[0][1])
    assert data[:8] == PNG_MAGIC
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _node(prompt, cls):
    (nid,) = [k for k, v in prompt.items() if v["class_type"] == cls]
    return nid


def test_the_pack_workflows_are_this_pair_with_a_note():
    for path in (WF,):
        notes = [n for n in json.loads(path.read_text())["nodes"] if n["type"] in ("Note", "MarkdownNote")]
        assert any(PACK_NAME in n["widgets_values"][0] and "cubiq" in n["widgets_values"][0] for n in notes), (
            f"{path.name}: no Note naming {PACK_NAME} (cubiq)")
        # on the canvas without covering a node: boxes include LiteGraph's 30 px title bar above pos
        nodes = json.loads(path.read_text())["nodes"]

        def box(n):
            (x, y), (w, h) = n["pos"], n["size"]
            return x, y - 30, x + w, y + h

        for note in notes:
            nx0, ny0, nx1, ny1 = box(note)
            for other in nodes:
                if other is note or other["id"] == note["id"]:
                    continue
                ox0, oy0, ox1, oy1 = box(other)
                assert nx1 <= ox0 or ox1 <= nx0 or ny1 <= oy0 or oy1 <= ny0, (
                    f"{path.name}: the Note overlaps node {other['id']} {other['type']}")
    # which workflows need the pack is read from the pack's own source (third_party.pack_node_types)
    reason = comfyenv.comfyui_skip_reason() or pack_skip_reason(comfyenv.comfyui_dir())
    if reason:
        print(f"SKIP: the routing check needs the pack's source: {reason}")
        pytest.skip(f"the Note is checked; the routing check needs the pack's source: {reason}")
    shipped = sorted((ROOT / "workflows").glob("*.json"))
    assert third_party.needing(PACK_NAME, shipped) == [WF]
    assert WF not in set(third_party.core_only(shipped))


def test_pack_loads_and_workflow_widgets_fit_its_signatures(ipa_server):
    log = ipa_server.log_text()
    # a path component naming IPAdapter_plus or our pack (ComfyUI's own path may contain "photoops")
    ours_re = re.compile(r"custom_nodes[/\\](" + re.escape(PACK_NAME) + r"|photoops|photoops_test_stubs)(?![\w-])")
    bad = [ln for ln in log.splitlines() if ("Cannot import" in ln or "IMPORT FAILED" in ln) and ours_re.search(ln)]
    assert not bad, "\n".join(bad) + "\n" + ipa_server.log_tail(60)
    info = ipa_server.object_info()
    for cls in ("IPAdapterModelLoader", "IPAdapterEmbeds"):
        assert cls in info and info[cls]["python_module"].endswith(PACK_NAME), (cls, info.get(cls))
    assert "photoops_tiny_ip-adapter_sdxl.safetensors" in info["IPAdapterModelLoader"]["input"]["required"][
        "ipadapter_file"][0]
    for path in (WF,):
        prompt = apply_overrides(ui_to_api(json.loads(path.read_text()), info))  # strict: widget counts match
        for node in prompt.values():
            if node["class_type"] not in ("IPAdapterEmbeds",):
                continue
            spec = info[node["class_type"]]["input"]
            for name, value in node["inputs"].items():
                if isinstance(value, list):  # a link
                    continue
                kind = (spec.get("required", {}).get(name) or spec.get("optional", {}).get(name))
                assert kind is not None, f"{path.name}: {name} is not an input of IPAdapterEmbeds"
                if isinstance(kind[0], list):
                    assert value in kind[0], f"{path.name}: {name}={value!r} not in {kind[0]}"
                else:
                    opts = kind[1] if len(kind) > 1 else {}
                    assert opts.get("min", value) <= value <= opts.get("max", value), (path.name, name, value, opts)
            assert node["inputs"]["weight_type"] == "linear" and node["inputs"]["embeds_scaling"] == "V only"
            assert isinstance(node["inputs"]["pos_embed"], list) and isinstance(node["inputs"]["neg_embed"], list)


def test_pops_ipadapter_workflow_runs_and_the_adapter_changes_the_image(ipa_server):
    import numpy as np

    srv = ipa_server
    prompt = apply_overrides(ui_to_api(json.loads(WF.read_text()), srv.object_info()))
    ipe, ks = _node(prompt, "IPAdapterEmbeds"), _node(prompt, "KSampler")
    unet = _node(prompt, "PhotoOpsTest_SDXLCheckpointParts")
    assert prompt[ks]["inputs"]["model"] == [ipe, 0]
    with_ipa = _run_image(srv, prompt, "run pops_ipadapter_sdxl.json")
    assert with_ipa.shape == (64, 64, 3)

    p0 = copy.deepcopy(prompt)
    p0[ipe]["inputs"]["weight"] = 0.0
    weight0 = _run_image(srv, p0, "run weight 0")
    p_none = copy.deepcopy(prompt)
    p_none[ks]["inputs"]["model"] = [unet, 0]
    del p_none[ipe]
    p_none = {k: v for k, v in p_none.items() if v["class_type"] != "IPAdapterModelLoader"}
    without = _run_image(srv, p_none, "run without adapter")

    # Operator Apply with input A dropped: another pOps embedding, so another image (only through the
    # adapter: the text prompts are the same).  A new operator seed is not enough here: the tiny
    # random prior's result barely depends on its sampling noise.
    app = _node(prompt, "PhotoOps_OperatorApply")
    p_drop = copy.deepcopy(prompt)
    p_drop[app]["inputs"]["drop_a"] = True
    other = _run_image(srv, p_drop, "run input A dropped")

    assert np.array_equal(weight0, without), np.abs(weight0.astype(int) - without).max()
    diff = np.abs(with_ipa.astype(int) - without.astype(int))
    diff_emb = np.abs(with_ipa.astype(int) - other.astype(int))
    print(f"adapter on vs off: max {diff.max()}, mean {diff.mean():.3f}, changed {(diff > 0).mean():.3f}; "
          f"A dropped vs not: max {diff_emb.max()}, mean {diff_emb.mean():.3f}, "
          f"changed {(diff_emb > 0).mean():.3f}")
    # tiny random weights, 2 of the UNet's 7 cross-attention layers patched: a small but broad change
    assert diff.max() > 0 and (diff > 0).mean() > 0.05, (diff.max(), (diff > 0).mean())
    assert diff_emb.max() > 0 and (diff_emb > 0).mean() > 0.01, (diff_emb.max(), (diff_emb > 0).mean())
