"""ONNX export of MoBA: one custom-domain node with a standard-op function body that
onnxruntime runs with the numbers of the dense reference (the torch op, backend="reference")."""

from __future__ import annotations

import math

import onnx
import onnx.inliner
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


@pytest.fixture(scope="module", params=["sparse", "dense"])
def exported(request, tmp_path_factory):
    model = ManySites().eval()
    path = tmp_path_factory.mktemp("onnx") / f"many-{request.param}.onnx"
    seq = torch.export.Dim("seq", min=4, max=1024)
    shapes = ({1: seq}, {2: seq, 3: seq}, {2: seq, 3: seq})
    proto = mo.export_onnx(model, _inputs(19, 0), path, dynamic_shapes=shapes, body=request.param)
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


# --------------------------------------------------------------------------- the bodies alone


def _single_node_model(body: str, *, block_size: int, top_k: int, causal: bool, scale: float,
                       **attributes) -> onnx.ModelProto:
    """One `com.moba_rewrite::Attention` node on graph inputs q, k, v, bias (float32, any shape)."""
    h = onnx.helper
    attributes.setdefault("dense_below", 0)  # the exporter always writes it
    attributes.setdefault("hidden_at", 0.0)
    inputs = [h.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in ("q", "k", "v", "bias")]
    node = h.make_node(mo.OP_NAME, ["q", "k", "v", "bias"], ["out"], domain=mo.DOMAIN, block_size=block_size,
                       top_k=top_k, causal=int(causal), scale=scale, **attributes)
    graph = h.make_graph([node], "moba", inputs, [h.make_tensor_value_info("out", onnx.TensorProto.FLOAT, None)])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", mo.OPSET_VERSION), h.make_opsetid(mo.DOMAIN, 1)],
                         functions=[mo.function_proto(body)])
    model.ir_version = 10
    return model


def _session(model: onnx.ModelProto, level=None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if level is not None:
        options.graph_optimization_level = level
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


CASES = [  # B, Hq, Hkv, Tq, Tk, D, block, top_k, causal, mask
    (2, 4, 2, 19, 19, 8, 4, 3, True, None),
    (1, 2, 2, 33, 33, 8, 5, 2, False, "bool"),
    (2, 4, 4, 5, 19, 8, 4, 3, True, "padding"),  # chunked prefill with a key-padding mask [B, 1, 1, Tk]
    (1, 2, 1, 7, 7, 8, 4, 1, True, None),  # top_k = 1: the own block only
    (1, 2, 2, 1, 20, 8, 8, 2, True, "padding"),  # decode
    (2, 4, 2, 19, 19, 8, 3, 3, False, "float"),  # a real additive bias, one row that sees nothing
    (1, 2, 2, 40, 40, 8, 8, 64, True, None),  # the dense limit
]


def _case_inputs(case, seed: int = 0):
    b, hq, hkv, tq, tk, d, *_, mask = case
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, t, d, generator=g) for h, t in ((hq, tq), (hkv, tk), (hkv, tk)))
    attn_mask, bias = None, torch.zeros(())
    if mask == "bool":
        attn_mask = torch.rand(b, 1, tq, tk, generator=g) > 0.3
        attn_mask[..., 0] = True
    elif mask == "padding":
        attn_mask = torch.ones(b, 1, 1, tk, dtype=torch.bool)
        attn_mask[0, ..., :3] = False
    elif mask == "float":
        attn_mask = torch.randn(b, 1, tq, tk, generator=g).masked_fill(torch.rand(b, 1, tq, tk, generator=g) > 0.6,
                                                                        -math.inf)
        attn_mask[1, 0, 3] = -math.inf
    if attn_mask is not None:
        bias = attn_mask if attn_mask.dtype != torch.bool else torch.zeros(()).masked_fill(~attn_mask, -math.inf)
    return q, k, v, attn_mask, bias


@pytest.mark.parametrize("body", mo.BODIES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[3]}x{c[4]}-bs{c[6]}-top{c[7]}-{c[9]}")
def test_each_body_equals_the_reference_op(body, case):
    import onnxruntime as ort

    q, k, v, attn_mask, bias = _case_inputs(case)
    *_, bs, top_k, causal, _ = case
    expected = mr.moba_attention(q, k, v, block_size=bs, top_k=top_k, causal=causal, attn_mask=attn_mask,
                                 enable_gqa=True, backend="reference")
    model = _single_node_model(body, block_size=bs, top_k=top_k, causal=causal, scale=q.shape[-1] ** -0.5)
    feeds = {"q": q.numpy(), "k": k.numpy(), "v": v.numpy(), "bias": bias.numpy()}
    for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        got = torch.from_numpy(_session(model, level).run(None, feeds)[0])
        assert torch.isfinite(got).all()
        assert max_abs_diff(got, expected) < 1e-5


