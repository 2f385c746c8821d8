"""Short context: where MoBA equals full attention the op runs the dense kernel, and a policy's
`dense_below` asks for full attention below a length; run-time mask simplification.

Oracles: the dense `reference` MoBA (the definition; at `top_k * block_size >= Tk` it is full
attention) and a hand-written softmax attention.
"""

from __future__ import annotations

import math

import pytest
import torch

import moba_rewrite as mr
from moba_rewrite.attention import op
from moba_rewrite.kernels import dense, mask_forms, reference
from moba_rewrite.report import ReportRow, RewriteReport
from passes.sites import AttentionSite


def _qkv(b=2, hq=4, hkv=2, tq=40, tk=40, d=16, requires_grad=False):
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(b, h, t, d, generator=g) for h, t in ((hq, tq), (hkv, tk), (hkv, tk)))
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


def _grads(fn, leaves):
    out = fn(*leaves)
    return [out, *torch.autograd.grad(out.square().sum(), leaves)]


CASES = [  # (tq, tk, causal, mask kind)
    (40, 40, True, None), (7, 40, True, None), (1, 40, True, None), (40, 40, False, None),
    (40, 40, True, "keys"), (9, 40, True, "full"), (40, 40, False, "float"),
    (9, 40, True, "keys"), (9, 40, False, "keys"), (9, 40, True, "dead"), (1, 40, True, "dead"),
]


@pytest.mark.parametrize("tq,tk,causal,kind", CASES)
def test_dense_limit_runs_the_dense_kernel_and_equals_reference(tq, tk, causal, kind, monkeypatch):
    q, k, v = _qkv(tq=tq, tk=tk, requires_grad=True)
    mask = None
    if kind == "keys":
        mask = torch.ones(2, 1, 1, tk, dtype=torch.bool)
        mask[1, ..., :6] = False  # left padding: the first queries of row 1 see nothing
    elif kind == "dead":  # row 1 sees no key at all; row 0 only keys after the first queries
        mask = torch.zeros(2, 1, 1, tk, dtype=torch.bool)
        mask[0, ..., tk - tq + 2:] = True
    elif kind == "full":
        mask = torch.rand(2, 1, tq, tk, generator=torch.Generator().manual_seed(1)) > 0.4
        mask[0, 0, 2] = False
    elif kind == "float":
        mask = torch.randn(1, 4, tq, tk) * 0.3
        mask[0, 1, 3] = -math.inf
    calls = []
    monkeypatch.setattr(dense, "forward", lambda *a, _f=dense.forward, **kw: calls.append(1) or _f(*a, **kw))
    kw = dict(block_size=8, top_k=5, causal=causal, attn_mask=mask, enable_gqa=True)  # 5 * 8 >= 40
    got = _grads(lambda *t: mr.moba_attention(*t, backend="torch", **kw), [q, k, v])
    want = _grads(lambda *t: mr.moba_attention(*t, backend="reference", **kw), [q, k, v])
    assert calls, "the dense kernel did not run"
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
    assert not got[0].isnan().any()


@pytest.mark.parametrize("causal,kind", [(False, None), (True, None), (False, "keys"), (True, "keys")])
def test_dense_kernel_with_fewer_key_heads_than_value_heads_equals_sdpa(causal, kind):
    """q 4 heads, k 2, v 4 (NVIDIA's Nemotron diarization and transcription encoders): the CPU flash
    kernel reads v's heads by k's grouping, so it must not take the call (its output was off by
    0.14), and the row-by-row backward repeats k and v each by its own group (it raised)."""
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, h, 40, 16, generator=g).requires_grad_() for h in (4, 2, 4))
    mask = None
    if kind == "keys":
        mask = torch.ones(2, 1, 1, 40, dtype=torch.bool)
        mask[1, ..., :6] = False
    out = dense.forward(q, k, v, causal=causal, scale=0.25, attn_mask=mask)
    want = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v, scale=0.25,
        attn_mask=mask if not causal else (torch.ones(40, 40, dtype=torch.bool).tril() & (True if mask is None else mask)))
    torch.testing.assert_close(out, want, atol=2e-6, rtol=1e-5)
    grad = torch.randn(out.shape, generator=g)
    got = dense.backward(grad, q, k, v, out, causal=causal, scale=0.25, attn_mask=mask)
    for a, b in zip(got, torch.autograd.grad(want, (q, k, v), grad)):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def test_sites_with_fewer_key_heads_than_value_heads_stay_dense():
    """The sparse kernels need as many key as value heads: such a site is reported and runs the
    original attention (with a longer input it raised inside the torch backend)."""
    from moba_rewrite.integrations import hf

    q, k, v = torch.randn(1, 4, 64, 8), torch.randn(1, 2, 64, 8), torch.randn(1, 4, 64, 8)
    assert hf.unsupported_reasons(q, k, v, None, 0.0, False, {}) == [hf.kv_heads_reason(2, 4)]
    assert "(k 2, v 4)" in hf.kv_heads_reason(2, 4)


