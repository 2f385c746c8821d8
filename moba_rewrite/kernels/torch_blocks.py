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
"""

from __future__ import annotations

from torch import Tensor

from moba_rewrite.kernels import torch_fast, torch_online
from moba_rewrite.kernels.torch_select import block_selection

__all__ = ["forward", "backward", "block_selection", "implementation"]


def implementation(q: Tensor, k: Tensor, v: Tensor, *, block_size: int, scale: float,
                   attn_mask: Tensor | None):
    """The module (`torch_fast` or `torch_online`) that handles these inputs."""
    if q.shape[2] >= block_size and torch_fast.applicable(q, k, v, scale=scale, attn_mask=attn_mask):
        return torch_fast
    return torch_online


def forward(q: Tensor, k: Tensor, v: Tensor, *, block_size: int, top_k: int, causal: bool, scale: float,
            attn_mask: Tensor | None) -> Tensor:
    """MoBA output `[B, Hq, Tq, D]` in `q`'s dtype (SPEC section 2)."""
    impl = implementation(q, k, v, block_size=block_size, scale=scale, attn_mask=attn_mask)
    return impl.forward(q, k, v, block_size=block_size, top_k=top_k, causal=causal, scale=scale,
                        attn_mask=attn_mask)


def backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, *, block_size: int, top_k: int,
             causal: bool, scale: float, attn_mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """`(dq, dk, dv)` of `forward` (dk, dv summed over each GQA group)."""
    impl = implementation(q, k, v, block_size=block_size, scale=scale, attn_mask=attn_mask)
    return impl.backward(grad_out, q, k, v, out, block_size=block_size, top_k=top_k, causal=causal,
                         scale=scale, attn_mask=attn_mask)
