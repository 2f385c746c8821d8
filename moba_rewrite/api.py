"""Public entry points: rewrite, plan, export, export_with_report, compile.

Signatures (stable: the CLI, checkpoints and exporters build on them)::

    rewrite(model, policy, example_inputs=None) -> nn.Module
        In place, returns `model`. Report at `model._moba_report` (also `report_of(model)`).
    plan(model, policy, example_inputs=None) -> RewriteReport
        Decisions without changing the model.
    export(model, args, policy, kwargs=None, dynamic_shapes=None, *, strict=False) -> ExportedProgram
    export_with_report(model, args, policy, kwargs=None, dynamic_shapes=None, *, strict=False)
        -> tuple[ExportedProgram, RewriteReport]
    rewrite_exported(ep, policy) -> tuple[ExportedProgram, RewriteReport]
        The pass alone, on an existing ExportedProgram (modified in place and returned).
    compile(model, policy, *, example_inputs=None, **torch_compile_kwargs) -> compiled module
        torch.compile with the rewrite pass in a Dynamo backend (then Inductor's compile_fx).
        Report at `compiled.moba_report`, filled as graphs compile.
    find_sites(model, example_inputs=None) -> list[AttentionSite]
    report_of(model) -> RewriteReport | None

`policy` is anything `load_policy` takes: a `Policy`, a dict, or a path (YAML/TOML/JSON).
`example_inputs`: a tuple of positional arguments, a dict of keyword arguments, or a tensor.
Discovery runs the model on them (transformers models fall back to their `dummy_inputs`);
plain modules given none are traced with torch.fx instead, which finds less.

`RewriteReport` (moba_rewrite.report): `.rows` (ReportRow: name, module_class, layer, kind,
num_heads, num_kv_heads, head_dim, causal, mask_kind, decision ("moba"|"dense", what the site
computes now), block_size, top_k, backend, decode, reason, requested (what the policy asked),
matched_rules), `.warnings`, `.graph`, `.moba_sites`, `.dense_sites`, `str()` (aligned
table), `.to_json()`, `.to_dict()`, `RewriteReport.from_dict()`, `report[name_or_index]`.

Sites are found by running the model (`moba_rewrite.discovery`: one forward recorded at the
torch-function level, read by the graph detectors), and each gets a machinery (docs/REWRITING.md):
- modules on transformers' AttentionInterface: the `moba_sdpa` / `moba_eager` attention
  functions (`moba_rewrite.integrations.hf`); generate() and the KV cache keep working.
- `nn.MultiheadAttention` (in any model) is swapped for `MobaMultiheadAttention`;
- modules torch.fx traces are traced and get the rewritten graph as their forward
  (`passes.eager`); SDPA calls in any other module are routed at run time (`passes.route_sdpa`);
  hand-written attention torch.fx cannot trace is reported dense (export / compile rewrite it).
- export / compile: the graph pass (`passes.detect` + `passes.rewrite`) on the aten or
  Dynamo graph.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
from typing import Any, Iterator

import torch
from torch import nn

from moba_rewrite import discovery
from moba_rewrite.integrations import hf
from moba_rewrite.policy import load_policy
from moba_rewrite.report import ReportRow, RewriteReport
from passes import detect, eager, find_mha, route_sdpa
from passes.found import FoundSite, number_sites
from passes.rewrite import Outcome, UnsupportedSiteError, plan_outcome, rewrite_graph
from passes.sites import AttentionSite

__all__ = [
    "rewrite", "plan", "export", "export_with_report", "rewrite_exported", "compile", "find_sites",
    "report_of", "UnsupportedSiteError",
]


def _dense(decision: Any) -> Any:
    return dataclasses.replace(decision, mode="dense")


# --------------------------------------------------------------------------------------------
# Site discovery for eager models (moba_rewrite.discovery)

_Entry = discovery.Entry


def _entries(model: nn.Module, example_inputs: Any) -> discovery.Discovery:
    with _pristine(model):
        return discovery.entries(model, example_inputs)


def find_sites(model: Any, example_inputs: Any = None) -> list[AttentionSite]:
    """Every attention site of a model (eager discovery), an ExportedProgram or an FX
    GraphModule (graph pass). Pass an ExportedProgram itself rather than its graph_module:
    its buffers and lifted constants then count when masks are classified."""
    if isinstance(model, torch.export.ExportedProgram):
        gm = model.graph_module
        gm._moba_constants = _export_constants(model)
        try:
            return detect.sites_of(gm)
        finally:
            del gm._moba_constants
    if isinstance(model, torch.fx.GraphModule) and not hasattr(model, "_moba_report"):
        return detect.sites_of(model)
    return [e.site for e in _entries(model, example_inputs).entries]


def _outcome(e: _Entry, decision: Any) -> Outcome:
    if e.found is not None:
        return plan_outcome(e.found, decision)
    if decision.mode != "moba":
        return Outcome("dense", decision.reason or "policy: full attention")
    if e.problems:
        why = "; ".join(e.problems)
        if decision.on_unsupported == "error":
            raise UnsupportedSiteError(
                f"attention site {e.site.name!r} ({e.site.module_class}) cannot be rewritten to MoBA: {why} "
                "(policy on_unsupported: error)")
        return Outcome("dense", f"unsupported, kept dense: {why}")
    return Outcome("moba", decision.reason or "policy: MoBA")


def _report(entries: list[_Entry], decisions: list[Any], outcomes: list[Outcome], warnings: list[str],
            graph: str) -> RewriteReport:
    rows = []
    for e, d, o in zip(entries, decisions, outcomes):
        reason = o.reason + (e.note if o.mode == "moba" else "")
        rows.append(ReportRow.build(e.site, d, o.mode, reason))
    return RewriteReport(rows=rows, warnings=list(warnings), graph=graph)


# --------------------------------------------------------------------------------------------
# plan / rewrite


def plan(model: nn.Module, policy: Any, example_inputs: Any = None) -> RewriteReport:
    """Which site would get what, and why, without changing the model.

    Raises `UnsupportedSiteError` where the policy says `on_unsupported: error` and a site
    it selects for MoBA cannot be rewritten faithfully (exactly as `rewrite` would).
    """
    policy = load_policy(policy)
    disc = _entries(model, example_inputs)
    decisions, warnings = _decide(policy, disc.entries)
    outcomes = [_outcome(e, d) for e, d in zip(disc.entries, decisions)]
    return _report(disc.entries, decisions, outcomes, disc.warnings + warnings, disc.graph)


def _decide(policy: Any, entries: list[_Entry]) -> tuple[list[Any], list[str]]:
    if not entries:
        return [], ["no attention site found"]
    return policy.decide_all([e.site for e in entries])


def rewrite(model: nn.Module, policy: Any, example_inputs: Any = None) -> nn.Module:
    """Make `model`'s attention sites follow `policy`, in place; returns `model`.

    `state_dict()` keys, `train()`/`eval()`, Hugging Face `generate()` and
    `torch.compile(model, fullgraph=True)` keep working. The report is `model._moba_report`.
    Calling it again replaces the previous rewrite.
    """
    policy = load_policy(policy)
    disc = _entries(model, example_inputs)
    entries = disc.entries
    decisions, warnings = _decide(policy, entries)
    outcomes = [_outcome(e, d) for e, d in zip(entries, decisions)]  # raises before any change
    effective = [d if o.mode == "moba" else _dense(d) for d, o in zip(decisions, outcomes)]
    if disc.graph == "hf":
        hf_items = [(e, d) for e, d in zip(entries, effective) if e.machinery == "hf"]
        hf.apply(model, [(e.site.name, e.module) for e, _ in hf_items], [d for _, d in hf_items])
    mha = [(e, d) for e, d in zip(entries, effective) if e.machinery == "mha"]
    find_mha.install(model, [(e.site.name, e.module) for e, _ in mha], [d for _, d in mha])
    for m in model.modules():  # undo a previous eager rewrite of traced or routed modules
        if "_moba_original_forward" in m.__dict__:
            m.__dict__.pop("forward", None)
            del m.__dict__["_moba_original_forward"]
    _install_traced(model, [(e, d) for e, d, o in zip(entries, decisions, outcomes)
                            if e.machinery == "traced" and _owner_has_moba(e, entries, outcomes)], disc)
    _install_routed(entries, effective, outcomes)
    hf.forget_compiled_call(model)  # a compiled forward kept by generate() would bypass the rewrite on a copy
    report = _report(entries, decisions, outcomes, disc.warnings + warnings, disc.graph)
    model._moba_report = report
    return model


def _install_routed(entries: list[_Entry], effective: list[Any], outcomes: list[Outcome]) -> None:
    """A router on every owner of routed SDPA sites (even all-dense ones: they claim their calls)."""
    owners: dict[int, list[tuple[_Entry, Any, Outcome]]] = {}
    for e, d, o in zip(entries, effective, outcomes):
        if e.machinery == "routed":
            owners.setdefault(id(e.module), []).append((e, d, o))
    for group in owners.values():
        sites = [route_sdpa.RoutedSite(
            name=e.site.name, decision=d if o.mode == "moba" else None, num_heads=e.site.num_heads,
            head_dim=e.site.head_dim, mask_convert=e.recorded.mask.convert if e.recorded is not None else "none",
            causal=bool(e.recorded is not None and e.recorded.causal_flag))
            for e, d, o in group]
        route_sdpa.install(group[0][0].module, sites)


def _owner_has_moba(e: _Entry, entries: list[_Entry], outcomes: list[Outcome]) -> bool:
    """Whether any site of e's owner module becomes MoBA (else the module is left untouched)."""
    return any(o.mode == "moba" for x, o in zip(entries, outcomes) if x.module is e.module)


