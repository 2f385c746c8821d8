"""Generation with the KV cache sharded across ranks: a long prompt prefilled with context
parallelism, then decoded without ever gathering the cache.

    tokens = generate(model, input_ids, group, max_new_tokens=64)      # same call on every rank

Every rank of `group` holds a contiguous slice of the cache: rank r the positions
`[r * S, (r + 1) * S)`, `S` the per-rank capacity (prompt plus new tokens over the ranks, rounded
up to whole blocks of every MoBA site). The prompt, padded at its end to `W * S` tokens, is
prefilled under `hf_cp.context_parallel` (each rank runs its slice; every site attends the whole
prompt); each layer's slice of keys and values stays in a `ShardedKVCache` on its rank. Each decode
step runs the new token through the model on every rank (the same input everywhere); its keys and
values are written only into the cache of the rank that owns its position, and every attention
MoBA site calls `parallel.moba_decode_cp`: each rank gates its own blocks, a global top-k merge,
attention on the owners, a log-sum-exp combine. Dense sites, `decode: dense` policies and
sliding-window layers (which `generate()` decodes densely in their window: their cache drops the
keys MoBA's blocks need) call `parallel.sdpa_decode_cp`: each rank attends its filled slots inside
the window, the same combine. Rank 0
picks the next token, greedily (the argmax) or by sampling with transformers' own temperature /
top-k / top-p warpers and `torch.multinomial` (rank 0's random generator), and broadcasts it, so
every rank feeds the same token. The result equals single-process `model.generate(input_ids, ...)`
of the same rewritten model, greedy or sampled from the same seed (tested on 2 and 4 gloo ranks).

Cost per step and rank: the gate and the attention read the rank's own slice (`S` keys per layer);
the bytes sent are independent of the context length (candidates and partial outputs). A padded
batch (`attention_mask=`) keeps its padding mask per slice beside the cache and decodes with
transformers' own positions. Beam search (`num_beams` > 1) runs transformers' own `generate()`
loop over the sharded cache (`_transformers_loop`), and so do greedy and sampled decoding of a model
whose generation config processes the logits (BART's forced end token, repetition penalties, ...:
`hf_generation_config.logits_processing`), so that they get `generate()`'s processing.
Hybrid stacks' recurrent layers (gated delta nets, Mamba, short convolutions) keep their small
states replicated on every rank (`ReplicatedLinearLayer`; `ShardedHybridLayer` where a layer holds
attention too): the sharded prefill stores the states after the prompt's real tokens
(`hf_cp_linear`), and every rank runs each new token through those layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer

try:  # transformers 5's linear-attention cache layers (before them, no model has layers hf_cp_linear shards)
    from transformers.cache_utils import DYNAMIC_LAYER_TYPE_MAPPING, LinearAttentionLayer
except ImportError:  # pragma: no cover
    DYNAMIC_LAYER_TYPE_MAPPING, LinearAttentionLayer = {}, object

from moba_rewrite.attention.block_means import refresh_key_block_means_
from moba_rewrite.integrations import hf, hf_cp_linear, hf_masks
from moba_rewrite.integrations.hf_cp import alignment, check_rewritten, context_parallel, layer_types, left_padding
from moba_rewrite.integrations.hf_generation_config import logits_processing
from moba_rewrite.parallel.groups import collective, resolve_group

_WHO = "hf_cp.generate"


@dataclass
class CacheSlice:
    """What every layer's slice shares: this rank's slots and the cache's fill (global tokens)."""

    capacity: int  # S: slots per rank
    rank: int
    world: int
    length: int = 0  # tokens in the whole cache before the current forward
    key_mask: Tensor | None = None  # a padded batch: [B, S] bool, which of this rank's slots are real tokens
    left_padding: Tensor | None = None  # a padded batch: [B] padding tokens before each row's first real one
    prefilling: bool = False  # the sharded prefill is writing whole slices


