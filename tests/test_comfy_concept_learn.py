"""Concept Learn through a real ComfyUI in-process (SD1.5-format random-weight fixture).

Skipped (with the reason printed) when COMFYUI_DIR is unset.  Random weights: these tests
check plumbing (files, loading through ComfyUI's embedding path, frozen weights, errors,
interruption, resume, caching), not learning quality (see test_concept_learn.py).
"""
import os

import pytest
import torch
from comfy_harness import inprocess

inprocess.require("test_comfy_concept_learn")

import comfy.model_management
import folder_paths
from photoops.kernels import concept_learn as kcl
from photoops.nodes.comfy.files import embedding_files
from photoops.nodes.comfy.concepts import ComfyConceptText, read_concept_embedding, save_concept_embedding
from comfy_harness.probe import lookup_embedding
from photoops.nodes import concept_learn as ncl
from tiny import one_thread  # noqa: F401


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The fixture model; a temp output directory, so the node writes <tmp>/embeddings (searched alone)."""
    model, clip, vae, _ = inprocess.load_fixture(vae=True)
    out_dir = tmp_path_factory.mktemp("output")
    images = torch.rand(2, 64, 80, 3, generator=torch.Generator().manual_seed(0))
    with inprocess.private_embeddings_output(out_dir) as emb_dir:
        assert emb_dir == str(out_dir / "embeddings")
        assert folder_paths.get_folder_paths("embeddings") == [emb_dir]
        yield {"model": model, "clip": clip, "vae": vae, "dir": emb_dir, "images": images}


def _run(env, names="cl_aa, cl_bb", words="dog, room", steps=2, images=None, **kw):
    args = dict(steps=steps, learning_rate=1e-2, em_rounds=1, seed=0, resolution=64, save_every=0)
    args.update(kw)
    imgs = env["images"][:1] if images is None else images
    return ncl.ConceptLearnNode.execute(env["model"], env["clip"], env["vae"], imgs, names, words, **args)


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same_bits(a, b) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return torch.equal(a.reshape(-1).contiguous().view(torch.uint8), b.reshape(-1).contiguous().view(torch.uint8))


def test_learn_saves_standard_embeddings_that_change_the_conditioning(env):
    unet0 = _state(env["model"].model.diffusion_model)
    te0 = _state(env["clip"].cond_stage_model)
    opts0 = repr(env["model"].model_options)
    out = _run(env, unassigned_label=False, images=env["images"], steps=1)
    clip_out, masks, prev, hint, loss = out.result
    assert clip_out is env["clip"]
    assert masks.shape == (4, 64, 64) and set(masks.unique().tolist()) <= {0.0, 1.0}
    assert prev.shape == (2, 64, 64, 3)
    assert hint == "a photo of embedding:cl_aa and embedding:cl_bb"
    assert len(loss["loss"]) == 1
    # frozen: UNet, text encoder (embedding table included), the input MODEL's options
    # (bit comparison: ComfyUI leaves weights absent from the checkpoint, e.g. the SD1 CLIP's
    # text_projection, uninitialised, and NaN != NaN under torch.equal)
    for k, v in env["model"].model.diffusion_model.state_dict().items():
        assert _same_bits(v, unet0[k]), k
    for k, v in env["clip"].cond_stage_model.state_dict().items():
        assert _same_bits(v, te0[k]), k
    assert repr(env["model"].model_options) == opts0
    # the file: one emb_params [1, 768] float32 tensor + string metadata
    path = os.path.join(env["dir"], "cl_aa.safetensors")
    vec, meta = read_concept_embedding(path)
    from safetensors.torch import load_file
    raw = load_file(path)
    assert list(raw) == ["emb_params"] and raw["emb_params"].shape == (1, 768)
    assert raw["emb_params"].dtype == torch.float32
    assert meta["method"] == "conceptlearn-em" and meta["init_word"] == "dog" and meta["concept"] == "cl_aa"
    # ComfyUI's own embedding lookup finds it, and the prompt syntax embedding:NAME uses it
    looked = lookup_embedding("cl_aa", 768, "clip_l")
    assert looked is not None and torch.equal(looked.float().reshape(1, 768), vec)
    clip = env["clip"]
    tok = clip.tokenizer.clip_l
    old = tok.embedding_directory
    tok.embedding_directory = [env["dir"]]
    try:
        toks = clip.tokenize("a photo of embedding:cl_aa")
        items = [it[0] for it in toks["l"][0]]
        emb_items = [i for i, t in enumerate(items) if isinstance(t, torch.Tensor)]
        assert emb_items == [4]
        assert torch.equal(items[4].float(), vec[0])
        with torch.no_grad():
            c_emb = clip.encode_from_tokens(toks)
            c_init = clip.encode_from_tokens(clip.tokenize("a photo of dog"))
            spliced, _ = ComfyConceptText(clip).encode(["a photo of", 0], vec[None])
    finally:
        tok.embedding_directory = old
    assert not torch.allclose(c_emb, c_init, atol=1e-4)      # learning changed the conditioning
    assert torch.allclose(c_emb, spliced, atol=1e-5)          # and it is what training saw


def test_splicing_a_word_row_equals_prompting_the_word(env):
    text = ComfyConceptText(env["clip"])
    with torch.no_grad():
        spliced, pos = text.encode(["a photo of", 0, "and", 1], torch.stack([text.init_vector("dog"),
                                                                             text.init_vector("cat")])[:, None])
        plain = env["clip"].encode_from_tokens(env["clip"].tokenize("a photo of dog and cat"))
    assert pos == {0: [4], 1: [6]}
    assert torch.allclose(spliced, plain, atol=1e-5)


def test_interrupt_leaves_a_loadable_checkpoint_and_resume_finishes(env, monkeypatch):
    calls = {"n": 0}

    def interrupt():
        calls["n"] += 1
        if calls["n"] == 2:
            raise comfy.model_management.InterruptProcessingException()
        return False

    monkeypatch.setattr(ncl, "interrupt_check", interrupt)
    opts0 = repr(env["model"].model_options)
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        _run(env, names="cl_int", words="dog", steps=2)
    monkeypatch.undo()
    ck = os.path.join(env["dir"], "conceptlearn", "cl_int-interrupted-1.safetensors")
    assert os.path.exists(ck)
    assert not os.path.exists(os.path.join(env["dir"], "cl_int.safetensors"))
    assert lookup_embedding("conceptlearn/cl_int-interrupted-1", 768, "clip_l") is not None
    assert repr(env["model"].model_options) == opts0
    out = _run(env, names="cl_int", words="dog", steps=2, resume_from="conceptlearn/cl_int-interrupted-1.safetensors")
    assert len(out.result[4]["loss"]) == 1                   # step 2 only
    assert os.path.exists(os.path.join(env["dir"], "cl_int.safetensors"))


def test_unchanged_inputs_do_not_retrain(env, monkeypatch):
    first = _run(env, names="cl_cache", words="dog", steps=1)

    def boom(*a, **k):
        raise AssertionError("retrained")

    monkeypatch.setattr(kcl, "learn_concepts", boom)
    again = _run(env, names="cl_cache", words="dog", steps=1)
    assert torch.equal(first.result[1], again.result[1]) and first.result[4] == again.result[4]
    with pytest.raises(ValueError, match="already exists"):       # changed inputs, same name, no overwrite
        _run(env, names="cl_cache", words="dog", steps=2)
    # the run cache behind this is an internal file: on disk, but never offered as an embedding / resume point
    caches = [f for f in os.listdir(os.path.join(env["dir"], "conceptlearn")) if f.startswith(".cache-")]
    assert caches
    listed = embedding_files()
    assert "cl_cache.safetensors" in listed and not [f for f in listed if ".cache-" in f], listed


def test_bad_inputs(env):
    with pytest.raises(ValueError, match="already a word"):
        _run(env, names="dog", words="cat")
    with pytest.raises(ValueError, match="at least one image"):
        ncl.ConceptLearnNode.execute(env["model"], env["clip"], env["vae"], torch.zeros(0, 64, 64, 3), "cl_z", "dog",
                                     2, 1e-2, 1, 0, 64)
    with pytest.raises(ValueError, match="init word"):
        _run(env, names="cl_x, cl_y", words="dog")
    with pytest.raises(ValueError, match="image-major"):
        _run(env, names="cl_x", words="dog", init_masks=torch.ones(3, 64, 80))
    with pytest.raises(ValueError, match="the images"):
        _run(env, names="cl_x", words="dog", init_masks=torch.ones(1, 32, 32))
    with pytest.raises(ValueError, match="presence names concept 2"):
        _run(env, names="cl_x", words="dog", presence="0: 2")
    assert not os.path.exists(os.path.join(env["dir"], "cl_x.safetensors"))
    # a same-named embedding in another embeddings folder would make embedding:NAME ambiguous
    other = os.path.join(os.path.dirname(env["dir"]), "other_embeddings")
    os.makedirs(other, exist_ok=True)
    save_concept_embedding(os.path.join(other, "cl_elsewhere.safetensors"), torch.zeros(1, 768), {})
    folder_paths.add_model_folder_path("embeddings", other)
    try:
        with pytest.raises(ValueError, match="ambiguous"):
            _run(env, names="cl_elsewhere", words="dog", overwrite=True)
    finally:
        folder_paths.folder_names_and_paths["embeddings"][0].remove(other)


def test_user_masks_are_the_start(env):
    m = torch.zeros(1, 64, 80)
    m[:, 10:40, 20:60] = 1
    out = _run(env, names="cl_um", words="dog", steps=1, init_masks=m, save_every=1)
    assert out.result[1].shape == (1, 64, 64)
    assert not os.path.exists(os.path.join(env["dir"], "conceptlearn", "cl_um-1.safetensors"))  # no periodic at the end


def test_an_altered_embedding_checkpoint_is_refused(env, tmp_path):
    """Concept Learn's files carry a content checksum; resuming from (or reading) an altered one fails naming it."""
    import struct

    from photoops.kernels.files import ChecksumError

    path = os.path.join(env["dir"], "conceptlearn", "cl_tamper-1.safetensors")
    save_concept_embedding(path, torch.randn(1, 768), {"method": ncl.METHOD, "concept": "cl_tamper", "step": 1})
    read_concept_embedding(path)
    with open(path, "rb+") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        f.seek(8 + n + 7)
        b = f.read(1)
        f.seek(8 + n + 7)
        f.write(bytes([b[0] ^ 0x21]))
    with pytest.raises(ChecksumError, match=r"cl_tamper-1\.safetensors is corrupt or was altered"):
        ncl.ConceptLearnNode._resume("conceptlearn/cl_tamper-1.safetensors", ["cl_tamper"], 768, 1)


