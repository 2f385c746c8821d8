"""What each gloo rank runs in the context-parallel tests (spawned by cp_spawn.run_suite).

Every rank builds the same whole-sequence inputs from a fixed seed, computes the single-process
answer itself (the dense `reference` backend of `moba_attention`, or the unsharded model), runs
the sharded computation on its shard and compares its shard of the answer. A case passes when it
returns; a failed comparison raises on the rank that saw it.
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from moba_rewrite.attention import moba_attention
from moba_rewrite.attention.block_means import key_block_means
from moba_rewrite.parallel import (ContextParallelError, moba_attention_cp, moba_decode_cp, record_traffic, sdpa_cp,
                                   sdpa_decode_cp, shard_sequence, unshard_sequence)

TIMEOUT_S = 120  # the group's timeout: a dead peer becomes an error, never a hang (room for a rank slowed by
# another test worker on the same cores; the dead-rank case uses a 3 s group of its own)


@dataclass
class Ctx:
    rank: int
    world: int


def close(name: str, got: torch.Tensor, want: torch.Tensor, atol: float = 1e-5, relative: bool = False) -> None:
    """Max abs error <= atol (times the largest |want| when `relative`, for large-magnitude values)."""
    if got.shape != want.shape:
        raise AssertionError(f"{name}: shape {list(got.shape)} != {list(want.shape)}")
    if relative and want.numel():
        atol *= max(1.0, want.abs().max().item())
    err = (got.double() - want.double()).abs().max().item() if got.numel() else 0.0
    if not err <= atol:
        raise AssertionError(f"{name}: max abs error {err:.3g} > {atol}")


@contextmanager
def raises(words: str, what: str):
    """The block must raise a ValueError whose message holds `words`; `what` says what happened if
    it raised none. (A plain helper: the ranks run outside pytest and report an AssertionError.)"""
    try:
        yield
    except ValueError as e:
        assert words in str(e), str(e)
    else:
        raise AssertionError(f"{what} (no error naming {words!r})")


def _qkv(b, hq, hkv, t, d, seed, structured=False, dv=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, t, d, generator=g)
    k = torch.randn(b, hkv, t, d, generator=g)
    v = torch.randn(b, hkv, t, dv or d, generator=g)
    if structured:  # a few blocks every query prefers: many ranks fetch the same few blocks
        k[:, :, : t // 8] += 2.0 * q.mean((1, 2), keepdim=True)[:, :1]
    return q, k, v


def check_op_against_whole_sequence(ctx: Ctx, *, b=1, hq=4, hkv=4, t=128, d=16, block_size=8, top_k=3,
                                    causal=True, layout="contiguous", seq_len=None, seed=0, structured=False,
                                    scale=None, exchange="auto", dv=None, key_padding=None, backend="auto"):
    """Output and gradients of one rank's shard equal the whole-sequence reference's shard.
    `key_padding`: a `[B, T]` bool mask of real tokens (a padded batch), given to the reference as
    `attn_mask` and to the sharded op as each rank's shard."""
    t_real = seq_len or t
    q, k, v = _qkv(b, hq, hkv, t_real, d, seed, structured, dv)
    grad = torch.randn(b, hq, t_real, dv or d, generator=torch.Generator().manual_seed(seed + 1))
    qr, kr, vr = (x.clone().requires_grad_() for x in (q, k, v))
    mask = None if key_padding is None else key_padding[:, None, None, :]
    ref = moba_attention(qr, kr, vr, block_size=block_size, top_k=top_k, causal=causal, enable_gqa=hq != hkv,
                         scale=scale, attn_mask=mask, backend="reference")
    (ref * grad).sum().backward()
    pad = block_size if seq_len else None
    shard = lambda x, dim=2: shard_sequence(x, layout=layout, block_size=pad, dim=dim)  # noqa: E731
    ql, kl, vl = (shard(x).requires_grad_() for x in (q, k, v))
    local_mask = None if key_padding is None else shard(key_padding, dim=1)
    out = moba_attention_cp(ql, kl, vl, block_size=block_size, top_k=top_k, causal=causal, enable_gqa=hq != hkv,
                            layout=layout, seq_len=seq_len, scale=scale, exchange=exchange,
                            key_padding_mask=local_mask, backend=backend)
    (out * shard(grad)).sum().backward()
    what = (f"[causal={causal} layout={layout} gqa={hq}/{hkv} top_k={top_k} seq_len={seq_len} scale={scale} "
            f"exchange={exchange} dv={dv} key_padding={key_padding is not None} backend={backend}]")
    close(f"output {what}", unshard_sequence(out.detach(), layout=layout, seq_len=seq_len), ref.detach())
    for name, got, want in (("dq", ql.grad, qr.grad), ("dk", kl.grad, kr.grad), ("dv", vl.grad, vr.grad)):
        # Large scales give gradients in the tens: compare those to fp32 precision of their size.
        close(f"{name} {what}", got, shard(want), relative=scale is not None)


# --------------------------------------------------------------------------------------------
# Cases


def op_causal_contiguous(ctx):
    check_op_against_whole_sequence(ctx)


def op_non_causal(ctx):
    check_op_against_whole_sequence(ctx, causal=False, seed=1)
    # Large scores: the kernels' online-softmax path instead of the bounded fast path.
    check_op_against_whole_sequence(ctx, causal=False, seed=11, scale=3.0)


def op_gqa_zigzag_causal(ctx):
    check_op_against_whole_sequence(ctx, b=2, hq=4, hkv=2, layout="zigzag", seed=2)


def op_gqa_zigzag_non_causal(ctx):
    check_op_against_whole_sequence(ctx, hq=6, hkv=2, layout="zigzag", causal=False, top_k=4, seed=3)


def op_padding(ctx):
    """A length that does not divide: shard_sequence pads, seq_len hides the padding."""
    for causal in (True, False):
        for layout in ("contiguous", "zigzag"):
            check_op_against_whole_sequence(ctx, t=0, seq_len=101 if layout == "contiguous" else 93, causal=causal,
                                            layout=layout, seed=4)


def _padded_batch(t: int) -> torch.Tensor:
    """`[3, t]` real-token masks: left padding (37 tokens), right padding (the last 50), and a
    sequence with a hole covering whole blocks and parts of others (packed-then-padded data)."""
    mask = torch.ones(3, t, dtype=torch.bool)
    mask[0, :37] = False
    mask[1, t - 50:] = False
    mask[2, 20:61] = False
    return mask


def op_key_padding_mask(ctx):
    """A padded batch: each row's padding mask, sharded like the tokens, gives the reference MoBA
    with that mask on the whole sequence (output and gradients), with every exchange mode, causal and
    not, GQA, zigzag, and alignment padding on top."""
    for exchange in ("auto", "keys", "queries"):
        check_op_against_whole_sequence(ctx, b=3, key_padding=_padded_batch(128), exchange=exchange, seed=21)
    check_op_against_whole_sequence(ctx, b=3, hq=4, hkv=2, layout="zigzag", key_padding=_padded_batch(128), seed=22)
    check_op_against_whole_sequence(ctx, b=3, causal=False, top_k=4, key_padding=_padded_batch(128), seed=23)
    t = 101 if ctx.world == 2 else 93
    check_op_against_whole_sequence(ctx, b=3, t=0, seq_len=t, key_padding=_padded_batch(t), seed=24,
                                    exchange="queries")


def op_uneven_hits_and_top_k_extremes(ctx):
    """Concentrated routing (most ranks fetch the same blocks, some none), top_k 1 (nothing
    fetched anywhere) and top_k >= blocks (dense limit)."""
    check_op_against_whole_sequence(ctx, structured=True, top_k=2, seed=5)
    check_op_against_whole_sequence(ctx, top_k=1, seed=6)
    check_op_against_whole_sequence(ctx, top_k=64, causal=False, seed=7)


def op_half_and_double_precision(ctx):
    """bf16 / fp16 travel and attend in their own dtype (within one rounding of the reference);
    fp64 matches to 1e-12. Key/value tiles and shipped queries alike."""
    q, k, v = _qkv(1, 4, 4, 128, 16, 15)
    for exchange in ("keys", "queries"):
        for dtype, atol in ((torch.bfloat16, 1.6e-2), (torch.float16, 2e-3), (torch.float64, 1e-12)):
            ql, kl, vl = (shard_sequence(x.to(dtype)).requires_grad_() for x in (q, k, v))
            out = moba_attention_cp(ql, kl, vl, block_size=8, top_k=3, exchange=exchange)
            out.sum().backward()
            assert out.dtype == dtype and kl.grad.dtype == dtype and ql.grad.dtype == dtype
            want = moba_attention(q.to(dtype), k.to(dtype), v.to(dtype), block_size=8, top_k=3, backend="reference")
            close(f"output {dtype} exchange={exchange}", unshard_sequence(out.detach()), want, atol=atol)


def op_every_exchange_mode(ctx):
    """Fetching every remote tile (`keys`), shipping every query row instead (`queries`) and the
    per-tile choice (`auto`, the default, which the other cases use) give the reference's output
    and gradients: causal and not, GQA, zigzag, padding."""
    for exchange in ("keys", "queries"):
        check_op_against_whole_sequence(ctx, exchange=exchange, seed=21)
        check_op_against_whole_sequence(ctx, b=2, hq=4, hkv=2, layout="zigzag", exchange=exchange, seed=22)
        check_op_against_whole_sequence(ctx, hq=6, hkv=2, causal=False, top_k=4, exchange=exchange, seed=23)
        check_op_against_whole_sequence(ctx, t=0, seq_len=93, layout="zigzag", exchange=exchange, seed=24)
    check_op_against_whole_sequence(ctx, structured=True, top_k=2, exchange="queries", seed=25)
    check_op_against_whole_sequence(ctx, causal=False, scale=3.0, exchange="queries", seed=26)


def op_triton_local_attention(ctx):
    """The local attention on the `triton` backend's kernels (what `auto` picks on CUDA; here under the
    Triton interpreter), the selection given explicitly: the reference's output and gradients with
    fetched tiles, shipped rows merged by log-sum-exp, causal and not, GQA, zigzag, alignment and key
    padding, a value head dim of its own; the kernels really ran, for the own blocks and (apart,
    while the tiles travel) for the fetched ones."""
    from moba_rewrite.kernels.triton import backend as triton_backend

    calls = []
    forward, backward = triton_backend.forward_selected, triton_backend.backward_selected
    triton_backend.forward_selected = lambda *a, **kw: calls.append(("fwd", kw["own_block"])) or forward(*a, **kw)
    triton_backend.backward_selected = lambda *a, **kw: calls.append(("bwd", kw["own_block"])) or backward(*a, **kw)
    try:
        small = dict(t=64, backend="triton")
        for exchange in ("keys", "queries", "auto"):
            check_op_against_whole_sequence(ctx, exchange=exchange, seed=31, **small)
        check_op_against_whole_sequence(ctx, b=2, hq=4, hkv=2, layout="zigzag", causal=False, top_k=4, seed=32, **small)
        check_op_against_whole_sequence(ctx, b=3, hq=4, hkv=2, key_padding=_padded_batch(64), exchange="queries",
                                        seed=33, **small)
        check_op_against_whole_sequence(ctx, t=0, seq_len=45, layout="zigzag", dv=12, seed=34, backend="triton")
        assert calls.count(("fwd", True)) == calls.count(("bwd", True)) == 6, calls
        assert calls.count(("fwd", False)) == calls.count(("bwd", False)) >= 1, calls  # fetched tiles, attended apart
        # A Hugging Face model whose policy names the backend: its MoBA sites run the kernels sharded.
        from moba_rewrite.integrations.hf_cp import context_parallel, shard_inputs

        policy = {"version": 1, "defaults": {"mode": "moba", "block_size": 8, "top_k": 2, "backend": "triton"}}
        model = _tiny_llama(policy=policy)[0].eval()
        ids = torch.randint(0, 96, (1, 64), generator=torch.Generator().manual_seed(35))
        with torch.no_grad():
            want = model(input_ids=ids, use_cache=False).logits
            local_ids, pos, seq_len = shard_inputs(model, ids, layout="zigzag")
            with context_parallel(model, layout="zigzag", seq_len=seq_len):
                local = model(input_ids=local_ids, position_ids=pos, use_cache=False).logits
        close("logits [policy backend triton]", unshard_sequence(local, layout="zigzag", dim=1, seq_len=seq_len), want)
        assert calls.count(("fwd", True)) == 6 + 3, calls  # one per layer
    finally:
        triton_backend.forward_selected, triton_backend.backward_selected = forward, backward
    with raises("backend must be one of auto, torch, triton, got 'reference'",
                "backend='reference' was accepted"):
        moba_attention_cp(*_qkv(1, 2, 2, 16, 8, 0), block_size=8, top_k=2, backend="reference")


def op_value_head_dim_of_its_own(ctx):
    """Multi-head latent attention (value head dim 12, query/key 16): tiles carry both widths,
    shipped rows return Dv-wide partials; sharded decode too."""
    for exchange in ("keys", "queries", "auto"):
        check_op_against_whole_sequence(ctx, hq=4, hkv=2, dv=12, exchange=exchange, seed=28)
        check_op_against_whole_sequence(ctx, t=0, seq_len=93, layout="zigzag", causal=False, dv=24,
                                        exchange=exchange, seed=29)
    bs, s_cap = 8, 32
    seq_len = ctx.world * s_cap - 5
    q_all, k, v = _qkv(1, 4, 2, ctx.world * s_cap, 16, 30, dv=12)
    want = moba_attention(q_all[:, :, seq_len - 1:seq_len], k[:, :, :seq_len], v[:, :, :seq_len], block_size=bs,
                          top_k=3, enable_gqa=True, backend="reference")
    mine = slice(ctx.rank * s_cap, (ctx.rank + 1) * s_cap)
    got = moba_decode_cp(q_all[:, :, seq_len - 1:seq_len], k[:, :, mine], v[:, :, mine], seq_len=seq_len,
                         block_size=bs, top_k=3, enable_gqa=True)
    close("decode dv=12", got, want)


