"""A toy InstructPix2Pix built from the committed toy text-to-image model (issue 8).

Built the way InstructPix2Pix was built from Stable Diffusion (Brooks et al. 2023, sec. 3.2):

* ``unet.conv_in`` gets 3 extra input channels for the *before* image, zero-initialised, so the
  6-channel UNet starts out computing exactly what the text-to-image UNet computed. The toy "VAE"
  is the identity, so the image condition is the before image itself, concatenated in pixel space
  after the noisy sample: ``unet(cat([x_t, before]), t, text)`` (IP2P channel order).
* [ours] The toy T2I model also feeds an attention-pooled text embedding into the time embedding
  (``addition_embed_type="text"``). Stable Diffusion has no such path: there the text reaches the
  UNet only through cross-attention keys/values, which is what InstructBrush optimises. To keep
  the toy faithful to that, the pooled path is removed and its value for the empty prompt is folded
  into ``time_embedding.linear_2.bias``; at initialisation the UNet therefore behaves exactly like
  the T2I UNet whose pooled input is the empty prompt (cross-attention unchanged).
* the tokenizer gets the instruction words ``NEW_WORDS`` (one id each); the text encoder's
  embedding rows are carried over by token string, new rows start at the mean word embedding
  plus seeded noise. Text encoder and UNet are fine-tuned jointly.
* conditioning dropout as in IP2P (text only / image only / both) so the three-branch guidance
  ``eps = e(0,0) + s_I (e(I,0) - e(0,0)) + s_T (e(I,T) - e(I,0))`` works.

Edits and instructions (``EDIT_TEMPLATES``): recolour the object (``fg``) or change the
background (``bg``), each with several phrasings, e.g. ``"make it blue"``, ``"turn red into
blue"``, ``"make the background black"``. Foreground and background palettes are disjoint in the
toy world, so the new colour word alone says which of the two is meant. Compound edits (object
and background at once) are deliberately never trained as one instruction: they are the
"hard-to-describe" transformation that the InstructBrush benchmark learns from pairs.
"""

from __future__ import annotations

import dataclasses
import json
import os

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel

from .model import (
    MAX_LENGTH,
    WORDS,
    ToyModel,
    _write_json,
    build_tokenizer,
    load_model,
    save_model,
    toy_merges,
    toy_vocab,
)
from .scorer import score_batch
from .world import BG_COLOURS, FG_COLOURS, Scene, object_masks, render_batch, sample_scenes

HERE = os.path.dirname(os.path.abspath(__file__))
T2I_DIR = os.path.join(HERE, "model")
IP2P_DIR = os.path.join(HERE, "ip2p_model")

NEW_WORDS = ("make", "it", "the", "turn", "into")
IP2P_WORDS = WORDS + NEW_WORDS

EDIT_TEMPLATES = {
    "fg": ("make it {new}", "make the {shape} {new}", "turn {old} into {new}"),
    "bg": ("make the background {new}", "turn {old} into {new}", "turn the background {new}"),
}


# --------------------------------------------------------------------------- edits


@dataclasses.dataclass(frozen=True)
class Edit:
    """A ground-truth edit: ``fg`` / ``bg`` are the new colours (None = unchanged)."""

    fg: str | None = None
    bg: str | None = None

    def apply(self, scene: Scene) -> Scene:
        return dataclasses.replace(scene, fg=self.fg or scene.fg, bg=self.bg or scene.bg)

    def applies_to(self, scene: Scene) -> bool:
        """True when the edit changes the scene (the new colours differ from the old ones)."""
        return (self.fg is None or self.fg != scene.fg) and (self.bg is None or self.bg != scene.bg) and (
            self.fg is not None or self.bg is not None
        )


def instruction(kind: str, template_index: int, scene: Scene, new: str) -> str:
    old = scene.fg if kind == "fg" else scene.bg
    return EDIT_TEMPLATES[kind][template_index].format(new=new, old=old, shape=scene.shape)


