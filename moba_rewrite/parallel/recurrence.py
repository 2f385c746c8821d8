"""Linear-attention layers over a sharded sequence: the gated delta rule's recurrent state and a
causal convolution's history carried across ranks, without running the ranks one after another.

Hybrid stacks (Qwen3-Next, Qwen3.5, OLMo-hybrid: gated delta nets between attention layers) mix
tokens outside attention. A shard run on its own would restart their state at every shard; a
relay (rank r waits for rank r-1's final state) would serialise the whole layer. Instead:

* **The gated delta rule** `S_t = (I - b_t k_t k_t^T) e^{g_t} S_{t-1} + b_t k_t v_t^T`,
  `o_t = q_t^T S_t` is affine in the chunk's initial state `S_0`: `S_t = A_t S_0 + S_t|0` and
  `o_t = o_t|0 + (q_t^T A_t) S_0`. Each rank runs the rule on each of its chunks twice, in
  parallel with every other rank: with `S_0 = 0` (the outputs and final state `S|0`), and with
  `S_0 = I` and zero values (`q_t^T A_t` as outputs, the chunk's transition `A` as final state).
  The chunks' summaries `(A, S|0)` (`H x d_k x (d_k + d_v)` per sequence and chunk: independent
  of the chunk's length) compose like affine maps, so a scan over the ranks gives every rank the
  state entering each of its chunks, `S_in(c) = A_{c-1} S_in(c-1) + S|0_{c-1}`, and the
  correction `(q_t^T A_t) S_in(c)`: by recursive doubling on a power-of-two group (`log2 W`
  exchanges of one summary per scan with one partner each; a 64-rank group sends 6 summaries per
  rank instead of receiving 63), else by one all-gather of every chunk's summary. The cost is
  about twice the rule's work on every rank but the first chunk's, all ranks at once; gradients
  flow back through the same exchanges.
* **The causal convolution** needs the last `kernel - 1` inputs of the preceding chunk: one
  all-gather of every chunk's tail, prepended before the convolution and cut off after it.

Both work on each chunk of a rank's shard (two chunks per rank in the `zigzag` layout), so any
layout works. Mamba-2's and Mamba-1's scans and RecurrentGemma's RG-LRU are carried the same way
(their transitions are decays: `ssd_scan_cp`, `selective_scan_cp`, `diagonal_scan_cp`). `rule`
and `conv` are the model's own functions (transformers' reference ones or the
flash-linear-attention kernels, same signature), called unchanged on each chunk.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from moba_rewrite.parallel.groups import collective, swap_with
from moba_rewrite.parallel.layout import ShardLayout, _GatherShards, chunks_per_rank, depend_on
from moba_rewrite.parallel.traffic import count as count_bytes

_WHO = "linear attention under context parallelism"
# the steps `parallel.record_traffic` counts for these layers (a backward adds " (gradients)")
SUMMARIES, HISTORY, CONV_STATE, FINAL_STATE = ("recurrent state summaries", "convolution history", "convolution state",
                                               "recurrent state after the prompt")
TRAFFIC_STEPS = (SUMMARIES, HISTORY, CONV_STATE, FINAL_STATE)
# Every entry point runs eagerly: a compiled model breaks its graph here (as at the sharded
# attention). Traced, the collectives would enter graphs that differ from rank to rank (rank 0 skips
# the transition of the sequence's first chunk), and the partitioner may move a collective whose
# gradient is a constant (the zero gradient of `depend_on`) into the forward on some ranks only:
# the ranks then wait in different collectives.
_EAGER = torch.compiler.disable
# Carry the recurrent state by recursive doubling on power-of-two groups (False: always the
# all-gather of every chunk's summary; benchmarks/bench_cp_recurrent.py compares the two)
SCAN_BY_DOUBLING = True


def _gather_chunks(per_chunk: list[Tensor], lay: ShardLayout, pg: dist.ProcessGroup, step: str) -> list[Tensor]:
    """Every chunk's tensor of the whole sequence, in sequence order, from each rank's list of its
    own chunks' tensors (same shape everywhere); differentiable (the backward sums gradients)."""
    everyone = _GatherShards.apply(torch.stack(per_chunk), pg, _WHO, step)  # [W, chunks per rank, ...]
    return [everyone[r, i] for r, i in lay.chunk_order()]


