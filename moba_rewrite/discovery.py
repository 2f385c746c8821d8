"""Eager discovery: every attention site of a model, found from what its forward runs.

`entries(model, example_inputs)` runs the model once in eval mode under `passes.record`
(every torch call recorded into a graph, attributed to modules by forward hooks) and once in
training mode (state restored afterwards) to read the attention dropout the code applies
while training. The detectors of `passes.detect` read the recorded graph, so a site is found
however its code is spelled and whether or not `torch.fx` could trace it. Each site then gets
the machinery that will rewrite it in eager mode:

- `hf`: a module that called transformers' AttentionInterface (`integrations.hf`);
- `mha`: an `nn.MultiheadAttention` (`passes.find_mha`, class swap);
- `traced`: a module `torch.fx` traces, with the same sites (`passes.eager`);
- `routed`: SDPA calls in any other module (`passes.route_sdpa`, a function mode at run time);
- `none`: hand-written attention in a module `torch.fx` cannot trace: reported, kept dense.

Dropout follows one rule on every machinery: a site is decided on what it computes in eval
mode; while training, a site whose code applies attention dropout runs its original attention
(or raises with `on_unsupported: error`), and the report says so.

Without example inputs a plain module cannot be run: it is traced with `torch.fx` as before
(`passes.eager.discover`) and its `nn.MultiheadAttention` modules are listed.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn

from moba_rewrite.integrations import hf
from passes import detect, eager, find_mha, record
from passes.found import FoundSite
from passes.sites import AttentionSite

MACHINERY = ("hf", "mha", "traced", "routed", "none")


@dataclasses.dataclass
class Entry:
    """One eager site: where it lives and how it would be rewritten."""

    site: AttentionSite
    machinery: str  # one of MACHINERY (or "export" for rows of a graph pass)
    module: nn.Module
    found: FoundSite | None = None  # the site in the owner's torch.fx graph (machinery "traced")
    problems: list[str] = dataclasses.field(default_factory=list)  # why it cannot be MoBA
    note: str = ""  # extra information for the report (behaviour while training)
    recorded: FoundSite | None = None  # the site in the recorded forward
    position: int = 0  # execution order


@dataclasses.dataclass
class Discovery:
    entries: list[Entry]
    graph: str  # "hf" | "recorded" | "symbolic_trace"
    warnings: list[str]
    calls: dict[int, tuple[tuple, dict]] = dataclasses.field(default_factory=dict)  # module call patterns


# --------------------------------------------------------------------------------------------
# Running the model


def call_model(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def default_inputs(model: nn.Module, example_inputs: Any) -> Any:
    """The example inputs, or a transformers model's own `dummy_inputs` (None if neither)."""
    if example_inputs is not None:
        return example_inputs
    dummy = getattr(model, "dummy_inputs", None) if hf.is_pretrained(model) else None
    if isinstance(dummy, dict) and dummy:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in dummy.items()}
    return None


@contextmanager
def _mode(model: nn.Module, training: bool) -> Iterator[None]:
    """`model` in eval or train mode for one forward, then exactly as it was: modes, buffers
    (BatchNorm statistics move in training), random number generators."""
    modes = [(m, m.training) for m in model.modules()]
    saved = [(b, b.detach().clone()) for b in model.buffers()] if training else []
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        model.train(training)
        try:
            with torch.no_grad():
                yield
        finally:
            for m, t in modes:
                m.training = t
            with torch.no_grad():
                for b, value in saved:
                    b.copy_(value)


@dataclasses.dataclass
class _Run:
    rec: record.Recording
    found: list[FoundSite]
    hf_modules: list[tuple[str, nn.Module]]
    hf_calls: list[hf.CallRecord]


def _record_run(model: nn.Module, inputs: Any, training: bool, use_hf: bool) -> _Run:
    out: dict[str, Any] = {}

    def forward() -> None:
        if use_hf:
            out["modules"], out["calls"] = hf.attention_modules(model, inputs)
        else:
            call_model(model, inputs)

    with _mode(model, training):
        rec = record.record(model, forward, inputs)
    return _Run(rec=rec, found=detect.find_sites(rec.gm), hf_modules=out.get("modules", []),
                hf_calls=out.get("calls", []))


