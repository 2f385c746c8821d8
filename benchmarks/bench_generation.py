"""Deployed generation: decode ms/token of the exported generation programs against eager `generate()`.

    python benchmarks/bench_generation.py                      # issue 12's CPU model, 4K prompt
    python benchmarks/bench_generation.py --prompt 16384 --aoti
    python benchmarks/bench_generation.py --quick              # small sizes: a smoke run

One process builds a random-weight Llama-style `LlamaForCausalLM` (sizes as flags) and, with the
same weights, times greedy decoding after a prompt of --prompt tokens (batch 1, static cache of
prompt + new + 1 slots, fp32) for:

* eager `generate(cache_implementation="static")`: ms/token between the first and the last
  generated token (a logits processor's clock), for the original model (dense) and its rewrite
  (MoBA, `decode: moba`);
* the rewrite's generation programs (`mr.export_for_generation`, run through `ep.module()`), and,
  with --aoti, the AOTInductor package of them (slow to compile on a CPU): the prefill program
  once, then N decode calls timed; dense generation programs (policy `mode: dense`) beside them;
* with --onnx, the ONNX decode programs in onnxruntime (CPU provider), after the pt2 prefill (same
  cache layout): MoBA gated on the cached block means (`AttentionKVCache`), and as before this
  node existed (`Attention` on the filled prefix, block means of all keys every step).

The programs' greedy tokens are checked against the rewritten model's `generate()` first. Prints a
table (best of --repeat runs) with dense / MoBA ratios.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402


def _model(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.heads, head_dim=args.head_dim,
                      max_position_embeddings=args.prompt + args.new + 8)
    model = LlamaForCausalLM(cfg).eval()
    model.set_attn_implementation("sdpa")
    return model


def _eager_ms(model, ids, new: int, repeat: int) -> float:
    """ms per decode step of `generate()`: the time between the first and the last call of a logits
    processor (one call per generated token, the first right after the prefill), so the prefill's
    seconds and their noise stay out of it."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class Clock(LogitsProcessor):
        def __init__(self):
            self.times = []

        def __call__(self, input_ids, scores):
            self.times.append(time.perf_counter())
            return scores

    best = float("inf")
    for _ in range(repeat):
        clock = Clock()
        with torch.no_grad():
            model.generate(ids, max_new_tokens=1 + new, min_new_tokens=1 + new, do_sample=False,
                           cache_implementation="static", pad_token_id=0, logits_processor=LogitsProcessorList([clock]))
        best = min(best, (clock.times[-1] - clock.times[0]) / (len(clock.times) - 1))
    return 1e3 * best


