"""GPU check for the Triton MoBA kernels (issue 5): bf16 correctness vs the dense reference on
mid-size shapes, then time / TFLOP/s / peak memory of ours vs SDPA (flash backend) vs our
`torch` backend for the issue's settings, forward and forward+backward, and decode at 128K.

Run through `benchmarks/gpu_check.sh` (about 5 minutes on one H100). Every case is guarded:
an error is printed and the run goes on. `--cpu-smoke` dry-runs all of the logic on CPU with
tiny shapes under the Triton interpreter (sets TRITON_INTERPRET=1 itself).

FLOP convention (as FlashAttention): forward = 4 * D * visible (query, key) pairs per head;
forward+backward = 3.5x forward. "Useful" FLOPs count only the pairs MoBA attends.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
import traceback

SMOKE = "--cpu-smoke" in sys.argv
if SMOKE:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from moba_rewrite.kernels import reference  # noqa: E402
from moba_rewrite.kernels.triton import attn as triton_attn, backend as triton_backend, gate as triton_gate  # noqa: E402
from moba_rewrite.kernels import load_backend  # noqa: E402
from moba_rewrite.kernels.triton.layout import dense_problem  # noqa: E402
from moba_rewrite.attention.varlen import moba_attention_varlen  # noqa: E402
from moba_rewrite import moba_attention  # noqa: E402

DEV = torch.device("cpu" if SMOKE else "cuda")
DTYPE = torch.float32 if SMOKE else torch.bfloat16
K = 1024
RESULTS: list[dict] = []
T0 = time.time()


def scaled(t: int) -> int:
    """Sequence lengths: real on GPU, tiny in the CPU smoke run."""
    return t if not SMOKE else {64 * K: 64, 128 * K: 96, 512 * K: 128}.get(t, min(t, 80))


def sz(real: int, smoke: int) -> int:
    return smoke if SMOKE else real


def sync() -> None:
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def bench(fn, reps: int, warmup: int = 1) -> float:
    """Median milliseconds of `fn()`."""
    reps = 1 if SMOKE else reps
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(reps):
        if DEV.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    times.sort()
    return times[len(times) // 2]


def host_us(fn, calls: int = 200) -> float:
    """Microseconds of host (Python + launch) time per call: calls issued back to back, no sync."""
    fn()
    sync()
    t = time.perf_counter()
    for _ in range(1 if SMOKE else calls):
        fn()
    host = (time.perf_counter() - t) / (1 if SMOKE else calls) * 1e6
    sync()
    return host


def kernel_table(fn, calls: int = 50) -> list[tuple[str, float]]:
    """(kernel name, GPU microseconds per call) of the device kernels `fn` launches (CUDA only)."""
    if DEV.type != "cuda" or SMOKE:
        return []
    from torch.profiler import ProfilerActivity, profile

    fn()
    sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        sync()
    rows = [(e.key, e.self_device_time_total / calls) for e in prof.key_averages() if e.self_device_time_total > 0]
    return sorted(rows, key=lambda r: -r[1])[:8]


def peak_mem(fn) -> float:
    """Peak GiB allocated while running `fn()` once (0 on CPU)."""
    if DEV.type != "cuda":
        fn()
        return 0.0
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    sync()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def moba_pairs(tq: int, tk: int, bs: int, top_k: int) -> int:
    """Visible (query, key) pairs per head for causal MoBA without a mask (exact)."""
    pos = torch.arange(tk - tq, tk, dtype=torch.float64)
    own = torch.div(pos, bs, rounding_mode="floor")
    hist = torch.clamp(own, max=top_k - 1)
    return int((hist * bs + (pos - own * bs + 1)).sum().item())


def dense_pairs(tq: int, tk: int, causal: bool = True) -> int:
    if not causal:
        return tq * tk
    pos = torch.arange(tk - tq, tk, dtype=torch.float64)
    return int((pos + 1).sum().item())


def sdpa_ctx(decode: bool = False):
    """SDPA restricted to its flash kernel (decode: flash, efficient or cuDNN, whichever takes GQA)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if SMOKE:
        return sdpa_kernel(SDPBackend.MATH)
    if decode:
        return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION])
    return sdpa_kernel(SDPBackend.FLASH_ATTENTION)


def case(name: str, budget_s: float):
    """Decorator: run a guarded case if enough of the time budget is left."""
    def wrap(fn):
        def run(deadline: float):
            left = deadline - time.time()
            if left < budget_s and not SMOKE:
                print(f"\n[{name}] SKIPPED: needs ~{budget_s:.0f}s, {left:.0f}s left", flush=True)
                return
            print(f"\n[{name}]", flush=True)
            t = time.time()
            try:
                fn()
            except Exception as exc:  # keep going: one failure must not hide the other numbers
                print(f"  ERROR {type(exc).__name__}: {str(exc)[:400]}")
                traceback.print_exc(limit=3, file=sys.stdout)
                RESULTS.append({"case": name, "error": f"{type(exc).__name__}: {exc}"[:400]})
            finally:
                if DEV.type == "cuda":
                    torch.cuda.empty_cache()
            print(f"  ({time.time() - t:.1f}s)", flush=True)
        run.__name__ = name
        return run
    return wrap


def rand(*shape, requires_grad=False):
    x = torch.randn(*shape, device=DEV, dtype=DTYPE)
    return x.requires_grad_(requires_grad)


def row(label: str, ms: float, flop: float, mem: float | None = None, base_ms: float | None = None) -> str:
    tf = flop / (ms * 1e-3) / 1e12 if ms > 0 else float("nan")
    speed = f"{base_ms / ms:7.2f}x" if base_ms else "        "
    m = f"{mem:7.2f} GiB" if mem is not None else ""
    return f"  {label:<26} {ms:10.2f} ms {tf:8.1f} TFLOP/s {speed} {m}"


# ----------------------------------------------------------------------------- correctness


