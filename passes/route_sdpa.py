"""Eager MoBA for SDPA calls in modules `torch.fx` cannot trace: routed at run time.

A module whose forward `torch.fx` cannot trace (Python control flow, `**kwargs` forwards,
diffusers' attention processors, ...) still calls `F.scaled_dot_product_attention`. Its
forward is wrapped so that, while it runs, a `TorchFunctionMode` (`SdpaRouter`) sees each of
its SDPA calls, in order, and computes the k-th one with MoBA when the k-th site's decision
says so, from the arguments of that very call (mask, causality, scale, dropout, GQA). What
MoBA cannot compute faithfully runs the original call (or raises `UnfaithfulSiteError` with
`on_unsupported: error`). Dynamo traces the mode, so `torch.compile(fullgraph=True)` works.

Calls are counted per owner; an owner nested in another routed owner claims its own calls
(`_CLAIMED`), so the outer one never counts them. A call whose heads or head dim differ from
the recorded site is not that site: it runs unchanged.
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from moba_rewrite.attention import kv_cache as kv_op
from moba_rewrite.attention import op as moba_op
from moba_rewrite.attention.block_means import update_key_block_means_
from passes.runtime import HIDDEN_BELOW, UnfaithfulSiteError

_SDPA = F.scaled_dot_product_attention
_ORDER = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_CLAIMED = [False]  # an SDPA call is being handled by the innermost router: outer ones pass it on


@dataclass(frozen=True)
class RoutedSite:
    """One SDPA call of an owner's forward, as recorded, and what to do with it."""

    name: str
    decision: Any  # effective Decision (mode moba or dense), or None: run the call unchanged
    num_heads: int | None = None
    head_dim: int | None = None
    mask_convert: str = "none"  # "float_to_bool": a float mask proven 0 / -huge where it is built
    causal: bool = False  # recorded as causal self-attention (so more keys than queries means a KV cache)


def _bind(args: tuple, kwargs: dict) -> dict[str, Any]:
    a = {name: args[i] for i, name in enumerate(_ORDER) if i < len(args)}
    a.update(kwargs)
    return a


def unfaithful(site: RoutedSite, a: dict[str, Any]) -> list[str]:
    """Why MoBA cannot compute this call faithfully (empty when it can)."""
    q, k, v, mask = a["query"], a["key"], a["value"], a.get("attn_mask")
    out = []
    p = a.get("dropout_p", 0.0) or 0.0
    if p > 0:
        out.append(f"attention dropout p={p} (training); MoBA has no attention dropout")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return out + [f"query has {q.dim()} dims; MoBA needs [B, H, T, D]"]
    tq, tk = q.shape[-2], k.shape[-2]
    if tq > tk:
        out.append(f"more queries than keys (Tq={tq} > Tk={tk}, cross attention)")
    if a.get("is_causal") and tq != tk:
        out.append("is_causal=True with Tq != Tk: SDPA aligns the causal mask top-left, MoBA bottom-right")
    if k.shape[-1] != q.shape[-1]:  # a value head dim of its own (MLA) is fine
        out.append(f"key head dim {k.shape[-1]} differs from query head dim {q.shape[-1]}")
    if q.shape[1] % k.shape[1] != 0:
        out.append(f"query heads {q.shape[1]} not a multiple of kv heads {k.shape[1]}")
    if v.shape[1] != k.shape[1]:
        out.append(f"key and value head counts differ (k {k.shape[1]}, v {v.shape[1]})")
    if len({q.dtype, k.dtype, v.dtype}) > 1:
        out.append("q, k and v have different dtypes")
    if mask is not None and mask.dtype != torch.bool and not (
            mask.dtype.is_floating_point and site.mask_convert == "float_to_bool"):
        out.append(f"additive {mask.dtype} mask that may carry a bias (values other than 0 / -inf); "
                   "MoBA's gate could not honour it")
    return out


def _packed_gqa(site: RoutedSite, q: Tensor, k: Tensor, mask: Tensor | None) -> bool:
    """Whether this call is one token's GQA query with its heads folded into the query length, as
    transformers' `sdpa_attention_forward` does for a single query with a mask (`pack_gqa`: `[B, Hq,
    1, D]` -> `[B, Hkv, Hq / Hkv, D]`, the mask shared by every head). Read as Hq / Hkv consecutive
    queries, MoBA would place them at different positions."""
    if site.num_heads is None or q.dim() != 4 or k.dim() != 4 or q.shape[1] != k.shape[1]:
        return False
    if q.shape[1] == site.num_heads or q.shape[1] * q.shape[2] != site.num_heads:
        return False
    return mask is None or (mask.dim() == 4 and mask.shape[1] == 1 and mask.shape[2] == 1)


def _is_this_site(site: RoutedSite, q: Tensor) -> bool:
    if q.dim() != 4:
        return True  # reported by `unfaithful`
    return (site.num_heads is None or q.shape[1] == site.num_heads) and (
        site.head_dim is None or q.shape[-1] == site.head_dim)