def test_gradient_checkpointing_learns_the_same_tokens_and_leaves_the_model_as_it_was(env, monkeypatch):
    """Checkpointed blocks re-run the forward in the backward pass, attention hooks included: the
    attention loss's gradient must still flow and the tokens must equal the plain run's; the UNet's
    modules carry nothing of it afterwards."""
    import torch.utils.checkpoint as tuc

    calls = []
    real = tuc.checkpoint

    def spy(fn, *a, **k):
        calls.append(getattr(fn, "__self__", None))
        return real(fn, *a, **k)

    monkeypatch.setattr(tuc, "checkpoint", spy)
    dm = env["model"].model.diffusion_model
    before = {id(m): m.__dict__.get("forward") for m in dm.modules()}
    kw = dict(steps=3, overwrite=True, lambda_attn=0.5, images=env["images"])
    plain = _run(env, names="cl_gc_a, cl_gc_b", **kw).result
    assert not calls
    ckpt = _run(env, names="cl_gd_a, cl_gd_b", gradient_checkpointing=True, **kw).result
    blocks = {type(m).__name__ for m in calls}
    assert blocks == {"ResBlock", "BasicTransformerBlock"}, blocks
    assert len(calls) >= 3 * sum(type(m).__name__ in blocks for m in dm.modules())   # every block, every M-step
    assert {id(m): m.__dict__.get("forward") for m in dm.modules()} == before
    for a, b in (("cl_gc_a", "cl_gd_a"), ("cl_gc_b", "cl_gd_b")):
        va = read_concept_embedding(os.path.join(env["dir"], f"{a}.safetensors"))[0]
        vb = read_concept_embedding(os.path.join(env["dir"], f"{b}.safetensors"))[0]
        v0 = ComfyConceptText(env["clip"]).init_vector("dog" if a.endswith("a") else "room")
        moved = float((va - v0).abs().max())
        assert moved > 1e-3                                     # the tokens did learn
        assert float((va - vb).abs().max()) <= 1e-5 * max(moved, 1.0), (a, float((va - vb).abs().max()))
    assert torch.equal(plain[1], ckpt[1])                       # same masks
    assert plain[4]["loss"] == pytest.approx(ckpt[4]["loss"], rel=1e-5)


