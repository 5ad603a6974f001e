"""Attention-hook registry, recorder and the diffusers adapter (no ComfyUI needed)."""
import math

import pytest
import torch

from photoops.kernels.attention import (AttentionHook, AttentionHooks, ProbabilityCache, TokenKVOverride,
                                        TokenMapRecorder, explicit_attention, fold_sequence)
from photoops.kernels.diffusers_adapter import DiffusersDenoiser, cross_attention_layers
from photoops.kernels.protocol import CallInfo, LayerInfo
from photoops.kernels.schedule import VPSchedule
from tiny import tiny_unet

LAYER = LayerInfo(key="x", place="down", order=0)


def _call(rows=2, chunks=(1, 0), hw=(8, 8), step=None, total=None):
    return CallInfo(sigma=1.0, chunks=list(chunks), rows_per_chunk=rows, latent_hw=hw, step=step, total_steps=total)


def _sdpa(heads):
    def attend(q, k, v):
        b, L, c = q.shape
        d = c // heads
        o = torch.nn.functional.scaled_dot_product_attention(
            q.view(b, L, heads, d).transpose(1, 2), k.view(b, -1, heads, d).transpose(1, 2),
            v.view(b, -1, heads, d).transpose(1, 2))
        return o.transpose(1, 2).reshape(b, L, c)
    return attend


def test_fold_sequence_matches_unet_downsampling():
    assert fold_sequence(64 * 64, (64, 64)) == (64, 64)
    assert fold_sequence(16 * 16, (64, 64)) == (16, 16)
    assert fold_sequence(4 * 6, (13, 21)) == (4, 6)  # ceil(13/4), ceil(21/4)
    with pytest.raises(ValueError, match="cannot fold"):
        fold_sequence(17, (8, 8))


def test_explicit_attention_equals_sdpa():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 16, 32), torch.randn(3, 7, 32), torch.randn(3, 7, 32)
    torch.testing.assert_close(explicit_attention(q, k, v, 4), _sdpa(4)(q, k, v), atol=1e-5, rtol=1e-5)


def test_uniform_probabilities_give_known_map():
    """P21: zero queries -> uniform softmax; the map is (#positions / #keys) everywhere."""
    T, L = 10, 64
    q = torch.zeros(4, L, 16)
    k = torch.randn(4, T, 16)
    v = torch.randn(4, T, 16)
    rec = TokenMapRecorder([2, 5, 6], prompt_len=T, layers="all")
    AttentionHooks([rec])(q, k, v, 2, LAYER, _call(), _sdpa(2))
    m = rec.result()
    assert m.shape == (2, 8, 8)
    torch.testing.assert_close(m, torch.full_like(m, 3 / T))


def test_map_independent_of_context_repetition():
    """ComfyUI repeats shorter contexts to a common length; summing every copy keeps the map."""
    torch.manual_seed(1)
    q, k, v = torch.randn(2, 64, 16), torch.randn(2, 10, 16), torch.randn(2, 10, 16)
    call = _call(rows=1, chunks=(1, 0))
    r1 = TokenMapRecorder([3], prompt_len=10, layers="all")
    r2 = TokenMapRecorder([3], prompt_len=10, layers="all")
    AttentionHooks([r1])(q, k, v, 2, LAYER, call, _sdpa(2))
    AttentionHooks([r2])(q, k.repeat(1, 3, 1), v.repeat(1, 3, 1), 2, LAYER, call, _sdpa(2))
    torch.testing.assert_close(r1.result(), r2.result(), atol=1e-6, rtol=1e-5)


def test_recorder_reads_only_its_conditioning_rows():
    torch.manual_seed(2)
    q, k, v = torch.randn(4, 64, 16), torch.randn(4, 10, 16), torch.randn(4, 10, 16)
    rec = TokenMapRecorder([1], prompt_len=10, cond_index=0, layers="all")
    AttentionHooks([rec])(q, k, v, 2, LAYER, _call(rows=2, chunks=(1, 0)), _sdpa(2))
    p = ProbabilityCache(q, k, 2).rows([2, 3])[..., 1].mean(1).reshape(2, 8, 8)
    torch.testing.assert_close(rec.result(), p)


