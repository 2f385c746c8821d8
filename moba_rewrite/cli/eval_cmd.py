"""The `eval` and `calibrate` commands: what a rewrite costs, and a policy for a budget
(docs/CLI.md). The work is in moba_rewrite.evaluation; here are flags, files and exit codes."""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path
from typing import Iterator

from moba_rewrite.cli import steps
from moba_rewrite.cli.errors import EXIT_OK, EXIT_USAGE, EXIT_VALUE, CliError, checkpoint_errors, require
from moba_rewrite.cli.output import progress_for, say

GRID_KEYS = ("block_size", "top_k")


@contextlib.contextmanager
def evaluation_errors() -> Iterator[None]:
    """Re-raise the evaluation's input errors (data, budgets, lengths) with their exit codes."""
    from moba_rewrite.evaluation.errors import EvaluationError

    try:
        yield
    except EvaluationError as exc:
        raise CliError("", str(exc), exc.exit_code) from exc


def parse_numbers(text: str | None, where: str, kind=int) -> list | None:
    if text is None:
        return None
    try:
        values = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise CliError(where, f"expected comma-separated numbers, got {text!r}", EXIT_USAGE) from None
    if not values:
        raise CliError(where, f"expected comma-separated numbers, got {text!r}", EXIT_USAGE)
    return values


