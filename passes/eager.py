"""Eager rewriting of plain `nn.Module`s: trace the module that owns an attention site,
rewrite its graph, and make the traced code that module's `forward`.

- Discovery traces the whole model with `torch.fx` (buffers as proxies so `self.bias[:T, :T]`
  traces; `nn.MultiheadAttention` and the `nn.Transformer*` layers as leaves, they are
  handled by `passes.find_mha`). When the whole model does not trace (data-dependent
  control flow), its children are traced one by one. The tracer records how every module
  was called, so each owner is later traced with the same `None` / constant arguments.
- Rewriting traces each owner alone, in eval and in train mode, replaces its sites by calls
  to `passes.runtime.site_attention`, and installs a generated `forward` with the original
  signature that runs the eval or the train graph. The generated code reads parameters,
  buffers and children through `self`, so the module keeps its class, its `state_dict()`
  keys, `.to()` / `.half()` and `torch.compile(fullgraph=True)`.
"""

from __future__ import annotations

import inspect
import types
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx
from torch import nn

from passes import detect
from passes.found import FoundSite

LEAF_TYPES: tuple[type, ...] = (
    nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer,
    nn.TransformerEncoder, nn.TransformerDecoder, nn.Transformer,
)


class AttentionTracer(fx.Tracer):
    """`fx.Tracer` that proxies buffers, keeps MHA / Transformer layers as leaves and
    records the argument pattern of every module call."""

    proxy_buffer_attributes = True

    def __init__(self) -> None:
        super().__init__()
        self.calls: dict[int, tuple[tuple, dict]] = {}

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, LEAF_TYPES):
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m: nn.Module, forward: Callable, args: tuple, kwargs: dict) -> Any:
        self.calls.setdefault(id(m), (args, kwargs))
        return super().call_module(m, forward, args, kwargs)

    def trace(self, root: Any, concrete_args: dict[str, Any] | None = None) -> fx.Graph:
        """As `fx.Tracer.trace`, with tensor factories that take traced sizes: `torch.ones(t, t)`
        (a causal mask built from `x.size(1)`) has no tensor argument for `__torch_function__`
        to intercept, so symbolic tracing would fail on it."""
        originals = {name: getattr(torch, name) for name in _FACTORIES}
        try:
            for name, fn in originals.items():
                setattr(torch, name, _traced_factory(fn))
            return super().trace(root, concrete_args=concrete_args)
        finally:
            for name, fn in originals.items():
                setattr(torch, name, fn)


_FACTORIES = ("ones", "zeros", "full", "empty", "arange", "eye")


def _traced_factory(fn: Callable) -> Callable:
    """`fn` recorded as a graph node when a size argument is a traced value, else called as is."""
    def factory(*args: Any, **kwargs: Any) -> Any:
        flat = [*args, *(a for v in args if isinstance(v, (tuple, list)) for a in v), *kwargs.values()]
        proxy = next((a for a in flat if isinstance(a, fx.Proxy)), None)
        if proxy is None:
            return fn(*args, **kwargs)
        return proxy.tracer.create_proxy("call_function", fn, args, kwargs)
    factory.__wrapped__ = fn
    return factory


def _concrete_pattern(module: nn.Module, call: tuple[tuple, dict] | None) -> dict[str, Any] | None:
    """Arguments of `module.forward` that were Python constants (None included) in `call`."""
    sig = inspect.signature(module.forward)
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in sig.parameters.values()):
        return None
    concrete: dict[str, Any] = {}
    bound_args: dict[str, Any] = {}
    if call is not None:
        try:
            bound_args = dict(sig.bind(*call[0], **call[1]).arguments)
        except TypeError:
            bound_args = {}
    for name, p in sig.parameters.items():
        if name in bound_args:
            value = bound_args[name]
            if not isinstance(value, (fx.Proxy, torch.Tensor)) and not isinstance(value, (list, tuple, dict)):
                concrete[name] = value
        elif p.default is not p.empty and (call is not None or p.default is None):
            concrete[name] = p.default
    return concrete


def trace(module: nn.Module, concrete_args: dict[str, Any] | None = None) -> tuple[fx.GraphModule, AttentionTracer]:
    tracer = AttentionTracer()
    graph = tracer.trace(module, concrete_args=concrete_args)
    return fx.GraphModule(module, graph, class_name=type(module).__name__), tracer


def shape_prop(gm: fx.GraphModule, example_inputs: Any) -> bool:
    """Record shapes on `gm` by running it on example inputs (best effort)."""
    if example_inputs is None:
        return False
    args = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    try:
        with torch.no_grad():
            fx.passes.shape_prop.ShapeProp(gm).propagate(*args)
        return True
    except Exception:
        return False


def find_in(gm: fx.GraphModule) -> list[FoundSite]:
    """SDPA and hand-written attention sites of one traced graph, in graph order."""
    return detect.find_sites(gm)


