"""Training of the toy rectified-flow model (issue 19 item 5; objective in ``flow.py``).

    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \\
    python -m tools.toyworld.flow_train --out tools/toyworld/run_flow --steps 2000 --threads 1

Flow matching (spec ``rectified-flow.md`` §1.1, ComfyUI ``CONST`` / SD3): ``x_s = (1 - s) x0 + s n``,
the UNet sees ``(x_s, t = 1000 s, caption)`` and regresses ``v = n - x0`` with plain MSE; ``s ~ U(0, 1)``
(``--time-dist lognorm``: SD3's logit-normal(0, 1)).  Everything else is ``train.py``'s machinery
and recipe: the same world, model (tokenizer, text encoder, UNet), 10 % empty captions, AdamW
(0.9/0.99), warm-up + cosine decay, clip 1.0, EMA, resume state written atomically every
``--ckpt-minutes`` (bit-identical resume), ``--export-only``, evaluation of the EMA model every
``--eval-every`` steps (48 captions, Euler 25 steps, CFG 3, scored by ``scorer.py``) with a
sample grid ``samples-<step>.png``.  The exported model (``out/model``) has a
``FlowMatchEulerDiscreteScheduler`` config, which ``model.load_model`` recognises.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from . import drop_repo_root_from_path  # noqa: E402

drop_repo_root_from_path()  # before diffusers: see its docstring

import torch  # noqa: E402

from .flow import DEFAULT_SHIFT, build_flow_model, evaluate_flow, flow_pair, model_time  # noqa: E402
from .model import save_model  # noqa: E402
from .sample import save_grid  # noqa: E402
from .train import CaptionTable, ema_decay, log, lr_at, save_state, start_run, train_batch  # noqa: E402
from .world import sample_scenes  # noqa: E402


def sample_times(n: int, gen: torch.Generator, dist: str = "uniform") -> torch.Tensor:
    """Training flow times: ``U(0, 1)`` or SD3's logit-normal(0, 1) (``sigmoid`` of a standard normal)."""
    if dist == "uniform":
        return torch.rand(n, generator=gen)
    if dist == "lognorm":
        return torch.sigmoid(torch.randn(n, generator=gen))
    raise ValueError(f"unknown time distribution {dist!r}")


def flow_loss(model, x0: torch.Tensor, ids: torch.Tensor, s: torch.Tensor, noise: torch.Tensor) -> tuple:
    """Flow-matching loss of one batch: ``(loss, prediction, target)``, target ``v = noise - x0`` (RF §1.1)."""
    xs, target = flow_pair(x0, noise, s)
    emb = model.text_encoder(ids)[0]
    pred = model.unet(xs, model_time(s), emb).sample
    return ((pred - target) ** 2).mean(), pred, target


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=2000, help="total optimiser steps (sets the LR schedule)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--lr-floor", type=float, default=0.05, help="final LR as a fraction of the peak")
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--ema", type=float, default=0.998)
    ap.add_argument("--p-uncond", type=float, default=0.1)
    ap.add_argument("--time-dist", choices=("uniform", "lognorm"), default="uniform")
    ap.add_argument("--shift", type=float, default=DEFAULT_SHIFT, help="time shift of the sampling list (flow.py)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--world", default="A", help="toy world (object sizes), see world.WORLD_SIZES")
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--eval-n", type=int, default=48)
    ap.add_argument("--final-eval-n", type=int, default=96, help="samples in the final evaluation (0: none)")
    ap.add_argument("--ckpt-minutes", type=float, default=3.0)
    ap.add_argument("--ckpt-every-steps", type=int, default=0, help="also checkpoint every N steps (testing)")
    ap.add_argument("--stop-after", type=int, default=0, help="stop (with a checkpoint) at this step (testing)")
    ap.add_argument("--export-only", action="store_true", help="write out/model from the resume state and exit")
    return ap.parse_args(argv)


