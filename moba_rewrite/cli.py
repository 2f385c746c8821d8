"""The `moba-rewrite` command: checkpoints in; rewritten, compiled and exported artifacts out.

Subcommands: `inspect`, `policy init|check|schema`, `rewrite`, `demo`, `bench`, `routes`
(reference: docs/CLI.md). Errors are one line, `moba-rewrite: error: <file>: <what was
expected>`, with an exit status per kind of problem (`EXIT_*` below, listed in docs/CLI.md);
`--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

PROG = "moba-rewrite"

# Exit statuses (docs/CLI.md).
EXIT_OK = 0
EXIT_INTERNAL = 1  # a bug or an unexpected failure (rerun with --debug)
EXIT_USAGE = 2  # bad command line (argparse)
EXIT_CHECKPOINT = 3  # input missing, unreadable or corrupt
EXIT_ARCHITECTURE = 4  # model cannot be built or rewritten (unknown architecture, unsupported site)
EXIT_POLICY = 5  # bad policy file
EXIT_OUTPUT_EXISTS = 6  # output exists and --force was not given
EXIT_OUTPUT_UNWRITABLE = 7  # output cannot be written
EXIT_VALUE = 8  # an option's value does not fit the model or policy (e.g. --seq-len below one block)
EXIT_PICKLE = 9  # pickled module refused without --trust-pickle
EXIT_VERIFY = 10  # the written artifact does not reproduce the rewritten model
EXIT_EXPORT = 11  # export / compile of the rewritten model failed

FORMATS = ("hf", "pt2", "aoti", "onnx")


class CliError(Exception):
    """A user-facing failure: `str()` is `<file or option>: <what was expected>`."""

    def __init__(self, where: str | os.PathLike, message: str, code: int) -> None:
        self.where = str(where)
        self.code = code
        super().__init__(f"{self.where}: {message}" if self.where else message)


# --------------------------------------------------------------------------- progress

@dataclass
class Progress:
    """A tqdm bar over the steps of one command, with per-step timings for the summary."""

    total: int
    enabled: bool = True
    timings: list[tuple[str, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        from tqdm.auto import tqdm

        show = self.enabled and (sys.stderr.isatty() or os.environ.get("MOBA_REWRITE_PROGRESS") == "1")
        self.bar = tqdm(total=self.total, disable=not show, file=sys.stderr, leave=False,
                        bar_format="{desc:<34} {bar} {n_fmt}/{total_fmt} [{elapsed}]", dynamic_ncols=True)

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        self.bar.set_description_str(name + " ...")
        self.bar.refresh()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings.append((name, time.perf_counter() - t0))
            self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def say(*parts: Any, quiet: bool = False) -> None:
    if not quiet:
        print(*parts, flush=True)


# --------------------------------------------------------------------------- shared steps

def _load_policy(path: str | os.PathLike | dict):
    from moba_rewrite.policy import PolicyError, load_policy

    try:
        return load_policy(path if isinstance(path, dict) else os.fspath(path))
    except PolicyError as exc:
        raise CliError("", str(exc), EXIT_POLICY) from exc


def _read(args: argparse.Namespace, path: str | None = None):
    """Read the checkpoint named on the command line (dense), mapping failures to exit codes."""
    from moba_rewrite import checkpoints as ck

    try:  # our own progress bar covers loading; transformers' per-tensor bars would be noise
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass
    try:
        return ck.read_checkpoint(path or args.checkpoint, config=getattr(args, "config", None),
                                  trust_pickle=getattr(args, "trust_pickle", False),
                                  trust_remote_code=getattr(args, "trust_remote_code", False),
                                  dtype=getattr(args, "dtype", None))
    except ck.CheckpointError as exc:
        raise CliError("", str(exc), exc.exit_code) from exc


def _device(name: str):
    import torch

    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise CliError("--device", f"expected cpu, cuda or cuda:N, got {name!r}", EXIT_VALUE) from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CliError("--device", "expected a device this machine has (no CUDA device found)", EXIT_VALUE)
    return dev


def _policy_blocks(policy) -> tuple[int, int]:
    """(largest MoBA block_size, its top_k) the policy can assign: sizes a default sample input."""
    best = (policy.defaults.block_size, policy.defaults.top_k)
    for rule in policy.rules:
        o = rule.overrides()
        if o.get("mode", "moba") == "moba" and "block_size" in o:
            best = max(best, (o["block_size"], o.get("top_k", policy.defaults.top_k)))
    return best


def _max_positions(model) -> int | None:
    cfg = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _default_seq_len(model, policy) -> int:
    """Long enough that MoBA routes: (top_k + 1) blocks of the largest block, within the model's limit."""
    block, top_k = _policy_blocks(policy) if policy is not None else (16, 1)
    want = (top_k + 1) * block
    limit = _max_positions(model)
    return max(2, min(want, limit) if limit else want)


def _check_seq_len(seq_len: int, model, where: str = "--seq-len") -> None:
    if seq_len < 1:
        raise CliError(where, f"expected a positive number of tokens, got {seq_len}", EXIT_VALUE)
    limit = _max_positions(model)
    if limit is not None and seq_len > limit:
        raise CliError(where, f"expected at most the model's {limit} positions, got {seq_len}", EXIT_VALUE)


