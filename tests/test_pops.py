"""pOps kernels (spec pops-operators.md §13): parity with diffusers' PriorTransformer and
UnCLIPScheduler on tiny random weights, token layout, sampler properties, and the loader's
file handling (released key layout, statistics, bad files)."""
import io

import pytest
import torch
from photoops.kernels import pops
from photoops.kernels import pops_weights as pw
from tiny import one_thread  # noqa: F401  (autouse fixture: one torch thread in this module)

TINY = pops.PriorConfig(num_attention_heads=2, attention_head_dim=32, num_layers=2, embedding_dim=48)


def _random_prior(cfg=TINY, seed=0):
    """diffusers PriorTransformer with seeded random weights (its init leaves many zeros)."""
    from diffusers import PriorTransformer

    torch.manual_seed(seed)
    ref = PriorTransformer(**cfg.diffusers_kwargs()).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, v in ref.state_dict().items():
            if k == "clip_std":
                v.copy_(0.5 + torch.rand(v.shape, generator=g))
            else:
                v.copy_(torch.randn(v.shape, generator=g) * 0.2)
    return ref


def _released_sd(ref):
    """The released layout: diffusers keys minus clip_mean / clip_std (§8)."""
    return {k: v.clone() for k, v in ref.state_dict().items() if k not in pw.STAT_KEYS}


def _ours(ref, cfg=TINY):
    m = pops.OperatorPrior(cfg).eval()
    m.load_state_dict(_released_sd(ref), strict=True)
    return m


def _inputs(b=3, k=2, d=48, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, generator=g)
    p = torch.randn(b, d, generator=g)
    H = torch.randn(b, 77, d, generator=g)
    M = torch.zeros(b, 77, dtype=torch.long)
    M[:, :k] = 1
    return x, p, H, M


# ---- network ------------------------------------------------------------------------
@pytest.mark.parametrize("t", [0, 421, 999])
def test_forward_equals_diffusers(t):
    ref = _random_prior()
    ours = _ours(ref)
    x, p, H, M = _inputs()
    tt = torch.tensor([t])
    with torch.no_grad():
        want = ref(x, tt, p, H, attention_mask=M).predicted_image_embedding
        got = ours(x, tt, p, H, M)
        assert (got - want).abs().max() < 1e-5
        # without a mask diffusers attends bidirectionally; so do we
        want0 = ref(x, tt, p, H).predicted_image_embedding
        assert (ours(x, tt, p, H, None) - want0).abs().max() < 1e-5
        # the cached path (prefix K/V, 3 tokens per step) computes the same function
        got_c = ours.step(x, tt, ours.prefix(p, H, M))
        assert (got_c - want).abs().max() < 1e-5
        assert want.abs().max() > 0.1  # not a degenerate comparison


def test_masked_slots_do_not_change_output():
    ref = _random_prior()
    ours = _ours(ref)
    x, p, H, M = _inputs(k=2)
    H2 = H.clone()
    H2[:, 2:] = torch.randn(3, 75, 48) * 100.0
    t = torch.tensor([500])
    with torch.no_grad():
        assert torch.equal(ours(x, t, p, H, M), ours(x, t, p, H2, M))
        assert torch.equal(ours.step(x, t, ours.prefix(p, H, M)), ours.step(x, t, ours.prefix(p, H2, M)))
        # and the unmasked slots do matter
        H3 = H.clone()
        H3[:, 1] += 1.0
        assert not torch.equal(ours(x, t, p, H, M), ours(x, t, p, H3, M))


def test_condition_length_contract():
    ours = _ours(_random_prior())
    x, p, H, M = _inputs()
    with pytest.raises(ValueError, match="77"):
        ours(x, torch.tensor([1]), p, H[:, :76], M[:, :76])


def test_full_size_key_layout_on_meta():
    """§8/§13.10: the released layout is the diffusers key set minus the statistics: 336 tensors."""
    from diffusers import PriorTransformer

    cfg = pops.PriorConfig()
    ours = pw.expected_shapes(cfg)
    with torch.device("meta"):
        ref = PriorTransformer(**cfg.diffusers_kwargs())
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert set(ref_shapes) - set(ours) == set(pw.STAT_KEYS)
    assert all(ref_shapes[k] == s for k, s in ours.items())
    assert len(ours) == 336
    n = sum(torch.Size(s).numel() for s in ours.values())
    assert n + 2 * 1280 == 1_026_225_920
    assert pw.infer_config(ours) == cfg