def test_recording_does_not_change_the_output_and_memory_is_constant():
    torch.manual_seed(3)
    hooks = AttentionHooks()
    rec = hooks.add(TokenMapRecorder([1, 2], prompt_len=10, layers="all"))
    sizes = []
    for steps in (10, 50):
        rec.reset()
        for i in range(steps):
            q, k, v = torch.randn(4, 64, 16), torch.randn(4, 10, 16), torch.randn(4, 10, 16)
            out = hooks(q, k, v, 2, LAYER, _call(step=i, total=steps), _sdpa(2))
            assert torch.equal(out, _sdpa(2)(q, k, v))
        sizes.append(sum(s[0].numel() * s[0].element_size() for s in rec._sums.values()))
        assert rec.calls == steps
    assert sizes[0] == sizes[1]


def test_step_window():
    rec = TokenMapRecorder([1], prompt_len=10, steps=(0.5, 1.0))
    hooks = AttentionHooks([rec])
    for i in range(10):
        q, k, v = torch.randn(4, 64, 16), torch.randn(4, 10, 16), torch.randn(4, 10, 16)
        hooks(q, k, v, 2, LAYER, _call(step=i, total=10), _sdpa(2))
    assert rec.calls == 5
    with pytest.raises(ValueError):
        TokenMapRecorder([1], 10, steps=(0.6, 0.5))
    with pytest.raises(ValueError):
        TokenMapRecorder([1], 10, layers="middle")
    with pytest.raises(RuntimeError, match="no cross-attention was recorded"):
        TokenMapRecorder([1], 10).result()


def test_lowres_mode_picks_quarter_resolution_and_skips_mid():
    rec = TokenMapRecorder([1], prompt_len=10, layers="lowres")
    hooks = AttentionHooks([rec])
    for L, place in ((64 * 64, "down"), (32 * 32, "down"), (16 * 16, "up"), (8 * 8, "mid")):
        q, k, v = torch.randn(2, L, 16), torch.randn(2, 10, 16), torch.randn(2, 10, 16)
        hooks(q, k, v, 2, LayerInfo("l", place, 0), _call(rows=1, hw=(64, 64)), _sdpa(2))
    assert rec.native_size() == (16, 16)
    assert [s[2] for s in rec.selected()] == [(16, 16)]
    assert rec.calls == 1                      # 64x64 and 32x32 were dropped, mid skipped
    # a model without 1/4-size layers: the coarsest non-mid resolution it has
    rec2 = TokenMapRecorder([1], prompt_len=10, layers="lowres")
    for L, place in ((8 * 8, "down"), (4 * 4, "up"), (4 * 4, "mid")):
        q, k, v = torch.randn(2, L, 16), torch.randn(2, 10, 16), torch.randn(2, 10, 16)
        AttentionHooks([rec2])(q, k, v, 2, LayerInfo("l", place, 0), _call(rows=1, hw=(8, 8)), _sdpa(2))
    assert rec2.native_size() == (4, 4) and rec2.calls == 2


def test_kv_override_identity_and_effect():
    torch.manual_seed(4)
    q, k, v = torch.randn(4, 64, 16), torch.randn(4, 10, 16), torch.randn(4, 10, 16)
    k[3], v[3] = k[2], v[2]   # one prompt for the whole positive chunk, as in real batches
    call = _call(rows=2, chunks=(1, 0))
    same = TokenKVOverride([2, 3], keys={0: k[2, 2:4]}, values={0: v[2, 2:4]})
    torch.testing.assert_close(AttentionHooks([same])(q, k, v, 2, LAYER, call, _sdpa(2)), _sdpa(2)(q, k, v))
    new = TokenKVOverride([2, 3], keys={0: torch.randn(2, 16)}, values={0: torch.randn(2, 16)})
    out = AttentionHooks([new])(q, k, v, 2, LAYER, call, _sdpa(2))
    ref = _sdpa(2)(q, k, v)
    assert torch.equal(out[:2], ref[:2])            # negative rows untouched
    assert not torch.allclose(out[2:], ref[2:])     # positive rows changed
    other = LayerInfo("y", "up", 1)
    assert torch.equal(AttentionHooks([new])(q, k, v, 2, other, call, _sdpa(2)), ref)


