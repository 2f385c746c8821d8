"""Find hand-written attention: matmul -> scale -> (mask) -> softmax -> (dropout) -> matmul.

The matcher starts at every softmax over the last dim and walks both ways through the forms
models actually write:

- scores: `matmul` / `@` / `bmm` / `einsum("..id,..jd->..ij")` / `baddbmm(mask, q, k^T)` of
  q and k^T (a transpose of k, or anything else, transposed back by the rewrite);
- scale: `mul` / `div` by a constant on the scores, or on q before the matmul (timm ViT,
  nn.MultiheadAttention), any number of them;
- masks: `+ mask` (additive; accepted when proven 0 / -huge, `passes.masks`),
  `masked_fill(cond, -inf or finfo.min)` (GPT-2 / nanoGPT) and `where(cond, scores, -huge)`,
  up to two of them (AND-ed);
- the row maximum subtracted for stability (`x - x.max(-1, keepdim=True).values` or `amax`:
  softmax is unchanged by it, MiMo-V2-Flash);
- softmax in any dtype (`softmax(x, -1, dtype=float32)` or `.float().softmax(-1)`) with the
  cast back (`.to(q.dtype)`, `type_as`), then dropout (functional or an `nn.Dropout` module,
  counting only when it is active) and the matmul / einsum with v.

It covers Hugging Face "eager" attention (v4 and v5 forms, `repeat_kv` GQA included),
BERT/GPT-2-style masks and timm-style ViTs. A site whose attention probabilities are also
used elsewhere (returned as attention weights) is reported but cannot be replaced.
"""

from __future__ import annotations

import operator
import re
from typing import Any

import torch
import torch.fx as fx

from passes import fxutil, masks
from passes.find_sdpa import unrepeat_kv
from passes.found import FoundSite, check_common

_MAX_MASKS = 2


def _const(x: Any) -> float | None:
    if isinstance(x, bool):
        return None
    if isinstance(x, (int, float)):
        return float(x)
    return None


def _softmax_dim(n: fx.Node) -> Any:
    if n.op == "call_method":
        return fxutil.arg(n, 1, "dim", -1)
    return fxutil.arg(n, 1, "dim", None)


def _is_last_dim(dim: Any, node: fx.Node) -> bool:
    if dim == -1:
        return True
    s = fxutil.shape(node)
    return isinstance(dim, int) and s is not None and dim == len(s) - 1


def _einsum_parts(n: fx.Node) -> tuple[str, list] | None:
    eq = n.args[0] if n.args else None
    if not isinstance(eq, str):
        return None
    ops = n.args[1] if len(n.args) == 2 and isinstance(n.args[1], (list, tuple)) else list(n.args[1:])
    return eq.replace(" ", ""), list(ops)


_EQ = re.compile(r"^([a-z.]*)([a-z]),([a-z.]*)([a-z])->([a-z.]*)$", re.I)


def _einsum_kind(eq: str) -> str | None:
    """'scores' for P+i+d, P+j+d -> P+i+j; 'output' for P+i+j, P+j+d -> P+i+d; else None."""
    try:
        lhs, out = eq.split("->")
        a, b = lhs.split(",")
    except ValueError:
        return None
    if len(a) < 2 or len(a) != len(b) or len(a) != len(out):
        return None
    p = a[:-2]
    if b[:-2] != p or out[:-2] != p:
        return None
    i, x = a[-2], a[-1]
    y, z = b[-2], b[-1]
    o1, o2 = out[-2], out[-1]
    if x == z and (o1, o2) == (i, y) and len({i, x, y}) == 3:
        return "scores"
    if x == y and (o1, o2) == (i, z) and len({i, x, z}) == 3:
        return "output"
    return None


def _dropout_p(n: fx.Node, root: torch.nn.Module | None) -> Any:
    """Effective dropout probability of a dropout node (0 when inactive); None if not dropout."""
    if n.op == "call_module":
        if not fxutil.is_dropout_module(n, root):
            return None
        mod = root.get_submodule(n.target)
        return float(mod.p) if mod.training else 0.0
    if fxutil.kind(n) != "dropout":
        return None
    p = fxutil.arg(n, 1, "p", 0.5)
    training = fxutil.arg(n, 2, "train" if isinstance(n.target, torch._ops.OpOverload) else "training", True)
    if isinstance(training, fx.Node) or isinstance(p, fx.Node):
        return p if not isinstance(p, fx.Node) or training is not False else 0.0
    return float(p) if training else 0.0


