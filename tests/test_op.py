"""The `moba::attention` op: argument errors, opcheck, torch.compile and torch.export."""

import pytest
import torch
import torch.nn.functional as F

import moba_rewrite as mr
from moba_rewrite.kernels import reference

BACKENDS = ["reference", "torch"]


def qkv(b=1, hq=4, hkv=2, tq=24, tk=24, d=8, dtype=torch.float32, grad=False):
    q = torch.randn(b, hq, tq, d, dtype=dtype, requires_grad=grad)
    k = torch.randn(b, hkv, tk, d, dtype=dtype, requires_grad=grad)
    v = torch.randn(b, hkv, tk, d, dtype=dtype, requires_grad=grad)
    return q, k, v


# --- bad arguments -------------------------------------------------------------------------

BAD_CASES = [
    (dict(block_size=0), "block_size must be an integer >= 1, got 0"),
    (dict(block_size=2.5), "block_size must be an integer >= 1"),
    (dict(top_k=0), "top_k must be an integer >= 1, got 0"),
    (dict(backend="cuda-magic"), "backend must be one of auto, reference, torch, triton, flash_attn"),
    (dict(scale=float("nan")), "scale must be a finite number"),
    (dict(attn_mask=torch.ones(3, 24, 24, dtype=torch.bool)), "not broadcastable to [B, Hq, Tq, Tk] = [1, 4, 24, 24]"),
    (dict(attn_mask=torch.ones(24, 24, dtype=torch.int64)), "attn_mask must be bool (True = attend) or floating"),
]


@pytest.mark.parametrize("kwargs,message", BAD_CASES)
def test_bad_arguments_raise_value_error_saying_what_was_expected(kwargs, message):
    q, k, v = qkv(hkv=4)
    with pytest.raises(ValueError, match=None) as info:
        mr.moba_attention(q, k, v, **{"block_size": 8, "top_k": 2, **kwargs})
    assert message in str(info.value)


def test_shape_errors():
    q, k, v = qkv(hkv=4)
    with pytest.raises(ValueError, match=r"q must be a 4-D tensor \[B, H, T, D\], got \[4, 24, 8\]"):
        mr.moba_attention(q[0], k, v, block_size=8, top_k=2)
    with pytest.raises(ValueError, match="head dims must match: q 8, k 4"):
        mr.moba_attention(q, k[..., :4], v, block_size=8, top_k=2)
    with pytest.raises(ValueError, match=r"k \[1, 4, 24, 8\] and v \[1, 4, 20, 8\] must agree"):
        mr.moba_attention(q, k, v[:, :, :20], block_size=8, top_k=2)
    with pytest.raises(ValueError, match=r"Tq \(24\) must not exceed Tk \(12\)"):
        mr.moba_attention(q, k[:, :, :12], v[:, :, :12], block_size=8, top_k=2)
    with pytest.raises(ValueError, match="batch sizes differ"):
        mr.moba_attention(q.expand(2, -1, -1, -1), k, v, block_size=8, top_k=2)


def test_gqa_errors():
    q, k, v = qkv(hq=4, hkv=3)
    with pytest.raises(ValueError, match=r"query heads \(4\) must be a multiple of key/value heads \(3\)"):
        mr.moba_attention(q, k, v, block_size=8, top_k=2, enable_gqa=True)
    q, k, v = qkv(hq=4, hkv=2)
    with pytest.raises(ValueError, match="pass enable_gqa=True"):
        mr.moba_attention(q, k, v, block_size=8, top_k=2)


def test_dtype_errors():
    q, k, v = qkv(hkv=4)
    with pytest.raises(ValueError, match="must share a dtype"):
        mr.moba_attention(q, k.double(), v, block_size=8, top_k=2)
    with pytest.raises(ValueError, match="must be floating point"):
        mr.moba_attention(q.long(), k, v, block_size=8, top_k=2)


# --- the op under torch's own checkers ------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    q, k, v = qkv(grad=True)
    mask = torch.rand(1, 1, 24, 24) > 0.2
    for args in [
        (q, k, v, None, 8, 2, True, 0.35, backend),
        (q, k, v, mask, 8, 2, False, 0.35, backend),
        (q[:, :, -1:].detach().requires_grad_(), k, v, None, 8, 2, True, 0.35, backend),
    ]:
        torch.library.opcheck(torch.ops.moba.attention.default, args)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("block_size,dense_below", [(8, 0), (32, 0), (8, 64)])  # MoBA, dense limit, dense_below
@pytest.mark.parametrize("mask_shape", [(24, 24), (1, 4, 24, 24)])
def test_a_learned_float_mask_gets_the_reference_gradient(backend, block_size, dense_below, mask_shape):
    """A float mask that requires grad (a learned bias folded into the mask, as Swin's relative
    position bias) gets d(out)/d(mask) equal to autograd through the dense reference over the
    blocks the op attended (all of them below `dense_below`); it got None before."""
    from moba_rewrite.kernels import reference

    q, k, v = qkv(grad=True)
    mask = (torch.randn(mask_shape) * 0.5).requires_grad_()
    args = (q, k, v, mask, block_size, 2, True, 0.35, backend) + ((dense_below,) if dense_below else ())
    out = torch.ops.moba.attention(*args)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v, mask), grad)
    full = backend != "reference" and dense_below > k.shape[2]
    bs, top_k = (k.shape[2], 1) if full else (block_size, 2)
    want_out = reference.forward(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), block_size=bs, top_k=top_k,
                                 causal=True, scale=0.35, attn_mask=mask)
    want = torch.autograd.grad(want_out, (q, k, v, mask), grad)
    torch.testing.assert_close(out, want_out, atol=1e-5, rtol=1e-5)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


