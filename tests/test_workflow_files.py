"""The shipped workflows are the user's version; the override table shrinks them for CI (issue 15).

No ComfyUI needed.  For every ``workflows/*.json``:

* no widget names a test fixture (``photoops_tiny_*``), and every model a loader names is one the
  override table maps to a fixture (so CI can run the file) and carries the frontend's download
  metadata (``properties.models``: name = the widget's file, an https Hugging Face url, directory);
* paper scale: schedulers / samplers >= 20 steps, empty latents >= 512 px (1024 on SDXL), photos
  resized to 512;
* each LoadImage names a real photo shipped in ``workflows/`` (>= 256 px a side) whose source and
  licence the README names;
* a MarkdownNote names every model file of the graph; every node lies inside one group, no two
  nodes overlap as stored (title bar included), groups do not overlap;
* ``tools/make_workflows.py`` regenerates the files byte for byte.

The table's rules themselves are checked on a small API prompt: steps and skip scale together, sizes
drop to 64, file names map, the SDXL checkpoint becomes the test stub, and the input is not changed.
"""
import copy
import importlib.util
import json
import sys
from pathlib import Path

import pytest

_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

from comfy_harness import overrides

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
#: loader -> the widgets that name model files
MODEL_INPUTS = {"CheckpointLoaderSimple": (0,), "CLIPVisionLoader": (0,), "IPAdapterModelLoader": (0,),
                "PhotoOps_PopsOperatorLoader": (0,), "UNETLoader": (0,), "VAELoader": (0,), "LoraLoader": (0,),
                "CLIPLoader": (0,), "DualCLIPLoader": (0, 1), "TripleCLIPLoader": (0, 1, 2)}
MODEL_DIRS = ("checkpoints", "clip_vision", "ipadapter", "pops", "text_encoders", "diffusion_models", "vae")
#: models whose native size is 1024 (SDXL, SD3.5, Flux); SD1.5 512
LARGE_MODELS = {"sd_xl_base_1.0.safetensors", "sd3.5_medium.safetensors", "flux1-dev.safetensors"}
TITLE_H = 30


