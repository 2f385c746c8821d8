"""The keys a causal sliding window needs from other ranks, and nothing more.

A causal sliding-window site (Mistral, Gemma's local layers) needs, for each local chunk of
queries starting at global position `s`, the keys from `first = (s - window + 1)` (rounded down
to a block start for MoBA) to the chunk's end: its own tokens plus at most `window - 1 + block`
tokens before them, held by the previous chunk(s). Every rank can tell what every other rank
needs from the layout alone (no request travels), so one `all_to_all_single` with uneven splits
moves exactly those tokens: `O(window)` keys and values per rank and site instead of the whole
sequence an all-gather moves. The backward returns their gradients to their owners the same way.

Chunked attention (Llama 4: a query sees the causal keys of its own chunk of `C` tokens, counted
from each row's first real token) is planned the same way with the chunk's start in place of the
window's (`chunk_start`): a local chunk of queries starting at a chunk boundary needs nothing
from the others, so shards aligned to the chunks exchange no keys at all.

`WindowKeys(k, v, ...)` holds this rank's tokens and the received ones; `.span(first, end)` gives
the keys and values of global positions `[first, end)` (differentiable), for any span the plan
covers.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.distributed as dist
from torch import Tensor

from moba_rewrite.parallel.groups import collective
from moba_rewrite.parallel.layout import ShardLayout
from moba_rewrite.parallel.traffic import count


def window_start(start: int, window: int, block_size: int) -> int:
    """The first key a chunk of queries starting at global position `start` may need: its first
    query's window start, rounded down to a block start (MoBA's blocks begin at multiples of the
    block size; 1 for dense attention)."""
    return max(0, start - window + 1) // block_size * block_size


def chunk_start(start: int, chunk: int, left_padding: tuple[int, ...], block_size: int) -> int:
    """The first key a chunk of queries starting at global position `start` may need under chunked
    attention (chunks of `chunk` tokens counted from each row's first real token, `left_padding`
    per row): the earliest start of the chunk holding `start` over the rows, rounded down to a block
    start (before a row's first real token its chunks count back from it)."""
    first = min(max(0, pad + (start - pad) // chunk * chunk) for pad in left_padding or (0,))
    return first // block_size * block_size


@dataclass(frozen=True)
class _Plan:
    """One rank's side of the exchange (CPU tensors; the same plan on every call with these sizes)."""

    send_rows: Tensor  # local rows sent, grouped by requester rank
    send_counts: tuple[int, ...]
    recv_counts: tuple[int, ...]  # rows received per owner rank, in owner order
    row_of: Tensor  # [W * T_local] int64: each global position's row in (local rows, received rows), -1 if absent


@lru_cache(maxsize=64)
def _plan(layout: str, world: int, rank: int, local_len: int, seq_len: int, window: int, block_size: int,
          chunk: int = 0, left_padding: tuple[int, ...] = ()) -> _Plan:
    """What every rank needs from the others (positions before its chunks, within the window of
    their first query, or with `chunk` within its attention chunk), and this rank's part in moving
    it: deterministic from the layout (and the rows' left padding), so no request travels."""
    lay = ShardLayout(layout, world, local_len)
    c = lay.chunk_len
    owner = torch.tensor([r for r, _ in lay.chunk_order()]).repeat_interleave(c)  # [W * T_local]
    local = lay.positions(rank)

    def needs(r: int) -> Tensor:  # positions rank r needs from others, ascending
        wanted = torch.zeros(world * local_len, dtype=torch.bool)
        for part in lay.chunks(r):
            if part * c < seq_len:
                first = (chunk_start(part * c, chunk, left_padding, block_size) if chunk else
                         window_start(part * c, window, block_size))
                wanted[first:part * c] = True
        wanted &= owner != r
        return wanted.nonzero().flatten()

    local_row = torch.full((world * local_len,), -1, dtype=torch.long)
    local_row[local] = torch.arange(local_len)
    wanted_by = [needs(r) for r in range(world)]
    sends = [w[owner[w] == rank] for w in wanted_by]  # rank's own needs hold none of its positions: empty
    mine = wanted_by[rank]
    received = torch.cat([mine[owner[mine] == src] for src in range(world)])  # in arrival order
    row_of = local_row.clone()
    row_of[received] = local_len + torch.arange(len(received))
    return _Plan(send_rows=local_row[torch.cat(sends)], send_counts=tuple(len(x) for x in sends),
                 recv_counts=tuple(int((owner[mine] == src).sum()) for src in range(world)), row_of=row_of)


class _Exchange(torch.autograd.Function):
    """Send the listed local tokens (`[T_local, ...]` rows) to their requesters; return the rows
    received, in the requesters' order. The backward sends the gradients back and adds them in."""

    @staticmethod
    def forward(ctx, local: Tensor, send_rows: Tensor, send_counts: list, recv_counts: list, pg, who: str) -> Tensor:
        ctx.save_for_backward(send_rows)
        ctx.shape, ctx.send_counts, ctx.recv_counts, ctx.pg, ctx.who = local.shape, send_counts, recv_counts, pg, who
        send = local.index_select(0, send_rows).contiguous()
        recv = send.new_empty((sum(recv_counts), *local.shape[1:]))
        with collective(who, "the all-to-all of the window's keys and values", pg):
            dist.all_to_all_single(recv, send, output_split_sizes=recv_counts, input_split_sizes=send_counts,
                                   group=pg)
        count("window keys/values", send.numel() * send.element_size())
        return recv

    @staticmethod
    def backward(ctx, grad_recv: Tensor):
        (send_rows,) = ctx.saved_tensors
        back = grad_recv.new_empty((sum(ctx.send_counts), *grad_recv.shape[1:]))
        with collective(ctx.who, "the all-to-all returning the window's gradients", ctx.pg):
            dist.all_to_all_single(back, grad_recv.contiguous(), output_split_sizes=ctx.send_counts,
                                   input_split_sizes=ctx.recv_counts, group=ctx.pg)
        grad = grad_recv.new_zeros(ctx.shape).index_add_(0, send_rows, back)
        return grad, None, None, None, None, None


class WindowKeys:
    """This rank's keys and values plus those the causal sliding window `window` (or with `chunk`,
    chunked attention of `chunk` tokens, rows left-padded by `left_padding`; `window` unused) needs
    from others (one all-to-all; see the module doc). `k` `[B, Hkv, T_local, D]`, `v` `[B, Hkv, T_local, Dv]`."""

    def __init__(self, k: Tensor, v: Tensor, pg: dist.ProcessGroup, layout: str, *, seq_len: int, window: int,
                 block_size: int, who: str, chunk: int = 0, left_padding: tuple[int, ...] = ()):
        plan = _plan(layout, dist.get_world_size(pg), dist.get_rank(pg), k.shape[2], seq_len, window, block_size,
                     chunk, tuple(sorted(set(left_padding))) if chunk else ())
        self.d = k.shape[-1]
        local = torch.cat([k, v.to(k.dtype)], dim=-1).permute(2, 0, 1, 3)  # [T_local, B, Hkv, D + Dv]
        received = _Exchange.apply(local, plan.send_rows.to(k.device), list(plan.send_counts),
                                   list(plan.recv_counts), pg, who)
        self.table = torch.cat([local, received], dim=0)  # rows: local tokens, then the received ones
        self.row_of = plan.row_of.to(k.device)

    def span(self, first: int, end: int) -> tuple[Tensor, Tensor]:
        """Keys and values of global positions `[first, end)`, `[B, Hkv, end - first, D / Dv]`."""
        rows = self.row_of[first:end]
        if bool((rows < 0).any()):
            raise RuntimeError(f"window keys: positions {first}..{end - 1} reach outside what the plan exchanged")
        kv = self.table.index_select(0, rows).permute(1, 2, 0, 3)
        return kv[..., :self.d], kv[..., self.d:]
