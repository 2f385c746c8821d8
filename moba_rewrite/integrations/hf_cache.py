"""MoBA against Hugging Face KV caches: real query positions, block means kept beside the cache.

A transformers attention module updates its cache layer (`cache.update(...)`) and then calls
the attention function with the layer's keys: for a `StaticLayer` the whole preallocated
buffer (`max_cache_len` slots, the unfilled ones zero), for a `DynamicLayer` every token so
far. The attention function does not receive the cache, so a forward pre-hook on each MoBA
attention module passes it along in the keyword arguments (`CACHE_KWARG`) that the module
forwards to the attention function. With it, `attention` here:

* finds the module's cache layer (the one its `cache.update` call wrote, recorded by a mixin on the
  cache's class; `cache.layers[module.layer_idx]` when none was recorded) and the queries' real
  positions: `cumulative_length - Tq + i` for a static layer (a device tensor: no host sync,
  so a compiled decode step keeps it), `Tk - Tq + i` for a dynamic one;
* keeps the gate's block means beside the cache, as a `BlockMeans` object on the cache layer
  (`layer.moba_block_means`): a buffer of `ceil(max_cache_len / block_size)` blocks for a
  static layer (allocated once, static address for CUDA graphs), a buffer grown by doubling for
  a dynamic one; each call recomputes only the block(s) holding the tokens just written;
* calls `moba::attention_kv_cache` (MoBA of the filled prefix, SPEC section 2 item 9).

A plain `DynamicLayer` of a MoBA site becomes a `GrowingDynamicLayer` (`hf_cache_growth`) at its
first eager call: the same tokens, written into a buffer with spare room instead of concatenated,
so a decode step does not copy the whole cache (O(T) per token) before MoBA reads a few blocks.

The means follow the cache: the pre-hook sees the layer's key tensor before each call, and a
tensor other than the one the means describe (beam-search reordering, batch selection, crop,
reset, a cache filled elsewhere) makes them recomputed from the cache at that call.

Sliding-window cache layers drop old keys, so MoBA's blocks (cut from position 0) and their
means are gone once the window slides: their first call (prefill into an empty cache) runs
MoBA, later calls (decode, chunked prefill) run the original attention, and the report says so.
Cache layers of other kinds (quantized, offloaded to a different layout, ...) whose keys are all
tokens from position 0 are handled like dynamic ones; anything else gets the caller's default.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any

import torch
from torch import Tensor, nn

from moba_rewrite.attention import kv_cache as kv_op
from moba_rewrite.attention import op as moba_op
from moba_rewrite.attention.block_means import key_block_means, refresh_key_block_means_, update_key_block_means_
from moba_rewrite.kernels.mask_forms import key_prefix
from moba_rewrite.kernels.threads import single_threaded

CACHE_KWARG = "moba_kv_cache"
_CACHE_NAMES = ("cache", "past_key_values", "past_key_value", "layer_past")
DENSE = "dense"  # `attention` answer: run the original attention for this call


class KVCacheError(ValueError):
    """A KV cache that cannot hold what the model is about to write into it."""


class BlockMeans:
    """The gate's block means of one cache layer: `means` `[B, Hkv, NB, D]` (fp32; fp64 for fp64
    keys), valid for the first `ceil(filled / block_size)` blocks of the keys tensor `keys_ref`."""

    def __init__(self, means: Tensor, block_size: int, keys: Tensor) -> None:
        self.means = means
        self.block_size = block_size
        self.tokens = 0  # dynamic layers: tokens the means cover
        self.stale = False
        self.keys_ref = weakref.ref(keys)

    def __getstate__(self) -> dict:  # pickled or copied: the copy is stale (rebuilt from its keys when used)
        return {**self.__dict__, "keys_ref": None, "stale": True}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.keys_ref = _no_keys

    def fits(self, keys: Tensor, block_size: int, n_blocks: int) -> bool:
        m = self.means
        # means made in inference mode cannot be updated in place outside it (and vice versa): rebuild
        # (not asked under tracing, which cannot read it and runs in one mode)
        return (not self.stale and self.block_size == block_size and m.shape[2] >= n_blocks
                and (torch.compiler.is_compiling() or m.is_inference() == torch.is_inference_mode_enabled())
                and tuple(m.shape[:2]) == tuple(keys.shape[:2]) and m.shape[3] == keys.shape[3]
                and m.device == keys.device and m.dtype == _means_dtype(keys))


def _no_keys() -> None:
    return None


def _means_dtype(keys: Tensor) -> torch.dtype:
    return torch.promote_types(keys.dtype, torch.float32)


# --------------------------------------------------------------------------------------------
# The pre-hook that hands the cache to the attention function


def install(module: nn.Module) -> None:
    """Pass the module's cache to the attention function from now on (idempotent). Modules whose
    forward takes no `**kwargs` cannot forward it and are left alone."""
    uninstall(module)
    import inspect

    params = inspect.signature(module.forward).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        module._moba_cache_hook = module.register_forward_pre_hook(_pre_hook, with_kwargs=True)


def uninstall(module: nn.Module) -> None:
    handle = module.__dict__.pop("_moba_cache_hook", None)
    if handle is not None:
        handle.remove()


def _pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    cache = next((kwargs[n] for n in _CACHE_NAMES if kwargs.get(n) is not None), None)
    if cache is None or getattr(module, "is_cross_attention", False):
        return None
    target = getattr(cache, "self_attention_cache", cache)  # EncoderDecoderCache: the decoder's own
    if not torch.compiler.is_compiling():
        _record_writes(target)
        target._moba_writer = module
    if isinstance(target, _RecordsWrites):
        target._moba_written = None  # this module's own `cache.update` call sets it
    kwargs[CACHE_KWARG] = cache
    return args, kwargs


class _RecordsWrites:
    """Mixed into a cache's class (`_record_writes`): `update` notes which layer it writes, so the
    attention function that follows finds the layer the module really wrote. Models that run their
    layers in loops write layer `layer_idx + offset` (Dory's `cache_offset`, HRM's `cycle_offset`,
    Inkling2's loops), so `module.layer_idx` names the wrong one. The eager checks of the writing
    MoBA module (`_before_update`) run here too, on that layer and before the write."""

    _moba_written: int | None = None  # layer index of the last `update`
    _moba_writer: nn.Module | None = None  # the MoBA module whose forward is running (eager only)

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args: Any, **kwargs: Any) -> Any:
        self._moba_written = layer_idx
        writer = self._moba_writer
        if writer is not None and not torch.compiler.is_compiling():
            self._moba_writer = None
            _before_update(writer, self, layer_idx, key_states)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def __reduce_ex__(self, protocol: Any) -> Any:
        """Pickled and copied as the cache's own class (this one is made at run time; a copy gets it
        again at its next eager call), without the module being run."""
        state = {k: v for k, v in self.__dict__.items() if k not in ("_moba_writer", "_moba_written")}
        return _plain_cache, (type(self).__mro__[2], state)


def _plain_cache(kind: type, state: dict) -> Any:
    cache = kind.__new__(kind)
    cache.__dict__.update(state)
    return cache


_RECORDING_CLASSES: dict[type, type] = {}


def _record_writes(cache: Any) -> None:
    """Give `cache` the class `_RecordsWrites` + its own (once; the same object, state and isinstance)."""
    kind = type(cache)
    if issubclass(kind, _RecordsWrites) or not callable(getattr(cache, "update", None)) \
            or not isinstance(getattr(cache, "layers", None), list):
        return
    sub = _RECORDING_CLASSES.get(kind)
    if sub is None:
        sub = _RECORDING_CLASSES[kind] = type(kind.__name__, (_RecordsWrites, kind), {"__module__": kind.__module__})
    cache.__class__ = sub


def _before_update(module: nn.Module, cache: Any, layer_idx: int, new_keys: Tensor) -> None:
    """Eager checks before `module` writes `new_keys` into layer `layer_idx` of `cache`: the layer can
    hold them, and the means still describe the layer's keys (else they are recomputed at the next call)."""
    layers = cache.layers
    if not isinstance(layer_idx, int) or not 0 <= layer_idx < len(layers):
        return  # a layer the cache appends on this write: nothing kept yet
    layer = layers[layer_idx]
    state = layer.__dict__.get("moba_block_means")
    if state is not None and state.keys_ref() is not getattr(layer, "keys", None):
        state.stale = True
    static, dynamic = _kinds()
    if type(layer) is dynamic:  # decode steps write in place instead of concatenating the whole cache
        from moba_rewrite.integrations.hf_cache_growth import grow_in_place

        grow_in_place(layer)
    if not isinstance(new_keys, Tensor) or new_keys.dim() < 2 or not isinstance(layer, static) or layer.is_sliding:
        return
    new_tokens, size = new_keys.shape[-2], layer.max_cache_len
    if layer.is_initialized and layer.keys.is_cuda and new_tokens == 1:
        return  # decode on a GPU: reading the length would cost a sync per layer and step
    held = int(layer.cumulative_length) if layer.is_initialized else 0
    if held + new_tokens > size:
        raise KVCacheError(
            f"StaticCache too small: layer {layer_idx} ({getattr(module, '_moba_site', type(module).__name__)}) holds "
            f"max_cache_len={size} tokens but this call writes positions {held}..{held + new_tokens - 1} "
            f"({new_tokens} new); build it with max_cache_len >= {held + new_tokens}")


