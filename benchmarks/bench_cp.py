"""Context-parallel MoBA vs the all-gather of K/V and ring attention: bytes sent per rank and time.

    python benchmarks/bench_cp.py --worlds 2,4 --tokens 32768 --block 512 --top-k 3 --data rope
    flock /tmp/moba-heavy.lock python benchmarks/bench_cp.py ...   # on a shared machine
    python benchmarks/bench_cp.py --model        # the volume model of docs/CONTEXT_PARALLEL.md
    python benchmarks/bench_cp.py --train ...    # also time MoBA-CP forward + backward (training)
    MOBA_REWRITE_CODE=/other/checkout python benchmarks/bench_cp.py ...   # time another version

For every world size W it spawns W gloo ranks on this machine (CPU), shards one causal sequence
(`--layout`: contiguously, T / W tokens per rank, or zigzag: one early and one late chunk per
rank, balanced causal work) and runs, on every rank, after one warm-up call:

* `moba_cp`: `moba_rewrite.parallel.moba_attention_cp` (block means all-gathered, global gate,
  then per remote tile either the tile fetched or the query rows that selected it shipped to
  its owner), once per `--exchange` mode: `keys` (fetch every tile), `queries` (ship every
  row), `auto` (per tile, whichever makes the tile's owner send less; the op's default);
* `allgather`: one all-gather of K and V, then `moba_attention` (`torch` backend) of each local
  chunk's queries over the keys up to the chunk's end: the same MoBA output, the simple way;
* `ring`: ring attention, dense causal: PyTorch's own implementation
  (`torch.distributed.tensor.experimental._context_parallel._attention._templated_ring_attention`,
  rotation by all-to-all, no load balancing, with the CPU flash-attention op), or this project's
  (`parallel.ring.ring_attention_cp`, what the dense sites of `context_parallel` run) when that
  private API is missing or `--ring own` is given.

"bytes sent" is the payload one rank hands to collectives for other ranks: for `moba_cp` counted
by `moba_rewrite.parallel.record_traffic` (block means, request codes, key/value tiles, shipped
query rows and the partial outputs returned for them, the all-ranks-agree check); for `allgather` and `ring` it is `(W - 1) x` the rank's K and V bytes
(every rank sends its shard to every other rank, once or over W - 1 ring steps). Time: median
over `--repeats` calls of each rank's wall time (collectives included), the slowest rank
reported. `--data rope` draws q and k as a shared direction plus noise, rotated by RoPE at their
positions (as every RoPE model's q/k are): the gate then prefers recent blocks, the more so the
larger `--signal` (the direction's norm over the noise's; 1 by default, where query noise still
spreads the picks over most earlier blocks); `--data random` draws i.i.d. normal q, k, v (routing close to uniform: the worst case for
the bytes MoBA-CP saves). The output also gives the fraction of the reachable remote tiles that
were fetched (tiles sent by all ranks over all (batch, kv head, block) tiles that causal queries
could select on another rank), and checks that `moba_cp` and `allgather` give the same output.

With `--layout contiguous` it also times one decode step against the same K/V as a sharded KV
cache (`T / W` slots per rank, the sequence's last query): `moba_decode_cp` with the block means
kept beside the cache (as `integrations.hf_cp_generate` keeps them), the same op recomputing
them from the keys, and exact full attention over the sharded cache (`sdpa_decode_cp`, what dense
sites decode with: each rank attends its whole slice, log-sum-exp combine), with the bytes each sends per step (no
all-ranks-agree check per step, as `generate` runs it on its first step only).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# The checkout measured: this one, or MOBA_REWRITE_CODE's (to time two versions on one machine).
CODE = os.environ.get("MOBA_REWRITE_CODE") or str(Path(__file__).resolve().parents[1])
sys.path.insert(0, CODE)

from moba_rewrite.attention import moba_attention  # noqa: E402
from moba_rewrite.attention.block_means import key_block_means  # noqa: E402
from moba_rewrite.parallel import (moba_attention_cp, moba_decode_cp, record_traffic, sdpa_decode_cp,  # noqa: E402
                                   shard_sequence, unshard_sequence)
from moba_rewrite.parallel.layout import ShardLayout  # noqa: E402


def rope(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotary position embedding (half-split convention, as Llama) of `[B, H, T, D]` at `positions`."""
    d = x.shape[-1]
    freqs = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = positions.double()[:, None] * freqs[None, :]
    cos, sin = ang.cos().float(), ang.sin().float()
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def make_inputs(args) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The whole sequence's q, k, v (identical on every rank: same seed)."""
    g = torch.Generator().manual_seed(args.seed)
    b, h, t, d = args.batch, args.heads, args.tokens, args.dim
    q, k, v = (torch.randn(b, h, t, d, generator=g) for _ in range(3))
    if args.data == "rope":
        direction = torch.randn(1, h, 1, d, generator=g)
        direction = direction / direction.norm(dim=-1, keepdim=True) * d ** 0.5 * args.signal
        pos = torch.arange(t)
        q = rope(direction + q, pos)
        k = rope(direction + k, pos)
    return q, k, v


