"""`key_block_means`: the per-block mean keys that MoBA's gate scores queries against, as a cache.

Decoding with MoBA reads only the selected blocks of the KV cache, but the gate needs the mean
key of every block: recomputing those reads all of K at every step, which costs more than the
attention itself at long context. Keep the means next to the KV cache instead and pass them to
`moba_attention(..., key_block_means=...)`; after appending tokens, update them with
`previous=` so that only the last (partial) block and the new ones are recomputed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moba_rewrite.kernels.reference import block_means


def key_block_means(k: Tensor, block_size: int, *, previous: Tensor | None = None) -> Tensor:
    """Mean key of every block of `k` (`[B, Hkv, Tk, D]`): `[B, Hkv, ceil(Tk / block_size), D]` in
    fp32 (fp64 for fp64 keys); the last block may be partial and is divided by its own size.

    `previous`: this function's result for a prefix of the same keys (the cache before new tokens
    were appended); its complete blocks are kept and the rest is recomputed from `k`.
    """
    if not isinstance(k, Tensor) or k.dim() != 4 or not k.dtype.is_floating_point:
        raise ValueError(f"key_block_means: k must be a floating 4-D tensor [B, Hkv, Tk, D], got "
                         f"{list(k.shape) if isinstance(k, Tensor) else type(k).__name__}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"key_block_means: block_size must be an integer >= 1, got {block_size!r}")
    b, h, tk, d = k.shape
    n_blocks = -(-tk // block_size)
    if previous is None:
        return block_means(k, block_size)
    if previous.dim() != 4 or tuple(previous.shape[:2]) != (b, h) or previous.shape[3] != d \
            or previous.shape[2] > n_blocks:
        raise ValueError(f"key_block_means: previous has shape {list(previous.shape)}, expected "
                         f"[{b}, {h}, <= {n_blocks}, {d}] (the means of a prefix of k)")
    keep = max(previous.shape[2] - 1, 0)  # the last previous block may have been partial
    tail = block_means(k[:, :, keep * block_size:], block_size)
    return torch.cat([previous[:, :, :keep].to(tail.dtype), tail], dim=2)


def update_key_block_means_(means: Tensor, k_cache: Tensor, cache_position: Tensor, block_size: int, *,
                            from_start: bool = False) -> Tensor:
    """Bring `means` up to date, in place, after keys were written into `k_cache` at `cache_position`.

    `means` is `[B, Hkv, NB, D]` (fp32, fp64 for fp64 keys) with `NB >= ceil(L / block_size)` for a
    cache of `L` slots; `cache_position` holds the `Tq` consecutive positions just written, the
    newest of the cache (so it is filled up to `cache_position[-1] + 1`). Only the blocks holding
    those positions are recomputed, from their filled keys: a decode step reads one block, never all
    of K. No host sync and fixed shapes (the positions stay on the device), so the update runs
    under `torch.compile`, in CUDA graphs and in exported programs. Returns `means`.
    `from_start`: recompute every block of the filled prefix instead (reads the whole cache once:
    for a new buffer, or one that no longer describes the cache).
    """
    b, h, length, d = k_cache.shape
    if means.dim() != 4 or tuple(means.shape[:2]) != (b, h) or means.shape[3] != d \
            or means.shape[2] < -(-length // block_size):
        raise ValueError(f"update_key_block_means_: means has shape {list(means.shape)}, expected "
                         f"[{b}, {h}, >= {-(-length // block_size)}, {d}] for a cache of shape {list(k_cache.shape)} "
                         f"and block_size {block_size}")
    tq, n_blocks, dev = cache_position.shape[0], means.shape[2], k_cache.device
    if from_start:
        span = -(-length // block_size)
        blocks = torch.arange(span, device=dev)
    else:
        span = min(n_blocks, -(-(tq - 1) // block_size) + 1)  # blocks that tq consecutive positions can touch
        blocks = (cache_position[:1] // block_size + torch.arange(span, device=dev)).clamp_(max=n_blocks - 1)
    pos = blocks[:, None] * block_size + torch.arange(block_size, device=dev)  # [span, bs]
    valid = pos < cache_position[-1:] + 1  # filled slots only (a clamped duplicate block recomputes the same)
    keys = k_cache.index_select(2, pos.clamp_(max=length - 1).view(-1)).view(b, h, span, block_size, d)
    weights = valid.to(means.dtype)
    sums = (keys.to(means.dtype) * weights[:, :, None]).sum(3)
    return means.index_copy_(2, blocks, sums / weights.sum(1).clamp_(min=1)[:, None])


def refresh_key_block_means_(means: Tensor, k: Tensor, start: int, end: int, block_size: int) -> Tensor:
    """`update_key_block_means_` for positions known on the host: keys `[start, end)` were just
    written and the cache holds `end` tokens. Slicing instead of gathering: fewer ops per step."""
    first, last = start // block_size, (end - 1) // block_size
    if first == last:
        means[:, :, first] = k[:, :, first * block_size:end].mean(2, dtype=means.dtype)
    else:
        means[:, :, first:last + 1] = key_block_means(k[:, :, first * block_size:end], block_size).to(means.dtype)
    return means
