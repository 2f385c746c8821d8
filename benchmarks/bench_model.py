"""A whole transformers model, dense against MoBA-rewritten, the way a user runs it.

    python benchmarks/bench_model.py                                   # the issue's CPU model, 4K / 16K
    python benchmarks/bench_model.py --seq 16384,32768 --plot model.png
    python benchmarks/bench_model.py --quick                           # small sizes: a smoke run
    python benchmarks/bench_model.py --device cuda --dtype bfloat16 --layers 8 --head-dim 128 --seq 131072

One process builds a random-weight Llama-style `LlamaForCausalLM` (sizes as flags; `--family
qwen3_5`: Qwen3.5's hybrid stack, gated delta-net layers with full attention every 4th) twice with
the same weights: the original (attn_implementation sdpa) and `mr.rewrite(model, policy)`
(MoBA block / top-k as flags, every layer). It then times, for each prompt length:

* prefill `input_ids -> logits` (`exporters.common.logits_view`: no KV cache, an all-ones
  attention mask), eager, under `torch.compile` (fullgraph) and as a `torch.export` program
  (`exporters.pt2.export_program`, dynamic length, run through `ep.module()`), with the peak
  memory of the call: the most tensor memory held at once above what was held before it (CUDA:
  `torch.cuda.max_memory_allocated`; CPU: the same figure from the CPU allocator's running total,
  read by `torch.profiler` in one extra, untimed run) and, on CPU, the resident-set growth
  sampled every 2 ms (which also counts what glibc keeps or maps fresh, so it moves with the
  allocator's history, not only with what the program holds);
* decode ms/token with `generate()` after a prompt of the largest length, with the dynamic
  cache and `cache_implementation="static"`: the median time between successive decode steps of
  one `generate(max_new_tokens=1 + N)` call, read by a logits processor that stamps the clock at
  each step (the prefill is not in it; best of `--repeat` calls).

It prints a table with the dense / MoBA ratios (> 1: MoBA faster or smaller) and, with
`--plot`, draws them. Timings are the best of `--repeat` runs after one warm-up.
`--modes none` skips the prefill timings. `benchmarks/bench_decode.py` times decode steps
without `generate()` and breaks them down (attention vs the rest of the step).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402


def build(args, seed: int = 0):
    import transformers

    sizes = dict(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                 num_hidden_layers=args.layers, num_attention_heads=args.heads,
                 num_key_value_heads=args.kv_heads or args.heads, head_dim=args.head_dim,
                 max_position_embeddings=max(args.seq) + args.decode_tokens + 8)
    if args.family == "qwen3_5":  # a hybrid stack: gated delta-net layers, full attention every 4th layer
        cfg = transformers.Qwen3_5TextConfig(**sizes, linear_num_key_heads=args.heads, linear_num_value_heads=args.heads,
                                             linear_key_head_dim=args.head_dim, linear_value_head_dim=args.head_dim)
        cls = transformers.Qwen3_5ForCausalLM
    else:
        cfg, cls = transformers.LlamaConfig(**sizes), transformers.LlamaForCausalLM
    torch.manual_seed(seed)
    model = cls(cfg).to(device=args.device, dtype=getattr(torch, args.dtype)).eval()
    model.set_attn_implementation("sdpa")
    return model


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextlib.contextmanager
def peak_memory(device: str, out: dict):
    """Peak memory of the block above what was in use at its start (bytes) into `out["peak"]`."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        yield
        out["peak"] = torch.cuda.max_memory_allocated() - base
        return
    base, peak, done = _rss(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.002)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        yield
    finally:
        done.set()
        t.join()
        out["peak"] = max(0, max(peak[0], _rss()) - base)


