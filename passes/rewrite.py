"""Replace found attention sites with the `moba::attention` op, per decision.

Two emitters share one set of rules:

- `inline` (torch.export and Dynamo graphs, whose shapes are known): aten nodes for the
  mask conversion and layout fixes, then one `torch.ops.moba.attention.default` node, with
  value metadata recomputed under the graph's fake mode so the result exports, saves and
  compiles like any other graph.
- `runtime` (symbolic_trace graphs used by the eager `rewrite`): one call to
  `passes.runtime.site_attention`, which checks the shape-dependent facts on every call.

Dense decisions and sites that cannot be rewritten faithfully leave the graph untouched;
`on_unsupported="error"` raises `UnsupportedSiteError` instead.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

import moba_rewrite.attention.op  # noqa: F401  (registers torch.ops.moba)
from passes import fxutil
from passes.found import FoundSite
from passes.runtime import HIDDEN_BELOW, site_attention


class UnsupportedSiteError(RuntimeError):
    """The policy asked for MoBA (with `on_unsupported: error`) at a site that cannot take it."""


@dataclass
class Outcome:
    """What happened to one site: applied mode and why."""

    mode: str  # "moba" | "dense"
    reason: str
    node: fx.Node | None = None


def plan_outcome(f: FoundSite, decision: Any) -> Outcome:
    """The mode a site gets under `decision`, without touching the graph (raises on error policy)."""
    if decision.mode != "moba":
        return Outcome("dense", decision.reason or "policy: full attention")
    if f.problems:
        why = "; ".join(f.problems)
        if getattr(decision, "on_unsupported", "dense") == "error":
            raise UnsupportedSiteError(
                f"attention site {f.name or '<root>'!r} ({f.module_class}) cannot be rewritten to MoBA: {why} "
                "(policy on_unsupported: error)"
            )
        return Outcome("dense", f"unsupported, kept dense: {why}")
    if fxutil.static_int(f.tq) == 1 and getattr(decision, "decode", "moba") == "dense":
        return Outcome("dense", "decode step (Tq=1) and policy decode: dense")
    note = ""
    if f.tq is not None and fxutil.static_int(f.tq) is None and getattr(decision, "decode", "moba") == "dense":
        note = " (dynamic Tq: decode steps of this graph also use MoBA)"
    return Outcome("moba", (decision.reason or "policy: MoBA") + note)


def _one_mask(graph: fx.Graph, f: FoundSite, m, fake_mode) -> Any:
    node = m.node
    if m.convert == "float_to_bool":
        node = fxutil.call(graph, torch.ops.aten.gt.Scalar, (node, HIDDEN_BELOW), like=f.out, fake_mode=fake_mode)
    elif m.convert == "invert":
        node = fxutil.call(graph, torch.ops.aten.logical_not.default, (node,), like=f.out, fake_mode=fake_mode)
    return node


def _mask_arg(graph: fx.Graph, f: FoundSite, fake_mode) -> Any:
    parts = [m for m in [f.mask, *f.extra_masks] if m.node is not None]
    if not parts:
        return None
    node = _one_mask(graph, f, parts[0], fake_mode)
    for m in parts[1:]:
        other = _one_mask(graph, f, m, fake_mode)
        node = fxutil.call(graph, torch.ops.aten.logical_and.default, (node, other), like=f.out, fake_mode=fake_mode)
    if f.layout == "3d":
        s = fxutil.shape(node)
        if s is not None and len(s) == 3:
            node = fxutil.call(graph, torch.ops.aten.unsqueeze.default, (node, 1), like=f.out, fake_mode=fake_mode)
    return node


def _compact_key(graph: fx.Graph, f: FoundSite, fake_mode) -> Any:
    """The key mask of a proven site as `[B, 1, 1, Tk]` bool (None when there is none)."""
    key = f.compact.key
    if key is None:
        return None
    node = key.node
    width = fxutil.shape(node)[1] if fxutil.shape(node) is not None else None
    if not (fxutil.static_int(key.offset) == 0 and width is not None and fxutil.same_size(width, f.tk)):
        node = fxutil.call(graph, torch.ops.aten.slice.Tensor, (node, 1, key.offset, key.offset + f.tk),
                           like=f.out, fake_mode=fake_mode)
    for _ in range(2):
        node = fxutil.call(graph, torch.ops.aten.unsqueeze.default, (node, 1), like=f.out, fake_mode=fake_mode)
    return node


def _emit_inline(gm: fx.GraphModule, f: FoundSite, decision: Any, fake_mode) -> fx.Node:
    g = gm.graph
    with g.inserting_before(f.out):
        q = f.q
        k = f.kv_source if f.kv_source is not None else f.k
        v = f.v_source if f.v_source is not None else f.v
        if f.k_transposed:
            k = fxutil.call(g, torch.ops.aten.transpose.int, (k, -2, -1), like=f.out, fake_mode=fake_mode)
        if f.layout == "3d":
            q, k, v = (fxutil.call(g, torch.ops.aten.unsqueeze.default, (t, 1), like=f.out, fake_mode=fake_mode)
                       for t in (q, k, v))
        causal = bool(f.is_causal)
        if f.compact is not None:  # proven: causal cut AND a key mask; the full mask is not read
            mask, causal = _compact_key(g, f, fake_mode), f.compact.causal
        else:
            mask = _mask_arg(g, f, fake_mode)
        scale = 1.0 if f.scale_on_q else float(f.scale)
        dense_below = getattr(decision, "dense_below", None)
        out = fxutil.call(
            g, torch.ops.moba.attention.default,
            (q, k, v, mask, int(decision.block_size), int(decision.top_k), causal, scale,
             str(decision.backend), *((int(dense_below),) if dense_below else ())),
            like=f.out, fake_mode=fake_mode,
        )
        if f.layout == "3d":
            out = fxutil.call(g, torch.ops.aten.squeeze.dim, (out, 1), like=f.out, fake_mode=fake_mode)
    return out


def _emit_runtime(gm: fx.GraphModule, f: FoundSite, decision: Any, training: bool) -> fx.Node:
    g = gm.graph
    with g.inserting_before(f.out):
        k = f.kv_source if f.kv_source is not None else f.k
        v = f.v_source if f.v_source is not None else f.v
        dropout = float(f.dropout_p) if isinstance(f.dropout_p, (int, float)) else 0.0
        extra = f.extra_masks[0] if f.extra_masks else None
        scale: Any = 1.0 if f.scale_on_q else f.scale
        for op, factor in f.scale_factors:  # shape-derived factors, evaluated on every call
            scale = g.call_function(operator.mul if op == "mul" else operator.truediv, (scale, factor))
        out = g.call_function(site_attention, (f.q, k, v, f.mask.node), dict(
            mask2=extra.node if extra is not None else None,
            convert2=extra.convert if extra is not None else "none",
            site=f.name, is_causal=bool(f.is_causal), scale=scale,
            convert=f.mask.convert, layout=f.layout, k_transposed=f.k_transposed, dropout_p=dropout,
            training=training, block_size=int(decision.block_size), top_k=int(decision.top_k),
            backend=str(decision.backend), decode=str(getattr(decision, "decode", "moba")),
            sdpa_site=(f.kind == "sdpa" and not f.k_transposed and f.layout == "4d"),
            enable_gqa=f.enable_gqa or f.kv_source is not None,
            dense_below=int(getattr(decision, "dense_below", None) or 0),
        ))
        for key in ("nn_module_stack", "stack_trace"):
            if key in f.out.meta:
                out.meta[key] = f.out.meta[key]
    return out


_LAYOUT_TARGETS = {
    "transpose", "permute", "unsqueeze", "squeeze", "select", "slice", "expand", "alias", "detach",
    "t", "movedim", "swapaxes", "narrow", "contiguous", "clone", "reshape",
}


def _layout_op(n: fx.Node) -> bool:
    name = n.target if n.op == "call_method" else getattr(n.target, "__name__", str(n.target))
    base = str(name).split(".")[0]
    return n.op in ("call_function", "call_method") and base in _LAYOUT_TARGETS


def _relax_views(new: fx.Node, depth: int = 8) -> None:
    """`view`s downstream of a replaced attention may rely on the old output's strides (SDPA
    follows the query's layout; export drops `.contiguous()` no-ops). MoBA's output is
    contiguous, so such views become `reshape`s: same values, a copy only where needed."""
    frontier, seen = [new], set()
    for _ in range(depth):
        nxt = []
        for n in frontier:
            for u in n.users:
                if u in seen:
                    continue
                seen.add(u)
                if u.op == "call_function" and u.target in (torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default):
                    u.target = torch.ops.aten.reshape.default
                elif u.op == "call_method" and u.target == "view" and not any(isinstance(a, torch.dtype) for a in u.args[1:]):
                    u.target = "reshape"
                elif u.op == "call_function" and u.target is torch.Tensor.view and not any(
                        isinstance(a, torch.dtype) for a in u.args[1:]):
                    u.target = torch.Tensor.reshape
                elif not _layout_op(u):
                    continue
                nxt.append(u)  # a view of a view (the reshape that undoes transformers' GQA packing, ...)
        frontier = nxt
        if not frontier:
            break


def _replace(gm: fx.GraphModule, f: FoundSite, new: fx.Node, index: dict) -> None:
    g = gm.graph
    if f.users_via_getitem:
        for u in list(f.out.users):
            if u.op == "call_function" and u.target is operator.getitem:
                u.replace_all_uses_with(new)
                g.erase_node(u)
    else:
        f.out.replace_all_uses_with(new)
    _relax_views(new)
    # Erase the pattern's own nodes once nothing reads them (reverse graph order).
    for n in sorted(set(f.covered) | {f.out}, key=lambda n: index.get(n, -1), reverse=True):
        for u in list(n.users):
            if fxutil.is_assert(u) and not u.users:
                g.erase_node(u)
        if not n.users and n.op in ("call_function", "call_method", "call_module"):
            g.erase_node(n)
    _erase_dead_ancestors(g, [f.k, f.v, f.q])


def _erase_dead(g: fx.Graph, starts: list[fx.Node]) -> None:
    """Erase nodes nothing reads any more (with the metadata asserts on them), walking upward
    from `starts`; nodes with side effects and graph inputs stay."""
    todo = list(starts)
    while todo:
        n = todo.pop()
        if getattr(n, "_erased", False) or n.graph is not g or n.op not in ("call_function", "call_method"):
            continue
        for u in list(n.users):
            if fxutil.is_assert(u) and not u.users:
                g.erase_node(u)
        if n.users or (n.is_impure() and not fxutil.is_assert(n)):
            continue
        inputs = list(n.all_input_nodes)
        g.erase_node(n)
        todo.extend(inputs)


_PURE_KINDS = {"view", "cast", "transpose", "permute", "mul", "div"}


def _erase_dead_ancestors(g: fx.Graph, starts: list) -> None:
    """Drop now-unused pure producers (repeat_kv expands, k transposes) of the old operands."""
    todo = [n for n in starts if isinstance(n, fx.Node)]
    while todo:
        n = todo.pop()
        for u in list(n.users):
            if fxutil.is_assert(u) and not u.users:
                g.erase_node(u)
        if n.users or n.op not in ("call_function", "call_method") or fxutil.kind(n) not in _PURE_KINDS:
            continue
        if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload) and n.target._schema.is_mutable:
            continue
        inputs = list(n.all_input_nodes)
        g.erase_node(n)
        todo.extend(inputs)


def rewrite_graph(gm: fx.GraphModule, found: list[FoundSite], decisions: list[Any], *,
                  emitter: str = "inline", training: bool = False) -> list[Outcome]:
    """Rewrite every site whose decision (and faithfulness) allows it; returns one Outcome per site."""
    if len(found) != len(decisions):
        raise ValueError(f"rewrite_graph: {len(found)} sites but {len(decisions)} decisions")
    if emitter == "inline":
        for f in found:
            if f.scale is None and "scale unknown" not in " ".join(f.problems):
                f.problems.append("scale unknown: the graph records no head dim")
            if f.scale_factors and "scale computed" not in " ".join(f.problems):
                f.problems.append("scale computed from dynamic shapes at run time (the moba op takes a constant)")
    outcomes = [plan_outcome(f, d) for f, d in zip(found, decisions)]  # raises before any change
    fake_mode = fxutil.fake_mode_of(gm.graph) if emitter == "inline" else None
    index = {n: i for i, n in enumerate(gm.graph.nodes)}  # once: the pass stays linear in graph size
    old_masks: list[fx.Node] = []
    for f, d, o in zip(found, decisions, outcomes):
        if o.mode != "moba":
            continue
        new = _emit_inline(gm, f, d, fake_mode) if emitter == "inline" else _emit_runtime(gm, f, d, training)
        _replace(gm, f, new, index)
        o.node = new
        if emitter == "inline" and f.compact is not None:
            old_masks += [m.node for m in [f.mask, *f.extra_masks] if isinstance(m.node, fx.Node)]
    _erase_dead(gm.graph, old_masks)  # full masks no site reads any more: nothing O(T^2) is left
    gm.graph.lint()
    gm.recompile()
    return outcomes
