"""The `moba::attention` custom op: one opaque operator in front of every kernel backend.

`torch.compile`, `torch.export`, AOTInductor and the ONNX exporter all see this single node.
The backend is resolved at run time from the tensors' device (`auto`), so an exported
program keeps running well on whatever device it is loaded on.

Short context: when `top_k * block_size >= Tk` MoBA selects every block and equals full
attention, so the op runs the exact dense kernel (`kernels.dense`, SDPA) instead; `dense_below`
(a policy's `dense_below: N`) asks for full attention whenever `Tk < N`. The choice is made
here, per call, because `Tk` is only known at run time in a traced graph. The `reference`
backend (the test oracle) always runs MoBA's definition.
"""

from __future__ import annotations

import functools
import inspect
from typing import Optional

import torch
from torch import Tensor

from moba_rewrite.attention import autocast
from moba_rewrite.kernels import dense, load_backend, reference, resolve_backend
from moba_rewrite.kernels.eager import plain_eager
from moba_rewrite.kernels.grad_layout import like_inputs


def _kernel(backend: str, q: Tensor, k: Tensor, attn_mask: Optional[Tensor], v: Optional[Tensor] = None):
    return load_backend(resolve_backend(backend, q.device, q, k, attn_mask, v=v))


@torch.library.custom_op("moba::attention", mutates_args=())
def attention(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], block_size: int, top_k: int,
    causal: bool, scale: float, backend: str, dense_below: int = 0,
) -> Tensor:
    """MoBA attention (SPEC section 2) on validated arguments; see `moba_rewrite.moba_attention`.
    Full attention where MoBA equals it or `Tk < dense_below` (module docstring)."""
    return _forward(q, k, v, None, attn_mask, block_size, top_k, causal, scale, backend, dense_below)


@attention.register_fake
def _attention_fake(q, k, v, attn_mask, block_size, top_k, causal, scale, backend, dense_below=0):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


