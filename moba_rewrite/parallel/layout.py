"""How a sequence is cut across the ranks of a context-parallel group, and the helpers that cut
and reassemble it.

Two layouts, both with equal shard lengths `T_local` on every rank:

* `contiguous`: rank r holds tokens `[r * T_local, (r + 1) * T_local)`.
* `zigzag` (load-balanced for causal attention): the sequence is cut into `2 * W` chunks of
  `T_local / 2` tokens; rank r holds chunk r followed by chunk `2W - 1 - r`, so every rank has
  one early and one late chunk (the layout of Megatron-LM and PyTorch's context parallelism).

MoBA blocks never straddle ranks: a chunk (the whole shard for `contiguous`, half of it for
`zigzag`) must hold a whole number of blocks, `T_local % block_size == 0` or
`(T_local / 2) % block_size == 0`. `shard_sequence(..., block_size=)` pads the end of the
sequence with zeros so that this holds; pass the real length as `seq_len` to the attention and
to `unshard_sequence`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from moba_rewrite.parallel.groups import all_gather_stacked, collective, reduce_scatter_stacked, resolve_group
from moba_rewrite.parallel.traffic import count

LAYOUTS = ("contiguous", "zigzag")


def check_layout(layout, who: str) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"{who}: layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    return layout


def chunks_per_rank(layout: str) -> int:
    return 2 if layout == "zigzag" else 1


@dataclass(frozen=True)
class ShardLayout:
    """Where each rank's tokens and blocks sit in the whole sequence."""

    layout: str
    world: int
    local_len: int  # tokens per rank (padding included)

    @property
    def chunk_len(self) -> int:
        return self.local_len // chunks_per_rank(self.layout)

    @property
    def global_len(self) -> int:
        return self.world * self.local_len

    def chunks(self, rank: int) -> list[int]:
        """Indices of the sequence chunks rank `rank` holds, in its local order."""
        return [rank, 2 * self.world - 1 - rank] if self.layout == "zigzag" else [rank]

    def positions(self, rank: int, device=None) -> Tensor:
        """Global positions of rank `rank`'s local tokens, `[T_local]` int64."""
        c = self.chunk_len
        return torch.cat([torch.arange(i * c, (i + 1) * c, device=device) for i in self.chunks(rank)])

    def check_blocks(self, block_size: int, who: str) -> None:
        """Raise `ValueError` unless every chunk holds a whole number of blocks."""
        c = self.chunk_len
        if self.layout == "zigzag" and self.local_len % 2:
            raise ValueError(f"{who}: the zigzag layout needs an even shard length, got T_local={self.local_len}")
        if c % block_size:
            what = "T_local" if self.layout == "contiguous" else "T_local / 2 (one zigzag chunk)"
            raise ValueError(
                f"{who}: blocks would straddle ranks: {what} = {c} is not a multiple of block_size={block_size}; "
                f"shard with moba_rewrite.parallel.shard_sequence(x, block_size={block_size}, ...) (pads the end) "
                f"and pass seq_len=")

    def blocks(self, rank: int, block_size: int) -> list[int]:
        """Global block indices rank `rank` holds, in its local order."""
        per = self.chunk_len // block_size
        return [i * per + j for i in self.chunks(rank) for j in range(per)]

    def chunk_order(self) -> list[tuple[int, int]]:
        """For each chunk of the whole sequence in order: (rank holding it, its index on that rank)."""
        out = [None] * (self.world * chunks_per_rank(self.layout))
        for r in range(self.world):
            for i, c in enumerate(self.chunks(r)):
                out[c] = (r, i)
        return out


def resolve_seq_len(seq_len, lay: ShardLayout, who: str) -> int:
    """The real sequence length: `seq_len`, or every token when None (checked against W * T_local)."""
    if seq_len is None:
        return lay.global_len
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or not 1 <= seq_len <= lay.global_len:
        raise ValueError(f"{who}: seq_len must be an integer in [1, {lay.global_len}] (W * T_local), got {seq_len!r}")
    return seq_len


