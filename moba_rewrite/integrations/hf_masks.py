"""Compact masks for the `moba_sdpa` / `moba_eager` attention implementations of transformers.

transformers builds one attention mask per forward through `AttentionMaskInterface`
(`masking_utils.create_causal_mask` -> `sdpa_mask` / `eager_mask`). For a causal model that
mask is the causal cut AND a key-padding mask, yet under tracing (torch.compile, torch.export)
or with padding it is materialised as `[B, 1, Tq, Tk]`: O(T^2) memory, and the MoBA kernels'
slow general path. The mask functions registered here return, where that is provably the whole
mask, its compact form instead:

* nothing (None) for plain causal input of sdpa-origin models with as many keys as queries (or
  one query): where transformers' own function returns None too; with more keys than queries
  (chunked prefill) an all-True key mask, so that None reaching the attention function with
  more keys than queries is always transformers' own skip (which SDPA aligns top-left);
* the key-padding mask `[B, 1, 1, Tk]` for padded batches (bool for sdpa-origin models; for
  eager-origin models additive 0 / `finfo.min` of the model's dtype, always given, so the dtype
  the original mask had is known).

A compact tensor carries a marker attribute (`Compact`, attributes survive torch.compile and
torch.export), so the attention function reads it as "causal AND this key mask" and calls the
op with `causal=True`; any other mask (a user's 4-D mask, one the model derived from ours) is
read as a full mask, exactly as before. Dense sites get the mask their original function
expects, rebuilt from the compact form by the original mask function (`dense_mask`).

Compacted only when it is provably the same mask: the plain causal mask function, no key
offset, queries that are the newest `Tq` of `Tk` keys (no static-cache slots), and a caller
that allows transformers' own causal skip (`allow_is_causal_skip`: Falcon's ALiBi builds on
the materialised mask and passes False). Sliding windows, chunked attention, packed sequences
(transformers cannot rule out `position_ids` restarts while tracing without a 2-D mask and a
cache), extra and/or mask functions and static caches keep the original mask, tagged with why
(`full_reason`) for the report.

Float masks that are not ours (a bias such as Falcon's ALiBi in the mask, a user's mask) are
read per call: `float_mask_kind` says whether they hold only 0 and huge negatives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import Tensor

from moba_rewrite.attention.checked import only_visibility

MARK = "_moba_compact"          # attribute of a compact mask: a `Compact`
DENSE_CACHE = "_moba_dense"     # attribute of a compact mask: the rebuilt original mask
FULL_REASON = "_moba_full"      # attribute of an original mask we kept: why it was not compacted
ADDITIVE = "_moba_additive"     # attribute of an eager-origin mask we built: 0 / finfo.min only
WINDOW = "_moba_window"         # attribute of a kept causal sliding-window mask (while sharded): its window
CHUNK = "_moba_chunk"           # attribute of a kept chunked-attention mask (while sharded): its chunk size

# Set by `integrations.hf_cp` while a sequence is sharded: a mask that cannot be compacted is then always
# materialised with its reason (a causal sliding window also with its window, chunked attention with its
# chunk size), so the sharded attention
# applies the window at global positions and every rank sees the same kind of mask (transformers skips
# a mask when a shard is no longer than the window or has no padding, which would hide it on some ranks).
SHARDED = False


@dataclass(frozen=True)
class Compact:
    """What a compact mask stands for: the causal cut AND its key mask (`padded`: a key is hidden
    somewhere, or may be, under tracing; else the tensor hides nothing)."""

    padded: bool


def _original(origin: str) -> Callable:
    from transformers.masking_utils import eager_mask, sdpa_mask

    return sdpa_mask if origin == "sdpa" else eager_mask


def _statically_equal(a: Any, b: Any) -> bool:
    """`a == b` for ints and SymInts, without adding a guard (False when it is not known)."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    try:
        from torch.fx.experimental.symbolic_shapes import statically_known_true

        return bool(statically_known_true(a == b))
    except Exception:  # pragma: no cover - symbolic internals
        return False


def _closure_functions(fn: Callable, depth: int = 0) -> Iterator[Callable]:
    """`fn` and the functions its closure combines (and_masks, or_masks, overlays, ...), depth
    first. Plain Python introspection: eager mode only (nothing while compiling)."""
    if torch.compiler.is_compiling():
        return
    yield fn
    if depth >= 4:
        return
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            content = cell.cell_contents
        except ValueError:
            continue
        for item in content if isinstance(content, (tuple, list)) else (content,):
            if callable(item) and hasattr(item, "__code__"):
                yield from _closure_functions(item, depth + 1)


