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