def _layout_of(t_local: int, layout: str, pg: dist.ProcessGroup) -> ShardLayout:
    if t_local % chunks_per_rank(layout):
        raise ValueError(f"{_WHO}: {t_local} tokens per rank cannot be cut into the {layout} layout's chunks")
    return ShardLayout(layout, dist.get_world_size(pg), t_local)


Affine = tuple[Tensor, Tensor]  # (transition T, offset b): the state after a chunk is `apply(T, entering) + b`


def _then(first: Affine | None, second: Affine | None, apply: Callable[[Tensor, Tensor], Tensor]) -> Affine | None:
    """The summary of running `first`, then `second` (None: no chunk)."""
    if first is None or second is None:
        return second if first is None else first
    return apply(second[0], first[0]), apply(second[0], first[1]) + second[1]


def _flat(parts: list[Tensor]) -> Tensor:
    return torch.cat([p.reshape(-1) for p in parts])


def _unflat(flat: Tensor, like: list[Tensor]) -> list[Tensor]:
    return [piece.view_as(t) for piece, t in zip(flat.split([t.numel() for t in like]), like)]


class _Swap(torch.autograd.Function):
    """This rank's `x` for its partner's (same shape); the backward swaps the gradients back."""

    @staticmethod
    def forward(ctx, x: Tensor, partner: int, pg: dist.ProcessGroup) -> Tensor:
        ctx.partner, ctx.pg = partner, pg
        count_bytes(SUMMARIES, x.numel() * x.element_size())
        with collective(_WHO, "the exchange of recurrent state summaries", pg):
            return swap_with(x, partner, pg)

    @staticmethod
    def backward(ctx, grad: Tensor):
        count_bytes(f"{SUMMARIES} (gradients)", grad.numel() * grad.element_size())
        with collective(_WHO, "the exchange of recurrent state summaries' gradients", ctx.pg):
            return swap_with(grad, ctx.partner, ctx.pg), None, None


def _scan_by_doubling(scans: list[tuple[Affine, bool]], pg: dist.ProcessGroup,
                      apply: Callable[[Tensor, Tensor], Tensor]) -> tuple[list[tuple[Affine | None, Affine]], list[Tensor]]:
    """Exclusive and total scans over the ranks (a power of two), by recursive doubling: for each
    `(this rank's summary, reversed)` in `scans`, the composition of the summaries of the ranks
    before this one (rank order, or reversed order: higher ranks first; None on the first) and of
    every rank's. `log2(W)` rounds, each one swap of every scan's running total with the rank whose
    number differs in one bit (a hypercube scan): each rank sends `log2(W)` summaries instead of
    receiving `W - 1`. Also returns the received tensors (every one must reach the result)."""
    rank, world = dist.get_rank(pg), dist.get_world_size(pg)
    state = [[None, mine] for mine, _ in scans]  # [exclusive, total of this rank's block]
    received = []
    bit = 1
    while bit < world:
        partner = rank ^ bit
        totals = [t for _, total in state for t in total]
        got = _Swap.apply(_flat(totals), partner, pg)
        received.append(got)
        theirs = _unflat(got, totals)
        for i, (_, reversed_order) in enumerate(scans):
            other = (theirs[2 * i], theirs[2 * i + 1])
            if (partner > rank) == reversed_order:  # the partner's block comes first
                state[i] = [_then(other, state[i][0], apply), _then(other, state[i][1], apply)]
            else:
                state[i][1] = _then(state[i][1], other, apply)
        bit <<= 1
    return [(exclusive, total) for exclusive, total in state], received


