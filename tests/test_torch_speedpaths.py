"""Speed paths of the `torch` backend that the small shapes of test_torch_backend do not reach.

* The threaded split of large CPU calls by (batch, kv head) groups (`torch_blocks._split_plan`),
  forced on small shapes, against the dense `reference` (outputs and gradients, both
  implementations, masks sliced per part, batch and head splits).
* Gate chunks of exactly one own block (causal chunks then score only earlier blocks, with no
  candidate mask) and the amax-round top-k, against `reference.block_selection`.
* Ties in the gate: the selection still holds exactly `top_k - 1` candidates, lowest index first.
"""

from __future__ import annotations

import pytest
import torch

import moba_rewrite
from moba_rewrite.kernels import reference
from moba_rewrite.kernels.torch import blocks as torch_blocks, fast as torch_fast, online as torch_online, select as torch_select


@pytest.fixture
def split_always(monkeypatch):
    """Split every call across two threads and count the splits."""
    monkeypatch.setattr(torch_blocks, "_SPLIT_MIN_ROWS", 0)
    monkeypatch.setattr(torch_blocks, "_SPLIT_MIN_ROWS_BACKWARD", 0)
    calls = []
    run_parts = torch_blocks._run_parts

    def counting(ranges, work):
        calls.append(len(ranges))
        return run_parts(ranges, work)

    monkeypatch.setattr(torch_blocks, "_run_parts", counting)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield calls
    torch.set_num_threads(threads)


def _grads(backend, q, k, v, mask, weight, **kw):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = moba_rewrite.moba_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1],
                                      backend=backend, **kw)
    (out * weight).sum().backward()
    return out.detach(), q.grad, k.grad, v.grad


SPLITS = [
    # name, (b, hq, hkv, tq, tk), mask kind, causal, implementation
    ("heads_gqa_fast", (1, 6, 3, 40, 40), None, True, torch_fast),
    ("heads_chunked_head_mask", (1, 4, 2, 24, 60), "head_bool", False, torch_fast),
    ("batch_mqa_padding", (3, 2, 1, 30, 75), "padding", True, torch_fast),
    ("heads_additive_online", (2, 4, 4, 30, 75), "additive", True, torch_online),
    ("batch_decode_online", (2, 2, 1, 1, 70), None, True, torch_online),
]


def _mask(kind, b, hq, tq, tk):
    if kind is None:
        return None
    if kind == "head_bool":  # [1, Hq, 1, Tk]: each head hides its own key range
        m = torch.ones(1, hq, 1, tk, dtype=torch.bool)
        for h in range(hq):
            m[0, h, 0, h * 10: h * 10 + 25] = False
        return m
    if kind == "padding":  # [B, 1, 1, Tk]: batch i sees its last tk - 15 i keys
        m = torch.ones(b, 1, 1, tk, dtype=torch.bool)
        for i in range(b):
            m[i, ..., : 15 * i] = False
        return m
    if kind == "additive":  # [B, Hq, Tq, Tk] float with -inf
        m = torch.rand(b, hq, tq, tk) * 0.5
        m[torch.rand(m.shape) < 0.3] = float("-inf")
        return m
    raise AssertionError(kind)


@pytest.mark.parametrize("name,shape,mask_kind,causal,impl", SPLITS, ids=[s[0] for s in SPLITS])
def test_threaded_split_matches_reference(split_always, name, shape, mask_kind, causal, impl):
    b, hq, hkv, tq, tk = shape
    torch.manual_seed(0)
    q, k, v = torch.randn(b, hq, tq, 16), torch.randn(b, hkv, tk, 16), torch.randn(b, hkv, tk, 16)
    mask = _mask(mask_kind, b, hq, tq, tk)
    kw = dict(block_size=8, top_k=3, causal=causal)
    assert torch_blocks.implementation(q, k, v, block_size=8, scale=0.25, attn_mask=mask) is impl
    weight = torch.randn(b, hq, tq, 16)
    got = _grads("torch", q, k, v, mask, weight, **kw)
    assert split_always == [2, 2], "forward and backward were not split"
    want = _grads("reference", q, k, v, mask, weight, **kw)
    for part, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(g, w, rtol=2e-5, atol=2e-5, msg=lambda m: f"{part}: {m}")
    assert torch.get_num_threads() == 2  # the caller's thread count is restored


