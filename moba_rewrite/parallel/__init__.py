"""Context parallelism: MoBA on one sequence sharded across the ranks of a torch.distributed group.

- `attention`: `moba_attention_cp`, equal to `moba_attention` on the whole sequence (forward and
  backward): block means all-gathered, local gating against every block, then per selected remote
  block either its key/value tile travels or the few query rows that chose it do (`shipping`:
  attended on the owner, merged by log-sum-exp); gradients return to their owners;
- `decode`: `moba_decode_cp`, decoding against a KV cache sharded across ranks (local gates, a
  global top-k merge, attention on the owners, a log-sum-exp combine), and `sdpa_decode_cp`, its
  dense counterpart (optionally within a causal sliding window);
- `dense`: `sdpa_cp`, ordinary attention over the sharded sequence by an all-gather of K/V (for the
  dense sites of hybrid policies), and the pieces the Hugging Face integration reuses;
- `ring`: `ring_attention_cp`, the same attention by ring attention (K/V shards passed around the
  ring, never more than two held; what the Hugging Face integration runs at plain causal dense sites);
- `layout`: the `contiguous` and `zigzag` layouts, `shard_sequence` / `unshard_sequence`;
- `window`: the keys a causal sliding window needs from other ranks (one all-to-all, nothing more);
- `gate`, `exchange`, `shipping`: the global gate, the block exchange, shipped query rows; `groups`: group resolution, the
  all-ranks-agree check, one clear error for a dead rank; `traffic`: bytes sent, per step.

May import: `moba_rewrite.attention` and `moba_rewrite.kernels` (the single-device op and its
kernels), torch.distributed. Nothing above them (integrations, passes, api, cli).
"""

from moba_rewrite.parallel.attention import moba_attention_cp
from moba_rewrite.parallel.decode import moba_decode_cp, sdpa_decode_cp
from moba_rewrite.parallel.dense import sdpa_cp
from moba_rewrite.parallel.ring import ring_attention_cp
from moba_rewrite.parallel.groups import ContextParallelError
from moba_rewrite.parallel.layout import LAYOUTS, shard_sequence, unshard_sequence
from moba_rewrite.parallel.traffic import Traffic, record_traffic

__all__ = ["moba_attention_cp", "moba_decode_cp", "sdpa_decode_cp", "sdpa_cp", "ring_attention_cp", "shard_sequence", "unshard_sequence", "ContextParallelError", "LAYOUTS",
           "record_traffic", "Traffic"]
