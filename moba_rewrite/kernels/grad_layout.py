"""Gradients in their inputs' memory layout: what the backward ops return and their fakes promise.

A compiled backward expects each gradient of a custom op in the layout `torch.empty_like(input)`
has (the input's stride order; the ops' fakes return exactly that), and Inductor asserts it at
run time. Attention modules pass transposed views (`[B, T, H, D]` seen as `[B, H, T, D]`), so a
backward returning contiguous gradients failed every compiled training step on such inputs;
`like_inputs` copies a gradient into its input's layout when it does not have it already.
"""

from __future__ import annotations

import torch
from torch import Tensor


def like_input(grad: Tensor, x: Tensor) -> Tensor:
    """`grad` with the strides `torch.empty_like(x)` has (the same values)."""
    if x.is_contiguous() and grad.is_contiguous():  # the common case: nothing to allocate
        return grad
    out = torch.empty_like(x, dtype=grad.dtype)
    if out.stride() == grad.stride():
        return grad
    return out.copy_(grad)


def like_inputs(grads: tuple[Tensor, ...], inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """`like_input` of each gradient and its input."""
    return tuple(like_input(g, x) for g, x in zip(grads, inputs))