def test_no_split_under_dispatch_mode(split_always):
    """Thread-local dispatch modes would not see worker threads: such calls stay whole."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.ops += 1
            return func(*args, **(kwargs or {}))

    q, k, v = torch.randn(1, 4, 32, 8), torch.randn(1, 4, 32, 8), torch.randn(1, 4, 32, 8)
    with Count():
        torch_blocks.forward(q, k, v, block_size=8, top_k=2, causal=True, scale=0.3, attn_mask=None)
    assert split_always == [] and Count.ops > 0


SELECTIONS = [
    # (b, hq, hkv, tq, tk, block, top_k, causal, mask)
    (2, 4, 2, 64, 64, 16, 3, True, None),
    (1, 2, 1, 45, 70, 8, 3, True, None),  # chunked prefill: the first chunk is a partial own block
    (1, 2, 2, 60, 66, 12, 4, False, None),
    (1, 3, 1, 40, 40, 5, 5, True, None),  # top-k above 3: the topk branch
    (2, 2, 2, 30, 75, 16, 3, True, "padding"),
    (1, 2, 2, 33, 33, 4, 3, False, "random"),
    (1, 4, 2, 45, 70, 8, 3, False, None),  # non-causal chunked prefill, GQA: own block excluded per segment
    (2, 2, 1, 50, 50, 6, 2, True, None),  # top-2: a single amax round
]


@pytest.mark.parametrize("min_rows", [1, 2048])
@pytest.mark.parametrize("shape", SELECTIONS, ids=lambda s: "x".join(map(str, s[:7])) + f"-{s[7]}-{s[8]}")
def test_selection_one_block_chunks(monkeypatch, shape, min_rows):
    """min_rows=1: every gate chunk is one own block; min_rows=2048: chunks span several own blocks
    (unmasked: non-candidates set to -inf own block by own block, `_exclude_non_candidates`)."""
    monkeypatch.setattr(torch_select, "_MIN_CHUNK_ROWS", min_rows)
    b, hq, hkv, tq, tk, bs, top_k, causal, mask_kind = shape
    torch.manual_seed(1)
    q, k = torch.randn(b, hq, tq, 16), torch.randn(b, hkv, tk, 16)
    mask = None
    if mask_kind == "padding":
        mask = torch.ones(b, 1, 1, tk, dtype=torch.bool)
        mask[-1, ..., :40] = False
    elif mask_kind == "random":
        mask = torch.rand(b, hq, tq, tk) < 0.2
    kw = dict(block_size=bs, top_k=top_k, causal=causal, attn_mask=mask)
    assert torch.equal(torch_select.block_selection(q, k, **kw), reference.block_selection(q, k, **kw))


def test_query_chunks_cut_at_own_blocks():
    # Queries 0..49 at positions 13..62, blocks of 8: own blocks start at queries 3, 11, 19, ...
    chunks = torch_select._query_chunks(50, 13, 8, max_rows=100, min_rows=1)
    assert chunks[0] == (0, 3) and chunks[1] == (3, 11) and chunks[-1] == (43, 50)
    assert all(e - a <= 8 for a, e in chunks)
    merged = torch_select._query_chunks(50, 13, 8, max_rows=20, min_rows=10)
    assert merged[0] == (0, 11) and all(e - a <= 20 for a, e in merged)
    assert [a for a, _ in merged[1:]] == [e for _, e in merged[:-1]] and merged[-1][1] == 50
    split = torch_select._query_chunks(20, 0, 16, max_rows=5, min_rows=1)
    assert split == [(0, 5), (5, 10), (10, 15), (15, 16), (16, 20)]


@pytest.mark.parametrize("top_k", [2, 3, 4, 6])
def test_ties_pick_lowest_candidates(top_k):
    """All-zero queries tie every block: `top_k - 1` distinct candidates (fewer if fewer exist);
    up to three picks (the amax rounds) they are the lowest-index ones."""
    bs, t = 4, 40
    q = torch.zeros(1, 2, t, 8)
    k = torch.randn(1, 2, t, 8)
    sel = torch_select.select_blocks(q, k, block_size=bs, top_k=top_k, causal=True, attn_mask=None)
    own = torch.arange(t) // bs
    for i in range(t):
        n_cand = min(top_k - 1, int(own[i]))
        picks = sorted(sel[0, 0, i].tolist())
        valid = [p for p in picks if p >= 0]
        assert len(valid) == len(set(valid)) == n_cand and all(p < own[i] for p in valid), (i, picks)
        if top_k - 1 <= 3:
            assert valid == list(range(n_cand)), (i, picks)


def test_split_parts_pick_their_own_implementation(split_always):
    """Scores too large for the no-max path in one kv group only: that part runs the online
    softmax, the other the fast path, and both are exact."""
    torch.manual_seed(2)
    q, k, v = torch.randn(1, 4, 40, 16), torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 16)
    q[:, 2:] *= 40.0  # query heads 2, 3 (kv head 1)
    kw = dict(block_size=8, top_k=3, scale=0.25, attn_mask=None)
    assert torch_blocks.implementation(q[:, :2], k[:, :1], v[:, :1], block_size=8, scale=0.25,
                                       attn_mask=None) is torch_fast
    assert torch_blocks.implementation(q[:, 2:], k[:, 1:], v[:, 1:], block_size=8, scale=0.25,
                                       attn_mask=None) is torch_online
    out = torch_blocks.forward(q, k, v, causal=True, **kw)
    torch.testing.assert_close(out, reference.forward(q, k, v, causal=True, **kw), rtol=2e-5, atol=2e-5)
    go = torch.randn_like(out)
    got = torch_blocks.backward(go, q, k, v, out, causal=True, **kw)
    want = reference.backward(go, q, k, v, out, causal=True, **kw)
    assert split_always == [2, 2]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("include_own", [False, True])
def test_route_lists_exactly_the_selected_pairs(include_own):
    """The plan's (row, block) pairs are the selection's valid picks (unselected -1 slots, many
    here under a sparse mask, are dropped), plus the own blocks when asked, grouped by
    (batch, kv head, block) with the own rows of each group last."""
    torch.manual_seed(3)
    b, hq, hkv, tq, tk, bs = 2, 4, 2, 20, 37, 5
    q, k = torch.randn(b, hq, tq, 8), torch.randn(b, hkv, tk, 8)
    mask = torch.rand(b, 1, tq, tk) < 0.15
    kw = dict(block_size=bs, top_k=4, causal=True, attn_mask=mask)
    sel = torch_select.select_blocks(q, k, **kw)
    assert (sel < 0).any() and (sel >= 0).any()
    plan = torch_select.route(q, k, include_own=include_own, **kw)
    n, g, offset = plan.n_blocks, hq // hkv, tk - tq
    want = set()
    for bi in range(b):
        for h in range(hq):
            for i in range(tq):
                row = (bi * hq + h) * tq + i
                want |= {(row, bi, h // g, j, False) for j in sel[bi, h, i].tolist() if j >= 0}
                if include_own:
                    want.add((row, bi, h // g, (offset + i) // bs, True))
    got = []
    for bi, hi, j, start, own_start, end in plan.groups:
        assert start <= own_start <= end
        got += [(r, bi, hi, j, p >= own_start) for p, r in zip(range(start, end), plan.rows[start:end].tolist())]
    assert len(got) == len(want) == plan.rows.numel() and set(got) == want
    keys = [(bi * hkv + hi) * n + j for bi, hi, j, *_ in plan.groups]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)


def test_pool_workers_keep_one_intra_op_thread(monkeypatch):
    """Workers stay single-threaded after the caller restores its own thread count: ATen's lazy
    per-thread init, at a worker's first parallel op, would otherwise copy the caller's count
    (two OpenMP threads per worker, four busy threads on two cores)."""
    if not torch_blocks._openmp():
        pytest.skip("thread counts are per-thread only with OpenMP")
    monkeypatch.setattr(torch_blocks, "_POOL", None)  # a fresh pool: its workers have run no op yet
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        pool = torch_blocks._pool(2)
        assert torch.get_num_threads() == 2
        seen = {pool.submit(lambda: (torch.ones(64).exp_(), torch.get_num_threads())[1]).result() for _ in range(8)}
        assert seen == {1}
    finally:
        pool.shutdown()
        torch.set_num_threads(threads)


def test_split_thresholds_forward_and_backward():
    """The forward splits from 2K tokens x 4 heads, the backward from 16K x 4 (as measured)."""
    if not torch_blocks._openmp():
        pytest.skip("no split without OpenMP")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        q, k = torch.empty(1, 4, 2048, 8), torch.empty(1, 2, 2048, 8)
        assert torch_blocks._split_plan(q, k) == (1, [(0, 1), (1, 2)])
        assert torch_blocks._split_plan(q, k, torch_blocks._SPLIT_MIN_ROWS_BACKWARD) == (0, [])
        assert torch_blocks._split_plan(q[:, :, :2047], k[:, :, :2047]) == (0, [])
        big_q, big_k = torch.empty(1, 4, 16384, 1), torch.empty(1, 4, 16384, 1)
        assert torch_blocks._split_plan(big_q, big_k, torch_blocks._SPLIT_MIN_ROWS_BACKWARD)[1]
    finally:
        torch.set_num_threads(threads)


def test_history_scores_ignore_stale_scratch():
    """Scores, row sums and tile outputs live in per-thread scratch buffers reused across calls:
    NaN left there by earlier work must not reach the output."""
    torch.manual_seed(5)  # 45 tokens: the last key block is partial (padded rows in the chunk buffers)
    q, k, v = torch.randn(1, 2, 45, 16), torch.randn(1, 2, 45, 16), torch.randn(1, 2, 45, 16)
    kw = dict(block_size=8, top_k=3, causal=True, scale=0.25, attn_mask=None)
    scratch = torch_select.Scratch.for_thread(torch.float32, "cpu")
    for name in ("s", "q", "l", "o", "qc", "kc", "vc"):
        scratch.get(name, (1 << 16,)).fill_(float("nan"))
    got = torch_fast.forward(q, k, v, **kw)
    torch.testing.assert_close(got, reference.forward(q, k, v, **kw), rtol=2e-5, atol=2e-5)