def _install_traced(model: nn.Module, items: list[tuple[_Entry, Any]], disc: discovery.Discovery) -> None:
    """Trace each owner in eval and train mode, rewrite its own sites, install the result."""
    owners: dict[int, list[tuple[_Entry, Any]]] = {}
    for e, d in items:
        owners.setdefault(id(e.module), []).append((e, d))
    for group in owners.values():
        owner = group[0][0].module
        pattern = eager._concrete_pattern(owner, discovery.tensor_call(disc.calls.get(id(owner))))
        was_training = owner.training
        graphs = {}
        try:
            for mode in (False, True):
                owner.train(mode)
                gm, _ = eager.trace(owner, pattern)
                found = [f for f in detect.find_sites(gm) if f.name == ""]
                if len(found) != len(group):
                    raise RuntimeError(
                        f"tracing {group[0][0].site.name!r} again found {len(found)} attention sites, "
                        f"expected {len(group)}")
                for f, (e, _) in zip(found, group):
                    # Discovery saw shapes (example inputs) in eval mode: its findings rule; the
                    # training graph adds its own (dropout while training).
                    known = list(e.found.problems) if e.found is not None else []
                    f.problems = sorted(set(known) | set(f.problems)) if mode else known
                    if e.found is not None and e.found.mask.convert != "none":
                        f.mask.convert = e.found.mask.convert
                decs = [d for _, d in group]
                if mode:
                    decs = [_other_mode_decision(f, d) for f, d in zip(found, decs)]
                rewrite_graph(gm, found, decs, emitter="runtime", training=mode)
                graphs[mode] = gm
        finally:
            owner.train(was_training)
        eager.install(owner, graphs[False], graphs[True])


