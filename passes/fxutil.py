"""Small torch.fx helpers shared by the detection and rewrite passes.

The passes meet three graph dialects: `torch.export` (aten OpOverloads, shapes in
`meta["val"]`), Dynamo (torch-level callables, shapes in `meta["example_value"]`) and
`torch.fx.symbolic_trace` (torch-level callables and `call_method` nodes, no shapes unless a
ShapeProp ran: `meta["tensor_meta"]`). These helpers hide the differences: what op a node is,
what shape it has, which module owns it, and how to insert a new node with correct metadata.
"""

from __future__ import annotations

import operator
import re
from typing import Any, Callable, Iterable

import torch
import torch.fx as fx

# --------------------------------------------------------------------------------------------
# Owning module


_DYNAMO_ROOT = re.compile(r"^[LG]\[['\"][^'\"]+['\"]\](\[\d+\])*")  # L['self'], L['args'][0]
_MODULES_ITEM = re.compile(r"(?:\.?__dict__\[['\"]_modules['\"]\]|\._modules|_modules)\[['\"]([^'\"]+)['\"]\]")
_INDEX_ITEM = re.compile(r"\[['\"]?([^\]'\"]+)['\"]?\]")
_GETATTR = re.compile(r"getattr\(([^,()]+),\s*['\"]([^'\"]+)['\"]\)")


def clean_fqn(path: str) -> str:
    """Module path as `named_modules()` spells it, from any nn_module_stack spelling.

    Dynamo writes `L['self'].model.layers[0].self_attn` (or `L['self']._modules['model']...`,
    `getattr(L['self'].layers, '0')`); export and symbolic_trace already write
    `model.layers.0.self_attn`.
    """
    p = path.strip()
    while True:
        new = _GETATTR.sub(r"\1.\2", p)
        if new == p:
            break
        p = new
    p = _DYNAMO_ROOT.sub("", p)
    p = _MODULES_ITEM.sub(r".\1", p)
    p = _INDEX_ITEM.sub(r".\1", p)
    p = re.sub(r"\.+", ".", p).strip(".")
    return p


def _class_name(t: Any) -> str:
    if isinstance(t, type):
        return t.__name__
    return str(t).rsplit(".", 1)[-1].strip("'>")


def owner(node: fx.Node) -> tuple[str, str]:
    """(fully-qualified name, class name) of the innermost module that created `node`.

    ("", "") when the graph does not say (e.g. a function traced without modules).
    """
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return "", ""
    path, cls = list(stack.values())[-1]
    return clean_fqn(str(path)), _class_name(cls)


def module_stack(node: fx.Node) -> list[tuple[str, str]]:
    """All (fqn, class name) entries of a node's nn_module_stack, outermost first."""
    stack = node.meta.get("nn_module_stack") or {}
    return [(clean_fqn(str(p)), _class_name(c)) for p, c in stack.values()]


def common_owner(nodes: Iterable[fx.Node]) -> tuple[str, str]:
    """(fqn, class name) of the innermost module that created all of `nodes` (a pattern whose
    softmax runs in a child module, as I-BERT's `IntSoftmax`, belongs to the attention module)."""
    stacks = [module_stack(n) for n in nodes if isinstance(n, fx.Node)]
    if not stacks:
        return "", ""
    common = stacks[0]
    for st in stacks[1:]:
        i = 0
        while i < min(len(common), len(st)) and common[i][0] == st[i][0]:
            i += 1
        common = common[:i]
    return common[-1] if common else ("", "")


# --------------------------------------------------------------------------------------------
# Shapes and values


def val(node: Any) -> Any:
    """The fake/example value a graph recorded for `node` (None when it recorded none)."""
    if not isinstance(node, fx.Node):
        return node
    for key in ("val", "example_value"):
        v = node.meta.get(key)
        if v is not None:
            return v
    tm = node.meta.get("tensor_meta")
    if tm is not None and hasattr(tm, "shape"):
        return tm
    return None


def shape(node: Any) -> tuple | None:
    v = val(node)
    s = getattr(v, "shape", None)
    return tuple(s) if s is not None else None


def dtype(node: Any) -> torch.dtype | None:
    v = val(node)
    return getattr(v, "dtype", None)


