"""The override table: how CI shrinks a shipped workflow before it runs it.

A file in ``workflows/`` is what a user opens: real model files, the papers' steps and sizes.
CI runs the same file on tiny random fixtures, a few steps, 64 px.  Everything that differs is
listed here and applied to the API-format prompt after conversion; the JSON on disk is never
changed (``tests/test_workflow_overrides.py`` checks that no shipped file names a fixture and that
every model a shipped loader names has a row below).

**Model files** (input value -> fixture file):

| node | input | user's file | CI fixture |
|---|---|---|---|
| CheckpointLoaderSimple | ckpt_name | ``v1-5-pruned-emaonly-fp16.safetensors`` | ``photoops_tiny_sd15.safetensors`` |
| CheckpointLoaderSimple | ckpt_name | ``instruct-pix2pix-00-22000.safetensors`` | ``photoops_tiny_sd15_ip2p.safetensors`` |
| CheckpointLoaderSimple | ckpt_name | ``sd_xl_base_1.0.safetensors`` | class -> ``PhotoOpsTest_SDXLCheckpointParts`` (tiny SDXL UNet + tiny SDXL CLIP + tiny VAE; no single-file tiny SDXL checkpoint exists) |
| CLIPVisionLoader | clip_name | ``clip_vision_g.safetensors`` | ``photoops_tiny_clip_vision_g.safetensors``, class -> ``PhotoOpsTest_CLIPVisionLoaderAny`` (core reads only full-size towers) |
| PhotoOps_PopsOperatorLoader | operator_file | ``texturing/learned_prior.pth`` / ``scene/learned_prior.pth`` | ``photoops_tiny_texturing.safetensors`` / ``photoops_tiny_scene.safetensors`` |
| PhotoOps_PopsOperatorLoader | statistics | ``kandinsky-2-2-prior.safetensors`` | ``(in the operator file)`` (the fixtures carry their statistics) |
| IPAdapterModelLoader | ipadapter_file | ``ip-adapter_sdxl.safetensors`` | ``photoops_tiny_ip-adapter_sdxl.safetensors`` |
| CheckpointLoaderSimple | ckpt_name | ``sd3.5_medium.safetensors`` | ``photoops_tiny_sd35.safetensors`` (tiny SD3 MMDiT + 16-channel VAE, ``comfy_harness/flow_fixtures.py``) |
| UNETLoader | unet_name | ``flux1-dev.safetensors`` | ``photoops_tiny_flux.safetensors`` |
| VAELoader | vae_name | ``ae.safetensors`` | ``photoops_tiny_vae16.safetensors`` |
| TripleCLIPLoader | clip_name3 | ``t5xxl_fp16.safetensors`` (with ``clip_l`` / ``clip_g``) | class -> ``PhotoOpsTest_FlowTextEncoders`` type sd3: ``photoops_tiny_clip_l`` / ``_clip_g`` / ``_t5xxl`` (core builds T5-XXL at full size; ``comfy_harness/flow_stub_nodes``) |
| DualCLIPLoader | clip_name2 | ``t5xxl_fp16.safetensors`` (with ``clip_l``) | class -> ``PhotoOpsTest_FlowTextEncoders`` type flux: ``photoops_tiny_clip_l`` / ``_t5xxl`` |

The SD3.5 / Flux rows need fixtures and a text-encoder stub that only the server of
``tests/test_comfy_flow_workflows.py`` has; :func:`needs_flow_fixtures` routes those workflows there.

**Steps and sizes** (the fixtures are random: CI checks wiring and exactness, not looks):

| node | input | rule |
|---|---|---|
| BasicScheduler | steps | ``max(4, ceil(steps / 10))`` (100 -> 10, 50 -> 5, 35 -> 4); below 20 (already CI-sized, as in the harness' own graphs) unchanged |
| PhotoOps_Invert | skip | scaled with its SIGMAS' scheduler: ``floor(skip * new_steps / steps)`` (36 of 100 -> 3 of 10) |
| PhotoOps_FlowEditSampler | n_max, n_min | scaled with the scheduler of the SamplerCustomAdvanced it feeds: ``floor(n * new_steps / steps)`` (24 of 28 -> 3 of 4) |
| KSampler | steps | ``max(2, ceil(steps / 10))``; below 20 unchanged |
| EmptyLatentImage, ImageScale | width, height | 64 |
| PhotoOps_ConceptLearn | steps, em_rounds, resolution, save_every | 2, 1, 64, 0 |
| PhotoOps_InstructionLearn | steps | 4 |
"""
from __future__ import annotations

