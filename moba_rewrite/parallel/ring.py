"""Ring attention: ordinary (dense) attention over a sharded sequence without any rank holding the
whole sequence's keys, for the dense sites of hybrid policies.

The all-gather form (`dense.sdpa_cp`) gives every rank the K/V of the whole sequence, kept for the
backward: at a million tokens that is one dense layer's whole K/V on every rank. Here each rank's
K/V shard travels around the ring instead (rank r sends to r + 1 and receives from r - 1, the next
exchange started before the current shard is attended, so sending overlaps compute): after
`W - 1` steps every rank has attended every shard its queries may see, merging the parts by their
log-sum-exps, and holds at most two shards at a time. The backward sends the shards around again
with an fp32 accumulator of their dK/dV, which returns to the shard's owner after a full turn.
Bytes per rank: the all-gather's in the forward; the backward adds the dK/dV (in fp32).

Causal visibility is decided per chunk pair at global positions (the layout's chunks: one per rank
contiguous, two zigzag): a key chunk before a query chunk is attended whole, the query's own chunk
as the causal square, later chunks not at all (their shards still pass through: the ring does not
skip hops). Padding keys (`key_padding_mask`, all-gathered once: `B x T` bools) and alignment
padding past `seq_len` are hidden.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from moba_rewrite.kernels import dense as dense_kernels
from moba_rewrite.parallel.dense import checked_dense_call
from moba_rewrite.parallel.groups import collective
from moba_rewrite.parallel.layout import ShardLayout, gather_key_mask
from moba_rewrite.parallel.lse import merge_by_lse
from moba_rewrite.parallel.traffic import count

_WHO = "ring_attention_cp"
RING_STEP = "ring keys/values"


class _Pass:
    """One hop around the ring: send `x` to the next rank, receive the previous rank's (started at
    once; `wait()` returns what arrived)."""

    def __init__(self, x: Tensor, pg: dist.ProcessGroup, step: str):
        world, rank = dist.get_world_size(pg), dist.get_rank(pg)
        self.got, self.pg, self.step = torch.empty_like(x), pg, step
        count(step, x.numel() * x.element_size())
        ops = [dist.P2POp(dist.isend, x.contiguous(), dist.get_global_rank(pg, (rank + 1) % world), pg),
               dist.P2POp(dist.irecv, self.got, dist.get_global_rank(pg, (rank - 1) % world), pg)]
        with collective(_WHO, f"the ring exchange of {step}", pg):
            self.requests = dist.batch_isend_irecv(ops)

    def wait(self) -> Tensor:
        with collective(_WHO, f"the ring exchange of {self.step}", self.pg):
            for request in self.requests:
                request.wait()
        return self.got


def _pack(k: Tensor, v: Tensor) -> Tensor:
    return torch.cat([k.reshape(-1), v.reshape(-1)])


def _unpack(flat: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    return flat[:k.numel()].view_as(k), flat[k.numel():].view_as(v)


def _pairs(lay: ShardLayout, rank: int, holder: int, causal: bool) -> list[tuple[int, int, bool]]:
    """(local query chunk, holder's key chunk, causal square?) of every part this rank attends of
    `holder`'s shard."""
    pairs = []
    for i, qc in enumerate(lay.chunks(rank)):
        for j, kc in enumerate(lay.chunks(holder)):
            if not causal or kc < qc:
                pairs.append((i, j, False))
            elif kc == qc:
                pairs.append((i, j, True))
    return pairs


def _by_chunk(visible: Tensor, lay: ShardLayout) -> Tensor:
    """The whole sequence's key mask `[B, T]` as `[B, chunk, token in chunk]`."""
    return visible.view(visible.shape[0], -1, lay.chunk_len)



class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, visible: Tensor, pg: dist.ProcessGroup, lay: ShardLayout,
                causal: bool, scale: float) -> Tensor:
        world, rank = dist.get_world_size(pg), dist.get_rank(pg)
        c = lay.chunk_len
        out = torch.zeros((*q.shape[:-1], v.shape[-1]), dtype=torch.float32, device=q.device)
        lse = torch.full(q.shape[:-1], float("-inf"), dtype=torch.float32, device=q.device)
        keys_seen = _by_chunk(visible, lay)
        shard = _pack(k, v)
        for step in range(world):
            ring = _Pass(shard, pg, RING_STEP) if step < world - 1 else None
            holder = (rank - step) % world
            k_h, v_h = _unpack(shard, k, v)
            for i, j, square in _pairs(lay, rank, holder, causal):
                kc = lay.chunks(holder)[j]
                rows = slice(i * c, (i + 1) * c)
                part = dense_kernels.part_forward(q[:, :, rows], k_h[:, :, j * c:(j + 1) * c], v_h[:, :, j * c:(j + 1) * c],
                                                  keys_seen[:, kc], square, scale)
                out[:, :, rows], lse[:, :, rows] = merge_by_lse(out[:, :, rows], lse[:, :, rows], *part)
            if ring is not None:
                shard = ring.wait()
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, visible, out, lse)
        ctx.pg, ctx.lay, ctx.causal, ctx.scale = pg, lay, causal, scale
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        q, k, v, visible, out, lse = ctx.saved_tensors
        pg, lay, causal, scale = ctx.pg, ctx.lay, ctx.causal, ctx.scale
        world, rank = dist.get_world_size(pg), dist.get_rank(pg)
        c = lay.chunk_len
        grad_out = grad_out.contiguous()
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        keys_seen = _by_chunk(visible, lay)
        shard = _pack(k, v)
        acc = torch.zeros(shard.shape, dtype=torch.float32, device=q.device)  # dK/dV of the shard held now
        for step in range(world):
            ring = _Pass(shard, pg, f"{RING_STEP} (backward)") if step < world - 1 else None
            holder = (rank - step) % world
            k_h, v_h = _unpack(shard, k, v)
            dk_h, dv_h = _unpack(acc, k, v)
            for i, j, square in _pairs(lay, rank, holder, causal):
                kc = lay.chunks(holder)[j]
                rows, keys = slice(i * c, (i + 1) * c), slice(j * c, (j + 1) * c)
                gq, gk, gv = dense_kernels.part_backward(grad_out[:, :, rows], q[:, :, rows], k_h[:, :, keys],
                                                         v_h[:, :, keys], out[:, :, rows], lse[:, :, rows],
                                                         keys_seen[:, kc], square, scale)
                dq[:, :, rows] += gq.float()
                dk_h[:, :, keys] += gk.float()
                dv_h[:, :, keys] += gv.float()
            acc = _Pass(acc, pg, f"{RING_STEP} (gradients)").wait()  # on to the next holder; the last hop home
            if ring is not None:
                shard = ring.wait()
        dk, dv = _unpack(acc, k, v)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None


