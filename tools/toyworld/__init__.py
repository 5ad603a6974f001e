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

from .world import (  # noqa: F401
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
from .scorer import blur3, score, score_batch, scene_accuracy  # noqa: F401