def static_int(x: Any) -> int | None:
    """`x` as a Python int when it is one (or a SymInt with a known value), else None."""
    if isinstance(x, bool):
        return None
    if isinstance(x, int):
        return x
    if isinstance(x, torch.SymInt):
        try:
            expr = x.node.expr
            if getattr(expr, "is_number", False):
                return int(expr)
        except Exception:  # pragma: no cover - depends on the symbolic shape internals
            return None
    return None


def same_size(a: Any, b: Any) -> bool | None:
    """True/False when two sizes are provably equal/different, None when unknown."""
    ia, ib = static_int(a), static_int(b)
    if ia is not None and ib is not None:
        return ia == ib
    if isinstance(a, torch.SymInt) and isinstance(b, torch.SymInt):
        try:
            if a.node.expr == b.node.expr:
                return True
        except Exception:  # pragma: no cover
            return None
    return None


# --------------------------------------------------------------------------------------------
# What op a node is, across dialects


def _aten(name: str) -> set:
    packet = getattr(torch.ops.aten, name, None)
    if packet is None:
        return set()
    return {getattr(packet, o) for o in packet.overloads()} | {packet}


_KINDS: dict[str, set] = {}


def _register(kind: str, *targets: Any) -> None:
    _KINDS.setdefault(kind, set()).update(t for t in targets if t is not None)


_register("matmul", torch.matmul, operator.matmul, torch.Tensor.matmul, torch.bmm, torch.Tensor.bmm,
          *_aten("matmul"), *_aten("bmm"))
_register("baddbmm", torch.baddbmm, *_aten("baddbmm"))
_register("einsum", torch.einsum, *_aten("einsum"))
_register("softmax", torch.softmax, torch.nn.functional.softmax, torch.Tensor.softmax,
          torch._softmax if hasattr(torch, "_softmax") else None, *_aten("softmax"), *_aten("_softmax"),
          *_aten("_safe_softmax"))
_register("mul", operator.mul, torch.mul, torch.Tensor.mul, *_aten("mul"))
_register("div", operator.truediv, torch.div, torch.Tensor.div, torch.true_divide, *_aten("div"))
_register("add", operator.add, torch.add, torch.Tensor.add, *_aten("add"))
_register("sub", operator.sub, torch.sub, *_aten("sub"), *_aten("rsub"))
_register("masked_fill", torch.masked_fill, torch.Tensor.masked_fill, *_aten("masked_fill"))
_register("where", torch.where, *_aten("where"))
_register("dropout", torch.nn.functional.dropout, torch.dropout, *_aten("dropout"), *_aten("native_dropout"))
_register("transpose", torch.transpose, torch.Tensor.transpose, *_aten("transpose"), *_aten("t"))
_register("permute", torch.permute, torch.Tensor.permute, *_aten("permute"))
_register("cast", torch.Tensor.to, torch.Tensor.type, torch.Tensor.float, torch.Tensor.half,
          torch.Tensor.bfloat16, *_aten("to"), *_aten("_to_copy"), *_aten("type_as"))
_register("view", torch.reshape, torch.Tensor.view, torch.Tensor.reshape, torch.Tensor.expand,
          torch.Tensor.contiguous, torch.unsqueeze, torch.Tensor.unsqueeze, torch.Tensor.clone,
          torch.clone, *_aten("view"), *_aten("reshape"), *_aten("_unsafe_view"), *_aten("expand"),
          *_aten("contiguous"), *_aten("clone"), *_aten("unsqueeze"), *_aten("slice"),
          *_aten("alias"), *_aten("detach"), *_aten("detach_"), *_aten("lift_fresh_copy"),
          *_aten("lift_fresh"), torch.Tensor.detach, operator.getitem)
_register("lt_compare", torch.le, torch.ge, torch.lt, torch.gt, operator.le, operator.ge, operator.lt,
          operator.gt, *_aten("le"), *_aten("ge"), *_aten("lt"), *_aten("gt"))
_register("sdpa", torch.nn.functional.scaled_dot_product_attention, *_aten("scaled_dot_product_attention"))
_register("sdpa_variant", *_aten("_scaled_dot_product_flash_attention_for_cpu"),
          *_aten("_scaled_dot_product_flash_attention"), *_aten("_scaled_dot_product_efficient_attention"),
          *_aten("_scaled_dot_product_cudnn_attention"), *_aten("_scaled_dot_product_attention_math"))

