"""Entry points on plain PyTorch models: nn.TransformerEncoder (nn.MultiheadAttention), a
hand-written ViT block and a hand-written GPT block with causal + padding masks.

Oracles are written here from the models' weights with the dense `reference` MoBA, so
they share no code with the rewrite.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import moba_rewrite as mr
from moba_rewrite import api
from moba_rewrite.kernels import reference
from passes.rewrite import UnsupportedSiteError

B, T, E, H = 2, 32, 32, 4
D = E // H
BLOCK = 8


def policy(top_k=2, rules=(), **kw):
    return {"version": 1, "defaults": {"block_size": BLOCK, "top_k": top_k, **kw}, "rules": list(rules)}


def ref(q, k, v, *, causal, visible=None, top_k=2):
    return reference.forward(q, k, v, block_size=BLOCK, top_k=top_k, causal=causal, scale=q.shape[-1] ** -0.5,
                             attn_mask=visible)


# ------------------------------------------------------------------- nn.TransformerEncoder


def encoder(layers=2):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, H, 64, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=True).eval()


def encoder_inputs():
    torch.manual_seed(1)
    x = torch.randn(B, T, E)
    causal = torch.ones(T, T, dtype=torch.bool).triu(1)  # True = not allowed (PyTorch's convention)
    pad = torch.zeros(B, T, dtype=torch.bool)
    pad[1, -6:] = True  # True = padding (PyTorch's convention)
    return x, causal, pad


class _GradOn(nn.Module):
    """Runs the wrapped model with autograd on, so PyTorch's fused inference fast path
    (which reads the MHA weights directly) stays off and the patched MHAs are called."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, *args, **kwargs):
        with torch.enable_grad():
            return self.inner(*args, **kwargs).detach()


def mha_oracle(model, moba_layers, top_k=2):
    """A copy whose chosen MHAs compute in_proj -> reference MoBA -> out_proj."""
    oracle = copy.deepcopy(model)
    for i in moba_layers:
        mha = oracle.layers[i].self_attn

        def forward(q_in, k_in, v_in, key_padding_mask=None, need_weights=True, attn_mask=None,
                    is_causal=False, mha=mha, **_):
            wq, wk, wv = mha.in_proj_weight.chunk(3)
            bq, bk, bv = mha.in_proj_bias.chunk(3)
            heads = lambda t: t.view(t.shape[0], t.shape[1], H, D).transpose(1, 2)  # noqa: E731
            q, k, v = heads(F.linear(q_in, wq, bq)), heads(F.linear(k_in, wk, bk)), heads(F.linear(v_in, wv, bv))
            visible = torch.ones(q.shape[0], 1, q.shape[2], k.shape[2], dtype=torch.bool)
            if attn_mask is not None:
                visible = visible & (attn_mask == 0 if attn_mask.dtype != torch.bool else ~attn_mask)
            if key_padding_mask is not None:
                kpm = key_padding_mask if key_padding_mask.dtype == torch.bool else key_padding_mask != 0
                visible = visible & ~kpm[:, None, None, :]
            out = ref(q, k, v, causal=False, visible=visible, top_k=top_k)
            return mha.out_proj(out.transpose(1, 2).reshape(q_in.shape[0], q_in.shape[1], E)), None

        mha.forward = forward
    return _GradOn(oracle)


