"""Dense MoBA: the definition every other backend is checked against.

Readable first, fast never: it materialises the full `[B, Hq, Tq, Tk]` score matrix. It
follows SPEC section 2 step by step (blocks, positions, gate, candidates, selection,
attention) so that a reader can check it against the paper in one sitting.
"""

from __future__ import annotations

import torch
from torch import Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half types and fp32, fp64 for fp64: gate and softmax statistics precision."""
    return torch.promote_types(dtype, torch.float32)


def repeat_kv(x: Tensor, num_q_heads: int) -> Tensor:
    """Expand `[B, Hkv, T, D]` to `[B, Hq, T, D]` (query head h uses KV head h // group)."""
    group = num_q_heads // x.shape[1]
    return x if group == 1 else x.repeat_interleave(group, dim=1)


def visible_keys(attn_mask: Tensor | None, shape: tuple[int, int, int, int], device) -> Tensor:
    """Boolean `[B, Hq, Tq, Tk]` view: which keys the attention mask lets each query see."""
    if attn_mask is None:
        return torch.ones((1, 1, 1, 1), dtype=torch.bool, device=device).expand(shape)
    visible = attn_mask if attn_mask.dtype == torch.bool else attn_mask != float("-inf")
    return visible.expand(shape)


def query_positions(tq: int, tk: int, device) -> Tensor:
    """Absolute position of each query: the queries are the newest `tq` of `tk` tokens."""
    return torch.arange(tk - tq, tk, device=device)


def block_means(k: Tensor, block_size: int) -> Tensor:
    """Mean key of each block, `[B, H, n_blocks, D]` in compute precision (last block may be partial)."""
    b, h, tk, d = k.shape
    n_blocks = -(-tk // block_size)
    padded = k.new_zeros((b, h, n_blocks * block_size, d), dtype=compute_dtype(k.dtype))
    padded[:, :, :tk] = k
    counts = torch.clamp(tk - torch.arange(n_blocks, device=k.device) * block_size, max=block_size)
    return padded.view(b, h, n_blocks, block_size, d).sum(3) / counts[:, None].to(padded.dtype)


@torch.no_grad()
def block_selection(
    q: Tensor, k: Tensor, *, block_size: int, top_k: int, causal: bool, attn_mask: Tensor | None = None,
    means: Tensor | None = None,
) -> Tensor:
    """Boolean `[B, Hq, Tq, n_blocks]`: the key blocks each query attends, own block included.
    `means`: a cache of `block_means(k, block_size)` (`[B, Hkv, n_blocks, D]`) used for the gate."""
    b, hq, tq, _ = q.shape
    tk = k.shape[2]
    n_blocks = -(-tk // block_size)
    dev = q.device
    # Gate: s[i, j] = q_i . mean(K_j), per query head, in fp32.
    means = block_means(k, block_size) if means is None else means.to(compute_dtype(q.dtype))
    gate = q.to(compute_dtype(q.dtype)) @ repeat_kv(means, hq).transpose(-1, -2)
    own = query_positions(tq, tk, dev) // block_size  # [Tq]
    blocks = torch.arange(n_blocks, device=dev)
    # Candidates: earlier complete blocks (causal) or every other block (non-causal) ...
    candidate = blocks[None, :] < own[:, None] if causal else blocks[None, :] != own[:, None]
    candidate = candidate.expand(b, hq, tq, n_blocks)
    # ... that hold at least one key the mask lets this query see.
    if attn_mask is not None:
        visible = visible_keys(attn_mask, (b, hq, tq, tk), dev)
        pad = n_blocks * block_size - tk
        visible = torch.nn.functional.pad(visible, (0, pad), value=False)
        candidate = candidate & visible.reshape(b, hq, tq, n_blocks, block_size).any(-1)
    # ... and whose gate score is a number: a NaN (a NaN in the block's keys) never selects it.
    candidate = candidate & ~gate.isnan()
    selected = torch.zeros((b, hq, tq, n_blocks), dtype=torch.bool, device=dev)
    # Selection: the own block plus the top_k - 1 best candidates (fewer if fewer exist).
    n_pick = min(top_k - 1, n_blocks)
    if n_pick > 0:
        scores = gate.masked_fill(~candidate, float("-inf"))
        # exact ties go to the lower block index (a stable sort; topk's order among equals is unspecified)
        values, index = scores.sort(dim=-1, descending=True, stable=True)
        values, index = values[..., :n_pick], index[..., :n_pick]
        selected.scatter_(-1, index, values > float("-inf"))
    selected.scatter_(-1, own.expand(b, hq, tq)[..., None], True)
    return selected


def attention_probs(
    q: Tensor, k: Tensor, *, block_size: int, top_k: int, causal: bool, scale: float,
    attn_mask: Tensor | None, means: Tensor | None = None,
) -> Tensor:
    """Dense `[B, Hq, Tq, Tk]` attention weights of MoBA, in compute precision (zero rows allowed)."""
    b, hq, tq, _ = q.shape
    tk = k.shape[2]
    dev = q.device
    selected = block_selection(q, k, block_size=block_size, top_k=top_k, causal=causal, attn_mask=attn_mask,
                               means=means)
    key_block = torch.arange(tk, device=dev) // block_size
    allowed = selected[..., key_block]  # [B, Hq, Tq, Tk]
    if causal:
        allowed = allowed & (torch.arange(tk, device=dev)[None, :] <= query_positions(tq, tk, dev)[:, None])
    ct = compute_dtype(q.dtype)
    scores = (q.to(ct) @ repeat_kv(k, hq).to(ct).transpose(-1, -2)) * scale
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            allowed = allowed & attn_mask
        else:
            scores = scores + attn_mask.to(ct)
    scores = scores.masked_fill(~allowed, float("-inf"))
    # Softmax that gives zeros, not NaN, on rows with no visible key.
    row_max = scores.amax(-1, keepdim=True).detach()
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.exp(scores - row_max)
    denom = weights.sum(-1, keepdim=True)
    return weights / torch.where(denom > 0, denom, torch.ones_like(denom))


def forward(
    q: Tensor, k: Tensor, v: Tensor, *, block_size: int, top_k: int, causal: bool, scale: float,
    attn_mask: Tensor | None, key_block_means: Tensor | None = None,
) -> Tensor:
    """MoBA output `[B, Hq, Tq, Dv]` by dense masked softmax attention over the selected blocks (the
    gate and the scores use q and k only, so v may have a head dim of its own)."""
    probs = attention_probs(q, k, block_size=block_size, top_k=top_k, causal=causal, scale=scale,
                            attn_mask=attn_mask, means=key_block_means)
    return (probs @ repeat_kv(v, q.shape[1]).to(probs.dtype)).to(q.dtype)


def forward_kv_cache(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, key_block_means: Tensor, cache_position: Tensor, *,
    block_size: int, top_k: int, causal: bool, scale: float, attn_mask: Tensor | None,
) -> Tensor:
    """MoBA against a preallocated KV cache (SPEC section 2 item 9), by definition.

    The queries sit at `cache_position` (the newest tokens, consecutive), so the cache is filled
    up to `cache_position[-1] + 1` and every slot after that is unfilled: the result is `forward`
    on the filled prefix, with the gate on the first `ceil(filled / block_size)` cached means.
    """
    filled = int(cache_position[-1]) + 1
    n_blocks = -(-filled // block_size)
    if attn_mask is not None and attn_mask.shape[-1] > 1:
        attn_mask = attn_mask[..., :filled]
    return forward(q, k_cache[:, :, :filled], v_cache[:, :, :filled], block_size=block_size, top_k=top_k,
                   causal=causal, scale=scale, attn_mask=attn_mask,
                   key_block_means=key_block_means[:, :, :n_blocks])


def _sum_groups(x: Tensor, num_kv_heads: int) -> Tensor:
    """Fold `[B, Hq, T, D]` gradients back onto `[B, Hkv, T, D]` (sum over each GQA group)."""
    b, hq, t, d = x.shape
    return x.view(b, num_kv_heads, hq // num_kv_heads, t, d).sum(2)


def mask_gradient(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor, *, block_size: int, top_k: int,
    causal: bool, scale: float,
) -> Tensor:
    """Gradient of MoBA's output with respect to an additive float `attn_mask` (a learned bias folded
    into the mask, as Swin's relative position bias): the scores' gradient over the selected keys,
    summed to the mask's shape. Dense `[B, Hq, Tq, Tk]`, as the mask it answers is."""
    hq = q.shape[1]
    probs = attention_probs(q.detach(), k.detach(), block_size=block_size, top_k=top_k, causal=causal, scale=scale,
                            attn_mask=attn_mask.detach())
    ct = probs.dtype
    dp = grad_out.to(ct) @ repeat_kv(v.detach(), hq).to(ct).transpose(-1, -2)
    ds = probs * (dp - (dp * probs).sum(-1, keepdim=True))
    return ds.sum_to_size(attn_mask.shape).to(attn_mask.dtype)


def backward(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, *, block_size: int, top_k: int,
    causal: bool, scale: float, attn_mask: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Dense softmax-attention gradients over the selected blocks (selection has no gradient)."""
    hq, hkv = q.shape[1], k.shape[1]
    probs = attention_probs(q, k, block_size=block_size, top_k=top_k, causal=causal, scale=scale,
                            attn_mask=attn_mask)
    ct = probs.dtype
    do = grad_out.to(ct)
    kr, vr = repeat_kv(k, hq).to(ct), repeat_kv(v, hq).to(ct)
    dv = probs.transpose(-1, -2) @ do
    dp = do @ vr.transpose(-1, -2)
    ds = probs * (dp - (dp * probs).sum(-1, keepdim=True))
    dq = (ds @ kr) * scale
    dk = (ds.transpose(-1, -2) @ q.to(ct)) * scale
    return dq.to(q.dtype), _sum_groups(dk, hkv).to(k.dtype), _sum_groups(dv, hkv).to(v.dtype)
