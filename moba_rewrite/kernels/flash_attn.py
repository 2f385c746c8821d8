"""`flash_attn` backend: the MoBA paper's own algorithm (MoonshotAI/MoBA `moba_efficient`) on
flash-attn's variable-length kernels. Import-guarded: available only with flash-attn 2.x and CUDA.

Forward, per packed batch:
  1. Selection: the fused Triton gate (`triton_gate`), so the full gate is never stored.
  2. Own block: one causal (bottom-right aligned) varlen call whose segments are, per sequence,
     the queries of each block against that block's keys.
  3. History blocks: one non-causal varlen call whose segments are (query head, block) pairs:
     the rows that picked that block against its keys (heads flattened, one head per call).
  4. Merge the two by their log-sum-exp.
Backward runs flash-attn's varlen backward on both calls with the *merged* output and LSE,
which yields the exact gradients of the merged softmax (as the paper's code does).
Attention masks are not supported here (`supports()` says so; use `triton` or `torch`).
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor

try:
    from flash_attn import flash_attn_varlen_func
    from flash_attn.flash_attn_interface import _flash_attn_varlen_backward

    _IMPORT_ERROR: str | None = None
except ImportError as exc:
    _IMPORT_ERROR = f"flash-attn 2.x is not installed ({exc})"


def is_available() -> bool:
    return _IMPORT_ERROR is None and torch.cuda.is_available()


def unavailable_reason() -> str:
    return _IMPORT_ERROR or ("" if torch.cuda.is_available() else "flash-attn needs a CUDA device")


def unsupported_reason(q: Tensor, k: Tensor, attn_mask: Tensor | None = None) -> str | None:
    if not is_available():
        return unavailable_reason()
    if attn_mask is not None:
        return "attention masks (flash-attn's varlen kernels take none; use backend 'triton' or 'torch')"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {q.dtype} (flash-attn runs float16 and bfloat16)"
    if q.device.type != "cuda":
        return f"{q.device.type} tensors"
    return None


def supports(q: Tensor, k: Tensor, attn_mask: Tensor | None = None) -> bool:
    return unsupported_reason(q, k, attn_mask) is None


def _check(q, k, attn_mask=None, v=None) -> None:
    reason = unsupported_reason(q, k, attn_mask)
    if reason is None and v is not None and v.shape[-1] != q.shape[-1]:
        reason = (f"a value head dim ({v.shape[-1]}) different from the query/key head dim ({q.shape[-1]}) "
                  f"(flash-attn 2's kernels need equal head dims; use backend 'triton' or 'torch')")
    if reason is not None:
        raise NotImplementedError(f"MoBA flash_attn backend does not support {reason}")


def _fa_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, causal):
    """flash-attn's varlen backward, called by keyword (its signature changed across 2.x releases)."""
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    args = dict(dout=dout, q=q, k=k, v=v, out=out, softmax_lse=lse, dq=dq, dk=dk, dv=dv, cu_seqlens_q=cu_q,
                cu_seqlens_k=cu_k, max_seqlen_q=max_q, max_seqlen_k=max_k, dropout_p=0.0, softmax_scale=scale,
                causal=causal, window_size=(-1, -1), window_size_left=-1, window_size_right=-1, softcap=0.0,
                alibi_slopes=None, deterministic=False, rng_state=None)
    # flash-attn >= 2.7 wraps it in torch.library.custom_op: read the wrapped function's signature.
    params = inspect.signature(getattr(_flash_attn_varlen_backward, "_init_fn", _flash_attn_varlen_backward)).parameters
    _flash_attn_varlen_backward(**{name: value for name, value in args.items() if name in params})
    return dq, dk, dv


def _cu(lengths: Tensor) -> Tensor:
    return torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)


