"""Block-sparse MoBA attention in Triton, "gather and densify" by KV block.

A work item is one KV block `j` of one (batch, KV head) together with a chunk of `BLOCK_M`
rows that attend it (from the CSR built in `triton_gate.build_csr`); rows of all query
heads of a GQA group are mixed in one chunk, so they share every K/V load, and no work is
done for a block that no row selected. The selection is arbitrary per query, so the
gathered rows fill dense tensor-core tiles even when neighbouring queries choose
different blocks.

Forward, by default in one pass over the work items (`single_pass_forward`): softmax against
a fixed per-row reference (the gate's best score of the row's blocks), so `exp2(s - ref) @ V`,
the row sum and the true row maximum of every block are final when computed and are summed
with fp32 atomics; an epilogue divides and flags rows whose maximum left the safe window, and
those rows are recomputed exactly by the two-pass kernels:
  1. LSE pass: per (row, block, key split) log-sum-exp of the visible scores;
     reduced per row on the host side (`row_lse`).
  2. Output pass: with every row's final LSE known, `exp(s - lse) @ V` is the row's exact
     share of the output, summed across its blocks with fp32 atomics.
(`fwd_mode=two_pass` runs every row that way.) A key split > 1 cuts each block into spans
processed in parallel (split-KV; used for decode, where a handful of rows meets a long block).

Backward: one program per key tile of a block owns that tile's dK/dV (no atomics) and
walks the block's attending rows once; dQ is summed with fp32 atomics.
All softmax statistics are kept in base 2 (`exp2`, `log2`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from moba_rewrite.kernels.triton import configs as triton_configs
from moba_rewrite.kernels.triton.gate import Selection
from moba_rewrite.kernels.triton.layout import Problem, Seqs, _tracing, capturing, interpreted, launch, next_pow2

LOG2E = 1.4426950408889634


@triton.jit
def _masked_scores(q, kt, cols, hi, ok, pos, t, hq, b, MASK, smb, smh, smt, smk, scale_log2,
                   CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, DOT_PREC: tl.constexpr):
    """Scores `q . k * scale` in log2 units with every invisible (row, key) at -inf: out of the key
    range, after the query (causal), or hidden by the attention mask (bool) / shifted by it (float)."""
    s = tl.dot(q, tl.trans(kt), input_precision=DOT_PREC) * scale_log2
    allowed = ok[:, None] & (cols < hi)[None, :]
    if CAUSAL:
        allowed = allowed & (cols[None, :] <= pos[:, None])
    if HAS_MASK:
        mv = tl.load(MASK + b.to(tl.int64) * smb + hq.to(tl.int64)[:, None] * smh
                     + t.to(tl.int64)[:, None] * smt + cols[None, :] * smk, mask=allowed, other=0)
        if MASK_BOOL:
            allowed = allowed & (mv != 0)
        else:
            s = s + mv.to(tl.float32) * 1.4426950408889634
    return tl.where(allowed, s, float("-inf"))


@triton.jit(do_not_specialize=["BH0", "BH1"])  # window bounds: one compiled variant for every window
def _fwd_kernel(
    Q, K, V, O32, LSE_PART, ROW_LSE, MASK,
    WORK_IDX, WORK_CHUNK, ITEM_START, OFFSETS, ENTRY_ROW, ENTRY_SRC, ROW_SUM, ROW_MAX, ROW_FILTER,
    q_start, q_len, k_start, k_len,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot, smb, smh, smt, smk,
    H_KV, G, NB, N_ITEMS, N_WORK, BH0, BH1, obase, L, RP, NSPLIT, block_size, span, scale_log2,
    MODE: tl.constexpr, FILTER: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
    MASK_BOOL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    D: tl.constexpr, BLOCK_DV: tl.constexpr, DV: tl.constexpr, DOT_PREC: tl.constexpr, OFF64: tl.constexpr,
):
    """One (KV block, chunk of attending rows) work item, one key span.
    MODE 0: per-entry log2-sum-exp2 into LSE_PART. MODE 1: add `exp2(s - row_lse) @ V` into O32.
    MODE 2 (single pass): with the row's fixed reference `r` in ROW_LSE, add `exp2(s - r) @ V`
    into O32 and `sum exp2(s - r)` into ROW_SUM, and the true score maximum into ROW_MAX (fp32
    atomics; all three are additive / order-free, so no second pass). FILTER: only rows flagged
    in ROW_FILTER take part (the repair of rows whose reference was unsafe).
    Only the items of (batch * KV head) rows [BH0, BH1) run (a window: program 0 is the window's
    first item, ITEM_START[BH0]); O32 holds just that window, at element offset `obase` of a
    full output-shaped fp32 tensor with strides (sob, soh, sot). D: the q/k head dim, DV: the
    v/output head dim (they differ for multi-head latent attention)."""
    # Inductor passes Python floats as fp64 scalars; an fp64 factor would promote the scores.
    scale_log2 = tl.cast(scale_log2, tl.float32)
    w = tl.program_id(0) + tl.load(ITEM_START + BH0)
    split = tl.program_id(1)
    idx = tl.load(WORK_IDX + w, mask=w < N_WORK, other=N_ITEMS)
    bh = idx // NB
    if (idx < N_ITEMS) & (bh < BH1):
        j = idx % NB
        b = bh // H_KV
        h = bh % H_KV
        chunk = tl.load(WORK_CHUNK + w)
        e_lo = tl.load(OFFSETS + bh * (NB + 1) + j)
        e_hi = tl.load(OFFSETS + bh * (NB + 1) + j + 1)
        e = e_lo + chunk * BLOCK_M + tl.arange(0, BLOCK_M)
        ok = e < e_hi
        rows = tl.load(ENTRY_ROW + bh.to(tl.int64) * L + e, mask=ok, other=0)
        if FILTER:
            ok = ok & (tl.load(ROW_FILTER + bh.to(tl.int64) * RP + rows, mask=ok, other=0) != 0)
        t = rows // G
        hq = h * G + rows % G
        tq = tl.load(q_len + b)
        tk = tl.load(k_len + b)
        qs = tl.load(q_start + b).to(tl.int64)
        ks = tl.load(k_start + b).to(tl.int64)
        pos = tk - tq + t
        offs_d = tl.arange(0, BLOCK_D)
        dmask = offs_d < D
        offs_dv = tl.arange(0, BLOCK_DV)
        dvmask = offs_dv < DV
        q = tl.load(Q + b.to(tl.int64) * sqb + hq.to(tl.int64)[:, None] * sqh + (qs + t)[:, None] * sqt
                    + offs_d[None, :], mask=ok[:, None] & dmask[None, :], other=0.0)
        lo = j * block_size + split * span
        hi = tl.minimum(tl.minimum(lo + span, (j + 1) * block_size), tk)
        if CAUSAL:
            hi = tl.minimum(hi, tl.max(tl.where(ok, pos, -1)) + 1)
        if FILTER:
            hi = tl.where(tl.max(ok.to(tl.int32)) > 0, hi, lo)  # nothing to repair here: no key loop
        # Scalar 64-bit row-0 pointers plus 32-bit in-sequence offsets (64-bit only when OFF64, i.e.
        # when a sequence spans more than 2**31 elements of K or V).
        k_row0 = K + b.to(tl.int64) * skb + h.to(tl.int64) * skh + ks * skt
        v_row0 = V + b.to(tl.int64) * svb + h.to(tl.int64) * svh + ks * svt
        if MODE == 0:
            ref = tl.zeros([BLOCK_M], tl.float32)
        else:  # MODE 1: the row's final LSE; MODE 2: its reference
            ref = tl.load(ROW_LSE + bh.to(tl.int64) * RP + rows, mask=ok, other=float("inf"))
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
        for n0 in range(lo, hi, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            kv_mask = (cols < hi)[:, None] & dmask[None, :]
            c_off = cols.to(tl.int64) if OFF64 else cols
            kt = tl.load(k_row0 + (c_off[:, None] * skt + offs_d[None, :]), mask=kv_mask, other=0.0)
            s = _masked_scores(q, kt, cols, hi, ok, pos, t, hq, b, MASK, smb, smh, smt, smk, scale_log2,
                               CAUSAL, HAS_MASK, MASK_BOOL, DOT_PREC)
            if MODE == 0:  # online log-sum-exp
                m_new = tl.maximum(m_i, tl.max(s, axis=1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), axis=1)
                m_i = m_new
            else:
                vt = tl.load(v_row0 + (c_off[:, None] * svt + offs_dv[None, :]),
                             mask=(cols < hi)[:, None] & dvmask[None, :], other=0.0)
                p = tl.exp2(s - ref[:, None])
                if MODE == 2:
                    m_i = tl.maximum(m_i, tl.max(s, axis=1))
                    l_i += tl.sum(p, axis=1)
                acc += tl.dot(p.to(vt.dtype), vt, input_precision=DOT_PREC)
        if MODE == 0:
            lse = tl.where(l_i > 0, m_i + tl.log2(tl.maximum(l_i, 1e-30)), float("-inf"))
            src = tl.load(ENTRY_SRC + bh.to(tl.int64) * L + e, mask=ok, other=0)
            tl.store(LSE_PART + (bh.to(tl.int64) * L + src) * NSPLIT + split, lse, mask=ok)
        else:
            o_ptrs = (O32 + (b.to(tl.int64) * sob - obase) + hq.to(tl.int64)[:, None] * soh
                      + (qs + t)[:, None] * sot + offs_dv[None, :])
            tl.atomic_add(o_ptrs, acc, mask=ok[:, None] & dvmask[None, :], sem="relaxed")
            if MODE == 2:
                tl.atomic_add(ROW_SUM + bh.to(tl.int64) * RP + rows, l_i, mask=ok, sem="relaxed")
                tl.atomic_max(ROW_MAX + bh.to(tl.int64) * RP + rows, m_i, mask=ok, sem="relaxed")


@triton.jit
def _row_tile(q_start, q_len, H_KV, G, BH0, BLOCK_M: tl.constexpr):
    """The row tile of a (row tile, batch * KV head from BH0) grid: `(bh, b, rows, t, hq, valid, qs)`
    with row `R = t * G + g` of query head `hq = h * G + g`, valid while `t` is inside the sequence."""
    tile = tl.program_id(0)
    bh = tl.program_id(1) + BH0
    b = bh // H_KV
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    t = rows // G
    hq = (bh % H_KV) * G + rows % G
    valid = t < tl.load(q_len + b)
    qs = tl.load(q_start + b).to(tl.int64)
    return bh, b, rows, t, hq, valid, qs


@triton.jit
def _row_ptrs(base, b, hq, t, qs, sb, sh, st, offs_d):
    """`[rows, D]` pointers into a `(batch, head, token)`-strided tensor."""
    return base + b.to(tl.int64) * sb + hq.to(tl.int64)[:, None] * sh + (qs + t)[:, None] * st + offs_d[None, :]


@triton.jit(do_not_specialize=["BH0"])
def _fwd_finish_kernel(
    O32, O, ROW_SUM, ROW_MAX, ROW_REF, ROW_LSE, BAD, q_start, q_len, sob, soh, sot, so2b, so2h, so2t,
    H_KV, G, RP, BH0, obase, SAFE_HI, SAFE_LO,
    REPAIR: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, D: tl.constexpr,
):
    """Single-pass epilogue per row: O = O32 / ROW_SUM and lse = ref + log2(ROW_SUM) when the
    reference was safe (true maximum within [ref - SAFE_LO, ref + SAFE_HI], so nothing overflowed or
    vanished); else flag the row in BAD and clear its O32 row for the exact two-pass repair.
    REPAIR: copy the repaired rows (O32 already normalised by the two-pass output) into O.
    ROW_REF is in log2 units (gate score * scale * log2(e)). The grid covers rows BH0.. of the
    (batch * KV head) axis; O32 is a window at element offset `obase` (see `_fwd_kernel`)."""
    SAFE_HI = tl.cast(SAFE_HI, tl.float32)  # fp64 when launched by Inductor (see _fwd_kernel)
    SAFE_LO = tl.cast(SAFE_LO, tl.float32)
    bh, b, rows, t, hq, valid, qs = _row_tile(q_start, q_len, H_KV, G, BH0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m2 = valid[:, None] & (offs_d < D)[None, :]
    o32_ptrs = _row_ptrs(O32 + (-obase), b, hq, t, qs, sob, soh, sot, offs_d)
    o_ptrs = _row_ptrs(O, b, hq, t, qs, so2b, so2h, so2t, offs_d)
    if REPAIR:
        bad = tl.load(BAD + bh.to(tl.int64) * RP + rows, mask=valid, other=0) != 0
        if tl.max(bad.to(tl.int32)) > 0:
            acc = tl.load(o32_ptrs, mask=m2 & bad[:, None], other=0.0)
            tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=m2 & bad[:, None])
    else:
        l_sum = tl.load(ROW_SUM + bh.to(tl.int64) * RP + rows, mask=valid, other=0.0)
        m_max = tl.load(ROW_MAX + bh.to(tl.int64) * RP + rows, mask=valid, other=float("-inf"))
        ref = tl.load(ROW_REF + bh.to(tl.int64) * RP + rows, mask=valid, other=0.0)
        sees = m_max > float("-inf")
        safe = (m_max - ref <= SAFE_HI) & (m_max - ref >= -SAFE_LO) & (l_sum > 0)
        bad = valid & sees & ~safe
        good = valid & sees & safe
        acc = tl.load(o32_ptrs, mask=m2, other=0.0)
        out = tl.where(good[:, None], acc / tl.where(good, l_sum, 1.0)[:, None], 0.0)
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=m2)
        tl.store(o32_ptrs, tl.zeros([BLOCK_M, BLOCK_D], tl.float32), mask=m2 & bad[:, None])
        lse = tl.where(good, ref + tl.log2(tl.where(good, l_sum, 1.0)), float("inf"))
        tl.store(ROW_LSE + bh.to(tl.int64) * RP + rows, lse, mask=rows < RP)
        tl.store(BAD + bh.to(tl.int64) * RP + rows, bad.to(tl.int8), mask=rows < RP)


@triton.jit
def _row_dot_kernel(
    DO, O, DELTA, q_start, q_len, sdb, sdh, sdt, sob, soh, sot, H_KV, G, RP,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, D: tl.constexpr,
):
    """DELTA[bh, R] = rowsum(dO * O) in fp32 for the backward's softmax term."""
    bh, b, rows, t, hq, ok, qs = _row_tile(q_start, q_len, H_KV, G, 0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m = ok[:, None] & (offs_d < D)[None, :]
    do = tl.load(_row_ptrs(DO, b, hq, t, qs, sdb, sdh, sdt, offs_d), mask=m, other=0.0).to(tl.float32)
    o = tl.load(_row_ptrs(O, b, hq, t, qs, sob, soh, sot, offs_d), mask=m, other=0.0).to(tl.float32)
    tl.store(DELTA + bh.to(tl.int64) * RP + rows, tl.sum(do * o, axis=1), mask=rows < RP)


@triton.jit
def _bwd_kernel(
    Q, K, V, DO, DQ32, DK, DVG, ROW_LSE, DELTA, MASK, OFFSETS, ENTRY_ROW,
    q_start, q_len, k_start, k_len,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdb, sdh, sdt,
    sgqb, sgqh, sgqt, sgkb, sgkh, sgkt, sgvb, sgvh, sgvt, smb, smh, smt, smk,
    H_KV, G, NB, N_SUB, L, RP, block_size, scale, scale_log2,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, D: tl.constexpr,
    BLOCK_DV: tl.constexpr, DV: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """dK, dV of one key tile of block j (owned, no atomics); dQ of its rows by fp32 atomics.
    D: the q/k head dim (q, k, dq, dk); DV: the v head dim (v, dO, dv)."""
    scale = tl.cast(scale, tl.float32)  # fp64 when launched by Inductor (see _fwd_kernel)
    scale_log2 = tl.cast(scale_log2, tl.float32)
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    j = pid // N_SUB
    sub = pid % N_SUB
    b = bh // H_KV
    h = bh % H_KV
    tq = tl.load(q_len + b)
    tk = tl.load(k_len + b)
    qs = tl.load(q_start + b).to(tl.int64)
    ks = tl.load(k_start + b).to(tl.int64)
    lo = j * block_size + sub * BLOCK_N
    hi = tl.minimum(tl.minimum(lo + BLOCK_N, (j + 1) * block_size), tk)
    if lo < hi:
        offs_d = tl.arange(0, BLOCK_D)
        dmask = offs_d < D
        offs_dv = tl.arange(0, BLOCK_DV)
        dvmask = offs_dv < DV
        cols = lo + tl.arange(0, BLOCK_N)
        kv_mask = (cols < hi)[:, None] & dmask[None, :]
        v_mask = (cols < hi)[:, None] & dvmask[None, :]
        kt = tl.load(K + b.to(tl.int64) * skb + h.to(tl.int64) * skh + (ks + cols)[:, None] * skt + offs_d[None, :],
                     mask=kv_mask, other=0.0)
        vt = tl.load(V + b.to(tl.int64) * svb + h.to(tl.int64) * svh + (ks + cols)[:, None] * svt
                     + offs_dv[None, :], mask=v_mask, other=0.0)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
        e_lo = tl.load(OFFSETS + bh * (NB + 1) + j)
        e_hi = tl.load(OFFSETS + bh * (NB + 1) + j + 1)
        for e0 in range(e_lo, e_hi, BLOCK_M):
            e = e0 + tl.arange(0, BLOCK_M)
            ok = e < e_hi
            rows = tl.load(ENTRY_ROW + bh.to(tl.int64) * L + e, mask=ok, other=0)
            t = rows // G
            hq = h * G + rows % G
            pos = tk - tq + t
            rm = ok[:, None] & dmask[None, :]
            q = tl.load(Q + b.to(tl.int64) * sqb + hq.to(tl.int64)[:, None] * sqh + (qs + t)[:, None] * sqt
                        + offs_d[None, :], mask=rm, other=0.0)
            do = tl.load(DO + b.to(tl.int64) * sdb + hq.to(tl.int64)[:, None] * sdh + (qs + t)[:, None] * sdt
                         + offs_dv[None, :], mask=ok[:, None] & dvmask[None, :], other=0.0)
            lse = tl.load(ROW_LSE + bh.to(tl.int64) * RP + rows, mask=ok, other=float("inf"))
            delta = tl.load(DELTA + bh.to(tl.int64) * RP + rows, mask=ok, other=0.0)
            s = _masked_scores(q, kt, cols, hi, ok, pos, t, hq, b, MASK, smb, smh, smt, smk, scale_log2,
                               CAUSAL, HAS_MASK, MASK_BOOL, DOT_PREC)
            p = tl.exp2(s - lse[:, None])
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PREC)
            dp = tl.dot(do, tl.trans(vt), input_precision=DOT_PREC)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PREC)
            dq = tl.dot(ds.to(kt.dtype), kt, input_precision=DOT_PREC) * scale
            tl.atomic_add(DQ32 + b.to(tl.int64) * sgqb + hq.to(tl.int64)[:, None] * sgqh + (qs + t)[:, None] * sgqt
                          + offs_d[None, :], dq, mask=rm, sem="relaxed")
        dk_ptrs = DK + b.to(tl.int64) * sgkb + h.to(tl.int64) * sgkh + (ks + cols)[:, None] * sgkt + offs_d[None, :]
        dv_ptrs = DVG + b.to(tl.int64) * sgvb + h.to(tl.int64) * sgvh + (ks + cols)[:, None] * sgvt + offs_dv[None, :]
        tl.store(dk_ptrs, (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
        tl.store(dv_ptrs, dv.to(DVG.dtype.element_ty), mask=v_mask)


@triton.jit
def _decode_kernel(
    Q, K, V, PICKS, SCORES, O_PART, LSE_PART, MASK,
    q_start, q_len, k_start, k_len,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, smb, smh, smt, smk,
    HQ, G, RP, KP, NC, block_size, span, NSPLIT, scale_log2,
    HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, MERGE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, D: tl.constexpr,
    BLOCK_DV: tl.constexpr, DV: tl.constexpr,
):
    """Split-KV decode (one query per sequence): partial softmax of one query head over one key
    span of one of its selected blocks (slot 0 = own block, slot s = pick s-1). MERGE: the picks
    are the NC candidates (PICKS, with SCORES) of a partial gate; slot s takes the s-th best, by
    score and then the lower block index, as the sequential gate would. D: q/k head dim; DV: v/output."""
    scale_log2 = tl.cast(scale_log2, tl.float32)  # fp64 when launched by Inductor (see _fwd_kernel)
    pid = tl.program_id(0)
    slot = tl.program_id(1)
    split = tl.program_id(2)
    b = pid // HQ
    hq = pid % HQ
    h = hq // G
    g = hq % G
    tq = tl.load(q_len + b)
    tk = tl.load(k_len + b)
    qs = tl.load(q_start + b).to(tl.int64)
    ks = tl.load(k_start + b).to(tl.int64)
    own = (tk - 1) // block_size
    if MERGE:
        base = ((b * (HQ // G) + h).to(tl.int64) * RP + g) * NC
        offs_c = tl.arange(0, BLOCK_C)
        ci = tl.load(PICKS + base + offs_c, mask=offs_c < NC, other=-1)
        cv = tl.load(SCORES + base + offs_c, mask=offs_c < NC, other=float("-inf"))
        cv = tl.where(ci >= 0, cv, float("-inf"))
        pick = tl.full([], -1, tl.int32)
        for _ in range(slot):  # take the best `slot` times: the last one taken is this slot's pick
            best = tl.max(cv, axis=0)
            chosen = tl.min(tl.where((cv == best) & (ci >= 0), ci, 2147483647), axis=0)
            pick = tl.where(best > float("-inf"), chosen, -1)
            cv = tl.where(ci == chosen, float("-inf"), cv)
    else:
        pick = tl.load(PICKS + ((b * (HQ // G) + h).to(tl.int64) * RP + g) * KP + slot - 1, mask=slot > 0,
                       other=-1)
    j = tl.where(slot == 0, own, pick)
    valid = (tq > 0) & (j >= 0)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    offs_dv = tl.arange(0, BLOCK_DV)
    dvmask = offs_dv < DV
    # No `if` around the loop: an invalid (row, slot) simply gets an empty key range.
    lo = j * block_size + split * span
    hi = tl.minimum(tl.minimum(lo + span, (j + 1) * block_size), tk)
    hi = tl.where(valid, hi, lo)
    q_ok = dmask & ((offs_d * 0 + valid.to(tl.int32)) > 0)  # vector form: the interpreter rejects scalar & block
    q = tl.load(Q + b.to(tl.int64) * sqb + hq.to(tl.int64) * sqh + qs * sqt + offs_d, mask=q_ok, other=0.0)
    q = q.to(tl.float32)
    k_base = K + b.to(tl.int64) * skb + h.to(tl.int64) * skh
    v_base = V + b.to(tl.int64) * svb + h.to(tl.int64) * svh
    m_i = tl.full([], float("-inf"), tl.float32)
    l_i = tl.full([], 0.0, tl.float32)
    acc = tl.zeros([BLOCK_DV], tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        kv_mask = (cols < hi)[:, None] & dmask[None, :]
        kt = tl.load(k_base + (ks + cols)[:, None] * skt + offs_d[None, :], mask=kv_mask, other=0.0)
        vt = tl.load(v_base + (ks + cols)[:, None] * svt + offs_dv[None, :], mask=(cols < hi)[:, None] & dvmask[None, :],
                     other=0.0)
        s = tl.sum(kt.to(tl.float32) * q[None, :], axis=1) * scale_log2
        allowed = cols < hi
        if HAS_MASK:
            mv = tl.load(MASK + b.to(tl.int64) * smb + hq.to(tl.int64) * smh + cols * smk, mask=allowed, other=0)
            if MASK_BOOL:
                allowed = allowed & (mv != 0)
            else:
                s = s + mv.to(tl.float32) * 1.4426950408889634
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe)
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p[:, None] * vt.to(tl.float32), axis=0)
        m_i = m_new
    part = pid.to(tl.int64) * (KP + 1) * NSPLIT + slot * NSPLIT + split
    lse = tl.where(l_i > 0, m_i + tl.log2(tl.maximum(l_i, 1e-30)), float("-inf"))
    tl.store(LSE_PART + part, lse)
    tl.store(O_PART + part * BLOCK_DV + offs_dv, acc / tl.maximum(l_i, 1e-30))


@triton.jit
def _decode_combine_kernel(
    O_PART, LSE_PART, O, q_start, q_len, sob, soh, sot, HQ, N_PART,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, D: tl.constexpr,
):
    """Merge a decode query's partials by their LSE; a query that sees nothing gets zeros."""
    pid = tl.program_id(0)
    b = pid // HQ
    hq = pid % HQ
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    lse = tl.load(LSE_PART + pid.to(tl.int64) * N_PART + offs_s, mask=offs_s < N_PART, other=float("-inf"))
    m = tl.max(lse, axis=0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m_safe)
    parts = tl.load(O_PART + (pid.to(tl.int64) * N_PART + offs_s)[:, None] * BLOCK_D + offs_d[None, :],
                    mask=(offs_s < N_PART)[:, None], other=0.0)
    total = tl.sum(w, axis=0)
    out = tl.sum(w[:, None] * parts, axis=0) / tl.maximum(total, 1e-30)
    qs = tl.load(q_start + b).to(tl.int64)
    ok = (offs_d < D) & ((offs_d * 0 + tl.load(q_len + b)) > 0)  # vector form (see _decode_kernel)
    tl.store(O + b.to(tl.int64) * sob + hq.to(tl.int64) * soh + qs * sot + offs_d, out.to(O.dtype.element_ty),
             mask=ok)


# ----------------------------------------------------------------------------- host side


def fwd_config(p: Problem) -> tuple[int, int, int, int]:
    """(BLOCK_M gathered rows, BLOCK_N keys, num_warps, num_stages) of the forward kernels."""
    if interpreted(p.q.device):
        return 32, 16, 4, 1  # fewer, larger programs: the interpreter's cost is per operation
    d = max(p.d, p.dv)  # tiles hold q/k rows (D) and v/output rows (Dv)
    if d <= 64:
        return triton_configs.pick("fwd", (64, 64, 8, 2))
    # D=128: fastest of 7 candidates on an H200 (bench_gpu.py --sweep, benchmarks/RESULTS.md)
    return triton_configs.pick("fwd", (64, 64, 4, 2) if d <= 128 else (32, 32, 8, 1))


def bwd_config(p: Problem) -> tuple[int, int, int, int]:
    """(BLOCK_M rows per step, BLOCK_N keys owned, num_warps, num_stages) of the backward kernel."""
    if interpreted(p.q.device):
        return 32, 16, 4, 1
    # D=128: fastest of 6 candidates on an H200 (bench_gpu.py --sweep, benchmarks/RESULTS.md)
    return triton_configs.pick("bwd", (32, 128, 8, 2) if max(p.d, p.dv) <= 128 else (16, 32, 8, 1))


def _block_d(d: int) -> int:
    """The power-of-two tile width (at least 16, tl.dot's minimum) that holds a head dim of `d`."""
    return max(16, next_pow2(d))


def attn_tiles(p: Problem) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) of the forward kernels."""
    return fwd_config(p)[:2]


def _dot_prec(p: Problem) -> str:
    if p.q.dtype == torch.float32 or interpreted(p.q.device) or torch.version.hip:
        return "ieee"  # true fp32 products for fp32 inputs (no TF32); HIP has no "tf32" option
    return "tf32"  # ignored for fp16/bf16 operands (the default value)


def _mask_args(p: Problem):
    if p.attn_mask is None:
        return p.q_len, (0, 0, 0, 0), False, False
    m = p.attn_mask
    return m, m.stride(), True, m.dtype == torch.uint8


Work = tuple[Tensor, Tensor, int, Tensor]


@dataclass
class Window:
    """Rows [bh0, bh1) of the (batch * KV head) axis whose fp32 accumulator is allocated alone:
    element `obase` onwards of a full output-shaped fp32 tensor with (batch, head, token)
    `strides`, so the kernels address it as if the whole tensor existed."""

    bh0: int
    bh1: int
    obase: int
    strides: Seqs | None = None


def _bh_out_elems(p: Problem) -> int:
    """Elements of a dense output `[B, Hq, Tq, Dv]` per (batch, KV head) row: its G query heads."""
    return p.group * p.max_tq * p.dv


def windows(p: Problem, budget_bytes: int) -> list[Window]:
    """Windows whose fp32 accumulators fit `budget_bytes` (at least one bh each); one window
    over everything when the budget is 0, the layout packed (varlen) or it all fits."""
    bh, per_bh = p.batch * p.hkv, _bh_out_elems(p)
    if not budget_bytes or p.varlen or bh * per_bh * 4 <= budget_bytes:
        return [Window(0, bh, 0)]
    step = max(1, budget_bytes // (per_bh * 4))
    full = Seqs(p.hq * p.max_tq * p.dv, p.max_tq * p.dv, p.dv)  # a contiguous [B, Hq, Tq, Dv]
    return [Window(a, min(a + step, bh), a * per_bh, full) for a in range(0, bh, step)]


def _window_acc(p: Problem, w: Window) -> Tensor:
    """The zeroed fp32 accumulator of window `w` (the whole output-shaped tensor for one window)."""
    if w.strides is None:
        return p.new_out(torch.float32)
    return torch.zeros((w.bh1 - w.bh0) * _bh_out_elems(p), dtype=torch.float32, device=p.q.device)


def _items_per_bh(p: Problem, sel: Selection, block_m: int) -> int:
    """A bound on one bh's work items: the row chunks of all its CSR entries plus one per block."""
    return -(-sel.entry_row.shape[1] // block_m) + p.n_blocks


def _work_list(p: Problem, sel: Selection, block_m: int) -> Work:
    """Flattened (block, row chunk) work items from the CSR, without a host sync: (item index
    `bh * NB + j`, chunk, launch bound, first item of every `bh` (int32 `[BH + 1]`))."""
    counts = (sel.offsets[:, 1:] - sel.offsets[:, :-1]).reshape(-1).to(torch.int64)
    chunks = (counts + block_m - 1) // block_m
    cum = torch.cumsum(chunks, 0)
    bh = sel.offsets.shape[0]
    per_bh_end = cum.view(bh, -1)[:, -1]
    item_start = torch.cat([per_bh_end.new_zeros(1), per_bh_end]).to(torch.int32)
    n_items = bh * p.n_blocks
    upper = max(1, bh * _items_per_bh(p, sel, block_m))  # a bound: no host sync on GPU
    if interpreted(p.q.device) and not _tracing():
        upper = max(1, int(chunks.sum()))  # exact on CPU: the interpreter pays for every empty program
    w = torch.arange(upper, device=counts.device)
    idx = torch.searchsorted(cum, w, right=True)
    start = cum - chunks
    chunk = w - start[idx.clamp(max=n_items - 1)]
    return idx.to(torch.int32), chunk.to(torch.int32), upper, item_start


def key_splits(p: Problem) -> int:
    """Split-KV factor: decode-like calls (few rows per KV head) cut each block into key spans
    processed by separate programs; prefill has enough (block, row chunk) items already."""
    if p.max_tq * p.group > 64:
        return 1
    if interpreted(p.q.device):
        return 2 if p.block_size >= 2 else 1
    return max(1, -(-p.block_size // 128))


def _span(p: Problem, nsplit: int, block_n: int | None = None) -> int:
    """Keys of a block per program when it is cut into `nsplit` spans: an even share, in whole
    `block_n` tiles on GPU (default: the forward kernels' BLOCK_N)."""
    block_n = block_n or attn_tiles(p)[1]
    span = -(-p.block_size // nsplit)
    return span if interpreted(p.q.device) else -(-span // block_n) * block_n


def _reduce_lse_parts(lse_part: Tensor, sel: Selection) -> Tensor:
    """Per-row log2-sum-exp2 of the per-(entry, split) parts; +inf for rows seeing nothing."""
    parts = lse_part.view(lse_part.shape[0], sel.row_pad, -1)
    m = parts.amax(-1)
    m_safe = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    total = torch.exp2(parts - m_safe[..., None]).sum(-1)
    return torch.where(total > 0, m_safe + torch.log2(total), torch.full_like(m, float("inf")))


def row_lse(p: Problem, sel: Selection, nsplit: int | None = None, row_filter: Tensor | None = None,
            work: Work | None = None) -> Tensor:
    """Pass 1: every row's log2-sum-exp2 over its selected blocks; +inf for rows seeing nothing
    (and, with `row_filter`, for every row not flagged in it)."""
    nsplit = nsplit or key_splits(p)
    span = _span(p, nsplit)
    bh = p.batch * p.hkv
    L = sel.entry_row.shape[1]
    lse_part = torch.full((bh, L, nsplit), float("-inf"), dtype=torch.float32, device=p.q.device)
    _launch_fwd(p, sel, 0, lse_part, lse_part, lse_part, nsplit, span, row_filter=row_filter, work=work)
    return _reduce_lse_parts(lse_part, sel)


def _launch_fwd(p: Problem, sel: Selection, mode: int, o32: Tensor, lse_part: Tensor, lse: Tensor,
                nsplit: int, span: int, row_sum: Tensor | None = None, row_max: Tensor | None = None,
                row_filter: Tensor | None = None, work: Work | None = None,
                window: Window | None = None) -> None:
    """One launch of `_fwd_kernel`; `work`: the `_work_list` of this selection, when the caller
    launches several passes over the same items (built once); `window`: only those rows, `o32`
    being the window's accumulator."""
    block_m, block_n, warps, stages = fwd_config(p)
    idx, chunk, upper, item_start = work if work is not None else _work_list(p, sel, block_m)
    mask, ms, has_mask, mask_bool = _mask_args(p)
    bh = p.batch * p.hkv
    if window is None or window.strides is None:
        window, so = window or Window(0, bh, 0), p.out_strides(o32)
    else:
        so = window.strides
        upper = (window.bh1 - window.bh0) * _items_per_bh(p, sel, block_m)
    dummy = lse_part
    launch(_fwd_kernel)[(upper, nsplit)](
        p.q, p.k, p.v, o32, lse_part, lse, mask, idx, chunk, item_start, sel.offsets, sel.entry_row, sel.entry_src,
        row_sum if row_sum is not None else dummy, row_max if row_max is not None else dummy,
        row_filter if row_filter is not None else idx,
        p.q_start, p.q_len, p.k_start, p.k_len,
        p.sq.sb, p.sq.sh, p.sq.st, p.sk.sb, p.sk.sh, p.sk.st, p.sv.sb, p.sv.sh, p.sv.st, so.sb, so.sh, so.st,
        ms[0], ms[1], ms[2], ms[3],
        p.hkv, p.group, p.n_blocks, bh * p.n_blocks, idx.shape[0], window.bh0, window.bh1, window.obase,
        sel.entry_row.shape[1], sel.row_pad, nsplit, p.block_size, span, p.scale * LOG2E,
        MODE=mode, FILTER=row_filter is not None, CAUSAL=p.causal, HAS_MASK=has_mask, MASK_BOOL=mask_bool,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=_block_d(p.d), D=p.d, BLOCK_DV=_block_d(p.dv), DV=p.dv,
        DOT_PREC=_dot_prec(p),
        OFF64=(p.max_tk + 1) * max(p.sk.st, p.sv.st) >= 2**31 - 1, num_warps=warps, num_stages=stages,
    )


def decode_config(p: Problem) -> tuple[int, int, int, int]:
    """(keys of a block per program, BLOCK_N keys, num_warps, num_stages) of the decode kernel."""
    if interpreted(p.q.device):
        return max(1, -(-p.block_size // 2)), 16, 4, 1  # two spans per block: the split path is tested
    return triton_configs.pick("decode", (128, 64, 4, 3))


def decode_forward(p: Problem, sel: Selection) -> Tensor:
    """Split-KV decode (every sequence has one query): per (query head, selected block, key span)
    partials, merged by LSE. Needs only the picks, not the CSR."""
    span, block_n, warps, stages = decode_config(p)
    block_d, block_dv = _block_d(p.d), _block_d(p.dv)
    nsplit = -(-p.block_size // span)
    span = _span(p, nsplit, block_n)
    merge = sel.part_picks is not None
    kp = sel.n_pick if merge else sel.picks.shape[-1]  # pick slots (a merge ranks exactly n_pick)
    n_cand = sel.part_picks[0, 0].numel() if merge else kp
    n_part = (kp + 1) * nsplit
    o_part = torch.empty((p.batch * p.hq, n_part, block_dv), dtype=torch.float32, device=p.q.device)
    lse_part = torch.empty((p.batch * p.hq, n_part), dtype=torch.float32, device=p.q.device)
    mask, ms, has_mask, mask_bool = _mask_args(p)
    launch(_decode_kernel)[(p.batch * p.hq, kp + 1, nsplit)](
        p.q, p.k, p.v, sel.part_picks if merge else sel.picks, sel.part_scores if merge else o_part, o_part,
        lse_part, mask, p.q_start, p.q_len, p.k_start, p.k_len,
        p.sq.sb, p.sq.sh, p.sq.st, p.sk.sb, p.sk.sh, p.sk.st, p.sv.sb, p.sv.sh, p.sv.st,
        ms[0], ms[1], ms[2], ms[3], p.hq, p.group, sel.row_pad, kp, n_cand, p.block_size, span, nsplit,
        p.scale * LOG2E, HAS_MASK=has_mask, MASK_BOOL=mask_bool, MERGE=merge, BLOCK_N=block_n,
        BLOCK_C=max(2, next_pow2(n_cand)), BLOCK_D=block_d, D=p.d, BLOCK_DV=block_dv, DV=p.dv,
        num_warps=warps, num_stages=stages,
    )
    out = p.new_out(p.q.dtype, written=True)  # the combine kernel stores every (sequence, head)
    so = p.out_strides(out)
    launch(_decode_combine_kernel)[(p.batch * p.hq,)](
        o_part, lse_part, out, p.q_start, p.q_len, so.sb, so.sh, so.st, p.hq, n_part,
        BLOCK_S=max(2, next_pow2(n_part)), BLOCK_D=block_dv, D=p.dv,  # the output's (value) head dim
    )
    return out


# Largest distance (log2 units) the true row maximum may sit above / below the single pass's
# reference before a row is recomputed exactly: fp16 keeps exp2(s - ref) inside its range (p is
# cast to the value dtype for the PV product); bf16/fp32 share fp32's exponent range.
_SAFE_WINDOW = {torch.float16: (15.0, 8.0)}
_DEFAULT_WINDOW = (64.0, 100.0)


def forward_mode(p: Problem, sel: Selection) -> str:
    """"single" (one pass against the gate's reference, unsafe rows repaired) or "two_pass"
    (LSE pass, then the normalised output pass)."""
    if sel.ref is None:
        return "two_pass"
    return str(triton_configs.pick("fwd_mode", "single"))


def attention_forward(p: Problem, sel: Selection) -> tuple[Tensor, Tensor]:
    """Output (q's dtype and layout) and per-row LSE (base 2, `[B*Hkv, RP]`) for a selection with CSR."""
    nsplit = key_splits(p)
    span = _span(p, nsplit)
    if forward_mode(p, sel) == "two_pass":
        work = _work_list(p, sel, fwd_config(p)[0])
        lse = row_lse(p, sel, nsplit, work=work).contiguous()
        o32 = p.new_out(torch.float32)
        _launch_fwd(p, sel, 1, o32, lse, lse, nsplit, span, work=work)
        return o32.to(p.q.dtype), lse
    out, lse, _ = single_pass_forward(p, sel)
    return out, lse


def single_pass_forward(p: Problem, sel: Selection) -> tuple[Tensor, Tensor, Tensor]:
    """Softmax against a fixed per-row reference (the best gate score of the row's blocks, a
    close estimate of its maximum score), so every block's contribution is final when computed:
    one QK^T pass instead of two. Rows whose true maximum lands outside the safe window around the
    reference are flagged and recomputed exactly by the two-pass kernels (their launches do no key
    work when no row is flagged, so no host sync is needed). Returns (out, lse, repaired rows).

    The fp32 accumulator exists for one window of (batch, KV head) rows at a time, of at most
    `fwd_piece_mib` MiB (`triton_configs`): the forward's peak stays near SDPA's instead of adding
    2x the output. Gate, routing and row statistics are computed once for all windows."""
    nsplit = key_splits(p)
    span = _span(p, nsplit)
    dev = p.q.device
    bh, rp = p.batch * p.hkv, sel.row_pad
    ref = (sel.ref * (p.scale * LOG2E)).contiguous()
    row_sum = torch.zeros((bh, rp), dtype=torch.float32, device=dev)
    row_max = torch.full((bh, rp), float("-inf"), dtype=torch.float32, device=dev)
    work = _work_list(p, sel, fwd_config(p)[0])
    out = p.new_out(p.q.dtype, written=True)  # the epilogue stores every row of every sequence
    lse = torch.empty((bh, rp), dtype=torch.float32, device=dev)
    bad = torch.empty((bh, rp), dtype=torch.int8, device=dev)
    safe_hi, safe_lo = _SAFE_WINDOW.get(p.q.dtype, _DEFAULT_WINDOW)
    wins = windows(p, int(triton_configs.pick("fwd_piece_mib", triton_configs.FWD_PIECE_MIB)) * 2**20)
    for w in wins:
        o32 = _window_acc(p, w)
        _launch_fwd(p, sel, 2, o32, row_sum, ref, nsplit, span, row_sum=row_sum, row_max=row_max, work=work,
                    window=w)
        _launch_finish(p, o32, out, row_sum, row_max, ref, lse, bad, safe_hi, safe_lo, False, w)
        del o32
    # Exact two-pass repair of the flagged rows (normally none). Eager calls skip it when no row is
    # flagged (one host sync for all windows; the always-on launches cost ~2.5-5.7 ms at 64K-128K
    # on an H200); traced calls (torch.compile, export) and CUDA-graph captures cannot branch on
    # data and always launch it.
    if not _tracing() and not capturing(dev) and not bool(bad.any()):
        return out, lse, bad != 0
    lse_fix = row_lse(p, sel, nsplit, row_filter=bad, work=work)
    for w in wins:
        o32 = _window_acc(p, w)
        _launch_fwd(p, sel, 1, o32, lse_fix, lse_fix, nsplit, span, row_filter=bad, work=work, window=w)
        _launch_finish(p, o32, out, row_sum, row_max, ref, lse, bad, safe_hi, safe_lo, True, w)
        del o32
    return out, torch.where(bad != 0, lse_fix, lse), bad != 0


def _launch_finish(p: Problem, o32: Tensor, out: Tensor, row_sum: Tensor, row_max: Tensor, ref: Tensor,
                   lse: Tensor, bad: Tensor, safe_hi: float, safe_lo: float, repair: bool, w: Window) -> None:
    rows_per = 16 if not interpreted(p.q.device) else 32
    so, so2 = w.strides or p.out_strides(o32), p.out_strides(out)
    launch(_fwd_finish_kernel)[(-(-bad.shape[1] // rows_per), w.bh1 - w.bh0)](
        o32, out, row_sum, row_max, ref, lse, bad, p.q_start, p.q_len, so.sb, so.sh, so.st, so2.sb, so2.sh, so2.st,
        p.hkv, p.group, bad.shape[1], w.bh0, w.obase, safe_hi, safe_lo,
        REPAIR=repair, BLOCK_M=rows_per, BLOCK_D=_block_d(p.dv), D=p.dv,  # the output's (value) head dim
    )


def attention_backward(p: Problem, sel: Selection, grad_out: Tensor, out: Tensor, lse: Tensor
                       ) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv (q/k/v dtypes and layouts) from the row LSE of the forward."""
    block_m, block_n, warps, stages = bwd_config(p)
    bh = p.batch * p.hkv
    block_d = _block_d(p.d)
    grad_out = grad_out.contiguous()
    out = out.contiguous()
    sd, so = p.out_strides(grad_out), p.out_strides(out)
    delta = torch.zeros((bh, sel.row_pad), dtype=torch.float32, device=p.q.device)
    rows_per = 16 if not interpreted(p.q.device) else 32
    launch(_row_dot_kernel)[(-(-sel.row_pad // rows_per), bh)](
        grad_out, out, delta, p.q_start, p.q_len, sd.sb, sd.sh, sd.st, so.sb, so.sh, so.st,
        p.hkv, p.group, sel.row_pad, BLOCK_M=rows_per, BLOCK_D=_block_d(p.dv), D=p.dv,  # dO, O: value head dim
    )
    dq32 = torch.zeros(p.q.shape, dtype=torch.float32, device=p.q.device)  # packed: unused tokens stay 0
    dk = torch.zeros_like(p.k)  # zeros: packed tokens outside every sequence get no gradient
    dv = torch.zeros_like(p.v)
    sgq, sgk, sgv = p.out_strides(dq32), p.out_strides(dk), p.out_strides(dv)
    n_sub = -(-p.block_size // block_n)
    mask, ms, has_mask, mask_bool = _mask_args(p)
    launch(_bwd_kernel)[(p.n_blocks * n_sub, bh)](
        p.q, p.k, p.v, grad_out, dq32, dk, dv, lse, delta, mask, sel.offsets, sel.entry_row,
        p.q_start, p.q_len, p.k_start, p.k_len,
        p.sq.sb, p.sq.sh, p.sq.st, p.sk.sb, p.sk.sh, p.sk.st, p.sv.sb, p.sv.sh, p.sv.st, sd.sb, sd.sh, sd.st,
        sgq.sb, sgq.sh, sgq.st, sgk.sb, sgk.sh, sgk.st, sgv.sb, sgv.sh, sgv.st, ms[0], ms[1], ms[2], ms[3],
        p.hkv, p.group, p.n_blocks, n_sub, sel.entry_row.shape[1], sel.row_pad, p.block_size,
        p.scale, p.scale * LOG2E,
        CAUSAL=p.causal, HAS_MASK=has_mask, MASK_BOOL=mask_bool, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_D=block_d, D=p.d, BLOCK_DV=_block_d(p.dv), DV=p.dv, DOT_PREC=_dot_prec(p),
        num_warps=warps, num_stages=stages,
    )
    return dq32.to(p.q.dtype), dk, dv
