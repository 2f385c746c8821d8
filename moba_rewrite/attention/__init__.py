"""The MoBA op: what users call and what graphs hold.

- `functional`: `moba_attention` (SDPA layout), argument validation and scale resolution;
- `op`: the `moba::attention*` torch.library ops (schema, fake impl, autograd, dispatch to a
  kernel backend) that eager code, `torch.compile`, `torch.export` and ONNX all see;
- `varlen`: `moba_attention_varlen` on packed variable-length batches (`moba::attention_varlen`);
- `block_means`: `key_block_means`, the gate's per-block mean keys kept beside a KV cache.

May import: `moba_rewrite.kernels` (the backends). Nothing above it (passes, policy, api, cli).
"""

from moba_rewrite.attention.functional import moba_attention

__all__ = ["moba_attention"]