# --------------------------------------------------------------------------------------------
# Cache layers


# transformers' own sliding cache layers, whose counters `attention` reads; subclasses (a model's own
# sliding layers) run the original attention on every cached call
_STANDARD_SLIDING_LAYERS = ("DynamicSlidingWindowLayer", "StaticSlidingWindowLayer")


def sliding_note(module: nn.Module) -> str:
    """The report's words for a site whose cache layer is a sliding window (else "")."""
    kind, _ = _layer_kind(module)
    if kind is not None and kind not in _SLIDING_KINDS and "sliding" in kind:
        return (f"; cache layer kind {kind!r} (the model's own sliding cache): calls with a KV cache (generate()) "
                f"run the original dense attention")
    if sliding_cache_window(module) is None:
        return ""
    return ("; sliding-window cache: calls after the prefill (decode, chunked prefill) run the original dense "
            "attention over the window, which drops the keys MoBA's blocks need")


_SLIDING_KINDS = ("sliding_attention", "chunked_attention", "hybrid_sliding")


def _layer_kind(module: nn.Module) -> tuple[str | None, int | None]:
    """(layer type, its `sliding_window` kwarg) transformers' cache gives this attention module,
    read from the module's config ((None, None): not described)."""
    config, idx = getattr(module, "config", None), getattr(module, "layer_idx", None)
    if config is None or not isinstance(idx, int):
        return None, None
    try:
        from transformers.cache_utils import get_layer_types_and_kwargs

        kinds, kwargs = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
    except Exception:  # noqa: BLE001 (configs that do not describe their layers)
        return None, None
    return (str(kinds[idx]), kwargs[idx].get("sliding_window")) if idx < len(kinds) else (None, None)