import copy
import math

FIXTURE_PREFIX = "photoops_tiny_"
IN_FILE = "(in the operator file)"   # nodes/pops.py IN_FILE

#: (class_type, input) -> {the user's file: the CI fixture}
FILE_RENAMES = {
    ("CLIPVisionLoader", "clip_name"): {"clip_vision_g.safetensors": "photoops_tiny_clip_vision_g.safetensors"},
    ("PhotoOps_PopsOperatorLoader", "operator_file"): {
        "texturing/learned_prior.pth": "photoops_tiny_texturing.safetensors",
        "scene/learned_prior.pth": "photoops_tiny_scene.safetensors"},
    ("PhotoOps_PopsOperatorLoader", "statistics"): {"kandinsky-2-2-prior.safetensors": IN_FILE},
    ("IPAdapterModelLoader", "ipadapter_file"): {
        "ip-adapter_sdxl.safetensors": "photoops_tiny_ip-adapter_sdxl.safetensors"},
    ("CheckpointLoaderSimple", "ckpt_name"): {
        "v1-5-pruned-emaonly-fp16.safetensors": "photoops_tiny_sd15.safetensors",
        "instruct-pix2pix-00-22000.safetensors": "photoops_tiny_sd15_ip2p.safetensors",
        "sd3.5_medium.safetensors": "photoops_tiny_sd35.safetensors"},
    ("UNETLoader", "unet_name"): {"flux1-dev.safetensors": "photoops_tiny_flux.safetensors"},
    ("VAELoader", "vae_name"): {"ae.safetensors": "photoops_tiny_vae16.safetensors"},
}

#: (class_type, input, the user's file) -> (test class_type, its inputs)
CLASS_REPLACEMENTS = {
    ("CheckpointLoaderSimple", "ckpt_name", "sd_xl_base_1.0.safetensors"): (
        "PhotoOpsTest_SDXLCheckpointParts", {"unet_name": "photoops_tiny_sdxl_unet.safetensors",
                                             "vae_name": "photoops_tiny_vae.safetensors"}),
    ("TripleCLIPLoader", "clip_name3", "t5xxl_fp16.safetensors"): (
        "PhotoOpsTest_FlowTextEncoders", {"clip_l": "photoops_tiny_clip_l.safetensors",
                                          "clip_g": "photoops_tiny_clip_g.safetensors",
                                          "t5xxl": "photoops_tiny_t5xxl.safetensors", "type": "sd3"}),
    ("DualCLIPLoader", "clip_name2", "t5xxl_fp16.safetensors"): (
        "PhotoOpsTest_FlowTextEncoders", {"clip_l": "photoops_tiny_clip_l.safetensors", "clip_g": "none",
                                          "t5xxl": "photoops_tiny_t5xxl.safetensors", "type": "flux"}),
}

#: the other files those replaced loaders name (TripleCLIPLoader / DualCLIPLoader read all their encoders
#: from the fixtures the row gives)
REPLACED_WITH_THEIR_NODE = {"clip_l.safetensors", "clip_g.safetensors"}

#: (class_type, input) -> replacement class_type, applied when that input names a fixture file.
CLASS_OVERRIDES = {("CLIPVisionLoader", "clip_name"): "PhotoOpsTest_CLIPVisionLoaderAny"}

