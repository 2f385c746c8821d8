"""`RewriteReport`: one row per attention site, saying what it became and why.

Every entry point (`rewrite`, `plan`, `export_with_report`, `compile`) produces one. It
prints as an aligned table (`str(report)`), serialises to JSON (`report.to_json()`), and
carries the policy's warnings (e.g. a rule that matched no site) in `report.warnings`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

from passes.sites import AttentionSite


@dataclass
class ReportRow:
    """One attention site and what the rewrite did with it."""

    name: str
    module_class: str
    layer: int
    kind: str
    num_heads: int | None
    num_kv_heads: int | None
    head_dim: int | None
    causal: bool | None
    mask_kind: str
    decision: str  # "moba" | "dense": what the site computes now
    block_size: int | None
    top_k: int | None
    backend: str | None
    decode: str | None
    reason: str
    requested: str = ""  # what the policy asked for ("moba" | "dense")
    matched_rules: list[str] = field(default_factory=list)
    dense_below: int | None = None  # MoBA sites: full attention for calls with fewer keys (policy)

    @classmethod
    def build(cls, site: AttentionSite, decision: Any, applied: str, reason: str) -> "ReportRow":
        moba = applied == "moba"
        dense_below = getattr(decision, "dense_below", None) if moba else None
        if dense_below:
            reason += f"; full attention when Tk < {dense_below} (dense_below: a change of semantics)"
        return cls(
            name=site.name, module_class=site.module_class, layer=site.layer, kind=site.kind,
            num_heads=site.num_heads, num_kv_heads=site.num_kv_heads, head_dim=site.head_dim,
            causal=site.causal, mask_kind=site.mask_kind, decision=applied,
            block_size=int(decision.block_size) if moba else None,
            top_k=int(decision.top_k) if moba else None,
            backend=str(decision.backend) if moba else None,
            decode=str(getattr(decision, "decode", "moba")) if moba else None,
            reason=reason, requested=str(decision.mode),
            matched_rules=[str(r) for r in (getattr(decision, "matched_rules", None) or [])],
            dense_below=int(dense_below) if dense_below else None,
        )


_COLUMNS = (
    ("layer", "layer"), ("name", "site"), ("module_class", "class"), ("kind", "kind"),
    ("num_heads", "heads"), ("num_kv_heads", "kv"), ("mask_kind", "mask"), ("decision", "decision"),
    ("block_size", "block"), ("top_k", "top_k"), ("backend", "backend"), ("decode", "decode"),
    ("reason", "reason"),
)


@dataclass
class RewriteReport:
    """Rows per site (in layer order) plus warnings; `str()` is a table, `to_json()` JSON."""

    rows: list[ReportRow] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    graph: str = ""  # which graph the sites were found in: "hf", "export", "dynamo", "symbolic_trace", ...

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[ReportRow]:
        return iter(self.rows)

    def __getitem__(self, key: int | str) -> ReportRow:
        if isinstance(key, int):
            return self.rows[key]
        for r in self.rows:
            if r.name == key:
                return r
        raise KeyError(f"no attention site named {key!r}; sites: {', '.join(r.name for r in self.rows)}")

    @property
    def moba_sites(self) -> list[str]:
        return [r.name for r in self.rows if r.decision == "moba"]

    @property
    def dense_sites(self) -> list[str]:
        return [r.name for r in self.rows if r.decision != "moba"]

    def to_dict(self) -> dict[str, Any]:
        return {"graph": self.graph, "sites": [asdict(r) for r in self.rows], "warnings": list(self.warnings)}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RewriteReport":
        return cls(rows=[ReportRow(**r) for r in data.get("sites", [])], warnings=list(data.get("warnings", [])),
                   graph=data.get("graph", ""))

    def __str__(self) -> str:
        columns = _COLUMNS
        if any(r.dense_below for r in self.rows):  # shown only when a policy uses it
            at = [k for k, _ in columns].index("decode") + 1
            columns = (*columns[:at], ("dense_below", "dense_below"), *columns[at:])
        header = [title for _, title in columns]
        body = [["-" if getattr(r, k) is None else str(getattr(r, k)) for k, _ in columns] for r in self.rows]
        widths = [max(len(h), *(len(row[i]) for row in body)) if body else len(h) for i, h in enumerate(header)]
        lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
        lines.append("  ".join("-" * w for w in widths))
        lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in body]
        n_moba = sum(r.decision == "moba" for r in self.rows)
        lines.append(f"{len(self.rows)} attention sites: {n_moba} MoBA, {len(self.rows) - n_moba} dense")
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)

    __repr__ = __str__
