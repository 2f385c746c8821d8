"""The starter policy `moba-rewrite policy init` writes for one model.

A commented YAML file: every attention site found (layer, name, class, shape), MoBA block
512 / top-3 as the defaults, and the MoBA paper's layer-wise hybrid (the last 3 attention
layers dense) as the one active rule, plus commented examples built from the model's own
module names, so editing it is easier than starting from the reference.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from passes.sites import AttentionSite

HYBRID_DENSE_TAIL = 3  # the paper keeps the last 3 layers full attention (layer-wise hybrid)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _quote(text: str) -> str:
    """A YAML single-quoted scalar: no escapes, so regexes stay readable."""
    return "'" + _one_line(text).replace("'", "''") + "'"


def _site_row(site: AttentionSite) -> list[str]:
    shape = []
    if site.num_heads is not None:
        kv = f"/{site.num_kv_heads} kv" if site.num_kv_heads not in (None, site.num_heads) else ""
        shape.append(f"heads {site.num_heads}{kv}")
    if site.head_dim is not None:
        shape.append(f"head_dim {site.head_dim}")
    if site.causal is not None:
        shape.append("causal" if site.causal else "non-causal")
    if site.mask_kind not in ("none", None):
        shape.append(f"mask {site.mask_kind}")
    return [str(site.layer), _one_line(site.name) or "(root)", _one_line(site.module_class),
            site.kind, ", ".join(shape)]


def _site_table(sites: list[AttentionSite]) -> list[str]:
    rows = [["layer", "module", "class", "kind", "shape"]] + [_site_row(s) for s in sites]
    widths = [max(len(r[c]) for r in rows) for c in range(4)]
    return ["#   " + "  ".join(r[c].ljust(widths[c]) if c < 4 else r[c] for c in range(5)).rstrip()
            for r in rows]


def starter_yaml(sites: list[AttentionSite], model_name: str = "") -> str:
    sites = sorted(sites, key=lambda s: s.layer)
    n = max((s.layer for s in sites), default=-1) + 1
    title = f" for {_one_line(model_name)}" if model_name else ""
    out = [
        f"# MoBA rewrite policy{title}.",
        "# Written by `moba-rewrite policy init`; check it with `moba-rewrite policy check`.",
        "# Format reference: docs/POLICY.md. Precedence: every site starts from `defaults`, then",
        "# every rule that selects it applies in file order; a later rule overrides an earlier",
        "# one field by field.",
        "#",
    ]
    if sites:
        out += [f"# Attention sites found: {len(sites)} (layer = ordinal among attention sites)."]
        out += _site_table(sites)
    else:
        out += ["# No attention site was found in this model: nothing would be rewritten."]
    out += [
        "",
        "version: 1",
        "strict: false          # true: warnings (e.g. a rule that selects no site) become errors",
        "",
        "defaults:",
        "  mode: moba           # moba | dense (dense keeps the original attention, bit for bit)",
        "  block_size: 512      # keys per block (paper: 512 at 8K context, 4096 at 1M)",
        "  top_k: 3             # blocks per query, counting its own block (top-3 = own + 2)",
        "  backend: auto        # auto | reference | torch | triton | flash_attn",
        "  decode: moba         # moba | dense: what single-token decode steps (Tq == 1) use",
        "  on_unsupported: dense  # dense (kept dense, reported) | error",
        "",
    ]
    note = "  # Layer-wise hybrid (MoBA paper): the last 3 attention layers stay full attention."
    tail = ["  - name: dense-tail", f'    layers: "-{HYBRID_DENSE_TAIL}:"', "    mode: dense"]
    if n > HYBRID_DENSE_TAIL:
        out += ["rules:", note, *tail]
        more = "  # More rules, for example (uncomment and edit):"
    else:
        out += [f"# This model has only {n} attention layer(s), so the paper's dense tail (last",
                f"# {HYBRID_DENSE_TAIL} layers dense) would leave no MoBA layer: it is commented out.",
                "# To add rules, replace `rules: []` by `rules:` and uncomment some below.",
                "rules: []", note, *(line[:2] + "# " + line[2:] for line in tail)]
        more = "  # More rules, for example:"
    example = sites[0] if sites else None
    name = example.name if example and example.name else "model.layers.0.self_attn"
    cls = example.module_class if example else "LlamaAttention"
    glob = re.sub(r"\.\d+(\.|$)", r".*\1", name, count=1)
    regex = "re:" + re.escape(name).replace(r"\.0\.", r"\.(0|1)\.", 1)
    out += [
        "",
        more,
        f"  # - match: {_quote(name)}    # one module by its full name",
        "  #   mode: dense",
        f"  # - match: {_quote(glob)}    # glob: * matches any characters, dots included",
        "  #   block_size: 1024",
        f"  # - match: {_quote(regex)}    # re: = Python regular expression, full match",
        "  #   top_k: 4",
        f"  # - class: {_quote(cls)}    # every module of this class",
        "  #   backend: torch",
        "  # - layers: [0, 1]    # layer indices, or slices such as \"0:4\", \"::2\", \"-3:\"",
        "  #   ignore: \"re:.*cross.*\"    # ...except these module names",
        "  #   decode: dense",
    ]
    return "\n".join(out) + "\n"