def _check_seq_covers_blocks(seq_len: int, report) -> None:
    """MoBA needs at least one full block of keys; shorter samples would verify nothing."""
    moba = [r for r in report.rows if r.decision == "moba" and r.block_size]
    if not moba:
        return
    row = min(moba, key=lambda r: r.block_size)
    if seq_len < row.block_size:
        raise CliError("--seq-len", f"expected at least one MoBA block ({row.block_size} tokens, site "
                                    f"{row.name or '(root)'}), got {seq_len}; shorter inputs never route",
                       EXIT_VALUE)


def _sample(model, seq_len: int, device=None, *, seed: int = 0):
    from moba_rewrite.exporters.common import sample_inputs

    try:
        args = sample_inputs(model, seq_len, seed=seed)
    except ValueError as exc:
        raise CliError("", str(exc), EXIT_ARCHITECTURE) from exc
    return tuple(a.to(device) for a in args) if device is not None else args


def _rewrite_model(model, policy, args):
    """`mr.rewrite` with failures mapped to exit codes; returns the report."""
    import moba_rewrite as mr

    try:
        mr.rewrite(model, policy, example_inputs=args)
    except CliError:
        raise
    except Exception as exc:
        raise _rewrite_error(exc) from exc
    return model._moba_report


def _rewrite_error(exc: Exception, verb: str = "rewrite") -> CliError:
    from moba_rewrite.policy import PolicyError

    if isinstance(exc, PolicyError):
        return CliError("", str(exc), EXIT_POLICY)
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return CliError("", f"expected a model moba-rewrite can {verb} ({type(exc).__name__}: {text})",
                    EXIT_ARCHITECTURE)


def _plan(model, policy, args):
    import moba_rewrite as mr

    try:
        return mr.plan(model, policy, args)
    except Exception as exc:
        raise _rewrite_error(exc) from exc


def _dense_policy():
    return _load_policy({"version": 1, "defaults": {"mode": "dense"}})


def _tolerance(dtype) -> tuple[float, float]:
    import torch

    return (1e-4, 1e-3) if dtype in (torch.float32, torch.float64) else (2e-2, 2e-2)


def _verify(name: str, got, expected) -> float:
    """Max |diff| of an artifact's output against the in-memory model; raises on mismatch."""
    import torch

    from moba_rewrite.exporters.common import first_tensor, max_abs_diff

    ref = first_tensor(expected)
    try:
        diff = max_abs_diff(first_tensor(got) if not hasattr(got, "shape") else got, ref)
    except (ValueError, TypeError) as exc:
        raise CliError(name, f"expected outputs shaped like the rewritten model's ({exc})", EXIT_VERIFY) from exc
    atol, rtol = _tolerance(ref.dtype)
    bound = atol + rtol * float(ref.detach().abs().max())
    if not diff <= bound:  # also catches NaN
        raise CliError(name, f"expected the written artifact to reproduce the rewritten model (max |diff| "
                             f"{diff:.3g} > {bound:.3g}); nothing was written", EXIT_VERIFY)
    return diff


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"  # pragma: no cover


# --------------------------------------------------------------------------- rewrite pipeline

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


def _artifact_runner(fmt: str, path: Path, dtype=None, display: Path | None = None) -> Callable:
    """Load the written artifact the way a user would; returns `run(args) -> output tensor`."""
    import torch

    from moba_rewrite import checkpoints as ck
    from moba_rewrite.exporters.common import exportable, first_tensor

    if fmt == "onnx":
        from moba_rewrite.exporters.onnx import run_onnxruntime

        return _reporting_failures(lambda args: torch.as_tensor(run_onnxruntime(path, [a.cpu() for a in args])[0]),
                                   fmt, display or path)
    if fmt == "hf":
        loaded = ck.load(path, dtype=dtype)
        fn = exportable(loaded)
    elif fmt == "pt2":
        fn = ck.read_checkpoint(path).model.module()
    elif fmt == "aoti":
        fn = ck.read_checkpoint(path).model
    else:  # pragma: no cover
        raise AssertionError(fmt)

    def run(args):
        if fmt == "hf":
            fn.to(args[0].device)
        with torch.no_grad():
            return first_tensor(fn(*args))

    return _reporting_failures(run, fmt, display or path)


def _reporting_failures(run: Callable, fmt: str, path: Path) -> Callable:
    def guarded(args):
        try:
            return run(args)
        except CliError:
            raise
        except Exception as exc:
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            hint = " (onnxruntime's CPU kernels need --dtype float32)" if fmt == "onnx" and "NOT_IMPLEMENTED" in text else ""
            raise CliError(path, f"expected the written {fmt} artifact to load and run{hint} "
                               f"({type(exc).__name__}: {text}); nothing was written", EXIT_VERIFY) from exc

    return guarded