def tensor_peak_cpu(fn, *, grad: bool = False) -> int | None:
    """The most CPU tensor memory `fn()` holds at once above what was held before it (bytes), from
    the allocator's running total that `torch.profiler(profile_memory=True)` records with every
    allocation and free (`grad`: with autograd on, for a training step); None when this torch's
    profiler does not expose it."""
    from torch.profiler import ProfilerActivity, profile

    try:
        from torch._C._profiler import _EventType
    except ImportError:
        return None
    with torch.set_grad_enabled(grad), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
        del out
    stack, allocs = list(prof.profiler.kineto_results.experimental_event_tree()), []
    while stack:
        e = stack.pop()
        stack.extend(e.children)
        if e.tag == _EventType.Allocation:
            allocs.append(e)
    if not allocs:
        return None
    allocs.sort(key=lambda e: e.start_time_ns)
    first = allocs[0].typed[1]
    base = first.total_allocated - first.alloc_size
    return max(e.typed[1].total_allocated for e in allocs) - base


def best_time(fn, device: str, repeat: int) -> tuple[float, int]:
    """(best seconds of `repeat` runs after a warm-up, peak memory of one run: resident-set growth
    on CPU, max allocated on CUDA)."""
    with torch.no_grad():
        fn()
        _sync(device)
        times = []
        mem: dict = {}
        for i in range(repeat):
            with peak_memory(device, mem) if i == 0 else contextlib.nullcontext():
                t0 = time.perf_counter()
                fn()
                _sync(device)
            times.append(time.perf_counter() - t0)
    return min(times), mem.get("peak", 0)


def prefill_runners(model, mode: str, ids: torch.Tensor):
    from moba_rewrite.exporters.common import logits_view
    from moba_rewrite.exporters.pt2 import export_program

    view = logits_view(model)
    if mode == "eager":
        return lambda: view(ids)
    if mode == "compile":
        compiled = torch.compile(view, fullgraph=True)
        return lambda: compiled(ids)
    if mode == "export":
        program = export_program(model, (ids,), dynamic=True).module()
        return lambda: program(ids)
    raise ValueError(mode)


