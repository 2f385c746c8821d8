"""`moba_attention_cp`: MoBA over a sequence sharded across the ranks of a process group.

Per call, on every rank (W ranks, this one holding `T_local` tokens = whole blocks):

1. the mean key of each of its blocks (over real tokens) is all-gathered: `[B, Hkv, n, D]` for
   the whole sequence, `n = W * T_local / block_size` (tiny next to K/V);
2. its queries are gated against every block at their global positions (`gate.py`);
3. per remote tile (batch, kv head, block) it picks the cheaper move (`exchange=`, `shipping.py`):
   fetch the tile, or ship the few query rows that selected it to the tile's owner; one index
   exchange tells every owner both (`exchange.py`), then one all-to-all moves the tiles and one
   the shipped rows, which their owners attend and answer with partial outputs and log-sum-exps;
4. while the tiles and the shipped rows travel (their all-to-alls are started, not waited for) it
   attends its own blocks (each query's own block and the selected blocks this rank holds), with
   the `torch` backend's kernels or, on CUDA, the `triton` backend's (`backend=`), the selection
   given explicitly; then, as an owner, the rows peers shipped to it (the answers start back);
5. then it attends the fetched tiles (side by side, for the tokens that picked any; every one a
   complete history block (causal) or fully visible (non-causal): `own_block=False`, no causal
   cut), and merges the two parts and the shipped rows' answers by log-sum-exp.

The backward recomputes nothing collective except returning dK/dV of fetched tiles to their
owners (computed first and sent while the rank computes its own blocks' gradients) and, for
shipped rows, sending their output gradients to the owners (started first) and dQ back. Every rank of the group
must call the forward and the backward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from moba_rewrite.attention import autocast
from moba_rewrite.attention.functional import validate
from moba_rewrite.kernels.reference import compute_dtype
from moba_rewrite.kernels.registry import load_backend, resolve_backend
from moba_rewrite.kernels.torch import blocks as torch_blocks
from moba_rewrite.parallel import shipping
from moba_rewrite.parallel.exchange import (BlockExchange, add_returned_gradients, plan_exchange, start_fetch,
                                           start_gradient_return)
from moba_rewrite.parallel.gate import select_history
from moba_rewrite.parallel.groups import (InFlight, all_gather_stacked, check_call_agreement, collective,
                                         resolve_group)
from moba_rewrite.parallel.layout import ShardLayout, check_layout, gather_key_mask, resolve_seq_len
from moba_rewrite.parallel.lse import merge_by_lse
from moba_rewrite.parallel.traffic import count

_WHO = "moba_attention_cp"


@dataclass(frozen=True)
class _Config:
    pg: dist.ProcessGroup
    lay: ShardLayout
    rank: int
    block_size: int
    top_k: int
    causal: bool
    scale: float
    seq_len: int
    exchange: str = "auto"
    backend: str = "torch"  # the local attention's kernels: "torch" or "triton"


def check_shards(who: str, q: Tensor, k: Tensor, v: Tensor, *, group, layout: str, block_size: int, top_k: int,
                 scale, enable_gqa: bool) -> tuple[dist.ProcessGroup, ShardLayout]:
    """Validate one rank's shards (`moba_attention`'s rules, plus: q and k/v hold the same tokens);
    return the group and the layout of the sequence."""
    pg = resolve_group(group, who)
    check_layout(layout, who)
    try:
        validate(q, k, v, block_size=block_size, top_k=top_k, scale=scale, attn_mask=None, enable_gqa=enable_gqa,
                 backend="torch")
    except ValueError as e:
        raise ValueError(str(e).replace("moba_attention:", f"{who}:", 1)) from None
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"{who}: q and k/v must be the same tokens (this rank's shard of one sequence), got "
                         f"T_local {q.shape[2]} for q and {k.shape[2]} for k/v")
    if layout == "zigzag" and q.shape[2] % 2:
        raise ValueError(f"{who}: the zigzag layout needs an even shard length, got T_local={q.shape[2]}")
    return pg, ShardLayout(layout, dist.get_world_size(pg), q.shape[2])


def _local_means(k: Tensor, positions: Tensor, cfg: _Config) -> Tensor:
    """Mean key of each local block over its real tokens, `[B, Hkv, nb, D]` in compute precision."""
    b, h, t, d = k.shape
    bs, ct = cfg.block_size, compute_dtype(k.dtype)
    real = positions < cfg.seq_len
    tiles = k.reshape(b, h, t // bs, bs, d)
    if bool(real.all()):
        return tiles.sum(3, dtype=ct) / bs
    counts = real.view(t // bs, bs).sum(1).clamp_(min=1).to(ct)
    sums = (tiles * real.view(1, 1, t // bs, bs, 1).to(k.dtype)).sum(3, dtype=ct)
    return sums / counts[:, None]


def _gather_means(local: Tensor, blocks_of: Tensor, cfg: _Config) -> Tensor:
    """All ranks' block means, in the whole sequence's block order `[B, Hkv, n, D]`."""
    world = blocks_of.shape[0]
    with collective(_WHO, "the all-gather of block means", cfg.pg):
        everyone = all_gather_stacked(local, cfg.pg)
    count("block means", local.numel() * local.element_size() * (world - 1))
    b, h, nb, d = local.shape
    means = local.new_empty((b, h, world * nb, d))
    means[:, :, blocks_of.reshape(-1)] = everyone.permute(1, 2, 0, 3, 4).reshape(b, h, world * nb, d)
    return means


def _remote_pair_counts(sel: Tensor, hkv: int, owner_of: Tensor, rank: int, n: int) -> tuple[Tensor, Tensor, Tensor]:
    """(pairs per global tile `[B, Hkv, n]`, the tile of each pick `[B, Hq, T, P]`, which picks are
    remote): a pair is one query row (query head, token) that selected a block another rank holds."""
    b, hq = sel.shape[:2]
    picked = sel >= 0
    blocks = sel.clamp(min=0)
    remote = picked & (owner_of[blocks] != rank)
    heads = torch.arange(hq, device=sel.device) // (hq // hkv)
    tile = ((torch.arange(b, device=sel.device)[:, None] * hkv + heads[None, :])[:, :, None, None] * n + blocks)
    counts = torch.bincount(tile[remote], minlength=b * hkv * n)
    return counts.view(b, hkv, n), tile, remote


class _Compact:
    """This rank's attention problem in two parts: its own blocks (`k`, `v` as given, with
    `own_selection`) and the fetched ones (`self.k`, `self.v`: the fetched tiles, with
    `fetched_selection` for the query tokens `fetched_rows` that picked any, attended without the
    own block), plus what the backward needs to send gradients home. The fetch is in flight after
    construction until `receive()`."""

    def __init__(self, q, k, v, cfg: _Config, key_padding: Tensor | None = None):
        lay = cfg.lay
        dev = q.device
        self.blocks_of = torch.tensor([lay.blocks(r, cfg.block_size) for r in range(lay.world)], device=dev)  # [W, nb]
        positions = lay.positions(cfg.rank, dev)
        self.query_real = positions < cfg.seq_len
        self.padded = not bool(self.query_real.all())
        self.local_keys = key_padding  # [B, T_local] bool or None
        self.global_keys = None if key_padding is None else gather_key_mask(key_padding, cfg.pg, lay.layout, _WHO)
        self.in_flight: InFlight | None = None
        sel, fetched = self._route(q, k, v, positions, cfg)
        self._split(k, v, sel, fetched, cfg)

    def _route(self, q, k, v, positions: Tensor, cfg: _Config) -> tuple[Tensor, Tensor]:
        """Gate against every block, exchange requests, start fetching the tiles: (global selection,
        the global blocks fetched for any (batch, kv head))."""
        bs, n, dev = cfg.block_size, self.blocks_of.numel(), q.device
        means = _gather_means(_local_means(k, positions, cfg), self.blocks_of, cfg)
        visible = None
        if self.global_keys is not None:
            visible = self.global_keys.view(self.global_keys.shape[0], n, bs).any(-1)
        sel = select_history(q, means, positions // bs, top_k=cfg.top_k, causal=cfg.causal,
                             n_real=-(-cfg.seq_len // bs), query_real=self.query_real if self.padded else None,
                             block_visible=visible)
        self.exchange: BlockExchange | None = None
        self.ship: shipping.Shipment | None = None
        if sel.shape[-1] == 0:  # top_k == 1 (the same on every rank, checked): no rank exchanges anything
            return sel, torch.empty(0, dtype=torch.long, device=dev)
        world, nb = self.blocks_of.shape
        owner_of = torch.empty(n, dtype=torch.long, device=dev)
        owner_of[self.blocks_of.reshape(-1)] = torch.arange(world, device=dev).repeat_interleave(nb)
        counts, tile, remote = _remote_pair_counts(sel, k.shape[1], owner_of, cfg.rank, n)
        codes = shipping.choose(counts, cfg.exchange, block_size=bs, head_dim=q.shape[-1], value_dim=v.shape[-1],
                                itemsize=q.element_size())
        self.exchange = plan_exchange(codes, self.blocks_of, cfg.rank, cfg.pg, _WHO)
        self.in_flight = start_fetch(k, v, self.exchange, bs, cfg.pg, _WHO)
        shipped = remote & (codes.view(-1)[tile] > 0)
        if cfg.exchange != "keys":  # every rank then joins the shipping collectives, empty or not
            local_of = torch.empty_like(owner_of)
            local_of[self.blocks_of.reshape(-1)] = torch.arange(nb, device=dev).repeat(world)
            self.ship = shipping.plan_units(shipped, sel, owner_of, local_of, hkv=k.shape[1], nb=nb, world=world,
                                            pg=cfg.pg, who=_WHO)
            sel = sel.masked_fill(shipped, -1)  # attended on their owners, not here
        return sel, (codes == shipping.FETCH).any(1).any(0).nonzero().squeeze(1)

    def _split(self, k, v, sel: Tensor, fetched: Tensor, cfg: _Config) -> None:
        """The two parts' selections (own: local block indices; fetched: slots of the fetched
        tiles, for the query tokens that picked any), the fetched part's k/v (filled by
        `receive()`; every tile a fetched (batch, kv head) pair may select arrives), and the masks
        of hidden keys (alignment padding and the key padding mask; None when every key is visible)."""
        bs, n, dev = cfg.block_size, self.blocks_of.numel(), k.device
        b, hkv, t, d = k.shape
        own = self.blocks_of[cfg.rank]
        f, nb = fetched.numel(), own.numel()
        self.n_fetched = f
        self.slot_of = torch.full((n + 1,), -1, dtype=torch.long, device=dev)  # global block -> slot (n: none)
        self.slot_of[fetched] = torch.arange(f, device=dev)
        self.slot_of[own] = torch.arange(f, f + nb, device=dev)
        slots = self.slot_of[torch.where(sel < 0, n, sel)]
        self.own_selection = torch.where(slots >= f, slots - f, -1)
        own_pos = (own[:, None] * bs + torch.arange(bs, device=dev)).reshape(-1)
        own_real = (own_pos < cfg.seq_len)[None]
        if self.global_keys is not None:
            own_real = own_real & self.local_keys
        self.own_key_real = None if bool(own_real.all()) else own_real  # [1 | B, T_local]
        self.own_key_mask = None if self.own_key_real is None else self.own_key_real[:, None, None, :]
        self.k = self.v = self.fetched_key_mask = None
        if not f:
            return
        fetched_sel = torch.where(slots < f, slots, -1)  # -1 stays -1
        picked = (fetched_sel >= 0).any(-1).any(1).any(0)  # [T_local]: tokens some head's query fetched for
        rows = picked.nonzero().squeeze(1)
        self.fetched_rows = slice(None) if rows.numel() == t else rows
        self.fetched_selection = fetched_sel[:, :, self.fetched_rows]
        self.k = k.new_zeros((b, hkv, f * bs, d))  # filled by receive() (zeros: tiles no pair selects)
        self.v = v.new_zeros((b, hkv, f * bs, v.shape[-1]))
        fetched_pos = (fetched[:, None] * bs + torch.arange(bs, device=dev)).reshape(-1)
        real = (fetched_pos < cfg.seq_len)[None]
        if self.global_keys is not None:
            real = real & self.global_keys[:, fetched_pos]
        self.fetched_key_mask = None if bool(real.all()) else real[:, None, None, :]  # [1 | B, 1, 1, K]

    def receive(self) -> None:
        """Wait for the fetched tiles and place them in the compact k/v."""
        if self.in_flight is None:
            return
        tiles = self.in_flight.wait()
        self.in_flight = None
        if tiles.shape[0]:
            b, hkv, _, d = self.k.shape
            dv = self.v.shape[-1]
            rb, rh, rj = self.exchange.recv_index
            slots = self.slot_of[rj]
            bs = tiles.shape[1]
            self.k.view(b, hkv, -1, bs, d)[rb, rh, slots] = tiles[..., :d]
            self.v.view(b, hkv, -1, bs, dv)[rb, rh, slots] = tiles[..., d:]

    def zero_padding_rows(self, x: Tensor) -> Tensor:
        """Rows of padding queries set to zero (they are no part of the sequence)."""
        return x * self.query_real.view(1, 1, -1, 1).to(x.dtype) if self.padded else x


def _part_args(cfg: _Config, key_mask: Tensor | None, own_block: bool) -> dict:
    return dict(block_size=cfg.block_size, causal=cfg.causal and own_block, scale=cfg.scale, attn_mask=key_mask,
                own_block=own_block)


def _attend(q: Tensor, k: Tensor, v: Tensor, selection: Tensor, key_mask: Tensor | None, cfg: _Config, *,
            own_block: bool) -> tuple[Tensor, Tensor]:
    """(output, log-sum-exp) of q over k/v's given blocks, on the configured kernels. Without the own
    block no causal cut applies: a selected remote block is a complete earlier block (causal) or
    fully visible (non-causal), wherever the kernels place the queries (k may hold fewer keys
    than q has queries)."""
    kw = _part_args(cfg, key_mask, own_block)
    if cfg.backend == "triton":
        return load_backend("triton").forward_selected(q, k, v, selection, **kw)
    return torch_blocks.forward(q, k, v, top_k=cfg.top_k, selection=selection, return_lse=True, **kw)


def _attend_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, selection: Tensor,
                     key_mask: Tensor | None, cfg: _Config, *, own_block: bool) -> tuple[Tensor, Tensor, Tensor]:
    """This part's `(dq, dk, dv)` within the merged softmax (`out`, `lse`: the merged results)."""
    kw = _part_args(cfg, key_mask, own_block)
    if cfg.backend == "triton":
        return load_backend("triton").backward_selected(grad_out, q, k, v, out, selection, lse, **kw)
    return torch_blocks.backward(grad_out, q, k, v, out, top_k=cfg.top_k, selection=selection, lse=lse, **kw)


