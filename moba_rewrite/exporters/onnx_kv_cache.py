"""ONNX decode against a KV cache: the node `com.moba_rewrite::AttentionKVCache` and its body.

A decode step of an ONNX generation program (`exporters.onnx_generation`) gates on the block
means kept beside the cache, as the pt2 / AOTInductor programs do (`moba::attention_kv_cache`),
instead of recomputing them from every filled key: per step it reads the means, the own block
and the `top_k - 1` selected blocks, O(top_k * block_size) keys, not O(cache). Standard ONNX
ops only (opset 20); the steps are those of the torch backend's decode path
(`kernels/torch/decode.py`, SPEC section 2 item 9):

1. each query row (a query head of a KV head's group, at its position `cache_position[t]`)
   against the means `[B, Hkv, NB, D]` in fp32; candidates are the blocks before the own block
   (causal) or every other filled block (non-causal), minus blocks the mask hides entirely and
   NaN scores; TopK of `top_k - 1` (ties: the lower block index);
2. the keys and values of the own and picked blocks are gathered from the cache (`[rows,
   top_k * block_size]` per KV head), hidden: keys after the query (causal) or past the filled
   prefix, unpicked slots, `-inf` in the mask;
3. one softmax per row over the gathered keys (rows that see nothing give zeros).

Node contract: inputs `q [B, Hq, Tq, D]`, `k_cache [B, Hkv, L, D]`, `v_cache [B, Hkv, L, Dv]`,
`means [B, Hkv, NB >= ceil(L / block_size), D]`, `cache_position [Tq]` (int64, consecutive, the
newest tokens), `bias` (additive float mask broadcastable to `[B, Hq, Tq, L]`; scalar 0 for
none); attributes `block_size`, `top_k`, `causal`, `scale`, `dense_below` (0: never; while fewer
slots are filled, full attention: every candidate block, `ceil(dense_below / block_size)` gathered
per row instead of `top_k`, so a step reads O(max(top_k * block_size, dense_below)) keys);
output `[B, Hq, Tq, Dv]` in q's dtype. Memory is O(B * Hq * Tq * top_k * block_size * D): meant for a few queries (decode);
prefill keeps `com.moba_rewrite::Attention` on the filled prefix.
"""

from __future__ import annotations

import onnx
import onnxscript
from onnxscript import opset20 as op

DOMAIN = "com.moba_rewrite"
OP_NAME = "AttentionKVCache"
moba_opset = onnxscript.values.Opset(DOMAIN, 1)


