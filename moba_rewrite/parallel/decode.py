"""`moba_decode_cp`: MoBA decoding against a KV cache sharded across the ranks of a group.

The cache is cut contiguously: rank r holds cache positions `[r * S, (r + 1) * S)` (`S` the
per-rank capacity, a multiple of `block_size`), filled up to the global length `seq_len`; the
newest `Tq` queries (positions `seq_len - Tq .. seq_len - 1`, their keys already appended by the
caller to the owning rank's cache) are the same on every rank. Per call:

1. each rank gates the queries against its own complete blocks and keeps its best `top_k - 1`
   candidates (score and global block index);
2. the candidates are all-gathered and every rank merges them into the global top `top_k - 1`
   (higher score first, the lower block index on exact ties, as the single-process gate);
3. each rank attends the queries over the selected blocks it holds (plus the own block, causally,
   where it holds it) and returns a partial output with its log-sum-exp;
4. the partials are all-gathered and combined by log-sum-exp.

Bytes per rank and call: `W x B x Hq x Tq x (top_k - 1) x 8` for the candidates (fp32 score and
int32 block id, one all-gather) plus `W x B x Hq x Tq x (D + 1) x 4` for the partials, plus the
all-ranks-agree check unless `check_ranks=False`: independent of the context length. Inference
only (no autograd). The result, on every rank, equals `moba_attention` on the filled cache.

`sdpa_decode_cp` is the dense counterpart (full causal attention, optionally within a causal
sliding window): steps 3 and 4 over every filled slot a query sees, for the dense sites of hybrid
policies and sliding-window layers; a windowed call reads only the window's slots.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from moba_rewrite.attention.functional import validate
from moba_rewrite.kernels.reference import compute_dtype, repeat_kv
from moba_rewrite.parallel.attention import check_key_padding
from moba_rewrite.parallel.dense import in_causal_window
from moba_rewrite.parallel.groups import (all_gather_stacked, check_same_on_all_ranks, collective, float_bits,
                                         resolve_group)
from moba_rewrite.parallel.traffic import count

_WHO = "moba_decode_cp"


def _local_candidates(q: Tensor, k: Tensor, *, first_block: int, own: Tensor, filled: int, block_size: int,
                      picks: int, means: Tensor | None = None,
                      key_visible: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Best `picks` complete local blocks before each query's own block: (scores, global ids), -inf / -1
    padded. `means`: the local blocks' means if the caller keeps them (only complete blocks are read);
    `key_visible` `[B, S]`: a key padding mask (blocks without a visible key are no candidates)."""
    b, hq, tq, d = q.shape
    nb = k.shape[2] // block_size
    ct = compute_dtype(q.dtype)
    counts = (filled - torch.arange(nb, device=q.device) * block_size).clamp(0, block_size)  # real keys per block
    if means is None:
        sums = k.reshape(b, k.shape[1], nb, block_size, d).to(ct)
        real = (torch.arange(nb * block_size, device=q.device) < filled).view(nb, block_size, 1)
        means = (sums * real).sum(3) / counts.clamp(min=1).to(ct)[:, None]
    gate = q.to(ct) @ repeat_kv(means.to(ct), hq).transpose(-1, -2)  # [B, Hq, Tq, nb]
    ids = first_block + torch.arange(nb, device=q.device)
    candidate = (ids[None, :] < own[:, None]) & (counts == block_size)[None, :]
    if key_visible is not None:
        candidate = candidate[None, None] & key_visible.view(b, nb, block_size).any(-1)[:, None, None, :]
    gate = gate.masked_fill(~candidate | gate.isnan(), float("-inf"))
    n = min(picks, nb)
    scores = torch.full((b, hq, tq, picks), float("-inf"), dtype=ct, device=q.device)
    index = torch.full((b, hq, tq, picks), -1, dtype=torch.long, device=q.device)
    for p in range(n):
        best, idx = gate.max(-1, keepdim=True)  # first maximum: the lower block on exact ties
        found = best > float("-inf")
        scores[..., p:p + 1] = best
        index[..., p:p + 1] = torch.where(found, ids[idx], -1)
        gate.scatter_(-1, idx, float("-inf"))
    return scores, index