def traffic_auto_spares_the_owners(ctx):
    """`auto` ships a tile only when that makes its owner send less: on every rank, what it sends as
    an owner (key/value tiles, partial outputs) is at most what fetching every tile would make it
    send, and less on rank 0, which serves every later rank; `queries` moves no key/value tile and
    `keys` no query."""
    q, k, v = (shard_sequence(x) for x in _qkv(1, 4, 4, 256, 16, 27))
    owner_steps = ("key/value blocks", "partial outputs", "partial log-sum-exps")
    sent = {}
    for exchange in ("keys", "queries", "auto"):
        with record_traffic() as t:
            moba_attention_cp(q, k, v, block_size=8, top_k=3, exchange=exchange)
        sent[exchange] = (sum(t.by_step.get(s, 0) for s in owner_steps), t.by_step)
    assert not sent["queries"][1].get("key/value blocks"), sent["queries"][1]
    assert not sent["keys"][1].get("shipped queries"), sent["keys"][1]
    assert sent["auto"][0] <= sent["keys"][0], {m: b for m, (b, _) in sent.items()}
    if ctx.rank == 0:
        assert sent["auto"][0] < sent["keys"][0], {m: b for m, (b, _) in sent.items()}


def dense_sdpa_cp_matches_whole_sequence(ctx):
    """`sdpa_cp` (the dense sites' all-gather attention) and `ring_attention_cp` (K/V shards passed
    around the ring; the CPU flash kernel's parts and the portable fp32 path): output and gradients
    equal SDPA on the whole sequence, causal zigzag with GQA and padding, non-causal contiguous, a
    padded batch's key mask (right padding and a hole; every query sees its first key). The ring
    sends each shard `W - 1` times forward, and its dK/dV (fp32) once per rank in the backward."""
    from moba_rewrite.kernels import dense as dense_kernels
    from moba_rewrite.parallel.ring import RING_STEP, ring_attention_cp

    flash = dense_kernels._flash_parts_apply
    for op, portable in ((sdpa_cp, False), (ring_attention_cp, False), (ring_attention_cp, True)):
        if portable:
            dense_kernels._flash_parts_apply = lambda *a: False
        try:
            for causal, layout, seq_len, padded in ((True, "zigzag", 90, False), (False, "contiguous", None, False),
                                                    (True, "contiguous", None, True), (False, "zigzag", 90, True)):
                t = seq_len or 96  # whole chunks on 2, 3 and 4 ranks
                q, k, v = _qkv(2, 4, 2, t, 16, 12)
                grad = torch.randn(2, 4, t, 16, generator=torch.Generator().manual_seed(13))
                qr, kr, vr = (x.clone().requires_grad_() for x in (q, k, v))
                keys = None
                mask = torch.ones(t, t, dtype=torch.bool).tril() if causal else torch.ones(t, t, dtype=torch.bool)
                if padded:
                    keys = _padded_batch(t)[1:]
                    mask = mask & keys[:, None, None, :]
                ref = torch.nn.functional.scaled_dot_product_attention(qr, kr, vr, attn_mask=mask, enable_gqa=True)
                (ref * grad).sum().backward()
                shard = lambda x, dim=2: shard_sequence(x, layout=layout, block_size=8 if seq_len else None, dim=dim)  # noqa: E731
                ql, kl, vl = (shard(x).requires_grad_() for x in (q, k, v))
                with record_traffic() as traffic:
                    out = op(ql, kl, vl, causal=causal, enable_gqa=True, layout=layout, seq_len=seq_len,
                             key_padding_mask=None if keys is None else shard(keys, dim=1))
                    (out * shard(grad)).sum().backward()
                what = f"{op.__name__}{' portable' if portable else ''} [{causal} {layout} padded={padded}]"
                close(f"{what} output", unshard_sequence(out.detach(), layout=layout, seq_len=seq_len), ref.detach())
                for name, got, want in (("dq", ql.grad, qr.grad), ("dk", kl.grad, kr.grad), ("dv", vl.grad, vr.grad)):
                    close(f"{what} {name}", got, shard(want))
                if op is ring_attention_cp:
                    kv_bytes = (kl.numel() + vl.numel()) * 4
                    assert traffic.by_step[RING_STEP] == (ctx.world - 1) * kv_bytes, traffic.by_step
                    assert traffic.by_step[f"{RING_STEP} (gradients)"] == ctx.world * kv_bytes, traffic.by_step
                    assert "all-gathered keys/values" not in traffic.by_step, traffic.by_step
        finally:
            dense_kernels._flash_parts_apply = flash


def decode_against_a_sharded_cache(ctx):
    """`moba_decode_cp` equals `moba_attention` on the filled cache: one and three new tokens, the
    newest on the last or on an earlier rank (later ranks empty), GQA, top_k 1; with means the caller
    keeps (NaN past the filled blocks); a padded batch's key mask (also in the dense limit).
    `sdpa_decode_cp` equals SDPA on the filled cache, with and without a sliding window and padding,
    and written-out attention with soft-capping and sinks."""
    s_cap, bs = 32, 8
    cap = s_cap * ctx.world
    q_all, k, v = _qkv(2, 4, 2, cap, 16, 14)
    for seq_len in (cap - 5, s_cap + 3, 20):
        for tq, top_k in ((1, 3), (3, 2), (1, 1)):
            q = q_all[:, :, seq_len - tq: seq_len]
            want = moba_attention(q, k[:, :, :seq_len], v[:, :, :seq_len], block_size=bs, top_k=top_k,
                                  enable_gqa=True, backend="reference")
            mine = slice(ctx.rank * s_cap, (ctx.rank + 1) * s_cap)
            got = moba_decode_cp(q, k[:, :, mine], v[:, :, mine], seq_len=seq_len, block_size=bs, top_k=top_k,
                                 enable_gqa=True)
            close(f"decode [seq_len={seq_len} Tq={tq} top_k={top_k}]", got, want)
            # the caller's kept means (garbage in the blocks past the filled length: never read)
            filled = min(max(seq_len - ctx.rank * s_cap, 0), s_cap)
            means = torch.full((2, 2, s_cap // bs, 16), float("nan"))
            if filled:
                means[:, :, :-(-filled // bs)] = key_block_means(k[:, :, mine][:, :, :filled], bs)
            got = moba_decode_cp(q, k[:, :, mine], v[:, :, mine], seq_len=seq_len, block_size=bs, top_k=top_k,
                                 enable_gqa=True, key_block_means=means)
            close(f"decode, kept means [seq_len={seq_len} Tq={tq} top_k={top_k}]", got, want)
    # a padded batch: left padding in row 0, a hole in row 1 (blocks without a visible key)
    keys = torch.ones(2, cap, dtype=torch.bool)
    keys[0, :11], keys[1, 30:50] = False, False
    for seq_len in (cap - 5, s_cap + 3):
        for tq, top_k in ((1, 3), (2, 2)):
            q = q_all[:, :, seq_len - tq: seq_len]
            want = moba_attention(q, k[:, :, :seq_len], v[:, :, :seq_len], block_size=bs, top_k=top_k, enable_gqa=True,
                                  attn_mask=keys[:, None, None, :seq_len], backend="reference")
            got = moba_decode_cp(q, k[:, :, mine], v[:, :, mine], seq_len=seq_len, block_size=bs, top_k=top_k,
                                 enable_gqa=True, key_padding_mask=keys[:, mine])
            close(f"decode, key padding [seq_len={seq_len} Tq={tq} top_k={top_k}]", got, want)
    q = q_all[:, :, cap - 1:]
    dense = moba_decode_cp(q, k[:, :, mine], v[:, :, mine], seq_len=cap, block_size=s_cap, top_k=ctx.world + 1,
                           enable_gqa=True, key_padding_mask=keys[:, mine])  # the dense limit, masked
    close("decode, key padding, dense limit", dense, torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=keys[:, None, None, :], enable_gqa=True))
    # the dense counterpart: full causal attention, within a sliding window crossing ranks, padded
    positions = torch.arange(cap)
    for seq_len, tq, window, padded in ((cap - 5, 1, None, False), (cap - 5, 3, 13, True), (s_cap + 3, 2, 40, False),
                                        (s_cap + 3, 1, 1, True), (20, 1, 7, False)):
        q = q_all[:, :, seq_len - tq:seq_len]
        q_pos, k_pos = positions[seq_len - tq:seq_len], positions[:seq_len]
        visible = (k_pos[None, :] <= q_pos[:, None]) & (q_pos[:, None] - k_pos[None, :] < (window or cap))
        visible = visible[None, None] & (keys[:, None, None, :seq_len] if padded else True)
        want = torch.nn.functional.scaled_dot_product_attention(q, k[:, :, :seq_len], v[:, :, :seq_len],
                                                                attn_mask=visible, enable_gqa=True)
        got = sdpa_decode_cp(q, k[:, :, mine], v[:, :, mine], seq_len=seq_len, enable_gqa=True, window=window,
                             key_padding_mask=keys[:, mine] if padded else None)
        close(f"sdpa_decode_cp [seq_len={seq_len} Tq={tq} window={window} padded={padded}]", got, want)
    # soft-capping (Gemma 2) and sinks (gpt-oss), written out as transformers' eager functions do
    seq_len, tq, window = cap - 3, 2, 21
    q = q_all[:, :, seq_len - tq:seq_len]
    sinks = torch.linspace(-1.0, 2.0, q.shape[1])
    q_pos, k_pos = positions[seq_len - tq:seq_len], positions[:seq_len]
    visible = (k_pos[None, :] <= q_pos[:, None]) & (q_pos[:, None] - k_pos[None, :] < window)
    scores = q @ k[:, :, :seq_len].repeat_interleave(2, 1).transpose(-1, -2) * q.shape[-1] ** -0.5
    scores = (torch.tanh(scores / 3.0) * 3.0).masked_fill(~visible, float("-inf"))
    for with_sinks in (False, True):
        logits = torch.cat([scores, sinks.view(1, -1, 1, 1).expand(*scores.shape[:3], 1)], -1) if with_sinks else scores
        weights = torch.softmax(logits, -1)[..., :seq_len]
        want = weights @ v[:, :, :seq_len].repeat_interleave(2, 1)
        got = sdpa_decode_cp(q, k[:, :, mine], v[:, :, mine], seq_len=seq_len, enable_gqa=True, window=window,
                             softcap=3.0, sinks=sinks if with_sinks else None)
        close(f"sdpa_decode_cp, soft-capped, sinks={with_sinks}", got, want)
    with raises("window must be a positive integer", "window=0 was accepted"):
        sdpa_decode_cp(q, k[:, :, mine], v[:, :, mine], seq_len=20, enable_gqa=True, window=0)
    with raises("key_block_means must be [B, Hkv, S / block_size, D]", "means of the wrong shape were accepted"):
        moba_decode_cp(q, k[:, :, mine], v[:, :, mine], seq_len=20, block_size=bs, top_k=3, enable_gqa=True,
                       key_block_means=torch.zeros(2, 2, 3, 16))


def traffic_only_selected_blocks(ctx):
    """Bytes sent: top_k=1 sends no key/value block; the blocks sent are the ones requested."""
    q, k, v = (shard_sequence(x) for x in _qkv(1, 2, 2, 128, 16, 8))
    with record_traffic() as t:
        moba_attention_cp(q, k, v, block_size=8, top_k=1)
    assert "key/value blocks" not in t.by_step, t.by_step
    with record_traffic() as t:
        moba_attention_cp(q, k, v, block_size=8, top_k=3, exchange="keys")
    tile = 2 * 8 * 16 * 4
    assert t.by_step["key/value blocks"] % tile == 0
    full = 2 * k.numel() * 4 * (ctx.world - 1)  # what an all-gather of K/V sends
    assert t.by_step["key/value blocks"] <= full, (t.by_step, full)


def bad_inputs_fail_on_every_rank(ctx):
    """Different shapes or parameters across ranks, unaligned shards, a one-rank group, a 2-D mesh."""
    q, k, v = (shard_sequence(x) for x in _qkv(1, 2, 2, 128, 16, 9))

    def expect(exc, words, fn):
        try:
            fn()
        except exc as e:
            if not all(w in str(e) for w in words):
                raise AssertionError(f"error {e!r} does not name {words}") from e
            return
        raise AssertionError(f"no {exc.__name__} naming {words}")

    t_local = 16 if ctx.rank == 0 else 8
    expect(ValueError, ["ranks disagree on T_local", "rank 0: 16", "rank 1: 8"],
           lambda: moba_attention_cp(q[:, :, :t_local], k[:, :, :t_local], v[:, :, :t_local], block_size=8, top_k=3))
    expect(ValueError, ["ranks disagree on top_k"],
           lambda: moba_attention_cp(q, k, v, block_size=8, top_k=2 + ctx.rank))
    expect(ValueError, ["ranks disagree on exchange"],
           lambda: moba_attention_cp(q, k, v, block_size=8, top_k=3, exchange=("keys", "queries")[ctx.rank % 2]))
    expect(ValueError, ["exchange must be one of", "'ring'"],
           lambda: moba_attention_cp(q, k, v, block_size=8, top_k=3, exchange="ring"))
    keys = torch.ones(1, q.shape[2], dtype=torch.bool)
    expect(ValueError, ["ranks disagree on whether a key padding mask is given"],
           lambda: moba_attention_cp(q, k, v, block_size=8, top_k=3, key_padding_mask=keys if ctx.rank else None))
    expect(ValueError, ["key_padding_mask must be [B, T_local]", str(q.shape[2])],
           lambda: moba_attention_cp(q, k, v, block_size=8, top_k=3, key_padding_mask=keys[:, :-1]))
    expect(ValueError, ["key_padding_mask must be bool or integer", "float32"],
           lambda: moba_attention_cp(q, k, v, block_size=8, top_k=3, key_padding_mask=keys.float()))
    expect(ValueError, ["straddle", "block_size=12"], lambda: moba_attention_cp(q, k, v, block_size=12, top_k=3))
    expect(ValueError, ["zigzag", "T_local / 2"],
           lambda: moba_attention_cp(q, k, v, block_size=64, top_k=3, layout="zigzag"))
    expect(ValueError, ["layout must be one of"], lambda: moba_attention_cp(q, k, v, block_size=8, top_k=3,
                                                                           layout="ring"))
    singles = [dist.new_group([r]) for r in range(ctx.world)]  # every rank joins every new_group call
    expect(ValueError, ["single rank"], lambda: moba_attention_cp(q, k, v, group=singles[ctx.rank], block_size=8,
                                                                 top_k=3))
    from torch.distributed.device_mesh import init_device_mesh

    if ctx.world == 4:
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "cp"))
        expect(ValueError, ["1-D DeviceMesh"], lambda: moba_attention_cp(q, k, v, group=mesh, block_size=8, top_k=3))
    expect(ValueError, ["does not split"], lambda: shard_sequence(torch.zeros(1, 1, 7, 2)))
    # the dense ops check the same way
    from moba_rewrite.parallel.ring import ring_attention_cp

    for dense_op in (sdpa_cp, ring_attention_cp):
        expect(ValueError, ["ranks disagree on T_local", "rank 0: 16", "rank 1: 8"],
               lambda: dense_op(q[:, :, :t_local], k[:, :, :t_local], v[:, :, :t_local]))
        expect(ValueError, ["ranks disagree on causal"], lambda: dense_op(q, k, v, causal=ctx.rank == 0))
        expect(ValueError, ["key_padding_mask must be [B, T_local]"], lambda: dense_op(q, k, v, key_padding_mask=keys[:, :-1]))
        expect(ValueError, ["single rank"], lambda: dense_op(q, k, v, group=singles[ctx.rank]))


def shard_round_trip(ctx):
    x = torch.arange(2 * 90, dtype=torch.float32).view(1, 2, 90, 1)
    for layout in ("contiguous", "zigzag"):
        part = shard_sequence(x, layout=layout, block_size=4)
        assert part.shape[2] * ctx.world >= 90 and part.shape[2] % 4 == 0
        close(f"round trip {layout}", unshard_sequence(part, layout=layout, seq_len=90), x, atol=0)


def dead_rank_is_one_clear_error(ctx):
    """The last case: rank 1 leaves in the middle of a call, after the request exchange, while rank
    0's key/value tiles are in flight (started, not waited for); rank 0 fails with one
    ContextParallelError naming that step within the group's (short) timeout instead of hanging."""
    short = dist.new_group(list(range(ctx.world)), timeout=datetime.timedelta(seconds=3))
    dist.barrier()
    if ctx.rank == 1:
        from moba_rewrite.parallel import attention as cp_attention

        cp_attention.start_fetch = lambda *a, **kw: _write_and_exit(ctx, "ok")
    q, k, v = (shard_sequence(x, group=short) for x in _qkv(1, 2, 2, 128, 16, 10))
    import time

    start = time.monotonic()
    try:
        moba_attention_cp(q, k, v, group=short, block_size=8, top_k=3, exchange="keys", causal=False)
    except ContextParallelError as e:
        assert f"rank {ctx.rank} of {ctx.world}" in str(e) and "died" in str(e), str(e)
        assert "key/value blocks" in str(e), str(e)
        assert time.monotonic() - start < 20, "took longer than the timeout"
        return
    raise AssertionError("no ContextParallelError after a rank died")


# --------------------------------------------------------------------------------------------
# Hugging Face models

_POLICY = {"version": 1, "defaults": {"mode": "moba", "block_size": 8, "top_k": 2},
           "rules": [{"layers": "-1:", "mode": "dense"}]}  # the paper's hybrid: last layer dense


def _tiny_llama(origin="sdpa", seed=0, policy=None):
    import moba_rewrite as mr
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=False, attn_implementation=origin)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    mr.rewrite(model, policy or _POLICY)
    modes = [row.decision for row in model._moba_report.rows] if hasattr(model._moba_report, "rows") else None
    return model, modes