def _entering_states(summaries: list[Affine], lay: ShardLayout, pg: dist.ProcessGroup, mine: list[int],
                     final_state: bool, apply: Callable[[Tensor, Tensor], Tensor]
                     ) -> tuple[dict[int, Tensor], Tensor | None, list[Tensor]]:
    """The state entering each of this rank's chunks (`{chunk: state}`) and, with `final_state`, the
    state after the whole sequence, from every chunk's summary (this rank's `summaries`, one per
    local chunk; the first chunk's transition is never applied: it may be anything) and a zero
    state before the sequence. Also returns the exchanged tensors, on which the result must depend
    (`depend_on`), so that every rank joins every exchange of the backward.

    On a power-of-two group, a scan by recursive doubling (`_scan_by_doubling`): the contiguous
    layout's chunks are in rank order; the zigzag layout's first chunks too and its second chunks
    in reversed rank order after them, so one scan of each, side by side, gives every entering
    state. Otherwise one all-gather of every chunk's summary and a walk over the sequence."""
    zero = torch.zeros_like(summaries[0][1])

    def entering_with(before: Affine | None) -> Tensor:
        return zero if before is None else before[1]

    world = dist.get_world_size(pg)
    if SCAN_BY_DOUBLING and world & (world - 1) == 0:
        scans = [(summaries[0], False)] + ([(summaries[1], True)] if len(mine) > 1 else [])
        (first, *second), received = _scan_by_doubling(scans, pg, apply)
        entering = {mine[0]: entering_with(first[0])}
        if not second:
            return entering, (first[1][1] if final_state else None), received
        after_first_half = first[1][1]
        (before, total), = second
        entering[mine[1]] = after_first_half if before is None else apply(before[0], after_first_half) + before[1]
        return entering, (apply(total[0], after_first_half) + total[1] if final_state else None), received
    every = _gather_chunks([_flat(s) for s in summaries], lay, pg, SUMMARIES)
    entering, state = {}, zero
    for chunk, flat in enumerate(every[:len(every) if final_state else max(mine) + 1]):
        if chunk in mine:
            entering[chunk] = state
        transition, offset = _unflat(flat, list(summaries[0]))
        state = apply(transition, state) + offset
    return entering, (state if final_state else None), every[:1]


def _state_after(seq_len: int, lay: ShardLayout, pg: dist.ProcessGroup, like: Tensor,
                 on_owner: Callable[[int, int, int], Tensor]) -> Tensor:
    """The state after the sequence's first `seq_len` tokens, on every rank: the rank holding token
    `seq_len - 1` computes it (`on_owner(its local chunk index, the chunk, tokens of the chunk)`) and
    broadcasts it (for decoding's prefill: not differentiable)."""
    c = lay.chunk_len
    last = (seq_len - 1) // c
    owner, index = lay.chunk_order()[last]
    state = torch.empty_like(like)
    if dist.get_rank(pg) == owner:
        state = on_owner(index, last, seq_len - last * c).detach().contiguous()
    with collective(_WHO, "the broadcast of the state after the prompt", pg):
        dist.broadcast(state, src=dist.get_global_rank(pg, owner), group=pg)
    count_bytes(FINAL_STATE, state.numel() * state.element_size())
    return state


@_EAGER
def causal_conv_cp(conv: Callable[[Tensor], Tensor], x: Tensor, *, kernel_size: int, pg: dist.ProcessGroup,
                   layout: str) -> Tensor:
    """`conv` (a causal convolution over `[B, C, T]` starting from zero history, output as long as
    its input) on this rank's shard `x` `[B, C, T_local]`, each chunk continuing the inputs of the
    chunk before it in the whole sequence."""
    lay = _layout_of(x.shape[-1], layout, pg)
    halo = kernel_size - 1
    if halo == 0:
        return conv(x)
    c = lay.chunk_len
    if c < halo:
        raise ValueError(f"{_WHO}: a chunk of {c} tokens is shorter than the convolution's history of {halo} "
                         f"inputs; shard longer sequences")
    mine = lay.chunks(dist.get_rank(pg))
    pieces = [x.narrow(-1, i * c, c) for i in range(len(mine))]
    tails = _gather_chunks([p[..., -halo:] for p in pieces], lay, pg, HISTORY)
    out = []
    for chunk, piece in zip(mine, pieces):
        before = tails[chunk - 1] if chunk > 0 else torch.zeros_like(piece[..., :halo])
        out.append(conv(torch.cat([before, piece], dim=-1))[..., halo:])
    return depend_on(torch.cat(out, dim=-1) if len(out) > 1 else out[0], tails[0])


@_EAGER
def last_inputs(x: Tensor, count: int, *, seq_len: int, pg: dist.ProcessGroup, layout: str) -> Tensor:
    """The inputs at positions `[seq_len - count, seq_len)` of the whole sequence `[B, C, count]`
    (zeros before position 0), on every rank, from each rank's shard `x` `[B, C, T_local]` (one
    all-reduce of `B x C x count`; not differentiable): a causal convolution's state after the
    sequence's real tokens, for decoding."""
    lay = _layout_of(x.shape[-1], layout, pg)
    at = lay.positions(dist.get_rank(pg), x.device) - (seq_len - count)
    inside = (at >= 0) & (at < count)
    buf = x.new_zeros((*x.shape[:-1], count))
    buf[..., at[inside]] = x[..., inside]
    with collective(_WHO, "the all-reduce of the convolution's last inputs", pg):
        dist.all_reduce(buf, group=pg)
    count_bytes(CONV_STATE, buf.numel() * buf.element_size() * (dist.get_world_size(pg) - 1))
    return buf


