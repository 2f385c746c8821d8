"""`moba-rewrite demo`: the whole path on a small built-in checkpoint, no arguments needed.

It builds a small Llama-architecture checkpoint with random weights in a work folder,
inspects it, rewrites it with a layer-wise hybrid policy (MoBA everywhere but the last
layer), loads the rewritten checkpoint back, `torch.compile`s it, runs an 8K-token prompt
through the original (dense) model and the eager and compiled MoBA models (long enough for
MoBA to win on a 2-core CPU: about 1.7x there), exports `.pt2` and ONNX (each verified against
the in-memory model, ONNX with onnxruntime), and prints the report, timings and file
locations. Sized to finish in under 2 minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time
from pathlib import Path

import torch

DEMO_CONFIG = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16384,
                   rope_theta=10000.0, tie_word_embeddings=False)
DEMO_SEQ_LEN = 8192  # where MoBA (block 64, top-3: 2% of the keys per query) clearly beats dense
EXPORT_SEQ_LEN = 256

DEMO_POLICY = {
    "version": 1,
    "description": "Layer-wise hybrid (MoBA paper): MoBA everywhere, the last layer kept dense.",
    "defaults": {"mode": "moba", "block_size": 64, "top_k": 3, "backend": "auto", "decode": "moba"},
    "rules": [{"name": "dense-tail", "layers": "-1:", "mode": "dense"}],
}


def build_checkpoint(directory: Path, seed: int = 0) -> Path:
    """Save a small random-weight Llama (`LlamaForCausalLM`) as a Hugging Face directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**DEMO_CONFIG)).eval()
    model.save_pretrained(str(directory))
    return directory