def _parts(fn: Callable) -> list[str]:
    """Qualified names of a mask function and of the functions its closure combines (the report's
    discovery)."""
    return [getattr(f, "__qualname__", "") or getattr(f, "__name__", "") for f in _closure_functions(fn)]


def _overlay_constant(fn: Callable, overlay: str, name: str) -> int | None:
    """The positive int `name` in the closure of transformers' `overlay` mask function found among `fn`
    and the functions it combines; None when there is none."""
    for f in _closure_functions(fn):
        if not getattr(f, "__qualname__", "").startswith(f"{overlay}."):
            continue
        cell = dict(zip(f.__code__.co_freevars, f.__closure__ or ())).get(name)
        try:
            value = cell.cell_contents if cell is not None else None
        except ValueError:
            value = None
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def sliding_window_of(fn: Callable) -> int | None:
    """The window `W` of transformers' causal sliding-window mask function (a key is visible when
    `q - W < k <= q`), read from its `sliding_window_overlay` closure; None when `fn` holds none."""
    return _overlay_constant(fn, "sliding_window_overlay", "sliding_window")


def chunk_size_of(fn: Callable) -> int | None:
    """The chunk size `C` of transformers' chunked causal mask function (Llama 4's local layers: a
    key is visible when it is causal and `(k - left_padding) // C == (q - left_padding) // C`), read
    from its `chunked_overlay` closure; None when `fn` holds none."""
    return _overlay_constant(fn, "chunked_overlay", "chunk_size")


def _function_name(fn: Callable) -> str:
    if torch.compiler.is_compiling():  # the words are for the report, made in eager mode (Dynamo cannot read
        return "a mask function other than the causal one"  # every function's __qualname__)
    name = " ".join(p for p in _parts(fn) if isinstance(p, str))
    if "sliding" in name:
        return "a sliding window"
    if "chunk" in name:
        return "chunked attention"
    if "bidirectional" in name:
        return "bidirectional attention"
    if "packed" in name or "remap" in name:
        return ("packed sequences (position_ids restarts; while tracing without a 2-D attention_mask and a cache, "
                "transformers cannot rule them out)")
    if "and_mask" in name or "or_mask" in name:
        return "a combined mask function (extra and/or masks)"
    return f"the mask function {name or type(fn).__name__}"


def why_not_compact(q_length: Any, kv_length: Any, q_offset: Any, kv_offset: Any, mask_function: Callable,
                    kwargs: dict) -> str:
    """Why this mask cannot be replaced by its compact form ('' when it can)."""
    from transformers.masking_utils import causal_mask_function

    if mask_function is not causal_mask_function:
        return _function_name(mask_function)
    if kwargs.get("local_size") is not None:
        return "local attention"
    if not kwargs.get("allow_is_causal_skip", True):
        return "the model builds on the materialised mask (allow_is_causal_skip=False, e.g. an ALiBi bias)"
    if isinstance(q_offset, Tensor):
        return "a static cache (query positions known only at run time)"
    if not (isinstance(kv_offset, int) and kv_offset == 0):
        return "a key offset (sliding or chunked cache)"
    if not _statically_equal(q_offset + q_length, kv_length):
        return "keys beyond the queries (static-cache slots)"
    return ""


def _key_padding(attention_mask: Tensor | None, kv_length: Any) -> Tensor | None:
    """The 2-D key mask as the original mask function reads it (`[B, kv_length]` bool), or None."""
    if attention_mask is None:
        return None
    from transformers.masking_utils import prepare_padding_mask

    pad = prepare_padding_mask(attention_mask, kv_length, 0)
    return pad[:, :kv_length].to(torch.bool)


