"""Decode ms/token of a Hugging Face causal LM at a long KV cache: dense against MoBA, same process.

    flock /tmp/moba-heavy.lock python benchmarks/bench_decode.py            # issue 11's model, 32K cache
    python benchmarks/bench_decode.py --cache-len 4096 --steps 4            # a quick smoke run
    python benchmarks/bench_decode.py --profile                             # plus one profiled step each

The model is issue 11's: a random-weight `LlamaForCausalLM` (hidden 256, 4 heads of dim 64, fp32;
4 layers with a `DynamicCache`, 2 with a `StaticCache`), MoBA policy block 512 / top-3 with
`decode: moba`. The cache is filled with random keys and values (decode cost does not depend on
them), then each decode step is the call `generate()` makes: one new token, the 2-D attention
mask, its position, the cache. Prints a table of median ms per token and the dense / MoBA ratio.

The last columns give the bound: the time inside the attention functions (dense: SDPA; MoBA: the
block-means update and the op), and the rest of the dense step (LM head, MLPs, norms, Hugging
Face's Python and, with a `DynamicCache`, its `torch.cat` of the whole cache in `cache.update`);
MoBA's attention cannot make a step faster than that rest, so dense / rest is the best ratio
possible for the attention alone. With a `DynamicCache` the rewrite also makes MoBA sites' cache
layers grow in place (`GrowingDynamicLayer`: no whole-cache `torch.cat` per step), which the
stock dense model pays; the "dense, in-place cache" column gives the dense model the same layers,
so "that / MoBA" is the gain of MoBA's attention alone.
On CPU, glibc returns large freed blocks to the OS, so a stock `DynamicCache` step (a fresh 8 MiB
tensor per layer and K/V at 32K) pays page faults; `MALLOC_MMAP_THRESHOLD_=4294967296
MALLOC_TRIM_THRESHOLD_=4294967296` (or jemalloc/tcmalloc, as PyTorch's CPU guides advise) removes
them.

`decode_ms_per_token(model, cache_len, cache_implementation, ...)` is importable (for
`bench_model.py` and notebooks); `make_model(...)` builds the model above at any size.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402

POLICY = {"version": 1, "defaults": {"block_size": 512, "top_k": 3, "decode": "moba"}}
TARGETS = {"dynamic": 1.2, "static": 3.0}  # issue 11: dense ms / MoBA ms


def make_model(*, layers: int = 4, hidden: int = 256, heads: int = 4, kv_heads: int | None = None,
               head_dim: int = 64, vocab: int = 32000, max_positions: int = 1 << 17, dtype=torch.float32,
               device: str = "cpu", moba: dict | None = None, seed: int = 0):
    """A random-weight `LlamaForCausalLM` (sdpa attention); rewritten with the `moba` policy if given."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads or heads, head_dim=head_dim,
                      max_position_embeddings=max_positions)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()
    model.set_attn_implementation("sdpa")
    if moba is not None:
        import moba_rewrite as mr

        mr.rewrite(model, moba)
    return model


