"""Find attention from what runs: one forward recorded at the torch-function level.

`record(model, run)` runs `run()` (a forward of `model`) under a `TorchFunctionMode` that
writes every torch call into a `torch.fx.Graph`, in the dialect `torch.fx.symbolic_trace`
uses (`call_method` nodes for tensor methods, `operator.*` for Python operators), with each
node's shape and dtype and the stack of modules that were running (`nn_module_stack`, from
forward hooks). The detectors that read traced graphs (`passes.detect`) then read this one.

Nothing has to be traceable: Python control flow, `torch.finfo(x.dtype)`, `**kwargs`
forwards, `unbind`, data-dependent branches all simply run, and only the calls that happened
are in the graph. The graph is a record for detection, never run. Two simplifications make it
read like the code means:

- a one-element tensor computed only from Python values (`torch.tensor(finfo.min)`,
  `torch.sqrt(torch.tensor(d))`) is a constant: its users see the Python number;
- composite functions are one node (`F.multi_head_attention_forward`, `F.softmax`), since the
  mode is off while a call it intercepted runs.

Parameters and model inputs become placeholders (buffers carry their values in
`_moba_constants`, as lifted constants of an export graph do, so a lower-triangular buffer
still reads as a causal mask); a placeholder for an input is named after its argument.
"""

from __future__ import annotations

import operator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.fx as fx
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.weak import WeakIdKeyDictionary


@dataclass(frozen=True)
class Meta:
    """What detection reads of a recorded value: its shape and dtype (no storage kept)."""

    shape: tuple
    dtype: torch.dtype


class RecordedGraph:
    """A recorded forward as the detectors see a GraphModule: `.graph`, constants, no code."""

    def __init__(self) -> None:
        self.graph = fx.Graph()
        self._moba_constants: dict[str, torch.Tensor] = {}

    def get_submodule(self, target: str) -> nn.Module:  # no call_module nodes are ever recorded
        raise AttributeError(target)


@dataclass
class Recording:
    """One recorded forward: the graph, and how each module of the model was called."""

    gm: RecordedGraph
    names: dict[int, str]  # id(module) -> fully-qualified name
    calls: dict[int, tuple[tuple, dict]] = field(default_factory=dict)  # first call, tensors as Meta
    n_calls: dict[int, int] = field(default_factory=dict)
    first_seq: dict[int, int] = field(default_factory=dict)  # graph position when first called

    def position(self, node: fx.Node) -> int:
        return node.meta.get("seq", 0)


_DUNDERS: dict[str, tuple[Callable, bool]] = {  # method -> (operator, operands swapped)
    "__getitem__": (operator.getitem, False), "__add__": (operator.add, False), "__radd__": (operator.add, True),
    "__sub__": (operator.sub, False), "__rsub__": (operator.sub, True), "__mul__": (operator.mul, False),
    "__rmul__": (operator.mul, True), "__truediv__": (operator.truediv, False), "__div__": (operator.truediv, False),
    "__rtruediv__": (operator.truediv, True), "__rdiv__": (operator.truediv, True),
    "__matmul__": (operator.matmul, False), "__rmatmul__": (operator.matmul, True),
    "__and__": (operator.and_, False), "__rand__": (operator.and_, True), "__or__": (operator.or_, False),
    "__ror__": (operator.or_, True), "__xor__": (operator.xor, False), "__invert__": (operator.invert, False),
    "__neg__": (operator.neg, False), "__eq__": (operator.eq, False), "__ne__": (operator.ne, False),
    "__lt__": (operator.lt, False), "__le__": (operator.le, False), "__gt__": (operator.gt, False),
    "__ge__": (operator.ge, False), "__pow__": (operator.pow, False), "__floordiv__": (operator.floordiv, False),
}
_IGNORED = {"_set_grad_enabled", "is_grad_enabled", "is_autocast_enabled", "get_default_dtype"}


def _method_name(func: Callable) -> str | None:
    """The tensor method `func` is (`softmax`, `__getitem__`, a property such as `mT`), else None."""
    owner = getattr(func, "__objclass__", None)
    if owner is torch._C.TensorBase or owner is torch.Tensor:
        return func.__name__
    if getattr(func, "__name__", "") == "__get__":  # a property getter: x.mT, x.T, x.shape
        prop = getattr(getattr(func, "__self__", None), "__name__", None)
        return f"property:{prop}" if prop else None
    qual = getattr(func, "__qualname__", "")
    if qual.startswith(("Tensor.", "TensorBase.")) and "." not in qual.split(".", 1)[1]:
        return func.__name__
    return None