# --------------------------------------------------------------------------------------------
# Ring attention


def _torch_ring(q, k, v):
    from torch.distributed.tensor.experimental._context_parallel import _attention as cp_attention

    cp_attention._cp_options.enable_load_balance = False
    cp_attention._cp_options.rotate_method = cp_attention._RotateMethod.ALL_TO_ALL
    out, *_ = cp_attention._templated_ring_attention(
        dist.group.WORLD, 2, torch.ops.aten._scaled_dot_product_flash_attention_for_cpu, q, k, v, is_causal=True)
    return out


def _own_ring(q, k, v):
    """This project's ring attention (`parallel.ring.ring_attention_cp`: K/V shards passed around the
    ring, parts merged by log-sum-exp; what the dense sites of `context_parallel` run), causal,
    contiguous shards, no rank-agreement check."""
    from moba_rewrite.parallel.ring import ring_attention_cp

    return ring_attention_cp(q, k, v, causal=True, layout="contiguous", check_ranks=False)


# --------------------------------------------------------------------------------------------
# One rank


def _time(fn, repeats: int) -> list[float]:
    fn()  # warm-up: thread pools, one-time buffers
    times = []
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def _decode_step(q, k, v, args, world: int) -> dict:
    """One decode step of the sequence's last query against K/V as a contiguously sharded cache."""
    last = torch.empty_like(q[:, :, -1:])
    if dist.get_rank() == world - 1:
        last.copy_(q[:, :, -1:])
    dist.broadcast(last, src=world - 1)  # the newest token's query, the same on every rank
    bs = args.block
    means = key_block_means(k, bs)
    kw = dict(seq_len=args.tokens, check_ranks=False)  # as generate's steps after the first
    calls = {
        "moba_kept_means": lambda: moba_decode_cp(last, k, v, block_size=bs, top_k=args.top_k, key_block_means=means,
                                                  **kw),
        "moba": lambda: moba_decode_cp(last, k, v, block_size=bs, top_k=args.top_k, **kw),
        "dense": lambda: sdpa_decode_cp(last, k, v, **kw),
    }
    out = {}
    for name, fn in calls.items():
        with record_traffic() as traffic:
            fn()
        out[name] = {"bytes": traffic.bytes_sent, "s": _time(fn, max(args.repeats, 5))}
    return out


