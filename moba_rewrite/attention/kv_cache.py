"""MoBA against a KV cache: the `moba::attention_kv_cache` op and `moba_attention_kv_cache`.

A preallocated (static) KV cache holds `L` slots of which only a prefix is written. MoBA is
then defined on the filled prefix (SPEC section 2 item 9): the queries sit at their real
positions `cache_position` (the newest tokens, consecutive), blocks are cut from slot 0, and
unfilled slots are never a candidate nor attended: the result equals `moba_attention` on the
same tokens without the cache. The gate reads a cache of block means kept beside the KV cache
(`update_key_block_means_` keeps it current), so a decode step need not read all of K.

The op is what generation programs call (eager, `torch.compile`, `torch.export`): the caches and
`cache_position` are tensors, the output is `[B, Hq, Tq, Dv]` (v_cache's head dim), and the backends' decode paths
(`torch`, `triton`) do no host sync and keep fixed shapes, so a captured CUDA graph replays it.
Inference only: the op has no gradient.

`moba::attention_kv_cache(Tensor q, Tensor k_cache, Tensor v_cache, Tensor key_block_means,
Tensor cache_position, Tensor? attn_mask, int block_size, int top_k, bool causal, float scale,
str backend, int dense_below=0) -> Tensor`

`dense_below` (the policy key): full attention over the filled prefix while it holds fewer than
`dense_below` keys, decided per call from `cache_position` (the filled length is a tensor in a
compiled or exported graph). Read on the host where that is allowed; while a CUDA graph is being
captured both results are computed and one chosen on the device (fixed shapes, no host read).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from moba_rewrite.attention import autocast
from moba_rewrite.attention.functional import validate
from moba_rewrite.kernels import dense, load_backend, resolve_backend
from moba_rewrite.kernels.eager import plain_eager
from moba_rewrite.kernels.mask_forms import key_prefix


class CachePositionError(ValueError):
    """`cache_position` does not describe the newest tokens of the cache."""


def _capturing(x: Tensor) -> bool:
    """A CUDA graph is being captured: no host read of `x` is allowed."""
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


def check_cache_position(cache_position: Tensor, tq: int, length: int) -> None:
    """Raise `CachePositionError` unless `cache_position` is `tq` consecutive slots inside a cache
    of `length`. Reads the positions (a host sync): skipped while a CUDA graph is captured."""
    if _capturing(cache_position):
        return
    values = cache_position.tolist() if tq <= 2 else cache_position[[0, -1]].tolist()
    first, last = int(values[0]), int(values[-1])
    if first < 0 or last >= length:
        raise CachePositionError(
            f"cache_position {first}..{last} is out of range for a cache of {length} slots (k_cache.shape[2]); "
            f"the cache must hold position {last}")
    if last - first + 1 != tq or (tq > 2 and not torch.equal(
            cache_position, torch.arange(first, last + 1, device=cache_position.device,
                                         dtype=cache_position.dtype))):
        raise CachePositionError(
            f"cache_position must be the {tq} consecutive positions of the newest tokens, got "
            f"{cache_position.tolist() if tq <= 8 else f'{first}..{last}'}")


def _forward(q: Tensor, k_cache: Tensor, v_cache: Tensor, key_block_means: Tensor, cache_position: Tensor,
             attn_mask: Optional[Tensor], block_size: int, top_k: int, causal: bool, scale: float,
             backend: str, dense_below: int = 0) -> Tensor:
    """The op's implementation: full attention on the filled prefix below `dense_below` keys, else the
    backend's `forward_kv_cache`; backends without one (flash_attn) get the reference's definition
    applied to their `forward` (the filled prefix, read on the host)."""
    check_cache_position(cache_position, q.shape[2], k_cache.shape[2])
    if dense_below and backend != "reference":  # the oracle never switches (attention.op.dense_by_policy)
        if _capturing(cache_position):
            return dense_below_on_device(q, k_cache, v_cache, key_block_means, cache_position, attn_mask,
                                         block_size, top_k, causal, scale, backend, dense_below)
        filled = int(cache_position[-1]) + 1
        if filled < dense_below:
            return _dense_prefix(q, k_cache, v_cache, attn_mask, filled, causal, scale)
    return _moba(q, k_cache, v_cache, key_block_means, cache_position, attn_mask, block_size, top_k, causal, scale,
                 backend)


def _dense_prefix(q: Tensor, k_cache: Tensor, v_cache: Tensor, attn_mask: Optional[Tensor], filled: int,
                  causal: bool, scale: float) -> Tensor:
    """Full attention of the newest queries against the first `filled` slots (queries the newest keys)."""
    return dense.forward(q, k_cache[:, :, :filled], v_cache[:, :, :filled], causal=causal, scale=scale,
                         attn_mask=key_prefix(attn_mask, filled)).contiguous()


def dense_below_on_device(q: Tensor, k_cache: Tensor, v_cache: Tensor, key_block_means: Tensor,
                          cache_position: Tensor, attn_mask: Optional[Tensor], block_size: int, top_k: int,
                          causal: bool, scale: float, backend: str, dense_below: int) -> Tensor:
    """`dense_below` with no host read (a CUDA graph being captured): full attention over the first
    `dense_below` slots (all a call below it can have filled; the unfilled ones and, causal, those
    after each query hidden) and MoBA, chosen per call on the device by the filled length. Both are
    computed, the full one over `min(L, dense_below)` slots only (their K and V copied with the
    unfilled slots zeroed)."""
    n = min(k_cache.shape[2], dense_below)
    slots = torch.arange(n, device=k_cache.device)
    filled = cache_position[-1] + 1
    visible = slots <= cache_position[:, None] if causal else (slots < filled).expand(q.shape[2], -1)  # [Tq, n]
    mask = dense.restrict(key_prefix(attn_mask, n), visible)
    unfilled = (slots >= filled)[:, None]  # zeroed: whatever the spare slots hold (NaN) never reaches a score
    full = dense.forward_masked(q, k_cache[:, :, :n].masked_fill(unfilled, 0), v_cache[:, :, :n].masked_fill(unfilled, 0),
                                mask, scale=scale)
    sparse = _moba(q, k_cache, v_cache, key_block_means, cache_position, attn_mask, block_size, top_k, causal, scale,
                   backend)
    return torch.where(filled < dense_below, full.to(sparse.dtype), sparse).contiguous()


def _moba(q: Tensor, k_cache: Tensor, v_cache: Tensor, key_block_means: Tensor, cache_position: Tensor,
          attn_mask: Optional[Tensor], block_size: int, top_k: int, causal: bool, scale: float,
          backend: str) -> Tensor:
    """MoBA by the backend's `forward_kv_cache`, or its `forward` on the filled prefix (flash_attn)."""
    kernel = load_backend(resolve_backend(backend, q.device, q, k_cache, attn_mask, v=v_cache))
    kw = dict(block_size=block_size, top_k=top_k, causal=causal, scale=scale, attn_mask=attn_mask)
    run = getattr(kernel, "forward_kv_cache", None)
    if run is not None:
        return run(q, k_cache, v_cache, key_block_means, cache_position, **kw).contiguous()
    filled = int(cache_position[-1]) + 1
    kw["attn_mask"] = key_prefix(attn_mask, filled)
    return kernel.forward(q, k_cache[:, :, :filled], v_cache[:, :, :filled], **kw).contiguous()


