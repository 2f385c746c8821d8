"""NaN, inf and empty tensors through every backend (reference, torch, Triton under the
interpreter, varlen, decode, cached block means): wherever the dense reference is finite, every
backend is finite and equal to it; a block whose gate score is NaN is never selected (SPEC
section 2 item 4); empty batches give empty outputs; impossible shapes and parameters are
ValueErrors saying what was expected (issue 17).
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere in this process

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import moba_rewrite as mr  # noqa: E402
from moba_rewrite.attention.varlen import moba_attention_varlen  # noqa: E402
from moba_rewrite.kernels import reference  # noqa: E402
from moba_rewrite.kernels.torch import select as torch_select  # noqa: E402

# NaN inputs make numpy (the Triton interpreter) warn; the values are what is checked.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
NAN, INF = float("nan"), float("inf")


def qkv(b=1, hq=2, hkv=1, tq=32, tk=32, d=16, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(shape, generator=g).to(dtype) for shape in ((b, hq, tq, d), (b, hkv, tk, d), (b, hkv, tk, d)))


def assert_agrees_where_finite(got: torch.Tensor, want: torch.Tensor, atol=2e-5) -> None:
    finite = torch.isfinite(want)
    assert torch.isfinite(got[finite]).all(), f"{int((~torch.isfinite(got[finite])).sum())} values non-finite " \
                                              "where the reference is finite"
    torch.testing.assert_close(got[finite], want[finite], atol=atol, rtol=1e-4)


# One poisoned element of q, k or v per batch item: (tensor, position, value). Each batch item
# is an independent problem, so one call checks them all.
POISONS = [("k", 5, NAN), ("k", 13, NAN), ("k", 5, INF), ("k", 5, -INF), ("q", 20, NAN), ("v", 9, NAN), (None, 0, 0)]


def poisoned(tq: int):
    q, k, v = qkv(b=len(POISONS), hq=2, hkv=1, tq=tq)
    for i, (which, pos, value) in enumerate(POISONS):
        if which is not None:
            t = {"q": q, "k": k, "v": v}[which]
            t[i, 0, min(pos, t.shape[2] - 1), 3] = value
    return q, k, v


# Triton runs under the interpreter here (about a second per call): four calls cover the prefill
# gate (causal and not), the decode gate and the decode gate on cached block means.
CASES = [("torch", causal, tq, False) for causal in (True, False) for tq in (16, 1)] + [
    ("triton", True, 16, False), ("triton", False, 16, False), ("triton", True, 1, False), ("triton", False, 1, True)]


@pytest.mark.parametrize("backend, causal, tq, cached_means", CASES)
def test_poisoned_inputs_agree_with_the_reference_where_it_is_finite(backend, causal, tq, cached_means):
    q, k, v = poisoned(tq)
    kw = dict(block_size=8, top_k=3, causal=causal, enable_gqa=True)
    want = mr.moba_attention(q, k, v, backend="reference", **kw)
    assert torch.isfinite(want[-1]).all() and torch.isfinite(want).sum() > want[-1].numel()  # something to compare
    means = mr.key_block_means(k, 8) if cached_means else None
    assert_agrees_where_finite(mr.moba_attention(q, k, v, backend=backend, key_block_means=means, **kw), want)


@pytest.mark.parametrize("select", [reference.block_selection, torch_select.block_selection],
                         ids=["reference", "torch"])
def test_a_block_with_a_nan_key_is_never_selected(select):
    """The NaN block loses its place to the next best candidate (it does not use up a pick)."""
    q, k, _ = qkv(tq=64, tk=64)
    k[0, 0, 9, 0] = NAN  # block 1 of 8
    chosen = select(q, k, block_size=8, top_k=4, causal=True)
    own = torch.arange(64) // 8
    assert not chosen[..., 1][:, :, own > 1].any()  # later queries never route to it
    history = chosen.sum(-1) - 1  # picks besides the own block
    assert (history[:, :, own >= 4] == 3).all()  # three candidates still chosen whenever >= 3 others exist


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
def test_varlen_with_a_nan_key_agrees_with_the_reference(backend):
    g = torch.Generator().manual_seed(1)
    lens = [20, 27]
    q, k, v = (torch.randn(sum(lens), 2, 16, generator=g) for _ in range(3))
    k[20 + 3, 0, 1] = NAN  # sequence 1, its first block
    cu = torch.tensor([0, 20, 47], dtype=torch.int32)
    kw = dict(block_size=8, top_k=2, causal=True)
    got = moba_attention_varlen(q, k, v, cu, cu, backend=backend, **kw)
    want = torch.cat([mr.moba_attention(q[a:b].transpose(0, 1)[None], k[a:b].transpose(0, 1)[None],
                                        v[a:b].transpose(0, 1)[None], backend="reference", **kw)[0].transpose(0, 1)
                      for a, b in ((0, 20), (20, 47))])
    assert_agrees_where_finite(got, want)
    assert torch.isfinite(got[:20]).all()  # the other sequence never sees the NaN


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
def test_an_empty_batch_gives_an_empty_output_and_gradients(backend):
    q, k, v = (t.requires_grad_() for t in qkv(b=0, hq=4, hkv=2))
    out = mr.moba_attention(q, k, v, block_size=8, top_k=2, enable_gqa=True, backend=backend)
    assert out.shape == q.shape
    out.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
def test_an_empty_packed_batch_gives_an_empty_output(backend):
    q = torch.randn(0, 2, 8)
    cu = torch.tensor([0, 0], dtype=torch.int32)
    assert moba_attention_varlen(q, q, q, cu, cu, block_size=4, top_k=2, backend=backend).shape == q.shape


@pytest.mark.parametrize("shapes, says", [
    (((1, 0, 8, 4), (1, 0, 8, 4)), "head counts must be >= 1"),
    (((1, 2, 8, 0), (1, 2, 8, 0)), "head dim must be >= 1"),
    (((1, 2, 0, 4), (1, 2, 8, 4)), "sequence lengths must be >= 1"),
])
def test_impossible_shapes_are_value_errors(shapes, says):
    (qs, ks) = shapes
    with pytest.raises(ValueError, match=says):
        mr.moba_attention(torch.randn(qs), torch.randn(ks), torch.randn(ks), block_size=4, top_k=2)


@pytest.mark.parametrize("top_k", [2**31, 2**63, 2**70])
def test_top_k_beyond_the_bound_is_refused_before_the_op(top_k):
    q, k, v = qkv(hkv=2, tq=8, tk=8)
    with pytest.raises(ValueError, match=r"top_k must be an integer <= 2\*\*31 - 1"):
        mr.moba_attention(q, k, v, block_size=4, top_k=top_k)
    with pytest.raises(ValueError, match=r"block_size must be an integer <= 2\*\*31 - 1"):
        mr.moba_attention(q, k, v, block_size=top_k, top_k=2)


def test_the_largest_top_k_is_dense_attention_eagerly_and_traced():
    q, k, v = qkv(hkv=2, tq=16, tk=16)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    class Site(torch.nn.Module):
        def forward(self, q, k, v):
            return mr.moba_attention(q, k, v, block_size=4, top_k=2**31 - 1)

    for backend in ["reference", "torch", "triton"]:
        got = mr.moba_attention(q, k, v, block_size=4, top_k=2**31 - 1, backend=backend)
        torch.testing.assert_close(got, dense, atol=2e-5, rtol=1e-4)
    program = torch.export.export(Site(), (q, k, v))
    torch.testing.assert_close(program.module()(q, k, v), dense, atol=2e-5, rtol=1e-4)


@st.composite
def poisoned_problems(draw):
    b, hkv, group = draw(st.integers(0, 2)), draw(st.integers(1, 2)), draw(st.integers(1, 2))
    tk = draw(st.integers(1, 24))
    tq = draw(st.integers(1, tk))
    d = draw(st.sampled_from([4, 8]))
    q, k, v = qkv(b=b, hq=hkv * group, hkv=hkv, tq=tq, tk=tk, d=d, seed=draw(st.integers(0, 2**16)))
    if b and draw(st.booleans()):
        which = draw(st.sampled_from(["q", "k", "v"]))
        t = {"q": q, "k": k, "v": v}[which]
        t[draw(st.integers(0, b - 1)), draw(st.integers(0, t.shape[1] - 1)), draw(st.integers(0, t.shape[2] - 1)),
          draw(st.integers(0, d - 1))] = draw(st.sampled_from([NAN, INF, -INF]))
    kw = dict(block_size=draw(st.integers(1, 8)), top_k=draw(st.integers(1, 4)), causal=draw(st.booleans()),
              enable_gqa=True)
    return q, k, v, kw


@given(poisoned_problems())
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_torch_backend_agrees_with_the_reference_on_any_shape_and_poison(problem):
    q, k, v, kw = problem
    want = mr.moba_attention(q, k, v, backend="reference", **kw)
    got = mr.moba_attention(q, k, v, backend="torch", **kw)
    assert got.shape == want.shape
    assert_agrees_where_finite(got, want)


@pytest.mark.parametrize("poison, block_size", [(INF, 2), (NAN, 1)])
@pytest.mark.parametrize("tq", [1, 3])
def test_dense_limit_with_a_poisoned_key_still_follows_moba(poison, block_size, tq):
    """At `top_k * block_size >= Tk` the op may run full attention only where MoBA equals it: a
    NaN / inf key makes its block's gate score NaN or -inf, so MoBA leaves the block out (SPEC
    2.4) while full attention would let it poison or shift every row (found by hypothesis)."""
    q, k, v = qkv(b=1, hq=1, hkv=1, tq=tq, tk=3, d=4, seed=7)
    k[0, 0, 0, 1] = poison
    q[..., 1] = -q[..., 1].abs() - 0.1  # the poisoned dim scores -inf against an inf key
    kw = dict(block_size=block_size, top_k=2 if block_size == 2 else 3, causal=False)
    want = mr.moba_attention(q, k, v, backend="reference", **kw)
    assert torch.isfinite(want[..., -1, :]).all()
    assert_agrees_where_finite(mr.moba_attention(q, k, v, backend="torch", **kw), want)
