"""MoBA with a value head dim of its own (multi-head latent attention, DeepSeek-V3 / Kimi-K2 shapes:
q/k heads 192 = 128 nope + 64 rope, v heads 128): correctness of the Triton kernels against the dense
reference, then time and peak memory of MoBA (triton) against SDPA (whatever backend PyTorch picks
for Dv != Dqk), prefill forward and forward+backward, and one decode step.

GPU:  PYTHONPATH=$PWD python benchmarks/bench_mla.py [--seq 32768] [--heads 16] [--block 128 --top-k 8]
CPU:  PYTHONPATH=$PWD python benchmarks/bench_mla.py --cpu-smoke   (tiny shapes, Triton interpreter)
"""

from __future__ import annotations

import argparse
import os
import sys
import time

SMOKE = "--cpu-smoke" in sys.argv
if SMOKE:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from moba_rewrite import moba_attention  # noqa: E402
from moba_rewrite.kernels import reference  # noqa: E402

DEV = torch.device("cpu" if SMOKE else "cuda")
DTYPE = torch.float32 if SMOKE else torch.bfloat16


def sync() -> None:
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def bench(fn, reps: int) -> float:
    """Median milliseconds of `fn()` after one warm-up call."""
    fn()
    sync()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t) * 1e3)
    return sorted(times)[len(times) // 2]


def peak_gib(fn) -> float:
    if DEV.type != "cuda":
        return float("nan")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    fn()
    sync()
    return torch.cuda.max_memory_allocated() / 2**30


def rel_err(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def inputs(b, h, tq, tk, d, dv, grad=False):
    mk = lambda *s: torch.randn(*s, device=DEV, dtype=DTYPE).requires_grad_(grad)  # noqa: E731
    return mk(b, h, tq, d), mk(b, h, tk, d), mk(b, h, tk, dv)


def correctness(d: int, dv: int) -> bool:
    """Triton vs the dense reference (fp32 math) on a mid-size prefill and a decode step."""
    ok = True
    for tq, tk in ((128, 128), (1, 200)) if SMOKE else ((2048, 2048), (1, 8192)):
        bs = 16 if SMOKE else 128
        q, k, v = inputs(1, 4, tq, tk, d, dv, grad=tq > 1)
        kw = dict(block_size=bs, top_k=3, causal=True)
        out = moba_attention(q, k, v, backend="triton", **kw)
        want = reference.forward(q.detach(), k.detach(), v.detach(), scale=d ** -0.5, attn_mask=None, **kw)
        errs = [rel_err(out, want)]
        if tq > 1:
            go = torch.randn_like(out)
            got = torch.autograd.grad(out, (q, k, v), go)
            exp = reference.backward(go, q.detach(), k.detach(), v.detach(), want, scale=d ** -0.5, attn_mask=None,
                                     **kw)
            errs += [rel_err(a, e) for a, e in zip(got, exp)]
        good = max(errs) < 2e-2
        ok &= good
        print(f"correctness Tq={tq} Tk={tk} D={d} Dv={dv}: rel err " + " ".join(f"{e:.1e}" for e in errs)
              + f" -> {'PASS' if good else 'FAIL'}")
    return ok


def timing(b: int, h: int, t: int, d: int, dv: int, bs: int, top_k: int, reps: int) -> None:
    print(f"\nprefill B={b} H={h} T={t} D={d} Dv={dv} block={bs} top_k={top_k} {DTYPE} on {DEV}")
    for fwd_bwd in (False, True):
        q, k, v = inputs(b, h, t, t, d, dv, grad=fwd_bwd)
        go = torch.randn(b, h, t, dv, device=DEV, dtype=DTYPE)

        def ours():
            o = moba_attention(q, k, v, block_size=bs, top_k=top_k, causal=True, backend="triton")
            if fwd_bwd:
                o.backward(go)

        def sdpa():
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            if fwd_bwd:
                o.backward(go)

        with torch.set_grad_enabled(fwd_bwd):
            t_ours, t_sdpa = bench(ours, reps), bench(sdpa, reps)
            m_ours, m_sdpa = peak_gib(ours), peak_gib(sdpa)
        what = "fwd+bwd" if fwd_bwd else "fwd    "
        print(f"  {what} MoBA triton {t_ours:9.2f} ms {m_ours:6.2f} GiB | SDPA {t_sdpa:9.2f} ms {m_sdpa:6.2f} GiB"
              f" | {t_sdpa / t_ours:5.2f}x")
    with torch.no_grad():
        q, k, v = inputs(b, h, 1, t, d, dv)
        t_ours = bench(lambda: moba_attention(q, k, v, block_size=bs, top_k=top_k, backend="triton"), reps)
        t_sdpa = bench(lambda: F.scaled_dot_product_attention(q, k, v), reps)
    print(f"  decode  MoBA triton {t_ours:9.3f} ms | SDPA {t_sdpa:9.3f} ms | {t_sdpa / t_ours:5.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU under the Triton interpreter")
    ap.add_argument("--seq", type=int, default=32768)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--qk-dim", type=int, default=192)
    ap.add_argument("--v-dim", type=int, default=128)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    if not SMOKE and not torch.cuda.is_available():
        sys.exit("bench_mla.py needs a CUDA device (or --cpu-smoke)")
    torch.manual_seed(0)
    ok = correctness(args.qk_dim if not SMOKE else 24, args.v_dim if not SMOKE else 16)
    if SMOKE:
        timing(1, 2, 96, 24, 16, 16, 3, 1)
    else:
        timing(args.batch, args.heads, args.seq, args.qk_dim, args.v_dim, args.block, args.top_k, args.reps)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
