"""The Triton forward's single pass (softmax against the gate's per-row reference) and its exact
repair of rows whose reference is unsafe, under the Triton interpreter on CPU (tiny shapes)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere in this process

import pytest
import torch

pytest.importorskip("triton")

from moba_rewrite.kernels import reference as ref  # noqa: E402
from moba_rewrite.kernels.triton import backend as tb  # noqa: E402

pytestmark = pytest.mark.skipif(not tb.is_available(), reason=tb.unavailable_reason() or "triton unavailable")

if tb.is_available():
    from moba_rewrite.kernels.triton import attn as triton_attn, configs as triton_configs, gate as triton_gate  # noqa: E402
    from moba_rewrite.kernels.triton.layout import dense_problem  # noqa: E402

TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float16: dict(atol=3e-3, rtol=3e-3)}


def _problem(dtype, *, causal=True, seed=0, q_scale=1.0, attn_mask=None):
    g = torch.Generator().manual_seed(seed)
    b, hq, hkv, t, d, bs, top_k = 1, 4, 2, 40, 16, 8, 3
    q = (torch.randn(b, hq, t, d, generator=g) * q_scale).to(dtype)
    k = torch.randn(b, hkv, t, d, generator=g).to(dtype)
    v = torch.randn(b, hkv, t, d, generator=g).to(dtype)
    kw = dict(block_size=bs, top_k=top_k, causal=causal, scale=d ** -0.5, attn_mask=attn_mask)
    p = dense_problem(q, k, v, **kw)
    sel = triton_gate.build_csr(p, triton_gate.select_blocks(p))
    want = ref.forward(q, k, v, **kw)
    return p, sel, want


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("causal", [True, False])
def test_single_pass_needs_no_repair_on_ordinary_inputs(dtype, causal):
    p, sel, want = _problem(dtype, causal=causal)
    out, lse, repaired = triton_attn.single_pass_forward(p, sel)
    assert not repaired.any(), "the gate's reference should be safe for unit-scale inputs"
    torch.testing.assert_close(out.float(), want.float(), **TOL[dtype])
    # Its LSE is the two-pass kernels' LSE (the backward relies on it).
    torch.testing.assert_close(lse, triton_attn.row_lse(p, sel), atol=1e-4, rtol=1e-4)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter reports the planted overflow
@pytest.mark.parametrize("shift", [1e4, -1e4])
def test_rows_with_an_unsafe_reference_are_repaired_exactly(shift):
    """A reference far above (every exp2 underflows) or far below (overflow) the true maximum on
    half of the rows: those rows are flagged and recomputed; the other half stays single-pass."""
    p, sel, want = _problem(torch.float32, seed=1)
    half = torch.zeros_like(sel.ref, dtype=torch.bool)
    half[:, ::2] = True
    sel.ref = torch.where(half, sel.ref + shift, sel.ref)
    out, lse, repaired = triton_attn.single_pass_forward(p, sel)
    rows_real = torch.arange(sel.row_pad) < p.rows
    assert torch.equal(repaired, half & rows_real[None, :])
    torch.testing.assert_close(out, want, **TOL[torch.float32])
    torch.testing.assert_close(lse, triton_attn.row_lse(p, sel), atol=1e-4, rtol=1e-4)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_large_scores_beyond_the_fp16_window_are_still_exact():
    """fp16 queries scaled so that scores spread far past the fp16 safe window: the flagged rows
    are repaired, and the result matches the reference as the two-pass forward does."""
    p, sel, want = _problem(torch.float16, seed=2, q_scale=12.0)
    out, _, repaired = triton_attn.single_pass_forward(p, sel)
    assert repaired.any(), "this input is meant to exercise the repair path"
    torch.testing.assert_close(out.float(), want.float(), atol=3e-3, rtol=3e-3)


def test_masked_rows_that_see_nothing_give_zeros():
    t = 40
    mask = torch.ones(1, 1, t, t, dtype=torch.bool).tril()
    mask[..., 5:9, :] = False  # these query rows see no key at all
    p, sel, want = _problem(torch.float32, seed=3, attn_mask=mask)
    out, lse, _ = triton_attn.single_pass_forward(p, sel)
    assert torch.isfinite(out).all()
    assert out[..., 5:9, :].abs().max() == 0
    torch.testing.assert_close(out, want, **TOL[torch.float32])


def test_two_pass_mode_can_be_chosen_and_agrees():
    p, sel, want = _problem(torch.float32, seed=4)
    triton_configs.OVERRIDES["fwd_mode"] = "two_pass"
    try:
        assert triton_attn.forward_mode(p, sel) == "two_pass"
        two, _ = triton_attn.attention_forward(p, sel)
    finally:
        triton_configs.OVERRIDES.pop("fwd_mode")
    assert triton_attn.forward_mode(p, sel) == "single"
    one, _ = triton_attn.attention_forward(p, sel)
    torch.testing.assert_close(two, want, **TOL[torch.float32])
    torch.testing.assert_close(one, two, **TOL[torch.float32])


@pytest.mark.parametrize("tq", [40, 1])  # single-pass prefill and split-KV decode
def test_outputs_left_uninitialised_are_fully_written(monkeypatch, tq):
    """The dense output buffers are not zeroed (the kernels store every row): poison them with NaN
    and check every element was overwritten with the right value."""
    from moba_rewrite.kernels.triton.layout import Problem

    original = Problem.new_out

    def poisoned(self, dtype, *, written=False):
        out = original(self, dtype, written=written)
        return out.fill_(float("nan")) if written and not self.varlen else out

    monkeypatch.setattr(Problem, "new_out", poisoned)
    g = torch.Generator().manual_seed(5)
    q, k, v = torch.randn(2, 4, tq, 16, generator=g), torch.randn(2, 2, 40, 16, generator=g), \
        torch.randn(2, 2, 40, 16, generator=g)
    kw = dict(block_size=8, top_k=3, causal=True, scale=0.25, attn_mask=None)
    out = tb.forward(q, k, v, **kw)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref.forward(q, k, v, **kw), **TOL[torch.float32])


def _one_bh_per_window(monkeypatch):
    """Force a window per (batch, KV head): these tiny calls fit any MiB budget."""
    real = triton_attn.windows
    monkeypatch.setattr(triton_attn, "windows", lambda p, budget: real(p, p.group * p.max_tq * p.d * 4))


@pytest.mark.parametrize("with_mask", [False, True])
def test_windowed_accumulator_equals_one_window(monkeypatch, with_mask):
    """The fp32 accumulator allocated per window of (batch, KV head) rows: the same result as one
    accumulator for everything, with masks and with cached block means."""
    g = torch.Generator().manual_seed(6)
    q, k, v = torch.randn(2, 4, 24, 16, generator=g), torch.randn(2, 2, 24, 16, generator=g), \
        torch.randn(2, 2, 24, 16, generator=g)
    mask = torch.rand(2, 1, 24, 24, generator=g) > 0.2 if with_mask else None
    from moba_rewrite import key_block_means

    means = key_block_means(k, 8)
    kw = dict(block_size=8, top_k=2, causal=True, scale=0.25, attn_mask=mask)
    whole = tb.forward(q, k, v, **kw)
    seen = []
    real = triton_attn._window_acc
    monkeypatch.setattr(triton_attn, "_window_acc", lambda p, w: seen.append((w.bh0, w.bh1)) or real(p, w))
    _one_bh_per_window(monkeypatch)
    windowed = tb.forward(q, k, v, **kw)
    assert seen == [(0, 1), (1, 2), (2, 3), (3, 4)], "one window per (batch, KV head)"
    torch.testing.assert_close(windowed, whole, rtol=0, atol=1e-6)
    torch.testing.assert_close(windowed, ref.forward(q, k, v, **kw), **TOL[torch.float32])
    torch.testing.assert_close(tb.forward(q, k, v, key_block_means=means, **kw), whole, rtol=0, atol=1e-6)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_windowed_repair_fixes_flagged_rows_in_their_window(monkeypatch):
    """Rows flagged in one window (fp16 scores past the safe window on KV head 1's query heads)
    are repaired exactly there; the other window's rows are not flagged."""
    g = torch.Generator().manual_seed(7)
    q = torch.randn(1, 4, 40, 16, generator=g)
    q[:, 2:] *= 12.0
    q = q.half()
    k, v = torch.randn(1, 2, 40, 16, generator=g).half(), torch.randn(1, 2, 40, 16, generator=g).half()
    kw = dict(block_size=8, top_k=3, causal=True, scale=0.25, attn_mask=None)
    _one_bh_per_window(monkeypatch)
    p = dense_problem(q, k, v, **kw)
    sel = triton_gate.build_csr(p, triton_gate.select_blocks(p))
    out, _, repaired = triton_attn.single_pass_forward(p, sel)
    assert not repaired[0].any() and repaired[1].any()
    torch.testing.assert_close(out.float(), ref.forward(q, k, v, **kw).float(), atol=3e-3, rtol=3e-3)


def test_window_plan_respects_the_budget():
    from types import SimpleNamespace

    def plan(b, hq, hkv, t, d, mib):
        p = SimpleNamespace(batch=b, hq=hq, hkv=hkv, group=hq // hkv, max_tq=t, d=d, dv=d, varlen=False)
        return [(w.bh0, w.bh1) for w in triton_attn.windows(p, mib * 2**20)]

    assert plan(2, 8, 2, 4096, 128, 8) == [(0, 1), (1, 2), (2, 3), (3, 4)]  # 8 MiB per bh
    assert plan(2, 8, 2, 4096, 128, 16) == [(0, 2), (2, 4)]
    assert plan(2, 8, 2, 4096, 128, 1) == [(0, 1), (1, 2), (2, 3), (3, 4)]  # below one bh: still one
    assert plan(2, 8, 2, 4096, 128, 64) == [(0, 4)]  # everything fits
    assert plan(2, 8, 2, 4096, 128, 0) == [(0, 4)]  # 0: no bound
    # the default: 128K tokens x 16 heads x D=128 in 4 windows of 4 heads (256 MiB of fp32 each)
    assert plan(1, 16, 16, 131072, 128, triton_configs.FWD_PIECE_MIB) == [(a, a + 4) for a in range(0, 16, 4)]
    assert plan(1, 16, 16, 8192, 128, triton_configs.FWD_PIECE_MIB) == [(0, 16)]
