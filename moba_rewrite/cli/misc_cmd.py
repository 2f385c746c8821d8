"""Glue for `demo`, `routes` and `bench`: each hands its flags to the module that does the work
(moba_rewrite.cli.demo, moba_rewrite.routes, benchmarks/bench_attention.py or the built-in table)."""

from __future__ import annotations

import argparse
from pathlib import Path

from moba_rewrite.cli import steps
from moba_rewrite.cli.errors import EXIT_OK, EXIT_VALUE, CliError, checkpoint_errors, require
from moba_rewrite.cli.output import progress_for, say


def cmd_demo(args: argparse.Namespace) -> int:
    from moba_rewrite.cli import demo

    demo.run(out_dir=args.out, seq_len=args.seq_len, quiet=args.quiet, progress=not args.no_progress,
             force=args.force, onnx=not args.no_onnx)
    return EXIT_OK


def cmd_routes(args: argparse.Namespace) -> int:
    from moba_rewrite import checkpoints as ck
    from moba_rewrite import routes

    require("matplotlib", "drawing routes")
    with checkpoint_errors():
        ck.check_output(args.out, force=args.force, inputs=(args.checkpoint,))
    policy = steps.load_policy(args.policy)
    bar = progress_for(args, 3)
    try:
        with checkpoint_errors():
            with bar.step("loading checkpoint"):
                loaded = steps.read(args)
            if loaded.kind in ("pt2", "aoti"):
                raise CliError(args.checkpoint, "expected a model checkpoint (Hugging Face directory, safetensors "
                                                "or pickled module); routes are drawn from the eager model",
                               EXIT_VALUE)
            model = loaded.model
            n = args.seq_len or steps.default_seq_len(model, policy)
            steps.check_seq_len(n, model)
            inputs = steps.sample(model, n)
            with bar.step("rewriting attention"):
                steps.plan_and_rewrite(model, policy, inputs, n)
            with bar.step("capturing routes"):
                calls = routes.capture(model, inputs)
                with ck.atomic_output(args.out, directory=False, force=args.force,
                                      inputs=(args.checkpoint,)) as tmp:
                    info = routes.draw(calls, tmp, max_heads=args.heads,
                                       title=f"{Path(args.checkpoint).name}, {n} tokens")
    finally:
        bar.close()
    say(f"wrote {args.out}: routes of {info['layers']} MoBA sites x {info['heads']} heads at {n} tokens",
        quiet=args.quiet)
    return EXIT_OK


def bench_script() -> Path | None:
    """The project's benchmark (benchmarks/bench_attention.py) in a source checkout, if present."""
    import moba_rewrite

    path = Path(moba_rewrite.__file__).resolve().parents[1] / "benchmarks" / "bench_attention.py"
    return path if path.is_file() else None


def bench_argv(args: argparse.Namespace, device: str) -> list[str]:
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

    dev = steps.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
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

        require("matplotlib", "--plot")
        with checkpoint_errors():
            ck.check_output(args.plot, force=args.force)
        if Path(args.plot).exists():
            Path(args.plot).unlink()  # --force: the benchmark writes the plot itself
    script = None if args.builtin else bench_script()
    if script is None:
        from moba_rewrite.cli.bench_builtin import builtin_bench

        return builtin_bench(args, dev)
    import importlib.util

    spec = importlib.util.spec_from_file_location("moba_rewrite_bench_attention", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    say(f"running {script} on {dev}", quiet=args.quiet)
    return int(module.main(bench_argv(args, str(dev))) or 0)
