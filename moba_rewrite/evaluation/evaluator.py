"""`evaluate`: what a MoBA rewrite does to a model, measured against the original on the same inputs.

Tasks (any subset, in this order): `kl` (KL(original || rewritten) of next-token
distributions, top-1 agreement), `ppl` (perplexity of both), `sites` (per attention site:
MoBA's output error and kept attention mass on the q / k / v of a dense forward), `passkey`
(retrieval of a key at several depths, accuracy per depth for both). `kl` and `ppl` share one
forward of each model per window. The result is a table (`str()`) and JSON (`to_json()`).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from moba_rewrite.evaluation import passkey as pk
from moba_rewrite.evaluation.data import Windows, load_windows
from moba_rewrite.evaluation.errors import EvaluationError
from moba_rewrite.evaluation.kl import Accumulator
from moba_rewrite.evaluation.models import logits, max_positions, random_windows, rewritten_copy
from moba_rewrite.exporters.common import vocab_size
from moba_rewrite.evaluation.progress import bar as progress_bar
from moba_rewrite.evaluation.sites import capture
from moba_rewrite.policy import load_policy

TASKS = ("kl", "ppl", "sites", "passkey")
PASSKEY_SOLVED = 0.5  # below this the original does not solve passkey, and the comparison says nothing


@dataclass
class EvalResult:
    """Everything measured (`data`, the JSON document) and how to show it."""

    data: dict
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(self.data, indent=2)

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def __str__(self) -> str:
        from moba_rewrite.evaluation.tables import eval_table

        return eval_table(self.data)


def check_tasks(tasks: Sequence[str]) -> list[str]:
    tasks = [t.strip() for t in tasks if t.strip()]
    bad = [t for t in tasks if t not in TASKS]
    if bad or not tasks:
        raise EvaluationError("--tasks", f"expected a comma-separated subset of {','.join(TASKS)}, got "
                                         f"{','.join(tasks) or 'nothing'}")
    return [t for t in TASKS if t in tasks]


def check_length(model: nn.Module, length: int, where: str) -> None:
    """A length the model can run: positive and within its position limit."""
    limit = max_positions(model)
    if length < 2:
        raise EvaluationError(where, f"expected at least 2 tokens, got {length}")
    if limit is not None and length > limit:
        raise EvaluationError(where, f"expected at most the model's {limit} positions, got {length}")


def evaluate(model: nn.Module | str | os.PathLike, policy: Any = None, *, seq_len: int, data: Any = None,
             prompt: str | None = None, tasks: Sequence[str] = TASKS, samples: int = 4, tokenizer: Any = None,
             passkey_lengths: Sequence[int] | None = None, passkey_depths: Sequence[float] = pk.DEFAULT_DEPTHS,
             passkey_key_len: int = 4, seed: int = 0, progress: bool = False, name: str = "") -> EvalResult:
    """Compare `model` (the original, left untouched) with its rewrite by `policy` on the same inputs.

    `model` may be a checkpoint path (read like `mr.load`, dense; its tokenizer and, for a
    directory written by `rewrite --format hf`, its stored policy are used when not given).
    `data`: paths (`.ids` token ids or text read with `tokenizer`) or a tensor of ids; without
    it (and without `prompt`) random ids, said so in the notes. Samples are the first `samples`
    consecutive non-overlapping windows of `seq_len` tokens. Passkey runs at `passkey_lengths`
    (default `[seq_len]`) and `passkey_depths`, `samples` prompts each.
    """
    tasks = check_tasks(tasks)
    if isinstance(model, (str, os.PathLike)):
        model, policy, tokenizer, name = _open(model, policy, tokenizer, name)
    if policy is None:
        raise EvaluationError("--policy", "expected a policy (a file, a dict or a Policy)")
    policy = load_policy(policy)
    check_length(model, seq_len, "--seq-len")
    for n in passkey_lengths or []:
        check_length(model, n, "--passkey-lengths")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    started = time.perf_counter()
    windows = None
    if {"kl", "ppl", "sites"} & set(tasks):
        windows = load_windows(seq_len=seq_len, samples=samples, data=data, prompt=prompt, tokenizer=tokenizer,
                               vocab_size=vocab_size(model), random_inputs=random_windows(model, device))
    rewritten = rewritten_copy(model, policy, seq_len)
    doc = _header(model, name, policy, rewritten._moba_report, tasks, seq_len, samples, seed, device)
    notes = _routing_notes(rewritten._moba_report, seq_len, passkey_lengths if "passkey" in tasks else None)
    if windows is not None:
        notes += windows.notes
        doc["data"] = {"source": windows.source, "files": windows.files, "tokens": windows.tokens,
                       "windows": windows.count, "description": windows.describe()}
    lengths = list(passkey_lengths or [seq_len])
    work = (2 * windows.count if {"kl", "ppl"} & set(tasks) else 0) + (windows.count if "sites" in tasks else 0) \
        + (2 * len(lengths) * len(passkey_depths) * samples if "passkey" in tasks else 0)
    bar = progress_bar(work, "evaluating", progress)
    seconds: dict[str, float] = {}
    try:
        if {"kl", "ppl"} & set(tasks):
            t0 = time.perf_counter()
            summary = _compare(model, rewritten, windows, device, bar)
            if "kl" in tasks:
                doc.update({k: summary[k] for k in ("policy_kl", "top1_agreement", "kl_by_position")})
            if "ppl" in tasks:
                doc["ppl"] = summary["ppl"]
            seconds["+".join(t for t in ("kl", "ppl") if t in tasks)] = time.perf_counter() - t0
        if "sites" in tasks:
            t0 = time.perf_counter()
            doc["sites"], site_notes = _sites(model, rewritten._moba_report, windows, device, seq_len, bar)
            notes += site_notes
            seconds["sites"] = time.perf_counter() - t0
        if "passkey" in tasks:
            t0 = time.perf_counter()
            doc["passkey"], pk_notes = _passkey(model, rewritten, lengths, list(passkey_depths), samples, tokenizer,
                                                vocab_size(model), passkey_key_len, seed, device, bar)
            notes += pk_notes
            seconds["passkey"] = time.perf_counter() - t0
    finally:
        bar.close()
    seconds["total"] = time.perf_counter() - started
    doc["seconds"] = {k: round(v, 3) for k, v in seconds.items()}
    doc["notes"] = notes
    return EvalResult(doc, notes)


def _open(path, policy, tokenizer, name):
    """A checkpoint path: (dense model, policy or the stored one, tokenizer or its own, name)."""
    from pathlib import Path

    from moba_rewrite.checkpoints import read_checkpoint
    from moba_rewrite.evaluation.data import find_tokenizer

    ck = read_checkpoint(path)
    if not isinstance(ck.model, nn.Module):
        raise EvaluationError(path, "expected a model checkpoint (Hugging Face directory, safetensors or pickled "
                                    "module); evaluation compares the eager model with its rewrite")
    return (ck.model, policy if policy is not None else ck.policy,
            tokenizer if tokenizer is not None else find_tokenizer(path), name or Path(path).name)


def _header(model, name, policy, report, tasks, seq_len, samples, seed, device) -> dict[str, Any]:
    return {
        "tool": "moba-rewrite eval", "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": name or type(model).__name__, "model_class": type(model).__name__, "seq_len": seq_len,
        "samples": samples, "seed": seed, "device": str(device),
        "dtype": str(next((p.dtype for p in model.parameters()), torch.float32)).replace("torch.", ""),
        "tasks": tasks, "policy": policy.to_dict(), "report": report.to_dict(),
    }


def _routing_notes(report, seq_len: int, passkey_lengths) -> list[str]:
    notes = []
    moba = [r for r in report.rows if r.decision == "moba"]
    if not moba:
        notes.append("the policy leaves every site dense: the rewritten model is the original (nothing to measure)")
    longest = max([seq_len, *(passkey_lengths or [])])
    idle = [r for r in moba if r.top_k * r.block_size >= longest]
    if idle:
        notes.append(f"{len(idle)} MoBA site(s) attend every block at {longest} tokens (top_k x block_size >= "
                     f"length): there MoBA equals dense attention; use longer inputs to see routing")
    for r in report.rows:
        if r.requested == "moba" and r.decision != "moba":
            notes.append(f"site {r.name or '(root)'} (layer {r.layer}) stays dense: {r.reason}")
    return notes


def _compare(model, rewritten, windows: Windows, device, bar) -> dict:
    acc = Accumulator(windows.ids.shape[1])
    for ids in windows.ids.split(1):
        ids = ids.to(device)
        original = logits(model, ids)
        bar.update(1)
        moba = logits(rewritten, ids)
        bar.update(1)
        acc.add(ids, original, moba)
    return acc.summary()


def _sites(model, report, windows: Windows, device, seq_len: int, bar) -> tuple[list[dict], list[str]]:
    configs = {r.layer: [(int(r.block_size), int(r.top_k))] for r in report.rows if r.decision == "moba"}
    notes = []
    cap = capture(model, (ids.to(device) for ids in windows.ids.split(1)), configs, seq_len=seq_len, bar=bar) \
        if configs else None
    rows = []
    for r in report.rows:
        row = {"name": r.name, "layer": r.layer, "decision": r.decision, "block_size": r.block_size,
               "top_k": r.top_k}
        if r.decision != "moba":
            row.update(out_rel_err=0.0, kept_mass=1.0, density=1.0, measured=False,
                       why="dense: computes the original attention exactly")
        elif cap is None or r.layer not in cap.stats:
            row.update(out_rel_err=None, kept_mass=None, density=None, measured=False,
                       why="not captured in the dense forward")
            notes.append(f"site {r.name} (layer {r.layer}) was not seen in the capture forward; not measured")
        else:
            st = cap.stats[r.layer][(int(r.block_size), int(r.top_k))]
            row.update(out_rel_err=st.out_rel_err, kept_mass=st.kept_mass, density=st.density, measured=True,
                       calls=cap.calls.get(r.layer, 0))
        rows.append(row)
    return rows, notes


def _passkey(model, rewritten, lengths: list[int], depths: list[float], count: int, tokenizer, vocab, key_len: int,
             seed: int, device, bar) -> tuple[dict, list[str]]:
    if tokenizer is None:
        pk.ids_layout(vocab or 0, key_len)  # raises if the vocabulary is too small for the ids format
    acc = {"original": [], "rewritten": []}
    for length in lengths:
        grid = pk.samples(length, depths, count, vocab_size=vocab or 0, tokenizer=tokenizer, key_len=key_len,
                          seed=seed)
        rows = {"original": [], "rewritten": []}
        for per_depth in grid:
            hits = {"original": 0, "rewritten": 0}
            for s in per_depth:
                ids = s.input_ids[None].to(device)
                for which, m in (("original", model), ("rewritten", rewritten)):
                    hits[which] += pk.retrieved(logits(m, ids)[0], s)
                    bar.update(1)
            for which in rows:
                rows[which].append(hits[which] / count)
        for which in acc:
            acc[which].append(rows[which])
    fmt = "text (needle sentence in filler text, 5-digit key)" if tokenizer is not None else \
        f"token ids (MARK + {key_len} key ids at the depth, MARK at the end; see moba_rewrite.evaluation.passkey)"
    mean = lambda m: sum(map(sum, m)) / max(1, sum(map(len, m)))  # noqa: E731
    out = {"lengths": lengths, "depths": depths, "samples": count, "format": fmt,
           "measured": "fraction of prompts whose whole key the model reproduces by greedy decoding "
                       "(teacher-forced argmax over the answer tokens)",
           "original": acc["original"], "rewritten": acc["rewritten"],
           "mean": {"original": mean(acc["original"]), "rewritten": mean(acc["rewritten"])}}
    notes = []
    if out["mean"]["original"] < PASSKEY_SOLVED:
        out["meaningful"] = False
        notes.append(f"passkey: the original model retrieves the key in only {out['mean']['original']:.0%} of "
                     "prompts, so this task cannot show what MoBA costs here (a random-weight or untrained model "
                     "scores about 0 with either attention)")
    else:
        out["meaningful"] = True
    return out, notes
