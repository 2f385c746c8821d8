"""`moba_attention`: the public MoBA function, in scaled_dot_product_attention's layout.

It validates arguments (one `ValueError` per problem, saying what was expected), resolves
the scale and calls the `moba::attention` op, so eager code, `torch.compile` and
`torch.export` all go through the same operator.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from moba_rewrite.attention import autocast, op as _op  # registers torch.ops.moba
from moba_rewrite.kernels import BACKENDS


# Largest block_size / top_k: the op's int arguments must fit the 64-bit ints of traced graphs
# and the kernels' 32-bit index arithmetic (the policy schema has the same bound).
MAX_INT_ARG = 2**31 - 1


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"moba_attention: {name} must be an integer >= 1, got {value!r}")
    if value > MAX_INT_ARG:
        raise ValueError(f"moba_attention: {name} must be an integer <= 2**31 - 1, got {value!r}")


def _check_mask(attn_mask: Tensor, target: tuple[int, int, int, int]) -> None:
    if not isinstance(attn_mask, Tensor):
        raise ValueError(f"moba_attention: attn_mask must be a tensor or None, got {type(attn_mask).__name__}")
    if attn_mask.dtype != torch.bool and not attn_mask.dtype.is_floating_point:
        raise ValueError(
            f"moba_attention: attn_mask must be bool (True = attend) or floating (added to the scores), "
            f"got dtype {attn_mask.dtype}"
        )
    shape = tuple(attn_mask.shape)
    ok = len(shape) <= 4 and all(m in (1, t) for m, t in zip(reversed(shape), reversed(target)))
    if not ok:
        raise ValueError(
            f"moba_attention: attn_mask of shape {list(shape)} is not broadcastable to "
            f"[B, Hq, Tq, Tk] = {list(target)}"
        )


def _check_means(means, k: Tensor, block_size: int) -> None:
    b, hkv, tk, d = k.shape
    want = [b, hkv, -(-tk // block_size), d]
    if not isinstance(means, Tensor) or not means.dtype.is_floating_point or list(means.shape) != want:
        got = f"{list(means.shape)} {means.dtype}" if isinstance(means, Tensor) else type(means).__name__
        raise ValueError(f"moba_attention: key_block_means must be a floating tensor [B, Hkv, ceil(Tk / block_size), D]"
                         f" = {want} (from moba_rewrite.key_block_means(k, block_size)), got {got}")
    if means.device != k.device:
        raise ValueError(f"moba_attention: key_block_means is on {means.device}, k on {k.device}")


def validate(q: Tensor, k: Tensor, v: Tensor, *, block_size: int, top_k: int, scale, attn_mask,
             enable_gqa: bool, backend: str, key_block_means=None) -> None:
    """Raise `ValueError` naming the first argument that breaks the contract of SPEC section 2."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            shape = list(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"moba_attention: {name} must be a 4-D tensor [B, H, T, D], got {shape}")
        if not t.dtype.is_floating_point:
            raise ValueError(f"moba_attention: {name} must be floating point, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"moba_attention: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    b, hq, tq, d = q.shape
    if k.shape[0] != b or v.shape[0] != b:
        raise ValueError(f"moba_attention: batch sizes differ: q {b}, k {k.shape[0]}, v {v.shape[0]}")
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"moba_attention: k {list(k.shape)} and v {list(v.shape)} must agree in [B, Hkv, Tk]")
    if k.shape[3] != d:
        raise ValueError(f"moba_attention: q and k head dims must match: q {d}, k {k.shape[3]}")
    hkv, tk = k.shape[1], k.shape[2]
    if hq < 1 or hkv < 1:
        raise ValueError(f"moba_attention: head counts must be >= 1, got {hq} query and {hkv} key/value heads")
    if d < 1 or v.shape[3] < 1:
        raise ValueError(f"moba_attention: head dim must be >= 1, got q/k {d}, v {v.shape[3]}")
    if hq % hkv != 0:
        raise ValueError(f"moba_attention: query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    if hq != hkv and not enable_gqa:
        raise ValueError(
            f"moba_attention: q has {hq} heads but k/v have {hkv}; pass enable_gqa=True for grouped-query attention"
        )
    if tq < 1 or tk < 1:
        raise ValueError(f"moba_attention: sequence lengths must be >= 1, got Tq={tq}, Tk={tk}")
    if tq > tk:
        raise ValueError(
            f"moba_attention: Tq ({tq}) must not exceed Tk ({tk}): queries are the newest Tq of Tk tokens"
        )
    _check_positive_int("block_size", block_size)
    _check_positive_int("top_k", top_k)
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale)):
        raise ValueError(f"moba_attention: scale must be a finite number or None, got {scale!r}")
    if backend not in BACKENDS:
        raise ValueError(f"moba_attention: backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if attn_mask is not None:
        _check_mask(attn_mask, (b, hq, tq, tk))
        if attn_mask.device != q.device:
            raise ValueError(f"moba_attention: attn_mask is on {attn_mask.device}, q on {q.device}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"moba_attention: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if key_block_means is not None:
        _check_means(key_block_means, k, block_size)


def moba_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    block_size: int = 512,
    top_k: int = 3,
    causal: bool = True,
    scale: float | None = None,
    attn_mask: Tensor | None = None,
    enable_gqa: bool = False,
    backend: str = "auto",
    key_block_means: Tensor | None = None,
) -> Tensor:
    """Mixture of Block Attention in SDPA layout: q `[B, Hq, Tq, D]`, k `[B, Hkv, Tk, D]`, v `[B, Hkv, Tk, Dv]`,
    output `[B, Hq, Tq, Dv]` (`Dv` may differ from `D`, as in multi-head latent attention).

    Each query attends its own key block plus the `top_k - 1` blocks whose mean key scores
    best against it (`top_k` counts the own block). Queries are the newest `Tq` of `Tk`
    tokens. `attn_mask` is bool (True = may attend) or additive float, broadcastable to
    `[B, Hq, Tq, Tk]`. With `top_k * block_size >= Tk` this equals ordinary attention.
    `key_block_means`: the block means of k kept as a cache (`moba_rewrite.key_block_means`), so
    decoding need not reread all of K for the gate; it must be current for k.
    """
    if autocast.active(q):  # SDPA's autocast rule (mixed input dtypes are fine there)
        q, k, v, attn_mask, key_block_means = autocast.cast_inputs(q, k, v, attn_mask, key_block_means)
    validate(q, k, v, block_size=block_size, top_k=top_k, scale=scale, attn_mask=attn_mask,
             enable_gqa=enable_gqa, backend=backend, key_block_means=key_block_means)
    resolved_scale = float(scale) if scale is not None else q.shape[-1] ** -0.5
    return _op.run(q, k, v, key_block_means, attn_mask, block_size, top_k, bool(causal), resolved_scale, backend)