def sliding_cache_window(module: nn.Module) -> int | None:
    """The window of the sliding cache layer `generate()` gives this attention module (it keeps the
    last `window - 1` tokens, so a decode step sees `window` keys), None for a layer that keeps every
    key. Read from transformers' layer types and kwargs of the module's config; the module's own
    `sliding_window` where the config names none."""
    kind, window = _layer_kind(module)
    if kind is not None and kind not in _SLIDING_KINDS:
        return None
    window = window if window is not None else getattr(module, "sliding_window", None)
    return int(window) if window is not None else None


_KINDS: tuple[type, type] | None = None


def _kinds() -> tuple[type, type]:
    """(StaticLayer, DynamicLayer) of transformers, imported once."""
    global _KINDS
    if _KINDS is None:
        from transformers.cache_utils import DynamicLayer, StaticLayer

        _KINDS = (StaticLayer, DynamicLayer)
    return _KINDS


def cache_layer(module: nn.Module, cache: Any) -> Any | None:
    """The cache layer the module writes into, or None when there is none to find."""
    cache = getattr(cache, "self_attention_cache", cache)  # EncoderDecoderCache: the decoder's own
    idx = getattr(cache, "_moba_written", None)  # the layer this module's `update` wrote (looped models)
    if idx is None:
        idx = getattr(module, "layer_idx", None)
    layers = getattr(cache, "layers", None)
    if not isinstance(idx, int) or not isinstance(layers, list) or not 0 <= idx < len(layers):
        return None
    return layers[idx]


def _read_target(layer: Any) -> tuple[Any, bool]:
    """(`layer`, False), or (the layer it reads, True) for a cache layer that reads another without
    writing into it (Dory's `DoryPastReader`, in its loops before the last: `update` returns what the
    read layer's update would, the new tokens placed after its filled part, and stores nothing)."""
    static, dynamic = _kinds()
    inner = getattr(layer, "layer", None)
    if isinstance(inner, (static, dynamic)) and not isinstance(layer, (static, dynamic)):
        return inner, True
    return layer, False


