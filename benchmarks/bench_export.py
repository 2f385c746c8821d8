"""Deployed MoBA: the ONNX function bodies in onnxruntime, sparse vs dense, time and peak memory.

    python benchmarks/bench_export.py --seq-lens 4096,8192,16384 --plot ort.png

One `com.moba_rewrite::Attention` node (prefill, Tq = Tk = T, causal, fp32; default one layer of
4 heads, head dim 64, block 512, top-3) run by onnxruntime's CPU provider with each function
body (`sparse`: gathers the selected blocks; `dense`: the `[T, T]` formulation). Every (body,
length) runs in a fresh subprocess that builds the session, runs --warmup calls, then --repeats
timed calls (median), and reports the rise of its resident-set high-water mark over the RSS with
the session and inputs in place (the mark is reset after the warmup through
/proc/self/clear_refs; where that cannot be written, ru_maxrss is used and includes the warmup).
The two bodies are checked against each other and against the torch op on a short input first.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _model(body: str, spec: dict):
    sys.path.insert(0, str(ROOT))
    import onnx

    from moba_rewrite.exporters import onnx as mo

    h = onnx.helper
    inputs = [h.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in ("q", "k", "v", "bias")]
    node = h.make_node(mo.OP_NAME, ["q", "k", "v", "bias"], ["out"], domain=mo.DOMAIN, block_size=spec["block_size"],
                       top_k=spec["top_k"], causal=1, scale=spec["head_dim"] ** -0.5)
    graph = h.make_graph([node], "moba", inputs, [h.make_tensor_value_info("out", onnx.TensorProto.FLOAT, None)])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", mo.OPSET_VERSION), h.make_opsetid(mo.DOMAIN, 1)],
                         functions=[mo.function_proto(body)])
    model.ir_version = 10
    return model


def _inputs(spec: dict, t: int):
    import numpy as np

    rng = np.random.default_rng(0)
    shape_q = (spec["batch"], spec["heads"], t, spec["head_dim"])
    shape_kv = (spec["batch"], spec["kv_heads"], t, spec["head_dim"])
    return {"q": rng.standard_normal(shape_q, dtype=np.float32), "k": rng.standard_normal(shape_kv, dtype=np.float32),
            "v": rng.standard_normal(shape_kv, dtype=np.float32), "bias": np.zeros((), dtype=np.float32)}


def worker(spec: dict) -> dict:
    """One (body, length) measurement in this process."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if spec["threads"]:
        options.intra_op_num_threads = spec["threads"]
    session = ort.InferenceSession(_model(spec["body"], spec).SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    feeds = _inputs(spec, spec["t"])
    for _ in range(spec["warmup"]):
        session.run(None, feeds)
    reset = _reset_hwm()
    base = _rss_kib("VmRSS")
    times = []
    for _ in range(spec["repeats"]):
        t0 = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - t0)
    peak = _rss_kib("VmHWM")
    if not reset:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times.sort()
    return {"body": spec["body"], "t": spec["t"], "ms": times[len(times) // 2] * 1e3,
            "extra_mib": max(peak - base, 0) / 1024, "hwm_reset": reset}


def _run_worker(spec: dict, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"body": spec["body"], "t": spec["t"], "error": f"timed out after {timeout:.0f} s"}
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["?"])[-1]
        return {"body": spec["body"], "t": spec["t"], "error": f"exit {done.returncode}: {tail[:120]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def check(spec: dict) -> float:
    """Both bodies equal the torch op (reference backend) on a short input; the max |diff|."""
    import numpy as np
    import onnxruntime as ort
    import torch

    import moba_rewrite as mr

    t = 3 * spec["block_size"] + 17
    small = {**spec, "block_size": spec["block_size"]}
    feeds = _inputs(small, t)
    q, k, v = (torch.from_numpy(feeds[n]) for n in "qkv")
    expected = mr.moba_attention(q, k, v, block_size=spec["block_size"], top_k=spec["top_k"], causal=True,
                                 enable_gqa=True, backend="reference").numpy()
    worst = 0.0
    for body in ("sparse", "dense"):
        session = ort.InferenceSession(_model(body, small).SerializeToString(), providers=["CPUExecutionProvider"])
        worst = max(worst, float(np.abs(session.run(None, feeds)[0] - expected).max()))
    return worst


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq-lens", default="4096,8192,16384", help="comma-separated prefill lengths")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=None, help="KV heads (GQA); default: --heads")
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=512)
    ap.add_argument("--top-k", type=int, default=3)
    ap.add_argument("--bodies", default="sparse,dense")
    ap.add_argument("--dense-max-len", type=int, default=16384, help="longest length the dense body runs at")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: its default)")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per worker")
    ap.add_argument("--plot", type=Path, help="write time and memory curves to this PNG")
    ap.add_argument("--json", type=Path, help="write all measurements to this JSON file")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0

    spec = dict(batch=args.batch, heads=args.heads, kv_heads=args.kv_heads or args.heads, head_dim=args.head_dim,
                block_size=args.block_size, top_k=args.top_k, repeats=args.repeats, warmup=args.warmup,
                threads=args.threads)
    print(f"onnxruntime CPU provider, {args.batch} x {args.heads} heads (kv {spec['kv_heads']}), head dim "
          f"{args.head_dim}, block {args.block_size}, top-{args.top_k}, causal prefill, fp32")
    print(f"check: both bodies vs the torch op at {3 * args.block_size + 17} tokens: max |diff| {check(spec):.1e}")
    rows = []
    for t in (int(x) for x in args.seq_lens.split(",")):
        for body in args.bodies.split(","):
            if body == "dense" and t > args.dense_max_len:
                continue
            r = _run_worker({**spec, "body": body, "t": t}, args.timeout)
            rows.append(r)
            shown = r.get("error") or f"{r['ms']:.0f} ms, +{r['extra_mib']:.0f} MiB"
            print(f"  T={t:>6} {body:<6} {shown}", flush=True)
    print(_table(rows))
    if args.json:
        args.json.write_text(json.dumps({"spec": spec, "rows": rows}, indent=2))
    if args.plot:
        _plot(rows, args.plot)
    return 0