TRAJECTORY_ARGS = ("batch", "lr", "lr_floor", "warmup", "ema", "p_uncond", "time_dist", "seed", "steps", "world")


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    os.makedirs(args.out, exist_ok=True)

    model = build_flow_model(seed=args.seed, shift=args.shift)
    ema, params, ema_params, opt, gen, state, step, history = start_run(model, args, args.seed + 12345, TRAJECTORY_ARGS)
    log(f"flow matching | params: {sum(p.numel() for p in params):,}  batch {args.batch}  steps {args.steps}  "
        f"threads {args.threads}")

    def export(tag: str = "model", final_eval: dict | None = None) -> None:
        train_args = state["args"] if (args.export_only and state) else vars(args)
        info = {"objective": "flow_matching", "prediction": "velocity (v = noise - x0)", "model_time": "1000 s",
                "trained_steps": step, "train_args": train_args,
                "eval_history": [{k: e[k] for k in ("step", "raw") if k in e} for e in history.get("eval", [])]}
        if final_eval is not None:
            info["eval"] = {k: v for k, v in final_eval.items() if k not in ("images", "prompts")}
        save_model(ema, os.path.join(args.out, tag), info=info)
        log(f"wrote EMA model to {os.path.join(args.out, tag)}")

    if args.export_only:
        if state is None:
            log("no resume state to export")
            return 1
        export()
        return 0

    table = CaptionTable(model)

    def checkpoint() -> None:
        save_state(args.out, step, model, ema, opt, gen, {"args": vars(args), "history": history})

    def run_eval(n: int, seed: int = 1000) -> dict:
        t0 = time.time()
        res = evaluate_flow(ema, n=n, seed=seed, cfg=3.0, steps=25, shift=args.shift, return_images=True)
        save_grid(res["images"], os.path.join(args.out, f"samples-{step:07d}.png"))
        res = {k: v for k, v in res.items() if k not in ("images", "prompts")}
        r, b = res["raw"], res["blurred"]
        log(f"eval step {step}: n={n} euler 25 cfg 3 | raw all {r['all']:.3f} fg {r['fg']:.3f} shape {r['shape']:.3f} "
            f"bg {r['bg']:.3f} empty {r['no_object']:.3f} | blurred all {b['all']:.3f} shape {b['shape']:.3f} "
            f"({time.time() - t0:.0f}s)")
        history["eval"].append({"step": step, **res})
        return res

    last_ckpt = time.time()
    t_log = time.time()
    losses = []
    stop_at = min(args.steps, args.stop_after) if args.stop_after else args.steps
    while step < stop_at:
        lr = lr_at(step, args)
        for g in opt.param_groups:
            g["lr"] = lr
        scenes = sample_scenes(args.batch, generator=gen, world=args.world)
        x0, ids = train_batch(scenes, table, gen, args.p_uncond)
        s = sample_times(args.batch, gen, args.time_dist)
        noise = torch.randn(x0.shape, generator=gen)
        loss, _, _ = flow_loss(model, x0, ids, s, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        d = ema_decay(step, args.ema)
        with torch.no_grad():
            torch._foreach_mul_(ema_params, d)
            torch._foreach_add_(ema_params, params, alpha=1 - d)
        step += 1
        losses.append(loss.item())

        if step % args.log_every == 0:
            dt = time.time() - t_log
            history["elapsed_s"] += dt
            m = sum(losses) / len(losses)
            history["loss"].append([step, round(m, 5)])
            log(f"step {step}/{args.steps} loss {m:.4f} lr {lr:.2e} {dt / len(losses):.2f}s/step")
            losses = []
            t_log = time.time()
        if args.eval_every and step % args.eval_every == 0 and step < args.steps:
            run_eval(args.eval_n)
            t_log = time.time()
        if (time.time() - last_ckpt > args.ckpt_minutes * 60
                or (args.ckpt_every_steps and step % args.ckpt_every_steps == 0) or step == stop_at):
            checkpoint()
            last_ckpt = time.time()
            log(f"saved resume state at step {step}")

    if step >= args.steps:
        final = run_eval(args.final_eval_n) if args.final_eval_n > 0 else None
        checkpoint()
        export(final_eval=final)
        log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