@torch.compiler.disable  # eager: point-to-point exchanges (a compiled model breaks its graph here)
def ring_attention_cp(q: Tensor, k: Tensor, v: Tensor, *, group=None, causal: bool = True, scale: float | None = None,
                      enable_gqa: bool = False, layout: str = "contiguous", seq_len: int | None = None,
                      check_ranks: bool = True, key_padding_mask: Tensor | None = None,
                      global_key_mask: Tensor | None = None) -> Tensor:
    """`scaled_dot_product_attention` of this rank's queries over the whole sharded sequence, by
    ring attention (no rank holds more than two shards' K/V). Same conventions as `sdpa_cp` (q, k,
    v `[B, H, T_local, D]`, `layout`, `seq_len`, `key_padding_mask` `[B, T_local]`;
    `global_key_mask`: the whole sequence's `[B, T]` bool key mask when the caller already
    all-gathered it); returns this rank's shard of the output (alignment padding rows zero),
    differentiable."""
    pg, lay, seq_len, resolved, key_padding = checked_dense_call(
        _WHO, q, k, v, group=group, causal=causal, scale=scale, enable_gqa=enable_gqa, layout=layout, seq_len=seq_len,
        check_ranks=check_ranks, key_padding_mask=key_padding_mask, padded=global_key_mask is not None)
    visible = (torch.arange(lay.global_len, device=q.device) < seq_len)[None, :].expand(q.shape[0], -1)
    if global_key_mask is not None:
        visible = visible & global_key_mask.to(device=q.device, dtype=torch.bool)
    elif key_padding is not None:
        visible = visible & gather_key_mask(key_padding, pg, layout, _WHO)
    out = _RingAttention.apply(q, k, v, visible.contiguous(), pg, lay, causal, resolved)
    rank = dist.get_rank(pg)
    real = lay.positions(rank, q.device) < seq_len
    return out if bool(real.all()) else out * real.view(1, 1, -1, 1).to(out.dtype)
