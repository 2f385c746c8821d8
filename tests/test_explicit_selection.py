"""The `torch` backend attending a selection given by the caller (what context parallelism uses):
equal to dense attention masked to exactly those blocks, forward and backward, on both of its
implementations (`fast`, `online`) and in the threaded split."""

import pytest
import torch

from moba_rewrite.kernels.torch import blocks, fast
from moba_rewrite.kernels.torch.select import select_blocks


def _allowed(q, k, selection, block_size, causal, own_block=True):
    """`[B, Hq, Tq, Tk]` bool: the keys of each query's own block (unless `own_block=False`) plus its
    given blocks."""
    b, hq, tq, d = q.shape
    tk = k.shape[2]
    n = -(-tk // block_size)
    own = (torch.arange(tk - tq, tk) // block_size).expand(b, hq, tq)
    chosen = torch.zeros(b, hq, tq, n + 1, dtype=torch.bool)
    chosen.scatter_(-1, torch.where(selection < 0, n, selection), True)
    if own_block:
        chosen.scatter_(-1, own[..., None], True)
    allowed = chosen[..., :n][..., torch.arange(tk) // block_size]
    if causal:
        allowed &= torch.arange(tk)[None, :] <= torch.arange(tk - tq, tk)[:, None]
    return allowed


def _masked_reference(q, k, v, selection, block_size, causal, scale):
    """Dense softmax attention over each query's own block plus its given blocks (fp64)."""
    hq = q.shape[1]
    allowed = _allowed(q, k, selection, block_size, causal)
    g = hq // k.shape[1]
    kk, vv = (x.double().repeat_interleave(g, 1) for x in (k, v))
    return torch.nn.functional.scaled_dot_product_attention(q.double(), kk, vv, attn_mask=allowed, scale=scale)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("big_scores", [False, True], ids=["fast", "online"])
def test_given_selection_equals_masked_dense_attention(causal, big_scores):
    torch.manual_seed(0)
    bs, tq, tk = 8, 40, 64
    q = torch.randn(2, 4, tq, 16, requires_grad=True)
    k = torch.randn(2, 2, tk, 16, requires_grad=True)
    v = torch.randn(2, 2, tk, 16, requires_grad=True)
    scale = 3.0 if big_scores else 0.25
    assert fast.applicable(q, k, v, scale=scale, attn_mask=None) != big_scores
    own = (torch.arange(tk - tq, tk) // bs)
    # Any blocks but the own one, in any order, with gaps (-1); history may lie after the own
    # block when non-causal; causal selections hold earlier blocks only.
    raw = torch.randint(0, tk // bs, (2, 4, tq, 3))
    ok = raw < own[:, None] if causal else raw != own[:, None]
    selection = torch.where(ok, raw, -1)
    selection[..., 1] = torch.where(selection[..., 1] == selection[..., 0], -1, selection[..., 1])
    selection[..., 2] = torch.where((selection[..., 2] == selection[..., 0]) | (selection[..., 2] == selection[..., 1]),
                                    -1, selection[..., 2])
    kw = dict(block_size=bs, top_k=4, causal=causal, scale=scale, attn_mask=None)
    out = blocks.forward(q, k, v, selection=selection, **kw)
    want = _masked_reference(q.detach(), k.detach(), v.detach(), selection, bs, causal, scale)
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=1e-5)
    grad = torch.randn_like(out)
    dq, dk, dv = blocks.backward(grad, q.detach(), k.detach(), v.detach(), out, selection=selection, **kw)
    qd, kd, vd = (x.detach().double().requires_grad_() for x in (q, k, v))
    (_masked_reference(qd, kd, vd, selection, bs, causal, scale) * grad.double()).sum().backward()
    for got, ref in ((dq, qd.grad), (dk, kd.grad), (dv, vd.grad)):
        torch.testing.assert_close(got.double(), ref, atol=5e-5, rtol=1e-4)


def test_given_selection_in_the_threaded_split_equals_the_gate():
    """Handing the gate's own selection back gives the gated result, in the multi-thread split too."""
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 4, 2048, 16) for _ in range(3))
    kw = dict(block_size=64, top_k=3, causal=True, scale=0.25, attn_mask=None)
    sel = select_blocks(q, k, block_size=64, top_k=3, causal=True, attn_mask=None)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert blocks._split_plan(q, k)[1], "the call should take the threaded split"
        torch.testing.assert_close(blocks.forward(q, k, v, selection=sel, **kw), blocks.forward(q, k, v, **kw),
                                   atol=0, rtol=0)
    finally:
        torch.set_num_threads(threads)


def _masked_lse(q, k, selection, block_size, causal, scale):
    """Log-sum-exp of each row's scaled scores over its own block plus its given blocks (fp64)."""
    hq = q.shape[1]
    allowed = _allowed(q, k, selection, block_size, causal)
    s = q.double() @ k.double().repeat_interleave(hq // k.shape[1], 1).transpose(-1, -2) * scale
    return s.masked_fill(~allowed, float("-inf")).logsumexp(-1)


@pytest.mark.parametrize("threads", [1, 2], ids=["one_thread", "threaded_split"])
@pytest.mark.parametrize("big_scores", [False, True], ids=["fast", "online"])
def test_log_sum_exp_for_merging_and_backward_given_it(big_scores, threads):
    """`return_lse` gives each row's log-sum-exp (natural log, scaled scores) on both implementations
    and in the threaded split; `backward(lse=...)` with the call's own lse and output equals the
    plain backward (the form context parallelism uses with a merged lse)."""
    torch.manual_seed(2)
    bs, t = 64, 1024 if threads == 1 else 2048
    q, k, v = (torch.randn(1, 4, t, 16) for _ in range(3))
    scale = 3.0 if big_scores else 0.25
    assert fast.applicable(q, k, v, scale=scale, attn_mask=None) != big_scores
    sel = select_blocks(q, k, block_size=bs, top_k=3, causal=True, attn_mask=None)
    kw = dict(block_size=bs, top_k=3, causal=True, scale=scale, attn_mask=None, selection=sel)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert bool(blocks._split_plan(q, k)[1]) == (threads == 2)
        out, lse = blocks.forward(q, k, v, return_lse=True, **kw)
        torch.testing.assert_close(out, blocks.forward(q, k, v, **kw), atol=0, rtol=0)
        torch.testing.assert_close(lse.double(), _masked_lse(q, k, sel, bs, True, scale), atol=1e-4, rtol=1e-5)
        grad = torch.randn_like(out)
        plain = blocks.backward(grad, q, k, v, out, **kw)
        given = blocks.backward(grad, q, k, v, out, lse=lse, **kw)
    finally:
        torch.set_num_threads(before)
    for a, b in zip(given, plain):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def _softmax_reference(q, k, v, allowed, scale):
    """Dense attention restricted to `allowed` (fp64); rows that see no key give zeros, lse -inf."""
    g = q.shape[1] // k.shape[1]
    kk, vv = (x.double().repeat_interleave(g, 1) for x in (k, v))
    s = (q.double() @ kk.transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf"))
    lse = s.logsumexp(-1)
    p = (s - torch.where(torch.isfinite(lse), lse, 0.0)[..., None]).exp()
    return p @ vv, lse


@pytest.mark.parametrize("threads", [1, 2], ids=["one_thread", "threaded_split"])
@pytest.mark.parametrize("big_scores", [False, True], ids=["fast", "online"])
def test_selected_blocks_without_the_own_block(big_scores, threads):
    """`own_block=False` attends only the given blocks (rows with none: zeros, lse -inf), forward and
    backward given a larger softmax's lse; merged by log-sum-exp with the own-block-only call it
    equals the call that attends both (context parallelism's overlapped schedule)."""
    from moba_rewrite.parallel.lse import merge_by_lse

    torch.manual_seed(3)
    bs, t = 64, 512 if threads == 1 else 2048
    q, k, v = (torch.randn(1, 4, t, 16) for _ in range(3))
    scale = 3.0 if big_scores else 0.25
    sel = select_blocks(q, k, block_size=bs, top_k=3, causal=True, attn_mask=None)
    sel[:, :, ::7, :] = -1  # some rows pick nothing
    none = torch.full_like(sel, -1)
    kw = dict(block_size=bs, top_k=3, causal=True, scale=scale, attn_mask=None)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert bool(blocks._split_plan(q, k)[1]) == (threads == 2)
        assert fast.applicable(q, k, v, scale=scale, attn_mask=None) != big_scores
        picked, picked_lse = blocks.forward(q, k, v, selection=sel, own_block=False, return_lse=True, **kw)
        want, want_lse = _softmax_reference(q, k, v, _allowed(q, k, sel, bs, True, own_block=False), scale)
        torch.testing.assert_close(picked.double(), want, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(picked_lse.double(), want_lse, atol=1e-4, rtol=1e-5)
        assert bool((picked[:, :, ::7] == 0).all()) and bool(torch.isneginf(picked_lse[:, :, ::7]).all())
        own, own_lse = blocks.forward(q, k, v, selection=none, return_lse=True, **kw)
        both, both_lse = blocks.forward(q, k, v, selection=sel, return_lse=True, **kw)
        merged, merged_lse = merge_by_lse(own, own_lse, picked, picked_lse)
        torch.testing.assert_close(merged.to(both.dtype), both, atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(merged_lse, both_lse, atol=2e-6, rtol=1e-6)
        grad = torch.randn_like(both)
        whole = blocks.backward(grad, q, k, v, both, selection=sel, lse=both_lse, **kw)
        part_own = blocks.backward(grad, q, k, v, both, selection=none, lse=both_lse, **kw)
        part_picked = blocks.backward(grad, q, k, v, both, selection=sel, lse=both_lse, own_block=False, **kw)
    finally:
        torch.set_num_threads(before)
    for w, a, b in zip(whole, part_own, part_picked):
        torch.testing.assert_close(a + b, w, atol=2e-5, rtol=1e-4)


def test_own_block_false_needs_a_selection():
    q = torch.randn(1, 2, 64, 16)
    with pytest.raises(ValueError, match="own_block=False needs an explicit selection"):
        blocks.forward(q, q, q, block_size=16, top_k=2, causal=True, scale=0.25, attn_mask=None, own_block=False)


@pytest.mark.parametrize("big_scores", [False, True], ids=["fast", "online"])
def test_selected_blocks_only_with_more_queries_than_keys(big_scores):
    """`own_block=False, causal=False` places no query anywhere: k may be shorter than q (context
    parallelism's fetched tiles against every token that picked one), forward and backward."""
    torch.manual_seed(4)
    bs, tq, tk = 8, 100, 24
    q, k, v = torch.randn(2, 4, tq, 16), torch.randn(2, 2, tk, 16), torch.randn(2, 2, tk, 16)
    scale = 3.0 if big_scores else 0.25
    assert fast.applicable(q, k, v, scale=scale, attn_mask=None) != big_scores
    sel = torch.randint(0, tk // bs, (2, 4, tq, 2))
    sel[..., 1] = torch.where(sel[..., 1] == sel[..., 0], -1, sel[..., 1])
    sel[:, :, ::5] = -1
    n = tk // bs
    allowed = torch.zeros(2, 4, tq, n + 1, dtype=torch.bool).scatter_(-1, torch.where(sel < 0, n, sel), True)
    allowed = allowed[..., :n][..., torch.arange(tk) // bs]
    kw = dict(block_size=bs, top_k=3, causal=False, scale=scale, attn_mask=None, selection=sel, own_block=False)
    out, lse = blocks.forward(q, k, v, return_lse=True, **kw)
    want, want_lse = _softmax_reference(q, k, v, allowed, scale)
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), want_lse, atol=1e-4, rtol=1e-5)
    grad = torch.randn_like(out)
    qd, kd, vd = (x.double().requires_grad_() for x in (q, k, v))
    (_softmax_reference(qd, kd, vd, allowed, scale)[0] * grad.double()).sum().backward()
    for got, ref in zip(blocks.backward(grad, q, k, v, out, lse=lse, **kw), (qd.grad, kd.grad, vd.grad)):
        torch.testing.assert_close(got.double(), ref, atol=1e-4, rtol=1e-4)
