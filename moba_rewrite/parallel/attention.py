"""`moba_attention_cp`: MoBA over a sequence sharded across the ranks of a process group.

Per call, on every rank (W ranks, this one holding `T_local` tokens = whole blocks):

1. the mean key of each of its blocks (over real tokens) is all-gathered: `[B, Hkv, n, D]` for
   the whole sequence, `n = W * T_local / block_size` (tiny next to K/V);
2. its queries are gated against every block at their global positions (`gate.py`);
3. per remote tile (batch, kv head, block) it picks the cheaper move (`exchange=`, `shipping.py`):
   fetch the tile, or ship the few query rows that selected it to the tile's owner; one index
   exchange tells every owner both (`exchange.py`), then one all-to-all moves the tiles and one
   the shipped rows, which their owners attend and answer with partial outputs and log-sum-exps;
4. it attends its own blocks plus the fetched ones with the `torch` backend's kernels or, on CUDA,
   the `triton` backend's (`backend=`), the selection given explicitly: k/v are compacted to
   `[fetched blocks | own blocks]`, so the queries are the newest tokens of the compact keys and
   the own block (with its causal diagonal) is where the kernels expect it; every other selected
   block is a complete history block (causal) or fully visible (non-causal), whatever its
   position; the shipped partials are merged in by log-sum-exp.

The backward recomputes nothing collective except returning dK/dV of fetched tiles to their
owners and, for shipped rows, sending their output gradients to the owners and dQ back.
Every rank of the group must call the forward and the backward.
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
from moba_rewrite.parallel.exchange import BlockExchange, fetch_blocks, plan_exchange, return_gradients
from moba_rewrite.parallel.gate import select_history
from moba_rewrite.parallel.groups import (all_gather_stacked, check_call_agreement, collective,
                                         resolve_group)
from moba_rewrite.parallel.layout import ShardLayout, check_layout, gather_key_mask, resolve_seq_len
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
    """This rank's attention problem: k/v as `[fetched blocks | own blocks]` and the selection in
    those slots, plus what the backward needs to send gradients home."""

    def __init__(self, q, k, v, cfg: _Config, key_padding: Tensor | None = None):
        lay, bs = cfg.lay, cfg.block_size
        dev = q.device
        self.blocks_of = torch.tensor([lay.blocks(r, bs) for r in range(lay.world)], device=dev)  # [W, nb]
        positions = lay.positions(cfg.rank, dev)
        self.query_real = positions < cfg.seq_len
        self.padded = not bool(self.query_real.all())
        self.local_keys = key_padding  # [B, T_local] bool or None
        self.global_keys = None if key_padding is None else gather_key_mask(key_padding, cfg.pg, lay.layout, _WHO)
        sel, fetched, tiles = self._route(q, k, v, positions, cfg)
        self._assemble(k, v, sel, fetched, tiles, cfg)

    def _route(self, q, k, v, positions: Tensor, cfg: _Config) -> tuple[Tensor, Tensor, Tensor | None]:
        """Gate against every block, exchange requests, fetch the tiles: (global selection, the
        global blocks fetched for any (batch, kv head), the received tiles or None)."""
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
            return sel, torch.empty(0, dtype=torch.long, device=dev), None
        world, nb = self.blocks_of.shape
        owner_of = torch.empty(n, dtype=torch.long, device=dev)
        owner_of[self.blocks_of.reshape(-1)] = torch.arange(world, device=dev).repeat_interleave(nb)
        counts, tile, remote = _remote_pair_counts(sel, k.shape[1], owner_of, cfg.rank, n)
        codes = shipping.choose(counts, cfg.exchange, block_size=bs, head_dim=q.shape[-1], value_dim=v.shape[-1],
                                itemsize=q.element_size())
        self.exchange = plan_exchange(codes, self.blocks_of, cfg.rank, cfg.pg, _WHO)
        tiles = fetch_blocks(k, v, self.exchange, bs, cfg.pg, _WHO)
        shipped = remote & (codes.view(-1)[tile] > 0)
        if cfg.exchange != "keys":  # every rank then joins the shipping collectives, empty or not
            local_of = torch.empty_like(owner_of)
            local_of[self.blocks_of.reshape(-1)] = torch.arange(nb, device=dev).repeat(world)
            self.ship = shipping.plan_units(shipped, sel, owner_of, local_of, hkv=k.shape[1], nb=nb, world=world,
                                            pg=cfg.pg, who=_WHO)
            sel = sel.masked_fill(shipped, -1)  # attended on their owners, not here
        return sel, (codes == shipping.FETCH).any(1).any(0).nonzero().squeeze(1), tiles

    def _assemble(self, k, v, sel: Tensor, fetched: Tensor, tiles: Tensor | None, cfg: _Config) -> None:
        """Compact k/v, the selection in compact slots, and the mask of hidden keys (alignment padding
        and the key padding mask; None when every key is visible)."""
        bs, n, dev = cfg.block_size, self.blocks_of.numel(), k.device
        b, hkv, _, d = k.shape
        own = self.blocks_of[cfg.rank]
        f, nb = fetched.numel(), own.numel()
        self.n_fetched = f
        self.slot_of = torch.full((n + 1,), -1, dtype=torch.long, device=dev)  # global block -> slot (n: none)
        self.slot_of[fetched] = torch.arange(f, device=dev)
        self.slot_of[own] = torch.arange(f, f + nb, device=dev)
        dv = v.shape[-1]
        self.k = k.new_zeros((b, hkv, (f + nb) * bs, d))
        self.v = v.new_zeros((b, hkv, (f + nb) * bs, dv))
        self.k[:, :, f * bs:] = k
        self.v[:, :, f * bs:] = v
        if tiles is not None and tiles.shape[0]:
            rb, rh, rj = self.exchange.recv_index
            slots = self.slot_of[rj]
            self.k.view(b, hkv, f + nb, bs, d)[rb, rh, slots] = tiles[..., :d]
            self.v.view(b, hkv, f + nb, bs, dv)[rb, rh, slots] = tiles[..., d:]
        self.selection = self.slot_of[torch.where(sel < 0, n, sel)]
        key_pos = (torch.cat([fetched, own])[:, None] * bs + torch.arange(bs, device=dev)).reshape(-1)
        real_keys = (key_pos < cfg.seq_len)[None]
        own_real = ((own[:, None] * bs + torch.arange(bs, device=dev)).reshape(-1) < cfg.seq_len)[None]
        if self.global_keys is not None:
            real_keys = real_keys & self.global_keys[:, key_pos]
            own_real = own_real & self.local_keys
        self.key_mask = None if bool(real_keys.all()) else real_keys[:, None, None, :]  # [1 | B, 1, 1, K]
        self.own_key_real = None if bool(own_real.all()) else own_real  # [1 | B, T_local], for shipped rows

    def zero_padding_rows(self, x: Tensor) -> Tensor:
        """Rows of padding queries set to zero (they are no part of the sequence)."""
        return x * self.query_real.view(1, 1, -1, 1).to(x.dtype) if self.padded else x


class _MobaCP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, cfg: _Config, key_padding: Tensor | None) -> Tensor:
        k, v = k.contiguous(), v.contiguous()
        plan = _Compact(q, k, v, cfg, key_padding)
        kw = dict(block_size=cfg.block_size, top_k=cfg.top_k, causal=cfg.causal, scale=cfg.scale,
                  attn_mask=plan.key_mask, selection=plan.selection)
        lse = None
        if cfg.backend == "triton":  # the backward needs the rows' log-sum-exp either way
            out, lse = load_backend("triton").forward_selected(
                q, plan.k, plan.v, plan.selection, block_size=cfg.block_size, causal=cfg.causal, scale=cfg.scale,
                attn_mask=plan.key_mask)
        elif plan.ship is None:
            out = torch_blocks.forward(q, plan.k, plan.v, **kw)
        else:
            out, lse = torch_blocks.forward(q, plan.k, plan.v, return_lse=True, **kw)
        if plan.ship is not None:
            part_out, part_lse = shipping.attend_shipped(
                q, k, v, plan.ship, block_size=cfg.block_size, scale=cfg.scale, key_real=plan.own_key_real,
                pg=cfg.pg, who=_WHO)
            out, lse = shipping.merge(out, lse, plan.ship.rows, part_out, part_lse)
        out = plan.zero_padding_rows(out)
        ctx.cfg, ctx.plan = cfg, plan
        ctx.save_for_backward(q, out, *(() if lse is None else (lse,)))
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        q, out, *lse = ctx.saved_tensors
        lse = lse[0] if lse else None
        cfg, plan = ctx.cfg, ctx.plan
        grad_out = plan.zero_padding_rows(grad_out.contiguous())
        if cfg.backend == "triton":
            dq, dk_c, dv_c = load_backend("triton").backward_selected(
                grad_out, q, plan.k, plan.v, out, plan.selection, lse, block_size=cfg.block_size, causal=cfg.causal,
                scale=cfg.scale, attn_mask=plan.key_mask)
        else:
            dq, dk_c, dv_c = torch_blocks.backward(
                grad_out, q, plan.k, plan.v, out, block_size=cfg.block_size, top_k=cfg.top_k, causal=cfg.causal,
                scale=cfg.scale, attn_mask=plan.key_mask, selection=plan.selection, lse=lse)
        bs, f = cfg.block_size, plan.n_fetched
        dk, dv = dk_c[:, :, f * bs:].contiguous(), dv_c[:, :, f * bs:].contiguous()
        if plan.ship is not None:
            own_k, own_v = plan.k[:, :, f * bs:], plan.v[:, :, f * bs:]
            dq_rows = shipping.backward_shipped(
                grad_out, out, lse, own_k, own_v, dk, dv, plan.ship, block_size=bs, scale=cfg.scale,
                key_real=plan.own_key_real, pg=cfg.pg, who=_WHO)
            dq = dq.reshape(-1, dq.shape[-1]).index_add(0, plan.ship.rows, dq_rows.to(dq.dtype)).view(dq.shape)
        if plan.exchange is not None:
            b, hkv, _, d = dk_c.shape
            rb, rh, rj = plan.exchange.recv_index
            slots = plan.slot_of[rj]
            grads = torch.cat([dk_c.view(b, hkv, -1, bs, d)[rb, rh, slots],
                               dv_c.view(b, hkv, -1, bs, dv_c.shape[-1])[rb, rh, slots]], dim=-1)
            return_gradients(grads, plan.exchange, dk, dv, bs, cfg.pg, _WHO)
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