@_EAGER
def delta_rule_cp(rule: Callable, query: Tensor, key: Tensor, value: Tensor, g: Tensor, beta: Tensor, *,
                  pg: dist.ProcessGroup, layout: str, final_state: bool = False, seq_len: int | None = None,
                  **rule_kwargs) -> tuple[Tensor, Tensor | None]:
    """The gated delta rule `rule` (flash-linear-attention's signature: `query`/`key` `[B, T, H_k, d_k]`,
    `value` `[B, T, H_v, d_v]`, `g`/`beta` `[B, T, H_v]`, returning `(output, final state)`) over the
    whole sequence, of which these are this rank's shard, starting from a zero state.

    Returns this rank's outputs `[B, T_local, H_v, d_v]` (the dtype of `query`) and, with
    `final_state`, the state after the sequence's first `seq_len` tokens (default all; the padding
    after them leaves it unchanged: `g = beta = 0` there) `[B, H_v, d_k, d_v]` (fp32, the same on
    every rank)."""
    lay = _layout_of(query.shape[1], layout, pg)
    c = lay.chunk_len
    mine = lay.chunks(dist.get_rank(pg))
    if final_state and seq_len is not None and seq_len < lay.global_len:
        real = lay.positions(dist.get_rank(pg), query.device) < seq_len
        g = g.masked_fill(~real.view(1, -1, *[1] * (g.dim() - 2)), 0)  # [B, T, H] or per channel [B, T, H, d_k]
        beta = beta.masked_fill(~real.view(1, -1, *[1] * (beta.dim() - 2)), 0)
    b, _, h_v, _ = value.shape
    d_k = key.shape[-1]
    eye = torch.eye(d_k, dtype=torch.float32, device=query.device).expand(b, h_v, d_k, d_k).contiguous()
    parts = [[x.narrow(1, i * c, c).float() for x in (query, key, value, g, beta)] for i in range(len(mine))]
    zero_runs, transitions, summaries = [], [], []
    for chunk, (q, k, v, gi, bi) in zip(mine, parts):
        out, state = rule(q, k, v, g=gi, beta=bi, initial_state=None, output_final_state=True, **rule_kwargs)
        zero_runs.append(out)
        if chunk == 0:  # nothing enters the first chunk: its transition is never needed
            transitions.append(None)
            a = torch.zeros_like(eye)
        else:
            readout, a = rule(q, k, torch.zeros_like(v[..., :1]).expand(*v.shape[:-1], d_k), g=gi, beta=bi,
                              initial_state=eye, output_final_state=True, **rule_kwargs)
            transitions.append(readout)  # q_t^T A_t  [B, c, H_v, d_k]
        summaries.append((a, state))  # [B, H_v, d_k, d_k], [B, H_v, d_k, d_v]
    entering, final, received = _entering_states(summaries, lay, pg, mine, final_state, torch.matmul)
    outs = []
    for chunk, out, readout in zip(mine, zero_runs, transitions):
        if readout is not None:
            out = out + torch.einsum("bthk,bhkv->bthv", readout, entering[chunk])
        outs.append(out)
    out = depend_on(torch.cat(outs, dim=1) if len(outs) > 1 else outs[0], *received)
    return out.to(query.dtype), final