def _make_workflows():
    spec = importlib.util.spec_from_file_location("make_workflows", ROOT / "tools" / "make_workflows.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _ids(p):
    return p.name


@pytest.mark.parametrize("path", WORKFLOWS, ids=_ids)
def test_models_are_real_files_with_download_metadata(path):
    wf = json.loads(path.read_text())
    for n in wf["nodes"]:
        for v in n.get("widgets_values") or []:
            assert not (isinstance(v, str) and overrides.FIXTURE_PREFIX in v), (
                f"{path.name}: node {n['id']} {n['type']} names the test fixture {v!r}")
        if n["type"] not in MODEL_INPUTS:
            continue
        models = n.get("properties", {}).get("models") or []
        for i in MODEL_INPUTS[n["type"]]:
            file = n["widgets_values"][i]
            assert file in overrides.USER_FILES, (
                f"{path.name}: {n['type']} names {file!r}, which the override table does not map to a fixture")
            assert file in [m.get("name") for m in models], (
                f"{path.name}: node {n['id']} has no download entry for {file}")
        for m in models:
            assert set(m) >= {"name", "url", "directory"}, m
            assert m["url"].startswith("https://huggingface.co/") and m["url"].rsplit("/", 1)[-1], m
            assert m["directory"] in MODEL_DIRS, m


@pytest.mark.parametrize("path", WORKFLOWS, ids=_ids)
def test_paper_scale_steps_and_sizes(path):
    wf = json.loads(path.read_text())
    large = any(m["name"] in LARGE_MODELS for n in wf["nodes"] for m in n.get("properties", {}).get("models") or [])
    for n in wf["nodes"]:
        wv = n.get("widgets_values") or []
        if n["type"] == "BasicScheduler":
            assert wv[1] >= 20, (path.name, n["id"], wv)
        if n["type"] == "KSampler":
            assert wv[2] >= 20, (path.name, n["id"], wv)
        if n["type"] == "EmptyLatentImage":
            assert min(wv[:2]) >= (1024 if large else 512), (path.name, n["id"], wv)
        if n["type"] == "ImageScale":
            assert wv[1] == wv[2] == (1024 if large else 512), (path.name, n["id"], wv)
        if n["type"] == "PhotoOps_FlowEditSampler":
            assert wv[0] >= 20, (path.name, n["id"], wv)
        if n["type"] == "PhotoOps_ConceptLearn":
            assert wv[2] >= 400 and wv[7] == 512, wv
        if n["type"] == "PhotoOps_InstructionLearn":
            assert wv[2] >= 1000, wv


@pytest.mark.parametrize("path", WORKFLOWS, ids=_ids)
def test_photos_are_real_and_credited(path):
    from PIL import Image

    readme = (ROOT / "README.md").read_text()
    wf = json.loads(path.read_text())
    photos = [n["widgets_values"][0] for n in wf["nodes"] if n["type"] == "LoadImage"]
    for name in photos:
        p = ROOT / "workflows" / name
        assert p.is_file(), f"{path.name}: {name} is not in workflows/"
        with Image.open(p) as im:
            assert min(im.size) >= 256, (name, im.size)
        if not name.startswith("instructbrush_"):
            assert f"`{name}`" in readme, f"the README does not name the source and licence of {name}"


@pytest.mark.parametrize("path", WORKFLOWS, ids=_ids)
def test_note_groups_and_no_overlap_as_stored(path):
    wf = json.loads(path.read_text())
    nodes = wf["nodes"]
    notes = [n for n in nodes if n["type"] == "MarkdownNote"]
    assert notes, f"{path.name}: no MarkdownNote"
    text = "\n".join(n["widgets_values"][0] for n in notes)
    for n in nodes:
        for m in n.get("properties", {}).get("models") or []:
            assert m["name"] in text, f"{path.name}: the note does not name {m['name']}"

    def box(n):
        (x, y), (w, h) = n["pos"], n["size"]
        return x, y - TITLE_H, x + w, y + h

    def overlap(a, b):
        return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]

    boxes = [(n["id"], box(n)) for n in nodes]
    for i, (ia, a) in enumerate(boxes):
        for ib, b in boxes[i + 1:]:
            assert not overlap(a, b), f"{path.name}: nodes {ia} and {ib} overlap as stored"
    groups = [g["bounding"] for g in wf["groups"]]
    assert len(groups) >= 2, f"{path.name}: stages are not grouped"
    gboxes = [(x, y, x + w, y + h) for x, y, w, h in groups]
    for i, a in enumerate(gboxes):
        for b in gboxes[i + 1:]:
            assert not overlap(a, b), f"{path.name}: groups overlap"
    for nid, (x0, y0, x1, y1) in boxes:
        if any(n["id"] == nid and n["type"] == "MarkdownNote" for n in nodes):
            continue
        inside = [g for g in gboxes if g[0] <= x0 and g[1] <= y0 and x1 <= g[2] and y1 <= g[3]]
        assert len(inside) == 1, f"{path.name}: node {nid} is in {len(inside)} groups"


def test_generator_reproduces_the_files(tmp_path):
    mod = _make_workflows()
    assert sorted(mod.WORKFLOWS) == [p.name for p in WORKFLOWS]
    for name, build in mod.WORKFLOWS.items():
        assert json.dumps(build(), indent=1) + "\n" == (ROOT / "workflows" / name).read_text(), name