def rank_main(rank: int, world: int, port: int, args, out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=600))
    layout = args.layout
    q, k, v = (shard_sequence(x, layout=layout) for x in make_inputs(args))
    bs, top_k = args.block, args.top_k
    kv_bytes = (k.numel() + v.numel()) * k.element_size()
    t_local = q.shape[2]
    lay = ShardLayout(layout, world, t_local)
    chunk = lay.chunk_len
    result: dict = {"rank": rank}

    def run_moba_cp(exchange: str):
        with torch.no_grad():
            return moba_attention_cp(q, k, v, block_size=bs, top_k=top_k, causal=True, exchange=exchange,
                                     layout=layout)

    def run_allgather():
        """All of K and V, then each local chunk's queries against the keys up to the chunk's end."""
        with torch.no_grad():
            kv = unshard_sequence(torch.stack([k, v]), layout=layout, dim=3)  # [2, B, H, T, D] (one all-gather)
            outs = []
            for i, c in enumerate(lay.chunks(rank)):
                end = (c + 1) * chunk
                outs.append(moba_attention(q[:, :, i * chunk:(i + 1) * chunk], kv[0, :, :, :end], kv[1, :, :, :end],
                                           block_size=bs, top_k=top_k, causal=True, backend="torch"))
            return torch.cat(outs, dim=2)

    def train_moba_cp(exchange: str):
        """Forward and backward (every rank runs both), as a training step's attention does."""
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]
        out = moba_attention_cp(*leaves, block_size=bs, top_k=top_k, causal=True, exchange=exchange, layout=layout)
        out.backward(torch.ones_like(out))

    out_ag = run_allgather()
    tile = 2 * bs * q.shape[-1] * q.element_size()
    # (batch, kv head, block) tiles this rank's causal queries could select on other ranks: every
    # block before its last one that it does not hold
    own = lay.blocks(rank, bs)
    result["reachable_remote_tiles"] = (max(own) + 1 - len(own)) * q.shape[0] * k.shape[1]
    result["modes"] = {}
    for exchange in args.exchange.split(","):
        with record_traffic() as traffic:
            out_cp = run_moba_cp(exchange)
        result["modes"][exchange] = {
            "bytes": traffic.bytes_sent, "bytes_by_step": traffic.by_step,
            "tiles_sent": traffic.by_step.get("key/value blocks", 0) / tile,
            "rows_shipped": traffic.by_step.get("shipped queries", 0) / (q.shape[-1] * q.element_size()),
            "max_diff_vs_allgather": (out_cp - out_ag).abs().max().item(),
            "s": _time(lambda: run_moba_cp(exchange), args.repeats),
        }
        if args.train:
            result["modes"][exchange]["train_s"] = _time(lambda: train_moba_cp(exchange), args.repeats)
    if layout == "contiguous":
        result["decode"] = _decode_step(q, k, v, args, world)
    result["allgather_bytes"] = (world - 1) * kv_bytes
    result["ring_bytes"] = (world - 1) * kv_bytes
    result["allgather_s"] = _time(run_allgather, args.repeats)
    if args.ring != "skip":  # contiguous shards whatever --layout is (ring moves the same bytes either way)
        qr, kr, vr = (q, k, v) if layout == "contiguous" else (shard_sequence(x) for x in make_inputs(args))
        ring = _own_ring
        result["ring_impl"] = "own (parallel.ring.ring_attention_cp)"
        if args.ring == "torch":
            try:
                _torch_ring(q[:, :, :bs], k[:, :, :bs], v[:, :, :bs])
                ring = _torch_ring
                result["ring_impl"] = "torch _templated_ring_attention (all-to-all rotation)"
            except Exception as e:  # noqa: BLE001 - private API: fall back to our ring, and say so
                result["ring_impl"] = f"own (ring_attention_cp); torch's failed: {type(e).__name__}: {e}"[:300]
        with torch.no_grad():
            result["ring_s"] = _time(lambda: ring(qr, kr, vr), args.ring_repeats)
    report_ranks(result, world, rank, out_path)


# --------------------------------------------------------------------------------------------
# Driver


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def report_ranks(result: dict, world: int, rank: int, out_path: str) -> None:
    """Every rank's `result` gathered; rank 0 writes them (a list in rank order) to `out_path`;
    the group is then closed (call last, on every rank)."""
    everyone = [None] * world
    dist.all_gather_object(everyone, result)
    if rank == 0:
        Path(out_path).write_text(json.dumps(everyone))
    dist.destroy_process_group()


def run_worlds(rank_main, worlds, args, name: str, summarize, announce: bool = False) -> list[dict]:
    """For each world size W: spawn W processes running `rank_main(rank, W, port, args, out_path)`
    and summarize their results (`summarize(W, list of rank results)`)."""
    rows = []
    for world in worlds:
        out = Path(f"/tmp/{name}_{os.getpid()}_{world}.json")
        if announce:
            print(f"{world} rank(s) ...", flush=True)
        mp.start_processes(rank_main, args=(world, _free_port(), args, str(out)), nprocs=world, start_method="spawn")
        rows.append(summarize(world, json.loads(out.read_text())))
        out.unlink()
    return rows


