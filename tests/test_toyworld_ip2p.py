"""The toy InstructPix2Pix (tools/toyworld/ip2p.py): conversion from the T2I model, tokenizer, edits,
and (when committed) the trained model's text-instructed edit quality."""
import os

import pytest
import torch
from tiny import one_thread  # noqa: F401

from tools.toyworld import ip2p
from tools.toyworld.model import load_model
from tools.toyworld.world import render_batch, sample_scenes


@pytest.fixture(scope="module")
def t2i():
    return load_model(ip2p.T2I_DIR)


def test_conversion_is_exact_at_init(t2i):
    m = ip2p.ip2p_from_t2i(t2i)
    assert m.unet.config.in_channels == 6 and m.unet.config.addition_embed_type is None
    assert torch.equal(m.unet.conv_in.weight[:, 3:], torch.zeros_like(m.unet.conv_in.weight[:, 3:]))
    cap = "a red circle on a white background"
    e_old = t2i.encode_prompts([cap, cap])
    e_new = m.encode_prompts([cap, cap])
    assert torch.equal(e_old, e_new)                        # old words keep their ids' embeddings
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 32, 32, generator=g)
    t = torch.tensor([700, 50])
    empty = t2i.encode_prompts(["", ""])
    with torch.no_grad():
        new = m.unet(torch.cat([x, torch.randn(x.shape, generator=g)], 1), t, e_new).sample
        add = t2i.unet.add_embedding
        orig = add.forward
        add.forward = lambda h: orig(empty)                 # the pooled path, fed the empty prompt
        try:
            old = t2i.unet(x, t, e_old).sample
        finally:
            del add.forward
    assert (new - old).abs().max() < 1e-5


def test_instruction_words_are_single_tokens():
    tok, _ = ip2p.build_ip2p_tokenizer()
    for w in ip2p.IP2P_WORDS:
        assert len(tok(w, add_special_tokens=False).input_ids) == 1, w
    ids = tok("make the background black", add_special_tokens=False).input_ids
    assert len(ids) == 4


def test_random_edits_change_exactly_one_attribute():
    items = ip2p.random_edits(64, torch.Generator().manual_seed(3))
    kinds = set()
    for s, t, p in items:
        changed = [a for a in ("fg", "bg") if getattr(s, a) != getattr(t, a)]
        assert len(changed) == 1 and (s.shape, s.centre, s.size) == (t.shape, t.centre, t.size)
        kinds.add(changed[0])
        assert getattr(t, changed[0]) in p.split()
    assert kinds == {"fg", "bg"}


def test_edit_metrics_on_exact_edits():
    scenes = sample_scenes(6, seed=1)
    edit = ip2p.Edit(fg="blue")
    scenes = [s for s in scenes if edit.applies_to(s)]
    targets = [edit.apply(s) for s in scenes]
    res = ip2p.edit_metrics(render_batch(targets), scenes, targets, [edit] * len(scenes))
    assert res["success"] == 1.0 and res["preserve_mae"] == 0.0 and res["target_mae"] == 0.0
    res = ip2p.edit_metrics(render_batch(scenes), scenes, targets, [edit] * len(scenes))
    assert res["success"] == 0.0 and res["preserve_mae"] == 0.0 and res["target_mae"] > 0


@pytest.mark.skipif(not os.path.isdir(ip2p.IP2P_DIR), reason="toy IP2P model not committed")
def test_committed_model_follows_text_instructions():
    m = ip2p.load_ip2p()
    res, _, _ = ip2p.evaluate_ip2p(m, n=12, seed=3, steps=10)
    # chance (all three attributes right by luck) is ~2 %; see tools/toyworld/ip2p_model/toy_info.json
    assert res["success"] >= 0.5, res


def test_noise_mask_keeps_the_photo_outside_and_edits_inside():
    """ip2p_sample's ``mask`` (a LATENT noise mask, as core samplers apply it): outside, the photo
    exactly; inside, the same as the unmasked edit's first steps would make it (not the photo)."""
    from tools.toyworld.world import object_masks

    m = ip2p.load_ip2p()
    scenes = sample_scenes(3, seed=5)
    x = render_batch(scenes)
    mask = object_masks(scenes).float()[:, None]
    free = ip2p.ip2p_sample(m, x, ["make it blue"] * 3, steps=4, seed=1)
    held = ip2p.ip2p_sample(m, x, ["make it blue"] * 3, steps=4, seed=1, mask=mask)
    out = (1 - mask).expand_as(x).bool()
    assert torch.equal(held[out], x[out])
    inside = mask.expand_as(x).bool()
    assert (held[inside] - x[inside]).abs().max() > 0.1          # the object was edited
    assert not torch.equal(held, free)
    full = ip2p.ip2p_sample(m, x, ["make it blue"] * 3, steps=4, seed=1, mask=torch.ones_like(mask))
    assert torch.equal(full, free)                               # an all-ones mask changes nothing