def _merge(scores: Tensor, index: Tensor, picks: int) -> Tensor:
    """Global top `picks` of all ranks' candidates (`[W, ..., picks]`): `[..., picks]` block ids, -1 = none."""
    s = scores.movedim(0, -2).flatten(-2)  # [..., W * picks]
    i = index.movedim(0, -2).flatten(-2)
    # Higher score first; on equal scores the lower block index (ids are distinct across ranks).
    order = torch.argsort(i.masked_fill(i < 0, torch.iinfo(torch.long).max), dim=-1, stable=True)
    s, i = s.gather(-1, order), i.gather(-1, order)
    order = torch.argsort(s, dim=-1, descending=True, stable=True)[..., :picks]
    s, i = s.gather(-1, order), i.gather(-1, order)
    return torch.where(s > float("-inf"), i, -1)


def _partial_attention(q: Tensor, k: Tensor, v: Tensor, selected: Tensor, *, first_block: int, positions: Tensor,
                       filled: int, block_size: int, scale: float,
                       key_visible: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """This rank's share: attention over the selected blocks it holds and the own block's causal
    prefix, reading only those blocks' keys and values; (output normalised over this share, its
    log-sum-exp; -inf where the share is empty)."""
    b, hq, tq, d = q.shape
    hkv, s_cap = k.shape[1], k.shape[2]
    ct = compute_dtype(q.dtype)
    dev = q.device
    nb = s_cap // block_size
    if selected.shape[-1] + 1 >= nb:  # as many blocks per row as the slice holds (dense limit): read it all
        return _slice_attention(q, k, v, selected, first_block=first_block, positions=positions, filled=filled,
                                block_size=block_size, scale=scale, key_visible=key_visible)
    own = (positions // block_size)[None, None, :, None].expand(b, hq, tq, 1)
    blocks = torch.cat([selected, own], dim=-1) - first_block  # local block per slot, [B, Hq, Tq, picks + 1]
    held = (blocks >= 0) & (blocks < nb)
    slots = blocks.clamp(0, nb - 1)[..., None] * block_size + torch.arange(block_size, device=dev)  # [.., P+1, bs]
    key_pos = first_block * block_size + slots
    visible = held[..., None] & (key_pos <= positions[:, None, None]) & (slots < filled)
    slots, visible = slots.flatten(-2), visible.flatten(-2)  # [B, Hq, Tq, W]
    if key_visible is not None:
        visible &= key_visible[:, None, None, :].expand(b, hq, tq, s_cap).gather(-1, slots)
    kv_head = torch.arange(hq, device=dev) // (hq // hkv)
    base = (torch.arange(b, device=dev)[:, None] * hkv + kv_head[None, :]) * s_cap  # [B, Hq]
    rows = (slots + base[:, :, None, None]).reshape(-1)
    keys = k.reshape(-1, d).index_select(0, rows).view(*slots.shape, d).to(ct)
    values = v.reshape(-1, v.shape[-1]).index_select(0, rows).view(*slots.shape, v.shape[-1]).to(ct)
    # [1, D] x [D, W] per row ([W, D] x [D, 1] is bmm's slow n = 1 path on CPU)
    scores = (q.to(ct)[..., None, :] @ keys.transpose(-1, -2)).squeeze(-2) * scale  # [B, Hq, Tq, W]
    weights, lse = _softmax(scores.masked_fill(~visible, float("-inf")))
    return (weights[..., None, :] @ values).squeeze(-2), lse


def _softmax(scores: Tensor) -> tuple[Tensor, Tensor]:
    """(softmax weights over the last dim, its log-sum-exp); all-zero weights and -inf where a row
    sees nothing."""
    lse = torch.logsumexp(scores, dim=-1)
    return torch.exp(scores - torch.where(lse > float("-inf"), lse, 0.0)[..., None]), lse


def _slice_attention(q: Tensor, k: Tensor, v: Tensor, selected: Tensor, *, first_block: int, positions: Tensor,
                     filled: int, block_size: int, scale: float,
                     key_visible: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """`_partial_attention` over the whole slice under a mask (when rows select every block it holds)."""
    hq = q.shape[1]
    ct = compute_dtype(q.dtype)
    s_cap = k.shape[2]
    key_pos = first_block * block_size + torch.arange(s_cap, device=q.device)
    key_block = key_pos // block_size
    chosen = (key_block[None, None, None, :] == selected[..., None]).any(-2)  # [B, Hq, Tq, S]
    chosen |= key_block[None, :] == (positions // block_size)[:, None]
    visible = chosen & (key_pos[None, :] <= positions[:, None]) & (torch.arange(s_cap, device=q.device) < filled)
    if key_visible is not None:
        visible = visible & key_visible[:, None, None, :]
    scores = (q.to(ct) @ repeat_kv(k, hq).to(ct).transpose(-1, -2)) * scale
    weights, lse = _softmax(scores.masked_fill(~visible, float("-inf")))
    return weights @ repeat_kv(v, hq).to(ct), lse


@torch.no_grad()
def moba_decode_cp(q: Tensor, k_local: Tensor, v_local: Tensor, *, seq_len: int, group=None, block_size: int,
                   top_k: int, scale: float | None = None, enable_gqa: bool = False, check_ranks: bool = True,
                   key_block_means: Tensor | None = None, key_padding_mask: Tensor | None = None) -> Tensor:
    """MoBA for the newest `Tq` tokens against a contiguously sharded KV cache (see the module doc).

    q `[B, Hq, Tq, D]` (the same on every rank); k_local `[B, Hkv, S, D]` / v_local `[B, Hkv, S, Dv]`:
    this rank's cache slots (positions `[rank * S, (rank + 1) * S)`), `S % block_size == 0`; `seq_len`:
    filled length of the whole cache, the queries being its last `Tq` tokens. `key_block_means`:
    `[B, Hkv, S / block_size, D]`, the means of this rank's blocks if the caller keeps them beside
    its cache (complete blocks must be current; the gate then reads no keys); else they are
    computed from `k_local`. Only the selected blocks' keys and values are read.
    `key_padding_mask`: `[B, S]`, this rank's slots of a padded batch's mask (True / 1: a real
    token): the result is `moba_attention` on the filled cache with `attn_mask=mask[:, None, None, :]`
    (every rank passes one or none). Returns `[B, Hq, Tq, Dv]` on every rank."""
    pg = _check_call(_WHO, q, k_local, v_local, seq_len=seq_len, group=group, block_size=block_size, top_k=top_k,
                     scale=scale, enable_gqa=enable_gqa)
    world, rank = dist.get_world_size(pg), dist.get_rank(pg)
    s_cap, tq = k_local.shape[2], q.shape[2]
    if s_cap % block_size:
        raise ValueError(f"{_WHO}: blocks would straddle ranks: the per-rank cache capacity {s_cap} is not a multiple "
                         f"of block_size={block_size}")
    resolved = float(scale) if scale is not None else q.shape[-1] ** -0.5
    want = (*k_local.shape[:2], s_cap // block_size, k_local.shape[3])
    if key_block_means is not None and tuple(key_block_means.shape) != want:
        raise ValueError(f"{_WHO}: key_block_means must be [B, Hkv, S / block_size, D] = {list(want)}, got "
                         f"{list(key_block_means.shape)}")
    key_visible = check_key_padding(key_padding_mask, (q.shape[0], s_cap), q.device, _WHO)
    if check_ranks:
        check_same_on_all_ranks(_WHO, pg, {"batch size": q.shape[0], "query heads": q.shape[1],
                                           "key/value heads": k_local.shape[1], "head dim": q.shape[3], "Tq": tq,
                                           "cache slots per rank": s_cap, "seq_len": seq_len,
                                           "block_size": block_size, "top_k": top_k,
                                           "whether a key padding mask is given": int(key_visible is not None)},
                                q.device)
    first_block = rank * s_cap // block_size
    filled = min(max(seq_len - rank * s_cap, 0), s_cap)
    positions = torch.arange(seq_len - tq, seq_len, device=q.device)
    picks = top_k - 1
    selected = torch.empty((*q.shape[:3], 0), dtype=torch.long, device=q.device)
    if picks > 0:
        scores, index = _local_candidates(q, k_local, first_block=first_block, own=positions // block_size,
                                          filled=filled, block_size=block_size, picks=picks, means=key_block_means,
                                          key_visible=key_visible)
        # one all-gather: the block ids ride in the scores' dtype, bit for bit (int32 in fp32, int64 in fp64)
        id_type = torch.int32 if scores.dtype.itemsize == 4 else torch.int64
        packed = torch.cat([scores, index.to(id_type).view(scores.dtype)], dim=-1)
        with collective(_WHO, "the all-gather of gate candidates", pg):
            everyone = all_gather_stacked(packed, pg)
        count("gate candidates", packed.numel() * packed.element_size() * (world - 1))
        all_scores, all_index = everyone[..., :picks], everyone[..., picks:].contiguous().view(id_type).long()
        selected = _merge(all_scores, all_index, picks)
    out, lse = _partial_attention(q, k_local, v_local, selected, first_block=first_block, positions=positions,
                                  filled=filled, block_size=block_size, scale=resolved, key_visible=key_visible)
    return _combine(_WHO, out, lse, pg, q.dtype)


def _check_call(who: str, q: Tensor, k: Tensor, v: Tensor, *, seq_len, group, block_size: int, top_k: int, scale,
                enable_gqa: bool) -> dist.ProcessGroup:
    """The group, after `moba_attention`'s rules on one query (a rank's filled shard may be shorter
    than Tq) and the range of `seq_len`; one-line errors naming `who`."""
    pg = resolve_group(group, who)
    try:
        validate(q[:, :, -1:], k, v, block_size=block_size, top_k=top_k, scale=scale, attn_mask=None,
                 enable_gqa=enable_gqa, backend="torch")
    except ValueError as e:
        raise ValueError(str(e).replace("moba_attention:", f"{who}:", 1)) from None
    world, s_cap, tq = dist.get_world_size(pg), k.shape[2], q.shape[2]
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or not tq <= seq_len <= world * s_cap:
        raise ValueError(f"{who}: seq_len must be an integer in [Tq={tq}, W * S = {world * s_cap}], got {seq_len!r}")
    return pg


def _combine(who: str, out: Tensor, lse: Tensor, pg: dist.ProcessGroup, dtype: torch.dtype,
             sinks: Tensor | None = None) -> Tensor:
    """Every rank's partial output and log-sum-exp, all-gathered and combined (on every rank);
    `sinks` `[Hq]`: one more logit per head in the softmax's denominator, with no value."""
    with collective(who, "the all-gather of partial outputs", pg):
        outs = all_gather_stacked(torch.cat([out, lse[..., None]], dim=-1), pg)  # [W, B, Hq, Tq, D + 1]
    count("partial outputs", (out.numel() + lse.numel()) * out.element_size() * (dist.get_world_size(pg) - 1))
    lses = outs[..., -1]
    total = torch.logsumexp(lses, dim=0)
    if sinks is not None:
        total = torch.logaddexp(total, sinks.to(total.dtype).view(1, -1, 1))
    weight = torch.exp(lses - torch.where(total > float("-inf"), total, 0.0)).nan_to_num_(0.0)
    return (outs[..., :-1] * weight[..., None]).sum(0).to(dtype)


@torch.no_grad()
def sdpa_decode_cp(q: Tensor, k_local: Tensor, v_local: Tensor, *, seq_len: int, group=None,
                   scale: float | None = None, enable_gqa: bool = False, window: int | None = None,
                   softcap: float | None = None, sinks: Tensor | None = None, check_ranks: bool = True,
                   key_padding_mask: Tensor | None = None) -> Tensor:
    """Full causal attention of the newest `Tq` tokens against a contiguously sharded KV cache:
    `moba_decode_cp`'s conventions (q the same on every rank, k_local / v_local this rank's `S`
    slots, `seq_len` the filled length, `key_padding_mask` `[B, S]`), without a gate: each rank
    attends the filled slots its queries see and the partials are combined by log-sum-exp.
    `window`: a causal sliding window (a query at `p` sees keys `p - window < k <= p`, as
    transformers' sliding-window masks); a rank reads only the slots inside it. `softcap`: scores
    soft-capped as Gemma 2's (`softcap * tanh(scores / softcap)`, before the mask); `sinks` `[Hq]`:
    attention sinks as gpt-oss's (one more logit per head in the softmax, attending nothing). Equals
    `scaled_dot_product_attention` on the filled cache under that mask (with those); `[B, Hq, Tq, Dv]` on every rank."""
    who = "sdpa_decode_cp"
    pg = _check_call(who, q, k_local, v_local, seq_len=seq_len, group=group, block_size=1, top_k=1, scale=scale,
                     enable_gqa=enable_gqa)
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"{who}: window must be a positive integer (keys per query) or None, got {window!r}")
    if softcap is not None and (isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or softcap <= 0):
        raise ValueError(f"{who}: softcap must be a positive number or None, got {softcap!r}")
    if sinks is not None and (not isinstance(sinks, Tensor) or sinks.numel() != q.shape[1]):
        got = list(sinks.shape) if isinstance(sinks, Tensor) else type(sinks).__name__
        raise ValueError(f"{who}: sinks must hold one logit per query head ({q.shape[1]}), got {got}")
    rank, s_cap, tq = dist.get_rank(pg), k_local.shape[2], q.shape[2]
    key_visible = check_key_padding(key_padding_mask, (q.shape[0], s_cap), q.device, who)
    if check_ranks:
        check_same_on_all_ranks(who, pg, {"batch size": q.shape[0], "query heads": q.shape[1],
                                          "key/value heads": k_local.shape[1], "head dim": q.shape[3], "Tq": tq,
                                          "cache slots per rank": s_cap, "seq_len": seq_len,
                                          "window": window or 0,
                                          "softcap (bits of its float64)": float_bits(softcap or 0.0),
                                          "whether sinks are given": int(sinks is not None),
                                          "whether a key padding mask is given": int(key_visible is not None)},
                                q.device)
    base = rank * s_cap
    filled = min(max(seq_len - base, 0), s_cap)
    first = 0 if window is None else min(max(seq_len - tq - window + 1 - base, 0), filled)  # first slot seen
    positions = torch.arange(seq_len - tq, seq_len, device=q.device)
    key_pos = torch.arange(base + first, base + filled, device=q.device)
    visible = in_causal_window(positions, key_pos, window) if window is not None else \
        key_pos[None, :] <= positions[:, None]  # [Tq, n]
    visible = visible[None, None]
    if key_visible is not None:
        visible = visible & key_visible[:, None, None, first:filled]
    ct = compute_dtype(q.dtype)
    hq = q.shape[1]
    keys, values = k_local[:, :, first:filled], v_local[:, :, first:filled]
    resolved = float(scale) if scale is not None else q.shape[-1] ** -0.5
    scores = (q.to(ct) @ repeat_kv(keys, hq).to(ct).transpose(-1, -2)) * resolved
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    weights, lse = _softmax(scores.masked_fill(~visible, float("-inf")))
    return _combine(who, weights @ repeat_kv(values, hq).to(ct), lse, pg, q.dtype,
                    sinks=None if sinks is None else sinks.detach().reshape(-1).to(q.device))
