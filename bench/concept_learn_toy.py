"""ConceptLearn on the toy world: does a learned token make the model draw a shape the captions never named?

For each target shape and each init word (never the shape's own word), a new token ``{0}``
is learned with the ConceptLearn EM kernel from ``--photos`` rendered photos of that shape
(train colours red/green on white/black), captioned ``"a {fg} {0} on a {bg} background"``.
Then ``"a {fg} {0} on a {bg} background"`` is sampled on HELD-OUT colours (blue/yellow on
gray/purple), DDIM 25 steps, CFG 3, and the ground-truth scorer reads the shape (3x3 blur,
as the toy model's own evaluation).  Reported: shape success before (the init word's row)
and after learning; the masked eps loss on held-out photos of the shape at fixed (t, eps) with
the init row, the learned row and the true shape word (never shown), and the fraction of the
init-to-word gap the learned row closes; the real shape word as the ceiling, and the IoU of the final masks with
the ground-truth object masks (masks are binary by construction; checked).

    python bench/concept_learn_toy.py [--steps 200] [--photos 6] [--per-combo 6] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from _common import ROOT, import_pack

import_pack()
import concept_toy as ct
import torch
from photoops.kernels import concept_learn as cl


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--photos", type=int, default=6)
    ap.add_argument("--per-combo", type=int, default=6, help="samples per held-out (fg, bg) combination")
    ap.add_argument("--shapes", default="triangle,square,circle")
    ap.add_argument("--init-words", default="a,circle", help="init words; a word equal to the shape is skipped")
    ap.add_argument("--loss-region", default="union", choices=["union", "not_others"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tm, den, text, hooks = ct.load()
    rows = []
    for shape in args.shapes.split(","):
        scenes, imgs, caps, gt = ct.photos(shape, args.photos, seed=args.seed + 11)
        ceiling = ct.shape_success(tm, text, None, shape, args.per_combo, seed=args.seed, word=shape)
        for word in args.init_words.split(","):
            if word == shape:
                word = "square" if shape != "square" else "circle"
            e0 = text.init_vector(word)[None, None]
            before = ct.shape_success(tm, text, e0, shape, args.per_combo, seed=args.seed)
            l_init = ct.heldout_loss(den, text, e0, shape)
            l_word = ct.heldout_loss(den, text, text.init_vector(shape)[None, None], shape)
            cfg = cl.ConceptConfig(steps=args.steps, em_rounds=args.rounds, lr=args.lr, seed=args.seed,
                                   loss_region=args.loss_region)
            t0 = time.perf_counter()
            res = ct.learn(den, text, hooks, imgs, caps, word, cfg)
            dt = time.perf_counter() - t0
            after = ct.shape_success(tm, text, res.vectors, shape, args.per_combo, seed=args.seed)
            l_learned = ct.heldout_loss(den, text, res.vectors, shape)
            gap = (l_init - l_learned) / (l_init - l_word) if l_init != l_word else float("nan")
            m = res.masks[:, 0]
            binary = bool(((m == 0) | (m == 1)).all())
            ious = cl.mask_iou(m, gt).tolist()
            iou_hist = [float(cl.mask_iou(h[:, 0], gt).mean()) for h in res.mask_history]
            row = {"shape": shape, "init_word": word, "before": before["shape"], "after": after["shape"],
                   "ceiling_real_word": ceiling["shape"], "after_fg": after["fg"], "after_bg": after["bg"],
                   "shapes_read_before": before["shapes_read"], "shapes_read_after": after["shapes_read"],
                   "heldout_loss_init": l_init, "heldout_loss_learned": l_learned, "heldout_loss_word": l_word,
                   "heldout_gap_closed": gap, "mask_iou_mean": sum(ious) / len(ious), "mask_iou_min": min(ious), "masks_binary": binary,
                   "mask_iou_per_estep": iou_hist, "steps_done": res.steps_done, "train_s": dt,
                   "loss_first10": sum(res.losses[:10]) / max(1, len(res.losses[:10])),
                   "loss_last10": sum(res.losses[-10:]) / max(1, len(res.losses[-10:])), "n_samples": after["n"]}
            rows.append(row)
            print(f"{shape:8s} init={word:7s} success before {before['shape']:.2f} -> after {after['shape']:.2f} "
                  f"(real word {ceiling['shape']:.2f}; fg {after['fg']:.2f} bg {after['bg']:.2f}); held-out loss "
                  f"{l_init:.4f} -> {l_learned:.4f} (word {l_word:.4f}, gap closed {gap:.2f}); "
                  f"mask IoU mean {row['mask_iou_mean']:.3f} min {row['mask_iou_min']:.3f} binary={binary}; "
                  f"IoU per E-step {[round(v, 3) for v in iou_hist]}; {res.steps_done} steps in {dt:.1f}s", flush=True)
    b = sum(r["before"] for r in rows) / len(rows)
    a = sum(r["after"] for r in rows) / len(rows)
    print(f"MEAN shape success before {b:.3f} -> after {a:.3f} over {len(rows)} runs "
          f"({rows[0]['n_samples']} held-out samples each)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows, "mean_before": b, "mean_after": a}, f, indent=1)


if __name__ == "__main__":
    main()