@_EAGER
def ssd_scan_cp(scan: Callable, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, *, pg: dist.ProcessGroup,
                layout: str, final_state: bool = False, seq_len: int | None = None, **scan_kwargs
                ) -> Tensor | tuple[Tensor, Tensor]:
    """Mamba-2's chunked scan `scan` (mamba_ssm's `mamba_chunk_scan_combined` signature: `x`
    `[B, T, H, P]`, `dt` `[B, T, H]`, `A` `[H]`, `B`/`C` `[B, T, G, N]`, keyword `initial_states`,
    `return_final_states`, `D`, `dt_bias`, ...) over the whole sequence, of which these are this
    rank's shard, from a zero state.

    The state `h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T` decays by one scalar per head, so a
    chunk's transition is `a = exp(A sum_t dt_t)` per head (`dt` as the scan discretises it:
    `dt_bias`, softplus, `dt_limit`): each rank runs the scan on each of its chunks from zero
    (outputs, final state `h|0`), a scan over the ranks of every chunk's `(a, h|0)` gives the state
    entering each chunk (`_entering_states`), and a scan with no input from that state (`C_t a_{1..t} h_in`, any gating
    applied) corrects the outputs. Returns this rank's outputs and, with `final_state`,
    the state after the first `seq_len` tokens (default all) `[B, H, P, N]`, on every rank (not
    differentiable when `seq_len` cuts the last chunk: it serves decoding)."""
    lay = _layout_of(x.shape[1], layout, pg)
    c = lay.chunk_len
    rank = dist.get_rank(pg)
    mine = lay.chunks(rank)
    parts = [[t.narrow(1, i * c, c) for t in (x, dt, B, C)] for i in range(len(mine))]
    step = dt.float() + (scan_kwargs["dt_bias"].float() if scan_kwargs.get("dt_bias") is not None else 0)
    if scan_kwargs.get("dt_softplus"):
        step = torch.nn.functional.softplus(step)
    low, high = scan_kwargs.get("dt_limit", (0.0, float("inf")))
    step = step.clamp(min=low, max=high)  # [B, T, H], as the scan discretises it
    zero_outs, summaries = [], []
    for i, (xi, dti, bi, ci) in enumerate(parts):
        out, state = scan(xi, dti, A, bi, ci, initial_states=None, return_final_states=True, **scan_kwargs)
        decay = torch.exp(A.float() * step.narrow(1, i * c, c).sum(1)).to(state.dtype)  # [B, H]
        zero_outs.append(out)
        summaries.append((decay[:, :, None, None], state))  # [B, H, 1, 1], [B, H, P, N]
    entering, final, received = _entering_states(summaries, lay, pg, mine, final_state, torch.mul)
    outs = []
    for chunk, out, (xi, dti, bi, ci) in zip(mine, zero_outs, parts):
        if chunk > 0:
            out = out + scan(torch.zeros_like(xi), dti, A, bi, ci, initial_states=entering[chunk],
                             return_final_states=False, **scan_kwargs)
        outs.append(out)
    out = depend_on(torch.cat(outs, dim=1) if len(outs) > 1 else outs[0], *received)
    if not final_state:
        return out
    if seq_len is None or seq_len >= lay.global_len:
        return out, final

    def up_to(index: int, chunk: int, k: int) -> Tensor:  # the chunk's first k tokens, from its entering state
        xi, dti, bi, ci = (t.narrow(1, 0, k) for t in parts[index])
        return scan(xi, dti, A, bi, ci, initial_states=entering[chunk], return_final_states=True, **scan_kwargs)[1]
    return out, _state_after(seq_len, lay, pg, final, up_to)


