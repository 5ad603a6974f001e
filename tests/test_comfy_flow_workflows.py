"""The shipped SD3.5 and Flux workflows run in a real ComfyUI (issue 19 item 6).

Skipped (reason printed) without $COMFYUI_DIR.  One harness server (``comfy_harness/server.py``) with
the pack, the tiny flow fixtures of ``comfy_harness/flow_fixtures.py`` linked into its model folders
(SD3.5 checkpoint = tiny SD3 MMDiT + 16-channel VAE; tiny Flux-dev; the 16-channel VAE for
VAELoader; tiny CLIP-L / CLIP-G / T5) and the test-only text-encoder loader of
``comfy_harness/flow_stub_nodes`` (core's TripleCLIPLoader / DualCLIPLoader build T5-XXL at
full size).  Each file is converted with our converter, shrunk by the override table
(``overrides.apply_overrides``: fixtures, steps / 10, skip and FlowEdit's n_max scaled with
them, 64 px) and queued over HTTP; ``SaveLatent`` nodes are added on the photo's latent and on the
samplers' outputs so the checks read latents, not PNGs:

* ``sd35_inversion_edit.json``: its reconstruction branch (the source caption and source CFG replayed
  through the Inversion Sampler) returns the VAE Encode latent to < 1e-4 relative (flow noise-map
  inversion is exact by construction; measured ~1e-7); its edit branch (the target caption, CFG
  13.5) is another latent (> 1e-2);
* ``flux_flowedit.json`` as shipped moves the latent (> 1e-3); with the target caption and target
  guidance set to the source's, FlowEdit's velocity difference is 0 at every step (spec §2.4, R7)
  and the output is the photo's latent (< 1e-6: the latent format's scale and shift round trip);
* every SaveImage writes a PNG.
"""
import io
import json
import sys
import time
from pathlib import Path

import pytest

_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:  # conftest normally does this; keep the module runnable alone
    sys.path.insert(0, _TESTS)

from comfy_harness import pytest_fixtures as _fx
from comfy_harness.convert import ui_to_api
from comfy_harness.overrides import apply_overrides, needs_flow_fixtures
from comfy_harness.server import ComfyServer, output_images

require_comfyui = _fx.require_comfyui
fixture_checkpoint = _fx.fixture_checkpoint

pytestmark = pytest.mark.usefixtures("require_comfyui")

ROOT = Path(__file__).resolve().parents[1]
STUBS = "photoops_flow_test_stubs"
STUBS_SRC = ROOT / "tests" / "comfy_harness" / "flow_stub_nodes"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SD35, FLUX = ROOT / "workflows" / "sd35_inversion_edit.json", ROOT / "workflows" / "flux_flowedit.json"


class FlowServer(ComfyServer):
    """The harness server plus the custom-node folder with the text-encoder stub."""

    def _prepare(self) -> dict:
        env = super()._prepare()
        (self.root / "custom_nodes" / STUBS).symlink_to(STUBS_SRC, target_is_directory=True)
        self.custom_node_whitelist.append(STUBS)
        return env


@pytest.fixture(scope="module")
def flow_server(request, require_comfyui, fixture_checkpoint):
    from comfy_harness import comfyenv

    comfyenv.ensure_comfy_importable()          # the fixtures are built with ComfyUI's own classes
    from comfy_harness import flow_fixtures

    t0 = time.perf_counter()
    files = flow_fixtures.cached_workflow_fixtures()
    fixtures_s = time.perf_counter() - t0
    srv = FlowServer(require_comfyui, checkpoint=fixture_checkpoint, extra_models=files)
    failed_before = request.session.testsfailed
    srv.start()
    srv.timings["fixtures"] = fixtures_s
    srv.timings["server start"] = srv.startup_seconds
    try:
        yield srv
    finally:
        if request.session.testsfailed > failed_before:
            srv.keep = True
            _fx.report(request, f"[test_comfy_flow_workflows] a test failed; server {srv.url}\n{srv.log_tail(80)}\n"
                                f"server files kept in {srv.root}")
        srv.stop()
        _fx.report(request, "[test_comfy_flow_workflows] timings: " + ", ".join(
            f"{k} {v:.1f} s" for k, v in srv.timings.items() if v is not None))


def _prompt(srv, path):
    wf = json.loads(path.read_text())
    assert needs_flow_fixtures(wf), f"{path.name} is not routed here"
    return apply_overrides(ui_to_api(wf, srv.object_info()))


def _ids(prompt, cls, title=None):
    return [k for k, v in prompt.items() if v["class_type"] == cls and (title is None or v["_meta"]["title"] == title)]


def _save_latent(prompt, src, nid, prefix):
    prompt[nid] = {"class_type": "SaveLatent", "inputs": {"samples": [src, 0], "filename_prefix": f"latents/{prefix}"}}


