"""A whole rewritten model under context parallelism: dense vs MoBA, one process vs W ranks.

    python benchmarks/bench_cp_model.py --tokens 16384 --worlds 1,2,4
    python benchmarks/bench_cp_model.py --tokens 8192 --worlds 1,2 --backward --plot cp_model.png
    MOBA_REWRITE_CODE=/other/checkout python benchmarks/bench_cp_model.py ...   # time another version

A Llama-style transformers model (random weights, sizes as flags; `--family qwen3_5`: Qwen3.5's
hybrid stack, gated delta nets with attention every 4th layer, whose states cross ranks by
`parallel.recurrence`, their bytes shown apart; `--family llama4`: Llama 4's text stack, chunked
attention (`--chunk` tokens) with a full NoPE layer every 4th, dense MLPs, the chunked layers'
bytes shown apart) is rewritten twice: every
site MoBA (`--block`, `--top-k`) and every site dense (`mode: dense`, the same model path). For
every world size W it spawns W gloo ranks on this machine (CPU; W = 1 runs the same model in one
process without `context_parallel`: the single-device baseline), shards one sequence
(`shard_inputs`, `--layout`: zigzag by default, the load-balanced causal layout) and times the
model's forward up to its last hidden states ( as a training step with a chunked loss
uses them: the LM head on the last position only; `--backward`: forward and backward of a
weighted sum of them) on every rank, median of `--repeats` after one warm-up, the slowest rank
reported. Per rank it also gives the peak tensor memory of one step (the CPU allocator's running
total under the profiler: what the step holds at once above what was held before it, weights
and gradients excluded) and the bytes sent to other ranks
(`parallel.record_traffic`: MoBA-CP's means, requests, tiles and shipped rows; a dense site's
K/V shards passed around the ring, or all-gathered with `--dense-form gather`). Every sharded run is checked against one process's run of the same rewrite
(rank 0, after the timing): the largest difference of the hidden states.

On a 2-core CPU W ranks share the two cores (time-sliced), so time does not fall with W here;
memory per rank and bytes are what this machine measures faithfully.
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

# The checkout measured: this one, or MOBA_REWRITE_CODE's (to time two versions on one machine).
CODE = os.environ.get("MOBA_REWRITE_CODE") or str(Path(__file__).resolve().parents[1])
sys.path.insert(0, CODE)
sys.path.insert(0, str(Path(__file__).resolve().parent))

from moba_rewrite.parallel import recurrence  # noqa: E402

MODES = ("dense", "moba")


def build(args, mode: str):
    """The rewritten model: every site MoBA or every site dense (same weights for both)."""
    import transformers

    import moba_rewrite as mr

    sizes = dict(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                 num_hidden_layers=args.layers, num_attention_heads=args.heads,
                 num_key_value_heads=args.kv_heads or args.heads, head_dim=args.head_dim,
                 max_position_embeddings=args.tokens + 8, tie_word_embeddings=False)
    if args.family == "qwen3_5":  # gated delta nets, full attention every 4th layer (bench_model's hybrid)
        cfg = transformers.Qwen3_5TextConfig(**sizes, linear_num_key_heads=args.heads, linear_num_value_heads=args.heads,
                                             linear_key_head_dim=args.head_dim, linear_value_head_dim=args.head_dim)
        cls = transformers.Qwen3_5ForCausalLM
    elif args.family == "llama4":  # chunked attention, a NoPE full-attention layer every 4th; no MoE layers
        cfg = transformers.Llama4TextConfig(**sizes, intermediate_size_mlp=2 * args.hidden, moe_layers=[],
                                            attention_chunk_size=args.chunk)
        cls = transformers.Llama4ForCausalLM
    else:
        cfg, cls = transformers.LlamaConfig(**sizes), transformers.LlamaForCausalLM
    torch.manual_seed(args.seed)
    model = cls(cfg).eval()
    model.set_attn_implementation("sdpa")
    policy = {"version": 1, "defaults": {"mode": mode, "block_size": args.block, "top_k": args.top_k}}
    return mr.rewrite(model, policy)


def _inputs(args):
    g = torch.Generator().manual_seed(args.seed + 1)
    ids = torch.randint(0, args.vocab, (1, args.tokens), generator=g)
    weights = torch.randn(1, args.tokens, args.hidden, generator=g)
    return ids, weights


def _hidden(model, ids, positions):
    """The last hidden states (the LM head runs on the last position only, as a chunked loss would
    skip it: this measures the decoder)."""
    out = model(input_ids=ids, position_ids=positions, use_cache=False, logits_to_keep=1, output_hidden_states=True)
    return out.hidden_states[-1]


def _step(model, args, ids, positions, weights):
    """One forward (and backward with `--backward`); the hidden states, detached."""
    if args.backward:
        hidden = _hidden(model, ids, positions)
        (hidden * weights).sum().backward()
        return hidden.detach()
    with torch.no_grad():
        return _hidden(model, ids, positions)


def _measure(run, repeats: int, grad: bool) -> tuple[list[float], int]:
    """(seconds of `repeats` calls after a warm-up, the most tensor memory one call holds at once
    above what was held before it: the CPU allocator's running total, `bench_model.tensor_peak_cpu`)."""
    from bench_model import tensor_peak_cpu

    run()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return times, int(tensor_peak_cpu(run, grad=grad) or 0)


def rank_main(rank: int, world: int, port: int, args, out_path: str) -> None:
    from moba_rewrite.integrations.hf_cp import context_parallel, shard_inputs
    from moba_rewrite.parallel import record_traffic, shard_sequence, unshard_sequence

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=1800))
    ids, weights = _inputs(args)
    result: dict = {"rank": rank}
    for mode in MODES:
        model = build(args, mode)
        if world == 1:
            times, peak = _measure(lambda: _step(model, args, ids, None, weights), args.repeats, args.backward)
            result[mode] = {"s": times, "peak": peak, "bytes": 0}
            del model
            continue
        local_ids, positions, seq_len = shard_inputs(model, ids, layout=args.layout)
        from moba_rewrite.integrations.hf_cp import alignment
        local_weights = shard_sequence(weights, layout=args.layout, dim=1, block_size=alignment(model))

        def run():
            with context_parallel(model, layout=args.layout, seq_len=seq_len, dense=args.dense_form):
                return _step(model, args, local_ids, positions, local_weights)

        with record_traffic() as traffic:
            run()
        times, peak = _measure(run, args.repeats, args.backward)
        row = {"s": times, "peak": peak, "bytes": traffic.bytes_sent, "bytes_by_step": traffic.by_step}
        with torch.no_grad(), context_parallel(model, layout=args.layout, seq_len=seq_len, dense=args.dense_form):
            local = _hidden(model, local_ids, positions)
        got = unshard_sequence(local, layout=args.layout, dim=1, seq_len=seq_len)
        if rank == 0 and not args.no_check:
            with torch.no_grad():
                want = _hidden(model, ids, None)
            row["max_diff"] = (got - want).abs().max().item()
        result[mode] = row
        del model
    if world == 1:
        Path(out_path).write_text(json.dumps([result]))
        return
    from bench_cp import report_ranks

    report_ranks(result, world, rank, out_path)


