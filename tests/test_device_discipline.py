"""Device discipline without a GPU (issue 16, item 4).

1. Static: every tensor factory in ``kernels/`` and ``nodes/`` (``torch.zeros``, ``ones``, ``empty``,
   ``full``, ``arange``, ``tensor``, ``randn``, ``rand``, ``randint``, ``randperm``, ``linspace``, ``eye``)
   takes its device from its inputs: it passes ``device=``, or its result goes straight to ``.to(...)``
   (or becomes a Python number / list), or it is a module parameter (moved with the module), or the
   line says why the tensor lives on the CPU with a ``# cpu:`` comment (seeded CPU generators,
   schedules, stored metadata, ComfyUI conditioning, which lives on the CPU).  A new bare factory
   fails here, so a CPU/CUDA mix is caught before it reaches a user's GPU.
2. Dynamic: the main kernel paths run with every input on the ``meta`` device; a tensor made on the
   CPU and mixed with them raises ("expected device meta"), as it would on CUDA.
"""
import ast
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FACTORIES = {"zeros", "ones", "empty", "full", "arange", "tensor", "randn", "rand", "randint", "randperm",
             "linspace", "logspace", "eye"}
TO_NUMBER = {"int", "float", "bool"}
CHAINED_OK = {"to", "tolist", "item"}


def _bare_factories(path: Path):
    src = path.read_text()
    lines = src.splitlines()
    tree = ast.parse(src)
    parents = {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            parents[child] = node
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"
                and node.func.attr in FACTORIES):
            continue
        if any(k.arg == "device" for k in node.keywords):
            continue
        parent = parents.get(node)
        # factory(...).to(...) / .tolist() / .item()  (possibly through a subscript or arithmetic)
        p, ok = parent, False
        while isinstance(p, (ast.Subscript, ast.BinOp, ast.Attribute, ast.Call, ast.Compare)):
            if isinstance(p, ast.Attribute) and p.attr in CHAINED_OK:
                ok = True
                break
            if isinstance(p, ast.Call) and isinstance(p.func, ast.Name) and p.func.id in TO_NUMBER:
                ok = True
                break
            if isinstance(p, ast.Call) and isinstance(p.func, ast.Attribute) and p.func.attr == "Parameter":
                ok = True
                break
            p = parents.get(p)
        if ok:
            continue
        stmt = node
        while stmt in parents and not isinstance(stmt, ast.stmt):
            stmt = parents[stmt]
        span = lines[stmt.lineno - 1: getattr(stmt, "end_lineno", stmt.lineno)]
        if any("# cpu:" in ln for ln in span):
            continue
        yield f"{path.relative_to(ROOT)}:{node.lineno}: torch.{node.func.attr}(...) without device"


def test_no_bare_tensor_factories():
    files = sorted(ROOT.glob("kernels/*.py")) + sorted(ROOT.glob("nodes/**/*.py"))
    bad = [b for f in files for b in _bare_factories(f)]
    assert not bad, ("tensor factories that take no device from their inputs (pass device=, chain .to(), or "
                     "say '# cpu: why' on the line):\n" + "\n".join(bad))


def test_the_checker_catches_a_bare_factory(tmp_path):
    f = ROOT / "kernels" / "_device_probe_tmp.py"
    try:
        f.write_text("import torch\n\ndef f(x):\n    return x + torch.zeros(3)\n\n"
                     "def g(x):\n    return x + torch.zeros(3, device=x.device) + torch.ones(2).to(x)\n")
        bad = list(_bare_factories(f))
        assert len(bad) == 1 and ":4:" in bad[0], bad
    finally:
        f.unlink()


# ---- dynamic: kernel paths on the meta device ---------------------------------------------------
META = torch.device("meta")


def test_sega_guidance_on_meta():
    from photoops.kernels import sega

    e_u, e_t = torch.randn(1, 4, 8, 8, device=META), torch.randn(1, 4, 8, 8, device=META)
    e_cs = [torch.randn(1, 4, 8, 8, device=META) for _ in range(2)]
    g = sega.SemanticGuidance([sega.EditConcept(scale=5.0), sega.EditConcept(scale=3.0, reverse=True, warmup=1)],
                              momentum_scale=0.3, momentum_beta=0.6)
    for step in range(3):
        out = g.guide(e_u, e_t, e_cs, step, 7.5)
        assert out.device == META and out.shape == e_u.shape


def test_ledits_pp_masks_on_meta():
    from photoops.kernels import sega

    e_u = torch.randn(1, 4, 8, 8, device=META)
    e_cs = [torch.randn(1, 4, 8, 8, device=META) for _ in range(2)]
    maps = [torch.rand(1, 2, 2, device=META) for _ in range(2)]
    out, masks = sega.ledits_pp_guidance(e_u, e_cs, [sega.EditConcept(scale=5.0), sega.EditConcept(scale=2.0)],
                                         maps, 0, timestep=500.0, return_masks=True)
    assert out.device == META and masks.device == META


def test_attention_recorder_on_meta():
    from photoops.kernels.attention import AttentionHooks, TokenMapRecorder
    from photoops.kernels.protocol import CallInfo, LayerInfo

    rec = TokenMapRecorder([1, 2], prompt_len=77, layers="all")
    hooks = AttentionHooks([rec])
    q = torch.randn(2, 16, 64, device=META)
    k = torch.randn(2, 77, 64, device=META)
    v = torch.randn(2, 77, 64, device=META)
    layer = LayerInfo(key=("input", 1, 0), place="down", order=0)
    call = CallInfo(sigma=1.0, chunks=[0, 1], rows_per_chunk=1, latent_hw=(4, 4), step=0, total_steps=4)
    out = hooks(q, k, v, 2, layer, call, lambda q_, k_, v_: torch.zeros_like(q_))
    assert out.device == META and rec.calls == 1


@pytest.mark.parametrize("method", ["ddim", "ddpm"])
def test_inversion_replay_on_meta(method):
    from photoops.kernels import inversion as kinv

    sigmas = torch.tensor([14.6, 4.0, 1.0, 0.1])          # a schedule: read as numbers, on the CPU
    x0 = torch.randn(1, 4, 8, 8, device=META)

    def denoise(x, s):
        assert x.device == META and torch.as_tensor(s).device == META     # the model gets sigma on x's device
        return x * 0.5

    noises = torch.randn(3, 1, 4, 8, 8, device=META) if method == "ddpm" else None
    out = kinv.replay_sample(denoise, x0, sigmas, noises=noises, eta=1.0 if method == "ddpm" else 0.0)
    assert out.device == META