def test_sparse_body_never_holds_a_tq_by_tk_tensor():
    """Every intermediate of the inlined sparse body, run at T=1024 (block 16, top-2), has at most
    one dim of size T; the dense body (the control) has [B, H, T, T] tensors."""
    t, bs = 1024, 16
    q, k, v, _, bias = _case_inputs((1, 2, 1, t, t, 8, bs, 2, True, None))
    feeds = {"q": q.numpy(), "k": k.numpy(), "v": v.numpy(), "bias": bias.numpy()}

    def intermediate_shapes(body: str) -> list[tuple[int, ...]]:
        model = onnx.inliner.inline_local_functions(
            _single_node_model(body, block_size=bs, top_k=2, causal=True, scale=0.3))
        names = [o for n in model.graph.node for o in n.output if o]
        model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names)
        outs = _session(model).run(names, feeds)
        return [tuple(o.shape) for o in outs]

    assert max(sum(d == t for d in s) for s in intermediate_shapes("dense")) >= 2
    shapes = intermediate_shapes("sparse")
    assert max(sum(d == t for d in s) for s in shapes) <= 1
    assert max(math.prod(s) for s in shapes) < 2 * t * t / 8  # [pairs, block] tensors, not [H, T, T]


@pytest.mark.parametrize("body", mo.BODIES)
def test_a_nan_key_block_is_never_selected(body):
    """SPEC 2.4: a block whose gate score is NaN is never a candidate, as in the reference."""
    q, k, v, _, bias = _case_inputs((1, 2, 2, 24, 24, 8, 4, 2, True, None), seed=3)
    k[:, :, 5] = float("nan")  # block 1
    expected = mr.moba_attention(q, k, v, block_size=4, top_k=2, causal=True, backend="reference")
    model = _single_node_model(body, block_size=4, top_k=2, causal=True, scale=q.shape[-1] ** -0.5)
    got = torch.from_numpy(_session(model).run(None, {"q": q.numpy(), "k": k.numpy(), "v": v.numpy(),
                                                      "bias": bias.numpy()})[0])
    assert torch.isnan(expected[:, :, 5:8]).all() and torch.isfinite(expected[:, :, 8:]).all()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5, equal_nan=True)


@pytest.mark.parametrize("body", mo.BODIES)
def test_dense_below_computes_full_attention_below_it(body):
    """The policy's `dense_below`: with fewer keys the node is full attention (every block), with
    as many or more it is MoBA, as the op computes it."""
    q, k, v, _, bias = _case_inputs((1, 2, 2, 24, 24, 8, 4, 2, True, None), seed=4)
    feeds = {"q": q.numpy(), "k": k.numpy(), "v": v.numpy(), "bias": bias.numpy()}
    full = mr.moba_attention(q, k, v, block_size=4, top_k=6, causal=True, backend="reference")
    moba = mr.moba_attention(q, k, v, block_size=4, top_k=2, causal=True, backend="reference")
    assert max_abs_diff(full, moba) > 1e-2
    for dense_below, want in ((25, full), (24, moba)):
        model = _single_node_model(body, block_size=4, top_k=2, causal=True, scale=q.shape[-1] ** -0.5,
                                   dense_below=dense_below)
        got = torch.from_numpy(_session(model).run(None, feeds)[0])
        assert max_abs_diff(got, want) < 1e-5


@pytest.mark.parametrize("body", mo.BODIES)
def test_a_checked_bias_is_read_as_the_checked_op_reads_it(body):
    """`hidden_at < 0` (a float mask whose values only the run shows, `moba::attention_checked_mask`):
    a mask of 0 and finfo.min is visibility (MoBA over the visible keys, finfo.min included in what
    hides), any other value is a real bias (full attention with it added, as the original site)."""
    from moba_rewrite.attention import checked

    q, k, v, *_ = _case_inputs((1, 2, 2, 24, 24, 8, 4, 2, False, None), seed=5)
    lo = torch.finfo(torch.float32).min
    causal = torch.ones(24, 24, dtype=torch.bool).tril()
    visibility = torch.zeros(1, 1, 24, 24).masked_fill(~causal, lo)
    real_bias = torch.randn(1, 1, 24, 24, generator=torch.Generator().manual_seed(6)).masked_fill(~causal, lo)
    model = _single_node_model(body, block_size=4, top_k=2, causal=False, scale=0.3, hidden_at=lo / 2)
    session = _session(model)
    for mask in (visibility, real_bias):
        want = checked.attention_checked_mask(q, k, v, mask, 4, 2, 0.3, "reference")
        got = torch.from_numpy(session.run(None, {"q": q.numpy(), "k": k.numpy(), "v": v.numpy(),
                                                  "bias": mask.numpy()})[0])
        assert max_abs_diff(got, want) < 1e-5
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=real_bias, scale=0.3)
    assert max_abs_diff(checked.attention_checked_mask(q, k, v, real_bias, 4, 2, 0.3, "reference"), dense) < 1e-5
    sparse = checked.attention_checked_mask(q, k, v, visibility, 4, 2, 0.3, "reference")
    assert max_abs_diff(sparse, torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=causal,
                                                                                 scale=0.3)) > 1e-3
