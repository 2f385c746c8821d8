"""A hybrid stack's recurrent state across ranks: the scan by recursive doubling vs the all-gather
of every chunk's summary (`moba_rewrite.parallel.recurrence`), bytes sent per rank, peak memory
and time, forward and backward of one gated delta net's rule.

    python benchmarks/bench_cp_recurrent.py --worlds 2,4,8,16
    python benchmarks/bench_cp_recurrent.py --worlds 2,4,8 --heads 32 --head-dim 128   # Qwen3-Next-80B's delta net

For every world size W it spawns W gloo ranks on this machine (CPU), shards one sequence
(`--layout`, `--chunk` tokens per chunk: the summaries' size does not depend on it) and runs, on
every rank, `delta_rule_cp` with transformers' reference gated delta rule (Qwen3-Next's
`torch_chunk_gated_delta_rule`), forward and backward, once by recursive doubling
(`log2 W` exchanges of one summary per scan with one partner each; W a power of two) and once by
the all-gather of every chunk's `H x d_k x (d_k + d_v)` fp32 summary (`SCAN_BY_DOUBLING = False`).
Bytes are what `record_traffic` counts under "recurrent state summaries" (the forward's; the
backward sends the same back), the busiest rank; peak is the most tensor memory one step holds at
once above its start (`bench_model.tensor_peak_cpu`: the allocator's running total under the
profiler), the largest rank; time is each rank's median over `--repeats`, the slowest rank.
The two outputs are compared (they compose the same summaries in a different order). On this
machine the ranks share its cores and gloo runs over loopback: the bytes and the memory are what
it measures faithfully.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_cp import report_ranks, run_worlds  # noqa: E402
from bench_model import tensor_peak_cpu  # noqa: E402
from moba_rewrite.parallel import record_traffic, shard_sequence  # noqa: E402
from moba_rewrite.parallel import recurrence  # noqa: E402


def _inputs(args, world: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(args.seed)
    chunks = world * (2 if args.layout == "zigzag" else 1)
    t, h, d = chunks * args.chunk, args.heads, args.head_dim
    q, k, v = (torch.randn(1, t, h, d, generator=gen) for _ in range(3))
    g = -torch.nn.functional.softplus(torch.randn(1, t, h, generator=gen)) * 0.1
    beta = torch.rand(1, t, h, generator=gen)
    return [q, k, v, g, beta]


def rank_main(rank: int, world: int, port: int, args, out_path: str) -> None:
    from transformers.models.qwen3_next.modeling_qwen3_next import torch_chunk_gated_delta_rule as rule

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=600))
    shards = [shard_sequence(x, layout=args.layout, dim=1) for x in _inputs(args, world)]
    result: dict = {"rank": rank}

    def step():
        q, k, v, g, beta = (x.clone().requires_grad_() for x in shards)
        out, _ = recurrence.delta_rule_cp(rule, q, k, v, g, beta, pg=dist.group.WORLD, layout=args.layout,
                                          use_qk_l2norm_in_kernel=True, chunk_size=64)
        out.sum().backward()
        return out.detach()

    outs = {}
    for mode, doubling in (("doubling", True), ("all-gather", False)):
        recurrence.SCAN_BY_DOUBLING = doubling
        with record_traffic() as traffic:
            outs[mode] = step()
        times = []
        for _ in range(args.repeats):
            dist.barrier()
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        dist.barrier()
        result[mode] = {"bytes": traffic.by_step.get(recurrence.SUMMARIES, 0),
                        "bytes_backward": traffic.by_step.get(f"{recurrence.SUMMARIES} (gradients)", 0),
                        "peak": int(tensor_peak_cpu(step, grad=True) or 0), "s": statistics.median(times)}
    result["max_diff"] = (outs["doubling"] - outs["all-gather"]).abs().max().item()
    report_ranks(result, world, rank, out_path)


def summarize(world: int, ranks: list[dict]) -> dict:
    row = {"world": world, "max_diff": max(r["max_diff"] for r in ranks)}
    for mode in ("doubling", "all-gather"):
        row[mode] = {key: max(r[mode][key] for r in ranks) for key in ("bytes", "bytes_backward", "peak", "s")}
    return row


def print_table(args, rows: list[dict]) -> None:
    mib = 2 ** 20
    per_chunk = args.heads * args.head_dim * 2 * args.head_dim * 4
    print(f"\none gated delta net, {args.heads} heads x {args.head_dim}, {args.layout}, {args.chunk} tokens per chunk, "
          f"fp32; one summary {per_chunk / mib:.2f} MiB per chunk and sequence; busiest rank\n")
    print("| ranks | summaries sent, doubling | summaries sent, all-gather | bytes ratio | peak, doubling | "
          "peak, all-gather | time, doubling | time, all-gather | max diff |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        d, a = r["doubling"], r["all-gather"]
        print(f"| {r['world']} | {d['bytes'] / mib:.2f} MiB | {a['bytes'] / mib:.2f} MiB | "
              f"{d['bytes'] / max(a['bytes'], 1):.2f} | {d['peak'] / mib:.1f} MiB | {a['peak'] / mib:.1f} MiB | "
              f"{d['s']:.3f} s | {a['s']:.3f} s | {r['max_diff']:.1e} |")
    print("\n(bytes: the forward's; the backward sends the same amount back)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worlds", default="2,4,8", help="comma-separated numbers of ranks")
    p.add_argument("--layout", choices=["contiguous", "zigzag"], default="zigzag")
    p.add_argument("--chunk", type=int, default=128, help="tokens per chunk")
    p.add_argument("--heads", type=int, default=8, help="value heads (= key heads)")
    p.add_argument("--head-dim", type=int, default=64, help="key and value head dim")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    rows = run_worlds(rank_main, [int(w) for w in args.worlds.split(",")], args, "bench_cp_recurrent", summarize)
    print_table(args, rows)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
