"""One rank's local attention under context parallelism: the `torch` vs the `triton` kernels.

    python benchmarks/bench_cp_local.py --device cuda --dtype bfloat16 --tokens 131072 --world 4
    python benchmarks/bench_cp_local.py --dry-run          # the same on this CPU at toy sizes (interpreter)

`moba_attention_cp` attends, on every rank, in two parts (each query's blocks given explicitly;
`backend=` picks the kernels, `auto` is Triton on CUDA): its own blocks while the fetched tiles
travel, then the fetched tiles alone (`own_block=False`), merged by log-sum-exp; the backward
computes the fetched part first (its gradients travel home during the own part). A multi-GPU run
is not possible on a one-GPU machine (NCCL wants one device per rank), so this times those calls
alone on one device, for the busiest rank of a contiguous causal layout (the last: every earlier
block is a candidate): its queries, its own blocks, and the earlier blocks its queries pick
(fetched, all of them: what random routing asks for), picks by the gate against the blocks'
means. Forward and forward + backward, median of `--repeats`, with the largest difference
between the two backends' outputs and gradients; the own part alone (the time the exchange of
the tiles can hide behind); and the SDPA call over the same keys (the dense baseline of the same
rank) for scale.
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
    from moba_rewrite.parallel.lse import merge_by_lse

    triton_backend = load_backend("triton")
    q, k, v, sel = _problem(args, torch)
    scale = args.head_dim ** -0.5
    fetched = k.shape[2] - q.shape[2]  # keys of the fetched tiles, before the own blocks
    parts = {  # (keys, values, picks, own_block) of the own part and the fetched part, as the op splits them
        "own": (k[:, :, fetched:], v[:, :, fetched:], torch.where(sel * args.block >= fetched,
                                                                  sel - fetched // args.block, -1), True),
        "fetched": (k[:, :, :fetched], v[:, :, :fetched], torch.where(sel * args.block < fetched, sel, -1), False),
    }
    sync = torch.cuda.synchronize if q.is_cuda else (lambda: None)
    grad = torch.randn_like(q)
    kernels = {"torch": (lambda *a, **kw: torch_blocks.forward(*a, top_k=args.top_k, return_lse=True, **kw),
                         lambda *a, **kw: torch_blocks.backward(*a, top_k=args.top_k, **kw)),
               "triton": (triton_backend.forward_selected, triton_backend.backward_selected)}

    def part_args(own_block: bool) -> dict:
        return dict(block_size=args.block, causal=own_block, scale=scale, attn_mask=None, own_block=own_block)

    def run(name: str, backward: bool, only_own: bool = False):
        """The op's attention on `name`'s kernels: the own part, the fetched part, merged (and the
        backward of both given the merged output and log-sum-exp); `only_own`: the own part alone."""
        forward, backward_fn = kernels[name]
        pk, pv, psel, own_block = parts["own"]
        out, lse = forward(q, pk, pv, selection=psel, **part_args(own_block))
        if only_own:
            if backward:
                backward_fn(grad, q, pk, pv, out, selection=psel, lse=lse, **part_args(own_block))
            return out, None
        fk, fv, fsel, _ = parts["fetched"]
        out, lse = merge_by_lse(out, lse, *forward(q, fk, fv, selection=fsel, **part_args(False)))
        out = out.to(q.dtype)
        if not backward:
            return out, None
        dq_f, dk_f, dv_f = backward_fn(grad, q, fk, fv, out, selection=fsel, lse=lse, **part_args(False))
        dq, dk_o, dv_o = backward_fn(grad, q, pk, pv, out, selection=psel, lse=lse, **part_args(True))
        return out, (dq + dq_f, torch.cat([dk_f, dk_o], dim=2), torch.cat([dv_f, dv_o], dim=2))

    def sdpa(backward: bool):
        lq, lk, lv = (x.detach().requires_grad_(backward) for x in (q, k, v))
        out = F.scaled_dot_product_attention(lq, lk, lv, is_causal=False)
        if backward:
            out.backward(grad)

    results = {name: run(name, True) for name in ("torch", "triton")}
    # One torch call attending both parts at once (own block and every pick): what the split must equal.
    whole_kw = dict(block_size=args.block, top_k=args.top_k, causal=True, scale=scale, attn_mask=None, selection=sel)
    whole_out, whole_lse = torch_blocks.forward(q, k, v, return_lse=True, **whole_kw)
    results["one call"] = (whole_out, torch_blocks.backward(grad, q, k, v, whole_out, lse=whole_lse, **whole_kw))
    flat = {name: [out, *grads] for name, (out, grads) in results.items()}
    diffs = [max((a.float() - b.float()).abs().max().item() for a, b in ((t, r), (o, r)))
             for t, o, r in zip(flat["triton"], flat["torch"], flat["one call"])]
    diffs = [max(d, (a.float() - b.float()).abs().max().item()) for d, a, b in zip(diffs, flat["torch"], flat["triton"])]
    print(f"{torch.cuda.get_device_name() if q.is_cuda else 'cpu'}, torch {torch.__version__}, {args.dtype}; "
          f"{args.tokens} tokens over {args.world} ranks: the last rank's {q.shape[2]} queries against "
          f"{k.shape[2]} compact keys, {args.heads} heads x {args.head_dim}, block {args.block}, top-{args.top_k}")
    print(f"two parts on torch and on triton vs one torch call, max |diff|: out {diffs[0]:.2e}, dq {diffs[1]:.2e}, "
          f"dk {diffs[2]:.2e}, dv {diffs[3]:.2e}")
    scales = [x.float().abs().max().item() for x in (results["torch"][0], *results["torch"][1])]
    tolerance = 1e-4 if args.dtype == "float32" else 3e-2  # of each tensor's largest magnitude
    if any(d > tolerance * max(1.0, s) for d, s in zip(diffs, scales)):
        print(f"bench_cp_local: the parts or the backends disagree beyond {tolerance} of the values' scale")
        return 1
    print("\n| pass | torch ms | triton ms | torch / triton | triton, own part alone ms (hides the exchange) | "
          "SDPA over the same keys ms (no cut) |")
    print("|---|---|---|---|---|---|")
    for backward in (False, True):
        t_torch = _time(lambda: run("torch", backward), args.repeats, sync)
        t_triton = _time(lambda: run("triton", backward), args.repeats, sync)
        t_own = _time(lambda: run("triton", backward, only_own=True), args.repeats, sync)
        t_sdpa = _time(lambda: sdpa(backward), args.repeats, sync)
        print(f"| {'forward + backward' if backward else 'forward'} | {t_torch * 1e3:.1f} | {t_triton * 1e3:.1f} | "
              f"{t_torch / t_triton:.2f}x | {t_own * 1e3:.1f} | {t_sdpa * 1e3:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
