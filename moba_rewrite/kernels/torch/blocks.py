"""`torch` backend: memory-efficient MoBA in pure PyTorch (CPU, and a GPU fallback).

Gather-and-densify in the spirit of FlashMoBA: queries are routed to key blocks chunk by
chunk (`torch_select`), the (query, block) pairs are sorted by key block, and each key block
attends all the query rows that selected it (every query head of its GQA group) with one
dense matmul. Two implementations share that routing:

* `torch_fast`: no running softmax maximum, own blocks batched with the causal triangle
  mostly skipped, `exp2`; used when scores are provably bounded, the mask (if any) is
  boolean and there is at least one block of queries (prefill, chunked prefill).
* `torch_online`: online softmax with a running maximum per query row; exact for any input
  (additive float masks, huge scores) and cheapest for decode and short query chunks.

Neither materialises `Tq x Tk` scores or the whole `[B, Hq, Tq, n_blocks]` gate: memory is
the output's size plus `O(B * Hq * Tq * top_k)` routing integers plus bounded tiles, in the
forward and the backward alike. Autograd comes from the `moba::attention` op.

On a multi-core CPU a large call is split by (batch, kv head) groups across one Python thread
per core, each running its part with one intra-op thread (`_split`): the parts are
independent, and single-threaded tiles beat two-thread ops that meet at a barrier dozens of
times per tile (and stall whenever another process holds a core).
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

from moba_rewrite.kernels.mask_forms import key_prefix, simplify
from moba_rewrite.kernels.torch import decode as torch_decode, fast as torch_fast, online as torch_online
from moba_rewrite.kernels.threads import single_threaded
from moba_rewrite.kernels.torch.select import block_selection, compute_dtype, mask4

__all__ = ["forward", "backward", "forward_kv_cache", "block_selection", "implementation"]


def implementation(q: Tensor, k: Tensor, v: Tensor, *, block_size: int, scale: float,
                   attn_mask: Tensor | None):
    """The module (`torch_fast` or `torch_online`) that handles these inputs."""
    if q.shape[2] >= block_size and torch_fast.applicable(q, k, v, scale=scale, attn_mask=attn_mask):
        return torch_fast
    return torch_online


# Query rows (B * Hq * Tq) from which a CPU call is split across threads. Forward: 2K tokens x 4
# heads. Once the workers really ran one intra-op thread each (see `_single_threaded`), the
# split forward was faster than two-thread ops at 8K x 4 heads (per-process medians 145-156 ms
# against 157-190 ms, quiet machine) and equal at 2K and 4K; under load the split is the one
# that does not stall (8K: 0.3 s against 2.5 to 10 s). Backward: 16K tokens x 4 heads; at 8K the
# split forward+backward measured no faster (590-689 ms against 598-653 ms).
_SPLIT_MIN_ROWS = 1 << 13
_SPLIT_MIN_ROWS_BACKWARD = 1 << 16
_OPENMP = None


def _openmp() -> bool:
    """True when ATen's intra-op threads are OpenMP (per-thread thread counts: safe to split)."""
    global _OPENMP
    if _OPENMP is None:
        _OPENMP = "ATen parallel backend: OpenMP" in torch.__config__.parallel_info()
    return _OPENMP


