"""`triton` backend: fused MoBA kernels (gate + top-k, block-sparse forward and backward,
GQA, split-KV decode, packed varlen) behind the backend contract of docs/ARCHITECTURE.md.

Runs on CUDA, or on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1 set before
triton was first imported; fp32/fp16 only there). Attention masks of any broadcastable
shape are supported (bool or additive float); `supports()` says which calls can run here.
The backward recomputes the selection and the row LSE instead of keeping state between the
op's forward and backward calls.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

try:
    import triton  # noqa: F401

    _IMPORT_ERROR: str | None = None
except ImportError as exc:  # pragma: no cover - depends on the environment
    _IMPORT_ERROR = f"triton is not installed ({exc})"

from moba_rewrite.kernels.eager import plain_eager
from moba_rewrite.kernels.grad_layout import like_inputs

if _IMPORT_ERROR is None:
    from moba_rewrite.kernels.triton import attn as triton_attn, gate as triton_gate
    from moba_rewrite.kernels.triton.layout import Problem, dense_problem, varlen_problem

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


def interpreter_active() -> bool:
    """True when the kernels were built for the Triton interpreter (CPU tensors)."""
    if _IMPORT_ERROR is not None:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(triton_attn._fwd_kernel, InterpretedFunction)


def is_available() -> bool:
    return _IMPORT_ERROR is None and (torch.cuda.is_available() or interpreter_active())


def unavailable_reason() -> str:
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR
    if not is_available():
        return ("no CUDA device, and the Triton interpreter is off (set TRITON_INTERPRET=1 before "
                "triton is imported to run the kernels on CPU)")
    return ""


def unsupported_reason(q: Tensor, k: Tensor, attn_mask: Tensor | None = None, v: Tensor | None = None) -> str | None:
    """Why this call cannot run on the triton backend here, or None when it can (`v`: checks its head
    dim too, which may differ from q's)."""
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR
    if q.dtype not in _DTYPES:
        return f"dtype {q.dtype} (supported: float16, bfloat16, float32)"
    if q.shape[-1] > MAX_HEAD_DIM:
        return f"head dim {q.shape[-1]} > {MAX_HEAD_DIM}"
    if v is not None and v.shape[-1] > MAX_HEAD_DIM:
        return f"value head dim {v.shape[-1]} > {MAX_HEAD_DIM}"
    if q.device.type == "cuda":
        if interpreter_active():
            return "CUDA tensors while the Triton interpreter is on"
        return None
    if not interpreter_active():
        return f"{q.device.type} tensors need the Triton interpreter (TRITON_INTERPRET=1 before importing triton)"
    if q.dtype == torch.bfloat16:
        return "bfloat16 under the Triton interpreter (use float16 or float32 on CPU)"
    return None


def supports(q: Tensor, k: Tensor, attn_mask: Tensor | None = None, v: Tensor | None = None) -> bool:
    """Can `forward`/`backward` run this call? Masks of every contract-allowed kind are supported."""
    return unsupported_reason(q, k, attn_mask, v) is None


def _check(q: Tensor, k: Tensor, attn_mask: Tensor | None, v: Tensor | None = None) -> None:
    reason = unsupported_reason(q, k, attn_mask, v)
    if reason is not None:
        raise NotImplementedError(f"MoBA triton backend does not support {reason}")


def _forward_impl(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], block_size: int, top_k: int,
                  causal: bool, scale: float, key_block_means: Optional[Tensor] = None) -> Tensor:
    """Dense-layout forward: torch ops plus (wrapped) Triton launches only, so it is traceable."""
    p = dense_problem(q, k, v, block_size=block_size, top_k=top_k, causal=causal, scale=scale, attn_mask=attn_mask)
    return _run_forward(p, key_block_means)


