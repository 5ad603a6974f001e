"""Convert a released pOps operator (fp32 pickle, no statistics) to one fp16 safetensors file.

    python tools/convert_pops.py models/pops/texturing/learned_prior.pth \\
        --stats models/pops/kandinsky-2-2-prior.safetensors  [-o out.safetensors] [--dtype fp16|bf16|fp32]

The output holds the weights in the chosen dtype, ``clip_mean``/``clip_std`` in fp32 and
metadata (operator name, head count), so the loader needs no second file.  About
2.05 GB instead of 4.1 GB for the released operators.  The pickle is read with
``torch.load(weights_only=True, mmap=True)``; nothing is downloaded.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the folder holding the pack

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _pops_weights():
    try:
        from photoops.kernels import pops_weights  # type: ignore
        return pops_weights
    except ImportError:
        import importlib

        pack = Path(__file__).resolve().parents[1]
        sys.path.insert(0, str(pack.parent))
        return importlib.import_module(f"{pack.name}.kernels.pops_weights")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", help="operator file (.pth from pOpsPaper/operators, or a safetensors file)")
    ap.add_argument("--stats", help="Kandinsky 2.2 prior file or a small file with clip_mean/clip_std "
                                    "(needed when src has no statistics)")
    ap.add_argument("-o", "--out", help="output file (default: src with .safetensors, '_fp16' added)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    ap.add_argument("--name", help="operator name stored in the metadata (default: from the folder name)")
    ap.add_argument("--heads", type=int, help="attention heads (default: metadata, else inner width / 64 = 32 "
                                              "for the released operators)")
    a = ap.parse_args(argv)
    pw = _pops_weights()
    src = Path(a.src)
    out = Path(a.out) if a.out else src.with_name(f"{src.parent.name if src.stem == 'learned_prior' else src.stem}"
                                                  f"_{a.dtype}.safetensors")
    t0 = time.perf_counter()
    try:
        info = pw.convert(str(src), str(out), a.stats, DTYPES[a.dtype], a.name, a.heads)
    except pw.PopsFileError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {info['path']}: operator {info['operator']!r}, {info['tensors']} tensors, "
          f"{info['bytes'] / 1e9:.3f} GB in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
