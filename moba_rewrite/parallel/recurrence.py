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
  One all-gather of every chunk's `(A, S|0)` (`H x d_k x (d_k + d_v)` per sequence and chunk:
  independent of the chunk's length) gives every rank the state entering each of its chunks,
  `S_in(c) = A_{c-1} S_in(c-1) + S|0_{c-1}`, and the correction `(q_t^T A_t) S_in(c)`. The cost
  is about twice the rule's work on every rank but the first chunk's, all ranks at once;
  gradients flow back through the same all-gather.
* **The causal convolution** needs the last `kernel - 1` inputs of the preceding chunk: one
  all-gather of every chunk's tail, prepended before the convolution and cut off after it.

Both work on each chunk of a rank's shard (two chunks per rank in the `zigzag` layout), so any
layout works. `rule` and `conv` are the model's own functions (transformers' reference ones or
the flash-linear-attention kernels, same signature), called unchanged on each chunk.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from moba_rewrite.parallel.groups import collective
from moba_rewrite.parallel.layout import ShardLayout, _GatherShards, chunks_per_rank
from moba_rewrite.parallel.traffic import count as count_bytes

_WHO = "linear attention under context parallelism"


def _gather_chunks(per_chunk: list[Tensor], lay: ShardLayout, pg: dist.ProcessGroup, step: str) -> list[Tensor]:
    """Every chunk's tensor of the whole sequence, in sequence order, from each rank's list of its
    own chunks' tensors (same shape everywhere); differentiable (the backward sums gradients)."""
    everyone = _GatherShards.apply(torch.stack(per_chunk), pg, _WHO, step)  # [W, chunks per rank, ...]
    return [everyone[r, i] for r, i in lay.chunk_order()]


def _layout_of(t_local: int, layout: str, pg: dist.ProcessGroup) -> ShardLayout:
    if t_local % chunks_per_rank(layout):
        raise ValueError(f"{_WHO}: {t_local} tokens per rank cannot be cut into the {layout} layout's chunks")
    return ShardLayout(layout, dist.get_world_size(pg), t_local)


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
    tails = _gather_chunks([p[..., -halo:] for p in pieces], lay, pg, "convolution history")
    out = []
    for chunk, piece in zip(mine, pieces):
        before = tails[chunk - 1] if chunk > 0 else torch.zeros_like(piece[..., :halo])
        out.append(conv(torch.cat([before, piece], dim=-1))[..., halo:])
    return torch.cat(out, dim=-1) if len(out) > 1 else out[0]


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
    count_bytes("convolution state", buf.numel() * buf.element_size() * (dist.get_world_size(pg) - 1))
    return buf


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
    b, _, h_v, d_v = value.shape
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
        summaries.append(torch.cat([a, state], dim=-1))  # [B, H_v, d_k, d_k + d_v]
    every = _gather_chunks(summaries, lay, pg, "recurrent state summaries")
    needed = len(every) if final_state else max(mine) + 1
    entering = [torch.zeros(b, h_v, d_k, d_v, dtype=torch.float32, device=query.device)]
    for s in every[:needed]:
        entering.append(s[..., :d_k] @ entering[-1] + s[..., d_k:])
    outs = []
    for chunk, out, readout in zip(mine, zero_runs, transitions):
        if readout is not None:
            out = out + torch.einsum("bthk,bhkv->bthv", readout, entering[chunk])
        outs.append(out)
    out = torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]
    return out.to(query.dtype), (entering[-1] if final_state else None)