class _Plan:
    """Index bookkeeping of the two flash-attn calls for one packed problem."""

    def __init__(self, q, k, cu_q, cu_k, block_size, top_k, causal):
        from moba_rewrite.kernels.triton import gate as triton_gate
        from moba_rewrite.kernels.triton.layout import varlen_problem

        dev = q.device
        p = varlen_problem(q, k, k, cu_q, cu_k, block_size=block_size, top_k=top_k, causal=causal, scale=1.0)
        self.hq, self.hkv, self.total_q = q.shape[1], k.shape[1], q.shape[0]
        g = p.group
        bs = block_size
        q_len, k_len = p.q_len.long(), p.k_len.long()
        # Per packed query row: its sequence, position and own block.
        seq_of_q = torch.repeat_interleave(torch.arange(p.batch, device=dev), q_len)
        t = torch.arange(int(q_len.sum()), device=dev) - _cu(q_len)[:-1].long()[seq_of_q]
        q_rows = cu_q[:-1].long()[seq_of_q] + t
        own = (k_len[seq_of_q] - q_len[seq_of_q] + t) // bs
        # 2. Own block: segments = runs of queries sharing (sequence, own block); keys = that block.
        seg_key = seq_of_q * (p.n_blocks + 1) + own
        seg, seg_len = torch.unique_consecutive(seg_key, return_counts=True)
        seg_seq, seg_blk = seg // (p.n_blocks + 1), seg % (p.n_blocks + 1)
        k_lo = cu_k[:-1].long()[seg_seq] + seg_blk * bs
        k_cnt = torch.minimum(k_len[seg_seq] - seg_blk * bs, torch.full_like(seg_blk, bs))
        self.self_q_rows = q_rows
        self.self_k_rows = torch.repeat_interleave(k_lo, k_cnt) + (
            torch.arange(int(k_cnt.sum()), device=dev) - _cu(k_cnt)[:-1].long().repeat_interleave(k_cnt))
        self.self_cu_q, self.self_cu_k = _cu(seg_len), _cu(k_cnt)
        self.self_max_q, self.self_max_k = int(seg_len.max()), int(k_cnt.max())
        # 3. History: entries (query head, query row, picked block), grouped by (head, sequence, block).
        sel = triton_gate.select_blocks(p)
        picks = sel.picks.view(p.batch, self.hkv, sel.row_pad, -1)  # rows R = t * G + gi
        r = (t * g)[:, None] + torch.arange(g, device=dev)[None, :]  # [Tq_total, G]
        kv = torch.arange(self.hkv, device=dev)
        pk = picks[seq_of_q[:, None, None], kv[None, :, None], r[:, None, :]]  # [Tq_total, Hkv, G, KP]
        pk = pk.reshape(q_rows.numel(), self.hq, -1)
        row_i, head_i, slot_i = torch.nonzero(pk >= 0, as_tuple=True)
        blk = pk[row_i, head_i, slot_i].long()
        seqs = seq_of_q[row_i]
        order = torch.argsort(((head_i * p.batch + seqs) * p.n_blocks + blk) * self.total_q + row_i)
        row_i, head_i, blk, seqs = row_i[order], head_i[order], blk[order], seqs[order]
        self.n_hist = row_i.numel()
        self.n_rows = q_rows.numel()
        # hist_pos indexes the own-block call's row order; hist_q_rows the packed tensors.
        self.hist_pos, self.hist_q_rows, self.hist_heads = row_i, q_rows[row_i], head_i
        if self.n_hist:
            hseg, hlen = torch.unique_consecutive((head_i * p.batch + seqs) * p.n_blocks + blk, return_counts=True)
            h_head, h_seq, h_blk = hseg // (p.batch * p.n_blocks), (hseg // p.n_blocks) % p.batch, hseg % p.n_blocks
            hk_cnt = torch.minimum(k_len[h_seq] - h_blk * bs, torch.full_like(h_blk, bs))
            hk_lo = cu_k[:-1].long()[h_seq] + h_blk * bs
            self.hist_k_rows = torch.repeat_interleave(hk_lo, hk_cnt) + (
                torch.arange(int(hk_cnt.sum()), device=dev) - _cu(hk_cnt)[:-1].long().repeat_interleave(hk_cnt))
            self.hist_k_heads = torch.repeat_interleave(h_head // g, hk_cnt)
            self.hist_cu_q, self.hist_cu_k = _cu(hlen), _cu(hk_cnt)
            self.hist_max_q, self.hist_max_k = int(hlen.max()), int(hk_cnt.max())
        self.causal = causal


def _forward_parts(plan: _Plan, q, k, v, scale):
    """Merged output and natural-log LSE `[Hq, total_q]` plus the history call's inputs."""
    qs = q[plan.self_q_rows]
    o_self, lse_self, _ = flash_attn_varlen_func(
        qs, k[plan.self_k_rows], v[plan.self_k_rows], plan.self_cu_q, plan.self_cu_k, plan.self_max_q,
        plan.self_max_k, dropout_p=0.0, softmax_scale=scale, causal=plan.causal, return_attn_probs=True)
    lse = lse_self.float()  # [Hq, n_rows], rows in self_q_rows order
    out = o_self.float()
    if plan.n_hist:
        qh = q[plan.hist_q_rows, plan.hist_heads][:, None]
        kh = k[plan.hist_k_rows, plan.hist_k_heads][:, None]
        vh = v[plan.hist_k_rows, plan.hist_k_heads][:, None]
        o_h, lse_h, _ = flash_attn_varlen_func(
            qh, kh, vh, plan.hist_cu_q, plan.hist_cu_k, plan.hist_max_q, plan.hist_max_k, dropout_p=0.0,
            softmax_scale=scale, causal=False, return_attn_probs=True)
        lse_h = lse_h[0].float()
        flat = plan.hist_heads * plan.n_rows + plan.hist_pos  # index into lse.view(-1)
        m = lse.reshape(-1).clone().scatter_reduce_(0, flat, lse_h, "amax")
        total = torch.exp(lse.reshape(-1) - m).index_add_(0, flat, torch.exp(lse_h - m[flat]))
        new_lse = (m + torch.log(total)).view_as(lse)
        out = out * torch.exp(lse - new_lse).T[..., None]
        contrib = o_h[:, 0].float() * torch.exp(lse_h - new_lse.reshape(-1)[flat])[:, None]
        out.index_put_((plan.hist_pos, plan.hist_heads), contrib, accumulate=True)
        lse = new_lse
    return out.to(q.dtype), lse


def forward_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, *, block_size, top_k, causal, scale) -> Tensor:
    _check(q, k, v=v)
    plan = _Plan(q, k, cu_seqlens_q, cu_seqlens_k, block_size, top_k, causal)
    out = torch.zeros_like(q)
    o, _ = _forward_parts(plan, q, k, v, scale)
    out[plan.self_q_rows] = o
    return out


