"""Toy world: a procedural shapes world with exact ground truth, a ground-truth scorer,
and a small text-conditioned pixel-space diffusion model in diffusers format.

Nothing here imports ComfyUI; nothing here downloads anything.

Modules:
    world   - scenes, rendering, captions, edits with exact ground truth
    scorer  - reads fg colour / shape / bg colour / object mask from an image
    model   - offline tokenizer, text encoder, UNet, identity VAE, scheduler; save/load
    sample  - minimal DDIM + CFG sampler and ``evaluate``
    train   - resumable training script (``python -m tools.toyworld.train``)
"""

import sys
from pathlib import Path

_REPO_ROOT = Path(__file__).resolve().parents[2]


def drop_repo_root_from_path() -> None:
    """Take the repository root off ``sys.path`` (the trainers call this before importing diffusers).

    ``python -m tools.toyworld.train`` from the root puts the root first on ``sys.path``, and its ``kernels``
    package then shadows the PyPI ``kernels`` package that transformers (>= 5.25) imports, so the import of
    diffusers fails.  ``tools.toyworld`` is already imported by then and its modules import each other
    relatively, so nothing here needs the root.
    """
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _REPO_ROOT]


from .world import (  # noqa: F401,E402
    BG_COLOURS,
    FG_COLOURS,
    IMAGE_SIZE,
    PALETTE,
    SHAPES,
    Scene,
    all_combinations,
    caption,
    edit_pair,
    object_mask,
    render,
    render_batch,
    sample_scenes,
    with_colour,
)
from .scorer import blur3, score, score_batch, scene_accuracy  # noqa: F401,E402