class _MobaCP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, cfg: _Config, key_padding: Tensor | None) -> Tensor:
        k, v = k.contiguous(), v.contiguous()
        plan = _Compact(q, k, v, cfg, key_padding)  # the fetch is in flight from here ...
        units = None if plan.ship is None else shipping.send_units(q, plan.ship, cfg.pg, _WHO)  # ... and the units
        out, lse = _attend(q, k, v, plan.own_selection, plan.own_key_mask, cfg, own_block=True)
        answers = None
        if units is not None:  # the peers' units, attended here as their owner; the answers travel meanwhile
            answers = shipping.attend_units(units, q.dtype, k, v, plan.ship, block_size=cfg.block_size,
                                            scale=cfg.scale, key_real=plan.own_key_real, pg=cfg.pg, who=_WHO)
        plan.receive()
        if plan.n_fetched:
            rows = plan.fetched_rows
            part = _attend(q[:, :, rows], plan.k, plan.v, plan.fetched_selection, plan.fetched_key_mask, cfg,
                           own_block=False)
            merged, merged_lse = merge_by_lse(out[:, :, rows], lse[:, :, rows], *part)
            out[:, :, rows], lse[:, :, rows] = merged.to(out.dtype), merged_lse.to(lse.dtype)
        if answers is not None:
            part_out, part_lse = answers.wait()
            out, lse = shipping.merge(out, lse, plan.ship.rows, part_out, part_lse)
        out = plan.zero_padding_rows(out.to(q.dtype))
        ctx.cfg, ctx.plan = cfg, plan
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        cfg, plan = ctx.cfg, ctx.plan
        bs = cfg.block_size
        grad_out = plan.zero_padding_rows(grad_out.contiguous())
        unit_grads = None if plan.ship is None else shipping.send_unit_gradients(grad_out, out, lse, plan.ship,
                                                                                  cfg.pg, _WHO)
        returning, dq_fetched = None, None
        if plan.exchange is not None:  # the fetched tiles' gradients first, sent home while the rest is computed
            if plan.n_fetched:
                rows = plan.fetched_rows
                dq_fetched, dk_c, dv_c = _attend_backward(
                    grad_out[:, :, rows], q[:, :, rows], plan.k, plan.v, out[:, :, rows], lse[:, :, rows],
                    plan.fetched_selection, plan.fetched_key_mask, cfg, own_block=False)
                b, hkv, _, d = dk_c.shape
                rb, rh, rj = plan.exchange.recv_index
                slots = plan.slot_of[rj]
                grads = torch.cat([dk_c.view(b, hkv, -1, bs, d)[rb, rh, slots],
                                   dv_c.view(b, hkv, -1, bs, dv_c.shape[-1])[rb, rh, slots]], dim=-1)
            else:
                grads = k.new_empty((0, bs, k.shape[-1] + v.shape[-1]))
            returning = start_gradient_return(grads, plan.exchange, cfg.pg, _WHO)
        dq, dk, dv = _attend_backward(grad_out, q, k, v, out, lse, plan.own_selection, plan.own_key_mask, cfg,
                                      own_block=True)
        dk, dv = dk.contiguous(), dv.contiguous()
        if dq_fetched is not None:
            dq[:, :, plan.fetched_rows] += dq_fetched.to(dq.dtype)
        if unit_grads is not None:  # as owner: the peers' units' dK/dV into ours, their dQ sent back
            dq_back = shipping.unit_gradients(unit_grads, lse.dtype, k, v, dk, dv, plan.ship, block_size=bs,
                                              scale=cfg.scale, key_real=plan.own_key_real, pg=cfg.pg, who=_WHO)
            dq_rows = dq_back.wait()
            dq = dq.reshape(-1, dq.shape[-1]).index_add(0, plan.ship.rows, dq_rows.to(dq.dtype)).view(dq.shape)
        if returning is not None:
            add_returned_gradients(returning.wait(), plan.exchange, dk, dv, bs)
        return dq, dk, dv, None, None