def _single_user(n: fx.Node) -> bool:
    return len(n.users) == 1


def _transpose_last2(n: fx.Node) -> fx.Node | None:
    """If n is x.transpose(-2, -1) (any spelling) return x."""
    k = fxutil.kind(n)
    if k == "transpose":
        if n.op == "call_function" and "aten.t" in str(n.target) and "transpose" not in str(n.target):
            return n.args[0]
        dims = [fxutil.arg(n, 1, "dim0"), fxutil.arg(n, 2, "dim1")]
        s = fxutil.shape(n.args[0])
        nd = len(s) if s is not None else None
        norm = sorted(d + nd if (isinstance(d, int) and d < 0 and nd) else d for d in dims)
        if sorted(dims) == [-2, -1] or (nd is not None and norm == [nd - 2, nd - 1]):
            return n.args[0]
        return None
    if k == "permute":
        perm = n.args[1] if len(n.args) == 2 and isinstance(n.args[1], (list, tuple)) else list(n.args[1:])
        perm = list(perm)
        if len(perm) >= 2 and perm[:-2] == list(range(len(perm) - 2)) and perm[-2:] == [len(perm) - 1, len(perm) - 2]:
            return n.args[0]
    return None


class _Match:
    def __init__(self) -> None:
        self.covered: list[fx.Node] = []
        self.masks: list[masks.MaskInfo] = []
        self.scale = 1.0
        self.scale_nodes: list[Any] = []  # non-constant scale factors (runtime only)
        self.problems: list[str] = []
        self.dropout_p: Any = 0.0
        self.mask_ranks: list[int | None] = []  # rank of the scores where each mask was applied
        self.row_max: set[fx.Node] = set()  # the row maximum subtracted before the softmax (its other user)


_SCALAR_OPS = {"add", "sub", "mul", "truediv", "floordiv", "pow", "neg", "getitem"}


def _shape_scalar(x: Any, depth: int = 0) -> bool:
    """A Python number computed only from tensor shapes and constants (`math.sqrt(k.size(-1))`,
    `1.0 / math.sqrt(C // n_head)`), as symbolic tracing records it: no tensor data involved."""
    if depth > 20:
        return False
    if not isinstance(x, fx.Node):
        return isinstance(x, (int, float)) and not isinstance(x, bool)
    if x.op == "call_method" and x.target in ("size", "dim"):
        return True  # the tensor it reads is the root: only its shape is used
    if x.op != "call_function":
        return False
    target = x.target
    if target is getattr and len(x.args) == 2 and x.args[1] in ("shape", "ndim"):
        return True
    module = getattr(target, "__module__", None)
    name = getattr(target, "__name__", "")
    if module == "math" or (module in ("_operator", "operator") and name in _SCALAR_OPS):
        return all(_shape_scalar(a, depth + 1) for a in x.args) and not x.kwargs
    return False


_AMAX = {torch.amax, torch.Tensor.amax, *fxutil._aten("amax")}
_MAX = {torch.max, torch.Tensor.max, *fxutil._aten("max")}


def _row_max_of(c: Any, x: Any) -> list[fx.Node] | None:
    """The nodes computing the maximum of `x` over its last dim with keepdim, if `c` is that:
    `x.max(-1, keepdim=True)` (`.values` / `[0]`) or `amax(x, -1, keepdim=True)` (a per-row
    constant, so `softmax(x - c)` equals `softmax(x)`); else None."""
    nodes = []
    picked = isinstance(c, fx.Node) and c.op == "call_function" and c.target in (operator.getitem, getattr) \
        and len(c.args) == 2 and c.args[1] in (0, "values")
    if picked:  # max(dim) returns (values, indices)
        nodes.append(c)
        c = c.args[0]
    if not isinstance(c, fx.Node) or not c.args or c.args[0] is not x:
        return None
    if c.op == "call_method":
        ok = c.target == ("max" if picked else "amax")
    else:
        ok = c.op == "call_function" and c.target in (_MAX if picked else _AMAX)
    dim, keepdim = fxutil.arg(c, 1, "dim"), fxutil.arg(c, 2, "keepdim", False)
    if isinstance(dim, (list, tuple)):
        dim = dim[0] if len(dim) == 1 else None
    return nodes + [c] if ok and keepdim is True and _is_last_dim(dim, x) else None