def random_edits(n: int, gen: torch.Generator):
    """``n`` random single edits: (scene, edited scene, instruction)."""
    scenes = sample_scenes(n, generator=gen)
    u = torch.rand(n, 3, generator=gen).tolist()
    out = []
    for s, (uk, un, ut) in zip(scenes, u):
        kind = "fg" if uk < 0.5 else "bg"
        pal = FG_COLOURS if kind == "fg" else BG_COLOURS
        old = s.fg if kind == "fg" else s.bg
        choices = [c for c in pal if c != old]
        new = choices[int(un * len(choices))]
        ti = int(ut * len(EDIT_TEMPLATES[kind]))
        e = Edit(fg=new) if kind == "fg" else Edit(bg=new)
        out.append((s, e.apply(s), instruction(kind, ti, s, new)))
    return out


def preserve_mask(scene: Scene, edit: Edit) -> torch.Tensor:
    """Pixels the edit must leave unchanged (bool [32, 32]): the background for an object recolour,
    the object for a background change, nothing for a compound edit (empty mask)."""
    m = object_masks([scene])[0]
    if edit.fg is not None and edit.bg is None:
        return ~m
    if edit.bg is not None and edit.fg is None:
        return m
    return torch.zeros_like(m)


def edit_metrics(outputs: torch.Tensor, sources: list[Scene], targets: list[Scene], edits: list[Edit]) -> dict:
    """Scorer success (fg, shape and bg of the output equal the target scene's; 3x3-blurred and raw)
    and errors: ``preserve_mae`` = mean |out - before| over the pixels the edit must not touch,
    ``target_mae`` = mean |out - exact after image| over all pixels ([-1, 1] scale)."""
    out = outputs.float().clamp(-1, 1)
    tgt_img = render_batch(targets)
    src_img = render_batch(sources)
    res = {}
    for name, blur in (("success", True), ("success_raw", False)):
        sc = score_batch(out, blur=blur)
        res[name] = sum((r["fg"], r["shape"], r["bg"]) == (t.fg, t.shape, t.bg) for r, t in zip(sc, targets)) / len(
            targets
        )
    pres = []
    for i, (s, e) in enumerate(zip(sources, edits)):
        m = preserve_mask(s, e)
        if m.any():
            pres.append((out[i] - src_img[i]).abs()[:, m].mean().item())
    res["preserve_mae"] = sum(pres) / len(pres) if pres else float("nan")
    res["target_mae"] = (out - tgt_img).abs().mean().item()
    res["n"] = len(targets)
    return res


# --------------------------------------------------------------------------- model


def build_ip2p_tokenizer():
    merges = toy_merges(IP2P_WORDS)
    return build_tokenizer(vocab=toy_vocab(merges), merges=merges), merges