@pytest.mark.parametrize("tq,causal", [(9, True), (40, True), (9, False)])
def test_cpu_dense_calls_with_a_key_mask_run_the_flash_kernel_in_parts(tq, causal, monkeypatch):
    """A causal chunk of queries (fewer than the keys) with a key mask: the keys before the chunk and
    its square causal part, merged by log-sum-exp, forward and backward; never a `[Tq, Tk]` mask or
    a score matrix (the row-by-row fallback would build both)."""
    q, k, v = _qkv(tq=tq, tk=40, requires_grad=True)
    mask = torch.rand(2, 1, 1, 40, generator=torch.Generator().manual_seed(5)) > 0.3
    mask[1, ..., :40 - tq + 1] = False  # row 1: its first query sees nothing of either part
    parts = []
    monkeypatch.setattr(dense, "_parts", lambda *a, _f=dense._parts: parts.append(_f(*a)) or parts[-1])
    monkeypatch.setattr(dense, "_chunk_grads", lambda *a, **kw: pytest.fail("row-by-row gradients"))
    monkeypatch.setattr(dense, "_causal_rows", lambda *a, **kw: pytest.fail("a [Tq, Tk] causal mask"))
    kw = dict(block_size=8, top_k=5, causal=causal, attn_mask=mask, enable_gqa=True)
    got = _grads(lambda *t: mr.moba_attention(*t, backend="torch", **kw), [q, k, v])
    monkeypatch.undo()
    want = _grads(lambda *t: mr.moba_attention(*t, backend="reference", **kw), [q, k, v])
    assert parts and len(parts[0]) == (2 if causal and tq < 40 else 1)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def test_below_the_limit_moba_runs_its_kernel(monkeypatch):
    q, k, v = _qkv(tq=40, tk=40)
    monkeypatch.setattr(dense, "forward", lambda *a, **kw: pytest.fail("dense kernel below the dense limit"))
    got = mr.moba_attention(q, k, v, block_size=8, top_k=2, enable_gqa=True)
    want = reference.forward(q, k, v, block_size=8, top_k=2, causal=True, scale=0.25, attn_mask=None)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_dense_below_switches_by_key_length_inside_a_traced_graph():
    """One exported graph, dynamic length: full attention for Tk < 48, MoBA from 48 on."""
    q, k, v = _qkv(tq=40, tk=40)

    class M(torch.nn.Module):
        def forward(self, q, k, v):
            return op.run(q, k, v, None, None, 8, 2, True, 0.25, "auto", 48)

    t = torch.export.Dim("t", min=2, max=128)
    ep = torch.export.export(M(), (q, k, v), dynamic_shapes=({2: t}, {2: t}, {2: t}))
    for n in (40, 64):
        q, k, v = _qkv(tq=n, tk=n)
        full = reference.forward(q, k, v, block_size=8, top_k=n // 8, causal=True, scale=0.25, attn_mask=None)
        moba = reference.forward(q, k, v, block_size=8, top_k=2, causal=True, scale=0.25, attn_mask=None)
        got = ep.module()(q, k, v)
        torch.testing.assert_close(got, full if n < 48 else moba, atol=2e-5, rtol=1e-4)
        assert (full - moba).abs().max() > 1e-3


def test_dense_below_in_report_and_policy():
    policy = mr.load_policy({"defaults": {"block_size": 64, "dense_below": 4096}, "rules": [{"layers": -1, "mode": "dense"}]})
    sites = [AttentionSite(f"l{i}", "Attn", i) for i in range(2)]
    decisions, _ = policy.decide_all(sites)
    assert decisions[0].dense_below == 4096
    report = RewriteReport(rows=[ReportRow.build(s, d, d.mode, d.reason) for s, d in zip(sites, decisions)])
    text = str(report)
    assert "dense_below" in text.splitlines()[0] and "4096" in text
    assert "full attention when Tk < 4096 (dense_below: a change of semantics)" in report[0].reason
    assert report[1].dense_below is None
    assert "dense_below" not in str(RewriteReport(rows=[report[1]]))  # no column when unused
    with pytest.raises(mr.PolicyError, match=r"defaults\.dense_below: expected an integer >= 1, got 0"):
        mr.load_policy({"defaults": {"dense_below": 0}})


def test_mask_forms_reads_causal_and_key_masks_exactly():
    g = torch.Generator().manual_seed(0)
    for tq, tk in [(5, 9), (8, 8), (16, 24), (13, 21), (3, 3), (32, 64)]:
        pos = torch.arange(tq) + tk - tq
        cut = torch.arange(tk)[None] <= pos[:, None]
        for trial in range(60):
            key = torch.rand(tk, generator=g) > 0.3
            m = cut & key
            if trial % 2:
                i, j = torch.randint(tq, (1,), generator=g).item(), torch.randint(tk, (1,), generator=g).item()
                m[i, j] = ~m[i, j]
            want = torch.equal(m, cut & m[-1])
            found = mask_forms.causal_key_part(m.clone(), tq, tk)
            assert (found is not None) == want
            if want:
                assert torch.equal(found[0], m[-1])
    assert mask_forms.hides_nothing(torch.ones(2, 1, 1, 9, dtype=torch.bool))
    assert not mask_forms.hides_nothing(torch.ones(2, 1, 4, 9, dtype=torch.bool))