# ---- token layout -----------------------------------------------------------------------
def test_build_condition_layout_and_drop():
    a, b = torch.randn(2, 48), torch.randn(2, 48)
    H, Hn, M = pops.build_condition([a, b], dropped=[False, True])
    assert torch.equal(H[:, 0], a) and torch.equal(H[:, 1], torch.zeros(2, 48))
    assert M[:, :2].eq(1).all() and M[:, 2:].eq(0).all()  # dropped slot keeps mask 1
    assert torch.equal(Hn, torch.zeros_like(H))
    txt = torch.randn(2, 3, 48)
    H, _, M = pops.build_condition([a], text_tokens=txt)
    assert torch.equal(H[:, 1:4], txt) and int(M[0].sum()) == 4 and H[:, 4:].abs().sum() == 0


def test_width_check_names_both_widths():
    with pytest.raises(pops.EmbeddingWidthError, match=r"1024-d.*ViT-H.*1280-d.*bigG"):
        pops.check_width("input A", torch.randn(1, 1024), 1280)
    with pytest.raises(pops.EmbeddingWidthError, match="hidden states"):
        pops.check_width("input A", torch.randn(1, 257, 1280), 1280)


# ---- sampler ----------------------------------------------------------------------------
def _reference_sample(ref, H, M, steps, guidance, seed):
    """The pipeline maths of §7 with diffusers' PriorTransformer and UnCLIPScheduler."""
    from diffusers import UnCLIPScheduler

    sch = UnCLIPScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="sample",
                          variance_type="fixed_small_log", clip_sample=True, clip_sample_range=10.0)
    sch.set_timesteps(steps)
    gen = torch.Generator("cpu").manual_seed(seed)
    b, d = H.shape[0], H.shape[-1]
    x = torch.randn(b, d, generator=gen) * sch.init_noise_sigma
    cfg = guidance > 1
    Hb = torch.cat([torch.zeros_like(H), H]) if cfg else H
    Mb = torch.cat([M, M]) if cfg else M
    P = torch.zeros(Hb.shape[0], d)
    ts = sch.timesteps
    with torch.no_grad():
        for i, t in enumerate(ts):
            xin = torch.cat([x, x]) if cfg else x
            pred = ref(xin, t, P, Hb, attention_mask=Mb).predicted_image_embedding
            if cfg:
                un, co = pred.chunk(2)
                pred = un + guidance * (co - un)
            prev = None if i + 1 == len(ts) else ts[i + 1]
            x = sch.step(pred, t, x, prev_timestep=prev, generator=gen).prev_sample
    return ref.post_process_latents(x).detach(), [int(t) for t in ts]


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_sampler_equals_unclip_pipeline(guidance):
    ref = _random_prior()
    ours = _ours(ref)
    a, b = torch.randn(2, 48), torch.randn(2, 48)
    H, _, M = pops.build_condition([a, b])
    want, ts = _reference_sample(ref, H, M, 25, guidance, seed=42)
    assert ts[:3] == [999, 957, 916] and ts[-1] == 0
    assert pops.unclip_schedule(25).timesteps == ts
    mean, std = ref.clip_mean.detach()[0], ref.clip_std.detach()[0]
    for cached in (True, False):
        got = pops.sample(ours, H, M, mean, std, steps=25, guidance=guidance, seed=42, cached=cached)
        assert (got - want).abs().max() < 1e-4 * max(1.0, float(want.detach().abs().max()))
    assert not torch.allclose(want[0], want[1])


def test_sampler_determinism_seed_and_guidance_rules():
    ours = _ours(_random_prior())
    H, _Hn, M = pops.build_condition([torch.randn(1, 48), torch.randn(1, 48)])
    mean, std = torch.zeros(48), torch.ones(48)
    run = lambda **kw: pops.sample(ours, H, M, mean, std, steps=6, **kw)
    assert torch.equal(run(seed=3, guidance=4.0), run(seed=3, guidance=4.0))
    assert not torch.allclose(run(seed=3, guidance=4.0), run(seed=4, guidance=4.0))
    assert not torch.allclose(run(seed=3, guidance=4.0), run(seed=3, guidance=1.0))
    # w <= 1: no CFG, the negative branch is never consulted
    assert torch.equal(run(seed=3, guidance=1.0, H_neg=torch.randn_like(H)), run(seed=3, guidance=1.0))
    steps = []
    run(seed=0, callback=lambda i, n: steps.append((i, n)))
    assert steps == [(i, 6) for i in range(1, 7)]


