"""PhotoOps: real-photo inversion, semantic guidance, attention maps, image-embedding
operators and concept learning for ComfyUI.

Pure V3 registration (``comfy_entrypoint``); no NODE_CLASS_MAPPINGS, which would make
ComfyUI ignore the entry point.  Nothing ComfyUI-specific is imported until ComfyUI
asks for the node list, so ``kernels`` stays importable on its own.
"""
WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes import PhotoOpsExtension

    return PhotoOpsExtension()