def hf_prefill_matches_unsharded(ctx):
    """Logits of a sharded prefill equal the unsharded run of the same rewritten model (MoBA sites
    sparse: 96 tokens, block 8, top-2; last layer dense), both layouts, sdpa and eager models, a
    length that needs padding; the dense layer by ring attention (the default: its K/V shards go
    round the ring, no all-gather) and by the all-gather (`dense="gather"`)."""
    for origin in ("sdpa", "eager"):
        model, _ = _tiny_llama(origin)
        model.eval()
        ids = torch.randint(0, 96, (2, 90), generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            want = model(input_ids=ids, use_cache=False).logits
            for layout, exchange, dense in (("contiguous", "auto", "ring"), ("contiguous", "queries", "gather"),
                                            ("zigzag", "keys", "ring"), ("zigzag", "auto", "gather")):
                with record_traffic() as traffic:
                    got = _sharded_logits(model, ids, layout, exchange=exchange, dense=dense)
                close(f"logits [{origin} {layout} exchange={exchange} dense={dense}]", got, want)
                ring, gathered = (traffic.by_step.get(step, 0) > 0 for step in ("ring keys/values", "all-gathered keys/values"))
                assert (ring, gathered) == (dense == "ring", dense == "gather"), traffic.by_step
        # The model is really sparse: a dense run differs.
        dense = _tiny_llama(origin)[0]
        dense.config.__dict__  # noqa: B018
        import moba_rewrite as mr

        mr.rewrite(dense, {"version": 1, "defaults": {"mode": "dense"}})
        with torch.no_grad():
            assert (dense(input_ids=ids, use_cache=False).logits - want).abs().max() > 1e-3


def _sharded_logits(model, ids, layout: str, mask=None, **cp_kwargs):
    """The whole batch's logits `[B, T, V]` of a sharded forward of `model` on `ids` (and their
    padding `mask`, sharded like them), reassembled on every rank."""
    from moba_rewrite.integrations.hf_cp import context_parallel, shard_attention_mask, shard_inputs

    local_ids, pos, seq_len = shard_inputs(model, ids, layout=layout)
    extra = {} if mask is None else {"attention_mask": shard_attention_mask(model, mask, layout=layout)}
    with context_parallel(model, layout=layout, seq_len=seq_len, **cp_kwargs):
        local = model(input_ids=local_ids, position_ids=pos, use_cache=False, **extra).logits
    return unshard_sequence(local, layout=layout, dim=1, seq_len=seq_len)


def _lm_batch(seed: int):
    """(ids [2, 80], labels shifted before sharding, loss_of(logits, labels)): the sum of the token
    losses over the whole batch's label count, so the ranks' losses add up to the unsharded mean."""
    ids = torch.randint(0, 96, (2, 80), generator=torch.Generator().manual_seed(seed))
    labels = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], dim=1)
    n_labels = int((labels != -100).sum())

    def loss_of(logits, targets):
        return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100,
                                                 reduction="sum") / n_labels
    return ids, labels, loss_of


def _sharded_training_step(model, ids, labels, loss_of, call=None, autocast: bool = False, layout: str = "zigzag"):
    """One training step of `call` (default the model) on this rank's shard (`layout`) under
    `context_parallel` (bf16 autocast if asked): (the loss summed over the ranks, (local ids,
    positions, seq_len)); every parameter's gradient is summed over the ranks in place."""
    from moba_rewrite.integrations.hf_cp import alignment, context_parallel, shard_inputs

    local_ids, pos, seq_len = shard_inputs(model, ids, layout=layout)
    local_labels = shard_sequence(labels, layout=layout, dim=1, block_size=alignment(model), pad_value=-100)
    with context_parallel(model, layout=layout, seq_len=seq_len):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = (call if call is not None else model)(input_ids=local_ids, position_ids=pos, use_cache=False).logits
        loss = loss_of(logits, local_labels)
        loss.backward()  # inside the context: every rank joins the backward's exchanges
    total = loss.detach().clone()
    dist.all_reduce(total)
    for param in model.parameters():
        dist.all_reduce(param.grad)
    return total, (local_ids, pos, seq_len)


def _training_step_matches_unsharded(name: str, model, layout: str, compiled: bool = False) -> None:
    """One sharded training step (`layout`; of `torch.compile(model)` when `compiled`) of `model`
    gives the unsharded step's loss and every parameter's gradient (summed over the ranks)."""
    model.train()
    ids, labels, loss_of = _lm_batch(7)
    ref = copy.deepcopy(model)
    ref_loss = loss_of(ref(input_ids=ids, use_cache=False).logits, labels)
    ref_loss.backward()
    loss, _ = _sharded_training_step(model, ids, labels, loss_of, layout=layout,
                                     call=torch.compile(model) if compiled else None)
    close(f"{name} training loss [{layout}]", loss, ref_loss.detach())
    ref_grads = dict(ref.named_parameters())
    for param_name, prm in model.named_parameters():
        if ref_grads[param_name].grad is None:
            assert prm.grad is None or not prm.grad.any(), param_name
            continue
        close(f"{name} gradient of {param_name} [{layout}]", prm.grad, ref_grads[param_name].grad, atol=2e-5)


def hf_contiguous_training_step_matches_unsharded(ctx):
    """A training step on contiguous shards (rank 0 holds the sequence's start: its outputs need
    nothing from the other ranks, yet every rank must join every exchange's backward, or the
    ranks that need rank 0's gradient wait for it): MoBA and dense sites, a delta net, Mamba-2,
    Mamba-1 and short convolutions; loss and gradients equal the unsharded step's (on 2 ranks also
    sliding-window and function sites). And on 2 ranks with activation checkpointing
    (transformers' `activation_checkpointing_enable`), both layouts: the
    backward recomputes each layer's sharded attention and recurrences, exchanges included
    (checked: the attention and recurrent modules run again in the backward)."""
    from moba_rewrite.integrations import hf_cp_linear

    _training_step_matches_unsharded("llama", _tiny_llama(seed=5)[0], "contiguous")
    for family in ("qwen3_5", "bamba", "jamba", "lfm2"):
        _training_step_matches_unsharded(family, _tiny_hybrid(family), "contiguous")
    if ctx.world > 2:  # the rest on 2 ranks only (suite time)
        return
    _training_step_matches_unsharded("mistral window 20", _sliding_model("mistral", 20, "sdpa"), "contiguous")
    for name, model in _function_site_models():
        _training_step_matches_unsharded(name, model, "contiguous")
    for layout in ("contiguous", "zigzag"):
        for name, model in (("llama", _tiny_llama(seed=5)[0]), ("qwen3_5", _tiny_hybrid("qwen3_5")),
                            ("bamba", _tiny_hybrid("bamba"))):
            enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
            enable()
            watched = [model.model.layers[-1].self_attn] + [m for _, m in hf_cp_linear.recurrent_layers(model)[:1]]
            calls = []
            for module in watched:
                module.register_forward_pre_hook(lambda module, args: calls.append(module))
            _training_step_matches_unsharded(f"{name} checkpointed", model, layout)
            for module in watched:  # the sharded step's forward and its recompute (the unsharded step runs a copy)
                assert sum(c is module for c in calls) == 2, (name, type(module).__name__, len(calls))


def hf_compiled_model_matches_unsharded(ctx):
    """`torch.compile(model)` (Inductor) run under `context_parallel`: the sharded prefill's logits
    and a sharded training step's loss and gradients (summed over the ranks) equal the eager,
    unsharded model's (Llama; Qwen3.5 and Bamba training on contiguous shards). The sharded
    attention and recurrences graph-break out of the compiled graph (they are eager-only); the rest,
    backward included, is compiled."""
    from moba_rewrite.integrations.hf_cp import context_parallel

    torch._dynamo.reset()
    model, _ = _tiny_llama(seed=11)
    ids, labels, loss_of = _lm_batch(seed=12)
    model.eval()
    with torch.no_grad():
        want_logits = model(input_ids=ids, use_cache=False).logits
    model.train()
    want_loss = loss_of(model(input_ids=ids, use_cache=False).logits, labels)
    want_loss.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    total, (local_ids, pos, seq_len) = _sharded_training_step(model, ids, labels, loss_of, call=torch.compile(model))
    close("compiled loss", total, want_loss.detach())
    for name, param in model.named_parameters():
        close(f"compiled gradient of {name}", param.grad, want[name])
    torch._dynamo.reset()  # a fresh compile for inference (a recompile for no_grad may hit Dynamo's limit)
    model.eval()
    with torch.no_grad(), context_parallel(model, layout="zigzag", seq_len=seq_len):
        local = torch.compile(model)(input_ids=local_ids, position_ids=pos, use_cache=False).logits
    close("compiled logits", unshard_sequence(local, layout="zigzag", dim=1, seq_len=seq_len), want_logits)
    # Hybrid stacks compiled, on contiguous shards: the recurrences' exchanges run eagerly (traced,
    # rank 0's graph differed and held a collective of a constant gradient in its forward: the ranks
    # waited in different collectives)
    for family in ("qwen3_5", "bamba"):
        torch._dynamo.reset()
        _training_step_matches_unsharded(f"{family} compiled", _tiny_hybrid(family), "contiguous", compiled=True)
    torch._dynamo.reset()


def hf_autocast_training_step_matches_unsharded(ctx):
    """A sharded training step under CPU autocast (bf16; RoPE hands attention fp32 q/k and bf16 v):
    loss and gradients (summed over the ranks) equal the unsharded step under the same autocast,
    within bf16 rounding (the ops cast as SDPA does; before, the sharded MoBA sites refused the
    mixed dtypes)."""
    model, _ = _tiny_llama(seed=13)
    model.train()
    ids, labels, loss_of = _lm_batch(seed=14)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want_loss = loss_of(model(input_ids=ids, use_cache=False).logits, labels)
    want_loss.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    total, _ = _sharded_training_step(model, ids, labels, loss_of, autocast=True)
    close("autocast loss", total, want_loss.detach(), atol=1e-4)
    for name, param in model.named_parameters():
        close(f"autocast gradient of {name}", param.grad, want[name], atol=5e-3, relative=True)


