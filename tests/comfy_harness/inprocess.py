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


class private_embeddings_output:
    """For the ``with`` block: ComfyUI's output directory is ``out_dir`` and the only embeddings folder
    is ``<out_dir>/embeddings`` (what Concept Learn writes and ``embedding:NAME`` searches); both
    settings are restored afterwards.  ``as`` gives the embeddings folder."""

    def __init__(self, out_dir):
        self.out_dir = str(out_dir)

    def __enter__(self) -> str:
        import folder_paths
        from photoops.nodes.comfy.files import embeddings_dir

        self.old_out = folder_paths.get_output_directory()
        self.old = folder_paths.folder_names_and_paths.get("embeddings")
        folder_paths.set_output_directory(self.out_dir)
        folder_paths.folder_names_and_paths["embeddings"] = ([], {".safetensors", ".pt", ".bin"})
        return embeddings_dir()

    def __exit__(self, *exc):
        import folder_paths

        folder_paths.set_output_directory(self.old_out)
        if self.old is not None:
            folder_paths.folder_names_and_paths["embeddings"] = self.old
        return False