def make_mask_function(origin: str) -> Callable:
    """The `AttentionMaskInterface` function registered for `moba_<origin>`."""

    def moba_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                  mask_function: Callable | None = None, attention_mask: Tensor | None = None, **kwargs):
        from transformers.masking_utils import causal_mask_function

        mask_function = causal_mask_function if mask_function is None else mask_function
        why = why_not_compact(q_length, kv_length, q_offset, kv_offset, mask_function, kwargs)
        if why:
            window = sliding_window_of(mask_function) if SHARDED else None
            chunk = chunk_size_of(mask_function) if SHARDED else None
            if SHARDED:  # every rank keeps the mask and its reason, whatever its own tokens are (padding
                kwargs = {**kwargs, "allow_is_causal_skip": False}  # on one rank only), so all refuse alike
            out = _original(origin)(batch_size=batch_size, q_length=q_length, kv_length=kv_length,
                                    q_offset=q_offset, kv_offset=kv_offset, mask_function=mask_function,
                                    attention_mask=attention_mask, **kwargs)
            if isinstance(out, Tensor):
                setattr(out, FULL_REASON, why)
                if window is not None:
                    setattr(out, WINDOW, window)
                if chunk is not None:
                    setattr(out, CHUNK, chunk)
                if out.dtype.is_floating_point:
                    setattr(out, ADDITIVE, True)  # eager_mask: where(mask, 0, finfo.min)
            return out
        pad = _key_padding(attention_mask, kv_length)
        if pad is not None and not _tracing(pad) and bool(pad.all()):
            pad = None  # hides nothing (transformers skips such masks the same way)
        device = kwargs.get("device", "cpu") if pad is None else pad.device
        if origin == "sdpa":
            if pad is None and (_statically_equal(kv_length, q_length) or _statically_equal(q_length, 1)):
                return None  # what transformers' own function returns (its causal skip)
            # keys beyond the queries (chunked prefill): a tensor, so that None at the attention function
            # only ever means transformers' own skip, which SDPA aligns top-left (dense sites keep it)
            compact = pad[:, None, None, :] if pad is not None else torch.ones(
                (batch_size, 1, 1, kv_length), dtype=torch.bool, device=device)
        else:
            dtype = kwargs.get("dtype", torch.float32)
            if pad is None:
                compact = torch.zeros((batch_size, 1, 1, kv_length), dtype=dtype, device=device)
            else:
                compact = torch.where(pad[:, None, None, :], torch.zeros((), dtype=dtype, device=device),
                                      torch.finfo(dtype).min)
        setattr(compact, MARK, Compact(padded=pad is not None))
        return compact

    moba_mask.__name__ = moba_mask.__qualname__ = f"moba_{origin}_mask"
    return moba_mask


def compact_of(mask: Any) -> Compact | None:
    """The marker of a compact mask built here, else None."""
    return getattr(mask, MARK, None) if isinstance(mask, Tensor) else None


def key_mask(mask: Tensor) -> Tensor | None:
    """A compact mask as the op takes it with `causal=True`: the bool key mask `[B, 1, 1, Tk]` or None."""
    if not compact_of(mask).padded:
        return None
    return mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2


def dense_mask(origin: str, mask: Tensor | None, query: Tensor, key: Tensor, causal: bool) -> Tensor | None:
    """The mask the original attention function would have received, for a dense site.

    A compact mask (or, for sdpa-origin models, None at a causal site: ours, or transformers'
    own skip, which the rebuild reproduces) is rebuilt by the original mask function from the
    same arguments, so the dense site stays bit-for-bit what it was (in eager mode that is None
    again for plain causal input); other masks pass through. The rebuilt mask is kept on the
    compact tensor for the next dense layer of the forward."""
    info = compact_of(mask)
    # None: ours for plain causal input with as many keys as queries (the rebuild gives None again in
    # eager mode, the materialised mask under tracing); with more keys, transformers' own skip, kept
    if info is None and not (mask is None and origin == "sdpa" and causal and 1 < query.shape[2] == key.shape[2]):
        return mask
    if info is not None:
        cached = getattr(mask, DENSE_CACHE, None)
        if cached is not None:
            return cached
    from transformers.masking_utils import causal_mask_function

    tq, tk = query.shape[2], key.shape[2]
    pad = None
    if info is not None and info.padded:
        pad = key_mask(mask)[:, 0, 0, :]
    kwargs: dict[str, Any] = {"device": query.device if mask is None else mask.device}
    if origin == "eager":
        kwargs["dtype"] = mask.dtype if mask is not None else query.dtype
    out = _original(origin)(batch_size=query.shape[0], q_length=tq, kv_length=tk, q_offset=tk - tq, kv_offset=0,
                            mask_function=causal_mask_function, attention_mask=pad, allow_is_causal_skip=True,
                            use_vmap=False, **kwargs)
    if info is not None:
        setattr(mask, DENSE_CACHE, out)
    return out


