"""Triton backend vs the dense reference, under the Triton interpreter on CPU (tiny shapes)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere in this process

import pytest
import torch

pytest.importorskip("triton")

from moba_rewrite import moba_attention  # noqa: E402
from moba_rewrite.kernels import reference as ref  # noqa: E402
from moba_rewrite.kernels.triton import backend as tb  # noqa: E402

pytestmark = pytest.mark.skipif(not tb.is_available(), reason=tb.unavailable_reason() or "triton unavailable")

TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float16: dict(atol=3e-3, rtol=3e-3)}


def _inputs(b, hq, hkv, tq, tk, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, tq, d, generator=g).to(dtype)
    k = torch.randn(b, hkv, tk, d, generator=g).to(dtype)
    v = torch.randn(b, hkv, tk, d, generator=g).to(dtype)
    return q, k, v


def _gate(q, k, block_size):
    hq = q.shape[1]
    means = ref.repeat_kv(ref.block_means(k, block_size), hq)
    return q.float() @ means.transpose(-1, -2)  # [B, Hq, Tq, NB]


def assert_selection_equivalent(sel, want, q, k, block_size, *, tol=1e-4):
    """Same own block, same number of picks, and the same multiset of gate values (near-ties allowed)."""
    assert sel.shape == want.shape
    gate = _gate(q, k, block_size)
    tq, tk = q.shape[2], k.shape[2]
    own = (torch.arange(tq) + tk - tq) // block_size
    own_hot = torch.nn.functional.one_hot(own, sel.shape[-1]).bool()
    assert (sel & own_hot).sum(-1).eq(1).all(), "own block missing"
    assert torch.equal(sel.sum(-1), want.sum(-1)), "number of selected blocks differs"
    hist_sel = (sel & ~own_hot)
    hist_want = (want & ~own_hot)
    big = torch.finfo(torch.float32).max
    a = torch.where(hist_sel, gate, -big).sort(-1, descending=True).values
    b = torch.where(hist_want, gate, -big).sort(-1, descending=True).values
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


def _check(q, k, v, *, block_size, top_k, causal, attn_mask=None, grads=True):
    scale = q.shape[-1] ** -0.5
    kw = dict(block_size=block_size, top_k=top_k, causal=causal, scale=scale, attn_mask=attn_mask)
    sel = tb.block_selection(q, k, block_size=block_size, top_k=top_k, causal=causal, attn_mask=attn_mask)
    want_sel = ref.block_selection(q, k, block_size=block_size, top_k=top_k, causal=causal, attn_mask=attn_mask)
    assert_selection_equivalent(sel, want_sel, q, k, block_size)
    out = tb.forward(q, k, v, **kw)
    want = ref.forward(q, k, v, **kw)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), want.float(), **TOL[q.dtype])
    if grads:
        go = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(q.dtype)
        got = tb.backward(go, q, k, v, out, **kw)
        exp = ref.backward(go, q, k, v, want, **kw)
        for name, a, e in zip("qkv", got, exp):
            assert a.shape == e.shape and a.dtype == e.dtype, name
            assert torch.isfinite(a).all(), name
            torch.testing.assert_close(a.float(), e.float(), **TOL[q.dtype], msg=lambda m: f"d{name}: {m}")


CASES = {
    # name: (B, Hq, Hkv, Tq, Tk, D, block, top_k, causal, dtype)
    "prefill_causal_fp32": (1, 2, 2, 48, 48, 16, 16, 2, True, torch.float32),
    "prefill_gqa_nonmultiple_fp16": (1, 4, 2, 50, 50, 16, 16, 3, True, torch.float16),
    "noncausal_chunk_fp32": (2, 2, 1, 30, 70, 16, 16, 3, False, torch.float32),
    "chunked_prefill_gqa_fp32": (1, 4, 2, 20, 75, 16, 16, 3, True, torch.float32),
    "decode_gqa_fp16": (2, 4, 1, 1, 90, 16, 16, 3, True, torch.float16),
    "decode_noncausal_fp32": (1, 2, 2, 1, 60, 16, 16, 2, False, torch.float32),
    "own_block_only": (1, 2, 2, 40, 40, 16, 16, 1, True, torch.float32),
    "head_dim_24_block_12": (1, 2, 1, 37, 37, 24, 12, 3, True, torch.float32),
    "group_of_3_block_7_noncausal": (1, 3, 1, 12, 26, 16, 7, 3, False, torch.float32),
    "top_k_beyond_block_count": (1, 2, 2, 30, 30, 16, 8, 20, True, torch.float32),
}


@pytest.mark.parametrize("name", list(CASES))
def test_forward_backward_match_reference(name):
    b, hq, hkv, tq, tk, d, bs, top_k, causal, dtype = CASES[name]
    q, k, v = _inputs(b, hq, hkv, tq, tk, d, dtype)
    _check(q, k, v, block_size=bs, top_k=top_k, causal=causal)


def test_dense_limit_equals_causal_sdpa():
    """Also takes HF-style strided inputs: [B, T, H, D] transposed to [B, H, T, D]."""
    inputs = _inputs(1, 2, 2, 40, 40, 16, torch.float32, seed=3)
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in inputs)
    assert not q.is_contiguous()
    out = tb.forward(q, k, v, block_size=16, top_k=3, causal=True, scale=0.25, attn_mask=None)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.25)
    torch.testing.assert_close(out, want, atol=2e-5, rtol=2e-5)


def test_bool_mask_causal_by_mask_with_padding():
    """causal=False plus a boolean causal+padding mask: hidden blocks are never candidates."""
    q, k, v = _inputs(2, 2, 1, 40, 40, 16, torch.float32, seed=1)
    causal_mask = torch.ones(40, 40, dtype=torch.bool).tril()
    pad = torch.ones(2, 1, 1, 40, dtype=torch.bool)
    pad[1, :, :, 35:] = False  # second sequence: last 5 keys are padding
    _check(q, k, v, block_size=16, top_k=2, causal=False, attn_mask=causal_mask & pad)  # GQA too


def test_float_mask_with_hidden_rows_gives_zeros():
    q, k, v = _inputs(1, 2, 1, 33, 33, 16, torch.float32, seed=2)
    mask = torch.randn(1, 2, 33, 33) * 0.5
    mask[..., 5, :] = float("-inf")  # query 5 sees nothing: output row must be 0, gradients finite
    mask[..., 20:, 0:16] = float("-inf")  # block 0 hidden from late queries: never a candidate
    _check(q, k, v, block_size=16, top_k=2, causal=True, attn_mask=mask)
    out = tb.forward(q, k, v, block_size=16, top_k=2, causal=True, scale=0.25, attn_mask=mask)
    assert out[..., 5, :].abs().max() == 0


def test_decode_with_padding_mask():
    """Split-KV decode honours a [B, 1, 1, Tk] padding mask: bool (fp32, with grads) and additive (fp16)."""
    q, k, v = _inputs(2, 4, 2, 1, 80, 16, torch.float32, seed=8)
    pad = torch.ones(2, 1, 1, 80, dtype=torch.bool)
    pad[0, ..., 10:30] = False  # a hole covering block 1 entirely: never a candidate
    _check(q, k, v, block_size=16, top_k=3, causal=True, attn_mask=pad)
    additive = torch.zeros(2, 1, 1, 80).masked_fill(~pad, float("-inf"))
    _check(q.half(), k.half(), v.half(), block_size=16, top_k=3, causal=True, attn_mask=additive, grads=False)


def _dense_with_selection(q, k, v, selected, block_size, causal, scale):
    hq = q.shape[1]
    tq, tk = q.shape[2], k.shape[2]
    allowed = selected[..., torch.arange(tk) // block_size]
    if causal:
        allowed = allowed & (torch.arange(tk)[None, :] <= torch.arange(tk - tq, tk)[:, None])
    s = (q.float() @ ref.repeat_kv(k, hq).float().transpose(-1, -2)) * scale
    p = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1)
    return p @ ref.repeat_kv(v, hq).float()


@pytest.mark.parametrize("causal", [True, False])
def test_attention_with_fixed_selection(causal):
    """The attention kernels alone, over a random block selection (the gate is not involved)."""
    q, k, v = _inputs(1, 4, 2, 40, 56, 16, torch.float32, seed=4)
    nb = 4
    g = torch.Generator().manual_seed(5)
    selected = torch.rand(1, 4, 40, nb, generator=g) < 0.4
    own = (torch.arange(40) + 16) // 16
    if causal:  # only earlier blocks are meaningful history under causality
        selected &= torch.arange(nb)[None, :] < own[:, None]
    selected |= torch.nn.functional.one_hot(own, nb).bool()
    out = tb.forward_with_selection(q, k, v, selected, block_size=16, causal=causal, scale=0.25)
    want = _dense_with_selection(q, k, v, selected, 16, causal, 0.25)
    torch.testing.assert_close(out, want, atol=2e-5, rtol=2e-5)


def test_given_picks_softmax_reference_is_the_best_attended_gate_score(monkeypatch):
    """`selection_from_picks` (context parallelism's given selection): the kernels' softmax reference
    is each row's best gate score over its own block and picks, the same when computed in row chunks
    (how a long rank's reference stays small) as at once; and the forward over those picks is the
    forward over the same selection as a map."""
    from moba_rewrite.kernels.triton import gate as triton_gate
    from moba_rewrite.kernels.triton.layout import dense_problem

    q, k, v = _inputs(2, 4, 2, 40, 56, 16, torch.float32, seed=8)
    g = torch.Generator().manual_seed(9)
    own = (torch.arange(40) + 16) // 8
    picks = torch.rand(2, 4, 40, 7, generator=g).argsort(-1)[..., :3]  # distinct blocks per row, as a gate gives
    picks = torch.where((picks < own[:, None]) & (torch.rand(2, 4, 40, 3, generator=g) < 0.8), picks, -1)
    p = dense_problem(q, k, v, block_size=8, top_k=4, causal=True, scale=0.25, attn_mask=None)
    whole = triton_gate.selection_from_picks(p, picks)
    monkeypatch.setattr(triton_gate, "_REF_CHUNK_ELEMS", 2 * 4 * 7 * 3)  # rows of 3
    chunked = triton_gate.selection_from_picks(p, picks)
    gate = _gate(q, k, 8)  # [B, Hq, Tq, NB]
    blocks = torch.cat([own.view(1, 1, -1, 1).expand(2, 4, 40, 1), picks], -1)
    best = gate.gather(-1, blocks.clamp(min=0)).masked_fill(blocks < 0, float("-inf")).amax(-1)
    want = best.view(2, 2, 2, 40).permute(0, 1, 3, 2).reshape(4, 80)  # kernel rows t * G + g
    for sel in (whole, chunked):
        torch.testing.assert_close(sel.ref[:, :80], want, atol=1e-5, rtol=1e-5)
    selected = torch.zeros(2, 4, 40, 8, dtype=torch.bool).scatter_(-1, blocks.masked_fill(blocks < 0, 7), True)
    out, _ = tb.forward_selected(q, k, v, picks, block_size=8, causal=True, scale=0.25, attn_mask=None)
    want_out = _dense_with_selection(q, k, v, selected[..., :7], 8, True, 0.25)
    torch.testing.assert_close(out, want_out, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("mode", ["single", "two_pass"])
def test_given_picks_without_the_own_block(mode, monkeypatch):
    """`own_block=False` (context parallelism attends fetched blocks apart from its own): the picks
    only, rows with none give zeros and lse -inf, in both forward modes; the backward given a larger
    softmax's lse equals the torch backend's share of the gradients."""
    from moba_rewrite.kernels.torch import blocks as torch_blocks
    from moba_rewrite.kernels.triton import configs as triton_configs

    monkeypatch.setattr(triton_configs, "pick", lambda name, default: mode if name == "fwd_mode" else default)
    q, k, v = _inputs(2, 4, 2, 40, 56, 16, torch.float32, seed=10)
    g = torch.Generator().manual_seed(11)
    own = (torch.arange(40) + 16) // 8
    picks = torch.rand(2, 4, 40, 7, generator=g).argsort(-1)[..., :3]
    picks = torch.where((picks < own[:, None]) & (torch.rand(2, 4, 40, 3, generator=g) < 0.8), picks, -1)
    picks[:, :, ::5] = -1  # rows that pick nothing
    kw = dict(block_size=8, causal=True, scale=0.25, attn_mask=None)
    out, lse = tb.forward_selected(q, k, v, picks, own_block=False, **kw)
    selected = torch.zeros(2, 4, 40, 8, dtype=torch.bool).scatter_(-1, picks.masked_fill(picks < 0, 7), True)[..., :7]
    s = (q.float() @ ref.repeat_kv(k, 4).float().transpose(-1, -2)) * 0.25
    s = s.masked_fill(~selected[..., torch.arange(56) // 8], float("-inf"))
    want_lse = s.logsumexp(-1)
    want = torch.where(torch.isneginf(want_lse)[..., None], 0.0, torch.softmax(s, -1)) @ ref.repeat_kv(v, 4).float()
    torch.testing.assert_close(out, want, **TOL[torch.float32])
    torch.testing.assert_close(lse, want_lse, atol=1e-5, rtol=1e-5)
    assert bool((out[:, :, ::5] == 0).all()) and bool(torch.isneginf(lse[:, :, ::5]).all())
    whole, whole_lse = tb.forward_selected(q, k, v, picks, **kw)  # a larger softmax: own block + picks
    grad = torch.randn_like(whole)
    got = tb.backward_selected(grad, q, k, v, whole, picks, whole_lse, own_block=False, **kw)
    want_grads = torch_blocks.backward(grad, q, k, v, whole, top_k=4, selection=picks, lse=whole_lse, own_block=False,
                                       **kw)
    for a, e in zip(got, want_grads):
        torch.testing.assert_close(a, e, atol=5e-5, rtol=5e-5)


@pytest.mark.parametrize("tq", [100, 1])
def test_given_picks_only_with_more_queries_than_keys(tq):
    """`own_block=False, causal=False`: k may be shorter than q (context parallelism's fetched tiles
    against every token that picked one), or a single token picked them; forward and backward
    equal the torch backend's, which `test_explicit_selection` checks against dense attention."""
    from moba_rewrite.kernels.torch import blocks as torch_blocks

    q, k, v = _inputs(2, 4, 2, tq, 24, 16, torch.float32, seed=12)
    g = torch.Generator().manual_seed(13)
    picks = torch.randint(0, 3, (2, 4, tq, 2), generator=g)
    picks[..., 1] = torch.where(picks[..., 1] == picks[..., 0], -1, picks[..., 1])
    picks[1, :, ::5] = -1
    kw = dict(block_size=8, causal=False, scale=0.25, attn_mask=None, own_block=False)
    out, lse = tb.forward_selected(q, k, v, picks, **kw)
    want, want_lse = torch_blocks.forward(q, k, v, top_k=3, selection=picks, return_lse=True, **kw)
    torch.testing.assert_close(out, want, **TOL[torch.float32])
    torch.testing.assert_close(lse, want_lse, atol=1e-5, rtol=1e-5)
    grad = torch.randn_like(out)
    got = tb.backward_selected(grad, q, k, v, out, picks, lse, **kw)
    for a, e in zip(got, torch_blocks.backward(grad, q, k, v, want, top_k=3, selection=picks, lse=want_lse, **kw)):
        torch.testing.assert_close(a, e, atol=5e-5, rtol=5e-5)


def test_through_op_with_autograd():
    q, k, v = _inputs(1, 4, 2, 24, 24, 16, torch.float32, seed=6)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = moba_attention(*leaves, block_size=8, top_k=2, causal=True, enable_gqa=True, backend="triton")
    out.square().sum().backward()
    ref_leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    want = moba_attention(*ref_leaves, block_size=8, top_k=2, causal=True, enable_gqa=True, backend="reference")
    want.square().sum().backward()
    torch.testing.assert_close(out, want, atol=2e-5, rtol=2e-5)
    for a, e in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad, e.grad, atol=5e-5, rtol=5e-5)


def test_unsupported_calls_raise_clear_errors():
    q, k, v = _inputs(1, 2, 2, 16, 16, 16, torch.bfloat16)
    assert not tb.supports(q, k, None)
    with pytest.raises(NotImplementedError, match="bfloat16"):
        tb.forward(q, k, v, block_size=8, top_k=2, causal=True, scale=0.25, attn_mask=None)
    q64 = q.double()
    assert not tb.supports(q64, q64, None)
    assert tb.supports(q.float(), k.float(), torch.ones(16, 16, dtype=torch.bool))


def test_kernels_are_registered_as_torch_ops():
    """`moba::triton_attention` (+ backward): schema, fake implementation, autograd registration."""
    q, k, v = _inputs(1, 2, 1, 20, 20, 16, torch.float32, seed=9)
    args = (q, k, v, None, 8, 2, True, 0.25)
    torch.library.opcheck(torch.ops.moba.triton_attention.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    out = torch.ops.moba.triton_attention(*args)
    torch.testing.assert_close(out, ref.forward(q, k, v, block_size=8, top_k=2, causal=True, scale=0.25,
                                                attn_mask=None), atol=2e-5, rtol=2e-5)


_TRACE_SCRIPT = r"""
import os, sys
os.environ.pop("TRITON_INTERPRET", None)  # compiled-kernel mode: the ops are triton_ops using wrap_triton
import torch
from torch.fx.experimental.proxy_tensor import make_fx
from moba_rewrite.kernels.triton import backend as tb
assert not tb.interpreter_active()
q, k, v = torch.randn(2, 4, 100, 64), torch.randn(2, 2, 100, 64), torch.randn(2, 2, 100, 64)
mask = torch.ones(100, 100, dtype=torch.bool).tril()
cases = {  # name: (function, tracing mode)
    "prefill": (lambda q, k, v, m: tb._forward_impl(q, k, v, None, 32, 3, True, 0.125), "fake"),
    "masked": (lambda q, k, v, m: tb._forward_impl(q, k, v, m, 32, 3, False, 0.125), "fake"),
    "decode": (lambda q, k, v, m: tb._forward_impl(q[:, :, :1], k, v, None, 32, 3, True, 0.125), "symbolic"),
    "backward": (lambda q, k, v, m: tb._backward_impl(q, q, k, v, q, None, 32, 3, True, 0.125), "fake"),
}
for name, (fn, mode) in cases.items():
    graph = make_fx(fn, tracing_mode=mode)(q, k, v, mask)
    launches = sum("triton_kernel_wrapper" in str(n.target) for n in graph.graph.nodes)
    assert launches >= 4, (name, launches)
    print(name, launches)
"""


def test_host_code_is_traceable_for_inductor():
    """With compiled (not interpreted) kernels, the ops' host code traces with symbolic shapes into
    torch ops plus captured Triton launches: what torch.compile/AOTInductor need to embed them."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", _TRACE_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "backward" in res.stdout