def rel_err(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def check_correctness():
    cfgs = [
        # name, B, Hq, Hkv, Tq, Tk, D, bs, top_k, causal
        ("prefill_gqa", 1, 8, 2, sz(4096, 64), sz(4096, 64), sz(128, 16), sz(256, 16), 4, True),
        ("chunk_noncausal", 2, 4, 4, sz(1000, 40), sz(3000, 90), sz(128, 16), sz(256, 16), 3, False),
        ("decode_gqa", 2, 16, 4, 1, sz(8000, 90), sz(128, 16), sz(512, 16), 3, True),
        ("small_block_d64", 1, 4, 4, sz(2048, 48), sz(2048, 48), sz(64, 16), sz(64, 16), 8, True),
    ]
    for name, b, hq, hkv, tq, tk, d, bs, top_k, causal in cfgs:
        @case(f"correctness {name} {tuple((b, hq, hkv, tq, tk, d, bs, top_k, causal))}", 20)
        def one():
            q, k, v = rand(b, hq, tq, d), rand(b, hkv, tk, d), rand(b, hkv, tk, d)
            kw = dict(block_size=bs, top_k=top_k, causal=causal, scale=d ** -0.5, attn_mask=None)
            sel = triton_backend.block_selection(q, k, block_size=bs, top_k=top_k, causal=causal)
            want_sel = reference.block_selection(q, k, block_size=bs, top_k=top_k, causal=causal)
            differ = (sel != want_sel).any(-1)
            gate = q.float() @ reference.repeat_kv(reference.block_means(k, bs), hq).transpose(-1, -2)
            big = torch.finfo(torch.float32).max
            gap = (torch.where(sel, gate, -big).sort(-1).values - torch.where(want_sel, gate, -big).sort(-1).values)
            gap = gap.abs().where(gap.abs() < big / 2, torch.zeros_like(gap)).max().item()
            fixed = triton_backend.forward_with_selection(q, k, v, want_sel,
                                                          block_size=bs, causal=causal, scale=d ** -0.5)
            out = triton_backend.forward(q, k, v, **kw)
            want = reference.forward(q, k, v, **kw)
            go = torch.randn_like(out)
            got_g = triton_backend.backward(go, q, k, v, out, **kw)
            want_g = reference.backward(go, q, k, v, want, **kw)
            ok_rows = ~differ[..., None].expand_as(out)
            e_fixed = (fixed.float() - want.float()).abs().max().item()
            e_out = (out.float() - want.float())[ok_rows].abs().max().item()
            grads = [rel_err(a, e) for a, e in zip(got_g, want_g)]
            good = e_fixed < 3e-2 and e_out < 3e-2 and gap < 1e-2 and max(grads) < 2e-2
            print(f"  selection: {int(differ.sum())} of {differ.numel()} rows differ (max gate gap {gap:.2e});"
                  f" fwd max|err| fixed-selection {e_fixed:.2e}, end-to-end {e_out:.2e};"
                  f" grad rel err dq {grads[0]:.2e} dk {grads[1]:.2e} dv {grads[2]:.2e}  -> {'PASS' if good else 'FAIL'}")
            RESULTS.append({"case": f"correctness {name}", "pass": good, "rows_differ": int(differ.sum()),
                            "gate_gap": gap, "err_fixed": e_fixed, "err_out": e_out, "grad_rel": grads})
        one(DEADLINE)

    @case("torch.compile(fullgraph=True) of moba::triton_attention (kernels embedded by Inductor)", 60)
    def compiled():
        b, hq, hkv, t, d, bs = 1, 8, 2, sz(2048, 48), sz(128, 16), sz(256, 16)
        q, k, v = rand(b, hq, t, d), rand(b, hkv, t, d), rand(b, hkv, t, d)

        def f(q, k, v):
            return torch.ops.moba.triton_attention(q, k, v, None, bs, 3, True, d ** -0.5)

        leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
        eager = f(*leaves)
        eager.float().square().sum().backward()
        if SMOKE:  # Inductor cannot run user Triton kernels on CPU tensors; check the op's graph instead
            from torch.fx.experimental.proxy_tensor import make_fx

            make_fx(f, tracing_mode="fake")(q, k, v)
            print("  (smoke: traced only)")
            return
        leaves_c = [x.clone().requires_grad_(True) for x in (q, k, v)]
        out = torch.compile(f, fullgraph=True)(*leaves_c)
        out.float().square().sum().backward()
        errs = [rel_err(out, eager)] + [rel_err(a.grad, e.grad) for a, e in zip(leaves_c, leaves)]
        good = max(errs) < 1e-2
        print(f"  compiled vs eager rel err: out {errs[0]:.2e}, dq {errs[1]:.2e}, dk {errs[2]:.2e}, dv {errs[3]:.2e}"
              f" -> {'PASS' if good else 'FAIL'}")
        RESULTS.append({"case": "compile triton_attention", "pass": good, "rel_err": errs})
    compiled(DEADLINE)

    @case("correctness varlen (3 sequences, GQA)", 20)
    def varlen():
        lens = [sz(1500, 30), sz(700, 9), sz(2600, 50)]
        hq, hkv, d, bs = 8, 2, sz(128, 16), sz(256, 16)
        tot = sum(lens)
        q, k, v = rand(tot, hq, d), rand(tot, hkv, d), rand(tot, hkv, d)
        cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=DEV)
        out = moba_attention_varlen(q, k, v, cu, cu, block_size=bs, top_k=3, backend="triton")
        want = moba_attention_varlen(q, k, v, cu, cu, block_size=bs, top_k=3, backend="reference")
        err = rel_err(out, want)
        print(f"  varlen fwd rel err {err:.2e} -> {'PASS' if err < 2e-2 else 'FAIL'}")
        RESULTS.append({"case": "correctness varlen", "pass": err < 2e-2, "rel_err": err})
    varlen(DEADLINE)


# ----------------------------------------------------------------------------- timing


