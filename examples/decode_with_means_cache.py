"""Decode token by token with MoBA against a preallocated KV cache, block means kept beside it.

    python examples/decode_with_means_cache.py

This is the loop a decode server or an exported generation program runs: the KV cache is
allocated once (`L` slots, static addresses), each step writes the new token's key and value at
its position, `mr.update_key_block_means_` recomputes the mean key of the one block that changed,
and `mr.moba_attention_kv_cache` attends with the queries at their real positions
(`cache_position`), gating on the cached means and reading only the selected blocks. No step reads
all of K, concatenates, or reads a position back to the host (the same code runs in a CUDA graph).

Checks: every step equals MoBA on the same tokens without the cache (`moba_attention` on the
filled prefix, dense reference backend).
"""

import torch

import moba_rewrite as mr

torch.manual_seed(0)
batch, heads, kv_heads, dim, block, top_k = 1, 8, 2, 32, 16, 3
prompt, steps, slots = 50, 30, 96

# The preallocated cache (unfilled slots are whatever the buffer holds) and its block means.
k_cache = torch.zeros(batch, kv_heads, slots, dim)
v_cache = torch.zeros(batch, kv_heads, slots, dim)
means = torch.zeros(batch, kv_heads, -(-slots // block), dim)

# Prefill: the prompt's keys and values (a model would project them), written at positions 0..49.
position = torch.arange(prompt)
k_cache.index_copy_(2, position, torch.randn(batch, kv_heads, prompt, dim))
v_cache.index_copy_(2, position, torch.randn(batch, kv_heads, prompt, dim))
mr.update_key_block_means_(means, k_cache, position, block)

for step in range(steps):
    position = torch.tensor([prompt + step])  # cache_position of the new token
    q = torch.randn(batch, heads, 1, dim)
    k_cache.index_copy_(2, position, torch.randn(batch, kv_heads, 1, dim))
    v_cache.index_copy_(2, position, torch.randn(batch, kv_heads, 1, dim))
    mr.update_key_block_means_(means, k_cache, position, block)  # only the block holding the new token
    out = mr.moba_attention_kv_cache(q, k_cache, v_cache, means, position, block_size=block, top_k=top_k,
                                     enable_gqa=True)
    filled = prompt + step + 1
    want = mr.moba_attention(q, k_cache[:, :, :filled], v_cache[:, :, :filled], block_size=block, top_k=top_k,
                             enable_gqa=True, backend="reference")
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)

print(f"ok: {steps} decode steps against a {slots}-slot cache (filled to {filled}); each equals MoBA on the "
      f"filled prefix without the cache")
