"""MoBA gating in Triton: block means of K, then a fused tiled `Q . mean(K)^T` with the
candidate filter and a running top-k, so the `[H, T, n_blocks]` gate never reaches memory.

Output ("picks"): for every row `R = t * G + g` of a KV head's group, the `top_k - 1` chosen
history blocks (`-1` where fewer candidates exist). The own block is implied by the
query's position and is added by `build_csr`, which inverts the selection into, per KV
block, the sorted list of rows that attend it (the CSR used by forward and backward).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from moba_rewrite.kernels.triton import configs as triton_configs
from moba_rewrite.kernels.triton.layout import Problem, interpreted, launch, next_pow2


@triton.jit
def _block_means_kernel(
    K, MEANS, k_start, k_len, skb, skh, skt, H_KV, NB, block_size,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """MEANS[b, h, j, :] = mean of the keys of block j (fp32); blocks past the sequence get 0."""
    j = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H_KV
    h = bh % H_KV
    tk = tl.load(k_len + b)
    ks = tl.load(k_start + b).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    lo = j * block_size
    hi = tl.minimum(lo + block_size, tk)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    base = K + b.to(tl.int64) * skb + h.to(tl.int64) * skh
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        m = (offs_n < hi)[:, None] & (offs_d < D)[None, :]
        kt = tl.load(base + (ks + offs_n)[:, None] * skt + offs_d[None, :], mask=m, other=0.0)
        acc += tl.sum(kt.to(tl.float32), axis=0)
    count = tl.maximum(hi - lo, 1)
    tl.store(MEANS + (bh.to(tl.int64) * NB + j) * D + offs_d, acc / count.to(tl.float32), mask=offs_d < D)


@triton.jit
def _gate_scores(q, mk, GATE_PREC: tl.constexpr):
    """`q @ mk^T` in fp32 accuracy. "split3": `q` is bf16/fp16 (exact), the fp32 means are cut into
    three parts of q's dtype (24 mantissa bits together) and multiplied on the fast tensor-core path,
    smallest part first; otherwise one dot at `GATE_PREC` ("tf32x3" or "ieee") on fp32 operands."""
    if GATE_PREC == "split3":
        hi = mk.to(q.dtype)
        rest = mk - hi.to(tl.float32)
        mid = rest.to(q.dtype)
        lo = (rest - mid.to(tl.float32)).to(q.dtype)
        s = tl.dot(q, tl.trans(lo), out_dtype=tl.float32)
        s = tl.dot(q, tl.trans(mid), s, out_dtype=tl.float32)
        s = tl.dot(q, tl.trans(hi), s, out_dtype=tl.float32)
    else:
        s = tl.dot(q.to(tl.float32), tl.trans(mk), input_precision=GATE_PREC)
    return s


@triton.jit
def _gate_topk_kernel(
    Q, MEANS, PICKS, REF, VIS,
    q_start, q_len, k_len, sqb, sqh, sqt,
    svb, svh, svt, svn,
    H_KV, G, NB, RP, block_size, N_PICK, NSPLIT, BPS,
    CAUSAL: tl.constexpr, HAS_VIS: tl.constexpr, KP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, D: tl.constexpr,
    GATE_PREC: tl.constexpr, PARTIAL: tl.constexpr,
):
    """For a tile of rows: the N_PICK best candidate blocks by gate score, never storing the gate.
    Also REF[row] = the best gate score among the row's attended blocks (own block included): the
    single-pass forward's softmax reference (see triton_attn).
    PARTIAL (decode, few rows): program `split` of NSPLIT scans only blocks [split * BPS, +BPS) and
    stores its best N_PICK (PICKS) with their scores (in REF), `[BH, RP, NSPLIT, KP]`, for the
    decode kernel to merge: the blocks are walked in parallel instead of by one program."""
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    split = tl.program_id(2)
    b = bh // H_KV
    h = bh % H_KV
    tq = tl.load(q_len + b)
    tk = tl.load(k_len + b)
    qs = tl.load(q_start + b).to(tl.int64)
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    t = rows // G
    hq = h * G + rows % G
    rvalid = t < tq
    own = (tk - tq + t) // block_size
    n_blocks = (tk + block_size - 1) // block_size
    offs_d = tl.arange(0, BLOCK_D)
    slots = tl.arange(0, KP)
    # Unused slots (>= N_PICK) hold +inf so they are never the row minimum that gets replaced.
    topv = tl.where(slots[None, :] < N_PICK, float("-inf"), float("inf")) + tl.zeros([BLOCK_M, KP], tl.float32)
    topi = tl.full([BLOCK_M, KP], -1, tl.int32)
    worst = tl.min(topv, axis=1)
    q_ptrs = Q + b.to(tl.int64) * sqb + hq.to(tl.int64)[:, None] * sqh + (qs + t)[:, None] * sqt + offs_d[None, :]
    q = tl.load(q_ptrs, mask=rvalid[:, None] & (offs_d < D)[None, :], other=0.0)
    if CAUSAL:
        hi = tl.max(tl.where(rvalid, own, 0))  # candidates are blocks before the own block
    else:
        hi = n_blocks
    if N_PICK == 0:
        hi = 0
    mean_base = MEANS + bh.to(tl.int64) * NB * D
    m_own = tl.load(mean_base + own[:, None] * D + offs_d[None, :], mask=rvalid[:, None] & (offs_d < D)[None, :],
                    other=0.0)
    own_score = tl.sum(q.to(tl.float32) * m_own, axis=1)
    n_lo = split * BPS
    for n0 in range(n_lo, tl.minimum(hi, n_lo + BPS), BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        mk = tl.load(mean_base + cols[:, None] * D + offs_d[None, :],
                     mask=(cols < n_blocks)[:, None] & (offs_d < D)[None, :], other=0.0)
        s = _gate_scores(q, mk, GATE_PREC)
        cand = rvalid[:, None] & (cols < n_blocks)[None, :]
        if CAUSAL:
            cand = cand & (cols[None, :] < own[:, None])
        else:
            cand = cand & (cols[None, :] != own[:, None])
        if HAS_VIS:
            vis = tl.load(VIS + b.to(tl.int64) * svb + hq.to(tl.int64)[:, None] * svh + t[:, None] * svt
                          + cols[None, :] * svn, mask=cand, other=0)
            cand = cand & (vis != 0)
        # a NaN score (a NaN in the block's mean key) is never a candidate (SPEC section 2): said
        # here, not left to how max treats NaN (ignored on GPUs; propagated by triton 3.6's
        # interpreter, which then stopped the merge below and lost later picks)
        s = tl.where(cand & (s == s), s, float("-inf"))
        # Merge this tile into the running top-k: pull the tile's best scores in descending order,
        # each replacing its row's current worst kept score, for as long as some row still improves
        # (at most N_PICK rounds; late tiles usually need none or one).
        best, best_col = tl.max(s, axis=1, return_indices=True, return_indices_tie_break_left=True)
        while tl.max((best > worst).to(tl.int32)) > 0:
            # among equal worst scores evict the highest block index: ties keep the lower index,
            # the order of every backend and of the decode gate's merge
            worst_slot = tl.argmax(tl.where(topv == worst[:, None], topi, -2), axis=1, tie_break_left=True)
            repl = (best > worst)[:, None] & (slots[None, :] == worst_slot[:, None])
            topv = tl.where(repl, best[:, None], topv)
            topi = tl.where(repl, (n0 + best_col)[:, None].to(tl.int32), topi)
            s = tl.where(tl.arange(0, BLOCK_N)[None, :] == best_col[:, None], float("-inf"), s)
            best, best_col = tl.max(s, axis=1, return_indices=True, return_indices_tie_break_left=True)
            worst = tl.min(topv, axis=1)
    if PARTIAL:
        at = ((bh.to(tl.int64) * RP + rows)[:, None] * NSPLIT + split) * KP + slots[None, :]
        tl.store(PICKS + at, topi)
        tl.store(REF + at, tl.where(topi >= 0, topv, float("-inf")))
    else:
        out = PICKS + (bh.to(tl.int64) * RP + rows)[:, None] * KP + slots[None, :]
        tl.store(out, topi)
        kept = tl.max(tl.where(topi >= 0, topv, float("-inf")), axis=1)
        tl.store(REF + bh.to(tl.int64) * RP + rows, tl.where(rvalid, tl.maximum(own_score, kept), 0.0))


@dataclass
class Selection:
    """Per-row picks plus the CSR (KV block -> attending rows) built from them once."""

    picks: Tensor  # int32 [B*Hkv, RP, KP]: chosen history blocks, -1 = none
    n_pick: int
    row_pad: int  # RP
    ref: Tensor | None = None  # fp32 [B*Hkv, RP]: best gate score of the attended blocks (0 on padding)
    offsets: Tensor | None = None  # int32 [B*Hkv, NB + 1] into entry_row
    entry_row: Tensor | None = None  # int32 [B*Hkv, RP * KS]: rows sorted by block
    entry_src: Tensor | None = None  # int32 [B*Hkv, RP * KS]: the entry's slot in row-major [RP, KS]
    part_picks: Tensor | None = None  # int32 [B*Hkv, RP, splits, KP]: per block range (partial gate)
    part_scores: Tensor | None = None  # fp32, same shape: their gate scores (-inf = none)
    own_block: bool = True  # False: rows attend their picks only (context parallelism's fetched blocks)


_MAX_GATE_SPLITS = 64  # block ranges of a partial (decode) gate ...
_MAX_MERGE_CANDIDATES = 256  # ... and candidates (ranges x pick slots) each decode program merges


def gate_config(device: torch.device, d: int, rows: int | None = None) -> tuple[int, int, int, int]:
    """(BLOCK_M rows, BLOCK_N blocks, num_warps, num_stages) of the gate kernel; `rows` per KV head
    <= 16 (decode) gets a 16-row tile that walks the blocks in fewer, wider steps."""
    if interpreted(device):
        return 32, 16, 4, 1
    if rows is not None and rows <= 16 and d <= 128:
        return triton_configs.pick("gate_decode", (16, 64, 4, 2))
    # D<=128: fastest of 6 candidates on an H200 (bench_gpu.py --sweep, benchmarks/RESULTS.md)
    return triton_configs.pick("gate", (64, 32, 4, 2) if d <= 128 else (32, 32, 8, 1))


def gate_precision(q: Tensor) -> str:
    """How the kernel computes the fp32 gate: "ieee" (interpreter, HIP), "split3" (bf16/fp16 on
    tensor cores, exact q times a three-part split of the fp32 means), "tf32x3" (fp32 inputs)."""
    if q.dtype == torch.float32:
        return "ieee" if interpreted(q.device) or torch.version.hip else "tf32x3"
    # bf16/fp16: split3 also under the interpreter (tests check it on CPU); an override may pick another
    prec = triton_configs.pick("gate_prec", "split3")
    return "ieee" if prec == "tf32x3" and (interpreted(q.device) or torch.version.hip) else prec


def gate_tiles(device: torch.device, d: int) -> tuple[int, int]:
    return gate_config(device, d)[:2]


def block_means(p: Problem) -> Tensor:
    """fp32 `[B*Hkv, NB, D]` mean key of every block (partial last block divided by its size)."""
    nb = p.n_blocks
    means = torch.empty((p.batch * p.hkv, nb, p.d), dtype=torch.float32, device=p.q.device)
    block_d = max(16, next_pow2(p.d))
    block_n = 16 if interpreted(p.q.device) else 64
    launch(_block_means_kernel)[(nb, p.batch * p.hkv)](
        p.k, means, p.k_start, p.k_len, p.sk.sb, p.sk.sh, p.sk.st, p.hkv, nb, p.block_size,
        D=p.d, BLOCK_D=block_d, BLOCK_N=block_n,
    )
    return means


def block_visibility(p: Problem) -> Tensor | None:
    """Bool `[B, Hq, Tq, NB]` (broadcast views kept): does block j hold a key the mask shows?"""
    if p.attn_mask is None:
        return None
    mask = p.attn_mask
    # Work on the un-broadcast mask where possible, then expand (stride-0 views).
    squeezed = mask
    for dim in range(4):
        if squeezed.stride(dim) == 0:
            squeezed = squeezed.narrow(dim, 0, 1)
    visible = squeezed != 0 if squeezed.dtype == torch.uint8 else squeezed != float("-inf")
    nb, bs = p.n_blocks, p.block_size
    pad = nb * bs - p.max_tk
    visible = torch.nn.functional.pad(visible, (0, pad), value=False)
    vis = visible.reshape(*visible.shape[:3], nb, bs).any(-1)
    return vis.expand(p.batch, p.hq, p.max_tq, nb).view(torch.uint8)


def select_blocks(p: Problem, block_m: int | None = None, means: Tensor | None = None,
                  partial: bool = False) -> Selection:
    """Run the fused gate/top-k kernel: each row's `top_k - 1` best candidate blocks. `means`: a cache
    of the block means (`[B, Hkv, NB, D]`, dense layout) instead of computing them from K.
    `partial`: the best `top_k - 1` of each of several block ranges, scanned in parallel, with their
    scores (`Selection.part_picks` / `part_scores`; `picks` is then not filled): for decode, whose
    few rows would leave the GPU idle while one program walks all blocks."""
    dev = p.q.device
    default_m, block_n, warps, stages = gate_config(dev, p.d, p.rows)
    block_m = block_m or default_m
    n_pick = min(p.top_k - 1, p.n_blocks)
    kp = max(1, next_pow2(n_pick))
    n_tiles = -(-p.rows // block_m)
    rp = n_tiles * block_m
    bps = -(-p.n_blocks // block_n) * block_n
    nsplit = 1
    if partial:
        nsplit = min(-(-p.n_blocks // block_n), _MAX_GATE_SPLITS, max(1, _MAX_MERGE_CANDIDATES // kp))
        bps = -(-(-(-p.n_blocks // nsplit)) // block_n) * block_n
        nsplit = -(-p.n_blocks // bps)
    shape = (p.batch * p.hkv, rp, nsplit, kp) if partial else (p.batch * p.hkv, rp, kp)
    picks = torch.empty(shape, dtype=torch.int32, device=dev)  # the kernel writes all
    ref = torch.empty(shape if partial else shape[:2], dtype=torch.float32, device=dev)
    if means is None:
        means = block_means(p)
    else:
        means = means.to(torch.float32).reshape(p.batch * p.hkv, p.n_blocks, p.d).contiguous()
    vis = block_visibility(p) if n_pick > 0 else None
    vis_arg = vis if vis is not None else picks
    vs = vis.stride() if vis is not None else (0, 0, 0, 0)
    launch(_gate_topk_kernel)[(n_tiles, p.batch * p.hkv, nsplit)](
        p.q, means, picks, ref, vis_arg, p.q_start, p.q_len, p.k_len, p.sq.sb, p.sq.sh, p.sq.st,
        vs[0], vs[1], vs[2], vs[3], p.hkv, p.group, p.n_blocks, rp, p.block_size, n_pick, nsplit, bps,
        CAUSAL=p.causal, HAS_VIS=vis is not None, KP=kp, BLOCK_M=block_m,
        BLOCK_N=block_n, BLOCK_D=max(16, next_pow2(p.d)), D=p.d, GATE_PREC=gate_precision(p.q),
        PARTIAL=partial, num_warps=warps, num_stages=stages,
    )
    if partial:
        return Selection(picks=picks.new_empty(0), n_pick=n_pick, row_pad=rp, part_picks=picks, part_scores=ref)
    return Selection(picks=picks, n_pick=n_pick, row_pad=rp, ref=ref)


def row_blocks(p: Problem, sel: Selection) -> Tensor:
    """int32 `[B*Hkv, RP, KS]`: own block then picks per row; -1 for none / padding rows."""
    dev = sel.picks.device
    rows = torch.arange(sel.row_pad, device=dev)
    t = rows // p.group
    q_len = p.q_len.repeat_interleave(p.hkv)[:, None]  # [B*Hkv, 1]
    k_len = p.k_len.repeat_interleave(p.hkv)[:, None]
    valid = t[None, :] < q_len
    own = torch.where(valid & sel.own_block, (k_len - q_len + t[None, :]) // p.block_size, -1).to(torch.int32)
    picks = torch.where(valid[..., None], sel.picks, -1)
    return torch.cat([own[..., None], picks], dim=-1)


def build_csr(p: Problem, sel: Selection) -> Selection:
    """Invert the selection once: per (batch, KV head, block), the sorted rows that attend it."""
    blocks = row_blocks(p, sel)  # [BH, RP, KS]
    bh, rp, ks = blocks.shape
    nb = p.n_blocks
    key = torch.where(blocks >= 0, blocks, nb).reshape(bh, rp * ks)  # int32: half the sort traffic of int64
    sorted_key, perm = torch.sort(key, dim=-1, stable=True)
    bounds = torch.arange(nb + 1, device=key.device, dtype=sorted_key.dtype).expand(bh, nb + 1).contiguous()
    sel.offsets = torch.searchsorted(sorted_key.contiguous(), bounds).to(torch.int32)
    sel.entry_row = (perm // ks).to(torch.int32)
    sel.entry_src = perm.to(torch.int32)
    return sel


def selection_map(p: Problem, sel: Selection) -> Tensor:
    """Boolean `[B, Hq, Tq, NB]` of attended blocks (own included), for tests and inspection."""
    blocks = row_blocks(p, sel)[:, : p.rows]  # [BH, Tq*G, KS]
    nb = p.n_blocks
    onehot = torch.zeros((*blocks.shape[:2], nb + 1), dtype=torch.bool, device=blocks.device)
    onehot.scatter_(-1, torch.where(blocks >= 0, blocks, nb).long(), True)
    out = onehot[..., :nb].view(p.batch, p.hkv, p.max_tq, p.group, nb)
    return out.permute(0, 1, 3, 2, 4).reshape(p.batch, p.hq, p.max_tq, nb)


def selection_from_map(p: Problem, selected: Tensor) -> Selection:
    """Picks in kernel layout from a boolean `[B, Hq, Tq, NB]` map (own block ignored): for tests."""
    b, hq, tq, nb = selected.shape
    own = _own_blocks(p, tq, selected.device)
    hist = selected & (torch.arange(nb, device=selected.device)[None, :] != own[:, None])
    n_pick = int(hist.sum(-1).max().item()) if hist.numel() else 0
    kp = max(1, next_pow2(n_pick))
    ids = torch.where(hist, torch.arange(nb, device=selected.device), nb + 1)
    ids = ids.sort(-1).values
    ids = ids[..., :kp] if nb >= kp else torch.nn.functional.pad(ids, (0, kp - nb), value=nb + 1)
    ids = torch.where(ids > nb, -1, ids)  # [B, Hq, Tq, KP]
    return _selection_of_rows(p, ids, n_pick)


def selection_from_picks(p: Problem, picks: Tensor, own_block: bool = True) -> Selection:
    """Picks in kernel layout from history blocks given per query row, `[B, Hq, Tq, S]` block indices
    of k (-1 = none, own block excluded; what context parallelism's gate chose). `own_block=False`:
    the rows attend these blocks only."""
    s = picks.shape[-1]
    kp = max(1, next_pow2(s))
    return _selection_of_rows(p, torch.nn.functional.pad(picks, (0, kp - s), value=-1) if kp > s else picks, s,
                              own_block)


def _own_blocks(p: Problem, tq: int, device) -> Tensor:
    """Each query's own block: the queries are the newest `Tq` of the `Tk` keys."""
    return (torch.arange(tq, device=device) + p.max_tk - tq) // p.block_size


# Gate scores (batch x query heads x query rows x blocks) computed at once for a given selection's
# softmax reference: bounds its memory at long context (a rank's 128K queries x 2K blocks).
_REF_CHUNK_ELEMS = 1 << 24


def _selection_of_rows(p: Problem, ids: Tensor, n_pick: int, own_block: bool = True) -> Selection:
    """`Selection` from per-query history picks `ids` `[B, Hq, Tq, KP]` (-1 = none), with the softmax
    reference the gate kernel would give: each row's best gate score over its attended blocks (own
    block, unless `own_block=False`, and picks; 0 for a row attending nothing), computed in row chunks."""
    b, hq, tq, kp = ids.shape
    nb, dev, g = p.n_blocks, ids.device, p.group
    default_m, _ = gate_tiles(dev, p.d)
    rp = -(-p.rows // default_m) * default_m
    rows = ids.to(torch.int32).view(b, p.hkv, g, tq, kp).permute(0, 1, 3, 2, 4).reshape(b * p.hkv, tq * g, kp)
    picks = torch.full((b * p.hkv, rp, kp), -1, dtype=torch.int32, device=dev)
    picks[:, : tq * g] = rows
    means_t = block_means(p).view(b, p.hkv, 1, nb, p.d).transpose(-1, -2)  # [B, Hkv, 1, D, NB]
    own = _own_blocks(p, tq, dev)
    best = torch.empty((b, p.hkv, g, tq), dtype=torch.float32, device=dev)
    step = max(1, _REF_CHUNK_ELEMS // max(1, b * hq * nb))
    for t0 in range(0, tq, step):
        t1 = min(tq, t0 + step)
        gate = p.q[:, :, t0:t1].float().reshape(b, p.hkv, g, t1 - t0, p.d) @ means_t  # [B, Hkv, G, rows, NB]
        own_t = own[t0:t1] if own_block else torch.full_like(own[t0:t1], -1)
        blocks = torch.cat([own_t.view(1, 1, -1, 1).expand(b, hq, -1, 1), ids[:, :, t0:t1]], dim=-1)
        blocks = blocks.view(b, p.hkv, g, t1 - t0, kp + 1)
        scores = gate.gather(-1, blocks.clamp(min=0)).masked_fill_(blocks < 0, float("-inf"))
        best[..., t0:t1] = scores.amax(-1)
    if not own_block:
        best.masked_fill_(torch.isneginf(best), 0.0)
    ref = torch.zeros((b * p.hkv, rp), dtype=torch.float32, device=dev)
    ref[:, : tq * g] = best.permute(0, 1, 3, 2).reshape(b * p.hkv, tq * g)
    return Selection(picks=picks, n_pick=n_pick, row_pad=rp, ref=ref, own_block=own_block)