def test_transformer_encoder_mha():
    model = encoder()
    x, causal, pad = encoder_inputs()
    keys = list(model.state_dict())
    with torch.no_grad():
        original = model(x, mask=causal, src_key_padding_mask=pad, is_causal=True)
    report = mr.plan(model, policy())
    assert [(r.name, r.kind, r.num_heads) for r in report] == [("layers.0.self_attn", "mha", H),
                                                               ("layers.1.self_attn", "mha", H)]
    # dense limit (eval + no_grad: the fused fast path must not bypass the rewrite)
    mr.rewrite(model, policy(top_k=T // BLOCK))
    with torch.no_grad():
        got = model(x, mask=causal, src_key_padding_mask=pad, is_causal=True)
    keep = ~pad
    torch.testing.assert_close(got[keep], original[keep], atol=1e-5, rtol=1e-5)
    # sparse layer 0, dense layer 1
    mr.rewrite(model, policy(rules=[{"layers": [1], "mode": "dense"}]))
    assert list(model.state_dict()) == keys
    with torch.no_grad():
        got = model(x, mask=causal, src_key_padding_mask=pad, is_causal=True)
        want = mha_oracle(encoder(), [0])(x, mask=causal, src_key_padding_mask=pad, is_causal=True)
    assert (got[keep] - original[keep]).abs().max() > 1e-3
    torch.testing.assert_close(got[keep], want[keep], atol=1e-5, rtol=1e-5)
    # compiled (fullgraph) and exported
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, mask=causal, is_causal=True),
                                   mha_oracle(encoder(), [0])(x, mask=causal, is_causal=True), atol=1e-5, rtol=1e-5)
    ep, rep = api.export_with_report(encoder(), (x,), policy(rules=[{"layers": [1], "mode": "dense"}]),
                                     kwargs={"mask": causal, "is_causal": True})
    assert [(r.name, r.kind, r.decision) for r in rep] == [("layers.0.self_attn", "mha", "moba"),
                                                           ("layers.1.self_attn", "mha", "dense")]
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x, mask=causal, is_causal=True),
                                   mha_oracle(encoder(), [0])(x, mask=causal, is_causal=True), atol=1e-5, rtol=1e-5)


def test_standalone_mha_need_weights_and_dense_sites():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, batch_first=True).eval()
    x = torch.randn(B, T, E)
    out0, w0 = mha(x, x, x)
    mr.rewrite(mha, policy(rules=[{"match": "*", "mode": "dense"}]))
    out1, w1 = mha(x, x, x)
    assert torch.equal(out0, out1) and torch.equal(w0, w1)
    mr.rewrite(mha, policy())
    out2, w2 = mha(x, x, x)
    assert w2 is None  # MoBA does not form the attention matrix
    assert (out2 - out0).abs().max() > 1e-3


# ------------------------------------------------------------------------- ViT-style block


class ViTAttention(nn.Module):
    def __init__(self, dim=E, heads=H):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(dim, dim)
        self.oracle_top_k = None

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        if self.oracle_top_k:
            x = ref(q, k, v, causal=False, top_k=self.oracle_top_k)
        else:
            q = q * self.scale
            attn = (q @ k.transpose(-2, -1)).softmax(dim=-1)
            x = self.attn_drop(attn) @ v
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class ViTBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm1 = nn.LayerNorm(E)
        self.attn = ViTAttention()
        self.norm2 = nn.LayerNorm(E)
        self.mlp = nn.Sequential(nn.Linear(E, 64), nn.GELU(), nn.Linear(64, E))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    def __init__(self, depth=3):
        super().__init__()
        self.patch = nn.Linear(48, E)
        self.pos = nn.Parameter(torch.randn(1, T, E) * 0.02)
        self.blocks = nn.Sequential(*[ViTBlock() for _ in range(depth)])
        self.norm = nn.LayerNorm(E)

    def forward(self, patches):
        return self.norm(self.blocks(self.patch(patches) + self.pos))


def vit():
    torch.manual_seed(0)
    return ViT().eval(), torch.randn(B, T, 48)


def vit_oracle(moba_layers):
    model, _ = vit()
    for i in moba_layers:
        model.blocks[i].attn.oracle_top_k = 2
    return model


def test_vit_block():
    model, x = vit()
    keys = list(model.state_dict())
    with torch.no_grad():
        original = model(x)
    rep = mr.plan(model, policy())
    assert [(r.name, r.module_class, r.kind, r.causal) for r in rep] == [
        (f"blocks.{i}.attn", "ViTAttention", "manual", False) for i in range(3)]
    pol = policy(top_k=T // BLOCK)
    ep = mr.export(model, (x,), pol)
    mr.rewrite(model, pol)
    with torch.no_grad():
        torch.testing.assert_close(model(x), original, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ep.module()(x), original, atol=1e-5, rtol=1e-5)
    pol = policy(rules=[{"layers": "-1:", "mode": "dense"}])
    mr.rewrite(model, pol)
    assert list(model.state_dict()) == keys
    with torch.no_grad():
        got = model(x)
        want = vit_oracle([0, 1])(x)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert (got - original).abs().max() > 1e-3
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(x), want, atol=1e-5, rtol=1e-5)
    # .to() after the rewrite keeps using the module's own (moved) parameters
    model.to(torch.float64)
    with torch.no_grad():
        assert model(x.double()).dtype == torch.float64