class TinyAttention(torch.nn.Module):
    """A module whose forward calls MoBA: what a rewritten model looks like to the compiler."""

    def __init__(self, backend):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)
        self.backend = backend

    def forward(self, q, k, v):
        out = mr.moba_attention(self.proj(q), k, v, block_size=8, top_k=2, enable_gqa=True, backend=self.backend)
        return out.sum(dim=1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph_matches_eager_forward_and_backward(backend):
    torch._dynamo.reset()
    model = TinyAttention(backend)
    q, k, v = qkv(grad=True)
    eager = model(q, k, v)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(q, k, v)
    assert torch.allclose(eager, compiled, atol=1e-6)
    g_eager = torch.autograd.grad(eager.sum(), (q, k, v))
    g_comp = torch.autograd.grad(compiled.sum(), (q, k, v))
    for a, b in zip(g_eager, g_comp):
        assert torch.allclose(a, b, atol=1e-5)


class FusedProjectionAttention(torch.nn.Module):
    """q, k and v as transposed views of one fused projection (`[B, T, 3, H, D]` -> `[B, H, T, D]`),
    what attention modules (and Hugging Face's) hand the op: non-contiguous inputs."""

    def __init__(self, backend, block_size, heads=2, head_dim=8):
        super().__init__()
        self.qkv = torch.nn.Linear(heads * head_dim, 3 * heads * head_dim)
        self.backend, self.block_size, self.heads, self.head_dim = backend, block_size, heads, head_dim

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, self.head_dim).unbind(2)
        q, k, v = (y.transpose(1, 2) for y in (q, k, v))
        return mr.moba_attention(q, k, v, block_size=self.block_size, top_k=2, backend=self.backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("block_size", [8, 32])  # MoBA routing over 4 blocks, and the dense limit
def test_inductor_training_step_on_transposed_views_matches_eager(backend, block_size):
    """The compiled backward gets each gradient in its input's layout (Inductor asserts the strides
    the op's fake promised): a training step through Inductor equals eager, loss and gradients."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = FusedProjectionAttention(backend, block_size)
    x = torch.randn(2, 32, 16, requires_grad=True)
    eager = model(x)
    grads_eager = torch.autograd.grad(eager.square().sum(), [x, *model.parameters()])
    compiled = torch.compile(model, fullgraph=True)(x)
    grads_compiled = torch.autograd.grad(compiled.square().sum(), [x, *model.parameters()])
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads_compiled, grads_eager):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_compile_with_inductor():
    torch._dynamo.reset()
    model = TinyAttention("reference")
    q, k, v = qkv()
    assert torch.allclose(model(q, k, v), torch.compile(model, fullgraph=True)(q, k, v), atol=1e-5)


def test_export_has_a_single_moba_node_and_round_trips(tmp_path):
    model = TinyAttention("auto")
    q, k, v = qkv()
    ep = torch.export.export(model, (q, k, v))
    moba_nodes = [n for n in ep.graph.nodes if n.op == "call_function" and "moba" in str(n.target)]
    assert [str(n.target) for n in moba_nodes] == ["moba.attention.default"]
    path = tmp_path / "tiny.pt2"
    torch.export.save(ep, path)
    loaded = torch.export.load(path)
    assert torch.allclose(loaded.module()(q, k, v), model(q, k, v), atol=1e-6)


def test_export_with_dynamic_sequence_length():
    model = TinyAttention("reference")
    q, k, v = qkv(tq=32, tk=32)
    seq = torch.export.Dim("seq", min=2, max=4096)
    ep = torch.export.export(model, (q, k, v), dynamic_shapes=({2: seq}, {2: seq}, {2: seq}))
    q2, k2, v2 = qkv(tq=40, tk=40)
    assert torch.allclose(ep.module()(q2, k2, v2), model(q2, k2, v2), atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dense_limit_equals_sdpa_through_the_op(backend):
    q, k, v = qkv(hq=4, hkv=2, tq=21, tk=21)
    for causal in (True, False):
        got = mr.moba_attention(q, k, v, block_size=8, top_k=3, causal=causal, enable_gqa=True, backend=backend)
        want = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
        assert torch.allclose(got, want, atol=1e-5)


def test_gradients_match_reference_autograd():
    q, k, v = qkv(dtype=torch.float64, grad=True)
    out = mr.moba_attention(q, k, v, block_size=8, top_k=2, enable_gqa=True, backend="reference")
    grads = torch.autograd.grad((out**2).sum(), (q, k, v))
    with torch.enable_grad():
        direct = reference.forward(q, k, v, block_size=8, top_k=2, causal=True, scale=8**-0.5, attn_mask=None)
        want = torch.autograd.grad((direct**2).sum(), (q, k, v))
    for a, b in zip(grads, want):
        assert torch.allclose(a, b, atol=1e-10)


def test_auto_backend_runs_on_cpu_and_is_kept_in_exported_graph():
    from moba_rewrite.kernels import resolve_backend

    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    assert resolve_backend("reference", torch.device("cpu")) == "reference"
