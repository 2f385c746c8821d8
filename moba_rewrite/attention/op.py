"""The `moba::attention` custom op: one opaque operator in front of every kernel backend.

`torch.compile`, `torch.export`, AOTInductor and the ONNX exporter all see this single node.
The backend is resolved at run time from the tensors' device (`auto`), so an exported
program keeps running well on whatever device it is loaded on.
"""

from __future__ import annotations

import functools
import inspect
from typing import Optional

import torch
from torch import Tensor

from moba_rewrite.kernels import load_backend, resolve_backend
from moba_rewrite.kernels.eager import plain_eager


def _kernel(backend: str, q: Tensor, k: Tensor, attn_mask: Optional[Tensor]):
    return load_backend(resolve_backend(backend, q.device, q, k, attn_mask))


@torch.library.custom_op("moba::attention", mutates_args=())
def attention(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], block_size: int, top_k: int,
    causal: bool, scale: float, backend: str,
) -> Tensor:
    """MoBA attention (SPEC section 2) on validated arguments; see `moba_rewrite.moba_attention`."""
    return _forward(q, k, v, None, attn_mask, block_size, top_k, causal, scale, backend)


@attention.register_fake
def _attention_fake(q, k, v, attn_mask, block_size, top_k, causal, scale, backend):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


@torch.library.custom_op("moba::attention_backward", mutates_args=())
def attention_backward(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, attn_mask: Optional[Tensor],
    block_size: int, top_k: int, causal: bool, scale: float, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of `moba::attention` with respect to q, k and v."""
    if q.shape[0] == 0:  # an empty batch: nothing to differentiate
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    dq, dk, dv = _kernel(backend, q, k, attn_mask).backward(
        grad_out, q, k, v, out, block_size=block_size, top_k=top_k, causal=causal, scale=scale,
        attn_mask=attn_mask,
    )
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@attention_backward.register_fake
def _attention_backward_fake(grad_out, q, k, v, out, attn_mask, block_size, top_k, causal, scale, backend):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, attn_mask, block_size, top_k, causal, scale, backend = inputs
    ctx.save_for_backward(q, k, v, output, attn_mask)
    ctx.params = (block_size, top_k, causal, scale, backend)


def _backward(ctx, grad_out):
    q, k, v, out, attn_mask = ctx.saved_tensors
    block_size, top_k, causal, scale, backend = ctx.params
    dq, dk, dv = attention_backward(
        grad_out.contiguous(), q, k, v, out, attn_mask, block_size, top_k, causal, scale, backend
    )
    return dq, dk, dv, None, None, None, None, None, None


attention.register_autograd(_backward, setup_context=_setup_context)


def _forward(q: Tensor, k: Tensor, v: Tensor, key_block_means: Optional[Tensor], attn_mask: Optional[Tensor],
             block_size: int, top_k: int, causal: bool, scale: float, backend: str) -> Tensor:
    """The implementation behind both forward ops: the backend's forward, output contiguous."""
    if q.shape[0] == 0:  # an empty batch (a last partial batch): an empty output, as SDPA gives
        return q.new_empty((*q.shape[:-1], v.shape[-1]))
    kernel = _kernel(backend, q, k, attn_mask)
    kw = dict(block_size=block_size, top_k=top_k, causal=causal, scale=scale, attn_mask=attn_mask)
    if key_block_means is not None and _takes_block_means(kernel.forward):
        kw["key_block_means"] = key_block_means
    return kernel.forward(q, k, v, **kw).contiguous()


def run(q: Tensor, k: Tensor, v: Tensor, key_block_means: Optional[Tensor], attn_mask: Optional[Tensor],
        block_size: int, top_k: int, causal: bool, scale: float, backend: str) -> Tensor:
    """Call `moba::attention` (or `moba::attention_cached` when block means are given); in plain
    eager mode with no gradient to record, their implementation directly (see `kernels.eager`)."""
    if plain_eager(q, k, v, key_block_means, attn_mask):
        return _forward(q, k, v, key_block_means, attn_mask, block_size, top_k, causal, scale, backend)
    if key_block_means is not None:
        return torch.ops.moba.attention_cached(q, k, v, key_block_means, attn_mask, block_size, top_k, causal,
                                               scale, backend)
    return torch.ops.moba.attention(q, k, v, attn_mask, block_size, top_k, causal, scale, backend)


@functools.lru_cache(maxsize=None)
def _takes_block_means(forward) -> bool:
    """Does this backend's `forward` accept `key_block_means`? (Read once per backend, not per call.)"""
    return "key_block_means" in inspect.signature(forward).parameters


@torch.library.custom_op("moba::attention_cached", mutates_args=())
def attention_cached(
    q: Tensor, k: Tensor, v: Tensor, key_block_means: Tensor, attn_mask: Optional[Tensor], block_size: int,
    top_k: int, causal: bool, scale: float, backend: str,
) -> Tensor:
    """`moba::attention` with the block means of k given (a cache kept beside the KV cache).
    Backends whose gate takes means (`reference`, `triton`) use them; the others compute the
    same means from k (identical results when the cache is current)."""
    return _forward(q, k, v, key_block_means, attn_mask, block_size, top_k, causal, scale, backend)


@attention_cached.register_fake
def _attention_cached_fake(q, k, v, key_block_means, attn_mask, block_size, top_k, causal, scale, backend):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def _setup_context_cached(ctx, inputs, output):
    q, k, v, _, attn_mask, block_size, top_k, causal, scale, backend = inputs
    ctx.save_for_backward(q, k, v, output, attn_mask)
    ctx.params = (block_size, top_k, causal, scale, backend)


def _backward_cached(ctx, grad_out):
    dq, dk, dv, *_ = _backward(ctx, grad_out)  # the selection is recomputed from k: same blocks
    return dq, dk, dv, None, None, None, None, None, None, None


attention_cached.register_autograd(_backward_cached, setup_context=_setup_context_cached)