def backward_varlen(grad_out, q, k, v, out, cu_seqlens_q, cu_seqlens_k, *, block_size, top_k, causal, scale):
    _check(q, k, v=v)
    plan = _Plan(q, k, cu_seqlens_q, cu_seqlens_k, block_size, top_k, causal)
    _, lse = _forward_parts(plan, q, k, v, scale)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    rows = plan.self_q_rows
    ks = plan.self_k_rows
    g_self = _fa_backward(grad_out[rows].contiguous(), q[rows].contiguous(), k[ks].contiguous(),
                          v[ks].contiguous(), out[rows].contiguous(), lse.contiguous(), plan.self_cu_q,
                          plan.self_cu_k, plan.self_max_q, plan.self_max_k, scale, causal)
    dq.index_add_(0, rows, g_self[0])
    dk.index_add_(0, ks, g_self[1])
    dv.index_add_(0, ks, g_self[2])
    if plan.n_hist:
        hr, hh, kr, kh = plan.hist_q_rows, plan.hist_heads, plan.hist_k_rows, plan.hist_k_heads
        lse_h = lse[hh, plan.hist_pos][None].contiguous()
        g_h = _fa_backward(grad_out[hr, hh][:, None].contiguous(), q[hr, hh][:, None].contiguous(),
                           k[kr, kh][:, None].contiguous(), v[kr, kh][:, None].contiguous(),
                           out[hr, hh][:, None].contiguous(), lse_h, plan.hist_cu_q, plan.hist_cu_k,
                           plan.hist_max_q, plan.hist_max_k, scale, False)
        dq.index_put_((hr, hh), g_h[0][:, 0], accumulate=True)
        dk.index_put_((kr, kh), g_h[1][:, 0], accumulate=True)
        dv.index_put_((kr, kh), g_h[2][:, 0], accumulate=True)
    return dq, dk, dv


def _to_varlen(q, k, v):
    b, hq, tq, d = q.shape
    tk = k.shape[2]
    cu_q = torch.arange(0, (b + 1) * tq, tq, dtype=torch.int32, device=q.device)
    cu_k = torch.arange(0, (b + 1) * tk, tk, dtype=torch.int32, device=q.device)
    flat = lambda x: x.transpose(1, 2).reshape(-1, x.shape[1], x.shape[3])  # noqa: E731
    return flat(q), flat(k), flat(v), cu_q, cu_k


def _from_varlen(x, like):
    b, h, t, d = like.shape
    return x.view(b, t, h, d).transpose(1, 2)


def forward(q, k, v, *, block_size, top_k, causal, scale, attn_mask) -> Tensor:
    _check(q, k, attn_mask, v)
    qv, kv, vv, cu_q, cu_k = _to_varlen(q, k, v)
    out = forward_varlen(qv, kv, vv, cu_q, cu_k, block_size=block_size, top_k=top_k, causal=causal, scale=scale)
    return _from_varlen(out, q)


def backward(grad_out, q, k, v, out, *, block_size, top_k, causal, scale, attn_mask):
    _check(q, k, attn_mask, v)
    qv, kv, vv, cu_q, cu_k = _to_varlen(q, k, v)
    go = grad_out.transpose(1, 2).reshape(qv.shape)
    ov = out.transpose(1, 2).reshape(qv.shape)
    dq, dk, dv = backward_varlen(go, qv, kv, vv, ov, cu_q, cu_k, block_size=block_size, top_k=top_k,
                                 causal=causal, scale=scale)
    return _from_varlen(dq, q), _from_varlen(dk, k), _from_varlen(dv, v)