@contextlib.contextmanager
def _no_transformers_progress():
    """transformers draws a "Writing model shards" bar on stderr in save_pretrained: not ours."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _ms(fn, repeats: int = 2) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3, out


def run(out_dir: str | os.PathLike | None = None, *, seq_len: int | None = None, quiet: bool = False,
        progress: bool = True, force: bool = False, onnx: bool = True) -> dict:
    """Run the demo; returns the paths, timings and checks it printed (for tests and callers)."""
    with _no_transformers_progress():
        return _run(out_dir, seq_len=seq_len, quiet=quiet, progress=progress, force=force, onnx=onnx)


def _run(out_dir, *, seq_len, quiet, progress, force, onnx) -> dict:
    import moba_rewrite as mr
    from moba_rewrite import checkpoints
    from moba_rewrite.cli import errors as cli
    from moba_rewrite.cli.inspect_cmd import cmd_inspect
    from moba_rewrite.cli.output import Progress
    from moba_rewrite.cli.rewrite_cmd import run_rewrite
    from moba_rewrite.policy import dump_policy

    n = seq_len or DEMO_SEQ_LEN
    if n < DEMO_POLICY["defaults"]["block_size"]:
        raise cli.CliError("--seq-len", f"expected at least one MoBA block ({DEMO_POLICY['defaults']['block_size']} "
                                        f"tokens), got {n}", cli.EXIT_VALUE)
    if n > DEMO_CONFIG["max_position_embeddings"]:
        raise cli.CliError("--seq-len", f"expected at most {DEMO_CONFIG['max_position_embeddings']} tokens, got {n}",
                           cli.EXIT_VALUE)
    if out_dir is None:
        work = Path(tempfile.mkdtemp(prefix="moba-rewrite-demo-"))
    else:
        work = Path(out_dir)
        if work.exists() and any(work.iterdir()) and not force:
            raise cli.CliError(work, "expected an empty or new folder (pass --force to reuse it)",
                               cli.EXIT_OUTPUT_EXISTS)
        try:
            work.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise cli.CliError(work, f"expected a writable location ({exc.strerror})", cli.EXIT_OUTPUT_UNWRITABLE)
    ckpt, policy_file = work / "llama-tiny", work / "hybrid.yaml"
    hf_out, pt2_out, onnx_out = work / "llama-tiny-moba", work / "llama-tiny-moba.pt2", work / "llama-tiny-moba.onnx"
    for p in (ckpt, hf_out, pt2_out, onnx_out):
        if p.is_dir():
            import shutil

            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    timings: dict[str, float] = {}
    t_start = time.perf_counter()

    say(f"moba-rewrite demo: work folder {work}")
    bar = Progress(5, enabled=progress and not quiet)
    try:
        with bar.step("building a small Llama checkpoint"):
            t0 = time.perf_counter()
            build_checkpoint(ckpt)
            dump_policy(mr.load_policy(DEMO_POLICY), policy_file)
            timings["build checkpoint"] = time.perf_counter() - t0
    finally:
        bar.close()

    say("\n== inspect ==")
    t0 = time.perf_counter()
    if not quiet:
        cmd_inspect(argparse.Namespace(checkpoint=str(ckpt), seq_len=None, json=False, quiet=False, no_progress=True))
    timings["inspect"] = time.perf_counter() - t0

    say(f"\n== rewrite with the hybrid policy ({policy_file.name}) -> hf checkpoint ==")
    export_len = min(EXPORT_SEQ_LEN, n)
    result = run_rewrite(ckpt, policy_file, hf_out, fmt="hf", seq_len=export_len, quiet=quiet,
                             progress=progress)
    timings["rewrite + verify (hf)"] = sum(t for _, t in result.timings)

    say("\n== load the rewritten checkpoint, run eager and torch.compile'd ==")
    bar = Progress(4, enabled=progress and not quiet)
    try:
        with bar.step("loading rewritten checkpoint"):
            model = mr.load(hf_out)
            dense = checkpoints.read_checkpoint(ckpt).model
            ids = torch.randint(0, DEMO_CONFIG["vocab_size"], (1, n), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            with bar.step("eager forward (dense and MoBA)"):
                dense_ms, dense_logits = _ms(lambda: dense(input_ids=ids).logits)
                eager_ms, eager_logits = _ms(lambda: model(input_ids=ids).logits)
            with bar.step("torch.compile (first call compiles)"):
                compiled = torch.compile(model)
                t0 = time.perf_counter()
                compiled(input_ids=ids)
                compile_s = time.perf_counter() - t0
            with bar.step("compiled forward"):
                compiled_ms, compiled_logits = _ms(lambda: compiled(input_ids=ids).logits)
    finally:
        bar.close()
    compiled_diff = float((compiled_logits - eager_logits).abs().max())
    agree = float((dense_logits.argmax(-1) == eager_logits.argmax(-1)).float().mean())
    timings["torch.compile (first call)"] = compile_s
    say(f"prompt of {n} tokens: original (dense) {dense_ms:.0f} ms, MoBA {eager_ms:.0f} ms eager "
        f"({dense_ms / eager_ms:.2f}x), MoBA compiled {compiled_ms:.0f} ms ({dense_ms / compiled_ms:.2f}x; "
        f"compile {compile_s:.1f} s)")
    say(f"compiled vs eager MoBA: max |diff| {compiled_diff:.2e}; MoBA vs dense next-token agreement "
        f"{agree:.0%} (random weights)")

    say("\n== export .pt2 (dynamic sequence length) ==")
    pt2 = run_rewrite(ckpt, policy_file, pt2_out, fmt="pt2", seq_len=export_len, dynamic=True,
                          quiet=True, progress=progress)
    timings["export + verify (pt2)"] = sum(t for _, t in pt2.timings)
    say(f"wrote {pt2_out}, verified at {export_len} and more tokens: max |diff| {pt2.max_diff:.2e}")
    onnx_res = None
    if onnx:
        say("\n== export ONNX (MoBA as com.moba_rewrite::Attention, checked with onnxruntime) ==")
        onnx_res = run_rewrite(ckpt, policy_file, onnx_out, fmt="onnx", seq_len=export_len, dynamic=True,
                                   quiet=True, progress=progress)
        timings["export + verify (onnx)"] = sum(t for _, t in onnx_res.timings)
        say(f"wrote {onnx_out}, onnxruntime vs torch: max |diff| {onnx_res.max_diff:.2e}")

    total = time.perf_counter() - t_start
    say("\n== timings ==")
    for name, sec in timings.items():
        say(f"  {name:<28} {sec:6.1f} s")
    say(f"  {'total':<28} {total:6.1f} s")
    say("\n== files ==")
    for label, path in (("checkpoint", ckpt), ("policy", policy_file), ("rewritten (hf)", hf_out),
                        ("program (pt2)", pt2_out), ("onnx", onnx_out if onnx else None)):
        if path is not None:
            say(f"  {label:<16} {path}")
    say(f"\nnext: python -c \"import moba_rewrite as mr, torch; m = torch.compile(mr.load('{hf_out}'))\"")
    return {"work": work, "checkpoint": ckpt, "policy": policy_file, "hf": hf_out, "pt2": pt2_out,
            "onnx": onnx_out if onnx else None, "report": result.report, "compiled_diff": compiled_diff,
            "pt2_diff": pt2.max_diff, "onnx_diff": onnx_res.max_diff if onnx_res else None,
            "timings": timings, "total_s": total, "eager_logits_shape": tuple(eager_logits.shape),
            "dense_ms": dense_ms, "moba_ms": eager_ms, "compiled_ms": compiled_ms}
