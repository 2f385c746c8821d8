"""Context parallelism for rewritten Hugging Face models: one sequence sharded across ranks.

    ids, pos, seq_len = shard_inputs(model, input_ids, group, layout="zigzag")
    mask = shard_attention_mask(model, attention_mask, group, layout="zigzag")  # padded batches only
    with context_parallel(model, group, layout="zigzag", seq_len=seq_len):
        logits = model(input_ids=ids, position_ids=pos, attention_mask=mask, use_cache=False).logits
    full = unshard_sequence(logits, group, "zigzag", dim=1, seq_len=seq_len)   # every rank's tokens

Inside `context_parallel`, every attention call of the model (it must have been rewritten: its
attention goes through `integrations.hf`) sees this rank's tokens and attends the whole
sequence: MoBA sites through `moba_attention_cp`, dense sites on all-gathered K/V at global
positions (so hybrid policies work; the dense op in bounded rows, or the model's own attention
function where it does more than plain attention). RoPE and
learned position embeddings see the global positions because `position_ids` carries them (checked);
decoders that take no `position_ids` and number their tokens themselves (BART's family, Whisper's)
have their position embeddings given the global positions instead (`hf_cp_positions`).
Training works the same way (FSDP2 on a 2-D mesh with the `cp` dimension as the group); compute
the loss from the local logits and labels shifted *before* sharding (the models' own `labels=`
shift would be wrong at shard edges). A padded batch passes its 2-D `attention_mask`, sharded like
the tokens (`shard_attention_mask`): every site then hides the padding keys of the whole
sequence, as the unsharded model does. Causal sliding windows are applied at global positions
(`hf_masks.SHARDED` keeps each window's mask with its size; docs/CONTEXT_PARALLEL.md), and so are
chunked attention (Llama 4's local layers: the chunk size kept the same way) and
packed documents (`packed=True`, position ids restarting at each document). Hybrid stacks' recurrent
layers (gated delta nets, Mamba-1 and Mamba-2 mixers, short convolutions) carry their state across
ranks (`hf_cp_linear`). Not supported: other masks (4-D, extra mask functions), a KV cache from
earlier steps (decode: `hf_cp_generate`), other token mixers; each is one clear error.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moba_rewrite.attention import autocast, op as moba_op
from moba_rewrite.integrations import hf, hf_cache, hf_cp_linear, hf_masks
from moba_rewrite.integrations.hf_cp_positions import (GlobalNumbering, GlobalRopeLength, TemperatureTuning,
                                                      global_indices, numbering_modules, position_scaled_rotary,
                                                      scale_queries, temperature_tuned)
from moba_rewrite.parallel import moba_attention_cp, moba_decode_cp, sdpa_decode_cp, shard_sequence
from moba_rewrite.parallel.attention import check_key_padding
from moba_rewrite.parallel.shipping import check_mode
from moba_rewrite.parallel.window import WindowKeys, window_start
from moba_rewrite.parallel.dense import gather_keys_values, in_causal_window
from moba_rewrite.parallel.groups import check_call_agreement, resolve_group
from moba_rewrite.parallel.layout import ShardLayout, check_layout, chunks_per_rank, gather_key_mask, gather_sequence
from moba_rewrite.parallel.ring import ring_attention_cp

_WHO = "context_parallel"
DENSE_FORMS = ("ring", "gather")  # context_parallel(dense=): how plain causal dense sites reach the other ranks' keys


def _attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if hasattr(m, "_moba_decision")]


def check_rewritten(model: nn.Module) -> None:
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None) or ""
    report = getattr(model, "_moba_report", None)
    if report is not None and not _attention_modules(model):
        kinds = sorted({row.module_class for row in getattr(report, "rows", [])})
        raise ValueError(f"{_WHO}: {type(model).__name__} was rewritten, but none of its attention goes through "
                         f"transformers' attention interface (hand-written: {', '.join(kinds) or 'no sites'}), so "
                         f"its sequence cannot be sharded")
    if report is not None and not hf_masks.takes_argument(model, "position_ids") and not numbering_modules(model):
        raise ValueError(f"{_WHO}: {type(model).__name__}.forward takes no position_ids: it numbers the tokens it "
                         f"is given from 0 itself (learned positions from the input length, as BART's decoder does), "
                         f"so every shard would see positions 0..T_local-1, and it has no position embedding that "
                         f"takes them (cache_length, position_ids) to be given the global ones; context parallelism "
                         f"needs a model that takes global position_ids")
    if not impl.startswith(hf.IMPL_PREFIX) or not _attention_modules(model):
        raise ValueError(f"{_WHO}: {type(model).__name__} is not a rewritten Hugging Face model (attention "
                         f"implementation {impl!r}); run moba_rewrite.rewrite(model, policy) first")
    mixers = other_sequence_mixers(model)
    if _unsharded_layer_kinds(model):  # they run in every forward (a convolution is refused when it runs)
        raise ValueError(f"{_WHO}: {type(model).__name__} mixes tokens outside attention ({'; '.join(mixers)}): "
                         f"a shard would run those layers on its own tokens only (a recurrent state or a "
                         f"convolution restarting at every shard), so its sequence cannot be sharded")


# Layer kinds (`config.layer_types`) that mix tokens only through attention calls this module shards
# (or not at all: MLP-only layers); any other kind (linear attention, Mamba-attention hybrids,
# indexed or compressed attention, convolutions, ...) is refused.
_ATTENTION_LAYER_KINDS = {"full_attention", "sliding_attention", "chunked_attention", "attention", "mlp", "moe"}


def other_sequence_mixers(model: nn.Module) -> list[str]:
    """What mixes tokens in `model` besides its attention calls, in words ([] for none): layer kinds
    other than attention in the text config's `layer_types`, and 1-D convolutions over more than one
    position (Mamba's and gated-delta-net's causal convolutions, short-convolution layers; a vision
    tower's 2-D patch embedding is not one)."""
    found = []
    kinds = _mixing_layer_kinds(model)
    if kinds:
        found.append(f"layer types {', '.join(kinds)}")
    convs = sorted({label for label, _ in _sequence_convolutions(model)})
    if convs:
        found.append(f"convolutions {', '.join(convs[:3])}{' ...' if len(convs) > 3 else ''}")
    return found


def _unsharded_layer_kinds(model: nn.Module) -> list[str]:
    """`_mixing_layer_kinds` of the layers holding no recurrent layer `hf_cp_linear` shards (delta
    nets, Mamba mixers, short convolutions: their states are carried across ranks)."""
    types = layer_types(model)
    return sorted({types[i] for i in hf_cp_linear.uncovered_layers(model, types, _ATTENTION_LAYER_KINDS)})


def layer_types(model: nn.Module) -> list[str]:
    """The text config's `layer_types` (full_attention, linear_attention, hybrid, ...; [] when it has none)."""
    config = getattr(model, "config", None)
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    return [str(k) for k in (getattr(text, "layer_types", None) or [])]


def _mixing_layer_kinds(model: nn.Module) -> list[str]:
    """Layer kinds of the text config's `layer_types` other than attention (and MLP-only layers)."""
    return sorted(set(layer_types(model)) - _ATTENTION_LAYER_KINDS)


def _sequence_convolutions(model: nn.Module) -> list[tuple[str, nn.Conv1d]]:
    """(owner class.attribute, module) of every 1-D convolution over more than one position."""
    return [(f"{type(owner).__name__}.{name}", child) for owner in model.modules()
            for name, child in owner.named_children() if isinstance(child, nn.Conv1d) and child.kernel_size[0] > 1]


def _refuse_when_run(model: nn.Module, label: str):
    """Forward pre-hook of a convolution: while sharded it would run on one shard's tokens (an audio
    tower's convolutions, which a text-only forward never runs, are left alone)."""
    def refuse(module, args):
        raise ValueError(f"{_WHO}: {type(model).__name__} mixes tokens outside attention: the convolution {label} "
                         f"ran on a sharded forward, where it would see one shard's tokens only (restarting at "
                         f"every shard), so this forward cannot be sharded")
    return refuse


def alignment(model: nn.Module) -> int:
    """Token multiple each chunk of a shard must be: the least common multiple of the MoBA sites' block sizes."""
    sizes = [int(m._moba_decision.block_size) for _, m in _attention_modules(model)
             if m._moba_decision is not None and m._moba_decision.mode == "moba"]
    return math.lcm(*sizes) if sizes else 1


def shard_inputs(model: nn.Module, input_ids: Tensor, group=None, *, layout: str = "contiguous",
                 position_ids: Tensor | None = None) -> tuple[Tensor, Tensor, int]:
    """(this rank's input ids, their position ids, the real length) for `context_parallel`.

    `input_ids` `[B, T]` (the same on every rank) is padded at its end so that no MoBA block of
    any site straddles ranks. The positions are global (`0 .. T-1`), or this rank's shard of
    `position_ids` `[B or 1, T]` when given: packed sequences, positions restarting at each
    document (run them under `context_parallel(..., packed=True)`)."""
    check_rewritten(model)
    ids = shard_sequence(input_ids, group, layout, dim=1, block_size=alignment(model))
    # Padding tokens continue the positions (no real token sees them: they come last, and the
    # attention hides keys past seq_len).
    padded = ids.shape[1] * dist.get_world_size(resolve_group(group, _WHO))
    b, t = input_ids.shape
    positions = torch.arange(padded, device=input_ids.device).expand(b, -1)
    if position_ids is not None:
        if not isinstance(position_ids, Tensor) or position_ids.dim() != 2 or position_ids.shape[1] != t or \
                position_ids.shape[0] not in (1, b) or position_ids.is_floating_point():
            got = list(position_ids.shape) if isinstance(position_ids, Tensor) else type(position_ids).__name__
            raise ValueError(f"{_WHO}: position_ids must be integer positions [B or 1, T] = [{b}, {t}], got {got}")
        given = position_ids.to(input_ids.device).expand(b, -1)
        positions = torch.cat([given, given[:, -1:] + 1 + torch.arange(padded - t, device=given.device)], dim=1)
    return ids, shard_sequence(positions, group, layout, dim=1), t


def shard_attention_mask(model: nn.Module, attention_mask: Tensor | None, group=None, *,
                         layout: str = "contiguous") -> Tensor | None:
    """This rank's shard of a padded batch's 2-D `attention_mask` `[B, T]` (1 / True: a real token),
    aligned as `shard_inputs` aligns the tokens (the alignment padding is hidden); None stays None."""
    check_rewritten(model)
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, Tensor) or attention_mask.dim() != 2 or attention_mask.is_floating_point():
        got = f"{attention_mask.dim()}-D {attention_mask.dtype}" if isinstance(attention_mask, Tensor) else \
            type(attention_mask).__name__
        raise ValueError(f"{_WHO}: attention_mask must be the batch's 2-D padding mask [B, T] of 0/1 or bool, got {got}")
    return shard_sequence(attention_mask, group, layout, dim=1, block_size=alignment(model))