def ours_breakdown(q, k, v, bs, top_k):
    """Milliseconds of gate (means + top-k), CSR build and the attention kernels, separately."""
    p = dense_problem(q, k, v, block_size=bs, top_k=top_k, causal=True, scale=q.shape[-1] ** -0.5, attn_mask=None)
    reps = 3 if not SMOKE else 1
    t_gate = bench(lambda: triton_gate.select_blocks(p), reps)
    sel = triton_gate.select_blocks(p)
    t_csr = bench(lambda: triton_gate.build_csr(p, triton_gate.Selection(sel.picks, sel.n_pick, sel.row_pad, sel.ref)), reps)
    sel = triton_gate.build_csr(p, sel)
    t_attn = bench(lambda: triton_attn.attention_forward(p, sel), reps)
    return t_gate, t_csr, t_attn


def moba_fwd_only(q, k, v, bs, top_k):
    from moba_rewrite import moba_attention

    return moba_attention(q, k, v, block_size=bs, top_k=top_k, causal=True, backend="triton")


def prefill_case(label, b, h, t, d, bs, top_k, fwd_bwd: bool, with_torch: bool, reps: int, budget: float):
    @case(label, budget)
    def run():
        q, k, v = rand(b, h, t, d, requires_grad=fwd_bwd), rand(b, h, t, d, requires_grad=fwd_bwd), \
            rand(b, h, t, d, requires_grad=fwd_bwd)
        go = torch.randn_like(q) if fwd_bwd else None
        scale = d ** -0.5
        mult = 3.5 if fwd_bwd else 1.0
        useful = 4.0 * d * moba_pairs(t, t, bs, top_k) * b * h * mult
        dense = 4.0 * d * dense_pairs(t, t) * b * h * mult

        def ours():
            from moba_rewrite import moba_attention

            o = moba_attention(q, k, v, block_size=bs, top_k=top_k, causal=True, backend="triton")
            if fwd_bwd:
                o.backward(go)

        def sdpa():
            with sdpa_ctx():
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
            if fwd_bwd:
                o.backward(go)

        def torch_backend():
            from moba_rewrite import moba_attention

            o = moba_attention(q, k, v, block_size=bs, top_k=top_k, causal=True, backend="torch")
            if fwd_bwd:
                o.backward(go)

        entry = {"case": label, "B": b, "H": h, "T": t, "D": d, "block": bs, "top_k": top_k, "fwd_bwd": fwd_bwd}
        t_ours = bench(ours, reps)
        m_ours = peak_mem(ours)
        print(row("ours (triton)", t_ours, useful, m_ours), flush=True)
        t_sdpa = bench(sdpa, max(1, reps - 1) if t > 256 * K else reps, warmup=0 if t > 256 * K else 1)
        m_sdpa = peak_mem(sdpa) if t <= 256 * K else float("nan")
        print(row("SDPA flash (dense)", t_sdpa, dense, m_sdpa), flush=True)
        print(f"  -> ours is {t_sdpa / t_ours:.2f}x faster than SDPA", flush=True)
        entry.update(ours_ms=t_ours, sdpa_ms=t_sdpa, speedup=t_sdpa / t_ours, ours_gib=m_ours, sdpa_gib=m_sdpa,
                     ours_useful_tflops=useful / t_ours / 1e9, sdpa_tflops=dense / t_sdpa / 1e9)
        if fwd_bwd:  # the forward alone too, so the backward's share is fwd+bwd minus this
            with torch.no_grad():
                f_ours = bench(lambda: moba_fwd_only(q, k, v, bs, top_k), reps)
                with sdpa_ctx():
                    f_sdpa = bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale),
                                   max(1, reps - 1))
            print(f"  forward alone: ours {f_ours:.2f} ms, SDPA {f_sdpa:.2f} ms ({f_sdpa / f_ours:.2f}x);"
                  f" backward share: ours {t_ours - f_ours:.2f} ms, SDPA {t_sdpa - f_sdpa:.2f} ms"
                  f" ({(t_sdpa - f_sdpa) / max(t_ours - f_ours, 1e-9):.2f}x)", flush=True)
            entry.update(fwd_ours_ms=f_ours, fwd_sdpa_ms=f_sdpa)
        if not fwd_bwd:  # the fp32 accumulator's bound (fwd_piece_mib, default above): memory against speed
            from moba_rewrite.kernels.triton import configs as triton_configs

            for mib in (0, 64):
                triton_configs.OVERRIDES["fwd_piece_mib"] = mib
                try:
                    t_piece, m_piece = bench(ours, reps), peak_mem(ours)
                finally:
                    del triton_configs.OVERRIDES["fwd_piece_mib"]
                label_mib = "one piece" if mib == 0 else f"{mib} MiB pieces"
                print(row(f"ours, fwd_piece_mib={mib} ({label_mib})", t_piece, useful, m_piece), flush=True)
                entry.update({f"piece{mib}_ms": t_piece, f"piece{mib}_gib": m_piece})
            g, c, a = ours_breakdown(q, k, v, bs, top_k)
            print(f"  ours breakdown: gate {g:.2f} ms, csr {c:.2f} ms, attention {a:.2f} ms"
                  f" -> attention-only useful {useful / (a * 1e-3) / 1e12:.1f} TFLOP/s", flush=True)
            entry.update(gate_ms=g, csr_ms=c, attn_ms=a, attn_useful_tflops=useful / a / 1e9)
        if with_torch:
            try:
                t_torch = bench(torch_backend, 1)
                print(row("ours (torch backend)", t_torch, useful, None, None), flush=True)
                entry["torch_ms"] = t_torch
            except Exception as exc:
                print(f"  torch backend ERROR {type(exc).__name__}: {str(exc)[:200]}")
        RESULTS.append(entry)
    return run