def hf_eager_encoder_matches_unsharded(ctx):
    """A bidirectional encoder with eager attention (ALIGN's text tower: transformers hands it no mask,
    and the module has no `is_causal`) sharded = its unsharded rewrite = the original in the dense
    limit; it once ran causally under context parallelism."""
    import moba_rewrite as mr
    from transformers import AlignTextConfig, AlignTextModel
    from moba_rewrite.integrations.hf_cp import context_parallel, shard_inputs

    cfg = AlignTextConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=64, max_position_embeddings=128)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    original = AlignTextModel(cfg).eval()
    ids = torch.randint(1, 64, (1, 64), generator=torch.Generator().manual_seed(5))  # 0 is the pad id
    for policy in (_POLICY, {"version": 1, "defaults": {"block_size": 8, "top_k": 16}}):  # sparse, dense limit
        model = mr.rewrite(copy.deepcopy(original), policy)
        with torch.no_grad():
            want = model(input_ids=ids).last_hidden_state
            if policy is not _POLICY:
                close("dense limit = original", want, original(input_ids=ids).last_hidden_state, atol=1e-4)
            local_ids, pos, seq_len = shard_inputs(model, ids)
            with context_parallel(model, seq_len=seq_len):
                local = model(input_ids=local_ids, position_ids=pos).last_hidden_state
        close(f"hidden states [top_k {policy['defaults'].get('top_k')}]",
              unshard_sequence(local, dim=1, seq_len=seq_len), want)


def hf_padded_batch_matches_unsharded(ctx):
    """A padded batch (left padding, right padding, a hole) with its 2-D attention_mask sharded
    like the tokens: logits at real tokens equal the unsharded run with the same mask and
    positions (MoBA sites and the dense last layer alike), sdpa and eager models, both layouts,
    every exchange mode; the padding changes the answer (checked against the unpadded run)."""
    from moba_rewrite.integrations.hf_cp import context_parallel, shard_attention_mask, shard_inputs

    t = 90
    mask = _padded_batch(t).long()
    real = mask.bool()
    for origin in ("sdpa", "eager"):
        model, _ = _tiny_llama(origin)
        model.eval()
        ids = torch.randint(0, 96, (3, t), generator=torch.Generator().manual_seed(5))
        positions = torch.arange(t).expand(3, -1)
        with torch.no_grad():
            want = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
            unpadded = model(input_ids=ids, position_ids=positions, use_cache=False).logits
            assert (unpadded - want)[real].abs().max() > 1e-3  # the mask matters at real tokens
            for layout, exchange in (("contiguous", "auto"), ("zigzag", "queries"), ("contiguous", "keys")):
                local_ids, pos, seq_len = shard_inputs(model, ids, layout=layout)
                local_mask = shard_attention_mask(model, mask, layout=layout)
                with context_parallel(model, layout=layout, seq_len=seq_len, exchange=exchange):
                    local = model(input_ids=local_ids, position_ids=pos, attention_mask=local_mask,
                                  use_cache=False).logits
                got = unshard_sequence(local, layout=layout, dim=1, seq_len=seq_len)
                assert not got[real].isnan().any(), f"NaN at real tokens [{origin} {layout}]"
                close(f"padded logits [{origin} {layout} exchange={exchange}]", got[real], want[real])


def hf_sharded_cache_generate_matches_generate(ctx):
    """Greedy decoding with the KV cache sharded across ranks (prefill under context parallelism,
    `moba_decode_cp` at every site) gives the tokens of single-process `generate()` of the same
    rewritten model, logits within fp32 noise: MoBA sites sparse (prompt 53 tokens, block 8,
    top-2), the last layer dense, decode steps crossing block boundaries; a short prompt whose new
    tokens fill the later ranks in turn; a left-padded batch; an eos stops it; sampling from the same
    seed gives the same tokens as `generate(do_sample=True, ...)`."""
    from moba_rewrite.integrations.hf_cp_generate import generate

    model, _ = _tiny_llama("sdpa")
    model.eval()
    ids = torch.randint(0, 96, (2, 53), generator=torch.Generator().manual_seed(7))
    new = 14
    with torch.no_grad():
        ones = torch.ones_like(ids)  # explicit: generate() would read token 0 in the prompt as padding
        want = model.generate(ids, attention_mask=ones, max_new_tokens=new, do_sample=False, output_logits=True,
                              return_dict_in_generate=True, pad_token_id=0)
    got, logits = generate(model, ids, max_new_tokens=new, return_logits=True)
    assert torch.equal(got, want.sequences), (got[:, 53:], want.sequences[:, 53:])
    close("decode logits", logits, torch.stack(want.logits, dim=1), atol=1e-4)
    # a short prompt and many new tokens: later ranks start empty, decoding fills them in turn
    short = ids[:, :20]
    with torch.no_grad():
        want_long = model.generate(short, attention_mask=torch.ones_like(short), max_new_tokens=3 * 10 * ctx.world,
                                   do_sample=False, pad_token_id=0)
    got_long = generate(model, short, max_new_tokens=3 * 10 * ctx.world)
    assert torch.equal(got_long, want_long), (got_long[:, 20:], want_long[:, 20:])
    # an eos id taken from the reference's 5th token of row 0: that row stops, the other pads with it
    eos = int(want.sequences[0, 53 + 4])
    with torch.no_grad():
        want_eos = model.generate(ids, attention_mask=ones, max_new_tokens=new, do_sample=False, eos_token_id=eos,
                                  pad_token_id=eos)
    got_eos = generate(model, ids, max_new_tokens=new, eos_token_id=eos)
    assert torch.equal(got_eos, want_eos), (got_eos[:, 53:], want_eos[:, 53:])
    # no eos given: the generation config's list of them, and its pad id, as generate() takes them (Llama 3
    # checkpoints list several; before, this loop ignored the config and decoded every row to the end)
    saved = copy.deepcopy(model.generation_config)
    model.generation_config.eos_token_id = [95, eos]
    model.generation_config.pad_token_id = 1
    try:
        with torch.no_grad():
            want_config_eos = model.generate(ids, attention_mask=ones, max_new_tokens=new, do_sample=False)
        got_config_eos = generate(model, ids, max_new_tokens=new)
    finally:
        model.generation_config = saved
    assert torch.equal(got_config_eos, want_config_eos), (got_config_eos[:, 53:], want_config_eos[:, 53:])
    assert (want_config_eos[0, 53 + 5:] == 1).all()  # row 0 stopped at the eos and was padded
    # a left-padded batch (prompts of 53 and 41 tokens): transformers' positions, padding keys hidden
    mask = torch.ones_like(ids)
    mask[1, :12] = 0
    with torch.no_grad():
        want_padded = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, output_logits=True,
                                     return_dict_in_generate=True, pad_token_id=0)
    got_padded, padded_logits = generate(model, ids, attention_mask=mask, max_new_tokens=new, return_logits=True)
    assert torch.equal(got_padded, want_padded.sequences), (got_padded[:, 53:], want_padded.sequences[:, 53:])
    close("decode logits, left padding", padded_logits, torch.stack(want_padded.logits, dim=1), atol=1e-4)
    assert not torch.equal(got_padded[1], got[1]), "the padding mask changed nothing: it was not applied"
    # sampling: rank 0 draws with transformers' warpers from its generator, seeded as generate()'s
    sampling = dict(do_sample=True, temperature=0.15, top_k=20, top_p=0.9)  # this model's logits are flat
    torch.manual_seed(123)
    with torch.no_grad():
        want_sampled = model.generate(ids, attention_mask=ones, max_new_tokens=new, pad_token_id=0, **sampling)
    torch.manual_seed(123)
    got_sampled = generate(model, ids, max_new_tokens=new, **sampling)
    assert torch.equal(got_sampled, want_sampled), (got_sampled[:, 53:], want_sampled[:, 53:])
    assert not torch.equal(got_sampled, got), "sampling gave the greedy tokens: the draw was not used"


def hf_decoder_numbering_its_tokens_matches_unsharded(ctx):
    """BART's causal decoder takes no position_ids: it numbers the tokens it is given from its cache
    length and embeds those numbers (learned positions). Sharded, its position embedding gets the
    global positions (`hf_cp_positions`): prefill logits (both layouts, a length that needs
    alignment padding) and a training step's gradients equal one process's (before: refused; the cp
    sweep had found every shard restarting at 0, logits 0.64 off). Sharded-cache decoding equals
    `generate()`: BART's generation config forces the end token at the last step, which greedy
    decoding gets through transformers' own loop (before, the module's own loop skipped it: the last
    token differed); so does a Llama whose generation config sets a repetition penalty."""
    from transformers import BartConfig, BartForCausalLM

    import moba_rewrite as mr
    from moba_rewrite.integrations.hf_cp import context_parallel, shard_inputs
    from moba_rewrite.integrations.hf_cp_generate import generate
    from moba_rewrite.integrations.hf_generation_config import logits_processing

    cfg = BartConfig(vocab_size=96, d_model=32, decoder_layers=2, encoder_layers=2, decoder_attention_heads=4,
                     encoder_attention_heads=4, decoder_ffn_dim=64, encoder_ffn_dim=64, max_position_embeddings=256,
                     is_encoder_decoder=False, is_decoder=True, dropout=0.0, attention_dropout=0.0,
                     activation_dropout=0.0)
    torch.manual_seed(0)
    model = mr.rewrite(BartForCausalLM(cfg).eval(), _POLICY)
    ids = torch.randint(3, 96, (2, 90), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = model(input_ids=ids, use_cache=False).logits
    for layout in ("contiguous", "zigzag"):
        local_ids, pos, seq_len = shard_inputs(model, ids, layout=layout)
        with torch.no_grad(), context_parallel(model, layout=layout, seq_len=seq_len):
            local = model(input_ids=local_ids, position_ids=pos, use_cache=False).logits
        close(f"BART prefill logits [{layout}]", unshard_sequence(local, layout=layout, dim=1, seq_len=seq_len), want)
    weights = torch.randn(want.shape, generator=torch.Generator().manual_seed(6))
    model.zero_grad()
    (model(input_ids=ids, use_cache=False).logits * weights).sum().backward()
    want_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    local_ids, pos, seq_len = shard_inputs(model, ids, layout="zigzag")
    with context_parallel(model, layout="zigzag", seq_len=seq_len):
        local = model(input_ids=local_ids, position_ids=pos, use_cache=False).logits
    local_weights = shard_sequence(torch.nn.functional.pad(weights, (0, 0, 0, local.shape[1] * ctx.world - 90)),
                                   layout="zigzag", dim=1)
    (local * local_weights).sum().backward()
    assert model.model.decoder.embed_positions.weight.grad is not None
    got_grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(got_grads) == set(want_grads), set(got_grads) ^ set(want_grads)
    for name, grad in got_grads.items():
        grad = grad.clone()
        dist.all_reduce(grad)
        close(f"BART gradient {name}", grad, want_grads[name], atol=1e-4, relative=True)
    model.zero_grad()
    assert logits_processing(model) == {"forced_eos_token_id": cfg.eos_token_id}
    with torch.no_grad():
        ones = torch.ones_like(ids)
        want_gen = model.generate(ids, attention_mask=ones, max_new_tokens=6, do_sample=False, output_logits=True,
                                  return_dict_in_generate=True, pad_token_id=0)
    got, logits = generate(model, ids, max_new_tokens=6, pad_token_id=0, return_logits=True)
    assert torch.equal(got, want_gen.sequences), (got[:, 90:], want_gen.sequences[:, 90:])
    assert (got[:, -1] == cfg.eos_token_id).all()  # forced at the last step, as generate() does
    close("BART decode logits", logits, torch.stack(want_gen.logits, dim=1), atol=1e-4)
    llama, _ = _tiny_llama("sdpa")
    llama.eval()
    llama.generation_config.repetition_penalty = 5.0
    llama.generation_config.no_repeat_ngram_size = 2
    prompt = ids[:, :53]
    with torch.no_grad():
        want_llama = llama.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False,
                                    pad_token_id=0)
        plain = llama.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False,
                               pad_token_id=0, repetition_penalty=1.0, no_repeat_ngram_size=0)
    assert not torch.equal(want_llama, plain), "the penalty changed nothing: the check would not see it skipped"
    got_llama = generate(llama, prompt, max_new_tokens=12, pad_token_id=0)
    assert torch.equal(got_llama, want_llama), (got_llama[:, 53:], want_llama[:, 53:])


def hf_sharded_cache_beam_search_matches_generate(ctx):
    """Beam search over a sharded cache (transformers' own loop on every rank, the cache's rows and
    kept block means moving with the beams) gives single-process `generate(num_beams=...)`'s
    sequences: 3 beams, 2 returned, a length penalty; a left-padded batch; a one-token prompt; beam
    sampling from the same seed (other ranks seeded otherwise: rank 0's random state is used)."""
    from moba_rewrite.integrations.hf_cp_generate import generate

    model, _ = _tiny_llama("sdpa")
    model.eval()
    ids = torch.randint(0, 96, (2, 45), generator=torch.Generator().manual_seed(12))
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    cases = [("one prompt per row", ids, torch.ones_like(ids), dict(num_beams=3, num_return_sequences=2)),
             ("left padding, length penalty", ids, mask, dict(num_beams=3, length_penalty=0.5)),
             ("a one-token prompt", ids[:, :1], torch.ones_like(ids[:, :1]), dict(num_beams=2))]
    for name, prompt, prompt_mask, beams in cases:
        with torch.no_grad():
            want = model.generate(prompt, attention_mask=prompt_mask, max_new_tokens=12, do_sample=False,
                                  pad_token_id=0, **beams)
        got = generate(model, prompt, attention_mask=prompt_mask, max_new_tokens=12, pad_token_id=0, **beams)
        assert torch.equal(got, want), (name, got[:, prompt.shape[1]:], want[:, prompt.shape[1]:])
    with torch.no_grad():
        greedy = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                                pad_token_id=0)
    assert not torch.equal(generate(model, ids, max_new_tokens=12, pad_token_id=0, num_beams=3), greedy), \
        "beam search gave the greedy tokens: the test would not see a beam bug"
    # no eos given: the generation config's end id ends beams, as in generate() (an explicit None once
    # cleared it, so sharded beams decoded past the end: Jamba's hybrid test found it)
    with torch.no_grad():
        beams = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, num_beams=3,
                               do_sample=False, pad_token_id=0)
    saved = copy.deepcopy(model.generation_config)
    model.generation_config.eos_token_id = int(beams[1, 45 + 3])  # ends row 1's best beam early
    try:
        with torch.no_grad():
            want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, num_beams=3,
                                  do_sample=False, pad_token_id=0)
        got = generate(model, ids, max_new_tokens=12, pad_token_id=0, num_beams=3)
    finally:
        model.generation_config = saved
    assert not torch.equal(want, beams), "the config's eos changed nothing: the test would not see it"
    assert torch.equal(got, want), ("beams, the config's eos", got[:, 45:], want[:, 45:])
    # beam sampling: every rank draws from rank 0's random state (ranks seeded differently here)
    sample = dict(num_beams=3, do_sample=True, temperature=1.5, top_k=20, num_return_sequences=2)
    torch.manual_seed(7)
    with torch.no_grad():
        want = model.generate(ids, attention_mask=mask, max_new_tokens=12, pad_token_id=0, **sample)
    torch.manual_seed(7 if ctx.rank == 0 else 100 + ctx.rank)
    got = generate(model, ids, attention_mask=mask, max_new_tokens=12, pad_token_id=0, **sample)
    assert torch.equal(got, want), ("beam sampling", got[:, 45:], want[:, 45:])
    torch.manual_seed(8)
    with torch.no_grad():
        other = model.generate(ids, attention_mask=mask, max_new_tokens=12, pad_token_id=0, **sample)
    assert not torch.equal(other, want), "another seed drew the same tokens: the test would not see the draws"


