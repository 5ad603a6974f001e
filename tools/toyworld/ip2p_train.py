"""Seeded, resumable CPU fine-tuning of the toy InstructPix2Pix (issue 8; see ``ip2p.py``).

    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 nice -n 19 \
    .venv/bin/python -m tools.toyworld.ip2p_train --out tools/toyworld/ip2p_run --threads 1

Starts from the committed toy T2I model (``tools/toyworld/model``), converted by
``ip2p_from_t2i``. Each batch: random scenes, one random single edit each (object recolour or
background change, random phrasing), target = the exact re-render. Loss: eps-MSE (weighting below), offset noise 0.1 (as the T2I run), on ``unet(cat([x_t, before]), t, text)``.
IP2P conditioning dropout: 5 % both conditions dropped, 7.5 % text only (empty instruction),
7.5 % image only (zero image). AdamW (0.9/0.99), warm-up then cosine decay, clip 1.0, EMA.

Changes from the T2I recipe. Attempt 1 (Min-SNR-5, uniform t, plain LR) and attempt 2 (weight
``clamp(1/snr, 1, 10)``, image-channel update x10) both still ignored the before image after 400-600
steps (preserve error 0.63-0.66; conv_in image weights 0.01 vs 0.10 for the noise channels): the
image only matters at high noise, where the layout is decided, and there eps-MSE is tiny because
x_t ~ eps, so the image gradient drowns in the low-t samples' noise. Hence: the loss is weighted
by ``clamp(1/snr, 1, 50)`` (eps error converted to x0 error at high noise), half of the timesteps
are drawn from [600, 1000), and the update of conv_in's zero-initialised image channels is scaled
by ``--image-lr-mult`` 10.

Resume state, checkpoint cadence and the bit-identical resume contract are those of
``tools/toyworld/train.py`` (its ``save_state`` / ``load_state`` are reused). At the end the EMA
model is evaluated (text-instructed edit success on held-out photos) and written to
``--out/model``; copy it to ``tools/toyworld/ip2p_model`` to commit it.
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

import torch

from .ip2p import T2I_DIR, evaluate_ip2p, ip2p_from_t2i, random_edits, save_ip2p
from .model import ToyModel, load_model
from .sample import save_grid
from .train import ema_decay, log, lr_at, save_state, start_run
from .world import render_batch

TRAJECTORY_ARGS = ("batch", "lr", "lr_floor", "warmup", "ema", "p_both", "p_text", "p_image", "snr_gamma", "offset_noise", "seed",
                   "steps", "image_lr_mult", "weighting", "x0_weight_max", "p_high_t", "high_t")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--lr-floor", type=float, default=0.05)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--ema", type=float, default=0.995)
    ap.add_argument("--p-both", type=float, default=0.05, help="drop text and image")
    ap.add_argument("--p-text", type=float, default=0.075, help="drop the instruction only")
    ap.add_argument("--p-image", type=float, default=0.075, help="drop the before image only")
    ap.add_argument("--snr-gamma", type=float, default=5.0)
    ap.add_argument("--weighting", choices=("minsnr", "x0clip"), default="x0clip",
                    help="minsnr: min(snr, gamma)/snr (the T2I run); x0clip: clamp(1/snr, 1, x0_weight_max), i.e. "
                         "the x0 error at high noise, where the layout is decided and must come from the image")
    ap.add_argument("--x0-weight-max", type=float, default=50.0)
    ap.add_argument("--p-high-t", type=float, default=0.5,
                    help="fraction of samples whose timestep is drawn from [high_t, T) instead of [0, T)")
    ap.add_argument("--high-t", type=int, default=600)
    ap.add_argument("--image-lr-mult", type=float, default=10.0,
                    help="the update of conv_in's (zero-initialised) image channels is scaled by this")
    ap.add_argument("--offset-noise", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--eval-n", type=int, default=24)
    ap.add_argument("--final-eval-n", type=int, default=96)
    ap.add_argument("--ckpt-minutes", type=float, default=3.0)
    ap.add_argument("--ckpt-every-steps", type=int, default=0)
    ap.add_argument("--stop-after", type=int, default=0)
    ap.add_argument("--export-only", action="store_true")
    return ap.parse_args(argv)


def make_batch(n: int, model: ToyModel, gen: torch.Generator, args):
    items = random_edits(n, gen)
    before = render_batch([s for s, _, _ in items])
    after = render_batch([t for _, t, _ in items])
    prompts = [p for _, _, p in items]
    u = torch.rand(n, generator=gen)
    drop_text = (u < args.p_both) | ((u >= args.p_both) & (u < args.p_both + args.p_text))
    drop_image = (u < args.p_both) | ((u >= args.p_both + args.p_text) & (u < args.p_both + args.p_text + args.p_image))
    prompts = ["" if d else p for p, d in zip(prompts, drop_text.tolist())]
    before = torch.where(drop_image.view(-1, 1, 1, 1), torch.zeros_like(before), before)
    return before, after, model.tokenize(prompts)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    os.makedirs(args.out, exist_ok=True)

    model = ip2p_from_t2i(load_model(T2I_DIR), seed=args.seed)
    ema, params, ema_params, opt, gen, state, step, history = start_run(model, args, args.seed + 777, TRAJECTORY_ARGS)
    log(f"params: {sum(p.numel() for p in params):,}  batch {args.batch}  steps {args.steps}")

    def run_eval(n: int) -> dict:
        t0 = time.time()
        res, out, src = evaluate_ip2p(ema, n=n, seed=0)
        save_grid(torch.cat([render_batch(src[:24]), out[:24]]), os.path.join(args.out, f"samples-{step:07d}.png"), ncol=12)
        log(
            f"eval step {step}: n={n} success {res['success']:.3f} (raw {res['success_raw']:.3f}) "
            f"fg {res.get('fg', {}).get('success', float('nan')):.3f} bg {res.get('bg', {}).get('success', float('nan')):.3f} "
            f"preserve_mae {res['preserve_mae']:.4f} target_mae {res['target_mae']:.4f} ({time.time() - t0:.0f}s)"
        )
        history["eval"].append({"step": step, **res})
        return res

    def export(final_eval=None) -> None:
        info = {"trained_steps": step, "train_args": state["args"] if (args.export_only and state) else vars(args)}
        if final_eval is not None:
            info["eval"] = final_eval
        save_ip2p(ema, os.path.join(args.out, "model"), info=info, dtype=torch.float16)
        log(f"wrote EMA model to {os.path.join(args.out, 'model')}")

    if args.export_only:
        if state is None:
            log("no resume state")
            return 1
        export()
        return 0

    ac = model.scheduler.alphas_cumprod.to(torch.float32)
    snr = ac / (1 - ac)
    if args.weighting == "minsnr":
        loss_weight = torch.clamp(snr, max=args.snr_gamma) / snr
    else:
        loss_weight = torch.clamp(1.0 / snr, min=1.0, max=args.x0_weight_max)
    conv_in = model.unet.conv_in.weight

    last_ckpt = time.time()
    t_log = time.time()
    losses = []
    stop_at = min(args.steps, args.stop_after) if args.stop_after else args.steps
    while step < stop_at:
        lr = lr_at(step, args)
        for g in opt.param_groups:
            g["lr"] = lr
        before, after, ids = make_batch(args.batch, model, gen, args)
        t = torch.randint(0, len(ac), (args.batch,), generator=gen)
        if args.p_high_t > 0:
            hi = torch.randint(args.high_t, len(ac), (args.batch,), generator=gen)
            t = torch.where(torch.rand(args.batch, generator=gen) < args.p_high_t, hi, t)
        noise = torch.randn(after.shape, generator=gen)
        if args.offset_noise > 0:
            noise = noise + args.offset_noise * torch.randn(after.shape[0], after.shape[1], 1, 1, generator=gen)
        a = ac[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * after + (1 - a).sqrt() * noise
        emb = model.text_encoder(ids)[0]
        pred = model.unet(torch.cat([xt, before], 1), t, emb).sample
        per = ((pred - noise) ** 2).mean(dim=(1, 2, 3))
        loss = (per * loss_weight[t]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        img_before = conv_in.detach()[:, 3:].clone()
        opt.step()
        if args.image_lr_mult != 1.0:
            with torch.no_grad():
                conv_in[:, 3:] = img_before + args.image_lr_mult * (conv_in[:, 3:] - img_before)
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
        if time.time() - last_ckpt > args.ckpt_minutes * 60 or (args.ckpt_every_steps and step % args.ckpt_every_steps == 0) or step == stop_at:
            save_state(args.out, step, model, ema, opt, gen, {"args": vars(args), "history": history})
            last_ckpt = time.time()
            log(f"saved resume state at step {step}")

    if step >= args.steps:
        final = run_eval(args.final_eval_n) if args.final_eval_n > 0 else None
        save_state(args.out, step, model, ema, opt, gen, {"args": vars(args), "history": history})
        export(final)
        log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
