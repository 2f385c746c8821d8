"""A rewritten model's forward, over every model type in transformers' registry.

`zoo_sweep.py` checks that discovery *lists* every attention site of every model type; this
checks what a rewrite then *does* with them, on the same tiny models and generic inputs (every
base class of `MODEL_MAPPING_NAMES`: encoders, decoders, encoder-decoders, vision, audio,
multimodal; 16 tokens, an image, audio features):

- **dense limit**: `mr.rewrite(copy, policy, inputs)` with `top_k * block_size >= 16384` must
  give the original model's outputs (every floating tensor of the output, within 1e-4 of its
  scale; SPEC section 2 item 8): the rewrite's wiring (scale, mask, causality, head layout,
  output layout) may change nothing;
- **the report says what runs** (block 4, top-2, so the gate chooses): the rewritten model runs
  under a dispatch mode that records, per innermost module, every `moba::` op and every dense
  attention kernel or softmax attention (`zoo_sweep.AttentionTruth`, independent of
  moba_rewrite). A site the report calls `moba` must run a MoBA op and no dense attention; a site
  it calls `dense` must run no MoBA op;
- **sparse** (same policy): where every MoBA site is called through transformers'
  AttentionInterface, the outputs must equal an independent oracle, the original model with
  the dense `reference` MoBA registered as its attention at those sites
  (`generate_sweep._oracle`; the causal flag read from the call, as transformers passes it).
  Hand-written sites have no such oracle: the row says so;
- `--compiled`: `torch.compile(sparse rewrite, backend="aot_eager")` gives its eager outputs
  (not checked where the original model does not compile, or where its own compiled run differs
  from its eager run: transformers takes other paths under tracing for a few models);
- `--export`: `mr.export` of the original with the same inputs and policy gives the eager sparse
  rewrite's outputs, at the same MoBA sites (not checked where the original does not export;
  a site the program keeps dense with a reason in its report is a coverage gap, `ok: gap:`;
  where the original exported differs from the original eager, the dense limit is compared with
  the former and the sparse program is not checked);
- `--onnx`: the ONNX path (`moba-rewrite export --format onnx`; input_ids alone, so only for
  models given nothing else) in onnxruntime: the dense limit gives the original's outputs, the
  sparse model the eager sparse rewrite's, with one MoBA node per MoBA call of that run;
- `--padded`: every check above on a padded batch of two instead: the text repeated, the second
  row's last 5 tokens hidden by `attention_mask` (right padding, so no query row is left without
  keys); models whose forward takes no `input_ids` and `attention_mask` are skipped.

    python benchmarks/forward_sweep.py                          # every model type (~15 min on 2 cores)
    python benchmarks/forward_sweep.py --only bert vit whisper  # some
    python benchmarks/forward_sweep.py --compiled --export --markdown benchmarks/logs/forward-sweep.md
    python benchmarks/forward_sweep.py --onnx                   # the ONNX path in onnxruntime too
    python benchmarks/forward_sweep.py --padded                 # the same on a padded batch

A row per model type: `equal`, `DIFFERS` (what differs), `ERROR` (the rewrite failed where the
original ran), `skipped` (the original could not be built, given inputs, or run twice alike) or
`no attention`. Exit status 1 when any row differs or errs.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import sys
from collections import Counter
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402

import zoo_sweep  # noqa: E402
from generate_sweep import SPARSE, _oracle  # noqa: E402

LIMIT = {"version": 1, "defaults": {"block_size": 64, "top_k": 256}}  # 16384 keys: every input here


class _Ran(zoo_sweep.AttentionTruth):
    """`AttentionTruth` that also records every `moba::` op (kind "moba"); what runs inside one is
    not seen (a dispatch mode is off inside its own handler)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if getattr(func, "namespace", "") == "moba":
            out = func(*args, **(kwargs or {}))
            self.found.append((*self._owner(), "moba"))
            return out
        return super().__torch_dispatch__(func, types, args, kwargs)


