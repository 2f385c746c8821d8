"""`moba_attention_varlen`: MoBA on packed variable-length batches (flash-attn varlen layout).

q is `[total_q, Hq, D]`, k is `[total_k, Hkv, D]`, v is `[total_k, Hkv, Dv]` (Dv may differ from
D, as in multi-head latent attention); sequence `s` owns query rows
`cu_seqlens_q[s]:cu_seqlens_q[s+1]` and key rows `cu_seqlens_k[s]:cu_seqlens_k[s+1]`, and is
an independent MoBA problem (SPEC section 2): its blocks start at its first key, and its
queries are its newest tokens. Query rows outside every sequence get zeros.

One custom op, `moba::attention_varlen` (+ its backward op), fronts the backends:
`reference` and `torch` loop over sequences, `triton` runs the packed batch in one set of
kernel launches, `flash_attn` runs the paper's algorithm on flash-attn's varlen kernels.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from moba_rewrite.attention import autocast
from moba_rewrite.kernels import BACKENDS, load_backend, resolve_backend
from moba_rewrite.kernels.grad_layout import like_inputs

_NAME = "moba_attention_varlen"


def _fail(msg: str) -> None:
    raise ValueError(f"{_NAME}: {msg}")


def _check_cu(name: str, cu: Tensor, total: int, device) -> None:
    if not isinstance(cu, Tensor) or cu.dim() != 1 or cu.dtype != torch.int32:
        got = f"{cu.dtype} tensor of shape {list(cu.shape)}" if isinstance(cu, Tensor) else type(cu).__name__
        _fail(f"{name} must be a 1-D int32 tensor [num_seqs + 1], got {got}")
    if cu.numel() < 2:
        _fail(f"{name} must hold at least 2 offsets (one sequence), got {cu.numel()}")
    if cu.device != device:
        _fail(f"{name} is on {cu.device}, q on {device}")
    if torch.compiler.is_compiling():
        return  # value checks need the data; they run eagerly
    vals = cu.tolist()
    if vals[0] != 0:
        _fail(f"{name} must start at 0, got {vals[0]}")
    if any(b < a for a, b in zip(vals, vals[1:])):
        _fail(f"{name} must be non-decreasing, got {vals}")
    if vals[-1] > total:
        _fail(f"{name} ends at {vals[-1]} but the packed tensor has only {total} rows")


def validate_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, *,
                    block_size: int, top_k: int, scale, backend: str) -> None:
    """Raise `ValueError` naming the first argument that breaks the packed-layout contract."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 3:
            shape = list(t.shape) if isinstance(t, Tensor) else type(t).__name__
            _fail(f"{name} must be a 3-D packed tensor [total, H, D], got {shape}")
        if not t.dtype.is_floating_point:
            _fail(f"{name} must be floating point, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        _fail(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        _fail(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape[:2] != v.shape[:2]:
        _fail(f"k {list(k.shape)} and v {list(v.shape)} must agree in [total_k, Hkv]")
    d = q.shape[2]
    if k.shape[2] != d:
        _fail(f"q and k head dims must match: q {d}, k {k.shape[2]}")
    if q.shape[1] < 1 or k.shape[1] < 1 or d < 1 or v.shape[2] < 1:
        _fail(f"heads and head dim must be >= 1, got q {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)}")
    if q.shape[1] % k.shape[1] != 0:
        _fail(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")
    for name, value in (("block_size", block_size), ("top_k", top_k)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            _fail(f"{name} must be an integer >= 1, got {value!r}")
        if value > 2**31 - 1:
            _fail(f"{name} must be an integer <= 2**31 - 1, got {value!r}")
    bad_scale = isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale)
    if scale is not None and bad_scale:
        _fail(f"scale must be a finite number or None, got {scale!r}")
    if backend not in BACKENDS:
        _fail(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    _check_cu("cu_seqlens_q", cu_seqlens_q, q.shape[0], q.device)
    _check_cu("cu_seqlens_k", cu_seqlens_k, k.shape[0], q.device)
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        _fail(f"cu_seqlens_q and cu_seqlens_k must describe as many sequences, got "
              f"{cu_seqlens_q.numel() - 1} and {cu_seqlens_k.numel() - 1}")
    if not torch.compiler.is_compiling():
        lq = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).tolist()
        lk = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).tolist()
        for s, (a, b) in enumerate(zip(lq, lk)):
            if a > b:
                _fail(f"sequence {s} has {a} queries but {b} keys: queries are the newest of a sequence's tokens")


# ----------------------------------------------------------------------------- per-sequence loop


def _sequences(cu_q: Tensor, cu_k: Tensor):
    for s, (q0, q1, k0, k1) in enumerate(zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), cu_k[:-1].tolist(),
                                             cu_k[1:].tolist())):
        if q1 > q0:
            yield s, q0, q1, k0, k1


def _bhtd(x: Tensor) -> Tensor:  # [T, H, D] -> [1, H, T, D]
    return x.transpose(0, 1).unsqueeze(0)


