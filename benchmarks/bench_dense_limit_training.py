"""A training step of a rewritten Llama at its dense limit (every site `top_k * block >= T`, so the
op runs full attention): the original model, the rewrite, and the rewrite with the dense op's CPU
flash path turned off (its fp32 score-chunk backward, what every dense-limit backward was before
2026-12-07). Prints the times and the rewrite's largest differences from the original.

    python benchmarks/bench_dense_limit_training.py --tokens 4096
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _models(tokens: int, block: int):
    """The original model (sdpa) and its rewrite at the dense limit, the same weights."""
    import moba_rewrite as mr
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, head_dim=64,
                      max_position_embeddings=tokens + 8, tie_word_embeddings=False)
    torch.manual_seed(0)
    original = LlamaForCausalLM(cfg)
    rewritten = LlamaForCausalLM(cfg)
    rewritten.load_state_dict(original.state_dict())
    for model in (original, rewritten):
        model.set_attn_implementation("sdpa")
    mr.rewrite(rewritten, {"version": 1, "defaults": {"mode": "moba", "block_size": block,
                                                       "top_k": -(-tokens // block)}})
    return original, rewritten


def _step(model, ids):
    """One forward and backward; the logits and the parameters' gradients."""
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids, use_cache=False).logits
    logits.float().square().mean().backward()
    return logits.detach(), [p.grad.clone() for p in model.parameters()]


def _median_s(model, ids, repeats: int) -> float:
    _step(model, ids)
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        _step(model, ids)
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--block", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    from moba_rewrite.kernels import dense

    original, rewritten = _models(args.tokens, args.block)
    ids = torch.randint(0, 1024, (1, args.tokens), generator=torch.Generator().manual_seed(1))
    rows = [("original (transformers' sdpa)", _median_s(original, ids, args.repeats)),
            ("rewrite at its dense limit", _median_s(rewritten, ids, args.repeats))]
    flash = dense._flash_parts_apply
    dense._flash_parts_apply = lambda *a: False
    try:
        rows.append(("rewrite, the CPU flash path off (fp32 score chunks)", _median_s(rewritten, ids, args.repeats)))
    finally:
        dense._flash_parts_apply = flash
    (want, want_grads), (got, got_grads) = _step(original, ids), _step(rewritten, ids)
    grad_diff = max((a - b).abs().max().item() for a, b in zip(want_grads, got_grads))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; Llama 4 layers, hidden 256, 4 heads x 64; "
          f"{args.tokens} tokens, block {args.block}, top-{-(-args.tokens // args.block)}; rewrite vs original: "
          f"logits {(want - got).abs().max().item():.1e}, gradients {grad_diff:.1e}\n")
    print("| model | training step s |\n|---|---|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