@torch.no_grad()
def ip2p_from_t2i(t2i: ToyModel, seed: int = 0) -> ToyModel:
    """The zero-initialised InstructPix2Pix version of the toy T2I model (see module docstring)."""
    tok, _ = build_ip2p_tokenizer()
    # text encoder with the extended vocabulary
    old_vocab = t2i.tokenizer.get_vocab()
    new_vocab = tok.get_vocab()
    te = t2i.text_encoder
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = te.config.to_dict()
    cfg.update(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    cfg = {k: v for k, v in cfg.items() if k not in ("transformers_version",)}
    te2 = CLIPTextModel(CLIPTextConfig(**cfg))
    sd = te.state_dict()
    emb_key = "embeddings.token_embedding.weight"
    old_emb = sd[emb_key]
    g = torch.Generator().manual_seed(seed)
    word_rows = old_emb[[old_vocab[w + "</w>"] for w in WORDS]]
    new_emb = word_rows.mean(0, keepdim=True) + 0.02 * torch.randn(len(tok), old_emb.shape[1], generator=g)
    for t, i in new_vocab.items():
        if t in old_vocab:
            new_emb[i] = old_emb[old_vocab[t]]
    sd = dict(sd)
    sd[emb_key] = new_emb
    te2.load_state_dict(sd)

    # UNet: 6 input channels (zero-initialised image channels), pooled text path folded away
    ucfg = {k: v for k, v in dict(t2i.unet.config).items() if not k.startswith("_")}
    empty = t2i.text_encoder(t2i.tokenize([""]))[0]
    aug = t2i.unet.add_embedding(empty)[0]  # [time_embed_dim]
    ucfg.update(in_channels=6, addition_embed_type=None)
    unet = UNet2DConditionModel.from_config(ucfg)
    usd = {k: v.clone() for k, v in t2i.unet.state_dict().items() if not k.startswith("add_embedding.")}
    w = usd["conv_in.weight"]
    usd["conv_in.weight"] = torch.cat([w, torch.zeros_like(w)], dim=1)
    usd["time_embedding.linear_2.bias"] = usd["time_embedding.linear_2.bias"] + aug
    unet.load_state_dict(usd)
    return ToyModel(tok, te2.eval(), unet.eval(), t2i.vae, DDIMScheduler.from_config(t2i.scheduler.config))


def save_ip2p(model: ToyModel, directory: str, info: dict | None = None, dtype=None) -> None:
    """``save_model`` plus the extended tokenizer files and an ``ip2p`` section in toy_info.json."""
    save_model(model, directory, dtype=dtype, info=info)
    _, merges = build_ip2p_tokenizer()
    tdir = os.path.join(directory, "tokenizer")
    _write_json(os.path.join(tdir, "merges.json"), [list(m) for m in merges])
    with open(os.path.join(tdir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        f.writelines(f"{a} {b}\n" for a, b in merges)
    p = os.path.join(directory, "toy_info.json")
    with open(p, encoding="utf-8") as f:
        meta = json.load(f)
    meta.update(
        format="photoops-toyworld-ip2p-v1",
        words=list(IP2P_WORDS),
        image_channels=3,
        unet_input="cat([noisy sample, before image])",
        edit_templates={k: list(v) for k, v in EDIT_TEMPLATES.items()},
    )
    _write_json(p, meta)


def load_ip2p(directory: str = IP2P_DIR) -> ToyModel:
    return load_model(directory)


# --------------------------------------------------------------------------- sampling


def ip2p_eps(unet, x, t, image, cond, uncond, s_text: float, s_image: float, holder=None):
    """IP2P three-branch guided eps (Brooks et al. eq. 3)::

        e(0,0) + s_I (e(I,0) - e(0,0)) + s_T (e(I,T) - e(I,0))

    ``cond`` / ``uncond``: text features [B, L, D]; ``image`` the before image [B, 3, H, W].
    ``holder``: the call slot of hooked attention processors (``kernels.diffusers_adapter``); it is
    given a CallInfo (chunks 0 = instruction, 1 and 2 = empty text, ``extra["timestep"]``)."""
    b = x.shape[0]
    xin = torch.cat([torch.cat([x, image], 1), torch.cat([x, image], 1), torch.cat([x, torch.zeros_like(image)], 1)])
    emb = torch.cat([cond.expand(b, -1, -1), uncond.expand(b, -1, -1), uncond.expand(b, -1, -1)])
    e_it, e_i, e_0 = _unet_call(unet, xin, t, emb, holder, b).chunk(3)
    return e_0 + s_image * (e_i - e_0) + s_text * (e_it - e_i)


def _unet_call(unet, xin, t, emb, holder, rows):
    if holder is None:
        return unet(xin, t, emb).sample
    holder.call = _call_info(t, rows, tuple(xin.shape[-2:]))
    try:
        return unet(xin, t, emb).sample
    finally:
        holder.call = None


def _call_info(t, rows, hw):
    import importlib

    proto = importlib.import_module(_KERNELS + ".protocol")
    return proto.CallInfo(sigma=0.0, chunks=[0, 1, 2], rows_per_chunk=rows, latent_hw=hw, extra={"timestep": float(t)})


_KERNELS = "photoops.kernels"   # the pack as tests and benches import it


@torch.no_grad()
def ip2p_sample(
    model: ToyModel,
    images: torch.Tensor,
    prompts=None,
    *,
    cond: torch.Tensor | None = None,
    steps: int = 20,
    s_text: float = 3.0,
    s_image: float = 1.5,
    seed: int = 0,
    unet=None,
    holder=None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Edit ``images`` [B,3,32,32] with instructions (``prompts`` or precomputed ``cond`` features);
    DDIM (eta 0) from seeded noise, three-branch guidance. ``unet`` overrides the model's UNet;
    ``holder``: see ``ip2p_eps`` (hooked attention).

    ``mask`` [B,1,H,W] (1 = may change): outside it every step starts from the photo noised to the
    step's level with the run's initial noise, and the result is the photo there — what a ComfyUI
    sampler does with a LATENT's noise mask (core ``SetLatentNoiseMask``), the way a user confines
    Instruction Apply to a region."""
    unet = unet or model.unet
    g = torch.Generator().manual_seed(int(seed))
    x = torch.randn(images.shape, generator=g)
    noise = x                      # x is rebound below, never written in place
    if cond is None:
        cond = model.encode_prompts(list(prompts))
    uncond = model.encode_prompts([""])
    sched = DDIMScheduler.from_config(model.scheduler.config)
    sched.set_timesteps(steps)
    for t in sched.timesteps:
        if mask is not None:
            x = mask * x + (1 - mask) * sched.add_noise(images, noise, t.reshape(1))
        eps = ip2p_eps(unet, x, t, images, cond, uncond, s_text, s_image, holder=holder)
        x = sched.step(eps, t, x).prev_sample
    if mask is not None:
        x = mask * x + (1 - mask) * images
    return x


def eval_edits(n: int, seed: int):
    """``n`` held-out single edits (layouts from a seed far from the training generator's)."""
    g = torch.Generator().manual_seed(10_000 + seed)
    return random_edits(n, g)


@torch.no_grad()
def evaluate_ip2p(model: ToyModel, n: int = 48, seed: int = 0, steps: int = 20, s_text: float = 3.0, s_image: float = 1.5):
    """Text-instructed edit success on held-out photos (``edit_metrics``), overall and per edit kind."""
    items = eval_edits(n, seed)
    src = [s for s, _, _ in items]
    tgt = [t for _, t, _ in items]
    prompts = [p for _, _, p in items]
    edits = [Edit(fg=t.fg) if t.fg != s.fg else Edit(bg=t.bg) for s, t, _ in items]
    out = ip2p_sample(model, render_batch(src), prompts, steps=steps, s_text=s_text, s_image=s_image, seed=seed)
    res = edit_metrics(out, src, tgt, edits)
    for kind in ("fg", "bg"):
        idx = [i for i, e in enumerate(edits) if (e.fg is not None) == (kind == "fg")]
        if idx:
            sub = edit_metrics(out[idx], [src[i] for i in idx], [tgt[i] for i in idx], [edits[i] for i in idx])
            res[kind] = {k: sub[k] for k in ("success", "preserve_mae", "n")}
    res.update(steps=steps, s_text=s_text, s_image=s_image, seed=seed)
    return res, out, src


def write_example_photos(directory: str, scale: int = 2) -> list:
    """The PNGs the InstructBrush workflow loads (``workflows/instructbrush_*.png``): two before/after
    pairs of the compound edit "object blue + background black" and one held-out photo, 32 px toy
    scenes upscaled ``scale`` x (nearest) so their size is a multiple of 8."""
    import numpy as np
    from PIL import Image

    edit = Edit(fg="blue", bg="black")
    scenes = [s for s in sample_scenes(40, seed=2024) if edit.applies_to(s)][:3]
    files = {"instructbrush_before_1.png": render_batch([scenes[0]]),
             "instructbrush_after_1.png": render_batch([edit.apply(scenes[0])]),
             "instructbrush_before_2.png": render_batch([scenes[1]]),
             "instructbrush_after_2.png": render_batch([edit.apply(scenes[1])]),
             "instructbrush_photo.png": render_batch([scenes[2]])}
    out = []
    for name, img in files.items():
        x = ((img[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
        x = np.repeat(np.repeat(x, scale, 0), scale, 1)
        path = os.path.join(directory, name)
        Image.fromarray(x).save(path)
        out.append(path)
    return out


__all__ = [
    "EDIT_TEMPLATES",
    "IP2P_DIR",
    "MAX_LENGTH",
    "NEW_WORDS",
    "Edit",
    "edit_metrics",
    "evaluate_ip2p",
    "instruction",
    "ip2p_eps",
    "ip2p_from_t2i",
    "ip2p_sample",
    "load_ip2p",
    "random_edits",
    "save_ip2p",
    "write_example_photos",
]