def _walk_scores(x: Any, m: _Match, root) -> fx.Node | None:
    """From the softmax input back to the scores matmul, collecting scale and masks."""
    for _ in range(12):
        if not isinstance(x, fx.Node):
            return None
        k = fxutil.kind(x)
        row_max = _row_max_of(x.args[1], x.args[0]) if k == "sub" and len(x.args) >= 2 and \
            x.target not in fxutil._aten("rsub") and fxutil.arg(x, 2, "alpha", 1) == 1 else None
        if row_max:  # softmax(x - rowmax(x)) == softmax(x)
            m.covered.append(x)
            m.row_max.update(row_max)
            x = x.args[0]
            continue
        if k == "cast" or (k == "view" and x.op != "call_function") or (
                k == "view" and x.target in (torch.ops.aten.contiguous.default, torch.ops.aten.clone.default)):
            m.covered.append(x)
            x = x.args[0]
            continue
        if _score_view(x):  # 3-D <-> 4-D view of the scores (BLOOM: baddbmm, then .view(B, H, T, S))
            m.covered.append(x)
            x = x.args[0]
            continue
        if k in ("matmul", "einsum", "baddbmm"):
            return x
        if k in ("mul", "div") and len(x.args) >= 2:
            a, b = x.args[:2]
            ca, cb = _scalar(a, root), _scalar(b, root)
            if cb is not None and isinstance(a, fx.Node):
                m.scale *= (1.0 / cb) if k == "div" else cb
                m.covered.append(x)
                x = a
                continue
            if ca is not None and isinstance(b, fx.Node) and k == "mul":
                m.scale *= ca
                m.covered.append(x)
                x = b
                continue
            # A factor computed from shapes at run time (symbolic tracing): kept as a graph node.
            # Scores are the numerator of a div; either side of a mul.
            for scores, factor in ((a, b), (b, a)) if k == "mul" else ((a, b),):
                if isinstance(scores, fx.Node) and fxutil.dtype(factor) is None and _shape_scalar(factor):
                    m.scale_nodes.append((k, factor))
                    m.covered.append(x)
                    x = scores
                    break
            else:
                return None
            continue
        if k == "add" and len(x.args) >= 2:
            a, b = x.args[:2]
            alpha = x.kwargs.get("alpha", 1)
            if alpha != 1 or len(m.masks) >= _MAX_MASKS:
                return None
            # The scores side is the one that leads to a matmul; the other is the mask.
            scores, mask = (a, b) if _leads_to_scores(a) else (b, a)
            if not _leads_to_scores(scores):
                return None
            m.masks.append(masks.analyze(mask, root=root))
            m.mask_ranks.append(_rank(x))
            m.covered.append(x)
            x = scores
            continue
        if k == "masked_fill" and len(x.args) >= 3:
            base, cond, fill = x.args[:3]
            if not _huge_negative(fill, root) or len(m.masks) >= _MAX_MASKS:
                return None
            m.masks.append(_cond_mask(cond, invert=True, root=root))
            m.mask_ranks.append(_rank(x))
            m.covered.append(x)
            x = base
            continue
        if k == "where" and len(x.args) == 3:
            cond, a, b = x.args
            if not _huge_negative(b, root) or len(m.masks) >= _MAX_MASKS:
                return None
            m.masks.append(_cond_mask(cond, invert=False, root=root))
            m.mask_ranks.append(_rank(x))
            m.covered.append(x)
            x = a
            continue
        return None
    return None


_CONST_TARGETS = ("tensor", "scalar_tensor", "full", "as_tensor")
_PURE_SCALAR_OPS = {"sqrt", "rsqrt", "reciprocal", "pow", "mul", "div", "true_divide", "add", "sub", "neg", "exp",
                    "log", "detach", "detach_", "clone", "lift_fresh_copy", "lift_fresh", "_to_copy", "to", "float",
                    "double", "half", "bfloat16", "type_as", "alias", "view", "reshape", "squeeze", "unsqueeze"}


