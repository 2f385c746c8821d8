"""ONNX export: MoBA becomes one custom-domain node that carries its own definition.

Each `moba::attention` call in the graph becomes a node `com.moba_rewrite::Attention`. The
model also holds an ONNX *function* of that name, written with standard ONNX ops (opset 20).
Any ONNX runtime can run the model as it is (onnxruntime inlines the function); a runtime
with a native MoBA kernel registers it for (`com.moba_rewrite`, `Attention`) and the function
body is ignored. Two bodies compute the same thing (SPEC section 2):

- `sparse` (default, `onnx_sparse.SparseAttentionBody`): gathers only the selected key blocks;
  memory O(T * top_k * block_size) per head;
- `dense` (`AttentionBody` below, `body="dense"` / `--onnx-body dense`): step by step on
  `[Tq, Tk]` tensors (block means, gate, candidate mask, TopK, selected-block mask, masked
  softmax, matmul): O(T^2) memory, the plainest statement of the algorithm.

Node contract (what a native kernel must implement):

- inputs: `q [B, Hq, Tq, D]`, `k [B, Hkv, Tk, D]`, `v [B, Hkv, Tk, Dv]` (Dv may differ from D, as in
  multi-head latent attention), `bias`, an additive
  float mask broadcastable to `[B, Hq, Tq, Tk]` (`-inf` = hidden, 0 = visible; a boolean mask
  is turned into 0 / -inf, an absent mask is the scalar 0);
- attributes: `block_size` (int), `top_k` (int, counts the own block), `causal` (int 0/1),
  `scale` (float), `dense_below` (int, default 0: full attention, i.e. every block selected,
  when `Tk < dense_below`; the policy key of that name), `hidden_at` (float, default 0: off;
  negative: the bias is a float mask whose kind only its values tell, as
  `moba::attention_checked_mask` reads it: if every value is 0 or <= `hidden_at`, those values
  hide keys and the node is MoBA over the rest; otherwise it is a real bias and the node computes
  full attention with it added, what the original site computes);
- output: `[B, Hq, Tq, Dv]` in q's dtype. Gate and softmax are computed in fp32.

Dense attention sites are left to torch's own exporter (standard attention ops). The export
runs without onnxscript's optimizer inlining functions (it would dissolve the MoBA node);
constant folding runs with `inline=False` instead.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import onnx
import onnx.defs
import onnx.helper
import onnxscript
import torch
from onnxscript import opset20 as op

import moba_rewrite.attention.op  # noqa: F401  (registers torch.ops.moba)

DOMAIN = "com.moba_rewrite"
OP_NAME = "Attention"
OPSET_VERSION = 20  # the model's default-domain opset; the function body uses the same
moba_opset = onnxscript.values.Opset(DOMAIN, 1)

_FLOAT = 1  # onnx.TensorProto.FLOAT
_BOOL = 9  # onnx.TensorProto.BOOL


@onnxscript.script(moba_opset, default_opset=op)
def AttentionBody(q, k, v, bias, block_size: int, top_k: int, causal: int, scale: float,  # noqa: N802
                  dense_below: int, hidden_at: float):
    """MoBA (SPEC section 2) on q [B,Hq,Tq,D], k [B,Hkv,Tk,D], v [B,Hkv,Tk,Dv], additive mask `bias`."""
    qf = op.Cast(q, to=1)
    kf = op.Cast(k, to=1)
    vf = op.Cast(v, to=1)
    biasf = op.Cast(bias, to=1)
    # A mask read as `moba::attention_checked_mask` reads it (hidden_at < 0): 0 and values <= hidden_at
    # only: a visibility mask (those values hide keys); any other value: a real bias, full attention.
    # (The same lines open both bodies: an onnxscript function cannot call a Python helper.)
    hidden_at_c = op.Constant(value_float=hidden_at)
    check_on = op.Less(hidden_at_c, op.Constant(value_float=0.0))
    hidden_here = op.LessOrEqual(biasf, hidden_at_c)
    other = op.Not(op.Or(op.Equal(biasf, op.Constant(value_float=0.0)), hidden_here))
    any_other = op.Greater(op.ReduceMax(op.Cast(other, to=1), keepdims=0), op.Constant(value_float=0.0))
    real_bias = op.And(check_on, any_other)
    hide = op.And(op.And(check_on, op.Not(real_bias)), hidden_here)
    biasf = op.Where(hide, op.Constant(value_float=float("-inf")), biasf)
    zero = op.Constant(value_int=0)
    one = op.Constant(value_int=1)
    ninf = op.Constant(value_float=float("-inf"))
    fzero = op.Constant(value_float=0.0)
    fone = op.Constant(value_float=1.0)
    bs = op.Constant(value_int=block_size)
    is_causal = op.Cast(op.Constant(value_int=causal), to=9)

    # GQA: repeat each KV head for its group of query heads (head h uses KV head h // group).
    hq = op.Shape(q, start=1, end=2)
    hkv = op.Shape(k, start=1, end=2)
    group = op.Div(hq, hkv)
    b = op.Shape(k, start=0, end=1)
    expand_shape = op.Concat(op.Constant(value_ints=[1, 1]), group, op.Constant(value_ints=[1, 1]), axis=0)
    k_shape = op.Concat(b, hq, op.Shape(k, start=2, end=4), axis=0)
    v_shape = op.Concat(b, hq, op.Shape(v, start=2, end=4), axis=0)  # Dv may differ from D (MLA)
    kx = op.Reshape(op.Expand(op.Unsqueeze(kf, [2]), expand_shape), k_shape)
    vx = op.Reshape(op.Expand(op.Unsqueeze(vf, [2]), expand_shape), v_shape)

    # Blocks and positions.
    tq = op.Squeeze(op.Shape(q, start=2, end=3), [0])
    tk = op.Squeeze(op.Shape(k, start=2, end=3), [0])
    n_blocks = op.Div(op.Sub(op.Add(tk, bs), one), bs)
    key_pos = op.Range(zero, tk, one)  # [Tk]
    key_block = op.Div(key_pos, bs)  # [Tk]
    blocks = op.Range(zero, n_blocks, one)  # [nb]
    member = op.Cast(op.Equal(op.Unsqueeze(key_block, [0]), op.Unsqueeze(blocks, [1])), to=1)  # [nb, Tk]
    counts = op.ReduceSum(member, [1], keepdims=1)  # [nb, 1]
    # member @ K would spread a NaN key (0 * NaN) to every block: sum the finite keys, then put
    # NaN back on the blocks that hold one (their gate score is NaN: never selected)
    k_nan = op.IsNaN(kx)
    means = op.Div(op.MatMul(member, op.Where(k_nan, fzero, kx)), counts)  # [B, Hq, nb, D]
    block_nan = op.Greater(op.MatMul(member, op.Cast(k_nan, to=1)), fzero)
    means = op.Where(block_nan, op.Constant(value_float=float("nan")), means)
    q_pos = op.Range(op.Sub(tk, tq), tk, one)  # [Tq]
    own = op.Unsqueeze(op.Div(q_pos, bs), [1])  # [Tq, 1]
    blocks_row = op.Unsqueeze(blocks, [0])  # [1, nb]

    # Gate, in fp32, per query head.
    gate = op.MatMul(qf, op.Transpose(means, perm=[0, 1, 3, 2]))  # [B, Hq, Tq, nb]

    # Candidates: earlier blocks (causal) or all other blocks, with at least one visible key.
    is_own = op.Equal(blocks_row, own)
    candidate = op.Or(op.And(is_causal, op.Less(blocks_row, own)),
                      op.And(op.Not(is_causal), op.Not(is_own)))  # [Tq, nb]
    visible = op.Not(op.IsInf(biasf, detect_positive=0))
    visible = op.Expand(visible, op.Concat(op.Shape(q, start=2, end=3), op.Shape(k, start=2, end=3), axis=0))
    block_visible = op.Greater(op.MatMul(op.Cast(visible, to=1), op.Transpose(member, perm=[1, 0])), fzero)
    candidate = op.And(op.And(candidate, block_visible), op.Not(op.IsNaN(gate)))  # a NaN score never selects

    # Selection: own block plus the top_k - 1 best candidates (fewer if fewer exist); every
    # block below `dense_below` keys (full attention).
    n_pick = op.Min(op.Sub(op.Constant(value_int=top_k), one), n_blocks)
    n_pick = op.Where(op.Or(op.Less(tk, op.Constant(value_int=dense_below)), real_bias), n_blocks, n_pick)
    k_topk = op.Reshape(op.Max(n_pick, one), op.Constant(value_ints=[1]))
    scores_gate = op.Where(candidate, gate, ninf)
    values, index = op.TopK(scores_gate, k_topk, axis=-1)
    valid = op.And(op.Greater(values, ninf), op.Greater(n_pick, zero))  # [B, Hq, Tq, K]
    hit = op.And(op.Equal(op.Unsqueeze(index, [-1]), blocks), op.Unsqueeze(valid, [-1]))  # [B,Hq,Tq,K,nb]
    picked = op.Greater(op.ReduceMax(op.Cast(hit, to=1), [3], keepdims=0), fzero)
    selected = op.Or(picked, is_own)  # [B, Hq, Tq, nb]

    # Keys of the selected blocks, cut by causality and by the mask.
    allowed = op.Gather(selected, key_block, axis=3)  # [B, Hq, Tq, Tk]
    causal_ok = op.LessOrEqual(op.Unsqueeze(key_pos, [0]), op.Unsqueeze(q_pos, [1]))  # [Tq, Tk]
    allowed = op.And(op.And(allowed, op.Or(causal_ok, op.Not(is_causal))), visible)

    # Masked softmax that gives zeros, not NaN, on rows with no visible key.
    scores = op.Add(op.Mul(op.MatMul(qf, op.Transpose(kx, perm=[0, 1, 3, 2])), op.Constant(value_float=scale)), biasf)
    scores = op.Where(allowed, scores, ninf)
    row_max = op.ReduceMax(scores, [-1], keepdims=1)
    row_max = op.Where(op.IsInf(row_max), fzero, row_max)
    weights = op.Exp(op.Sub(scores, row_max))
    denom = op.ReduceSum(weights, [-1], keepdims=1)
    probs = op.Div(weights, op.Where(op.Greater(denom, fzero), denom, fone))
    out = op.MatMul(probs, vx)
    return op.CastLike(out, q)


def _register_schema() -> None:
    """Declare the node's schema to onnx, so the exporter can emit it as a plain node.

    The exporter inlines every model-local function while converting opset versions, which
    would dissolve the MoBA node; emitting a schema-backed node and attaching the function
    body after export keeps the node intact.
    """
    defs = onnx.defs
    if defs.has(OP_NAME, DOMAIN):
        return
    param = defs.OpSchema.FormalParameter
    attr = defs.OpSchema.Attribute
    at = defs.OpSchema.AttrType
    schema = defs.OpSchema(
        OP_NAME, DOMAIN, 1,
        "MoBA (Mixture of Block Attention); see moba_rewrite.exporters.onnx for the contract.",
        inputs=[param("q", "T"), param("k", "T"), param("v", "T"), param("bias", "T")],
        outputs=[param("output", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(double)"],
                           "floating point")],
        attributes=[attr("block_size", at.INT, "keys per block"),
                    attr("top_k", at.INT, "blocks attended per query, own block included"),
                    attr("causal", at.INT, "1: causal MoBA"),
                    attr("scale", at.FLOAT, "softmax scale"),
                    attr("dense_below", onnx.helper.make_attribute("dense_below", 0),
                         "full attention when Tk < dense_below (0: never)"),
                    attr("hidden_at", onnx.helper.make_attribute("hidden_at", 0.0),
                         "< 0: read the bias as a checked mask (module docstring); 0: off")],
    )
    defs.register_schema(schema)


_register_schema()


def additive_bias(attn_mask, q):
    """A node's `bias` input: the mask as 0 / -inf in q's type (boolean: True = visible), scalar 0 for none."""
    zero = op.CastLike(op.Constant(value_float=0.0), q)
    if attn_mask is None:
        return zero
    if attn_mask.dtype == onnxscript.ir.DataType.BOOL:
        return op.Where(attn_mask, zero, op.CastLike(op.Constant(value_float=float("-inf")), q))
    return op.CastLike(attn_mask, q)


def _moba_translation(q, k, v, attn_mask=None, block_size: int = 512, top_k: int = 3,
                      causal: bool = True, scale: float = 1.0, backend: str = "auto", dense_below: int = 0):
    """Translate one `moba::attention` call into a `com.moba_rewrite::Attention` node."""
    return moba_opset.Attention(q, k, v, additive_bias(attn_mask, q), block_size=int(block_size), top_k=int(top_k),
                                causal=int(bool(causal)), scale=float(scale), dense_below=int(dense_below),
                                hidden_at=0.0)


class OnnxExportUnsupported(ValueError):
    """The rewritten graph holds something ONNX cannot express; the message says what and what to do."""


_HIDDEN_AT = {  # onnx_ir data type name -> finfo(dtype).min / 2, the checked op's threshold for "hidden"
    "FLOAT": torch.finfo(torch.float32).min / 2, "FLOAT16": torch.finfo(torch.float16).min / 2,
    "BFLOAT16": torch.finfo(torch.bfloat16).min / 2, "DOUBLE": torch.finfo(torch.float64).min / 2,
}


def _checked_mask_translation(q, k, v, attn_mask, block_size: int = 512, top_k: int = 3, scale: float = 1.0,
                              backend: str = "auto", dense_below: int = 0, site: str = ""):
    """Translate `moba::attention_checked_mask` (a float mask whose values are read per call) into an
    Attention node that reads its bias the same way (`hidden_at`: MoBA under a visibility mask, full
    attention with a real bias added)."""
    if site:
        raise OnnxExportUnsupported(
            f"ONNX export: attention site {site!r} has a float mask checked per call and the policy's "
            f"on_unsupported: error, which an ONNX graph cannot raise at run time; use on_unsupported: dense "
            f"(a real bias then runs full attention, as the original) or export as pt2 or aoti")
    dtype = getattr(getattr(attn_mask, "dtype", None), "name", "FLOAT")
    return moba_opset.Attention(q, k, v, op.CastLike(attn_mask, q), block_size=int(block_size), top_k=int(top_k),
                                causal=0, scale=float(scale), dense_below=int(dense_below),
                                hidden_at=float(_HIDDEN_AT.get(dtype, _HIDDEN_AT["FLOAT"])))


def translation_table() -> dict:
    """`custom_translation_table` entries for `torch.onnx.export(dynamo=True)`."""
    import moba_rewrite.attention.checked  # noqa: F401  (registers moba::attention_checked_mask)

    return {torch.ops.moba.attention.default: _moba_translation,
            torch.ops.moba.attention_checked_mask.default: _checked_mask_translation}


def _unsupported_cause(exc: BaseException) -> OnnxExportUnsupported | None:
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OnnxExportUnsupported):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


BODIES = ("sparse", "dense")


def function_proto(body: str = "sparse") -> onnx.FunctionProto:
    """The ONNX function that defines `com.moba_rewrite::Attention` with standard ops."""
    from moba_rewrite.exporters.onnx_sparse import SparseAttentionBody

    if body not in BODIES:
        raise ValueError(f"ONNX function body must be one of {', '.join(BODIES)}, got {body!r}")
    proto = (SparseAttentionBody if body == "sparse" else AttentionBody).to_function_proto()
    proto.name = OP_NAME
    proto.domain = DOMAIN
    return proto


def attach_function(model: onnx.ModelProto, body: str = "sparse") -> int:
    """Add the MoBA function body and opset import to `model`; return the number of MoBA nodes."""
    n_nodes = sum(1 for n in model.graph.node if n.domain == DOMAIN and n.op_type == OP_NAME)
    if not any(f.domain == DOMAIN and f.name == OP_NAME for f in model.functions):
        model.functions.append(function_proto(body))
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(DOMAIN, 1))
    return n_nodes


# --------------------------------------------------------------------------- export / run

_PROTO_LIMIT = 2 * 1024**3 - 64 * 1024**2  # protobuf's 2 GiB, with room for the graph


@contextlib.contextmanager
def quiet_exporter() -> Iterator[None]:
    """torch's ONNX exporter without its noise: "torchvision is not installed" four times per export
    and a LeafSpec deprecation warning (neither concerns the model)."""
    registry_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registry_log.level
    registry_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
            yield
    finally:
        registry_log.setLevel(level)


def export_onnx(model: torch.nn.Module, args: tuple[torch.Tensor, ...], path: str | os.PathLike, *,
                dynamic: bool = False, max_seq: int = 1 << 17, dynamic_shapes: Any = None,
                body: str = "sparse") -> onnx.ModelProto:
    """Export the (already rewritten) model to an ONNX file at `path` and return the proto.

    Inputs are named `input_0..`; with `dynamic=True` dim 1 (the sequence) of every input is
    symbolic (or pass torch.export `dynamic_shapes` yourself). `body`: the MoBA function body,
    `sparse` (default) or `dense` (module docstring). The model is checked with `onnx.checker`.
    """
    from moba_rewrite.exporters.common import exportable, seq_dynamic_shapes

    module = exportable(model)
    shapes = dynamic_shapes if dynamic_shapes is not None else (
        seq_dynamic_shapes(args, max_seq=max_seq) if dynamic else None)
    names = [f"input_{i}" for i in range(len(args))]
    with quiet_exporter(), torch.no_grad():
        try:
            program = torch.onnx.export(module, args, dynamo=True, custom_translation_table=translation_table(),
                                        dynamic_shapes=shapes, opset_version=OPSET_VERSION, input_names=names,
                                        verbose=False, report=False)
        except Exception as exc:  # the exporter wraps a translation's error in its own
            cause = _unsupported_cause(exc)
            if cause is not None:
                raise OnnxExportUnsupported(str(cause)) from None
            raise
    proto = program.model_proto
    attach_function(proto, body)
    if proto.ByteSize() > _PROTO_LIMIT:
        raise ValueError(f"{os.fspath(path)}: expected a model under 2 GiB for single-file ONNX "
                         f"(this one is {proto.ByteSize() / 1024**3:.1f} GiB)")
    onnx.checker.check_model(proto)
    onnx.save(proto, os.fspath(path))
    return proto


def moba_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The MoBA nodes of a model's main graph."""
    return [n for n in model.graph.node if n.domain == DOMAIN and n.op_type == OP_NAME]


def run_onnxruntime(path: str | os.PathLike, args: Sequence[torch.Tensor]) -> list[Any]:
    """Run an ONNX file with onnxruntime on CPU; returns its outputs as numpy arrays."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])
    feeds = {i.name: a.detach().cpu().numpy() for i, a in zip(session.get_inputs(), args)}
    return session.run(None, feeds)