def _split_plan(q: Tensor, k: Tensor, min_rows: int | None = None) -> tuple[int, list[tuple[int, int]]]:
    """(dim, [(start, end), ...] in kv units along it) for a threaded split, or (0, []) for none."""
    n = torch.get_num_threads()
    min_rows = _SPLIT_MIN_ROWS if min_rows is None else min_rows
    if q.device.type != "cpu" or n < 2 or q.shape[0] * q.shape[1] * q.shape[2] < min_rows or not _openmp():
        return 0, []
    # Dispatch modes and autocast are thread-local: worker threads would not see them.
    if _get_current_dispatch_mode() is not None or torch.is_autocast_enabled("cpu"):
        return 0, []
    b, hkv = k.shape[0], k.shape[1]
    dim, size = (1, hkv) if hkv >= min(b, n) else (0, b)
    parts = min(n, size)
    if parts < 2:
        return 0, []
    cuts = [size * i // parts for i in range(parts + 1)]
    return dim, list(zip(cuts[:-1], cuts[1:]))


def _slicer(dim: int, g: int):
    """Slicing functions for one part: q-layout tensors, kv-layout tensors, the attention mask."""
    def q_part(x: Tensor, a: int, e: int) -> Tensor:
        return x[:, a * g: e * g] if dim == 1 else x[a:e]

    def kv_part(x: Tensor, a: int, e: int) -> Tensor:
        return x[:, a:e] if dim == 1 else x[a:e]

    def mask_part(m: Tensor | None, a: int, e: int) -> Tensor | None:
        m4 = mask4(m)
        if m4 is None or m4.shape[dim] == 1:
            return m4
        return q_part(m4, a, e)
    return q_part, kv_part, mask_part


_POOL: tuple[int, int, ThreadPoolExecutor] | None = None  # (pid, workers, executor)
_POOL_LOCK = threading.Lock()


def _single_threaded() -> None:
    """Pool thread initializer: one intra-op thread for this thread, for good.

    `torch.set_num_threads(1)` sets this thread's OpenMP/MKL counts and the process default; ATen
    re-reads that default in each thread at its first parallel op (a lazy per-thread init), which
    in a pool thread would come after `_pool` restored the caller's count: elementwise ops and
    reductions in the workers then ran on two OpenMP threads each, four busy threads on two
    cores (128K: per worker 2.5 s CPU but 3.3 s wall). `get_num_threads()` runs that lazy init
    now, while the default is 1."""
    torch.set_num_threads(1)
    if torch.get_num_threads() != 1:
        raise RuntimeError(f"expected one intra-op thread in a moba worker, got {torch.get_num_threads()}")


def _pool(workers: int) -> ThreadPoolExecutor:
    """Persistent worker threads with one intra-op thread each (MKL and OpenMP set up once per
    thread, not per call); rebuilt after a fork or when the thread count changes."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL[0] != os.getpid() or _POOL[1] != workers:
            n_threads = torch.get_num_threads()
            executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="moba-torch",
                                          initializer=_single_threaded)
            # Start every worker now, then restore the process default the initializers lowered.
            for f in [executor.submit(time.sleep, 0.01) for _ in range(workers)]:
                f.result()
            torch.set_num_threads(n_threads)
            _POOL = (os.getpid(), workers, executor)
        return _POOL[2]


def _run_parts(ranges: list[tuple[int, int]], work) -> None:
    """Run `work(a, e)` for every range on the worker pool (one single-threaded worker per core).
    Inference mode is per thread: the caller's is entered in the workers, whose writes into buffers
    the caller made under `torch.inference_mode()` (inference tensors) are allowed only there."""
    inference = torch.is_inference_mode_enabled()

    def run(a: int, e: int) -> None:
        with torch.inference_mode(inference), torch.no_grad():
            work(a, e)

    futures = [_pool(torch.get_num_threads()).submit(run, a, e) for a, e in ranges]
    for f in futures:
        f.result()


def forward(q: Tensor, k: Tensor, v: Tensor, *, block_size: int, top_k: int, causal: bool, scale: float,
            attn_mask: Tensor | None, selection: Tensor | None = None,
            return_lse: bool = False, own_block: bool = True) -> Tensor | tuple[Tensor, Tensor]:
    """MoBA output `[B, Hq, Tq, Dv]` in `q`'s dtype (SPEC section 2).

    `selection` (`[B, Hq, Tq, picks]` int64 block indices of k, -1 = none, own block excluded):
    attend these history blocks instead of gating (`select.route`; used by context parallelism).
    `return_lse`: also each row's log-sum-exp of its scaled scores, `[B, Hq, Tq]` in compute
    precision (-inf where a row sees no key): `(out, lse)`, to merge with attention elsewhere.
    `own_block=False` (with `selection`): attend only the selected blocks, not each query's own
    (context parallelism attends the fetched blocks apart from the local ones; a row with no
    pick gets zeros and lse -inf); pass `causal=False` then (a selected block is whole), and k
    may hold fewer keys than q has queries."""
    _check_own_block(own_block, selection)
    attn_mask, causal = simplify(q, k, attn_mask, causal)  # a mask read as causal + key mask when it is one
    kw = dict(block_size=block_size, top_k=top_k, causal=causal, scale=scale)
    if return_lse:
        kw["return_lse"] = True
    if not own_block:
        kw["own_block"] = False
    dim, ranges = _split_plan(q, k)
    if not ranges:
        impl = implementation(q, k, v, block_size=block_size, scale=scale, attn_mask=attn_mask)
        return impl.forward(q, k, v, attn_mask=attn_mask, selection=selection, **kw)
    q_part, kv_part, mask_part = _slicer(dim, q.shape[1] // k.shape[1])
    out = q.new_empty((*q.shape[:-1], v.shape[-1]))
    lse = torch.empty(q.shape[:-1], dtype=compute_dtype(q.dtype), device=q.device) if return_lse else None

    def work(a: int, e: int) -> None:
        # Each part picks its implementation (exact either way), in its single-threaded worker.
        qa, ka, va, ma = q_part(q, a, e), kv_part(k, a, e), kv_part(v, a, e), mask_part(attn_mask, a, e)
        sa = None if selection is None else q_part(selection, a, e)
        impl = implementation(qa, ka, va, block_size=block_size, scale=scale, attn_mask=ma)
        dst = q_part(out, a, e)
        if impl is torch_fast:  # accumulates straight into the output where it can
            got = impl.forward(qa, ka, va, attn_mask=ma, out=dst, selection=sa, **kw)
        else:
            got = impl.forward(qa, ka, va, attn_mask=ma, selection=sa, **kw)
            dst.copy_(got[0] if return_lse else got)
        if return_lse:
            q_part(lse, a, e).copy_(got[1])
    _run_parts(ranges, work)
    return (out, lse) if return_lse else out


def _check_own_block(own_block: bool, selection: Tensor | None) -> None:
    if not own_block and selection is None:
        raise ValueError("moba torch backend: own_block=False needs an explicit selection (which blocks to attend)")


def backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, *, block_size: int, top_k: int,
             causal: bool, scale: float, attn_mask: Tensor | None, selection: Tensor | None = None,
             lse: Tensor | None = None, own_block: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """`(dq, dk, dv)` of `forward` (dk, dv summed over each GQA group); `selection` and `own_block`
    as in `forward`. `lse` (`[B, Hq, Tq]`): the rows' log-sum-exp over all the keys they attend, of
    which `k` is a part, with `out` the merged output (context parallelism: this part's share of
    the gradients)."""
    _check_own_block(own_block, selection)
    attn_mask, causal = simplify(q, k, attn_mask, causal)
    kw = dict(block_size=block_size, top_k=top_k, causal=causal, scale=scale)
    if lse is not None:
        kw["lse"] = lse
    if not own_block:
        kw["own_block"] = False
    dim, ranges = _split_plan(q, k, _SPLIT_MIN_ROWS_BACKWARD)
    if not ranges:
        impl = implementation(q, k, v, block_size=block_size, scale=scale, attn_mask=attn_mask)
        return impl.backward(grad_out, q, k, v, out, attn_mask=attn_mask, selection=selection, **kw)
    q_part, kv_part, mask_part = _slicer(dim, q.shape[1] // k.shape[1])
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    def work(a: int, e: int) -> None:
        qa, ka, va, ma = q_part(q, a, e), kv_part(k, a, e), kv_part(v, a, e), mask_part(attn_mask, a, e)
        sa = None if selection is None else q_part(selection, a, e)
        impl = implementation(qa, ka, va, block_size=block_size, scale=scale, attn_mask=ma)
        kwa = kw if lse is None else {**kw, "lse": q_part(lse, a, e)}
        grads = impl.backward(q_part(grad_out, a, e), qa, ka, va, q_part(out, a, e), attn_mask=ma, selection=sa,
                              **kwa)
        for dst, src, part in ((dq, grads[0], q_part), (dk, grads[1], kv_part), (dv, grads[2], kv_part)):
            part(dst, a, e).copy_(src)
    _run_parts(ranges, work)
    return dq, dk, dv


def forward_kv_cache(q: Tensor, k_cache: Tensor, v_cache: Tensor, key_block_means: Tensor, cache_position: Tensor, *,
                     block_size: int, top_k: int, causal: bool, scale: float, attn_mask: Tensor | None) -> Tensor:
    """MoBA of the queries at `cache_position` against the filled prefix of a KV cache (SPEC section 2
    item 9). Few queries (decode): `torch_decode`, which gates on the cached means and reads only the
    selected blocks, with no host sync. More (prefill into a cache): the filled length is read once
    and `forward` runs on the filled prefix (it computes the means it needs from k)."""
    if torch_decode.applicable(q, block_size, top_k, k_cache.shape[2]):
        with single_threaded(q.device):  # small ops: no OpenMP barriers to stall on (kernels.threads)
            return torch_decode.forward(q, k_cache, v_cache, key_block_means, cache_position, block_size=block_size,
                                        top_k=top_k, causal=causal, scale=scale, attn_mask=attn_mask)
    filled = int(cache_position[-1]) + 1
    return forward(q, k_cache[:, :, :filled], v_cache[:, :, :filled], block_size=block_size, top_k=top_k,
                   causal=causal, scale=scale, attn_mask=key_prefix(attn_mask, filled))