def _scalar(x: Any, root: Any = None, depth: int = 0) -> float | None:
    """`x` as a Python number when it is one or a one-element tensor computed only from
    constants (`torch.sqrt(torch.tensor(d))`, a lifted `torch.tensor(finfo.min)` in an export
    graph): evaluated here, once, from those constants."""
    c = _const(x)
    if c is not None or not isinstance(x, fx.Node) or depth > 8:
        return c
    if x.op in ("get_attr", "placeholder"):
        const = masks.constant_of(x, root)
        try:
            return float(const) if const is not None and const.numel() == 1 else None
        except Exception:  # fake / meta constants have no value
            return None
    if x.op not in ("call_function", "call_method"):
        return None
    name = x.target if x.op == "call_method" else getattr(x.target, "__name__", str(x.target))
    base = str(name).split(".")[0]
    if base in _CONST_TARGETS and x.args and x.op == "call_function":
        value = x.args[1] if base == "full" and len(x.args) > 1 else x.args[0]
        return _const(value)
    if base not in _PURE_SCALAR_OPS:
        return None
    args = []
    for a in x.args:
        if isinstance(a, fx.Node):
            v = _scalar(a, root, depth + 1)
            if v is None:
                return None
            args.append(torch.tensor(v, dtype=torch.float64))
        else:
            args.append(a)
    try:
        fn = getattr(torch.Tensor, x.target) if x.op == "call_method" else x.target
        out = fn(*args, **{k: v for k, v in x.kwargs.items() if not isinstance(v, fx.Node)})
        return float(out) if isinstance(out, torch.Tensor) and out.numel() == 1 else _const(out)
    except Exception:  # an op that does not take these arguments: not a constant we can read
        return None


def _huge_negative(x: Any, root: Any, depth: int = 0) -> bool:
    """-inf or a huge negative number, also as a one-element tensor constant: a lifted
    `torch.tensor(finfo.min)` in an export graph, a `torch.tensor(...)` call in a Dynamo graph."""
    if masks._is_huge_negative(x):
        return True
    if not isinstance(x, fx.Node) or depth > 6:
        return False
    return masks._is_huge_negative(_scalar(x, root))


def _broadcast_only(mask: Any) -> bool:
    """A mask of shape [..., Tq, Tk] whose leading dims are all 1: it means the same for every
    batch row and head, whatever the scores' rank."""
    s = fxutil.shape(mask)
    return s is not None and all(fxutil.static_int(d) == 1 for d in s[:-2])


def _rank(x: Any) -> int | None:
    s = fxutil.shape(x)
    return len(s) if s is not None else None


def _score_view(x: Any) -> bool:
    """A view / reshape that keeps the last two dims (queries, keys) and regroups the others:
    `[B*H, Tq, Tk] <-> [B, H, Tq, Tk]`. Needs recorded shapes (never a slice: `getitem` is not one)."""
    if not isinstance(x, fx.Node) or fxutil.kind(x) != "view" or x.target is operator.getitem or not x.args:
        return False
    name = str(x.target) if x.op == "call_method" else getattr(x.target, "__name__", str(x.target))
    if not any(w in name for w in ("view", "reshape", "unflatten", "flatten")):
        return False
    a, b = fxutil.shape(x.args[0]), fxutil.shape(x)
    if a is None or b is None or len(a) < 2 or len(b) < 2 or len(a) not in (3, 4) or len(b) not in (3, 4):
        return False
    same = [fxutil.same_size(p, q) for p, q in zip(a[-2:], b[-2:])]
    return all(same)


def _leads_to_scores(x: Any, depth: int = 0) -> bool:
    if not isinstance(x, fx.Node) or depth > 10:
        return False
    k = fxutil.kind(x)
    if k in ("matmul", "einsum", "baddbmm"):
        return True
    if k in ("cast", "mul", "div", "add", "masked_fill", "where", "view") or _score_view(x):
        first = x.args[1] if k == "where" and len(x.args) > 1 else (x.args[0] if x.args else None)
        if k == "add":
            return any(_leads_to_scores(a, depth + 1) for a in x.args[:2])
        return _leads_to_scores(first, depth + 1)
    return False


def _cond_mask(cond: Any, invert: bool, root=None) -> masks.MaskInfo:
    if not isinstance(cond, fx.Node):
        return masks.MaskInfo(node=None, kind="unknown", usable=False, reason="constant mask condition")
    dt = fxutil.dtype(cond)
    if dt is not None and dt != torch.bool:
        return masks.MaskInfo(node=cond, kind="unknown", usable=False, reason=f"mask condition of dtype {dt}")
    causal, padding = masks._structure(cond, root=root)
    return masks.MaskInfo(node=cond, kind=masks._label(causal, padding), convert="invert" if invert else "bool",
                          dtype=torch.bool)