# --------------------------------------------------------------------------------------------
# Sites of a recorded run


@dataclasses.dataclass
class _Recorded:
    found: FoundSite
    owner: nn.Module
    ordinal: int  # among its owner's sites in one call
    position: int
    problems: list[str]


def _unique_sites(run: _Run, modules: dict[str, nn.Module]) -> dict[tuple[str, int], _Recorded]:
    """One site per (owner, ordinal in one call of the owner): a module called several times
    (shared weights, a decoder step) is one site, with the problems of every call."""
    per_call: dict[tuple[str, int], int] = {}
    out: dict[tuple[str, int], _Recorded] = {}
    for f in run.found:
        owner = modules.get(f.name)
        if owner is None:
            continue
        call = f.out.meta.get("owner_call", 1)
        ordinal = per_call.get((f.name, call), 0)
        per_call[(f.name, call)] = ordinal + 1
        key = (f.name, ordinal)
        if key not in out:
            out[key] = _Recorded(found=f, owner=owner, ordinal=ordinal, position=f.out.meta.get("seq", 0),
                                 problems=list(f.problems))
        else:
            known = out[key].problems
            known.extend(p for p in f.problems if p not in known)
    return out


def _train_dropout(train: _Run | None, modules: dict[str, nn.Module]) -> dict[tuple[str, int], Any]:
    """(owner, ordinal) -> the dropout probability the code applies there while training."""
    if train is None:
        return {}
    return {key: r.found.dropout_p for key, r in _unique_sites(train, modules).items()}


def _dropout_note(p: Any) -> str:
    if isinstance(p, (int, float)) and not isinstance(p, bool):
        return f"; while training: attention dropout p={p:g} -> dense (or error)" if p > 0 else ""
    return "; while training: attention dropout (computed at run time) -> dense (or error)" if p is not None else ""


# --------------------------------------------------------------------------------------------
# Which machinery rewrites a site


def _traced_sites(owner: nn.Module, call: tuple[tuple, dict] | None) -> tuple[list[FoundSite] | None, str]:
    """The owner's own sites in its torch.fx graph, or (None, why it cannot be the traced machinery)."""
    why = eager.uninstallable(owner)
    if why:
        return None, why
    try:
        gm, _ = eager.trace(owner, eager._concrete_pattern(owner, tensor_call(call)))
    except Exception as exc:  # noqa: BLE001 (any tracing failure means: not this machinery)
        return None, f"torch.fx cannot trace {type(owner).__name__}.forward ({type(exc).__name__}: " \
                     f"{str(exc).splitlines()[0][:160] if str(exc) else ''})"
    return [f for f in detect.find_sites(gm) if f.name == ""], ""


def tensor_call(call: tuple[tuple, dict] | None) -> tuple[tuple, dict] | None:
    """A recorded module call with a stand-in tensor for each recorded tensor (what
    `eager._concrete_pattern` needs to tell tensor arguments from constant ones)."""
    if call is None:
        return None

    def conv(x: Any) -> Any:
        return torch.empty(0) if isinstance(x, record.Meta) else x

    return tuple(conv(a) for a in call[0]), {k: conv(v) for k, v in call[1].items()}


def _assign(owner: nn.Module, sites: list[_Recorded], call: tuple[tuple, dict] | None) -> tuple[str, list, str]:
    """(machinery, per-site traced FoundSite or None, reason a site cannot be rewritten eagerly)."""
    if isinstance(owner, nn.MultiheadAttention) and all(r.found.kind == "mha" for r in sites):
        return "mha", [None] * len(sites), ""
    traced, why = _traced_sites(owner, call)
    if traced is not None:
        if [f.kind for f in traced] == [r.found.kind for r in sites]:
            return "traced", traced, ""
        why = (f"torch.fx traces {type(owner).__name__}.forward with {len(traced)} attention site(s) where "
               f"{len(sites)} ran")
    return "routed_or_none", [None] * len(sites), why