def _table(rows: list[dict]) -> str:
    by = {(r["body"], r["t"]): r for r in rows if "error" not in r}
    lines = ["", f"{'T':>7}  {'sparse ms':>10}  {'dense ms':>10}  {'speedup':>8}  {'sparse MiB':>10}  {'dense MiB':>10}  "
                 f"{'mem ratio':>9}"]
    for t in sorted({r["t"] for r in rows}):
        s, d = by.get(("sparse", t)), by.get(("dense", t))
        cell = lambda r, k, f: f"{r[k]:{f}}" if r else "-"  # noqa: E731
        speed = f"{d['ms'] / s['ms']:.2f}x" if s and d else "-"
        mem = f"{s['extra_mib'] / d['extra_mib']:.3f}" if s and d and d["extra_mib"] > 0 else "-"
        lines.append(f"{t:>7}  {cell(s, 'ms', '10.0f'):>10}  {cell(d, 'ms', '10.0f'):>10}  {speed:>8}  "
                     f"{cell(s, 'extra_mib', '10.0f'):>10}  {cell(d, 'extra_mib', '10.0f'):>10}  {mem:>9}")
    lines.append("speedup = dense ms / sparse ms; mem ratio = sparse / dense peak rise (MiB over the RSS with inputs)")
    return "\n".join(lines)


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 4))
    for body in ("sparse", "dense"):
        pts = sorted((r["t"], r) for r in rows if r["body"] == body and "error" not in r)
        if pts:
            ax_t.plot([t for t, _ in pts], [r["ms"] for _, r in pts], marker="o", label=body)
            ax_m.plot([t for t, _ in pts], [r["extra_mib"] for _, r in pts], marker="o", label=body)
    for ax, label in ((ax_t, "time per call (ms)"), (ax_m, "peak memory rise (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens")
        ax.set_ylabel(label)
        ax.legend()
    fig.suptitle("MoBA ONNX function body in onnxruntime (CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