# ------------------------------------------------------------------------- GPT-style block


class CausalSelfAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.c_attn = nn.Linear(E, 3 * E)
        self.c_proj = nn.Linear(E, E)
        self.attn_dropout = nn.Dropout(0.1)
        self.register_buffer("bias", torch.tril(torch.ones(64, 64)).view(1, 1, 64, 64))
        self.oracle_top_k = None

    def forward(self, x, pad=None):
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(E, dim=2)
        q, k, v = (z.view(b, t, H, D).transpose(1, 2) for z in (q, k, v))
        if self.oracle_top_k:
            visible = None if pad is None else pad[:, None, None, :]
            y = ref(q, k, v, causal=True, visible=visible, top_k=self.oracle_top_k)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(D))
            att = att.masked_fill(self.bias[:, :, :t, :t] == 0, float("-inf"))
            if pad is not None:
                att = att.masked_fill(~pad[:, None, None, :], float("-inf"))
            att = self.attn_dropout(F.softmax(att, dim=-1))
            y = att @ v
        return self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c))


class GPTBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln_1 = nn.LayerNorm(E)
        self.attn = CausalSelfAttention()
        self.ln_2 = nn.LayerNorm(E)
        self.mlp = nn.Sequential(nn.Linear(E, 64), nn.GELU(), nn.Linear(64, E))

    def forward(self, x, pad=None):
        x = x + self.attn(self.ln_1(x), pad)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, layers=4):
        super().__init__()
        self.wte = nn.Embedding(64, E)
        self.h = nn.ModuleList([GPTBlock() for _ in range(layers)])
        self.head = nn.Linear(E, 64)

    def forward(self, idx, pad=None):
        x = self.wte(idx)
        for block in self.h:
            x = block(x, pad)
        return self.head(x)


def gpt(layers=4):
    torch.manual_seed(0)
    model = GPT(layers).eval()
    g = torch.Generator().manual_seed(2)
    idx = torch.randint(0, 64, (B, T), generator=g)
    pad = torch.ones(B, T, dtype=torch.bool)
    pad[1, 24:] = False
    return model, idx, pad


def gpt_oracle(moba_layers, layers=4):
    model, _, _ = gpt(layers)
    for i in moba_layers:
        model.h[i].attn.oracle_top_k = 2
    return model