@torch.library.custom_op("moba::attention_kv_cache", mutates_args=())
def attention_kv_cache(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, key_block_means: Tensor, cache_position: Tensor,
    attn_mask: Optional[Tensor], block_size: int, top_k: int, causal: bool, scale: float, backend: str,
    dense_below: int = 0,
) -> Tensor:
    """MoBA of the newest tokens against the filled prefix of a KV cache; see `moba_attention_kv_cache`."""
    return _forward(q, k_cache, v_cache, key_block_means, cache_position, attn_mask, block_size, top_k, causal,
                    scale, backend, dense_below)


@attention_kv_cache.register_fake
def _attention_kv_cache_fake(q, k_cache, v_cache, key_block_means, cache_position, attn_mask, block_size, top_k,
                             causal, scale, backend, dense_below=0):
    return q.new_empty((*q.shape[:-1], v_cache.shape[-1]))


autocast.register("attention_kv_cache")


def run(q: Tensor, k_cache: Tensor, v_cache: Tensor, key_block_means: Tensor, cache_position: Tensor,
        attn_mask: Optional[Tensor], block_size: int, top_k: int, causal: bool, scale: float,
        backend: str, dense_below: int = 0) -> Tensor:
    """`moba::attention_kv_cache` on validated arguments; its implementation directly in plain eager
    mode (the dispatcher's Python costs more than a decode step: `kernels.eager`)."""
    if plain_eager(q, k_cache, v_cache, key_block_means, cache_position, attn_mask):
        return _forward(q, k_cache, v_cache, key_block_means, cache_position, attn_mask, block_size, top_k, causal,
                        scale, backend, dense_below)
    extra = (dense_below,) if dense_below else ()  # graphs keep the short schema when unused
    return torch.ops.moba.attention_kv_cache(q, k_cache, v_cache, key_block_means, cache_position, attn_mask,
                                             block_size, top_k, causal, scale, backend, *extra)