def test_training_attention_has_a_backward_when_comfyui_chose_sub_quadratic(monkeypatch):
    """The full-size bench's SDXL 1024² failure, reproduced small: once free memory is short, core's
    sub-quadratic attention (its CPU default) chunks its scores and writes exp(..., out=...), which
    autograd refuses. Training's override sends such calls to core's attention_pytorch while grad is
    on: same values, a backward; calls without grad keep ComfyUI's choice."""
    import comfy.ldm.modules.attention as attn
    import comfy.model_management as mm
    from photoops.nodes.comfy.training import grad_safe_attention

    monkeypatch.setattr(mm, "get_free_memory", lambda *a, **k: (1e4, 1e4))      # short of memory: chunked path
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 96, 64, generator=g, requires_grad=True) for _ in range(3))
    with pytest.raises(RuntimeError, match="out="):
        attn.attention_sub_quad(q, k, v, 2)
    seen = []

    def previous(func, *args, **kwargs):                 # another pack's override keeps being called
        seen.append(func.__name__)
        return func(*args, **kwargs)

    opts = {"optimized_attention_override": grad_safe_attention(previous)}
    out = attn.attention_sub_quad(q, k, v, 2, transformer_options=opts)
    ref = attn.attention_basic(q.detach(), k.detach(), v.detach(), 2)
    assert torch.allclose(out, ref, atol=1e-5)
    out.square().sum().backward()
    assert q.grad is not None and bool(q.grad.abs().sum() > 0)
    assert seen == ["attention_pytorch"]
    with torch.no_grad():                                # no grad: ComfyUI's own choice runs
        plain = attn.attention_sub_quad(q, k, v, 2, transformer_options=opts)
    assert seen[-1] == "attention_sub_quad" and torch.allclose(plain, ref, atol=1e-5)