#: (class_type, input) -> new value as a function of the old one
SCALES = {
    ("BasicScheduler", "steps"): lambda s: s if s < 20 else max(4, math.ceil(s / 10)),
    ("KSampler", "steps"): lambda s: s if s < 20 else max(2, math.ceil(s / 10)),
    ("EmptyLatentImage", "width"): lambda v: 64, ("EmptyLatentImage", "height"): lambda v: 64,
    ("ImageScale", "width"): lambda v: 64, ("ImageScale", "height"): lambda v: 64,
    ("PhotoOps_ConceptLearn", "steps"): lambda v: 2, ("PhotoOps_ConceptLearn", "em_rounds"): lambda v: 1,
    ("PhotoOps_ConceptLearn", "resolution"): lambda v: 64, ("PhotoOps_ConceptLearn", "save_every"): lambda v: 0,
    ("PhotoOps_InstructionLearn", "steps"): lambda v: 4,
}

#: the user files whose fixtures (and text-encoder stub) only the SD3.5 / Flux test server has
#: (``tests/test_comfy_flow_workflows.py``); the shared integration server leaves those workflows to it
FLOW_USER_FILES = {"sd3.5_medium.safetensors", "flux1-dev.safetensors", "ae.safetensors", "t5xxl_fp16.safetensors",
                   "clip_g.safetensors"}


def needs_flow_fixtures(ui_workflow: dict) -> bool:
    """Whether a UI-format workflow names one of :data:`FLOW_USER_FILES` (an SD3.5 / Flux workflow)."""
    return any(isinstance(v, str) and v in FLOW_USER_FILES
               for n in ui_workflow.get("nodes", []) for v in (n.get("widgets_values") or []))


#: every user file the table maps (the workflow test checks each loader's file is one of these)
USER_FILES = ({name for table in FILE_RENAMES.values() for name in table} | {k[2] for k in CLASS_REPLACEMENTS}
              | REPLACED_WITH_THEIR_NODE)


def apply_overrides(prompt: dict) -> dict:
    """A copy of the API-format ``prompt`` with the table above applied."""
    out = copy.deepcopy(prompt)
    old_steps = {nid: n["inputs"].get("steps") for nid, n in out.items() if n.get("class_type") == "BasicScheduler"}
    for node in out.values():
        cls, inputs = node.get("class_type"), node.get("inputs", {})
        for (c, name, user), (new_cls, new_inputs) in CLASS_REPLACEMENTS.items():
            if cls == c and inputs.get(name) == user:
                node["class_type"], node["inputs"] = new_cls, dict(new_inputs)
                cls, inputs = new_cls, node["inputs"]
        for (c, name), table in FILE_RENAMES.items():
            if cls == c and isinstance(inputs.get(name), str) and inputs[name] in table:
                inputs[name] = table[inputs[name]]
        for (c, name), new in CLASS_OVERRIDES.items():
            value = inputs.get(name)
            if cls == c and isinstance(value, str) and value.startswith(FIXTURE_PREFIX):
                node["class_type"] = new
        for (c, name), rule in SCALES.items():
            if cls == c and isinstance(inputs.get(name), (int, float)) and not isinstance(inputs[name], bool):
                inputs[name] = rule(inputs[name])
    for node in out.values():
        sig = node.get("inputs", {}).get("sigmas")
        if node.get("class_type") == "PhotoOps_Invert" and isinstance(sig, list) and sig[0] in old_steps:
            old, new = old_steps[sig[0]], out[sig[0]]["inputs"]["steps"]
            node["inputs"]["skip"] = int(node["inputs"]["skip"] * new // old)
    done = set()
    for node in out.values():
        smp, sig = node.get("inputs", {}).get("sampler"), node.get("inputs", {}).get("sigmas")
        if (node.get("class_type") == "SamplerCustomAdvanced" and isinstance(smp, list) and isinstance(sig, list)
                and sig[0] in old_steps and smp[0] not in done
                and out.get(smp[0], {}).get("class_type") == "PhotoOps_FlowEditSampler"):
            done.add(smp[0])
            old, new = old_steps[sig[0]], out[sig[0]]["inputs"]["steps"]
            fe = out[smp[0]]["inputs"]
            for k in ("n_max", "n_min"):
                if isinstance(fe.get(k), int):
                    fe[k] = int(fe[k] * new // old)
    return out
