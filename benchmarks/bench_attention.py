"""MoBA (`torch` backend) against dense causal SDPA: time, peak memory, FLOP bound.

    python benchmarks/bench_attention.py --seq-lens 8192,16384,32768 --backward --plot out.png

For every sequence length (prefill, Tq = Tk = T) it prints, side by side, the forward and
(with --backward) forward+backward time and peak memory of
`moba_rewrite.moba_attention(..., backend="torch")` and of
`F.scaled_dot_product_attention(is_causal=True)`, the time ratio SDPA / MoBA and the
FLOP-bound ratio (dense causal attention FLOPs / MoBA attention FLOPs).

How things are measured
* Every (implementation, length, mode) runs in two fresh subprocesses of this script, one
  for time and one for memory, so that one measurement's allocator state cannot leak into
  the next and the memory probe's allocator setting (below) does not slow the timed calls.
* Time: median of --repeats calls after --warmup calls (`time.perf_counter`; on CUDA,
  `torch.cuda.Event` timing after a synchronize). On CPU the process CPU time of the same
  calls (`time.process_time`, all threads) is recorded too: on a shared machine its ratio
  ("CPU-time speedup") is far less sensitive to other processes than wall-clock time.
* Load: on Linux each timed call also records how many cores *other* processes kept busy
  meanwhile (machine-wide busy time from /proc/stat minus this process's CPU time, over the
  wall time); the median is printed as "other load". 0.0 means a quiet machine; on a 2-core
  machine 1.0 means another process held a whole core, and wall-clock times are not comparable.
* Peak memory on CPU: PyTorch has no CPU allocator statistics, so the worker reads the
  kernel's resident-set high-water mark of its own process (`VmHWM` in /proc/self/status).
  After the warmup calls (imports, thread pools, one-time buffers) it resets that mark to
  the current RSS (`echo 5 > /proc/self/clear_refs`, Linux >= 4.0), records the RSS with the
  inputs allocated, runs the timed calls and reports the rise of the mark. glibc's malloc is
  pinned to return every block over 128 KiB to the OS on free (`MALLOC_MMAP_THRESHOLD_`), so
  the RSS follows live tensor memory rather than the allocator's cache (without it, memory
  freed during the warmup stays resident and the peak would be under-reported; with it,
  every large temporary is a fresh mmap, which costs time: hence the separate time run,
  left with glibc's defaults). "extra" is that
  rise; "total" adds the inputs (q, k, v, and for fwd+bwd the output gradient), the same
  convention as `torch.cuda.max_memory_allocated` with live inputs. If clear_refs cannot be
  written, the mark is `getrusage().ru_maxrss`, which then includes the warmup (reported as
  `hwm_reset: false`). On CUDA the worker uses `torch.cuda.max_memory_allocated` after
  `reset_peak_memory_stats`, also after the warmup.
* SDPA above --sdpa-max-len is not run: its time is extrapolated quadratically and its memory
  linearly from the largest length that was measured, and printed as "extrapolated".
* A/B of two checkouts: `--compare-root DIR --rounds N` times MoBA only (no memory run, no
  SDPA), alternating fresh worker processes of DIR's copy of this script (imports from DIR) and
  of this checkout, N rounds in turns (old, new / new, old, ...), and prints every process's
  call times, CPU time and other load, then the median per side. Alternation and per-process
  figures make a small change visible on a noisy shared machine; e.g. for the committed tree:
  `rm -rf /tmp/old && mkdir /tmp/old && git archive HEAD | tar -x -C /tmp/old`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "fp64": "float64"}


# ----------------------------------------------------------------------------- FLOP model
def attended_keys(t: int, block_size: int, top_k: int) -> tuple[int, int]:
    """(dense causal, MoBA causal) number of (query, key) pairs at prefill length `t`."""
    dense = t * (t + 1) // 2
    moba = 0
    n_blocks = -(-t // block_size)
    for j in range(n_blocks):
        start, end = j * block_size, min((j + 1) * block_size, t)
        rows = end - start
        own = rows * (rows + 1) // 2  # causal part of the own block
        history = min(top_k - 1, j) * block_size * rows  # earlier blocks are complete
        moba += own + history
    return dense, moba


# ----------------------------------------------------------------------------- worker
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _machine_busy_s() -> float | None:
    """CPU seconds all processes have used so far (from /proc/stat), or None off Linux."""
    try:
        with open("/proc/stat") as f:
            vals = [int(x) for x in f.readline().split()[1:9]]
    except OSError:
        return None
    return (sum(vals) - vals[3] - vals[4]) / os.sysconf("SC_CLK_TCK")


def _reset_rss_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def _worker(spec: dict) -> dict:
    import torch
    import torch.nn.functional as F

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    dev = torch.device(spec["device"])
    dtype = getattr(torch, DTYPES[spec["dtype"]])
    b, hq, hkv, t, d = spec["batch"], spec["heads"], spec["kv_heads"], spec["seq_len"], spec["head_dim"]
    backward = spec["mode"] == "fwd+bwd"
    gen = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(b, hq, t, d, generator=gen, dtype=dtype).to(dev)
    k = torch.randn(b, hkv, t, d, generator=gen, dtype=dtype).to(dev)
    v = torch.randn(b, hkv, t, d, generator=gen, dtype=dtype).to(dev)
    grad = torch.randn(b, hq, t, d, generator=gen, dtype=dtype).to(dev) if backward else None
    inputs = [q, k, v] + ([grad] if backward else [])
    input_bytes = sum(x.numel() * x.element_size() for x in inputs)
    for x in (q, k, v):
        x.requires_grad_(backward)

    if spec["impl"] == "moba":
        import moba_rewrite

        def attend():
            return moba_rewrite.moba_attention(q, k, v, block_size=spec["block_size"], top_k=spec["top_k"],
                                               causal=True, enable_gqa=hq != hkv, backend="torch")
    else:
        def attend():
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=hq != hkv)

    def step():
        out = attend()
        if backward:
            out.backward(grad)
            for x in (q, k, v):
                x.grad = None
        return out

    cuda = dev.type == "cuda"
    times, cpu_times, others = [], [], []
    hwm_reset = True
    for i in range(spec["warmup"] + spec["repeats"]):
        if i == spec["warmup"]:  # measure memory from here on
            if cuda:
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            else:
                hwm_reset = _reset_rss_peak()
                base = _status_kib("VmRSS") * 1024
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = step()
            end.record()
            torch.cuda.synchronize()
            elapsed = start.elapsed_time(end) / 1e3
        else:
            b0, t0, c0 = _machine_busy_s(), time.perf_counter(), time.process_time()
            out = step()
            elapsed = time.perf_counter() - t0
            cpu_times.append(time.process_time() - c0)
            if b0 is not None and i >= spec["warmup"]:
                # Cores that other processes kept busy during this call (0 on a quiet machine).
                others.append(max(0.0, _machine_busy_s() - b0 - cpu_times[-1]) / elapsed)
        del out
        if i >= spec["warmup"]:
            times.append(elapsed)
    if cuda:
        extra = torch.cuda.max_memory_allocated() - base
    elif hwm_reset:
        extra = _status_kib("VmHWM") * 1024 - base
    else:
        extra = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    times.sort()
    cpu_times = sorted(cpu_times[spec["warmup"]:])
    return {"time_s": times[len(times) // 2], "times_s": times,
            "cpu_s": cpu_times[len(cpu_times) // 2] if cpu_times else None,
            "other_cores": sorted(others)[len(others) // 2] if others else None, "extra_bytes": max(extra, 0),
            "input_bytes": input_bytes, "total_bytes": max(extra, 0) + input_bytes, "hwm_reset": hwm_reset}


def _run_worker(spec: dict, timeout: float, env: dict, root: Path | None = None) -> dict:
    """Run `_worker(spec)` in a fresh process of `root`'s copy of this script (default: this checkout)."""
    root = root or Path(__file__).resolve().parents[1]
    env = dict(env, PYTHONPATH=str(root) + os.pathsep + env.get("PYTHONPATH", ""))
    if spec.get("omp_passive"):
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    cmd = [sys.executable, str(root / "benchmarks" / "bench_attention.py"), "--worker", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {spec['impl']} T={spec['seq_len']} {spec['mode']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _measure(spec: dict, timeout: float) -> dict:
    """Time from a run with glibc defaults, memory from a run that returns freed blocks to the OS."""
    timed = _run_worker(spec, timeout, dict(os.environ))
    if spec["device"] != "cpu":
        return timed
    mem_env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    mem = _run_worker(dict(spec, warmup=1, repeats=1), timeout, mem_env)
    return dict(timed, extra_bytes=mem["extra_bytes"], total_bytes=mem["total_bytes"], hwm_reset=mem["hwm_reset"])


# ----------------------------------------------------------------------------- driver
def _mib(x: float) -> str:
    return f"{x / 2**20:.0f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq-lens", default="2048,4096,8192,16384,32768",
                    help="comma-separated prefill lengths (Tq = Tk)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=None, help="KV heads (GQA); default: --heads")
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=512)
    ap.add_argument("--top-k", type=int, default=3)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backward", action="store_true", help="also time forward+backward")
    ap.add_argument("--backward-max-len", type=int, default=32768,
                    help="longest length forward+backward is run at (with --backward)")
    ap.add_argument("--omp-passive", action="store_true",
                    help="run every worker (MoBA and SDPA alike) with OMP_WAIT_POLICY=PASSIVE; on a "
                         "shared, busy CPU, spinning OpenMP threads otherwise stall ops with many "
                         "parallel regions by orders of magnitude")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads in workers (0: default)")
    ap.add_argument("--sdpa-max-len", type=int, default=32768,
                    help="longest length SDPA is run at; longer ones are extrapolated")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per worker")
    ap.add_argument("--plot", type=Path, help="write time and speedup curves to this PNG")
    ap.add_argument("--json", type=Path, help="write all measurements to this JSON file")
    ap.add_argument("--compare-root", type=Path,
                    help="A/B: alternate MoBA-only timing processes of this checkout and of DIR (see above)")
    ap.add_argument("--rounds", type=int, default=3, help="A/B rounds per length (with --compare-root)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(json.loads(args.worker))))
        return 0

    lens = sorted(int(x) for x in args.seq_lens.split(","))
    modes = ["fwd", "fwd+bwd"] if args.backward else ["fwd"]
    base = dict(batch=args.batch, heads=args.heads, kv_heads=args.kv_heads or args.heads, head_dim=args.head_dim,
                block_size=args.block_size, top_k=args.top_k, dtype=args.dtype, device=args.device,
                repeats=args.repeats, warmup=args.warmup, threads=args.threads, omp_passive=args.omp_passive)
    print(f"# B={args.batch} Hq={args.heads} Hkv={base['kv_heads']} D={args.head_dim} block={args.block_size} "
          f"top_k={args.top_k} dtype={args.dtype} device={args.device} causal prefill; "
          f"time = median of {args.repeats} after {args.warmup} warmup"
          + (f"; {args.threads} thread(s) per worker" if args.threads else "")
          + ("; OMP_WAIT_POLICY=PASSIVE" if args.omp_passive else ""))
    if args.compare_root:
        return _compare(args, base, lens, modes)
    records = []
    for mode in modes:
        sdpa_last = None
        for t in lens:
            if mode == "fwd+bwd" and t > args.backward_max_len:
                continue
            dense, moba_pairs = attended_keys(t, args.block_size, args.top_k)
            rec = {"seq_len": t, "mode": mode, "flop_ratio": dense / moba_pairs}
            rec["moba"] = _measure(dict(base, impl="moba", seq_len=t, mode=mode), args.timeout)
            if t <= args.sdpa_max_len:
                rec["sdpa"] = dict(_measure(dict(base, impl="sdpa", seq_len=t, mode=mode), args.timeout),
                                   extrapolated=False)
                sdpa_last = (t, rec["sdpa"])
            elif sdpa_last is not None:
                t0, s0 = sdpa_last
                r = t / t0
                rec["sdpa"] = {"time_s": s0["time_s"] * r * r,
                               "cpu_s": s0["cpu_s"] * r * r if s0.get("cpu_s") else None, "extra_bytes": s0["extra_bytes"] * r,
                               "input_bytes": s0["input_bytes"] * r, "total_bytes": s0["total_bytes"] * r,
                               "extrapolated": True, "from_seq_len": t0}
            records.append(rec)
            _print_row(rec, header=len(records) == 1 or records[-2]["mode"] != mode)
    if args.json:
        args.json.write_text(json.dumps({"config": base, "records": records}, indent=2))
    if args.plot:
        _plot(records, args.plot, base)
    return 0


def _compare(args, base: dict, lens: list[int], modes: list[str]) -> int:
    """A/B of MoBA time: fresh processes of --compare-root ("old") and this checkout ("new") in turns."""
    roots = {"old": args.compare_root.resolve(), "new": Path(__file__).resolve().parents[1]}
    if not (roots["old"] / "benchmarks" / "bench_attention.py").is_file():
        raise SystemExit(f"--compare-root {roots['old']}: expected a checkout with benchmarks/bench_attention.py")
    for mode in modes:
        for t in lens:
            if mode == "fwd+bwd" and t > args.backward_max_len:
                continue
            spec = dict(base, impl="moba", seq_len=t, mode=mode)
            medians: dict[str, list[float]] = {"old": [], "new": []}
            for r in range(args.rounds):
                for side in ("old", "new") if r % 2 == 0 else ("new", "old"):
                    res = _run_worker(spec, args.timeout, dict(os.environ), roots[side])
                    medians[side].append(res["time_s"])
                    calls = " ".join(f"{x * 1e3:.0f}" for x in res["times_s"])
                    print(f"{mode} T={t} round {r} {side}: calls ms {calls}; median {res['time_s'] * 1e3:.0f}; "
                          f"cpu {res['cpu_s'] * 1e3:.0f} ms; other load {_load(res)}", flush=True)
            for side, xs in medians.items():
                xs = sorted(xs)
                print(f"{mode} T={t} {side}: per-process medians ms {[round(x * 1e3) for x in xs]}; "
                      f"median {xs[len(xs) // 2] * 1e3:.0f}", flush=True)
    return 0


def _print_row(rec: dict, header: bool) -> None:
    if header:
        print(f"\n## {rec['mode']}")
        print("| T | MoBA ms | SDPA ms | speedup | CPU-time speedup | FLOP bound | MoBA peak MiB (extra/total) | "
              "SDPA peak MiB (extra/total) | peak ratio (total) | other load (MoBA/SDPA) |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    m, s = rec["moba"], rec.get("sdpa")
    if s is None:
        print(f"| {rec['seq_len']} | {m['time_s'] * 1e3:.0f} | - | - | - | {rec['flop_ratio']:.1f}x | "
              f"{_mib(m['extra_bytes'])}/{_mib(m['total_bytes'])} | - | - | {_load(m)}/- |", flush=True)
        return
    tag = " (extrapolated)" if s["extrapolated"] else ""
    cpu = f"{s['cpu_s'] / m['cpu_s']:.1f}x" if s.get("cpu_s") and m.get("cpu_s") else "-"
    print(f"| {rec['seq_len']} | {m['time_s'] * 1e3:.0f} | {s['time_s'] * 1e3:.0f}{tag} | "
          f"{s['time_s'] / m['time_s']:.1f}x | {cpu} | {rec['flop_ratio']:.1f}x | "
          f"{_mib(m['extra_bytes'])}/{_mib(m['total_bytes'])} | "
          f"{_mib(s['extra_bytes'])}/{_mib(s['total_bytes'])}{tag} | "
          f"{m['total_bytes'] / s['total_bytes']:.2f} | {_load(m)}/{_load(s)} |", flush=True)


def _load(rec: dict) -> str:
    """Median cores other processes used during the timed calls ("-" when unknown or extrapolated)."""
    x = rec.get("other_cores")
    return "-" if x is None or rec.get("extrapolated") else f"{x:.1f}"


def _plot(records: list[dict], path: Path, cfg: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_r) = plt.subplots(1, 2, figsize=(11, 4.2))
    for mode, style in (("fwd", "-"), ("fwd+bwd", "--")):
        rows = [r for r in records if r["mode"] == mode]
        if not rows:
            continue
        ts = [r["seq_len"] for r in rows]
        ax_t.plot(ts, [r["moba"]["time_s"] for r in rows], "o" + style, label=f"MoBA torch {mode}")
        meas = [r for r in rows if "sdpa" in r and not r["sdpa"]["extrapolated"]]
        extra = [r for r in rows if "sdpa" in r and r["sdpa"]["extrapolated"]]
        ax_t.plot([r["seq_len"] for r in meas], [r["sdpa"]["time_s"] for r in meas], "s" + style,
                  label=f"SDPA causal {mode}")
        if extra:
            ax_t.plot([r["seq_len"] for r in extra], [r["sdpa"]["time_s"] for r in extra], "x:",
                      label=f"SDPA {mode} (extrapolated)")
        with_sdpa = [r for r in rows if "sdpa" in r]
        ax_r.plot([r["seq_len"] for r in with_sdpa], [r["sdpa"]["time_s"] / r["moba"]["time_s"] for r in with_sdpa],
                  "o" + style, label=f"speedup {mode}")
    ts = sorted({r["seq_len"] for r in records})
    ax_r.plot(ts, [next(r["flop_ratio"] for r in records if r["seq_len"] == t) for t in ts], "k:",
              label="FLOP bound")
    for ax in (ax_t, ax_r):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    ax_t.set_yscale("log")
    ax_t.set_ylabel("seconds")
    ax_r.set_ylabel("SDPA time / MoBA time")
    fig.suptitle(f"MoBA block {cfg['block_size']} top-{cfg['top_k']}, B={cfg['batch']} H={cfg['heads']} "
                 f"D={cfg['head_dim']} {cfg['dtype']} {cfg['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
