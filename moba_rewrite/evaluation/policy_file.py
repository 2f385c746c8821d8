"""The calibrated policy as a commented YAML file: the comments record what was measured (per
site and grid point), on which data, at which length, when, and why each site got its choice,
so a reader of the policy sees the evidence beside the rules."""

from __future__ import annotations

from typing import TYPE_CHECKING

import yaml

from moba_rewrite.policy import load_policy
from moba_rewrite.policy.formats import dumps

if TYPE_CHECKING:
    from moba_rewrite.evaluation.calibrator import CalibrationResult


def _cfg(c) -> str:
    return "dense" if c is None else f"b{c[0]}/k{c[1]}"


def site_table(result: CalibrationResult) -> list[list[str]]:
    head = ["layer", "site"] + [_cfg(c) for c in result.grid] + ["kept", "density", "choice"]
    rows = [head]
    for s in result.sites:
        errs = [f"{s.stats[c].out_rel_err:.3f}" if c in s.stats else "-" for c in result.grid]
        chosen = s.stats.get(s.choice) if s.choice is not None else None
        why = _cfg(s.choice) if s.capturable else f"dense ({s.why_not})"
        rows.append([str(s.layer), s.name or "(root)", *errs,
                     f"{chosen.kept_mass:.3f}" if chosen else "-", f"{chosen.density:.3f}" if chosen else "-", why])
    return rows


def _aligned(rows: list[list[str]], prefix: str) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [(prefix + "  ".join(c.ljust(w) for c, w in zip(r, widths))).rstrip() for r in rows]


def summary_lines(result: CalibrationResult, prefix: str = "") -> list[str]:
    m, c = result.meta, result.check
    moba = sum(s.choice is not None for s in result.sites)
    lines = [f"{prefix}{m['tool']}: {m['model']} ({m['model_class']}), {len(result.sites)} attention sites, "
             f"{m['seq_len']} tokens, budget {m['budget']}, {m['date']}",
             f"{prefix}data: {m['data']}",
             f"{prefix}MoBA output error per site and grid point (||O_moba - O_dense|| / ||O_dense|| on the q/k/v "
             f"of a dense forward; block/top_k), the kept attention mass and density of the choice:"]
    lines += _aligned(site_table(result), prefix + "  ")
    lines += [f"{prefix}rule: each site takes the sparsest grid point whose error is <= {result.tolerance:.4g}, "
              f"else stays dense ({'the sensitivity of the most sensitive MoBA site' if 'dense' in m['budget'] else 'the largest tolerance that met the KL bound end to end'})",
              f"{prefix}end to end (kl on the same windows): {moba} of {len(result.sites)} sites MoBA, mean "
              f"KL(original || calibrated) {c['policy_kl']['mean']:.4g}, max {c['policy_kl']['max']:.4g}, top-1 "
              f"agreement {c['top1_agreement']:.2%}"]
    if len(result.trials) > 1:
        lines.append(f"{prefix}policies checked end to end: " + "; ".join(
            f"tol {t['tolerance']:.3g}: {t['moba_sites']} MoBA, KL {t['kl_mean']:.3g}" for t in result.trials))
    lines += [f"{prefix}note: {n}" for n in result.notes]
    return lines


def calibrated_yaml(result: CalibrationResult) -> str:
    header = ["MoBA policy written by `moba-rewrite calibrate`. What was measured:"]
    body = summary_lines(result)
    comments = ["# " + line if line else "#" for line in header + body]
    text = "\n".join(comments) + "\n\n" + dumps(result.policy, "yaml")
    if load_policy(yaml.safe_load(text)) != load_policy(result.policy):  # the comments must not change the policy
        raise AssertionError("calibrated policy file does not load as the calibrated policy")
    return text