class _ShardedAttention:
    """The attention function `integrations.hf` calls while a sequence is sharded."""

    def __init__(self, pg: dist.ProcessGroup, layout: str, seq_len: int | None, exchange: str = "auto",
                 dense: str = "ring"):
        self.pg, self.layout, self.seq_len, self.exchange, self.dense = pg, layout, seq_len, exchange, dense
        self.seen: set[int] = set()
        self.key_padding: Tensor | None = None  # this forward's local key mask [B, T_local], if the caller gave one
        self.global_keys: Tensor | None = None  # its whole-sequence form, gathered once per forward (dense sites)
        # Set by `hf_cp_generate.generate` for a decode step: the sharded cache's filled length after
        # this step's write (the keys each site receives are this rank's slice of the cache), and the
        # cache (its layers keep their slices' block means).
        self.decode_len: int | None = None
        self.decode_cache = None
        self.decode_check = True  # run the decode ops' all-ranks-agree check (the first step checks)
        self.decode_as_prefill = False  # this step's tokens end the prompt: decode them as one process prefills
        self.custom_positions = False  # hf_cp_generate's padded-batch prefill: position_ids are the caller's
        self.packed = False  # context_parallel(packed=True): position_ids may restart (documents)
        self.documents: Tensor | None = None  # this forward's document of every token [B, W * T_local], if packed
        self.positions: Tensor | None = None  # with documents: every token's position id [B, W * T_local]
        self.segments: dict[int, Tensor] = {}  # this forward's chunked-attention segments, by chunk size
        self.packing_read = False  # this forward's mask creation read packed documents from position_ids
        self.tuned: set[int] = set()  # ids of modules whose query temperature is applied here (hf_cp_positions)

    def start_forward(self, key_padding: Tensor | None, documents: Tensor | None = None,
                      positions: Tensor | None = None) -> None:
        self.key_padding, self.global_keys, self.documents = key_padding, None, documents
        self.positions, self.segments = positions, {}
        self.packing_read = False

    @torch.compiler.disable  # eager: collectives, host reads of masks; a compiled model breaks its graph here
    def __call__(self, origin: str, module: nn.Module, query, key, value, attention_mask, *args, **kwargs):
        self.seen.add(id(module))
        if id(module) in self.tuned:  # as the module scales them, at the tokens' global indices
            query = scale_queries(query, module, global_indices(self, query.shape[2], query.device))
        if autocast.active(query):  # as the attention functions compute under autocast (SDPA's rule)
            query, key, value = autocast.cast_inputs(query, key, value)
        name = getattr(module, "_moba_site", type(module).__name__)
        tq, tk = query.shape[2], key.shape[2]
        if self.decode_len is not None:
            return self._decode(module, name, query, key, value, attention_mask, *args, **kwargs)
        if self.documents is not None and not self.packing_read:
            raise ValueError(f"{_WHO}: packed=True, but the model built the mask of attention site {name!r} without "
                             f"reading packed documents from position_ids (transformers' packed-sequence detection "
                             f"never ran), so one process attends across its documents; run it without packed=True")
        if tq != tk:
            raise ValueError(f"{_WHO}: attention site {name!r} got {tq} queries against {tk} keys; only a prefill or "
                             f"training step over the whole sharded sequence runs context-parallel (no KV cache from "
                             f"earlier steps: pass use_cache=False)")
        if attention_mask is None:  # as the original function (an eager one only adds the mask)
            causal = hf.causal_without_mask(origin, module, kwargs)
        elif hf_masks.compact_of(attention_mask) is not None:  # ours: the causal cut AND a key mask
            causal = True
        else:  # a materialised mask, checked below to say exactly this
            causal = hf.declared_causal(module, kwargs)
        window, chunk = _window(name, attention_mask, kwargs), hf_masks.chunk_of(attention_mask)
        _check_mask(name, attention_mask, tq, causal, self.key_padding, window, chunk)
        documents = self._chunk_segments(chunk, tq, query.device) if chunk is not None else self.documents
        scaling = kwargs.get("scaling")
        scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
        decision = getattr(module, "_moba_decision", None)
        keys = self.seq_len if self.seq_len is not None else tq * dist.get_world_size(self.pg)
        if decision is not None and decision.mode == "moba" and not moba_op.dense_by_policy(
                str(decision.backend), keys, _dense_below(decision)):
            dropout = float(kwargs.get("dropout", args[0] if args else 0.0) or 0.0)
            problems = hf.unsupported_reasons(query, key, value, None, dropout, module.training, kwargs)
            if not problems and self.documents is not None and not causal:
                raise ValueError(f"{_WHO}: attention site {name!r} is not causal; packed documents under context "
                                 f"parallelism are supported at causal MoBA sites (and at dense ones)")
            if not problems and (window is not None or documents is not None):
                out = self._gathered(query, key, value, scale, window, kind="moba", block_size=int(decision.block_size),
                                     top_k=int(decision.top_k), backend=str(decision.backend),
                                     documents=documents, chunk=chunk)
                return out.transpose(1, 2).contiguous(), None
            if not problems:
                out = moba_attention_cp(query, key, value, group=self.pg, block_size=int(decision.block_size),
                                        top_k=int(decision.top_k), causal=causal, scale=scale,
                                        enable_gqa=query.shape[1] != key.shape[1], layout=self.layout,
                                        seq_len=self.seq_len, exchange=self.exchange,
                                        key_padding_mask=self.key_padding,
                                        backend=_local_backend(str(decision.backend)))
                return out.transpose(1, 2).contiguous(), None
            if decision.on_unsupported == "error":
                raise hf.HFUnsupportedError(f"attention site {name!r} cannot run MoBA: {'; '.join(problems)} "
                                            f"(policy on_unsupported: error)")
        return self._dense(origin, module, query, key, value, causal, scale, *args, window=window,
                           documents=documents, chunk=chunk, **kwargs)

    def _chunk_segments(self, chunk: int, local_len: int, device) -> Tensor:
        """Chunked attention (Llama 4's local layers) at global positions: every token's segment
        `[B or 1, W * T_local]`, a query seeing the causal keys of its own segment. As transformers'
        chunked mask: chunks of `chunk` tokens counted from each row's first real token (its left
        padding, read from the whole sequence's key mask), or for packed documents chunks of each
        document's position ids. Segments are runs, as documents are (`_causal_visibility`)."""
        if chunk in self.segments:
            return self.segments[chunk]
        if self.documents is not None:  # transformers remaps the chunk overlay to the position ids
            segments = self.documents * (self.documents.shape[1] + 1) + self.positions.div(chunk, rounding_mode="floor")
        else:
            index = torch.arange(local_len * dist.get_world_size(self.pg), device=device)[None]
            segments = (index - self._left_padding(device)[:, None]).div(chunk, rounding_mode="floor")
        self.segments[chunk] = segments
        return segments

    def _left_padding(self, device) -> Tensor:
        """`[B or 1]` padding tokens before each row's first real token in the whole sequence (from
        the gathered key mask; zeros without one)."""
        if self.key_padding is None:
            return torch.zeros(1, dtype=torch.long, device=device)
        if self.global_keys is None:
            self.global_keys = gather_key_mask(self.key_padding, self.pg, self.layout, _WHO)
        return left_padding(self.global_keys)

    def _gathered(self, query: Tensor, key: Tensor, value: Tensor, scale: float, window: int | None, *,
                  kind: str, block_size: int, top_k: int, backend: str, documents: Tensor | None = None,
                  chunk: int | None = None) -> Tensor:
        """Attention over the all-gathered K/V (`kind` "moba": a MoBA site whose mask the MoBA exchange
        does not carry, a causal sliding window, chunked attention or packed documents; "dense": a
        causal dense site), as one process computes it. `documents`: each token's document (packed
        documents) or chunk segment (`_chunk_segments`), a query seeing its own only.

        K/V are all-gathered, or for a causal sliding window (or chunks of `chunk` tokens) without
        packed documents only the keys within reach are exchanged (`WindowKeys`). Each local chunk
        of queries runs the op in rows of bounded size (`_ROWS_ELEMS` mask elements), each over the
        keys from the block holding the earliest key its queries see (the window's start, the
        document's or chunk's start) to its last query, with the mask at global positions (and the
        padding keys hidden); a plain causal call passes no mask but the padding's. Blocks start at
        global multiples of the block size and the queries are the newest of those keys, so the op's
        own block, candidates and block means are the ones the whole sequence gives (a dense site is
        the op's dense limit: one block, exact full attention). Differentiable."""
        world, rank = dist.get_world_size(self.pg), dist.get_rank(self.pg)
        lay = ShardLayout(self.layout, world, query.shape[2])
        seq_len = self.seq_len if self.seq_len is not None else lay.global_len
        if kind == "moba":
            lay.check_blocks(block_size, _WHO)
        check_call_agreement(_WHO, self.pg, kind=kind, q=query, k=key, block_size=block_size if kind == "moba" else 0,
                             top_k=top_k if kind == "moba" else 0, causal=True, layout=self.layout, seq_len=seq_len,
                             scale=scale, key_padding=self.key_padding is not None, window=window,
                             packed=self.documents is not None, chunk=chunk)
        unit = block_size if kind == "moba" else 1
        keys_of = self._key_spans(key, value, seq_len, window, unit, chunk)
        if self.key_padding is not None and self.global_keys is None:
            self.global_keys = gather_key_mask(self.key_padding, self.pg, self.layout, _WHO)
        plain = window is None and documents is None
        outs = []
        b, hq, dv = query.shape[0], query.shape[1], value.shape[-1]
        rows = lay.chunk_len if plain else max(1, _ROWS_ELEMS // (b * seq_len))
        for offset, n, start, end in _query_rows(lay, rank, rows, seq_len):
            if end <= start:  # alignment padding only
                outs.append(query.new_zeros((b, hq, n, dv)))
                continue
            q_pos = torch.arange(start, end, device=query.device)
            if plain:
                mask, first = None, 0
            else:
                mask, first = _causal_visibility(q_pos, end, window, documents, unit)
            if self.global_keys is not None:
                keys = self.global_keys[:, None, None, first:end]
                mask = keys if mask is None else mask & keys
            bs = block_size if kind == "moba" else end - first
            k_span, v_span = keys_of(first, end)
            # a dense site: full attention by policy (no finiteness pass over the keys; NaN propagates
            # as in the model's own attention)
            out = moba_op.run(query[:, :, offset:offset + end - start], k_span, v_span, None, mask, bs,
                              top_k if kind == "moba" else 1, plain, scale, backend,
                              0 if kind == "moba" else end - first + 1)
            if end - start < n:
                out = torch.cat([out, out.new_zeros((b, hq, n - (end - start), dv))], dim=2)
            outs.append(out)
        return torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]

    def _ring(self, query: Tensor, key: Tensor, value: Tensor, scale: float) -> Tensor:
        """A plain causal dense site by ring attention (`ring_attention_cp`: no rank holds more than
        two shards' K/V, forward or backward); padding keys hidden by the whole sequence's key mask,
        gathered once per forward."""
        if self.key_padding is not None and self.global_keys is None:
            self.global_keys = gather_key_mask(self.key_padding, self.pg, self.layout, _WHO)
        return ring_attention_cp(query, key, value, group=self.pg, causal=True, scale=scale,
                                 enable_gqa=query.shape[1] != key.shape[1], layout=self.layout, seq_len=self.seq_len,
                                 global_key_mask=self.global_keys)

    def _key_spans(self, key: Tensor, value: Tensor, seq_len: int, window: int | None, unit: int,
                   chunk: int | None = None):
        """`keys_of(first, end)`: the whole sequence's keys and values `first .. end-1`. All-gathered,
        or for a causal sliding window or chunked attention (`chunk`) without packed documents only
        the keys within the window or the chunk, exchanged (`WindowKeys`, planned from blocks of
        `unit` tokens; chunks from the rows' left padding). A collective: every rank calls it."""
        if window is not None and self.documents is None:  # only the window's keys travel
            return WindowKeys(key, value, self.pg, self.layout, seq_len=seq_len, window=window, block_size=unit,
                              who=_WHO).span
        if chunk is not None and self.documents is None:  # only the chunk's keys travel
            left = tuple(self._left_padding(key.device).tolist())
            return WindowKeys(key, value, self.pg, self.layout, seq_len=seq_len, window=0, block_size=unit,
                              who=_WHO, chunk=chunk, left_padding=left).span
        k_all, v_all = gather_keys_values(key, value, self.pg, self.layout, _WHO)

        def keys_of(first: int, end: int) -> tuple[Tensor, Tensor]:
            return k_all[:, :, first:end], v_all[:, :, first:end]
        return keys_of

    def _decode(self, module, name: str, query, key, value, attention_mask, *args, **kwargs):
        """A decode step against this rank's slice of a sharded cache: `moba_decode_cp` at MoBA sites,
        `sdpa_decode_cp` at dense sites, `decode: dense` policies and sites whose cache layer in
        `generate()` is a sliding window (it keeps the last `window` keys only, so one process decodes
        them densely over that window: `hf_cache`), whatever their mask says."""
        if not hf.declared_causal(module, kwargs):
            raise ValueError(f"{_WHO}: attention site {name!r} is not causal; sharded-cache decoding is for causal LMs")
        window, chunk = _window(name, attention_mask, kwargs), hf_masks.chunk_of(attention_mask)
        _check_decode_mask(name, attention_mask, query.shape[2], self.decode_len, window, chunk)
        dropout = float(kwargs.get("dropout", args[0] if args else 0.0) or 0.0)
        # soft-capping and sinks: MoBA cannot (one process runs the original attention), the dense op can
        dense_only = {k: kwargs[k] for k in _DENSE_DECODE_KWARGS if kwargs.get(k) is not None}
        problems = hf.unsupported_reasons(query, key, value, None, dropout, module.training,
                                          {k: v for k, v in kwargs.items() if k not in dense_only})
        if problems:
            raise ValueError(f"{_WHO}: attention site {name!r} cannot decode against a sharded cache: "
                             f"{'; '.join(problems)}")
        scaling = kwargs.get("scaling")
        scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
        decision = getattr(module, "_moba_decision", None)
        shared = getattr(self.decode_cache, "shared", None)
        padding = getattr(shared, "key_mask", None)
        if chunk is not None:  # the query's chunk, as a key mask over this rank's slots
            padding = self._chunk_keys(name, query, key, chunk, getattr(shared, "left_padding", None), padding)
        gqa = query.shape[1] != key.shape[1]
        as_prefill = self.decode_as_prefill  # the prompt's last token(s): the site's prefill rules, not decode's
        moba = (decision is not None and decision.mode == "moba" and (as_prefill or decision.decode != "dense")
                and not moba_op.dense_by_policy(str(decision.backend), self.decode_len, _dense_below(decision)))
        if moba and dense_only:
            if decision.on_unsupported == "error":
                why = hf.unsupported_reasons(query, key, value, None, 0.0, False, dense_only)
                raise hf.HFUnsupportedError(f"attention site {name!r} cannot run MoBA: {'; '.join(why)} "
                                            f"(policy on_unsupported: error)")
            moba = False
        kept = None if as_prefill else hf_cache.sliding_cache_window(module)  # generate()'s layer keeps only this
        if kept is not None:  # one process decodes densely over what that layer holds (and the mask's window)
            window, moba = min(kept, window or kept), False
        elif moba and window is not None and as_prefill and query.shape[2] == 1:  # the window as a key mask
            s_cap = key.shape[2]
            slots = dist.get_rank(self.pg) * s_cap + torch.arange(s_cap, device=key.device)
            in_window = (slots > self.decode_len - 1 - window).expand(query.shape[0], -1)
            padding = in_window if padding is None else padding & in_window
        elif moba and window is not None:
            raise ValueError(f"{_WHO}: attention site {name!r} decodes MoBA under a sliding window of {window} keys "
                             f"(its cache layer in generate() keeps every key); sharded-cache decoding does not "
                             f"support that")
        if not moba:
            sinks = dense_only.get("s_aux", dense_only.get("sinks"))
            out = sdpa_decode_cp(query, key, value, seq_len=self.decode_len, group=self.pg, scale=scale,
                                 enable_gqa=gqa, window=window, softcap=dense_only.get("softcap"), sinks=sinks,
                                 check_ranks=self.decode_check, key_padding_mask=padding)
            return out.transpose(1, 2).contiguous(), None
        block_size, top_k = int(decision.block_size), int(decision.top_k)
        means = None
        layer = hf_cache.cache_layer(module, self.decode_cache) if self.decode_cache is not None else None
        if hasattr(layer, "block_means") and layer.keys is key:  # kept beside the slice, one block refreshed per
            # step (a model that reshapes the cached keys before attending, e.g. MLA or JetMoe, gets them computed)
            s_cap, rank = key.shape[2], dist.get_rank(self.pg)
            means = layer.block_means(block_size, min(max(self.decode_len - rank * s_cap, 0), s_cap))
        out = moba_decode_cp(query, key, value, seq_len=self.decode_len, group=self.pg, block_size=block_size,
                             top_k=top_k, scale=scale, enable_gqa=gqa, key_block_means=means,
                             check_ranks=self.decode_check, key_padding_mask=padding)
        return out.transpose(1, 2).contiguous(), None

    def _chunk_keys(self, name: str, query: Tensor, key: Tensor, chunk: int, left_padding: Tensor | None,
                    padding: Tensor | None) -> Tensor:
        """This rank's cache slots `[B, S]` a decode step's query sees under chunked attention: those
        from its chunk's start (chunks of `chunk` tokens counted from each row's first real token,
        `left_padding`), AND the padding mask `padding` if given."""
        if query.shape[2] != 1:
            raise ValueError(f"{_WHO}: attention site {name!r} has chunked attention and got {query.shape[2]} queries "
                             f"in one sharded-cache decode step; one at a time is supported")
        b, s_cap = query.shape[0], key.shape[2]
        left = (torch.zeros(b, dtype=torch.long, device=key.device) if left_padding is None else
                left_padding.to(key.device))
        position = self.decode_len - 1
        start = left + (position - left).div(chunk, rounding_mode="floor") * chunk  # [B]
        slots = dist.get_rank(self.pg) * s_cap + torch.arange(s_cap, device=key.device)
        seen = slots[None, :] >= start[:, None]
        return seen if padding is None else padding & seen

    def _dense(self, origin, module, query, key, value, causal: bool, scale: float, *args,
               window: int | None = None, documents: Tensor | None = None, chunk: int | None = None, **kwargs):
        """A dense site: causal calls the model's attention function would compute plainly (no
        soft-capping, sinks, dropout) run the dense op over the all-gathered K/V in bounded rows
        (`_gathered`); others call the model's own attention function, in pieces of queries whose
        scores stay under `_SCORE_ELEMS` elements, each over the keys it can see (causal: up to its
        last query, from its window's or chunk's start; a window's or chunk's keys are all that
        travel), masked at global positions (within packed documents or chunks (`documents`), padding
        keys hidden). No `[T_local, T]` tensor."""
        dropout = float(kwargs.get("dropout", args[0] if args else 0.0) or 0.0)
        if causal and not hf.unsupported_reasons(query, key, value, None, dropout, module.training, kwargs):
            if self.dense == "ring" and window is None and documents is None:
                out = self._ring(query, key, value, scale)
            else:
                out = self._gathered(query, key, value, scale, window, kind="dense", block_size=0, top_k=0,
                                     backend="torch", documents=documents, chunk=chunk)
            return out.transpose(1, 2).contiguous(), None
        world, rank = dist.get_world_size(self.pg), dist.get_rank(self.pg)
        lay = ShardLayout(self.layout, world, query.shape[2])
        seq_len = self.seq_len if self.seq_len is not None else lay.global_len
        check_call_agreement(_WHO, self.pg, kind="dense", q=query, k=key, block_size=0, top_k=0, causal=causal,
                             layout=self.layout, seq_len=seq_len, scale=scale, key_padding=self.key_padding is not None,
                             window=window, packed=self.documents is not None, chunk=chunk)
        keys_of = self._key_spans(key, value, seq_len, window, 1, chunk if causal else None)
        if self.key_padding is not None and self.global_keys is None:
            self.global_keys = gather_key_mask(self.key_padding, self.pg, self.layout, _WHO)
        b, hq, dv = query.shape[0], query.shape[1], value.shape[-1]
        rows = max(1, _SCORE_ELEMS // (b * hq * seq_len))  # the function's scores: [B, Hq, rows, keys]
        outs = []
        for offset, n, start, end in _query_rows(lay, rank, rows, seq_len):
            if end <= start:  # alignment padding only
                outs.append(query.new_zeros((b, n, hq, dv)))
                continue
            q_pos = torch.arange(start, end, device=query.device)
            if causal or window is not None:
                mask, first = _causal_visibility(q_pos, end, window, documents, 1)
            else:  # every key, within the query's own document when packed
                mask, first, end = torch.ones(1, 1, end - start, seq_len, dtype=torch.bool, device=query.device), 0, seq_len
                if documents is not None:
                    docs = documents[:, :seq_len]
                    mask = docs[:, q_pos][:, None, :, None] == docs[:, None, None, :]
            if self.global_keys is not None:
                mask = mask & self.global_keys[:, None, None, first:end]
            if origin == "eager":  # eager attention adds its mask to the scores
                mask = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill_(
                    ~mask, torch.finfo(query.dtype).min)
            k_span, v_span = keys_of(first, end)
            rows_here = q_pos.numel()
            out, _ = hf._dense_call(origin, module, query[:, :, offset:offset + rows_here], k_span, v_span, mask,
                                    *args, **kwargs)
            if rows_here < n:
                out = torch.cat([out, out.new_zeros((b, n - rows_here, *out.shape[2:]))], dim=1)
            outs.append(out)
        return (torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]), None