def summarize(world: int, ranks: list[dict]) -> dict:
    row = {"world": world}
    for mode in MODES:
        row[mode] = {"s": max(statistics.median(r[mode]["s"]) for r in ranks),
                     "peak": max(r[mode]["peak"] for r in ranks),
                     "bytes": max(r[mode]["bytes"] for r in ranks),
                     "max_diff": ranks[0][mode].get("max_diff"),
                     "recurrence_bytes": max(sum(n for step, n in r[mode].get("bytes_by_step", {}).items()
                                                 if step in _RECURRENCE_STEPS) for r in ranks),
                     "window_bytes": max(sum(n for step, n in r[mode].get("bytes_by_step", {}).items()
                                             if step.startswith("window keys/values")) for r in ranks)}
    return row


# parallel.recurrence's traffic steps (a hybrid stack's delta nets), shown apart from attention's
_RECURRENCE_STEPS = {step + suffix for step in recurrence.TRAFFIC_STEPS for suffix in ("", " (gradients)")}


def _mib(b: int) -> str:
    return f"{b / 2**20:.0f} MiB"


def print_table(args, rows: list[dict]) -> None:
    kind = {"llama": "Llama-style", "qwen3_5": "Qwen3.5 hybrid (delta nets, attention every 4th layer),",
            "llama4": f"Llama 4 (chunks of {args.chunk} tokens, a full NoPE layer every 4th),"}[args.family]
    print(f"\ntorch {torch.__version__}, {os.cpu_count()} CPUs; {kind} {args.layers} layers, hidden {args.hidden}, "
          f"{args.heads} heads (kv {args.kv_heads or args.heads}) x {args.head_dim}; {args.tokens} tokens, "
          f"layout {args.layout}, dense sites by {args.dense_form}; MoBA block {args.block} / top-{args.top_k}; "
          f"{'forward + backward' if args.backward else 'forward'}; code: {CODE}")
    base = {m: rows[0][m] for m in MODES} if rows and rows[0]["world"] == 1 else None
    print("\n| ranks | dense s | MoBA s | dense / MoBA | peak per rank, dense | peak per rank, MoBA | "
          "MoBA peak vs 1 process | bytes sent per rank, dense | bytes sent per rank, MoBA | MoBA / dense bytes | "
          "max diff vs 1 process (dense / MoBA) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        d, m = r["dense"], r["moba"]
        vs = f"{m['peak'] / base['moba']['peak']:.2f}x" if base and base["moba"]["peak"] else "-"
        ratio = f"{m['bytes'] / d['bytes']:.3f}" if d["bytes"] else "-"
        diffs = " / ".join("-" if x[k] is None else f"{x[k]:.1e}" for x in (d, m) for k in ("max_diff",))
        print(f"| {r['world']} | {d['s']:.2f} | {m['s']:.2f} | {d['s'] / m['s']:.2f}x | {_mib(d['peak'])} | "
              f"{_mib(m['peak'])} | {vs} | {_mib(d['bytes'])} | {_mib(m['bytes'])} | {ratio} | {diffs} |")
    print("\ns: slowest rank's median step; peak: most tensor memory one step holds above its start (largest rank); "
          "bytes: payload handed to collectives for other ranks (largest rank).")
    if args.family == "qwen3_5":
        print("of which the delta nets' states (per rank, dense / MoBA): " + "; ".join(
            f"{r['world']} ranks {_mib(r['dense']['recurrence_bytes'])} / {_mib(r['moba']['recurrence_bytes'])}"
            for r in rows if r["world"] > 1))
    if args.family == "llama4":
        print("of which the chunked layers' keys (per rank, dense / MoBA): " + "; ".join(
            f"{r['world']} ranks {_mib(r['dense']['window_bytes'])} / {_mib(r['moba']['window_bytes'])}"
            for r in rows if r["world"] > 1))


def plot(args, rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    worlds = [r["world"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for mode in MODES:
        a.plot(worlds, [r[mode]["s"] for r in rows], marker="o", label=mode)
        b.plot(worlds, [r[mode]["peak"] / 2**20 for r in rows], marker="o", label=mode)
    a.set(xlabel="ranks", ylabel="seconds per step (slowest rank)", xticks=worlds)
    b.set(xlabel="ranks", ylabel="peak MiB per rank", xticks=worlds)
    for ax in (a, b):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(f"{args.tokens} tokens, {args.layers} layers: dense vs MoBA under context parallelism")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worlds", default="1,2,4", help="comma-separated numbers of ranks (1: one process, no CP)")
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--family", default="llama", choices=["llama", "qwen3_5", "llama4"],
                   help="llama: every layer attention; qwen3_5: Qwen3.5's hybrid stack (gated delta nets, full "
                        "attention every 4th layer: the delta nets' states cross ranks, parallel.recurrence); "
                        "llama4: Llama 4's chunked attention, a full NoPE layer every 4th")
    p.add_argument("--chunk", type=int, default=8192, help="--family llama4: attention chunk size (Llama 4's: 8192)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=0)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--block", type=int, default=512)
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--layout", choices=["contiguous", "zigzag"], default="zigzag")
    p.add_argument("--dense-form", choices=["ring", "gather"], default="ring",
                   help="how dense sites reach the other ranks' keys (context_parallel(dense=))")
    p.add_argument("--backward", action="store_true", help="time forward + backward (a training step)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-check", action="store_true", help="skip the comparison with one process's run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the results here")
    p.add_argument("--plot", help="write a plot (PNG) here")
    args = p.parse_args(argv)
    if args.family == "qwen3_5" and args.layers < 4:
        p.error("--family qwen3_5 needs --layers 4 or more (its first attention layer is the 4th)")
    worlds = [int(w) for w in args.worlds.split(",")]
    if any(w < 1 for w in worlds) or args.tokens % max(worlds):
        p.error(f"--worlds must be positive and divide --tokens {args.tokens}, got {args.worlds}")
    from bench_cp import run_worlds

    rows = run_worlds(rank_main, worlds, args, "bench_cp_model", summarize, announce=True)
    print_table(args, rows)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": rows}, indent=1))
    if args.plot:
        plot(args, rows, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
