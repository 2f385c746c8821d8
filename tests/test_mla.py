"""Value head dim different from the query/key head dim (`Dv != Dqk`, multi-head latent attention).

DeepSeek-V3 / Kimi-K2 attention has q/k heads of 192 and v heads of 128; SDPA accepts that and so
must MoBA: the gate uses only q and k (`Dqk`), the attention's values, output and gradients use
`Dv`. Every backend that runs on CPU is checked against the dense reference (whose definition does
not depend on the value width) and, at the dense limit, against SDPA itself.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere in this process

import pytest
import torch
import torch.nn.functional as F

import moba_rewrite as mr
from moba_rewrite import api
from moba_rewrite.attention.block_means import update_key_block_means_
from moba_rewrite.kernels import reference as ref
from moba_rewrite.kernels.torch import blocks as torch_blocks, decode as torch_decode, fast as torch_fast, \
    online as torch_online

TOL = dict(atol=2e-5, rtol=2e-5)


def _inputs(b=2, hq=4, hkv=2, tq=40, tk=40, d=12, dv=20, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, tq, d, generator=g).to(dtype)
    k = torch.randn(b, hkv, tk, d, generator=g).to(dtype)
    v = torch.randn(b, hkv, tk, dv, generator=g).to(dtype)
    return q, k, v


def _mask(kind, b, tq, tk):
    if kind == "bool":  # left padding of the second sequence
        m = torch.ones(b, 1, 1, tk, dtype=torch.bool)
        m[1, ..., :5] = False
        return m
    if kind == "float":  # a finite bias and some hidden keys
        m = torch.randn(b, 1, tq, tk, generator=torch.Generator().manual_seed(3))
        m[..., 9:12] = float("-inf")
        return m
    return None


def _grads(backend, q, k, v, weight, **kw):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = mr.moba_attention(q, k, v, backend=backend, enable_gqa=q.shape[1] != k.shape[1], **kw)
    (out * weight).sum().backward()
    return out, q.grad, k.grad, v.grad


def test_reference_output_and_gradients_have_value_width():
    q, k, v = _inputs()
    kw = dict(block_size=8, top_k=2, causal=True, scale=0.3, attn_mask=None)
    out = ref.forward(q, k, v, **kw)
    assert out.shape == (2, 4, 40, 20)
    dq, dk, dv = ref.backward(torch.ones_like(out), q, k, v, out, **kw)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    # the reference against autograd through its own forward (independent of its hand-written backward)
    qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))
    ref.forward(qg, kg, vg, **kw).sum().backward()
    for got, want in ((dq, qg.grad), (dk, kg.grad), (dv, vg.grad)):
        torch.testing.assert_close(got, want, **TOL)


# the fast path serves boolean masks (or none) and at least one block of queries; online serves all
TORCH_CASES = [("fast", m, 40) for m in (None, "bool")] + [("online", m, tq) for m in (None, "bool", "float")
                                                           for tq in (40, 1, 7)]  # prefill, decode, a chunk


@pytest.mark.parametrize("impl,mask_kind,tq", TORCH_CASES)
@pytest.mark.parametrize("causal", [True, False])
def test_torch_backend_equals_reference(monkeypatch, impl, mask_kind, causal, tq):
    chosen = []
    real = torch_blocks.implementation

    def spy(*a, **kw):  # "online" forces the exact path; "fast" must be what the backend picks itself
        module = real(*a, **kw) if impl == "fast" else torch_online
        chosen.append(module)
        return module
    monkeypatch.setattr(torch_blocks, "implementation", spy)
    q, k, v = _inputs(tq=tq)
    mask = _mask(mask_kind, 2, tq, 40)
    kw = dict(block_size=8, top_k=3, causal=causal, attn_mask=mask)
    weight = torch.randn(2, 4, tq, 20)
    want = _grads("reference", q, k, v, weight, **kw)
    got = _grads("torch", q, k, v, weight, **kw)
    assert got[0].shape == (2, 4, tq, 20)
    for name, a, e in zip(("out", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a, e, **TOL, msg=lambda m: f"{name}: {m}")
    assert chosen and set(chosen) == {torch_fast if impl == "fast" else torch_online}


def test_torch_backend_threaded_split(monkeypatch):
    monkeypatch.setattr(torch_blocks, "_SPLIT_MIN_ROWS", 0)
    monkeypatch.setattr(torch_blocks, "_SPLIT_MIN_ROWS_BACKWARD", 0)
    q, k, v = _inputs(b=2, hq=4, hkv=2, tq=33, tk=33)
    weight = torch.randn(2, 4, 33, 20)
    kw = dict(block_size=8, top_k=2, causal=True)
    for a, e in zip(_grads("torch", q, k, v, weight, **kw), _grads("reference", q, k, v, weight, **kw)):
        torch.testing.assert_close(a, e, **TOL)


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("tq,mask_kind", [(40, None), (1, None), (7, "bool"), (40, "float")])
def test_dense_limit_equals_sdpa(backend, tq, mask_kind):
    """`top_k * block_size >= Tk`: full attention, with SDPA's own Dv != Dqk support as the yardstick."""
    q, k, v = _inputs(tq=tq, d=24, dv=16)
    mask = _mask(mask_kind, 2, tq, 40)
    weight = torch.randn(2, 4, tq, 16)
    got = _grads(backend, q, k, v, weight, block_size=16, top_k=3, causal=True, attn_mask=mask)
    qs, ks, vs = (t.clone().requires_grad_(True) for t in (q, k, v))
    causal = torch.ones(tq, 40, dtype=torch.bool).tril(40 - tq)
    if mask is None:
        sdpa_mask = causal
    elif mask.dtype == torch.bool:
        sdpa_mask = causal & mask
    else:
        sdpa_mask = mask.masked_fill(~causal, float("-inf"))
    want = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=sdpa_mask, enable_gqa=True)
    (want * weight).sum().backward()
    for a, e in zip(got, (want, qs.grad, ks.grad, vs.grad)):
        torch.testing.assert_close(a, e, **TOL)


