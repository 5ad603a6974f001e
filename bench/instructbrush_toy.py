"""InstructBrush on the toy world: learned instruction vs its untrained initial instruction vs a plain
text instruction, on held-out toy photos, scored by the ground-truth scorer.

Model: the committed toy InstructPix2Pix (``tools/toyworld/ip2p_model``; ``--model`` for another).
For each effect, ``--pairs`` before/after pairs (seeded) are rendered; the instruction is learned
with ``kernels.instructbrush.learn`` on them and applied to ``--n`` held-out photos (other seeds),
with the same sampler for every arm (DDIM ``--steps``, IP2P guidance ``--s-text`` / ``--s-image``).

Effects:

* ``blue``          recolour the object blue (describable: the model was trained on "make it blue");
* ``blue_on_black`` recolour the object blue AND make the background black at once (never trained
  as one instruction: the hard-to-describe transformation InstructBrush is for).

Arms:

* ``text``    plain text instruction (``"make it blue"``; ``"make it blue and make the background black"``);
* ``init``    the transformation-oriented initial instruction P0 (TII, §5) with its K/V untouched;
* ``learned`` P0 with the learned K/V (``--time-ranges`` copies).

TII needs CLIP-like image and phrase embeddings. The toy world has no CLIP, so a ground-truth
one is used [ours]: an image embeds as its palette-colour pixel fractions (8 dims, the scorer's
pixel classifier) plus 0.3 x its scorer-read shape (3 dims); a phrase (a colour or shape word)
embeds as the matching unit vector. Phrases are joined with a space (toy prompts hold 16 tokens).

Metrics: ``success`` = the scorer reads the target scene's fg colour, shape and background from
the output (3x3-blurred); split into ``changed`` = the attributes the edit changes are read as the
target's (the transformation itself) and ``kept`` = the others (shape, and the background for
``blue``) are read as the before photo's; ``preserve`` = mean |output - before| over the pixels the edit must keep
(background for ``blue``; none for the compound effect); ``target_mae`` = mean |output - exact
after image| over all pixels ([-1, 1] scale).

    python bench/instructbrush_toy.py [--pairs 4] [--n 48] [--learn-steps 300] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from _common import ROOT, import_pack

import_pack()
import torch
from photoops.kernels import instructbrush as ib
from photoops.kernels.instructbrush_diffusers import DiffusersIP2P
from photoops.kernels.attention import AttentionHooks
from photoops.kernels.schedule import VPSchedule

from tools.toyworld.ip2p import IP2P_DIR, Edit, edit_metrics, ip2p_sample, load_ip2p
from tools.toyworld.scorer import classify_pixels, score_batch
from tools.toyworld.world import PALETTE_NAMES, SHAPES, object_masks, render_batch, sample_scenes

EFFECTS = {
    "blue": {"edit": Edit(fg="blue"), "text": "make it blue"},
    "blue_on_black": {"edit": Edit(fg="blue", bg="black"), "text": "make it blue and make the background black"},
}
PHRASES = list(PALETTE_NAMES) + list(SHAPES)


def toy_clip_images(images: torch.Tensor) -> torch.Tensor:
    """Ground-truth 'CLIP' image embedding: palette fractions (8) + 0.3 x shape one-hot (3)."""
    lab = classify_pixels(images)
    frac = torch.stack([(lab == i).float().mean((1, 2)) for i in range(len(PALETTE_NAMES))], 1)
    shp = torch.zeros(images.shape[0], len(SHAPES))
    for i, r in enumerate(score_batch(images)):
        if r["shape"] is not None:
            shp[i, SHAPES.index(r["shape"])] = 0.3
    return torch.cat([frac, shp], 1)


def toy_clip_phrases() -> torch.Tensor:
    return torch.eye(len(PHRASES))


def scenes_for(edit: Edit, n: int, seed: int):
    """``n`` scenes the edit changes (fg / bg different from the new colours), deterministic."""
    out, k = [], 0
    while len(out) < n:
        for s in sample_scenes(4 * n, seed=seed * 1000 + k):
            if edit.applies_to(s) and len(out) < n:
                out.append(s)
        k += 1
    return out


def attribute_rates(outputs: torch.Tensor, targets: list, edit: Edit) -> dict:
    """``changed``: fraction of outputs whose edited attributes read as the target's; ``kept``: whose
    other attributes (shape, unedited colour) do (scorer on the 3x3-blurred output, as ``success``)."""
    changed = [a for a in ("fg", "bg") if getattr(edit, a) is not None]
    kept = [a for a in ("fg", "shape", "bg") if a not in changed]
    sc = score_batch(outputs.float().clamp(-1, 1), blur=True)
    ok = lambda attrs: sum(all(r[a] == getattr(t, a) for a in attrs) for r, t in zip(sc, targets)) / len(targets)
    return {"changed": ok(changed), "kept": ok(kept)}


def region_masks(scenes, kind: str) -> torch.Tensor:
    """[B,1,H,W] regions a user would confine the edit to (issue 17 item 5): ``object`` = the object's
    true mask grown by one pixel (a careful brush), ``box`` = its bounding box grown by two pixels (a
    rough rectangle). ``background`` would lock nothing an edit of the object needs."""
    import torch.nn.functional as F

    m = object_masks(scenes).float()[:, None]
    if kind == "object":
        return F.max_pool2d(m, 3, 1, 1)
    if kind == "box":
        out = torch.zeros_like(m)
        for i in range(len(scenes)):
            ys, xs = torch.nonzero(m[i, 0], as_tuple=True)
            h, w = m.shape[-2:]
            out[i, 0, max(int(ys.min()) - 2, 0):min(int(ys.max()) + 3, h), max(int(xs.min()) - 2, 0):min(int(xs.max()) + 3, w)] = 1
        return out
    raise ValueError(f"unknown mask {kind!r}")


def learn_kwargs(args) -> dict:
    """The :func:`kernels.instructbrush.learn` settings of the bench flags."""
    return {"steps": args.learn_steps, "lr": args.lr, "seed": args.seed, "batch_size": args.batch,
            "weighting": args.weighting, "weight_max": args.weight_max, "lr_schedule": args.lr_schedule,
            "t_range": tuple(args.t_range) if args.t_range else None,
            "loss_on_guided_prediction": args.guided_loss, "guidance": (args.s_text, args.s_image)}


def run_effect(model, name: str, args) -> dict:
    eff = EFFECTS[name]
    edit = eff["edit"]
    train = scenes_for(edit, args.pairs, seed=args.seed + 1)
    test = scenes_for(edit, args.n, seed=args.seed + 500)
    before, after = render_batch(train), render_batch([edit.apply(s) for s in train])
    x_test = render_batch(test)
    targets = [edit.apply(s) for s in test]
    edits = [edit] * len(test)

    tii = ib.transformation_oriented_init(PHRASES, toy_clip_phrases(), toy_clip_images(before),
                                          toy_clip_images(after), r=args.r, eta=args.eta, joiner=" ")
    p0 = args.init_prompt or tii["prompt"] or "make it"
    tok = model.tokenizer(p0, add_special_tokens=False).input_ids
    if len(tok) + 2 > model.tokenizer.model_max_length:
        raise ValueError(f"P0 {p0!r} is longer than the toy tokenizer's 16 positions")
    cond, uncond = model.encode_prompts([p0]), model.encode_prompts([""])
    sched = VPSchedule(model.scheduler.alphas_cumprod.double())
    hooks = AttentionHooks()
    pred = DiffusersIP2P(model.unet, cond, uncond, hooks, schedule=sched)
    k0, v0 = pred.capture(ib.prompt_positions(len(tok)))
    inst = ib.LearnedInstruction(p0, ib.prompt_positions(len(tok)), k0, v0, time_ranges=args.time_ranges)
    hook = ib.InstructionHook(inst, schedule=sched)
    hooks.add(hook)
    pred.range_fn = inst.range_of

    masks = {"": None, **{m: region_masks(test, m) for m in args.masks}}

    def sample(c, hooked: bool, mask: str = ""):
        pred._ensure_installed()
        return ip2p_sample(model, x_test, cond=c, steps=args.steps, s_text=args.s_text, s_image=args.s_image,
                           seed=args.seed, unet=model.unet, holder=pred.holder if hooked else None,
                           mask=masks[mask])

    res = {"p0": p0, "tii": {k: tii[k] for k in ("px", "py")}, "pairs": args.pairs, "n": args.n}
    t0 = time.time()
    def metrics(out):
        return {**edit_metrics(out, test, targets, edits), **attribute_rates(out, targets, edit)}

    res["text"] = metrics(sample(model.encode_prompts([eff["text"]]), False))
    res["text"]["prompt"] = eff["text"]
    for m in args.masks:
        res[f"text|{m}"] = metrics(sample(model.encode_prompts([eff["text"]]), False, m))
    res["init"] = metrics(sample(cond, True))
    hook.reset_counts()
    t1 = time.time()
    out = ib.learn(inst, pred, before, after, model.scheduler.alphas_cumprod.float(), **learn_kwargs(args))
    learn_s = time.time() - t1
    res["learned"] = metrics(sample(cond, True))
    for m in args.masks:
        res[f"learned|{m}"] = metrics(sample(cond, True, m))
    for st in args.strengths:          # Instruction Apply's strength: K_0 + s (gamma - K_0)
        hook.strength = float(st)
        res[f"learned@{st:g}"] = metrics(sample(cond, True))
    hook.strength = 1.0
    res["learn"] = {**{k: v for k, v in learn_kwargs(args).items() if k != "seed"}, "time_ranges": args.time_ranges,
                    "params": inst.n_params(), "seconds": round(learn_s, 1),
                    "loss_first10": sum(out.losses[:10]) / len(out.losses[:10]),
                    "loss_last10": sum(out.losses[-10:]) / len(out.losses[-10:])}
    res["seconds"] = round(time.time() - t0, 1)
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=IP2P_DIR)
    ap.add_argument("--effects", nargs="+", default=list(EFFECTS), choices=list(EFFECTS))
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--n", type=int, default=48)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--s-text", type=float, default=3.0)
    ap.add_argument("--s-image", type=float, default=1.5)
    ap.add_argument("--learn-steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--batch", type=int, default=4, help="samples per learning step (each its own pair, t, noise)")
    ap.add_argument("--weighting", choices=ib.WEIGHTINGS, default="eps",
                    help="per-timestep loss weights (kernels.instructbrush.timestep_weights)")
    ap.add_argument("--weight-max", type=float, default=50.0)
    ap.add_argument("--lr-schedule", choices=ib.LR_SCHEDULES, default="constant")
    ap.add_argument("--guided-loss", action="store_true",
                    help="loss on the guided 3-branch prediction with the sampler's --s-text/--s-image (VISII variant)")
    ap.add_argument("--t-range", type=int, nargs=2, metavar=("LO", "HI"), help="learn on timesteps LO..HI-1 only")
    ap.add_argument("--time-ranges", type=int, default=1)
    ap.add_argument("--init-prompt", default="", help="use this P0 instead of TII's (e.g. the plain text)")
    ap.add_argument("--r", type=int, default=5)
    ap.add_argument("--eta", type=float, default=0.15)
    ap.add_argument("--strengths", type=float, nargs="*", default=[],
                    help="also apply the learned instruction at these strengths (arms learned@S)")
    ap.add_argument("--masks", nargs="*", default=[], choices=["object", "box"],
                    help="also sample the text and learned arms confined to these regions (a LATENT noise mask)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_ip2p(args.model)
    model.unet.requires_grad_(False)
    model.text_encoder.requires_grad_(False)
    results = {"args": vars(args), "effects": {}}
    print(f"toy IP2P {args.model}; {args.pairs} pairs; {args.n} held-out photos; DDIM {args.steps}, "
          f"s_T {args.s_text}, s_I {args.s_image}; learn {args.learn_steps} steps lr {args.lr} j={args.time_ranges}")
    print(f"{'effect':15s} {'arm':12s} {'success':>8s} {'changed':>8s} {'kept':>6s} {'preserve':>9s} {'target':>7s}  instruction")
    for name in args.effects:
        r = run_effect(model, name, args)
        results["effects"][name] = r
        for arm in ("text", *[f"text|{m}" for m in args.masks], "init", "learned",
                    *[f"learned|{m}" for m in args.masks], *[f"learned@{st:g}" for st in args.strengths]):
            m = r[arm]
            instr = (r["text"]["prompt"] if arm.startswith("text") else r["p0"] + (" (+learned K/V)" if arm != "init" else "")) \
                + (f", confined to the {arm.split('|')[1]} mask" if "|" in arm else "")
            print(f"{name:15s} {arm:12s} {m['success']:8.3f} {m['changed']:8.3f} {m['kept']:6.3f} {m['preserve_mae']:9.4f} "
                  f"{m['target_mae']:7.4f}  {instr}")
        print(f"{'':15s} learn: {r['learn']}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
