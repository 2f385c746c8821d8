"""moba_attention_varlen: validation, and every backend path against the dense reference per sequence."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere in this process

import pytest
import torch

from moba_rewrite import moba_attention  # noqa: E402
from moba_rewrite.kernels import BackendUnavailable  # noqa: E402
from moba_rewrite.attention.varlen import moba_attention_varlen  # noqa: E402

TOL = {torch.float32: dict(atol=3e-5, rtol=3e-5), torch.float16: dict(atol=3e-3, rtol=3e-3)}


def _packed(lens_q, lens_k, hq, hkv, d, dtype, seed=0, extra_rows=0):
    g = torch.Generator().manual_seed(seed)
    tq, tk = sum(lens_q) + extra_rows, sum(lens_k) + extra_rows
    q = torch.randn(tq, hq, d, generator=g).to(dtype)
    k = torch.randn(tk, hkv, d, generator=g).to(dtype)
    v = torch.randn(tk, hkv, d, generator=g).to(dtype)
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32)
    return q, k, v, cu_q, cu_k


def _per_sequence(q, k, v, cu_q, cu_k, **kw):
    """Oracle: the dense reference on each sequence alone, through the public 4-D API."""
    out = torch.zeros_like(q)
    for s in range(cu_q.numel() - 1):
        q0, q1, k0, k1 = cu_q[s].item(), cu_q[s + 1].item(), cu_k[s].item(), cu_k[s + 1].item()
        if q1 == q0:
            continue
        o = moba_attention(q[q0:q1].transpose(0, 1)[None], k[k0:k1].transpose(0, 1)[None],
                           v[k0:k1].transpose(0, 1)[None], enable_gqa=True, backend="reference", **kw)
        out[q0:q1] = o[0].transpose(0, 1)
    return out


def _grads(fn, q, k, v, go):
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = fn(*leaves)
    out.backward(go)
    return out.detach(), [t.grad for t in leaves]


def test_reference_path_equals_dense_reference_per_sequence():
    q, k, v, cu_q, cu_k = _packed([20, 7, 33], [20, 30, 33], 4, 2, 16, torch.float32)
    kw = dict(block_size=8, top_k=3, causal=True)
    got = moba_attention_varlen(q, k, v, cu_q, cu_k, backend="reference", **kw)
    torch.testing.assert_close(got, _per_sequence(q, k, v, cu_q, cu_k, **kw))


def test_torch_path_matches_reference_with_grads():
    q, k, v, cu_q, cu_k = _packed([12, 25], [30, 25], 2, 1, 16, torch.float32, seed=1)
    kw = dict(block_size=8, top_k=2, causal=True)
    go = torch.randn_like(q)
    out, g = _grads(lambda a, b, c: moba_attention_varlen(a, b, c, cu_q, cu_k, backend="torch", **kw), q, k, v, go)
    want, gw = _grads(lambda a, b, c: moba_attention_varlen(a, b, c, cu_q, cu_k, backend="reference", **kw),
                      q, k, v, go)
    torch.testing.assert_close(out, want, **TOL[torch.float32])
    for a, e in zip(g, gw):
        torch.testing.assert_close(a, e, **TOL[torch.float32])


TRITON_CASES = {
    # lens_q, lens_k, Hq, Hkv, causal, dtype, extra unused rows
    "prefill_gqa_fp32": ([40, 17, 1], [40, 17, 50], 4, 2, True, torch.float32, 0),
    "chunked_noncausal_fp16": ([9, 30], [45, 30], 2, 2, False, torch.float16, 0),
    "decode_one_query_per_sequence_fp16": ([1, 0, 1], [40, 3, 70], 4, 1, True, torch.float16, 0),
    "empty_sequence_and_padding_rows": ([0, 21, 35], [5, 40, 35], 2, 1, True, torch.float32, 3),
}


@pytest.mark.parametrize("name", list(TRITON_CASES))
def test_triton_varlen_matches_reference(name):
    pytest.importorskip("triton")
    from moba_rewrite.kernels.triton import backend as tb

    if not tb.is_available():
        pytest.skip(tb.unavailable_reason())
    lens_q, lens_k, hq, hkv, causal, dtype, extra = TRITON_CASES[name]
    q, k, v, cu_q, cu_k = _packed(lens_q, lens_k, hq, hkv, 16, dtype, seed=2, extra_rows=extra)
    kw = dict(block_size=16, top_k=3, causal=causal)
    go = torch.randn(q.shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    out, g = _grads(lambda a, b, c: moba_attention_varlen(a, b, c, cu_q, cu_k, backend="triton", **kw), q, k, v, go)
    want, gw = _grads(lambda a, b, c: moba_attention_varlen(a, b, c, cu_q, cu_k, backend="reference", **kw),
                      q, k, v, go)
    torch.testing.assert_close(out.float(), want.float(), **TOL[dtype])
    for name_, a, e in zip("qkv", g, gw):
        assert torch.isfinite(a).all(), name_
        torch.testing.assert_close(a.float(), e.float(), **TOL[dtype], msg=lambda m: f"d{name_}: {m}")
    if extra:
        assert out[cu_q[-1]:].abs().max() == 0  # rows outside every sequence stay zero


def test_flash_attn_backend_reports_why_it_is_unavailable():
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("flash-attn is installed here")
    q, k, v, cu_q, cu_k = _packed([8], [8], 2, 2, 16, torch.float16)
    with pytest.raises(BackendUnavailable, match="flash_attn.*flash-attn 2.x is not installed"):
        moba_attention_varlen(q, k, v, cu_q, cu_k, block_size=4, top_k=2, backend="flash_attn")


def _ok():
    q, k, v, cu_q, cu_k = _packed([8, 4], [8, 6], 4, 2, 16, torch.float32)
    return dict(q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, block_size=4, top_k=2)


@pytest.mark.parametrize("change, message", [
    (lambda a: a.update(q=a["q"][None]), "q must be a 3-D packed tensor"),
    (lambda a: a.update(k=a["k"].int()), "k must be floating point"),
    (lambda a: a.update(v=a["v"].double()), "must share a dtype"),
    (lambda a: a.update(q=a["q"][:, :3]), r"query heads \(3\) must be a multiple"),
    (lambda a: a.update(cu_seqlens_q=a["cu_seqlens_q"].long()), "cu_seqlens_q must be a 1-D int32"),
    (lambda a: a.update(cu_seqlens_k=torch.tensor([0], dtype=torch.int32)), "at least 2 offsets"),
    (lambda a: a.update(cu_seqlens_q=torch.tensor([1, 8, 12], dtype=torch.int32)), "must start at 0"),
    (lambda a: a.update(cu_seqlens_q=torch.tensor([0, 8, 5], dtype=torch.int32)), "non-decreasing"),
    (lambda a: a.update(cu_seqlens_k=torch.tensor([0, 8, 20], dtype=torch.int32)), "only 14 rows"),
    (lambda a: a.update(cu_seqlens_k=torch.tensor([0, 14], dtype=torch.int32)), "as many sequences"),
    (lambda a: a.update(cu_seqlens_k=torch.tensor([0, 5, 14], dtype=torch.int32)), "sequence 0 has 8 queries but 5"),
    (lambda a: a.update(block_size=0), "block_size must be an integer >= 1"),
    (lambda a: a.update(top_k=2.0), "top_k must be an integer >= 1"),
    (lambda a: a.update(scale=float("nan")), "scale must be a finite number"),
    (lambda a: a.update(backend="cuda"), "backend must be one of"),
])
def test_validation_errors(change, message):
    args = _ok()
    change(args)
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    cu_q, cu_k = args.pop("cu_seqlens_q"), args.pop("cu_seqlens_k")
    with pytest.raises(ValueError, match=message):
        moba_attention_varlen(q, k, v, cu_q, cu_k, **args)


# ----------------------------------------------------------------------------- flash_attn backend logic
# flash-attn is not installed here. Its algorithm (segments, gathers, LSE merge, backward with the
# merged output) is checked with a pure-torch stand-in for the two flash-attn functions it calls;
# the real kernels' API conformance is untested on this machine.


def _standin_fwd(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=None, causal=False,
                 return_attn_probs=False, **_):
    out = torch.zeros_like(q)
    lse = torch.zeros(q.shape[1], q.shape[0])
    g = q.shape[1] // k.shape[1]
    for a, b, c, d in zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), cu_k[:-1].tolist(), cu_k[1:].tolist()):
        s = torch.einsum("qhd,khd->hqk", q[a:b].float(), k[c:d].float().repeat_interleave(g, 1)) * softmax_scale
        if causal:  # bottom-right aligned, as flash-attn >= 2.1
            s = s.masked_fill(torch.arange(d - c)[None, :] > torch.arange(b - a)[:, None] + (d - c) - (b - a),
                              float("-inf"))
        lse[:, a:b] = torch.logsumexp(s, -1)
        out[a:b] = torch.einsum("hqk,khd->qhd", torch.softmax(s, -1), v[c:d].float().repeat_interleave(g, 1))
    return out, lse, None


def _standin_bwd(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                 max_seqlen_k, dropout_p, softmax_scale, causal, window_size_left=-1, window_size_right=-1,
                 softcap=0.0, alibi_slopes=None, deterministic=False, rng_state=None):
    g = q.shape[1] // k.shape[1]
    dq.zero_(), dk.zero_(), dv.zero_()
    cu_q, cu_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for a, b, c, d in zip(cu_q[:-1], cu_q[1:], cu_k[:-1], cu_k[1:]):
        kk, vv = k[c:d].repeat_interleave(g, 1), v[c:d].repeat_interleave(g, 1)
        s = torch.einsum("qhd,khd->hqk", q[a:b], kk) * softmax_scale
        if causal:
            s = s.masked_fill(torch.arange(d - c)[None, :] > torch.arange(b - a)[:, None] + (d - c) - (b - a),
                              float("-inf"))
        p = torch.exp(s - softmax_lse[:, a:b, None])
        do = dout[a:b]
        dp = torch.einsum("qhd,khd->hqk", do, vv)
        delta = (do * out[a:b]).sum(-1).T[..., None]
        ds = p * (dp - delta)
        dq[a:b] = torch.einsum("hqk,khd->qhd", ds, kk) * softmax_scale
        dk[c:d] = (torch.einsum("hqk,qhd->khd", ds, q[a:b]) * softmax_scale).unflatten(1, (-1, g)).sum(2)
        dv[c:d] = torch.einsum("hqk,qhd->khd", p, do).unflatten(1, (-1, g)).sum(2)


@pytest.mark.parametrize("causal", [True, False])
def test_flash_attn_algorithm_with_torch_standin(monkeypatch, causal):
    pytest.importorskip("triton")
    from moba_rewrite.kernels import flash_attn as fa
    from moba_rewrite.kernels.triton import backend as tb

    if not tb.is_available():
        pytest.skip(tb.unavailable_reason())
    monkeypatch.setattr(fa, "flash_attn_varlen_func", _standin_fwd, raising=False)
    monkeypatch.setattr(fa, "_flash_attn_varlen_backward", _standin_bwd, raising=False)
    monkeypatch.setattr(fa, "unsupported_reason", lambda *a, **k: None)
    q, k, v, cu_q, cu_k = _packed([30, 9], [30, 41], 4, 2, 16, torch.float32, seed=4, extra_rows=2)
    kw = dict(block_size=8, top_k=3, causal=causal, scale=0.25)
    out = fa.forward_varlen(q, k, v, cu_q, cu_k, **kw)
    want = _per_sequence(q, k, v, cu_q, cu_k, **kw)
    torch.testing.assert_close(out, want, **TOL[torch.float32])
    go = torch.randn_like(q)
    got = fa.backward_varlen(go, q, k, v, out, cu_q, cu_k, **kw)
    _, exp = _grads(lambda a, b, c: moba_attention_varlen(a, b, c, cu_q, cu_k, backend="reference", **kw), q, k, v, go)
    for name, a, e in zip("qkv", got, exp):
        torch.testing.assert_close(a, e, **TOL[torch.float32], msg=lambda m: f"d{name}: {m}")
