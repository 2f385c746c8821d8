"""Full attention in MoBA's conventions: the kernel for calls where MoBA equals full attention.

When `top_k * block_size >= Tk` every visible block is selected, so MoBA *is* ordinary
attention (SPEC section 2.8); a policy's `dense_below` asks for the same below a length. Then
PyTorch's SDPA (flash kernels on CPU and CUDA) computes it exactly and faster than any sparse
kernel. This module keeps MoBA's conventions around SDPA: queries are the newest `Tq` of `Tk`
tokens (causality aligned bottom-right, SDPA's `is_causal` aligns top-left), a boolean mask
means "may attend", a float mask is added, and a query that sees no key returns zeros, never
NaN. Exact for finite inputs (MoBA's gate skips a block whose mean key is NaN; full attention
propagates it).

On the CPU, calls whose mask is a key mask (or none) run PyTorch's flash kernel directly, with
its log-sum-exp: a causal call with fewer queries than keys (a chunk of a longer sequence: a
context-parallel rank's queries, a prefill after a cache) is split into the keys before the
chunk (no cut) and the chunk's square causal part (SDPA's own causal path), merged by their
log-sum-exps, so no `[Tq, Tk]` mask is built; the backward is the flash backward of each part
under the merged output and log-sum-exp (as ring attention does), not a score matrix in rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from moba_rewrite.kernels.mask_forms import simplify

__all__ = ["covers_all_blocks", "forward", "forward_masked", "restrict", "backward", "part_forward", "part_backward"]

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
    if _flash_parts_apply(q, k, v, attn_mask, causal):
        return _flash_forward(q, k, v, attn_mask, causal, scale)[0]
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


def _per_query_head(x: Tensor, heads: int, ct: torch.dtype) -> Tensor:
    """Key or value heads repeated to `heads` query heads (GQA), in compute precision."""
    group = heads // x.shape[1]
    return x.to(ct).repeat_interleave(group, dim=1) if group > 1 else x.to(ct)


def _per_kv_head(grad: Tensor, kv_heads: int) -> Tensor:
    """A gradient over query heads summed back to `kv_heads` (GQA groups)."""
    group = grad.shape[1] // kv_heads
    return grad.unflatten(1, (kv_heads, group)).sum(2) if group > 1 else grad


def _grads_from_weights(p: Tensor, q: Tensor, kx: Tensor, vx: Tensor, grad_out: Tensor, out: Tensor,
                        scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """`(dq, dk, dv)` of `out = p @ v` for softmax weights `p` (per query head: `kx`, `vx` already
    repeated to the query heads), in `p`'s precision."""
    ct = p.dtype
    go = grad_out.to(ct)
    dv = torch.matmul(p.transpose(-1, -2), go)
    dp = torch.matmul(go, vx.transpose(-1, -2))
    ds = p * (dp - (go * out.to(ct)).sum(-1, keepdim=True)) * scale
    return torch.matmul(ds, kx), torch.matmul(ds.transpose(-1, -2), q.to(ct)), dv


def _chunk_grads(q, k, v, out, grad_out, mask: Tensor | None, scale: float):
    """Softmax-attention gradients of one query chunk (fp32 math; k and v heads repeated per group,
    each by its own: a model may have fewer key heads than value heads)."""
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    kx, vx = _per_query_head(k, q.shape[1], ct), _per_query_head(v, q.shape[1], ct)
    s = torch.matmul(q.to(ct), kx.transpose(-1, -2)) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.to(ct)
    p = torch.softmax(s, dim=-1).nan_to_num_(0.0)  # rows with no visible key: zero weights
    dq, dk, dv = _grads_from_weights(p, q, kx, vx, grad_out, out, scale)
    return dq, _per_kv_head(dk, k.shape[1]), _per_kv_head(dv, v.shape[1])


def backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, *, causal: bool, scale: float,
             attn_mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """`(dq, dk, dv)` of `forward`, query chunk by query chunk (dk, dv summed over GQA groups)."""
    attn_mask, causal = simplify(q, k, attn_mask, causal)
    if _flash_parts_apply(q, k, v, attn_mask, causal):
        return _flash_backward(grad_out, q, k, v, out, attn_mask, causal, scale)
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


# --- CPU: PyTorch's flash kernel with its log-sum-exp, a causal chunk split in two parts ---------

_FLASH_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _flash_parts_apply(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool) -> bool:
    """The CPU flash kernel computes this call: CPU tensors of one float dtype, one head dim for
    q, k and v, as many key as value heads (the kernel reads v's heads by k's grouping: a model
    with 2 key heads and 4 value heads got wrong values), a key mask or none (no query dim), and
    for a causal call no more queries than keys."""
    return (q.device.type == "cpu" and q.dtype in _FLASH_DTYPES and k.dtype == v.dtype == q.dtype
            and q.shape[-1] == k.shape[-1] == v.shape[-1] and k.shape[1] == v.shape[1]
            and q.shape[2] > 0 and k.shape[2] > 0
            and (mask is None or mask.dim() < 2 or mask.shape[-2] == 1)
            and not (causal and q.shape[2] > k.shape[2]))


