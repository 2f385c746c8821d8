"""Merging two attentions over disjoint key sets by their log-sum-exps.

`softmax(s_a ∪ s_b) @ v = (e^{lse_a} o_a + e^{lse_b} o_b) / (e^{lse_a} + e^{lse_b})`: ring attention
merges each ring step's part this way, and MoBA context parallelism its local blocks with the
fetched ones.
"""

from __future__ import annotations

import torch
from torch import Tensor


def merge_by_lse(out: Tensor, lse: Tensor, part_out: Tensor, part_lse: Tensor) -> tuple[Tensor, Tensor]:
    """(`[..., Dv]` output, `[...]` log-sum-exp) of the softmax over both key sets, in the wider of
    the two lse dtypes (fp32 or fp64). An lse of -inf means that part saw no key; a row that saw
    none in either part gets zeros and -inf."""
    ct = torch.promote_types(lse.dtype, part_lse.dtype)
    lse, part_lse = lse.to(ct), part_lse.to(ct)
    top = torch.maximum(lse, part_lse)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    a, b = torch.exp(lse - top), torch.exp(part_lse - top)
    total = a + b
    merged = (out.to(ct) * a[..., None] + part_out.to(ct) * b[..., None]) / total.clamp_min(torch.finfo(ct).tiny)[..., None]
    return merged, top + torch.log(total)