@torch.library.custom_op("moba::attention_backward", mutates_args=())
def attention_backward(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, attn_mask: Optional[Tensor],
    block_size: int, top_k: int, causal: bool, scale: float, backend: str, dense_below: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of `moba::attention` with respect to q, k and v."""
    if q.shape[0] == 0:  # an empty batch: nothing to differentiate
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    if runs_dense(backend, q, k, block_size, top_k, dense_below):
        dq, dk, dv = dense.backward(grad_out, q, k, v, out, causal=causal, scale=scale, attn_mask=attn_mask)
    else:
        dq, dk, dv = _kernel(backend, q, k, attn_mask, v).backward(
            grad_out, q, k, v, out, block_size=block_size, top_k=top_k, causal=causal, scale=scale,
            attn_mask=attn_mask,
        )
    return like_inputs((dq, dk, dv), (q, k, v))  # the fake's layout (grad_layout)


@attention_backward.register_fake
def _attention_backward_fake(grad_out, q, k, v, out, attn_mask, block_size, top_k, causal, scale, backend,
                             dense_below=0):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, attn_mask, block_size, top_k, causal, scale, backend, *rest = inputs
    ctx.save_for_backward(q, k, v, output, attn_mask)
    ctx.params = (block_size, top_k, causal, scale, backend, rest[0] if rest else 0)


def _gradients(ctx, grad_out, mask_input: int):
    """(dq, dk, dv, d mask or None) of the saved call; `mask_input`: the mask's place among the op's inputs."""
    q, k, v, out, attn_mask = ctx.saved_tensors
    grad_out = grad_out.contiguous()
    dq, dk, dv = attention_backward(grad_out, q, k, v, out, attn_mask, *ctx.params)
    dmask = mask_gradient(grad_out, q, k, v, attn_mask, *ctx.params) if ctx.needs_input_grad[mask_input] else None
    return dq, dk, dv, dmask


def _backward(ctx, grad_out):
    dq, dk, dv, dmask = _gradients(ctx, grad_out, 3)
    return dq, dk, dv, dmask, None, None, None, None, None, None


def mask_gradient(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor, block_size: int, top_k: int,
                  causal: bool, scale: float, backend: str, dense_below: int = 0) -> Tensor:
    """Gradient with respect to a float `attn_mask` that requires one (a learned bias in the mask):
    the dense reference's, over the blocks the op attended (all of them where it ran full attention
    by `dense_below`; at the dense limit MoBA's selection is every block already). Without it a
    rewritten model would silently stop training such a bias."""
    if dense_by_policy(backend, k.shape[2], dense_below):
        block_size, top_k = k.shape[2], 1  # one block: full attention
    return reference.mask_gradient(grad_out, q, k, v, attn_mask, block_size=block_size, top_k=top_k, causal=causal,
                                   scale=scale)


attention.register_autograd(_backward, setup_context=_setup_context)
autocast.register("attention")


def dense_by_policy(backend: str, keys: int, dense_below: int) -> bool:
    """The policy's `dense_below` asks for full attention: fewer keys than it. Never for the
    `reference` backend (the oracle)."""
    return backend != "reference" and keys < dense_below


def runs_dense(backend: str, q: Tensor, k: Tensor, block_size: int, top_k: int, dense_below: int) -> bool:
    """Whether a call computes full attention: MoBA equals it (every block selected, which holds
    for finite q and k: a NaN or infinite gate score leaves a block unselected, SPEC 2.4), or the
    policy asked for it below `dense_below` keys. Never for the `reference` backend (the oracle)."""
    if backend == "reference":
        return False
    tk = k.shape[2]
    if dense_by_policy(backend, tk, dense_below):
        return True
    return dense.covers_all_blocks(tk, block_size, top_k) and _finite(q, k)


def _finite(q: Tensor, k: Tensor) -> bool:
    """q and k hold no NaN / inf (one reduction over each). Not read while a CUDA graph is being
    captured (a host read is not allowed there): the dense limit is then taken as it is."""
    if q.is_cuda and torch.cuda.is_current_stream_capturing():
        return True
    return bool(torch.isfinite(k).all()) and bool(torch.isfinite(q).all())


def _forward(q: Tensor, k: Tensor, v: Tensor, key_block_means: Optional[Tensor], attn_mask: Optional[Tensor],
             block_size: int, top_k: int, causal: bool, scale: float, backend: str, dense_below: int = 0) -> Tensor:
    """The implementation behind both forward ops: full attention where MoBA equals it (or the
    policy asks for it), else the backend's forward; output contiguous."""
    if q.shape[0] == 0:  # an empty batch (a last partial batch): an empty output, as SDPA gives
        return q.new_empty((*q.shape[:-1], v.shape[-1]))
    if runs_dense(backend, q, k, block_size, top_k, dense_below):
        return dense.forward(q, k, v, causal=causal, scale=scale, attn_mask=attn_mask).contiguous()
    kernel = _kernel(backend, q, k, attn_mask, v)
    kw = dict(block_size=block_size, top_k=top_k, causal=causal, scale=scale, attn_mask=attn_mask)
    if key_block_means is not None and _takes_block_means(kernel.forward):
        kw["key_block_means"] = key_block_means
    return kernel.forward(q, k, v, **kw).contiguous()


def run(q: Tensor, k: Tensor, v: Tensor, key_block_means: Optional[Tensor], attn_mask: Optional[Tensor],
        block_size: int, top_k: int, causal: bool, scale: float, backend: str, dense_below: int = 0) -> Tensor:
    """Call `moba::attention` (or `moba::attention_cached` when block means are given); in plain
    eager mode with no gradient to record, their implementation directly (see `kernels.eager`)."""
    if plain_eager(q, k, v, key_block_means, attn_mask):
        return _forward(q, k, v, key_block_means, attn_mask, block_size, top_k, causal, scale, backend, dense_below)
    extra = (dense_below,) if dense_below else ()  # graphs keep the short schema when unused
    if key_block_means is not None:
        return torch.ops.moba.attention_cached(q, k, v, key_block_means, attn_mask, block_size, top_k, causal,
                                               scale, backend, *extra)
    return torch.ops.moba.attention(q, k, v, attn_mask, block_size, top_k, causal, scale, backend, *extra)


@functools.lru_cache(maxsize=None)
def _takes_block_means(forward) -> bool:
    """Does this backend's `forward` accept `key_block_means`? (Read once per backend, not per call.)"""
    return "key_block_means" in inspect.signature(forward).parameters


@torch.library.custom_op("moba::attention_cached", mutates_args=())
def attention_cached(
    q: Tensor, k: Tensor, v: Tensor, key_block_means: Tensor, attn_mask: Optional[Tensor], block_size: int,
    top_k: int, causal: bool, scale: float, backend: str, dense_below: int = 0,
) -> Tensor:
    """`moba::attention` with the block means of k given (a cache kept beside the KV cache).
    Backends whose gate takes means (`reference`, `triton`) use them; the others compute the
    same means from k (identical results when the cache is current)."""
    return _forward(q, k, v, key_block_means, attn_mask, block_size, top_k, causal, scale, backend, dense_below)


@attention_cached.register_fake
def _attention_cached_fake(q, k, v, key_block_means, attn_mask, block_size, top_k, causal, scale, backend,
                           dense_below=0):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def _setup_context_cached(ctx, inputs, output):
    q, k, v, _, attn_mask, block_size, top_k, causal, scale, backend, *rest = inputs
    ctx.save_for_backward(q, k, v, output, attn_mask)
    ctx.params = (block_size, top_k, causal, scale, backend, rest[0] if rest else 0)


def _backward_cached(ctx, grad_out):
    dq, dk, dv, dmask = _gradients(ctx, grad_out, 4)  # the selection is recomputed from k: same blocks
    return dq, dk, dv, None, dmask, None, None, None, None, None, None


attention_cached.register_autograd(_backward_cached, setup_context=_setup_context_cached)
autocast.register("attention_cached")