def _local_backend(policy_backend: str) -> str:
    """`moba_attention_cp`'s kernels for a site's policy backend: the policy's `torch` / `triton`, else
    `auto` (`triton` on CUDA; the `reference` and `flash_attn` backends have no context-parallel form)."""
    return policy_backend if policy_backend in ("torch", "triton") else "auto"


def _query_rows(lay: ShardLayout, rank: int, rows: int, seq_len: int) -> Iterator[tuple[int, int, int, int]]:
    """This rank's queries in pieces of at most `rows`: (offset in the local shard, rows, first global
    position, end clipped to `seq_len`: positions past it are alignment padding)."""
    c = lay.chunk_len
    for i, chunk in enumerate(lay.chunks(rank)):
        for r0 in range(0, c, rows):
            n = min(rows, c - r0)
            start = chunk * c + r0
            yield i * c + r0, n, start, min(start + n, seq_len)


# Attention-function arguments MoBA cannot honour but `sdpa_decode_cp` applies (soft-capping, sinks).
_DENSE_DECODE_KWARGS = ("softcap", "s_aux", "sinks")


# Mask elements (batch x query rows x keys) per call of the gathered attention: bounds its memory.
_ROWS_ELEMS = 1 << 24
# Score elements (batch x heads x query rows x keys) per call of a model's own attention function.
_SCORE_ELEMS = 1 << 26