_METHODS: dict[str, str] = {
    "matmul": "matmul", "bmm": "matmul", "softmax": "softmax", "mul": "mul", "mul_": "mul", "div": "div",
    "add": "add", "sub": "sub", "masked_fill": "masked_fill", "masked_fill_": "masked_fill", "transpose": "transpose",
    "permute": "permute", "to": "cast", "type": "cast", "float": "cast", "half": "cast",
    "bfloat16": "cast", "type_as": "cast", "view": "view", "reshape": "view", "expand": "view",
    "contiguous": "view", "unsqueeze": "view", "clone": "view", "baddbmm": "baddbmm",
    "le": "lt_compare", "ge": "lt_compare", "lt": "lt_compare", "gt": "lt_compare",
}

_TARGET_KIND: dict[Any, str] = {}
for _kind, _targets in _KINDS.items():
    for _t in _targets:
        try:
            _TARGET_KIND.setdefault(_t, _kind)
        except TypeError:  # unhashable, never happens for ops and builtins
            pass


def kind(node: Any) -> str | None:
    """Abstract op of a node ("matmul", "softmax", "sdpa", ...) whatever the dialect."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_function":
        try:
            return _TARGET_KIND.get(node.target)
        except TypeError:
            return None
    if node.op == "call_method":
        return _METHODS.get(node.target)
    return None


def is_assert(node: fx.Node) -> bool:
    """Metadata checks export inserts (`_assert_tensor_metadata`, `_assert_scalar`): not real uses."""
    return node.op == "call_function" and "_assert" in str(getattr(node.target, "__name__", node.target))


def real_users(node: fx.Node) -> list[fx.Node]:
    return [u for u in node.users if not is_assert(u)]


def is_dropout_module(node: fx.Node, root: torch.nn.Module | None) -> bool:
    if node.op != "call_module" or root is None:
        return False
    try:
        mod = root.get_submodule(node.target)
    except AttributeError:
        return False
    return isinstance(mod, torch.nn.Dropout)


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Argument `name` of a call, given positionally at `index` or by keyword."""
    if name in node.kwargs:
        return node.kwargs[name]
    if index is not None and len(node.args) > index:
        return node.args[index]
    return default


def schema_args(node: fx.Node) -> dict[str, Any]:
    """Arguments of an OpOverload call by schema name (defaults filled in)."""
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return {}
    out: dict[str, Any] = {}
    for i, a in enumerate(schema.arguments):
        if a.name in node.kwargs:
            out[a.name] = node.kwargs[a.name]
        elif i < len(node.args) and not a.kwarg_only:
            out[a.name] = node.args[i]
        elif a.has_default_value():
            out[a.name] = a.default_value
        else:
            out[a.name] = None
    return out


# --------------------------------------------------------------------------------------------
# Building nodes


def fake_mode_of(graph: fx.Graph):
    """The FakeTensorMode the graph's recorded values live in, or None."""
    from torch._guards import detect_fake_mode

    vals = [val(n) for n in graph.nodes]
    vals = [v for v in vals if isinstance(v, torch.Tensor)]
    try:
        return detect_fake_mode(vals) if vals else None
    except Exception:  # pragma: no cover - mixed modes
        return None


def call(graph: fx.Graph, target: Callable, args: tuple, kwargs: dict | None = None, *,
         like: fx.Node | None = None, fake_mode=None) -> fx.Node:
    """Insert `target(*args, **kwargs)` at the graph's insertion point, with metadata.

    The value meta is recomputed with the graph's fake mode when the inputs carry values, and
    the module stack / stack trace are copied from `like` so later passes still see the owner.
    """
    kwargs = kwargs or {}
    node = graph.call_function(target, args, kwargs)
    if like is not None:
        for key in ("nn_module_stack", "stack_trace", "source_fn_stack", "from_node", "seq_nr"):
            if key in like.meta:
                node.meta[key] = like.meta[key]
    if fake_mode is not None:
        try:
            fa = torch.fx.node.map_arg(args, val)
            fk = torch.fx.node.map_arg(kwargs, val)
            if all(v is not None for v in _flat_nodes_vals(args, kwargs)):
                with fake_mode:
                    out = target(*fa, **fk)
                key = "val" if like is None or "val" in like.meta or "example_value" not in like.meta else "example_value"
                node.meta[key] = out
        except Exception:  # metadata is best effort; the graph stays correct without it
            pass
    return node


def _flat_nodes_vals(args: Iterable, kwargs: dict) -> list:
    found: list = []
    torch.fx.node.map_arg((tuple(args), kwargs), lambda n: found.append(val(n)) or n)
    return found
