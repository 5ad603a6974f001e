"""Background lock (issue 17): the Inversion Sampler keeps the photo's own trajectory outside a mask.

In a real ComfyUI, in-process, on the SD1.5-format random fixture: with a hard mask (feather 0) an
edit equals the exact reconstruction — the inversion's source trajectory, ending at the photo's
latent — bit for bit outside the mask, and differs inside; in one pass, the Semantic Guide's masks
free only where the concepts acted; the ladder survives Save/Load.  (A replay with the source prompt
reproduces that trajectory to ~1e-5 in ComfyUI, not bit for bit: batched model calls round
differently from the inversion's, so "exact" is measured against the trajectory itself.)
"""
import pytest
import torch

from comfy_harness import inprocess

inprocess.require("test_comfy_background_lock")

import comfy.samplers  # noqa: E402

from photoops.kernels import inversion as kinv  # noqa: E402
from photoops.nodes import inversion as ninv  # noqa: E402
from photoops.nodes import semantic_guide as nsg  # noqa: E402


@pytest.fixture(scope="module")
def env():
    model, clip, _, _ = inprocess.load_fixture()
    torch.manual_seed(0)
    enc = lambda t: clip.encode_from_tokens_scheduled(clip.tokenize(t))  # noqa: E731
    return {"model": model, "clip": clip, "pos": enc("a photo of a red circle"), "tgt": enc("a photo of a blue square"),
            "neg": enc(""), "latent": {"samples": torch.randn(1, 4, 8, 8) * 5.0}}


def _sigmas(model, steps=8):
    return comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", steps).cpu()


def _run(env, guider, sampler):
    lat = env["latent"]["samples"]
    return guider.sample(torch.zeros_like(lat), lat, sampler, _sigmas(env["model"]), disable_pbar=True, seed=0)


def _cfg(env, positive, cfg=2.0):
    g = comfy.samplers.CFGGuider(env["model"])
    g.set_conds(positive, env["neg"])
    g.set_cfg(cfg)
    return g


@pytest.mark.parametrize("method", ["ddpm", "dpmpp_2m_sde", "eta"])
def test_hard_mask_keeps_the_reconstruction_exactly_outside(env, method):
    kw = {"store_optimal_noise": True} if method == "eta" else {}
    inv, _ = ninv.InvertNode.execute(env["model"], env["pos"], env["neg"], env["latent"], _sigmas(env["model"]),
                                     method, 1, 2.0, 3, **kw).result
    assert inv.source_ladder.shape == (inv.steps - inv.skip + 1, 1, 4, 8, 8)
    recon = _run(env, _cfg(env, env["pos"]), ninv.InversionSamplerNode.execute(inv).result[0])
    mask = torch.zeros(1, 64, 64)
    mask[:, 16:48, 8:40] = 1.0                                      # latent rows 2..5, cols 1..4
    inside = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    inside[..., 2:6, 1:5] = True
    locked = ninv.InversionSamplerNode.execute(inv, lock_mask=mask, feather=0.0).result[0]
    edit = _run(env, _cfg(env, env["tgt"], 5.0), locked)
    free = _run(env, _cfg(env, env["tgt"], 5.0), ninv.InversionSamplerNode.execute(inv).result[0])
    outside = ~inside.expand_as(edit)
    exact = env["model"].model.process_latent_out(inv.source_ladder[-1].clone())   # the photo, as the sampler returns it
    assert float((recon - exact).abs().max()) <= 1e-4 * float(exact.abs().max())   # what a reconstruction gives
    assert torch.equal(edit[outside], exact[outside])                    # bit for bit
    assert (edit[inside.expand_as(edit)] - recon[inside.expand_as(edit)]).abs().max() > 1e-2   # the edit acted
    assert (free[outside] - recon[outside]).abs().max() > 1e-2          # without the lock it leaks everywhere
    # with the source prompt, the lock changes nothing (the replay is on the ladder already)
    same = _run(env, _cfg(env, env["pos"]), locked)
    assert float((same - recon).abs().max()) <= 1e-5 * float(recon.abs().max())


def test_feather_softens_the_edge(env):
    inv, _ = ninv.InvertNode.execute(env["model"], env["pos"], env["neg"], env["latent"], _sigmas(env["model"]),
                                     "ddpm", 0, 1.0, 3).result
    mask = torch.zeros(1, 64, 64)
    mask[:, :, :32] = 1.0
    hard = _run(env, _cfg(env, env["tgt"], 5.0), ninv.InversionSamplerNode.execute(inv, lock_mask=mask,
                                                                                    feather=0.0).result[0])
    soft = _run(env, _cfg(env, env["tgt"], 5.0), ninv.InversionSamplerNode.execute(inv, lock_mask=mask,
                                                                                    feather=16.0).result[0])
    recon = env["model"].model.process_latent_out(inv.source_ladder[-1].clone())
    # the column right of the edge is locked exactly by the hard mask, partly freed by the feathered one
    assert torch.equal(hard[..., 4], recon[..., 4])
    assert (soft[..., 4] - recon[..., 4]).abs().max() > 1e-4
    assert torch.equal(soft[..., 7], recon[..., 7]) or (soft[..., 7] - recon[..., 7]).abs().max() < \
        (soft[..., 4] - recon[..., 4]).abs().max()


