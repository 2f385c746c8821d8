"""Block routing for the `torch` backend: gate, top-k and the per-block query lists.

Memory stays `O(Tq * Hq * top_k)`: the gate `[B, Hq, chunk, n_blocks]` is computed for one
chunk of queries at a time and only the selected block indices are kept. The result is a
`RoutePlan`: every (query row, key block) pair that attention must visit, sorted by
(batch, kv head, key block) so that each key block is visited once with all the query rows
(of every query head in its GQA group) that selected it. Within a block the rows that have it
as their *own* block come last, so the causal cut is applied to that tail only.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch
from torch import Tensor

# Elements per temporary: gate chunk, mask chunk (about 4 MiB in fp32).
_CHUNK_ELEMS = 1 << 20
# Query rows (x batch x heads) a gate chunk should reach before another op round is worth it.
# 8192 (was 2048): a split worker at 8K x 2 heads gates in 2 chunks of 8 blocks instead of 8
# of 2 (~30 tensor calls each, the extra candidates of the bigger chunks are cheap fills).
_MIN_CHUNK_ROWS = 8192


# Largest buffer (elements) a thread keeps between calls; bigger ones are allocated per call.
_KEEP_ELEMS = 1 << 22
_LOCAL = threading.local()


class Scratch:
    """Named flat work buffers, reused by every tile of a call and, on CPU, kept per thread
    between calls (at most `_KEEP_ELEMS` elements each; a handful of them, a few MiB per
    thread). A fresh multi-MiB temporary per tile or per call costs page faults, because glibc
    hands large freed blocks back to the OS: that showed as 20 to 25% of an 8K forward.
    Buffers are only ever work space: nothing returned to a caller aliases them."""

    def __init__(self, dtype: torch.dtype, device):
        self.dtype, self.device, self.bufs = dtype, device, {}

    @staticmethod
    def for_thread(dtype: torch.dtype, device) -> "Scratch":
        """This thread's cached scratch for (dtype, device) on CPU; a fresh one elsewhere. Buffers made
        under `torch.inference_mode()` are inference tensors, which cannot be written outside it (nor
        should normal ones be kept inside it): each mode has its own."""
        device = torch.device(device)
        if device.type != "cpu":
            return Scratch(dtype, device)
        cache = getattr(_LOCAL, "scratch", None)
        if cache is None:
            cache = _LOCAL.scratch = {}
        key = (dtype, device, not torch.compiler.is_compiling() and torch.is_inference_mode_enabled())
        if key not in cache:
            cache[key] = Scratch(dtype, device)
        return cache[key]

    def get(self, name: str, shape) -> Tensor:
        numel = math.prod(shape)
        buf = self.bufs.get(name)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(numel, dtype=self.dtype, device=self.device)
            if numel <= _KEEP_ELEMS:
                self.bufs[name] = buf
            else:
                self.bufs.pop(name, None)
        return buf[:numel].view(shape)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half types and fp32, fp64 for fp64 (gate and softmax statistics precision)."""
    return torch.promote_types(dtype, torch.float32)


def mask4(attn_mask: Tensor | None) -> Tensor | None:
    """The mask as a 4-D view (leading broadcast dims added), no copy."""
    if attn_mask is None:
        return None
    return attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))


def row_mask(m4: Tensor, b: int, rows: Tensor, tq: int, hq: int, ks: int, ke: int) -> Tensor:
    """Mask entries for flat query rows of batch `b` against keys `[ks, ke)`: `[rows, keys]`.

    Only the needed entries are gathered from the broadcast mask (size-1 dims stay size 1, so
    the result may be `[keys]` or `[rows, 1]` and broadcasts against the scores).
    """
    mb = m4[b if m4.shape[0] > 1 else 0]
    if mb.shape[-1] > 1:
        mb = mb[..., ks:ke]
    hi = (rows // tq) % hq if mb.shape[0] > 1 else 0
    ii = rows % tq if mb.shape[1] > 1 else 0
    return mb[hi, ii]


def _visible(m: Tensor) -> Tensor:
    return m if m.dtype == torch.bool else m != float("-inf")


def block_means(k: Tensor, block_size: int, ct: torch.dtype) -> Tensor:
    """Mean key per block `[B, Hkv, n_blocks, D]` in `ct`; the last block may be partial."""
    b, h, tk, d = k.shape
    n_full, tail = divmod(tk, block_size)
    parts = []
    if n_full:
        parts.append(k[:, :, : n_full * block_size].reshape(b, h, n_full, block_size, d).sum(3, dtype=ct)
                     / block_size)
    if tail:
        parts.append(k[:, :, n_full * block_size:].sum(2, keepdim=True, dtype=ct) / tail)
    return torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]


