"""`torch` backend, decode against a KV cache: read only the selected blocks.

For a few new queries (a decode step, a short chunk) one fixed-shape pass does everything,
with no host sync and no copy of the cache:

1. gate: each query row (a query head of a KV head's group, at one position) against the
   cached block means `[B, Hkv, NB, D]`; candidates are the blocks before the own block
   (causal) or every other filled block (non-causal), minus blocks the mask hides entirely
   and blocks whose score is NaN;
2. the own block plus the `top_k - 1` best candidates (a stable sort: ties keep the lower
   block index, as the reference does);
3. the keys and values of those blocks are gathered (`index_select` on the cache) and the row
   attends them with one softmax, positions past the query (causal) or past the filled prefix
   (non-causal) hidden.

Rows are `(query head within the group, query)` per KV head, as everywhere in this backend,
so the gate reads each KV head's means once for its whole group.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moba_rewrite.kernels.torch.select import Scratch, _block_visibility, _visible, compute_dtype, mask4

# Key elements (B * Hq * Tq * selected keys * D) gathered per call, up to which this path runs;
# larger calls (chunked prefill) take the sliced path, which does not copy the selected keys.
_GATHER_MAX_ELEMS = 1 << 23


def applicable(q: Tensor, block_size: int, top_k: int, length: int) -> bool:
    """Few enough query rows that gathering their selected blocks is the cheap way."""
    b, hq, tq, d = q.shape
    n_sel = min(top_k, -(-length // block_size))
    return b * hq * tq * n_sel * block_size * d <= _GATHER_MAX_ELEMS


def _rows(x: Tensor, b: int, hkv: int, rows: int) -> Tensor:
    """`[B, Hq, Tq, X]` (possibly broadcast) -> `[B, Hkv, G * Tq, X]`, rows ordered (group head, query)."""
    return x.reshape(b, hkv, rows, x.shape[-1])


def _selection(q_rows: Tensor, means: Tensor, row_pos: Tensor, filled: Tensor, vis: Tensor | None, *,
               block_size: int, top_k: int, causal: bool) -> Tensor:
    """Blocks each row attends, own block first: `[B, Hkv, rows, S]` int64, -1 = none."""
    b, hkv, rows, _ = q_rows.shape
    nb = means.shape[2]
    own = row_pos // block_size
    sel = own.expand(b, hkv, rows)[..., None]
    n_pick = min(top_k - 1, nb)
    if n_pick <= 0:
        return sel
    gate = torch.matmul(q_rows, means.transpose(-1, -2))  # [B, Hkv, rows, NB]
    blocks = torch.arange(nb, device=q_rows.device)
    if causal:
        excluded = blocks >= own[:, None]
    else:
        excluded = (blocks == own[:, None]) | (blocks * block_size >= filled)
    if vis is not None:
        excluded = excluded | ~vis
    # NaN scores are never candidates (sorted as the largest otherwise); +inf stays +inf
    gate = gate.nan_to_num_(nan=float("-inf"), posinf=float("inf")).masked_fill_(excluded, float("-inf"))
    values, order = gate.sort(dim=-1, descending=True, stable=True)  # ties: the lower block index first
    picks = order[..., :n_pick].masked_fill_(values[..., :n_pick] == float("-inf"), -1)
    return torch.cat([sel, picks], dim=-1)


def _flat_index(index: Tensor, cache: Tensor) -> Tensor | None:
    """Row numbers of `_rows_view(cache)` for `index[b, h, r, w]`, or None if the cache's tokens are not
    rows of D contiguous elements at strides that are whole rows (a cache that is a view of a
    larger buffer, as `GrowingDynamicLayer` keeps, is fine)."""
    b, hkv, length, d = cache.shape
    if cache.stride(3) != 1 or cache.stride(2) != d or cache.stride(1) % d or cache.stride(0) % d:
        return None
    head_rows = cache.stride(1) // d
    base = torch.arange(hkv, device=cache.device) * head_rows
    if b > 1:
        base = (torch.arange(b, device=cache.device) * (cache.stride(0) // d))[:, None] + base
    return (index + base.view(-1, hkv, 1, 1)).view(-1)


def _rows_view(cache: Tensor) -> Tensor:
    """`[rows, D]` over the cache's storage from its first element to its last (see `_flat_index`)."""
    b, hkv, length, d = cache.shape
    rows = (b - 1) * (cache.stride(0) // d) + (hkv - 1) * (cache.stride(1) // d) + length
    return cache.as_strided((rows, d), (d, 1))


def _gather(cache: Tensor, index: Tensor, flat: Tensor | None, scratch: Scratch, name: str) -> Tensor:
    """`cache[b, h, index[b, h, r, w]]` -> `[B, Hkv, rows, W, D]`, one row copy per key (`flat`: the
    row numbers from `_flat_index`, or None to gather along the token dim). The copy lands in this
    thread's scratch buffer: a fresh megabyte per call costs page faults (see `select.Scratch`)."""
    d = cache.shape[-1]
    if flat is not None:
        buf = scratch.get(name, (flat.shape[0], d))
        return torch.index_select(_rows_view(cache), 0, flat, out=buf).view(*index.shape, d)
    b, hkv = cache.shape[:2]
    return cache.gather(2, index.reshape(b, hkv, -1, 1).expand(-1, -1, -1, d)).view(*index.shape, d)


@torch.no_grad()
def forward(q: Tensor, k_cache: Tensor, v_cache: Tensor, key_block_means: Tensor, cache_position: Tensor, *,
            block_size: int, top_k: int, causal: bool, scale: float, attn_mask: Tensor | None) -> Tensor:
    """MoBA output `[B, Hq, Tq, Dv]` of the queries at `cache_position` against the filled prefix of
    the cache (SPEC section 2 item 9), gated on `key_block_means`, reading only the selected blocks."""
    b, hq, tq, d = q.shape
    hkv, length = k_cache.shape[1], k_cache.shape[2]
    g = hq // hkv
    rows = g * tq
    nb = -(-length // block_size)
    ct = compute_dtype(q.dtype)
    dev = q.device
    pos = cache_position.long()
    row_pos = pos.repeat(g) if g > 1 else pos  # [rows]: row (g, t) sits at pos[t]
    filled = pos[-1:] + 1
    q_rows = _rows(q, b, hkv, rows).to(ct)
    m4 = mask4(attn_mask)
    vis = None
    if m4 is not None:  # block visibility on the un-broadcast mask, then spread over the rows
        vis = _rows(_block_visibility(_visible(m4), nb, block_size).expand(b, hq, tq, nb), b, hkv, rows)
    sel = _selection(q_rows, key_block_means[:, :, :nb].to(ct), row_pos, filled, vis, block_size=block_size,
                     top_k=top_k, causal=causal)
    key_pos = (sel[..., None] * block_size + torch.arange(block_size, device=dev)).flatten(-2)  # [B, Hkv, rows, W]
    # hidden: -1 picks (negative), keys after the query (causal) or past the filled prefix
    hidden = (key_pos < 0) | (key_pos > row_pos[:, None] if causal else key_pos >= filled)
    index = key_pos.masked_fill_(hidden, 0)  # hidden keys read slot 0: unfilled slots may hold NaN
    flat = _flat_index(index, k_cache)
    scratch = Scratch.for_thread(k_cache.dtype, dev)
    keys = _gather(k_cache, index, flat, scratch, "decode_keys")
    v_flat = flat if v_cache.stride() == k_cache.stride() else _flat_index(index, v_cache)
    values = _gather(v_cache, index, v_flat, scratch, "decode_values")
    # [1, D] x [D, W] per row: the matrix-vector product the other way round ([W, D] x [D, 1]) is 8x
    # slower on CPU (bmm's n = 1 path)
    scores = torch.matmul((q_rows * scale)[..., None, :], keys.to(ct).transpose(-1, -2)).squeeze(-2)
    if m4 is not None:
        m = _rows(m4.expand(b, hq, tq, length), b, hkv, rows).gather(-1, index)
        if m.dtype == torch.bool:
            hidden |= ~m
        else:
            hidden |= m == float("-inf")
            scores += m.to(ct)
    probs = torch.softmax(scores.masked_fill_(hidden, float("-inf")), dim=-1)
    if m4 is not None:  # without a mask every row sees its own position; with one a row may see nothing
        probs = probs.masked_fill_(hidden.all(-1, keepdim=True), 0.0)
    out = torch.matmul(probs[..., None, :], values.to(ct)).squeeze(-2)  # [B, Hkv, rows, Dv]
    return out.view(b, hq, tq, v_cache.shape[-1]).to(q.dtype)