@_EAGER
def selective_scan_cp(scan: Callable, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, *,
                      pg: dist.ProcessGroup, layout: str, D: Tensor | None = None, z: Tensor | None = None,
                      delta_bias: Tensor | None = None, delta_softplus: bool = False, final_state: bool = False,
                      seq_len: int | None = None, **scan_kwargs) -> Tensor | tuple[Tensor, Tensor]:
    """Mamba-1's selective scan `scan` (mamba_ssm's `selective_scan_fn` signature: `u`/`delta`
    `[B, D, T]`, `A` `[D, N]`, `B`/`C` `[B, N, T]`, keyword `D`, `z`, `delta_bias`, `delta_softplus`,
    `return_last_state`; no initial state) over the whole sequence, of which these are this rank's
    shard, from a zero state.

    The state `h_t = exp(dt_t A) * h_{t-1} + dt_t u_t B_t` decays per channel and state entry, so
    the state entering a chunk reaches its outputs as `C_t . (exp(A cumsum(dt))_t * h_in)`, gated
    like the scan's output (`silu(z)`). Each rank scans each of its chunks from zero (outputs,
    final state), a scan over the ranks of every chunk's `(exp(A sum(dt)), final state)` gives the state
    entering each chunk, and the correction above is added. Returns this rank's outputs and, with
    `final_state`, the state after the first `seq_len` tokens (default all) `[B, D, N]` (fp32),
    on every rank."""
    lay = _layout_of(u.shape[-1], layout, pg)
    c = lay.chunk_len
    rank = dist.get_rank(pg)
    mine = lay.chunks(rank)
    dt = delta.float() + (delta_bias.float()[..., None] if delta_bias is not None else 0)
    if delta_softplus:
        dt = torch.nn.functional.softplus(dt)
    kwargs = dict(D=D, delta_bias=delta_bias, delta_softplus=delta_softplus, **scan_kwargs)
    pieces = []  # (u, delta, B, C, z) of each local chunk
    zero_outs, summaries, decays = [], [], []
    for i in range(len(mine)):
        piece = [t.narrow(-1, i * c, c) if t is not None else None for t in (u, delta, B, C, z)]
        out, state = scan(piece[0], piece[1], A, piece[2], piece[3], z=piece[4], return_last_state=True, **kwargs)
        decay = torch.exp(A.float()[None, :, None, :] * dt.narrow(-1, i * c, c).cumsum(-1)[..., None])  # [B, D, c, N]
        pieces.append(piece)
        zero_outs.append(out)
        decays.append(decay)
        summaries.append((decay[:, :, -1], state.float()))  # [B, D, N] each
    entering, final, received = _entering_states(summaries, lay, pg, mine, final_state, torch.mul)
    outs = []
    for chunk, out, decay, piece in zip(mine, zero_outs, decays, pieces):
        if chunk > 0:
            carried = torch.einsum("bdtn,bdn,bnt->bdt", decay, entering[chunk], piece[3].float())
            if piece[4] is not None:
                carried = carried * torch.nn.functional.silu(piece[4].float())
            out = (out.float() + carried).to(out.dtype)
        outs.append(out)
    out = depend_on(torch.cat(outs, dim=-1) if len(outs) > 1 else outs[0], *received)
    if not final_state:
        return out
    if seq_len is None or seq_len >= lay.global_len:
        return out, final

    def up_to(index: int, chunk: int, k: int) -> Tensor:  # the chunk's first k tokens from zero, plus what entered
        uk, dk, bk, ck, zk = (t.narrow(-1, 0, k) if t is not None else None for t in pieces[index])
        _, alone = scan(uk, dk, A, bk, ck, z=zk, return_last_state=True, **kwargs)
        return decays[index][:, :, k - 1] * entering[chunk] + alone.float()
    return out, _state_after(seq_len, lay, pg, final, up_to)


@_EAGER
def diagonal_scan_cp(scan: Callable, x: Tensor, a: Tensor, reset: Tensor, *, pg: dist.ProcessGroup, layout: str,
                     seq_len: int | None = None) -> tuple[Tensor, Tensor | None]:
    """A linear recurrence with a diagonal transition per step, `h_t = a_t * h_{t-1} + x_t`, cut
    where `reset` (`a_t` taken as 0 there), from a zero state: RecurrentGemma's RG-LRU scan `scan`
    (`scan(x, a, reset, None)` with `x`, `a` `[B, T, D]` and `reset` `[B, T, 1]` bool, returning the
    outputs and the final state `[B, D]`) over the whole sequence, of which these are this rank's
    shard. Each rank scans its chunks from zero; a chunk's transition is the product of its `a`,
    the state entering it comes from the scan over the ranks (`_entering_states`), and reaches
    its outputs as `cumprod(a)_t * h_in`. Returns this rank's outputs and the state after the whole
    sequence (fp32, on every rank; None when `seq_len` says the shards end in alignment padding)."""
    lay = _layout_of(x.shape[1], layout, pg)
    c = lay.chunk_len
    mine = lay.chunks(dist.get_rank(pg))
    zero_outs, decays, summaries = [], [], []
    for i in range(len(mine)):
        xi, ai, ri = (t.narrow(1, i * c, c) for t in (x, a, reset))
        out, state = scan(xi, ai, ri, None)
        decay = torch.cumprod((ai * ~ri).float(), dim=1)  # [B, c, D]: what the entering state is multiplied by
        zero_outs.append(out)
        decays.append(decay)
        summaries.append((decay[:, -1], state.float()))
    entering, final, received = _entering_states(summaries, lay, pg, mine, True, torch.mul)
    outs = []
    for chunk, out, decay in zip(mine, zero_outs, decays):
        if chunk > 0:
            out = (out.float() + decay * entering[chunk][:, None]).to(out.dtype)
        outs.append(out)
    out = depend_on(torch.cat(outs, dim=1) if len(outs) > 1 else outs[0], *received)
    return out, (final if seq_len is None or seq_len >= lay.global_len else None)