class ShardedCacheLayer(DynamicLayer):
    """One layer's slice of a contiguously sharded KV cache: `keys` / `values` `[B, Hkv, S, D]`, this
    rank's positions `[rank * S, (rank + 1) * S)`, filled up to the cache's global length."""

    def __init__(self, shared: CacheSlice) -> None:
        super().__init__()
        self.shared = shared
        self._means: dict[int, tuple[Tensor, int]] = {}  # block size -> (means, keys they cover)

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        s = self.shared
        if not self.is_initialized and s.prefilling:  # the prefill: this rank's whole slice
            if key_states.shape[2] != s.capacity:
                raise ValueError(f"{_WHO}: the prefill wrote {key_states.shape[2]} tokens into a cache slice of "
                                 f"{s.capacity} slots")
            self.device, self.is_initialized = key_states.device, True
            self.keys, self.values = key_states.contiguous(), value_states.contiguous()
            return self.keys, self.values
        if not self.is_initialized:  # nothing prefilled (a one-token prompt): an empty slice
            b, h, _, d = key_states.shape
            self.device, self.is_initialized = key_states.device, True
            self.keys = key_states.new_zeros((b, h, s.capacity, d))
            self.values = value_states.new_zeros((b, value_states.shape[1], s.capacity, value_states.shape[3]))
        start = s.length - s.rank * s.capacity  # slot of the first new token on this rank (may be outside)
        t = key_states.shape[2]
        lo, hi = max(start, 0), min(start + t, s.capacity)
        if lo < hi:
            self.keys[:, :, lo:hi] = key_states[:, :, lo - start:hi - start]
            self.values[:, :, lo:hi] = value_states[:, :, lo - start:hi - start]
        return self.keys, self.values

    def block_means(self, block_size: int, filled: int) -> Tensor:
        """Means of this slice's blocks `[B, Hkv, S / block_size, D]` (fp32; fp64 for fp64 keys),
        current for its first `filled` keys: only blocks written since the last call are recomputed
        (a decode step: one block), so the gate of `moba_decode_cp` reads no keys."""
        held = self._means.get(block_size)
        if held is None or held[1] > filled:
            dtype = torch.promote_types(self.keys.dtype, torch.float32)
            means = self.keys.new_zeros((*self.keys.shape[:2], self.keys.shape[2] // block_size, self.keys.shape[3]),
                                        dtype=dtype)
            done = 0
        else:
            means, done = held
        if filled > done:
            refresh_key_block_means_(means, self.keys, done, filled, block_size)
        self._means[block_size] = (means, filled)
        return means

    def get_seq_length(self, *args) -> int:
        return self.shared.length

    # transformers' beam search moves, repeats and selects batch rows: the kept means move with them
    # (a layer without attention, an MLP-only layer of Nemotron-H, holds nothing to move)
    def reorder_cache(self, beam_idx: Tensor) -> None:
        if self.is_initialized:
            DynamicLayer.reorder_cache(self, beam_idx)
        self._means = {bs: (m.index_select(0, beam_idx.to(m.device)), n) for bs, (m, n) in self._means.items()}

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            DynamicLayer.batch_repeat_interleave(self, repeats)
        self._means = {bs: (m.repeat_interleave(repeats, dim=0), n) for bs, (m, n) in self._means.items()}

    def batch_select_indices(self, indices: Tensor) -> None:
        if self.is_initialized:
            DynamicLayer.batch_select_indices(self, indices)
        self._means = {bs: (m[indices], n) for bs, (m, n) in self._means.items()}

    def get_mask_sizes(self, query: int | Tensor, *args) -> tuple[int, int]:
        tq = query if isinstance(query, int) else int(query.shape[0])
        return self.shared.length + tq, 0

    def get_max_length(self) -> int:
        return self.shared.capacity * self.shared.world


class ReplicatedLinearLayer(LinearAttentionLayer):
    """A recurrent layer's (delta net's, Mamba mixer's, short convolution's) convolution and recurrent states, the
    same on every rank: the sharded prefill stores the states after the prompt (`hf_cp_linear`),
    and every rank runs each decode step's new tokens through the layer."""

    def __init__(self, shared: CacheSlice) -> None:
        super().__init__()
        self.shared = shared

    def get_seq_length(self, *args) -> int:
        return self.shared.length

    def _each_state(self, change) -> None:
        for i in range(self.number_of_states):
            if self.is_conv_states_initialized[i]:
                self.conv_states[i] = change(self.conv_states[i])
            if self.is_recurrent_states_initialized[i]:
                self.recurrent_states[i] = change(self.recurrent_states[i])

    # transformers' beam search repeats and selects batch rows (it moves them with reorder_cache)
    def batch_repeat_interleave(self, repeats: int) -> None:
        self._each_state(lambda x: x.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: Tensor) -> None:
        self._each_state(lambda x: x[indices])


class ShardedHybridLayer(ReplicatedLinearLayer, ShardedCacheLayer):
    """A layer that runs attention and a recurrent mixer side by side (Falcon-H1, Zamba2's hybrid
    layers): its slice of the sharded KV cache and the replicated recurrent states (as
    transformers' `LinearAttentionAndFullAttentionLayer` holds both)."""

    def __init__(self, shared: CacheSlice) -> None:
        ShardedCacheLayer.__init__(self, shared)
        LinearAttentionLayer.__init__(self)

    def reorder_cache(self, beam_idx: Tensor) -> None:
        ShardedCacheLayer.reorder_cache(self, beam_idx)
        LinearAttentionLayer.reorder_cache(self, beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        ShardedCacheLayer.batch_repeat_interleave(self, repeats)
        ReplicatedLinearLayer.batch_repeat_interleave(self, repeats)

    def batch_select_indices(self, indices: Tensor) -> None:
        ShardedCacheLayer.batch_select_indices(self, indices)
        ReplicatedLinearLayer.batch_select_indices(self, indices)


class ShardedKVCache(Cache):
    """A transformers `Cache` of `ShardedCacheLayer`s sharing one `CacheSlice` (and, for a hybrid
    stack's recurrent layers, `ReplicatedLinearLayer`s, or `ShardedHybridLayer`s where a layer holds
    attention too)."""

    replicates_linear_states = True  # what hf_cp_linear's prefill looks for

    def __init__(self, num_layers: int, shared: CacheSlice, linear_layers: frozenset[int] = frozenset(),
                 hybrid_layers: frozenset[int] = frozenset()) -> None:
        super().__init__(layers=[ShardedHybridLayer(shared) if i in hybrid_layers else
                                 ReplicatedLinearLayer(shared) if i in linear_layers else ShardedCacheLayer(shared)
                                 for i in range(num_layers)])
        self.shared = shared

    def reorder_cache(self, beam_idx: Tensor) -> None:
        super().reorder_cache(beam_idx)
        if self.shared.key_mask is not None:
            self.shared.key_mask = self.shared.key_mask.index_select(0, beam_idx.to(self.shared.key_mask.device))
            self.shared.left_padding = self.shared.left_padding.index_select(
                0, beam_idx.to(self.shared.key_mask.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.shared.key_mask is not None:
            self.shared.key_mask = self.shared.key_mask.repeat_interleave(repeats, dim=0)
            self.shared.left_padding = self.shared.left_padding.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: Tensor) -> None:
        super().batch_select_indices(indices)
        if self.shared.key_mask is not None:
            self.shared.key_mask = self.shared.key_mask[indices]
            self.shared.left_padding = self.shared.left_padding[indices]


def _padded_positions(model: nn.Module, input_ids: Tensor, real: Tensor) -> Tensor:
    """`generate()`'s position ids for a padded batch `[B, T]`, from transformers' own helper where it
    has one: the padding tokens' positions differ between versions (0 or 1), and MoBA's gate sees
    their keys (a block's mean is over all its keys), so they must be the ones `generate()` uses."""
    helper = getattr(model, "_prepare_position_ids_for_generation", None)
    if helper is not None:
        try:
            return helper(input_ids, {"attention_mask": real.long()}).expand(real.shape[0], -1)
        except Exception:  # noqa: BLE001 - a private helper whose signature may change: the rule below
            pass
    return (real.long().cumsum(-1) - 1).masked_fill(~real, 1)  # transformers 4.x's rule


def _cache_keyword(model: nn.Module) -> str:
    return "cache" if hf_masks.takes_argument(model, "cache") else "past_key_values"


def _num_layers(model: nn.Module) -> int:
    config = model.config
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    return int(text.num_hidden_layers)


def _sampler(do_sample: bool, temperature: float, top_k: int | None, top_p: float | None):
    """The next-token rule: argmax, or transformers' warpers (in `generate()`'s order) then a draw."""
    if not do_sample:
        return lambda logits: logits.argmax(-1)
    from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)

    warpers = LogitsProcessorList()
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p is not None and top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))

    def draw(logits: Tensor, ids: Tensor) -> Tensor:
        probs = torch.softmax(warpers(ids, logits), dim=-1)
        return torch.multinomial(probs, num_samples=1).squeeze(1)
    return draw


