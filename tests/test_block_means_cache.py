"""`key_block_means` and `moba_attention(key_block_means=...)`: the gate's block means kept as a
cache beside the KV cache (decode need not reread all of K). Checked against the dense reference
and against calls without the cache, on every backend that runs on CPU."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere in this process

import pytest
import torch

import moba_rewrite as mr
from moba_rewrite.kernels import reference as ref
from moba_rewrite.kernels.triton import backend as tb

BACKENDS = ["reference", "torch"] + (["triton"] if tb.is_available() else [])


def _qkv(tq, tk, *, hq=4, hkv=2, d=16, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, hq, tq, d, generator=g).to(dtype), torch.randn(1, hkv, tk, d, generator=g).to(dtype),
            torch.randn(1, hkv, tk, d, generator=g).to(dtype))


def test_means_are_the_mean_key_of_each_block_including_a_partial_last_one():
    _, k, _ = _qkv(1, 21)
    got = mr.key_block_means(k, 8)
    assert got.shape == (1, 2, 3, 16) and got.dtype == torch.float32
    torch.testing.assert_close(got[:, :, 0], k[:, :, 0:8].mean(2))
    torch.testing.assert_close(got[:, :, 2], k[:, :, 16:21].mean(2))  # partial block: its own size


def test_incremental_update_while_decoding_equals_recomputing():
    _, k, _ = _qkv(1, 40)
    means = mr.key_block_means(k[:, :, :13], 8)
    for t in range(14, 41):  # append one token at a time, as a decoder does
        means = mr.key_block_means(k[:, :, :t], 8, previous=means)
        torch.testing.assert_close(means, mr.key_block_means(k[:, :, :t], 8), rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tq", [1, 5])  # decode and a chunk of newest queries
def test_cached_means_give_the_same_result_as_none(backend, tq):
    q, k, v = _qkv(tq, 45, seed=1)
    kw = dict(block_size=8, top_k=3, enable_gqa=True, backend=backend)
    want = mr.moba_attention(q, k, v, **kw)
    got = mr.moba_attention(q, k, v, key_block_means=mr.key_block_means(k, 8), **kw)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(got, ref.forward(q, k, v, block_size=8, top_k=3, causal=True, scale=0.25,
                                                attn_mask=None), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("backend", ["reference"] + (["triton"] if tb.is_available() else []))
def test_backends_that_take_means_route_by_them(backend):
    """Means that differ from k's (a stale cache) change the routing the same way on the reference
    and the kernels: proof the cache is what the gate reads."""
    q, k, v = _qkv(6, 48, seed=2)
    fake = torch.randn(1, 2, 6, 16, generator=torch.Generator().manual_seed(9))
    kw = dict(block_size=8, top_k=3, enable_gqa=True)
    got = mr.moba_attention(q, k, v, key_block_means=fake, backend=backend, **kw)
    want = ref.forward(q, k, v, block_size=8, top_k=3, causal=True, scale=0.25, attn_mask=None, key_block_means=fake)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    assert not torch.allclose(got, mr.moba_attention(q, k, v, backend=backend, **kw), atol=1e-3)


def test_gradients_flow_with_cached_means():
    q, k, v = (t.clone().requires_grad_(True) for t in _qkv(6, 30, seed=3))
    out = mr.moba_attention(q, k, v, block_size=8, top_k=2, enable_gqa=True, backend="torch",
                            key_block_means=mr.key_block_means(k.detach(), 8))
    out.square().sum().backward()
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    mr.moba_attention(*leaves, block_size=8, top_k=2, enable_gqa=True, backend="torch").square().sum().backward()
    for a, b in zip((q, k, v), leaves):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-5)


def test_compiles_and_exports_as_one_op():
    class M(torch.nn.Module):
        def forward(self, q, k, v, means):
            return mr.moba_attention(q, k, v, block_size=8, top_k=2, enable_gqa=True, key_block_means=means,
                                     backend="torch")

    q, k, v = _qkv(1, 30, seed=4)
    means = mr.key_block_means(k, 8)
    want = M()(q, k, v, means)
    torch.testing.assert_close(torch.compile(M(), fullgraph=True)(q, k, v, means), want)
    ep = torch.export.export(M(), (q, k, v, means))
    assert sum(n.target is torch.ops.moba.attention_cached.default for n in ep.graph.nodes) == 1
    torch.testing.assert_close(ep.module()(q, k, v, means), want)


@pytest.mark.parametrize("means, match", [
    (torch.zeros(1, 2, 3, 16), r"\[1, 2, 4, 16\]"),        # one block short for Tk = 30, block 8
    (torch.zeros(1, 2, 4, 16, dtype=torch.int64), "floating"),
    ("means", "floating tensor"),
])
def test_bad_cache_is_a_clear_error(means, match):
    q, k, v = _qkv(1, 30)
    with pytest.raises(ValueError, match=match):
        mr.moba_attention(q, k, v, block_size=8, top_k=2, enable_gqa=True, key_block_means=means)


def test_bad_previous_is_a_clear_error():
    _, k, _ = _qkv(1, 30)
    with pytest.raises(ValueError, match="previous has shape"):
        mr.key_block_means(k, 8, previous=torch.zeros(1, 2, 9, 16))
    with pytest.raises(ValueError, match="block_size"):
        mr.key_block_means(k, 0)
