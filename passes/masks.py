"""What an attention mask in a graph means, and how to hand it to MoBA faithfully.

MoBA takes a boolean mask (True = may attend) or an additive float mask whose hidden
entries are `-inf`. Models often build additive masks with `torch.finfo(dtype).min`, which
is *finite*: handed over as is, hidden blocks could still be chosen by the gate. So a float
mask is only accepted when the graph proves its values are 0 or "minus a huge number"
(it comes from `where(cond, 0, min)`, `masked_fill(zeros, cond, min)`, sums and views of
such), and it is then converted with `mask > finfo.min / 2`. A float mask that may carry a
real bias (ALiBi, T5 buckets, a user tensor) is reported as `unknown` and stays dense.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.fx as fx

from passes import fxutil

_HUGE = 1e4  # |fill| at or above this counts as "minus infinity" in an additive mask


@dataclass
class MaskInfo:
    """A mask's meaning: `kind` for the report, `usable` if MoBA can take it, `convert` how."""

    node: fx.Node | None
    kind: str = "none"  # none | causal | padding | causal+padding | bool | unknown
    usable: bool = True
    convert: str = "none"  # none | bool (pass as is) | float_to_bool (mask > min/2) | invert (~mask)
    reason: str = ""
    dtype: torch.dtype | None = None