def test_output_is_denormalised():
    """A prior that always predicts x0 = 0 ends exactly at 0 in prior space, i.e. at μ (§7 step 8)."""
    m = pops.OperatorPrior(TINY).eval()
    with torch.no_grad():
        for prm in m.parameters():
            prm.normal_(0, 0.2)
        m.proj_to_clip_embeddings.weight.zero_()
        m.proj_to_clip_embeddings.bias.zero_()
    H, _, M = pops.build_condition([torch.randn(2, 48)])
    mean, std = torch.randn(48), 0.5 + torch.rand(48)
    out = pops.sample(m, H, M, mean, std, steps=5, seed=0)
    assert torch.allclose(out, mean.expand(2, -1), atol=1e-6)
    e = torch.randn(2, 48)
    assert torch.allclose(pops.denormalize(pops.normalize(e, mean, std), mean, std), e, atol=1e-6)


# ---- files ------------------------------------------------------------------------------
@pytest.fixture
def released(tmp_path):
    ref = _random_prior()
    sd = _released_sd(ref)
    op_dir = tmp_path / "texturing"
    op_dir.mkdir()
    pth = op_dir / "learned_prior.pth"
    torch.save(sd, pth)
    from safetensors.torch import save_file

    stats = tmp_path / "prior_stats.safetensors"
    save_file({"clip_mean": ref.clip_mean.detach().clone(), "clip_std": ref.clip_std.detach().clone()}, stats)
    # a "base prior" file: the full diffusers state dict, stats included
    base = tmp_path / "base_prior.bin"
    torch.save(ref.state_dict(), base)
    return ref, pth, stats, base


def _forward(m, seed=1):
    x, p, H, M = _inputs(seed=seed)
    with torch.no_grad():
        return m(x, torch.tensor([300]), p, H, M)


def test_released_layout_loads_with_stats_file(released, tmp_path):
    ref, pth, stats, base = released
    for s in (stats, base):
        op = pw.load_operator(str(pth), str(s), num_attention_heads=2)
        assert op.name == "texturing" and op.default_guidance == 8.0
        assert torch.equal(op.mean, ref.clip_mean.detach()[0]) and torch.equal(op.std, ref.clip_std.detach()[0])
        m = pw.build_prior(op)
        with torch.no_grad():
            want = ref(*_inputs()[:1], torch.tensor([300]), *_inputs()[1:3],
                       attention_mask=_inputs()[3]).predicted_image_embedding
        assert torch.equal(_forward(m), want)
    # module. prefix (DataParallel saves) is stripped
    mod = tmp_path / "module_prior.pth"
    torch.save({"module." + k: v for k, v in _released_sd(ref).items()}, mod)
    assert torch.equal(_forward(pw.build_prior(pw.load_operator(str(mod), str(stats), 2))), _forward(ref_m := pw.build_prior(
        pw.load_operator(str(pth), str(stats), 2))))
    assert ref_m.dtype == torch.float32


def test_convert_roundtrip(released, tmp_path):
    _ref, pth, stats, _ = released
    orig = pw.build_prior(pw.load_operator(str(pth), str(stats), 2))
    out32 = tmp_path / "tex32.safetensors"
    pw.convert(str(pth), str(out32), str(stats), dtype=torch.float32, num_attention_heads=2)
    op = pw.load_operator(str(out32))  # no stats file needed, heads from metadata
    assert op.name == "texturing" and op.config == TINY
    assert torch.equal(_forward(pw.build_prior(op)), _forward(orig))
    out16 = tmp_path / "tex16.safetensors"
    info = pw.convert(str(pth), str(out16), str(stats), num_attention_heads=2)
    assert info["bytes"] < 0.6 * out32.stat().st_size
    op16 = pw.load_operator(str(out16))
    assert op16.mean.dtype == torch.float32 and torch.equal(op16.mean, op.mean)
    assert all(v.dtype == torch.float16 for v in op16.state_dict.values())
    got = _forward(pw.build_prior(op16, dtype=torch.float32))
    assert (got - _forward(orig)).abs().max() < 2e-2 * _forward(orig).abs().max()
    # the command-line tool
    from tools import convert_pops

    out_cli = tmp_path / "cli.safetensors"
    assert convert_pops.main([str(pth), "--stats", str(stats), "-o", str(out_cli), "--heads", "2"]) == 0
    assert pw.load_operator(str(out_cli)).name == "texturing"
    assert convert_pops.main([str(pth), "-o", str(tmp_path / "nostats.safetensors")]) == 2
    assert not (tmp_path / "nostats.safetensors").exists() and not list(tmp_path.glob("*.partial"))


