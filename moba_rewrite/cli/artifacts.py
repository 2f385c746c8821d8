"""Write a rewritten model as hf / pt2 / aoti / onnx, and load a written artifact back the
way a user would to compare it with the in-memory model (the `rewrite` command's check)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from moba_rewrite.cli.errors import EXIT_EXPORT, EXIT_VALUE, EXIT_VERIFY, CliError, first_line

FORMATS = ("hf", "pt2", "aoti", "onnx")
# The file name each file format needs: torch.export and AOTInductor packages are `.pt2`
# archives (AOTInductor refuses any other name), ONNX models `.onnx`. `hf` writes a directory.
SUFFIXES = {"pt2": ".pt2", "aoti": ".pt2", "onnx": ".onnx"}


def check_out_suffix(fmt: str, out: Path) -> None:
    """Refuse, before any work, an `--out` name the format cannot use (exit 8)."""
    suffix = SUFFIXES.get(fmt)
    if suffix is not None and (out.suffix != suffix or out.name == suffix):
        got = repr(out.suffix) if out.suffix else "no suffix"
        raise CliError(out, f"expected a name ending in {suffix} for --format {fmt}, got {got}", EXIT_VALUE)


def write_artifact(fmt: str, staging: Path, model, args, loaded, policy, *, dynamic: bool, seq_len: int,
                   checkpoint, onnx_body: str = "sparse") -> None:
    """An eager model (rewritten in place) into `staging`; export failures exit 11."""
    import moba_rewrite
    from moba_rewrite import checkpoints as ck

    if fmt == "hf":
        meta = {"moba_rewrite_version": moba_rewrite.__version__, "source": str(checkpoint),
                "seq_len": seq_len, "format": "hf"}
        ck.write_hf_checkpoint(staging, loaded, policy.to_dict(), meta)
        return
    from moba_rewrite.exporters.common import as_output_failure

    try:
        if fmt == "onnx":
            export_module(fmt, model, args, staging, dynamic=dynamic, onnx_body=onnx_body)
            return
        from moba_rewrite.exporters.pt2 import export_program

        export_module(fmt, export_program(model, args, dynamic=dynamic), args, staging, dynamic=dynamic)
    except CliError:
        raise
    except Exception as exc:
        full = as_output_failure(exc)
        if full is not None:
            raise full from exc  # a full disk is the output's problem (exit 7), not the export's
        raise CliError("", f"expected the rewritten model to export as {fmt} ({type(exc).__name__}: "
                           f"{first_line(exc, type(exc).__name__)})", EXIT_EXPORT) from exc


def export_module(fmt: str, module, args, staging: Path, *, dynamic: bool, onnx_body: str = "sparse") -> None:
    """Save an exported program (pt2, aoti) or export a module or program to ONNX (onnx, with
    the `sparse` or `dense` MoBA function body)."""
    import torch

    if fmt == "onnx":
        from moba_rewrite.exporters.onnx import export_onnx

        if isinstance(module, torch.export.ExportedProgram):
            module = module.module()
        export_onnx(module, args, staging, dynamic=dynamic, body=onnx_body)
    elif fmt == "pt2":
        from moba_rewrite.exporters.pt2 import save_pt2

        save_pt2(module, staging)
    else:
        from moba_rewrite.exporters.aoti import save_aoti

        save_aoti(module, staging)


def tolerance(dtype) -> tuple[float, float]:
    """(atol, rtol) of the artifact check: tight in fp32 / fp64, loose in half precision."""
    import torch

    return (1e-4, 1e-3) if dtype in (torch.float32, torch.float64) else (2e-2, 2e-2)


def verify(name: str, got, expected) -> float:
    """Max |diff| of an artifact's output against the in-memory model; raises on mismatch."""
    from moba_rewrite.exporters.common import first_tensor, max_abs_diff

    ref = first_tensor(expected)
    try:
        diff = max_abs_diff(first_tensor(got) if not hasattr(got, "shape") else got, ref)
    except (ValueError, TypeError) as exc:
        raise CliError(name, f"expected outputs shaped like the rewritten model's ({exc})", EXIT_VERIFY) from exc
    atol, rtol = tolerance(ref.dtype)
    bound = atol + rtol * float(ref.detach().abs().max())
    if not diff <= bound:  # also catches NaN
        raise CliError(name, f"expected the written artifact to reproduce the rewritten model (max |diff| "
                             f"{diff:.3g} > {bound:.3g}); nothing was written", EXIT_VERIFY)
    return diff


def artifact_runner(fmt: str, path: Path, dtype=None, display: Path | None = None) -> Callable:
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
            text = first_line(exc)
            hint = " (onnxruntime's CPU kernels need --dtype float32)" if fmt == "onnx" and "NOT_IMPLEMENTED" in text else ""
            raise CliError(path, f"expected the written {fmt} artifact to load and run{hint} "
                               f"({type(exc).__name__}: {text}); nothing was written", EXIT_VERIFY) from exc

    return guarded