def _forward_kv_cache_impl(q: Tensor, k_cache: Tensor, v_cache: Tensor, key_block_means: Tensor,
                           cache_position: Tensor, attn_mask: Optional[Tensor], block_size: int, top_k: int,
                           causal: bool, scale: float) -> Tensor:
    """Against a KV cache: the kernels see the whole cache (`max_tk` = its slots) and each sequence's
    key length is the filled prefix `cache_position[-1] + 1`, a device tensor (no host sync); the
    queries then sit at their real positions, and the gate reads the cached means."""
    p = dense_problem(q, k_cache, v_cache, block_size=block_size, top_k=top_k, causal=causal, scale=scale,
                      attn_mask=attn_mask)
    p.k_len = (cache_position[-1:] + 1).to(torch.int32).expand(p.batch).contiguous()
    return _run_forward(p, key_block_means[:, :, :p.n_blocks])


def _run_forward(p: "Problem", means: Optional[Tensor] = None) -> Tensor:
    if p.max_tq == 1:  # decode: a gate over block ranges in parallel, merged by split-KV attention; no CSR
        return triton_attn.decode_forward(p, triton_gate.select_blocks(p, means=means, partial=True))
    sel = triton_gate.select_blocks(p, means=means)
    out, _ = triton_attn.attention_forward(p, triton_gate.build_csr(p, sel))
    return out


def _backward_impl(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, attn_mask: Optional[Tensor],
                   block_size: int, top_k: int, causal: bool, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    p = dense_problem(q, k, v, block_size=block_size, top_k=top_k, causal=causal, scale=scale,
                      attn_mask=attn_mask)
    sel = triton_gate.build_csr(p, triton_gate.select_blocks(p))
    lse = triton_attn.row_lse(p, sel).contiguous()
    dq, dk, dv = triton_attn.attention_backward(p, sel, grad_out, out, lse)
    return like_inputs((dq, dk, dv), (q, k, v))  # the fake's layout (grad_layout)


# The kernels as torch operators. On GPU they are `torch.library.triton_op`s: torch.compile and
# AOTInductor trace into them and embed the Triton kernels (launched through `wrap_triton`), and
# their fake implementation is the traced implementation itself. Under the interpreter (CPU tests)
# the kernels are not JIT functions, so the same implementations are registered as opaque custom
# ops with explicit fake implementations instead.
if _IMPORT_ERROR is None:
    if interpreter_active():
        _fwd_op = torch.library.custom_op("moba::triton_attention", mutates_args=())(_forward_impl)
        _bwd_op = torch.library.custom_op("moba::triton_attention_backward", mutates_args=())(_backward_impl)
        _fwd_op.register_fake(lambda q, k, v, *a, **kw: q.new_empty((*q.shape[:-1], v.shape[-1])))
        _kv_op = torch.library.custom_op("moba::triton_attention_kv_cache", mutates_args=())(_forward_kv_cache_impl)
        _kv_op.register_fake(lambda q, k_cache, v_cache, *a, **kw: q.new_empty((*q.shape[:-1], v_cache.shape[-1])))
        _bwd_op.register_fake(lambda g, q, k, v, *a: (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)))
    else:
        _fwd_op = torch.library.triton_op("moba::triton_attention", mutates_args=())(_forward_impl)
        _bwd_op = torch.library.triton_op("moba::triton_attention_backward", mutates_args=())(_backward_impl)
        torch.library.triton_op("moba::triton_attention_kv_cache", mutates_args=())(_forward_kv_cache_impl)

    def _setup_context(ctx, inputs, output):
        q, k, v, attn_mask, block_size, top_k, causal, scale = inputs[:8]
        ctx.save_for_backward(q, k, v, output, attn_mask)
        ctx.params = (block_size, top_k, causal, scale)

    def _backward_rule(ctx, grad_out):
        q, k, v, out, attn_mask = ctx.saved_tensors
        dq, dk, dv = torch.ops.moba.triton_attention_backward(grad_out.contiguous(), q, k, v, out, attn_mask,
                                                              *ctx.params)
        return dq, dk, dv, None, None, None, None, None, None  # no gradient for the means cache

    _fwd_op.register_autograd(_backward_rule, setup_context=_setup_context)


