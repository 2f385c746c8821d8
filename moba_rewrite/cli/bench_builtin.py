"""`bench --builtin` (and `bench` in an installed package without benchmarks/): forward time of
MoBA, each backend that runs on the device, against causal scaled_dot_product_attention."""

from __future__ import annotations

import argparse
import time
from typing import Any, Callable

from moba_rewrite.cli.errors import EXIT_OK
from moba_rewrite.cli.output import progress_for, say
from moba_rewrite.cli.output import table as render_table


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


def builtin_bench(args: argparse.Namespace, dev) -> int:
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
    bar = progress_for(args, len(lens))
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
    print(render_table(table))
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