class _Counting(AttentionHook):
    def __init__(self):
        self.n = 0

    def active(self, layer, call):
        self.n += 1
        return False


def test_inactive_hooks_fall_through():
    h = _Counting()
    q, k, v = torch.randn(2, 64, 16), torch.randn(2, 10, 16), torch.randn(2, 10, 16)
    out = AttentionHooks([h])(q, k, v, 2, LAYER, _call(rows=1), _sdpa(2))
    assert h.n == 1 and torch.equal(out, _sdpa(2)(q, k, v))


# -- diffusers adapter --------------------------------------------------------------------
def test_diffusers_layers_in_forward_order():
    layers = cross_attention_layers(tiny_unet())
    assert [l.place for l in layers] == ["down"] * 4 + ["mid"] + ["up"] * 6
    assert [l.order for l in layers] == list(range(11))


def test_hooked_unet_matches_stock_processor_and_records():
    unet = tiny_unet(0)
    sched = VPSchedule.scaled_linear()
    x, ctx = torch.randn(2, 4, 16, 16), torch.randn(1, 7, 32)
    ref = DiffusersDenoiser(unet, sched).predict_x0(x, torch.tensor(2.0), [ctx])[0]
    hooks = AttentionHooks()
    rec = hooks.add(TokenMapRecorder([2, 3], prompt_len=7, layers="all"))
    den = DiffusersDenoiser(unet, sched, hooks=hooks)
    out = den.predict_x0(x, torch.tensor(2.0), [ctx, torch.zeros_like(ctx)])
    torch.testing.assert_close(out[0], ref, atol=1e-5, rtol=1e-5)
    assert rec.calls == 11 and rec.result().shape == (2, 8, 8)
    assert rec.latent_hw == (16, 16)


def test_recorded_map_matches_diffusers_own_attention_scores():
    """Parity: our map equals one built from diffusers' Attention.get_attention_scores."""
    from diffusers.models.attention_processor import AttnProcessor

    unet = tiny_unet(1)
    sched = VPSchedule.scaled_linear()
    x, ctx = torch.randn(1, 4, 16, 16), torch.randn(1, 7, 32)
    positions = [1, 4]
    collected = []

    class RefProc(AttnProcessor):
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
            if encoder_hidden_states is not None:
                q = attn.head_to_batch_dim(attn.to_q(hidden_states))
                k = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
                p = attn.get_attention_scores(q, k, None)       # [B*heads, L, T]
                a = p[..., positions].sum(-1).reshape(hidden_states.shape[0], attn.heads, -1).mean(1)
                collected.append(a)
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

    procs = {n: (RefProc() if n.endswith("attn2.processor") else p) for n, p in unet.attn_processors.items()}
    unet.set_attn_processor(procs)
    DiffusersDenoiser(unet, sched).predict_x0(x, torch.tensor(1.5), [ctx])
    ref = {}
    for a in collected:
        h = int(math.isqrt(a.shape[-1]))
        ref.setdefault(h, []).append(a.reshape(1, h, h))
    expected_8 = torch.stack(ref[8]).mean(0)

    hooks = AttentionHooks()
    rec = hooks.add(TokenMapRecorder(positions, prompt_len=7, layers="lowres"))
    DiffusersDenoiser(tiny_unet(1), sched, hooks=hooks).predict_x0(x, torch.tensor(1.5), [ctx])
    # 16x16 latent: layers at 8x8 (factor 2) and 4x4 (factor 4); lowres picks factor 4 = 4x4 non-mid
    exp4 = torch.stack([a for a in ref[4][:2] + ref[4][3:]]).mean(0)  # down x2, up x3 (mid is ref[4][2])
    torch.testing.assert_close(rec.result(), exp4, atol=1e-6, rtol=1e-5)
    hooks2 = AttentionHooks()
    rec_all = hooks2.add(TokenMapRecorder(positions, prompt_len=7, layers="all"))
    DiffusersDenoiser(tiny_unet(1), sched, hooks=hooks2).predict_x0(x, torch.tensor(1.5), [ctx])
    up = torch.nn.functional.interpolate(torch.stack(ref[4]).mean(0)[:, None], size=(8, 8), mode="bilinear",
                                         align_corners=False)[:, 0]
    expected_all = (expected_8 * len(ref[8]) + up * len(ref[4])) / (len(ref[8]) + len(ref[4]))
    torch.testing.assert_close(rec_all.result(), expected_all, atol=1e-6, rtol=1e-5)


