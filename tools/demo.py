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


def main() -> int:
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