def parse_grid(items: list[str] | None) -> dict[str, list[int]] | None:
    """`block_size=256,512 top_k=2,3` -> {"block_size": [256, 512], "top_k": [2, 3]}."""
    if not items:
        return None
    grid: dict[str, list[int]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or key not in GRID_KEYS:
            raise CliError("--grid", f"expected block_size=N,N,... or top_k=N,N,..., got {item!r}", EXIT_USAGE)
        numbers = parse_numbers(values, f"--grid {key}")
        if min(numbers) < 1:
            raise CliError("--grid", f"expected {key} values >= 1, got {values}", EXIT_USAGE)
        grid[key] = numbers
    return grid


def check_data_files(paths: list[str] | None) -> None:
    """Fail before the (slow) checkpoint load when a data file is missing."""
    from moba_rewrite.evaluation.errors import DataFileError

    for p in paths or []:
        if not Path(p).is_file():
            raise CliError("", str(DataFileError(p, "expected a data file (.ids token ids or text), but it "
                                                    + ("is not a file" if Path(p).exists() else "does not exist"))),
                           DataFileError.exit_code)


def check_out(path: str | None, args: argparse.Namespace) -> None:
    from moba_rewrite import checkpoints as ck

    if path and path != "-":
        with checkpoint_errors():
            ck.check_output(path, force=args.force, inputs=(args.checkpoint,))


def load_model(args: argparse.Namespace, bar):
    """(checkpoint, model on the device, tokenizer or None) for an eager model checkpoint."""
    from moba_rewrite.evaluation.data import find_tokenizer

    dev = steps.device(args.device)
    with bar.step("loading checkpoint"):
        loaded = steps.read(args)
    if loaded.kind in ("pt2", "aoti"):
        raise CliError(args.checkpoint, "expected a model checkpoint (Hugging Face directory, safetensors or pickled "
                                        "module); evaluation compares the eager model with its rewrite", EXIT_VALUE)
    with evaluation_errors():
        tokenizer = find_tokenizer(loaded.path)
    return loaded, loaded.model.to(dev).eval(), tokenizer


def check_rewritable(model, policy, seq_len: int) -> None:
    """Plan once, so a policy or model the rewrite rejects fails with its own exit code (5 or 4)."""
    steps.check_seq_len(seq_len, model)
    steps.plan(model, policy, steps.sample(model, min(seq_len, 64), next(model.parameters()).device))


def write_text(path: str, text: str, args: argparse.Namespace) -> None:
    from moba_rewrite import checkpoints as ck

    with checkpoint_errors():
        with ck.atomic_output(path, directory=False, force=args.force, inputs=(args.checkpoint,)) as tmp:
            tmp.write_text(text)


def cmd_eval(args: argparse.Namespace) -> int:
    from moba_rewrite import checkpoints as ck
    from moba_rewrite.evaluation import evaluator
    from moba_rewrite.evaluation.plot import draw_eval

    try:
        tasks = evaluator.check_tasks(args.tasks.split(","))
    except evaluator.EvaluationError as exc:
        raise CliError("", str(exc), EXIT_USAGE) from exc
    lengths = parse_numbers(args.passkey_lengths, "--passkey-lengths")
    depths = parse_numbers(args.passkey_depths, "--passkey-depths", float)
    if depths is not None and any(not 0.0 <= d <= 1.0 for d in depths):
        raise CliError("--passkey-depths", f"expected depths between 0 and 1, got {args.passkey_depths}", EXIT_USAGE)
    if args.data and args.prompt is not None:
        raise CliError("--prompt", "expected either --data or --prompt, not both", EXIT_USAGE)
    for out in (args.json, args.plot):
        check_out(out, args)
    if args.plot:
        require("matplotlib", "eval --plot")  # before minutes of evaluation, not after
    check_data_files(args.data)
    policy = steps.load_policy(args.policy) if args.policy else None
    bar = progress_for(args, 1)
    try:
        loaded, model, tokenizer = load_model(args, bar)
    finally:
        bar.close()
    if policy is None:
        if loaded.policy is None:
            raise CliError("--policy", "expected a policy file (required unless CKPT was written by "
                                       "`moba-rewrite rewrite --format hf`, which stores its policy)", EXIT_USAGE)
        policy = steps.load_policy(loaded.policy)
    check_rewritable(model, policy, args.seq_len)
    with evaluation_errors():
        result = evaluator.evaluate(
            model, policy, seq_len=args.seq_len, data=args.data, prompt=args.prompt, tasks=tasks,
            samples=args.samples, tokenizer=tokenizer, passkey_lengths=lengths,
            passkey_depths=depths or evaluator.pk.DEFAULT_DEPTHS, seed=args.seed,
            progress=not args.quiet and not args.no_progress, name=Path(args.checkpoint).name)
    result.data["checkpoint"] = str(args.checkpoint)
    if args.json == "-":
        print(result.to_json())
    else:
        say(str(result), quiet=args.quiet)
        if args.json:
            write_text(args.json, result.to_json() + "\n", args)
            say(f"wrote {args.json}", quiet=args.quiet)
    if args.plot:
        with checkpoint_errors():
            with ck.atomic_output(args.plot, directory=False, force=args.force, inputs=(args.checkpoint,)) as tmp:
                draw_eval(result.data, tmp)
        say(f"wrote {args.plot}", quiet=args.quiet)
    return EXIT_OK


def cmd_calibrate(args: argparse.Namespace) -> int:
    from moba_rewrite.evaluation import calibrator

    if Path(args.out).suffix.lower() not in (".yaml", ".yml"):
        raise CliError("--out", f"expected a .yaml or .yml path (the policy's comments record the measurements), "
                                f"got {args.out}", EXIT_VALUE)
    grid = parse_grid(args.grid)
    if args.data and args.prompt is not None:
        raise CliError("--prompt", "expected either --data or --prompt, not both", EXIT_USAGE)
    for out in (args.out, args.json):
        check_out(out, args)
    check_data_files(args.data)
    bar = progress_for(args, 1)
    try:
        _loaded, model, tokenizer = load_model(args, bar)
    finally:
        bar.close()
    steps.check_seq_len(args.seq_len, model)
    with evaluation_errors():
        result = calibrator.calibrate(
            model, seq_len=args.seq_len, dense_layers=args.dense_layers, max_kl=args.max_kl, grid=grid,
            data=args.data, prompt=args.prompt, samples=args.samples, tokenizer=tokenizer, backend=args.backend,
            progress=not args.quiet and not args.no_progress, name=Path(args.checkpoint).name)
    text = result.to_yaml()
    write_text(args.out, text, args)
    if args.json:
        write_text(args.json, result.to_json() + "\n", args)
    say(str(result), quiet=args.quiet)
    moba = sum(s.choice is not None for s in result.sites)
    say(f"\nwrote {args.out}: {moba} of {len(result.sites)} attention sites MoBA. Check it: moba-rewrite eval "
        f"{args.checkpoint} --policy {args.out} --seq-len {args.seq_len}", quiet=args.quiet)
    return EXIT_OK


# --------------------------------------------------------------------------- parsers (added by cli/parser.py)

def _add_data(p: argparse.ArgumentParser, positive) -> None:
    p.add_argument("--seq-len", type=positive, required=True, metavar="N", help="tokens per window (required)")
    p.add_argument("--data", nargs="+", metavar="FILE",
                   help=".ids files (whitespace-separated integer token ids) or text files (read with the "
                        "checkpoint's tokenizer), concatenated; default: random token ids (said so)")
    p.add_argument("--prompt", metavar="TEXT", help="evaluate on this text (needs the checkpoint's tokenizer)")
    p.add_argument("--samples", type=positive, default=4, metavar="S",
                   help="windows: the first S non-overlapping windows of --seq-len tokens (default 4)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")


def add_eval_parser(sub, leaves, leaf, add_input, add_force, positive) -> None:
    p = leaf(sub, "eval", cmd_eval, leaves, help="compare a checkpoint with its MoBA rewrite (kl, ppl, sites, passkey)",
             description="Compare the rewritten model with the original on the same inputs: KL of next-token "
                         "distributions and top-1 agreement (kl), perplexity of both (ppl), per-site MoBA error and "
                         "kept attention mass on a dense forward's q/k/v (sites), passkey retrieval per depth "
                         "(passkey). Prints a table; --json and --plot write files.")
    add_input(p)
    p.add_argument("--policy", metavar="POLICY",
                   help="policy file (default: the one stored in a checkpoint written by `rewrite --format hf`)")
    _add_data(p, positive)
    p.add_argument("--tasks", default="kl,ppl,sites,passkey", metavar="T,T",
                   help="any of kl,ppl,sites,passkey (default all)")
    p.add_argument("--passkey-lengths", metavar="N,N", help="passkey prompt lengths (default --seq-len)")
    p.add_argument("--passkey-depths", metavar="D,D", help="needle depths in [0, 1] (default 0,0.25,0.5,0.75,1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the passkey prompts (default 0)")
    p.add_argument("--json", metavar="OUT.json", help="also write the results as JSON ('-': JSON on stdout instead "
                                                      "of the table)")
    p.add_argument("--plot", metavar="OUT.png", help="draw passkey heat maps, per-site errors and KL by position")
    add_force(p, "the --json / --plot files")


def _kl_bound(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a KL bound >= 0, got {text}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value}")
    return value


def add_calibrate_parser(sub, leaves, leaf, add_input, add_force, positive) -> None:
    p = leaf(sub, "calibrate", cmd_calibrate, leaves, help="write a per-site policy for a budget from measured "
                                                            "sensitivity",
             description="Measure every attention site's MoBA error at every grid point on the q/k/v of one dense "
                         "forward, keep the most sensitive sites dense, pick block size / top-k per site within the "
                         "budget, check the policy end to end with the kl task, and write it (YAML) with the "
                         "measurements as comments.")
    add_input(p)
    _add_data(p, positive)
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--dense-layers", type=_count, metavar="K", help="keep the K most sensitive sites dense")
    budget.add_argument("--max-kl", type=_kl_bound, metavar="X",
                        help="the sparsest policy whose mean KL(original || rewritten) is at most X")
    p.add_argument("--grid", nargs="+", metavar="KEY=N,N",
                   help="grid points: block_size=256,512,1024 top_k=2,3,4,8 (the default)")
    p.add_argument("--backend", default="auto", choices=["auto", "reference", "torch", "triton", "flash_attn"],
                   help="backend written into the policy and used for the checks (default auto)")
    p.add_argument("--out", required=True, metavar="POLICY.yaml", help="where to write the policy")
    p.add_argument("--json", metavar="OUT.json", help="also write every measurement as JSON")
    add_force(p, "--out / --json")
