"""Full attention in MoBA's conventions: the kernel for calls where MoBA equals full attention.

When `top_k * block_size >= Tk` every visible block is selected, so MoBA *is* ordinary
attention (SPEC section 2.8); a policy's `dense_below` asks for the same below a length. Then
PyTorch's SDPA (flash kernels on CPU and CUDA) computes it exactly and faster than any sparse
kernel. This module keeps MoBA's conventions around SDPA: queries are the newest `Tq` of `Tk`
tokens (causality aligned bottom-right, SDPA's `is_causal` aligns top-left), a boolean mask
means "may attend", a float mask is added, and a query that sees no key returns zeros, never
NaN. Exact for finite inputs (MoBA's gate skips a block whose mean key is NaN; full attention
propagates it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from moba_rewrite.kernels.mask_forms import simplify

__all__ = ["covers_all_blocks", "forward", "forward_masked", "restrict", "backward"]

# Mask elements (batch x query rows x keys) built per query chunk when a mask must be combined
# with the causal cut: bounds the memory of long `dense_below` calls.
_CHUNK_ELEMS = 1 << 24


def covers_all_blocks(tk: int, block_size: int, top_k: int) -> bool:
    """True when MoBA selects every block of `Tk` keys: it is then exactly full attention."""
    return top_k * block_size >= tk


def _causal_rows(q0: int, q1: int, tq: int, tk: int, device) -> Tensor:
    """`[q1 - q0, Tk]` bool: key j visible to query i (position `Tk - Tq + i`) iff j <= position."""
    pos = torch.arange(q0, q1, device=device) + (tk - tq)
    return torch.arange(tk, device=device)[None, :] <= pos[:, None]


def _combine(mask: Tensor | None, causal_rows: Tensor | None, q0: int, q1: int) -> Tensor | None:
    """The query rows `[q0, q1)` of the attention mask, causal cut applied (bool or additive)."""
    if mask is not None and mask.dim() >= 2 and mask.shape[-2] > 1:
        mask = mask[..., q0:q1, :]
    return mask if causal_rows is None else restrict(mask, causal_rows)


def restrict(mask: Tensor | None, visible: Tensor) -> Tensor:
    """`mask` (None, bool or additive) with the keys `visible` (bool, broadcastable) does not show hidden."""
    if mask is None:
        return visible
    if mask.dtype == torch.bool:
        return mask & visible
    return mask.masked_fill(~visible, float("-inf"))


def _attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool, scale: float) -> Tensor:
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale,
                                         enable_gqa=q.shape[1] != k.shape[1])
    if mask is None:
        return out
    visible = mask if mask.dtype == torch.bool else mask != float("-inf")
    seen = visible.any(-1, keepdim=True)  # rows with no visible key: zeros (SDPA gives NaN there)
    while seen.dim() < out.dim():
        seen = seen.unsqueeze(0)
    return out.masked_fill(~seen, 0.0)


def forward_masked(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, *, scale: float) -> Tensor:
    """Full attention under exactly `mask` (bool or additive; no causal cut, no host read: safe
    while a CUDA graph is captured); rows that see no key give zeros."""
    return _attend(q, k, v, mask, False, scale)


def forward(q: Tensor, k: Tensor, v: Tensor, *, causal: bool, scale: float, attn_mask: Tensor | None) -> Tensor:
    """Full attention `[B, Hq, Tq, Dv]` with MoBA's causal alignment and mask conventions."""
    b, _, tq, _ = q.shape
    tk = k.shape[2]
    attn_mask, causal = simplify(q, k, attn_mask, causal)
    need_cut = causal and tq > 1
    if not need_cut or (attn_mask is None and tq == tk):
        return _attend(q, k, v, attn_mask, need_cut, scale)
    rows = max(1, _CHUNK_ELEMS // max(1, b * tk))
    parts = []
    for q0 in range(0, tq, rows):
        q1 = min(tq, q0 + rows)
        mask = _combine(attn_mask, _causal_rows(q0, q1, tq, tk, q.device), q0, q1)
        parts.append(_attend(q[:, :, q0:q1], k, v, mask, False, scale))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


def _chunk_grads(q, k, v, out, grad_out, mask: Tensor | None, scale: float):
    """Softmax-attention gradients of one query chunk (fp32 math; kv heads repeated per group)."""
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    g = q.shape[1] // k.shape[1]
    kx, vx = (t.to(ct).repeat_interleave(g, dim=1) if g > 1 else t.to(ct) for t in (k, v))
    s = torch.matmul(q.to(ct), kx.transpose(-1, -2)) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.to(ct)
    p = torch.softmax(s, dim=-1).nan_to_num_(0.0)  # rows with no visible key: zero weights
    go = grad_out.to(ct)
    dv = torch.matmul(p.transpose(-1, -2), go)
    dp = torch.matmul(go, vx.transpose(-1, -2))
    ds = p * (dp - (go * out.to(ct)).sum(-1, keepdim=True)) * scale
    dq = torch.matmul(ds, kx)
    dk = torch.matmul(ds.transpose(-1, -2), q.to(ct))
    if g > 1:
        dk = dk.unflatten(1, (k.shape[1], g)).sum(2)
        dv = dv.unflatten(1, (k.shape[1], g)).sum(2)
    return dq, dk, dv


def backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, *, causal: bool, scale: float,
             attn_mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """`(dq, dk, dv)` of `forward`, query chunk by query chunk (dk, dv summed over GQA groups)."""
    attn_mask, causal = simplify(q, k, attn_mask, causal)
    b, hq, tq, _ = q.shape
    tk = k.shape[2]
    rows = max(1, _CHUNK_ELEMS // max(1, b * hq * tk))
    dq = torch.empty_like(q)
    dk = torch.zeros(k.shape, dtype=torch.float64 if q.dtype == torch.float64 else torch.float32, device=k.device)
    dv = torch.zeros(v.shape, dtype=dk.dtype, device=v.device)
    for q0 in range(0, tq, rows):
        q1 = min(tq, q0 + rows)
        cut = _causal_rows(q0, q1, tq, tk, q.device) if causal and tq > 1 else None
        mask = _combine(attn_mask, cut, q0, q1)
        gq, gk, gv = _chunk_grads(q[:, :, q0:q1], k, v, out[:, :, q0:q1], grad_out[:, :, q0:q1], mask, scale)
        dq[:, :, q0:q1] = gq
        dk += gk
        dv += gv
    return dq, dk.to(k.dtype), dv.to(v.dtype)
