"""MoBA's gate for one rank's queries against the blocks of the whole sequence.

Each query scores every block's mean key (`q . mean(K_j)` in fp32, fp64 for fp64), keeps the
candidates of SPEC section 2 step 4 at its *global* position (causal: the complete blocks before
its own; non-causal: every real block but its own) and picks the best `top_k - 1` (exact ties to
the lower block index, NaN scores never). The gate is computed for a chunk of queries at a time,
so `[B, Hq, T_local, n_blocks]` never exists whole.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moba_rewrite.kernels.reference import compute_dtype

# Gate elements per chunk (16 MiB in fp32).
_CHUNK_ELEMS = 1 << 22


@torch.no_grad()
def select_history(q: Tensor, means: Tensor, own_block: Tensor, *, top_k: int, causal: bool, n_real: int,
                   query_real: Tensor | None = None, block_visible: Tensor | None = None) -> Tensor:
    """History blocks per query, `[B, Hq, T, picks]` int64 global block indices (-1 = none).

    q `[B, Hq, T, D]`; means `[B, Hkv, n, D]` (every block of the sequence, compute precision);
    own_block `[T]` each query's global block; n_real: blocks holding at least one real token
    (the others are padding, never candidates); query_real `[T]` bool: padding queries get none;
    block_visible `[B, n]` bool: blocks with at least one key the key padding mask shows (the
    others are never candidates, SPEC section 2 step 4).
    """
    b, hq, t, d = q.shape
    hkv, n = means.shape[1], means.shape[2]
    g = hq // hkv
    picks = max(min(top_k - 1, n - 1), 0)
    out = torch.full((b, hq, t, picks), -1, dtype=torch.long, device=q.device)
    if picks == 0:
        return out
    ct = compute_dtype(q.dtype)
    means_t = means.to(ct)[:, :, None].transpose(-1, -2)  # [B, Hkv, 1, D, n]
    blocks = torch.arange(n, device=q.device)
    rows = max(1, _CHUNK_ELEMS // max(1, b * hq * n))
    neg_inf = float("-inf")
    for i0 in range(0, t, rows):
        i1 = min(t, i0 + rows)
        own = own_block[i0:i1, None]
        cand = blocks[None, :] < own if causal else (blocks[None, :] != own) & (blocks[None, :] < n_real)
        if query_real is not None:
            cand = cand & query_real[i0:i1, None]
        if block_visible is not None:
            cand = cand & block_visible[:, None, None, :]
        gate = (q[:, :, i0:i1].to(ct).reshape(b, hkv, g, i1 - i0, d) @ means_t).reshape(b, hq, i1 - i0, n)
        gate.masked_fill_(~cand | gate.isnan(), neg_inf)
        for p in range(picks):
            best, idx = gate.max(-1, keepdim=True)  # the first maximum: exact ties go to the lower index
            out[:, :, i0:i1, p] = torch.where(best == neg_inf, -1, idx).squeeze(-1)
            if p + 1 < picks:
                gate.scatter_(-1, idx, neg_inf)
    return out
