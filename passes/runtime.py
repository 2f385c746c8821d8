"""Run-time half of a rewritten site in eagerly traced modules (`torch.fx.symbolic_trace`).

A symbolic_trace graph keeps shapes symbolic, so facts that export proves at trace time
(Tq <= Tk, a causal flag that needs Tq == Tk, the head dim for the default scale, the
mask's dtype) are checked here, on every call, in plain Python. Under `torch.compile`
Dynamo traces through these checks (they become guards), so no graph break is added.

A call that cannot be computed faithfully raises `UnfaithfulSiteError` with the site's name
instead of silently computing something else.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

HIDDEN_BELOW = -5000.0  # additive masks proven to hold 0 or <= -1e4: visible iff value > this


class UnfaithfulSiteError(RuntimeError):
    """A rewritten attention site met inputs MoBA cannot compute faithfully."""


def _to_bool(mask: Tensor | None, convert: str, site: str) -> Tensor | None:
    """A site's mask as MoBA's boolean mask (True = may attend)."""
    if mask is None:
        return None
    if convert == "invert":
        return ~mask
    if mask.dtype == torch.bool:
        return mask
    if convert == "float_to_bool" and mask.dtype.is_floating_point:
        return mask > HIDDEN_BELOW
    raise UnfaithfulSiteError(
        f"attention site {site!r}: additive {mask.dtype} mask that may carry a bias; MoBA needs a "
        "boolean mask or one built from 0 / -inf"
    )


def _and(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if a is None:
        return b
    if b is None:
        return a
    return a & b


def site_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, *, site: str, is_causal: bool,
    scale: float | None, convert: str, layout: str, k_transposed: bool, dropout_p: float,
    training: bool, block_size: int, top_k: int, backend: str, decode: str, sdpa_site: bool,
    enable_gqa: bool = False, mask2: Tensor | None = None, convert2: str = "none", dense_below: int = 0,
) -> Tensor:
    """MoBA for one rewritten site, with the site's own scale, mask, causality and layout."""
    if dropout_p > 0 and training:
        raise UnfaithfulSiteError(
            f"attention site {site!r}: dropout p={dropout_p} while training; MoBA has no attention dropout "
            "(call .eval(), set the dropout to 0, or keep this site dense in the policy)"
        )
    q0, k0, v0, mask0 = q, k, v, mask
    if k_transposed:
        k = k.transpose(-2, -1)
    if layout == "auto":
        layout = "3d" if q.dim() == 3 else "4d"
    if mask is not None or mask2 is not None:
        mask = _and(_to_bool(mask, convert, site), _to_bool(mask2, convert2, site))
    if layout == "3d":
        q, k, v = q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)
        if mask is not None and mask.dim() == 3:
            mask = mask.unsqueeze(1)
    tq, tk = q.shape[-2], k.shape[-2]
    if tq > tk:
        raise UnfaithfulSiteError(f"attention site {site!r}: Tq={tq} > Tk={tk} (cross attention)")
    if v.shape[-3] != k.shape[-3]:
        raise UnfaithfulSiteError(
            f"attention site {site!r}: {k.shape[-3]} key heads and {v.shape[-3]} value heads; MoBA needs as many"
        )
    if k.shape[-1] != q.shape[-1]:  # a value head dim of its own (MLA) is fine
        raise UnfaithfulSiteError(
            f"attention site {site!r}: key head dim {k.shape[-1]} differs from query head dim {q.shape[-1]}"
        )
    if is_causal and tq != tk:
        raise UnfaithfulSiteError(
            f"attention site {site!r}: is_causal=True with Tq={tq} != Tk={tk}; SDPA aligns causality "
            "top-left, MoBA bottom-right"
        )
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if tq == 1 and decode == "dense":
        if sdpa_site:
            return F.scaled_dot_product_attention(q0, k0, v0, attn_mask=mask0, dropout_p=0.0,
                                                  is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
        top_k = -(-tk // block_size)  # the dense limit of MoBA is ordinary attention
    extra = (dense_below,) if dense_below else ()
    out = torch.ops.moba.attention(q, k, v, mask, block_size, top_k, bool(is_causal), float(scale), backend, *extra)
    if layout == "3d":
        out = out.squeeze(1)
    return out