def graphed(fn):
    """`fn` captured in a CUDA graph; returns a function that replays it (CPU: `fn` itself)."""
    if DEV.type != "cuda":
        return fn
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # warm up (compiles, allocator) outside the capture
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def _tile_sweep(family: str, configs, step, check, reps: int) -> None:
    """GPU time of `step` under CUDA graphs with each launch config of `family`, side by side,
    plus `check()`'s line (agreement with the default config)."""
    from moba_rewrite.kernels.triton import configs as triton_configs

    for cfg in configs:
        triton_configs.OVERRIDES[family] = cfg
        try:
            us = bench(graphed(step), reps) * 1e3
            print(f"    {family}={','.join(map(str, cfg))}: {us:6.1f} us (graph), {check()}", flush=True)
        except Exception as exc:
            print(f"    {family}={cfg} ERROR {type(exc).__name__}: {str(exc)[:150]}")
        finally:
            triton_configs.OVERRIDES.pop(family, None)


def decode_tile_sweep(p, means, reps) -> None:
    """The decode gate's and split-KV kernel's tiles side by side (the first of each is the default)."""
    def picks(partial=True):  # the chosen blocks of every real row, in slot-independent order
        sel = triton_gate.select_blocks(p, means=means, partial=partial)
        if not partial:
            return sel.picks[:, :p.rows].sort(-1).values[..., -sel.n_pick:]
        ix, sc = sel.part_picks[:, :p.rows].flatten(2), sel.part_scores[:, :p.rows].flatten(2)
        return ix.gather(-1, sc.topk(sel.n_pick, -1).indices).sort(-1).values

    base = picks(partial=False)  # the sequential gate's choice
    _tile_sweep("gate_decode", ((16, 64, 4, 2), (16, 32, 4, 2), (16, 128, 8, 2), (16, 128, 4, 2), (64, 32, 4, 2)),
                lambda: triton_gate.select_blocks(p, means=means, partial=True),
                lambda: f"same picks: {torch.equal(picks(), base)}", reps)
    sel = triton_gate.select_blocks(p, means=means, partial=True)
    want = triton_attn.decode_forward(p, sel)
    _tile_sweep("decode", ((128, 64, 4, 3), (64, 64, 4, 3), (256, 64, 4, 3), (128, 128, 4, 3), (64, 32, 2, 3),
                           (128, 64, 8, 3), (512, 64, 4, 3), (128, 64, 4, 2)),
                lambda: triton_attn.decode_forward(p, sel),
                lambda: f"with combine, rel err vs default {rel_err(triton_attn.decode_forward(p, sel), want):.1e}", reps)


