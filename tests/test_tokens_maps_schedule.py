"""Word->token bookkeeping, mask/heat-map helpers and schedule conversions."""
import math

import pytest
import torch

from photoops.kernels import maps
from photoops.kernels.schedule import VPSchedule, abar_to_sigma, k_to_vp, sigma_to_abar, vp_to_k
from photoops.kernels.tokens import WordNotFoundError, find_word_positions, parse_weights, tokenize_prompt
from tiny import byte_tokenizer

TOK = byte_tokenizer()
BOS, EOS = TOK.bos_token_id, TOK.eos_token_id


def enc(text):
    return TOK(text)["input_ids"][1:-1]


def chunks_of(text, **kw):
    return tokenize_prompt(text, enc, BOS, EOS, **kw)


def positions(text, word, **kw):
    return find_word_positions(chunks_of(text, **kw), enc(word), special=(BOS, EOS), word=word,
                               decode=lambda i: TOK.convert_ids_to_tokens(i))


# -- prompt syntax ------------------------------------------------------------------------
def test_parse_weights_follows_comfyui_syntax():
    assert parse_weights("a (red:1.3) circle") == [("a ", 1.0), ("red", 1.3), (" circle", 1.0)]
    w = parse_weights("((big)) cat")
    assert w[0][0] == "big" and math.isclose(w[0][1], 1.21)
    assert parse_weights(r"a \(not weighted\) cat") == [("a (not weighted) cat", 1.0)]
    assert parse_weights("(a (b:2.0) c:0.5)") == [("a ", 0.5), ("b", 2.0), (" c", 0.5)]


def test_chunks_are_77_long_with_bos_eos():
    ch = chunks_of("a red circle")
    assert len(ch) == 1 and len(ch[0]) == 77
    assert ch[0][0][0] == BOS and ch[0][1 + len(enc("a red circle"))][0] == EOS


def test_word_positions_simple_and_multi_token():
    # byte tokenizer: one token per character, the last one with </w>: BOS a</w> r e d</w> ...
    assert positions("a red circle", "red") == [2, 3, 4]
    assert positions("a (red:1.4) circle", "red") == [2, 3, 4]
    # every occurrence counts
    assert positions("red and red", "red") == [1, 2, 3, 7, 8, 9]


def test_word_not_in_prompt_lists_tokens():
    with pytest.raises(WordNotFoundError, match="'blue' is not in the prompt; its tokens are: .*'c'"):
        positions("a red circle", "blue")
    with pytest.raises(WordNotFoundError, match="tokenizes to nothing"):
        find_word_positions(chunks_of("a cat"), [], word="")


def test_long_prompt_positions_in_second_chunk():
    words = ["w%02d" % i for i in range(40)]          # 3 chars + space -> 4 tokens each; short groups
    prompt = " ".join(words)
    ch = chunks_of(prompt)
    assert len(ch) >= 2 and all(len(c) == 77 for c in ch)
    pos = positions(prompt, "w39")
    assert all(p >= 77 for p in pos)
    flat = [it[0] for c in ch for it in c]
    assert [flat[p] for p in pos] == enc("w39")


def test_large_segment_split_across_chunks_is_found():
    prompt = "x" * 74 + "abcdef"         # one 80-token segment: split after 75 tokens
    ch = chunks_of(prompt)
    assert len(ch) == 2
    pos = positions(prompt, "xabcdef")   # word spans the chunk boundary (EOS, BOS skipped)
    flat = [it[0] for c in ch for it in c]
    assert [TOK.convert_ids_to_tokens(flat[p]) for p in pos][-3:] == ["d", "e", "f</w>"]
    assert 76 not in pos and 77 not in pos   # EOS of chunk 0 and BOS of chunk 1 skipped


def test_embedding_segments_match_by_vector():
    emb = torch.randn(2, 8)
    lookup = {"myconcept": emb}.get
    ch = chunks_of("a photo of embedding:myconcept on grass", embeddings=lookup)
    flat = [it[0] for c in ch for it in c]
    pos = find_word_positions(ch, [emb[0], emb[1]], special=(BOS, EOS), word="embedding:myconcept")
    assert len(pos) == 2 and all(torch.equal(flat[p], emb[i]) for i, p in enumerate(pos))
    # an unknown embedding is dropped, like ComfyUI does
    ch2 = chunks_of("a embedding:nothing cat", embeddings=lookup)
    assert not any(isinstance(it[0], torch.Tensor) for it in ch2[0])


# -- maps -----------------------------------------------------------------------------------
def test_gaussian_kernel_sums_to_one_and_constant_is_unchanged():
    """P22."""
    k = maps.gaussian_kernel1d(0.5, 3)
    assert abs(float(k.sum()) - 1) < 1e-7
    c = torch.full((2, 16, 16), 0.37)
    torch.testing.assert_close(maps.gaussian_blur(c, 0.5, 3), c, atol=1e-7, rtol=0)