def test_gpt_block_causal_and_padding_masks():
    model, idx, pad = gpt()
    keys = list(model.state_dict())
    with torch.no_grad():
        original = model(idx, pad)
    hybrid = policy(rules=[{"layers": "-3:", "mode": "dense"}, {"match": "transformer.*", "top_k": 4}])
    mr.rewrite(model, hybrid, example_inputs=(idx, pad))
    rep = model._moba_report
    assert [r.name for r in rep] == [f"h.{i}.attn" for i in range(4)]
    assert [r.decision for r in rep] == ["moba", "dense", "dense", "dense"]
    assert rep[0].mask_kind == "causal+padding" and rep[0].causal is True
    assert any("matched no attention site" in w for w in rep.warnings)
    assert list(model.state_dict()) == keys
    with torch.no_grad():
        got = model(idx, pad)
        want = gpt_oracle([0])(idx, pad)
    keep = pad
    torch.testing.assert_close(got[keep], want[keep], atol=1e-5, rtol=1e-5)
    assert (got[keep] - original[keep]).abs().max() > 1e-3
    # padding honoured: tokens behind the padding do not change any kept output
    idx2 = idx.clone()
    idx2[1, 26] = (idx2[1, 26] + 1) % 64
    with torch.no_grad():
        torch.testing.assert_close(model(idx2, pad)[keep], got[keep], atol=1e-6, rtol=1e-6)
    # dense limit: eager and exported (fullgraph compile of traced modules: test_vit_block)
    mr.rewrite(model, policy(top_k=T // BLOCK), example_inputs=(idx, pad))
    with torch.no_grad():
        torch.testing.assert_close(model(idx, pad)[keep], original[keep], atol=1e-5, rtol=1e-5)
    ep = mr.export(gpt()[0], (idx, pad), policy(top_k=T // BLOCK))
    assert sum("moba.attention" in str(n.target) for n in ep.graph.nodes) == 4
    torch.testing.assert_close(ep.module()(idx, pad)[keep], original[keep], atol=1e-5, rtol=1e-5)


def test_eager_rewrite_without_example_inputs_and_call_mismatch():
    model, idx, pad = gpt(layers=2)
    mr.rewrite(model, policy())  # traced for the default call: pad=None
    with torch.no_grad():
        torch.testing.assert_close(model(idx), gpt_oracle([0, 1], layers=2)(idx), atol=1e-5, rtol=1e-5)
        with pytest.raises(Exception, match="pad"):
            model(idx, pad)  # traced with pad=None: a loud error, never a silent wrong answer


class FloatMaskAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(E, E)

    def forward(self, x, bias):
        b, t, _ = x.shape
        q = self.lin(x).view(b, t, H, D).transpose(1, 2)
        return F.scaled_dot_product_attention(q, q, q, attn_mask=bias)


def test_on_unsupported_error_and_dense_fallback_report():
    torch.manual_seed(0)
    m = FloatMaskAttention().eval()
    x, bias = torch.randn(B, T, E), torch.randn(1, 1, T, T)
    with pytest.raises(UnsupportedSiteError, match="may carry a bias"):
        mr.rewrite(m, policy(on_unsupported="error"), example_inputs=(x, bias))
    before = m(x, bias)
    mr.rewrite(m, policy(), example_inputs=(x, bias))
    assert m._moba_report[0].decision == "dense"
    assert "may carry a bias" in m._moba_report[0].reason
    assert torch.equal(m(x, bias), before)
    assert "may carry a bias" in m._moba_report.to_json()


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(E, E)

    def forward(self, x):
        if x.shape[1] > 16:  # Python control flow on a shape: torch.fx cannot trace it, export can
            x = x * 2
        q = self.lin(x).view(x.shape[0], x.shape[1], H, D).transpose(1, 2)
        return F.scaled_dot_product_attention(q, q, q)


def test_untraceable_module_is_reported():
    m = Untraceable().eval()
    mr.rewrite(m, policy())
    assert len(m._moba_report) == 0
    assert any("could not be traced" in w for w in m._moba_report.warnings)
    x = torch.randn(B, T, E)
    ep, rep = api.export_with_report(m, (x,), policy())  # the export graph does see it
    assert [r.decision for r in rep] == ["moba"]


@pytest.mark.slow
def test_mr_compile_with_inductor():
    """The Dynamo backend hands the rewritten graph to Inductor (compile_fx); one small model."""
    model, idx, pad = gpt(layers=2)
    torch._dynamo.reset()
    compiled = mr.compile(model, policy(rules=[{"layers": "-1:", "mode": "dense"}]), fullgraph=True)
    with torch.no_grad():
        got = compiled(idx, pad)
        want = gpt_oracle([0], layers=2)(idx, pad)
    torch.testing.assert_close(got[pad], want[pad], atol=1e-4, rtol=1e-4)
    assert [r.decision for r in compiled.moba_report] == ["moba", "dense"]


class KwargsAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(E, E)

    def forward(self, x, **kwargs):
        b, t, _ = x.shape
        q = self.lin(x).view(b, t, H, D).transpose(1, 2)
        return F.scaled_dot_product_attention(q, q, q, is_causal=True)


def test_forward_with_kwargs_is_reported_dense():
    m = KwargsAttention().eval()
    x = torch.randn(B, T, E)
    before = m(x)
    mr.rewrite(m, policy())
    assert m._moba_report[0].decision == "dense" and "**kwargs" in m._moba_report[0].reason
    assert torch.equal(m(x), before)
    with pytest.raises(UnsupportedSiteError):
        mr.rewrite(m, policy(on_unsupported="error"))
