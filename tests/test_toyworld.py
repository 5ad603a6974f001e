"""Tests of the toy world (tools/toyworld): world, scorer, tokenizer, model save/load, training resume.

Offline only; nothing is downloaded. Runs in well under a minute on 2 CPU cores.
"""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
try:  # tests/conftest.py normally makes ``tools`` importable
    import tools.toyworld  # noqa: F401
except ImportError:
    # Without it: expose only ``tools`` (never the repository root, whose ``nodes`` package
    # would shadow ComfyUI's ``nodes`` module), through a symlink in a temporary folder.
    import tempfile

    _tmp = tempfile.mkdtemp(prefix="toyworld_path_")
    os.symlink(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"),
               os.path.join(_tmp, "tools"), target_is_directory=True)
    sys.path.insert(0, _tmp)

import json  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from tools.toyworld import (  # noqa: E402
    BG_COLOURS,
    FG_COLOURS,
    SHAPES,
    Scene,
    caption,
    object_mask,
    render,
    render_batch,
    sample_scenes,
    scene_accuracy,
    score,
    with_colour,
)
from tools.toyworld.model import WORDS, build_model, build_tokenizer, load_model, save_model  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """These models are tiny: one thread is faster, and far faster when the CPU is shared
    (with 2 threads on a loaded 2-core machine a batch-2 UNet call took 2.8 s instead of 0.04 s)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# --------------------------------------------------------------------------- world


def test_render_range_shape_and_palette():
    s = Scene("red", "circle", "white", (16.0, 16.0), 16.0)
    img = render(s)
    assert img.shape == (3, 32, 32) and img.dtype == torch.float32
    assert img.min() >= -1 and img.max() <= 1
    # exactly two colours, object pixels = mask
    m = object_mask(s)
    assert 150 < int(m.sum()) < 256  # disc of diameter 16 -> about 201 px
    assert img[:, m].unique(dim=1).shape[1] == 1
    assert img[:, ~m].unique(dim=1).shape[1] == 1
    assert not m[0].any() and not m[-1].any() and not m[:, 0].any() and not m[:, -1].any()
    assert caption(s) == "a red circle on a white background"


def test_rendering_deterministic_under_seed_and_differs_across_seeds():
    a = sample_scenes(32, seed=3)
    b = sample_scenes(32, seed=3)
    c = sample_scenes(32, seed=4)
    assert a == b
    assert torch.equal(render_batch(a), render_batch(b))
    assert a != c
    assert not torch.equal(render_batch(a), render_batch(c))
    g = torch.Generator().manual_seed(3)
    assert sample_scenes(32, generator=g) == a
    # the global RNG is not used
    torch.manual_seed(0)
    x = sample_scenes(4, seed=9)
    torch.manual_seed(1)
    assert sample_scenes(4, seed=9) == x
    # all attribute values occur
    many = sample_scenes(400, seed=0)
    assert {s.fg for s in many} == set(FG_COLOURS)
    assert {s.shape for s in many} == set(SHAPES)
    assert {s.bg for s in many} == set(BG_COLOURS)


def test_with_colour_changes_exactly_the_object_pixels():
    for s in sample_scenes(24, seed=11):
        src = render(s)
        mask = object_mask(s)
        for new in FG_COLOURS:
            t = with_colour(s, new)
            assert (t.shape, t.bg, t.centre, t.size) == (s.shape, s.bg, s.centre, s.size)
            changed = (render(t) != src).any(0)
            assert not changed[~mask].any(), "pixels outside the object changed"
            if new == s.fg:
                assert not changed.any()
            else:
                assert torch.equal(changed, mask)
    with pytest.raises(ValueError):
        with_colour(s, "white")


# --------------------------------------------------------------------------- scorer


def test_scorer_accuracy_on_clean_and_blurred_renders():
    scenes = sample_scenes(500, seed=2024)
    imgs = render_batch(scenes)
    clean = scene_accuracy(imgs, scenes)
    assert clean["all"] >= 0.99, clean
    blurred = scene_accuracy(imgs, scenes, blur=True)
    assert blurred["all"] >= 0.97, blurred


def test_scorer_reads_mask_and_centroid_and_rejects_wrong_answers():
    for s in sample_scenes(20, seed=5):
        r = score(render(s))
        assert (r["fg"], r["shape"], r["bg"]) == (s.fg, s.shape, s.bg)
        assert (torch.from_numpy(r["mask"]) == object_mask(s)).all()
        if s.shape != "triangle":  # a triangle's centroid is not its box centre
            assert abs(r["centroid"][0] - s.centre[0]) < 0.75 and abs(r["centroid"][1] - s.centre[1]) < 0.75
        other = with_colour(s, next(c for c in FG_COLOURS if c != s.fg))
        assert score(render(other))["fg"] == other.fg != s.fg
    # a flat image has no object
    flat = render(Scene("red", "square", "gray", (16.0, 16.0), 10.0))
    flat[:] = flat[:, :1, :1]
    r = score(flat)
    assert r["fg"] is None and r["shape"] is None and r["bg"] == "gray"


# --------------------------------------------------------------------------- tokenizer / model


def test_tokenizer_one_id_per_world_word():
    tok = build_tokenizer()
    ids = {}
    for w in WORDS:
        got = tok(w, add_special_tokens=False)["input_ids"]
        assert len(got) == 1, (w, got)
        ids[w] = got[0]
    assert len(set(ids.values())) == len(WORDS)
    for w in ("a", "on", "background", "and", "photo", "of"):
        assert w in ids
    enc = tok("a blue triangle on a purple background")["input_ids"]
    assert enc == [tok.bos_token_id, ids["a"], ids["blue"], ids["triangle"], ids["on"], ids["a"], ids["purple"],
                   ids["background"], tok.eos_token_id]
    # the 512 byte symbols come first, as CLIP expects
    vocab = tok.get_vocab()
    assert vocab["!"] == 0 and vocab["a</w>"] == 256 + ord("a") - ord("!")
    assert vocab["<|endoftext|>"] == len(vocab) - 1


def _state(model):
    return {**{"te." + k: v for k, v in model.text_encoder.state_dict().items()},
            **{"unet." + k: v for k, v in model.unet.state_dict().items()}}


def _cfg(cfg):
    return json.loads(json.dumps({k: v for k, v in dict(cfg).items() if not k.startswith("_")}))


def test_save_load_roundtrip_bit_exact(tmp_path):
    m = build_model(seed=0)
    save_model(m, str(tmp_path))
    for f in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors", "tokenizer/vocab.json",
              "tokenizer/merges.json", "scheduler/scheduler_config.json", "vae/config.json", "unet/config.json"):
        assert (tmp_path / f).exists(), f
    assert not list(tmp_path.rglob("*.bin")) and not list(tmp_path.rglob("*.pt")) and not list(tmp_path.rglob("*.pkl"))
    m2 = load_model(str(tmp_path))
    a, b = _state(m), _state(m2)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert m2.tokenizer.get_vocab() == m.tokenizer.get_vocab()
    assert _cfg(m2.unet.config) == _cfg(m.unet.config)
    assert _cfg(m2.scheduler.config) == _cfg(m.scheduler.config)
    assert _cfg(m2.text_encoder.config.to_dict()) == _cfg(m.text_encoder.config.to_dict())
    assert m2.scheduler.config.prediction_type == "epsilon"
    assert m2.scheduler.config.beta_schedule == "squaredcos_cap_v2"
    assert m2.scheduler.config.num_train_timesteps == 1000
    with torch.no_grad():
        x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        p = ["a red circle on a white background", ""]
        y1 = m.unet(x, 500, m.encode_prompts(p)).sample
        y2 = m2.unet(x, 500, m2.encode_prompts(p)).sample
    assert torch.equal(y1, y2)
    # a different seed gives different weights (the comparison above can fail)
    m3 = build_model(seed=1)
    assert not torch.equal(_state(m3)["unet.conv_in.weight"], a["unet.conv_in.weight"])
    # the whole model stays small
    size = sum(f.stat().st_size for f in tmp_path.rglob("*") if f.is_file())
    assert size < 20e6


def test_identity_vae_and_diffusers_pipeline_match_the_sampler():
    from tools.toyworld.sample import ddim_sample

    m = build_model(seed=0)
    x = render_batch(sample_scenes(2, seed=1))
    z = m.vae.encode(x).latent_dist.mode()
    assert torch.equal(z, x)
    assert torch.equal(m.vae.encode(x).latent_dist.sample(), x)
    assert torch.equal(m.vae.decode(z).sample, x)
    pipe = m.pipeline()
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae_scale_factor == 1
    prompt = "a red circle on a white background"
    lat = pipe(prompt, num_inference_steps=3, guidance_scale=3.0, height=32, width=32, output_type="latent",
               generator=torch.Generator().manual_seed(0)).images
    ours = ddim_sample(m, [prompt], steps=3, cfg=3.0, seed=0)
    assert torch.allclose(lat, ours, atol=1e-5)


def test_training_resume_is_bit_exact(tmp_path):
    from safetensors.torch import load_file

    from tools.toyworld import train

    common = ["--steps", "4", "--batch", "2", "--warmup", "2", "--eval-every", "0", "--final-eval-n", "0",
              "--log-every", "1"]
    assert train.main(["--out", str(tmp_path / "a"), *common]) == 0
    assert train.main(["--out", str(tmp_path / "b"), *common, "--stop-after", "2"]) == 0
    with open(tmp_path / "b" / "resume.json") as f:
        assert json.load(f)["step"] == 2
    assert train.main(["--out", str(tmp_path / "b"), *common]) == 0
    a = load_file(str(tmp_path / "a" / "resume-0000004.safetensors"))
    b = load_file(str(tmp_path / "b" / "resume-0000004.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert len(list((tmp_path / "b").glob("resume-*.safetensors"))) == 1
    m = load_model(str(tmp_path / "a" / "model"))
    assert torch.equal(m.unet.state_dict()["conv_in.weight"], a["ema.unet.conv_in.weight"])


def test_world_b_has_smaller_objects_and_the_scorer_reads_them():
    """Toy world B (issue 17): the same vocabulary, objects of 7-13 px (world A: 10-22 px); the scorer stays
    exact on clean renders; an unknown world is an error."""
    from tools.toyworld import scorer, world

    a, b = world.sample_scenes(300, seed=3), world.sample_scenes(300, seed=3, world="B")
    assert [s.fg for s in a] == [s.fg for s in b]                       # same draws, other sizes
    assert all(7.0 <= s.size <= 13.0 for s in b) and max(s.size for s in a) > 14.0
    frac = lambda scenes: float(torch.stack([world.object_mask(s) for s in scenes]).float().mean())  # noqa: E731
    assert frac(b) < 0.5 * frac(a)
    assert scorer.scene_accuracy(world.render_batch(b[:200]), b[:200])["all"] == 1.0
    for name, (lo, hi) in (("C", (9.0, 17.0)), ("D", (13.0, 26.0)), ("E", (8.0, 15.0)), ("F", (6.0, 12.0)),
                         ("G", (6.0, 20.0))):
        scenes = world.sample_scenes(300, seed=3, world=name)
        assert [s.fg for s in scenes] == [s.fg for s in a] and all(lo <= s.size <= hi for s in scenes)
        assert scorer.scene_accuracy(world.render_batch(scenes[:200]), scenes[:200])["all"] == 1.0
    with pytest.raises(ValueError, match="unknown toy world"):
        world.sample_scenes(1, seed=0, world="Z")