def decode_case(label, b, h, hkv, tk, d, bs, top_k, reps, budget):
    @case(label, budget)
    def run():
        q, k, v = rand(b, h, 1, d), rand(b, hkv, tk, d), rand(b, hkv, tk, d)
        scale = d ** -0.5

        def ours():
            return triton_backend.forward(q, k, v, block_size=bs, top_k=top_k, causal=True, scale=scale,
                                          attn_mask=None)

        def sdpa():
            with sdpa_ctx(decode=True):
                return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=hkv != h)

        def torch_backend():
            return load_backend("torch").forward(q, k, v, block_size=bs, top_k=top_k, causal=True, scale=scale,
                                                 attn_mask=None)

        t_ours, t_sdpa = bench(ours, reps), bench(sdpa, reps)
        p = dense_problem(q, k, v, block_size=bs, top_k=top_k, causal=True, scale=scale, attn_mask=None)
        t_means = bench(lambda: triton_gate.block_means(p), reps)
        sel = triton_gate.select_blocks(p)
        t_kernel = bench(lambda: triton_attn.decode_forward(p, sel), reps)
        kv_bytes = 2 * k.numel() * k.element_size()
        print(f"  ours (triton)      {t_ours * 1e3:9.1f} us  (block means {t_means * 1e3:.1f} us, split-KV attention"
              f" {t_kernel * 1e3:.1f} us)\n  SDPA (dense)       {t_sdpa * 1e3:9.1f} us  ({kv_bytes / (t_sdpa * 1e-3) / 1e12:.2f} TB/s)"
              f"\n  -> ours is {t_sdpa / t_ours:.2f}x faster; without the block-means pass (a KV-cache-side mean"
              f" cache) the attention alone is {t_sdpa / t_kernel:.2f}x", flush=True)
        entry = {"case": label, "ours_us": t_ours * 1e3, "sdpa_us": t_sdpa * 1e3, "means_us": t_means * 1e3,
                 "kernel_us": t_kernel * 1e3, "speedup": t_sdpa / t_ours}
        # With the block means kept beside the KV cache (moba_attention(key_block_means=...)).
        from moba_rewrite import key_block_means

        means = key_block_means(k, bs)

        def ours_cached():  # the public API, as a decode loop calls it (validation included)
            return moba_attention(q, k, v, block_size=bs, top_k=top_k, scale=scale, enable_gqa=hkv != h,
                                  backend="triton", key_block_means=means)

        err = rel_err(ours_cached(), ours())
        t_cached = bench(ours_cached, reps)
        host = host_us(ours_cached)
        print(f"  ours, cached block means {t_cached * 1e3:7.1f} us -> {t_sdpa / t_cached:.2f}x"
              f" (vs uncached rel err {err:.1e}); host time per call {host:.1f} us", flush=True)
        entry.update(cached_us=t_cached * 1e3, speedup_cached=t_sdpa / t_cached, host_us=host)
        def via_op():  # the same call through the torch.library dispatcher (what compiled graphs call)
            return torch.ops.moba.attention_cached(q, k, v, means, None, bs, top_k, True, scale, "triton")

        t_op = bench(via_op, reps)
        print(f"  same call through the moba::attention_cached op: {t_op * 1e3:7.1f} us, host {host_us(via_op):.1f} us;"
              f" SDPA host {host_us(sdpa):.1f} us", flush=True)
        entry.update(op_us=t_op * 1e3)
        for name, us in kernel_table(ours_cached):
            print(f"    kernel {name[:60]:<60} {us:7.1f} us", flush=True)
        if DEV.type == "cuda" and not SMOKE:
            decode_tile_sweep(p, means, reps)
        try:  # as decode servers run it: captured once, replayed (no Python or launch overhead)
            g_ours, g_sdpa = bench(graphed(ours_cached), reps), bench(graphed(sdpa), reps)
            print(f"  CUDA graphs: ours (cached means) {g_ours * 1e3:7.1f} us, SDPA {g_sdpa * 1e3:7.1f} us"
                  f" -> {g_sdpa / g_ours:.2f}x", flush=True)
            entry.update(graph_ours_us=g_ours * 1e3, graph_sdpa_us=g_sdpa * 1e3, speedup_graph=g_sdpa / g_ours)
        except Exception as exc:
            print(f"  CUDA graphs ERROR {type(exc).__name__}: {str(exc)[:200]}")
        if DEV.type == "cuda" and not SMOKE:  # what a user gets from torch.compile's CUDA-graph mode
            import cProfile
            import pstats

            prof = cProfile.Profile()
            prof.runcall(lambda: [ours_cached() for _ in range(100)])
            sync()
            print("  host profile of 100 eager calls (top by own time):", flush=True)
            for (fname, line, func), st in sorted(pstats.Stats(prof).stats.items(), key=lambda kv: -kv[1][2])[:12]:
                print(f"    {st[2] * 1e4:7.1f} us/call own, {st[3] * 1e4:7.1f} cum  {os.path.basename(fname)}:{line}"
                      f" {func}", flush=True)

            def compiled(fn, *args):
                # The KV cache (and its means) at fixed addresses, as a static cache is (HF StaticCache marks
                # them the same way): else every replay first copies 1 GiB of K/V into the graph's inputs.
                for x in args[1:]:
                    torch._dynamo.mark_static_address(x)
                step = torch.compile(fn, mode="reduce-overhead", fullgraph=True)

                def call():
                    torch.compiler.cudagraph_mark_step_begin()
                    return step(*args)

                for _ in range(3):
                    call()
                return call

            from torch._dynamo.utils import counters

            try:
                t0 = time.time()
                gqa = bool(hkv != h)
                step = compiled(lambda q, k, v, m: moba_attention(q, k, v, block_size=bs, top_k=top_k, scale=scale,
                                                                  enable_gqa=gqa, backend="triton",
                                                                  key_block_means=m), q, k, v, means)
                err = rel_err(step().clone(), ours_cached())
                c_ours = bench(step, reps)
                print(f"  torch.compile(mode='reduce-overhead'): ours {c_ours * 1e3:7.1f} us (rel err vs eager {err:.1e};"
                      f" compiled in {time.time() - t0:.0f}s)", flush=True)
                entry.update(compiled_ours_us=c_ours * 1e3)
                gqa = bool(hkv != h)  # a Python bool: a closure int would become symbolic on recompiles
                sdpa_step = compiled(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, scale=scale,
                                                                                     enable_gqa=gqa), q, k, v)
                c_sdpa = bench(sdpa_step, reps)
                print(f"  torch.compile(mode='reduce-overhead'): SDPA {c_sdpa * 1e3:7.1f} us -> {c_sdpa / c_ours:.2f}x",
                      flush=True)
                entry.update(compiled_sdpa_us=c_sdpa * 1e3)
            except Exception as exc:
                print(f"  torch.compile reduce-overhead ERROR {type(exc).__name__}: {str(exc)[:600]}")
            skips = {k: v for k, v in counters["inductor"].items() if "cudagraph" in k}
            if skips:
                print(f"  inductor cudagraph counters: {skips}", flush=True)
        try:
            t_torch = bench(torch_backend, reps)
            print(f"  ours (torch backend) {t_torch * 1e3:7.1f} us", flush=True)
            entry["torch_us"] = t_torch * 1e3
        except Exception as exc:
            print(f"  torch backend ERROR {type(exc).__name__}: {str(exc)[:200]}")
        RESULTS.append(entry)
    return run


# ----------------------------------------------------------------------------- config sweep

# The first candidate of each family is the built-in default (the ratios are relative to it).
SWEEP = {
    "gate": [(64, 32, 4, 2), (64, 64, 8, 2), (64, 64, 4, 2), (128, 64, 8, 2), (64, 128, 8, 2), (32, 64, 4, 2)],
    "gate_prec": ["split3", "tf32x3"],
    "fwd_mode": ["single", "two_pass"],
    "fwd": [(64, 64, 4, 2), (64, 32, 8, 2), (64, 64, 4, 3), (64, 64, 8, 3), (128, 64, 8, 2), (128, 64, 8, 3),
            (128, 32, 8, 2), (64, 128, 8, 2)],
    "bwd": [(32, 128, 8, 2), (32, 64, 8, 2), (64, 64, 8, 2), (64, 32, 4, 2), (64, 128, 8, 2), (16, 64, 4, 2)],
}


