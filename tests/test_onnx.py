"""ONNX export of MoBA: one custom-domain node with a standard-op function body that
onnxruntime runs with the numbers of the dense reference (the torch op, backend="reference")."""

from __future__ import annotations

import math

import onnx
import pytest
import torch
from torch import nn

import moba_rewrite as mr
from moba_rewrite.exporters import onnx as mo
from moba_rewrite.exporters.common import max_abs_diff


class ManySites(nn.Module):
    """Five MoBA calls covering GQA, causal / non-causal, bool / float masks, top_k=1, dense limit."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(16, 3 * 4 * 8)

    def forward(self, x, bool_mask, float_mask):
        b, t, _ = x.shape
        q, k, v = self.proj(x).view(b, t, 3, 4, 8).permute(2, 0, 3, 1, 4)
        kg, vg = k[:, :2], v[:, :2]
        kw = dict(backend="reference")
        return (
            mr.moba_attention(q, kg, vg, block_size=4, top_k=3, causal=True, enable_gqa=True, **kw),
            mr.moba_attention(q, k, v, block_size=5, top_k=2, causal=False, attn_mask=bool_mask, **kw),
            mr.moba_attention(q, k, v, block_size=3, top_k=3, causal=False, attn_mask=float_mask, scale=0.2, **kw),
            mr.moba_attention(q, k, v, block_size=4, top_k=1, causal=True, **kw),
            mr.moba_attention(q[:, :, -3:], k, v, block_size=8, top_k=64, causal=True, **kw),
        )


def _inputs(t: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, t, 16, generator=g)
    bool_mask = torch.rand(2, 1, t, t, generator=g) > 0.3
    bool_mask[..., 0] = True
    float_mask = torch.randn(2, 1, t, t, generator=g)
    float_mask = float_mask.masked_fill(torch.rand(2, 1, t, t, generator=g) > 0.6, -math.inf)
    float_mask[1, 0, 3] = -math.inf  # one row sees nothing: zeros, never NaN
    return x, bool_mask, float_mask


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = ManySites().eval()
    path = tmp_path_factory.mktemp("onnx") / "many.onnx"
    seq = torch.export.Dim("seq", min=4, max=1024)
    shapes = ({1: seq}, {2: seq, 3: seq}, {2: seq, 3: seq})
    proto = mo.export_onnx(model, _inputs(19, 0), path, dynamic_shapes=shapes)
    return model, path, proto


def test_moba_is_one_custom_node_with_a_function_body(exported):
    _, path, proto = exported
    nodes = mo.moba_nodes(proto)
    assert len(nodes) == 5
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[0].attribute}
    assert attrs["block_size"] == 4 and attrs["top_k"] == 3 and attrs["causal"] == 1
    functions = [f for f in proto.functions if f.domain == mo.DOMAIN]
    assert [f.name for f in functions] == [mo.OP_NAME]
    body_ops = {n.op_type for n in functions[0].node}
    assert {"TopK", "MatMul", "ReduceMax", "Exp", "Gather"} <= body_ops
    assert all(n.domain in ("", "ai.onnx") for n in functions[0].node)  # standard ops only
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)


@pytest.mark.parametrize("t", [19, 33, 4])
def test_onnxruntime_matches_reference(exported, t):
    model, path, _ = exported
    args = _inputs(t, seed=t)
    with torch.no_grad():
        expected = model(*args)
    got = mo.run_onnxruntime(path, args)
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert not torch.isnan(torch.as_tensor(g)).any()
        assert max_abs_diff(g, e) < 2e-5


def test_onnx_function_differs_from_dense_attention(exported):
    """The graph really routes: at T=33 with block 4 / top-3 MoBA is not causal attention."""
    model, path, _ = exported
    x, bm, fm = _inputs(33, seed=1)
    got = torch.as_tensor(mo.run_onnxruntime(path, (x, bm, fm))[0])
    b, t, _ = x.shape
    q, k, v = model.proj(x).view(b, t, 3, 4, 8).permute(2, 0, 3, 1, 4)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k[:, :2], v[:, :2], is_causal=True, enable_gqa=True)
    assert max_abs_diff(got, dense) > 1e-3
