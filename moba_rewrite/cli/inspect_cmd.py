"""The `inspect` command, and the site discovery it shares with `policy init`."""

from __future__ import annotations

import argparse
import json

from moba_rewrite.cli import steps
from moba_rewrite.cli.errors import EXIT_ARCHITECTURE, EXIT_OK, CliError, rewrite_error
from moba_rewrite.cli.output import human, progress_for, table


def discover(args: argparse.Namespace, *, steps_total: int = 2):
    """Load the checkpoint and find its attention sites: (checkpoint, [AttentionSite])."""
    from moba_rewrite.api import find_sites

    bar = progress_for(args, steps_total)
    try:
        with bar.step("loading checkpoint"):
            loaded = steps.read(args)
        if loaded.kind in ("aoti",):
            raise CliError(args.checkpoint, "expected a model or a .pt2 program; an AOTInductor package is "
                                            "compiled code without attention sites to inspect", EXIT_ARCHITECTURE)
        with bar.step("finding attention sites"):
            try:
                if loaded.kind == "pt2":
                    sites = find_sites(loaded.model.graph_module)
                else:
                    n = args.seq_len or 32
                    steps.check_seq_len(n, loaded.model)
                    sites = find_sites(loaded.model, steps.sample(loaded.model, n))
            except CliError:
                raise
            except Exception as exc:
                raise rewrite_error(exc, "find attention sites in") from exc
    finally:
        bar.close()
    return loaded, sites


def site_rows(sites) -> list[dict]:
    """One table / JSON row per attention site; `notes`: why it would stay dense (and its
    attention dropout while training), from what discovery saw the model run."""
    return [{"layer": r.layer, "name": r.name or "(root)", "class": r.module_class, "kind": r.kind,
             "heads": r.num_heads, "kv_heads": r.num_kv_heads, "head_dim": r.head_dim, "causal": r.causal,
             "mask": r.mask_kind, "notes": _notes(r)} for r in sites]


def _notes(site) -> str | None:
    problems = site.extra.get("problems", [])
    notes = ["stays dense: " + "; ".join(problems)] if problems else []
    if site.dropout_p and site.dropout_p > 0:
        notes.append(f"attention dropout p={site.dropout_p:g} while training")
    return "; ".join(notes) or None


def model_size(model) -> tuple[int, int]:
    """(parameters + buffers, bytes) of a module or a program, each shared tensor counted once."""
    params = getattr(model, "parameters", None)
    if params is None and hasattr(model, "state_dict"):
        tensors = list(model.state_dict().values())
    elif params is not None:
        tensors = list(model.parameters()) + list(model.buffers())
    else:
        tensors = []
    seen, n, nbytes = set(), 0, 0
    for t in tensors:
        if id(t) in seen:
            continue
        seen.add(id(t))
        n += t.numel()
        nbytes += t.numel() * t.element_size()
    return n, nbytes


def cmd_inspect(args: argparse.Namespace) -> int:
    loaded, sites = discover(args)
    n_params, n_bytes = model_size(loaded.model)
    rows = site_rows(sites)
    if args.json:
        print(json.dumps({"checkpoint": str(args.checkpoint), "kind": loaded.kind,
                          "model_class": type(loaded.model).__name__, "parameters": n_params, "bytes": n_bytes,
                          "sites": rows}, indent=2))
        return EXIT_OK
    print(f"{args.checkpoint}: {loaded.kind} checkpoint, {type(loaded.model).__name__}, "
          f"{n_params / 1e6:.2f}M parameters ({human(n_bytes)}), {len(rows)} attention sites")
    print(table(rows))
    return EXIT_OK
