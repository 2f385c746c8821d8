"""`torch` backend, general path: one online softmax over per-block query groups.

Used when the no-max fast path (`torch_fast`) cannot be proven safe: additive float masks or
scores large enough to overflow `exp` without a running maximum.

1. `torch_select.route` gates queries chunk by chunk, keeps the `top_k - 1` selected history
   blocks per (batch, query head, query) and sorts the (query row, key block) pairs, own
   block included, by (batch, kv head, block).
2. For every key block that some query visits, the visiting query rows (all query heads of
   the block's GQA group together) are gathered and attend the block with one dense matmul
   `[rows, D] x [D, block]`; the causal cut touches only the rows whose own block it is.
3. An online softmax keeps a running (max, sum, output) per query row and merges each block
   into it, so no partial results per (query, block) are stored.

Memory: the selection is `O(B * Hq * Tq * top_k)` integers, the state `O(B * Hq * Tq * D)`,
and every temporary is one tile of at most `_TILE_ELEMS` scores. `Tq x Tk` scores and the
whole gate never exist. The backward recomputes routing and the log-sum-exp (one extra
`QK^T` per tile), then walks the same tiles: dV and dK accumulate per key block, dQ by
`index_add_`.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor

from moba_rewrite.kernels.torch.select import RoutePlan, compute_dtype, mask4, route, row_mask

__all__ = ["forward", "backward"]

# Scores per tile: rows x block_size (16 MiB in fp32). Bounds every temporary in the loops.
_TILE_ELEMS = 1 << 22

_Tile = tuple[int, int, int, int, Tensor, int]  # (b, kv_head, key_start, key_end, rows, own_from)


def _tiles(plan: RoutePlan, tk: int) -> Iterator[_Tile]:
    """Walk the plan's groups in tiles of at most `_TILE_ELEMS // block_size` query rows."""
    bs = plan.block_size
    step = max(1, _TILE_ELEMS // bs)
    for b, h, j, start, own_start, end in plan.groups:
        ks, ke = j * bs, min((j + 1) * bs, tk)
        for s in range(start, end, step):
            e = min(end, s + step)
            yield b, h, ks, ke, plan.rows[s:e], max(own_start - s, 0) if own_start < e else e - s


class _Scorer:
    """Scaled scores of one tile with the attention mask and the causal cut applied."""

    def __init__(self, q: Tensor, attn_mask: Tensor | None, *, causal: bool, scale: float, offset: int):
        self.hq, self.tq = q.shape[1], q.shape[2]
        self.mask = mask4(attn_mask)
        self.causal, self.scale, self.offset = causal, scale, offset
        self.ct = compute_dtype(q.dtype)
        self.qf = q.reshape(-1, q.shape[-1])

    def scaled_queries(self, rows: Tensor) -> Tensor:
        qs = self.qf.index_select(0, rows)
        return qs.to(self.ct).mul_(self.scale) if qs.dtype != self.ct else qs.mul_(self.scale)

    def scores(self, qs: Tensor, kj: Tensor, b: int, ks: int, ke: int, rows: Tensor, own_from: int) -> Tensor:
        s = qs @ kj.transpose(0, 1)
        neg_inf = float("-inf")
        m = self.mask
        if m is not None:
            mt = row_mask(m, b, rows, self.tq, self.hq, ks, ke)
            if mt.dtype == torch.bool:
                s.masked_fill_(~mt, neg_inf)
            else:
                s.add_(mt.to(s.dtype))
        if self.causal and own_from < rows.shape[0]:
            pos = rows[own_from:] % self.tq + self.offset
            hidden = torch.arange(ks, ke, device=rows.device)[None, :] > pos[:, None]
            s[own_from:].masked_fill_(hidden, neg_inf)
        return s


def _attend(q: Tensor, k: Tensor, v: Tensor | None, plan: RoutePlan, scorer: _Scorer
            ) -> tuple[Tensor | None, Tensor, Tensor]:
    """Online softmax over the plan: (unnormalised output or None, row max, row sum), flat rows."""
    ct = scorer.ct
    n_rows = q.shape[0] * q.shape[1] * q.shape[2]
    row_max = torch.full((n_rows,), float("-inf"), dtype=ct, device=q.device)
    row_sum = torch.zeros((n_rows,), dtype=ct, device=q.device)
    acc = torch.zeros((n_rows, v.shape[-1]), dtype=ct, device=q.device) if v is not None else None
    tk = k.shape[2]
    for b, h, ks, ke, rows, own_from in _tiles(plan, tk):
        kj = k[b, h, ks:ke].to(ct)
        s = scorer.scores(scorer.scaled_queries(rows), kj, b, ks, ke, rows, own_from)
        m_old = row_max.index_select(0, rows)
        m_new = torch.maximum(m_old, s.amax(1))
        m_safe = torch.where(m_new == float("-inf"), 0.0, m_new)
        p = s.sub_(m_safe[:, None]).exp_()
        alpha = (m_old - m_safe).exp_()
        row_sum.index_copy_(0, rows, row_sum.index_select(0, rows).mul_(alpha).add_(p.sum(1)))
        row_max.index_copy_(0, rows, m_new)
        if acc is not None:
            vj = v[b, h, ks:ke].to(ct)
            acc.index_copy_(0, rows, acc.index_select(0, rows).mul_(alpha[:, None]).addmm_(p, vj))
    return acc, row_max, row_sum


@torch.no_grad()
def forward(q: Tensor, k: Tensor, v: Tensor, *, block_size: int, top_k: int, causal: bool, scale: float,
            attn_mask: Tensor | None, selection: Tensor | None = None,
            return_lse: bool = False, own_block: bool = True) -> Tensor | tuple[Tensor, Tensor]:
    """MoBA output `[B, Hq, Tq, Dv]` in `q`'s dtype (SPEC section 2), tile by tile.
    `selection`: history blocks chosen by the caller (see `select.route`). `return_lse`: also the
    log-sum-exp of each row's scaled scores, `[B, Hq, Tq]` in compute precision (-inf for a row
    that sees no key), for merging with attention over other keys (context parallelism).
    `own_block=False` (with `selection`): attend the selected blocks only, not the query's own."""
    plan = route(q, k, block_size=block_size, top_k=top_k, causal=causal, attn_mask=attn_mask, selection=selection,
                 include_own=own_block)
    scorer = _Scorer(q, attn_mask, causal=causal, scale=scale, offset=plan.offset)
    acc, row_max, row_sum = _attend(q, k, v, plan, scorer)
    inv = torch.where(row_sum > 0, row_sum.reciprocal(), 0.0)
    out = acc.mul_(inv[:, None]).view(*q.shape[:-1], v.shape[-1]).to(q.dtype)
    if not return_lse:
        return out
    lse = torch.where(row_sum > 0, row_max + row_sum.log(), float("-inf"))
    return out, lse.view(q.shape[:-1])


@torch.no_grad()
def backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, *, block_size: int, top_k: int,
             causal: bool, scale: float, attn_mask: Tensor | None, selection: Tensor | None = None,
             lse: Tensor | None = None, own_block: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """`(dq, dk, dv)` of `forward`; routing and log-sum-exp are recomputed, memory as forward.

    `lse` (`[B, Hq, Tq]`, as `forward(return_lse=True)` gives): the rows' log-sum-exp over *all*
    the keys they attend, of which `k` holds a part (context parallelism), with `out` the merged
    output: the gradients of this part's keys and queries within that larger softmax."""
    plan = route(q, k, block_size=block_size, top_k=top_k, causal=causal, attn_mask=attn_mask, selection=selection,
                 include_own=own_block)
    scorer = _Scorer(q, attn_mask, causal=causal, scale=scale, offset=plan.offset)
    ct = scorer.ct
    if lse is None:
        _, row_max, row_sum = _attend(q, k, None, plan, scorer)
        # Rows with no visible key get lse = +inf, so exp(s - lse) is 0 there (never NaN).
        lse = torch.where(row_sum > 0, row_max + row_sum.log(), float("inf"))
        del row_max, row_sum
    else:
        lse = lse.reshape(-1).to(ct)
        lse = torch.where(lse == float("-inf"), float("inf"), lse)
    d = q.shape[-1]
    go = grad_out.reshape(-1, v.shape[-1])
    delta = (go.to(ct) * out.reshape(-1, v.shape[-1]).to(ct)).sum(-1)
    dq = torch.zeros((go.shape[0], d), dtype=ct, device=q.device)
    dk = torch.zeros(k.shape, dtype=ct, device=k.device)
    dv = torch.zeros(v.shape, dtype=ct, device=v.device)
    tk = k.shape[2]
    for b, h, ks, ke, rows, own_from in _tiles(plan, tk):
        kj = k[b, h, ks:ke].to(ct)
        vj = v[b, h, ks:ke].to(ct)
        qs = scorer.scaled_queries(rows)
        s = scorer.scores(qs, kj, b, ks, ke, rows, own_from)
        p = s.sub_(lse.index_select(0, rows)[:, None]).exp_()
        gog = go.index_select(0, rows).to(ct)
        dv[b, h, ks:ke].addmm_(p.transpose(0, 1), gog)
        ds = (gog @ vj.transpose(0, 1)).sub_(delta.index_select(0, rows)[:, None]).mul_(p)
        dq.index_add_(0, rows, ds @ kj, alpha=scale)
        dk[b, h, ks:ke].addmm_(ds.transpose(0, 1), qs)
    return dq.view(q.shape).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
