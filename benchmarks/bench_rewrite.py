"""How long rewriting takes: export + pass for a 32-layer tiny-width Llama, and the pass
alone against graph size (it should grow linearly with the number of nodes).

    python benchmarks/bench_rewrite.py            # 32 layers, then 8/16/32/64 layers
    python benchmarks/bench_rewrite.py --quick    # smaller sizes, for a smoke run

Prints one line per measurement: layers, graph nodes, export seconds, pass seconds, pass
microseconds per node. The pass is `moba_rewrite.api.rewrite_exported` (detect every site,
decide with the policy, rewrite MoBA sites in place, recompile the graph module).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402

POLICY = {"version": 1, "defaults": {"block_size": 64, "top_k": 3}, "rules": [{"layers": "-3:", "mode": "dense"}]}


def tiny_llama(layers: int, impl: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    model.set_attn_implementation(impl)
    return model


def measure(layers: int, impl: str, seq: int = 256) -> dict:
    from moba_rewrite import api

    model = tiny_llama(layers, impl)
    ids = torch.randint(0, 128, (1, seq))
    kwargs = {"input_ids": ids, "use_cache": False}
    t0 = time.perf_counter()
    ep = torch.export.export(model, (), kwargs=kwargs, strict=False)
    t_export = time.perf_counter() - t0
    nodes = len(ep.graph.nodes)
    t0 = time.perf_counter()
    ep, report = api.rewrite_exported(ep, POLICY)
    t_pass = time.perf_counter() - t0
    assert len(report) == layers, str(report)
    assert sum(r.decision == "moba" for r in report) == max(layers - 3, 0), str(report)
    return {"layers": layers, "impl": impl, "nodes": nodes, "export_s": t_export, "pass_s": t_pass,
            "us_per_node": 1e6 * t_pass / nodes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller models only")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    headline = 8 if args.quick else 32
    for impl in ("sdpa", "eager"):
        r = measure(headline, impl)
        total = r["export_s"] + r["pass_s"]
        print(f"[headline] {headline}-layer Llama ({impl}): export {r['export_s']:.2f} s + pass {r['pass_s']:.3f} s "
              f"= {total:.2f} s ({r['nodes']} nodes)")
    print(f"\n{'impl':6} {'layers':>6} {'nodes':>7} {'export s':>9} {'pass s':>8} {'us/node':>8}")
    sizes = (2, 4, 8) if args.quick else (8, 16, 32, 64)
    rows = []
    for impl in ("sdpa", "eager"):
        for n in sizes:
            r = measure(n, impl)
            rows.append(r)
            print(f"{impl:6} {n:>6} {r['nodes']:>7} {r['export_s']:>9.2f} {r['pass_s']:>8.3f} {r['us_per_node']:>8.1f}")
    for impl in ("sdpa", "eager"):
        rs = [r for r in rows if r["impl"] == impl]
        lo, hi = rs[0], rs[-1]
        ratio = (hi["pass_s"] / lo["pass_s"]) / (hi["nodes"] / lo["nodes"])
        print(f"{impl}: pass time grows {hi['pass_s'] / lo['pass_s']:.1f}x for {hi['nodes'] / lo['nodes']:.1f}x nodes "
              f"(ratio {ratio:.2f}; 1.0 = linear)")


if __name__ == "__main__":
    main()
