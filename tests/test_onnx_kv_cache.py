"""`com.moba_rewrite::AttentionKVCache` (exporters/onnx_kv_cache.py), the decode node of ONNX
generation programs, run by onnxruntime against the reference backend's `moba::attention_kv_cache`
(MoBA by definition on the filled prefix, SPEC section 2 item 9), on the same cached means."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

import moba_rewrite.attention.kv_cache  # noqa: F401  (the op)
from moba_rewrite.attention.block_means import update_key_block_means_
from moba_rewrite.exporters import onnx as moba_onnx
from moba_rewrite.exporters import onnx_kv_cache
from moba_rewrite.exporters.onnx_generation import _kv_cache_node_translation


class _Call(torch.nn.Module):
    def __init__(self, block_size: int, top_k: int, causal: bool, scale: float) -> None:
        super().__init__()
        self.args = (block_size, top_k, causal, scale)

    def forward(self, q, k_cache, v_cache, means, cache_position, mask):
        b, t, c, s = self.args
        return torch.ops.moba.attention_kv_cache(q, k_cache, v_cache, means, cache_position, mask, b, t, c, s, "auto")


def _onnx(call: _Call, args, tmp_path):
    table = {torch.ops.moba.attention_kv_cache.default: _kv_cache_node_translation}
    with torch.no_grad():
        proto = torch.onnx.export(call, args, dynamo=True, custom_translation_table=table,
                                  opset_version=moba_onnx.OPSET_VERSION, verbose=False, report=False).model_proto
    assert onnx_kv_cache.attach_function(proto) == 1
    onnx.checker.check_model(proto)
    path = tmp_path / "kv.onnx"
    onnx.save(proto, str(path))
    return moba_onnx.run_onnxruntime(path, args)[0]


def _case(*, b=1, hq=4, hkv=2, tq=1, length=100, filled=77, d=16, dv=16, block=16, seed=0, mask="float",
          poison=True, nb_extra=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, tq, d, generator=g)
    k = torch.randn(b, hkv, length, d, generator=g)
    v = torch.randn(b, hkv, length, dv, generator=g)
    if poison:  # unfilled slots hold garbage a correct kernel never reads into the output
        k[:, :, filled:] = float("nan")
        v[:, :, filled:] = float("nan")
    means = torch.zeros(b, hkv, -(-length // block) + nb_extra, d)
    update_key_block_means_(means, k, torch.arange(filled), block, from_start=True)
    pos = torch.arange(filled - tq, filled)
    if mask == "float":  # the generation programs' form: 0 for written slots, -inf after (and for left padding)
        m = torch.zeros(b, 1, tq, length)
        m[..., filled:] = float("-inf")
        m[0, ..., :5] = float("-inf")  # row 0 left padded by 5
    elif mask == "bool":
        m = torch.ones(b, 1, 1, length, dtype=torch.bool)
        m[..., filled:] = False
        m[-1, ..., 20:40] = False  # a hole covering whole blocks: they must not be candidates
    else:
        m = None
    return q, k, v, means, pos, m


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kw", [
    dict(),  # GQA 4/2, one query, float mask with left padding, partial last block
    dict(b=2, mask="bool", top_k=3),
    dict(mask=None, hq=2, hkv=2, top_k=2),
    dict(tq=3, filled=64, top_k=3),  # three new tokens, the last block exactly full
    dict(top_k=1),  # own block only
    dict(top_k=20, nb_extra=2),  # more picks than blocks; means with spare rows
    dict(dv=8, d=24),  # a value head dim of its own (MLA)
    dict(filled=3, length=40),  # inside the first block: no candidates
])
def test_node_equals_the_reference_op(tmp_path, causal, kw):
    kw = dict(kw)
    top_k = kw.pop("top_k", 3)
    q, k, v, means, pos, m = _case(**kw)
    call = _Call(16, top_k, causal, q.shape[-1] ** -0.5)
    want = torch.ops.moba.attention_kv_cache(q, k, v, means, pos, m, 16, top_k, causal, q.shape[-1] ** -0.5,
                                             "reference")
    if m is None:
        got = _onnx(_CallNoMask(call), (q, k, v, means, pos), tmp_path)
    else:
        got = _onnx(call, (q, k, v, means, pos, m), tmp_path)
    assert np.isfinite(got).all()
    torch.testing.assert_close(torch.from_numpy(got), want, atol=1e-5, rtol=1e-5)


class _CallNoMask(torch.nn.Module):
    def __init__(self, call: _Call) -> None:
        super().__init__()
        self.call = call

    def forward(self, q, k_cache, v_cache, means, cache_position):
        b, t, c, s = self.call.args
        return torch.ops.moba.attention_kv_cache(q, k_cache, v_cache, means, cache_position, None, b, t, c, s, "auto")


def test_the_gate_reads_the_cached_means_not_the_keys(tmp_path):
    """Means that disagree with the keys change the selection the same way in both: the node gates
    on its `means` input (what makes a decode step O(top_k * block_size), not O(cache))."""
    q, k, v, means, pos, m = _case(length=160, filled=150, hq=2, hkv=2)
    means = torch.randn_like(means) * 4  # not the keys' means
    call = _Call(16, 2, True, 0.25)
    want = torch.ops.moba.attention_kv_cache(q, k, v, means, pos, m, 16, 2, True, 0.25, "reference")
    honest = torch.zeros_like(means)
    update_key_block_means_(honest, k, torch.arange(150), 16, from_start=True)
    other = torch.ops.moba.attention_kv_cache(q, k, v, honest, pos, m, 16, 2, True, 0.25, "reference")
    assert not torch.allclose(want, other)  # the means matter for this input
    torch.testing.assert_close(torch.from_numpy(_onnx(call, (q, k, v, means, pos, m), tmp_path)), want,
                               atol=1e-5, rtol=1e-5)


class _DenseBelowCall(torch.nn.Module):
    def __init__(self, causal: bool, dense_below: int) -> None:
        super().__init__()
        self.causal, self.dense_below = causal, dense_below

    def forward(self, q, k_cache, v_cache, means, cache_position, mask):
        return torch.ops.moba.attention_kv_cache(q, k_cache, v_cache, means, cache_position, mask, 16, 2,
                                                 self.causal, 0.25, "auto", self.dense_below)


@pytest.mark.parametrize("causal,filled,dense_below,full", [(True, 77, 78, True), (True, 77, 77, False),
                                                            (False, 77, 500, True), (False, 77, 77, False),
                                                            (True, 45, 90, True)])
def test_dense_below_node_switches_to_full_attention_below_it(tmp_path, causal, filled, dense_below, full):
    """The node's `dense_below`: full attention (every filled block gathered) while fewer slots are
    filled than it, top-2 MoBA from it on; the op (torch backend) gives the same on the same input."""
    q, k, v, means, pos, m = _case(filled=filled)
    want = torch.ops.moba.attention_kv_cache(q, k, v, means, pos, m, 16, 2, causal, 0.25, "torch", dense_below)
    sparse = torch.ops.moba.attention_kv_cache(q, k, v, means, pos, m, 16, 2, causal, 0.25, "reference")
    dense = torch.ops.moba.attention_kv_cache(q, k, v, means, pos, m, 16, 16, causal, 0.25, "reference")  # all blocks
    torch.testing.assert_close(want, dense if full else sparse, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(dense, sparse, atol=1e-4)
    got = _onnx(_DenseBelowCall(causal, dense_below), (q, k, v, means, pos, m), tmp_path)
    torch.testing.assert_close(torch.from_numpy(got), want, atol=1e-5, rtol=1e-5)