def _causal_visibility(q_pos: Tensor, end: int, window: int | None, documents: Tensor | None, block_size: int
                       ) -> tuple[Tensor, int]:
    """(which keys each query at `q_pos` (consecutive) sees among keys `first .. end-1`,
    `[B or 1, 1, Tq, end - first]` bool: causal, within `window` and its own document (`documents`
    `[B, >= end]`: each token's document) where given; `first`, the block start at or before the
    earliest key any of them sees)."""
    start = int(q_pos[0])
    earliest = window_start(start, window, 1) if window is not None else 0  # WindowKeys' plan, the same rule
    if documents is not None:  # documents are runs: the first query's document starts earliest
        docs = documents[:, :end]
        earliest = max(earliest, int((docs == docs[:, start:start + 1]).int().argmax(-1).min()))
    first = earliest // block_size * block_size
    k_pos = torch.arange(first, end, device=q_pos.device)
    visible = in_causal_window(q_pos, k_pos, window) if window is not None else k_pos[None, :] <= q_pos[:, None]
    visible = visible[None, None]
    if documents is not None:
        visible = visible & (docs[:, q_pos][:, None, :, None] == docs[:, None, None, first:end])
    return visible, first


def left_padding(real: Tensor) -> Tensor:
    """`[B]` padding tokens before each row's first real token of a `[B, T]` key mask (True / 1: real):
    where transformers' chunked attention starts counting a row's chunks."""
    return (real.long().cumsum(-1) == 0).sum(-1)


