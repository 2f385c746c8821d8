"""The zoo tests' oracle, independent of moba_rewrite's rewriting: while the modules the test
names run, `torch.nn.functional.scaled_dot_product_attention` is replaced (module attribute,
as transformers, diffusers and `F.multi_head_attention_forward` look it up at call time) by
the dense `reference` MoBA on that call's own q, k, v, mask, causality and scale.

Float masks are read as transformers and diffusers build them (0 / a huge negative number).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from moba_rewrite.kernels import reference


@contextmanager
def sdpa_oracle(model: nn.Module, moba_names: set[str], *, block: int, top_k: int) -> Iterator[None]:
    """Run `model` inside the block with reference MoBA at the named modules' SDPA calls."""
    real = F.scaled_dot_product_attention
    active: list[bool] = []
    handles = []

    def pre(name: str):
        def hook(module, args):
            active.append(name in moba_names)
        return hook

    def post(module, args, output):
        active.pop()

    for name, m in model.named_modules():  # the innermost running module decides
        handles.append(m.register_forward_pre_hook(pre(name)))
        handles.append(m.register_forward_hook(post, always_call=True))

    def oracle(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if not (active and active[-1]):
            return real(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                        scale=scale, enable_gqa=enable_gqa)
        mask = attn_mask
        if mask is not None and mask.dtype != torch.bool:
            mask = mask > torch.finfo(mask.dtype).min / 2
        scale = scale if scale is not None else query.shape[-1] ** -0.5
        return reference.forward(query, key, value, block_size=block, top_k=top_k, causal=bool(is_causal),
                                 scale=scale, attn_mask=mask)

    F.scaled_dot_product_attention = oracle
    try:
        yield
    finally:
        F.scaled_dot_product_attention = real
        for h in handles:
            h.remove()
