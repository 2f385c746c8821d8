"""The `policy init | check | schema` commands."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from moba_rewrite.cli import steps
from moba_rewrite.cli.errors import EXIT_OK, EXIT_USAGE, CliError, checkpoint_errors, rewrite_error
from moba_rewrite.cli.inspect_cmd import discover
from moba_rewrite.cli.output import print_report, say


def _write_text(args: argparse.Namespace, text: str, inputs: tuple = ()) -> bool:
    """`text` to standard output (no --out; False) or atomically to `args.out` (True)."""
    from moba_rewrite import checkpoints as ck

    if not args.out:
        sys.stdout.write(text)
        return False
    with checkpoint_errors(), ck.atomic_output(args.out, directory=False, force=args.force, inputs=inputs) as tmp:
        tmp.write_text(text)
    return True


def cmd_policy_init(args: argparse.Namespace) -> int:
    from moba_rewrite import checkpoints as ck
    from moba_rewrite.policy import starter_policy_yaml

    if args.out:
        with checkpoint_errors():
            ck.check_output(args.out, force=args.force, inputs=(args.checkpoint,))
    _, sites = discover(args)
    if _write_text(args, starter_policy_yaml(sites, Path(args.checkpoint).name), inputs=(args.checkpoint,)):
        say(f"wrote {args.out}: starter policy for {len(sites)} attention sites", quiet=args.quiet)
    return EXIT_OK


def cmd_policy_check(args: argparse.Namespace) -> int:
    policy = steps.load_policy(args.policy)
    if args.model_positional and args.model and args.model_positional != args.model:
        raise CliError("policy check", f"expected one checkpoint, got {args.model_positional} and --model {args.model}",
                       EXIT_USAGE)
    args.model = args.model or args.model_positional
    if not args.model:
        say(f"{args.policy}: valid policy ({len(policy.rules)} rules)", quiet=args.quiet)
        return EXIT_OK
    args.checkpoint = args.model
    loaded = steps.read(args)
    n = args.seq_len or steps.default_seq_len(loaded.model, policy)
    steps.check_seq_len(n, loaded.model)
    if loaded.kind == "pt2":
        from moba_rewrite.api import rewrite_exported

        try:
            _, report = rewrite_exported(loaded.model, policy)  # the loaded copy only
        except Exception as exc:
            raise rewrite_error(exc) from exc
    else:
        report = steps.plan(loaded.model, policy, steps.sample(loaded.model, n))
    if args.json:
        print(report.to_json())
    else:
        say(f"{args.policy}: valid policy ({len(policy.rules)} rules); decisions for {args.model}:", quiet=args.quiet)
        print_report(report, blank_line=False)
    return EXIT_OK


def cmd_policy_schema(args: argparse.Namespace) -> int:
    from moba_rewrite.policy import policy_schema

    if _write_text(args, json.dumps(policy_schema(), indent=2) + "\n"):
        say(f"wrote {args.out}", quiet=args.quiet)
    return EXIT_OK