def validate_kv_cache(q: Tensor, k_cache: Tensor, v_cache: Tensor, key_block_means, cache_position, *,
                      block_size: int, top_k: int, scale, attn_mask, enable_gqa: bool, backend: str) -> None:
    """Raise `ValueError` naming the first argument that breaks the op's contract (shapes only: the
    values of `cache_position` are checked by the op itself, where they are known)."""
    validate(q, k_cache, v_cache, block_size=block_size, top_k=top_k, scale=scale, attn_mask=attn_mask,
             enable_gqa=enable_gqa, backend=backend)
    b, hkv, length, d = k_cache.shape
    need = -(-length // block_size)
    if not isinstance(key_block_means, Tensor) or key_block_means.dim() != 4 \
            or not key_block_means.dtype.is_floating_point \
            or tuple(key_block_means.shape[:2]) != (b, hkv) or key_block_means.shape[3] != d \
            or key_block_means.shape[2] < need:
        got = (f"{list(key_block_means.shape)} {key_block_means.dtype}" if isinstance(key_block_means, Tensor)
               else type(key_block_means).__name__)
        raise ValueError(f"moba_attention_kv_cache: key_block_means must be a floating tensor [B, Hkv, NB, D] with "
                         f"NB >= ceil({length} / {block_size}) = {need} for k_cache {list(k_cache.shape)}, got {got}")
    if key_block_means.device != k_cache.device:
        raise ValueError(f"moba_attention_kv_cache: key_block_means is on {key_block_means.device}, "
                         f"k_cache on {k_cache.device}")
    tq = q.shape[2]
    if not isinstance(cache_position, Tensor) or cache_position.dim() != 1 or cache_position.shape[0] != tq \
            or cache_position.dtype not in (torch.int32, torch.int64):
        got = (f"{list(cache_position.shape)} {cache_position.dtype}" if isinstance(cache_position, Tensor)
               else type(cache_position).__name__)
        raise ValueError(f"moba_attention_kv_cache: cache_position must be an int32/int64 tensor [Tq] = [{tq}] "
                         f"(the positions of the queries), got {got}")
    if cache_position.device != q.device:
        raise ValueError(f"moba_attention_kv_cache: cache_position is on {cache_position.device}, q on {q.device}")


def moba_attention_kv_cache(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    key_block_means: Tensor,
    cache_position: Tensor,
    *,
    block_size: int = 512,
    top_k: int = 3,
    causal: bool = True,
    scale: float | None = None,
    attn_mask: Tensor | None = None,
    enable_gqa: bool = False,
    backend: str = "auto",
    dense_below: int = 0,
) -> Tensor:
    """MoBA of `Tq` new queries against a KV cache whose first `cache_position[-1] + 1` slots are filled.

    q `[B, Hq, Tq, D]`; k_cache `[B, Hkv, L, D]`, v_cache `[B, Hkv, L, Dv]` (slots past the filled prefix
    are ignored; the output is `[B, Hq, Tq, Dv]`);
    `key_block_means` `[B, Hkv, NB, D]` with `NB >= ceil(L / block_size)`, the block means of the
    filled keys (`update_key_block_means_` after each write; the last filled block divided by its
    filled size); `cache_position` `[Tq]` the queries' positions, consecutive, the newest tokens.
    `attn_mask`: bool or additive float broadcastable to `[B, Hq, Tq, L]`. Equals
    `moba_attention(q, k[:, :, :filled], v[:, :, :filled], ...)` with the gate on the means.
    `dense_below` (the policy key; 0: never): full attention while fewer than it are filled.
    """
    if not isinstance(dense_below, int) or isinstance(dense_below, bool) or dense_below < 0:
        raise ValueError(f"moba_attention_kv_cache: dense_below must be a non-negative int (0: never), "
                         f"got {dense_below!r}")
    if autocast.active(q):  # SDPA's autocast rule (mixed input dtypes are fine there)
        q, k_cache, v_cache, key_block_means, attn_mask = autocast.cast_inputs(q, k_cache, v_cache, key_block_means,
                                                                               attn_mask)
    validate_kv_cache(q, k_cache, v_cache, key_block_means, cache_position, block_size=block_size, top_k=top_k,
                      scale=scale, attn_mask=attn_mask, enable_gqa=enable_gqa, backend=backend)
    resolved_scale = float(scale) if scale is not None else q.shape[-1] ** -0.5
    return run(q, k_cache, v_cache, key_block_means, cache_position, attn_mask, block_size, top_k, bool(causal),
               resolved_scale, backend, dense_below)