class _Recorder(TorchFunctionMode):
    """Writes every torch call made while active into `rec.gm.graph` (best effort, never raises)."""

    def __init__(self, rec: Recording, stack: list[tuple[str, type, int]], input_names: WeakIdKeyDictionary) -> None:
        super().__init__()
        self.rec = rec
        self.graph = rec.gm.graph
        self.stack = stack
        self.nodes: WeakIdKeyDictionary = WeakIdKeyDictionary()  # tensor -> node
        self.consts: WeakIdKeyDictionary = WeakIdKeyDictionary()  # one-element constant -> Python number
        self.input_names = input_names
        self.seq = 0
        self.paused = False
        self._names: set[str] = set()

    # ---------------------------------------------------------------- values -> graph arguments

    def _unique(self, base: str) -> str:
        base = "".join(c if c.isalnum() or c == "_" else "_" for c in base) or "t"
        name, i = base, 1
        while name in self._names:
            name, i = f"{base}_{i}", i + 1
        self._names.add(name)
        return name

    def _placeholder(self, t: torch.Tensor) -> fx.Node:
        known = self.input_names.get(t)
        if known is not None:
            kind, name = known
        else:
            kind, name = "input", "tensor"
        with self.graph.inserting_before(self._first_non_placeholder()):
            node = self.graph.placeholder(self._unique(name))
        node.meta["val"] = Meta(tuple(t.shape), t.dtype)
        if kind == "buffer":
            self.rec.gm._moba_constants[node.name] = t
        self.nodes[t] = node
        return node

    def _first_non_placeholder(self) -> fx.Node | None:
        for n in self.graph.nodes:
            if n.op != "placeholder":
                return n
        return None

    def _arg(self, x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            if x in self.consts:
                return self.consts[x]
            node = self.nodes.get(x)
            return node if node is not None else self._placeholder(x)
        if isinstance(x, (torch.dtype, torch.device, torch.memory_format, torch.layout)):
            return x
        if isinstance(x, (int, float, bool, str, type(None), slice, type(Ellipsis))):
            return x
        if isinstance(x, torch.Size):
            return tuple(x)
        if isinstance(x, (list, tuple)):
            return type(x)(self._arg(a) for a in x) if not hasattr(x, "_fields") else tuple(self._arg(a) for a in x)
        return None  # an object detection has no use for (a cache, a config): left out of the record

    # ---------------------------------------------------------------- the mode

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not self.paused:
            self.paused = True
            try:
                self._record(func, args, kwargs, out)
            except Exception:  # recording is an observation; it must never change what runs
                pass
            finally:
                self.paused = False
        return out

    def _is_constant(self, args: tuple, kwargs: dict, out: Any) -> bool:
        flat, _ = tree_flatten((args, kwargs))
        tensors = [a for a in flat if isinstance(a, torch.Tensor)]
        return (isinstance(out, torch.Tensor) and out.numel() == 1 and not isinstance(out, nn.Parameter)
                and out.dtype != torch.bool and all(t in self.consts for t in tensors)
                and not any(t in self.input_names for t in tensors) and out.device.type != "meta")

    def _record(self, func: Callable, args: tuple, kwargs: dict, out: Any) -> None:
        flat_out, _ = tree_flatten(out)
        if not any(isinstance(o, torch.Tensor) for o in flat_out):
            return
        name = getattr(func, "__name__", "")
        if name in _IGNORED:
            return
        if self._is_constant(args, kwargs, out):
            try:
                self.consts[out] = out.item()
                return
            except Exception:  # fake / meta values have no number
                pass
        method = _method_name(func)
        g = self.graph
        if method is not None and method.startswith("property:"):
            prop = method.split(":", 1)[1]
            x = self._arg(args[0])
            if prop == "mT" or (prop == "T" and getattr(args[0], "ndim", 0) == 2):
                node = g.call_method("transpose", (x, -2, -1))
            elif prop in ("data",):
                node = g.call_method("detach", (x,))
            else:
                node = g.call_method(prop, (x,))
        elif method in _DUNDERS:
            op, swapped = _DUNDERS[method]
            a = tuple(self._arg(v) for v in args)
            if swapped and len(a) == 2:
                a = (a[1], a[0])
            node = g.call_function(op, a)
        elif method == "where" and len(args) >= 3:  # x.where(cond, y) is torch.where(cond, x, y)
            node = g.call_function(torch.where, (self._arg(args[1]), self._arg(args[0]), self._arg(args[2])))
        elif method is not None:
            node = g.call_method(method, tuple(self._arg(a) for a in args), {k: self._arg(v) for k, v in kwargs.items()})
        else:
            node = g.call_function(func, tuple(self._arg(a) for a in args), {k: self._arg(v) for k, v in kwargs.items()})
        self._annotate(node)
        if isinstance(out, torch.Tensor):
            node.meta["val"] = Meta(tuple(out.shape), out.dtype)
            self.nodes[out] = node
        else:  # a tuple or list of tensors: one getitem per element, as symbolic tracing writes it
            node.meta["val"] = None
            for i, o in enumerate(out if isinstance(out, (tuple, list)) else []):
                if isinstance(o, torch.Tensor):
                    item = g.call_function(operator.getitem, (node, i))
                    self._annotate(item)
                    item.meta["val"] = Meta(tuple(o.shape), o.dtype)
                    self.nodes[o] = item

    def _annotate(self, node: fx.Node) -> None:
        node.meta["nn_module_stack"] = {path: (path, cls) for path, cls, _ in self.stack}
        node.meta["owner_call"] = self.stack[-1][2] if self.stack else 1  # which call of the innermost module
        node.meta["seq"] = self.seq
        self.seq += 1


def _as_meta(x: Any) -> Any:
    return Meta(tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else x


@contextmanager
def _hooks(model: nn.Module, rec: Recording, stack: list[tuple[str, type, int]], recorder: _Recorder) -> Iterator[None]:
    """Forward hooks on every module: keep the module stack and each module's first call."""
    handles = []

    def pre(module: nn.Module, args: tuple, kwargs: dict) -> None:
        key = id(module)
        rec.n_calls[key] = rec.n_calls.get(key, 0) + 1
        stack.append((rec.names[key], type(module), rec.n_calls[key]))
        if key not in rec.calls:
            recorder.paused = True
            try:
                rec.calls[key] = (tree_map(_as_meta, args), tree_map(_as_meta, kwargs))
            except Exception:
                rec.calls[key] = ((), {})
            finally:
                recorder.paused = False
            rec.first_seq[key] = recorder.seq

    def post(module: nn.Module, args: tuple, output: Any) -> None:
        for i in range(len(stack) - 1, -1, -1):  # pop this module (and anything an exception left)
            if stack[i][0] == rec.names[id(module)]:
                del stack[i:]
                break

    try:
        for m in model.modules():
            handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(m.register_forward_hook(post, always_call=True))
        yield
    finally:
        for h in handles:
            h.remove()


def record(model: nn.Module, run: Callable[[], Any], inputs: Any = None) -> Recording:
    """Run `run()` (a forward of `model`) once and return what it computed, as a graph.

    `inputs` (a dict of keyword arguments, a tuple or a tensor) names the placeholders of the
    tensors the forward was given; the model's buffers become constants of the graph.
    """
    names = {}
    for n, m in model.named_modules(remove_duplicate=True):
        names.setdefault(id(m), n)
    rec = Recording(gm=RecordedGraph(), names=names)
    input_names: WeakIdKeyDictionary = WeakIdKeyDictionary()
    for n, b in model.named_buffers():
        input_names.setdefault(b, ("buffer", n))
    for n, p in model.named_parameters():
        input_names.setdefault(p, ("param", n))
    if isinstance(inputs, dict):
        for k, v in inputs.items():
            if isinstance(v, torch.Tensor):
                input_names.setdefault(v, ("input", k))
    elif isinstance(inputs, (tuple, list)):
        for i, v in enumerate(inputs):
            if isinstance(v, torch.Tensor):
                input_names.setdefault(v, ("input", f"arg{i}"))
    elif isinstance(inputs, torch.Tensor):
        input_names.setdefault(inputs, ("input", "arg0"))
    stack: list[tuple[str, type, int]] = []
    recorder = _Recorder(rec, stack, input_names)
    with _hooks(model, rec, stack, recorder), recorder:
        run()
    return rec
