"""Joint-attention probabilities (kernels/joint_attention.py, spec rectified-flow.md §3.3, property R11).

The chunked, online log-sum-exp kernel is compared with the explicit float64 softmax over all keys.
Tolerance: float32 scores of O(1) magnitude carry ~1e-7 relative rounding; exp/logsumexp keep it,
so probabilities (<= 1) agree to 1e-6 absolute (measured ~1e-7).
"""
import pytest
import torch
from photoops.kernels.joint_attention import JointTokenMapRecorder, explicit_image_text_attention, image_text_attention
from photoops.kernels.protocol import CallInfo, LayerInfo


def _qk(B=2, H=2, txt=7, img=16, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, txt + img, d, generator=g) * 1.5
    k = torch.randn(B, H, txt + img, d, generator=g) * 1.5
    return q, k


@pytest.mark.parametrize("qc,kc", [(None, None), (3, 5), (1, 1), (16, 23)])
def test_kernel_equals_explicit_softmax(qc, kc):
    q, k = _qk()
    cols = [1, 2, 5]
    ref = explicit_image_text_attention(q, k, 7, cols)
    got = image_text_attention(q, k, 7, cols, query_chunk=qc, key_chunk=kc)
    assert got.dtype == torch.float32 and got.shape == (2, 16)
    assert float((got.double() - ref).abs().max()) < 1e-6
    # all text keys + all image keys sum to one per query (normaliser over ALL keys)
    every = image_text_attention(q, k, 7, range(23), query_chunk=qc, key_chunk=kc)
    assert float((every - 1).abs().max()) < 1e-6
    text_only = image_text_attention(q, k, 7, range(7), query_chunk=qc, key_chunk=kc)
    assert float(text_only.max()) < 1 - 1e-3          # image keys take part of the mass


@pytest.mark.parametrize("kind", ["additive", "bool", "per_batch"])
def test_kernel_with_mask_and_chunks_smaller_than_L(kind):
    q, k = _qk(seed=1)
    g = torch.Generator().manual_seed(3)
    if kind == "additive":
        mask = torch.randn(2, 1, 23, 23, generator=g)
    elif kind == "per_batch":                          # [B, L, L]: ComfyUI reads it as [B, 1, L, L]
        mask = torch.randn(2, 23, 23, generator=g)
    else:
        mask = torch.rand(23, 23, generator=g) > 0.3
        mask[:, 0] = True                             # every row keeps a key
    cols = [0, 3, 6]
    ref = explicit_image_text_attention(q, k, 7, cols, mask=mask[:, None] if kind == "per_batch" else mask)
    got = image_text_attention(q, k, 7, cols, mask=mask, query_chunk=4, key_chunk=6)
    assert float((got.double() - ref).abs().max()) < 1e-6
    unmasked = image_text_attention(q, k, 7, cols)
    assert float((unmasked - got).abs().max()) > 1e-3  # the mask enters the normaliser


def test_kernel_layout_errors():
    q, k = _qk()
    with pytest.raises(ValueError, match="outside"):
        image_text_attention(q, k, 7, [23])
    with pytest.raises(ValueError, match="exceed"):
        image_text_attention(q, k, 20, [0], img_len=16)


def _call(step, rows=(0, 1), hw=(8, 8)):
    return CallInfo(sigma=1.0, chunks=list(rows), rows_per_chunk=1, latent_hw=hw, step=step, total_steps=10)


def test_recorder_mean_rows_layers_and_bounded_memory():
    q, k = _qk(B=2, txt=7, img=16)
    rec = JointTokenMapRecorder([2], optional_positions=[9], cond_index=1, layers=("double",))
    dbl, sgl = LayerInfo(("double_block", 0), "double", 0), LayerInfo(("single_block", 0), "single", 1)
    assert rec.wants(dbl, _call(0)) and not rec.wants(sgl, _call(0))
    assert not rec.wants(dbl, _call(0, rows=(0,)))               # no row of cond 1
    sizes = []
    for step in range(10):
        rec.record(q, k, 7, 16, dbl, _call(step))
        sizes.append(rec.state_numel())
    assert sizes == [16] * 10                                    # one [1, 4, 4] map, whatever the steps
    expect = explicit_image_text_attention(q, k, 7, [2])[1].reshape(4, 4)   # row of cond 1; 9 >= 7 dropped
    assert rec.calls == 10 and float((rec.result()[0].double() - expect).abs().max()) < 1e-6
    with pytest.raises(ValueError, match="outside the model's 7 text tokens"):
        JointTokenMapRecorder([7]).columns(7)
    assert JointTokenMapRecorder([1], prompt_len=4).columns(8) == [1, 5]     # repeated contexts: every copy
    assert JointTokenMapRecorder([1], [5]).columns(8) == [1, 5]