def hf_dense_below_matches_unsharded(ctx):
    """A policy's `dense_below` holds under context parallelism as in one process: a prefill shorter
    than it is full attention (it once ran MoBA when sharded), a longer one MoBA; sharded-cache
    generation decodes densely until the cache holds `dense_below` tokens, then with MoBA, giving the
    tokens and logits of single-process `generate()`."""
    from moba_rewrite.integrations.hf_cp_generate import generate

    policy = {"version": 1, "defaults": {"mode": "moba", "block_size": 8, "top_k": 2, "dense_below": 128}}
    model, _ = _tiny_llama("sdpa", policy=policy)
    model.eval()
    dense, _ = _tiny_llama("sdpa", policy={"version": 1, "defaults": {"mode": "dense"}})  # same weights
    gen = torch.Generator().manual_seed(8)
    for t in (90, 200):  # below and above dense_below
        ids = torch.randint(0, 96, (1, t), generator=gen)
        with torch.no_grad():
            want = model(input_ids=ids, use_cache=False).logits
            full = dense(input_ids=ids, use_cache=False).logits
            assert ((want - full).abs().max() < 1e-5) == (t < 128), f"dense_below not applied in one process at {t}"
            for layout in ("contiguous", "zigzag"):
                close(f"logits [{t} tokens, {layout}]", _sharded_logits(model, ids, layout), want)
    prompt = torch.randint(0, 96, (1, 100), generator=gen)  # the cache crosses 128 while decoding
    with torch.no_grad():
        want = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=40, do_sample=False,
                              output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    got, logits = generate(model, prompt, max_new_tokens=40, return_logits=True)
    assert torch.equal(got, want.sequences), (got[:, 100:], want.sequences[:, 100:])
    close("decode logits", logits, torch.stack(want.logits, dim=1), atol=1e-4)


def recurrences_match_one_process(ctx):
    """The recurrences of hybrid stacks over a sharded sequence (`parallel.recurrence`) equal the
    model's own function on the whole sequence: the gated delta rule, Mamba-2's chunked scan,
    Mamba-1's selective scan (transformers' reference implementations) and a causal convolution;
    outputs, the state after the sequence and after a shorter real length, and the gradients of
    every input; both layouts. On a power-of-two group the states entering each chunk come from a
    scan by recursive doubling (log2 W summaries sent per rank and scan); on 3 ranks from the
    all-gather of every chunk's summary (W - 1 per rank and chunk)."""
    from transformers.models.jamba.modeling_jamba import mamba_selective_scan
    from transformers.models.mamba2.modeling_mamba2 import mamba2_chunk_scan
    from transformers.models.qwen3_next.modeling_qwen3_next import torch_chunk_gated_delta_rule

    from moba_rewrite.parallel.recurrence import causal_conv_cp, delta_rule_cp, selective_scan_cp, ssd_scan_cp

    pg = dist.group.WORLD
    gen = torch.Generator().manual_seed(21)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).requires_grad_()

    def whole_and_sharded(name, run_whole, run_sharded, inputs, seq_dims, layout, real_len):
        """Compare outputs, final states and input gradients of one rank's shard."""
        out, final = run_whole(*inputs)
        weight = torch.randn(out.shape, generator=gen)
        (out * weight).sum().backward()
        want_grads = [x.grad.clone() for x in inputs]
        local = [shard_sequence(x.detach(), layout=layout, dim=d).requires_grad_() if d is not None
                 else x.detach().clone().requires_grad_() for x, d in zip(inputs, seq_dims)]
        with record_traffic() as traffic:
            got, got_final = run_sharded(*local, layout=layout)
            (got * shard_sequence(weight, layout=layout, dim=seq_dims[0])).sum().backward()
        close(f"{name} output [{layout}]", got, shard_sequence(out.detach(), layout=layout, dim=seq_dims[0]))
        close(f"{name} final state [{layout}]", got_final, final.detach())
        for i, (x, want, d) in enumerate(zip(local, want_grads, seq_dims)):
            if d is None:  # a parameter: every rank holds part of its gradient
                dist.all_reduce(x.grad)
                close(f"{name} gradient of input {i} [{layout}]", x.grad, want, atol=5e-5)
            else:
                close(f"{name} gradient of input {i} [{layout}]", x.grad, shard_sequence(want, layout=layout, dim=d),
                      atol=5e-5)
        # after a shorter real length (the prefill of sharded-cache decoding)
        with torch.no_grad():
            cut = [x.detach().narrow(d, 0, real_len) if d is not None else x.detach() for x, d in zip(inputs, seq_dims)]
            _, want_state = run_whole(*cut)
            _, state = run_sharded(*[x.detach() for x in local], layout=layout, seq_len=real_len)
        close(f"{name} state after {real_len} tokens [{layout}]", state, want_state)
        return traffic.by_step.get("recurrent state summaries", 0)

    world, b, t = ctx.world, 2, 32 * ctx.world  # chunks of 16 (zigzag) or 32 tokens
    summaries_sent = {}
    for layout in ("contiguous", "zigzag"):
        chunks = 2 if layout == "zigzag" else 1
        h, d = 2, 8
        inputs = [rand(b, t, h, d), rand(b, t, h, d), rand(b, t, h, d), rand(b, t, h, scale=0.1), rand(b, t, h)]

        def rule_whole(q, k, v, g, beta):
            return torch_chunk_gated_delta_rule(q, k, v, g=-torch.nn.functional.softplus(g), beta=beta.sigmoid(),
                                                output_final_state=True, use_qk_l2norm_in_kernel=True, chunk_size=8)

        def rule_sharded(q, k, v, g, beta, layout, seq_len=None):
            return delta_rule_cp(torch_chunk_gated_delta_rule, q, k, v, -torch.nn.functional.softplus(g), beta.sigmoid(),
                                 pg=pg, layout=layout, final_state=True, seq_len=seq_len, use_qk_l2norm_in_kernel=True,
                                 chunk_size=8)
        sent = whole_and_sharded("delta rule", rule_whole, rule_sharded, inputs, [1] * 5, layout, t - 5)
        summaries_sent[("delta", layout)] = (sent, b * h * d * (d + d) * 4 * chunks)

        heads, p, n = 2, 4, 8
        a_log = torch.log(torch.rand(heads, generator=gen) * 0.5 + 0.1)
        inputs = [rand(b, t, heads, p), rand(b, t, heads, scale=0.3), rand(b, t, 1, n), rand(b, t, 1, n), rand(heads)]
        kw = dict(chunk_size=8, dt_softplus=True)

        def ssd_whole(x, dt, bb, cc, dt_bias):
            return mamba2_chunk_scan(x, dt, -a_log.exp(), bb, cc, dt_bias=dt_bias, return_final_states=True, **kw)

        def ssd_sharded(x, dt, bb, cc, dt_bias, layout, seq_len=None):
            return ssd_scan_cp(mamba2_chunk_scan, x, dt, -a_log.exp(), bb, cc, pg=pg, layout=layout, final_state=True,
                               seq_len=seq_len, dt_bias=dt_bias, **kw)
        sent = whole_and_sharded("Mamba-2 scan", ssd_whole, ssd_sharded, inputs, [1, 1, 1, 1, None], layout, t - 3)
        summaries_sent[("ssd", layout)] = (sent, b * heads * (p * n + 1) * 4 * chunks)

        channels = 6
        a = -torch.rand(channels, n, generator=gen) - 0.05
        inputs = [rand(b, channels, t), rand(b, channels, t, scale=0.3), rand(b, n, t), rand(b, n, t),
                  rand(b, channels, t), rand(channels)]

        def mamba_whole(u, delta, bb, cc, z, bias):
            out, state = mamba_selective_scan(u, delta, a, bb, cc, D=torch.ones(channels), z=z, delta_bias=bias,
                                              delta_softplus=True, return_last_state=True)
            return out, state

        def mamba_sharded(u, delta, bb, cc, z, bias, layout, seq_len=None):
            return selective_scan_cp(mamba_selective_scan, u, delta, a, bb, cc, pg=pg, layout=layout,
                                     D=torch.ones(channels), z=z, delta_bias=bias, delta_softplus=True,
                                     final_state=True, seq_len=seq_len)
        sent = whole_and_sharded("Mamba-1 scan", mamba_whole, mamba_sharded, inputs, [2, 2, 2, 2, 2, None], layout, t - 7)
        summaries_sent[("mamba1", layout)] = (sent, b * channels * n * 2 * 4 * chunks)

        conv = torch.nn.Conv1d(channels, channels, 4, groups=channels, padding=3)
        x = rand(b, channels, t)
        want = conv(x)[..., :t]
        weight = torch.randn(want.shape, generator=gen)
        (want * weight).sum().backward()
        local = shard_sequence(x.detach(), layout=layout, dim=2).requires_grad_()
        got = causal_conv_cp(lambda y: conv(y)[..., :y.shape[-1]], local, kernel_size=4, pg=pg, layout=layout)
        (got * shard_sequence(weight, layout=layout, dim=2)).sum().backward()
        close(f"convolution [{layout}]", got, shard_sequence(want.detach(), layout=layout, dim=2))
        close(f"convolution input gradient [{layout}]", local.grad, shard_sequence(x.grad, layout=layout, dim=2))
    # what each rank sent for the summaries, forward and backward alike (the backward is counted apart)
    doubling = world & (world - 1) == 0
    for (kind, layout), (sent, per_summary) in summaries_sent.items():
        chunks = 2 if layout == "zigzag" else 1
        rounds = (world.bit_length() - 1) if doubling else None
        expected = rounds * per_summary if doubling else (world - 1) * per_summary
        assert sent == expected, (kind, layout, sent, expected, per_summary // chunks)


def _tiny_hybrid(family: str, seed: int = 0):
    """A rewritten hybrid stack: gated delta nets (linear attention) between attention layers,
    MoBA at the attention layers (block 8, top-2: sparse at 96 tokens)."""
    import transformers

    import moba_rewrite as mr

    kinds = ["conv", "full_attention"] * 2 if family == "lfm2" else ["linear_attention", "full_attention"] * 2
    common = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=4, layer_types=kinds,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, linear_num_key_heads=2,
                  linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8, linear_conv_kernel_dim=4,
                  max_position_embeddings=512, tie_word_embeddings=False)
    if family == "qwen3_5":
        cfg, cls = transformers.Qwen3_5TextConfig(**common), transformers.Qwen3_5ForCausalLM
    elif family == "kimi_linear":  # Kimi's delta attention: a decay per channel; MLA at the attention layers
        cfg = transformers.KimiLinearConfig(
            vocab_size=96, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=4,
            layer_types=common["layer_types"], num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16,
            q_lora_rank=None, qk_rope_head_dim=8, v_head_dim=8, qk_nope_head_dim=8, num_experts=4,
            num_experts_per_token=2, linear_head_dim=8, linear_num_heads=4, pad_token_id=0, bos_token_id=1,
            eos_token_id=2, max_position_embeddings=512)
        cls = transformers.KimiLinearForCausalLM
    elif family == "bamba":  # Mamba-2 mixers (a scalar decay per head) between attention layers
        cfg = transformers.BambaConfig(
            vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=4, attn_layer_indices=[1, 3],
            num_attention_heads=4, num_key_value_heads=2, mamba_n_heads=4, mamba_d_head=16, mamba_d_state=16,
            mamba_chunk_size=16, max_position_embeddings=512, tie_word_embeddings=False, pad_token_id=0)
        cls = transformers.BambaForCausalLM
    elif family == "falcon_h1":  # attention and a Mamba-2 mixer side by side in every layer
        cfg = transformers.FalconH1Config(
            vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, mamba_d_ssm=64, mamba_n_heads=4, mamba_d_head=16, mamba_d_state=16,
            mamba_chunk_size=16, max_position_embeddings=512, tie_word_embeddings=False, pad_token_id=0)
        cls = transformers.FalconH1ForCausalLM
    elif family == "lfm2":  # gated short convolutions between attention layers
        cfg = transformers.Lfm2Config(
            vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=4, layer_types=common["layer_types"],
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
            pad_token_id=0)
        cls = transformers.Lfm2ForCausalLM
    elif family == "jamba":  # Mamba-1 mixers: a selective scan decaying per channel and state entry
        cfg = transformers.JambaConfig(
            vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=4, attn_layer_period=2,
            attn_layer_offset=1, num_attention_heads=4, num_key_value_heads=2, mamba_d_state=16, mamba_dt_rank=8,
            num_experts=1, max_position_embeddings=512, tie_word_embeddings=False, pad_token_id=0)
        cls = transformers.JambaForCausalLM
    else:
        cfg = transformers.Qwen3NextConfig(**common, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                           shared_expert_intermediate_size=16, decoder_sparse_step=1)
        cls = transformers.Qwen3NextForCausalLM
    torch.manual_seed(seed)
    model = cls(cfg)
    for module in model.modules():  # Mamba mixers: a slow decay and larger inputs, so that the state
        if hasattr(module, "A_log") and hasattr(module, "in_proj"):  # a chunk hands on shows in the logits
            with torch.no_grad():
                module.A_log.fill_(-4.0)
                bias = getattr(module, "dt_bias", None)
                if bias is None and getattr(module, "dt_proj", None) is not None:  # Mamba-1
                    bias = module.dt_proj.bias
                bias.fill_(0.0)
                module.in_proj.weight.mul_(8.0)
    mr.rewrite(model, {"version": 1, "defaults": {"mode": "moba", "block_size": 8, "top_k": 2}})
    return model


