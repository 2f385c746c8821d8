"""Query shipping: attend a remote block on its owner instead of fetching it.

A rank that needs a remote key/value tile (one batch row, one kv head, one block) for only a few
query rows moves fewer bytes by sending those rows to the tile's owner than by fetching the tile
(`2 x block x D` values): the owner attends them over the tile and returns, per row, the partial
output and its log-sum-exp (`D + 1` values); the requester merges the partials with its local
attention exactly (a softmax over the union of the keys, by log-sum-exp weights). The choice is
made per tile (`choose`), and every rank learns what its peers ship to it from the request
exchange (`exchange.plan_exchange`): counts per tile, so no index travels with the rows.

Backward: the requester sends each shipped row's output gradient with the row's final
log-sum-exp and `delta = dO . O` (the merged softmax's statistics); the owner recomputes the
tile's probabilities, adds the tile's dK/dV into its own gradients and returns the rows' dQ.

Bytes per shipped (query row, tile) pair, forward: `D` values from the requester (the query),
`D` values and one fp32 log-sum-exp from the owner; a fetched tile: `2 x block x D` values from
the owner. `choose("auto")` ships a tile when the owner then sends less (fewer rows than about
`2 x block`), which also lowers what the requester receives.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from moba_rewrite.parallel.groups import collective
from moba_rewrite.parallel.traffic import count

MODES = ("auto", "keys", "queries")
FETCH = -1  # request code of a tile to fetch; a positive code is the number of query rows shipped for it


def check_mode(mode: str, who: str) -> None:
    if mode not in MODES:
        raise ValueError(f"{who}: exchange must be one of {', '.join(MODES)}, got {mode!r}")


def choose(counts: Tensor, mode: str, *, block_size: int, head_dim: int, value_dim: int, itemsize: int) -> Tensor:
    """Request codes `[...]` int32 from the pairs per remote tile `counts`: 0 none, `FETCH`, or the
    number of query rows to ship. `mode`: `keys` fetches every tile, `queries` ships every one,
    `auto` ships a tile when that lowers the most either end sends for it: fetching, the owner
    sends the tile (`block x (D + Dv)` values); shipping, the owner sends `Dv` values and a
    log-sum-exp per row and the requester `D` values per row (owners are the busy senders: under causal
    attention the early ranks serve every later one)."""
    if mode == "keys":
        ship = torch.zeros_like(counts, dtype=torch.bool)
    elif mode == "queries":
        ship = counts > 0
    else:
        lse_bytes = max(4, itemsize)  # the log-sum-exp travels in fp32 (fp64 for fp64 inputs)
        owner_ships = counts * (value_dim * itemsize + lse_bytes)
        requester_ships = counts * head_dim * itemsize
        tile = block_size * (head_dim + value_dim) * itemsize
        ship = (counts > 0) & (torch.maximum(owner_ships, requester_ships) < tile)
    return torch.where(ship, counts, torch.where(counts > 0, FETCH, 0)).to(torch.int32)


@dataclass
class Shipment:
    """Shipped query rows, seen from both ends of one call.

    Requester side: `rows` the flat query rows (`[B * Hq * T]` numbering) of the shipped pairs,
    in sending order (destination rank, batch, kv head, block: the request arrays' order), and
    `send_counts` rows per destination. Owner side: `tiles` `(batch, kv head, local block)` of
    each incoming segment with `seg_counts` rows each, in arrival order (source rank, batch, kv
    head, block), and `recv_counts` rows per source."""

    rows: Tensor
    send_counts: list[int]
    tiles: tuple[Tensor, Tensor, Tensor]
    seg_counts: list[int]
    recv_counts: list[int]
    received_q: Tensor | None = None  # the owner's copy of the incoming rows (forward), reused by the backward


def _all_to_all_rows(x: Tensor, send_counts: list[int], recv_counts: list[int], pg: dist.ProcessGroup, who: str,
                     step: str) -> Tensor:
    """Rows of `x` grouped by destination -> the rows every peer sent here, grouped by source."""
    out = x.new_empty((sum(recv_counts), *x.shape[1:]))
    with collective(who, step, pg):
        dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv_counts, input_split_sizes=send_counts,
                               group=pg)
    count(step.removeprefix("the all-to-all of "), x.numel() * x.element_size())
    return out


def _tiles(ship: Shipment):
    """(batch, kv head, local block, incoming rows) per tile, the rows of every source together:
    one matmul per tile instead of one per (source, tile)."""
    if not ship.seg_counts:
        return
    dev = ship.tiles[0].device
    b, h, j = ship.tiles
    seg_tile = (b * (int(h.max()) + 1) + h) * (int(j.max()) + 1) + j
    seg_of_row = torch.repeat_interleave(torch.arange(seg_tile.numel(), device=dev),
                                         torch.tensor(ship.seg_counts, device=dev))
    order = torch.sort(seg_tile[seg_of_row], stable=True).indices  # rows grouped by tile
    sizes = torch.unique_consecutive(seg_tile[seg_of_row[order]], return_counts=True)[1]
    starts = torch.cumsum(sizes, 0) - sizes
    seg_of_tile = seg_of_row[order[starts]]  # the segment of each tile's first row names the tile
    bl, hl, jl = b[seg_of_tile].tolist(), h[seg_of_tile].tolist(), j[seg_of_tile].tolist()
    for i, (s0, n) in enumerate(zip(starts.tolist(), sizes.tolist())):
        yield bl[i], hl[i], jl[i], order[s0:s0 + n]


def _bounded(q_rows: Tensor, k: Tensor, scale: float, ct: torch.dtype) -> bool:
    """Whether every score `q . k * scale` is at most 60 in magnitude: `exp` of a block's scores
    and their sum then stay finite and positive in fp32, so no running maximum is needed."""
    qn = torch.linalg.vector_norm(q_rows, dim=-1, dtype=ct).amax()
    kn = torch.linalg.vector_norm(k, dim=-1, dtype=ct).amax()
    return bool(qn * kn * abs(scale) <= 60.0)


def _tile_scores(q_rows: Tensor, k: Tensor, b: int, h: int, j: int, key_real: Tensor | None, block_size: int,
                 scale: float, ct: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """(scaled scores `[rows, block]` with padding keys hidden, the scaled rows and the tile's keys, in ct)."""
    kt = k[b, h, j * block_size:(j + 1) * block_size].to(ct)
    qs = q_rows.to(ct).mul_(scale) if q_rows.dtype == ct else q_rows.to(ct).mul(scale)
    s = qs @ kt.transpose(0, 1)
    if key_real is not None:
        s.masked_fill_(~key_real[j * block_size:(j + 1) * block_size], float("-inf"))
    return s, qs, kt


@torch.no_grad()
def attend_shipped(q: Tensor, k: Tensor, v: Tensor, ship: Shipment, *, block_size: int, scale: float,
                   key_real: Tensor | None, pg: dist.ProcessGroup, who: str) -> tuple[Tensor, Tensor]:
    """Forward of the shipped pairs: send this rank's shipped rows, attend the rows peers sent
    over this rank's tiles (`k`, `v`: its own shard), return the partials to their requesters.
    Returns this rank's pairs' (partial outputs `[N, D]` in q's dtype, log-sum-exp `[N]` fp32-or-wider)."""
    ct = torch.promote_types(q.dtype, torch.float32)
    sent = q.reshape(-1, q.shape[-1]).index_select(0, ship.rows)
    got = _all_to_all_rows(sent, ship.send_counts, ship.recv_counts, pg, who, "the all-to-all of shipped queries")
    ship.received_q = got
    out = got.new_empty((got.shape[0], v.shape[-1]))
    lse = torch.empty(got.shape[0], dtype=ct, device=got.device)
    bounded = got.shape[0] > 0 and _bounded(got, k, scale, ct)
    for b, h, j, rows in _tiles(ship):
        s, _, _ = _tile_scores(got.index_select(0, rows), k, b, h, j, key_real, block_size, scale, ct)
        if bounded:  # exp cannot overflow: no running maximum needed
            p = s.exp_()
            total = p.sum(-1)
            row_lse = total.log()
        else:
            m = s.amax(-1)  # a selected tile always holds a real key: m is finite
            p = s.sub_(m[:, None]).exp_()
            total = p.sum(-1)
            row_lse = m.add_(total.log())
        o = (p @ v[b, h, j * block_size:(j + 1) * block_size].to(ct)).div_(total[:, None])
        out.index_copy_(0, rows, o.to(out.dtype))
        lse.index_copy_(0, rows, row_lse)
    o = _all_to_all_rows(out, ship.recv_counts, ship.send_counts, pg, who, "the all-to-all of partial outputs")
    l = _all_to_all_rows(lse, ship.recv_counts, ship.send_counts, pg, who, "the all-to-all of partial log-sum-exps")
    return o, l


def merge(out: Tensor, lse: Tensor, rows: Tensor, part_out: Tensor, part_lse: Tensor) -> tuple[Tensor, Tensor]:
    """Softmax over the union of the keys: the local `(out [B, Hq, T, D], lse [B, Hq, T])` and the
    partials of flat rows `rows`. Returns the merged output (out's dtype) and log-sum-exp."""
    shape, d = out.shape, out.shape[-1]
    ct = lse.dtype
    lse_f = lse.reshape(-1)
    top = lse_f.clone().scatter_reduce_(0, rows, part_lse.to(ct), reduce="amax")
    top = torch.where(top == float("-inf"), 0.0, top)  # rows that see nothing: weights 0, output 0
    w_local = (lse_f - top).exp()
    w_part = (part_lse.to(ct) - top[rows]).exp()
    denom = w_local.index_add(0, rows, w_part)
    acc = (out.reshape(-1, d).to(ct) * w_local[:, None]).index_add_(0, rows, part_out.to(ct) * w_part[:, None])
    merged = torch.where(denom[:, None] > 0, acc / denom.clamp(min=torch.finfo(ct).tiny)[:, None], 0.0)
    merged_lse = torch.where(denom > 0, top + denom.log(), float("-inf"))
    return merged.view(shape).to(out.dtype), merged_lse.view(lse.shape)


@torch.no_grad()
def backward_shipped(grad_out: Tensor, out: Tensor, lse: Tensor, k: Tensor, v: Tensor, dk: Tensor, dv: Tensor,
                     ship: Shipment, *, block_size: int, scale: float, key_real: Tensor | None,
                     pg: dist.ProcessGroup, who: str) -> Tensor:
    """Backward of the shipped pairs. Sends this rank's shipped rows' output gradients with the rows'
    merged statistics (lse, delta = dO . O); as an owner, adds its tiles' dK/dV into `dk`/`dv`
    and returns the peers' rows' dQ. Returns this rank's pairs' dQ `[N, D]` (q's dtype)."""
    ct = lse.dtype
    d = grad_out.shape[-1]
    go = grad_out.reshape(-1, d).index_select(0, ship.rows)
    delta = (go.to(ct) * out.reshape(-1, d).index_select(0, ship.rows).to(ct)).sum(-1)
    stats = torch.stack([lse.reshape(-1).index_select(0, ship.rows), delta], dim=1)
    go_in = _all_to_all_rows(go, ship.send_counts, ship.recv_counts, pg, who,
                             "the all-to-all of shipped output gradients")
    st_in = _all_to_all_rows(stats, ship.send_counts, ship.recv_counts, pg, who,
                             "the all-to-all of shipped softmax statistics")
    q_in = ship.received_q
    dq_in = q_in.new_empty(q_in.shape)
    for b, h, j, rows in _tiles(ship):
        s, qs, kt = _tile_scores(q_in.index_select(0, rows), k, b, h, j, key_real, block_size, scale, ct)
        st = st_in.index_select(0, rows)
        p = s.sub_(st[:, :1]).exp_()
        g = go_in.index_select(0, rows).to(ct)
        vt = v[b, h, j * block_size:(j + 1) * block_size].to(ct)
        sl = slice(j * block_size, (j + 1) * block_size)
        dv[b, h, sl] += (p.transpose(0, 1) @ g).to(dv.dtype)
        ds = (g @ vt.transpose(0, 1)).sub_(st[:, 1:]).mul_(p)
        dq_in.index_copy_(0, rows, (ds @ kt).mul_(scale).to(dq_in.dtype))
        dk[b, h, sl] += (ds.transpose(0, 1) @ qs).to(dk.dtype)  # qs carries the scale
    return _all_to_all_rows(dq_in, ship.recv_counts, ship.send_counts, pg, who, "the all-to-all of query gradients")
