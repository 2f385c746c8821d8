"""`calibrate`: a per-site MoBA policy for a budget, from measured sensitivity.

1. One dense forward per calibration window captures every site's q / k / v and measures
   MoBA against dense attention at every grid point (block size x top-k) per site
   (`sites.capture`): the output error `out_rel_err`, the kept attention mass and the density.
2. A site's *sensitivity* is its smallest error over the grid (how much it suffers even with
   the most generous MoBA the grid offers).
3. One family of candidate policies, indexed by an error tolerance t: every site takes the
   sparsest grid point whose error is <= t (ties: the smaller error), or stays dense when no
   grid point is within t. Larger t = sparser policy.
   - `dense_layers=K`: the K most sensitive sites dense; t = the sensitivity of the most
     sensitive remaining site, so every MoBA site stays within the error that site must
     accept at its best grid point.
   - `max_kl=X`: the largest t whose policy, run end to end on the calibration windows, has
     mean KL(original || rewritten) <= X (a bisection over the measured errors; every policy
     it returns was checked end to end).
4. The chosen policy is checked end to end with the `kl` task and written with comments that
   record what was measured (per site and grid point), on which data, length and date.
"""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from moba_rewrite.evaluation.data import Windows, load_windows
from moba_rewrite.evaluation.errors import BudgetError, EvaluationError
from moba_rewrite.evaluation.evaluator import check_length
from moba_rewrite.evaluation.kl import Accumulator
from moba_rewrite.evaluation.models import logits, random_windows, shared_copy
from moba_rewrite.exporters.common import vocab_size
from moba_rewrite.evaluation.progress import bar as progress_bar
from moba_rewrite.evaluation.sites import Config, Stats, capture
from moba_rewrite import api
from moba_rewrite.exporters.common import is_hf_model, sample_inputs
from moba_rewrite.policy import load_policy

DEFAULT_GRID: dict[str, list[int]] = {"block_size": [256, 512, 1024], "top_k": [2, 3, 4, 8]}
CACHE_BYTES = 512 << 20  # original logits kept between end-to-end checks up to this size


@dataclass
class SiteChoice:
    """One site: what was measured at each grid point and what the policy gives it."""

    layer: int
    name: str
    capturable: bool
    why_not: str = ""
    stats: dict[Config, Stats] = field(default_factory=dict)
    choice: Config | None = None  # None = dense

    @property
    def sensitivity(self) -> float:
        return min((s.out_rel_err for s in self.stats.values()), default=float("inf"))

    def pick(self, tolerance: float) -> Config | None:
        """The sparsest grid point within `tolerance` (ties: smaller error), or None (dense)."""
        ok = [(st.density, st.out_rel_err, cfg) for cfg, st in self.stats.items() if st.out_rel_err <= tolerance]
        return min(ok)[2] if ok else None


@dataclass
class CalibrationResult:
    """The calibrated policy (`policy`, a dict `load_policy` takes), the measurements, the check."""

    policy: dict
    sites: list[SiteChoice]
    grid: list[Config]
    check: dict  # end-to-end kl of the chosen policy: policy_kl, top1_agreement
    meta: dict
    tolerance: float
    trials: list[dict] = field(default_factory=list)  # max_kl: every policy checked end to end
    notes: list[str] = field(default_factory=list)

    def to_yaml(self) -> str:
        from moba_rewrite.evaluation.policy_file import calibrated_yaml

        return calibrated_yaml(self)

    def to_dict(self) -> dict:
        return {"policy": self.policy, "meta": self.meta, "check": self.check, "tolerance": self.tolerance,
                "grid": [list(c) for c in self.grid], "trials": self.trials, "notes": self.notes,
                "sites": [{"layer": s.layer, "name": s.name, "capturable": s.capturable, "why_not": s.why_not,
                           "sensitivity": None if not s.stats else s.sensitivity,
                           "choice": "dense" if s.choice is None else {"block_size": s.choice[0],
                                                                       "top_k": s.choice[1]},
                           "grid": [{"block_size": c[0], "top_k": c[1], "out_rel_err": st.out_rel_err,
                                     "kept_mass": st.kept_mass, "density": st.density}
                                    for c, st in sorted(s.stats.items())]} for s in self.sites]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def __str__(self) -> str:
        from moba_rewrite.evaluation.policy_file import summary_lines

        return "\n".join(summary_lines(self))


def parse_grid(grid: dict[str, Sequence[int]] | None, seq_len: int) -> tuple[list[Config], list[str]]:
    """Grid points (block_size, top_k) that route at `seq_len` (top_k * block_size < seq_len)."""
    grid = {**DEFAULT_GRID, **(grid or {})}
    bad = set(grid) - set(DEFAULT_GRID)
    if bad:
        raise EvaluationError("--grid", f"expected keys block_size and top_k, got {', '.join(sorted(bad))}")
    for key, values in grid.items():
        if not values or any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in values):
            raise EvaluationError("--grid", f"expected {key}= positive whole numbers, got {list(values)}")
    points = sorted({(b, k) for b in grid["block_size"] for k in grid["top_k"]})
    routing = [(b, k) for b, k in points if b * k < seq_len]
    notes = []
    skipped = [f"{b}/{k}" for b, k in points if b * k >= seq_len]
    if skipped:
        notes.append(f"grid points skipped at {seq_len} tokens (top_k x block_size >= length, MoBA equals dense "
                     f"there): block/top_k {', '.join(skipped)}")
    if not routing:
        raise BudgetError("--grid", f"expected grid points with top_k x block_size < --seq-len {seq_len} (else MoBA "
                                    f"is dense attention); every point of block_size {grid['block_size']} x top_k "
                                    f"{grid['top_k']} covers the whole input")
    return routing, notes


