"""torch.compile integration: a Dynamo backend that rewrites attention, then runs Inductor.

`MobaBackend(policy, sites=...)` is called by Dynamo once per captured graph. It finds the
graph's attention sites (`passes.detect`), numbers them against the whole model's site list
(so layer rules mean the same with graph breaks), decides with the policy, rewrites with the
inline emitter and hands the graph to `torch._inductor.compile_fx.compile_fx`. Rows for every
rewritten graph are appended to `backend.report`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.fx as fx

from moba_rewrite.policy import load_policy
from moba_rewrite.report import ReportRow, RewriteReport
from passes import detect
from passes.rewrite import rewrite_graph
from passes.sites import AttentionSite


class MobaBackend:
    """Dynamo backend: MoBA rewrite pass, then Inductor (or `inner`, a backend callable)."""

    def __init__(self, policy: Any, *, sites: list[AttentionSite] | None = None, mode: str | None = None,
                 options: dict | None = None, inner: Any = None) -> None:
        self.policy = policy
        self.sites = sites
        self.num_layers = len(sites) if sites else None
        self.report = RewriteReport(graph="dynamo")
        self.inner = inner
        self.config_patches: dict = dict(options or {})
        if mode is not None and mode != "default":
            from torch._inductor import list_mode_options

            self.config_patches = {**list_mode_options(mode), **self.config_patches}
        self._warned = False

    def _layer_of(self, names: list[str]) -> list[int | None]:
        if not self.sites:
            return [None] * len(names)
        by_name: dict[str, list[int]] = {}
        for s in self.sites:
            by_name.setdefault(s.name, []).append(s.layer)
        used: dict[str, int] = {}
        out: list[int | None] = []
        for n in names:
            layers = by_name.get(n, [])
            k = used.get(n, 0)
            used[n] = k + 1
            out.append(layers[k] if k < len(layers) else (layers[-1] if layers else None))
        return out

    def __call__(self, gm: fx.GraphModule, example_inputs: list) -> Any:
        found = detect.find_sites(gm)
        if found:
            layers = self._layer_of([f.name for f in found])
            sites = []
            for i, (f, layer) in enumerate(zip(found, layers)):
                if layer is None:
                    layer = i
                    self.report.warnings.append(
                        f"site {f.name!r} was not found by eager discovery; numbered {i} within its graph")
                sites.append(f.site(layer))
            num_layers = self.num_layers or (max(s.layer for s in sites) + 1)
            num_layers = max(num_layers, max(s.layer for s in sites) + 1)
            decisions = [self.policy.decide(s, num_layers) for s in sites]
            if not self._warned and self.sites:
                _, warnings = self.policy.decide_all(self.sites)
                self.report.warnings.extend(warnings)
                self._warned = True
            outcomes = rewrite_graph(gm, found, decisions, emitter="inline")
            for s, d, o in zip(sites, decisions, outcomes):
                row = ReportRow.build(s, d, o.mode, o.reason)
                # A recompilation (new shapes) sees the same sites again: keep one row per site.
                self.report.rows = [r for r in self.report.rows if (r.name, r.layer) != (row.name, row.layer)]
                self.report.rows.append(row)
            self.report.rows.sort(key=lambda r: r.layer)
        if self.inner is not None:
            return self.inner(gm, example_inputs)
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, example_inputs, config_patches=self.config_patches or None)


def moba_backend(policy: Any, **kwargs: Any) -> MobaBackend:
    """`torch.compile(model, backend=moba_backend(policy))`: the pass without `mr.compile`."""
    return MobaBackend(load_policy(policy), **kwargs)


__all__ = ["MobaBackend", "moba_backend"]
