"""Test-only ComfyUI nodes, loaded by the harness's servers as custom-node folder ``photoops_test_stubs``.

Never part of the pack.

* ``PhotoOpsTest_CLIPVisionLoaderAny`` — core *Load CLIP Vision* for files core knows, and the
  tiny CLIP vision fixture too (``clip_vision_any.py``); the override table puts it in place of
  ``CLIPVisionLoader`` when a workflow runs with that fixture.
* ``UpscaleModelLoader`` placeholder, only when the server sets ``PHOTOOPS_TEST_UPSCALE_STUB=1``
  and core lacks the node (it needs spandrel): frontend 1.27.10 breaks every
  ckpt_name/vae_name/lora_name widget when that node is absent (docs/comfyui-integration.md
  section 10.7).  Running it raises an error.
"""
import os

import folder_paths
import nodes as _core_nodes


class PhotoOpsTestCLIPVisionLoaderAny:
    DESCRIPTION = "Test stub: core Load CLIP Vision, plus tiny transformers-layout CLIP vision fixtures."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"clip_name": (folder_paths.get_filename_list("clip_vision"),
                                           {"tooltip": "A CLIP vision file (any size)."})}}

    RETURN_TYPES = ("CLIP_VISION",)
    FUNCTION = "load_clip"
    CATEGORY = "loaders"

    def load_clip(self, clip_name):
        from .clip_vision_any import load_clip_vision_any

        return (load_clip_vision_any(folder_paths.get_full_path_or_raise("clip_vision", clip_name)),)


class PhotoOpsTestStubUpscaleModelLoader:
    DESCRIPTION = "Test stub: the real node needs spandrel. Running it raises an error."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model_name": (["none"], {"tooltip": "Placeholder (no upscale models)."})}}

    RETURN_TYPES = ("UPSCALE_MODEL",)
    FUNCTION = "load_model"
    CATEGORY = "loaders"

    def load_model(self, model_name):
        raise RuntimeError("UpscaleModelLoader is a test placeholder (spandrel is not installed)")


NODE_CLASS_MAPPINGS = {"PhotoOpsTest_CLIPVisionLoaderAny": PhotoOpsTestCLIPVisionLoaderAny}
NODE_DISPLAY_NAME_MAPPINGS = {"PhotoOpsTest_CLIPVisionLoaderAny": "Load CLIP Vision (any size, test stub)"}
if os.environ.get("PHOTOOPS_TEST_UPSCALE_STUB") == "1" and "UpscaleModelLoader" not in _core_nodes.NODE_CLASS_MAPPINGS:
    NODE_CLASS_MAPPINGS["UpscaleModelLoader"] = PhotoOpsTestStubUpscaleModelLoader
    NODE_DISPLAY_NAME_MAPPINGS["UpscaleModelLoader"] = "Load Upscale Model (test stub)"
