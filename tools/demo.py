"""The main job, runnable on a fresh machine with no weights: attention capture end to end.

Builds a small seeded text-to-image model in code (diffusers UNet2DConditionModel, CLIP
text encoder, offline byte-level tokenizer), samples a prompt with classifier-free
guidance through the PhotoOps diffusers adapter while a TokenMapRecorder watches one
word, and writes to ``out/``:

* ``attention_heatmap.png`` — the word's cross-attention map over the sample,
* ``attention_mask.png`` — the LEDITS++-style quantile mask (blur 0.5, q = 0.8),
* ``attention_summary.json`` — token positions, recorded calls, timing.

The weights are random until the toy-world model lands (issue 3), so the picture shows
the plumbing, not a meaningful segmentation.

    python tools/demo.py [--prompt "a red circle on a blue background"] [--word circle] [--steps 20]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]


def _import_pack():
    sys.path.insert(0, str(ROOT / "bench"))
    from _common import import_pack

    import_pack()


TOY_MODEL = Path(os.environ.get("PHOTOOPS_TOY_MODEL", ROOT / "tools" / "toyworld" / "model"))


def toy_demo(a) -> int:
    """Invert a toy photo and edit it (edit-friendly DDPM inversion + caption swap), with scores."""
    import numpy as np
    import torch
    from PIL import Image

    from photoops.kernels.attention import AttentionHooks, TokenMapRecorder
    from photoops.kernels import maps
    from tools.toyworld import model as tm
    from tools.toyworld import scorer, world

    sys.path.insert(0, str(ROOT / "bench"))
    from edit_quality import ToyDenoiser, ddim_sigmas, psnr
    from photoops.kernels.inversion import ddpm_invert, replay_sample

    t0 = time.perf_counter()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    model = tm.load_model(str(TOY_MODEL))
    scene = world.Scene(fg=a.source_colour, shape=a.shape, bg=a.background, centre=(16.0, 16.0), size=16)
    edited = world.with_colour(scene, a.target_colour)
    src, truth = world.render_batch([scene]), world.render_batch([edited])
    bg = ~world.object_masks([scene, edited]).any(0, keepdim=True)
    src_cap = world.caption(scene)
    tgt_cap = world.caption(edited)
    hooks = AttentionHooks()
    pos = model.tokenizer(src_cap)["input_ids"].index(model.tokenizer(a.shape)["input_ids"][1])
    rec = hooks.add(TokenMapRecorder([pos], prompt_len=model.tokenizer.model_max_length, layers="all"))
    td = ToyDenoiser(model, hooks=hooks)
    sig = ddim_sigmas(td.schedule, a.steps)
    skip = int(round(0.3 * a.steps))
    g_src, g_tgt = td.guided([src_cap], 1.0), td.guided([tgt_cap], 3.0)
    x_start, zs, ladder = ddpm_invert(g_src, src, sig, generator=torch.Generator().manual_seed(a.seed))
    recon = replay_sample(g_src, x_start, sig, noises=zs)
    rec.reset()
    out = replay_sample(g_tgt, ladder[len(sig) - 1 - skip], sig[skip:], noises=zs, start=skip)
    sc = scorer.score(out[0].clamp(-1, 1))
    heat = maps.overlay(((out.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1), rec.result())

    def png(t, name):
        img = (t.clamp(-1, 1) + 1) / 2 if t.shape[-1] != 3 else t
        if img.shape[-1] != 3:
            img = img[0].permute(1, 2, 0)
        else:
            img = img[0]
        arr = (img.numpy() * 255).round().astype(np.uint8)
        Image.fromarray(arr).resize((256, 256), Image.NEAREST).save(out_dir / name)

    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    png(src, "before.png")
    png(out, "after.png")
    png(heat, "after_attention_shape.png")
    summary = {"source": src_cap, "target": tgt_cap, "method": "edit-friendly DDPM inversion, caption swap",
               "steps": a.steps, "skip": skip, "target_cfg": 3.0,
               "reconstruction_psnr_db": round(float(psnr(recon, src)), 2),
               "edit_scored": {"fg": sc["fg"], "shape": sc["shape"], "bg": sc["bg"]},
               "edit_success": sc["fg"] == a.target_colour and sc["shape"] == a.shape and sc["bg"] == a.background,
               "background_psnr_db": round(float(psnr(out, src, bg)), 2),
               "psnr_vs_true_edit_db": round(float(psnr(out, truth)), 2),
               "seconds": round(time.perf_counter() - t0, 2)}
    (out_dir / "edit_summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))
    print(f"wrote {out_dir / 'before.png'}, {out_dir / 'after.png'}, {out_dir / 'after_attention_shape.png'}")
    return 0


def main() -> int:
    if TOY_MODEL.is_dir() and "--attention" not in sys.argv:
        ap = argparse.ArgumentParser(description="PhotoOps demo: invert a toy photo and edit it")
        ap.add_argument("--source-colour", default="red")
        ap.add_argument("--target-colour", default="blue")
        ap.add_argument("--shape", default="circle")
        ap.add_argument("--background", default="white")
        ap.add_argument("--steps", type=int, default=50)
        ap.add_argument("--seed", type=int, default=0)
        ap.add_argument("--out", default=str(ROOT / "out"))
        a = ap.parse_args()
        _import_pack()
        return toy_demo(a)
    if "--attention" in sys.argv:
        sys.argv.remove("--attention")
    ap = argparse.ArgumentParser(description="PhotoOps attention-capture demo on tiny weights")
    ap.add_argument("--prompt", default="a red circle on a blue background")
    ap.add_argument("--word", default="circle")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "out"))
    a = ap.parse_args()
    _import_pack()

    import numpy as np
    import torch
    from PIL import Image
    from transformers import CLIPTextConfig, CLIPTextModel

    from photoops.kernels import maps
    from photoops.kernels.attention import AttentionHooks, TokenMapRecorder
    from photoops.kernels.diffusers_adapter import DiffusersDenoiser
    from photoops.kernels.schedule import VPSchedule
    from photoops.kernels.tokens import find_word_positions, tokenize_prompt
    from tiny import byte_tokenizer, tiny_unet

    t0 = time.perf_counter()
    tok = byte_tokenizer()
    torch.manual_seed(a.seed)
    te = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=5,
                                      num_attention_heads=4, max_position_embeddings=77)).eval()
    unet = tiny_unet(a.seed)

    def enc(s):
        return tok(s)["input_ids"][1:-1]

    chunks = tokenize_prompt(a.prompt, enc, tok.bos_token_id, tok.eos_token_id)
    positions = find_word_positions(chunks, enc(a.word), special=(tok.bos_token_id, tok.eos_token_id), word=a.word,
                                    decode=tok.convert_ids_to_tokens)
    ids = torch.tensor([[int(it[0]) for it in c] for c in chunks])
    empty = torch.tensor([[int(it[0]) for it in c] for c in tokenize_prompt("", enc, tok.bos_token_id, tok.eos_token_id)])
    with torch.no_grad():
        pos = te(ids).last_hidden_state.reshape(1, -1, 32)
        neg = te(empty).last_hidden_state.reshape(1, -1, 32)

    hooks = AttentionHooks()
    rec = hooks.add(TokenMapRecorder(positions, prompt_len=pos.shape[1], layers="all"))
    sched = VPSchedule.scaled_linear()
    den = DiffusersDenoiser(unet, sched, hooks=hooks)
    g = torch.Generator().manual_seed(a.seed)
    sig = sched.sigma(torch.linspace(999, 0, a.steps)).float().tolist() + [0.0]
    x = torch.randn(1, 4, 32, 32, generator=g) * sig[0]
    for i in range(a.steps):
        c, u = den.predict_x0(x, torch.tensor(sig[i]), [pos, neg], cond_ids=[0, 1], step=i, total_steps=a.steps)
        d = u + a.cfg * (c - u)
        x = d + (x - d) * (sig[i + 1] / sig[i])

    raw = rec.result()
    mask = maps.binarize(maps.gaussian_blur(raw, 0.5, 3), "quantile", 0.8)
    img = x[0, :3]
    img = ((img - img.min()) / (img.max() - img.min() + 1e-8)).permute(1, 2, 0)[None]
    img = torch.nn.functional.interpolate(img.permute(0, 3, 1, 2), size=(256, 256), mode="nearest").permute(0, 2, 3, 1)
    heat = maps.overlay(img, raw)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    Image.fromarray((heat[0].numpy() * 255).astype(np.uint8)).save(out / "attention_heatmap.png")
    m = maps.resize_map(mask, (256, 256), mode="nearest")[0]
    Image.fromarray((m.numpy() * 255).astype(np.uint8)).save(out / "attention_mask.png")
    summary = {"prompt": a.prompt, "word": a.word, "token_positions": positions, "recorded_calls": rec.calls,
               "map_size": list(raw.shape[-2:]), "mask_fraction": float(mask.mean()),
               "seconds": round(time.perf_counter() - t0, 2)}
    (out / "attention_summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))
    print(f"wrote {out / 'attention_heatmap.png'} and {out / 'attention_mask.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