def _dense_below(decision) -> int:
    """The policy's `dense_below` (0 for none)."""
    return int(getattr(decision, "dense_below", None) or 0)


def _window(name: str, mask: Tensor | None, kwargs: dict) -> int | None:
    """The causal sliding window of this call (`hf_masks.window_of` its mask, checked against the
    call's own `sliding_window`), None for none; a kept mask of any other kind that its local pattern
    cannot show whole (packed sequences, a combined mask function) is an error. Chunked attention
    (`hf_masks.chunk_of`) passes: its chunks are applied at global positions."""
    window, given = hf_masks.window_of(mask), kwargs.get("sliding_window")
    reason = hf_masks.full_reason(mask)
    if window is None and hf_masks.chunk_of(mask) is None and reason and not reason.startswith(_LOCAL_PATTERN_SHOWS):
        raise ValueError(f"{_WHO}: attention site {name!r} got a mask of {reason}, which context parallelism "
                         f"cannot carry across shards; it supports causal or full attention, padded batches, "
                         f"causal sliding windows and chunked attention")
    if given is not None and (window is None or int(given) != window):
        raise ValueError(f"{_WHO}: attention site {name!r} asks for a sliding window of {given} keys but its mask "
                         f"says {'none' if window is None else window}; the window cannot be applied across shards")
    return window


