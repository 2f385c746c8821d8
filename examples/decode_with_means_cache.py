"""Decode token by token with MoBA, keeping the gate's block means beside the KV cache.

    python examples/decode_with_means_cache.py

MoBA's gate scores each query against the mean key of every block. Recomputing those means
reads all of K at every step (at a 128K cache that costs more than the attention itself on a
GPU); `mr.key_block_means(k, block_size, previous=means)` updates them in O(block_size) per
step instead, and `moba_attention(..., key_block_means=means)` uses them.

Checks: every decode step matches the same step without the cache, and the last step matches
the dense MoBA reference over the whole sequence.
"""

import torch

import moba_rewrite as mr

torch.manual_seed(0)
batch, heads, kv_heads, dim, block, top_k = 1, 8, 2, 32, 16, 3
prompt, steps = 50, 30

# A KV cache (here: random keys/values for the prompt) and the means of its blocks.
k_cache = torch.randn(batch, kv_heads, prompt, dim)
v_cache = torch.randn(batch, kv_heads, prompt, dim)
means = mr.key_block_means(k_cache, block)

for step in range(steps):
    q = torch.randn(batch, heads, 1, dim)  # the new token's query (a model would project it)
    k_new, v_new = torch.randn(batch, kv_heads, 1, dim), torch.randn(batch, kv_heads, 1, dim)
    k_cache, v_cache = torch.cat([k_cache, k_new], 2), torch.cat([v_cache, v_new], 2)
    means = mr.key_block_means(k_cache, block, previous=means)  # only the last block changes
    out = mr.moba_attention(q, k_cache, v_cache, block_size=block, top_k=top_k, enable_gqa=True,
                            key_block_means=means)
    plain = mr.moba_attention(q, k_cache, v_cache, block_size=block, top_k=top_k, enable_gqa=True)
    torch.testing.assert_close(out, plain)

want = mr.moba_attention(q, k_cache, v_cache, block_size=block, top_k=top_k, enable_gqa=True, backend="reference")
torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
print(f"ok: {steps} decode steps with a {k_cache.shape[2]}-token cache; the cached means give the same "
      f"output as recomputing them, and the dense reference agrees")