def filled_cache(model, cache_len: int, cache_implementation: str, *, batch: int = 1, extra: int = 64, seed: int = 0,
                 grow_in_place: bool = False):
    """A `DynamicCache` or `StaticCache` (`extra` free slots) already holding `cache_len` random tokens
    in every layer, as after a prefill (but without paying for one). `grow_in_place`: every dynamic
    layer a `GrowingDynamicLayer` (what a rewrite gives MoBA sites), for a dense baseline without
    the whole-cache `torch.cat` per step."""
    from transformers import DynamicCache, StaticCache

    cfg = model.config
    param = next(model.parameters())
    if cache_implementation == "static":
        cache = StaticCache(config=cfg, max_cache_len=cache_len + extra)
    elif cache_implementation == "dynamic":
        cache = DynamicCache(config=cfg)
        if grow_in_place:
            from moba_rewrite.integrations.hf_cache_growth import grow_in_place as grow

            for layer in cache.layers:
                grow(layer)
    else:
        raise ValueError(f"cache_implementation must be 'dynamic' or 'static', got {cache_implementation!r}")
    g = torch.Generator(device=param.device).manual_seed(seed)
    shape = (batch, cfg.num_key_value_heads, cache_len, cfg.head_dim)
    for layer in range(cfg.num_hidden_layers):
        k = torch.randn(shape, generator=g, device=param.device, dtype=param.dtype)
        cache.update(k, torch.randn(shape, generator=g, device=param.device, dtype=param.dtype), layer)
    return cache


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def decode_ms_per_token(model, cache_len: int, cache_implementation: str, *, steps: int = 16, warmup: int = 2,
                        batch: int = 1, step_fn=None, profile: bool = False, grow_in_place: bool = False) -> float:
    """Median milliseconds of one decode step (one new token per sequence) once the cache holds
    `cache_len` tokens. `step_fn`: what to call instead of `model` (e.g. a compiled model).
    `profile`: print a torch.profiler table of one more step, and its op counts. `grow_in_place`:
    see `filled_cache`."""
    device = next(model.parameters()).device
    cache = filled_cache(model, cache_len, cache_implementation, batch=batch, extra=warmup + steps + 2,
                         grow_in_place=grow_in_place)
    fn = model if step_fn is None else step_fn
    token = torch.zeros((batch, 1), dtype=torch.long, device=device)
    times = []
    for i in range(warmup + steps + int(profile)):
        length = cache_len + i + 1
        kwargs = dict(input_ids=token, attention_mask=torch.ones((batch, length), dtype=torch.long, device=device),
                      position_ids=torch.full((batch, 1), length - 1, device=device), cache=cache, use_cache=True)
        if profile and i == warmup + steps:
            _profile(fn, kwargs)
            break
        _sync(device)
        t0 = time.perf_counter()
        logits = fn(**kwargs).logits
        token = logits[:, -1:].argmax(-1)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def attention_ms_per_token(model, cache_len: int, cache_implementation: str, **kw) -> float:
    """Median milliseconds per decode step spent inside the model's attention functions (all layers),
    timed by routing them through a timing wrapper (a device sync per call: for the breakdown only)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    impl = model.config._attn_implementation
    inner = AttentionInterface._global_mapping[impl]
    spent = [0.0]

    def timed(module, *args, **kwargs):
        _sync(args[0].device)
        t0 = time.perf_counter()
        out = inner(module, *args, **kwargs)
        _sync(args[0].device)
        spent[0] += time.perf_counter() - t0
        return out

    AttentionInterface.register("timed_" + impl, timed)
    AttentionMaskInterface.register("timed_" + impl, ALL_MASK_ATTENTION_FUNCTIONS[impl])
    model.set_attn_implementation("timed_" + impl)
    per_step = []

    class _Step:  # decode_ms_per_token's step function, reading the attention time of each step
        def __call__(self, **kwargs):
            spent[0] = 0.0
            out = model(**kwargs)
            per_step.append(spent[0])
            return out

    try:
        decode_ms_per_token(model, cache_len, cache_implementation, step_fn=_Step(), **kw)
    finally:
        model.set_attn_implementation(impl)
    return 1e3 * statistics.median(per_step[kw.get("warmup", 2):])


def _profile(fn, kwargs) -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn(**kwargs)
    events = prof.key_averages()
    print(events.table(sort_by="self_cpu_time_total", row_limit=12))
    counts = {e.key: e.count for e in events if e.key.startswith("aten::")}
    print(f"aten ops in the step: {sum(counts.values())}; aten::cat {counts.get('aten::cat', 0)}, "
          f"aten::index_select {counts.get('aten::index_select', 0)}")


def compare(cache_len: int, cache_implementation: str, *, layers: int, steps: int, warmup: int, batch: int,
            profile: bool, compile_mode: str = "none", **model_kw) -> dict:
    """Dense and MoBA ms/token for one cache kind (dense first, then MoBA, in this process).
    `compile_mode`: run the steps through `torch.compile(model, mode=...)` (not "none"); the
    breakdown columns then time the eager model."""
    row = {"cache": cache_implementation, "layers": layers, "cache_len": cache_len}
    for name, moba in (("dense", None), ("moba", POLICY)):
        model = make_model(layers=layers, moba=moba, **model_kw)
        if profile:
            print(f"--- {name}, {cache_implementation} cache, {cache_len} tokens")
        step_fn = None
        if compile_mode != "none":
            torch._dynamo.reset()
            step_fn = torch.compile(model, mode=None if compile_mode == "default" else compile_mode)
        row[name] = decode_ms_per_token(model, cache_len, cache_implementation, steps=steps, warmup=warmup,
                                        batch=batch, profile=profile, step_fn=step_fn)
        row[name + "_attention"] = attention_ms_per_token(model, cache_len, cache_implementation, steps=steps,
                                                          warmup=warmup, batch=batch)
        if name == "dense" and cache_implementation == "dynamic":  # the same model without the per-step cat
            row["dense_in_place"] = decode_ms_per_token(model, cache_len, cache_implementation, steps=steps,
                                                        warmup=warmup, batch=batch, grow_in_place=True)
        del model
    row["ratio"] = row["dense"] / row["moba"]
    row["floor"] = row["dense"] - row["dense_attention"]  # everything but the attention calls
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache-len", type=int, default=32768, help="tokens in the cache before decoding (32768)")
    ap.add_argument("--caches", default="dynamic,static", help="cache kinds, comma-separated (dynamic,static)")
    ap.add_argument("--layers", type=int, default=4, help="layers with a DynamicCache (4)")
    ap.add_argument("--static-layers", type=int, default=2, help="layers with a StaticCache (2, as issue 11)")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=None)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=16, help="timed decode steps (median reported)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--profile", action="store_true", help="print a torch.profiler table of one step each")
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's)")
    ap.add_argument("--compile", default="none", choices=["none", "default", "reduce-overhead", "max-autotune"],
                    help="time the decode steps of torch.compile(model, mode=...) (CUDA graphs with "
                         "reduce-overhead on a GPU; use a static cache)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, {args.dtype}; "
          f"policy block 512 / top-3, decode moba; compile {args.compile}")
    model_kw = dict(hidden=args.hidden, heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim,
                    device=args.device, dtype=getattr(torch, args.dtype),
                    max_positions=max(1 << 17, 2 * args.cache_len))
    rows = []
    for kind in args.caches.split(","):
        layers = args.static_layers if kind == "static" else args.layers
        rows.append(compare(args.cache_len, kind, layers=layers, steps=args.steps, warmup=args.warmup,
                            batch=args.batch, profile=args.profile, compile_mode=args.compile, **model_kw))
    print(f"\n| cache | layers | cache tokens | dense ms/token | MoBA ms/token | dense / MoBA | target | "
          f"attention ms dense / MoBA | rest of the step ms | best ratio possible | dense, in-place cache ms | "
          f"that / MoBA |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        in_place = r.get("dense_in_place")
        tail = f"{in_place:.2f} | {in_place / r['moba']:.2f}x" if in_place else "- | -"
        print(f"| {r['cache']} | {r['layers']} | {r['cache_len']} | {r['dense']:.2f} | {r['moba']:.2f} | "
              f"{r['ratio']:.2f}x | >= {TARGETS[r['cache']]}x | {r['dense_attention']:.2f} / "
              f"{r['moba_attention']:.2f} | {r['floor']:.2f} | {r['dense'] / r['floor']:.2f}x | {tail} |")
    print(f"rest of the step: dense ms/token minus the time inside its attention functions (LM head, MLPs, "
          f"cache update, Python); no attention makes a step faster than that. With a DynamicCache, the "
          f"rewrite makes MoBA sites' cache layers grow in place (no whole-cache torch.cat per step); "
          f"'dense, in-place cache' is the dense model given the same layers, so 'that / MoBA' is the "
          f"attention's own share of the gain. Allocator: "
          f"MALLOC_MMAP_THRESHOLD_={os.environ.get('MALLOC_MMAP_THRESHOLD_', 'unset')}")


if __name__ == "__main__":
    main()