@pytest.mark.parametrize("masks", ["noise", "cross_attention"])
def test_one_pass_lock_from_the_semantic_guides_masks(env, masks):
    """The guide's own masks drive the lock during the same run: where no concept acted in >= threshold of
    the steps (the final region, +1 latent pixel) the result is the reconstruction exactly. SEGA's region:
    its per-channel guidance masks (noise) or the concept's cross-attention mask."""
    inv, _ = ninv.InvertNode.execute(env["model"], env["neg"], env["neg"], env["latent"], _sigmas(env["model"]),
                                     "ddpm", 0, 1.0, 3).result
    recon = env["model"].model.process_latent_out(inv.source_ladder[-1].clone())
    concept = nsg.EditConceptNode.execute(env["clip"], "blue square", direction="add", scale=7.0, threshold=0.9,
                                          warmup=0, cooldown=-1, weight=1.0).result[0]
    guider, store = nsg.SemanticGuideNode.execute(env["model"], env["neg"], env["neg"], concept, "sega", 1.0, False,
                                                  0.0, 0.6, masks, "percentile").result
    sampler = ninv.InversionSamplerNode.execute(inv, concept_masks=store, feather=0.0, concept_threshold=0.5).result[0]
    out = _run(env, guider, sampler)
    region = store.lock_region(0.5)
    freed = torch.nn.functional.max_pool2d(region[:, None], 3, 1, 1)[:, 0] > 0
    kept = (~freed)[:, None].expand_as(out)
    assert 0 < int(freed.sum()) < freed.numel()                           # a partial region, so the test means something
    assert torch.equal(out[kept], recon[kept])
    assert (out[~kept] - recon[~kept]).abs().max() > 1e-3


def test_lock_inputs_are_checked_and_the_ladder_is_saved(env, tmp_path):
    from photoops.kernels.inversion_state import load_inversion, save_inversion

    inv, _ = ninv.InvertNode.execute(env["model"], env["pos"], env["neg"], env["latent"], _sigmas(env["model"]),
                                     "ddpm", 2, 1.0, 3).result
    path = save_inversion(inv, tmp_path / "inv.safetensors")
    back = load_inversion(path)
    assert torch.equal(back.source_ladder, inv.source_ladder)
    mask = torch.ones(1, 64, 64)
    with pytest.raises(ValueError, match="concept_masks or auto_lock, not lock_mask and concept_masks"):
        ninv.InversionSamplerNode.execute(inv, lock_mask=mask, concept_masks=nsg.MaskStore(1))
    with pytest.raises(ValueError, match="not lock_mask and auto_lock 'edit'"):
        ninv.InversionSamplerNode.execute(inv, lock_mask=mask, auto_lock="edit")
    with pytest.raises(ValueError, match="auto_lock must be one of"):
        ninv.InversionSamplerNode.execute(inv, auto_lock="on")
    with pytest.raises(ValueError, match=r"auto_lock_start must be in \[0, 1\]"):
        ninv.InversionSamplerNode.execute(inv, auto_lock="edit", auto_lock_start=1.5)
    with pytest.raises(ValueError, match="2 masks, the inversion 1"):
        ninv.InversionSamplerNode.execute(inv, lock_mask=torch.ones(2, 64, 64))
    back.source_ladder = None                                            # an INVERSION saved before the lock
    with pytest.raises(ValueError, match="no source ladder"):
        ninv.InversionSamplerNode.execute(back, lock_mask=mask)
    with pytest.raises(ValueError, match="no source ladder"):
        ninv.InversionSamplerNode.execute(back, auto_lock="edit")


def test_kernel_lock_equation():
    """(I16) on a toy replay: where the mask is 0 the latent is the source level, bit for bit, at every step."""
    g = torch.Generator().manual_seed(0)
    src = torch.randn(4, 1, 2, 4, 4, generator=g)
    m = torch.zeros(1, 1, 4, 4)
    m[..., :2] = 1.0
    lock = kinv.BackgroundLock(src, m, skip=1)
    x = torch.randn(1, 2, 4, 4, generator=g)
    for level in (1, 2, 3, 4):
        y = lock(x, level)
        assert torch.equal(y[..., 2:], src[level - 1][..., 2:]) and torch.equal(y[..., :2], x[..., :2])
    with pytest.raises(ValueError, match="reached level 5"):
        lock(x, 5)
    assert torch.equal(kinv.BackgroundLock(src, lambda i: None)(x, 1), x)