def routed_attention(site: RoutedSite, args: tuple, kwargs: dict) -> Tensor:
    """The call as MoBA (per `site.decision`), or the original SDPA where MoBA would not be faithful."""
    a = _bind(args, kwargs)
    d = site.decision
    q, k, v, mask = a["query"], a["key"], a["value"], a.get("attn_mask")
    packed = _packed_gqa(site, q, k, mask)
    if packed:  # one token's query heads folded into the query length: unfold, so each head is one query
        q = q.reshape(q.shape[0], site.num_heads, 1, q.shape[-1])
        a = {**a, "query": q}
    if not _is_this_site(site, q):
        return _SDPA(*args, **kwargs)
    problems = unfaithful(site, a)
    if problems:
        if getattr(d, "on_unsupported", "dense") == "error":
            raise UnfaithfulSiteError(f"attention site {site.name!r}: {'; '.join(problems)} (policy on_unsupported: error)")
        return _SDPA(*args, **kwargs)
    tq, tk = q.shape[-2], k.shape[-2]
    if tq == 1 and getattr(d, "decode", "moba") == "dense":
        return _SDPA(*args, **kwargs)
    if mask is not None and mask.dtype != torch.bool:
        mask = mask > HIDDEN_BELOW  # proven 0 / -huge where it is built (site.mask_convert)
    causal = bool(a.get("is_causal") or False)
    scale = a.get("scale")
    scale = float(scale) if scale is not None else q.shape[-1] ** -0.5
    if site.causal and mask is not None and tk > tq and mask.dim() == 4:
        out = _against_cache(q, k, v, mask, d, scale)
        if out is None:
            if getattr(d, "on_unsupported", "dense") == "error":
                raise UnfaithfulSiteError(f"attention site {site.name!r}: {UNKNOWN_POSITIONS} (policy on_unsupported: "
                                          "error)")
            return _SDPA(*args, **kwargs)
    else:
        out = moba_op.run(q, k, v, None, mask, int(d.block_size), int(d.top_k), causal, scale, str(d.backend))
    if packed:
        return out.reshape(out.shape[0], k.shape[1], site.num_heads // k.shape[1], out.shape[-1])
    # SDPA's output is laid out as [B, T, H, D] in memory; keep that for views downstream.
    return out.transpose(1, 2).contiguous().transpose(1, 2)


UNKNOWN_POSITIONS = "more keys than queries with a mask that is not causal at the queries' positions"


def _against_cache(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, d: Any, scale: float) -> Tensor | None:
    """MoBA of a causal site's call with more keys than queries and a full mask: a KV cache, maybe
    preallocated (a static cache hands over every slot, the unfilled ones hidden by the mask). The
    queries sit before the last slot the last query sees (`filled`), so the call is MoBA of the
    filled prefix (SPEC section 2 item 9), by `moba::attention_kv_cache` with positions and block
    means computed here from the tensors, no host sync: the same under torch.compile. None (eager
    only) when the mask is not causal at those positions."""
    tq, tk, bs = q.shape[-2], k.shape[-2], int(d.block_size)
    rows = mask.reshape(-1, mask.shape[-2], tk).any(0)  # [Tq or 1, Tk]: seen by some batch row or head
    slots = torch.arange(1, tk + 1, device=k.device)
    filled = (rows[-1] * slots).amax()  # one past the last slot the last query sees
    positions = filled - tq + torch.arange(tq, device=k.device)
    if not torch.compiler.is_compiling():
        later = slots[None, :] > positions[:, None] + 1  # keys after each query's own position
        if int(filled) < tq or bool((rows & later).any()):
            return None
    means = k.new_zeros((*k.shape[:2], -(-tk // bs), k.shape[3]), dtype=torch.promote_types(k.dtype, torch.float32))
    means = update_key_block_means_(means, k, positions, bs, from_start=True)
    return kv_op.run(q, k, v, means, positions, mask, bs, int(d.top_k), True, scale, str(d.backend))


class SdpaRouter(TorchFunctionMode):
    """Active during one owner's forward: its k-th SDPA call follows `sites[k]`."""

    def __init__(self, sites: tuple[RoutedSite, ...]) -> None:
        super().__init__()
        self.sites = sites
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not _SDPA or _CLAIMED[0]:
            return func(*args, **kwargs)
        index = self.count
        self.count = index + 1
        site = self.sites[index] if index < len(self.sites) else None
        _CLAIMED[0] = True
        try:
            if site is None or site.decision is None or site.decision.mode != "moba":
                return func(*args, **kwargs)
            return routed_attention(site, args, kwargs)
        finally:
            _CLAIMED[0] = False


def install(owner: nn.Module, sites: list[RoutedSite]) -> None:
    """Wrap `owner.forward` so its SDPA calls follow `sites` (same object, class and state_dict)."""
    original = owner.forward

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with SdpaRouter(self._moba_routes):
            return self._moba_original_forward(*args, **kwargs)

    forward.__wrapped__ = type(owner).forward  # inspect.signature shows the original parameters
    owner._moba_routes = tuple(sites)
    owner._moba_original_forward = original
    owner.forward = types.MethodType(forward, owner)