def window_of(mask: Any) -> int | None:
    """The window of a causal sliding-window mask kept while sharded (`SHARDED`), else None."""
    return getattr(mask, WINDOW, None) if isinstance(mask, Tensor) else None


def chunk_of(mask: Any) -> int | None:
    """The chunk size of a chunked-attention mask kept while sharded (`SHARDED`), else None."""
    return getattr(mask, CHUNK, None) if isinstance(mask, Tensor) else None


def full_reason(mask: Any) -> str:
    """Why a full mask was kept (set by our mask functions), '' when unknown."""
    return getattr(mask, FULL_REASON, "") if isinstance(mask, Tensor) else ""


def float_mask_kind(mask: Tensor) -> str:
    """How MoBA may read a float mask that is not compact: `additive` (provably 0 / huge negative:
    built by our mask functions), `unknown` (traced, so its values are read per call by
    `moba::attention_checked_mask`), or, read now, `additive` or `bias` (other values: ALiBi, T5 buckets, a user bias)."""
    if getattr(mask, ADDITIVE, False):
        return "additive"
    if _tracing(mask):
        return "unknown"
    return "additive" if only_visibility(mask) else "bias"


def visibility(mask: Tensor) -> Tensor:
    """A 0 / huge-negative float mask as MoBA's boolean mask (True = may attend)."""
    return mask > torch.finfo(mask.dtype).min / 2


def additive_visibility(mask: Tensor) -> Tensor:
    """A 0 / huge-negative float mask as MoBA's additive mask: the same keys visible (hidden ones at
    -inf, which is what hides a key in a float mask), differentiable in the visible values."""
    return mask.masked_fill(~visibility(mask), float("-inf"))


# --------------------------------------------------------------------------------------------
# Cache-less calls without a mask: say that the sequences are not packed

_HOOK = "_moba_unpacked_hook"
_CACHE_KWARGS = ("past_key_values", "cache", "cache_position", "position_ids", "attention_mask")


def takes_argument(module: Any, name: str) -> bool:
    """Whether `type(module).forward` names the parameter `name` (not only `**kwargs`)."""
    import inspect

    try:
        return name in inspect.signature(type(module).forward).parameters
    except (TypeError, ValueError):
        return False


def _tracing(x: Tensor) -> bool:
    """Whether `x` flows through a trace (Dynamo / torch.compile, torch.export, torch.fx)."""
    from torch._subclasses.fake_tensor import is_fake

    return bool(torch.compiler.is_compiling() or isinstance(x, torch.fx.Proxy) or is_fake(x))


def _unpacked_hook(module: Any, args: tuple, kwargs: dict):
    """`forward` pre-hook, while tracing only: a call with no attention_mask, no position_ids, no
    cache and `use_cache=False` gets an all-ones attention_mask.

    Without it transformers cannot rule out packed sequences while tracing (it derives them
    from position_ids restarts) and materialises the full `[T, T]` packed mask. Here the model
    computes its own positions (consecutive: nothing is packed) and there is no cache, so an
    all-ones mask says exactly what is true; the moba mask function then compacts it. In eager
    mode transformers sees that nothing is packed by itself, and the call keeps its own inputs:
    a model may do more with an attention_mask than mask (Qwen3-Omni computes its multimodal
    positions from one), so the hook must not change an eager call."""
    impl = getattr(module.config, "_attn_implementation", "") or ""
    if not impl.startswith("moba_") or any(kwargs.get(k) is not None for k in _CACHE_KWARGS):
        return None
    if kwargs.get("use_cache", getattr(module.config, "use_cache", True)):
        return None
    ids = kwargs.get("input_ids", args[0] if args else None)
    embeds = kwargs.get("inputs_embeds")
    ref = ids if isinstance(ids, Tensor) else embeds
    if (not isinstance(ref, Tensor) or len(args) > 1 or not _tracing(ref)
            or not takes_argument(module, "attention_mask")):
        return None
    shape = ref.shape[:2]
    return args, {**kwargs, "attention_mask": torch.ones(shape, dtype=torch.long, device=ref.device)}


def install_unpacked_hook(model: Any) -> None:
    """Install `_unpacked_hook` on the model (once)."""
    if getattr(model, _HOOK, None) is None and takes_argument(model, "position_ids"):
        setattr(model, _HOOK, model.register_forward_pre_hook(_unpacked_hook, with_kwargs=True))
