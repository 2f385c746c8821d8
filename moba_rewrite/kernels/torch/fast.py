"""`torch` backend, fast path: no running maximum, own blocks batched, history blocks grouped.

When every score is provably small (`|q| |k| scale log2(e) <= 60`, checked once per call) and
the mask, if any, is boolean, `exp2(score)` can neither overflow nor lose a row to underflow,
so the softmax needs no running maximum: each block adds `sum(exp2(s))` and `exp2(s) @ V`
into per-row accumulators (`index_add_`), with no rescaling and no per-tile `amax`. Scores
are computed in log2 units (queries pre-scaled by `scale * log2(e)`) because `exp2` is
cheaper than `exp` on CPU.

* Own blocks (every query has one) are processed densely for all heads and a chunk of query
  blocks at once, in query sub-blocks of `_SUB_BLOCK` rows that only look at keys up to their
  own end (causal), so most of the masked upper triangle is never computed.
* History blocks use the `RoutePlan` of `torch_select`: for each (batch, kv head, key block),
  the query rows (all heads of the GQA group) that selected it, as one `[rows, D] x [D, block]`
  matmul.

State lives in a "padded" query layout: queries are laid out from the start of the first
query's own block, `P = (n_blocks - j0) * block_size` rows per (batch, head), so that own
blocks are plain reshapes. Memory: `O(B * Hq * P * D)` accumulators (the output's size),
routing `O(B * Hq * Tq * top_k)`, and temporaries bounded by `_TILE_ELEMS` scores.

Backward recomputes routing and row sums (no exp2 @ V), then walks the same tiles with
`P = exp2(s) / l`: dV += P^T dO, dS = P (dO V^T - delta), dQ += dS K, dK += dS^T Q.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from moba_rewrite.kernels.torch.select import RoutePlan, Scratch, compute_dtype, mask4, route, row_mask

__all__ = ["applicable", "forward", "backward"]

LOG2E = math.log2(math.e)
# Largest score magnitude, in log2 units, for which the no-max softmax is used.
_EXP2_LIMIT = 60.0
# Scores per temporary tile (4 MiB in fp32): small enough to stay in cache between passes.
_TILE_ELEMS = 1 << 20
# Query rows per own-block sub-tile (the causal triangle is skipped at this granularity).
_SUB_BLOCK = 128


@torch.no_grad()
def applicable(q: Tensor, k: Tensor, v: Tensor, *, scale: float, attn_mask: Tensor | None) -> bool:
    """True when scores and sums are bounded enough for the no-max softmax (one pass over q, k, v)."""
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        return False
    ct = compute_dtype(q.dtype)
    q_norm = torch.linalg.vector_norm(q, dim=-1, dtype=ct).amax()
    k_norm = torch.linalg.vector_norm(k, dim=-1, dtype=ct).amax()
    v_min, v_max = torch.aminmax(v)
    qn, kn, vlo, vhi = torch.stack([q_norm, k_norm, v_min.to(ct), v_max.to(ct)]).tolist()
    bound = qn * kn * abs(scale) * LOG2E
    # Sums of up to Tk terms of at most 2**60 * |v| must stay far below the dtype's max.
    room = torch.finfo(ct).max / (16.0 * k.shape[2] * 2.0 ** _EXP2_LIMIT)
    return bool(bound <= _EXP2_LIMIT and max(abs(vlo), abs(vhi)) < room)


class _Layout:
    """Shapes of one call and the padded query layout (see module docstring)."""

    def __init__(self, q: Tensor, k: Tensor, v: Tensor, block_size: int):
        self.b, self.hq, self.tq, self.d = q.shape
        self.hkv, self.tk = k.shape[1], k.shape[2]
        self.dv = v.shape[-1]
        self.g = self.hq // self.hkv
        self.bs = block_size
        self.n = -(-self.tk // block_size)
        offset = self.tk - self.tq
        self.j0 = offset // block_size
        self.front = offset - self.j0 * block_size
        self.nq = self.n - self.j0
        self.p = self.nq * block_size
        self.tail = self.tk - (self.n - 1) * block_size  # keys in the last block
        self.sb = min(_SUB_BLOCK, block_size)
        self.ct = compute_dtype(q.dtype)

    def padded_rows(self, rows: Tensor) -> Tensor:
        """Flat rows of `[B*Hq*Tq]` -> flat rows of the padded `[B*Hq*P]` layout."""
        return rows + (rows // self.tq) * (self.p - self.tq) + self.front

    def unpad(self, x: Tensor) -> Tensor:
        """`[B, Hq, P, ...]` -> `[B, Hq, Tq, ...]` view."""
        return x[:, :, self.front: self.front + self.tq]

    def chunks(self) -> list[tuple[int, int]]:
        """Ranges of query blocks processed together in the own-block pass."""
        per_block = self.b * self.hq * self.sb * self.bs
        step = max(1, _TILE_ELEMS // per_block)
        return [(c, min(self.nq, c + step)) for c in range(0, self.nq, step)]

    def q_chunk(self, x: Tensor, c0: int, c1: int, mult: float | None, out: Tensor | None = None) -> Tensor:
        """Query-layout tensor `[B, Hq, Tq, E]` for blocks `[c0, c1)`: `[B, Hkv, G, nc, bs, E]` in ct.

        Written into `out` (`[B, Hq, nc * bs, E]`, any content) when given; rows outside the
        queries are zero."""
        nc, bs = c1 - c0, self.bs
        lo, hi = max(0, c0 * bs - self.front), min(self.tq, c1 * bs - self.front)
        dst = lo + self.front - c0 * bs
        shape = (self.b, self.hq, nc * bs, x.shape[-1])
        if out is None:
            buf = x.new_zeros(shape, dtype=self.ct)
        else:
            buf = out
            buf[:, :, :dst].zero_()
            buf[:, :, dst + hi - lo:].zero_()
        part = buf[:, :, dst: dst + hi - lo]
        if mult is None:
            part.copy_(x[:, :, lo:hi])
        else:
            torch.mul(x[:, :, lo:hi], mult, out=part)
        return buf.view(self.b, self.hkv, self.g, nc, bs, x.shape[-1])

    def kv_chunk(self, x: Tensor, c0: int, c1: int, mult: float | None = None, out: Tensor | None = None) -> Tensor:
        """Key blocks `[j0 + c0, j0 + c1)` of `[B, Hkv, Tk, E]` as `[B, Hkv, 1, nc, bs, E]` in ct, times `mult`.

        Always a fresh contiguous tensor (or `out`, `[B, Hkv, nc * bs, E]`), never a view of `x`:
        every sub-tile matmul then sees plain 3-D batches (a strided chunk makes `matmul` copy
        the keys again for each sub-tile)."""
        nc, bs = c1 - c0, self.bs
        k0, k1 = (self.j0 + c0) * bs, min((self.j0 + c1) * bs, self.tk)
        buf = out if out is not None else torch.empty((self.b, self.hkv, nc * bs, x.shape[-1]), dtype=self.ct,
                                                      device=x.device)
        buf[:, :, k1 - k0:].zero_()
        if mult is None:
            buf[:, :, : k1 - k0].copy_(x[:, :, k0:k1])
        else:
            torch.mul(x[:, :, k0:k1], mult, out=buf[:, :, : k1 - k0])
        return buf.view(self.b, self.hkv, 1, nc, bs, x.shape[-1])


class _OwnMasker:
    """Applies causal cut, key padding and the boolean mask to own-block sub-tiles."""

    def __init__(self, lay: _Layout, causal: bool, attn_mask: Tensor | None, device):
        self.lay, self.causal, self.m4, self.device = lay, causal, mask4(attn_mask), device
        # Additive 0 / -inf bias for the diagonal sub-tile: much cheaper than a broadcast masked_fill_.
        upper = torch.ones(lay.sb, lay.sb, dtype=torch.bool, device=device).triu_(1)
        self.causal_bias = torch.zeros(lay.sb, lay.sb, dtype=lay.ct, device=device).masked_fill_(upper, float("-inf"))

    def key_end(self, a1: int) -> int:
        return a1 if self.causal else self.lay.bs

    def __call__(self, s: Tensor, c0: int, c1: int, a0: int, a1: int) -> None:
        lay, neg_inf = self.lay, float("-inf")
        kend = s.shape[-1]
        if self.causal:
            r = a1 - a0
            s[..., a0:a1].add_(self.causal_bias[:r, :r])
        if c1 == lay.nq and lay.tail < kend:
            s[..., -1, :, lay.tail:].fill_(neg_inf)
        m4 = self.m4
        if m4 is not None:
            nc, bs = c1 - c0, lay.bs
            qi = (torch.arange(c0 * bs, c1 * bs, device=self.device) - lay.front).clamp_(0, lay.tq - 1)
            ki = torch.arange((lay.j0 + c0) * bs, (lay.j0 + c1) * bs, device=self.device).clamp_(max=lay.tk - 1)
            qi = qi.view(nc, bs)[:, a0:a1, None]
            ki = ki.view(nc, bs)[:, None, :kend]
            mt = m4[:, :, qi if m4.shape[2] > 1 else 0 * qi, ki if m4.shape[3] > 1 else 0 * ki]
            mb, mh = mt.shape[:2]
            mt = mt.view(mb, lay.hkv, lay.g, *mt.shape[2:]) if mh > 1 else mt.unsqueeze(2)
            s.masked_fill_(~mt, neg_inf)


def _history_tiles(plan: RoutePlan, lay: _Layout):
    """(b, kv head, key start, key end, rows, padded rows) per tile of the history groups."""
    step = max(1, _TILE_ELEMS // lay.bs)
    prow_all = lay.padded_rows(plan.rows)
    for b, h, j, start, _, end in plan.groups:
        ks, ke = j * lay.bs, min((j + 1) * lay.bs, lay.tk)
        for s0 in range(start, end, step):
            s1 = min(end, s0 + step)
            yield b, h, ks, ke, plan.rows[s0:s1], prow_all[s0:s1]


def _history_scores(q_flat: Tensor, kj: Tensor, rows: Tensor, b: int, ks: int, ke: int, lay: _Layout,
                    m4: Tensor | None, mult: float) -> tuple[Tensor, Tensor]:
    """(pre-scaled gathered queries, log2-unit scores with the mask applied) of one history tile."""
    qs = q_flat.index_select(0, rows).to(lay.ct)
    qs.mul_(mult)
    s = qs @ kj.transpose(0, 1)
    if m4 is not None:
        s.masked_fill_(~row_mask(m4, b, rows, lay.tq, lay.hq, ks, ke), float("-inf"))
    return qs, s


def _history_sums(q: Tensor, k: Tensor, v: Tensor | None, plan: RoutePlan, lay: _Layout, sum_flat: Tensor,
                  acc_flat: Tensor | None, m4: Tensor | None, mult: float, scratch: Scratch) -> None:
    """Adds each history tile's row sums of exp2(s) (and exp2(s) @ V when `v` is given) into the
    flat padded accumulators.

    Few Python-level tensor calls per tile (13): key and value blocks are prepared once per
    group and the work buffers are sliced from 2-D scratch views. In the threaded split every
    call is a GIL hand-off between the workers, and calls, not flops, made smaller tiles slower."""
    ct, bs, d = lay.ct, lay.bs, lay.d
    step = max(1, _TILE_ELEMS // bs)
    q_flat = q.reshape(-1, d)
    gather_out = q_flat.dtype == ct
    prow_all = lay.padded_rows(plan.rows)
    rows_all = plan.rows
    q_buf = scratch.get("q", (step, d))
    l_buf = scratch.get("l", (step,))
    o_buf = scratch.get("o", (step, lay.dv)) if v is not None else None
    kj_buf = scratch.get("kj", (bs, d))
    s_flat = scratch.get("s", (step * bs,))
    neg_inf = float("-inf")
    for b, h, j, start, _, end in plan.groups:
        ks, ke = j * bs, min((j + 1) * bs, lay.tk)
        kw = ke - ks
        # The scale goes on the (small) key block, not on the gathered queries.
        if k.dtype == ct:
            kjt = torch.mul(k[b, h, ks:ke], mult, out=kj_buf[:kw]).t()
        else:
            kjt = k[b, h, ks:ke].to(ct).mul_(mult).t()
        vj = None if v is None else (v[b, h, ks:ke] if v.dtype == ct else v[b, h, ks:ke].to(ct))
        s_grp = s_flat[: step * kw].view(step, kw)
        for s0 in range(start, end, step):
            s1 = min(end, s0 + step)
            r = s1 - s0
            rows, prows = rows_all[s0:s1], prow_all[s0:s1]
            qs = (torch.index_select(q_flat, 0, rows, out=q_buf[:r]) if gather_out
                  else q_flat.index_select(0, rows).to(ct))
            e = torch.mm(qs, kjt, out=s_grp[:r])
            if m4 is not None:
                e.masked_fill_(~row_mask(m4, b, rows, lay.tq, lay.hq, ks, ke), neg_inf)
            e.exp2_()
            sum_flat.index_add_(0, prows, torch.sum(e, 1, out=l_buf[:r]))
            if vj is not None:
                acc_flat.index_add_(0, prows, torch.mm(e, vj, out=o_buf[:r]))


def _sums(q: Tensor, k: Tensor, v: Tensor | None, plan: RoutePlan, lay: _Layout, *, causal: bool, scale: float,
          attn_mask: Tensor | None, acc: Tensor | None = None,
          own_block: bool = True) -> tuple[Tensor | None, Tensor]:
    """Padded accumulators: (sum of exp2(s) @ V or None, sum of exp2(s)), `[B, Hq, P(, Dv)]`.

    The own-block pass assigns every padded row before the history pass adds to it, so the
    accumulators start uninitialised (zeroed when `own_block=False` skips that pass); `acc` may
    be given (contiguous `[B, Hq, P, Dv]` in ct)."""
    dev, ct, mult = q.device, lay.ct, scale * LOG2E
    row_sum = torch.empty((lay.b, lay.hq, lay.p), dtype=ct, device=dev)
    if v is not None and acc is None:
        acc = torch.empty((lay.b, lay.hq, lay.p, lay.dv), dtype=ct, device=dev)
    if not own_block:
        row_sum.zero_()
        if acc is not None:
            acc.zero_()
    masker = _OwnMasker(lay, causal, attn_mask, dev)
    sum_v = row_sum.view(lay.b, lay.hkv, lay.g, lay.nq, lay.bs)
    acc_v = acc.view(lay.b, lay.hkv, lay.g, lay.nq, lay.bs, lay.dv) if acc is not None else None
    scratch = Scratch.for_thread(ct, dev)
    for c0, c1 in lay.chunks() if own_block else ():
        rows_c, keys_c = (c1 - c0) * lay.bs, (c1 - c0) * lay.bs
        # The scale goes on the keys (the query chunk is then a plain copy).
        qc = lay.q_chunk(q, c0, c1, None, out=scratch.get("qc", (lay.b, lay.hq, rows_c, lay.d)))
        kc = lay.kv_chunk(k, c0, c1, mult, out=scratch.get("kc", (lay.b, lay.hkv, keys_c, lay.d)))
        vc = lay.kv_chunk(v, c0, c1, out=scratch.get("vc", (lay.b, lay.hkv, keys_c, lay.dv))) if acc is not None else None
        for a0 in range(0, lay.bs, lay.sb):
            a1 = min(a0 + lay.sb, lay.bs)
            kend = masker.key_end(a1)
            q_a = qc[..., a0:a1, :]
            s = torch.matmul(q_a, kc[..., :kend, :].transpose(-1, -2), out=scratch.get("s", (*q_a.shape[:-1], kend)))
            masker(s, c0, c1, a0, a1)
            e = s.exp2_()
            torch.sum(e, -1, out=sum_v[:, :, :, c0:c1, a0:a1])
            if acc_v is not None:
                acc_v[:, :, :, c0:c1, a0:a1] = torch.matmul(e, vc[..., :kend, :],
                                                             out=scratch.get("o", (*e.shape[:-1], lay.dv)))
    _history_sums(q, k, v if acc is not None else None, plan, lay, row_sum.view(-1),
                  acc.view(-1, lay.dv) if acc is not None else None, mask4(attn_mask), mult, scratch)
    return acc, row_sum


@torch.no_grad()
def forward(q: Tensor, k: Tensor, v: Tensor, *, block_size: int, top_k: int, causal: bool, scale: float,
            attn_mask: Tensor | None, out: Tensor | None = None, selection: Tensor | None = None,
            return_lse: bool = False, own_block: bool = True) -> Tensor | tuple[Tensor, Tensor]:
    """MoBA output `[B, Hq, Tq, Dv]` in `q`'s dtype; callers check `applicable` first.

    With `out` (shaped like the output, `q`'s dtype) the result is written there and `out` is
    returned; it is accumulated in place when the layout allows (prefill of whole blocks).
    `selection`: history blocks chosen by the caller (see `select.route`). `return_lse`: also
    the rows' log-sum-exp (`online.forward`'s). `own_block=False`: the selected blocks only."""
    lay = _Layout(q, k, v, block_size)
    plan = route(q, k, block_size=block_size, top_k=top_k, causal=causal, attn_mask=attn_mask, include_own=False,
                 selection=selection)
    in_place = (out is not None and lay.front == 0 and lay.p == lay.tq and out.dtype == lay.ct
                and out.is_contiguous())
    acc, row_sum = _sums(q, k, v, plan, lay, causal=causal, scale=scale, attn_mask=attn_mask,
                         acc=out if in_place else None, own_block=own_block)
    del plan
    # row sums are of exp2(s * scale * log2(e)) = exp(s * scale): their log is the natural lse
    lse = lay.unpad(row_sum).log() if return_lse else None
    inv = torch.where(row_sum > 0, row_sum.reciprocal_(), 0.0)
    acc.mul_(inv[..., None])
    if out is None:
        out = lay.unpad(acc).to(q.dtype)
    elif not in_place:
        out.copy_(lay.unpad(acc))
    return (out, lse) if return_lse else out


@torch.no_grad()
def backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, *, block_size: int, top_k: int,
             causal: bool, scale: float, attn_mask: Tensor | None, selection: Tensor | None = None,
             lse: Tensor | None = None, own_block: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """`(dq, dk, dv)`; routing and row sums are recomputed, memory bounded like `forward`.
    `lse`: the rows' log-sum-exp over a larger set of keys (see `online.backward`);
    `own_block=False`: the selected blocks only (as `forward`)."""
    lay = _Layout(q, k, v, block_size)
    dev, ct, mult = q.device, lay.ct, scale * LOG2E
    plan = route(q, k, block_size=block_size, top_k=top_k, causal=causal, attn_mask=attn_mask, include_own=False,
                 selection=selection)
    if lse is None:
        _, row_sum = _sums(q, k, None, plan, lay, causal=causal, scale=scale, attn_mask=attn_mask,
                           own_block=own_block)
        inv = torch.where(row_sum > 0, row_sum.reciprocal(), 0.0)  # [B, Hq, P]
        del row_sum
    else:  # 1 / sum of exp over all the row's keys = exp(-lse); 0 on padding rows and rows seeing nothing
        inv = torch.zeros((lay.b, lay.hq, lay.p), dtype=ct, device=dev)
        lse = lse.to(ct)
        lay.unpad(inv).copy_(torch.where(lse == float("-inf"), 0.0, (-lse).exp()))
    # delta' = rowsum(dO * O) / l, in the padded layout (0 on padding rows).
    delta = torch.zeros_like(inv)
    lay.unpad(delta).copy_((grad_out.to(ct) * out.to(ct)).sum(-1))
    delta.mul_(inv)
    dq = torch.zeros((lay.b, lay.hq, lay.p, lay.d), dtype=ct, device=dev)
    dk = torch.zeros((lay.b, lay.hkv, lay.n * lay.bs, lay.d), dtype=ct, device=dev)
    dv = torch.zeros((lay.b, lay.hkv, lay.n * lay.bs, lay.dv), dtype=ct, device=dev)
    masker = _OwnMasker(lay, causal, attn_mask, dev)
    g6 = (lay.b, lay.hkv, lay.g, lay.nq, lay.bs)
    inv_v, delta_v, dq_v = inv.view(g6), delta.view(g6), dq.view(*g6, lay.d)
    dk_v = dk.view(lay.b, lay.hkv, lay.n, lay.bs, lay.d)[:, :, lay.j0:]
    dv_v = dv.view(lay.b, lay.hkv, lay.n, lay.bs, lay.dv)[:, :, lay.j0:]
    for c0, c1 in lay.chunks() if own_block else ():
        qc = lay.q_chunk(q, c0, c1, mult)
        goc = lay.q_chunk(grad_out, c0, c1, None).mul_(inv_v[:, :, :, c0:c1, :, None])
        kc, vc = lay.kv_chunk(k, c0, c1), lay.kv_chunk(v, c0, c1)
        for a0 in range(0, lay.bs, lay.sb):
            a1 = min(a0 + lay.sb, lay.bs)
            kend = masker.key_end(a1)
            k_a, v_a, q_a, go_a = kc[..., :kend, :], vc[..., :kend, :], qc[..., a0:a1, :], goc[..., a0:a1, :]
            s = torch.matmul(q_a, k_a.transpose(-1, -2))
            masker(s, c0, c1, a0, a1)
            e = s.exp2_()
            et = e.transpose(-1, -2)
            dv_v[:, :, c0:c1, :kend] += torch.matmul(et, go_a).sum(2)
            ds = torch.matmul(go_a, v_a.transpose(-1, -2)).sub_(delta_v[:, :, :, c0:c1, a0:a1, None]).mul_(e)
            dq_v[:, :, :, c0:c1, a0:a1] += torch.matmul(ds, k_a).mul_(scale)
            dk_v[:, :, c0:c1, :kend] += torch.matmul(ds.transpose(-1, -2), q_a).sum(2).mul_(1.0 / LOG2E)
    q_flat = q.reshape(-1, lay.d)
    go_flat = grad_out.reshape(-1, lay.dv)
    inv_flat, delta_flat, dq_flat = inv.view(-1), delta.view(-1), dq.view(-1, lay.d)
    m4 = mask4(attn_mask)
    for b, h, ks, ke, rows, prows in _history_tiles(plan, lay):
        kj, vj = k[b, h, ks:ke].to(ct), v[b, h, ks:ke].to(ct)
        qs, s = _history_scores(q_flat, kj, rows, b, ks, ke, lay, m4, mult)
        e = s.exp2_()
        gog = go_flat.index_select(0, rows).to(ct).mul_(inv_flat.index_select(0, prows)[:, None])
        dv[b, h, ks:ke].addmm_(e.transpose(0, 1), gog)
        ds = (gog @ vj.transpose(0, 1)).sub_(delta_flat.index_select(0, prows)[:, None]).mul_(e)
        dq_flat.index_add_(0, prows, ds @ kj, alpha=scale)
        dk[b, h, ks:ke].addmm_(ds.transpose(0, 1), qs, alpha=1.0 / LOG2E)
    return lay.unpad(dq).to(q.dtype), dk[:, :, : lay.tk].to(k.dtype), dv[:, :, : lay.tk].to(v.dtype)