def test_compile_and_export_see_the_value_width():
    q, k, v = _inputs(tq=40)

    def f(q, k, v):
        return mr.moba_attention(q, k, v, block_size=8, top_k=2, enable_gqa=True, backend="torch")
    want = f(q, k, v)
    torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="eager")(q, k, v), want, **TOL)

    class M(torch.nn.Module):
        def forward(self, q, k, v):
            return f(q, k, v)
    ep = torch.export.export(M(), (q, k, v))
    out_node = [n for n in ep.graph.nodes if n.op == "output"][0].args[0][0]
    assert tuple(out_node.meta["val"].shape) == (2, 4, 40, 20)
    torch.testing.assert_close(ep.module()(q, k, v), want, **TOL)


@pytest.mark.parametrize("backend,sliced", [("torch", False), ("torch", True), ("reference", False)])
@pytest.mark.parametrize("tq,filled,mask_kind", [(1, 29, None), (1, 33, "bool"), (6, 30, "float")])
def test_kv_cache_op_equals_moba_on_the_filled_prefix(monkeypatch, backend, sliced, tq, filled, mask_kind):
    if sliced:  # past the gather budget the torch backend runs its prefill path on the filled prefix
        monkeypatch.setattr(torch_decode, "_GATHER_MAX_ELEMS", 0)
    b, hkv, length, bs = 2, 2, 45, 8
    mask = _mask(mask_kind, b, tq, length)
    q, k, v = _inputs(b=b, hkv=hkv, tq=tq, tk=length)
    k[:, :, filled:], v[:, :, filled:] = float("nan"), 1e4  # unfilled slots: any read of them shows
    means = torch.full((b, hkv, -(-length // bs), 12), float("nan"))
    update_key_block_means_(means, k, torch.arange(filled), bs, from_start=True)
    pos = torch.arange(filled - tq, filled)
    got = mr.moba_attention_kv_cache(q, k, v, means, pos, block_size=bs, top_k=3, enable_gqa=True, backend=backend,
                                     attn_mask=mask)
    want = mr.moba_attention(q, k[:, :, :filled], v[:, :, :filled], block_size=bs, top_k=3, enable_gqa=True,
                             backend="reference", attn_mask=None if mask is None else mask[..., :filled])
    assert got.shape == (b, 4, tq, 20)
    torch.testing.assert_close(got, want, **TOL)


def test_query_and_key_head_dims_must_still_match():
    q, k, v = _inputs()
    with pytest.raises(ValueError, match="q and k head dims must match: q 12, k 8"):
        mr.moba_attention(q, k[..., :8], v, enable_gqa=True)


# ------------------------------------------------------------------ DeepSeek-V3 (transformers) generate()


def _deepseek_v3(attn: str = "sdpa"):
    import transformers as T

    cfg = T.DeepseekV3Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2, n_group=1,
        topk_group=1, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=12,
        first_k_dense_replace=1, pad_token_id=0, max_position_embeddings=128)
    torch.manual_seed(0)
    model = T.DeepseekV3ForCausalLM(cfg).eval()
    model.set_attn_implementation(attn)
    return model


def _reference_attention(module, query, key, value, attention_mask, *args, **kwargs):
    """Test-only HF attention function: the dense reference MoBA on the whole sequence (no cache)."""
    assert query.shape[2] == key.shape[2] and value.shape[-1] == 12 != query.shape[-1]
    out = ref.forward(query, key, value, block_size=4, top_k=2, causal=True, attn_mask=attention_mask,
                      scale=kwargs.get("scaling") or query.shape[-1] ** -0.5)
    return out.transpose(1, 2).contiguous(), None


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_deepseek_v3_generate_equals_the_reference_token_for_token(cache):
    """MLA decode through the KV-cache paths: each step equals recomputing the whole sequence with reference MoBA."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register("mla_reference", _reference_attention)
    AttentionMaskInterface.register("mla_reference", ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    ids = torch.randint(3, 64, (2, 14), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 14, dtype=torch.long)
    mask[1, :3] = 0  # a left-padded batch
    gen = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        want = _deepseek_v3("mla_reference").generate(ids, attention_mask=mask, use_cache=False, **gen)
        model = _deepseek_v3()
        mr.rewrite(model, {"version": 1, "defaults": {"block_size": 4, "top_k": 2, "decode": "moba"}})
        assert mr.report_of(model).moba_sites == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
        kw = {"cache_implementation": "static"} if cache == "static" else {}
        got = model.generate(ids, attention_mask=mask, **gen, **kw)
    assert torch.equal(got.sequences, want.sequences)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(want.logits), atol=2e-5, rtol=1e-4)


def test_deepseek_v3_export_equals_the_reference():
    """`mr.export` of the MLA model: both sites are MoBA nodes and the program equals reference MoBA there."""
    from zoo_oracle import sdpa_oracle

    ids = torch.randint(3, 64, (1, 32), generator=torch.Generator().manual_seed(1))
    policy = {"version": 1, "defaults": {"block_size": 4, "top_k": 2}}
    ep = mr.export(_deepseek_v3(), (ids,), policy)
    assert sum("moba.attention" in str(n.target) for n in ep.graph.nodes) == 2
    oracle = _deepseek_v3()
    with sdpa_oracle(oracle, {"model.layers.0.self_attn", "model.layers.1.self_attn"}, block=4, top_k=2), \
            torch.no_grad():
        want = oracle(ids).logits
        got = ep.module()(ids).logits
        assert (want - _deepseek_v3()(ids).logits).abs().max() > 1e-4  # sparse: not the original model
    torch.testing.assert_close(got, want, atol=3e-5, rtol=1e-4)


# ------------------------------------------------------------------ graph passes (export, eager, compile)


class WideValueAttention(torch.nn.Module):
    """Hand-written MLA-like block: q/k heads of 8, v heads of 12, SDPA or matmul-softmax-matmul."""

    def __init__(self, form: str):
        super().__init__()
        self.form = form
        self.qk = torch.nn.Linear(16, 2 * 4 * 8)
        self.v = torch.nn.Linear(16, 4 * 12)

    def forward(self, x):
        b, t, _ = x.shape
        q, k = self.qk(x).view(b, t, 2, 4, 8).permute(2, 0, 3, 1, 4).unbind(0)
        v = self.v(x).view(b, t, 4, 12).transpose(1, 2)
        if self.form == "sdpa":
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        scores = (q @ k.transpose(-1, -2)) * 8 ** -0.5
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        return scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v

    def oracle(self, x, top_k):
        b, t, _ = x.shape
        q, k = self.qk(x).view(b, t, 2, 4, 8).permute(2, 0, 3, 1, 4).unbind(0)
        v = self.v(x).view(b, t, 4, 12).transpose(1, 2)
        return ref.forward(q, k, v, block_size=4, top_k=top_k, causal=True, scale=8 ** -0.5, attn_mask=None)


@pytest.mark.parametrize("form", ["sdpa", "manual"])
@pytest.mark.parametrize("path", ["export", "eager", "compile"])
def test_passes_rewrite_wide_value_sites_to_moba(form, path):
    m = WideValueAttention(form).eval()
    x = torch.randn(2, 24, 16, generator=torch.Generator().manual_seed(4))
    policy = {"version": 1, "defaults": {"block_size": 4, "top_k": 2}}
    with torch.no_grad():
        original, want = m(x), m.oracle(x, 2)
        assert (want - original).abs().max() > 1e-3  # the sparse policy changes the output
        if path == "export":
            ep, report = api.export_with_report(m, (x,), policy)
            assert any("moba.attention" in str(n.target) for n in ep.graph.nodes)
            got = ep.module()(x)
        else:
            report = mr.plan(m, policy, (x,))
            mr.rewrite(m, policy, (x,))
            got = (torch.compile(m, fullgraph=True, backend="eager") if path == "compile" else m)(x)
        assert [r.decision for r in report] == ["moba"], str(report)
        torch.testing.assert_close(got, want, **TOL)


# ------------------------------------------------------------------ Triton (interpreter on CPU)

from moba_rewrite.kernels.triton import attn as triton_attn, backend as tb, configs as triton_configs  # noqa: E402

needs_triton = pytest.mark.skipif(not tb.is_available(), reason=tb.unavailable_reason() or "triton unavailable")
TRITON_TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float16: dict(atol=3e-3, rtol=3e-3)}

TRITON_CASES = {
    # name: (B, Hq, Hkv, Tq, Tk, D, Dv, block, top_k, causal, mask, dtype)
    "prefill_wider_v_fp32": (1, 2, 2, 48, 48, 16, 24, 16, 2, True, None, torch.float32),
    "prefill_gqa_narrower_v_fp16": (1, 4, 2, 50, 50, 16, 8, 16, 3, True, None, torch.float16),
    "chunk_noncausal_bool_mask_fp32": (2, 2, 1, 30, 70, 16, 40, 16, 3, False, "bool", torch.float32),
    "decode_gqa_fp16": (2, 4, 1, 1, 90, 16, 32, 16, 3, True, None, torch.float16),
    "decode_float_mask_fp32": (1, 2, 2, 1, 60, 24, 16, 16, 2, False, "float", torch.float32),
}


@needs_triton
@pytest.mark.parametrize("name", list(TRITON_CASES))
def test_triton_forward_and_backward_equal_reference(name):
    b, hq, hkv, tq, tk, d, dv, bs, top_k, causal, mask_kind, dtype = TRITON_CASES[name]
    q, k, v = _inputs(b, hq, hkv, tq, tk, d, dv, dtype, seed=2)
    g = torch.Generator().manual_seed(3)
    mask = {"bool": lambda: torch.rand(b, 1, tq, tk, generator=g) > 0.2,
            "float": lambda: torch.randn(b, 1, tq, tk, generator=g)}.get(mask_kind, lambda: None)()
    kw = dict(block_size=bs, top_k=top_k, causal=causal, scale=d ** -0.5, attn_mask=mask)
    out, want = tb.forward(q, k, v, **kw), ref.forward(q, k, v, **kw)
    assert out.shape == (b, hq, tq, dv) and out.dtype == dtype
    torch.testing.assert_close(out.float(), want.float(), **TRITON_TOL[dtype])
    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(dtype)
    for name_, got, exp in zip("qkv", tb.backward(go, q, k, v, out, **kw), ref.backward(go, q, k, v, want, **kw)):
        assert got.shape == exp.shape, name_
        torch.testing.assert_close(got.float(), exp.float(), **TRITON_TOL[dtype], msg=lambda m: f"d{name_}: {m}")


@needs_triton
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter reports the overflow it repairs
def test_triton_two_pass_repair_and_windows_with_wide_values(monkeypatch):
    """The forward's other routes: two-pass mode, rows repaired after an unsafe single-pass reference
    (fp16 scores far apart), and fp32 accumulators allocated per window of (batch, KV head) rows."""
    q, k, v = _inputs(1, 4, 2, 40, 40, 16, 24, torch.float32, seed=5)
    kw = dict(block_size=8, top_k=3, causal=True, scale=0.25, attn_mask=None)
    want = ref.forward(q, k, v, **kw)
    monkeypatch.setitem(triton_configs.OVERRIDES, "fwd_mode", "two_pass")
    torch.testing.assert_close(tb.forward(q, k, v, **kw), want, **TOL)
    monkeypatch.delitem(triton_configs.OVERRIDES, "fwd_mode")
    real = triton_attn.windows
    monkeypatch.setattr(triton_attn, "windows", lambda p, budget: real(p, p.group * p.max_tq * p.dv * 4))
    torch.testing.assert_close(tb.forward(q, k, v, **kw), want, **TOL)
    qh = q.clone()
    qh[:, 2:] *= 12.0
    qh, kh, vh = qh.half(), k.half(), v.half()
    from moba_rewrite.kernels.triton import gate as triton_gate
    from moba_rewrite.kernels.triton.layout import dense_problem
    p = dense_problem(qh, kh, vh, **kw)
    out, _, repaired = triton_attn.single_pass_forward(p, triton_gate.build_csr(p, triton_gate.select_blocks(p)))
    assert repaired.any() and out.shape == (1, 4, 40, 24)
    torch.testing.assert_close(out.float(), ref.forward(qh, kh, vh, **kw).float(), atol=3e-3, rtol=3e-3)


@needs_triton
@pytest.mark.parametrize("tq,filled,dtype", [(1, 29, torch.float32), (1, 33, torch.float16), (5, 30, torch.float32)])
def test_triton_kv_cache_equals_reference(tq, filled, dtype):
    b, hkv, length, bs = 2, 2, 40, 8
    q, k, v = _inputs(b, 4, hkv, tq, length, 12, 20, dtype, seed=1)
    means = torch.zeros((b, hkv, -(-length // bs), 12))
    update_key_block_means_(means, k, torch.arange(filled), bs, from_start=True)
    pos = torch.arange(filled - tq, filled)
    kw = dict(block_size=bs, top_k=3, enable_gqa=True)
    got = mr.moba_attention_kv_cache(q, k, v, means, pos, backend="triton", **kw)
    want = mr.moba_attention_kv_cache(q, k, v, means, pos, backend="reference", **kw)
    assert got.shape == (b, 4, tq, 20)
    torch.testing.assert_close(got.float(), want.float(), **TRITON_TOL[dtype])


@needs_triton
def test_triton_through_the_op_with_autograd_and_compile():
    q, k, v = _inputs(1, 4, 2, 33, 33, 16, 24, torch.float32, seed=6)
    weight = torch.randn(1, 4, 33, 24)
    kw = dict(block_size=8, top_k=2, causal=True)
    for a, e in zip(_grads("triton", q, k, v, weight, **kw), _grads("reference", q, k, v, weight, **kw)):
        torch.testing.assert_close(a, e, **TOL)
    f = torch.compile(lambda q, k, v: mr.moba_attention(q, k, v, enable_gqa=True, backend="triton", **kw),
                      fullgraph=True, backend="eager")
    torch.testing.assert_close(f(q, k, v), mr.moba_attention(q, k, v, enable_gqa=True, backend="reference", **kw),
                               **TOL)


def test_triton_rejects_a_value_head_dim_past_its_limit():
    q, k, _ = _inputs(1, 2, 2, 8, 8, 16, 16)
    v = torch.randn(1, 2, 8, tb.MAX_HEAD_DIM + 8)
    assert "value head dim" in tb.unsupported_reason(q, k, None, v)


# ------------------------------------------------------------------ packed varlen op

from moba_rewrite.attention.varlen import moba_attention_varlen  # noqa: E402


@pytest.mark.parametrize("backend,dtype", [("reference", torch.float32), ("torch", torch.float32),
                                           pytest.param("triton", torch.float32, marks=needs_triton),
                                           pytest.param("triton", torch.float16, marks=needs_triton)])
def test_varlen_equals_moba_per_sequence(backend, dtype):
    """Three packed sequences (one decode-like) plus rows outside every sequence, which stay zero."""
    g = torch.Generator().manual_seed(8)
    lens_q, lens_k = [20, 1, 9], [20, 27, 13]
    q = torch.randn(sum(lens_q) + 2, 4, 12, generator=g).to(dtype)
    k = torch.randn(sum(lens_k) + 2, 2, 12, generator=g).to(dtype)
    v = torch.randn(sum(lens_k) + 2, 2, 20, generator=g).to(dtype)
    cu_q = torch.tensor([0, 20, 21, 30], dtype=torch.int32)
    cu_k = torch.tensor([0, 20, 47, 60], dtype=torch.int32)
    kw = dict(block_size=4, top_k=2, causal=True)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = moba_attention_varlen(*leaves, cu_q, cu_k, backend=backend, **kw)
    assert out.shape == (q.shape[0], 4, 20)
    go = torch.randn(out.shape, generator=g).to(dtype)
    out.backward(go)
    tol = TRITON_TOL[dtype]
    assert out[30:].abs().max() == 0
    for s in range(3):
        q0, q1, k0, k1 = cu_q[s].item(), cu_q[s + 1].item(), cu_k[s].item(), cu_k[s + 1].item()
        qs, ks, vs = (t.detach()[a:b].transpose(0, 1)[None].clone().requires_grad_(True)
                      for t, a, b in ((q, q0, q1), (k, k0, k1), (v, k0, k1)))
        want = mr.moba_attention(qs, ks, vs, enable_gqa=True, backend="reference", **kw)
        want.backward(go[q0:q1].transpose(0, 1)[None])
        torch.testing.assert_close(out[q0:q1].detach().float(), want[0].transpose(0, 1).float(), **tol)
        for leaf, ref_leaf, a, b in ((leaves[0], qs, q0, q1), (leaves[1], ks, k0, k1), (leaves[2], vs, k0, k1)):
            torch.testing.assert_close(leaf.grad[a:b].float(), ref_leaf.grad[0].transpose(0, 1).float(), **tol)


# ------------------------------------------------------------------ ONNX (both function bodies, onnxruntime)


@pytest.mark.parametrize("body", ["sparse", "dense"])
def test_onnx_export_with_wide_values_runs_in_onnxruntime(body, tmp_path):
    """A rewritten MLA-like site exported to ONNX: one MoBA node whose function body keeps the value
    head dim; onnxruntime gives the reference MoBA at two sequence lengths (one dynamic-shape export)."""
    from moba_rewrite.exporters import onnx as mo

    m = WideValueAttention("sdpa").eval()
    policy = {"version": 1, "defaults": {"block_size": 4, "top_k": 2}}
    x = torch.randn(2, 24, 16, generator=torch.Generator().manual_seed(9))
    mr.rewrite(m, policy, (x,))
    seq = torch.export.Dim("seq", min=4, max=256)
    proto = mo.export_onnx(m, (x,), tmp_path / "mla.onnx", dynamic_shapes=({1: seq},), body=body)
    assert len(mo.moba_nodes(proto)) == 1
    for t in (24, 37):
        xt = torch.randn(2, t, 16, generator=torch.Generator().manual_seed(t))
        got = torch.as_tensor(mo.run_onnxruntime(tmp_path / "mla.onnx", (xt,))[0])
        with torch.no_grad():
            want = m.oracle(xt, 2)
        assert got.shape == (2, 4, t, 12)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