def forward(q: Tensor, k: Tensor, v: Tensor, *, block_size: int, top_k: int, causal: bool, scale: float,
            attn_mask: Tensor | None, key_block_means: Tensor | None = None) -> Tensor:
    """MoBA output `[B, Hq, Tq, Dv]` (see SPEC section 2), through `moba::triton_attention`.
    `key_block_means`: a cache of the fp32 block means of k, so the gate need not read all of K."""
    _check(q, k, attn_mask, v)
    if plain_eager(q, k, v, attn_mask, key_block_means):  # the op's dispatch costs more than a decode step
        return _forward_impl(q, k, v, attn_mask, block_size, top_k, causal, float(scale), key_block_means)
    return torch.ops.moba.triton_attention(q, k, v, attn_mask, block_size, top_k, causal, float(scale),
                                           key_block_means)


def forward_kv_cache(q: Tensor, k_cache: Tensor, v_cache: Tensor, key_block_means: Tensor, cache_position: Tensor,
                     *, block_size: int, top_k: int, causal: bool, scale: float,
                     attn_mask: Tensor | None) -> Tensor:
    """MoBA of the queries at `cache_position` against the filled prefix of a KV cache (SPEC section 2
    item 9), gated on `key_block_means`, through `moba::triton_attention_kv_cache` (no host sync)."""
    _check(q, k_cache, attn_mask, v_cache)
    args = (q, k_cache, v_cache, key_block_means, cache_position, attn_mask, block_size, top_k, causal,
            float(scale))
    if plain_eager(q, k_cache, v_cache, key_block_means, cache_position, attn_mask):
        return _forward_kv_cache_impl(*args)
    return torch.ops.moba.triton_attention_kv_cache(*args)


def backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, *, block_size: int, top_k: int,
             causal: bool, scale: float, attn_mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv); recomputes the selection and the row LSE (one score pass)."""
    _check(q, k, attn_mask, v)
    return torch.ops.moba.triton_attention_backward(grad_out.contiguous(), q, k, v, out, attn_mask, block_size,
                                                    top_k, causal, float(scale))


@torch.no_grad()
def block_selection(q: Tensor, k: Tensor, *, block_size: int, top_k: int, causal: bool,
                    attn_mask: Tensor | None = None) -> Tensor:
    """Boolean `[B, Hq, Tq, n_blocks]` of the blocks the kernels attend (own block included)."""
    _check(q, k, attn_mask)
    p = dense_problem(q, k, k, block_size=block_size, top_k=top_k, causal=causal, scale=1.0, attn_mask=attn_mask)
    return triton_gate.selection_map(p, triton_gate.select_blocks(p))


def forward_with_selection(q: Tensor, k: Tensor, v: Tensor, selected: Tensor, *, block_size: int, causal: bool,
                           scale: float, attn_mask: Tensor | None = None) -> Tensor:
    """Attention over a given boolean `[B, Hq, Tq, n_blocks]` selection (own block always added): for tests."""
    _check(q, k, attn_mask, v)
    p = dense_problem(q, k, v, block_size=block_size, top_k=1, causal=causal, scale=scale, attn_mask=attn_mask)
    sel = triton_gate.build_csr(p, triton_gate.selection_from_map(p, selected))
    out, _ = triton_attn.attention_forward(p, sel)
    return out


# ------------------------------------------------------------- given selection (context parallelism)

_LN2 = 0.6931471805599453


def _selected_problem(q: Tensor, k: Tensor, v: Tensor, selection: Tensor, block_size: int, causal: bool,
                      scale: float, attn_mask: Tensor | None,
                      own_block: bool = True) -> tuple["Problem", "triton_gate.Selection"]:
    _check(q, k, attn_mask, v)
    p = dense_problem(q, k, v, block_size=block_size, top_k=selection.shape[-1] + 1, causal=causal, scale=scale,
                      attn_mask=attn_mask)
    return p, triton_gate.build_csr(p, triton_gate.selection_from_picks(p, selection, own_block))


def _rows_to_heads(p: "Problem", rows: Tensor) -> Tensor:
    """Kernel row layout `[B*Hkv, RP]` (row `t * G + g`) -> `[B, Hq, Tq]`."""
    return rows[:, : p.rows].reshape(p.batch, p.hkv, p.max_tq, p.group).transpose(2, 3).reshape(
        p.batch, p.hq, p.max_tq)


def forward_selected(q: Tensor, k: Tensor, v: Tensor, selection: Tensor, *, block_size: int, causal: bool,
                     scale: float, attn_mask: Tensor | None, own_block: bool = True) -> tuple[Tensor, Tensor]:
    """MoBA over given history blocks: `selection` `[B, Hq, Tq, S]` block indices of k per query row
    (-1 = none, own block excluded; the torch backend's `selection`). Returns `(out, lse)`, lse the
    rows' natural log-sum-exp `[B, Hq, Tq]` fp32 (-inf where a row sees no key), to merge with
    attention computed elsewhere. Eager (context parallelism's local attention). `own_block=False`:
    the selected blocks only, not each query's own (a row with no pick: zeros, lse -inf)."""
    p, sel = _selected_problem(q, k, v, selection, block_size, causal, float(scale), attn_mask, own_block)
    out, lse2 = triton_attn.attention_forward(p, sel)
    lse = _rows_to_heads(p, lse2) * _LN2
    return out, lse.masked_fill(torch.isposinf(lse), float("-inf"))


def backward_selected(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, selection: Tensor,
                      lse: Tensor, *, block_size: int, causal: bool, scale: float,
                      attn_mask: Tensor | None, own_block: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """`(dq, dk, dv)` of `forward_selected`, given the rows' log-sum-exp `lse` `[B, Hq, Tq]` over all
    the keys they attend (of which this call's are a part) and `out` the merged output: this part's
    share of the gradients."""
    p, sel = _selected_problem(q, k, v, selection, block_size, causal, float(scale), attn_mask, own_block)
    lse2 = (lse.float() / _LN2).masked_fill(torch.isneginf(lse), float("inf"))  # a row seeing nothing: p = 0
    rows = lse2.reshape(p.batch, p.hkv, p.group, p.max_tq).transpose(2, 3).reshape(p.batch * p.hkv, p.rows)
    row_lse = torch.full((p.batch * p.hkv, sel.row_pad), float("inf"), dtype=torch.float32, device=q.device)
    row_lse[:, : p.rows] = rows
    return triton_attn.attention_backward(p, sel, grad_out, out, row_lse)


# ----------------------------------------------------------------------------- packed varlen


def _plan_varlen(q, k, v, cu_q, cu_k, block_size, top_k, causal, scale):
    _check(q, k, None, v)
    p = varlen_problem(q, k, v, cu_q, cu_k, block_size=block_size, top_k=top_k, causal=causal, scale=scale)
    sel = triton_gate.select_blocks(p)
    return p, triton_gate.build_csr(p, sel)


def forward_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, *,
                   block_size: int, top_k: int, causal: bool, scale: float) -> Tensor:
    """Packed MoBA: q `[total_q, Hq, D]`, k `[total_k, Hkv, D]`, v `[total_k, Hkv, Dv]`; each sequence is
    its own problem."""
    _check(q, k, None, v)
    p = varlen_problem(q, k, v, cu_seqlens_q, cu_seqlens_k, block_size=block_size, top_k=top_k, causal=causal,
                       scale=scale)
    return _run_forward(p)


def backward_varlen(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, cu_seqlens_q: Tensor,
                    cu_seqlens_k: Tensor, *, block_size: int, top_k: int, causal: bool, scale: float
                    ) -> tuple[Tensor, Tensor, Tensor]:
    p, sel = _plan_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, block_size, top_k, causal, scale)
    lse = triton_attn.row_lse(p, sel).contiguous()
    return triton_attn.attention_backward(p, sel, grad_out, out, lse)