def sweep_configs(deadline: float) -> None:
    """Time candidate launch configs of the gate, forward and backward kernels side by side on the
    issue's two prefill settings, reject any whose results differ from the default's, and keep the
    fastest (mean time ratio to the default over both settings) for the rest of the run."""
    from moba_rewrite.kernels.triton import configs as triton_configs

    problems = [("block 512 top-3 T=128K B=1", 1, scaled(128 * K), sz(512, 16), 3),
                ("block 128 top-8 T=64K B=2", 2, scaled(64 * K), sz(128, 16), 8)]
    d, h = sz(128, 16), sz(16, 2)
    data = []
    for label, b, t, bs, top_k in problems:
        q, k, v = rand(b, h, t, d), rand(b, h, t, d), rand(b, h, t, d)
        p = dense_problem(q, k, v, block_size=bs, top_k=top_k, causal=True, scale=d ** -0.5, attn_mask=None)
        data.append((label, p, torch.randn_like(q)))
    print("\n[config sweep] ms per call (median of 3); x = results differ from the default's",
          flush=True)

    def rows_of(p, sel):
        return sel.picks[:, : p.rows].sort(-1).values

    def family(name, candidates, run_one, same):
        """Time `run_one(p, ...)` for every candidate; return the best candidate."""
        base = {}
        ratios = {}
        for cand in candidates:
            if time.time() > deadline - 5:
                print(f"  {name}: stopped early (time budget)", flush=True)
                break
            triton_configs.OVERRIDES[name] = cand
            cells, rs = [], []
            try:
                for label, p, go in data:
                    res = run_one(p, go)
                    if label not in base:
                        base[label] = res
                    ok = same(base[label], res)
                    ms = bench(lambda: run_one(p, go), 3)
                    base.setdefault(("ms", label), ms)
                    cells.append(f"{ms:8.2f}{'' if ok else ' x'}")
                    rs.append(ms / base[("ms", label)] if ok else float("inf"))
            except Exception as exc:
                cells.append(f"ERROR {type(exc).__name__}: {str(exc)[:120]}")
                rs.append(float("inf"))
            ratios[cand] = sum(rs) / max(1, len(rs)) if len(rs) == len(data) else float("inf")
            print(f"  {name:<9} {str(cand):<18} " + " | ".join(cells), flush=True)
        best = min(ratios, key=ratios.get) if ratios else candidates[0]
        if not math.isfinite(ratios.get(best, float("inf"))):
            best = candidates[0]
        triton_configs.OVERRIDES[name] = best
        print(f"  -> {name} = {best} (mean time ratio to default {ratios.get(best, float('nan')):.2f})", flush=True)
        RESULTS.append({"case": f"sweep {name}", "choice": str(best),
                        "ratios": {str(c): r for c, r in ratios.items()}})
        return best

    print(f"  columns: {' | '.join(lbl for lbl, _, _ in data)}", flush=True)

    def same_sel(a, b):
        return (a != b).any(-1).float().mean().item() < 1e-4  # near-ties only

    family("gate_prec", SWEEP["gate_prec"], lambda p, go: rows_of(p, triton_gate.select_blocks(p)), same_sel)
    family("gate", SWEEP["gate"], lambda p, go: rows_of(p, triton_gate.select_blocks(p)), same_sel)
    sels = {id(p): triton_gate.build_csr(p, triton_gate.select_blocks(p)) for _, p, _ in data}
    family("fwd_mode", SWEEP["fwd_mode"], lambda p, go: triton_attn.attention_forward(p, sels[id(p)])[0],
           lambda a, b: rel_err(b, a) < 1e-2)
    family("fwd", SWEEP["fwd"], lambda p, go: triton_attn.attention_forward(p, sels[id(p)])[0],
           lambda a, b: rel_err(b, a) < 1e-2)
    repaired = [int(triton_attn.single_pass_forward(p, sels[id(p)])[2].sum()) for _, p, _ in data]
    print(f"  single pass: rows repaired (reference unsafe) {repaired} of {[p.rows * p.batch * p.hkv for _, p, _ in data]}",
          flush=True)
    fwd_out = {id(p): triton_attn.attention_forward(p, sels[id(p)]) for _, p, _ in data}
    family("bwd", SWEEP["bwd"],
           lambda p, go: triton_attn.attention_backward(p, sels[id(p)], go, *fwd_out[id(p)]),
           lambda a, b: max(rel_err(y, x) for x, y in zip(a, b)) < 1e-2)
    o = triton_configs.OVERRIDES
    text = ";".join(f"{k}={','.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in o.items())
    print(f"  chosen: MOBA_TRITON_CONFIG=\"{text}\"", flush=True)
    del data, sels, fwd_out
    if DEV.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- compile check (no GPU needed)

_INT_PTRS = {"ITEM_START", "q_start", "q_len", "k_start", "k_len", "PICKS", "WORK_IDX", "WORK_CHUNK", "OFFSETS", "ENTRY_ROW",
             "ENTRY_SRC"}
_F32_PTRS = {"SCORES", "MEANS", "O32", "LSE_PART", "ROW_LSE", "DQ32", "DELTA", "O_PART", "REF", "ROW_SUM", "ROW_MAX",
             "ROW_REF"}
_I8_PTRS = {"ROW_FILTER", "BAD"}
_DATA_PTRS = {"Q", "K", "V", "O", "DO", "DK", "DVG"}  # DVG: the dV gradient (DV is the value head dim)


def compile_sm90(only: str | None = None) -> bool:
    """Compile every kernel variant for sm_90 on this machine (Triton ships ptxas) and print shared
    memory, registers and spill stack per variant. Catches compile errors without a GPU."""
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    target = GPUTarget("cuda", 90, 32)
    ok = True

    def one(label, fn, consts, warps, stages, dt="bf16", mask_dt="u8"):
        nonlocal ok
        if only and not re.search(only, label):
            return
        sig = {}
        for name in fn.arg_names:
            if name in consts:
                sig[name] = "constexpr"
            elif name in _INT_PTRS:
                sig[name] = "*i32"
            elif name in _F32_PTRS:
                sig[name] = "*fp32"
            elif name in _I8_PTRS:
                sig[name] = "*i8"
            elif name in ("MASK", "VIS"):
                sig[name] = "*" + mask_dt
            elif name in _DATA_PTRS:
                sig[name] = "*" + dt
            elif name in ("scale", "scale_log2", "SAFE_HI", "SAFE_LO"):
                sig[name] = "fp64"  # as Inductor passes Python floats to user kernels
            else:
                sig[name] = "i32"
        # As the JIT specializes at launch: pointers and the strides / sizes that are multiples of 16
        # get a divisibility hint (without it loads are not vectorized and the counts below mislead).
        attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
                 if sig[name].startswith("*") or (sig[name] == "i32" and (
                     (name.startswith("s") and name != "span") or name in ("block_size", "span", "L", "RP", "obase")))}
        try:
            k = triton.compile(ASTSource(fn, sig, constexprs=consts, attrs=attrs), target=target,
                               options={"num_warps": warps, "num_stages": stages})
        except Exception as exc:
            ok = False
            print(f"  FAIL {label}: {type(exc).__name__}: {str(exc)[:600]}")
            return
        usage = ""
        try:
            with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as fh:
                fh.write(k.asm["cubin"])
            res = subprocess.run([cuobjdump, "--dump-resource-usage", fh.name], capture_output=True, text=True)
            usage = " ".join(w for w in res.stdout.split() if w.startswith(("REG:", "STACK:")))
        except Exception:
            pass
        print(f"  ok   {label:<48} smem {k.metadata.shared:>6} B  {usage}")

    class _P:  # the config functions only look at d, dv and the device
        def __init__(self, d, dv=None):
            # a stand-in q on "cuda" (not allocated) so the configs are the GPU ones, not the interpreter's
            self.d, self.q = d, type("FakeQ", (), {"device": torch.device("cuda"), "dtype": torch.bfloat16})()
            self.dv = dv or d

    # (q/k head dim, v head dim): the usual widths, and DeepSeek-V3 / Kimi-K2 MLA (192 / 128)
    for d, dv in ((64, 64), (128, 128), (256, 256), (192, 128)):
        p = _P(d, dv)
        tag = f"D={d}" if d == dv else f"D={d} Dv={dv}"
        bd, bdv = triton.next_power_of_2(d), triton.next_power_of_2(dv)
        vd = dict(BLOCK_DV=bdv, DV=dv)  # the value-side constants of the fwd, bwd and decode kernels
        bm, bn, w, st = triton_attn.fwd_config(p)
        for mode in (0, 1, 2):
            for causal, mask, mbool in ((True, False, True), (False, True, True), (True, True, False)):
                one(f"{tag} fwd mode={mode} causal={causal} mask={mask}{'' if mbool else ' float'}",
                    triton_attn._fwd_kernel,
                    dict(MODE=mode, FILTER=False, CAUSAL=causal, HAS_MASK=mask, MASK_BOOL=mbool, BLOCK_M=bm,
                         BLOCK_N=bn, BLOCK_D=bd, D=d, **vd, DOT_PREC="tf32", OFF64=False), w, st,
                    mask_dt="u8" if mbool else "fp32")
        for mode in (0, 1):
            one(f"{tag} fwd mode={mode} repair filter", triton_attn._fwd_kernel,
                dict(MODE=mode, FILTER=True, CAUSAL=True, HAS_MASK=False, MASK_BOOL=True, BLOCK_M=bm, BLOCK_N=bn,
                     BLOCK_D=bd, D=d, **vd, DOT_PREC="tf32", OFF64=False), w, st)
        for repair in (False, True):
            one(f"{tag} fwd finish repair={repair}", triton_attn._fwd_finish_kernel,
                dict(REPAIR=repair, BLOCK_M=16, BLOCK_D=bdv, D=dv), 4, 2)
        one(f"{tag} fwd mode=1 fp32 off64", triton_attn._fwd_kernel,
            dict(MODE=1, FILTER=False, CAUSAL=True, HAS_MASK=False, MASK_BOOL=True, BLOCK_M=bm, BLOCK_N=bn,
                 BLOCK_D=bd, D=d, **vd, DOT_PREC="ieee", OFF64=True), w, st, dt="fp32")
        bm, bn, w, st = triton_attn.bwd_config(p)
        for causal, mask in ((True, False), (False, True)):
            one(f"{tag} bwd causal={causal} mask={mask}", triton_attn._bwd_kernel,
                dict(CAUSAL=causal, HAS_MASK=mask, MASK_BOOL=True, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, D=d,
                     **vd, DOT_PREC="tf32"), w, st)
        bm, bn, w, st = triton_gate.gate_config(torch.device("cuda"), d)
        for causal, prec, dt in ((True, "split3", "bf16"), (False, "split3", "bf16"), (True, "tf32x3", "fp32")):
            one(f"{tag} gate causal={causal} top-8 {prec}", triton_gate._gate_topk_kernel,
                dict(CAUSAL=causal, HAS_VIS=not causal, KP=8, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, D=d,
                     GATE_PREC=prec, PARTIAL=False), w, st, dt=dt)
        one(f"{tag} block means", triton_gate._block_means_kernel, dict(D=d, BLOCK_D=bd, BLOCK_N=64), 4, 2)
        for merge in (False, True):
            one(f"{tag} decode merge={merge}", triton_attn._decode_kernel,
                dict(HAS_MASK=True, MASK_BOOL=True, MERGE=merge, BLOCK_N=64, BLOCK_C=16, BLOCK_D=bd, D=d, **vd), 4, 3)
        one(f"{tag} decode combine", triton_attn._decode_combine_kernel, dict(BLOCK_S=16, BLOCK_D=bdv, D=dv), 4, 2)
        one(f"{tag} row dot", triton_attn._row_dot_kernel, dict(BLOCK_M=16, BLOCK_D=bdv, D=dv), 4, 2)
    p = _P(128)  # every --sweep candidate at D=128 too, so the sweep spends no GPU time on a config that fails here
    for bm, bn, w, st in SWEEP["fwd"]:
        for mode in (0, 1, 2):
            one(f"sweep fwd mode={mode} {(bm, bn, w, st)}", triton_attn._fwd_kernel,
                dict(MODE=mode, FILTER=False, CAUSAL=True, HAS_MASK=False, MASK_BOOL=True, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=128,
                     D=128, BLOCK_DV=128, DV=128, DOT_PREC="tf32", OFF64=False), w, st)
    for bm, bn, w, st in SWEEP["bwd"]:
        one(f"sweep bwd {(bm, bn, w, st)}", triton_attn._bwd_kernel,
            dict(CAUSAL=True, HAS_MASK=False, MASK_BOOL=True, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=128, D=128,
                 BLOCK_DV=128, DV=128, DOT_PREC="tf32"), w, st)
    for bm, bn, w, st in SWEEP["gate"]:
        for prec, dt in (("split3", "bf16"), ("tf32x3", "bf16")):
            one(f"sweep gate {prec} {(bm, bn, w, st)}", triton_gate._gate_topk_kernel,
                dict(CAUSAL=True, HAS_VIS=False, KP=8, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=128, D=128,
                     GATE_PREC=prec, PARTIAL=False), w, st, dt=dt)
    for bm, bn, w, st in ((16, 64, 4, 2), (16, 32, 4, 2), (16, 128, 8, 2), (16, 128, 4, 2)):  # decode gate tiles
        for prec, dt in (("split3", "bf16"), ("tf32x3", "fp32")):
            one(f"decode gate {prec} {(bm, bn, w, st)}", triton_gate._gate_topk_kernel,
                dict(CAUSAL=True, HAS_VIS=False, KP=2, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=128, D=128,
                     GATE_PREC=prec, PARTIAL=True), w, st, dt=dt)
    print("compile check:", "all variants compiled" if ok else "SOME VARIANTS FAILED")
    return ok