def _thd(x: Tensor) -> Tensor:  # [1, H, T, D] -> [T, H, D]
    return x.squeeze(0).transpose(0, 1)


def _out_like(q: Tensor, v: Tensor) -> Tensor:
    """Zeros `[total_q, Hq, Dv]`: rows outside every sequence stay zero."""
    return q.new_zeros((*q.shape[:-1], v.shape[-1]))


def _loop_forward(module, q, k, v, cu_q, cu_k, **kw) -> Tensor:
    out = _out_like(q, v)
    for _, q0, q1, k0, k1 in _sequences(cu_q, cu_k):
        o = module.forward(_bhtd(q[q0:q1]), _bhtd(k[k0:k1]), _bhtd(v[k0:k1]), attn_mask=None, **kw)
        out[q0:q1] = _thd(o)
    return out


def _loop_backward(module, grad_out, q, k, v, out, cu_q, cu_k, **kw):
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for _, q0, q1, k0, k1 in _sequences(cu_q, cu_k):
        g = module.backward(_bhtd(grad_out[q0:q1]), _bhtd(q[q0:q1]), _bhtd(k[k0:k1]), _bhtd(v[k0:k1]),
                            _bhtd(out[q0:q1]), attn_mask=None, **kw)
        dq[q0:q1] = _thd(g[0])
        dk[k0:k1] = _thd(g[1])
        dv[k0:k1] = _thd(g[2])
    return dq, dk, dv


def _module(backend: str, q: Tensor, k: Tensor, v: Tensor):
    return load_backend(resolve_backend(backend, q.device, q, k, None, v=v))


# ----------------------------------------------------------------------------- the op


@torch.library.custom_op("moba::attention_varlen", mutates_args=())
def attention_varlen(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, block_size: int, top_k: int,
    causal: bool, scale: float, backend: str,
) -> Tensor:
    """Packed MoBA on validated arguments; see `moba_attention_varlen`."""
    kw = dict(block_size=block_size, top_k=top_k, causal=causal, scale=scale)
    module = _module(backend, q, k, v)
    if hasattr(module, "forward_varlen"):
        out = module.forward_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, **kw)
    else:
        out = _loop_forward(module, q, k, v, cu_seqlens_q, cu_seqlens_k, **kw)
    return out.contiguous()


@attention_varlen.register_fake
def _attention_varlen_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, block_size, top_k, causal, scale, backend):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


@torch.library.custom_op("moba::attention_varlen_backward", mutates_args=())
def attention_varlen_backward(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
    block_size: int, top_k: int, causal: bool, scale: float, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of `moba::attention_varlen` with respect to q, k and v."""
    kw = dict(block_size=block_size, top_k=top_k, causal=causal, scale=scale)
    module = _module(backend, q, k, v)
    if hasattr(module, "backward_varlen"):
        dq, dk, dv = module.backward_varlen(grad_out, q, k, v, out, cu_seqlens_q, cu_seqlens_k, **kw)
    else:
        dq, dk, dv = _loop_backward(module, grad_out, q, k, v, out, cu_seqlens_q, cu_seqlens_k, **kw)
    return like_inputs((dq, dk, dv), (q, k, v))  # the fake's layout (grad_layout)


@attention_varlen_backward.register_fake
def _attention_varlen_backward_fake(grad_out, q, k, v, out, cu_seqlens_q, cu_seqlens_k, block_size, top_k,
                                    causal, scale, backend):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, block_size, top_k, causal, scale, backend = inputs
    ctx.save_for_backward(q, k, v, output, cu_q, cu_k)
    ctx.params = (block_size, top_k, causal, scale, backend)


def _backward(ctx, grad_out):
    q, k, v, out, cu_q, cu_k = ctx.saved_tensors
    dq, dk, dv = attention_varlen_backward(grad_out.contiguous(), q, k, v, out, cu_q, cu_k, *ctx.params)
    return dq, dk, dv, None, None, None, None, None, None, None


attention_varlen.register_autograd(_backward, setup_context=_setup_context)
autocast.register("attention_varlen")


def moba_attention_varlen(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    *,
    block_size: int,
    top_k: int,
    causal: bool = True,
    scale: float | None = None,
    backend: str = "auto",
) -> Tensor:
    """MoBA over a packed batch: q `[total_q, Hq, D]`, k `[total_k, Hkv, D]`, v `[total_k, Hkv, Dv]`,
    int32 `cu_seqlens`.

    Each sequence is attended on its own (its blocks start at its first key; its queries are
    its newest tokens), exactly as `moba_attention` would on that sequence alone. GQA is
    implied by `Hq % Hkv == 0`. Returns `[total_q, Hq, Dv]`.
    """
    if autocast.active(q):  # SDPA's autocast rule (mixed input dtypes are fine there)
        q, k, v = autocast.cast_inputs(q, k, v)
    validate_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, block_size=block_size, top_k=top_k, scale=scale,
                    backend=backend)
    resolved = float(scale) if scale is not None else q.shape[-1] ** -0.5
    return torch.ops.moba.attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, block_size, top_k, bool(causal),
                                           resolved, backend)