def run_rewrite(checkpoint: str | os.PathLike, policy_path: str | os.PathLike | dict, out: str | os.PathLike, *,
                fmt: str = "hf", seq_len: int | None = None, dynamic: bool = False, device: str = "cpu",
                force: bool = False, verify: bool = True, config: str | None = None, trust_pickle: bool = False,
                trust_remote_code: bool = False, dtype: str | None = None, quiet: bool = False,
                progress: bool = True, report_json: str | None = None) -> RewriteResult:
    """The `rewrite` command as a function (also used by `demo`)."""
    import torch

    from moba_rewrite import checkpoints as ck
    from moba_rewrite.exporters.common import exportable

    if fmt not in FORMATS:
        raise CliError("--format", f"expected one of {', '.join(FORMATS)}, got {fmt!r}", EXIT_USAGE)
    out = Path(out)
    policy = _load_policy(policy_path)
    dev = _device(device)
    try:
        ck.check_output(out, force=force, inputs=(checkpoint,))
    except ck.CheckpointError as exc:
        raise CliError("", str(exc), exc.exit_code) from exc
    steps = 4 + (1 if verify else 0)
    bar = Progress(steps, enabled=progress and not quiet)
    ns = argparse.Namespace(checkpoint=checkpoint, config=config, trust_pickle=trust_pickle,
                            trust_remote_code=trust_remote_code, dtype=dtype)
    try:
        with bar.step("loading checkpoint"):
            loaded = _read(ns)
        if loaded.kind == "aoti":
            raise CliError(checkpoint, "expected a model or a .pt2 program; an AOTInductor package is compiled "
                                       "code and cannot be rewritten", EXIT_ARCHITECTURE)
        if loaded.kind == "pt2":
            return _rewrite_program(loaded, policy, out, fmt=fmt, seq_len=seq_len, dynamic=dynamic, dev=dev,
                                    force=force, verify=verify, quiet=quiet, bar=bar, report_json=report_json,
                                    checkpoint=checkpoint)
        model = loaded.model.to(dev)
        n = seq_len if seq_len is not None else _default_seq_len(model, policy)
        _check_seq_len(n, model)
        if fmt == "hf" and not loaded.is_hf:
            raise CliError("--format", "expected a Hugging Face model for --format hf; use pt2, aoti or onnx for "
                                       "other models", EXIT_VALUE)
        args = _sample(model, n, dev)
        with bar.step("rewriting attention"):
            report = _plan(model, policy, args)
            _check_seq_covers_blocks(n, report)
            report = _rewrite_model(model, policy, args)
            module = exportable(model)
            with torch.no_grad():
                expected = module(*args)
        _print_report(report, quiet=quiet)
        with ck.atomic_output(out, directory=(fmt == "hf"), force=force, inputs=(checkpoint,)) as staging:
            with bar.step(f"writing {fmt}"):
                _write_artifact(fmt, staging, model, args, loaded, policy, dynamic=dynamic, seq_len=n,
                                checkpoint=checkpoint)
            diff = None
            if verify:
                with bar.step("verifying"):
                    runner = _artifact_runner(fmt, staging, dtype=next(model.parameters()).dtype, display=out)
                    diff = _verify(str(out), runner(args), expected)
                    if dynamic and fmt != "hf":
                        m2 = n + max(1, n // 3) + 1
                        if _max_positions(model) is None or m2 <= _max_positions(model):
                            args2 = _sample(model, m2, dev, seed=1)
                            with torch.no_grad():
                                exp2 = module(*args2)
                            diff = max(diff, _verify(str(out), runner(args2), exp2))
            with bar.step("moving into place"):
                pass
    except ck.CheckpointError as exc:
        raise CliError("", str(exc), exc.exit_code) from exc
    finally:
        bar.close()
    if report_json:
        Path(report_json).write_text(report.to_json() + "\n")
    result = RewriteResult(report, out, fmt, n, diff, bar.timings, model)
    _print_written(result, quiet=quiet)
    return result


def _write_artifact(fmt: str, staging: Path, model, args, loaded, policy, *, dynamic: bool, seq_len: int,
                    checkpoint) -> None:
    import moba_rewrite
    from moba_rewrite import checkpoints as ck

    if fmt == "hf":
        meta = {"moba_rewrite_version": moba_rewrite.__version__, "source": str(checkpoint),
                "seq_len": seq_len, "format": "hf"}
        ck.write_hf_checkpoint(staging, loaded, policy.to_dict(), meta)
        return
    try:
        if fmt == "onnx":
            from moba_rewrite.exporters.onnx import export_onnx

            export_onnx(model, args, staging, dynamic=dynamic)
            return
        from moba_rewrite.exporters.pt2 import export_program, save_pt2

        program = export_program(model, args, dynamic=dynamic)
        if fmt == "pt2":
            save_pt2(program, staging)
        else:
            from moba_rewrite.exporters.aoti import save_aoti

            save_aoti(program, staging)
    except CliError:
        raise
    except Exception as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CliError("", f"expected the rewritten model to export as {fmt} ({type(exc).__name__}: {text})",
                       EXIT_EXPORT) from exc


def _rewrite_program(loaded, policy, out: Path, *, fmt, seq_len, dynamic, dev, force, verify, quiet, bar,
                     report_json, checkpoint) -> RewriteResult:
    """A `.pt2` input: rewritten at graph level (no Python model code needed)."""
    import torch

    from moba_rewrite import checkpoints as ck
    from moba_rewrite.api import rewrite_exported

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
            raise _rewrite_error(exc) from exc
        _check_seq_covers_blocks(n, report)
        try:
            with torch.no_grad():
                expected = program.module()(*args)
        except Exception as exc:
            if seq_len is None:
                raise
            raise CliError("--seq-len", f"expected a length the program accepts (it was exported at "
                                        f"{example[0][0].shape[1]} tokens, maybe with static shapes), got {seq_len}",
                           EXIT_VALUE) from exc
    _print_report(report, quiet=quiet)
    with ck.atomic_output(out, directory=False, force=force, inputs=(checkpoint,)) as staging:
        with bar.step(f"writing {fmt}"):
            try:
                if fmt == "pt2":
                    torch.export.save(program, str(staging))
                elif fmt == "aoti":
                    from moba_rewrite.exporters.aoti import save_aoti

                    save_aoti(program, staging)
                else:
                    from moba_rewrite.exporters.onnx import export_onnx

                    export_onnx(program.module(), args, staging, dynamic=dynamic)
            except Exception as exc:
                raise CliError("", f"expected the rewritten program to export as {fmt} ({exc})", EXIT_EXPORT) from exc
        diff = None
        if verify:
            with bar.step("verifying"):
                diff = _verify(str(out), _artifact_runner(fmt, staging, display=out)(args), expected)
        with bar.step("moving into place"):
            pass
    if report_json:
        Path(report_json).write_text(report.to_json() + "\n")
    result = RewriteResult(report, out, fmt, n, diff, bar.timings, program)
    _print_written(result, quiet=quiet)
    return result


def _resize_seq(a, n: int):
    import torch

    if not isinstance(a, torch.Tensor) or a.dim() < 2:
        return a
    if a.dtype in (torch.int64, torch.int32):
        hi = int(a.max()) + 1 if a.numel() else 2
        return torch.randint(0, max(hi, 2), (a.shape[0], n, *a.shape[2:]), generator=torch.Generator().manual_seed(0)).to(a)
    return torch.randn((a.shape[0], n, *a.shape[2:]), generator=torch.Generator().manual_seed(0)).to(a)


def _print_report(report, *, quiet: bool) -> None:
    if quiet:
        return
    print(str(report))
    for w in getattr(report, "warnings", []) or []:
        print(f"warning: {w}")
    print(flush=True)


def _print_written(result: RewriteResult, *, quiet: bool) -> None:
    n_moba = sum(1 for r in result.report.rows if r.decision == "moba")
    say(f"wrote {result.out} ({result.fmt}, {_human(_size(result.out))}): {n_moba} of {len(result.report.rows)} "
        f"attention sites use MoBA", quiet=quiet)
    if result.max_diff is not None:
        say(f"verified: loaded back and compared with the in-memory rewritten model at {result.seq_len} tokens, "
            f"max |diff| {result.max_diff:.2e}", quiet=quiet)
    else:
        say("not verified (--no-verify)", quiet=quiet)


# --------------------------------------------------------------------------- commands

def cmd_rewrite(args: argparse.Namespace) -> int:
    run_rewrite(args.checkpoint, args.policy, args.out, fmt=args.format, seq_len=args.seq_len,
                dynamic=args.dynamic, device=args.device, force=args.force, verify=not args.no_verify,
                config=args.config, trust_pickle=args.trust_pickle, trust_remote_code=args.trust_remote_code,
                dtype=args.dtype, quiet=args.quiet, progress=not args.no_progress, report_json=args.report_json)
    return EXIT_OK


def _site_rows(sites) -> list[dict]:
    return [{"layer": r.layer, "name": r.name or "(root)", "class": r.module_class, "kind": r.kind,
             "heads": r.num_heads, "kv_heads": r.num_kv_heads, "head_dim": r.head_dim, "causal": r.causal,
             "mask": r.mask_kind} for r in sites]


def _table(rows: list[dict]) -> str:
    if not rows:
        return "(no attention sites found)"
    keys = list(rows[0])
    cells = [[("-" if r[k] is None else str(r[k])) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    lines = ["  ".join(k.ljust(w) for k, w in zip(keys, widths)).rstrip(), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines)


def _discover(args: argparse.Namespace, *, steps: int = 2):
    """Load the checkpoint and find its attention sites: (checkpoint, [AttentionSite])."""
    from moba_rewrite.api import find_sites

    bar = Progress(steps, enabled=not args.quiet and not args.no_progress)
    try:
        with bar.step("loading checkpoint"):
            loaded = _read(args)
        if loaded.kind in ("aoti",):
            raise CliError(args.checkpoint, "expected a model or a .pt2 program; an AOTInductor package is "
                                            "compiled code without attention sites to inspect", EXIT_ARCHITECTURE)
        with bar.step("finding attention sites"):
            try:
                if loaded.kind == "pt2":
                    sites = find_sites(loaded.model.graph_module)
                else:
                    n = args.seq_len or 32
                    _check_seq_len(n, loaded.model)
                    sites = find_sites(loaded.model, _sample(loaded.model, n))
            except CliError:
                raise
            except Exception as exc:
                raise _rewrite_error(exc, "find attention sites in") from exc
    finally:
        bar.close()
    return loaded, sites


def _model_size(model) -> tuple[int, int]:
    params = getattr(model, "parameters", None)
    if params is None and hasattr(model, "state_dict"):
        tensors = list(model.state_dict().values())
    elif params is not None:
        tensors = list(model.parameters()) + list(model.buffers())
    else:
        tensors = []
    seen, n, nbytes = set(), 0, 0
    for t in tensors:
        if id(t) in seen:
            continue
        seen.add(id(t))
        n += t.numel()
        nbytes += t.numel() * t.element_size()
    return n, nbytes


def cmd_inspect(args: argparse.Namespace) -> int:
    loaded, sites = _discover(args)
    n_params, n_bytes = _model_size(loaded.model)
    rows = _site_rows(sites)
    if args.json:
        print(json.dumps({"checkpoint": str(args.checkpoint), "kind": loaded.kind,
                          "model_class": type(loaded.model).__name__, "parameters": n_params, "bytes": n_bytes,
                          "sites": rows}, indent=2))
        return EXIT_OK
    print(f"{args.checkpoint}: {loaded.kind} checkpoint, {type(loaded.model).__name__}, "
          f"{n_params / 1e6:.2f}M parameters ({_human(n_bytes)}), {len(rows)} attention sites")
    print(_table(rows))
    return EXIT_OK


def cmd_policy_init(args: argparse.Namespace) -> int:
    from moba_rewrite import checkpoints as ck
    from moba_rewrite.policy import starter_policy_yaml

    if args.out:
        try:
            ck.check_output(args.out, force=args.force, inputs=(args.checkpoint,))
        except ck.CheckpointError as exc:
            raise CliError("", str(exc), exc.exit_code) from exc
    _, sites = _discover(args)
    text = starter_policy_yaml(sites, Path(args.checkpoint).name)
    if not args.out:
        sys.stdout.write(text)
        return EXIT_OK
    with ck.atomic_output(args.out, directory=False, force=args.force, inputs=(args.checkpoint,)) as tmp:
        tmp.write_text(text)
    say(f"wrote {args.out}: starter policy for {len(sites)} attention sites", quiet=args.quiet)
    return EXIT_OK


def cmd_policy_check(args: argparse.Namespace) -> int:
    policy = _load_policy(args.policy)
    if not args.model:
        say(f"{args.policy}: valid policy ({len(policy.rules)} rules)", quiet=args.quiet)
        return EXIT_OK
    args.checkpoint = args.model
    loaded = _read(args)
    n = args.seq_len or _default_seq_len(loaded.model, policy)
    _check_seq_len(n, loaded.model)
    if loaded.kind == "pt2":
        from moba_rewrite.api import rewrite_exported

        try:
            _, report = rewrite_exported(loaded.model, policy)  # the loaded copy only
        except Exception as exc:
            raise _rewrite_error(exc) from exc
    else:
        report = _plan(loaded.model, policy, _sample(loaded.model, n))
    if args.json:
        print(report.to_json())
    else:
        say(f"{args.policy}: valid policy ({len(policy.rules)} rules); decisions for {args.model}:", quiet=args.quiet)
        print(str(report))
        for w in report.warnings:
            print(f"warning: {w}")
    return EXIT_OK


def cmd_policy_schema(args: argparse.Namespace) -> int:
    from moba_rewrite.policy import policy_schema

    text = json.dumps(policy_schema(), indent=2) + "\n"
    if not args.out:
        sys.stdout.write(text)
        return EXIT_OK
    from moba_rewrite import checkpoints as ck

    try:
        with ck.atomic_output(args.out, directory=False, force=args.force) as tmp:
            tmp.write_text(text)
    except ck.CheckpointError as exc:
        raise CliError("", str(exc), exc.exit_code) from exc
    say(f"wrote {args.out}", quiet=args.quiet)
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from moba_rewrite import demo

    demo.run(out_dir=args.out, seq_len=args.seq_len, quiet=args.quiet, progress=not args.no_progress,
             force=args.force, onnx=not args.no_onnx)
    return EXIT_OK


def cmd_routes(args: argparse.Namespace) -> int:
    from moba_rewrite import checkpoints as ck
    from moba_rewrite import routes

    try:
        ck.check_output(args.out, force=args.force, inputs=(args.checkpoint,))
    except ck.CheckpointError as exc:
        raise CliError("", str(exc), exc.exit_code) from exc
    policy = _load_policy(args.policy)
    bar = Progress(3, enabled=not args.quiet and not args.no_progress)
    try:
        with bar.step("loading checkpoint"):
            loaded = _read(args)
        if loaded.kind in ("pt2", "aoti"):
            raise CliError(args.checkpoint, "expected a model checkpoint (Hugging Face directory, safetensors or "
                                            "pickled module); routes are drawn from the eager model", EXIT_VALUE)
        model = loaded.model
        n = args.seq_len or _default_seq_len(model, policy)
        _check_seq_len(n, model)
        inputs = _sample(model, n)
        with bar.step("rewriting attention"):
            report = _plan(model, policy, inputs)
            _check_seq_covers_blocks(n, report)
            _rewrite_model(model, policy, inputs)
        with bar.step("capturing routes"):
            calls = routes.capture(model, inputs)
            with ck.atomic_output(args.out, directory=False, force=args.force, inputs=(args.checkpoint,)) as tmp:
                info = routes.draw(calls, tmp, max_heads=args.heads, title=f"{Path(args.checkpoint).name}, "
                                                                           f"{n} tokens")
    except ck.CheckpointError as exc:
        raise CliError("", str(exc), exc.exit_code) from exc
    finally:
        bar.close()
    say(f"wrote {args.out}: routes of {info['layers']} MoBA sites x {info['heads']} heads at {n} tokens",
        quiet=args.quiet)
    return EXIT_OK


def _time_ms(fn: Callable[[], Any], device, repeats: int) -> float:
    import torch

    fn()  # warm-up (and compilation of lazy kernels)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def _bench_script() -> Path | None:
    """The project's benchmark (benchmarks/bench_attention.py) in a source checkout, if present."""
    import moba_rewrite

    path = Path(moba_rewrite.__file__).resolve().parents[1] / "benchmarks" / "bench_attention.py"
    return path if path.is_file() else None


def _bench_argv(args: argparse.Namespace, device: str) -> list[str]:
    """Translate `bench` flags for benchmarks/bench_attention.py."""
    if args.seq_lens:
        lens = args.seq_lens
    elif args.quick:
        lens = "2048,4096" if device == "cpu" else "8192,16384"
    else:
        lens = "2048,4096,8192" if device == "cpu" else "8192,16384,32768,65536,131072"
    argv = ["--device", device, "--seq-lens", lens, "--block-size", str(args.block_size), "--top-k", str(args.top_k)]
    if args.quick:
        argv += ["--repeats", "1", "--warmup", "1"]
    if args.backward:
        argv.append("--backward")
    if args.plot:
        argv += ["--plot", str(args.plot)]
    return argv


def cmd_bench(args: argparse.Namespace) -> int:
    """Run the project's attention benchmark for this device (or, in an installed package
    without benchmarks/, a built-in forward-time table)."""
    import torch

    dev = _device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.seq_lens:
        try:
            lens = [int(x) for x in args.seq_lens.split(",") if x.strip()]
        except ValueError:
            raise CliError("--seq-lens", f"expected comma-separated whole numbers, got {args.seq_lens!r}",
                           EXIT_VALUE) from None
        if not lens or min(lens) < 1:
            raise CliError("--seq-lens", "expected positive sequence lengths", EXIT_VALUE)
    if args.plot:
        from moba_rewrite import checkpoints as ck

        try:
            ck.check_output(args.plot, force=args.force)
        except ck.CheckpointError as exc:
            raise CliError("", str(exc), exc.exit_code) from exc
        if Path(args.plot).exists():
            Path(args.plot).unlink()  # --force: the benchmark writes the plot itself
    script = None if args.builtin else _bench_script()
    if script is None:
        return _builtin_bench(args, dev)
    import importlib.util

    spec = importlib.util.spec_from_file_location("moba_rewrite_bench_attention", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    say(f"running {script} on {dev}", quiet=args.quiet)
    return int(module.main(_bench_argv(args, str(dev))) or 0)


def _builtin_bench(args: argparse.Namespace, dev) -> int:
    """Forward time of MoBA (each backend that runs here) against causal SDPA, per sequence length."""
    import torch
    import torch.nn.functional as F

    import moba_rewrite as mr
    from moba_rewrite.kernels import BackendUnavailable, load_backend

    if args.seq_lens:
        lens = [int(x) for x in args.seq_lens.split(",") if x.strip()]
    elif args.quick:
        lens = [256, 512] if dev.type == "cpu" else [4096, 8192]
    else:
        lens = [1024, 2048, 4096] if dev.type == "cpu" else [8192, 16384, 32768, 65536]
    heads, dim = (4, 64) if dev.type == "cpu" else (16, 128)
    dtype = torch.float32 if dev.type == "cpu" else torch.bfloat16
    backends = []
    for name in ("torch", "triton", "flash_attn"):
        try:
            load_backend(name)
        except (BackendUnavailable, ImportError):
            continue
        if name != "torch" and dev.type != "cuda":
            continue
        backends.append(name)
    repeats = 2 if args.quick else 5
    rows = []
    bar = Progress(len(lens), enabled=not args.quiet and not args.no_progress)
    try:
        for n in lens:
            block = min(args.block_size, max(16, n // 8))
            top_k = args.top_k
            with bar.step(f"timing {n} tokens"):
                g = torch.Generator(device="cpu").manual_seed(0)
                q, k, v = (torch.randn(1, heads, n, dim, generator=g).to(dev, dtype) for _ in range(3))
                with torch.no_grad():
                    row = {"seq_len": n, "block": block, "top_k": top_k,
                           "sdpa_ms": _time_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                                               dev, repeats)}
                    for b in backends:
                        row[f"moba_{b}_ms"] = _time_ms(
                            lambda b=b: mr.moba_attention(q, k, v, block_size=block, top_k=top_k, backend=b),
                            dev, repeats)
                nb = -(-n // block)
                row["sparsity"] = 1.0 - min(1.0, top_k / max(1.0, (nb + 1) / 2))
                rows.append(row)
    finally:
        bar.close()
    say(f"MoBA vs causal SDPA, forward, {dev.type}, {dtype}, batch 1, {heads} heads, head dim {dim} "
        f"(best of {repeats}):")
    table = []
    for r in rows:
        cells = {"seq_len": r["seq_len"], "block": r["block"], "top_k": r["top_k"], "sdpa ms": f"{r['sdpa_ms']:.2f}"}
        for b in backends:
            cells[f"moba[{b}] ms"] = f"{r[f'moba_{b}_ms']:.2f}"
            cells[f"speedup[{b}]"] = f"{r['sdpa_ms'] / r[f'moba_{b}_ms']:.2f}x"
        cells["approx. sparsity"] = f"{r['sparsity']:.0%}"
        table.append(cells)
    print(_table(table))
    if args.plot:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        from moba_rewrite import checkpoints as ck

        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(lens, [r["sdpa_ms"] for r in rows], marker="o", label="SDPA (causal)")
        for b in backends:
            ax.plot(lens, [r[f"moba_{b}_ms"] for r in rows], marker="o", label=f"MoBA ({b})")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length")
        ax.set_ylabel("forward time (ms)")
        ax.set_title(f"MoBA vs SDPA on {dev.type}")
        ax.legend()
        with ck.atomic_output(args.plot, directory=False, force=args.force) as tmp:
            fig.savefig(str(tmp), format="png", dpi=110)
        plt.close(fig)
        say(f"wrote {args.plot}", quiet=args.quiet)
    return EXIT_OK


# --------------------------------------------------------------------------- parser

class _Parser(argparse.ArgumentParser):
    """argparse with the one-line error format and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        sys.stderr.write(f"{PROG}: error: {message}\n")
        raise SystemExit(EXIT_USAGE)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return value


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-q", "--quiet", action="store_true", help="print only errors and requested output")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true", help="show the full traceback on errors")


def _add_input(p: argparse.ArgumentParser, positional: bool = True) -> None:
    if positional:
        p.add_argument("checkpoint", metavar="CKPT",
                       help="Hugging Face model directory, .safetensors file (with --config), .pt2 program, "
                            "or .pt file")
    p.add_argument("--config", metavar="FILE", help="config.json for a .safetensors / state-dict .pt input "
                                                    "(default: the one beside it)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow a pickled full-module .pt input (unpickling runs code from the file)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow model code shipped with the checkpoint (transformers trust_remote_code)")
    p.add_argument("--dtype", default=None, choices=["auto", "float32", "float16", "bfloat16"],
                   help="load the weights in this dtype (default: as transformers does)")


def build_parser() -> argparse.ArgumentParser:
    from moba_rewrite import __version__

    parser = _Parser(prog=PROG, description="Rewrite the attention of PyTorch models into MoBA (Mixture of Block "
                                            "Attention), per layer, from a policy file.",
                     epilog="Exit codes: 0 ok, 1 internal error, 2 usage, 3 missing/corrupt checkpoint, 4 unknown "
                            "architecture or unsupported model, 5 bad policy, 6 output exists, 7 output not "
                            "writable, 8 bad option value, 9 pickle refused, 10 verification failed, 11 export "
                            "failed. See docs/CLI.md.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("inspect", help="list the attention sites of a checkpoint",
                       description="List every attention site (name, class, layer, heads, head dim, causality, "
                                   "mask) and the model's size.")
    _add_input(p)
    p.add_argument("--seq-len", type=_positive, metavar="N", help="tokens in the probe input (default 32)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _add_common(p)
    p.set_defaults(func=cmd_inspect)

    pp = sub.add_parser("policy", help="write, check or describe policy files",
                        description="Policy files: a starter for a model, validation, the JSON schema.")
    psub = pp.add_subparsers(dest="policy_command", metavar="ACTION", parser_class=_Parser)
    psub.required = True
    p = psub.add_parser("init", help="write a commented starter policy for a checkpoint",
                        description="Write a starter policy (YAML) listing the checkpoint's attention sites.")
    _add_input(p)
    p.add_argument("--out", metavar="FILE", help="write here instead of standard output")
    p.add_argument("--seq-len", type=_positive, metavar="N", help="tokens in the probe input (default 32)")
    p.add_argument("--force", action="store_true", help="replace FILE if it exists")
    _add_common(p)
    p.set_defaults(func=cmd_policy_init)
    p = psub.add_parser("check", help="validate a policy (and show its decisions for a model)",
                        description="Validate a policy file; with --model, show the decision for every site.")
    p.add_argument("policy", metavar="POLICY", help="policy file (.yaml, .yml, .toml, .json)")
    p.add_argument("--model", metavar="CKPT", help="show the decisions for this checkpoint's sites")
    _add_input(p, positional=False)
    p.add_argument("--seq-len", type=_positive, metavar="N", help="tokens in the probe input")
    p.add_argument("--json", action="store_true", help="print the decisions as JSON")
    _add_common(p)
    p.set_defaults(func=cmd_policy_check)
    p = psub.add_parser("schema", help="print the policy format's JSON schema",
                        description="Print (or write) the JSON schema of policy files.")
    p.add_argument("--out", metavar="FILE", help="write here instead of standard output")
    p.add_argument("--force", action="store_true", help="replace FILE if it exists")
    _add_common(p)
    p.set_defaults(func=cmd_policy_schema)

    p = sub.add_parser("rewrite", help="rewrite a checkpoint and write hf / pt2 / aoti / onnx",
                       description="Rewrite the checkpoint's attention per the policy, write the artifact "
                                   "atomically, load it back and compare it with the in-memory rewritten model.")
    _add_input(p)
    p.add_argument("--policy", required=True, metavar="POLICY", help="policy file (.yaml, .yml, .toml, .json)")
    p.add_argument("--out", required=True, metavar="OUT", help="output path (a directory for hf, a file otherwise)")
    p.add_argument("--format", default="hf", choices=FORMATS,
                   help="hf: checkpoint directory for mr.load; pt2: torch.export program; aoti: AOTInductor "
                        "package; onnx: ONNX model (default hf)")
    p.add_argument("--seq-len", type=_positive, metavar="N",
                   help="tokens in the sample input used to export and verify (default: (top_k+1) blocks, "
                        "within the model's limit); must be at least one MoBA block")
    p.add_argument("--dynamic", action="store_true", help="dynamic sequence length in pt2 / aoti / onnx")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--no-verify", action="store_true", help="skip loading the artifact back and comparing")
    p.add_argument("--report-json", metavar="FILE", help="also write the rewrite report as JSON")
    _add_common(p)
    p.set_defaults(func=cmd_rewrite)

    p = sub.add_parser("demo", help="the whole path on a small built-in Llama checkpoint",
                       description="Build a small Llama-architecture checkpoint with random weights, inspect it, "
                                   "rewrite it with the hybrid policy, torch.compile it, run a long-ish prompt "
                                   "eagerly and compiled, export pt2 and onnx, and print the report, timings and "
                                   "file locations.")
    p.add_argument("--out", metavar="DIR", help="work folder (default: a new temporary folder, kept)")
    p.add_argument("--seq-len", type=_positive, default=None, metavar="N", help="prompt length (default 1024)")
    p.add_argument("--no-onnx", action="store_true", help="skip the ONNX export")
    p.add_argument("--force", action="store_true", help="reuse DIR if it exists")
    _add_common(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("bench", help="time MoBA against dense attention on this device",
                       description="Run the attention benchmark (benchmarks/bench_attention.py: MoBA vs causal "
                                   "scaled_dot_product_attention, time and peak memory) for the current device and "
                                   "print the table. In an installed package without benchmarks/, a built-in "
                                   "forward-time table.")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--seq-lens", default=None, metavar="N,N,...", help="sequence lengths to time")
    p.add_argument("--block-size", type=_positive, default=512, metavar="B", help="MoBA block size (default 512)")
    p.add_argument("--top-k", type=_positive, default=3, metavar="K", help="MoBA top-k (default 3)")
    p.add_argument("--backward", action="store_true", help="also time forward+backward")
    p.add_argument("--quick", action="store_true", help="two sizes, one repeat")
    p.add_argument("--builtin", action="store_true", help="the built-in forward-only table (no subprocesses)")
    p.add_argument("--plot", metavar="PNG", help="also draw the timings")
    p.add_argument("--force", action="store_true", help="replace PNG if it exists")
    _add_common(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("routes", help="draw which key blocks each query block selected",
                       description="Rewrite the checkpoint with the policy, run a sample input and draw, per MoBA "
                                   "layer and head, which key blocks each query block routed to.")
    _add_input(p)
    p.add_argument("--policy", required=True, metavar="POLICY", help="policy file")
    p.add_argument("--out", required=True, metavar="PNG", help="image to write")
    p.add_argument("--seq-len", type=_positive, metavar="N", help="tokens in the sample input")
    p.add_argument("--heads", type=_positive, default=4, metavar="H", help="heads drawn per layer (default 4)")
    p.add_argument("--force", action="store_true", help="replace PNG if it exists")
    _add_common(p)
    p.set_defaults(func=cmd_routes)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `moba-rewrite` command; returns the exit status."""
    import warnings

    # torch's own deprecation chatter while loading programs; not the user's concern
    warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else EXIT_USAGE
    try:
        return int(args.func(args) or 0)
    except CliError as exc:
        if getattr(args, "debug", False):
            raise
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return exc.code
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROG}: interrupted\n")
        return 130
    except Exception as exc:  # noqa: BLE001  (one line, not a traceback, unless --debug)
        if getattr(args, "debug", False):
            raise
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        sys.stderr.write(f"{PROG}: error: internal error ({type(exc).__name__}: {text}); rerun with --debug "
                         f"for the traceback\n")
        return EXIT_INTERNAL


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
