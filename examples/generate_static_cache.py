"""Hugging Face `generate()` with a static KV cache on a MoBA-rewritten model.

    python examples/generate_static_cache.py

`generate(cache_implementation="static")` preallocates the KV cache (what `torch.compile`d
decoding and decode servers use). The rewritten model computes MoBA at the queries' real
positions on the filled part of the cache, and keeps the gate's block means beside each cache
layer (`layer.moba_block_means`), updating only the block that holds the new token each step.

Checks: the static cache, the default dynamic cache and a full recomputation of the whole
sequence without any cache (MoBA prefill at every step) generate the same tokens, with the same
logits, for a left-padded batch of two prompts.
"""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import moba_rewrite as mr

config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
torch.manual_seed(0)
model = LlamaForCausalLM(config).eval()
mr.rewrite(model, {"version": 1, "defaults": {"block_size": 16, "top_k": 3, "decode": "moba"}})

ids = torch.randint(3, 128, (2, 40))
mask = torch.ones_like(ids)
mask[1, :6] = 0  # the second prompt is left-padded
kw = dict(attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=0, output_logits=True,
          return_dict_in_generate=True)
with torch.no_grad():
    static = model.generate(ids, cache_implementation="static", **kw)
    dynamic = model.generate(ids, **kw)
    recomputed = model.generate(ids, use_cache=False, **kw)

for other in (dynamic, recomputed):
    assert torch.equal(static.sequences, other.sequences)
    torch.testing.assert_close(torch.stack(static.logits), torch.stack(other.logits), atol=1e-4, rtol=1e-4)
layer = static.cache.layers[0]
print(f"ok: {len(static.logits)} tokens per prompt, the same with a static cache of {layer.max_cache_len} slots, "
      f"a dynamic cache and no cache; block means beside layer 0: {list(layer.moba_block_means.means.shape)}")
