"""Plain eager calls skip the torch.library dispatcher (it costs more than a decode step's kernels);
anything that records or intercepts the call still sees the `moba::attention*` ops."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import moba_rewrite as mr
from moba_rewrite.kernels.eager import plain_eager


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _inputs(requires_grad=False):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 40, 8, generator=g, requires_grad=requires_grad) for _ in range(3))
    return q, k, v


def test_plain_eager_only_when_nothing_records_the_call():
    q, k, v = _inputs()
    assert plain_eager(q, k, v, None)
    assert not plain_eager(*_inputs(requires_grad=True))
    with torch.no_grad():
        assert plain_eager(*_inputs(requires_grad=True))
    with _Recorder():
        assert not plain_eager(q, k, v)
    assert plain_eager(torch.nn.Parameter(q, requires_grad=False))  # frozen parameters are plain

    class Sub(torch.Tensor):
        pass

    assert not plain_eager(q.as_subclass(Sub))  # subclasses may intercept ops
    seen = []
    torch.vmap(lambda x: seen.append(plain_eager(x)) or x)(q)
    assert seen == [False]  # functorch transforms need the op (its batching rule)


def test_eager_call_bypasses_the_op_but_gives_its_result(monkeypatch):
    q, k, v = _inputs()
    kw = dict(block_size=8, top_k=2, backend="torch")
    via_op = torch.ops.moba.attention(q, k, v, None, 8, 2, True, 8 ** -0.5, "torch")
    called = []
    real = torch.ops.moba.attention
    monkeypatch.setattr(torch.ops.moba, "attention", lambda *a: called.append(1) or real(*a))
    out = mr.moba_attention(q, k, v, **kw)
    assert called == [] and torch.equal(out, via_op)


def test_dispatch_modes_and_autograd_still_see_the_op():
    q, k, v = _inputs()
    with _Recorder() as rec:
        mr.moba_attention(q, k, v, block_size=8, top_k=2, backend="torch")
    assert "moba.attention.default" in rec.ops
    q, k, v = _inputs(requires_grad=True)
    out = mr.moba_attention(q, k, v, block_size=8, top_k=2, backend="torch")
    assert out.grad_fn is not None
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_meta_tensors_and_forward_ad_still_go_through_the_op():
    """Meta tensors get the op's fake implementation (shape only), as before the eager shortcut;
    inside a forward-AD level the op is used too, so every backend behaves alike there."""
    q, k, v = (torch.empty(1, 2, 40, 8, device="meta") for _ in range(3))
    assert not plain_eager(q, k, v)
    out = mr.moba_attention(q, k, v, block_size=8, top_k=2)
    assert out.shape == (1, 2, 40, 8) and out.is_meta
    import torch.autograd.forward_ad as fwAD

    q, k, v = _inputs()
    assert plain_eager(q, k, v)
    with fwAD.dual_level():
        assert not plain_eager(q, k, v)