def _check_arguments(input_ids, attention_mask, max_new_tokens, do_sample, temperature, top_k, top_p
                     ) -> Tensor | None:
    """One-line errors for bad arguments; returns the padding mask as bool (None when there is no padding)."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"{_WHO}: max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if do_sample and not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"{_WHO}: temperature must be positive, got {temperature!r}")
    if do_sample and top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"{_WHO}: top_p must be in (0, 1], got {top_p!r}")
    if do_sample and top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
        raise ValueError(f"{_WHO}: top_k must be a non-negative integer, got {top_k!r}")
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
        raise ValueError(f"{_WHO}: input_ids must be integer token ids [B, T], got "
                         f"{tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__}")
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, Tensor) or attention_mask.is_floating_point() or \
            attention_mask.shape != input_ids.shape:
        got = (f"{tuple(attention_mask.shape)} {attention_mask.dtype}" if isinstance(attention_mask, Tensor)
               else type(attention_mask).__name__)
        raise ValueError(f"{_WHO}: attention_mask must be the prompts' 0/1 padding mask {list(input_ids.shape)}, "
                         f"got {got}")
    real = attention_mask.to(device=input_ids.device, dtype=torch.bool)
    return None if bool(real.all()) else real


def _place_prompt(model: nn.Module, input_ids: Tensor, real: Tensor | None, shared: CacheSlice
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """This rank's slice of the prompt, padded at its end to `W * S` tokens: (token ids, position ids,
    each row's next position, the slice's padding mask or None). Records each row's left padding in
    `shared` (chunked attention counts its chunks from the first real token)."""
    b, t = input_ids.shape
    slots, dev = shared.world * shared.capacity, input_ids.device
    mine = slice(shared.rank * shared.capacity, (shared.rank + 1) * shared.capacity)
    ids = input_ids.new_zeros((b, slots))
    ids[:, :t] = input_ids
    if real is None:
        positions = torch.arange(slots, device=dev).expand(b, -1)
        return ids[:, mine], positions[:, mine], torch.full((b,), t, device=dev), None
    # transformers' positions for a padded batch: counted over the real tokens
    positions = torch.zeros((b, slots), dtype=torch.long, device=dev)
    positions[:, :t] = _padded_positions(model, input_ids, real)
    whole = torch.zeros((b, slots), dtype=torch.bool, device=dev)
    whole[:, :t] = real
    shared.left_padding = left_padding(real)
    return ids[:, mine], positions[:, mine], real.long().sum(-1), whole[:, mine].clone()


@torch.no_grad()
def generate(model: nn.Module, input_ids: Tensor, group=None, *, max_new_tokens: int,
             attention_mask: Tensor | None = None, eos_token_id: int | list[int] | None = None,
             pad_token_id: int | None = None,
             do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             exchange: str = "auto", return_logits: bool = False, num_beams: int = 1, length_penalty: float = 1.0,
             early_stopping: bool | str = False, num_return_sequences: int = 1) -> Tensor | tuple[Tensor, Tensor]:
    """Decoding of a rewritten causal LM with its KV cache sharded across `group` (see the module
    docstring). `input_ids` `[B, T]`: the same prompts on every rank; `attention_mask` `[B, T]`
    (0 / 1) for a padded batch (left padding, as for `generate()`: positions are counted over the
    real tokens, as transformers does, and padding keys are hidden at every step). Returns
    `[B, T + new]` token ids on every rank (and, with `return_logits`, the `[B, new, vocab]` logits
    each token was chosen from). `eos_token_id` (an id or a list; default: the generation config's,
    as `generate()` takes it): a row that produced one continues with `pad_token_id` (default: the
    generation config's, else the first eos id) and decoding stops once every row has; `do_sample`, `temperature`,
    `top_k`, `top_p`: as `generate()`'s (rank 0 draws, from its global random generator: seed it
    there); `exchange`: the prefill's `moba_attention_cp` exchange. `num_beams` > 1: beam search,
    run by transformers' own `generate()` loop over the sharded cache (`length_penalty`,
    `early_stopping`, `num_return_sequences` as there; with `do_sample`, beam sampling from rank 0's
    random state): `[B * num_return_sequences, T + new]`."""
    check_rewritten(model)
    pg = resolve_group(group, _WHO)
    real = _check_arguments(input_ids, attention_mask, max_new_tokens, do_sample, temperature, top_k, top_p)
    stateful = hf_cp_linear.method_dispatched_layers(model)
    if stateful:
        raise ValueError(f"{_WHO}: {type(model).__name__}'s recurrent blocks ({stateful[0]}, ...) keep their decoding "
                         f"state on the modules, not in a cache, so a sharded cache cannot hold it; its prefill and "
                         f"training shard (context_parallel), its decoding does not")
    if isinstance(num_beams, bool) or not isinstance(num_beams, int) or num_beams < 1:
        raise ValueError(f"{_WHO}: num_beams must be a positive integer, got {num_beams!r}")
    beam_search = num_beams > 1 or num_return_sequences != 1
    if beam_search or logits_processing(model):
        if return_logits and beam_search:
            raise ValueError(f"{_WHO}: return_logits is not supported with beam search (num_beams={num_beams})")
        sampling = dict(do_sample=bool(do_sample))
        if do_sample:
            sampling.update(temperature=float(temperature), top_k=top_k, top_p=top_p)
        beams = dict(num_beams=num_beams, length_penalty=length_penalty, early_stopping=early_stopping,
                     num_return_sequences=num_return_sequences) if beam_search else {}
        return _transformers_loop(model, input_ids, attention_mask, real, pg, max_new_tokens=max_new_tokens,
                                  beams=beams, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                                  exchange=exchange, sampling=sampling, return_logits=return_logits)
    pick = _sampler(do_sample, float(temperature), top_k, top_p)
    b, t = input_ids.shape
    shared, cache = _sharded_cache(model, pg, t + max_new_tokens)
    rank, capacity = shared.rank, shared.capacity
    dev = input_ids.device
    local_ids, positions, next_position, shared.key_mask = _place_prompt(model, input_ids, real, shared)
    keyword = _cache_keyword(model)
    keep = hf_masks.takes_argument(model, "logits_to_keep")
    owner, last = divmod(t - 1, capacity)  # the rank and slot of the prompt's last token
    tokens, chosen_logits = [input_ids], []
    done = torch.zeros(b, dtype=torch.bool, device=dev)
    stop = _stop_tokens(model, eos_token_id)
    pad = _pad_token(model, pad_token_id, stop)
    stop_ids = torch.tensor(stop, dtype=torch.long, device=dev)
    with context_parallel(model, pg, layout="contiguous", seq_len=t, exchange=exchange):
        hook = hf.CONTEXT_PARALLEL
        extra = {"logits_to_keep": torch.tensor([last if rank == owner else 0], device=dev)} if keep else {}
        if real is not None:
            extra["attention_mask"] = shared.key_mask.long()
        hook.custom_positions = real is not None  # transformers' padded-batch positions, not the layout's
        shared.prefilling = True
        try:
            out = model(input_ids=local_ids, position_ids=positions, use_cache=True, **{keyword: cache}, **extra)
        finally:
            hook.custom_positions = shared.prefilling = False
        logits = out.logits[:, -1 if keep else last].float().contiguous()
        with collective(_WHO, "the broadcast of the prompt's last logits", pg):
            dist.broadcast(logits, src=dist.get_global_rank(pg, owner), group=pg)
        shared.length = t
        for step in range(max_new_tokens):
            token = pick(logits, torch.cat(tokens, dim=1)) if do_sample else pick(logits)
            with collective(_WHO, "the broadcast of the next token", pg):
                dist.broadcast(token, src=dist.get_global_rank(pg, 0), group=pg)
            if stop:
                token = torch.where(done, torch.full_like(token, pad), token)
                done |= torch.isin(token, stop_ids)
            tokens.append(token[:, None])
            chosen_logits.append(logits)
            if step + 1 == max_new_tokens or bool(done.all()):
                break
            # the first step checks that every rank makes the same calls; the later ones repeat it
            hook.decode_len, hook.decode_cache, hook.decode_check = shared.length + 1, cache, step == 0
            slot = shared.length - rank * capacity
            if shared.key_mask is not None and 0 <= slot < capacity:
                shared.key_mask[:, slot] = True  # the new token, on the rank that holds it
            try:
                out = model(input_ids=token[:, None], position_ids=next_position[:, None], use_cache=True,
                            **{keyword: cache})
            finally:
                hook.decode_len = hook.decode_cache = None
            shared.length += 1
            next_position = next_position + 1
            logits = out.logits[:, -1].float()
    ids = torch.cat(tokens, dim=1)
    return (ids, torch.stack(chosen_logits, dim=1)) if return_logits else ids


def _stop_tokens(model: nn.Module, eos_token_id: int | list[int] | None) -> list[int]:
    """The end-of-sequence ids decoding stops at: the given ones, else the generation config's (as
    `generate()` takes them; none: decode `max_new_tokens`)."""
    if eos_token_id is None:
        eos_token_id = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos_token_id is None:
        return []
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    if not ids or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ValueError(f"{_WHO}: eos_token_id must be a token id or a list of them, got {eos_token_id!r}")
    return ids


def _pad_token(model: nn.Module, pad_token_id: int | None, stop: list[int]) -> int | None:
    """What a finished row continues with: the given id, else the generation config's pad id, else
    the first end-of-sequence id (`generate()`'s rule)."""
    if pad_token_id is None:
        pad_token_id = getattr(getattr(model, "generation_config", None), "pad_token_id", None)
    if isinstance(pad_token_id, (list, tuple)):
        pad_token_id = pad_token_id[0] if pad_token_id else None
    return pad_token_id if pad_token_id is not None else (stop[0] if stop else None)


def _transformers_loop(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None, real: Tensor | None,
                       pg: dist.ProcessGroup, *, max_new_tokens: int, beams: dict, eos_token_id: int | list[int] | None,
                       pad_token_id: int | None, exchange: str, sampling: dict, return_logits: bool = False):
    """Transformers' own `generate()` loop over a sharded cache: beam search (`beams`: num_beams,
    length_penalty, early_stopping, num_return_sequences), and greedy or sampled decoding of models
    whose generation config processes the logits (`hf_generation_config.logits_processing`). The
    prompt but its last token is prefilled under context parallelism, the cache's rows are repeated
    per beam, and `generate()` runs on every rank (the same logits everywhere, so the same tokens),
    each forward a decode step against the sharded cache (`ShardedKVCache` moves its rows and kept
    means with the beams).
    `sampling` (generate()'s do_sample and warpers): draws on every rank from rank 0's random state,
    sent to all first. Returns the sequences, checked to be the same on every rank (with
    `return_logits`, and no beams: also the `[B, new, vocab]` logits each token was chosen from)."""
    num_beams = int(beams.get("num_beams", 1))
    b, t = input_ids.shape
    shared, cache = _sharded_cache(model, pg, t + max_new_tokens)
    rank, capacity = shared.rank, shared.capacity
    keyword = _cache_keyword(model)
    with context_parallel(model, pg, layout="contiguous", seq_len=max(t - 1, 1), exchange=exchange):
        hook = hf.CONTEXT_PARALLEL
        if t > 1:  # the prompt but its last token; generate() feeds that one as its first step
            head = None if real is None else real[:, :t - 1]
            local_ids, positions, _, shared.key_mask = _place_prompt(model, input_ids[:, :t - 1], head, shared)
            extra = {} if shared.key_mask is None else {"attention_mask": shared.key_mask.long()}
            hook.custom_positions, shared.prefilling = real is not None, True
            try:
                model(input_ids=local_ids, position_ids=positions, use_cache=True, **{keyword: cache}, **extra)
            finally:
                hook.custom_positions, shared.prefilling = False, False
            shared.length = t - 1
        elif real is not None:
            shared.key_mask = torch.zeros((b, capacity), dtype=torch.bool, device=input_ids.device)
            shared.left_padding = left_padding(real[:, :0])
        cache.batch_repeat_interleave(num_beams)
        if sampling["do_sample"]:
            _random_state_of_rank_0(pg, input_ids.device)
        handles = _decode_steps(model, hook, cache, shared)
        try:
            mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
            # ids left unset stay the generation config's (an explicit None would clear its end ids)
            ids = {k: v for k, v in (("eos_token_id", eos_token_id),
                                     ("pad_token_id", pad_token_id if pad_token_id is not None else eos_token_id))
                   if v is not None}
            out = model.generate(input_ids, attention_mask=mask, max_new_tokens=max_new_tokens, **sampling, **beams,
                                 **ids, output_logits=return_logits, return_dict_in_generate=return_logits,
                                 **{keyword: cache})
        finally:
            for h in handles:
                h.remove()
    mine = (out.sequences if return_logits else out).contiguous()
    first = mine.clone()
    with collective(_WHO, "the broadcast of the sequences", pg):
        dist.broadcast(first, src=dist.get_global_rank(pg, 0), group=pg)
    if not torch.equal(first, mine):
        raise RuntimeError(f"{_WHO}: rank {rank}'s {'beam search' if beams else 'decoding'} chose other sequences "
                           f"than rank 0's")
    return (mine, torch.stack(out.logits, dim=1).float()) if return_logits else mine


def _random_state_of_rank_0(pg: dist.ProcessGroup, device: torch.device) -> None:
    """Set this rank's global random generator (CPU, and the device's when it is CUDA) to rank 0's, so
    that draws made by every rank from the same logits agree."""
    states = [torch.get_rng_state()] + ([torch.cuda.get_rng_state(device)] if device.type == "cuda" else [])
    comm = device if dist.get_backend(pg) == "nccl" else torch.device("cpu")
    for i, state in enumerate(states):
        sent = state.to(comm)
        with collective(_WHO, "the broadcast of rank 0's random state", pg):
            dist.broadcast(sent, src=dist.get_global_rank(pg, 0), group=pg)
        states[i] = sent.cpu()
    torch.set_rng_state(states[0])
    if device.type == "cuda":
        torch.cuda.set_rng_state(states[1], device)


def _sharded_cache(model: nn.Module, pg: dist.ProcessGroup, tokens: int) -> tuple[CacheSlice, ShardedKVCache]:
    """An empty sharded cache for `tokens` (prompt plus new ones): each rank's capacity `S` is its
    share rounded up to whole blocks of every MoBA site."""
    world, align = dist.get_world_size(pg), alignment(model)
    capacity = math.ceil(math.ceil(tokens / world) / align) * align
    shared = CacheSlice(capacity=capacity, rank=dist.get_rank(pg), world=world)
    recurrent = {int(m.layer_idx) for _, m in hf_cp_linear.recurrent_layers(model)}
    types = layer_types(model)
    # as transformers' own cache lays them out: a kind whose layer is not also an attention layer
    # ("linear_attention", "conv") holds recurrent states only
    linear = frozenset(i for i in recurrent if i < len(types) and not issubclass(
        DYNAMIC_LAYER_TYPE_MAPPING.get(types[i], DynamicLayer), CacheLayerMixin))
    return shared, ShardedKVCache(_num_layers(model), shared, linear, frozenset(recurrent - linear))


def _decode_steps(model: nn.Module, hook, cache: ShardedKVCache, shared: CacheSlice) -> list:
    """Hooks that make each forward `generate()` runs a decode step against the sharded cache: the
    filled length and cache for the sharded attention, the new tokens' slots made visible in a
    padded batch's key mask (the padding travels in the cache, so the step's own mask is dropped),
    the length advanced after the step."""
    state = {"first": True, "tq": 0}

    def before(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        tq = int(ids.shape[1])
        state["tq"] = tq
        hook.decode_len, hook.decode_cache, hook.decode_check = shared.length + tq, cache, state["first"]
        hook.decode_as_prefill = state["first"]  # the prompt's last token: one process computes it in the prefill
        state["first"] = False
        if shared.key_mask is not None:
            lo = max(shared.length - shared.rank * shared.capacity, 0)
            hi = min(shared.length + tq - shared.rank * shared.capacity, shared.capacity)
            if lo < hi:
                shared.key_mask[:, lo:hi] = True
        return args, {k: v for k, v in kwargs.items() if k != "attention_mask"}

    def after(module, args, output):
        shared.length += state["tq"]
        hook.decode_len = hook.decode_cache = None
        hook.decode_as_prefill = False

    return [model.register_forward_pre_hook(before, with_kwargs=True, prepend=True),
            model.register_forward_hook(after)]