def _parts(tq: int, tk: int, causal: bool) -> list[tuple[int, int, bool]]:
    """Key ranges `(k0, k1, causal)` whose attentions merge into the call's: for a causal call
    with queries at the newest `Tq` of `Tk` positions, the keys before them (all visible) and the
    square part (SDPA's causal cut, aligned top-left, is then the bottom-right one)."""
    if not causal or tq == 1:
        return [(0, tk, False)]
    return ([(0, tk - tq, False)] if tk > tq else []) + [(tk - tq, tk, True)]


def _key_visibility(mask: Tensor | None, q: Tensor) -> Tensor | None:
    """A key mask as bool `[B|1, H|1, Tk]` (True: may attend), or None for no mask."""
    if mask is None:
        return None
    visible = mask if mask.dtype == torch.bool else mask != float("-inf")
    while visible.dim() < 4:
        visible = visible.unsqueeze(0)
    return visible[..., 0, :]


def _rows_seen(visible: Tensor | None, k0: int, k1: int, causal: bool, tq: int) -> Tensor | None:
    """`[B|1, H|1, Tq|1]` bool: query rows that see at least one key of the part (None: all do)."""
    if visible is None:
        return None
    part = visible[..., k0:k1]
    if causal:  # row i sees keys k0 .. k0 + i
        return part.cumsum(-1) > 0
    return part.any(-1, keepdim=True)


def _additive(mask: Tensor | None, k0: int, k1: int, dtype: torch.dtype) -> Tensor | None:
    """The part's key mask in the kernel's form: additive, in the query's dtype."""
    if mask is None:
        return None
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    part = mask[..., k0:k1]
    if part.dtype == torch.bool:
        return torch.zeros(part.shape, dtype=dtype).masked_fill_(~part, float("-inf"))
    return part.to(dtype)


def _flash_forward(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool,
                   scale: float) -> tuple[Tensor, Tensor]:
    """`(out, lse)`: the call's attention and its log-sum-exp `[B, Hq, Tq]` (fp32; -inf for a row
    that sees no key, whose output is zeros), merged from `_parts`."""
    tq, tk = q.shape[2], k.shape[2]
    visible = _key_visibility(mask, q)
    outs, lses = [], []
    for k0, k1, part_causal in _parts(tq, tk, causal):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k[:, :, k0:k1], v[:, :, k0:k1], 0.0, part_causal, attn_mask=_additive(mask, k0, k1, q.dtype),
            scale=scale)
        lse = lse.float()
        seen = _rows_seen(visible, k0, k1, part_causal, tq)
        if seen is not None:  # the kernel gives 0 for a row that sees nothing: mark it
            lse = lse.masked_fill(~seen, float("-inf"))
        outs.append(out)
        lses.append(lse)
    if len(outs) == 1:
        out, lse = outs[0], lses[0]
        return (out if visible is None else out.masked_fill(~torch.isfinite(lse)[..., None], 0.0)), lse
    top = torch.maximum(lses[0], lses[1])
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    weights = [torch.exp(lse - top) for lse in lses]
    total = weights[0] + weights[1]
    merged = sum(o.float() * (w / total.clamp_min(torch.finfo(torch.float32).tiny))[..., None]
                 for o, w in zip(outs, weights))
    return merged.to(q.dtype), top + torch.log(total)


