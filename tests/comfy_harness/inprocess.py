"""Shared start of the in-process ComfyUI test modules."""
from __future__ import annotations

from . import comfyenv


def require(module: str) -> None:
    """Skip the calling test module (printing why) unless ComfyUI can be imported in-process."""
    reason = comfyenv.comfyui_skip_reason()
    if reason:
        import pytest

        print(f"SKIP {module}: {reason}")
        pytest.skip(reason, allow_module_level=True)
    comfyenv.ensure_comfy_importable()


def load_fixture(seed: int = 0, vae: bool = False):
    """(model, clip, vae or None, info) of the SD1.5-format fixture checkpoint via ComfyUI's loader."""
    import comfy.sd

    from . import fixtures

    info = fixtures.cached_sd15_checkpoint(seed=seed)
    model, clip, v, _ = comfy.sd.load_checkpoint_guess_config(str(info["path"]), output_vae=vae, output_clip=True,
                                                              embedding_directory=None)
    return model, clip, v, info
