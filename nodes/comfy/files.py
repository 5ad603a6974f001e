"""Files: ComfyUI's ``folder_paths`` (model and output folders, file lists, save paths).

Every PhotoOps folder is registered here; :func:`next_save_path` is the one numbered-file
counter (ComfyUI's ``folder_paths.get_save_image_path`` convention: ``stem_00001_.safetensors``,
the next number after the largest one present).  Writing and hashing files is
``kernels/files.py`` (no ComfyUI needed).
"""
from __future__ import annotations

import os

from ...kernels.files import clean_name, counter_name


def _register(name: str, paths: list, extensions) -> None:
    """The one folder registration: add ``paths`` to model folder ``name`` with ``extensions``; an entry
    made before us (extra_model_paths.yaml, another pack) keeps its paths and gains ours."""
    import folder_paths

    entry = folder_paths.folder_names_and_paths.get(name)
    if entry is None:
        folder_paths.folder_names_and_paths[name] = (list(paths), set(extensions))
        return
    have, exts = entry
    have.extend(p for p in paths if p not in have)
    if isinstance(exts, set):
        exts.update(extensions)
    else:
        folder_paths.folder_names_and_paths[name] = (have, set(exts) | set(extensions))


def register_folder(name: str, subdir: str) -> str:
    """Register ``models/<subdir>`` and ``output/<subdir>`` as model folder ``name`` (safetensors).

    Returns the output-side folder, where our save nodes write (like Save Image does);
    loaders list both.  Users can add more roots in extra_model_paths.yaml under ``name``.
    """
    import folder_paths

    out = os.path.join(folder_paths.get_output_directory(), subdir)
    _register(name, [os.path.join(folder_paths.models_dir, subdir), out], {".safetensors"})
    return out


def folder_files(name: str) -> list:
    import folder_paths

    return folder_paths.get_filename_list(name)


def folder_file_path(name: str, filename: str) -> str:
    import folder_paths

    return folder_paths.get_full_path_or_raise(name, filename)


POPS_EXTENSIONS = {".safetensors", ".pth", ".pt", ".bin", ".ckpt"}


def register_model_folder(name: str, subdir: str, extensions=POPS_EXTENSIONS) -> None:
    """Register ``models/<subdir>`` as model folder ``name`` accepting ``extensions`` (:func:`_register`)."""
    import folder_paths

    _register(name, [os.path.join(folder_paths.models_dir, subdir)], extensions)


def embeddings_dir(create: bool = True) -> str:
    """``<output>/embeddings``, registered as an embeddings folder (appended to the search list).

    ComfyUI registers ``output/checkpoints``, ``output/loras`` ... the same way for what its own
    training nodes write; ``embedding:NAME`` then finds our files in every CLIP loaded after the
    registration (the pack registers it at import).  Writing under the output directory keeps
    a test server's (and a user's) ``models`` folders untouched.
    """
    import folder_paths

    d = os.path.join(folder_paths.get_output_directory(), "embeddings")
    _register("embeddings", [d], {".safetensors"})
    if create:
        os.makedirs(d, exist_ok=True)
    return d


def find_embedding(name: str):
    """Path of an existing embedding ``name`` (any extension ComfyUI tries, any embeddings folder) or None."""
    import folder_paths

    for ext in (".safetensors", ".pt", ".bin"):
        p = folder_paths.get_full_path("embeddings", name + ext)
        if p is not None:
            return p
    return None


def embedding_files() -> list:
    """The ``.safetensors`` embeddings, without our hidden internal files (Concept Learn's run caches)."""
    import folder_paths

    return [f for f in folder_paths.get_filename_list("embeddings")
            if f.endswith(".safetensors") and not os.path.basename(f).startswith(".")]


def embedding_path(name: str) -> str:
    import folder_paths

    return folder_paths.get_full_path_or_raise("embeddings", name)


def instruction_folder() -> str:
    """Register ``models/photoops_instructions`` + ``output/photoops_instructions``; returns the output side."""
    return register_folder("photoops_instructions", "photoops_instructions")


def next_save_path(folder: str, name: str, default: str, ext: str = ".safetensors",
                   plain_first: bool = False) -> str:
    """A new file path in ``folder`` for the user-given ``name`` (sanitised by
    :func:`~...kernels.files.clean_name`, so ``../x`` gives ``x``, never a hidden or outside file).

    Numbered as ComfyUI's ``folder_paths.get_save_image_path`` numbers outputs: ``stem_00001_.ext``,
    one more than the largest number already there (so a deleted file's number is not reused
    while a later one exists).  ``plain_first``: ``stem.ext`` while that is free (names a user
    picks, e.g. a learned instruction), numbered after.
    """
    import folder_paths

    stem = clean_name(name, default)
    os.makedirs(folder, exist_ok=True)
    if plain_first and not os.path.exists(os.path.join(folder, stem + ext)):
        return os.path.join(folder, stem + ext)
    full, base, counter, _, _ = folder_paths.get_save_image_path(stem, folder)
    path = os.path.join(full, counter_name(base, counter, ext))
    while os.path.exists(path):       # get_save_image_path counts only names of its own form
        counter += 1
        path = os.path.join(full, counter_name(base, counter, ext))
    return path