def _scaled_operand(x: Any, m: _Match) -> Any:
    """Strip constant scalings of q (timm: `q = q * self.scale`) into the match's scale."""
    while isinstance(x, fx.Node) and fxutil.kind(x) in ("mul", "div") and len(x.args) >= 2:
        a, b = x.args[:2]
        k = fxutil.kind(x)
        cb, ca = _const(b), _const(a)
        if cb is not None and isinstance(a, fx.Node) and len(fxutil.real_users(x)) == 1:
            m.scale *= (1.0 / cb) if k == "div" else cb
            m.covered.append(x)
            x = a
        elif ca is not None and k == "mul" and isinstance(b, fx.Node) and len(fxutil.real_users(x)) == 1:
            m.scale *= ca
            m.covered.append(x)
            x = b
        else:
            break
    return x


def _match(sm: fx.Node, root) -> FoundSite | None:
    if fxutil.kind(sm) != "softmax" or not sm.args:
        return None
    if not _is_last_dim(_softmax_dim(sm), sm.args[0]):
        return None
    m = _Match()
    # ---- output side: softmax -> cast -> dropout -> matmul(p, v)
    x = sm
    out = None
    v = None
    for _ in range(8):
        users = fxutil.real_users(x)
        if len(users) != 1:
            if x is not sm or len(users) != 1:
                m.problems.append("the attention probabilities are also used elsewhere (attention weights output)")
            users = [u for u in users if fxutil.kind(u) in ("cast", "dropout", "matmul", "einsum")
                     or fxutil.is_dropout_module(u, root)]
            if len(users) != 1:
                return None
        u = users[0]
        k = fxutil.kind(u)
        if k == "cast" or (k == "view" and u.op != "call_function" and u.target == "contiguous") or _score_view(u):
            m.covered.append(u)
            x = u
            continue
        p = _dropout_p(u, root)
        if p is not None:
            m.dropout_p = p
            m.covered.append(u)
            x = u
            continue
        if k == "matmul" and u.args[0] is x and len(u.args) >= 2:
            out, v = u, u.args[1]
            break
        if k == "einsum":
            parts = _einsum_parts(u)
            if parts and _einsum_kind(parts[0]) == "output" and len(parts[1]) == 2 and parts[1][0] is x:
                out, v = u, parts[1][1]
                break
        return None
    if out is None or not isinstance(v, fx.Node):
        return None
    # ---- input side: softmax <- cast <- masks <- scale <- matmul(q, k^T)
    scores = _walk_scores(sm.args[0], m, root)
    if scores is None:
        return None
    sk = fxutil.kind(scores)
    baddbmm_mask = None
    if sk == "matmul":
        q, kt = scores.args[0], scores.args[1]
    elif sk == "baddbmm":
        # baddbmm(bias, q, k^T, beta=, alpha=) = beta * bias + alpha * q @ k^T (BLOOM: ALiBi as the bias)
        baddbmm_mask, q, kt = scores.args[0], fxutil.arg(scores, 1, "batch1"), fxutil.arg(scores, 2, "batch2")
        beta, alpha = fxutil.arg(scores, 3, "beta", 1), fxutil.arg(scores, 4, "alpha", 1)
        if _const(alpha) is None or _const(beta) is None:
            return None
        m.scale *= _const(alpha)
        if _const(beta) != 0:
            info = masks.analyze(baddbmm_mask, root=root)
            if info.usable and info.convert == "float_to_bool" and _const(beta) < 0:
                info = masks.MaskInfo(node=baddbmm_mask, kind="unknown", usable=False,
                                      reason=f"baddbmm adds its input times beta={beta}")
            if not info.usable and "dtype" not in info.reason:
                info.reason = ("additive bias on the scores (the input of baddbmm, e.g. ALiBi) that may hold "
                               "values other than 0 / -inf; MoBA's gate could not honour it")
            m.masks.append(info)
            m.mask_ranks.append(_rank(scores))
    else:
        parts = _einsum_parts(scores)
        if not parts or _einsum_kind(parts[0]) != "scores" or len(parts[1]) != 2:
            return None
        q, kt = parts[1]
        kt = ("einsum_k", kt)
    if not isinstance(q, fx.Node):
        return None
    def other_users(n: fx.Node) -> list[fx.Node]:  # besides the row max and reads of its dtype (symbolic tracing)
        return [u for u in fxutil.real_users(n) if u not in m.row_max and not (
            u.op == "call_function" and u.target is getattr and u.args[1:] == ("dtype",))]

    if any(len(other_users(n)) != 1 for n in m.covered if n is not sm):
        m.problems.append("intermediate attention scores are also used elsewhere")
    if len(other_users(scores)) != 1:
        m.problems.append("the attention scores are also used elsewhere")
    q = _scaled_operand(q, m)
    k_transposed = True
    if isinstance(kt, tuple):  # einsum: k is given untransposed
        k, k_transposed = kt[1], False
    else:
        k = kt
        inner = _transpose_last2(kt) if isinstance(kt, fx.Node) else None
        if inner is not None:
            if len(fxutil.real_users(kt)) == 1:
                m.covered.append(kt)
            k, k_transposed = inner, False
    if not isinstance(k, fx.Node):
        return None
    k = _scaled_operand(k, m)
    name, cls = fxutil.common_owner([scores, sm, out])
    mask = m.masks[0] if m.masks else masks.MaskInfo(node=None)
    f = FoundSite(kind="manual", out=out, q=q, k=k, v=v, mask=mask, name=name, module_class=cls,
                  scale=m.scale, scale_on_q=False, dropout_p=m.dropout_p, k_transposed=k_transposed,
                  covered=[sm, scores, *m.covered])
    f.extra_masks = m.masks[1:]
    f.scale_factors = list(m.scale_nodes)
    f.problems.extend(m.problems)
    for extra in f.extra_masks:
        if not extra.usable:
            f.problems.append(extra.reason or "attention mask of an unknown form")
    if m.masks and len(m.masks) > 1:
        causal = any(mi.kind.startswith("causal") for mi in m.masks)
        padding = any("padding" in mi.kind for mi in m.masks)
        f.mask.kind = masks._label(causal, padding) if all(mi.usable for mi in m.masks) else "unknown"
    if m.scale <= 0:
        f.problems.append(f"non-positive attention scale {m.scale}")
    score_rank = _rank(scores)
    for mi, r in zip(m.masks, m.mask_ranks):
        if r is not None and score_rank is not None and r != score_rank and not _broadcast_only(mi.node):
            f.problems.append(f"a per-batch or per-head mask is applied to the scores after a view from "
                              f"{score_rank}-D to {r}-D")
            break
    qs, ks, vs = fxutil.shape(q), fxutil.shape(k), fxutil.shape(v)
    if qs is not None:
        f.layout = "3d" if len(qs) == 3 else "4d"
        if len(qs) not in (3, 4):
            f.problems.append(f"query has {len(qs)} dims; expected [B, H, T, D] or [B*H, T, D]")
        f.tq, f.head_dim = qs[-2], fxutil.static_int(qs[-1])
        f.num_heads = fxutil.static_int(qs[1]) if len(qs) == 4 else None
    if ks is not None:
        # k is [.., T, D] unless still transposed ([.., D, T]).
        f.tk = ks[-1] if k_transposed else ks[-2]
        f.num_kv_heads = fxutil.static_int(ks[1]) if len(ks) == 4 else None
    if vs is not None:
        f.v_head_dim = fxutil.static_int(vs[-1])
    if not k_transposed:
        rk, rv = unrepeat_kv(k), unrepeat_kv(v)
        if rk is not None and rv is not None and rk[1] == rv[1]:
            f.kv_source, f.v_source = rk[0], rv[0]
            f.num_kv_heads = fxutil.static_int(fxutil.shape(rk[0])[1])
    if f.num_heads is None:  # 3-D q: the heads show where the scores are viewed as [B, H, Tq, Tk]
        four = [fxutil.shape(n) for n in m.covered if _score_view(n)]
        f.num_heads = next((fxutil.static_int(s[1]) for s in four if s is not None and len(s) == 4), None)
        if f.num_heads is not None and f.num_kv_heads is None:
            f.num_kv_heads = f.num_heads
    if qs is None and f.layout == "4d":
        f.layout = "auto"
    check_common(f)
    return f


def find_manual(gm: fx.GraphModule) -> list[FoundSite]:
    """Every hand-written attention of `gm` (one per softmax that completes the pattern)."""
    found = []
    for node in gm.graph.nodes:
        if fxutil.kind(node) == "softmax":
            f = _match(node, gm)
            if f is not None:
                found.append(f)
    return found