def test_v_prediction_conversion():
    """(D2): with v = alpha*eps - sigma_vp*x0 the denoiser returns x0 exactly."""
    class VUnet(torch.nn.Module):
        dtype = torch.float32

        def __init__(self, x0, eps, sigma):
            super().__init__()
            self.v = (x0 * -sigma + eps) / math.sqrt(1 + sigma ** 2)

        def forward(self, x, t, encoder_hidden_states=None, **kw):
            return type("O", (), {"sample": self.v})()

        @property
        def attn_processors(self):
            return {}

    x0, eps = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    sigma = 2.5
    x = x0 + sigma * eps
    den = DiffusersDenoiser(VUnet(x0, eps, sigma), VPSchedule.scaled_linear(), prediction_type="v_prediction")
    torch.testing.assert_close(den.predict_x0(x, torch.tensor(sigma), [torch.zeros(1, 3, 4)])[0], x0,
                               atol=1e-5, rtol=1e-5)


def test_lowres_skips_other_layers_after_reset(monkeypatch):
    """Per-step resets (LEDITS++) must not recompute probabilities of layers lowres mode discards."""
    computed = []
    real_rows = ProbabilityCache.rows

    def counting_rows(self, rows):
        computed.append(self.queries)
        return real_rows(self, rows)

    monkeypatch.setattr(ProbabilityCache, "rows", counting_rows)
    rec = TokenMapRecorder([1], prompt_len=10, layers="lowres")
    hooks = AttentionHooks([rec])

    def one_pass():
        for L in (64 * 64, 16 * 16):
            q, k, v = torch.randn(2, L, 16), torch.randn(2, 10, 16), torch.randn(2, 10, 16)
            hooks(q, k, v, 2, LayerInfo("l", "down", 0), _call(rows=1, hw=(64, 64)), _sdpa(2))

    one_pass()
    assert computed == [64 * 64, 16 * 16]       # first pass: the 1/4 layer is not known yet
    rec.reset()
    computed.clear()
    one_pass()
    assert computed == [16 * 16]                # afterwards only the 1/4-size layer is computed
    assert rec.calls == 1 and list(rec._sums) == [(4, False)]


def test_lowres_fallback_layout_is_remembered_across_resets(monkeypatch):
    """A model without 1/4-size layers: after one full call only its coarsest non-mid level is computed,
    and the map equals what a fresh recorder gives for the same call."""
    computed = []
    real_rows = ProbabilityCache.rows

    def counting_rows(self, rows):
        computed.append(self.queries)
        return real_rows(self, rows)

    monkeypatch.setattr(ProbabilityCache, "rows", counting_rows)
    rec = TokenMapRecorder([1], prompt_len=10, layers="lowres")
    torch.manual_seed(7)
    passes = [[(torch.randn(2, L, 16), torch.randn(2, 10, 16), torch.randn(2, 10, 16)) for L in (16 * 16, 8 * 8)]
              for _ in range(2)]

    def one_pass(r, tensors):
        for q, k, v in tensors:
            AttentionHooks([r])(q, k, v, 2, LayerInfo("l", "down", 0), _call(rows=1, hw=(16, 16)), _sdpa(2))

    one_pass(rec, passes[0])
    assert computed == [16 * 16, 8 * 8]
    rec.reset()
    computed.clear()
    one_pass(rec, passes[1])
    assert computed == [8 * 8]                  # the 16x16 level is skipped before any softmax
    fresh = TokenMapRecorder([1], prompt_len=10, layers="lowres")
    one_pass(fresh, passes[1])
    torch.testing.assert_close(rec.result(), fresh.result(), rtol=0, atol=0)
