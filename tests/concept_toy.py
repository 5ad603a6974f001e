"""ConceptLearn on the toy world: shared by tests/test_concept_learn.py and bench/concept_learn_toy.py.

The toy model (tools/toyworld) was trained on captions ``"a {fg} {shape} on a {bg} background"``
and empty captions only.  The experiment: learn a NEW token (slot ``{0}``), initialised
from another word (never the shape's own word), from a few photos of one shape captioned
``"a {fg} {0} on a {bg} background"``; then sample ``"a {fg} {0} on a {bg} background"`` for
colours/backgrounds the photos did not show and read the shape with the ground-truth
scorer, before (init row) and after learning.
"""
from __future__ import annotations

import itertools

import torch
from photoops.kernels import concept_learn as cl
from photoops.kernels.attention import AttentionHooks
from photoops.kernels.concept_diffusers import DiffusersGradDenoiser, HFConceptText
from photoops.kernels.schedule import VPSchedule

TRAIN_FG, TRAIN_BG = ("red", "green"), ("white", "black")
HELD_FG, HELD_BG = ("blue", "yellow"), ("gray", "purple")
TEMPLATE = "a {fg} {{0}} on a {bg} background"


def load(model_dir=None):
    import os

    from tools.toyworld.model import load_model

    if model_dir is None:
        model_dir = os.path.join(os.path.dirname(__file__), "..", "tools", "toyworld", "model")
    tm = load_model(model_dir)
    hooks = AttentionHooks()
    den = DiffusersGradDenoiser(tm.unet, VPSchedule(tm.scheduler.alphas_cumprod), "epsilon", hooks)
    text = HFConceptText(tm.tokenizer, tm.text_encoder)
    return tm, den, text, hooks


def photos(shape: str, n: int, seed: int = 0, fgs=TRAIN_FG, bgs=TRAIN_BG):
    """``(scenes, images [-1,1] [n,3,32,32], captions with {0}, gt masks bool [n,32,32])``."""
    from tools.toyworld import world

    combos = [(f, shape, b) for f, b in itertools.product(fgs, bgs)]
    scenes = world.sample_scenes(n, seed=seed, combos=combos)
    imgs = world.render_batch(scenes)
    caps = [TEMPLATE.format(fg=s.fg, bg=s.bg) for s in scenes]
    return scenes, imgs, caps, world.object_masks(scenes)


def learn(den, text, hooks, imgs, caps, init_word: str, cfg: cl.ConceptConfig, **kw):
    rgb = ((imgs + 1) / 2).clamp(0, 1)
    return cl.learn_concepts(den, text, hooks, imgs, rgb, [init_word], cfg, captions=caps, **kw)


class _SplicedPrompts:
    """Duck-types ToyModel for tools.toyworld.sample.ddim_sample: prompts with ``{0}`` get the vector."""

    def __init__(self, tm, text, vectors):
        self.tm, self.text, self.vectors = tm, text, vectors
        self.unet, self.scheduler = tm.unet, tm.scheduler

    def encode_prompts(self, prompts):
        out = []
        for p in prompts:
            if "{0}" in p:
                out.append(self.text.encode(cl.parse_caption(p, 1), self.vectors)[0])
            else:
                out.append(self.tm.encode_prompts([p]))
        return torch.cat(out)


@torch.no_grad()
def shape_success(tm, text, vectors, shape: str, per_combo: int = 2, seed: int = 0, fgs=HELD_FG, bgs=HELD_BG,
                  steps: int = 25, cfg: float = 3.0, word: str | None = None) -> dict:
    """Fraction of samples of ``"a {fg} {0} on a {bg} background"`` that the scorer reads as ``shape``.

    ``word`` instead of the vector: prompt the real word (the ceiling).
    """
    from tools.toyworld.sample import ddim_sample
    from tools.toyworld.scorer import score_batch

    combos = list(itertools.product(fgs, bgs)) * per_combo
    slot = "{0}" if word is None else word
    prompts = [f"a {f} {slot} on a {b} background" for f, b in combos]
    imgs = ddim_sample(_SplicedPrompts(tm, text, vectors), prompts, steps=steps, cfg=cfg, seed=seed)
    scores = score_batch(imgs, blur=True)
    ok = [s["shape"] == shape for s in scores]
    fg_ok = [s["fg"] == f for s, (f, _) in zip(scores, combos)]
    bg_ok = [s["bg"] == b for s, (_, b) in zip(scores, combos)]
    shapes = {}
    for s in scores:
        shapes[s["shape"]] = shapes.get(s["shape"], 0) + 1
    return {"n": len(prompts), "shape": sum(ok) / len(ok), "fg": sum(fg_ok) / len(ok), "bg": sum(bg_ok) / len(ok),
            "shapes_read": shapes}


@torch.no_grad()
def heldout_loss(den, text, vectors, shape: str = "triangle", n: int = 4, seed: int = 5, timesteps=(100, 300, 500, 700, 900)):
    """Mean eps-MSE on held-out photos (held-out colours) at fixed (t, eps): lower = the token explains the shape.

    ``vectors`` ``[1, 1, d]`` spliced at ``{0}`` in ``"a {fg} {0} on a {bg} background"``.
    """
    _, imgs, caps, masks = photos(shape, n, seed=seed, fgs=HELD_FG, bgs=HELD_BG)
    g = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    for i in range(n):
        cond, _ = text.encode(cl.parse_caption(caps[i], 1), vectors)
        t = torch.tensor(timesteps)
        eps = torch.randn((len(t),) + tuple(imgs.shape[1:]), generator=g)
        sigma = den.schedule.sigmas[t].float()
        x = imgs[i:i + 1] + sigma.view(-1, 1, 1, 1) * eps
        x0 = den.predict_x0_grad(x, sigma, cond)
        eps_pred = (x - x0) / sigma.view(-1, 1, 1, 1)
        m = masks[i].float()
        total += float((((eps_pred - eps) ** 2) * m).sum() / (m.sum() * eps.shape[0] * eps.shape[1]))
        count += 1
    return total / count
