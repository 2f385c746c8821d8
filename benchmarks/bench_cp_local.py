"""One rank's local attention under context parallelism: the `torch` vs the `triton` kernels.

    python benchmarks/bench_cp_local.py --device cuda --dtype bfloat16 --tokens 131072 --world 4
    python benchmarks/bench_cp_local.py --dry-run          # the same on this CPU at toy sizes (interpreter)

`moba_attention_cp` ends, on every rank, with one attention call over a compact problem: the
rank's `T / W` queries against `[fetched tiles | own blocks]`, each query's history blocks given
explicitly (`backend=` picks the kernels; `auto` is Triton on CUDA). A multi-GPU run is not
possible on a one-GPU machine (NCCL wants one device per rank), so this times that call alone on
one device, for the busiest rank of a contiguous causal layout (the last: every earlier block is
a candidate): its queries, its own blocks, and the earlier blocks its queries pick (fetched, all
of them: what random routing asks for), picks by the gate against the compact blocks' means.
Forward and forward + backward, median of `--repeats`, with the largest difference between the
two backends' outputs and gradients, and the SDPA call over the same keys (causal, the dense
baseline of the same rank) for scale.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _problem(args, torch):
    """q `[1, H, T_local, D]`, compact k/v, the selection `[1, H, T_local, top_k - 1]` (compact slots)."""
    dev, dtype = torch.device(args.device), getattr(torch, args.dtype)
    t_local = args.tokens // args.world
    own = t_local // args.block
    fetched = (args.world - 1) * own  # every earlier block of the sequence
    keys = (fetched + own) * args.block
    g = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(1, args.heads, t_local, args.head_dim, generator=g).to(dev, dtype)
    k = torch.randn(1, args.heads, keys, args.head_dim, generator=g).to(dev, dtype)
    v = torch.randn(1, args.heads, keys, args.head_dim, generator=g).to(dev, dtype)
    means = k.float().view(1, args.heads, fetched + own, args.block, args.head_dim).mean(3)
    slot = fetched + torch.arange(t_local, device=dev) // args.block  # each query's own block
    gate = q.float() @ means.transpose(-1, -2)  # [1, H, T_local, blocks]
    gate = gate.masked_fill(torch.arange(fetched + own, device=dev)[None, :] >= slot[:, None], float("-inf"))
    score, picks = gate.topk(args.top_k - 1, dim=-1)
    return q, k, v, picks.masked_fill(score == float("-inf"), -1)


def _time(fn, repeats: int, sync) -> float:
    fn()
    sync()
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--tokens", type=int, default=131072, help="the whole sequence")
    ap.add_argument("--world", type=int, default=4, help="ranks the sequence is sharded over")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--block", type=int, default=512)
    ap.add_argument("--top-k", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dry-run", action="store_true", help="toy sizes on this CPU, Triton under its interpreter")
    args = ap.parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
        args.device, args.dtype, args.tokens, args.world, args.heads, args.head_dim, args.block, args.repeats = (
            "cpu", "float32", 128, 4, 2, 16, 8, 1)
    import torch
    import torch.nn.functional as F

    from moba_rewrite.kernels.registry import load_backend
    from moba_rewrite.kernels.torch import blocks as torch_blocks

    triton_backend = load_backend("triton")
    q, k, v, sel = _problem(args, torch)
    scale = args.head_dim ** -0.5
    kw = dict(block_size=args.block, causal=True, scale=scale, attn_mask=None)
    sync = torch.cuda.synchronize if q.is_cuda else (lambda: None)
    leaves = {name: [x.detach().clone().requires_grad_() for x in (q, k, v)] for name in ("torch", "triton")}
    grad = torch.randn_like(q)

    def run(name: str, backward: bool):
        lq, lk, lv = leaves[name] if backward else (q, k, v)
        if name == "torch":
            out, lse = torch_blocks.forward(lq.detach(), lk.detach(), lv.detach(), top_k=args.top_k, selection=sel,
                                            return_lse=True, **kw)
            if backward:
                return out, torch_blocks.backward(grad, lq.detach(), lk.detach(), lv.detach(), out,
                                                  top_k=args.top_k, selection=sel, lse=lse, **kw)
        else:
            out, lse = triton_backend.forward_selected(lq.detach(), lk.detach(), lv.detach(), sel, **kw)
            if backward:
                return out, triton_backend.backward_selected(grad, lq.detach(), lk.detach(), lv.detach(), out, sel,
                                                             lse, **kw)
        return out, None

    def sdpa(backward: bool):
        lq, lk, lv = leaves["torch"]
        out = F.scaled_dot_product_attention(lq, lk, lv, is_causal=False) if backward else \
            F.scaled_dot_product_attention(q, k, v, is_causal=False)
        if backward:
            out.backward(grad)

    results = {name: run(name, True) for name in ("torch", "triton")}
    diffs = [(a.float() - b.float()).abs().max().item()
             for a, b in zip([results["torch"][0], *results["torch"][1]], [results["triton"][0], *results["triton"][1]])]
    print(f"{torch.cuda.get_device_name() if q.is_cuda else 'cpu'}, torch {torch.__version__}, {args.dtype}; "
          f"{args.tokens} tokens over {args.world} ranks: the last rank's {q.shape[2]} queries against "
          f"{k.shape[2]} compact keys, {args.heads} heads x {args.head_dim}, block {args.block}, top-{args.top_k}")
    print(f"torch vs triton, max |diff|: out {diffs[0]:.2e}, dq {diffs[1]:.2e}, dk {diffs[2]:.2e}, dv {diffs[3]:.2e}")
    scales = [x.float().abs().max().item() for x in (results["torch"][0], *results["torch"][1])]
    tolerance = 1e-4 if args.dtype == "float32" else 3e-2  # of each tensor's largest magnitude
    if any(d > tolerance * max(1.0, s) for d, s in zip(diffs, scales)):
        print(f"bench_cp_local: the backends disagree beyond {tolerance} of the values' scale")
        return 1
    print("\n| pass | torch ms | triton ms | torch / triton | SDPA over the same keys ms (no cut) |")
    print("|---|---|---|---|---|")
    for backward in (False, True):
        t_torch = _time(lambda: run("torch", backward), args.repeats, sync)
        t_triton = _time(lambda: run("triton", backward), args.repeats, sync)
        t_sdpa = _time(lambda: sdpa(backward), args.repeats, sync)
        print(f"| {'forward + backward' if backward else 'forward'} | {t_torch * 1e3:.1f} | {t_triton * 1e3:.1f} | "
              f"{t_torch / t_triton:.2f}x | {t_sdpa * 1e3:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