def _hybrid_decoding_matches_generate(family: str, model) -> None:
    """Sharded-cache decoding of a hybrid stack (the delta nets' states replicated, stored by the
    sharded prefill after the prompt's real tokens) gives `generate()`'s tokens and logits: greedy
    (a prompt that is not a whole number of blocks, so the prefill pads it), a left-padded batch,
    beam search (transformers' loop over the sharded cache: the states repeat and move with the
    beams)."""
    from moba_rewrite.integrations.hf_cp_generate import generate

    ids = torch.randint(0, 96, (2, 45), generator=torch.Generator().manual_seed(11))
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    new = 12
    for name, attention_mask in (("greedy", torch.ones_like(ids)), ("left padding", mask)):
        with torch.no_grad():
            want = model.generate(ids, attention_mask=attention_mask, max_new_tokens=new, do_sample=False,
                                  output_logits=True, return_dict_in_generate=True, pad_token_id=0)
        got, logits = generate(model, ids, attention_mask=attention_mask if name != "greedy" else None,
                               max_new_tokens=new, return_logits=True)
        assert torch.equal(got, want.sequences), (family, name, got[:, 45:], want.sequences[:, 45:])
        close(f"{family} decode logits ({name})", logits, torch.stack(want.logits, dim=1), atol=1e-4)
    with torch.no_grad():
        want_beams = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, num_beams=3,
                                    do_sample=False, pad_token_id=0)
    got_beams = generate(model, ids, max_new_tokens=6, num_beams=3)
    assert torch.equal(got_beams, want_beams), (family, "beams", got_beams[:, 45:], want_beams[:, 45:])


def hf_hybrid_recurrent_layers_match_unsharded(ctx):
    """Hybrid stacks (Qwen3.5, Qwen3-Next: gated delta nets carrying a recurrent state and a causal
    convolution between MoBA layers; Kimi Linear: delta attention decaying per channel; Bamba:
    Mamba-2 mixers; Falcon-H1: attention and Mamba-2 side by side in each layer; LFM2: gated short
    convolutions; Jamba: Mamba-1 mixers) under context parallelism: the sharded prefill's logits equal
    the unsharded run (both layouts, a length that needs padding, a left-padded batch), and a
    sharded training step's loss and gradients equal the unsharded step's; sharded-cache decoding
    equals `generate()` (`_hybrid_decoding_matches_generate`). Without the state carried across
    ranks the answer differs (checked: the linear layers see only their shard)."""
    from moba_rewrite.integrations import hf_cp_linear
    from moba_rewrite.integrations.hf_cp import context_parallel, shard_inputs

    for family in ("qwen3_5", "qwen3_next", "kimi_linear", "bamba", "falcon_h1", "lfm2", "jamba"):
        model = _tiny_hybrid(family).eval()
        assert len(hf_cp_linear.recurrent_layers(model)) == 2, family
        ids = torch.randint(0, 96, (2, 90), generator=torch.Generator().manual_seed(3))
        mask = torch.ones(2, 90, dtype=torch.long)
        mask[1, :5] = 0  # left padding, as generate() pads
        with torch.no_grad():
            want = model(input_ids=ids, use_cache=False).logits
            want_padded = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            for layout in ("contiguous", "zigzag"):
                close(f"{family} logits [{layout}]", _sharded_logits(model, ids, layout), want)
                got = _sharded_logits(model, ids, layout, mask=mask)
                close(f"{family} padded logits [{layout}]", got[mask.bool()], want_padded[mask.bool()])
            # The carried state matters: the same shards with the delta nets left local differ.
            local_ids, pos, seq_len = shard_inputs(model, ids, layout="contiguous")
            carried = (hf_cp_linear.delta_rule_cp, hf_cp_linear.causal_conv_cp, hf_cp_linear.ssd_scan_cp,
                       hf_cp_linear.selective_scan_cp)
            hf_cp_linear.delta_rule_cp = lambda rule, q, k, v, g, beta, pg, layout, final_state, **kw: rule(
                q, k, v, g=g, beta=beta, **kw)
            hf_cp_linear.causal_conv_cp = lambda conv, x, **kw: conv(x)
            hf_cp_linear.ssd_scan_cp = lambda scan, *a, pg, layout, final_state, **kw: scan(
                *a, return_final_states=final_state, **kw)
            hf_cp_linear.selective_scan_cp = lambda scan, *a, pg, layout, final_state, seq_len, **kw: scan(
                *a, return_last_state=final_state, **kw)
            try:
                with context_parallel(model, layout="contiguous", seq_len=seq_len):
                    local = model(input_ids=local_ids, position_ids=pos, use_cache=False).logits
            finally:
                (hf_cp_linear.delta_rule_cp, hf_cp_linear.causal_conv_cp, hf_cp_linear.ssd_scan_cp,
                 hf_cp_linear.selective_scan_cp) = carried
            alone = unshard_sequence(local, layout="contiguous", dim=1, seq_len=seq_len)
            # Falcon-H1 scales its Mamba branch down (muP multipliers): smaller, still 10x the tolerance
            assert (alone - want).abs().max() > 1e-4, f"{family}: the recurrent state made no difference"

        _hybrid_decoding_matches_generate(family, model)
        _training_step_matches_unsharded(family, model, "zigzag")


def _tiny_recurrent_gemma():
    """A rewritten RecurrentGemma (Griffin): two recurrent blocks (a causal convolution and an RG-LRU,
    both called inline, as a module and a method) and a local-attention layer (MoBA, block 8, top-2)."""
    import transformers

    import moba_rewrite as mr

    cfg = transformers.RecurrentGemmaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                            num_attention_heads=4, num_key_value_heads=2, lru_width=32,
                                            attention_window_size=64, conv1d_width=4,
                                            block_types=["recurrent", "recurrent", "attention"])
    torch.manual_seed(0)
    model = transformers.RecurrentGemmaForCausalLM(cfg)
    return mr.rewrite(model, {"version": 1, "defaults": {"mode": "moba", "block_size": 8, "top_k": 2}})


def hf_recurrent_gemma_matches_unsharded(ctx):
    """RecurrentGemma under context parallelism: its recurrent blocks' convolution and RG-LRU (a
    diagonal linear recurrence, `parallel.recurrence.diagonal_scan_cp`) carried across ranks, so the
    sharded prefill's logits (both layouts) and a training step's loss and gradients (both layouts)
    equal the unsharded model's; with the state left local they differ. Its decoding state lives on
    the modules: sharded-cache decoding refuses it in one line."""
    from moba_rewrite.integrations import hf_cp_linear
    from moba_rewrite.integrations.hf_cp_generate import generate

    model = _tiny_recurrent_gemma().eval()
    assert [name for name, _ in hf_cp_linear.recurrent_layers(model)] == [
        "model.layers.0.temporal_block", "model.layers.1.temporal_block"]
    ids = torch.randint(0, 96, (2, 90), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model(input_ids=ids, use_cache=False).logits
        for layout in ("contiguous", "zigzag"):
            close(f"recurrent_gemma logits [{layout}]", _sharded_logits(model, ids, layout), want)
        carried = hf_cp_linear.diagonal_scan_cp
        hf_cp_linear.diagonal_scan_cp = lambda scan, x, a, reset, **kw: scan(x, a, reset, None)
        try:
            alone = _sharded_logits(model, ids, "contiguous")
        finally:
            hf_cp_linear.diagonal_scan_cp = carried
        assert (alone - want).abs().max() > 1e-3, "the RG-LRU's state made no difference"
    for layout in ("contiguous", "zigzag"):
        _training_step_matches_unsharded("recurrent_gemma", _tiny_recurrent_gemma(), layout)
    with raises("keep their decoding state on the modules",
                "sharded-cache decoding of RecurrentGemma was not refused"):
        generate(model, ids[:, :40], max_new_tokens=2)


def _sliding_model(family: str, window: int | None, origin: str):
    import moba_rewrite as mr
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
                  attn_implementation=origin)
    torch.manual_seed(0)
    if family == "mistral":  # every layer a sliding window
        model = MistralForCausalLM(MistralConfig(sliding_window=window, **common))
    else:  # Qwen2: layer 0 full attention, layers 1-2 sliding windows
        model = Qwen2ForCausalLM(Qwen2Config(use_sliding_window=window is not None, sliding_window=window,
                                             max_window_layers=1, **common))
    mr.rewrite(model, _POLICY)
    return model.eval()


