"""Text tables of evaluation and calibration results (what the commands print)."""

from __future__ import annotations


def _fmt(x, digits: int = 4) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return str(x)


def aligned(rows: list[list[str]], indent: str = "  ") -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = [indent + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    out.insert(1, indent + "  ".join("-" * w for w in widths))
    return out


def eval_table(d: dict) -> str:
    rows = d["report"]["sites"]
    moba = sum(r["decision"] == "moba" for r in rows)
    lines = [f"moba-rewrite eval: {d['model']} ({d['model_class']}), {moba} of {len(rows)} attention sites MoBA, "
             f"{d['seq_len']} tokens, {d['device']} {d['dtype']}"]
    if "data" in d:
        lines.append(f"data: {d['data']['description']}")
    if "policy_kl" in d:
        kl = d["policy_kl"]
        lines += ["", "next-token distributions (kl), over "
                  f"{kl['positions']} positions:",
                  f"  KL(original || rewritten)  mean {_fmt(kl['mean'])}  p99 {_fmt(kl['p99'])}  max {_fmt(kl['max'])}",
                  f"  top-1 agreement            {d['top1_agreement']:.2%}"]
    if "ppl" in d:
        p = d["ppl"]
        lines += ["", f"perplexity (ppl), over {p['tokens']} predicted tokens:",
                  f"  original {_fmt(p['original'], 6)}   rewritten {_fmt(p['rewritten'], 6)}   "
                  f"({(p['ratio'] - 1) * 100:+.2f}%)"]
    if "sites" in d:
        table = [["layer", "site", "decision", "block", "top_k", "out_rel_err", "kept_mass", "density"]]
        for s in d["sites"]:
            table.append([str(s["layer"]), s["name"] or "(root)", s["decision"], _fmt(s["block_size"]),
                          _fmt(s["top_k"]), _fmt(s["out_rel_err"], 3), _fmt(s["kept_mass"], 4),
                          _fmt(s["density"], 3)])
        lines += ["", "sites: MoBA vs dense attention on the q/k/v of a dense forward (out_rel_err = ||O_moba - "
                      "O_dense|| / ||O_dense||; kept_mass = dense attention mass inside the attended blocks; "
                      "density = attended / visible (query, key) pairs)"]
        lines += aligned(table)
    if "passkey" in d:
        p = d["passkey"]
        lines += ["", f"passkey: {p['measured']}; {p['samples']} prompt(s) per cell, format: {p['format']}"]
        table = [["length", "depth", "original", "rewritten"]]
        for li, length in enumerate(p["lengths"]):
            for di, depth in enumerate(p["depths"]):
                table.append([str(length), f"{depth:.2f}", f"{p['original'][li][di]:.0%}",
                              f"{p['rewritten'][li][di]:.0%}"])
        table.append(["all", "", f"{p['mean']['original']:.0%}", f"{p['mean']['rewritten']:.0%}"])
        lines += aligned(table)
    if d.get("notes"):
        lines += ["", "notes:"] + [f"  - {n}" for n in d["notes"]]
    return "\n".join(lines)