@torch.compiler.disable
def moba_attention_cp(
    q: Tensor, k: Tensor, v: Tensor, *, group=None, block_size: int, top_k: int, causal: bool = True,
    scale: float | None = None, enable_gqa: bool = False, layout: str = "contiguous", seq_len: int | None = None,
    check_ranks: bool = True, exchange: str = "auto", key_padding_mask: Tensor | None = None,
    backend: str = "auto",
) -> Tensor:
    """MoBA on a sequence sharded across `group`: equals `moba_attention` on the whole sequence.

    q, k `[B, Hq | Hkv, T_local, D]`, v `[B, Hkv, T_local, Dv]` (Dv may differ from D, as in
    multi-head latent attention): this rank's shard (`shard_sequence`),
    the same tokens for q and k/v (prefill / training). `group`: a ProcessGroup or 1-D
    DeviceMesh (default: the world), at least 2 ranks. `layout`: `contiguous` or `zigzag`
    (`layout.py`); blocks must not straddle ranks (`T_local`, or `T_local / 2` for zigzag, a
    multiple of `block_size`). `seq_len`: the real length when the sequence was padded at its
    end to align (padding keys are never attended, padding query rows are zero). Returns this
    rank's shard of the output, differentiable in q, k, v; every rank must run the backward.
    `check_ranks`: all-gather shapes and parameters first and fail on every rank if they differ
    (one tiny collective; turn off only when the caller guarantees it). `exchange`: how a selected
    remote block is reached: `auto` (per tile, whichever makes its owner send less), `keys` (fetch its
    key/value tile), `queries` (ship the query rows that selected it to its owner); the same
    output either way, every rank passing the same value. `key_padding_mask`: `[B, T_local]`, this
    rank's shard (`shard_sequence(mask, dim=1)`) of a padded batch's mask, True (or nonzero) for
    real tokens: the result is `moba_attention` with `attn_mask=mask[:, None, None, :]` on the
    whole sequence (hidden keys are never attended, blocks without a visible key are never
    candidates; a query that sees no key gets zeros). Every rank passes one or none. `backend`: the
    kernels of the local attention: `torch`, `triton` (CUDA, or CPU under the Triton interpreter),
    or `auto` (`triton` on CUDA where it supports the call, else `torch`); the same result.
    Under `torch.autocast` it computes as `moba_attention` does there (SDPA's rule: q, k, v in the
    autocast dtype, the attention itself with autocast off).
    """
    shipping.check_mode(exchange, _WHO)
    cast = autocast.active(q)
    if cast:
        q, k, v = autocast.cast_inputs(q, k, v)
    pg, lay = check_shards(_WHO, q, k, v, group=group, layout=layout, block_size=block_size, top_k=top_k, scale=scale,
                           enable_gqa=enable_gqa)
    lay.check_blocks(block_size, _WHO)
    seq_len = resolve_seq_len(seq_len, lay, _WHO)
    resolved = float(scale) if scale is not None else q.shape[-1] ** -0.5
    key_padding = check_key_padding(key_padding_mask, (q.shape[0], q.shape[2]), q.device, _WHO)
    if check_ranks:
        check_call_agreement(_WHO, pg, kind="moba", q=q, k=k, block_size=block_size, top_k=top_k, causal=causal,
                             layout=layout, seq_len=seq_len, scale=resolved, exchange=exchange,
                             key_padding=key_padding is not None)
    cfg = _Config(pg=pg, lay=lay, rank=dist.get_rank(pg), block_size=block_size, top_k=top_k, causal=bool(causal),
                  scale=resolved, seq_len=seq_len, exchange=exchange, backend=local_backend(backend, q, k, v))
    if cast:
        with torch.autocast(q.device.type, enabled=False):
            return _MobaCP.apply(q, k, v, cfg, key_padding)
    return _MobaCP.apply(q, k, v, cfg, key_padding)