@onnxscript.script(moba_opset, default_opset=op)
def KVCacheAttentionBody(q, k_cache, v_cache, means, cache_position, bias, block_size: int,  # noqa: N802
                         top_k: int, causal: int, scale: float, dense_below: int):
    """MoBA of the queries at `cache_position` against the filled prefix of the cache (module doc)."""
    qf = op.Cast(q, to=1)
    biasf = op.Cast(bias, to=1)
    zero = op.Constant(value_int=0)
    one = op.Constant(value_int=1)
    zero1 = op.Constant(value_ints=[0])
    one1 = op.Constant(value_ints=[1])
    minus1 = op.Constant(value_ints=[-1])
    ninf = op.Constant(value_float=float("-inf"))
    fzero = op.Constant(value_float=0.0)
    fone = op.Constant(value_float=1.0)
    bs = op.Constant(value_int=block_size)
    bs1 = op.Unsqueeze(bs, [0])
    is_causal = op.Cast(op.Constant(value_int=causal), to=9)

    # Sizes; rows are (group head, query) per KV head, as q reshaped to [B, Hkv, G * Tq, D].
    b1 = op.Shape(q, start=0, end=1)
    hq1 = op.Shape(q, start=1, end=2)
    tq1 = op.Shape(q, start=2, end=3)
    d1 = op.Shape(q, start=3, end=4)
    hkv1 = op.Shape(k_cache, start=1, end=2)
    len1 = op.Shape(k_cache, start=2, end=3)
    dv1 = op.Shape(v_cache, start=3, end=4)
    group1 = op.Div(hq1, hkv1)
    length = op.Squeeze(len1, [0])
    nb = op.Div(op.Sub(op.Add(length, bs), one), bs)
    nb1 = op.Unsqueeze(nb, [0])
    pos = op.Cast(cache_position, to=7)  # [Tq]
    filled = op.Add(op.Slice(pos, minus1, op.Constant(value_ints=[2**62])), one1)  # [1]
    row_pos = op.Tile(pos, group1)  # [R]
    q_rows = op.Reshape(qf, op.Concat(b1, hkv1, minus1, d1, axis=0))  # [B, Hkv, R, D]

    # 1. Gate on the cached means; candidates; TopK.
    gmeans = op.Cast(op.Slice(means, zero1, nb1, op.Constant(value_ints=[2])), to=1)  # [B, Hkv, nb, D]
    gate = op.MatMul(q_rows, op.Transpose(gmeans, perm=[0, 1, 3, 2]))  # [B, Hkv, R, nb]
    blocks = op.Unsqueeze(op.Range(zero, nb, one), [0])  # [1, nb]
    own = op.Unsqueeze(op.Div(row_pos, bs), [1])  # [R, 1]
    filled_block = op.Less(op.Mul(blocks, bs), filled)  # [1, nb]
    candidate = op.Or(op.And(is_causal, op.Less(blocks, own)),
                      op.And(op.Not(is_causal), op.And(op.Not(op.Equal(blocks, own)), filled_block)))  # [R, nb]
    # the mask's visible keys per block, on the mask as [Bb, Hb, Tqb, L], then spread over the rows
    bias4 = op.Expand(op.Expand(biasf, op.Constant(value_ints=[1, 1, 1, 1])),
                      op.Concat(op.Constant(value_ints=[1, 1, 1]), len1, axis=0))
    pad_keys = op.Sub(op.Mul(nb1, bs1), len1)
    seen = op.Pad(op.Cast(op.Not(op.IsInf(bias4, detect_positive=0)), to=1),
                  op.Concat(op.Constant(value_ints=[0, 0, 0, 0, 0, 0, 0]), pad_keys, axis=0))
    block_seen = op.Greater(op.ReduceMax(op.Reshape(seen, op.Concat(op.Shape(bias4, start=0, end=3), nb1, bs1,
                                                                    axis=0)),
                                         op.Constant(value_ints=[4]), keepdims=0), fzero)  # [Bb, Hb, Tqb, nb]
    rows_shape = op.Concat(b1, hkv1, minus1, nb1, axis=0)
    block_seen = op.Reshape(op.Expand(block_seen, op.Concat(b1, hq1, tq1, nb1, axis=0)), rows_shape)
    candidate = op.And(op.And(candidate, block_seen), op.Not(op.IsNaN(gate)))  # [B, Hkv, R, nb]
    n_pick = op.Min(op.Sub(op.Constant(value_int=top_k), one), nb)
    # dense_below: while fewer keys are filled, every candidate (a call below it has at most
    # ceil(dense_below / block) blocks filled), so that many are gathered; from it on the best n_pick
    below = op.Less(op.Squeeze(filled, [0]), op.Constant(value_int=dense_below))
    n_below = op.Min(op.Sub(op.Div(op.Sub(op.Add(op.Constant(value_int=dense_below), bs), one), bs), one),
                     op.Sub(nb, one))
    n_gather = op.Max(n_pick, op.Where(op.Greater(op.Constant(value_int=dense_below), zero), n_below, zero))
    kk = op.Reshape(op.Max(n_gather, one), one1)
    picked_score, picked = op.TopK(op.Where(candidate, gate, ninf), kk, axis=-1)  # [B, Hkv, R, kk]
    in_budget = op.Or(op.Less(op.Range(zero, op.Squeeze(kk, [0]), one), n_pick), below)  # [kk]
    picked_ok = op.And(op.Greater(picked_score, ninf), in_budget)
    sel_shape = op.Concat(op.Shape(picked, start=0, end=3), one1, axis=0)
    sel = op.Concat(op.Expand(op.Unsqueeze(own, [0, 1]), sel_shape), picked, axis=-1)  # [B, Hkv, R, K]
    sel_ok = op.Concat(op.Expand(op.Cast(one, to=9), sel_shape), picked_ok, axis=-1)

    # 2. The selected blocks' key positions, what each row may see, the gathered keys and values.
    key_pos5 = op.Add(op.Unsqueeze(op.Mul(sel, bs), [4]), op.Range(zero, bs, one))  # [B, Hkv, R, K, bs]
    wide = op.Concat(op.Shape(sel, start=0, end=3), minus1, axis=0)
    key_pos = op.Reshape(key_pos5, wide)  # [B, Hkv, R, W]
    ok = op.Reshape(op.Expand(op.Unsqueeze(sel_ok, [4]), op.Shape(key_pos5)), wide)
    row_pos2 = op.Unsqueeze(row_pos, [1])  # [R, 1]
    in_time = op.Or(op.And(is_causal, op.LessOrEqual(key_pos, row_pos2)),
                    op.And(op.Not(is_causal), op.Less(key_pos, filled)))  # (onnxruntime has no boolean Where)
    visible = op.And(ok, in_time)
    index = op.Where(visible, key_pos, zero)  # hidden keys read slot 0: unfilled slots may hold anything
    base = op.Reshape(op.Mul(op.Range(zero, op.Squeeze(op.Mul(b1, hkv1), [0]), one), length),
                      op.Concat(b1, hkv1, one1, one1, axis=0))
    flat = op.Add(index, base)  # rows of the cache viewed as [B * Hkv * L, D]
    keys = op.Cast(op.Gather(op.Reshape(k_cache, op.Concat(minus1, d1, axis=0)), flat), to=1)  # [B, Hkv, R, W, D]
    values = op.Cast(op.Gather(op.Reshape(v_cache, op.Concat(minus1, dv1, axis=0)), flat), to=1)
    mask_rows = op.Reshape(op.Expand(bias4, op.Concat(b1, hq1, tq1, len1, axis=0)),
                           op.Concat(b1, hkv1, minus1, len1, axis=0))  # [B, Hkv, R, L]
    mask = op.GatherElements(mask_rows, index, axis=3)  # [B, Hkv, R, W]
    visible = op.And(visible, op.Not(op.IsInf(mask, detect_positive=0)))

    # 3. One softmax per row over its gathered keys.
    scores = op.Squeeze(op.MatMul(op.Unsqueeze(op.Mul(q_rows, op.Constant(value_float=scale)), [3]),
                                  op.Transpose(keys, perm=[0, 1, 2, 4, 3])), [3])  # [B, Hkv, R, W]
    scores = op.Where(visible, op.Add(scores, mask), ninf)
    row_max = op.ReduceMax(scores, minus1, keepdims=1)
    weights = op.Exp(op.Sub(scores, op.Where(op.IsInf(row_max), fzero, row_max)))
    total = op.ReduceSum(weights, minus1, keepdims=1)
    probs = op.Div(weights, op.Where(op.Greater(total, fzero), total, fone))  # rows that see nothing: 0
    out = op.Squeeze(op.MatMul(op.Unsqueeze(probs, [3]), values), [3])  # [B, Hkv, R, Dv]
    return op.CastLike(op.Reshape(out, op.Concat(b1, hq1, tq1, dv1, axis=0)), q)


