"""The sparse ONNX function body of `com.moba_rewrite::Attention`: MoBA in O(T * top_k * block_size).

Standard ONNX ops only (opset 20), so any runtime runs it; no `[Tq, Tk]` tensor is built
unless the caller's own mask is one. Steps (SPEC section 2):

1. block means of K (keys padded to whole blocks), the gate `q . mean` in fp32 per query head;
2. candidates (earlier blocks when causal, every other block when not, with a visible key, a
   finite gate score), TopK of `top_k - 1`; with the own block that makes `top_k` (query, block)
   *pairs* per query, invalid picks marked;
3. the pairs sorted by their (batch, kv head, key block) *group*, and each group padded to
   whole chunks of `CHUNK` pairs, so that a chunk attends exactly one key block: one batched
   MatMul scores `[chunks, CHUNK, block_size]`, the mask and causality cut it, and each pair
   keeps its softmax partials (row max, row sum, `P @ V`);
4. the partials go back to query order and combine by log-sum-exp over a query's pairs.

Peak memory is a few `[pairs, block_size]` tensors (pairs = B * Hq * Tq * top_k) and the gate
`[B, Hq, Tq, n_blocks]`; the dense body (`onnx.AttentionBody`) holds several `[B, Hq, Tq, Tk]`.
Rows that see no key give zeros. Ties in the gate go to the lower block index (TopK's rule, as
in every backend); a NaN gate score never selects its block.
"""

from __future__ import annotations

import onnxscript
from onnxscript import opset20 as op

DOMAIN = "com.moba_rewrite"
moba_opset = onnxscript.values.Opset(DOMAIN, 1)

CHUNK = 64  # pairs per scored chunk: [CHUNK, D] @ [D, block_size] per chunk


