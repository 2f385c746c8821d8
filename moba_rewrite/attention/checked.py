"""`moba::attention_checked_mask`: MoBA or full attention, chosen per call by a float mask's values.

MoBA can take an additive float mask only when it is a visibility mask (0 = visible, a huge
negative = hidden): its gate cannot honour a real bias (ALiBi, position buckets, a user bias).
Where that can only be known at run time (a traced graph fed a float mask it did not build),
this op reads the values on every call: a visibility mask runs MoBA with it (as boolean,
`causal=False`: the mask holds causality itself), anything else runs full attention with the
mask added, i.e. what the original attention site computes. One opaque node, so torch.compile
and torch.export keep one graph; in ONNX it becomes the MoBA node with `hidden_at` set, whose
bodies read the bias the same way (`exporters.onnx`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from moba_rewrite.attention import autocast, op as _op
from moba_rewrite.kernels import dense


def only_visibility(mask: Tensor) -> bool:
    """Every value is 0 or at most `finfo.min / 2` (hidden; -inf included)."""
    return bool(((mask == 0) | (mask <= torch.finfo(mask.dtype).min / 2)).all())


def _visibility(mask: Tensor) -> Tensor:
    return mask > torch.finfo(mask.dtype).min / 2


@torch.library.custom_op("moba::attention_checked_mask", mutates_args=())
def attention_checked_mask(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor, block_size: int, top_k: int,
                           scale: float, backend: str, dense_below: int = 0, site: str = "") -> Tensor:
    """MoBA with `attn_mask` read as visibility when it is one, else full attention with it added;
    with `site` given (a policy's `on_unsupported: error`), a bias raises instead, naming the site."""
    if only_visibility(attn_mask):
        return _op._forward(q, k, v, None, _visibility(attn_mask), block_size, top_k, False, scale, backend,
                            dense_below)
    if site:
        raise RuntimeError(f"attention site {site!r} cannot run MoBA: additive float attention mask with values "
                           "other than 0 / -inf (a bias such as ALiBi) (policy on_unsupported: error)")
    return dense.forward(q, k, v, causal=False, scale=scale, attn_mask=attn_mask).contiguous()


@attention_checked_mask.register_fake
def _fake(q, k, v, attn_mask, block_size, top_k, scale, backend, dense_below=0, site=""):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def _setup_context(ctx, inputs, output):
    q, k, v, attn_mask, block_size, top_k, scale, backend, *rest = inputs
    ctx.save_for_backward(q, k, v, output, attn_mask)
    ctx.params = (block_size, top_k, scale, backend, rest[0] if rest else 0)  # a site that raised has no backward


def _backward(ctx, grad_out):
    q, k, v, out, mask = ctx.saved_tensors
    block_size, top_k, scale, backend, dense_below = ctx.params
    grad_out = grad_out.contiguous()
    visibility = only_visibility(mask)
    if visibility:
        dq, dk, dv = _op.attention_backward(grad_out, q, k, v, out, _visibility(mask), block_size, top_k, False,
                                            scale, backend, dense_below)
    else:
        dq, dk, dv = dense.backward(grad_out, q, k, v, out, causal=False, scale=scale, attn_mask=mask)
    dmask = None
    if ctx.needs_input_grad[3]:  # a learned bias in the mask: MoBA's selection, or full attention with the bias
        dmask = (_op.mask_gradient(grad_out, q, k, v, mask, block_size, top_k, False, scale, backend, dense_below)
                 if visibility else _op.mask_gradient(grad_out, q, k, v, mask, k.shape[2], 1, False, scale, backend))
    return dq, dk, dv, dmask, None, None, None, None, None, None


attention_checked_mask.register_autograd(_backward, setup_context=_setup_context)
autocast.register("attention_checked_mask")
