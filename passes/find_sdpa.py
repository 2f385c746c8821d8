"""Find scaled-dot-product-attention calls in any FX graph.

Every spelling counts: `F.scaled_dot_product_attention` / `torch._C._nn...` (Dynamo and
symbolic_trace graphs), `aten.scaled_dot_product_attention` (torch.export), and the
backend-specific `aten._scaled_dot_product_*` ops that appear after AOTAutograd (tuple
results read through `getitem`). For each call the site records its mask, `is_causal`,
scale, dropout and GQA layout, including GQA written as `repeat_kv` (expand + reshape),
whose un-repeated K/V is remembered so the rewrite can hand MoBA the shared KV heads.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from passes import fxutil, masks
from passes.found import FoundSite, check_common

_TORCH_ORDER = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")


def _bind(node: fx.Node) -> dict:
    """Arguments of an SDPA-like call by name, whatever the spelling."""
    if isinstance(node.target, torch._ops.OpOverload):
        args = fxutil.schema_args(node)
        if "attn_bias" in args:
            args["attn_mask"] = args.pop("attn_bias")
        return args
    out = {name: node.args[i] for i, name in enumerate(_TORCH_ORDER) if i < len(node.args)}
    out.update(node.kwargs)
    out.setdefault("attn_mask", None)
    out.setdefault("dropout_p", 0.0)
    out.setdefault("is_causal", False)
    out.setdefault("scale", None)
    out.setdefault("enable_gqa", False)
    return out


def unrepeat_kv(node: fx.Node) -> tuple[fx.Node, int] | None:
    """If `node` is `repeat_kv(src, n)` (expand on a new dim 2 + reshape), return (src, n).

    Needs recorded shapes; returns None when the pattern or the shapes do not match exactly.
    """
    out_shape = fxutil.shape(node)
    if fxutil.kind(node) != "view" or out_shape is None or len(out_shape) != 4:
        return None
    e = node.args[0] if node.args else None
    while isinstance(e, fx.Node) and fxutil.kind(e) == "view" and fxutil.shape(e) is not None \
            and len(fxutil.shape(e)) == 5 and "expand" not in str(e.target):
        e = e.args[0]  # clone / contiguous between expand and reshape
    if not isinstance(e, fx.Node) or "expand" not in str(e.target):
        return None
    es = fxutil.shape(e)
    if es is None or len(es) != 5:
        return None
    u = e.args[0]
    while isinstance(u, fx.Node) and fxutil.shape(u) is not None and len(fxutil.shape(u)) == 5 \
            and fxutil.kind(u) == "view" and isinstance(u.args[0], fx.Node) \
            and fxutil.shape(u.args[0]) is not None and len(fxutil.shape(u.args[0])) == 5:
        u = u.args[0]  # no-op slices of the 5-D view
    us = fxutil.shape(u)
    if not isinstance(u, fx.Node) or us is None or len(us) != 5 or fxutil.kind(u) != "view":
        return None
    src = u.args[0]
    ss = fxutil.shape(src)
    if not isinstance(src, fx.Node) or ss is None or len(ss) != 4:
        return None
    b, hkv, t, d = ss
    n = fxutil.static_int(es[2])
    ok = (
        fxutil.static_int(us[2]) == 1
        and all(fxutil.same_size(x, y) for x, y in zip((us[0], us[1], us[3], us[4]), (b, hkv, t, d)))
        and all(fxutil.same_size(x, y) for x, y in zip((es[0], es[1], es[3], es[4]), (b, hkv, t, d)))
        and n is not None
        and fxutil.static_int(hkv) is not None
        and fxutil.static_int(out_shape[1]) == fxutil.static_int(hkv) * n
        and fxutil.same_size(out_shape[2], t) and fxutil.same_size(out_shape[3], d)
    )
    return (src, n) if ok else None


def find_sdpa(gm: fx.GraphModule) -> list[FoundSite]:
    """Every SDPA-like call in `gm`'s graph, in graph order."""
    found: list[FoundSite] = []
    for node in gm.graph.nodes:
        k = fxutil.kind(node)
        if k not in ("sdpa", "sdpa_variant"):
            continue
        a = _bind(node)
        q, key, value = a.get("query"), a.get("key"), a.get("value")
        if not all(isinstance(x, fx.Node) for x in (q, key, value)):
            continue
        name, cls = fxutil.owner(node)
        info = masks.analyze(a.get("attn_mask"), root=gm)
        qs, ks, vs = fxutil.shape(q), fxutil.shape(key), fxutil.shape(value)
        f = FoundSite(
            kind="sdpa", out=node, q=q, k=key, v=value, mask=info, name=name, module_class=cls,
            is_causal=bool(a.get("is_causal") or False) if not isinstance(a.get("is_causal"), fx.Node) else False,
            scale=a.get("scale"), dropout_p=a.get("dropout_p") or 0.0,
            enable_gqa=bool(a.get("enable_gqa") or False), covered=[node],
        )
        if isinstance(a.get("is_causal"), fx.Node):
            f.problems.append("is_causal is computed in the graph")
        if isinstance(f.scale, fx.Node):
            f.problems.append("scale is computed in the graph")
            f.scale = None
        if qs is not None and len(qs) == 4:
            f.num_heads, f.tq, f.head_dim = fxutil.static_int(qs[1]), qs[2], fxutil.static_int(qs[3])
        if ks is not None and len(ks) == 4:
            f.num_kv_heads, f.tk = fxutil.static_int(ks[1]), ks[2]
        if vs is not None and len(vs) == 4:
            f.v_head_dim = fxutil.static_int(vs[3])
        if qs is not None and len(qs) != 4:
            f.problems.append(f"query has {len(qs)} dims; MoBA needs [B, H, T, D]")
        if f.scale is None and f.head_dim is not None:
            f.scale = f.head_dim ** -0.5
        rk, rv = unrepeat_kv(key), unrepeat_kv(value)
        if rk is not None and rv is not None and rk[1] == rv[1]:
            f.kv_source, f.v_source = rk[0], rv[0]
            f.num_kv_heads = fxutil.static_int(fxutil.shape(rk[0])[1])
        if k == "sdpa_variant":
            users = list(node.users)
            if all(u.op == "call_function" and u.target is operator.getitem and u.args[1] == 0 for u in users):
                f.users_via_getitem = True
            else:
                f.problems.append("the attention's log-sum-exp output is used (backward graph)")
        check_common(f)
        found.append(f)
    return found