def _programs_ms(prefill, decode, spec, ids, new: int, repeat: int) -> tuple[float, list[int]]:
    """ms per decode call after one prefill, and the greedy tokens."""
    width = ids.shape[1]
    best, tokens = float("inf"), []
    for _ in range(repeat):
        mask = torch.zeros((spec.batch, spec.max_seq_len), dtype=torch.long)
        mask[:, :width] = 1
        with torch.no_grad():
            logits, *cache = prefill(ids, mask, torch.arange(width), *spec.empty_cache())
            tokens = [int(logits[0, -1].argmax())]
            t0 = time.perf_counter()
            for step in range(new):
                mask[:, width + step] = 1
                token = logits[:, -1].argmax(-1)[:, None]
                logits, *cache = decode(token, mask, torch.tensor([width + step]), *cache)
                tokens.append(int(logits[0, -1].argmax()))
            best = min(best, time.perf_counter() - t0)
    return 1e3 * best / new, tokens


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompt", type=int, default=4096, help="prompt tokens")
    ap.add_argument("--new", type=int, default=16, help="decode steps timed")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--block", type=int, default=512)
    ap.add_argument("--top-k", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--onnx", action="store_true", help="also time the ONNX decode program in onnxruntime")
    ap.add_argument("--aoti", action="store_true", help="also compile and time the AOTInductor package")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: check that everything runs")
    args = ap.parse_args(argv)
    if args.quick:
        args.prompt, args.new, args.hidden, args.head_dim, args.layers, args.vocab, args.block = 96, 4, 32, 8, 2, 64, 16
        args.repeat = 1

    import moba_rewrite as mr
    from moba_rewrite.exporters.generation import export_for_generation, load_generation, save_generation_aoti

    dense = _model(args)
    moba = copy.deepcopy(dense)
    mr.rewrite(moba, {"version": 1, "defaults": {"block_size": args.block, "top_k": args.top_k, "decode": "moba"}})
    ids = torch.randint(3, args.vocab, (1, args.prompt), generator=torch.Generator().manual_seed(1))
    slots = args.prompt + args.new + 1
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; Llama {args.layers} layers, hidden "
          f"{args.hidden}, {args.heads} heads x {args.head_dim}, vocab {args.vocab}, fp32; prompt {args.prompt}, "
          f"{args.new} decode steps, static cache {slots}; MoBA block {args.block} top-{args.top_k}", flush=True)

    rows = [("eager generate(), static cache", _eager_ms(dense, ids, args.new, args.repeat),
             _eager_ms(moba, ids, args.new, args.repeat))]
    print(f"  {rows[-1][0]}: dense {rows[-1][1]:.2f}  MoBA {rows[-1][2]:.2f} ms/token", flush=True)

    programs = {}
    for name, model, policy in (("dense", copy.deepcopy(dense), {"version": 1, "defaults": {"mode": "dense"}}),
                                ("moba", moba, None)):
        programs[name] = export_for_generation(model, policy, max_seq_len=slots, batch=1)
    with torch.no_grad():
        want = moba.generate(ids, max_new_tokens=args.new + 1, do_sample=False, cache_implementation="static",
                             pad_token_id=0)[0, args.prompt:].tolist()
    got = {}
    ms = {}
    for name, p in programs.items():
        ms[name], got[name] = _programs_ms(p.prefill.module(), p.decode.module(), p.spec, ids, args.new, args.repeat)
    print(f"  check: pt2 MoBA programs' tokens {'==' if got['moba'] == want else '!='} generate()'s", flush=True)
    rows.append(("pt2 generation programs (ep.module())", ms["dense"], ms["moba"]))
    print(f"  {rows[-1][0]}: dense {rows[-1][1]:.2f}  MoBA {rows[-1][2]:.2f} ms/token", flush=True)

    if args.onnx:
        from moba_rewrite.exporters import onnx_generation
        from moba_rewrite.exporters.onnx_generation import load_generation_onnx, save_generation_onnx

        # the decode program through onnxruntime; the cache comes from the pt2 prefill (same layout)
        onnx_ms = {}
        with tempfile.TemporaryDirectory() as tmp:
            for label, name, node_max in (("dense", "dense", None), ("moba", "moba", None),
                                          ("moba_prefix", "moba", 0)):
                saved = onnx_generation._KV_NODE_MAX_QUERIES
                if node_max is not None:  # before: Attention on the filled prefix, means recomputed per step
                    onnx_generation._KV_NODE_MAX_QUERIES = node_max
                try:
                    save_generation_onnx(programs[name], os.path.join(tmp, label))
                finally:
                    onnx_generation._KV_NODE_MAX_QUERIES = saved
                _, decode, spec = load_generation_onnx(os.path.join(tmp, label))
                onnx_ms[label], tokens = _programs_ms(programs[name].prefill.module(), decode, spec, ids, args.new,
                                                      args.repeat)
                if name == "moba":
                    print(f"  check: ONNX ({label}) tokens {'==' if tokens == want else '!='} generate()'s",
                          flush=True)
        rows.append(("ONNX decode, onnxruntime (cached means)", onnx_ms["dense"], onnx_ms["moba"]))
        rows.append(("ONNX decode, prefix Attention (before)", onnx_ms["dense"], onnx_ms["moba_prefix"]))
        print(f"  {rows[-2][0]}: dense {rows[-2][1]:.2f}  MoBA {rows[-2][2]:.2f}; before {rows[-1][2]:.2f} ms/token",
              flush=True)

    if args.aoti:
        aoti = {}
        with tempfile.TemporaryDirectory() as tmp:
            for name, p in programs.items():
                path = os.path.join(tmp, f"{name}.pt2")
                t0 = time.perf_counter()
                save_generation_aoti(p, path)
                print(f"  AOTI compile ({name}): {time.perf_counter() - t0:.0f} s", flush=True)
                prefill, decode, spec = load_generation(path)
                aoti[name], tokens = _programs_ms(prefill, decode, spec, ids, args.new, args.repeat)
                if name == "moba":
                    print(f"  check: AOTI MoBA tokens {'==' if tokens == want else '!='} generate()'s", flush=True)
        rows.append(("AOTInductor package", aoti["dense"], aoti["moba"]))

    print(f"\n{'path':<40} {'dense ms/token':>15} {'MoBA ms/token':>14} {'dense / MoBA':>13}")
    for what, d, m in rows:
        print(f"{what:<40} {d:>15.2f} {m:>14.2f} {d / m:>12.2f}x")
    return 0 if got["moba"] == want else 1


if __name__ == "__main__":
    sys.exit(main())
