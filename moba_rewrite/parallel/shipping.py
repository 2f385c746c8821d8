"""Query shipping: attend a remote block on its owner instead of fetching it.

A rank that needs a remote key/value tile (one batch row, one kv head, one block) for only a few
query rows moves fewer bytes by sending those rows to the tile's owner than by fetching the tile
(`block x (D + Dv)` values): the owner attends them over the tile and returns, per row, the
partial output and its log-sum-exp (`Dv + 1` values); the requester merges the partials with its
local attention exactly (a softmax over the union of the keys, by log-sum-exp weights). The
choice is made per tile (`choose`) and told to the owners in the request exchange
(`exchange.plan_exchange`).

A query row travels once per owner (a "unit"), with the list of that owner's tiles it picked
(`top_k - 1` int32 at most); the owner attends each tile, merges the row's tiles by log-sum-exp
and answers once. Backward: the requester sends each unit's output gradient with the row's
merged log-sum-exp and `delta = dO . O`; the owner recomputes the tiles' probabilities, adds
their dK/dV into its own gradients and returns the unit's dQ.

Each step's all-to-alls are started without waiting (`InFlight`), so the ranks compute while
units and answers travel: `send_units` before the rank attends its own blocks, `attend_units`
(the owner's work) after them, the answers collected last; in the backward likewise
(`send_unit_gradients`, `unit_gradients`).

Bytes per unit, forward: `D` values and the tile list from the requester, `Dv` values and one
fp32 log-sum-exp from the owner; a fetched tile: `block x (D + Dv)` values from the owner.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from moba_rewrite.parallel.groups import InFlight, collective
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
    attention the early ranks serve every later one). `counts` are (query row, tile) pairs; a row
    picking several tiles of one owner travels once, so shipping costs at most that estimate."""
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

    Requester side: `rows` the flat query rows (`[B * Hq * T]` numbering) of the units this rank
    ships, in sending order (destination rank, then row), `lists` `[U, P]` int32 each unit's tiles
    on its owner (`(batch * Hkv + kv head) * nb + local block`, -1 padding), `send_counts` units
    per destination. Owner side: `recv_counts` units per source, and after the forward the
    received rows and the (unit, tile) pairs they expand to."""

    rows: Tensor
    lists: Tensor
    send_counts: list[int]
    recv_counts: list[int]
    received_q: Tensor | None = None
    pair_unit: Tensor | None = None  # owner: the received unit of each (unit, tile) pair
    pair_tile: Tensor | None = None  # owner: the tile code of each pair
    groups: list = field(default_factory=list)  # owner: (batch, kv head, block, pairs) per tile


def plan_units(shipped: Tensor, sel: Tensor, owner_of: Tensor, local_of: Tensor, *, hkv: int, nb: int, world: int,
               pg: dist.ProcessGroup, who: str) -> Shipment:
    """Group this rank's shipped picks (`shipped` `[B, Hq, T, P]` bool over `sel`'s global blocks)
    into units, one per (owner, query row), and tell each owner how many units it gets."""
    b, hq, t, picks = sel.shape
    dev = sel.device
    pb, ph, pt, pp = shipped.nonzero(as_tuple=True)
    blocks = sel[pb, ph, pt, pp]
    owner = owner_of[blocks]
    row = (pb * hq + ph) * t + pt
    code = (pb * hkv + ph // (hq // hkv)) * nb + local_of[blocks]
    units, unit_of_pair = torch.unique(owner * (b * hq * t) + row, return_inverse=True)  # sorted: owner, row
    order = torch.sort(unit_of_pair, stable=True).indices
    sizes = torch.bincount(unit_of_pair, minlength=units.numel())
    first = torch.cumsum(sizes, 0) - sizes
    slot = torch.arange(order.numel(), device=dev) - first[unit_of_pair[order]]
    lists = torch.full((units.numel(), max(picks, 1)), -1, dtype=torch.int32, device=dev)
    lists[unit_of_pair[order], slot] = code[order].to(torch.int32)
    send = torch.bincount(units // (b * hq * t), minlength=world)
    recv = torch.empty_like(send)
    with collective(who, "the exchange of shipped unit counts", pg):
        dist.all_to_all_single(recv, send, group=pg)
    count("shipped unit counts", send.element_size() * (world - 1))
    return Shipment(rows=units % (b * hq * t), lists=lists, send_counts=send.tolist(), recv_counts=recv.tolist())


def _start_rows(x: Tensor, send_counts: list[int], recv_counts: list[int], pg: dist.ProcessGroup, who: str,
                step: str) -> InFlight:
    """Start sending rows of `x` grouped by destination; `wait()` gives the rows every peer sent
    here, grouped by source."""
    count(step.removeprefix("the all-to-all of "), x.numel() * x.element_size())
    return InFlight(x.contiguous(), x.new_empty((sum(recv_counts), *x.shape[1:])), send_counts, recv_counts, pg, who,
                    step)


def _expand(ship: Shipment, lists: Tensor, hkv: int, nb: int) -> None:
    """The owner's (unit, tile) pairs from the received tile lists, grouped by tile."""
    unit, slot = (lists >= 0).nonzero(as_tuple=True)
    code = lists[unit, slot].long()
    order = torch.sort(code, stable=True).indices
    ship.pair_unit, ship.pair_tile = unit[order], code[order]
    tiles, sizes = torch.unique_consecutive(ship.pair_tile, return_counts=True)
    starts = (torch.cumsum(sizes, 0) - sizes).tolist()
    bh, j = (tiles // nb).tolist(), (tiles % nb).tolist()
    ship.groups = [(x // hkv, x % hkv, jj, s0, s0 + n) for x, jj, s0, n in zip(bh, j, starts, sizes.tolist())]


def _bounded(q_rows: Tensor, k: Tensor, scale: float, ct: torch.dtype) -> bool:
    """Whether every score `q . k * scale` is at most 60 in magnitude: `exp` of a block's scores
    and their sum then stay finite and positive in fp32, so no running maximum is needed."""
    qn = torch.linalg.vector_norm(q_rows, dim=-1, dtype=ct).amax()
    kn = torch.linalg.vector_norm(k, dim=-1, dtype=ct).amax()
    return bool(qn * kn * abs(scale) <= 60.0)


def _tile_scores(q_rows: Tensor, k: Tensor, b: int, h: int, j: int, key_real: Tensor | None, block_size: int,
                 scale: float, ct: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """(scaled scores `[rows, block]` with hidden keys at -inf, the scaled rows and the tile's keys, in ct).
    `key_real` `[1 | B, T_local]` bool: this rank's keys that may be attended (alignment padding and
    the key padding mask), or None for all."""
    kt = k[b, h, j * block_size:(j + 1) * block_size].to(ct)
    qs = q_rows.to(ct).mul_(scale) if q_rows.dtype == ct else q_rows.to(ct).mul(scale)
    s = qs @ kt.transpose(0, 1)
    if key_real is not None:
        s.masked_fill_(~key_real[b if key_real.shape[0] > 1 else 0, j * block_size:(j + 1) * block_size],
                       float("-inf"))
    return s, qs, kt


@dataclass
class InTransit:
    """Shipped-unit traffic under way: the collectives started, in the order every rank waits for them."""

    parts: list[InFlight]

    def wait(self) -> list[Tensor]:
        return [part.wait() for part in self.parts]


def send_units(q: Tensor, ship: Shipment, pg: dist.ProcessGroup, who: str) -> InTransit:
    """Forward, requester side: start sending this rank's units (query rows and tile lists) to the
    owners; `attend_units` takes what arrives."""
    sent = q.reshape(-1, q.shape[-1]).index_select(0, ship.rows)
    return InTransit([
        _start_rows(sent, ship.send_counts, ship.recv_counts, pg, who, "the all-to-all of shipped queries"),
        _start_rows(ship.lists, ship.send_counts, ship.recv_counts, pg, who, "the all-to-all of shipped tile lists")])


@torch.no_grad()
def attend_units(arriving: InTransit, q_dtype: torch.dtype, k: Tensor, v: Tensor, ship: Shipment, *,
                 block_size: int, scale: float, key_real: Tensor | None, pg: dist.ProcessGroup,
                 who: str) -> InTransit:
    """Forward, owner side: attend the units peers sent (`arriving`, from `send_units`) over this
    rank's tiles (`k`, `v`: its own shard; each unit's tiles merged) and start the answers; their
    `wait()` gives this rank's units' (partial outputs `[U, Dv]` in q's dtype, log-sum-exps `[U]`
    fp32-or-wider)."""
    ct = torch.promote_types(q_dtype, torch.float32)
    hkv, nb = k.shape[1], k.shape[2] // block_size
    got, lists = arriving.wait()
    ship.received_q = got
    _expand(ship, lists, hkv, nb)
    n_pairs = ship.pair_unit.numel()
    pair_out = torch.empty((n_pairs, v.shape[-1]), dtype=ct, device=got.device)
    pair_lse = torch.empty(n_pairs, dtype=ct, device=got.device)
    bounded = n_pairs > 0 and _bounded(got, k, scale, ct)
    for b, h, j, p0, p1 in ship.groups:
        units = ship.pair_unit[p0:p1]
        s, _, _ = _tile_scores(got.index_select(0, units), k, b, h, j, key_real, block_size, scale, ct)
        if bounded:  # exp cannot overflow: no running maximum needed
            p = s.exp_()
            total = p.sum(-1)
            pair_lse[p0:p1] = total.log()
        else:
            m = s.amax(-1)  # a selected tile always holds a real key: m is finite
            p = s.sub_(m[:, None]).exp_()
            total = p.sum(-1)
            pair_lse[p0:p1] = m.add_(total.log())
        pair_out[p0:p1] = (p @ v[b, h, j * block_size:(j + 1) * block_size].to(ct)).div_(total[:, None])
    out, lse = _lse_merge(ship.pair_unit, pair_out, pair_lse, got.shape[0])
    return InTransit([
        _start_rows(out.to(q_dtype), ship.recv_counts, ship.send_counts, pg, who, "the all-to-all of partial outputs"),
        _start_rows(lse, ship.recv_counts, ship.send_counts, pg, who, "the all-to-all of partial log-sum-exps")])


def _lse_merge(index: Tensor, out: Tensor, lse: Tensor, n: int,
               base: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """Softmax over the union of key sets, from partial results: `out[i]` / `lse[i]` (compute
    precision) belong to result `index[i]` of `n`; `base` (`[n, D]`, `[n]`): a partial every result
    starts from. Returns the merged `[n, D]` and `[n]`; a result with nothing visible gets 0 and -inf."""
    top = base[1].clone() if base is not None else torch.full((n,), float("-inf"), dtype=lse.dtype,
                                                               device=lse.device)
    top = top.scatter_reduce_(0, index, lse, reduce="amax")
    top = torch.where(top == float("-inf"), 0.0, top)
    w = (lse - top[index]).exp()
    if base is None:
        denom = torch.zeros_like(top).index_add_(0, index, w)
        acc = torch.zeros((n, out.shape[-1]), dtype=out.dtype, device=out.device)
    else:
        w_base = (base[1] - top).exp()
        denom = w_base.index_add(0, index, w)
        acc = base[0] * w_base[:, None]
    acc.index_add_(0, index, out * w[:, None])
    merged = torch.where(denom[:, None] > 0, acc / denom.clamp(min=torch.finfo(denom.dtype).tiny)[:, None], 0.0)
    return merged, torch.where(denom > 0, top + denom.log(), float("-inf"))


def merge(out: Tensor, lse: Tensor, rows: Tensor, part_out: Tensor, part_lse: Tensor) -> tuple[Tensor, Tensor]:
    """Softmax over the union of the keys: the local `(out [B, Hq, T, D], lse [B, Hq, T])` and the
    partials of flat rows `rows`. Returns the merged output (out's dtype) and log-sum-exp."""
    ct = lse.dtype
    base = (out.reshape(-1, out.shape[-1]).to(ct), lse.reshape(-1))
    merged, merged_lse = _lse_merge(rows, part_out.to(ct), part_lse.to(ct), lse.numel(), base)
    return merged.view(out.shape).to(out.dtype), merged_lse.view(lse.shape)


def send_unit_gradients(grad_out: Tensor, out: Tensor, lse: Tensor, ship: Shipment, pg: dist.ProcessGroup,
                        who: str) -> InTransit:
    """Backward, requester side: start sending this rank's units' output gradients with the rows'
    merged statistics (lse, delta = dO . O) to the owners; `unit_gradients` takes what arrives."""
    ct = lse.dtype
    d = grad_out.shape[-1]
    go = grad_out.reshape(-1, d).index_select(0, ship.rows)
    delta = (go.to(ct) * out.reshape(-1, d).index_select(0, ship.rows).to(ct)).sum(-1)
    stats = torch.stack([lse.reshape(-1).index_select(0, ship.rows), delta], dim=1)
    return InTransit([
        _start_rows(go, ship.send_counts, ship.recv_counts, pg, who, "the all-to-all of shipped output gradients"),
        _start_rows(stats, ship.send_counts, ship.recv_counts, pg, who,
                    "the all-to-all of shipped softmax statistics")])


@torch.no_grad()
def unit_gradients(arriving: InTransit, ct: torch.dtype, k: Tensor, v: Tensor, dk: Tensor, dv: Tensor,
                   ship: Shipment, *, block_size: int, scale: float, key_real: Tensor | None,
                   pg: dist.ProcessGroup, who: str) -> InFlight:
    """Backward, owner side: from the peers' units' gradients (`arriving`, from
    `send_unit_gradients`) add this rank's tiles' dK/dV into `dk`/`dv` and start returning the
    units' dQ; its `wait()` gives this rank's units' dQ `[U, D]` (q's dtype)."""
    go_in, st_in = arriving.wait()
    q_in = ship.received_q
    dq_in = torch.zeros(q_in.shape, dtype=ct, device=q_in.device)
    for b, h, j, p0, p1 in ship.groups:
        units = ship.pair_unit[p0:p1]
        s, qs, kt = _tile_scores(q_in.index_select(0, units), k, b, h, j, key_real, block_size, scale, ct)
        st = st_in.index_select(0, units)
        p = s.sub_(st[:, :1]).exp_()
        g = go_in.index_select(0, units).to(ct)
        vt = v[b, h, j * block_size:(j + 1) * block_size].to(ct)
        sl = slice(j * block_size, (j + 1) * block_size)
        dv[b, h, sl] += (p.transpose(0, 1) @ g).to(dv.dtype)
        ds = (g @ vt.transpose(0, 1)).sub_(st[:, 1:]).mul_(p)
        dq_in.index_add_(0, units, (ds @ kt).mul_(scale))
        dk[b, h, sl] += (ds.transpose(0, 1) @ qs).to(dk.dtype)  # qs carries the scale
    return _start_rows(dq_in.to(q_in.dtype), ship.recv_counts, ship.send_counts, pg, who,
                       "the all-to-all of query gradients")