@pytest.mark.parametrize("method", ["ddpm", "eta", "dpmpp_2m_sde"])
def test_edit_lock_keeps_what_the_edit_did_not_move(env, method):
    """auto_lock 'edit' (one pass, no mask wired): the result is the photo's own trajectory bit for bit
    on the pixels the edit moved least, and the edit acts on the rest; with the source prompt nothing
    moves, so the lock changes nothing."""
    kw = {"store_optimal_noise": True} if method == "eta" else {}
    inv, _ = ninv.InvertNode.execute(env["model"], env["pos"], env["neg"], env["latent"], _sigmas(env["model"]),
                                     method, 1, 2.0, 3, **kw).result
    exact = env["model"].model.process_latent_out(inv.source_ladder[-1].clone())
    locked = ninv.InversionSamplerNode.execute(inv, auto_lock="edit", auto_lock_start=0.25, feather=0.0).result[0]
    edit = _run(env, _cfg(env, env["tgt"], 5.0), locked)
    free = _run(env, _cfg(env, env["tgt"], 5.0), ninv.InversionSamplerNode.execute(inv).result[0])
    kept = (edit == exact).all(1)                                          # [1, 8, 8]: pixels left as the photo
    assert 0 < int(kept.sum()) < kept.numel()                              # a partial region: the lock chose
    k = kept[:, None].expand_as(edit)
    assert (free[k] - exact[k]).abs().max() > 1e-2                         # without the lock these pixels moved
    assert (edit[~k] - exact[~k]).abs().max() > 1e-2                       # the edit acted on the rest
    recon = _run(env, _cfg(env, env["pos"]), ninv.InversionSamplerNode.execute(inv).result[0])
    same = _run(env, _cfg(env, env["pos"]), locked)
    assert float((same - recon).abs().max()) <= 1e-4 * float(recon.abs().max())


def test_kernel_edit_lock_equations():
    """(I16)-(I18): the pixels the candidate moved (grown by 1 px) keep it, the rest are the source level bit for
    bit; nothing is locked before ``start``; a candidate that did not move at all is the source."""
    g = torch.Generator().manual_seed(0)
    src = torch.randn(5, 2, 3, 8, 8, generator=g)                         # 4 replayed steps from level skip=2
    lock = kinv.EditLock(src, skip=2, start=0.5)
    x = src[3].clone() + 1e-3 * torch.randn(2, 3, 8, 8, generator=g)      # small drift everywhere ...
    x[0, :, 2:4, 2:5] += 3.0                                               # ... and a real edit in a block
    x[1, :, 5:7, 0:2] -= 2.0
    assert torch.equal(lock(x, 3), x) and lock.last is None                # level 3 = step 1 of 4 < start 0.5
    y = lock(x, 5)
    want = torch.zeros(2, 8, 8, dtype=torch.bool)
    want[0, 1:5, 1:6] = True                                               # the block + 1 px
    want[1, 4:8, 0:3] = True
    assert torch.equal(lock.last[:, 0] > 0, want) and torch.equal(lock.last, lock.last.round())
    w = want[:, None].expand_as(x)
    assert torch.equal(y[w], x[w]) and torch.equal(y[~w], src[3][~w])
    assert torch.equal(lock(src[4].clone(), 6), src[4])                    # no edit: the photo's trajectory
    with pytest.raises(ValueError, match="reached level 7"):
        lock(x, 7)
    soft = kinv.EditLock(src, skip=2, start=0.0, feather=1.0)
    soft(x, 5)
    e = soft.last[0, 0]
    assert 0 < float(e[0, 7]) < float(e[1, 6]) < float(e[1, 5]) < float(e[3, 3]) <= 1.0   # a feathered edge
    with pytest.raises(ValueError, match="start"):
        kinv.EditLock(src, start=1.5)
    with pytest.raises(ValueError, match="grow and feather"):
        kinv.EditLock(src, grow=-1)


def test_sega_reports_attention_masks_without_changing_its_guidance(env):
    """In sega mode the masks input only chooses the reported region: the sampled result is the same
    bits whether the concept's attention is recorded (cross_attention) or not (noise), and the two
    stores hold different regions."""
    inv, _ = ninv.InvertNode.execute(env["model"], env["neg"], env["neg"], env["latent"], _sigmas(env["model"]),
                                     "ddpm", 0, 1.0, 3).result
    concept = nsg.EditConceptNode.execute(env["clip"], "blue square", direction="add", scale=7.0, threshold=0.9,
                                          warmup=0, cooldown=-1, weight=1.0).result[0]
    outs, regions = [], []
    for masks in ("noise", "cross_attention"):
        guider, store = nsg.SemanticGuideNode.execute(env["model"], env["neg"], env["neg"], concept, "sega", 1.0,
                                                      False, 0.3, 0.6, masks, "otsu").result
        outs.append(_run(env, guider, ninv.InversionSamplerNode.execute(inv).result[0]))
        regions.append(store.lock_region(0.25))
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(regions[0], regions[1])