def hf_sliding_window_matches_unsharded(ctx):
    """Sliding-window models sharded = their unsharded rewrite: MoBA sites (block 8, top-2) and the
    dense last layer under the window's mask at global positions; a window shorter than a shard
    (the local mask shows it) and one longer (it does not: such a run once attended past the window
    with no error), both layouts, sdpa and eager, a padded batch, Mistral (every layer sliding)
    and Qwen2 (a full layer first); sharded-cache generation of both = single-process `generate()`."""
    from moba_rewrite.integrations.hf_cp import context_parallel, shard_attention_mask, shard_inputs

    t = 90
    gen = torch.Generator().manual_seed(9)
    ids = torch.randint(0, 96, (2, t), generator=gen)
    mask = torch.ones(2, t, dtype=torch.long)
    mask[1, :7] = 0  # left padding in row 1
    positions = torch.arange(t).expand(2, -1)
    for family, window, origin in (("mistral", 20, "sdpa"), ("mistral", 60, "sdpa"), ("mistral", 60, "eager"),
                                   ("qwen2", 28, "sdpa")):
        model = _sliding_model(family, window, origin)
        with torch.no_grad():
            want = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
            no_window = _sliding_model(family, None, origin)(input_ids=ids, attention_mask=mask,
                                                              position_ids=positions, use_cache=False).logits
            real = mask.bool()
            assert (no_window - want)[real].abs().max() > 1e-3, "the window changes nothing: the test would not see it"
            for layout in ("contiguous", "zigzag"):
                got = _sharded_logits(model, ids, layout, mask=mask)
                close(f"logits [{family} window {window} {origin} {layout}]", got[real], want[real])
    # only the window's keys travel: rank r sends rank r + 1 the tokens from the block holding the
    # window's start (MoBA layers, block 8) or the window's start itself (the dense last layer)
    model = _sliding_model("mistral", 20, "sdpa")
    local_ids, pos, seq_len = shard_inputs(model, ids, layout="contiguous")
    with torch.no_grad(), record_traffic() as traffic, context_parallel(model, seq_len=seq_len):
        model(input_ids=local_ids, position_ids=pos, use_cache=False)
    t_local = local_ids.shape[1]
    tokens = 0 if ctx.rank == ctx.world - 1 else 2 * (t_local - (t_local - 19) // 8 * 8) + 19
    assert traffic.by_step.get("window keys/values", 0) == tokens * 2 * 2 * (8 + 8) * 4, traffic.by_step
    # sharded-cache decoding: the windows (20 and 28 keys) cross ranks; generate() decodes the
    # sliding layers densely in their window (their cache drops MoBA's blocks), the full layer with MoBA
    from moba_rewrite.integrations.hf_cp_generate import generate

    for family, window in (("mistral", 20), ("qwen2", 28)):
        model = _sliding_model(family, window, "sdpa")
        prompt, prompt_mask = ids[:, :40], mask[:, :40]
        with torch.no_grad():
            want = model.generate(prompt, attention_mask=prompt_mask, max_new_tokens=14, do_sample=False,
                                  output_logits=True, return_dict_in_generate=True, pad_token_id=0)
        got, logits = generate(model, prompt, attention_mask=prompt_mask, max_new_tokens=14, return_logits=True)
        assert torch.equal(got, want.sequences), (family, got[:, 40:], want.sequences[:, 40:])
        close(f"decode logits [{family} window {window}]", logits, torch.stack(want.logits, dim=1), atol=1e-4)
    # gradients: the summed local losses of a sharded step = the whole sequence's loss
    model = _sliding_model("mistral", 20, "sdpa")
    weights = torch.randn(2, t, 96, generator=gen) * mask[..., None]
    (model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits * weights).sum().backward()
    want_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    local_ids, pos, seq_len = shard_inputs(model, ids, layout="zigzag")
    local_weights = shard_sequence(weights, layout="zigzag", dim=1, block_size=8)
    with context_parallel(model, layout="zigzag", seq_len=seq_len):
        local = model(input_ids=local_ids, position_ids=pos, attention_mask=shard_attention_mask(model, mask, layout="zigzag"),
                      use_cache=False).logits
        (local * local_weights).sum().backward()
    for n, p in model.named_parameters():
        dist.all_reduce(p.grad)
        close(f"gradient of {n}", p.grad, want_grads[n], atol=1e-4)


def _chunked_llama4(chunk: int):
    """Llama 4 text, three layers: 0 and 1 chunked attention (`chunk` tokens), 2 full attention (no
    RoPE, its queries scaled by a temperature of the token index that changes every 8 tokens), every
    one an MoE layer; rewritten by the hybrid policy (MoBA block 8 / top-2, last layer dense)."""
    import moba_rewrite as mr
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    cfg = Llama4TextConfig(vocab_size=96, hidden_size=32, intermediate_size=64, intermediate_size_mlp=64,
                           num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                           num_local_experts=2, max_position_embeddings=512, attention_chunk_size=chunk,
                           no_rope_layers=[1, 1, 0], floor_scale=8, attn_scale=1.0, tie_word_embeddings=False,
                           attn_implementation="sdpa")
    assert cfg.layer_types == ["chunked_attention"] * 2 + ["full_attention"], cfg.layer_types
    torch.manual_seed(0)
    model = Llama4ForCausalLM(cfg)
    mr.rewrite(model, _POLICY)
    return model.eval()


def hf_chunked_attention_matches_unsharded(ctx):
    """Llama 4's chunked attention (chunks of 20 tokens: they cross shards and MoBA's blocks) sharded
    = the unsharded rewrite: a MoBA site and a dense site under the chunked mask at global positions,
    both layouts, a left-padded batch (chunks counted from each row's first real token), packed
    documents (chunks of each document's positions), training gradients, sharded-cache decoding
    (greedy and beam search); only the chunk's keys travel. The NoPE layer's query temperature is
    taken at global token indices (each shard counted from 0 before: 1.6e-3 off)."""
    from moba_rewrite.integrations.hf_cp import context_parallel, shard_attention_mask, shard_inputs

    t = 90
    gen = torch.Generator().manual_seed(13)
    ids = torch.randint(0, 96, (2, t), generator=gen)
    mask = torch.ones(2, t, dtype=torch.long)
    mask[1, :7] = 0  # left padding in row 1: its chunks start at token 7
    real = mask.bool()
    positions = torch.arange(t).expand(2, -1)
    model = _chunked_llama4(20)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
        whole = _chunked_llama4(4096)(input_ids=ids, attention_mask=mask, position_ids=positions,
                                      use_cache=False).logits
        assert (whole - want)[real].abs().max() > 1e-3, "the chunks change nothing: the test would not see it"
        for layout in ("contiguous", "zigzag"):
            got = _sharded_logits(model, ids, layout, mask=mask)
            close(f"chunked logits [{layout}]", got[real], want[real])
        packed = torch.cat([torch.cat([torch.arange(n) for n in lengths])[None]
                            for lengths in ((23, 40, 27), (45, 45))])
        want = model(input_ids=ids, position_ids=packed, use_cache=False).logits
        for layout in ("contiguous", "zigzag"):
            local_ids, local_pos, seq_len = shard_inputs(model, ids, layout=layout, position_ids=packed)
            with context_parallel(model, layout=layout, seq_len=seq_len, packed=True):
                local = model(input_ids=local_ids, position_ids=local_pos, use_cache=False).logits
            close(f"chunked packed logits [{layout}]", unshard_sequence(local, layout=layout, dim=1, seq_len=seq_len),
                  want)
        # only what the chunks need travels: each rank's first query's chunk, from the block holding
        # its start (the two chunked layers are MoBA sites, block 8); shards aligned to the chunks
        # (chunks of 24 tokens in shards of 48 or 24) exchange nothing
        for size in (20, 24):
            chunked = model if size == 20 else _chunked_llama4(size)
            local_ids, pos, seq_len = shard_inputs(chunked, ids, layout="contiguous")
            with record_traffic() as traffic, context_parallel(chunked, seq_len=seq_len):
                chunked(input_ids=local_ids, position_ids=pos, use_cache=False)
            t_local = local_ids.shape[1]
            start = (ctx.rank + 1) * t_local  # the next rank's first token
            tokens = 0 if ctx.rank == ctx.world - 1 else start - start // size * size // 8 * 8
            assert traffic.by_step.get("window keys/values") == 2 * tokens * 2 * 2 * (8 + 8) * 4, \
                (size, traffic.by_step)
            assert "all-gathered keys/values" not in traffic.by_step, traffic.by_step
    # sharded-cache decoding (greedy and beam search, the left-padded batch): generate() decodes the
    # chunked layers densely in their chunk, counted from each row's first real token
    from moba_rewrite.integrations.hf_cp_generate import generate

    prompt, prompt_mask = ids[:, :37], mask[:, :37]
    with torch.no_grad():
        want = model.generate(prompt, attention_mask=prompt_mask, max_new_tokens=14, do_sample=False,
                              output_logits=True, return_dict_in_generate=True, pad_token_id=0)
        beams = model.generate(prompt, attention_mask=prompt_mask, max_new_tokens=8, do_sample=False, num_beams=2,
                               pad_token_id=0)
    got, logits = generate(model, prompt, attention_mask=prompt_mask, max_new_tokens=14, return_logits=True)
    assert torch.equal(got, want.sequences), (got[:, 37:], want.sequences[:, 37:])
    close("chunked decode logits", logits, torch.stack(want.logits, dim=1), atol=1e-4)
    got = generate(model, prompt, attention_mask=prompt_mask, max_new_tokens=8, num_beams=2, pad_token_id=0)
    assert torch.equal(got, beams), (got[:, 37:], beams[:, 37:])
    weights = torch.randn(2, t, 96, generator=gen) * mask[..., None]
    (model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits * weights).sum().backward()
    want_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    local_ids, pos, seq_len = shard_inputs(model, ids, layout="zigzag")
    with context_parallel(model, layout="zigzag", seq_len=seq_len):
        local = model(input_ids=local_ids, position_ids=pos, use_cache=False,
                      attention_mask=shard_attention_mask(model, mask, layout="zigzag")).logits
        (local * shard_sequence(weights, layout="zigzag", dim=1, block_size=8)).sum().backward()
    for n, p in model.named_parameters():
        if n in want_grads:
            dist.all_reduce(p.grad)
            close(f"chunked gradient of {n}", p.grad, want_grads[n], atol=1e-4)


def _position_dependent_rope_models() -> list[tuple[str, torch.nn.Module]]:
    """Models whose rotary frequencies depend on the largest position they are given: Phi-3 with
    LongRoPE (long factors past `original_max_position_embeddings` = 64) and Llama with dynamic NTK
    scaling (past `max_position_embeddings` = 64); the hybrid policy."""
    import moba_rewrite as mr
    from transformers import LlamaConfig, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM

    common = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=False, attn_implementation="sdpa")
    half = 32 // 4 // 2  # rotary dim / 2
    phi = Phi3Config(max_position_embeddings=256, original_max_position_embeddings=64, pad_token_id=0,
                     rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                      "short_factor": [1.0] * half, "long_factor": [4.0 + i for i in range(half)],
                                      "original_max_position_embeddings": 64}, **common)
    llama = LlamaConfig(max_position_embeddings=64, rope_parameters={"rope_type": "dynamic", "factor": 4.0,
                                                                     "rope_theta": 10000.0}, **common)
    models = []
    for name, cfg, cls in (("phi3 longrope", phi, Phi3ForCausalLM), ("llama dynamic", llama, LlamaForCausalLM)):
        torch.manual_seed(0)
        models.append((name, mr.rewrite(cls(cfg), _POLICY).eval()))
    return models


def hf_rope_scaled_by_the_longest_position_matches_unsharded(ctx):
    """Rotary embeddings whose frequencies follow the largest position of the call (LongRoPE's long or
    short factors, dynamic NTK's base): sharded, every rank uses the whole sequence's largest real
    position, as one process does (a shard's own is smaller on all but the last rank), in a prefill
    (both layouts, a left-padded batch; alignment padding past the real length excluded) and in
    sharded-cache decoding. Before, LongRoPE was 0.166 off, dynamic NTK (with the padding) 0.073."""
    t = 90  # past the models' 64 original positions; a shard (48 tokens) is not
    gen = torch.Generator().manual_seed(17)
    ids = torch.randint(0, 96, (2, t), generator=gen)
    mask = torch.ones(2, t, dtype=torch.long)
    mask[1, :7] = 0
    real = mask.bool()
    positions = torch.arange(t).expand(2, -1)
    for name, model in _position_dependent_rope_models():
        with torch.no_grad():
            want = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
            for layout in ("contiguous", "zigzag"):
                got = _sharded_logits(model, ids, layout, mask=mask)
                close(f"logits [{name} {layout}]", got[real], want[real])
    from moba_rewrite.integrations.hf_cp_generate import generate

    prompt, prompt_mask = ids[:, :70], mask[:, :70]  # a 70-token prompt: past the 64 original positions
    # fresh copies for each run: dynamic NTK keeps the longest length it has seen (transformers' own
    # generate() twice on one model differs too)
    for (name, model), (_, fresh) in zip(_position_dependent_rope_models(), _position_dependent_rope_models()):
        with torch.no_grad():
            want = model.generate(prompt, attention_mask=prompt_mask, max_new_tokens=10, do_sample=False,
                                  output_logits=True, return_dict_in_generate=True, pad_token_id=0)
        got, logits = generate(fresh, prompt, attention_mask=prompt_mask, max_new_tokens=10, return_logits=True,
                               pad_token_id=0)
        assert torch.equal(got, want.sequences), (name, got[:, 70:], want.sequences[:, 70:])
        close(f"decode logits [{name}]", logits, torch.stack(want.logits, dim=1), atol=1e-4)


def hf_packed_sequences_match_unsharded(ctx):
    """Packed documents (position ids restarting at each; no attention_mask, so transformers masks
    each token to its own document): sharded with `packed=True` = the unsharded run, MoBA sites
    (block 8, top-2) and the dense last layer, both layouts, two rows packed differently (a
    document starting inside a shard, one exactly at a shard edge), Llama (sdpa, eager) and
    Mistral (sliding window of 20 as well), and in rows of 5 queries per call; gradients of a
    training step too. Without `packed=True` such position ids are one clear error."""
    from moba_rewrite.integrations import hf_cp
    from moba_rewrite.integrations.hf_cp import context_parallel, shard_inputs

    t = 90
    gen = torch.Generator().manual_seed(11)
    ids = torch.randint(0, 96, (2, t), generator=gen)
    pos = torch.cat([torch.cat([torch.arange(n) for n in lengths])[None] for lengths in ((23, 40, 27), (48, 30, 12))])
    models = [("llama sdpa", _tiny_llama("sdpa")[0]), ("llama eager", _tiny_llama("eager")[0]),
              ("mistral window 20", _sliding_model("mistral", 20, "sdpa")),
              ("llama sdpa, rows of 5 queries", _tiny_llama("sdpa")[0])]
    rows_elems = hf_cp._ROWS_ELEMS
    for name, model in models:
        model.eval()
        # the gathered attention runs its queries in rows of bounded memory: 5 queries (not a block) per call
        hf_cp._ROWS_ELEMS = 2 * 5 * t if "rows of 5" in name else rows_elems
        with torch.no_grad():
            want = model(input_ids=ids, position_ids=pos, use_cache=False).logits
            whole = model(input_ids=ids, use_cache=False).logits
            assert (whole - want)[:, 30:].abs().max() > 1e-3, "packing changes nothing: the test would not see it"
            for layout in ("contiguous", "zigzag"):
                local_ids, local_pos, seq_len = shard_inputs(model, ids, layout=layout, position_ids=pos)
                with context_parallel(model, layout=layout, seq_len=seq_len, packed=True):
                    local = model(input_ids=local_ids, position_ids=local_pos, use_cache=False).logits
                close(f"packed logits [{name} {layout}]", unshard_sequence(local, layout=layout, dim=1,
                                                                           seq_len=seq_len), want)
    hf_cp._ROWS_ELEMS = rows_elems
    model = _tiny_llama("sdpa")[0]
    weights = torch.randn(2, t, 96, generator=gen)
    (model(input_ids=ids, position_ids=pos, use_cache=False).logits * weights).sum().backward()
    want_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    local_ids, local_pos, seq_len = shard_inputs(model, ids, layout="zigzag", position_ids=pos)
    with context_parallel(model, layout="zigzag", seq_len=seq_len, packed=True):
        local = model(input_ids=local_ids, position_ids=local_pos, use_cache=False).logits
        (local * shard_sequence(weights, layout="zigzag", dim=1, block_size=8)).sum().backward()
    for n, p in model.named_parameters():
        dist.all_reduce(p.grad)
        close(f"packed gradient of {n}", p.grad, want_grads[n], atol=1e-4)
    local_ids, local_pos, seq_len = shard_inputs(model, ids, position_ids=pos)
    with raises("for packed sequences, positions restarting at each document, pass packed=True",
                "restarting position ids ran without packed=True"):
        with torch.no_grad(), context_parallel(model, seq_len=seq_len):
            model(input_ids=local_ids, position_ids=local_pos, use_cache=False)


def _function_site_models() -> list[tuple[str, torch.nn.Module]]:
    """Models whose attention sites call their own attention function under context parallelism
    (MoBA cannot honour it): Gemma 2 (soft-capping, every other layer a sliding window of 24) and
    gpt-oss (sinks, sliding windows of 16), eager attention."""
    import moba_rewrite as mr
    from transformers import Gemma2Config, Gemma2ForCausalLM, GptOssConfig, GptOssForCausalLM

    common = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, max_position_embeddings=512, attn_implementation="eager")
    torch.manual_seed(0)
    gemma = Gemma2ForCausalLM(Gemma2Config(sliding_window=24, **common))
    torch.manual_seed(0)
    oss = GptOssForCausalLM(GptOssConfig(sliding_window=16, num_local_experts=4, num_experts_per_tok=2, **common))
    with torch.no_grad():  # sinks that matter (zero at init)
        for layer in oss.model.layers:
            layer.self_attn.sinks.normal_()
    return [(name, mr.rewrite(model, _POLICY).eval()) for name, model in (("gemma2", gemma), ("gpt_oss", oss))]