def summarize(world: int, ranks: list[dict]) -> dict:
    slowest = lambda values: max(statistics.median(v) for v in values)  # noqa: E731
    row = {
        "world": world,
        "allgather_bytes": ranks[0]["allgather_bytes"],
        "ring_bytes": ranks[0]["ring_bytes"],
        "allgather_s": slowest(r["allgather_s"] for r in ranks),
        "modes": {},
        "per_rank": ranks,
    }
    if "ring_s" in ranks[0]:
        row["ring_s"] = slowest(r["ring_s"] for r in ranks)
        row["ring_impl"] = ranks[0]["ring_impl"]
    reachable = max(1, sum(r["reachable_remote_tiles"] for r in ranks))
    for mode in ranks[0]["modes"]:
        per = [r["modes"][mode] for r in ranks]
        m = {
            "bytes_max": max(p["bytes"] for p in per),
            "bytes_mean": statistics.mean(p["bytes"] for p in per),
            "fetched_fraction_of_reachable_remote_tiles": sum(p["tiles_sent"] for p in per) / reachable,
            "rows_shipped": sum(p["rows_shipped"] for p in per),
            "s": slowest(p["s"] for p in per),
            "max_diff_vs_allgather": max(p["max_diff_vs_allgather"] for p in per),
        }
        if "train_s" in per[0]:
            m["train_s"] = slowest(p["train_s"] for p in per)
        m["bytes_ratio_vs_ring_max"] = m["bytes_max"] / row["ring_bytes"]
        m["bytes_ratio_vs_ring_mean"] = m["bytes_mean"] / row["ring_bytes"]
        m["time_ratio_vs_allgather"] = m["s"] / row["allgather_s"]
        row["modes"][mode] = m
    if "decode" in ranks[0]:
        row["decode"] = {name: {"s": slowest(r["decode"][name]["s"] for r in ranks),
                                "bytes_max": max(r["decode"][name]["bytes"] for r in ranks)}
                         for name in ranks[0]["decode"]}
    return row