def test_override_table_rules():
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "v1-5-pruned-emaonly-fp16.safetensors"}},
        "2": {"class_type": "BasicScheduler", "inputs": {"model": ["1", 0], "scheduler": "ddim_uniform",
                                                         "steps": 100, "denoise": 1.0}},
        "3": {"class_type": "PhotoOps_Invert", "inputs": {"sigmas": ["2", 0], "skip": 36, "method": "ddpm"}},
        "4": {"class_type": "ImageScale", "inputs": {"width": 512, "height": 512, "crop": "center"}},
        "5": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd_xl_base_1.0.safetensors"}},
        "6": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": "clip_vision_g.safetensors"}},
        "7": {"class_type": "KSampler", "inputs": {"steps": 25, "cfg": 7.0}},
        "8": {"class_type": "PhotoOps_PopsOperatorLoader",
              "inputs": {"operator_file": "scene/learned_prior.pth", "statistics": "kandinsky-2-2-prior.safetensors"}},
        "9": {"class_type": "BasicScheduler", "inputs": {"steps": 35}},
        "10": {"class_type": "PhotoOps_Invert", "inputs": {"sigmas": ["9", 0], "skip": 5}},
        # Flux FlowEdit (issue 19): n_max / n_min scale with the scheduler of the SamplerCustomAdvanced
        "11": {"class_type": "BasicScheduler", "inputs": {"steps": 28}},
        "12": {"class_type": "PhotoOps_FlowEditSampler", "inputs": {"n_max": 24, "n_min": 7, "n_avg": 1}},
        "13": {"class_type": "SamplerCustomAdvanced", "inputs": {"sampler": ["12", 0], "sigmas": ["11", 0]}},
        "14": {"class_type": "SamplerCustomAdvanced", "inputs": {"sampler": ["12", 0], "sigmas": ["11", 0]}},
        "15": {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": "clip_l.safetensors",
                                                          "clip_name2": "t5xxl_fp16.safetensors", "type": "flux"}},
        "16": {"class_type": "TripleCLIPLoader", "inputs": {"clip_name1": "clip_l.safetensors",
                                                            "clip_name2": "clip_g.safetensors",
                                                            "clip_name3": "t5xxl_fp16.safetensors"}},
        "17": {"class_type": "UNETLoader", "inputs": {"unet_name": "flux1-dev.safetensors", "weight_dtype": "default"}},
        "18": {"class_type": "VAELoader", "inputs": {"vae_name": "ae.safetensors"}},
        "19": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd3.5_medium.safetensors"}},
    }
    before = copy.deepcopy(prompt)
    out = overrides.apply_overrides(prompt)
    assert prompt == before, "apply_overrides changed its input"
    assert out["1"]["inputs"]["ckpt_name"] == "photoops_tiny_sd15.safetensors"
    assert out["2"]["inputs"]["steps"] == 10 and out["3"]["inputs"]["skip"] == 3
    assert out["9"]["inputs"]["steps"] == 4 and out["10"]["inputs"]["skip"] == 0
    assert out["4"]["inputs"] == {"width": 64, "height": 64, "crop": "center"}
    assert out["5"]["class_type"] == "PhotoOpsTest_SDXLCheckpointParts"
    assert out["5"]["inputs"]["unet_name"].startswith(overrides.FIXTURE_PREFIX)
    assert out["6"] == {"class_type": "PhotoOpsTest_CLIPVisionLoaderAny",
                        "inputs": {"clip_name": "photoops_tiny_clip_vision_g.safetensors"}}
    assert out["7"]["inputs"] == {"steps": 3, "cfg": 7.0}
    assert overrides.apply_overrides({"1": {"class_type": "KSampler", "inputs": {"steps": 3}}})["1"]["inputs"] == {
        "steps": 3}, "a CI-sized step count must stay"
    assert out["8"]["inputs"] == {"operator_file": "photoops_tiny_scene.safetensors",
                                  "statistics": overrides.IN_FILE}
    assert out["11"]["inputs"]["steps"] == 4
    assert out["12"]["inputs"] == {"n_max": 3, "n_min": 1, "n_avg": 1}, "scaled once, not once per sampler node"
    assert out["15"]["class_type"] == out["16"]["class_type"] == "PhotoOpsTest_FlowTextEncoders"
    assert out["15"]["inputs"]["type"] == "flux" and out["15"]["inputs"]["clip_g"] == "none"
    assert out["16"]["inputs"]["type"] == "sd3" and out["16"]["inputs"]["clip_g"].startswith(overrides.FIXTURE_PREFIX)
    assert out["17"]["inputs"] == {"unet_name": "photoops_tiny_flux.safetensors", "weight_dtype": "default"}
    assert out["18"]["inputs"]["vae_name"] == "photoops_tiny_vae16.safetensors"
    assert out["19"]["inputs"]["ckpt_name"] == "photoops_tiny_sd35.safetensors"


def test_every_model_of_the_generator_is_in_the_table():
    mod = _make_workflows()
    names = {m["name"] for m in mod.ALL_MODELS}
    # the Kandinsky statistics file is the operator loader's second input, mapped too
    assert names <= overrides.USER_FILES | {mod.KANDINSKY_PRIOR["name"]}, names - overrides.USER_FILES
    assert mod.KANDINSKY_PRIOR["name"] in overrides.FILE_RENAMES[("PhotoOps_PopsOperatorLoader", "statistics")]