def _other_mode_decision(f: FoundSite, d: Any) -> Any:
    """In the training graph an `error` policy must not fire at rewrite time: sites whose only
    problem is dropout while training get the run-time check instead."""
    if d.mode == "moba" and f.problems and d.on_unsupported == "error":
        if all("dropout" in p for p in f.problems):
            f.problems = []  # site_attention raises at call time (dropout_p > 0 and training)
        return d
    return d


# --------------------------------------------------------------------------------------------
# export


@contextlib.contextmanager
def _pristine(model: nn.Module) -> Iterator[None]:
    """Temporarily undo a previous `rewrite` so detection sees the original attention."""
    undo: list = []
    if hf.is_hf_model(model) and model.config._attn_implementation.startswith(hf.IMPL_PREFIX):
        impl = hf.implementations(model.config)
        model.set_attn_implementation(hf.implementations(model.config, hf.to_origin))
        undo.append(lambda: model.set_attn_implementation(impl))
    for m in model.modules():
        if "_moba_original_forward" in m.__dict__ and "forward" in m.__dict__:
            fwd = m.__dict__.pop("forward")
            undo.append(lambda m=m, fwd=fwd: m.__dict__.__setitem__("forward", fwd))
        if isinstance(m, find_mha.MobaMultiheadAttention):
            dec = m._moba_decision
            m._moba_decision = None
            undo.append(lambda m=m, dec=dec: setattr(m, "_moba_decision", dec))
    try:
        yield
    finally:
        for fn in reversed(undo):
            fn()