# Kept masks whose whole meaning the local pattern check below sees (a pattern that holds in every
# shard holds over the whole sequence).
_LOCAL_PATTERN_SHOWS = ("bidirectional attention", "the model builds on the materialised mask")


def _check_mask(name: str, mask: Tensor | None, t: int, causal: bool, key_padding: Tensor | None,
                window: int | None = None, chunk: int | None = None) -> None:
    """The model's own (local) mask may only say "causal" (or nothing), within a causal sliding window
    of `window` keys or chunks of `chunk` tokens (counted from the shard's first real token, as
    transformers builds it from the shard's attention_mask) if given, and hide the padding keys of
    the caller's `attention_mask` (`key_padding`, this rank's shard), which the sharded attention
    applies over the whole sequence: other masks cannot be carried across shards, and ignoring them
    would change the result."""
    if mask is None:
        return
    if hf_masks.compact_of(mask) is not None:  # causal AND a key mask
        keys = hf_masks.key_mask(mask)
        if keys is None or bool(keys.all()):
            return
        if key_padding is not None and keys.shape[-1] == t and torch.equal(
                keys.reshape(-1, t).expand_as(key_padding), key_padding):
            return
        raise ValueError(f"{_WHO}: attention site {name!r} got a key mask other than the attention_mask given to "
                         f"the model (pass the batch's padding mask as attention_mask=, sharded by "
                         f"shard_attention_mask)")
    _refuse_bias(name, mask)
    visible = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    want = torch.ones(t, t, dtype=torch.bool, device=mask.device)
    if causal or window is not None:
        want = want.tril()
    if window is not None:
        want = want.triu(-(window - 1))
    if chunk is not None:
        left = (torch.zeros(1, 1, dtype=torch.long, device=mask.device) if key_padding is None else
                left_padding(key_padding)[:, None])
        segment = (torch.arange(t, device=mask.device)[None] - left).div(chunk, rounding_mode="floor")  # [B | 1, t]
        want = want[None, None] & (segment[:, None, :, None] == segment[:, None, None, :])
    if key_padding is not None:
        want = want & key_padding[:, None, None, :]
    if visible.shape[-2] != t or visible.shape[-1] < t or not torch.equal(visible[..., :t],
                                                                            want.expand_as(visible[..., :t])):
        raise ValueError(f"{_WHO}: attention site {name!r} got a mask that is not plain "
                         f"{'causal' if causal else 'full'}{' chunked' if chunk else ''} attention over the given "
                         f"attention_mask (a sliding window, packed sequences?); context parallelism supports plain "
                         f"and padded batches only")