def calibrate(model: nn.Module, *, seq_len: int, dense_layers: int | None = None, max_kl: float | None = None,
              grid: dict[str, Sequence[int]] | None = None, data: Any = None, prompt: str | None = None,
              samples: int = 4, tokenizer: Any = None, backend: str = "auto", progress: bool = False,
              name: str = "") -> CalibrationResult:
    """Measure every site and write a policy within the budget (exactly one of `dense_layers`, `max_kl`)."""
    if (dense_layers is None) == (max_kl is None):
        raise BudgetError("--dense-layers/--max-kl", "expected exactly one budget: --dense-layers K or --max-kl X")
    if dense_layers is not None and dense_layers < 0:
        raise BudgetError("--dense-layers", f"expected a number >= 0, got {dense_layers}")
    if max_kl is not None and not max_kl >= 0:
        raise BudgetError("--max-kl", f"expected a KL bound >= 0, got {max_kl}")
    check_length(model, seq_len, "--seq-len")
    points, notes = parse_grid(grid, seq_len)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    windows = load_windows(seq_len=seq_len, samples=samples, data=data, prompt=prompt, tokenizer=tokenizer,
                           vocab_size=vocab_size(model), random_inputs=random_windows(model, device))
    notes += windows.notes
    meta = {"tool": "moba-rewrite calibrate", "model": name or type(model).__name__,
            "model_class": type(model).__name__, "seq_len": seq_len, "data": windows.describe(),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "backend": backend,
            "budget": f"--dense-layers {dense_layers}" if dense_layers is not None else f"--max-kl {max_kl:g}"}
    bar = progress_bar(windows.count, "capturing sites", progress)
    try:
        sites = _measure(model, windows, points, seq_len, backend, bar)
    finally:
        bar.close()
    movable = [s for s in sites if s.capturable]
    if not movable:
        raise BudgetError("", "expected at least one attention site MoBA can compute; every site stays dense")
    checker = _Checker(model, windows, seq_len, progress)
    try:
        forced: set[int] = set()
        if dense_layers is not None:
            tolerance, forced = _tolerance_for_dense(movable, dense_layers)
            check = checker.run(_policy(sites, tolerance, backend, forced))
            trials = [{"tolerance": tolerance, **_brief(check)}]
        else:
            tolerance, check, trials = _tolerance_for_kl(sites, movable, max_kl, checker, backend)
    finally:
        checker.close()
    for s in sites:
        s.choice = s.pick(tolerance) if s.capturable and s.layer not in forced else None
    policy = _policy(sites, tolerance, backend, forced)
    return CalibrationResult(policy, sites, points, check, meta, tolerance, trials, notes)


def _measure(model, windows: Windows, points: list[Config], seq_len: int, backend: str, bar) -> list[SiteChoice]:
    example = None if is_hf_model(model) else sample_inputs(model, seq_len)
    found = api.find_sites(model, example)
    configs = {s.layer: points for s in found}
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    cap = capture(model, (ids.to(device) for ids in windows.ids.split(1)), configs, seq_len=seq_len,
                  backend=backend, bar=bar)
    out = []
    for row in cap.report.rows:
        seen = row.layer in cap.stats
        why = "" if seen else (row.reason if row.decision != "moba" else "not called in the capture forward")
        out.append(SiteChoice(row.layer, row.name, seen, why, cap.stats.get(row.layer, {})))
    return out


def _tolerance_for_dense(movable: list[SiteChoice], k: int) -> tuple[float, set[int]]:
    """(tolerance, the layers kept dense): the K most sensitive sites (ties: the earlier layer)."""
    if k >= len(movable):
        raise BudgetError("--dense-layers", f"expected fewer than the {len(movable)} site(s) MoBA can compute, "
                                            f"got {k}: that leaves no MoBA site")
    ranked = sorted(movable, key=lambda s: (-s.sensitivity, s.layer))
    return ranked[k].sensitivity, {s.layer for s in ranked[:k]}