_LOCAL_BACKENDS = ("auto", "torch", "triton")


def local_backend(name: str, q: Tensor, k: Tensor, v: Tensor) -> str:
    """The kernels of the local attention for `backend=name`: `torch` or `triton` (which must then be
    able to run the call here: a clear error if not)."""
    if name not in _LOCAL_BACKENDS:
        raise ValueError(f"{_WHO}: backend must be one of {', '.join(_LOCAL_BACKENDS)}, got {name!r}")
    resolved = resolve_backend(name, q.device, q, k, None, v=v)
    if resolved == "triton":
        reason = load_backend("triton").unsupported_reason(q, k, None, v)
        if reason is not None:
            raise ValueError(f"{_WHO}: backend 'triton' cannot run this call: {reason}")
    return resolved


def check_key_padding(mask: Tensor | None, shape: tuple[int, int], device, who: str) -> Tensor | None:
    """A `[B, T_local]` (`shape`) key padding mask as bool on `device` (True: a real key), or None."""
    if mask is None:
        return None
    if not isinstance(mask, Tensor) or mask.dim() != 2 or tuple(mask.shape) != tuple(shape):
        got = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"{who}: key_padding_mask must be [B, T_local] = {list(shape)} (this rank's shard of the "
                         f"batch's padding mask), got {got}")
    if mask.is_floating_point() or mask.is_complex():
        raise ValueError(f"{who}: key_padding_mask must be bool or integer (True / 1 for real tokens), got "
                         f"{mask.dtype}")
    return mask.to(device=device, dtype=torch.bool)