# --------------------------------------------------------------------------------------------
# Entries


def entries(model: nn.Module, example_inputs: Any = None) -> Discovery:
    """Every attention site of `model` in execution order, with the machinery that rewrites it."""
    use_hf = hf.is_hf_model(model)
    inputs = default_inputs(model, example_inputs)
    if not use_hf and inputs is None:
        return _legacy_entries(model)
    modules = {}
    for n, m in model.named_modules():
        modules.setdefault(n, m)
    warnings: list[str] = []
    run = _record_run(model, inputs, False, use_hf)
    try:
        train = _record_run(model, inputs, True, use_hf)
    except Exception as exc:  # noqa: BLE001 (the training-mode forward is for the report only)
        train = None
        warnings.append(f"a training-mode forward failed ({type(exc).__name__}: {str(exc)[:160]}); attention "
                        "dropout is not reported")
    recorded = _unique_sites(run, modules)
    p_train = _train_dropout(train, modules)
    out: list[Entry] = []
    hf_owned: set[int] = set()
    if use_hf:
        train_calls = train.hf_calls if train is not None else []  # never guessed from attribute names
        per_module = Counter(name for name, _ in recorded)
        for s in hf.discover(model, example_inputs, recorded=(run.hf_modules, run.hf_calls), train_calls=train_calls):
            hf_owned.add(id(s.module))
            site, note = s.site, s.note
            calls = per_module.get(site.name, 1)
            if calls > 1:  # DiffLlama: two attention calls per forward, one decision (the module's)
                site = dataclasses.replace(site, extra={**site.extra, "calls": calls})
                note += f"; {calls} attention calls per forward follow this row"
            out.append(Entry(site=site, machinery="hf", module=s.module, problems=s.problems, note=note,
                             position=run.rec.first_seq.get(id(s.module), 0)))
    by_owner: dict[str, list[_Recorded]] = {}
    for (name, _), r in sorted(recorded.items(), key=lambda kv: kv[1].position):
        if id(r.owner) not in hf_owned:
            by_owner.setdefault(name, []).append(r)
    routed_roots = []
    for name, sites in by_owner.items():
        owner = sites[0].owner
        machinery, traced, why = _assign(owner, sites, run.rec.calls.get(id(owner)))
        if machinery == "routed_or_none":
            routed_roots.append(name)
        for r, t in zip(sites, traced):
            m = machinery
            problems = list(r.problems)
            if m == "traced":
                t.problems = sorted(set(problems) | set(t.problems))
                problems = list(t.problems)
            elif m == "routed_or_none":
                m = "routed" if r.found.kind == "sdpa" else "none"
                if m == "none" and not problems:  # otherwise dense for its own reasons anyway
                    problems.append(f"hand-written attention that mr.rewrite cannot replace ({why}); "
                                    "mr.export and mr.compile rewrite it")
            site = r.found.site(0)
            site = dataclasses.replace(site, dropout_p=_p_float(p_train.get((name, r.ordinal), 0.0)),
                                       extra={**site.extra, "problems": problems, "machinery": m})
            out.append(Entry(site=site, machinery=m, module=owner, found=t, problems=problems,
                             note=_dropout_note(p_train.get((name, r.ordinal))), recorded=r.found,
                             position=r.position))
    _route_nested(out)
    out.sort(key=lambda e: e.position)
    for layer, e in enumerate(out):
        e.site = dataclasses.replace(e.site, layer=layer)
    if use_hf:
        warnings += unreached_attention_warning(model, {e.site.name for e in out})
    return Discovery(entries=out, graph="hf" if use_hf else "recorded", warnings=warnings, calls=run.rec.calls)


