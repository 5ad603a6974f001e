"""Test-only ComfyUI nodes, loaded by the harness's servers as custom-node folder ``photoops_test_stubs``.

Never part of the pack.

* ``PhotoOpsTest_CLIPVisionLoaderAny`` — core *Load CLIP Vision* for files core knows, and the
  tiny CLIP vision fixture too (``clip_vision_any.py``); the override table puts it in place of
  ``CLIPVisionLoader`` when a workflow runs with that fixture.
* ``PhotoOpsTest_SDXLCheckpointParts`` — stands in for *Load Checkpoint* of ``sd_xl_base_1.0`` (the override
  table): the tiny SDXL-family UNet and VAE fixtures through core's loaders, and the tiny SDXL CLIP
  (clip_l + clip_g, ``comfy_harness/tiny_clip.py``) built in memory.
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


class PhotoOpsTestSDXLCheckpointParts:
    DESCRIPTION = "Test stub: an SDXL 'checkpoint' from the tiny UNet + VAE fixtures and a tiny SDXL CLIP."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "unet_name": (folder_paths.get_filename_list("diffusion_models"), {"tooltip": "The tiny SDXL UNet."}),
            "vae_name": (folder_paths.get_filename_list("vae"), {"tooltip": "The tiny VAE."})}}

    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load"
    CATEGORY = "loaders"

    def load(self, unet_name, vae_name):
        import sys
        from pathlib import Path

        tests = str(Path(os.path.realpath(__file__)).parents[2])
        if tests not in sys.path:
            sys.path.insert(0, tests)
        from comfy_harness.tiny_clip import tiny_sdxl_clip

        model = _core_nodes.UNETLoader().load_unet(unet_name, "default")[0]
        vae = _core_nodes.VAELoader().load_vae(vae_name)[0]
        clip = tiny_sdxl_clip(embedding_directory=folder_paths.get_folder_paths("embeddings"))
        return (model, clip, vae)


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


NODE_CLASS_MAPPINGS = {"PhotoOpsTest_CLIPVisionLoaderAny": PhotoOpsTestCLIPVisionLoaderAny,
                       "PhotoOpsTest_SDXLCheckpointParts": PhotoOpsTestSDXLCheckpointParts}
NODE_DISPLAY_NAME_MAPPINGS = {"PhotoOpsTest_CLIPVisionLoaderAny": "Load CLIP Vision (any size, test stub)",
                              "PhotoOpsTest_SDXLCheckpointParts": "SDXL checkpoint from tiny parts (test stub)"}
if os.environ.get("PHOTOOPS_TEST_UPSCALE_STUB") == "1" and "UpscaleModelLoader" not in _core_nodes.NODE_CLASS_MAPPINGS:
    NODE_CLASS_MAPPINGS["UpscaleModelLoader"] = PhotoOpsTestStubUpscaleModelLoader
    NODE_DISPLAY_NAME_MAPPINGS["UpscaleModelLoader"] = "Load Upscale Model (test stub)"