def _flash_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, mask: Tensor | None,
                    causal: bool, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of `_flash_forward`: the log-sum-exp recomputed (one forward), then each part's
    flash backward under the whole call's output and log-sum-exp (its softmax weights are the
    part's share of the whole), dq summed over the parts, dk / dv the parts' slices."""
    _, lse = _flash_forward(q, k, v, mask, causal, scale)
    lse = lse.masked_fill(torch.isneginf(lse), float("inf"))  # a row that sees no key: zero weights
    if q.dtype == torch.float64:
        lse = lse.double()
    dq, dks, dvs = None, [], []
    for k0, k1, part_causal in _parts(q.shape[2], k.shape[2], causal):
        gq, gk, gv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out, q, k[:, :, k0:k1], v[:, :, k0:k1], out, lse, 0.0, part_causal,
            attn_mask=_additive(mask, k0, k1, q.dtype), scale=scale)
        dq = gq if dq is None else dq + gq
        dks.append(gk)
        dvs.append(gv)
    if len(dks) == 1:
        return dq, dks[0], dvs[0]
    return dq, torch.cat(dks, dim=2), torch.cat(dvs, dim=2)


# --- One part of an attention whose keys arrive in parts (ring attention) -----------------------

# Score elements (batch x heads x query rows x keys) per step of the portable path.
_PART_ELEMS = 1 << 26


def _part_mask(visible: Tensor | None, causal: bool, q0: int, q1: int, tk: int, device) -> Tensor | None:
    """`[B|1, 1, q1 - q0, Tk]` bool for query rows `q0 .. q1-1` of a part: the key mask `visible`
    `[B, Tk]` and, for the causal square, row i sees keys 0 .. i."""
    mask = None if visible is None else visible[:, None, None, :]
    if causal:
        cut = torch.arange(tk, device=device)[None, :] <= torch.arange(q0, q1, device=device)[:, None]
        mask = cut[None, None] if mask is None else mask & cut
    return mask


def _part_scores(q: Tensor, k: Tensor, scale: float, mask: Tensor | None) -> tuple[Tensor, Tensor, torch.dtype]:
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    kx = _per_query_head(k, q.shape[1], ct)
    s = torch.matmul(q.to(ct), kx.transpose(-1, -2)) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return s, kx, ct


def part_forward(q: Tensor, k: Tensor, v: Tensor, visible: Tensor | None, causal: bool,
                 scale: float) -> tuple[Tensor, Tensor]:
    """`(out, lse)` of `q` `[B, Hq, Tq, D]` over one part of the keys `k`, `v` `[B, Hkv, Tk, D]`:
    all of them (`causal` False) or the square causal part (`Tq == Tk`, query i sees keys 0 .. i),
    keys hidden where `visible` `[B, Tk]` is False. `lse` `[B, Hq, Tq]` fp32 (-inf for a row that
    sees no key, whose output is zeros), so parts merge by log-sum-exp. CPU: PyTorch's flash
    kernel; elsewhere fp32 math in rows of bounded size."""
    mask = None if visible is None else visible[:, None, None, :]
    if _flash_parts_apply(q, k, v, mask, causal) and (not causal or q.shape[2] == k.shape[2]):
        return _flash_forward(q, k, v, mask, causal, scale)
    b, hq, tq, _ = q.shape
    tk = k.shape[2]
    rows = max(1, _PART_ELEMS // max(1, b * hq * tk))
    outs, lses = [], []
    for q0 in range(0, tq, rows):
        q1 = min(tq, q0 + rows)
        s, _, ct = _part_scores(q[:, :, q0:q1], k, scale, _part_mask(visible, causal, q0, q1, tk, q.device))
        lse = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - lse.masked_fill(torch.isneginf(lse), 0.0)[..., None])
        outs.append(torch.matmul(p, _per_query_head(v, hq, ct)).to(q.dtype))
        lses.append(lse.float())
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def part_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                  visible: Tensor | None, causal: bool, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """`(dq, dk, dv)` of one part (`part_forward`'s arguments) within a whole attention whose
    output is `out` and log-sum-exp `lse` (the merge of every part): the part's softmax weights
    are its share of the whole, `exp(s - lse)`. dk / dv summed over GQA groups; fp32 on the
    portable path, the inputs' dtype from the flash kernel."""
    mask = None if visible is None else visible[:, None, None, :]
    if _flash_parts_apply(q, k, v, mask, causal) and (not causal or q.shape[2] == k.shape[2]):
        whole = lse.masked_fill(torch.isneginf(lse), float("inf"))  # a row that sees no key: zero weights
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out, q, k, v, out, whole.double() if q.dtype == torch.float64 else whole, 0.0, causal,
            attn_mask=_additive(mask, 0, k.shape[2], q.dtype), scale=scale)
    b, hq, tq, _ = q.shape
    tk = k.shape[2]
    rows = max(1, _PART_ELEMS // max(1, b * hq * tk))
    dq = torch.empty_like(q)
    dk = dv = None
    for q0 in range(0, tq, rows):
        q1 = min(tq, q0 + rows)
        s, kx, ct = _part_scores(q[:, :, q0:q1], k, scale, _part_mask(visible, causal, q0, q1, tk, q.device))
        whole = lse[:, :, q0:q1].to(ct)
        p = torch.exp(s - whole.masked_fill(torch.isneginf(whole), float("inf"))[..., None])
        gq, gk, gv = _grads_from_weights(p, q[:, :, q0:q1], kx, _per_query_head(v, hq, ct), grad_out[:, :, q0:q1],
                                         out[:, :, q0:q1], scale)
        dq[:, :, q0:q1] = gq.to(q.dtype)
        dk = gk if dk is None else dk + gk
        dv = gv if dv is None else dv + gv
    return dq, _per_kv_head(dk, k.shape[1]), _per_kv_head(dv, v.shape[1])
