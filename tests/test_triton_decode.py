"""Decode on the Triton backend: the gate split over block ranges (partial top-k per range,
merged by the split-KV kernel) against the sequential gate and the dense reference, under the
Triton interpreter on CPU (tiny shapes)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere in this process

import pytest
import torch

pytest.importorskip("triton")

from moba_rewrite.kernels import reference as ref  # noqa: E402
from moba_rewrite.kernels.triton import backend as tb  # noqa: E402

pytestmark = pytest.mark.skipif(not tb.is_available(), reason=tb.unavailable_reason() or "triton unavailable")

if tb.is_available():
    from moba_rewrite.kernels.triton import attn as triton_attn, gate as triton_gate  # noqa: E402
    from moba_rewrite.kernels.triton.layout import dense_problem  # noqa: E402


def _decode_problem(seed, *, b=2, hq=4, hkv=2, tk=320, d=16, bs=8, top_k=4, causal=True, k=None, v=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, 1, d, generator=g)
    k = torch.randn(b, hkv, tk, d, generator=g) if k is None else k
    v = torch.randn(b, hkv, tk, d, generator=g) if v is None else v
    kw = dict(block_size=bs, top_k=top_k, causal=causal, scale=d ** -0.5, attn_mask=None)
    return q, k, v, kw


@pytest.mark.parametrize("causal", [True, False])
def test_split_gate_spans_several_ranges_and_matches_the_reference(causal):
    q, k, v, kw = _decode_problem(0, causal=causal)
    p = dense_problem(q, k, v, **kw)
    part = triton_gate.select_blocks(p, partial=True)
    assert part.part_picks.shape[2] >= 3, "40 blocks in ranges of 16: the merge sees several ranges"
    out = triton_attn.decode_forward(p, part)
    torch.testing.assert_close(out, ref.forward(q, k, v, **kw), atol=2e-5, rtol=2e-5)
    # the same blocks as the sequential gate (up to the order of the picks)
    seq = triton_attn.decode_forward(p, triton_gate.select_blocks(p))
    torch.testing.assert_close(out, seq, atol=1e-6, rtol=1e-6)


def test_split_gate_breaks_ties_towards_the_lower_block_like_the_sequential_gate():
    """Blocks 3 and 30 (different ranges) hold the same keys, so their gate scores tie exactly,
    but different values: the output tells which was taken. Both gates take block 3."""
    q, k, v, kw = _decode_problem(1, b=1, hq=1, hkv=1, top_k=2)
    k = k.clone()
    k[:, :, 30 * 8:31 * 8] = k[:, :, 3 * 8:4 * 8]
    q = (k[:, :, 3 * 8:4 * 8].mean(2, keepdim=True) * 4.0).contiguous()  # blocks 3 and 30 score best
    p = dense_problem(q, k, v, **kw)
    part = triton_gate.select_blocks(p, partial=True)
    seq = triton_gate.select_blocks(p)
    assert seq.picks[0, 0, 0].item() == 3
    out_part, out_seq = triton_attn.decode_forward(p, part), triton_attn.decode_forward(p, seq)
    torch.testing.assert_close(out_part, out_seq, atol=1e-6, rtol=1e-6)
    forced = torch.zeros(1, 1, 1, 40, dtype=torch.bool)
    forced[..., 30] = True  # what taking block 30 instead would give: must differ
    other = tb.forward_with_selection(q, k, v, forced, block_size=8, causal=True, scale=kw["scale"])
    assert (other - out_part).abs().max() > 1e-3


def test_decode_through_the_backend_uses_the_split_gate(monkeypatch):
    calls = []
    real = triton_gate.select_blocks
    monkeypatch.setattr(triton_gate, "select_blocks", lambda *a, **kw: calls.append(kw.get("partial")) or real(*a, **kw))
    q, k, v, kw = _decode_problem(2)
    out = tb.forward(q, k, v, **kw)
    assert calls == [True]
    torch.testing.assert_close(out, ref.forward(q, k, v, **kw), atol=2e-5, rtol=2e-5)


def test_sequence_tensors_are_kept_only_off_side_streams(monkeypatch):
    """Per-shape sequence tensors are cached between eager calls, except when allocated on a side
    CUDA stream (where CUDA-graph warm-ups allocate from the graph's private pool)."""
    from moba_rewrite.kernels.triton import layout as tl_

    monkeypatch.setattr(tl_, "_SEQ_TENSORS", {})
    dev = torch.device("cpu")
    first = tl_._dense_seqs(2, 1, 40, dev)
    assert tl_._dense_seqs(2, 1, 40, dev)[1] is first[1] and first[3].tolist() == [40, 40]
    monkeypatch.setattr(tl_, "_may_keep", lambda d: False)  # as on a side stream
    side = tl_._dense_seqs(2, 1, 41, dev)
    assert tl_._dense_seqs(2, 1, 41, dev)[1] is not side[1] and (2, 1, 41, dev) not in tl_._SEQ_TENSORS
    assert tl_._dense_seqs(2, 1, 40, dev)[1] is not first[1]  # nor are kept ones used there
    assert tl_._dense_seqs(2, 1, 40, dev)[3].tolist() == [40, 40]


def test_exact_ties_keep_the_lower_block_in_every_gate_and_the_reference():
    """Blocks 2 and 5 hold the same keys (their gate scores tie exactly) and block 40 scores best:
    with two picks one of the tied blocks must be evicted. The sequential gate, the decode gate's
    merge, the reference and the torch backend all keep the lower index (2)."""
    from moba_rewrite.kernels.torch import blocks as torch_blocks

    g = torch.Generator().manual_seed(0)
    bs, d = 8, 16
    k = torch.randn(1, 1, 48 * bs, d, generator=g) * 0.1
    v = torch.randn(1, 1, 48 * bs, d, generator=g)
    k[:, :, 5 * bs:6 * bs] = k[:, :, 2 * bs:3 * bs]
    k[:, :, 40 * bs:41 * bs] = k[:, :, 2 * bs:3 * bs] * 2
    q = (k[:, :, 2 * bs:3 * bs].mean(2, keepdim=True) * 40).contiguous()
    kw = dict(block_size=bs, top_k=3, causal=True, scale=d ** -0.5, attn_mask=None)
    p = dense_problem(q, k, v, **kw)
    assert sorted(triton_gate.select_blocks(p).picks[0, 0].tolist()) == [2, 40]
    want_sel = ref.block_selection(q, k, block_size=bs, top_k=3, causal=True, attn_mask=None)
    assert want_sel[0, 0, 0].nonzero().flatten().tolist() == [2, 40, 47]
    want = ref.forward(q, k, v, **kw)
    torch.testing.assert_close(triton_attn.decode_forward(p, triton_gate.select_blocks(p, partial=True)), want,
                               atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(triton_attn.decode_forward(p, triton_gate.select_blocks(p)), want, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(torch_blocks.forward(q, k, v, **kw), want, atol=2e-5, rtol=2e-5)


def test_many_picks_cap_the_ranges_so_each_decode_program_merges_a_bounded_list(monkeypatch):
    """top_k = 40 over 80 blocks: 39 picks take 64 slots, so a cap of 128 candidates allows only 2
    block ranges (5 without the cap); the merge still ranks the right blocks."""
    monkeypatch.setattr(triton_gate, "_MAX_MERGE_CANDIDATES", 128)  # 2 ranges of 64 slots here
    q, k, v, kw = _decode_problem(5, b=1, hq=2, hkv=1, tk=640, top_k=40)
    p = dense_problem(q, k, v, **kw)
    part = triton_gate.select_blocks(p, partial=True)
    assert part.part_picks.shape[2] == 2 and part.part_picks.shape[3] == 64
    torch.testing.assert_close(triton_attn.decode_forward(p, part), ref.forward(q, k, v, **kw), atol=2e-5, rtol=2e-5)