DEADLINE = 0.0


def main() -> None:
    global DEADLINE
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU under the Triton interpreter")
    ap.add_argument("--budget", type=float, default=290.0, help="seconds for the whole run (cases are skipped after)")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--skip-correctness", action="store_true")
    ap.add_argument("--only", default=None, metavar="REGEX",
                    help="with --compile-sm90: only the variants whose label matches")
    ap.add_argument("--sweep", type=float, default=0.0, metavar="SECONDS",
                    help="first compare launch configs for up to SECONDS and keep the fastest for the run")
    ap.add_argument("--cases", default=None, metavar="REGEX", help="only the timing cases whose name matches")
    ap.add_argument("--compile-sm90", action="store_true",
                    help="only compile every kernel variant for sm_90 and report registers/spills (no GPU needed)")
    args = ap.parse_args()
    DEADLINE = T0 + args.budget
    if args.compile_sm90:
        sys.exit(0 if compile_sm90(args.only) else 1)
    if not SMOKE and not torch.cuda.is_available():
        sys.exit("bench_gpu.py needs a CUDA device (or --cpu-smoke)")
    if DEV.type == "cuda":
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    torch.manual_seed(0)
    if args.sweep:
        sweep_configs(T0 + args.sweep)
    if not args.skip_correctness:
        check_correctness()
    d, h = sz(128, 16), sz(16, 2)
    bs512, bs128 = sz(512, 16), sz(128, 16)
    cases = [
        prefill_case(f"paper fwd: block 512 top-3, H={h}, B=1, T=128K", 1, h, scaled(128 * K), d, bs512, 3,
                     False, True, 5, 25),
        decode_case(f"decode: 128K cache, block 512 top-3, H={h}", 1, h, h, scaled(128 * K), d, bs512, 3, 20, 10),
        decode_case(f"decode GQA: 128K cache, block 512 top-3, Hq={h} Hkv={max(1, h // 4)}, B=4", 4, h,
                    max(1, h // 4), scaled(128 * K), d, bs512, 3, 20, 10),
        prefill_case(f"FlashMoBA fwd+bwd: block 128 top-8, H={h}, B=2, T=64K", 2, h, scaled(64 * K), d, bs128, 8,
                     True, False, 3, 25),
        prefill_case(f"paper fwd+bwd: block 512 top-3, H={h}, B=1, T=128K", 1, h, scaled(128 * K), d, bs512, 3,
                     True, False, 3, 30),
        prefill_case(f"paper fwd: block 512 top-3, H={h}, B=1, T=512K", 1, h, scaled(512 * K), d, bs512, 3,
                     False, False, 2, 45),
        prefill_case(f"FlashMoBA fwd+bwd: block 128 top-8, H={h}, B=2, T=512K", 2, h, scaled(512 * K), d, bs128, 8,
                     True, False, 1, 80),
    ]
    for run in cases:
        if args.cases and not re.search(args.cases, run.__name__):
            continue
        run(DEADLINE)
    print("\nsummary (ours vs SDPA, this run):")
    for r in RESULTS:
        if "speedup" in r:
            t = f"{r['ours_ms']:9.2f} ms vs {r['sdpa_ms']:9.2f} ms" if "ours_ms" in r else \
                f"{r['ours_us']:9.1f} us vs {r['sdpa_us']:9.1f} us"
            print(f"  {r['case'][:62]:<62} {t}  {r['speedup']:6.2f}x")
            if "speedup_cached" in r:
                print(f"  {'  ... with cached block means':<62} {r['cached_us']:9.1f} us vs {r['sdpa_us']:9.1f} us"
                      f"  {r['speedup_cached']:6.2f}x")
            if "compiled_sdpa_us" in r:
                print(f"  {'  ... torch.compile reduce-overhead, both':<62} {r['compiled_ours_us']:9.1f} us vs"
                      f" {r['compiled_sdpa_us']:9.1f} us  {r['compiled_sdpa_us'] / r['compiled_ours_us']:6.2f}x")
            if "speedup_graph" in r:
                print(f"  {'  ... cached means, both under CUDA graphs':<62} {r['graph_ours_us']:9.1f} us vs"
                      f" {r['graph_sdpa_us']:9.1f} us  {r['speedup_graph']:6.2f}x")
        elif "pass" in r:
            print(f"  {r['case'][:62]:<62} {'PASS' if r['pass'] else 'FAIL'}")
        elif "error" in r:
            print(f"  {r['case'][:62]:<62} ERROR")
    from moba_rewrite.kernels.triton import configs as triton_configs

    if triton_configs.OVERRIDES:
        print(f"  configs: {triton_configs.OVERRIDES}")
    print(f"\ntotal {time.time() - T0:.0f}s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(RESULTS, fh, indent=1, default=lambda x: None if isinstance(x, float) and math.isnan(x) else str(x))
        print(f"results written to {args.json}")
    if any(r.get("pass") is False or "error" in r for r in RESULTS):
        print("SOME CHECKS FAILED OR ERRORED (see above)")


if __name__ == "__main__":
    main()
