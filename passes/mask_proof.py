"""Prove that a materialised attention mask is "causal AND a key mask", and find its compact form.

Models and transformers build masks from index arithmetic: `arange` vectors, offsets,
broadcasting views, comparisons (`kv_idx <= q_idx`), `tril` / `triu` of ones, and a lookup of
the 2-D padding mask at `[batch_idx, kv_idx]`, combined with `&` and turned into additive
0 / -huge masks with `where` / `masked_fill`. This module evaluates a mask's graph abstractly,
over the indices of the tensor each node produces, instead of over values:

* `Lin`: an integer tensor whose element at index `i` is `const + sum(coef[d] * i[d])`
  (an `arange`, offset, broadcast, sliced or gathered);
* `Pred`: a boolean tensor that is the AND of atoms, each either `sum(coef[d] * i[d]) + const
  <= 0` (a position comparison) or `node[i[b], i[k] + offset]` (a lookup of a 2-D tensor the
  graph computes, e.g. the padding mask: its values are not needed, it is handed to MoBA as is);
* `Ind` (a 0/1 number tensor of a `Pred`), `Add` (additive: 0 where a `Pred` holds, a huge
  negative elsewhere), `Const` (every element equal), `Data` (anything else).

Every rule is exact, so when the mask of a site comes out as the causal cut aligned like MoBA's
(`k <= q + Tk - Tq`, provably equal for the graph's symbolic sizes) AND at most one key lookup,
the site can take `causal=True` and that key mask `[B, 1, 1, Tk]` instead: nothing O(T^2) is
left. Anything not understood makes the proof fail and the site keeps its full mask.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.fx as fx

from passes import fxutil

_HUGE = 1e4  # a fill at or below -_HUGE hides a key (as passes.masks reads additive masks)
_MAX_NODES = 600


# ------------------------------------------------------------------------------ the domain

@dataclass(frozen=True)
class Lin:
    coef: tuple[int, ...]
    const: Any = 0

    @property
    def ndim(self) -> int:
        return len(self.coef)


@dataclass(frozen=True)
class Const:
    value: Any
    ndim: int


@dataclass(frozen=True)
class Le:
    """sum(coef[d] * i[d]) + const <= 0."""
    coef: tuple[int, ...]
    const: Any


@dataclass(frozen=True)
class Key:
    """node[i[bdim], i[kdim] + offset] (bdim None: the node has one row, read for every batch)."""
    node: fx.Node
    bdim: int | None
    kdim: int
    offset: Any


@dataclass(frozen=True)
class Pred:
    atoms: frozenset
    ndim: int


@dataclass(frozen=True)
class Ind:
    pred: Pred


@dataclass(frozen=True)
class Add:
    pred: Pred


@dataclass(frozen=True)
class Data:
    node: fx.Node
    ndim: int


@dataclass(frozen=True)
class CompactMask:
    """What a proven mask is: `causal` (MoBA's bottom-right cut) AND the key lookup, if any."""
    causal: bool
    key: Key | None


# ------------------------------------------------------------------------------ dim moves

def _move_atom(a, mapping: dict[int, int], ndim: int):
    """Renumber an atom's dims (old -> new); None when a used dim disappears."""
    if isinstance(a, Le):
        coef = [0] * ndim
        for d, c in enumerate(a.coef):
            if c:
                if d not in mapping:
                    return None
                coef[mapping[d]] = c
        return Le(tuple(coef), a.const)
    b = None if a.bdim is None else mapping.get(a.bdim)
    if (a.bdim is not None and b is None) or a.kdim not in mapping:
        return None
    return Key(a.node, b, mapping[a.kdim], a.offset)


def _remap(v, mapping: dict[int, int], ndim: int):
    if isinstance(v, Lin):
        coef = [0] * ndim
        for d, c in enumerate(v.coef):
            if c:
                if d not in mapping:
                    return None
                coef[mapping[d]] = c
        return Lin(tuple(coef), v.const)
    if isinstance(v, Const):
        return Const(v.value, ndim)
    if isinstance(v, Pred):
        atoms = [_move_atom(a, mapping, ndim) for a in v.atoms]
        return None if any(a is None for a in atoms) else Pred(frozenset(atoms), ndim)
    if isinstance(v, (Ind, Add)):
        p = _remap(v.pred, mapping, ndim)
        return None if p is None else type(v)(p)
    return None


def _ndim(v) -> int | None:
    if isinstance(v, (Lin, Const, Pred, Data)):
        return v.ndim
    if isinstance(v, (Ind, Add)):
        return v.pred.ndim
    return None


def _pad_left(v, ndim: int):
    n = _ndim(v)
    if n is None or n > ndim:
        return None
    return _remap(v, {d: d + ndim - n for d in range(n)}, ndim)


def _insert(v, dim: int):
    n = _ndim(v)
    dim = dim + n + 1 if dim < 0 else dim
    return _remap(v, {d: (d if d < dim else d + 1) for d in range(n)}, n + 1)


def _drop(v, dim: int):
    n = _ndim(v)
    dim = dim + n if dim < 0 else dim
    return _remap(v, {d: (d if d < dim else d - 1) for d in range(n) if d != dim}, n - 1)


# ------------------------------------------------------------------------------ algebra

def _as_lin(v, ndim: int | None = None):
    if isinstance(v, Lin):
        return v
    if isinstance(v, Const) and isinstance(v.value, int) and not isinstance(v.value, bool):
        return Lin((0,) * v.ndim, v.value)
    if _is_int(v):
        return Lin((0,) * (ndim or 0), v)
    return None


def _is_int(x) -> bool:
    return (isinstance(x, int) and not isinstance(x, bool)) or isinstance(x, torch.SymInt)


def _lin_add(a, b, sign: int = 1):
    n = max(_ndim(a) if _ndim(a) is not None else 0, _ndim(b) if _ndim(b) is not None else 0)
    la, lb = _as_lin(a, n), _as_lin(b, n)
    if la is None or lb is None:
        return None
    la, lb = _pad_left(la, n), _pad_left(lb, n)
    return Lin(tuple(x + sign * y for x, y in zip(la.coef, lb.coef)), la.const + sign * lb.const)


def _conj(a, b):
    n = max(_ndim(a), _ndim(b))
    a, b = _pad_left(a, n), _pad_left(b, n)
    if a is None or b is None:
        return None
    if isinstance(a, Const) and isinstance(b, Const) and isinstance(a.value, bool) and isinstance(b.value, bool):
        return Const(a.value and b.value, n)
    for x, y in ((a, b), (b, a)):
        if isinstance(x, Const) and x.value is True and isinstance(y, Pred):
            return y
        if isinstance(x, Const) and x.value is False:
            return Const(False, n)
    if isinstance(a, Const) and a.value is True:
        a = Pred(frozenset(), n)
    if isinstance(b, Const) and b.value is True:
        b = Pred(frozenset(), n)
    if isinstance(a, Pred) and isinstance(b, Pred):
        return Pred(a.atoms | b.atoms, n)
    return None


def _compare(op: str, a, b):
    """le / lt / ge / gt / eq / ne of two index values, as a Pred or Const (None: not modelled)."""
    if op in ("eq", "ne"):  # an indicator compared with 0 / 1 is its predicate or the negation
        for x, y in ((a, b), (b, a)):
            if isinstance(x, Ind) and isinstance(y, Const) and y.value in (0, 1) and not isinstance(y.value, bool):
                keep = (y.value == 1) == (op == "eq")
                return x.pred if keep else _negate(x.pred)
    if op in ("ge", "gt"):
        a, b, op = b, a, {"ge": "le", "gt": "lt"}[op]
    if isinstance(a, Const) and isinstance(b, Const):
        try:
            return Const(bool({"le": operator.le, "lt": operator.lt, "eq": operator.eq,
                               "ne": operator.ne}[op](a.value, b.value)), max(a.ndim, b.ndim))
        except Exception:
            return None
    d = _lin_add(a, b, -1)
    if d is None:
        return None
    if op in ("eq", "ne"):
        if any(d.coef) or not isinstance(d.const, int):
            return None
        return Const((d.const == 0) == (op == "eq"), d.ndim)
    const = d.const + (1 if op == "lt" else 0)  # integers: a < b  <=>  a - b + 1 <= 0
    if not any(d.coef):
        return Const(bool(const <= 0), d.ndim) if isinstance(const, int) else None
    return Pred(frozenset([Le(d.coef, const)]), d.ndim)


def _negate(p):
    if isinstance(p, Const) and isinstance(p.value, bool):
        return Const(not p.value, p.ndim)
    if isinstance(p, Pred) and len(p.atoms) == 1:
        (a,) = p.atoms
        if isinstance(a, Le):  # not (L <= 0)  <=>  -L + 1 <= 0
            return Pred(frozenset([Le(tuple(-c for c in a.coef), -a.const + 1)]), p.ndim)
    return None


# ------------------------------------------------------------------------------ the evaluator

def _name(n: fx.Node) -> str:
    t = n.target
    if n.op == "call_method":
        return str(t)
    if isinstance(t, torch._ops.OpOverload):
        return t._opname
    if isinstance(t, torch._ops.OpOverloadPacket):
        return t._qualified_op_name.split("::")[-1]
    return getattr(t, "__name__", str(t))


def _arg(n: fx.Node, i: int, name: str, default=None):
    if name in n.kwargs:
        return n.kwargs[name]
    return n.args[i] if len(n.args) > i else default


def _scalar(x):
    """A python number for a literal, or the SymInt/int a node carries."""
    if isinstance(x, fx.Node):
        v = fxutil.val(x)
        return v if isinstance(v, (int, float, bool, torch.SymInt)) else None
    return x


def _is_bool(n: fx.Node) -> bool:
    return fxutil.dtype(n) == torch.bool


def _tril_diagonal(nz: torch.Tensor) -> int | None:
    """`d` when `nz` (bool, >= 2-D) is `ones.tril(d)` over its last two dims, else None.

    The candidate comes from the first row with a True (row i of `tril(d)` holds
    `min(c, i + d + 1)` of them; none at all: `d = -r`) and is checked once, O(r * c): a buffer
    such as GPT-Neo's 2048 x 2048 causal `bias` used to be compared against every diagonal
    (minutes per rewrite)."""
    r, c = nz.shape[-2], nz.shape[-1]
    counts = nz.reshape(-1, r, c)[0].sum(-1)
    rows = torch.nonzero(counts).flatten()
    diag = -r if rows.numel() == 0 else int(counts[rows[0]]) - 1 - int(rows[0])
    return diag if torch.equal(nz, torch.ones_like(nz).tril(diag)) else None


class _Eval:
    def __init__(self, root) -> None:
        self.root = root
        self.memo: dict[fx.Node, Any] = {}
        self.budget = _MAX_NODES

    def value(self, x):
        if not isinstance(x, fx.Node):
            s = _scalar(x)
            return Const(s, 0) if s is not None else None
        if x in self.memo:
            return self.memo[x]
        self.budget -= 1
        if self.budget < 0:
            return None
        try:
            v = self._node(x)
        except Exception:  # symbolic arithmetic we cannot follow: not proven
            v = None
        shape = fxutil.shape(x)
        if v is not None and shape is not None:
            v = _freeze_unit_dims(v, shape)
        if v is None:
            v = Data(x, len(shape)) if shape is not None else None
        self.memo[x] = v
        return v

    def _node(self, n: fx.Node):
        if n.op in ("placeholder", "get_attr"):
            return self._constant(n)
        if n.op not in ("call_function", "call_method"):
            return None
        name = _name(n)
        if name not in ("__and__", "__or__", "__invert__"):  # `add_` -> add; `__eq__` (a tensor method in
            # the graphs of torch 2.11's Dynamo, `operator.eq` in later ones) -> eq; `__rsub__` stays rsub
            name = name[2:-2] if name.startswith("__") and name.endswith("__") else name.rstrip("_")
        a0 = n.args[0] if n.args else None
        shape = fxutil.shape(n)
        ndim = len(shape) if shape is not None else None
        if name == "sym_size":
            return None
        if name == "arange":
            nums = [_scalar(a) for a in n.args]
            start, step = (0, 1) if len(nums) == 1 else (nums[0], nums[2] if len(nums) > 2 else 1)
            start = _arg(n, 0, "start", start) if len(nums) > 1 else start
            if not (_is_int(start) and isinstance(step, int)):
                return None
            return Lin((step,), start)
        if name in ("to", "_to_copy", "type", "type_as", "clone", "contiguous", "alias", "detach",
                    "lift_fresh_copy", "lift_fresh", "_assert_tensor_metadata", "float", "long", "int", "bool"):
            return self._cast(self.value(a0), n)
        if name in ("unsqueeze",):
            v = self.value(a0)
            return None if v is None or isinstance(v, Data) else _insert(v, _arg(n, 1, "dim"))
        if name in ("expand", "expand_as", "broadcast_to"):
            v = self.value(a0)
            return None if v is None or isinstance(v, Data) or ndim is None else _pad_left(v, ndim)
        if name in ("view", "reshape", "_unsafe_view"):
            return self._reshape(n)
        if name in ("squeeze",):
            return self._squeeze(n)
        if name in ("slice",):
            return self._slice(self.value(a0), _arg(n, 1, "dim", 0), _arg(n, 2, "start", 0), _arg(n, 4, "step", 1))
        if name in ("select",):
            v = self.value(a0)
            idx = _scalar(_arg(n, 2, "index"))
            v = self._slice(v, _arg(n, 1, "dim"), idx, 1)
            return None if v is None else _drop(v, _arg(n, 1, "dim"))
        if name in ("add", "sub"):
            return self._add(n, -1 if name == "sub" else 1)
        if name in ("mul",):
            return self._mul(n)
        if name in ("le", "lt", "ge", "gt", "eq", "ne"):
            return _compare(name, self.value(a0), self.value(n.args[1]))
        if name in ("__and__", "and", "and_", "logical_and", "bitwise_and"):
            return _conj(self.value(a0), self.value(n.args[1]))
        if name in ("__invert__", "invert", "logical_not", "bitwise_not"):
            return _negate(self.value(a0))
        if name in ("new_ones", "ones", "ones_like", "full", "new_full", "full_like", "zeros", "new_zeros",
                    "zeros_like", "scalar_tensor", "tensor", "as_tensor"):
            return self._filled(n, name, ndim)
        if name == "where":
            return self._where(n)
        if name == "masked_fill":
            return self._masked_fill(n)
        if name in ("tril", "triu"):
            return self._tri(n, name)
        if name == "index":
            return self._index(self.value(a0), list(n.args[1]), ndim)
        if name == "getitem":
            return self._getitem(n, ndim)
        if name == "diff":
            return self._diff(n)
        if name == "cumsum":
            v = self.value(a0)
            if isinstance(v, Const) and v.value in (0, False):
                return Const(0, v.ndim)
            return None
        return None

    # -- leaves
    def _constant(self, n: fx.Node):
        from passes.masks import constant_of

        t = constant_of(n, self.root)
        if t is None or t.numel() == 0:
            return None
        try:
            if bool((t == t.reshape(-1)[0]).all()):
                first = t.reshape(-1)[0].item()
                return Const(bool(first) if t.dtype == torch.bool else first, t.dim())
            if t.dim() >= 2:
                nz = t != 0
                diag = _tril_diagonal(nz)
                if diag is not None:
                    p = Pred(frozenset([Le((0,) * (t.dim() - 2) + (-1, 1), -diag)]), t.dim())
                    if t.dtype == torch.bool:
                        return p
                    return Ind(p) if bool(((t == 0) | (t == 1)).all()) else None
        except Exception:  # fake tensors carry no values
            return None
        return None

    def _filled(self, n: fx.Node, name: str, ndim):
        if name in ("ones", "new_ones", "ones_like"):
            value = 1
        elif name in ("zeros", "new_zeros", "zeros_like"):
            value = 0
        elif name in ("full", "new_full", "full_like"):
            value = _scalar(_arg(n, 1, "fill_value"))
        else:
            value = _scalar(n.args[0]) if n.args else None
        if value is None or ndim is None:
            return None
        if _is_bool(n):
            return Const(bool(value), ndim)
        return Const(value, ndim)

    def _cast(self, v, n: fx.Node):
        if v is None:
            return None
        dt = fxutil.dtype(n)
        if isinstance(v, Pred) and dt is not None and dt != torch.bool:
            return Ind(v)
        if isinstance(v, Ind) and dt == torch.bool:
            return v.pred
        if isinstance(v, Const) and dt == torch.bool:
            return Const(bool(v.value), v.ndim)
        if isinstance(v, Data):
            return Data(n, v.ndim)
        return v

    # -- shape ops
    def _reshape(self, n: fx.Node):
        v = self.value(n.args[0])
        src, dst = fxutil.shape(n.args[0]), fxutil.shape(n)
        if v is None or isinstance(v, Data) or src is None or dst is None:
            return None
        keep_src = [d for d, s in enumerate(src) if fxutil.static_int(s) != 1]
        keep_dst = [d for d, s in enumerate(dst) if fxutil.static_int(s) != 1]
        if len(keep_src) != len(keep_dst) or not all(fxutil.same_size(src[a], dst[b])
                                                     for a, b in zip(keep_src, keep_dst)):
            return None
        return _remap(_zero_unit_dims(v, src), dict(zip(keep_src, keep_dst)), len(dst))

    def _squeeze(self, n: fx.Node):
        v = self.value(n.args[0])
        src, dst = fxutil.shape(n.args[0]), fxutil.shape(n)
        if v is None or isinstance(v, Data) or src is None or dst is None:
            return None
        return self._reshape(n)

    def _slice(self, v, dim, start, step):
        start = _scalar(start) if start is not None else 0
        step = 1 if step is None else _scalar(step)
        if v is None or not _is_int(start) or not isinstance(step, int):
            return None
        if isinstance(v, (Const, Data)):
            return v if isinstance(v, Const) else None
        n = _ndim(v)
        dim = dim + n if dim < 0 else dim
        if isinstance(v, Lin):
            coef = list(v.coef)
            const = v.const + coef[dim] * start
            coef[dim] *= step
            return Lin(tuple(coef), const)
        if isinstance(v, (Ind, Add)):
            p = self._slice(v.pred, dim, start, step)
            return None if p is None else type(v)(p)
        if isinstance(v, Pred):
            atoms = []
            for a in v.atoms:
                if isinstance(a, Le):
                    coef = list(a.coef)
                    const = a.const + coef[dim] * start
                    coef[dim] *= step
                    atoms.append(Le(tuple(coef), const))
                elif a.kdim == dim:
                    if step != 1:
                        return None
                    atoms.append(replace(a, offset=a.offset + start))
                elif a.bdim == dim and not (isinstance(start, int) and start == 0 and step == 1):
                    return None
                else:
                    atoms.append(a)
            return Pred(frozenset(atoms), v.ndim)
        return None

    # -- arithmetic
    def _add(self, n: fx.Node, sign: int):
        a, b = self.value(n.args[0]), self.value(n.args[1]) if len(n.args) > 1 else None
        alpha = _scalar(_arg(n, 2, "alpha", 1))
        if alpha != 1 or a is None or b is None:
            return None
        if isinstance(a, Add) and isinstance(b, Add) and sign == 1:
            p = _conj(a.pred, b.pred)
            return Add(p) if isinstance(p, Pred) else None
        for x, y in ((a, b), (b, a)):  # adding zeros to an additive mask keeps it
            if isinstance(x, Add) and isinstance(y, Const) and y.value == 0 and (sign == 1 or x is a):
                return _pad_left(x, max(_ndim(x), y.ndim))
        return _lin_add(a, b, sign)

    def _mul(self, n: fx.Node):
        a, b = self.value(n.args[0]), self.value(n.args[1])
        if isinstance(a, Pred) or isinstance(b, Pred):
            return _conj(a, b) if _is_bool(n) else None
        for x, y in ((a, b), (b, a)):
            if isinstance(x, Lin) and isinstance(y, Const) and _is_int(y.value):
                if not isinstance(y.value, int):
                    return None
                x = _pad_left(x, max(x.ndim, y.ndim))
                return Lin(tuple(c * y.value for c in x.coef), x.const * y.value)
        if isinstance(a, Const) and isinstance(b, Const):
            try:
                return Const(a.value * b.value, max(a.ndim, b.ndim))
            except Exception:
                return None
        return None

    def _where(self, n: fx.Node):
        cond, a, b = (self.value(x) for x in n.args[:3])
        if not isinstance(cond, (Pred, Const)):
            return None
        if isinstance(cond, Const) and isinstance(cond.value, bool):
            cond = Pred(frozenset(), cond.ndim) if cond.value else None
            if cond is None:
                return None
        if _zero(a) and _huge_negative(b):
            return Add(cond)
        if _huge_negative(a) and _zero(b):
            neg = _negate(cond)
            return Add(neg) if isinstance(neg, Pred) else None
        return None

    def _masked_fill(self, n: fx.Node):
        base, cond, fill = self.value(n.args[0]), self.value(n.args[1]), self.value(n.args[2])
        if not _huge_negative(fill):
            return None
        keep = _negate(cond)
        if not isinstance(keep, Pred):
            return None
        if _zero(base):
            return Add(keep)
        if isinstance(base, Add):
            p = _conj(base.pred, keep)
            return Add(p) if isinstance(p, Pred) else None
        return None

    def _tri(self, n: fx.Node, name: str):
        v = self.value(n.args[0])
        diag = _scalar(_arg(n, 1, "diagonal", 0))
        if not isinstance(v, Const) or v.value not in (1, True) or v.ndim < 2 or not isinstance(diag, int):
            return None
        lead = (0,) * (v.ndim - 2)
        atom = Le(lead + (-1, 1), -diag) if name == "tril" else Le(lead + (1, -1), diag)
        p = Pred(frozenset([atom]), v.ndim)
        return p if _is_bool(n) else Ind(p)

    # -- gathers
    def _index(self, base, indices: list, ndim):
        if base is None or ndim is None or any(i is None for i in indices):
            return None
        idx = [self.value(i) for i in indices]
        if any(i is None for i in idx):
            return None
        width = max(_ndim(i) for i in idx)
        idx = [_pad_left(_as_lin(i) if isinstance(i, Const) else i, width) for i in idx]
        rest = _ndim(base) - len(idx)
        if any(not isinstance(i, Lin) for i in idx) or rest < 0:
            return None
        if isinstance(base, Const):
            return Const(base.value, ndim)
        if isinstance(base, Lin):
            coef = [0] * width
            const = base.const
            for c, i in zip(base.coef, idx):
                coef = [x + c * y for x, y in zip(coef, i.coef)]
                const = const + c * i.const
            return Lin(tuple(coef) + base.coef[len(idx):], const)
        if isinstance(base, Data) and base.ndim == 2 and len(idx) == 2 and _is_bool(base.node):
            (bi, ki) = idx
            bdim = _coordinate(bi)
            kdim = _coordinate(replace(ki, const=0))
            rows = fxutil.shape(base.node)
            if kdim is None:
                return None
            if bdim is None:
                if any(bi.coef) or bi.const != 0 or rows is None or fxutil.static_int(rows[0]) != 1:
                    return None
            elif bi.const != 0:
                return None
            return Pred(frozenset([Key(base.node, bdim, kdim, ki.const)]), width)
        return None

    def _getitem(self, n: fx.Node, ndim):
        base_node, key = n.args[0], n.args[1]
        if not isinstance(key, tuple):
            key = (key,)
        base = self.value(base_node)
        if base is None:
            return None
        if all(isinstance(k, fx.Node) for k in key):
            return self._index(base, list(key), ndim)
        v, dim = base, 0
        for k in key:  # basic indexing: None, full or offset slices, ints
            if k is None:
                v = _insert(v, dim) if not isinstance(v, Data) else None
                dim += 1
            elif k is Ellipsis:
                dim = _ndim(v) - (len(key) - key.index(Ellipsis) - 1)
            elif isinstance(k, slice):
                if k.start not in (None, 0) or k.step not in (None, 1):
                    v = self._slice(v, dim, k.start or 0, k.step or 1)
                dim += 1
            elif _is_int(_scalar(k)):
                v = self._slice(v, dim, _scalar(k), 1)
                v = None if v is None else _drop(v, dim)
            else:
                return None
            if v is None:
                return None
        return v

    def _diff(self, n: fx.Node):
        x = self.value(n.args[0])
        order = _arg(n, 1, "n", 1)
        dim = _arg(n, 2, "dim", -1)
        prepend, append = _arg(n, 3, "prepend"), _arg(n, 4, "append")
        if not isinstance(x, Lin) or order != 1 or append is not None:
            return None
        dim = dim + x.ndim if dim < 0 else dim
        if prepend is not None:  # continuing the progression: prepend == x[..., :1] - step
            p = self.value(prepend)
            p = _pad_left(p, x.ndim) if p is not None and not isinstance(p, Data) else None
            p = _as_lin(p) if isinstance(p, Const) else p
            want = list(x.coef)
            want[dim] = p.coef[dim] if isinstance(p, Lin) else 0
            if not isinstance(p, Lin) or list(p.coef) != want or not _same(p.const, x.const - x.coef[dim]):
                return None
        return Const(x.coef[dim], x.ndim)


def _freeze_unit_dims(v, shape):
    """A value's index there is always 0 along its size-1 dims, so coefficients on them carry
    nothing; dropping them keeps later broadcasting (which repeats index 0) exact. A key lookup
    along a size-1 dim is not modelled (None)."""
    units = {d for d, s in enumerate(shape) if fxutil.static_int(s) == 1}
    if not units or _ndim(v) != len(shape):
        return v
    if isinstance(v, Lin):
        return Lin(tuple(0 if d in units else c for d, c in enumerate(v.coef)), v.const)
    if isinstance(v, (Ind, Add)):
        p = _freeze_unit_dims(v.pred, shape)
        return None if p is None else type(v)(p)
    if isinstance(v, Pred):
        atoms = []
        for a in v.atoms:
            if isinstance(a, Le):
                atoms.append(Le(tuple(0 if d in units else c for d, c in enumerate(a.coef)), a.const))
            elif a.kdim in units:
                return None
            elif a.bdim in units:  # batch of one: the lookup reads row 0, fine if that is all there is
                rows = fxutil.shape(a.node)
                if rows is None or fxutil.static_int(rows[0]) != 1:
                    return None
                atoms.append(replace(a, bdim=None))
            else:
                atoms.append(a)
        return Pred(frozenset(atoms), v.ndim)
    return v


def _zero_unit_dims(v, shape):
    """Size-1 dims carry no index: their coefficients do not matter (and are dropped)."""
    units = {d for d, s in enumerate(shape) if fxutil.static_int(s) == 1}
    if isinstance(v, Lin):
        return Lin(tuple(0 if d in units else c for d, c in enumerate(v.coef)), v.const)
    return v


def _coordinate(v: Lin) -> int | None:
    """The dim `d` when `v` is exactly `i[d]` (coefficient 1 there, 0 elsewhere, no offset)."""
    hits = [d for d, c in enumerate(v.coef) if c]
    if len(hits) == 1 and v.coef[hits[0]] == 1 and _same(v.const, 0):
        return hits[0]
    return None


def _zero(v) -> bool:
    return isinstance(v, Const) and not isinstance(v.value, bool) and v.value == 0


def _huge_negative(v) -> bool:
    return (isinstance(v, Const) and isinstance(v.value, (int, float)) and not isinstance(v.value, bool)
            and (v.value <= -_HUGE or v.value == -math.inf))


def _same(a, b) -> bool:
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    try:
        from torch.fx.experimental.symbolic_shapes import statically_known_true

        return bool(statically_known_true(a == b))
    except Exception:
        return False


# ------------------------------------------------------------------------------ entry point

def prove(masks: list[tuple[fx.Node, bool]], tq: Any, tk: Any, root: Any = None) -> CompactMask | None:
    """The compact form of the AND of `masks` (`(node, hides)`: a bool or additive float mask,
    or with `hides` a boolean condition that hides where it holds; broadcast to `[B, H, Tq, Tk]`),
    or None when it cannot be proven to be the causal cut AND a key mask."""
    if not masks or tq is None or tk is None:
        return None
    ev = _Eval(root)
    total = None
    for m, hides in masks:
        v = ev.value(m)
        if hides:
            v = _negate(v) if isinstance(v, (Pred, Const)) else None
        if isinstance(v, Add):
            v = v.pred
        elif isinstance(v, Ind):
            return None  # a 0/1 number tensor is not a mask in either convention
        if isinstance(v, Const) and v.value is True:
            v = Pred(frozenset(), v.ndim)
        if not isinstance(v, Pred) or v.ndim > 4:
            return None
        total = v if total is None else _conj(total, v)
        if not isinstance(total, Pred):
            return None
    total = _pad_left(total, 4)
    if total is None:
        return None
    causal, key = False, None
    for a in total.atoms:
        if isinstance(a, Le):
            # k - q + c <= 0 with c == -(Tk - Tq): MoBA's causal cut (queries are the newest keys)
            if causal or a.coef != (0, 0, -1, 1) or not _same(-a.const, tk - tq):
                return None
            causal = True
        else:
            if key is not None or a.kdim != 3 or a.bdim not in (0, None):
                return None
            key = a
    return CompactMask(causal=causal, key=key)