def hf_model_attention_functions_in_pieces(ctx):
    """Sites that run the model's own attention function (soft-capping, sinks) sharded = the
    unsharded rewrite, with a padded batch, both layouts, in one call per chunk and in pieces of 3
    queries per call (each over the keys its queries can see: no `[T_local, T]` mask); gradients
    of the pieces too. Before, each rank called the function once with a `[T_local, T]` mask."""
    from moba_rewrite.integrations import hf_cp
    from moba_rewrite.integrations.hf_cp import context_parallel, shard_attention_mask, shard_inputs

    t = 90
    mask = _padded_batch(t).long()
    real = mask.bool()
    ids = torch.randint(0, 96, (3, t), generator=torch.Generator().manual_seed(5))
    positions = torch.arange(t).expand(3, -1)
    score_elems, dense_call, masks = hf_cp._SCORE_ELEMS, hf_cp.hf._dense_call, []

    def recording(origin, module, query, key, value, attention_mask, *args, **kwargs):
        masks.append(tuple(attention_mask.shape))
        return dense_call(origin, module, query, key, value, attention_mask, *args, **kwargs)

    hf_cp.hf._dense_call = recording
    try:
        for name, model in _function_site_models():
            with torch.no_grad():
                want = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
            for pieces, layout in ((None, "contiguous"), (3, "zigzag"), (3, "contiguous")):
                hf_cp._SCORE_ELEMS = 3 * 3 * 4 * t if pieces else score_elems  # rows x (batch x heads x keys)
                local_ids, pos, seq_len = shard_inputs(model, ids, layout=layout)
                local_mask = shard_attention_mask(model, mask, layout=layout)
                with torch.no_grad(), context_parallel(model, layout=layout, seq_len=seq_len):
                    local = model(input_ids=local_ids, position_ids=pos, attention_mask=local_mask,
                                  use_cache=False).logits
                got = unshard_sequence(local, layout=layout, dim=1, seq_len=seq_len)
                close(f"logits [{name} {layout} pieces {pieces}]", got[real], want[real], atol=1e-4)
                if pieces:  # each call's mask: at most 3 queries; a sliding layer's over its window's keys only
                    assert masks and max(m[-2] for m in masks) <= 3 and max(m[-1] for m in masks) <= t, masks
                    assert min(m[-1] for m in masks) <= 24 + 2, masks
                masks.clear()
        model = _function_site_models()[0][1]
        weights = torch.randn(3, t, 96, generator=torch.Generator().manual_seed(6)) * mask[..., None]
        (model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
         * weights).sum().backward()
        want_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad()
        hf_cp._SCORE_ELEMS = 3 * 3 * 4 * t
        local_ids, pos, seq_len = shard_inputs(model, ids, layout="zigzag")
        with record_traffic() as traffic, context_parallel(model, layout="zigzag", seq_len=seq_len):
            local = model(input_ids=local_ids, position_ids=pos, use_cache=False,
                          attention_mask=shard_attention_mask(model, mask, layout="zigzag")).logits
            (local * shard_sequence(weights, layout="zigzag", dim=1, block_size=hf_cp.alignment(model))).sum().backward()
        # the full layer's K/V all-gathered and their gradients reduce-scattered: the same bytes each way
        gathered = traffic.by_step.get("all-gathered keys/values", 0)
        assert gathered > 0 and traffic.by_step.get("all-gathered keys/values (gradients)") == gathered, traffic.by_step
        for n, p in model.named_parameters():
            if n in want_grads:
                dist.all_reduce(p.grad)
                close(f"gradient of {n}", p.grad, want_grads[n], atol=1e-4)
    finally:
        hf_cp._SCORE_ELEMS, hf_cp.hf._dense_call = score_elems, dense_call


def hf_bad_inputs(ctx):
    """Forgotten position_ids, a 4-D attention mask, a model that was not rewritten, a convolution
    over the sharded sequence, a bias in the mask (Falcon's ALiBi, in a prefill and in sharded-cache
    decoding: it ran without the bias, 0.046 off): one clear error each."""
    import moba_rewrite as mr
    from transformers import FalconConfig, FalconForCausalLM, LlamaConfig, LlamaForCausalLM

    from moba_rewrite.integrations.hf_cp import context_parallel, shard_inputs
    from moba_rewrite.integrations.hf_cp_generate import generate

    torch.manual_seed(0)
    falcon = mr.rewrite(FalconForCausalLM(FalconConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2,
                                                       num_attention_heads=4, alibi=True, attn_implementation="sdpa")),
                        _POLICY).eval()
    ids = torch.randint(0, 96, (1, 40), generator=torch.Generator().manual_seed(3))
    for run in (lambda: _sharded_logits(falcon, ids, "contiguous"), lambda: generate(falcon, ids, max_new_tokens=2)):
        with raises("holding a bias (values other than 0 / -inf, e.g. ALiBi)",
                    "Falcon's ALiBi ran sharded without its bias"):
            with torch.no_grad():
                run()

    model, _ = _tiny_llama()
    ids = torch.randint(0, 96, (1, 64), generator=torch.Generator().manual_seed(4))
    local_ids, pos, seq_len = shard_inputs(model, ids)
    with torch.no_grad(), context_parallel(model, seq_len=seq_len):
        for kwargs, words in (({}, "position_ids"),
                              ({"position_ids": pos, "attention_mask": torch.ones(1, 1, 32, 32, dtype=torch.bool)},
                               "2-D padding mask"),
                              ({"position_ids": pos, "attention_mask": torch.ones(1, 64, dtype=torch.long)},
                               "shard_attention_mask), got (1, 64)")):
            with raises(words, "it ran"):
                model(input_ids=local_ids, use_cache=False, **kwargs)
    for kwargs, words in (({"dense": "allgather"}, "dense must be one of 'ring', 'gather', got 'allgather'"),
                          ({"packed": "yes"}, "packed must be True or False")):
        with raises(words, "it ran"):
            with context_parallel(model, seq_len=seq_len, **kwargs):
                pass
    for kwargs, words in (({"max_new_tokens": 0}, "max_new_tokens must be a positive integer"),
                          ({"max_new_tokens": 2, "do_sample": True, "temperature": 0.0}, "temperature must be positive"),
                          ({"max_new_tokens": 2, "attention_mask": torch.ones(1, 3)}, "attention_mask must be the"),
                          ({"max_new_tokens": 2, "input_ids": ids.float()}, "input_ids must be integer token ids")):
        with raises(words, "it ran"):
            generate(model, **{"input_ids": ids, **kwargs})
    # a window whose cache layer keeps every key (so one process decodes MoBA under the window's
    # mask, which the sharded cache does not do): one clear error
    odd = _sliding_model("mistral", 20, "sdpa")
    odd.config.layer_types = ["full_attention"] * odd.config.num_hidden_layers
    with raises("decodes MoBA under a sliding window of 20 keys",
                "sharded-cache decoding ran MoBA under a window it does not apply"):
        generate(odd, ids[:, :40], max_new_tokens=2)
    # a sequence convolution refuses the forward it runs in; one that does not run is left alone
    # (Phi-4-multimodal's audio tower in a text-only forward)
    conv_model = _tiny_llama()[0].eval()
    mlp = conv_model.model.layers[0].mlp
    mlp.conv = torch.nn.Conv1d(32, 32, 3, padding=1)
    local_ids, pos, seq_len = shard_inputs(conv_model, ids)
    with torch.no_grad():
        want = conv_model(input_ids=ids, use_cache=False).logits
        with context_parallel(conv_model, seq_len=seq_len):
            got = conv_model(input_ids=local_ids, position_ids=pos, use_cache=False).logits
        close("logits with an idle convolution", unshard_sequence(got, dim=1, seq_len=seq_len), want)
        plain_forward = mlp.forward
        mlp.forward = lambda x: plain_forward(mlp.conv(x.transpose(1, 2)).transpose(1, 2))
        with raises("the convolution LlamaMLP.conv ran on a sharded forward",
                    "a convolution over the sequence ran on one shard's tokens"):
            with context_parallel(conv_model, seq_len=seq_len):
                conv_model(input_ids=local_ids, position_ids=pos, use_cache=False)
    plain = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2))
    with raises("not a rewritten", "an unrewritten model was accepted"):
        with context_parallel(plain):
            pass


def fsdp2_and_context_parallel_training_step(ctx):
    """4 ranks, 2-D mesh (dp=2, cp=2): FSDP2 (HSDP over the mesh) shards the rewritten model, each
    dp rank takes one sequence, its cp pair splits it. The loss and the parameters after one SGD
    step equal the single-process step on the whole batch."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from moba_rewrite.integrations.hf_cp import context_parallel, shard_inputs

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "cp"))
    ids = torch.randint(0, 96, (2, 64), generator=torch.Generator().manual_seed(5))
    labels = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], dim=1)
    n_labels = int((labels != -100).sum())
    lr = 0.5

    ref, _ = _tiny_llama(seed=7)
    ref.train()
    logits = ref(input_ids=ids, use_cache=False).logits
    ref_loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100,
                                                 reduction="sum") / n_labels
    ref_loss.backward()
    with torch.no_grad():
        for prm in ref.parameters():
            prm -= lr * prm.grad

    model, _ = _tiny_llama(seed=7)
    model.train()
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    cp = mesh["cp"]
    row = mesh.get_local_rank("dp")
    local_ids, pos, seq_len = shard_inputs(model, ids[row:row + 1], cp, layout="zigzag")
    local_labels = shard_sequence(labels[row:row + 1], cp, "zigzag", dim=1, block_size=8, pad_value=-100)
    with context_parallel(model, cp, layout="zigzag", seq_len=seq_len):
        local_logits = model(input_ids=local_ids, position_ids=pos, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(local_logits.flatten(0, 1), local_labels.flatten(),
                                                 ignore_index=-100, reduction="sum") / n_labels
        # The local losses sum to the global mean loss; FSDP averages gradients over the 4 ranks
        # (setting its divide factor to 1 needs PREMUL_SUM, which gloo lacks), so scale by 4.
        (loss * ctx.world).backward()
    total = loss.detach().clone()
    dist.all_reduce(total)
    close("loss", total, ref_loss.detach(), atol=1e-5)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    opt.step()
    ref_params = dict(ref.named_parameters())
    for name, prm in model.named_parameters():
        close(f"parameter {name} after the step", prm.full_tensor(), ref_params[name].detach(), atol=1e-5)


SUITES = {
    "two": [op_causal_contiguous, op_non_causal, op_gqa_zigzag_causal, op_gqa_zigzag_non_causal, op_padding,
            op_key_padding_mask,
            op_uneven_hits_and_top_k_extremes, op_half_and_double_precision, op_every_exchange_mode,
            op_value_head_dim_of_its_own, op_triton_local_attention,
            dense_sdpa_cp_matches_whole_sequence, decode_against_a_sharded_cache,
            traffic_only_selected_blocks, traffic_auto_spares_the_owners,
            shard_round_trip,
            bad_inputs_fail_on_every_rank, hf_prefill_matches_unsharded, hf_eager_encoder_matches_unsharded,
            hf_padded_batch_matches_unsharded, hf_dense_below_matches_unsharded,
            hf_sliding_window_matches_unsharded, hf_packed_sequences_match_unsharded, hf_chunked_attention_matches_unsharded,
            hf_rope_scaled_by_the_longest_position_matches_unsharded,
            hf_model_attention_functions_in_pieces, hf_sharded_cache_generate_matches_generate, hf_sharded_cache_beam_search_matches_generate,
            hf_decoder_numbering_its_tokens_matches_unsharded, recurrences_match_one_process,
            hf_hybrid_recurrent_layers_match_unsharded, hf_recurrent_gemma_matches_unsharded,
            hf_contiguous_training_step_matches_unsharded,
            hf_compiled_model_matches_unsharded, hf_autocast_training_step_matches_unsharded, hf_bad_inputs, dead_rank_is_one_clear_error],
    "four": [op_causal_contiguous, op_gqa_zigzag_causal, op_padding, op_key_padding_mask, op_uneven_hits_and_top_k_extremes,
             op_every_exchange_mode, traffic_auto_spares_the_owners, dense_sdpa_cp_matches_whole_sequence,
             decode_against_a_sharded_cache, bad_inputs_fail_on_every_rank, hf_sharded_cache_generate_matches_generate,
             hf_sharded_cache_beam_search_matches_generate,
             hf_sliding_window_matches_unsharded, hf_packed_sequences_match_unsharded, hf_chunked_attention_matches_unsharded,
             hf_model_attention_functions_in_pieces, recurrences_match_one_process, hf_hybrid_recurrent_layers_match_unsharded,
             hf_recurrent_gemma_matches_unsharded,
             hf_contiguous_training_step_matches_unsharded, fsdp2_and_context_parallel_training_step],
    "three": [recurrences_match_one_process, dense_sdpa_cp_matches_whole_sequence],  # not a power of two
}

# --------------------------------------------------------------------------------------------
# Rank entry point

_RESULTS: dict[str, str] = {}
_OUT: Path | None = None


def _write(ctx: Ctx) -> None:
    path = _OUT / f"rank{ctx.rank}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(_RESULTS))
    os.replace(tmp, path)


def _write_and_exit(ctx: Ctx, status: str) -> None:
    _RESULTS["dead_rank_is_one_clear_error"] = status
    _write(ctx)
    os._exit(0)


def rank_main(rank: int, world: int, port: int, out_dir: str, suite: str) -> None:
    global _OUT
    _OUT = Path(out_dir)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=TIMEOUT_S))
    ctx = Ctx(rank, world)
    cases = SUITES[suite]
    only = os.environ.get("MOBA_CP_CASES")  # a comma-separated subset, for working on one case
    if only:
        cases = [c for c in cases if c.__name__ in only.split(",")]
    for i, case in enumerate(cases):
        torch.manual_seed(0)
        try:
            case(ctx)
            _RESULTS[case.__name__] = "ok"
        except Exception:
            _RESULTS[case.__name__] = traceback.format_exc()[-4000:]
            # Leave at once: peers waiting in a collective fail fast (connection closed) instead of
            # waiting out the timeout, and no later case runs against a group in an unknown state.
            for later in cases[i + 1:]:
                _RESULTS[later.__name__] = f"not run: rank {rank} failed {case.__name__}"
            _write(ctx)
            os._exit(1)
        _write(ctx)
    os._exit(0)  # skip destroy_process_group: after the dead-rank case it could wait on the dead peer
