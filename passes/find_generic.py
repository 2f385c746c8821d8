"""Attention the other detectors do not recognise: listed, never rewritten.

A softmax whose input comes from a product of two activations and whose output multiplies an
activation is attention, whatever happens in between (OpenAI-GPT's `w * b + -1e4 * (1 - b)`
mask, Longformer's banded chunks, relative-position terms added in odd ways, ...). When
`find_manual` cannot read such a site, this finds it anyway, so the report lists every site;
it stays dense, with the operations it could not read as the reason.

"Activation": a value computed in the graph, not a weight (a placeholder or constant reached
through views only), so `softmax(x @ W)` (a router, a classifier) is not attention.
"""

from __future__ import annotations

from typing import Any

import torch.fx as fx

from passes import fxutil, masks
from passes.found import FoundSite

_PRODUCTS = ("matmul", "einsum", "baddbmm")
_PASS = ("view", "cast", "transpose", "permute")
_UP_DEPTH, _DOWN_DEPTH = 24, 16
# Layers that mix features: the scores never pass through one on their way to the softmax (a
# path through them reaches back into earlier layers, whose products are not these scores).
_LAYERS = ("linear", "conv", "norm", "embedding", "gelu", "silu", "relu", "softmax", "addmm", "mm", "lstm", "gru")


def _crosses_layer(n: fx.Node) -> bool:
    return fxutil.kind(n) == "softmax" or any(w in _label(n).lower() for w in _LAYERS) \
        and fxutil.kind(n) not in ("matmul", "baddbmm", "einsum")


def _is_weight(x: Any, depth: int = 0) -> bool:
    if not isinstance(x, fx.Node) or depth > 8:
        return not isinstance(x, fx.Node)
    if x.op in ("placeholder", "get_attr"):
        return True
    if fxutil.kind(x) in _PASS and x.args:
        return _is_weight(x.args[0], depth + 1)
    return False


def _operands(n: fx.Node) -> list[Any]:
    k = fxutil.kind(n)
    if k == "baddbmm":
        return [fxutil.arg(n, 1, "batch1"), fxutil.arg(n, 2, "batch2")]
    if k == "einsum":
        ops = n.args[1] if len(n.args) == 2 and isinstance(n.args[1], (list, tuple)) else list(n.args[1:])
        return list(ops)
    return list(n.args[:2])


def _activation_product(n: fx.Node) -> bool:
    ops = _operands(n)
    return fxutil.kind(n) in _PRODUCTS and len(ops) == 2 and not any(_is_weight(o) for o in ops)


def _scores_of(sm: fx.Node) -> tuple[fx.Node, list[fx.Node]] | None:
    """The activation product feeding the softmax, and the nodes in between."""
    frontier, seen, between = [a for a in sm.all_input_nodes], set(), []
    for _ in range(_UP_DEPTH):
        nxt = []
        for n in frontier:
            if n in seen:
                continue
            seen.add(n)
            if fxutil.kind(n) in _PRODUCTS:
                if _activation_product(n):
                    return n, between
                continue  # a product with a weight: not through it
            if n.op in ("placeholder", "get_attr") or _crosses_layer(n):
                continue
            between.append(n)
            nxt.extend(n.all_input_nodes)
        frontier = nxt
    return None


def _output_of(sm: fx.Node) -> tuple[fx.Node, Any, list[fx.Node]] | None:
    """The product that multiplies the probabilities by an activation (v), and the nodes in between."""
    frontier, seen, between = [sm], {sm}, []
    for _ in range(_DOWN_DEPTH):
        nxt = []
        for n in frontier:
            for u in fxutil.real_users(n):
                if u in seen:
                    continue
                seen.add(u)
                if fxutil.kind(u) in _PRODUCTS:
                    ops = _operands(u)
                    others = [o for o in ops if o is not n]
                    if len(ops) == 2 and len(others) == 1 and not _is_weight(others[0]):
                        return u, others[0], between
                    continue
                if _crosses_layer(u):
                    continue
                between.append(u)
                nxt.append(u)
        frontier = nxt
    return None


def _label(n: fx.Node) -> str:
    name = n.target if n.op == "call_method" else getattr(n.target, "__name__", str(n.target))
    return str(name).split(".")[0]


def find_generic(gm: fx.GraphModule, taken: set[fx.Node]) -> list[FoundSite]:
    """Attention at softmaxes not in `taken` (those the other detectors already read)."""
    found = []
    for sm in gm.graph.nodes:
        if fxutil.kind(sm) != "softmax" or sm in taken:
            continue
        up = _scores_of(sm)
        down = _output_of(sm) if up is not None else None
        if up is None or down is None:
            continue
        scores, before = up
        out, v, after = down
        q, k = _operands(scores)
        odd = sorted({_label(n) for n in before + after if fxutil.kind(n) not in ("view", "cast", "dropout")})
        name, cls = fxutil.common_owner([scores, sm, out])
        f = FoundSite(kind="manual", out=out, q=q, k=k, v=v, mask=masks.MaskInfo(node=None, kind="unknown"),
                      name=name, module_class=cls, covered=[sm])
        qs, vs = fxutil.shape(q), fxutil.shape(v)
        if qs is not None:  # heads and lengths are not read: the layout may be chunked or banded
            f.head_dim = fxutil.static_int(qs[-1])
        if vs is not None:
            f.v_head_dim = fxutil.static_int(vs[-1])
        f.problems.append("attention in a form the rewrite does not read (operations between the products and "
                          f"the softmax: {', '.join(odd) or 'none recognised'}); listed and kept dense")
        found.append(f)
    return found