def rewrite_exported(ep: torch.export.ExportedProgram, policy: Any) -> tuple[torch.export.ExportedProgram, RewriteReport]:
    """Run the rewrite pass on an ExportedProgram's graph (in place); returns (ep, report)."""
    policy = load_policy(policy)
    gm = ep.graph_module
    gm._moba_constants = _export_constants(ep)
    try:
        found = detect.find_sites(gm)
    finally:
        del gm._moba_constants
    sites = number_sites(found)
    decisions, warnings = policy.decide_all(sites) if sites else ([], ["no attention site found"])
    outcomes = rewrite_graph(gm, found, decisions, emitter="inline")
    regions = _region_calls(gm)
    hidden = sum(1 for _, sub in regions for n in sub.graph.nodes  # the pass rewrites the top graph only
                 if n.op == "call_function" and "scaled_dot_product" in str(n.target))
    if hidden:
        warnings = [*warnings, f"{hidden} attention call(s) inside higher-order-op regions of the program "
                    f"({', '.join(sorted({n for n, _ in regions}))}: e.g. torch.no_grad() or autocast "
                    "while exporting in train mode) were not rewritten and run dense"]
    entries = [_Entry(site=s, machinery="export", module=None, found=f) for s, f in zip(sites, found)]  # type: ignore[arg-type]
    return ep, _report(entries, decisions, outcomes, warnings, "export")


def _region_calls(gm: torch.fx.GraphModule) -> list[tuple[str, torch.fx.GraphModule]]:
    """(higher-order op name, its graph) for every region call in the program's top graph."""
    out = []
    for n in gm.graph.nodes:
        if n.op == "call_function" and isinstance(n.target, torch._ops.HigherOrderOperator):
            for a in n.args:
                if isinstance(a, torch.fx.Node) and a.op == "get_attr":
                    sub = getattr(gm, str(a.target), None)
                    if isinstance(sub, torch.fx.GraphModule):
                        out.append((n.target.name(), sub))
    return out


def _export_constants(ep: torch.export.ExportedProgram) -> dict[str, torch.Tensor]:
    """Placeholder name -> tensor for the program's buffers and constants (mask structure)."""
    sig = ep.graph_signature
    table: dict[str, torch.Tensor] = {}
    for name, target in {**sig.inputs_to_buffers, **getattr(sig, "inputs_to_lifted_tensor_constants", {})}.items():
        value = ep.state_dict.get(target) if target in ep.state_dict else ep.constants.get(target)
        if isinstance(value, torch.Tensor):
            table[name] = value
    return table


_NO_CACHE_CLASSES: dict[type, type] = {}


def _without_cache(model: nn.Module) -> nn.Module:
    """The same HF model (shared parameters, same module names and forward signature) whose
    forward defaults to `use_cache=False`: a prefill program returns no cache object (one
    torch.export cannot output) unless the caller passes `use_cache=True` itself."""
    cls = type(model)
    view_cls = _NO_CACHE_CLASSES.get(cls)
    if view_cls is None:
        original = cls.forward

        def forward(self, *args, **kwargs):
            kwargs.setdefault("use_cache", False)
            return original(self, *args, **kwargs)

        forward.__signature__ = inspect.signature(original)  # dynamic_shapes keyed by argument names still work
        view_cls = type(cls.__name__, (cls,), {"forward": forward, "__module__": cls.__module__})
        _NO_CACHE_CLASSES[cls] = view_cls
    view = copy.copy(model)
    view.__class__ = view_cls
    return view


