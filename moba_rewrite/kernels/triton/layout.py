"""Host-side description of one MoBA problem for the Triton kernels.

Every kernel addresses tensors through `(batch, head, token)` strides plus per-sequence
start offsets and lengths, so the same kernels serve the SDPA layout `[B, H, T, D]`
(starts 0, one length for all) and flash-attn's packed varlen layout `[total, H, D]`
(batch stride 0, starts from `cu_seqlens`).

Inside the kernels a "row" is one (query, query head) pair of a KV head's group:
`R = t * G + g` with `G = Hq // Hkv`, so the query heads sharing a KV head are tiled
together and share every K/V load.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# triton 3.6's interpreter + numpy >= 2.4: scalar loop bounds (see the module's docstring)
from moba_rewrite.kernels.triton import interp_compat as triton_interp_compat  # noqa: F401


def next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def interpreted(device: torch.device) -> bool:
    """True when kernels run under the Triton interpreter (CPU tensors)."""
    return device.type != "cuda"


def _tracing() -> bool:
    """Is a tracer (make_fx / AOTAutograd / fake tensors / Dynamo) looking at these launches?"""
    keys = torch._C._TorchDispatchModeKey
    modes = (keys.PROXY, keys.FAKE, keys.FUNCTIONAL)
    return torch.compiler.is_compiling() or any(torch._C._get_dispatch_mode(k) is not None for k in modes)


def capturing(device: torch.device) -> bool:
    """Is a CUDA graph being captured on the current stream (no host syncs, no cached allocations)?"""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


class launch:
    """`launch(kernel)[grid](...)`: through `torch.library.wrap_triton` while a tracer is active, so
    torch.compile and AOTInductor capture (and embed) the kernels of the `moba::triton_attention*`
    ops; a direct launch otherwise (the wrapper's eager path costs about 1 ms per launch), and
    always under the interpreter, whose kernels are not JIT functions."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        from triton.runtime.jit import JITFunction

        if isinstance(self.kernel, JITFunction) and _tracing():
            return torch.library.wrap_triton(self.kernel)[grid]
        return self.kernel[grid]


@dataclass
class Seqs:
    """Tensor strides of one `[.., H, T, D]`-like tensor: (batch, head, token)."""

    sb: int
    sh: int
    st: int


def strides_bhtd(x: Tensor) -> Seqs:
    return Seqs(x.stride(0), x.stride(1), x.stride(2))


def strides_thd(x: Tensor) -> Seqs:
    return Seqs(0, x.stride(1), x.stride(0))


@dataclass
class Problem:
    """Shapes, offsets and MoBA parameters shared by the gate, forward and backward kernels."""

    q: Tensor
    k: Tensor
    v: Tensor
    sq: Seqs
    sk: Seqs
    sv: Seqs
    q_start: Tensor  # int32 [B]
    q_len: Tensor  # int32 [B]
    k_start: Tensor  # int32 [B]
    k_len: Tensor  # int32 [B]
    batch: int
    hq: int
    hkv: int
    d: int
    max_tq: int
    max_tk: int
    block_size: int
    top_k: int
    causal: bool
    scale: float
    varlen: bool
    attn_mask: Tensor | None = None  # expanded to [B, Hq, Tq, Tk] (dense layout only)
    dv: int = 0  # value (and output) head dim; 0: the same as `d` (MLA has Dv != Dqk)

    def __post_init__(self):
        if not self.dv:
            self.dv = self.d

    @property
    def group(self) -> int:
        return self.hq // self.hkv

    @property
    def n_blocks(self) -> int:
        return -(-self.max_tk // self.block_size)

    @property
    def rows(self) -> int:
        return self.max_tq * self.group

    def out_strides(self, o: Tensor) -> Seqs:
        return strides_thd(o) if self.varlen else strides_bhtd(o)

    @property
    def out_shape(self) -> tuple[int, ...]:
        """q's shape with the value head dim last: `[B, Hq, Tq, Dv]` or packed `[total_q, Hq, Dv]`."""
        return (*self.q.shape[:-1], self.dv)

    def new_out(self, dtype: torch.dtype, *, written: bool = False) -> Tensor:
        """An output-shaped buffer (`out_shape`): zeroed (fp32 accumulators are summed into it), or left
        uninitialised when `written` says a kernel stores every row and the layout is dense
        (packed layouts may hold tokens outside every sequence, which must read as zeros)."""
        if written and not self.varlen:
            return torch.empty(self.out_shape, dtype=dtype, device=self.q.device)
        return torch.zeros(self.out_shape, dtype=dtype, device=self.q.device)


def unit_last(x: Tensor) -> Tensor:
    """The kernels address the head dim with stride 1; other strides are free."""
    return x if x.stride(-1) == 1 else x.contiguous()


_SEQ_TENSORS: dict[tuple, tuple[Tensor, Tensor, Tensor, Tensor]] = {}


def _dense_seqs(b: int, tq: int, tk: int, dev: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(q_start, q_len, k_start, k_len) of a dense batch. Eager calls on the default stream reuse
    them per shape (each is a fill launch, a cost that decode steps notice); traced, graph-captured
    and side-stream calls build fresh ones."""
    def build():
        zeros = torch.zeros(b, dtype=torch.int32, device=dev)
        return (zeros, torch.full((b,), tq, dtype=torch.int32, device=dev), zeros,
                torch.full((b,), tk, dtype=torch.int32, device=dev))

    if _tracing() or capturing(dev) or not _may_keep(dev):
        return build()
    key = (b, tq, tk, dev)
    seqs = _SEQ_TENSORS.get(key)
    if seqs is None:
        if len(_SEQ_TENSORS) >= 256:  # a bounded cache: growing prompts make new shapes every step
            _SEQ_TENSORS.clear()
        seqs = _SEQ_TENSORS[key] = build()
    return seqs


def _may_keep(dev: torch.device) -> bool:
    """May tensors kept between calls be used and made now? Not on a side CUDA stream: CUDA-graph
    warm-ups run there (torch.compile's cudagraph trees, `torch.cuda.graph` recipes) with
    allocations routed to the graph's private pool, where a tensor we keep would be rejected
    ("tensors in the cudagraph pool not tracked as outputs") or overwritten; and a kept tensor
    read on another stream could be freed (cache cleared) while that stream still reads it."""
    return dev.type != "cuda" or torch.cuda.current_stream(dev) == torch.cuda.default_stream(dev)


def dense_problem(q: Tensor, k: Tensor, v: Tensor, *, block_size: int, top_k: int, causal: bool,
                  scale: float, attn_mask: Tensor | None) -> Problem:
    q, k, v = unit_last(q), unit_last(k), unit_last(v)
    b, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    dev = q.device
    mask = None
    if attn_mask is not None:
        mask = attn_mask.expand(b, hq, tq, tk)
        if mask.dtype == torch.bool:
            mask = mask.view(torch.uint8)
    q_start, q_len, k_start, k_len = _dense_seqs(b, tq, tk, dev)
    return Problem(
        q=q, k=k, v=v, sq=strides_bhtd(q), sk=strides_bhtd(k), sv=strides_bhtd(v),
        q_start=q_start, q_len=q_len, k_start=k_start, k_len=k_len,
        batch=b, hq=hq, hkv=hkv, d=d, max_tq=tq, max_tk=tk, block_size=block_size, top_k=top_k,
        causal=causal, scale=scale, varlen=False, attn_mask=mask, dv=v.shape[-1],
    )


def varlen_problem(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, *, block_size: int,
                   top_k: int, causal: bool, scale: float) -> Problem:
    """Packed layout: q `[total_q, Hq, D]`, k `[total_k, Hkv, D]`, v `[total_k, Hkv, Dv]`, int32 `cu_seqlens`."""
    q, k, v = unit_last(q), unit_last(k), unit_last(v)
    q_len = (cu_q[1:] - cu_q[:-1]).to(torch.int32)
    k_len = (cu_k[1:] - cu_k[:-1]).to(torch.int32)
    lens = torch.stack([q_len.max(), k_len.max()]).tolist() if q_len.numel() else [1, 1]
    return Problem(
        q=q, k=k, v=v, sq=strides_thd(q), sk=strides_thd(k), sv=strides_thd(v),
        q_start=cu_q[:-1].to(torch.int32).contiguous(), q_len=q_len.contiguous(),
        k_start=cu_k[:-1].to(torch.int32).contiguous(), k_len=k_len.contiguous(),
        batch=q_len.numel(), hq=q.shape[1], hkv=k.shape[1], d=q.shape[2],
        max_tq=max(int(lens[0]), 1), max_tk=max(int(lens[1]), 1), block_size=block_size, top_k=top_k,
        causal=causal, scale=scale, varlen=True, dv=v.shape[2],
    )