def _sliding_before(layer: Any, tq: int) -> int:
    """Tokens a sliding-window layer held before this call (Python ints on both layer kinds)."""
    held = getattr(layer, "cumulative_length_int", None)
    if held is None:
        held = layer.cumulative_length
    return int(held) - tq


# --------------------------------------------------------------------------------------------
# The attention call


def queries_are_newest(module: nn.Module, cache: Any, key: Tensor) -> bool:
    """Whether this call's queries are the newest keys of `key`, so an op that places them there
    (`moba::attention`, `moba::attention_checked_mask`) is exact: False for a static layer, whose
    key tensor is the whole preallocated buffer. The layer's kept block means are marked stale
    (the call bypasses them; they are rebuilt when the cache path next runs)."""
    layer = cache_layer(module, cache)
    if layer is None:
        return True
    layer, read_only = _read_target(layer)
    state = layer.__dict__.get("moba_block_means")
    if state is not None and not read_only:
        state.stale = True
    static, _ = _kinds()
    return not (isinstance(layer, static) and not getattr(layer, "is_sliding", False)
                and key.shape[2] == layer.max_cache_len)



def attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, *, causal: bool,
              scale: float, decision: Any, cache: Any, dense_below: int = 0) -> Tensor | str | None:
    """MoBA of this call against the module's cache layer: the output `[B, Hq, Tq, Dv]`, `DENSE` when
    the original attention must run (sliding window already slid, or fewer filled keys than the
    policy's `dense_below`), or None when the cache layer is not one handled here (the caller keeps
    its default)."""
    layer = cache_layer(module, cache)
    if layer is None:
        return None
    layer, read_only = _read_target(layer)
    static, dynamic = _kinds()
    bs, top_k, backend = int(decision.block_size), int(decision.top_k), str(decision.backend)
    tq, tk = query.shape[2], key.shape[2]
    written = 0 if read_only else tq  # this call's tokens already counted by the layer
    if getattr(layer, "is_sliding", False):
        if type(layer).__name__ not in _STANDARD_SLIDING_LAYERS:
            # a model's own sliding layer (UnlimitedOcr keeps the prefill and slides the rest): what it
            # holds and counts is its own, so every cached call runs the original attention
            return DENSE
        if _sliding_before(layer, written) != 0:
            return DENSE
        if tk > tq:  # first call into a sliding static buffer: the filled prefix is the prompt
            key, value = key[:, :, :tq], value[:, :, :tq]
            mask = mask[..., :tq] if mask is not None and mask.shape[-1] > 1 else mask
        return moba_op.run(query, key, value, None, mask, bs, top_k, causal, scale, backend, dense_below)
    kind = "static" if isinstance(layer, static) and tk == layer.max_cache_len else (
        "dynamic" if isinstance(layer, dynamic) and not isinstance(layer, static) else None)
    if kind is None:
        return None
    in_op = kind == "static" and torch.compiler.is_compiling()  # the filled length is a device value: the op decides
    if dense_below and not in_op and moba_op.dense_by_policy(
            backend, _filled(layer, kind, key, tq - written), dense_below):  # the prefill's rule, per cached call
        state = layer.__dict__.get("moba_block_means")
        if state is not None and not read_only:  # this call's keys go uncounted: rebuilt when MoBA next runs
            state.stale = True
        return DENSE
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad):
        return _differentiable(layer, kind, query, key, value, mask, causal, scale, bs, top_k, backend,
                               unwritten=tq - written, keep=not read_only, dense_below=dense_below if in_op else 0)
    # a decode step is a few small ops: on one thread they cannot stall at OpenMP barriers (kernels.threads)
    with single_threaded(key.device) if tq == 1 else contextlib.nullcontext():
        if kind == "static":
            held = None
            if key.device.type == "cpu" and not torch.compiler.is_compiling():  # the length is free to read here
                held = int(layer.cumulative_length) + tq - written
                positions = torch.arange(held - tq, held, device=key.device)
            else:  # a device tensor: no host sync, and one compiled graph serves every step
                positions = layer.cumulative_length - written + torch.arange(tq, device=key.device)
            if read_only:  # the read layer's means describe its own keys, not these: computed here, not kept
                means = key.new_zeros((*key.shape[:2], -(-tk // bs), key.shape[3]), dtype=_means_dtype(key))
                means = update_key_block_means_(means, key, positions, bs, from_start=True)
            else:
                means = _static_means(layer, key, positions, bs, keep=decision.decode == "moba", held=held)
        else:
            positions = torch.arange(tk - tq, tk, device=key.device)
            means = key_block_means(key, bs).to(_means_dtype(key)) if read_only else _dynamic_means(layer, key, tq, bs)
        return kv_op.run(query, key, value, means, positions, _fit_mask(mask, tk), bs, top_k, causal, scale,
                         backend, dense_below if in_op else 0)


def _filled(layer: Any, kind: str, key: Tensor, unwritten: int = 0) -> int:
    """Keys filled in the cache after this call's write (a host read for static caches); `unwritten`:
    this call's tokens that a read-only layer placed in `key` but did not count."""
    if kind == "dynamic":
        return key.shape[2]
    return int(layer.cumulative_length) + unwritten


def _differentiable(layer: Any, kind: str, query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None,
                    causal: bool, scale: float, bs: int, top_k: int, backend: str, *, unwritten: int = 0,
                    keep: bool = True, dense_below: int = 0) -> Tensor:
    """A call that records gradients (training with `use_cache` on): `moba::attention`, which has a
    backward, on the filled prefix (the KV-cache op is inference only; `dense_below` decided there on
    the filled length, where the caller could not). The means are not kept."""
    state = layer.__dict__.get("moba_block_means")
    if state is not None and keep:
        state.stale = True
    filled = int(layer.cumulative_length) + unwritten if kind == "static" else key.shape[2]
    if filled < key.shape[2]:
        key, value = key[:, :, :filled], value[:, :, :filled]
        mask = key_prefix(mask, filled)
    return moba_op.run(query, key, value, None, mask, bs, top_k, causal, scale, backend, dense_below)


def _fit_mask(mask: Tensor | None, length: int) -> Tensor | None:
    """The mask over the cache's slots: longer masks cut, shorter ones extended with hidden slots."""
    if mask is None or mask.shape[-1] in (1, length):
        return mask
    if mask.shape[-1] > length:
        return mask[..., :length]
    hidden = False if mask.dtype == torch.bool else float("-inf")
    return torch.nn.functional.pad(mask, (0, length - mask.shape[-1]), value=hidden)


def _static_means(layer: Any, key: Tensor, positions: Tensor, bs: int, keep: bool, held: int | None) -> Tensor:
    """The layer's means after this call's write at `positions`: the touched blocks are recomputed (by
    slicing when the filled length `held` is known on the host, else by a sync-free gather); a new or
    stale buffer is filled from every filled slot first, and so is one that was not `keep`t current
    (decode steps ran dense, so they did not update it)."""
    n_blocks = -(-key.shape[2] // bs)
    state = layer.__dict__.get("moba_block_means")
    fresh = state is None or not state.fits(key, bs, n_blocks) or not keep
    if fresh:
        means = key.new_zeros((*key.shape[:2], n_blocks, key.shape[3]), dtype=_means_dtype(key))
        if not torch.compiler.is_compiling():
            torch._dynamo.mark_static_address(means)  # CUDA graphs of later decode steps read it in place
        state = layer.moba_block_means = BlockMeans(means, bs, key)
    if held is not None:
        return refresh_key_block_means_(state.means, key, 0 if fresh else held - positions.shape[0], held, bs)
    return update_key_block_means_(state.means, key, positions, bs, from_start=fresh)


def _dynamic_means(layer: Any, key: Tensor, tq: int, bs: int) -> Tensor:
    """The layer's means after this call appended `tq` tokens (all `Tk` known on the host). The buffer
    grows by doubling, so no step concatenates; only the last block(s) are recomputed."""
    tk = key.shape[2]
    n_blocks = -(-tk // bs)
    state = layer.__dict__.get("moba_block_means")
    if state is None or state.tokens != tk - tq or not state.fits(key, bs, 0):
        means = key_block_means(key, bs).to(_means_dtype(key))
        state = layer.moba_block_means = BlockMeans(means, bs, key)
    else:
        if state.means.shape[2] < n_blocks:
            grown = state.means.new_zeros((*state.means.shape[:2], 2 * n_blocks, state.means.shape[3]))
            grown[:, :, :state.means.shape[2]] = state.means
            state.means = grown
        refresh_key_block_means_(state.means, key, tk - tq, tk, bs)
    state.tokens = tk
    state.keys_ref = weakref.ref(key)
    return state.means