def _run(srv, prompt, label):
    """Run; the latents of the added SaveLatent nodes ({node id: tensor}) and the PNGs checked."""
    import torch
    from PIL import Image
    from safetensors.torch import load_file

    t0 = time.perf_counter()
    entry = srv.run_prompt(prompt, timeout=300)
    srv.timings[label] = time.perf_counter() - t0
    images = dict(output_images(entry))
    for nid in _ids(prompt, "SaveImage"):
        data = srv.view(images[nid])
        assert data[:8] == PNG_MAGIC
        assert Image.open(io.BytesIO(data)).size == (64, 64)
    latents = {}
    for nid in _ids(prompt, "SaveLatent"):
        (item,) = entry["outputs"][nid]["latents"]
        t = load_file(str(srv.path("output") / item["subfolder"] / item["filename"]))["latent_tensor"]
        assert torch.isfinite(t).all(), (label, nid)
        latents[nid] = t.double()
    return latents


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def test_sd35_caption_swap_and_reconstruction(flow_server):
    srv = flow_server
    p = _prompt(srv, SD35)
    (ckpt,) = _ids(p, "CheckpointLoaderSimple")
    assert p[ckpt]["inputs"]["ckpt_name"] == "photoops_tiny_sd35.safetensors"
    (te,) = _ids(p, "PhotoOpsTest_FlowTextEncoders")
    assert p[te]["inputs"]["type"] == "sd3"
    (inv,) = _ids(p, "PhotoOps_Invert")
    (sched,) = _ids(p, "BasicScheduler")
    assert p[inv]["inputs"]["method"] == "flow_noise_maps"
    assert (p[sched]["inputs"]["steps"], p[inv]["inputs"]["skip"]) == (5, 1)     # 50 / skip 17 shrunk
    (enc,) = _ids(p, "VAEEncode")
    recon = next(k for k in _ids(p, "SamplerCustomAdvanced")
                 if p[p[k]["inputs"]["guider"][0]]["inputs"]["positive"] == p[inv]["inputs"]["positive"])
    (edit,) = [k for k in _ids(p, "SamplerCustomAdvanced") if k != recon]
    assert p[p[recon]["inputs"]["guider"][0]]["inputs"]["cfg"] == p[inv]["inputs"]["source_cfg"] == 3.5
    assert p[p[edit]["inputs"]["guider"][0]]["inputs"]["cfg"] == 13.5
    _save_latent(p, enc, "900", "sd35_photo")
    _save_latent(p, recon, "901", "sd35_recon")
    _save_latent(p, edit, "902", "sd35_edit")
    lat = _run(srv, p, "run sd35_inversion_edit")
    assert lat["900"].shape == (1, 16, 8, 8)
    e_rec, e_edit = _rel(lat["901"], lat["900"]), _rel(lat["902"], lat["900"])
    print(f"sd35_inversion_edit: reconstruction {e_rec:.2e}, caption swap {e_edit:.2e} (relative to the photo latent)")
    assert e_rec < 1e-4, e_rec
    assert e_edit > 1e-2, e_edit


def test_flux_flowedit_moves_the_photo_and_is_identity_for_equal_prompts(flow_server):
    srv = flow_server
    p = _prompt(srv, FLUX)
    (te,) = _ids(p, "PhotoOpsTest_FlowTextEncoders")
    assert p[te]["inputs"]["type"] == "flux"
    (unet,) = _ids(p, "UNETLoader")
    assert p[unet]["inputs"]["unet_name"] == "photoops_tiny_flux.safetensors"
    (fes,) = _ids(p, "PhotoOps_FlowEditSampler")
    (sched,) = _ids(p, "BasicScheduler")
    assert (p[sched]["inputs"]["steps"], p[fes]["inputs"]["n_max"]) == (4, 3)     # 28 / n_max 24 shrunk
    (guider,) = _ids(p, "PhotoOps_FlowEditGuider")
    g = p[guider]["inputs"]
    gsrc, gtgt = p[g["source_positive"][0]], p[g["target_positive"][0]]
    assert (gsrc["class_type"], gsrc["inputs"]["guidance"], gtgt["inputs"]["guidance"]) == ("FluxGuidance", 1.5, 5.5)
    assert g["source_cfg"] == g["target_cfg"] == 1.0
    (enc,) = _ids(p, "VAEEncode")
    (sca,) = _ids(p, "SamplerCustomAdvanced")
    _save_latent(p, enc, "900", "flux_photo")
    _save_latent(p, sca, "901", "flux_edit")
    lat = _run(srv, p, "run flux_flowedit")
    e_edit = _rel(lat["901"], lat["900"])

    src_text = p[gsrc["inputs"]["conditioning"][0]]["inputs"]["text"]
    p[gtgt["inputs"]["conditioning"][0]]["inputs"]["text"] = src_text
    gtgt["inputs"]["guidance"] = gsrc["inputs"]["guidance"]
    for nid in ("900", "901"):
        p[nid]["inputs"]["filename_prefix"] += "_same"
    same = _run(srv, p, "run flux_flowedit, target = source")
    assert (same["900"] == lat["900"]).all(), "the photo latent is deterministic"
    e_same = _rel(same["901"], same["900"])
    print(f"flux_flowedit: edit {e_edit:.2e}, target = source {e_same:.2e} (relative to the photo latent)")
    assert e_same < 1e-6, e_same
    assert e_edit > 1e-3, e_edit
