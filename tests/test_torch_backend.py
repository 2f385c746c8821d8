"""The `torch` backend against the dense `reference` oracle and against SDPA.

Every case runs through `moba_rewrite.moba_attention(backend=...)` (the public op, autograd
included) and through the kernel functions directly. Tiles and gate chunks are shrunk in some
cases so the chunked code paths run on small shapes. Inputs are random but seeded and drawn
in fp32/fp64 so that the gate has no near-ties; half-precision cases compare both backends on
the same half-precision inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

import moba_rewrite
from moba_rewrite.kernels import reference
from moba_rewrite.kernels.torch import blocks as torch_blocks, fast as torch_fast, online as torch_online, select as torch_select


@dataclass
class Case:
    name: str
    b: int = 2
    hq: int = 2
    hkv: int = 2
    tq: int = 64
    tk: int = 64
    d: int = 16
    block_size: int = 16
    top_k: int = 3
    causal: bool = True
    mask: str | None = None  # see _make_mask
    q_gain: float = 1.0  # large gains push scores past the backend's no-max fast path
    small_tiles: bool = False
    path: str = "fast"  # which implementation torch_blocks must pick: "fast" or "online"


CASES = [
    Case("prefill_causal"),
    Case("prefill_noncausal", causal=False),
    Case("prefill_subblocks", tq=60, tk=60, block_size=12, small_tiles=True),
    Case("prefill_subblocks_noncausal_gqa", hq=4, hkv=2, tq=60, tk=66, block_size=12, causal=False,
         small_tiles=True),
    Case("decode", tq=1, tk=70, hq=4, hkv=2, path="online"),
    Case("decode_noncausal", tq=1, tk=70, causal=False, path="online"),
    Case("chunked_prefill_gqa", tq=21, tk=70, hq=4, hkv=2, small_tiles=True),
    Case("chunked_prefill_short", tq=9, tk=70, hq=4, hkv=2, path="online"),
    Case("mqa_partial_block", tq=45, tk=45, hq=3, hkv=1, block_size=8, top_k=2),
    Case("tk_below_block", tq=10, tk=10, block_size=16, path="online"),
    Case("tk_below_block_decode", tq=1, tk=5, block_size=16, causal=False, path="online"),
    Case("top1_own_only", top_k=1, tk=50, tq=50),
    Case("topk_exceeds_blocks", top_k=9, tk=40, tq=40, block_size=8),
    Case("bool_padding", tq=30, tk=75, hq=4, hkv=2, mask="padding", small_tiles=True),
    Case("bool_padding_noncausal", tq=30, tk=75, causal=False, mask="padding"),
    Case("explicit_bool_causal", tq=30, tk=75, causal=False, mask="causal_bool", small_tiles=True),
    Case("additive_inf_noncausal", tq=30, tk=75, hq=4, hkv=2, causal=False, mask="additive", path="online"),
    Case("additive_inf_causal", tq=30, tk=75, mask="additive", small_tiles=True, path="online"),
    Case("additive_query_shared", tq=30, tk=75, mask="additive_2d", path="online"),
    Case("bool_random_empty_rows", tq=30, tk=75, mask="random_bool", small_tiles=True),
    Case("bool_head_mask_gqa", tq=24, tk=60, hq=4, hkv=2, causal=False, mask="head_bool"),
    Case("bool_decode_padding", tq=1, tk=75, mask="padding", path="online"),
    Case("large_scores_causal", q_gain=40.0, small_tiles=True, path="online"),
    Case("large_scores_mask", q_gain=40.0, tq=30, tk=75, mask="padding", causal=False, path="online"),
]


def _make_mask(kind: str | None, c: Case) -> torch.Tensor | None:
    if kind is None:
        return None
    if kind == "padding":  # [B, 1, 1, Tk]; batch 1 sees only its last 40 keys
        m = torch.ones(c.b, 1, 1, c.tk, dtype=torch.bool)
        m[1, ..., : c.tk - 40] = False
        return m
    if kind == "causal_bool":  # bottom-right aligned causal mask as a model would build it
        return torch.ones(c.tk, c.tk, dtype=torch.bool).tril()[-c.tq:]
    if kind == "additive":  # [B, Hq, Tq, Tk] float with -inf, including fully hidden rows
        m = torch.zeros(c.b, c.hq, c.tq, c.tk)
        m[torch.rand(m.shape) < 0.4] = float("-inf")
        m += torch.rand(m.shape) * 0.5
        m[0, 1, 3] = float("-inf")
        m[-1, :, 7] = float("-inf")
        return m
    if kind == "additive_2d":  # [Tq, Tk], shared by batch and heads
        m = torch.randn(c.tq, c.tk) * 0.3
        m[:, :10] = float("-inf")
        m[5] = float("-inf")
        return m
    if kind == "random_bool":  # [B, 1, Tq, Tk], sparse, with fully hidden rows
        m = torch.rand(c.b, 1, c.tq, c.tk) < 0.3
        m[0, 0, 2] = False
        m[1, 0, -1] = False
        return m
    if kind == "head_bool":  # [1, Hq, 1, Tk]: each head hides a different key range
        m = torch.ones(1, c.hq, 1, c.tk, dtype=torch.bool)
        for h in range(c.hq):
            m[0, h, 0, h * 10: h * 10 + 25] = False
        return m
    raise AssertionError(kind)


def _inputs(c: Case, dtype: torch.dtype):
    q = torch.randn(c.b, c.hq, c.tq, c.d, dtype=torch.float64) * c.q_gain
    k = torch.randn(c.b, c.hkv, c.tk, c.d, dtype=torch.float64)
    v = torch.randn(c.b, c.hkv, c.tk, c.d, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), v.to(dtype)


@pytest.fixture
def small_tiles(monkeypatch):
    """Shrink tiles and gate chunks so that loops over tiles and chunks run on tiny shapes."""
    monkeypatch.setattr(torch_online, "_TILE_ELEMS", 64)
    monkeypatch.setattr(torch_fast, "_TILE_ELEMS", 64)
    monkeypatch.setattr(torch_fast, "_SUB_BLOCK", 5)  # does not divide the block: ragged sub-tiles
    monkeypatch.setattr(torch_select, "_CHUNK_ELEMS", 96)


def _run(backend: str, q, k, v, c: Case, mask, weight):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = moba_rewrite.moba_attention(
        q, k, v, block_size=c.block_size, top_k=c.top_k, causal=c.causal, attn_mask=mask,
        enable_gqa=c.hq != c.hkv, backend=backend,
    )
    (out.float() * weight).sum().backward()
    return out.detach(), q.grad, k.grad, v.grad


TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 2e-3),
       torch.bfloat16: (1.6e-2, 1.6e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_matches_reference(case: Case, dtype, request):
    if case.small_tiles:
        request.getfixturevalue("small_tiles")
    q, k, v = _inputs(case, dtype)
    mask = _make_mask(case.mask, case)
    sel_ref = reference.block_selection(q, k, block_size=case.block_size, top_k=case.top_k,
                                        causal=case.causal, attn_mask=mask)
    sel = torch_blocks.block_selection(q, k, block_size=case.block_size, top_k=case.top_k,
                                       causal=case.causal, attn_mask=mask)
    assert torch.equal(sel, sel_ref)
    impl = torch_blocks.implementation(q, k, v, block_size=case.block_size, scale=case.d ** -0.5, attn_mask=mask)
    assert impl is {"fast": torch_fast, "online": torch_online}[case.path]
    weight = torch.randn(case.b, case.hq, case.tq, case.d)
    got = _run("torch", q, k, v, case, mask, weight)
    want = _run("reference", q, k, v, case, mask, weight)
    rtol, atol = TOL[dtype]
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert g.dtype == dtype and g.shape == w.shape, name
        assert not torch.isnan(g).any(), name
        scale = max(1.0, w.abs().max().item())
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol * scale, msg=lambda m: f"{name}: {m}")


def test_kernel_functions_directly_fp64():
    """forward/backward called without the op, fp64, GQA + chunked prefill + additive mask."""
    c = Case("direct", b=1, hq=6, hkv=2, tq=37, tk=83, block_size=10, top_k=4, mask="additive")
    q, k, v = _inputs(c, torch.float64)
    mask = _make_mask("additive", c)
    kw = dict(block_size=c.block_size, top_k=c.top_k, causal=True, scale=0.3, attn_mask=mask)
    out = torch_blocks.forward(q, k, v, **kw)
    want = reference.forward(q, k, v, **kw)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    go = torch.randn_like(out)
    for g, w in zip(torch_blocks.backward(go, q, k, v, out, **kw), reference.backward(go, q, k, v, want, **kw)):
        torch.testing.assert_close(g, w, rtol=1e-11, atol=1e-11)


def test_rows_without_visible_key_are_zero():
    c = Case("empty", b=1, hq=2, hkv=2, tq=20, tk=40, block_size=8)
    q, k, v = _inputs(c, torch.float32)
    mask = torch.ones(1, 2, 20, 40, dtype=torch.bool)
    mask[0, 0, 4] = False
    mask[0, 1, :] = False
    q.requires_grad_(True)
    out = moba_rewrite.moba_attention(q, k, v, block_size=8, top_k=2, attn_mask=mask, backend="torch")
    out.sum().backward()
    assert torch.equal(out[0, 0, 4], torch.zeros(16)) and torch.equal(out[0, 1], torch.zeros(20, 16))
    assert torch.isfinite(q.grad).all() and torch.equal(q.grad[0, 1], torch.zeros(20, 16))


@pytest.mark.parametrize(
    "shape",
    [
        dict(hq=2, hkv=2, tq=9, tk=9, bs=3, top_k=2, causal=True, mask=None),
        dict(hq=4, hkv=2, tq=5, tk=11, bs=4, top_k=2, causal=True, mask="bool"),
        dict(hq=2, hkv=1, tq=7, tk=7, bs=3, top_k=2, causal=False, mask="additive"),
    ],
    ids=["mha_causal", "gqa_chunked_bool", "mqa_noncausal_additive"],
)
def test_gradcheck_fp64(shape):
    b, d = 1, 4
    q = torch.randn(b, shape["hq"], shape["tq"], d, dtype=torch.float64, requires_grad=True)
    k = torch.randn(b, shape["hkv"], shape["tk"], d, dtype=torch.float64, requires_grad=True)
    v = torch.randn(b, shape["hkv"], shape["tk"], d, dtype=torch.float64, requires_grad=True)
    mask = None
    if shape["mask"] == "bool":
        mask = torch.rand(b, 1, shape["tq"], shape["tk"]) < 0.7
    elif shape["mask"] == "additive":
        mask = torch.randn(shape["tq"], shape["tk"], dtype=torch.float64)
        mask[torch.rand(mask.shape) < 0.3] = float("-inf")

    def fn(q, k, v):
        return moba_rewrite.moba_attention(q, k, v, block_size=shape["bs"], top_k=shape["top_k"],
                                           causal=shape["causal"], attn_mask=mask,
                                           enable_gqa=shape["hq"] != shape["hkv"], backend="torch")

    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-6, fast_mode=True)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("hq,hkv,tq", [(4, 4, 50), (4, 2, 50), (4, 1, 50), (4, 2, 17)])
def test_dense_limit_equals_sdpa(causal, hq, hkv, tq):
    tk, d, bs, top_k = 50, 16, 16, 4  # 4 * 16 >= 50: every block is selected
    q = torch.randn(2, hq, tq, d, requires_grad=True)
    k = torch.randn(2, hkv, tk, d, requires_grad=True)
    v = torch.randn(2, hkv, tk, d, requires_grad=True)
    out = moba_rewrite.moba_attention(q, k, v, block_size=bs, top_k=top_k, causal=causal,
                                      enable_gqa=hq != hkv, backend="torch")
    if causal and tq < tk:  # SDPA's is_causal is top-left aligned; MoBA's queries are the newest
        mask = torch.ones(tk, tk, dtype=torch.bool).tril()[-tq:]
        want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=hq != hkv)
    else:
        want = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=hq != hkv)
    torch.testing.assert_close(out, want, rtol=2e-5, atol=2e-5)
    w = torch.randn_like(out)
    got = torch.autograd.grad((out * w).sum(), (q, k, v))
    ref = torch.autograd.grad((want * w).sum(), (q, k, v))
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=2e-5, atol=2e-5)


def test_long_context_never_builds_quadratic_tensors():
    """At Tq = Tk = 8192 no temporary may hold Tq*Tk/8 elements (full gate or scores)."""
    tk = 8192
    limit = tk * tk // 8
    seen = []

    q = torch.randn(1, 1, tk, 8)
    k = torch.randn(1, 1, tk, 8)
    v = torch.randn(1, 1, tk, 8)
    from torch.utils._python_dispatch import TorchDispatchMode

    class _Largest(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    seen.append(t.numel())
            return out

    with _Largest():
        out = torch_blocks.forward(q, k, v, block_size=64, top_k=3, causal=True, scale=0.35, attn_mask=None)
        torch_blocks.backward(out, q, k, v, out, block_size=64, top_k=3, causal=True, scale=0.35, attn_mask=None)
    assert max(seen) < limit, f"largest temporary {max(seen)} elements"
    # Spot check the long run against the reference on a slice of queries.
    sel = torch_blocks.block_selection(q[:, :, -64:], k, block_size=64, top_k=3, causal=True)
    want = reference.forward(q[:, :, -64:], k, v, block_size=64, top_k=3, causal=True, scale=0.35, attn_mask=None)
    assert sel.sum(-1).max().item() == 3
    torch.testing.assert_close(out[:, :, -64:], want, rtol=2e-5, atol=2e-5)
    assert math.isfinite(out.abs().sum().item())


@pytest.mark.parametrize("mask_kind", [None, "additive"], ids=["fast", "online"])
def test_noncontiguous_inputs(mask_kind):
    """[B, T, H, D] tensors transposed to SDPA layout, as models pass them."""
    c = Case("bthd", hq=4, hkv=2, tq=40, tk=56, block_size=8)
    q = torch.randn(c.b, c.tq, c.hq, c.d).transpose(1, 2)
    k = torch.randn(c.b, c.tk, c.hkv, c.d).transpose(1, 2)
    v = torch.randn(c.b, c.tk, c.hkv, c.d).transpose(1, 2)
    mask = _make_mask(mask_kind, c)
    weight = torch.randn(c.b, c.hq, c.tq, c.d)
    got = _run("torch", q, k, v, c, mask, weight)
    want = _run("reference", q.contiguous(), k.contiguous(), v.contiguous(), c, mask, weight)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=2e-5, atol=2e-5)


def test_inference_mode_through_the_threaded_split_and_after_it(monkeypatch):
    """`torch.inference_mode()` is per thread: the split's worker threads must enter it to write the
    caller's (inference-tensor) output, and a later call outside it must not write into per-thread
    scratch buffers made inside it. Both calls equal the reference."""
    monkeypatch.setattr(torch_blocks, "_SPLIT_MIN_ROWS", 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        g = torch.Generator().manual_seed(4)
        q, k, v = (torch.randn(2, 4, 192, 16, generator=g) for _ in range(3))
        if not torch_blocks._split_plan(q, k)[1]:
            pytest.skip("no threaded split on this build (ATen's threads are not OpenMP)")
        want = reference.forward(q, k, v, block_size=32, top_k=3, causal=True, scale=0.25, attn_mask=None)
        with torch.inference_mode():
            inside = moba_rewrite.moba_attention(q, k, v, block_size=32, top_k=3, scale=0.25, backend="torch")
        with torch.no_grad():
            outside = moba_rewrite.moba_attention(q, k, v, block_size=32, top_k=3, scale=0.25, backend="torch")
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(inside.clone(), want, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(outside, want, atol=2e-5, rtol=2e-5)