def print_table(args, rows: list[dict]) -> None:
    mib = 1 << 20
    data = f"rope, signal {args.signal:g}" if args.data == "rope" else args.data
    print(f"\ncausal prefill, fp32, B={args.batch} H={args.heads} D={args.dim} T={args.tokens} block={args.block} "
          f"top-{args.top_k}, data={data}, {args.layout} shards, CPU gloo, {os.cpu_count()} cores; bytes sent per "
          f"rank, forward; code: {CODE}")
    print("| W | exchange | MoBA-CP MiB sent (max / mean per rank) | ring = all-gather MiB | MoBA-CP / ring bytes "
          "(max / mean) | reachable remote tiles fetched | query rows shipped (once per owner) | MoBA-CP s | all-gather s | ring s "
          "| MoBA-CP / all-gather time | MoBA-CP forward + backward s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ring_s = f"{r['ring_s']:.3f}" if "ring_s" in r else "-"
        for mode, m in r["modes"].items():
            train_s = f"{m['train_s']:.3f}" if "train_s" in m else "-"
            print(f"| {r['world']} | {mode} | {m['bytes_max'] / mib:.2f} / {m['bytes_mean'] / mib:.2f} "
                  f"| {r['ring_bytes'] / mib:.2f} "
                  f"| {m['bytes_ratio_vs_ring_max']:.3f} / {m['bytes_ratio_vs_ring_mean']:.3f} "
                  f"| {100 * m['fetched_fraction_of_reachable_remote_tiles']:.1f}% | {int(m['rows_shipped'])} "
                  f"| {m['s']:.3f} | {r['allgather_s']:.3f} | {ring_s} | {m['time_ratio_vs_allgather']:.2f} "
                  f"| {train_s} |")
    for r in rows:
        diffs = ", ".join(f"{mode} {m['max_diff_vs_allgather']:.2e}" for mode, m in r["modes"].items())
        print(f"W={r['world']}: ring = {r.get('ring_impl', 'skipped')}; max |moba_cp - allgather|: {diffs}")
    if any("decode" in r for r in rows):
        print(f"\none decode step (B={args.batch}, Tq=1) against a KV cache of {args.tokens} tokens sharded "
              f"contiguously ({args.tokens} / W per rank), block {args.block}, top-{args.top_k}; ms per step of the "
              f"slowest rank, bytes sent per rank and step")
        print("| W | MoBA, means kept ms | MoBA, means recomputed ms | full attention ms | full / MoBA (kept) | "
              "bytes MoBA / full |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            d = r.get("decode")
            if d:
                kept, plain, full = (1e3 * d[n]["s"] for n in ("moba_kept_means", "moba", "dense"))
                print(f"| {r['world']} | {kept:.2f} | {plain:.2f} | {full:.2f} | {full / kept:.2f}x | "
                      f"{d['moba_kept_means']['bytes_max']} / {d['dense']['bytes_max']} |")


# --------------------------------------------------------------------------------------------
# Volume model (docs/CONTEXT_PARALLEL.md): bytes one rank sends per attention layer, forward

# Bandwidths (per GPU, one direction), see docs/CONTEXT_PARALLEL.md for the sources:
NVLINK_GBPS = 450.0  # H100/H200 SXM: 18 NVLink-4 links, 900 GB/s both directions
IB_GBPS = 50.0  # one 400 Gb/s InfiniBand NDR (ConnectX-7) port per GPU
GPUS_PER_NODE = 8


def volume_model(tokens: int, world: int, *, kv_heads=8, head_dim=128, block=4096, fetched=1.0,
                 elem_bytes=2) -> dict:
    """Per-rank bytes sent in one attention layer's forward, contiguous causal shards (the busiest
    rank, W - 1, can reach every other shard), and the time at the slowest link it crosses."""
    shard_kv = tokens / world * 2 * kv_heads * head_dim * elem_bytes
    ring = (world - 1) * shard_kv  # W - 1 steps of the rank's K and V (all-gather: the same)
    means = (world - 1) * (tokens / world / block) * kv_heads * head_dim * 4  # fp32 block means
    bitmaps = (world - 1) * (tokens / world / block) * kv_heads * 4  # int32 request codes
    moba_max = means + bitmaps + fetched * (world - 1) * shard_kv
    moba_mean = means + bitmaps + fetched * (world - 1) / 2 * shard_kv
    gbps = NVLINK_GBPS if world <= GPUS_PER_NODE else IB_GBPS
    return {"ring": ring, "moba_max": moba_max, "moba_mean": moba_mean, "gbps": gbps}


def print_model() -> None:
    gib = 1 << 30
    print("Per rank, one attention layer, forward, bf16 K/V, 8 kv heads x 128 (Llama-3-8B-like), block 4096;")
    print(f"links: NVLink {NVLINK_GBPS:g} GB/s within a node of {GPUS_PER_NODE}, InfiniBand {IB_GBPS:g} GB/s across "
          f"nodes; f = fraction of the reachable remote tiles a rank fetches")
    print("| tokens | GPUs | ring / all-gather GiB | ms | MoBA-CP GiB f=1 (busiest rank) | f=0.25 | f=0.05 | ms f=1 / 0.25 / 0.05 |")
    print("|---|---|---|---|---|---|---|---|")
    for tokens in (1 << 20, 10 * (1 << 20)):
        for world in (8, 16, 32, 64):
            m = {f: volume_model(tokens, world, fetched=f) for f in (1.0, 0.25, 0.05)}
            ms = lambda b: b / (m[1.0]["gbps"] * 1e9) * 1e3  # noqa: E731
            print(f"| {tokens // (1 << 20)}M | {world} | {m[1.0]['ring'] / gib:.2f} | {ms(m[1.0]['ring']):.1f} "
                  f"| {m[1.0]['moba_max'] / gib:.2f} | {m[0.25]['moba_max'] / gib:.3f} | {m[0.05]['moba_max'] / gib:.3f} "
                  f"| {ms(m[1.0]['moba_max']):.1f} / {ms(m[0.25]['moba_max']):.1f} / {ms(m[0.05]['moba_max']):.2f} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worlds", default="2,4", help="comma-separated numbers of ranks")
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--block", type=int, default=512)
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--data", choices=["rope", "random"], default="rope")
    p.add_argument("--signal", type=float, default=1.0,
                   help="--data rope: norm of the shared q/k direction over the noise's (higher = more local routing)")
    p.add_argument("--layout", choices=["contiguous", "zigzag"], default="contiguous",
                   help="how the sequence is sharded (zigzag: each rank one early and one late chunk)")
    p.add_argument("--exchange", default="keys,queries,auto",
                   help="moba_attention_cp exchange modes to measure (comma-separated: keys, queries, auto)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--ring", choices=["torch", "own", "skip"], default="torch")
    p.add_argument("--ring-repeats", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train", action="store_true", help="also time MoBA-CP forward + backward per exchange mode")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--model", action="store_true", help="print the volume model at 1M and 10M tokens and exit")
    args = p.parse_args(argv)
    if args.model:
        print_model()
        return 0
    rows = run_worlds(rank_main, [int(w) for w in args.worlds.split(",")], args, "bench_cp", summarize)
    print_table(args, rows)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