def _is_huge_negative(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and (x <= -_HUGE or x == -math.inf)


def _is_zero(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == 0


def _zeros_like_node(n, root=None) -> bool:
    """A node that is a tensor of zeros (`zeros`, `zeros_like`, `new_zeros`, `full(.., 0)`, a
    constant of zeros such as a lifted `torch.tensor(0.0)`)."""
    if isinstance(n, fx.Node) and n.op in ("get_attr", "placeholder"):
        const = constant_of(n, root)
        return const is not None and bool((const == 0).all())
    if not isinstance(n, fx.Node) or n.op not in ("call_function", "call_method"):
        return _is_zero(n)
    name = getattr(n.target, "__name__", str(n.target))
    if "zeros" in name:
        return True
    if name in ("tensor", "scalar_tensor", "as_tensor") and n.args:
        return _is_zero(n.args[0])
    if "full" in name:
        fill = n.args[1] if len(n.args) > 1 else n.kwargs.get("fill_value")
        return _is_zero(fill)
    if fxutil.kind(n) in ("view", "cast") and n.args:
        return _zeros_like_node(n.args[0], root)
    return False


def _is_tril(t) -> bool:
    """A constant that is lower-triangular in its last two dims, with a non-zero diagonal."""
    if not isinstance(t, torch.Tensor) or t.dim() < 2 or t.shape[-1] != t.shape[-2] or t.shape[-1] < 2:
        return False
    try:
        nz = t != 0
        return bool(torch.equal(nz, nz.tril()) and nz.diagonal(dim1=-2, dim2=-1).all())
    except Exception:  # fake tensors etc.
        return False


def constant_of(node: fx.Node, root) -> torch.Tensor | None:
    """The tensor behind a get_attr node, or behind an export buffer/constant placeholder. Never a
    parameter: trained values are not constants (Swin's relative position bias table starts at
    zero, so a proof from its current values would read the bias as "no mask" and drop it, in the
    forward once trained or loaded, and in the backward at once)."""
    if root is None:
        return None
    if node.op == "get_attr":
        try:
            obj = root
            for part in str(node.target).split("."):
                obj = getattr(obj, part)
        except AttributeError:
            return None
        return obj if isinstance(obj, torch.Tensor) and not isinstance(obj, torch.nn.Parameter) else None
    if node.op == "placeholder":
        table = getattr(root, "_moba_constants", None) or {}
        return table.get(node.name)
    return None


def _structure(cond: fx.Node | None, limit: int = 400, root=None) -> tuple[bool, bool]:
    """(causal, padding): whether a boolean mask's ancestry holds a position comparison (or a
    lower-triangular constant) and a user input."""
    if not isinstance(cond, fx.Node):
        return False, False
    causal = padding = False
    seen: set[fx.Node] = set()
    todo = [cond]
    while todo and len(seen) < limit:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        const = constant_of(n, root) if n.op in ("get_attr", "placeholder") else None
        if const is not None:
            causal = causal or _is_tril(const)
            continue
        if n.op == "placeholder":
            name = n.name.lower()
            dt = fxutil.dtype(n)
            if "mask" in name or dt in (torch.int64, torch.int32, torch.bool):
                padding = True
            continue
        if fxutil.kind(n) == "lt_compare":
            causal = True
        name = str(getattr(n.target, "__name__", n.target))
        if "tril" in name or "triu" in name:
            causal = True
        for a in n.all_input_nodes:
            todo.append(a)
    return causal, padding


def _label(causal: bool, padding: bool) -> str:
    if causal and padding:
        return "causal+padding"
    if causal:
        return "causal"
    if padding:
        return "padding"
    return "bool"


def proven_additive(node, depth: int = 0, root=None) -> fx.Node | None:
    """If `node` is a float mask proven to hold only 0 and huge negatives, return a bool ancestor or the node.

    Returns None when it cannot be proven.
    """
    if depth > 40 or not isinstance(node, fx.Node):
        return None
    k = fxutil.kind(node)
    if k in ("view", "cast"):
        if node.op == "call_function" and node.target is __import__("operator").getitem:
            return proven_additive(node.args[0], depth + 1, root)
        return proven_additive(node.args[0], depth + 1, root) if node.args else None
    if k == "where" and len(node.args) == 3:
        cond, a, b = node.args
        a_zero = _is_zero(a) or _zeros_like_node(a, root)
        b_zero = _is_zero(b) or _zeros_like_node(b, root)
        if a_zero and (_is_huge_negative(b) or proven_additive(b, depth + 1, root) is not None):
            return node
        if b_zero and (_is_huge_negative(a) or proven_additive(a, depth + 1, root) is not None):
            return node
        return None
    if k == "masked_fill" and len(node.args) >= 3:
        base, _cond, fill = node.args[:3]
        if _is_huge_negative(fill) and (_zeros_like_node(base, root) or proven_additive(base, depth + 1, root) is not None):
            return node
        return None
    if k == "add" and len(node.args) >= 2:
        a, b = node.args[:2]
        ok_a = proven_additive(a, depth + 1, root) is not None
        ok_b = proven_additive(b, depth + 1, root) is not None
        if ok_a and ok_b:
            return node
        return None
    return None


def analyze(mask, *, root: torch.nn.Module | None = None) -> MaskInfo:
    """Classify the `attn_mask` argument of an attention site."""
    if mask is None:
        return MaskInfo(node=None)
    if not isinstance(mask, fx.Node):
        return MaskInfo(node=None, kind="unknown", usable=False,
                        reason=f"attention mask is a constant of type {type(mask).__name__}")
    dt = fxutil.dtype(mask)
    if dt == torch.bool:
        causal, padding = _structure(mask, root=root)
        return MaskInfo(node=mask, kind=_label(causal, padding), convert="bool", dtype=dt)
    if dt is None and fxutil.kind(mask) == "lt_compare":
        causal, padding = _structure(mask, root=root)
        return MaskInfo(node=mask, kind=_label(causal, padding), convert="bool", dtype=torch.bool)
    if dt is not None and not dt.is_floating_point:
        return MaskInfo(node=mask, kind="unknown", usable=False, reason=f"attention mask of dtype {dt}", dtype=dt)
    proof = proven_additive(mask, root=root)
    if dt is None and proof is None:
        # Traced without shapes (symbolic_trace): the dtype is checked on every call instead
        # (passes.runtime raises on a float mask it cannot prove).
        causal, padding = _structure(mask, root=root)
        return MaskInfo(node=mask, kind=_label(causal, padding), convert="bool", dtype=None,
                        reason="mask dtype unknown at trace time: must be boolean at run time")
    if proof is not None:
        causal, padding = _structure(mask, root=root)
        return MaskInfo(node=mask, kind=_label(causal, padding), convert="float_to_bool", dtype=dt)
    where = "a graph input" if mask.op == "placeholder" else f"'{mask.name}'"
    return MaskInfo(
        node=mask, kind="unknown", usable=False, dtype=dt,
        reason=(f"additive float mask from {where} may carry a bias (values other than 0 / -inf); "
                "MoBA's gate could not honour it"),
    )
