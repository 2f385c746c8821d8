"""The `rewrite` command: read, rewrite per the policy, write the artifact atomically, load it
back and compare (docs/CLI.md, `rewrite`). `run_rewrite` is the command as a function (`demo`)."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moba_rewrite.cli import artifacts, generation_artifact, steps
from moba_rewrite.cli.artifacts import FORMATS
from moba_rewrite.cli.errors import (EXIT_ARCHITECTURE, EXIT_CHECKPOINT, EXIT_EXPORT, EXIT_OK, EXIT_USAGE,
                                     EXIT_VALUE, CliError, checkpoint_errors, first_line, rewrite_error)
from moba_rewrite.cli.output import Progress, human, print_report, say, size


@dataclass
class RewriteResult:
    """What `run_rewrite` did: the report, the artifact, the verification and the timings."""

    report: Any
    out: Path
    fmt: str
    seq_len: int
    max_diff: float | None
    timings: list[tuple[str, float]]
    model: Any = None  # the in-memory rewritten model (eager), for callers that continue


def cmd_rewrite(args: argparse.Namespace) -> int:
    run_rewrite(args.checkpoint, args.policy, args.out, fmt=args.format, seq_len=args.seq_len,
                dynamic=args.dynamic, device=args.device, force=args.force, verify=not args.no_verify,
                config=args.config, trust_pickle=args.trust_pickle, trust_remote_code=args.trust_remote_code,
                allow_random_init=args.allow_random_init, dtype=args.dtype, quiet=args.quiet,
                progress=not args.no_progress, report_json=args.report_json, onnx_body=args.onnx_body,
                generate=args.generate, max_seq_len=args.max_seq_len, batch=args.batch)
    return EXIT_OK


def run_rewrite(checkpoint: str | os.PathLike, policy_path: str | os.PathLike | dict, out: str | os.PathLike, *,
                fmt: str = "hf", seq_len: int | None = None, dynamic: bool = False, device: str = "cpu",
                force: bool = False, verify: bool = True, config: str | None = None, trust_pickle: bool = False,
                trust_remote_code: bool = False, allow_random_init: bool = False, dtype: str | None = None,
                quiet: bool = False, progress: bool = True, report_json: str | None = None,
                onnx_body: str = "sparse", generate: bool = False, max_seq_len: int | None = None,
                batch: int = 1) -> RewriteResult:
    """The `rewrite` command as a function (also used by `demo`)."""
    from moba_rewrite import checkpoints as ck

    if fmt not in FORMATS:
        raise CliError("--format", f"expected one of {', '.join(FORMATS)}, got {fmt!r}", EXIT_USAGE)
    out = Path(out)
    if not (generate and fmt == "onnx"):  # ONNX generation programs are a folder
        artifacts.check_out_suffix(fmt, out)
    generation_artifact.check_request(fmt, generate, max_seq_len, batch, dynamic)
    policy = steps.load_policy(policy_path)
    dev = steps.device(device)
    with checkpoint_errors():
        ck.check_output(out, force=force, inputs=(checkpoint,))
    bar = Progress(4 + (1 if verify else 0) + (1 if generate else 0), enabled=progress and not quiet)
    ns = argparse.Namespace(checkpoint=checkpoint, config=config, trust_pickle=trust_pickle,
                            trust_remote_code=trust_remote_code, allow_random_init=allow_random_init, dtype=dtype)
    job = dict(fmt=fmt, seq_len=seq_len, dynamic=dynamic, dev=dev, force=force, verify=verify, quiet=quiet,
               bar=bar, checkpoint=checkpoint, onnx_body=onnx_body)
    try:
        with checkpoint_errors():
            with bar.step("loading checkpoint"):
                loaded = steps.read(ns)
            if loaded.kind == "aoti":
                raise CliError(checkpoint, "expected a model or a .pt2 program; an AOTInductor package is compiled "
                                           "code and cannot be rewritten", EXIT_ARCHITECTURE)
            if generate:
                report, n, diff, model = generation_artifact.rewrite_for_generation(
                    loaded, policy, out, fmt=fmt, max_seq_len=max_seq_len, batch=batch, seq_len=seq_len, dev=dev,
                    force=force, verify=verify, quiet=quiet, bar=bar, checkpoint=checkpoint)
            else:
                rewrite = _rewrite_program if loaded.kind == "pt2" else _rewrite_eager
                report, n, diff, model = rewrite(loaded, policy, out, **job)
    finally:
        bar.close()
    if report_json:
        Path(report_json).write_text(report.to_json() + "\n")
    result = RewriteResult(report, out, fmt, n, diff, bar.timings, model)
    _print_written(result, quiet=quiet)
    return result


def _rewrite_eager(loaded, policy, out: Path, *, fmt, seq_len, dynamic, dev, force, verify, quiet, bar,
                   checkpoint, onnx_body):
    """A model checkpoint: rewritten in place, written, verified; (report, seq_len, max diff, model)."""
    import torch

    from moba_rewrite import checkpoints as ck
    from moba_rewrite.exporters.common import exportable

    model = loaded.model.to(dev)
    n = seq_len if seq_len is not None else steps.default_seq_len(model, policy)
    steps.check_seq_len(n, model)
    if fmt == "hf" and not loaded.is_hf:
        raise CliError("--format", "expected a Hugging Face model for --format hf; use pt2, aoti or onnx for "
                                   "other models", EXIT_VALUE)
    args = steps.sample(model, n, dev)
    with bar.step("rewriting attention"):
        report = steps.plan_and_rewrite(model, policy, args, n)
        module = exportable(model)
        with torch.no_grad():
            expected = module(*args)
    print_report(report, quiet=quiet)
    with ck.atomic_output(out, directory=(fmt == "hf"), force=force, inputs=(checkpoint,)) as staging:
        with bar.step(f"writing {fmt}"):
            artifacts.write_artifact(fmt, staging, model, args, loaded, policy, dynamic=dynamic, seq_len=n,
                                     checkpoint=checkpoint, onnx_body=onnx_body)
        diff = None
        if verify:
            with bar.step("verifying"):
                runner = artifacts.artifact_runner(fmt, staging, dtype=next(model.parameters()).dtype, display=out)
                diff = artifacts.verify(str(out), runner(args), expected)
                limit = steps.max_positions(model)
                m2 = n + max(1, n // 3) + 1
                if dynamic and fmt != "hf" and (limit is None or m2 <= limit):
                    args2 = steps.sample(model, m2, dev, seed=1)
                    with torch.no_grad():
                        exp2 = module(*args2)
                    diff = max(diff, artifacts.verify(str(out), runner(args2), exp2))
        with bar.step("moving into place"):
            pass
    return report, n, diff, model


def _rewrite_program(loaded, policy, out: Path, *, fmt, seq_len, dynamic, dev, force, verify, quiet, bar,
                     checkpoint, onnx_body):
    """A `.pt2` input: rewritten at graph level (no Python model code needed)."""
    import torch

    from moba_rewrite import checkpoints as ck
    from moba_rewrite.api import rewrite_exported
    from moba_rewrite.exporters.common import as_output_failure

    if fmt == "hf":
        raise CliError("--format", "expected pt2, aoti or onnx for a .pt2 input (there is no Hugging Face model "
                                   "to save)", EXIT_VALUE)
    ep = loaded.model
    example = getattr(ep, "example_inputs", None)
    if not example or not example[0]:
        raise CliError(checkpoint, "expected a .pt2 program saved with its example inputs", EXIT_CHECKPOINT)
    args = tuple(a.to(dev) if isinstance(a, torch.Tensor) else a for a in example[0])
    n = seq_len
    if n is not None:
        args = tuple(_resize_seq(a, n) for a in args)
    else:
        n = next((a.shape[1] for a in args if isinstance(a, torch.Tensor) and a.dim() >= 2), 0)
    with bar.step("rewriting attention"):
        try:
            program, report = rewrite_exported(ep, policy)
        except Exception as exc:
            raise rewrite_error(exc) from exc
        steps.check_seq_covers_blocks(n, report)
        try:
            with torch.no_grad():
                expected = program.module()(*args)
        except Exception as exc:
            if seq_len is None:
                raise
            raise CliError("--seq-len", f"expected a length the program accepts (it was exported at "
                                        f"{example[0][0].shape[1]} tokens, maybe with static shapes), got {seq_len}",
                           EXIT_VALUE) from exc
    print_report(report, quiet=quiet)
    with ck.atomic_output(out, directory=False, force=force, inputs=(checkpoint,)) as staging:
        with bar.step(f"writing {fmt}"):
            try:
                artifacts.export_module(fmt, program, args, staging, dynamic=dynamic, onnx_body=onnx_body)
            except Exception as exc:
                full = as_output_failure(exc)
                if full is not None:
                    raise full from exc  # a full disk is the output's problem (exit 7), not the export's
                raise CliError("", f"expected the rewritten program to export as {fmt} ({type(exc).__name__}: "
                                   f"{first_line(exc, type(exc).__name__)})", EXIT_EXPORT) from exc
        diff = None
        if verify:
            with bar.step("verifying"):
                diff = artifacts.verify(str(out), artifacts.artifact_runner(fmt, staging, display=out)(args), expected)
        with bar.step("moving into place"):
            pass
    return report, n, diff, program


def _resize_seq(a, n: int):
    """A program's example input at `n` tokens (same batch, dtype and value range; seeded)."""
    import torch

    if not isinstance(a, torch.Tensor) or a.dim() < 2:
        return a
    if a.dtype in (torch.int64, torch.int32):
        hi = int(a.max()) + 1 if a.numel() else 2
        return torch.randint(0, max(hi, 2), (a.shape[0], n, *a.shape[2:]), generator=torch.Generator().manual_seed(0)).to(a)
    return torch.randn((a.shape[0], n, *a.shape[2:]), generator=torch.Generator().manual_seed(0)).to(a)


def _print_written(result: RewriteResult, *, quiet: bool) -> None:
    n_moba = sum(1 for r in result.report.rows if r.decision == "moba")
    say(f"wrote {result.out} ({result.fmt}, {human(size(result.out))}): {n_moba} of {len(result.report.rows)} "
        f"attention sites use MoBA", quiet=quiet)
    if result.max_diff is not None:
        say(f"verified: loaded back and compared with the in-memory rewritten model at {result.seq_len} tokens, "
            f"max |diff| {result.max_diff:.2e}", quiet=quiet)
    else:
        say("not verified (--no-verify)", quiet=quiet)
