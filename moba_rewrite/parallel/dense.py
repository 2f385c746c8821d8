"""Ordinary (dense) attention over a sharded sequence, for the dense sites of hybrid policies.

Each rank all-gathers K and V (`W * T_local` tokens; the backward reduce-scatters dK/dV back to
their owners) and attends its queries at their global positions under an explicit mask. This is
the "all-gather" form of context parallelism (what Megatron-LM's and PyTorch's all-gather CP do);
PyTorch's own `context_parallel` does not run on CPU in torch 2.13 (no sharding rule for
`_scaled_dot_product_flash_attention_for_cpu`), and its ring needs DTensor-wrapped buffers. Cost:
K/V of the whole sequence on every rank; `parallel.ring.ring_attention_cp` computes the same
holding two shards at a time (what the model path runs at plain causal dense sites).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from moba_rewrite.parallel.attention import check_key_padding, check_shards
from moba_rewrite.parallel.groups import check_call_agreement
from moba_rewrite.parallel.layout import ShardLayout, gather_key_mask, gather_sequence, resolve_seq_len

_WHO = "sdpa_cp"


def gather_keys_values(k: Tensor, v: Tensor, pg: dist.ProcessGroup, layout: str, who: str = _WHO
                       ) -> tuple[Tensor, Tensor]:
    """K and V of the whole (padded) sequence in sequence order, from every rank's shard; differentiable.
    One all-gather, two when V has a head dim of its own (MLA)."""
    step = "all-gathered keys/values"
    if k.shape != v.shape:
        return (gather_sequence(k, pg, layout, dim=2, who=who, step=step),
                gather_sequence(v, pg, layout, dim=2, who=who, step=step))
    kv = gather_sequence(torch.stack([k, v]), pg, layout, dim=3, who=who, step=step)
    return kv[0], kv[1]


def in_causal_window(q_pos: Tensor, k_pos: Tensor, window: int) -> Tensor:
    """`[len(q_pos), len(k_pos)]` bool: key at or before the query and within its causal sliding
    window (transformers' `q - window < k <= q`)."""
    return (k_pos[None, :] <= q_pos[:, None]) & (q_pos[:, None] - k_pos[None, :] < window)


def visible_keys(lay: ShardLayout, rank: int, *, causal: bool, seq_len: int, device,
                 window: int | None = None) -> Tensor:
    """`[T_local, W * T_local]` bool: which keys of the whole sequence each local query may see
    (`window`: a causal sliding window, keys with `q - window < k <= q`)."""
    q_pos = lay.positions(rank, device)
    k_pos = torch.arange(lay.global_len, device=device)
    visible = (k_pos < seq_len)[None, :].expand(q_pos.numel(), -1)
    if window is not None:
        return visible & in_causal_window(q_pos, k_pos, window)
    return visible & (k_pos[None, :] <= q_pos[:, None]) if causal else visible


def checked_dense_call(who: str, q: Tensor, k: Tensor, v: Tensor, *, group, causal: bool, scale: float | None,
                       enable_gqa: bool, layout: str, seq_len: int | None, check_ranks: bool,
                       key_padding_mask: Tensor | None, padded: bool = False
                       ) -> tuple[dist.ProcessGroup, ShardLayout, int, float, Tensor | None]:
    """A dense attention call over a sharded sequence, checked (shards, layout, key padding mask;
    with `check_ranks`, every rank's call the same: `padded`, a key mask given another way):
    (group, layout, real length, scale, key padding mask as bool or None)."""
    pg, lay = check_shards(who, q, k, v, group=group, layout=layout, block_size=1, top_k=1, scale=scale,
                           enable_gqa=enable_gqa)
    seq_len = resolve_seq_len(seq_len, lay, who)
    resolved = float(scale) if scale is not None else q.shape[-1] ** -0.5
    key_padding = check_key_padding(key_padding_mask, (q.shape[0], q.shape[2]), q.device, who)
    if check_ranks:
        check_call_agreement(who, pg, kind="dense", q=q, k=k, block_size=0, top_k=0, causal=causal, layout=layout,
                             seq_len=seq_len, scale=resolved, key_padding=key_padding is not None or padded)
    return pg, lay, seq_len, resolved, key_padding


def sdpa_cp(q: Tensor, k: Tensor, v: Tensor, *, group=None, causal: bool = True, scale: float | None = None,
            enable_gqa: bool = False, layout: str = "contiguous", seq_len: int | None = None,
            check_ranks: bool = True, key_padding_mask: Tensor | None = None) -> Tensor:
    """`scaled_dot_product_attention` of this rank's queries over the whole sharded sequence.

    Same shard conventions as `moba_attention_cp` (q, k, v `[B, H, T_local, D]`, `layout`,
    `seq_len`, `key_padding_mask`); returns this rank's shard of the output (alignment padding rows
    zero)."""
    pg, lay, seq_len, resolved, key_padding = checked_dense_call(
        _WHO, q, k, v, group=group, causal=causal, scale=scale, enable_gqa=enable_gqa, layout=layout, seq_len=seq_len,
        check_ranks=check_ranks, key_padding_mask=key_padding_mask)
    k_all, v_all = gather_keys_values(k, v, pg, layout)
    rank = dist.get_rank(pg)
    mask = visible_keys(lay, rank, causal=causal, seq_len=seq_len, device=q.device)
    if key_padding is not None:
        mask = mask & gather_key_mask(key_padding, pg, layout, _WHO)[:, None, None, :]
    out = torch.nn.functional.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask, scale=resolved,
                                                           enable_gqa=enable_gqa)
    real = lay.positions(rank, q.device) < seq_len
    return out if bool(real.all()) else out * real.view(1, 1, -1, 1).to(out.dtype)