def _refuse_bias(name: str, mask: Tensor) -> None:
    """A float mask holding more than visibility (0 / huge negatives: a bias such as Falcon's ALiBi,
    built from the shard's own key positions) is an error: the sharded attention applies masks as
    visibility at global positions, so the bias would be dropped."""
    if mask.dtype != torch.bool and hf_masks.float_mask_kind(mask) == "bias":
        raise ValueError(f"{_WHO}: attention site {name!r} got an attention mask holding a bias (values other "
                         f"than 0 / -inf, e.g. ALiBi), which context parallelism cannot carry across shards "
                         f"(it would be dropped); not supported")


def _check_decode_mask(name: str, mask: Tensor | None, tq: int, length: int, window: int | None,
                       chunk: int | None = None) -> None:
    """A decode step's mask (over the whole cache: `length` keys, the `tq` queries the newest) may only
    say "causal", within the causal sliding window `window` or chunks of `chunk` tokens (as the step's
    model builds them, with no padding: chunks counted from position 0) if given: the padding of a
    batch travels in the sharded cache (and in its left padding, for chunks), not in the step's mask."""
    if mask is None:
        return
    if hf_masks.compact_of(mask) is not None:
        keys = hf_masks.key_mask(mask)
        if keys is None or bool(keys.all()):
            return
        what = "padding"
    else:
        _refuse_bias(name, mask)
        visible = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
        q_pos = torch.arange(length - tq, length, device=mask.device)
        k_pos = torch.arange(length, device=mask.device)
        want = in_causal_window(q_pos, k_pos, window) if window is not None else k_pos[None, :] <= q_pos[:, None]
        if chunk is not None:
            want = want & (q_pos[:, None] // chunk == k_pos[None, :] // chunk)
        if visible.shape[-2:] == want.shape and torch.equal(visible, want.expand_as(visible)):
            return
        what = hf_masks.full_reason(mask) or "a mask the model built itself"
    raise ValueError(f"{_WHO}: attention site {name!r} got a mask other than plain causal attention"
                     f"{f' in a window of {window} keys' if window is not None else ''}"
                     f"{f' in chunks of {chunk} tokens' if chunk is not None else ''} during sharded-cache "
                     f"decoding ({what}); not supported")


@contextmanager
def context_parallel(model: nn.Module, group=None, *, layout: str = "contiguous", seq_len: int | None = None,
                     exchange: str = "auto", packed: bool = False, dense: str = "ring") -> Iterator[None]:
    """Run `model` (rewritten) on this rank's shard of one sequence, attending the whole sequence.

    Every rank of `group` (a ProcessGroup or 1-D DeviceMesh) must run the same forward (and
    backward). Inputs: this rank's tokens and their global `position_ids` (`shard_inputs`);
    `seq_len`: the real length when the sequence was padded; `exchange`: `moba_attention_cp`'s (how
    MoBA sites reach remote blocks: `auto`, `keys`, `queries`); `packed`: the sequence packs several
    documents, its `position_ids` restarting at each (`shard_inputs(..., position_ids=)`), and every
    token attends only its own document, as transformers does for packed position ids without an
    attention mask (every site then all-gathers K/V, as sliding-window sites do); `dense`: how plain
    causal dense sites see the other ranks' keys, `ring` (ring attention: each rank's K/V passed
    around, never more than two shards held) or `gather` (one all-gather of the whole sequence's
    K/V, kept for the backward; one exchange instead of `W - 1`). Each attention
    module of the model is checked to have gone through the sharded attention, and `position_ids`
    to be given."""
    check_rewritten(model)
    pg = resolve_group(group, _WHO)
    check_layout(layout, _WHO)
    check_mode(exchange, _WHO)
    if not isinstance(packed, bool):
        raise ValueError(f"{_WHO}: packed must be True or False, got {packed!r}")
    if dense not in DENSE_FORMS:
        raise ValueError(f"{_WHO}: dense must be one of {', '.join(map(repr, DENSE_FORMS))}, got {dense!r}")
    hook = _ShardedAttention(pg, layout, seq_len, exchange, dense)
    hook.packed = packed
    tuned = temperature_tuned(model)
    hook.tuned = {id(m) for m in tuned}
    numbering = [] if hf_masks.takes_argument(model, "position_ids") else numbering_modules(model)
    if numbering and packed:
        raise ValueError(f"{_WHO}: packed=True, but {type(model).__name__} takes no position_ids (it numbers its "
                         f"tokens itself), so it cannot read packed documents from them")
    recurrent = hf_cp_linear.recurrent_layers(model)
    if recurrent and packed:
        raise ValueError(f"{_WHO}: packed=True, but {type(model).__name__} has recurrent or convolution layers (gated "
                         f"delta nets, Mamba-2, short convolutions), whose state would have to restart at every "
                         f"document; shard packed documents of attention-only models")
    handles = [model.register_forward_pre_hook(_prepare_call(pg, layout, hook, drop_positions=bool(numbering)),
                                               with_kwargs=True)]
    if numbering:  # BART-style decoders: their position embeddings get the global positions
        handles += GlobalNumbering(hook, numbering).register(model)
    rope = GlobalRopeLength(hook, position_scaled_rotary(model))  # dynamic NTK, LongRoPE: the whole sequence's length
    handles += rope.register()
    for name, m in _attention_modules(model):
        handles.append(m.register_forward_hook(_went_through(hook, name)))
    carried_convs = {id(c) for _, m in recurrent for c in m.modules() if isinstance(c, nn.Conv1d)}
    for label, conv in _sequence_convolutions(model):
        if id(conv) not in carried_convs:  # a recurrent layer's convolution is carried across ranks (hf_cp_linear)
            handles.append(conv.register_forward_pre_hook(_refuse_when_run(model, label)))
    previous, hf.CONTEXT_PARALLEL = hf.CONTEXT_PARALLEL, hook
    sharded, hf_masks.SHARDED = hf_masks.SHARDED, True
    import transformers.masking_utils as masking_utils

    find_packed = masking_utils.find_packed_sequence_indices
    if packed:
        masking_utils.find_packed_sequence_indices = _packing_reader(hook)
    try:
        with TemperatureTuning(tuned), hf_cp_linear.sharded_recurrent_layers(
                recurrent, pg, layout, seq_len=seq_len, decoding=lambda: hook.decode_len is not None):
            yield
    finally:
        hf.CONTEXT_PARALLEL = previous
        hf_masks.SHARDED = sharded
        rope.restore()
        masking_utils.find_packed_sequence_indices = find_packed
        for h in handles:
            h.remove()


def _prepare_call(pg: dist.ProcessGroup, layout: str, hook: _ShardedAttention, drop_positions: bool = False):
    """Forward pre-hook of the model: global `position_ids` must be given (checked against the
    layout), and an all-ones `attention_mask` is added when none is: transformers reads a jump in
    `position_ids` without a mask as the start of a packed sequence and would cut attention there.
    A given `attention_mask` (this rank's shard of the batch's padding mask) becomes the key
    padding mask of every attention call of this forward. `drop_positions`: the model takes no
    `position_ids` (it numbers its tokens itself, `hf_cp_positions`): they are checked, then not
    passed on."""
    def prepare(module, args, kwargs):
        args, kwargs = _prepare(module, args, kwargs)
        if drop_positions:
            kwargs = {k: v for k, v in kwargs.items() if k != "position_ids"}
        return args, kwargs

    def _prepare(module, args, kwargs):
        if len(args) > 1:
            raise ValueError(f"{_WHO}: call the model with keyword arguments (input_ids=, position_ids=, ...)")
        if hook.decode_len is not None:  # a sharded-cache decode step: the same new token on every rank
            hook.start_forward(None)
            return args, kwargs
        pos = kwargs.get("position_ids")
        ids = kwargs.get("input_ids", args[0] if args else None)
        if pos is None:
            raise ValueError(f"{_WHO}: pass position_ids= (this rank's global positions, from shard_inputs): "
                             f"without them the model would number each shard's tokens from 0")
        t = pos.shape[-1]
        if ids is not None and ids.shape[-1] != t:
            raise ValueError(f"{_WHO}: position_ids hold {t} positions for {ids.shape[-1]} tokens")
        rows = pos.reshape(-1, t)
        given = kwargs.get("attention_mask")
        batch = ids.shape[0] if ids is not None else rows.shape[0]
        if t % chunks_per_rank(layout):
            raise ValueError(f"{_WHO}: {t} tokens per rank cannot be cut into the {layout} layout's chunks")
        want = ShardLayout(layout, dist.get_world_size(pg), t).positions(dist.get_rank(pg), pos.device)
        documents = None
        if hook.packed:
            if given is not None:
                raise ValueError(f"{_WHO}: packed=True with an attention_mask: transformers reads packed documents "
                                 f"from position_ids only when no attention_mask is given; pass one or the other")
            documents, positions = _documents(rows.expand(batch, -1), pg, layout)
        elif not hook.custom_positions and not torch.equal(rows, want.expand(rows.shape[0], -1)):
            raise ValueError(f"{_WHO}: position_ids are not this rank's global positions in the {layout} layout "
                             f"(shard_inputs gives them; for packed sequences, positions restarting at each "
                             f"document, pass packed=True to context_parallel and position_ids= to shard_inputs)")
        if documents is not None:  # no mask: transformers then reads packing from position_ids (recorded)
            hook.start_forward(None, documents, positions)
        elif given is None:
            kwargs = {**kwargs, "attention_mask": torch.ones((batch, t), dtype=torch.long, device=pos.device)}
            hook.start_forward(None)
        else:
            if not isinstance(given, Tensor) or given.dim() != 2 or tuple(given.shape) != (batch, t):
                got = tuple(given.shape) if isinstance(given, Tensor) else type(given).__name__
                raise ValueError(f"{_WHO}: attention_mask must be this rank's shard [B, T_local] = {[batch, t]} of the "
                                 f"batch's 2-D padding mask (shard_attention_mask), got {got}; other masks cannot be "
                                 f"sharded")
            hook.start_forward(check_key_padding(given, (batch, t), pos.device, _WHO))
        return args, kwargs
    return prepare


def _packing_reader(hook: _ShardedAttention):
    """Stands for transformers' `find_packed_sequence_indices` under `packed=True`: records that the
    model's mask creation reads packing from position_ids (so one process masks each document) and
    says "not packed" (the shard's local view of its documents is not the sequence's; the sharded
    attention applies the global documents itself)."""
    def find_packed_sequence_indices(position_ids: Tensor) -> None:
        hook.packing_read = True
        return None
    return find_packed_sequence_indices


def _documents(local_positions: Tensor, pg: dist.ProcessGroup, layout: str) -> tuple[Tensor, Tensor]:
    """(each token's document, its position id), `[B, W * T_local]` in sequence order, from every
    rank's position ids (one all-gather): a new document wherever a position is not its
    predecessor's plus one, as transformers' `find_packed_sequence_indices` reads a packed sequence."""
    positions = gather_sequence(local_positions.long(), pg, layout, dim=1, who=_WHO)
    step = torch.diff(positions, prepend=positions[:, :1] - 1, dim=-1)
    return (step != 1).cumsum(-1), positions


def _went_through(hook: _ShardedAttention, name: str):
    def check(module, args, output):
        if id(module) not in hook.seen:
            raise RuntimeError(f"{_WHO}: attention module {name!r} ran without the context-parallel attention (it "
                               f"bypasses the attention interface), so it saw only this rank's tokens")
        hook.seen.discard(id(module))
    return check