@onnxscript.script(moba_opset, default_opset=op)
def SparseAttentionBody(q, k, v, bias, block_size: int, top_k: int, causal: int, scale: float,  # noqa: N802
                        dense_below: int, hidden_at: float):
    """MoBA (SPEC section 2) on q [B,Hq,Tq,D], k [B,Hkv,Tk,D], v [B,Hkv,Tk,Dv], additive mask `bias` (see
    module doc); output [B,Hq,Tq,Dv]."""
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
    zero1 = op.Constant(value_ints=[0])
    one1 = op.Constant(value_ints=[1])
    minus1 = op.Constant(value_ints=[-1])
    ninf = op.Constant(value_float=float("-inf"))
    fzero = op.Constant(value_float=0.0)
    fone = op.Constant(value_float=1.0)
    bs = op.Constant(value_int=block_size)
    bs1 = op.Unsqueeze(bs, [0])
    chunk = op.Constant(value_int=CHUNK)
    chunk1 = op.Constant(value_ints=[CHUNK])
    is_causal = op.Cast(op.Constant(value_int=causal), to=9)

    # Sizes.
    b1 = op.Shape(q, start=0, end=1)
    hq1 = op.Shape(q, start=1, end=2)
    tq1 = op.Shape(q, start=2, end=3)
    d1 = op.Shape(q, start=3, end=4)
    dv1 = op.Shape(v, start=3, end=4)  # the value head dim (differs from D in multi-head latent attention)
    hkv1 = op.Shape(k, start=1, end=2)
    tk1 = op.Shape(k, start=2, end=3)
    tq = op.Squeeze(tq1, [0])
    tk = op.Squeeze(tk1, [0])
    group1 = op.Div(hq1, hkv1)
    nb = op.Div(op.Sub(op.Add(tk, bs), one), bs)
    nb1 = op.Unsqueeze(nb, [0])
    tkp1 = op.Mul(nb1, bs1)
    pad_t = op.Sub(tkp1, tk1)

    # 1. Keys and values in whole blocks; block means; the gate per query head.
    kv_pads = op.Concat(op.Constant(value_ints=[0, 0, 0, 0, 0, 0]), pad_t, zero1, axis=0)
    kb = op.Reshape(op.Pad(kf, kv_pads), op.Concat(b1, hkv1, nb1, bs1, d1, axis=0))  # [B,Hkv,nb,bs,D]
    vb = op.Reshape(op.Pad(vf, kv_pads), op.Concat(b1, hkv1, nb1, bs1, dv1, axis=0))
    blocks = op.Range(zero, nb, one)  # [nb]
    counts = op.Cast(op.Min(op.Sub(tk, op.Mul(blocks, bs)), bs), to=1)  # keys per block
    means = op.Div(op.ReduceSum(kb, op.Constant(value_ints=[3]), keepdims=0), op.Unsqueeze(counts, [1]))
    qg = op.Reshape(qf, op.Concat(b1, hkv1, minus1, d1, axis=0))  # [B,Hkv,G*Tq,D]
    gate = op.Reshape(op.MatMul(qg, op.Transpose(means, perm=[0, 1, 3, 2])),
                      op.Concat(b1, hq1, tq1, nb1, axis=0))  # [B,Hq,Tq,nb]

    # The mask as [Bb, Hb, Tqb, Tk] (each of Bb, Hb, Tqb is 1 or full), then in whole blocks.
    bias4 = op.Expand(op.Expand(biasf, op.Constant(value_ints=[1, 1, 1, 1])),
                      op.Concat(op.Constant(value_ints=[1, 1, 1]), tk1, axis=0))
    bb1 = op.Shape(bias4, start=0, end=1)
    hb1 = op.Shape(bias4, start=1, end=2)
    tqb1 = op.Shape(bias4, start=2, end=3)
    bias_pads = op.Concat(op.Constant(value_ints=[0, 0, 0, 0, 0, 0, 0]), pad_t, axis=0)
    bias_blocks = op.Reshape(op.Pad(bias4, bias_pads, ninf), op.Concat(minus1, bs1, axis=0))
    seen = op.Cast(op.Not(op.IsInf(bias4, detect_positive=0)), to=1)
    block_seen = op.Greater(op.ReduceMax(op.Reshape(op.Pad(seen, bias_pads),
                                                    op.Concat(bb1, hb1, tqb1, nb1, bs1, axis=0)),
                                         op.Constant(value_ints=[4]), keepdims=0), fzero)  # [Bb,Hb,Tqb,nb]

    # 2. Candidates, TopK, the (query, block) pairs: slot 0 the own block, then the picks.
    q_pos = op.Range(op.Sub(tk, tq), tk, one)  # [Tq]
    own = op.Unsqueeze(op.Div(q_pos, bs), [1])  # [Tq, 1]
    blocks_row = op.Unsqueeze(blocks, [0])  # [1, nb]
    candidate = op.Or(op.And(is_causal, op.Less(blocks_row, own)),
                      op.And(op.Not(is_causal), op.Not(op.Equal(blocks_row, own))))  # [Tq, nb]
    candidate = op.And(op.And(candidate, block_seen), op.Not(op.IsNaN(gate)))  # [B,Hq,Tq,nb]
    n_pick = op.Min(op.Sub(op.Constant(value_int=top_k), one), nb)
    n_pick = op.Where(op.Or(op.Less(tk, op.Constant(value_int=dense_below)), real_bias), nb, n_pick)  # full attention
    kk = op.Reshape(op.Max(n_pick, one), one1)
    picked_score, picked = op.TopK(op.Where(candidate, gate, ninf), kk, axis=-1)  # [B,Hq,Tq,kk]
    picked_ok = op.And(op.Greater(picked_score, ninf), op.Greater(n_pick, zero))
    own_block = op.Expand(op.Unsqueeze(own, [0, 1]), op.Concat(b1, hq1, tq1, one1, axis=0))
    pair_block = op.Concat(own_block, picked, axis=-1)  # [B,Hq,Tq,K]
    pair_ok = op.Concat(op.Cast(op.Expand(op.Constant(value_int=1), op.Concat(b1, hq1, tq1, one1, axis=0)), to=9),
                        picked_ok, axis=-1)
    slots1 = op.Shape(pair_block, start=3, end=4)  # K = 1 + picks

    # Group of each pair: (batch, kv head, block); invalid pairs go to the last group.
    head_kv = op.Div(op.Range(zero, op.Squeeze(hq1, [0]), one), op.Squeeze(group1, [0]))  # [Hq]
    batch = op.Range(zero, op.Squeeze(b1, [0]), one)
    bh_kv = op.Add(op.Mul(op.Unsqueeze(batch, [1]), hkv1), op.Unsqueeze(head_kv, [0]))  # [B, Hq]
    n_groups = op.Mul(op.Mul(op.Squeeze(b1, [0]), op.Squeeze(hkv1, [0])), nb)
    group = op.Add(op.Mul(op.Unsqueeze(bh_kv, [2, 3]), nb), pair_block)
    group = op.Reshape(op.Where(pair_ok, group, n_groups), minus1)  # [P]
    n_pairs = op.Shape(group)

    # 3. Sort the pairs by group; pad every group to whole chunks; one key block per chunk.
    sorted_group, order = op.TopK(group, n_pairs, axis=0, largest=0, sorted=1)
    per_group = op.ScatterElements(op.Expand(zero, op.Add(op.Unsqueeze(n_groups, [0]), one1)), group,
                                   op.Expand(one, n_pairs), axis=0, reduction="add")  # [G + 1]
    is_real = op.Cast(op.Less(op.Range(zero, op.Add(n_groups, one), one), n_groups), to=7)
    padded = op.Mul(op.Mul(op.Div(op.Sub(op.Add(per_group, chunk), one), chunk), chunk), is_real)
    first = op.CumSum(per_group, zero, exclusive=1)
    padded_first = op.CumSum(padded, zero, exclusive=1)
    n_slots = op.ReduceSum(padded, keepdims=1)  # [1]
    rank = op.Sub(op.Range(zero, op.Squeeze(n_pairs, [0]), one), op.Gather(first, sorted_group))
    slot = op.Add(op.Gather(padded_first, sorted_group), rank)  # invalid pairs: slot >= n_slots
    slot = op.Min(slot, op.Squeeze(n_slots, [0]))
    n_slots_x = op.Add(n_slots, one1)
    pair_of_slot = op.Slice(op.ScatterElements(op.Expand(op.Squeeze(n_pairs, [0]), n_slots_x), slot, order, axis=0),
                            zero1, n_slots)  # [S]; padding slots hold n_pairs
    group_of_slot = op.Slice(op.ScatterElements(op.Expand(zero, n_slots_x), slot, sorted_group, axis=0),
                             zero1, n_slots)
    n_chunks1 = op.Div(n_slots, chunk1)
    chunk_pair = op.Reshape(pair_of_slot, op.Concat(n_chunks1, chunk1, axis=0))  # [C, CHUNK]
    chunk_group = op.Gather(op.Reshape(group_of_slot, op.Concat(n_chunks1, chunk1, axis=0)), zero, axis=1)  # [C]
    slot_used = op.Less(chunk_pair, n_pairs)
    row = op.Div(op.Min(chunk_pair, op.Sub(n_pairs, one)), slots1)  # query row (b, h, t) flat

    # Scores of each chunk against its key block, cut by the mask and causality.
    q_rows = op.Gather(op.Reshape(qf, op.Concat(minus1, d1, axis=0)), row)  # [C, CHUNK, D]
    k_chunk = op.Gather(op.Reshape(kb, op.Concat(minus1, bs1, d1, axis=0)), chunk_group)  # [C, bs, D]
    v_chunk = op.Gather(op.Reshape(vb, op.Concat(minus1, bs1, dv1, axis=0)), chunk_group)  # [C, bs, Dv]
    scores = op.Mul(op.MatMul(q_rows, op.Transpose(k_chunk, perm=[0, 2, 1])), op.Constant(value_float=scale))
    key_block = op.Mod(chunk_group, nb)  # [C]
    key_pos = op.Add(op.Unsqueeze(op.Mul(key_block, bs), [1]), op.Range(zero, bs, one))  # [C, bs]
    t_row = op.Mod(row, tq)
    h_row = op.Mod(op.Div(row, tq), op.Squeeze(hq1, [0]))
    b_row = op.Div(row, op.Mul(tq, op.Squeeze(hq1, [0])))
    bb = op.Squeeze(bb1, [0])
    hb = op.Squeeze(hb1, [0])
    tqb = op.Squeeze(tqb1, [0])
    bias_row = op.Add(op.Mul(op.Add(op.Mul(op.Where(op.Equal(bb, one), zero, b_row), hb),
                                    op.Where(op.Equal(hb, one), zero, h_row)), tqb),
                      op.Where(op.Equal(tqb, one), zero, t_row))
    bias_index = op.Add(op.Mul(bias_row, nb), op.Unsqueeze(key_block, [1]))  # [C, CHUNK]
    scores = op.Add(scores, op.Gather(bias_blocks, bias_index))  # padded keys carry -inf
    q_pos_row = op.Add(op.Sub(tk, tq), t_row)  # [C, CHUNK]
    in_time = op.Or(op.Not(is_causal), op.LessOrEqual(op.Unsqueeze(key_pos, [1]), op.Unsqueeze(q_pos_row, [2])))
    scores = op.Where(op.And(in_time, op.Unsqueeze(slot_used, [2])), scores, ninf)
    row_max = op.ReduceMax(scores, minus1, keepdims=1)
    safe_max = op.Where(op.IsInf(row_max), fzero, row_max)
    weights = op.Exp(op.Sub(scores, safe_max))
    row_sum = op.ReduceSum(weights, minus1, keepdims=0)  # [C, CHUNK]
    partial = op.MatMul(weights, v_chunk)  # [C, CHUNK, Dv]

    # 4. Partials back to query order, then a log-sum-exp combine over each query's pairs.
    n_pairs_x = op.Add(n_pairs, one1)
    target = op.Reshape(chunk_pair, op.Constant(value_ints=[-1, 1]))
    pair_max = op.ScatterND(op.Expand(ninf, n_pairs_x), target, op.Reshape(op.Squeeze(row_max, [2]), minus1))
    pair_sum = op.ScatterND(op.Expand(fzero, n_pairs_x), target, op.Reshape(row_sum, minus1))
    pair_out = op.ScatterND(op.Expand(fzero, op.Concat(n_pairs_x, dv1, axis=0)), target,
                            op.Reshape(partial, op.Concat(minus1, dv1, axis=0)))
    rows_by_slot = op.Concat(minus1, slots1, axis=0)
    pair_max = op.Reshape(op.Slice(pair_max, zero1, n_pairs), rows_by_slot)  # [R, K]
    pair_sum = op.Reshape(op.Slice(pair_sum, zero1, n_pairs), rows_by_slot)
    pair_out = op.Reshape(op.Slice(pair_out, zero1, n_pairs), op.Concat(minus1, slots1, dv1, axis=0))
    best = op.ReduceMax(pair_max, minus1, keepdims=1)
    best = op.Where(op.IsInf(best), fzero, best)
    scale_pair = op.Exp(op.Sub(pair_max, best))  # 0 for pairs that saw nothing
    total = op.ReduceSum(op.Mul(scale_pair, pair_sum), minus1, keepdims=1)  # [R, 1]
    out = op.ReduceSum(op.Mul(op.Unsqueeze(scale_pair, [2]), pair_out), one1, keepdims=0)  # [R, Dv]
    out = op.Div(out, op.Where(op.Greater(total, fzero), total, fone))
    return op.CastLike(op.Reshape(out, op.Concat(b1, hq1, tq1, dv1, axis=0)), q)