def _register_schema() -> None:
    """Declare the node's schema to onnx so the exporter emits it as a plain node (see
    `exporters.onnx._register_schema`)."""
    defs = onnx.defs
    if defs.has(OP_NAME, DOMAIN):
        return
    param = defs.OpSchema.FormalParameter
    attr = defs.OpSchema.Attribute
    at = defs.OpSchema.AttrType
    defs.register_schema(defs.OpSchema(
        OP_NAME, DOMAIN, 1,
        "MoBA of the newest queries against a KV cache, gated on cached block means; see "
        "moba_rewrite.exporters.onnx_kv_cache for the contract.",
        inputs=[param("q", "T"), param("k_cache", "T"), param("v_cache", "T"), param("means", "M"),
                param("cache_position", "I"), param("bias", "T")],
        outputs=[param("output", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(double)"],
                           "floating point"),
                          ("M", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(double)"],
                           "the block means' type"),
                          ("I", ["tensor(int64)", "tensor(int32)"], "positions")],
        attributes=[attr("block_size", at.INT, "keys per block"),
                    attr("top_k", at.INT, "blocks attended per query, own block included"),
                    attr("causal", at.INT, "1: causal MoBA"),
                    attr("scale", at.FLOAT, "softmax scale"),
                    attr("dense_below", onnx.helper.make_attribute("dense_below", 0),
                         "full attention while fewer than this many slots are filled (0: never)")],
    ))


_register_schema()


def node(q, k_cache, v_cache, means, cache_position, bias, *, block_size: int, top_k: int, causal: bool,
         scale: float, dense_below: int = 0):
    """Emit one `com.moba_rewrite::AttentionKVCache` node (inside a torch.onnx translation)."""
    return moba_opset.AttentionKVCache(q, k_cache, v_cache, means, cache_position, bias, block_size=int(block_size),
                                       top_k=int(top_k), causal=int(bool(causal)), scale=float(scale),
                                       dense_below=int(dense_below))


def function_proto() -> onnx.FunctionProto:
    proto = KVCacheAttentionBody.to_function_proto()
    proto.name = OP_NAME
    proto.domain = DOMAIN
    return proto


def attach_function(model: onnx.ModelProto) -> int:
    """Add the body of `AttentionKVCache` to `model` when it has such nodes; return their number."""
    n_nodes = sum(1 for n in model.graph.node if n.domain == DOMAIN and n.op_type == OP_NAME)
    if n_nodes and not any(f.domain == DOMAIN and f.name == OP_NAME for f in model.functions):
        model.functions.append(function_proto())
        if not any(o.domain == DOMAIN for o in model.opset_import):
            model.opset_import.append(onnx.helper.make_opsetid(DOMAIN, 1))
    return n_nodes