def _padded_len(t: int, world: int, layout: str, block_size: int | None) -> int:
    unit = world * chunks_per_rank(layout) * (block_size or 1)
    return -(-t // unit) * unit


def shard_sequence(x: Tensor, group=None, layout: str = "contiguous", dim: int = 2, *,
                   block_size: int | None = None, pad_value: float = 0) -> Tensor:
    """This rank's shard of the whole sequence `x` (same on every rank) along `dim`.

    Without `block_size` the length must divide evenly (by W, or 2W for zigzag). With it, the
    sequence is padded at its end with `pad_value` (e.g. -100 for labels) to a multiple of
    `W * block_size` (`2W * block_size` for zigzag) so that blocks never straddle ranks; give the
    real length as `seq_len` to `moba_attention_cp` and `unshard_sequence`. For several block
    sizes pass their least common multiple. Returns a contiguous tensor (no collective is run)."""
    who = "shard_sequence"
    check_layout(layout, who)
    pg = resolve_group(group, who)
    world, rank = dist.get_world_size(pg), dist.get_rank(pg)
    dim = dim % x.dim()
    t = x.shape[dim]
    if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1):
        raise ValueError(f"{who}: block_size must be an integer >= 1 or None, got {block_size!r}")
    padded = _padded_len(t, world, layout, block_size)
    if block_size is None and padded != t:
        raise ValueError(f"{who}: sequence length {t} (dim {dim}) does not split into {world * chunks_per_rank(layout)} "
                         f"equal chunks for the {layout} layout over {world} ranks; pass block_size= to pad")
    if padded != t:
        pad_shape = list(x.shape)
        pad_shape[dim] = padded - t
        x = torch.cat([x, x.new_full(pad_shape, pad_value)], dim=dim)
    lay = ShardLayout(layout, world, padded // world)
    c = lay.chunk_len
    parts = [x.narrow(dim, i * c, c) for i in lay.chunks(rank)]
    return torch.cat(parts, dim=dim).contiguous() if len(parts) > 1 else parts[0].contiguous()


class _GatherShards(torch.autograd.Function):
    """All-gather equal shards into `[W, *shard]`; the backward reduce-scatters the gradient, so
    each rank's shard gets the sum of every rank's gradient for it."""

    @staticmethod
    def forward(ctx, x: Tensor, pg, who: str, step: str | None) -> Tensor:
        ctx.pg, ctx.who, ctx.step = pg, who, step
        others = dist.get_world_size(pg) - 1
        if step is not None:
            count(step, x.numel() * x.element_size() * others)
        with collective(who, "the all-gather of the sequence", pg):
            return all_gather_stacked(x, pg)

    @staticmethod
    def backward(ctx, grad: Tensor):
        if ctx.step is not None:  # every rank's part but its own
            count(f"{ctx.step} (gradients)", grad[1:].numel() * grad.element_size())
        with collective(ctx.who, "the reduce-scatter of the sequence's gradient", ctx.pg):
            return reduce_scatter_stacked(grad, ctx.pg), None, None, None


class _DependOn(torch.autograd.Function):
    """`out` unchanged; the backward gives `deps` a zero gradient (see `depend_on`)."""

    @staticmethod
    def forward(ctx, out: Tensor, *deps: Tensor) -> Tensor:
        ctx.shapes = [(d.shape, d.dtype, d.device) for d in deps]
        return out.clone()  # not a view: the model's code may modify a layer's output in place

    @staticmethod
    def backward(ctx, grad: Tensor):
        return (grad, *(torch.zeros(shape, dtype=dtype, device=device) for shape, dtype, device in ctx.shapes))


def depend_on(out: Tensor, *deps: Tensor) -> Tensor:
    """`out`, made to depend on `deps` for autograd (with a zero gradient), so that this rank runs
    the backward of the collectives that produced them even when its own result does not use them
    (rank 0 of a causal contiguous layout needs nothing from the others): every rank must join
    every collective of the backward, or those that wait for its part hang."""
    deps = tuple(d for d in deps if d.requires_grad)
    if not deps or not torch.is_grad_enabled():
        return out
    return _DependOn.apply(out, *deps)


def gather_sequence(x: Tensor, pg: dist.ProcessGroup, layout: str, dim: int, who: str,
                    step: str | None = None) -> Tensor:
    """The whole (padded) sequence from every rank's shard along `dim`, differentiable; `step`: count
    the bytes sent under that name (`parallel.record_traffic`), the backward's reduce-scatter too."""
    world = dist.get_world_size(pg)
    dim = dim % x.dim()
    lay = ShardLayout(layout, world, x.shape[dim])
    everyone = _GatherShards.apply(x, pg, who, step)  # [W, ...]
    c = lay.chunk_len
    return torch.cat([everyone[r].narrow(dim, i * c, c) for r, i in lay.chunk_order()], dim=dim)


def gather_key_mask(local: Tensor, pg: dist.ProcessGroup, layout: str, who: str) -> Tensor:
    """A padded batch's key mask `[B, W * T_local]` bool in sequence order, from every rank's
    `[B, T_local]` shard (one all-gather of B x T_local bytes per rank)."""
    count("key padding mask", local.numel() * (dist.get_world_size(pg) - 1))
    return gather_sequence(local.to(torch.uint8), pg, layout, dim=1, who=who).bool()


def unshard_sequence(x: Tensor, group=None, layout: str = "contiguous", dim: int = 2, *,
                     seq_len: int | None = None) -> Tensor:
    """The whole sequence from every rank's shard `x` (the inverse of `shard_sequence`), on every rank.

    `seq_len` cuts off the padding `shard_sequence(..., block_size=)` added. One all-gather;
    differentiable (the backward sums every rank's gradient of a shard onto its owner)."""
    who = "unshard_sequence"
    check_layout(layout, who)
    pg = resolve_group(group, who)
    dim = dim % x.dim()
    if layout == "zigzag" and x.shape[dim] % 2:
        raise ValueError(f"{who}: the zigzag layout needs an even shard length, got {x.shape[dim]} (dim {dim})")
    full = gather_sequence(x, pg, layout, dim, who)
    if seq_len is not None:
        if not isinstance(seq_len, int) or isinstance(seq_len, bool) or not 1 <= seq_len <= full.shape[dim]:
            raise ValueError(f"{who}: seq_len must be an integer in [1, {full.shape[dim]}], got {seq_len!r}")
        full = full.narrow(dim, 0, seq_len)
    return full