def _tensors(out: Any) -> list[torch.Tensor]:
    """The floating tensors of a model output, in order (ModelOutput, tuple or dict)."""
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    return [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _error(got: Any, want: Any) -> float | None:
    """None when every floating tensor of `got` is within 1e-4 of `want`'s (relative to its scale),
    else the largest scaled error (inf when the structure or a shape differs, nan for NaN)."""
    a, b = _tensors(got), _tensors(want)
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        return float("inf")
    worst = 0.0
    for x, y in zip(a, b):
        x, y = x.detach().double(), y.detach().double()
        if not torch.equal(torch.isnan(x), torch.isnan(y)):
            return float("nan")
        keep = ~torch.isnan(y)
        if keep.any():
            scale = max(1.0, y[keep].abs().max().item())
            worst = max(worst, ((x - y)[keep].abs().max().item()) / scale)
    return None if worst <= 1e-4 else worst


def padded_batch(model, inputs: dict[str, Any], hidden: int = 5) -> dict[str, Any]:
    """`inputs` as a batch of two whose second row's last `hidden` tokens are padding (module
    docstring); ValueError when the model's forward takes no `input_ids` and `attention_mask`."""
    import inspect

    params = inspect.signature(model.forward).parameters
    if "input_ids" not in inputs or "attention_mask" not in params:
        raise ValueError("no padded batch: the forward takes no input_ids and attention_mask")
    out = {k: (v.expand(2, *v.shape[1:]).clone() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    mask = torch.ones_like(out["input_ids"])
    mask[1, -hidden:] = 0
    out["attention_mask"] = mask
    return out


def _ran_per_module(found: list[tuple[str, int, str]]) -> dict[str, Counter]:
    per: dict[str, Counter] = {}
    for owner, _, kind in found:
        per.setdefault(owner, Counter())["moba" if kind == "moba" else "dense"] += 1
    return per


def _report_notes(report, found: list[tuple[str, int, str]]) -> list[str]:
    """Report rows against what ran (module docstring)."""
    ran = _ran_per_module(found)
    notes = []
    named = {r.name for r in report.rows}
    for r in report.rows:
        seen = ran.get(r.name, Counter())
        if r.decision == "moba" and not seen["moba"]:
            notes.append(f"report says moba at {r.name}, no MoBA op ran there")
        elif r.decision == "moba" and seen["dense"]:
            notes.append(f"report says moba at {r.name}, dense attention ran there too ({seen['dense']} call(s))")
        elif r.decision != "moba" and seen["moba"]:
            notes.append(f"report says dense at {r.name}, a MoBA op ran there")
    for owner, seen in ran.items():
        if seen["moba"] and owner not in named and not any(owner.startswith(n + ".") for n in named):
            notes.append(f"a MoBA op ran at {owner}, which the report does not list")
    return notes


def _compiled_notes(model, sparse, inputs, want_sparse) -> list[str]:
    torch._dynamo.reset()
    try:
        try:
            with torch.no_grad():
                got = torch.compile(sparse, backend="aot_eager")(**inputs)
        except Exception as e:  # noqa: BLE001
            try:
                with torch.no_grad():
                    torch.compile(copy.deepcopy(model), backend="aot_eager")(**inputs)
            except Exception:  # noqa: BLE001
                return ["ok: compiled not checked (the original does not compile either)"]
            return [f"compiled: fails where the original compiles: {zoo_sweep._short(e)[:160]}"]
    finally:
        torch._dynamo.reset()
    err = _error(got, want_sparse)
    if err is None:
        return []
    own = _own_traced_difference(lambda m: torch.compile(m, backend="aot_eager"), model, inputs)
    if own is not None:
        return [f"ok: compiled not checked (the original's own compiled run differs from its eager run by {own:.3g})"]
    return [f"compiled: outputs differ from the eager rewrite by {err:.3g}"]


def _own_traced_difference(trace, model, inputs) -> float | None:
    """How far the original model's traced run (`trace(copy)` called on `inputs`) is from its eager
    run, None when within tolerance: transformers takes other paths under tracing for some models
    (PaliGemma's prefix mask), and then only traced runs compare with each other."""
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            return _error(trace(copy.deepcopy(model))(**inputs), model(**inputs))
    finally:
        torch._dynamo.reset()


def _export_notes(model, inputs, want, eager_report, want_sparse) -> list[str]:
    """`mr.export` in the dense limit must give the original's outputs (the graph rewrite's wiring);
    with the sparse policy, the eager sparse rewrite's where both rewrite the same sites."""
    from moba_rewrite import api

    try:
        with torch.no_grad():
            exported = torch.export.export(copy.deepcopy(model), (), kwargs=inputs, strict=False).module()(**inputs)
    except Exception as e:  # noqa: BLE001
        return [f"ok: export not checked (the original does not export: {zoo_sweep._short(e)[:80]})"]
    gc.collect()
    notes = []
    own = _error(exported, want)
    if own is not None:  # the original exported is another function than the original eager (see above)
        notes.append(f"ok: the original's own exported run differs from its eager run by {own:.3g}: the dense "
                     "limit compared with it, the sparse program not checked")
        want = exported
    ep, _ = api.export_with_report(copy.deepcopy(model), (), LIMIT, kwargs=inputs)
    with torch.no_grad():
        err = _error(ep.module()(**inputs), want)
    if err is not None:
        notes.append(f"export, dense limit: outputs differ from the original by {err:.3g}")
    if own is not None:
        return notes
    del ep
    gc.collect()
    ep, report = api.export_with_report(copy.deepcopy(model), (), SPARSE, kwargs=inputs)
    with torch.no_grad():
        got = ep.module()(**inputs)
    rows = {r.name: r for r in report.rows}
    extra = set(report.moba_sites) - set(eager_report.moba_sites)
    fewer = set(eager_report.moba_sites) - set(report.moba_sites)
    if fewer and all(n in rows and rows[n].decision != "moba" and rows[n].reason for n in fewer):
        first = sorted(fewer)[0]
        notes.append(f"ok: gap: export keeps {len(fewer)} site(s) dense that the eager rewrite runs as MoBA "
                     f"({first}: {rows[first].reason[:90]})")
    elif fewer:
        notes.append(f"export: keeps {sorted(fewer)} dense without a reason in its report")
    if extra:
        notes.append(f"ok: export rewrites {len(extra)} site(s) the eager rewrite keeps dense (e.g. {sorted(extra)[0]}); "
                     "checked in the dense limit only")
    if not extra and not fewer:
        err = _error(got, want_sparse)
        if err is not None:
            notes.append(f"export: outputs differ from the eager rewrite by {err:.3g}")
    return notes


def sweep_one(model_type: str, class_name: str, seconds: int, compiled: bool = False,
              export: bool = False, padded: bool = False, onnx: bool = False) -> tuple[str, str]:
    import moba_rewrite as mr

    try:
        with zoo_sweep.time_limit(seconds):
            model, inputs = zoo_sweep.build(model_type, class_name)
            if padded:
                inputs = padded_batch(model, inputs)
            with torch.no_grad():
                want, again = model(**inputs), model(**inputs)
            if _error(again, want) is not None:
                return "skipped", "the original's two runs differ (randomness in eval mode)"
            if not sum(zoo_sweep.truth_sites(model, inputs).values()):
                return "no attention", ""
    except Exception as e:  # noqa: BLE001
        return "skipped", zoo_sweep._short(e)
    notes: list[str] = []
    stage = "dense limit"
    try:
        with zoo_sweep.time_limit(seconds):
            limit = mr.rewrite(copy.deepcopy(model), LIMIT, inputs)
            with torch.no_grad():
                err = _error(limit(**inputs), want)
            if err is not None:
                notes.append(f"dense limit: outputs differ from the original by {err:.3g}")
            del limit
            gc.collect()
            stage = "sparse"
            sparse = mr.rewrite(copy.deepcopy(model), SPARSE, inputs)
            report = sparse._moba_report
            want_sparse, found = zoo_sweep.counted_run(sparse, inputs, _Ran)
            notes += _report_notes(report, found)
            moba = set(report.moba_sites)
            if not moba:
                notes.append("ok: no MoBA site (" + "; ".join(sorted({r.reason[:60] for r in report.rows}))[:160] + ")")
            else:
                oracle = _oracle(model, sparse, prompt=None)
                with torch.no_grad():
                    got = oracle(**inputs)
                covered = getattr(oracle, "_oracle_ran", set())
                if moba <= covered:
                    err = _error(want_sparse, got)
                    if err is not None:
                        notes.append(f"sparse: outputs differ from the reference MoBA by {err:.3g}")
                else:
                    notes.append(f"ok: sparse not checked ({len(moba - covered)} MoBA site(s) not called through "
                                 "transformers' AttentionInterface)")
                del oracle
                gc.collect()
        for name, on, check in (
                ("compiled", compiled, lambda: _compiled_notes(model, sparse, inputs, want_sparse)),
                ("export", export, lambda: _export_notes(model, inputs, want, report, want_sparse)),
                ("onnx", onnx, lambda: _onnx_notes(model, inputs))):
            stage = name
            if on:
                with zoo_sweep.time_limit(seconds):
                    notes += check()
    except Exception as e:  # noqa: BLE001
        return zoo_sweep.error_row(stage, e)
    return zoo_sweep.verdict(notes)


def _onnx_notes(model, inputs) -> list[str]:
    """The ONNX path (`moba-rewrite export --format onnx`: input_ids -> logits or last hidden state)
    run in onnxruntime: the dense limit must give the original's outputs, the sparse model the
    eager sparse rewrite's, with one MoBA node per MoBA call of that eager run."""
    import tempfile

    import moba_rewrite as mr
    from moba_rewrite.exporters import onnx as mo
    from moba_rewrite.exporters.common import exportable

    tensors = {k for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    mask = inputs.get("attention_mask")
    if tensors - {"input_ids", "attention_mask"} or (mask is not None and not bool((mask == 1).all())):
        return ["ok: onnx not checked (the ONNX export of a Hugging Face model takes input_ids alone)"]
    ids = {"input_ids": inputs["input_ids"]}
    try:
        with torch.no_grad():
            want = exportable(model)(**ids)
    except Exception as e:  # noqa: BLE001
        return [f"ok: onnx not checked (the original's exported forward fails in eager mode: {zoo_sweep._short(e)[:80]})"]
    notes: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, policy in (("dense limit", LIMIT), ("sparse", SPARSE)):
            rewritten = mr.rewrite(copy.deepcopy(model), policy, inputs)
            if name == "sparse":
                want, found = zoo_sweep.counted_run(exportable(rewritten), ids, _Ran)
            path = os.path.join(tmp, name.replace(" ", "_") + ".onnx")
            try:
                proto = mo.export_onnx(rewritten, (ids["input_ids"],), path)
            except mo.OnnxExportUnsupported as e:  # loud and documented: a coverage gap
                return notes + [f"ok: gap: {str(e)[:110]}"]
            except Exception as e:  # noqa: BLE001
                try:
                    mo.export_onnx(copy.deepcopy(model), (ids["input_ids"],), os.path.join(tmp, "original.onnx"))
                except Exception as own:  # noqa: BLE001
                    return [f"ok: onnx not checked (the original does not export to ONNX: {zoo_sweep._short(own)[:80]})"]
                return notes + [f"onnx, {name}: fails where the original exports: {zoo_sweep._short(e)[:140]}"]
            got = [torch.as_tensor(a) for a in mo.run_onnxruntime(path, (ids["input_ids"],))]
            err = _error(got[:1], [want])
            if err is not None and name == "dense limit":  # the original's own ONNX run may differ (op numerics)
                own_path = os.path.join(tmp, "original.onnx")
                mo.export_onnx(copy.deepcopy(model), (ids["input_ids"],), own_path)
                own = [torch.as_tensor(a) for a in mo.run_onnxruntime(own_path, (ids["input_ids"],))]
                if _error(own[:1], [want]) is not None:
                    err = _error(got[:1], own[:1])
                    if err is None:
                        return [f"ok: the original's own ONNX run differs from its eager run by "
                                f"{_error(own[:1], [want]):.3g}: the dense limit equals it, the sparse model not checked"]
            if err is not None:
                notes.append(f"onnx, {name}: onnxruntime's outputs differ from the "
                             f"{'original' if name == 'dense limit' else 'eager rewrite'} by {err:.3g}")
            if name == "sparse":
                calls, nodes = sum(kind == "moba" for *_, kind in found), len(mo.moba_nodes(proto))
                if nodes != calls:
                    notes.append(f"onnx: {nodes} MoBA node(s) where the eager rewrite makes {calls} MoBA call(s)")
            gc.collect()
    return notes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", help="model types to run (default: every base model type)")
    ap.add_argument("--seconds", type=int, default=120, help="time limit per model and phase")
    ap.add_argument("--compiled", action="store_true", help="also torch.compile (aot_eager) the sparse rewrite")
    ap.add_argument("--export", action="store_true", help="also mr.export with the sparse policy")
    ap.add_argument("--onnx", action="store_true",
                    help="also export to ONNX (input_ids alone) and run it in onnxruntime")
    ap.add_argument("--padded", action="store_true", help="run every check on a right-padded batch of two")
    ap.add_argument("--markdown", help="also write the table here")
    args = ap.parse_args(argv)
    title = ", ".join(["padded batch" if args.padded else "one input"]
                      + [f for f, on in (("compiled", args.compiled), ("export", args.export), ("onnx", args.onnx)) if on])
    return zoo_sweep.sweep_table(title, args.only, lambda t, c: sweep_one(t, c, args.seconds, args.compiled, args.export,
                                                                       args.padded, args.onnx), args.markdown)


if __name__ == "__main__":
    sys.exit(main())