def test_quantile_mask_fraction_and_monotonicity():
    """P11/P12: kept fraction ~ 1 - lambda; higher lambda keeps a subset."""
    torch.manual_seed(0)
    a = torch.rand(3, 64, 64)
    m1 = maps.binarize(a, "quantile", 0.75)
    m2 = maps.binarize(a, "quantile", 0.9)
    frac = m1.flatten(1).mean(1)
    assert torch.all((frac - 0.25).abs() <= 1 / 4096 + 1e-6)
    assert torch.all(m2 <= m1)
    assert set(m1.unique().tolist()) <= {0.0, 1.0}


def test_threshold_mask_is_strict_on_max_normalised_map():
    a = torch.tensor([[[0.0, 0.2], [0.21, 1.0]]]) * 5
    assert maps.binarize(a, "threshold", 0.2).tolist() == [[[0.0, 0.0], [1.0, 1.0]]]
    with pytest.raises(ValueError):
        maps.binarize(a, "threshold", 1.5)
    with pytest.raises(ValueError):
        maps.binarize(a, "median", 0.5)


def test_heatmap_and_overlay_shapes_and_range():
    a = torch.rand(2, 8, 8)
    h = maps.heatmap(a)
    assert h.shape == (2, 8, 8, 3) and float(h.min()) >= 0 and float(h.max()) <= 1
    img = torch.rand(2, 64, 64, 3)
    o = maps.overlay(img, a)
    assert o.shape == (2, 64, 64, 3)
    with pytest.raises(ValueError, match="does not match"):
        maps.overlay(torch.rand(3, 64, 64, 3), a)


# -- schedule -------------------------------------------------------------------------------
def test_scaled_linear_matches_diffusers():
    from diffusers import DDPMScheduler

    ref = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod
    torch.testing.assert_close(VPSchedule.scaled_linear().alphas_cumprod.float(), ref, atol=1e-7, rtol=1e-6)
    ref = DDPMScheduler(beta_schedule="squaredcos_cap_v2").alphas_cumprod
    torch.testing.assert_close(VPSchedule.cosine().alphas_cumprod.float(), ref, atol=1e-6, rtol=1e-5)


def test_sigma_timestep_roundtrip_and_vp_identity():
    s = VPSchedule.scaled_linear()
    t = torch.arange(0, 1000, 37)
    assert torch.equal(s.timestep(s.sigma(t)), t.float())
    assert abs(s.sigma_min - 0.0292) < 1e-3 and abs(s.sigma_max - 14.61) < 1e-2
    sig = torch.tensor([0.1, 1.0, 7.0], dtype=torch.float64)
    torch.testing.assert_close(abar_to_sigma(sigma_to_abar(sig)), sig)
    x0, eps = torch.randn(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    abar = float(sigma_to_abar(sig[1]))
    x_vp = math.sqrt(abar) * x0 + math.sqrt(1 - abar) * eps
    torch.testing.assert_close(vp_to_k(x_vp, 1.0), x0 + 1.0 * eps)
    torch.testing.assert_close(k_to_vp(x0 + eps, 1.0), x_vp)
    with pytest.raises(ValueError):
        VPSchedule(torch.tensor([0.5, 0.9]))


# -- issue 17: mask rules that follow the object's size ---------------------------------------------
def _blob(frac: float, n: int = 32, bg: float = 0.1, fg: float = 1.0):
    """A [1, n*n] map: a square covering ~frac of the image at fg, the rest at bg, plus a little noise."""
    side = max(1, round((frac * n * n) ** 0.5))
    m = torch.full((n, n), bg)
    m[:side, :side] = fg
    g = torch.Generator().manual_seed(0)
    return (m + 0.02 * torch.rand(n, n, generator=g)).reshape(1, -1), side * side / (n * n)


@pytest.mark.parametrize("frac", [0.05, 0.15, 0.35])
def test_otsu_and_mass_follow_the_object_size_percentile_does_not(frac):
    from photoops.kernels.maps import keep_mask

    v, true_frac = _blob(frac)
    pct = keep_mask(v, "percentile", 0.9).float().mean()
    otsu = keep_mask(v, "otsu").float().mean()
    assert abs(float(pct) - 0.1) < 0.01                       # always the top 10 %, whatever the object
    assert abs(float(otsu) - true_frac) < 0.01               # the object itself
    m = maps.binarize(v.reshape(1, 32, 32), "otsu")             # Attention Mask's otsu mode: the same rule
    assert torch.equal(m.reshape(1, -1).bool(), keep_mask(v, "otsu"))
    mass = keep_mask(v, "mass", mass=0.5)
    kept = v[mass].sum() / v.sum()
    assert kept >= 0.5                                        # holds the asked mass ...
    smaller = v[0].sort(descending=True).values[: int(mass.sum()) - 1].sum() / v.sum()
    assert smaller < 0.5                                      # ... with the fewest pixels


def test_keep_mask_percentile_is_the_quantile_rule_and_bad_rules_fail():
    from photoops.kernels.maps import keep_mask

    g = torch.Generator().manual_seed(1)
    v = torch.rand(3, 100, generator=g)
    assert torch.equal(keep_mask(v, "percentile", 0.75), v >= torch.quantile(v, 0.75, dim=1, keepdim=True))
    with pytest.raises(ValueError, match="mask rule must be one of"):
        keep_mask(v, "area")
    with pytest.raises(ValueError, match="mass must be in"):
        keep_mask(v, "mass", mass=0.0)
