"""`moba::attention_kv_cache`: MoBA against a preallocated KV cache (SPEC section 2 item 9).

The yardstick is independent of the op: `moba_attention(..., backend="reference")` on the filled
prefix only (the same tokens without the cache). The unfilled slots hold NaN and huge values, so
any read of them shows. Every backend that runs on CPU is checked (Triton under the interpreter,
tiny shapes), the torch backend on both its paths, plus the block-means update, bad input, and
the op under torch.compile (fullgraph) and torch.export.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere in this process

import pytest
import torch

import moba_rewrite as mr
from moba_rewrite.attention import kv_cache
from moba_rewrite.attention.block_means import (key_block_means, refresh_key_block_means_,
                                                update_key_block_means_)
from moba_rewrite.kernels.torch import decode as torch_decode
from moba_rewrite.kernels.triton import backend as tb

BS = 8


def _cache(filled, length, *, b=2, hq=4, hkv=2, tq=1, d=16, seed=0, dtype=torch.float32):
    """q for the newest `tq` tokens, a cache of `length` slots filled up to `filled` (garbage after)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, tq, d, generator=g).to(dtype)
    k = torch.randn(b, hkv, length, d, generator=g).to(dtype)
    v = torch.randn(b, hkv, length, d, generator=g).to(dtype)
    k[:, :, filled:], v[:, :, filled:] = float("nan"), 1e4  # never a candidate, never attended
    k[:, :, filled + 1:] = 1e4
    means = torch.full((b, hkv, -(-length // BS), d), float("nan"))  # unfilled blocks: garbage too
    update_key_block_means_(means, k, torch.arange(filled), BS, from_start=True)
    return q, k, v, means, torch.arange(filled - tq, filled)


def _mask(kind, b, tq, length):
    if kind == "padding":  # left padding of the second sequence
        m = torch.ones(b, 1, 1, length, dtype=torch.bool)
        m[1, ..., :5] = False
        return m
    if kind == "float":  # a finite bias, some hidden keys, and a query of the first sequence that sees nothing
        m = torch.randn(b, 1, tq, length)
        m[..., 9:12] = float("-inf")
        m[0, :, -1] = float("-inf")
        return m
    return None


def _expected(q, k, v, filled, mask, causal, top_k):
    m = mask[..., :filled] if mask is not None else None
    return mr.moba_attention(q, k[:, :, :filled], v[:, :, :filled], block_size=BS, top_k=top_k, causal=causal,
                             attn_mask=m, enable_gqa=True, backend="reference")


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("mask_kind", [None, "padding", "float"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("tq,filled", [(1, 29), (1, 33), (6, 30)])  # decode in / at a block, a chunk across two
def test_equals_moba_on_the_filled_prefix(backend, mask_kind, causal, tq, filled):
    q, k, v, means, pos = _cache(filled, 45, tq=tq)
    mask = _mask(mask_kind, 2, tq, 45)
    inputs = [t.clone() for t in (q, k, v, means, pos)]
    got = mr.moba_attention_kv_cache(q, k, v, means, pos, block_size=BS, top_k=3, causal=causal, attn_mask=mask,
                                     enable_gqa=True, backend=backend)
    torch.testing.assert_close(got, _expected(q, k, v, filled, mask, causal, 3), atol=2e-5, rtol=2e-5)
    for before, after in zip(inputs, (q, k, v, means, pos)):  # the op changes none of its inputs
        torch.testing.assert_close(after, before, equal_nan=True, rtol=0, atol=0)


@pytest.mark.parametrize("layout", ["spare_slots", "heads_swapped"])
def test_a_cache_that_is_a_view_of_a_larger_buffer(layout):
    """A cache whose heads and batch rows sit at strides longer than its length (`GrowingDynamicLayer`
    hands the op `buffer[:, :, :filled]`), or whose heads are permuted in memory: the same answer,
    and nothing read from the spare slots (NaN there)."""
    q, k, v, means, pos = _cache(33, 33, b=2, hkv=2)
    if layout == "spare_slots":
        bufs = [torch.full((2, 2, 50, 16), float("nan")) for _ in range(2)]
        for buf, t in zip(bufs, (k, v)):
            buf[:, :, :33] = t
        kc, vc = (buf[:, :, :33] for buf in bufs)
        assert kc.stride(1) == 50 * 16 and not kc.is_contiguous()
    else:
        kc, vc = (t.transpose(0, 1).contiguous().transpose(0, 1) for t in (k, v))
    kw = dict(block_size=BS, top_k=2, enable_gqa=True)
    got = mr.moba_attention_kv_cache(q, kc, vc, means, pos, backend="torch", **kw)
    torch.testing.assert_close(got, _expected(q, k, v, 33, None, True, 2), atol=2e-5, rtol=2e-5)


def test_torch_backend_sliced_path_for_long_chunks(monkeypatch):
    """Past the gather budget the torch backend reads the filled length and runs its prefill path."""
    q, k, v, means, pos = _cache(30, 45, tq=6)
    monkeypatch.setattr(torch_decode, "_GATHER_MAX_ELEMS", 0)
    got = mr.moba_attention_kv_cache(q, k, v, means, pos, block_size=BS, top_k=3, enable_gqa=True, backend="torch")
    torch.testing.assert_close(got, _expected(q, k, v, 30, None, True, 3), atol=2e-5, rtol=2e-5)


def test_gate_reads_the_cached_means():
    """Means that differ from k's change the routing: the decode path gates on the cache it is given."""
    q, k, v, means, pos = _cache(40, 45, seed=3)
    other = torch.randn(means.shape, generator=torch.Generator().manual_seed(9))
    kw = dict(block_size=BS, top_k=2, enable_gqa=True)
    want = mr.moba_attention_kv_cache(q, k, v, other, pos, backend="reference", **kw)
    torch.testing.assert_close(mr.moba_attention_kv_cache(q, k, v, other, pos, backend="torch", **kw), want,
                               atol=2e-5, rtol=2e-5)
    assert not torch.allclose(want, mr.moba_attention_kv_cache(q, k, v, means, pos, backend="reference", **kw))


@pytest.mark.skipif(not tb.is_available(), reason=tb.unavailable_reason() or "triton unavailable")
@pytest.mark.parametrize("tq,filled,dtype,mask_kind", [(1, 29, torch.float32, None),
                                                       (1, 33, torch.float16, "padding"),
                                                       (5, 30, torch.float32, "padding")])
def test_triton_equals_the_reference(tq, filled, dtype, mask_kind):
    q, k, v, means, pos = _cache(filled, 40, tq=tq, dtype=dtype, seed=1)
    mask = _mask(mask_kind, 2, tq, 40)
    kw = dict(block_size=BS, top_k=3, enable_gqa=True, attn_mask=mask)
    got = mr.moba_attention_kv_cache(q, k, v, means, pos, backend="triton", **kw)
    want = mr.moba_attention_kv_cache(q, k, v, means, pos, backend="reference", **kw)
    tol = 2e-3 if dtype == torch.float16 else 2e-5
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


def test_means_update_touches_only_the_new_blocks_and_matches_recomputing():
    _, k, _, _, _ = _cache(45, 45)
    means = torch.zeros(2, 2, 6, 16)
    update_key_block_means_(means, k, torch.arange(11), BS)  # a prompt over two blocks
    sliced = torch.zeros_like(means)
    refresh_key_block_means_(sliced, k, 0, 11, BS)
    for end in list(range(12, 21)) + [24, 37]:  # decode steps across a boundary, then chunks of 3 and 13
        start = end - 1 if end <= 20 else (21 if end == 24 else 24)
        before = means.clone()
        update_key_block_means_(means, k, torch.arange(start, end), BS)
        refresh_key_block_means_(sliced, k, start, end, BS)
        n = -(-end // BS)
        torch.testing.assert_close(means[:, :, :n], key_block_means(k[:, :, :end], BS), rtol=0, atol=1e-6)
        torch.testing.assert_close(sliced[:, :, :n], means[:, :, :n], rtol=0, atol=1e-6)
        untouched = [j for j in range(6) if not start // BS <= j <= (end - 1) // BS]
        assert torch.equal(means[:, :, untouched], before[:, :, untouched])


@pytest.mark.parametrize("mask_kind", [None, "padding", "float"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("tq,filled", [(1, 29), (6, 30)])
def test_dense_below_is_full_attention_on_the_filled_prefix_below_it(mask_kind, causal, tq, filled):
    """`dense_below` N: full attention on the filled prefix while fewer than N slots are filled,
    MoBA from N on; the reference backend never switches. The on-device choice (what a captured
    CUDA graph runs: both computed, no host read) gives the same as the host's."""
    q, k, v, means, pos = _cache(filled, 45, tq=tq)
    mask = _mask(mask_kind, 2, tq, 45)
    kw = dict(block_size=BS, top_k=3, causal=causal, attn_mask=mask, enable_gqa=True)
    full = _expected(q, k, v, filled, mask, causal, top_k=-(-filled // BS))  # every block: full attention
    sparse = _expected(q, k, v, filled, mask, causal, top_k=3)
    assert not torch.allclose(full, sparse, atol=1e-3)
    for dense_below, want in ((filled + 1, full), (filled, sparse), (100, full)):  # 100: past the cache
        for backend in ("torch", "auto"):
            got = mr.moba_attention_kv_cache(q, k, v, means, pos, backend=backend, dense_below=dense_below, **kw)
            torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
        on_device = kv_cache.dense_below_on_device(q, k, v, means, pos, mask, BS, 3, causal, 0.25, "torch",
                                                   dense_below)
        torch.testing.assert_close(on_device, want, atol=2e-5, rtol=2e-5)
    oracle = mr.moba_attention_kv_cache(q, k, v, means, pos, backend="reference", dense_below=filled + 1, **kw)
    torch.testing.assert_close(oracle, sparse, atol=2e-5, rtol=2e-5)
    with pytest.raises(ValueError, match=r"dense_below must be a non-negative int \(0: never\), got -1"):
        mr.moba_attention_kv_cache(q, k, v, means, pos, dense_below=-1, **kw)


def test_bad_input_is_named():
    q, k, v, means, pos = _cache(20, 40)
    kw = dict(block_size=BS, top_k=3, enable_gqa=True)
    with pytest.raises(ValueError, match=r"NB >= ceil\(40 / 8\) = 5 .* got \[2, 2, 4, 16\]"):
        mr.moba_attention_kv_cache(q, k, v, means[:, :, :4], pos, **kw)
    with pytest.raises(ValueError, match=r"\[B, Hkv, NB, D\].*got \[2, 4, 5, 16\]"):
        mr.moba_attention_kv_cache(q, k, v, means.repeat(1, 2, 1, 1), pos, **kw)
    with pytest.raises(kv_cache.CachePositionError, match="cache_position 40..40 is out of range for a cache of 40"):
        mr.moba_attention_kv_cache(q, k, v, means, torch.tensor([40]), **kw)
    with pytest.raises(kv_cache.CachePositionError, match="-1..-1"):
        mr.moba_attention_kv_cache(q, k, v, means, torch.tensor([-1]), **kw)
    q3 = torch.randn(2, 4, 3, 16)
    with pytest.raises(kv_cache.CachePositionError, match=r"3 consecutive positions .* got \[4, 6, 6\]"):
        mr.moba_attention_kv_cache(q3, k, v, means, torch.tensor([4, 6, 6]), **kw)
    with pytest.raises(ValueError, match=r"cache_position must be an int32/int64 tensor \[Tq\] = \[1\]"):
        mr.moba_attention_kv_cache(q, k, v, means, pos.float(), **kw)
    with pytest.raises(ValueError, match="update_key_block_means_: means has shape"):
        update_key_block_means_(means[:, :, :3], k, pos, BS)


class _Decoder(torch.nn.Module):
    """A generation step as an exported program would hold it: static caches and means as buffers."""

    def __init__(self, k, v, means):
        super().__init__()
        self.register_buffer("k", k.clone())
        self.register_buffer("v", v.clone())
        self.register_buffer("means", means.clone())

    def forward(self, q, k_new, v_new, cache_position):
        self.k.index_copy_(2, cache_position, k_new)
        self.v.index_copy_(2, cache_position, v_new)
        update_key_block_means_(self.means, self.k, cache_position, BS)
        return torch.ops.moba.attention_kv_cache(q, self.k, self.v, self.means, cache_position, None, BS, 3, True,
                                                 0.25, "auto")


def test_compiles_fullgraph_and_exports():
    q, k, v, means, _ = _cache(20, 40)
    k[:, :, 20:], v[:, :, 20:] = 0.0, 0.0
    step = (q, torch.randn(2, 2, 1, 16), torch.randn(2, 2, 1, 16), torch.tensor([20]))
    eager = _Decoder(k, v, means)
    want = eager(*step)
    k_full = eager.k[:, :, :21]
    torch.testing.assert_close(want, _expected(q, k_full, eager.v, 21, None, True, 3), atol=2e-5, rtol=2e-5)
    torch._dynamo.reset()
    compiled = torch.compile(_Decoder(k, v, means), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(*step), want)
    ep = torch.export.export(_Decoder(k, v, means), step)
    assert any(n.target is torch.ops.moba.attention_kv_cache.default for n in ep.graph.nodes)
    fresh = _Decoder(k, v, means)
    torch.testing.assert_close(ep.module()(*step), want)
    torch.testing.assert_close(fresh(*step), want)
    torch._dynamo.reset()