@dataclass
class TracedSite:
    """A site found by tracing, with the module that owns it."""

    found: FoundSite
    owner: nn.Module
    owner_name: str


@dataclass
class Discovery:
    sites: list[TracedSite] = field(default_factory=list)
    calls: dict[int, tuple[tuple, dict]] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else (prefix or name)


def discover(model: nn.Module, example_inputs: Any = None) -> Discovery:
    """Trace `model` (or, failing that, its children) and list its SDPA / manual attention sites."""
    out = Discovery()
    modules = dict(model.named_modules())

    if example_inputs is not None:
        if isinstance(example_inputs, dict):
            out.calls[id(model)] = ((), dict(example_inputs))
        elif isinstance(example_inputs, (tuple, list)):
            out.calls[id(model)] = (tuple(example_inputs), {})
        else:
            out.calls[id(model)] = ((example_inputs,), {})

    def visit(prefix: str, module: nn.Module) -> None:
        if isinstance(module, LEAF_TYPES):
            return
        try:
            concrete = _concrete_pattern(module, out.calls.get(id(module)))
            gm, tracer = trace(module, concrete)
        except Exception as exc:  # untraceable: try the children
            out.failures[prefix or "<root>"] = f"{type(exc).__name__}: {exc}"
            for name, child in module.named_children():
                visit(_join(prefix, name), child)
            return
        for key, value in tracer.calls.items():
            out.calls.setdefault(key, value)
        if module is model and example_inputs is not None:
            root_call = out.calls[id(model)]
            sig = inspect.signature(module.forward)
            bound = sig.bind(*root_call[0], **root_call[1])
            bound.apply_defaults()
            shape_prop(gm, tuple(bound.arguments.values()))
        for f in find_in(gm):
            f.name = _join(prefix, f.name)
            owner = modules.get(f.name)
            if owner is None:
                continue
            if not f.module_class:  # the traced module's own forward has no nn_module_stack entry: name its class
                f.module_class = type(owner).__name__
            out.sites.append(TracedSite(found=f, owner=owner, owner_name=f.name))

    visit("", model)
    return out


# --------------------------------------------------------------------------------------------
# Installing rewritten code on the owner


def _compiled_forward(gm: fx.GraphModule) -> Callable:
    """The plain function behind a GraphModule's generated forward (takes `self` first)."""
    return type(gm).forward


def _carry_constants(owner: nn.Module, gm: fx.GraphModule) -> None:
    """Tensor constants created by tracing live on the GraphModule; copy them onto the owner."""
    for node in gm.graph.nodes:
        if node.op != "get_attr" or "." in node.target:
            continue
        name = node.target
        known = name in owner._parameters or name in owner._buffers or name in owner._modules
        if known:
            continue
        value = owner.__dict__.get(name, getattr(gm, name, None))
        if isinstance(value, torch.Tensor):
            owner.__dict__.pop(name, None)
            owner.register_buffer(name, value, persistent=False)
        elif value is not None and not hasattr(owner, name):
            setattr(owner, name, value)


def uninstallable(owner: nn.Module) -> str | None:
    """Why a traced forward cannot replace `owner.forward` (None when it can)."""
    try:
        sig = inspect.signature(owner.forward)
    except (TypeError, ValueError):
        return "its forward has no inspectable signature"
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.KEYWORD_ONLY) for p in sig.parameters.values()):
        return (f"{type(owner).__name__}.forward takes *args / **kwargs / keyword-only arguments: the eager "
                "rewrite cannot stand in for it (mr.export / mr.compile can)")
    return None


def install(owner: nn.Module, eval_gm: fx.GraphModule, train_gm: fx.GraphModule) -> None:
    """Make `owner.forward` run the rewritten graphs (eval or train by `owner.training`)."""
    original = owner.forward
    sig = inspect.signature(original)
    params = list(sig.parameters.values())
    names = [p.name for p in params]
    defaults = {f"_d{i}": p.default for i, p in enumerate(params) if p.default is not p.empty}
    header = ", ".join(
        p.name + (f"=_d{i}" if p.default is not p.empty else "") for i, p in enumerate(params)
    )
    call = ", ".join(names)
    src = (
        f"def forward(self{', ' if header else ''}{header}):\n"
        f"    if self.training:\n"
        f"        return _train(self{', ' if call else ''}{call})\n"
        f"    return _eval(self{', ' if call else ''}{call})\n"
    )
    scope: dict[str, Any] = {"_train": _compiled_forward(train_gm), "_eval": _compiled_forward(eval_gm), **defaults}
    exec(compile(src, f"<moba_rewrite forward of {type(owner).__name__}>", "exec"), scope)
    _carry_constants(owner, eval_gm)
    _carry_constants(owner, train_gm)
    owner.forward = types.MethodType(scope["forward"], owner)
    owner._moba_original_forward = original
