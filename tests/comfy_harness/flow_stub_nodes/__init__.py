"""Test-only ComfyUI node for the SD3.5 / Flux workflows, loaded as custom-node folder ``photoops_flow_test_stubs``
by ``tests/test_comfy_flow_workflows.py``'s server.  Never part of the pack.

``PhotoOpsTest_FlowTextEncoders`` stands in for core *TripleCLIPLoader* (``type`` sd3: CLIP-L, CLIP-G,
T5) and *DualCLIPLoader* type flux (CLIP-L, T5) when the override table
(``tests/comfy_harness/overrides.py``) maps the user's ``clip_l`` / ``clip_g`` / ``t5xxl_fp16`` to the
tiny encoder files of ``comfy_harness/flow_fixtures.py``: core's loader nodes build every text encoder
at full size (T5-XXL: 4.7 B parameters), so the stub builds the same recipe (``sd3_clip`` /
``flux_clip`` in a core ``comfy.sd.CLIP``) with the small configs the files name
(``flow_fixtures.load_tiny_text_encoders``; T5 prompts padded to 16 tokens, not 256, through core's
``t5xxl_min_length`` tokenizer option: CI speed).  Tokenizers, encoding and CLIPTextEncode stay core's.
"""
import os
import sys
from pathlib import Path

import folder_paths


def _harness():
    tests = str(Path(os.path.realpath(__file__)).parents[2])
    if tests not in sys.path:
        sys.path.insert(0, tests)
    from comfy_harness import flow_fixtures

    return flow_fixtures


class PhotoOpsTestFlowTextEncoders:
    DESCRIPTION = "Test stub: TripleCLIPLoader (sd3) / DualCLIPLoader (flux) for the tiny text-encoder fixtures."

    @classmethod
    def INPUT_TYPES(cls):
        files = folder_paths.get_filename_list("text_encoders")
        return {"required": {
            "clip_l": (files, {"tooltip": "The tiny CLIP-L file."}),
            "clip_g": (["none", *files], {"tooltip": "The tiny CLIP-G file (sd3), or none (flux)."}),
            "t5xxl": (files, {"tooltip": "The tiny T5 file."}),
            "type": (["sd3", "flux"], {"tooltip": "sd3: TripleCLIPLoader's recipe; flux: DualCLIPLoader type flux."})}}

    RETURN_TYPES = ("CLIP",)
    FUNCTION = "load"
    CATEGORY = "loaders"

    def load(self, clip_l, clip_g, t5xxl, type):
        names = [clip_l, t5xxl] + ([] if clip_g == "none" else [clip_g])
        paths = [folder_paths.get_full_path_or_raise("text_encoders", n) for n in names]
        clip = _harness().load_tiny_text_encoders(paths, type,
                                                   embedding_directory=folder_paths.get_folder_paths("embeddings"))
        return (clip,)


NODE_CLASS_MAPPINGS = {"PhotoOpsTest_FlowTextEncoders": PhotoOpsTestFlowTextEncoders}
NODE_DISPLAY_NAME_MAPPINGS = {"PhotoOpsTest_FlowTextEncoders": "Tiny SD3 / Flux text encoders (test stub)"}