def unreached_attention_warning(model: nn.Module, site_names: set[str]) -> list[str]:
    """A warning naming the attention modules (class name ending in `Attention`) the sample input
    never ran, neither a site nor inside or around one: a vision-language model's vision tower on a
    text prompt, cross attention without encoder states. They are not in the report and keep the
    original attention (at most one line)."""
    unreached: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        kind = type(module).__name__
        if not name or not kind.endswith("Attention") or any(
                s == name or s.startswith(name + ".") or name.startswith(s + ".") for s in site_names):
            continue
        if any(name.startswith(other + ".") for names in unreached.values() for other in names):
            continue  # inside an unreached attention module already named
        unreached.setdefault(kind, []).append(name)
    if not unreached:
        return []
    count = sum(len(v) for v in unreached.values())
    kinds = ", ".join(f"{k} x{len(v)}" for k, v in unreached.items())
    first = next(iter(unreached.values()))[0]
    return [f"{count} attention module(s) did not run on the sample input ({kinds}; first: {first}), so they are "
            f"not in this report and keep the original attention (mr.rewrite(model, policy, example_inputs) with "
            f"inputs that reach them rewrites them)"]


def _p_float(p: Any) -> float:
    return float(p) if isinstance(p, (int, float)) and not isinstance(p, bool) else -1.0


def _route_nested(out: list[Entry]) -> None:
    """A routed owner counts every SDPA call made while it runs that no inner router claims.
    So an owner nested in a routed one gets a router too (its hand-written sites stay dense),
    and a routed owner holding a Hugging Face attention module (whose SDPA calls no router
    claims) cannot be routed."""
    changed = True
    while changed:
        changed = False
        routed = {e.site.name for e in out if e.machinery == "routed"}

        def inside(name: str) -> bool:
            return any(r != name and (r == "" or name.startswith(r + ".")) for r in routed)

        for e in out:
            if e.machinery == "traced" and inside(e.site.name):
                for o in (o for o in out if o.module is e.module):
                    if o.site.kind == "sdpa":
                        o.machinery, o.found = "routed", None
                    else:
                        o.machinery = "none"
                        o.problems.append("hand-written attention in a module nested in one whose SDPA calls are "
                                          "routed at run time: mr.rewrite keeps it dense (mr.export / mr.compile "
                                          "rewrite it)")
                changed = True
        for e in out:
            if e.machinery != "hf" or not inside(e.site.name):
                continue
            for o in out:
                if o.machinery == "routed" and (o.site.name == "" or e.site.name.startswith(o.site.name + ".")):
                    o.machinery = "none"
                    o.problems.append(f"its SDPA calls cannot be told apart from those of the Hugging Face attention "
                                      f"module {e.site.name!r} inside it")
                    changed = True


# --------------------------------------------------------------------------------------------
# Without example inputs: torch.fx tracing (plain modules)


def _legacy_entries(model: nn.Module) -> Discovery:
    position = {id(m): i for i, (_, m) in enumerate(model.named_modules())}
    keyed: list[tuple[int, int, Entry]] = []
    for name, m in find_mha.find_mha_modules(model):
        site = find_mha.mha_site(name, m, layer=0)
        keyed.append((position[id(m)], 0, Entry(site=site, machinery="mha", module=m, note=_dropout_note(m.dropout))))
    disc = eager.discover(model, None)
    for i, ts in enumerate(disc.sites):
        why = eager.uninstallable(ts.owner)
        if why and why not in ts.found.problems:
            ts.found.problems.append(why)
        keyed.append((position[id(ts.owner)], i + 1, Entry(
            site=ts.found.site(0), machinery="traced", module=ts.owner, found=ts.found,
            problems=list(ts.found.problems))))
    keyed.sort(key=lambda t: (t[0], t[1]))
    out = [e for _, _, e in keyed]
    for layer, e in enumerate(out):
        e.site = dataclasses.replace(e.site, layer=layer)
    warnings = [f"module {name!r} could not be traced by torch.fx ({why.splitlines()[0][:200]}); its children "
                "were searched instead: pass example_inputs to find attention written directly in its forward "
                "(mr.export / mr.compile see it)" for name, why in disc.failures.items()]
    return Discovery(entries=out, graph="symbolic_trace", warnings=warnings, calls=disc.calls)