def _block_visibility(vis: Tensor, n_blocks: int, block_size: int) -> Tensor:
    """`[..., Tk]` bool -> `[..., n_blocks]`: does the block hold a visible key (`Tk`=1 broadcasts)."""
    tk = vis.shape[-1]
    if tk == 1:
        return vis
    n_full = tk // block_size
    parts = []
    if n_full:
        parts.append(vis[..., : n_full * block_size].reshape(*vis.shape[:-1], n_full, block_size).any(-1))
    if n_full < n_blocks:
        parts.append(vis[..., n_full * block_size:].any(-1, keepdim=True))
    return torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]


def _query_chunks(tq: int, offset: int, block_size: int, max_rows: int, min_rows: int) -> list[tuple[int, int]]:
    """Query ranges for the gate: cut at own-block boundaries, at most `max_rows` queries each.

    Whole own blocks are merged while a chunk is shorter than `min_rows` (so small blocks do
    not cost one round of ops each); a block longer than `max_rows` is split. A chunk that holds
    a single own block needs no per-query candidate mask when causal and unmasked.
    """
    first = min(tq, block_size - offset % block_size)
    cuts = [0] + list(range(first, tq, block_size)) + [tq]
    segments = [(a, e) for a, e in zip(cuts[:-1], cuts[1:]) if e > a]
    chunks: list[tuple[int, int]] = []
    for a, e in segments:
        if chunks and chunks[-1][1] - chunks[-1][0] < min_rows and e - chunks[-1][0] <= max_rows:
            chunks[-1] = (chunks[-1][0], e)
            continue
        chunks.extend((i, min(e, i + max_rows)) for i in range(a, e, max_rows))
    return chunks


def _top_blocks(gate_t: Tensor, kp: int, work: Tensor) -> Tensor:
    """Indices of the `kp` largest entries along dim -2 of a block-major gate `[..., w, c]`.

    Returns `[..., kp, c]` int64, -1 where fewer than `kp` entries above -inf exist (a NaN entry,
    from a NaN query, is never picked); for `kp <= 3`
    exact ties go to the lower block index (the rule of the reference and the Triton gates);
    beyond that `topk` decides (a stable sort was 20x slower). For small `kp` this is `kp`
    rounds of `amax` plus a few arithmetic passes (vectorised across queries in this layout; comparisons producing bool tensors and
    `topk` along the short block axis are several times slower on CPU). `gate_t` is
    overwritten; `work` is a flat scratch buffer of at least `gate_t.numel()` elements.
    """
    neg_inf = float("-inf")
    w = gate_t.shape[-2]
    if kp > 3:
        values, index = gate_t.transpose(-1, -2).topk(kp, dim=-1, sorted=False)
        return index.masked_fill_(~(values > neg_inf), -1).transpose(-1, -2)
    ar = torch.arange(w, dtype=gate_t.dtype, device=gate_t.device)[:, None]
    key = work[: gate_t.numel()].view(gate_t.shape)
    picks = []
    for t in range(kp):
        best = gate_t.amax(-2, keepdim=True)  # [..., 1, c]
        # key = j where gate == best, j + w elsewhere (NaN where best is -inf: masked below).
        torch.sub(best, gate_t, out=key).sign_()
        torch.add(ar, key, alpha=float(w), out=key)
        found = best > neg_inf  # False for -inf and for NaN
        idx = key.amin(-2, keepdim=True).nan_to_num_(0.0).to(torch.long).masked_fill_(~found, 0)
        if t + 1 < kp:
            gate_t.scatter_(-2, idx, neg_inf)
        picks.append(idx.masked_fill_(~found, -1))
    return torch.cat(picks, dim=-2) if kp > 1 else picks[0]


def _exclude_non_candidates(gate_t: Tensor, i0: int, i1: int, offset: int, block_size: int, own_lo: int,
                            own_hi: int, causal: bool) -> None:
    """Set the unmasked chunk's non-candidates to -inf in its gate `[B, Hq, w, c]`, own block by own block.

    Queries of own block `o` lose blocks `[o, w)` (causal) or block `o` (non-causal): a few
    strided fills of the gate, instead of a `[w, c]` candidate map and a pass over the gate."""
    neg_inf = float("-inf")
    w = gate_t.shape[-2]
    for o in range(own_lo, own_hi + 1):
        a = max(0, o * block_size - offset - i0)
        e = min(i1 - i0, (o + 1) * block_size - offset - i0)
        if causal:
            if o < w:
                gate_t[:, :, o:, a:e].fill_(neg_inf)
        else:
            gate_t[:, :, o, a:e].fill_(neg_inf)