def decode_ms_per_token(model, ids: torch.Tensor, tokens: int, cache: str, device: str, repeat: int) -> float:
    """Median ms between successive decode steps of one `generate()` call (best of `repeat` calls)."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class Clock(LogitsProcessor):  # called once per generated token, after that step's forward
        def __init__(self):
            self.stamps = []

        def __call__(self, input_ids, scores):
            _sync(device)
            self.stamps.append(time.perf_counter())
            return scores

    kw = dict(do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids))
    if cache == "static":
        kw["cache_implementation"] = "static"
    best = float("inf")
    for _ in range(repeat):
        clock = Clock()
        with torch.no_grad():
            model.generate(ids, max_new_tokens=1 + tokens, min_new_tokens=1 + tokens,
                           logits_processor=LogitsProcessorList([clock]), **kw)
        steps = [b - a for a, b in zip(clock.stamps, clock.stamps[1:])]
        best = min(best, sorted(steps)[len(steps) // 2])
    return 1000.0 * best


def run(args) -> dict:
    import moba_rewrite as mr

    dense = build(args)
    moba = mr.rewrite(copy.deepcopy(dense), {"version": 1, "defaults": {
        "block_size": args.block, "top_k": args.top_k, "decode": "moba"}})
    rows = []
    for seq in args.seq:
        ids = torch.randint(0, args.vocab, (1, seq), generator=torch.Generator().manual_seed(seq)).to(args.device)
        for mode in (m for m in args.modes if m != "none"):
            row = {"what": f"prefill {mode}", "seq": seq}
            for name, model in (("dense", dense), ("moba", moba)):
                torch._dynamo.reset()
                try:
                    runner = prefill_runners(model, mode, ids)
                except Exception as exc:  # noqa: BLE001
                    if name == "moba":  # the rewrite fails where the original runs: never hidden
                        raise
                    # the original itself cannot (Qwen3.5's chunked delta rule exports at one length only)
                    print(f"prefill {mode} {seq}: skipped, the original fails: {type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:120]}", flush=True)
                    break
                row[name], row[f"{name}_peak"] = best_time(runner, args.device, args.repeat)
                if args.device == "cpu":
                    row[f"{name}_rss"], row[f"{name}_peak"] = row[f"{name}_peak"], tensor_peak_cpu(runner)
            else:
                rows.append(row)
                print(_line(row), flush=True)
    if args.decode_tokens > 0:
        seq = max(args.seq)
        ids = torch.randint(0, args.vocab, (1, seq), generator=torch.Generator().manual_seed(1)).to(args.device)
        for cache in args.caches:
            row = {"what": f"decode {cache} (ms/token)", "seq": seq}
            for name, model in (("dense", dense), ("moba", moba)):
                row[name] = decode_ms_per_token(model, ids, args.decode_tokens, cache, args.device, args.repeat)
            rows.append(row)
            print(_line(row), flush=True)
    return {"config": {k: v for k, v in vars(args).items() if k not in ("plot", "json")}, "rows": rows}


def _fmt_mem(b: int | None) -> str:
    return "-" if not b else f"{b / 2**20:.0f} MiB"


def _line(r: dict) -> str:
    unit = 1.0 if "ms/token" in r["what"] else 1000.0
    text = (f"{r['what']:<26} {r['seq']:>7}  dense {r['dense'] * unit:9.1f}  moba {r['moba'] * unit:9.1f}  "
            f"speedup {r['dense'] / max(r['moba'], 1e-12):5.2f}x")
    if "dense_peak" in r:
        text += f"  peak {_fmt_mem(r['dense_peak'])} / {_fmt_mem(r['moba_peak'])}"
    if "dense_rss" in r:
        text += f"  (rss {_fmt_mem(r['dense_rss'])} / {_fmt_mem(r['moba_rss'])})"
    return text


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["what"].startswith("prefill")]
    fig, ax = plt.subplots(figsize=(7, 4))
    for what in sorted({r["what"] for r in rows}):
        pts = sorted((r["seq"], r["dense"] / max(r["moba"], 1e-12)) for r in rows if r["what"] == what)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=what)
    for r in result["rows"]:
        if r["what"].startswith("decode"):
            ax.scatter([r["seq"]], [r["dense"] / max(r["moba"], 1e-12)], marker="x", label=r["what"])
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("dense time / MoBA time")
    c = result["config"]
    ax.set_title(f"{c.get('family', 'llama')} {c['layers']}L h{c['hidden']} {c['heads']}x{c['head_dim']}, {c['dtype']} "
                 f"{c['device']}, block {c['block']} top-{c['top_k']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=_ints, default=[4096, 16384], help="prompt lengths (comma-separated)")
    ap.add_argument("--family", default="llama", choices=["llama", "qwen3_5"],
                    help="llama: every layer attention; qwen3_5: Qwen3.5's hybrid stack (gated delta-net layers, "
                         "full attention every 4th layer: MoBA there)")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=0, help="0: as many as --heads")
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=1000)
    ap.add_argument("--block", type=int, default=512)
    ap.add_argument("--top-k", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--modes", type=lambda s: s.split(","), default=["eager", "compile", "export"])
    ap.add_argument("--caches", type=lambda s: s.split(","), default=["dynamic", "static"])
    ap.add_argument("--decode-tokens", type=int, default=16, help="new tokens per decode timing (0: skip decode)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="tiny sizes: check that everything runs")
    ap.add_argument("--plot", help="write a PNG of the speedups")
    ap.add_argument("--json", help="write the results as JSON")
    args = ap.parse_args(argv)
    if args.quick:
        args.seq, args.hidden, args.layers, args.block, args.decode_tokens, args.repeat = [128, 256], 64, 2, 32, 4, 2
        args.head_dim = 16
        args.layers = 4 if args.family == "qwen3_5" else args.layers
    if args.family == "qwen3_5" and args.layers < 4:
        ap.error("--family qwen3_5 needs --layers 4 or more (its first attention layer is the 4th)")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}; "
          f"times in ms, speedup = dense / MoBA", flush=True)
    result = run(args)
    if args.plot:
        plot(result, args.plot)
        print(f"wrote {args.plot}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