def export_with_report(model: nn.Module, args: Any, policy: Any, kwargs: dict | None = None,
                       dynamic_shapes: Any = None, *, strict: bool = False
                       ) -> tuple[torch.export.ExportedProgram, RewriteReport]:
    """`torch.export` the model (non-strict by default: robust for HF code), then rewrite the graph.

    Hugging Face models export their prefill: `use_cache` defaults to False, so the program
    returns the model's output (`logits` for a causal LM, in the model's `ModelOutput`
    structure) without a cache object; pass `use_cache=True` in `kwargs` to ask for one.
    """
    policy = load_policy(policy)
    args = tuple(args) if isinstance(args, (tuple, list)) else (() if args is None else (args,))
    with _pristine(model):
        params = inspect.signature(type(model).forward).parameters
        takes_cache = hf.is_pretrained(model) and ("use_cache" in params or any(
            p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()))  # GraniteMoE: through **kwargs
        module = _without_cache(model) if takes_cache else model
        # An eval-mode model is exported for inference: without grad, so the model's own `torch.no_grad()`
        # regions change nothing and do not become `wrap_with_set_grad_enabled` submodules, whose
        # attention the graph pass would not see (HRM runs its early reasoning cycles that way)
        with torch.no_grad() if not model.training else contextlib.nullcontext():
            ep = torch.export.export(module, args, kwargs=kwargs, dynamic_shapes=dynamic_shapes, strict=strict)
    return rewrite_exported(ep, policy)


def export(model: nn.Module, args: Any, policy: Any, kwargs: dict | None = None, dynamic_shapes: Any = None,
           *, strict: bool = False) -> torch.export.ExportedProgram:
    """An ExportedProgram whose MoBA sites are `moba.attention` nodes (report: `export_with_report`).

    `ep.module()(*args, **kwargs)` returns what the model returns; for a Hugging Face causal LM
    called as `mr.export(model, (input_ids,), policy)` that is its output with `logits` and no
    KV cache (`use_cache` defaults to False; pass it in `kwargs` to change that)."""
    return export_with_report(model, args, policy, kwargs, dynamic_shapes, strict=strict)[0]


# --------------------------------------------------------------------------------------------
# compile


def compile(model: nn.Module, policy: Any, *, example_inputs: Any = None,  # noqa: A001 (public name)
            **torch_compile_kwargs: Any):
    """`torch.compile(model)` with the MoBA rewrite pass run on every Dynamo graph.

    Layers are numbered over the whole model (found once by eager discovery, which runs the
    model on `example_inputs` when given), so rules like `layers: "-3:"` mean the same as in
    `rewrite`, even when the model has graph breaks. Pass an un-rewritten model. The report
    is `compiled.moba_report`.
    """
    from moba_rewrite.dynamo_backend import MobaBackend

    policy = load_policy(policy)
    hf.is_pretrained(model)  # a transformers model needs a supported transformers (one clear error)
    try:
        sites = find_sites(model, example_inputs)
    except Exception as exc:  # discovery is an aid for numbering only
        sites = None
        note = f"eager discovery failed ({type(exc).__name__}: {exc}); layers numbered per graph"
    else:
        note = ""
    backend = MobaBackend(policy, sites=sites, mode=torch_compile_kwargs.pop("mode", None),
                          options=torch_compile_kwargs.pop("options", None))
    if note:
        backend.report.warnings.append(note)
    compiled = torch.compile(model, backend=backend, **torch_compile_kwargs)
    compiled.moba_report = backend.report
    return compiled


def report_of(model: Any) -> RewriteReport | None:
    """The report attached by `rewrite` / `compile`, if any."""
    return getattr(model, "_moba_report", None) or getattr(model, "moba_report", None)
