"""Moving only the selected key/value blocks between ranks, and their gradients back.

1. Index exchange: every rank tells every owner which of the owner's blocks it needs, as an
   int32 code per `(batch, kv head, block)` (`[B, Hkv, blocks per rank]` per (requester, owner)
   pair, in one `all_to_all_single`; bytes: `4 * B * Hkv * T_local / block_size` per peer,
   tiny): fetch the tile, or the number of query rows shipped to be attended there
   (`shipping.py`).
2. Block exchange: every owner sends the requested `(batch, kv head, block)` key and value tiles
   `[block_size, D + Dv]`, grouped by destination, in one `all_to_all_single` with uneven splits.
   Both sides list the tiles in the same order (destination or source rank, then batch, kv head,
   block: the row-major order of the request codes), so no index travels with the data. It is
   started asynchronously (`InFlight`): the rank attends its own blocks while the tiles travel.
3. Backward: the dK/dV tiles of fetched blocks travel the same way in reverse (started as soon
   as they are computed, while the rank computes its own blocks' gradients) and are added into
   their owner's gradient (a block fetched by several ranks gets the sum).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from moba_rewrite.parallel.groups import InFlight, collective
from moba_rewrite.parallel.shipping import FETCH
from moba_rewrite.parallel.traffic import count


@dataclass
class BlockExchange:
    """Which tiles one rank sends and receives; computed in the forward, reversed in the backward."""

    send_index: tuple[Tensor, Tensor, Tensor]  # (batch, kv head, local block) of each tile sent
    send_counts: list[int]  # tiles per destination rank
    recv_index: tuple[Tensor, Tensor, Tensor]  # (batch, kv head, global block) of each tile received
    recv_counts: list[int]  # tiles per source rank


def plan_exchange(codes: Tensor, blocks_of: Tensor, rank: int, pg: dist.ProcessGroup, who: str) -> BlockExchange:
    """Tell owners what this rank needs and learn what they need from it.

    codes `[B, Hkv, n]` int32 over the global blocks (`shipping.choose`): 0 nothing, `FETCH` for a
    tile this rank fetches, a positive count for a tile whose query rows it ships to the owner
    (those travel in `shipping`); blocks_of `[W, blocks per rank]`: each rank's global blocks in
    its local order. Returns the tiles to send and to receive."""
    world = blocks_of.shape[0]
    requests = codes[:, :, blocks_of].permute(2, 0, 1, 3).contiguous()  # [W, B, Hkv, nb]
    requests[rank] = 0
    wanted = torch.empty_like(requests)
    with collective(who, "the exchange of block requests", pg):
        dist.all_to_all_single(wanted, requests, group=pg)
    count("block requests", requests[0].numel() * requests.element_size() * (world - 1))
    dst, sb, sh, sj = (wanted == FETCH).nonzero(as_tuple=True)
    src, rb, rh, rj = (requests == FETCH).nonzero(as_tuple=True)
    return BlockExchange(
        send_index=(sb, sh, sj), send_counts=torch.bincount(dst, minlength=world).tolist(),
        recv_index=(rb, rh, blocks_of[src, rj]), recv_counts=torch.bincount(src, minlength=world).tolist(),
    )


def _tiles(x: Tensor, block_size: int) -> Tensor:
    """`[B, H, T, D]` -> `[B, H, T / block_size, block_size, D]` view."""
    b, h, t, d = x.shape
    return x.view(b, h, t // block_size, block_size, d)


def start_fetch(k: Tensor, v: Tensor, ex: BlockExchange, block_size: int, pg: dist.ProcessGroup,
                who: str) -> InFlight:
    """Start sending the requested tiles of this rank's k/v; `wait()` gives the received ones,
    `[N_recv, bs, D + Dv]` (keys then values along the last dim: the value head dim may differ, as
    in multi-head latent attention)."""
    b, h, j = ex.send_index
    send = torch.cat([_tiles(k, block_size)[b, h, j], _tiles(v, block_size)[b, h, j]], dim=-1)
    recv = send.new_empty((sum(ex.recv_counts), block_size, k.shape[-1] + v.shape[-1]))
    count("key/value blocks", send.numel() * send.element_size())
    return InFlight(send, recv, ex.send_counts, ex.recv_counts, pg, who, "the all-to-all of key/value blocks")


def start_gradient_return(grad_tiles: Tensor, ex: BlockExchange, pg: dist.ProcessGroup, who: str) -> InFlight:
    """Start sending dK/dV of fetched tiles (`[N_recv, bs, D + Dv]`) to their owners; pass the
    result of `wait()` to `add_returned_gradients`."""
    back = grad_tiles.new_empty((sum(ex.send_counts), *grad_tiles.shape[1:]))
    count("key/value gradients", grad_tiles.numel() * grad_tiles.element_size())
    return InFlight(grad_tiles.contiguous(), back, ex.recv_counts, ex.send_counts, pg, who,
                    "the all-to-all returning key/value gradients")


def add_returned_gradients(back: Tensor, ex: BlockExchange, dk: Tensor, dv: Tensor, block_size: int) -> None:
    """Add the dK/dV tiles peers returned for this rank's blocks into dk/dv (a block fetched by
    several ranks gets the sum)."""
    idx = ex.send_index
    d = dk.shape[-1]
    _tiles(dk, block_size).index_put_(idx, back[..., :d].to(dk.dtype), accumulate=True)
    _tiles(dv, block_size).index_put_(idx, back[..., d:].to(dv.dtype), accumulate=True)
