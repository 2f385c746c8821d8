"""Steps shared by the commands: read the policy and the checkpoint, pick the device and the
sample length, build sample inputs, plan and rewrite, with failures mapped to exit codes."""

from __future__ import annotations

import argparse
import os

from moba_rewrite.cli.errors import (EXIT_ARCHITECTURE, EXIT_POLICY, EXIT_VALUE, CliError, checkpoint_errors,
                                     rewrite_error, warn)


def load_policy(path: str | os.PathLike | dict):
    from moba_rewrite.policy import PolicyError, load_policy as _load

    try:
        return _load(path if isinstance(path, dict) else os.fspath(path))
    except PolicyError as exc:
        raise CliError("", str(exc), EXIT_POLICY) from exc


def read(args: argparse.Namespace, path: str | None = None):
    """Read the checkpoint named on the command line (dense), mapping failures to exit codes."""
    from moba_rewrite import checkpoints as ck

    try:  # our own progress bar covers loading; transformers' per-tensor bars would be noise
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass
    with checkpoint_errors():
        loaded = ck.read_checkpoint(path or args.checkpoint, config=getattr(args, "config", None),
                                    trust_pickle=getattr(args, "trust_pickle", False),
                                    trust_remote_code=getattr(args, "trust_remote_code", False),
                                    dtype=getattr(args, "dtype", None),
                                    allow_random_init=getattr(args, "allow_random_init", False))
    if loaded.kind == "generation":
        raise CliError(loaded.path, "expected a model or a .pt2 program; this is a generation artifact (rewrite "
                                    "--generate): run it with moba-rewrite generate", EXIT_ARCHITECTURE)
    if loaded.random_init:
        warn(f"{loaded.path}: weights initialised randomly, as --allow-random-init allows ({loaded.random_init}); "
             "this is not the trained model")
    return loaded


def device(name: str):
    import torch

    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise CliError("--device", f"expected cpu, cuda or cuda:N, got {name!r}", EXIT_VALUE) from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CliError("--device", "expected a device this machine has (no CUDA device found)", EXIT_VALUE)
    return dev


def policy_blocks(policy) -> tuple[int, int]:
    """(largest MoBA block_size, its top_k) the policy can assign: sizes a default sample input."""
    best = (policy.defaults.block_size, policy.defaults.top_k)
    for rule in policy.rules:
        o = rule.overrides()
        if o.get("mode", "moba") == "moba" and "block_size" in o:
            best = max(best, (o["block_size"], o.get("top_k", policy.defaults.top_k)))
    return best


def max_positions(model) -> int | None:
    cfg = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def default_seq_len(model, policy) -> int:
    """Long enough that MoBA routes: (top_k + 1) blocks of the largest block, within the model's limit."""
    block, top_k = policy_blocks(policy) if policy is not None else (16, 1)
    want = (top_k + 1) * block
    limit = max_positions(model)
    return max(2, min(want, limit) if limit else want)


def check_seq_len(seq_len: int, model, where: str = "--seq-len") -> None:
    if seq_len < 1:
        raise CliError(where, f"expected a positive number of tokens, got {seq_len}", EXIT_VALUE)
    limit = max_positions(model)
    if limit is not None and seq_len > limit:
        raise CliError(where, f"expected at most the model's {limit} positions, got {seq_len}", EXIT_VALUE)


def check_seq_covers_blocks(seq_len: int, report) -> None:
    """MoBA needs at least one full block of keys; shorter samples would verify nothing."""
    moba = [r for r in report.rows if r.decision == "moba" and r.block_size]
    if not moba:
        return
    row = min(moba, key=lambda r: r.block_size)
    if seq_len < row.block_size:
        raise CliError("--seq-len", f"expected at least one MoBA block ({row.block_size} tokens, site "
                                    f"{row.name or '(root)'}), got {seq_len}; shorter inputs never route",
                       EXIT_VALUE)


def sample(model, seq_len: int, device=None, *, seed: int = 0):
    from moba_rewrite.exporters.common import sample_inputs

    try:
        args = sample_inputs(model, seq_len, seed=seed)
    except ValueError as exc:
        raise CliError("", str(exc), EXIT_ARCHITECTURE) from exc
    return tuple(a.to(device) for a in args) if device is not None else args


def plan(model, policy, args):
    """`mr.plan` (decisions only, the model untouched) with failures mapped to exit codes."""
    import moba_rewrite as mr

    try:
        return mr.plan(model, policy, args)
    except Exception as exc:
        raise rewrite_error(exc) from exc


def rewrite_model(model, policy, args):
    """`mr.rewrite` with failures mapped to exit codes; returns the report."""
    import moba_rewrite as mr

    try:
        mr.rewrite(model, policy, example_inputs=args)
    except CliError:
        raise
    except Exception as exc:
        raise rewrite_error(exc) from exc
    return model._moba_report


def plan_and_rewrite(model, policy, args, seq_len: int):
    """Plan first (so a too-short sample fails before the model changes), then rewrite; the report."""
    check_seq_covers_blocks(seq_len, plan(model, policy, args))
    return rewrite_model(model, policy, args)