@torch.no_grad()
def select_blocks(q: Tensor, k: Tensor, *, block_size: int, top_k: int, causal: bool,
                  attn_mask: Tensor | None) -> Tensor:
    """History blocks per query `[B, Hq, Tq, top_k - 1]` (int64, -1 = none), own block excluded.

    Gate `q . mean(K_j)` in fp32 (fp64 for fp64), candidates per SPEC section 2 step 4,
    top `top_k - 1` of them. Queries are processed in chunks so the gate is never whole; the
    gate of a chunk is laid out block-major (`[B, Hq, blocks, queries]`), and a causal,
    unmasked chunk within one own block scores only the blocks before it (no candidate mask).
    """
    b, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    g = hq // hkv
    n = -(-tk // block_size)
    n_pick = min(top_k - 1, n)
    dev = q.device
    sel = torch.full((b, hq, tq, max(n_pick, 0)), -1, dtype=torch.long, device=dev)
    if n_pick <= 0 or n == 1:
        return sel
    ct = compute_dtype(q.dtype)
    means = block_means(k, block_size, ct)[:, :, None]  # [B, Hkv, 1, n, D]
    # A block whose mean holds a NaN (a NaN in its keys) is never a candidate (SPEC 2.4).
    nan_blocks = means.isnan().any(-1)[..., None]  # [B, Hkv, 1, n, 1]
    if not bool(nan_blocks.any()):
        nan_blocks = None
    m4 = mask4(attn_mask)
    blocks = torch.arange(n, device=dev)
    offset = tk - tq
    max_rows = max(1, _CHUNK_ELEMS // (b * hq * n))
    if m4 is not None and m4.shape[2] > 1:
        max_rows = min(max_rows, max(1, _CHUNK_ELEMS // (m4.shape[0] * m4.shape[1] * m4.shape[3])))
    min_rows = max(1, _MIN_CHUNK_ROWS // (b * hq))
    static_vis = None
    if m4 is not None and m4.shape[2] == 1:
        static_vis = _block_visibility(_visible(m4), n, block_size)  # [mB, mH, 1, n or 1]
    chunks = _query_chunks(tq, offset, block_size, max_rows, min_rows)
    # Scratch reused by every chunk (fresh multi-MiB temporaries per chunk cost page faults).
    buf_elems = b * hq * n * max(i1 - i0 for i0, i1 in chunks)
    scratch = Scratch.for_thread(ct, dev)
    gate_buf = scratch.get("gate", (buf_elems,))
    work = scratch.get("gate_work", (buf_elems,))
    for i0, i1 in chunks:
        c = i1 - i0
        own_lo, own_hi = (offset + i0) // block_size, (offset + i1 - 1) // block_size
        # Causal: only blocks before the chunk's last own block can be candidates; skip the rest.
        w = own_hi if causal else n
        if w == 0:
            continue
        qc = q[:, :, i0:i1].to(ct).reshape(b, hkv, g, c, d)
        gate_t = gate_buf[: b * hq * w * c].view(b, hkv, g, w, c)
        torch.matmul(means[..., :w, :], qc.transpose(-1, -2), out=gate_t)
        gate_t = gate_t.view(b, hq, w, c)
        if m4 is not None:
            own = torch.arange(offset + i0, offset + i1, device=dev) // block_size
            cand = blocks[:w, None] < own[None, :] if causal else blocks[:, None] != own[None, :]
            vis = static_vis if static_vis is not None else _block_visibility(
                _visible(m4[:, :, i0:i1]), n, block_size)
            cand = cand & (vis[..., :w] if vis.shape[-1] > 1 else vis).transpose(-1, -2)
            # 0 / -inf bias on the (small, broadcast) candidate map: cheaper than masked_fill_ on the gate.
            gate_t.add_(torch.zeros(cand.shape, dtype=ct, device=dev).masked_fill_(~cand, float("-inf")))
        else:
            _exclude_non_candidates(gate_t, i0, i1, offset, block_size, own_lo, own_hi, causal)
        if nan_blocks is not None:
            gate_t.view(b, hkv, g, w, c).masked_fill_(nan_blocks[:, :, :, :w], float("-inf"))
        kp = min(n_pick, w)
        sel[:, :, i0:i1, :kp] = _top_blocks(gate_t, kp, work).transpose(-1, -2)
    return sel


@dataclass
class RoutePlan:
    """Query rows grouped by the key block they visit.

    `rows` holds flat query-row indices into `q.reshape(B*Hq*Tq, D)`, sorted by group
    `(b * Hkv + kv_head) * n_blocks + j`; each entry of `groups` is
    `(b, kv_head, j, start, own_start, end)`: rows `[start, end)` of `rows` visit key block j
    of that kv head, those in `[own_start, end)` having block j as their own block.
    """

    rows: Tensor
    groups: list[tuple[int, int, int, int, int, int]]  # (b, kv_head, j, start, own_start, end)
    n_blocks: int
    block_size: int
    offset: int  # Tk - Tq: position of query 0


@torch.no_grad()
def route(q: Tensor, k: Tensor, *, block_size: int, top_k: int, causal: bool,
          attn_mask: Tensor | None, include_own: bool = True, selection: Tensor | None = None) -> RoutePlan:
    """Select blocks and sort the (query row, block) pairs into per-block groups.

    With `include_own=False` only the history pairs are listed (the caller handles every
    query's own block itself). `selection`: the history blocks already chosen, in
    `select_blocks`' format (`[B, Hq, Tq, picks]` int64 block indices of k, -1 = none, own
    block excluded); the gate is then skipped (context parallelism gates against the whole
    sequence's blocks and attends a compacted k).
    """
    b, hq, tq, _ = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    g = hq // hkv
    n = -(-tk // block_size)
    dev = q.device
    offset = tk - tq
    sel = selection if selection is not None else select_blocks(
        q, k, block_size=block_size, top_k=top_k, causal=causal, attn_mask=attn_mask)
    # Group id base per (b, hq): (b * Hkv + hq // G) * n.
    base = ((torch.arange(b, device=dev)[:, None] * hkv + torch.arange(hq, device=dev)[None, :] // g) * n)
    rows_all = torch.arange(b * hq * tq, device=dev)
    keys, rows = [], []
    if include_own:
        own = (torch.arange(offset, tk, device=dev) // block_size)
        keys.append(((base[:, :, None] + own[None, None, :]) * 2 + 1).reshape(-1))  # odd: own rows last
        rows.append(rows_all)
    n_keys = 2 * b * hkv * n
    if sel.shape[-1] > 0:
        # Unselected slots (-1) get the key n_keys: they sort last and are cut off below (no
        # boolean indexing, whose nonzero passes cost more than sorting the few extra entries).
        hist_key = (base[:, :, None, None] + sel).mul_(2).masked_fill_(sel < 0, n_keys)
        keys.insert(0, hist_key.view(-1))
        rows.insert(0, rows_all.view(b, hq, tq, 1).expand_as(sel).reshape(-1))
        del hist_key
    del sel
    if not keys:
        return RoutePlan(rows=rows_all[:0], groups=[], n_blocks=n, block_size=block_size, offset=offset)
    key = torch.cat(keys) if len(keys) > 1 else keys[0]
    row = torch.cat(rows) if len(rows) > 1 else rows[0]
    key, order = torch.sort(key, stable=True)
    counts = torch.bincount(key, minlength=n_keys + 1)
    n_valid = key.numel() - int(counts[n_keys])
    row = row[order[:n_valid]]
    del order, key
    counts = counts[:n_keys].view(-1, 2).tolist()
    groups = []
    pos = 0
    for gid, (n_hist, n_own) in enumerate(counts):
        if n_hist + n_own == 0:
            continue
        bh, j = divmod(gid, n)
        bi, hi = divmod(bh, hkv)
        groups.append((bi, hi, j, pos, pos + n_hist, pos + n_hist + n_own))
        pos += n_hist + n_own
    return RoutePlan(rows=row, groups=groups, n_blocks=n, block_size=block_size, offset=offset)


def block_selection(q: Tensor, k: Tensor, *, block_size: int, top_k: int, causal: bool,
                    attn_mask: Tensor | None = None) -> Tensor:
    """Boolean `[B, Hq, Tq, n_blocks]` map of attended blocks (own included), for tests."""
    b, hq, tq, _ = q.shape
    tk = k.shape[2]
    n = -(-tk // block_size)
    sel = select_blocks(q, k, block_size=block_size, top_k=top_k, causal=causal, attn_mask=attn_mask)
    out = torch.zeros((b, hq, tq, n + 1), dtype=torch.bool, device=q.device)
    out.scatter_(-1, torch.where(sel >= 0, sel, n), True)
    own = (torch.arange(tk - tq, tk, device=q.device) // block_size).expand(b, hq, tq)
    out.scatter_(-1, own[..., None], True)
    return out[..., :n]