def test_bad_files_give_clear_errors(released, tmp_path):
    ref, pth, stats, _ = released
    sd = _released_sd(ref)
    with pytest.raises(pw.PopsFileError, match="no clip_mean/clip_std"):
        pw.load_operator(str(pth), num_attention_heads=2)
    with pytest.raises(pw.PopsFileError, match="no clip_mean/clip_std"):
        pw.load_operator(str(pth), str(pth), num_attention_heads=2)
    # truncated pickle
    data = pth.read_bytes()
    trunc = tmp_path / "trunc.pth"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(pw.PopsFileError, match="truncated or corrupt"):
        pw.load_operator(str(trunc), str(stats), 2)
    # truncated safetensors
    st = tmp_path / "t.safetensors"
    pw.convert(str(pth), str(st), str(stats), num_attention_heads=2)
    bad_st = tmp_path / "trunc.safetensors"
    bad_st.write_bytes(st.read_bytes()[:-100])
    with pytest.raises(pw.PopsFileError, match="safetensors"):
        pw.load_operator(str(bad_st))
    # a pickle holding something other than tensors (never executed: the safe loader refuses it)
    evil = tmp_path / "evil.pth"
    torch.save({"proj_in.weight": io.BytesIO(b"x")}, evil)
    with pytest.raises(pw.PopsFileError, match="other than tensors|not tensors"):
        pw.load_operator(str(evil), str(stats), 2)
    plain = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], plain)
    with pytest.raises(pw.PopsFileError, match="not a state dict"):
        pw.load_operator(str(plain), str(stats), 2)
    # missing / extra / mis-shaped keys
    for name, mutate, msg in (("missing", lambda s: s.pop("norm_out.weight"), "missing"),
                              ("extra", lambda s: s.__setitem__("foo.weight", torch.zeros(1)), "unexpected"),
                              ("shape", lambda s: s.__setitem__("norm_out.bias", torch.zeros(3)), "wrong shapes")):
        s = dict(sd)
        mutate(s)
        f = tmp_path / f"{name}.pth"
        torch.save(s, f)
        with pytest.raises(pw.PopsFileError, match=msg):
            pw.load_operator(str(f), str(stats), 2)
    # statistics that would collapse the output, or of the wrong width
    from safetensors.torch import save_file

    zero = tmp_path / "zero_std.safetensors"
    save_file({"clip_mean": torch.zeros(1, 48), "clip_std": torch.zeros(1, 48)}, zero)
    with pytest.raises(pw.PopsFileError, match="positive"):
        pw.load_operator(str(pth), str(zero), 2)
    wide = tmp_path / "wide.safetensors"
    save_file({"clip_mean": torch.zeros(1, 64), "clip_std": torch.ones(1, 64)}, wide)
    with pytest.raises(pw.PopsFileError, match="64/64 values.*48-d"):
        pw.load_operator(str(pth), str(wide), 2)
    with pytest.raises(pw.PopsFileError, match="no such file"):
        pw.load_operator(str(tmp_path / "nope.pth"))


def test_unreadable_operator_files_name_the_file_and_never_advise_unsafe_loading(released, tmp_path, caplog):
    ref, pth, stats, _ = released
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(pw.PopsFileError, match=r"empty\.pth: the file is empty \(0 bytes\)"):
        pw.load_operator(str(empty), str(stats), 2)
    with pytest.raises(pw.PopsFileError, match=r"empty\.pth: the file is empty"):
        pw.load_statistics(str(empty), 48)
    evil = tmp_path / "evil.pth"
    torch.save({"proj_in.weight": io.BytesIO(b"x")}, evil)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"\x80\x02not a pickle at all")
    for bad in (evil, junk):
        with pytest.raises(pw.PopsFileError) as ei:
            pw.load_operator(str(bad), str(stats), 2)
        msg = str(ei.value)
        assert bad.name in msg and "weights_only" not in msg and "trust the source" not in msg, msg
    # a statistics file chosen for an operator that carries its own is not silently ignored
    own = tmp_path / "own.safetensors"
    pw.convert(str(pth), str(own), str(stats), dtype=torch.float32, num_attention_heads=2)
    with caplog.at_level("WARNING", logger="photoops.pops"):
        pw.load_operator(str(own), str(stats))
    assert any("carries its own clip_mean/clip_std" in r.getMessage() and "prior_stats.safetensors" in r.getMessage()
               for r in caplog.records)