def _tolerance_for_kl(sites, movable, max_kl: float, checker, backend: str):
    """Largest tolerance whose end-to-end mean KL <= max_kl, by bisection over the measured errors."""
    candidates = sorted({st.out_rel_err for s in movable for st in s.stats.values()
                         if st.out_rel_err >= min(m.sensitivity for m in movable)})
    trials: list[dict] = []
    best = None
    lo, hi = 0, len(candidates) - 1
    first = checker.run(_policy(sites, candidates[0], backend))
    trials.append({"tolerance": candidates[0], **_brief(first)})
    if first["policy_kl"]["mean"] > max_kl:
        raise BudgetError("--max-kl", f"expected a bound some policy with a MoBA site meets: the least sensitive "
                                      f"site alone, at its best grid point, already gives mean KL "
                                      f"{first['policy_kl']['mean']:.4g} > {max_kl:g}")
    best = (candidates[0], first)
    lo = 1
    while lo <= hi:
        mid = (lo + hi) // 2
        result = checker.run(_policy(sites, candidates[mid], backend))
        trials.append({"tolerance": candidates[mid], **_brief(result)})
        if result["policy_kl"]["mean"] <= max_kl:
            best, lo = (candidates[mid], result), mid + 1
        else:
            hi = mid - 1
    return best[0], best[1], trials


def _brief(check: dict) -> dict:
    return {"kl_mean": check["policy_kl"]["mean"], "kl_max": check["policy_kl"]["max"],
            "top1_agreement": check["top1_agreement"], "moba_sites": check["moba_sites"]}


def _policy(sites: list[SiteChoice], tolerance: float, backend: str, dense: set[int] = frozenset()) -> dict:
    """The policy dict for a tolerance (and sites kept `dense` whatever their errors): defaults =
    the commonest MoBA choice, rules for the rest."""
    picks = {s.layer: (s.pick(tolerance) if s.capturable and s.layer not in dense else None) for s in sites}
    chosen = [c for c in picks.values() if c is not None]
    common = max(sorted(set(chosen)), key=chosen.count) if chosen else (512, 3)
    rules: list[dict] = []
    dense = sorted(layer for layer, c in picks.items() if c is None)
    if dense:
        rules.append({"name": "calibrated-dense", "layers": dense, "mode": "dense"})
    for cfg in sorted(set(chosen) - {common}):
        layers = sorted(layer for layer, c in picks.items() if c == cfg)
        rules.append({"name": f"calibrated-b{cfg[0]}-k{cfg[1]}", "layers": layers, "block_size": cfg[0],
                      "top_k": cfg[1]})
    return {"version": 1, "description": "calibrated by moba-rewrite calibrate",
            "defaults": {"mode": "moba", "block_size": common[0], "top_k": common[1], "backend": backend,
                         "decode": "moba", "on_unsupported": "dense"},
            "rules": rules}


class _Checker:
    """End-to-end `kl` of candidate policies on the calibration windows (original logits cached when small)."""

    def __init__(self, model: nn.Module, windows: Windows, seq_len: int, progress: bool) -> None:
        self.model, self.windows, self.seq_len, self.progress = model, windows, seq_len, progress
        self.device = next((p.device for p in model.parameters()), torch.device("cpu"))
        self.twin = shared_copy(model)
        self.cache: list[torch.Tensor] | None = None
        self.bar = progress_bar(0, "checking policies end to end", progress)

    def original(self, i: int, ids: torch.Tensor) -> torch.Tensor:
        if self.cache is not None and i < len(self.cache):
            return self.cache[i]
        out = logits(self.model, ids)
        if self.cache is None:
            fits = out.numel() * out.element_size() * self.windows.count <= CACHE_BYTES
            self.cache = [] if fits else None
        if self.cache is not None:
            self.cache.append(out)
        return out

    def run(self, policy: dict) -> dict:
        example = None if is_hf_model(self.model) else sample_inputs(self.model, self.seq_len)
        api.rewrite(self.twin, load_policy(policy), example_inputs=example)
        acc = Accumulator(self.seq_len)
        self.bar.total = (self.bar.total or 0) + self.windows.count
        for i, ids in enumerate(self.windows.ids.split(1)):
            ids = ids.to(self.device)
            acc.add(ids, self.original(i, ids), logits(self.twin, ids))
            self.bar.update(1)
        out = acc.summary()
        out["moba_sites"] = sum(r.decision == "moba" for r in self.twin._moba_report.rows)
        return out

    def close(self) -> None:
        self.bar.close()
