"""Hugging Face integration: MoBA through transformers' `AttentionInterface`.

Models built on the AttentionInterface (Llama, Qwen2, Mistral, Phi-3, Gemma, GPT-2,
GPT-NeoX, BERT, ...) look their attention function up by `config._attn_implementation`.
We register two functions, `moba_sdpa` and `moba_eager` (one per original implementation,
each with the original's mask builder in `AttentionMaskInterface`), and switch the model to
the one matching what it was loaded with. Each attention module carries its own decision
(`module._moba_decision`): MoBA sites compute `moba::attention`, dense sites call the
original function with the original arguments, so they stay bit-for-bit what they were.
Because the KV cache update happens in the module before the attention call, `generate()`
keeps working; a decode step (Tq == 1) follows the decision's `decode` setting. MoBA calls with a
KV cache go through `hf_cache` (real query positions, block means kept beside the cache).

Masks (`hf_masks`): the mask functions registered for the moba implementations hand over
nothing for plain causal input and a compact key mask `[B, 1, 1, Tk]` for padded batches,
marked as such, so a MoBA site calls the op with `causal=True` and nothing O(T^2) exists, in
eager mode and under tracing; dense sites get the original mask, rebuilt. Masks that cannot be
compacted (sliding windows, packed sequences, static caches) stay full: boolean, or additive
0 / `finfo.min` (finite!) converted with `mask > finfo.min / 2` (docs/ARCHITECTURE.md). A float
mask that is not provably 0 / -inf (an ALiBi bias in the mask) keeps the call dense: read per
call in eager mode, and by the op `moba::attention_checked_mask` when traced.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn

from moba_rewrite.attention import checked as _checked  # noqa: F401  (torch.ops.moba.attention_checked_mask)
from moba_rewrite.attention import op as moba_op  # registers torch.ops.moba
from moba_rewrite.integrations import hf_cache, hf_masks, hf_version
from passes.sites import AttentionSite

IMPL_PREFIX = "moba_"
SUPPORTED_ORIGINS = ("sdpa", "eager")
_UNSUPPORTED_KWARGS = {
    "softcap": "attention logit soft-capping",
    "position_bias": "an additive position bias",
    "s_aux": "attention sinks",
    "sinks": "attention sinks",
}


class HFUnsupportedError(RuntimeError):
    """The model cannot be routed through the MoBA attention function."""


# --------------------------------------------------------------------------------------------
# Registration


def is_pretrained(model: nn.Module) -> bool:
    """A transformers `PreTrainedModel` (whether or not its attention uses the AttentionInterface).
    Raises `hf_version.UnsupportedTransformersError` for one when transformers is too old."""
    if "transformers" not in sys.modules:
        return False
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover
        return False
    if not isinstance(model, PreTrainedModel):
        return False
    hf_version.require_supported()
    return True


def is_hf_model(model: nn.Module) -> bool:
    """A transformers `PreTrainedModel` whose attention goes through the AttentionInterface."""
    if not is_pretrained(model):
        return False
    can = getattr(model, "_can_set_attn_implementation", None)
    return bool(can()) if callable(can) else True


def implementations(config: Any, change: Callable[[str], str] = lambda impl: impl) -> dict:
    """transformers' nested `set_attn_implementation` dict: every (sub-)config's own attention
    implementation, mapped by `change`. Sub-models keep their own kind: Apertus 1.5's vision
    tokenizer runs eager inside an sdpa model and refuses any sdpa-named implementation, so a
    single name for the whole model cannot be set."""
    own = getattr(config, "_attn_implementation", None)
    out: dict = {} if own is None else {"": change(own)}
    for key in getattr(config, "sub_configs", None) or {}:
        sub = getattr(config, key, None)
        if sub is not None and hasattr(sub, "_attn_implementation"):
            out[key] = implementations(sub, change)
    return out


def to_moba(impl: str) -> str:
    """The MoBA implementation routing a sub-model that runs `impl` (`sdpa` -> `moba_sdpa`); others as they are."""
    return IMPL_PREFIX + impl if impl in SUPPORTED_ORIGINS else impl


def to_origin(impl: str) -> str:
    """The implementation a MoBA one was made from (`moba_sdpa` -> `sdpa`); others as they are."""
    return impl[len(IMPL_PREFIX):] if impl.startswith(IMPL_PREFIX) else impl


def origin_of(model: nn.Module) -> str:
    """The implementation the model was loaded with (`sdpa` / `eager`), seen through a previous rewrite."""
    impl = model.config._attn_implementation or "eager"
    return impl[len(IMPL_PREFIX):] if impl.startswith(IMPL_PREFIX) else impl


def _dense_function(origin: str, module: nn.Module) -> Callable:
    if origin == "sdpa":
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if fn is None:
        raise HFUnsupportedError(
            f"{type(module).__name__} ({type(module).__module__}) has no eager_attention_forward to keep dense sites exact"
        )
    return fn


class _KVRepeated:
    """An attention module as its original attention function sees it once its kv heads are repeated."""

    num_key_value_groups = 1

    def __init__(self, module: nn.Module) -> None:
        self._module = module

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)


def _dense_call(origin: str, module: nn.Module, query, key, value, attention_mask, *args, **kwargs):
    """The original attention, exactly as the model would have called it."""
    if origin == "eager" and getattr(module, "reorder_and_upcast_attn", False) \
            and hasattr(module, "_upcast_and_reordered_attn"):
        # GPT-2 style: with attn_implementation "eager" the module bypasses the interface.
        return module._upcast_and_reordered_attn(query, key, value, attention_mask)
    function = _dense_function(origin, module)
    groups = getattr(module, "num_key_value_groups", 1)
    if isinstance(groups, int) and groups > 1 and torch.compiler.is_compiling():
        # While tracing (torch.export, ONNX, torch.compile) repeat the kv heads here, by index:
        # transformers' repeat_kv (expand + reshape, in both the sdpa and the eager function)
        # makes torch 2.11's fake tensors give the reshaped key a symbolic min(d*s, 2d*s) stride
        # whose guard export cannot prove over a dynamic sequence, so any GQA model failed
        # dynamic export there. Same values; the original function then sees one group.
        index = torch.arange(key.shape[1] * groups, device=key.device) // groups
        key, value = key.index_select(1, index), value.index_select(1, index)
        module = _KVRepeated(module)
    return function(module, query, key, value, attention_mask, *args, **kwargs)


def _make_interface(origin: str) -> Callable:
    def attention(module: nn.Module, query, key, value, attention_mask, *args, **kwargs):
        return moba_attention_forward(origin, module, query, key, value, attention_mask, *args, **kwargs)

    attention.__name__ = f"moba_{origin}_attention_forward"
    attention.__qualname__ = attention.__name__
    return attention


def register() -> None:
    """Register `moba_sdpa` / `moba_eager` attention and (compact) mask functions (idempotent)."""
    hf_version.require_supported()
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    for origin in SUPPORTED_ORIGINS:
        name = IMPL_PREFIX + origin
        if name not in AttentionInterface._global_mapping:
            AttentionInterface.register(name, _make_interface(origin))
        if getattr(AttentionMaskInterface._global_mapping.get(name), "__name__", "") != f"moba_{origin}_mask":
            AttentionMaskInterface.register(name, hf_masks.make_mask_function(origin))


# --------------------------------------------------------------------------------------------
# The attention function


@dataclass
class CallRecord:
    """What one attention call looked like (used to find sites by running the model once)."""

    module: nn.Module
    q_shape: tuple
    k_shape: tuple
    v_shape: tuple
    mask: str  # none | bool | float
    dropout: float
    scaling: float | None
    is_causal: bool | None
    kwargs: tuple[str, ...]
    mask_form: str = ""  # compact | full: <why> | bias (a float mask with values other than 0 / -inf)


_RECORDER: list[CallRecord] | None = None
# Set by `integrations.hf_cp.context_parallel` while a sequence is sharded across ranks: it then
# computes every site (MoBA and dense) over the whole sequence.
CONTEXT_PARALLEL: Callable | None = None


@contextmanager
def recording() -> Iterator[list[CallRecord]]:
    """Collect a `CallRecord` per attention call made inside the block."""
    global _RECORDER
    previous, _RECORDER = _RECORDER, []
    try:
        yield _RECORDER
    finally:
        _RECORDER = previous


def unsupported_reasons(query, key, value, mask, dropout: float, training: bool, kwargs: dict) -> list[str]:
    """Why this call cannot be computed faithfully by MoBA (empty when it can)."""
    out = []
    for k, what in _UNSUPPORTED_KWARGS.items():
        if kwargs.get(k) is not None:
            out.append(f"{what} ({k})")
    if training and dropout > 0:
        out.append(f"attention dropout p={dropout} while training")
    if query.shape[2] > key.shape[2]:
        out.append(f"more queries than keys (Tq={query.shape[2]} > Tk={key.shape[2]})")
    if key.shape[-1] != query.shape[-1]:  # a value head dim of its own (MLA) is fine
        out.append(f"query and key head dims differ (q {query.shape[-1]}, k {key.shape[-1]})")
    if query.shape[1] % key.shape[1] != 0:
        out.append(f"query heads {query.shape[1]} not a multiple of kv heads {key.shape[1]}")
    if value.shape[1] != key.shape[1]:  # NVIDIA's Nemotron audio encoders: 2 key heads, 4 value heads
        out.append(kv_heads_reason(key.shape[1], value.shape[1]))
    if mask is not None and mask.dtype != torch.bool and not mask.dtype.is_floating_point:
        out.append(f"attention mask of dtype {mask.dtype}")
    elif mask is not None and mask.dtype != torch.bool and hf_masks.compact_of(mask) is None \
            and hf_masks.float_mask_kind(mask) == "bias":
        out.append(BIAS_REASON)
    return out


def kv_heads_reason(key_heads: int, value_heads: int) -> str:
    return f"key and value head counts differ (k {key_heads}, v {value_heads}); MoBA's kernels need as many"


BIAS_REASON = ("additive float attention mask with values other than 0 / -inf (a bias such as ALiBi); "
               "MoBA's gate cannot honour it")


def _mask_form(mask) -> str:
    if mask is None or hf_masks.compact_of(mask) is not None:
        return "compact"
    if mask.dtype.is_floating_point and hf_masks.float_mask_kind(mask) == "bias":
        return "bias"
    return "full: " + (hf_masks.full_reason(mask) or "a mask built outside the mask interface")


def declared_causal(module: nn.Module, kwargs: dict) -> bool:
    """The causal flag transformers' SDPA function reads: the call's `is_causal`, else the module's
    (default True)."""
    is_causal = kwargs.get("is_causal")
    return bool(is_causal) if is_causal is not None else bool(getattr(module, "is_causal", True))


def causal_without_mask(origin: str, module: nn.Module, kwargs: dict) -> bool:
    """Whether the original attention function cuts causally on a call without a mask:
    transformers' SDPA function does (`is_causal` from the call, else the module's, default True);
    the eager functions add the mask and nothing else, so None there is full attention (an encoder
    whose bidirectional mask transformers skipped, e.g. ALIGN's text tower)."""
    return origin == "sdpa" and declared_causal(module, kwargs)


def moba_attention_forward(origin: str, module: nn.Module, query, key, value, attention_mask, *args, **kwargs):
    """AttentionInterface function: MoBA or the original attention, per `module._moba_decision`."""
    def dense(*call_args, **call_kwargs):
        return _dense_call(origin, *call_args, **call_kwargs)

    cache = kwargs.pop(hf_cache.CACHE_KWARG, None)  # handed over by hf_cache's pre-hook
    decision = getattr(module, "_moba_decision", None)
    dropout = kwargs.get("dropout", args[0] if args else 0.0)
    causal = causal_without_mask(origin, module, kwargs)  # with a mask: read from the mask below
    if _RECORDER is not None:
        _RECORDER.append(CallRecord(
            module=module, q_shape=tuple(query.shape), k_shape=tuple(key.shape), v_shape=tuple(value.shape),
            mask="none" if attention_mask is None else ("bool" if attention_mask.dtype == torch.bool else "float"),
            dropout=float(dropout or 0.0), scaling=kwargs.get("scaling"), is_causal=kwargs.get("is_causal"),
            kwargs=tuple(k for k, v in kwargs.items() if v is not None), mask_form=_mask_form(attention_mask),
        ))
    if CONTEXT_PARALLEL is not None:
        return CONTEXT_PARALLEL(origin, module, query, key, value, attention_mask, *args, **kwargs)

    def original(q=query, k=key, v=value, m=None):  # the dense site, with the mask it always had
        m = hf_masks.dense_mask(origin, attention_mask, query, key, causal) if m is None else m
        return dense(module, q, k, v, m, *args, **kwargs)

    if decision is None or decision.mode != "moba":
        return original()
    tq, tk = query.shape[2], key.shape[2]
    if tq == 1 and decision.decode == "dense":
        return original()
    problems = unsupported_reasons(query, key, value, attention_mask, float(dropout or 0.0), module.training, kwargs)
    if problems:
        if decision.on_unsupported == "error":
            raise HFUnsupportedError(
                f"attention site {getattr(module, '_moba_site', type(module).__name__)!r} cannot run MoBA: "
                f"{'; '.join(problems)} (policy on_unsupported: error)"
            )
        return original()
    scaling = kwargs.get("scaling")
    scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
    mask = attention_mask
    dense_below = int(getattr(decision, "dense_below", None) or 0)
    if hf_masks.compact_of(mask) is not None:
        mask, causal = hf_masks.key_mask(mask), True  # the causal cut AND this key mask (or none)
    elif mask is None:
        if causal and tq > 1 and tk > tq and cache is None:
            # Prefill into an empty static cache: keys past Tq are empty slots (as HF's sdpa path).
            key, value = key[:, :, :tq], value[:, :, :tq]
    else:
        if mask.dtype != torch.bool and hf_masks.float_mask_kind(mask) == "unknown":
            # Traced: whether the values are 0 / -inf only is known per call; the op reads them.
            if cache is not None and not hf_cache.queries_are_newest(module, cache, key):
                raise HFUnsupportedError(
                    f"attention site {getattr(module, '_moba_site', type(module).__name__)!r}: a 4-D float "
                    "attention_mask cannot be checked for a bias under tracing with a StaticCache; pass a "
                    "2-D padding mask or a boolean 4-D mask")
            out = torch.ops.moba.attention_checked_mask(
                query, key, value, mask[..., :tk] if mask.dim() == 4 else mask, int(decision.block_size),
                int(decision.top_k), scale, str(decision.backend), dense_below,
                str(getattr(module, "_moba_site", type(module).__name__)) if decision.on_unsupported == "error" else "")
            return out.transpose(1, 2).contiguous(), None
        if mask.dtype != torch.bool:
            # a mask that carries a gradient holds a learned bias (Swin's relative position bias, all
            # zero when initialised): kept additive, hidden keys at -inf, so it gets its gradient
            learned = mask.requires_grad and torch.is_grad_enabled()
            mask = hf_masks.additive_visibility(mask) if learned else hf_masks.visibility(mask)
        if mask.dim() == 4 and mask.shape[-1] > tk:
            mask = mask[..., :tk]
        # The boolean mask already holds causality (and padding, windows); causal=False with it
        # is exactly causal MoBA (docs/ARCHITECTURE.md).
        causal = False
    if cache is not None:  # queries at their real positions in the cache, block means kept beside it
        out = hf_cache.attention(module, query, key, value, mask, causal=causal, scale=scale, decision=decision,
                                 cache=cache, dense_below=dense_below)
        if out is hf_cache.DENSE:
            return original()
        if out is not None:
            return out.transpose(1, 2).contiguous(), None
    # `moba::attention` when traced (export, compile) or with gradients; its kernels directly in plain eager
    out = moba_op.run(query, key, value, None, mask, int(decision.block_size), int(decision.top_k), causal, scale,
                      str(decision.backend), dense_below)
    return out.transpose(1, 2).contiguous(), None


# --------------------------------------------------------------------------------------------
# Applying decisions


def attention_modules(model: nn.Module, example_inputs: Any = None) -> tuple[list[tuple[str, nn.Module]], list[CallRecord]]:
    """(fqn, module) of every attention module in execution order, found by running the model once.

    The model runs with the MoBA interface in recording mode (every site dense), on
    `example_inputs` (a dict of keyword arguments, a tuple of positional ones, or a tensor)
    or on the model's own `dummy_inputs`.
    """
    register()
    origin = origin_of(model)
    if origin not in SUPPORTED_ORIGINS:
        raise HFUnsupportedError(
            f"{type(model).__name__} uses attn_implementation={origin!r}; rewriting supports models loaded "
            f"with {' or '.join(SUPPORTED_ORIGINS)}"
        )
    names = {id(m): n for n, m in model.named_modules()}
    previous = implementations(model.config)
    saved = {id(m): getattr(m, "_moba_decision", None) for m in model.modules()}
    for m in model.modules():
        if hasattr(m, "_moba_decision"):
            m._moba_decision = None
    model.set_attn_implementation(implementations(model.config, to_moba))
    inputs = example_inputs
    if inputs is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        inputs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in model.dummy_inputs.items()}
    try:
        with recording() as calls, torch.no_grad():
            if isinstance(inputs, dict):
                model(**inputs)
            elif isinstance(inputs, (tuple, list)):
                model(*inputs)
            else:
                model(inputs)
    finally:
        for m in model.modules():
            if id(m) in saved and hasattr(m, "_moba_decision"):
                m._moba_decision = saved[id(m)]
        model.set_attn_implementation(previous)
    seen: dict[int, tuple[str, nn.Module]] = {}
    for c in calls:
        if id(c.module) not in seen:
            seen[id(c.module)] = (names.get(id(c.module), type(c.module).__name__), c.module)
    return list(seen.values()), calls


def apply(model: nn.Module, modules: list[tuple[str, nn.Module]], decisions: list[Any]) -> None:
    """Store each module's decision on it and route the model through the MoBA interface."""
    register()
    origin = origin_of(model)
    for (name, module), d in zip(modules, decisions):
        _dense_function(origin, module)  # fail early if dense sites could not stay exact
        module._moba_decision = d
        module._moba_site = name
        if d.mode == "moba":
            hf_cache.install(module)
        else:
            hf_cache.uninstall(module)
    model.set_attn_implementation(implementations(model.config, to_moba))
    hf_masks.install_unpacked_hook(model)


def forget_compiled_call(model: nn.Module) -> None:
    """Drop the compiled forward transformers' `generate()` keeps on a model (`get_compiled_call`,
    for its compiled decode steps): it is bound to the object it was made for, so on a deep copy,
    rewritten, it would still run the original model's attention."""
    for m in model.modules():
        m.__dict__.pop("_compiled_call", None)
        m.__dict__.pop("_last_compile_config", None)


# --------------------------------------------------------------------------------------------
# Discovery: one row per attention module, from one recorded forward


@dataclass
class HFSite:
    """An attention module of a Hugging Face model, as the report and the rewrite see it."""

    site: AttentionSite
    module: nn.Module
    problems: list[str] = field(default_factory=list)  # why it cannot be MoBA (empty when it can)
    note: str = ""  # extra information for the report (behaviour while training)


def discover(model: nn.Module, example_inputs: Any = None, *,
             recorded: tuple[list[tuple[str, nn.Module]], list[CallRecord]] | None = None,
             train_calls: list[CallRecord] | None = None) -> list[HFSite]:
    """Every attention module of `model` in execution order, from one recorded forward
    (`recorded`: the result of `attention_modules`, when the caller ran it). Attention dropout
    is what the module passes while training (`train_calls`, from a training-mode forward)."""
    modules, calls = recorded if recorded is not None else attention_modules(model, example_inputs)
    first: dict[int, CallRecord] = {}
    for c in calls:
        first.setdefault(id(c.module), c)
    p_train: dict[int, float] = {}
    for c in train_calls or []:
        p_train[id(c.module)] = max(p_train.get(id(c.module), 0.0), c.dropout)
    origin = origin_of(model)
    out = []
    for layer, (name, m) in enumerate(modules):
        c = first[id(m)]
        if c.mask == "none":
            causal = causal_without_mask(origin, m, {"is_causal": c.is_causal})
        elif c.mask_form == "compact":
            causal = True  # ours: the causal cut AND a key mask
        else:
            causal = getattr(m, "is_causal", None)
            causal = bool(causal) if causal is not None else None
        if causal:
            mask_kind = "causal+padding" if c.mask != "none" and _has_padding(example_inputs) else "causal"
        else:
            mask_kind = "padding" if c.mask != "none" else "none"
        problems = [f"{what} ({k})" for k, what in _UNSUPPORTED_KWARGS.items() if k in c.kwargs]
        longest = max((x for x in calls if x.module is m), key=lambda x: x.q_shape[2] - x.k_shape[2])
        if longest.q_shape[2] > longest.k_shape[2]:  # e.g. Whisper's encoder_attn with a long decoder
            problems.append(f"more queries than keys (Tq={longest.q_shape[2]} > Tk={longest.k_shape[2]}, "
                            "cross attention)")
        if c.mask_form == "bias":
            problems.append(BIAS_REASON)
        if c.v_shape[1] != c.k_shape[1]:
            problems.append(kv_heads_reason(c.k_shape[1], c.v_shape[1]))
        p = p_train.get(id(m), 0.0) if train_calls is not None else _dropout_of(m)
        note = f"; while training: attention dropout p={p:g} -> dense (or error)" if p > 0 else ""
        note += hf_cache.sliding_note(m)
        if c.mask_form.startswith("full"):
            note += f"; mask kept full [Tq, Tk] ({c.mask_form[len('full: '):]}), not causal + key padding"
        site = AttentionSite(
            name=name, module_class=type(m).__name__, layer=layer, kind="sdpa" if origin == "sdpa" else "manual",
            num_heads=c.q_shape[1], num_kv_heads=c.k_shape[1], head_dim=c.q_shape[3], causal=causal,
            mask_kind=mask_kind, scale=c.scaling, dropout_p=p, seq_len=c.q_shape[2],
            extra={"problems": problems, "origin": origin},
        )
        out.append(HFSite(site=site, module=m, problems=problems, note=note))
    return out


def _has_padding(example_inputs: Any) -> bool:
    if isinstance(example_inputs, dict) and isinstance(example_inputs.get("attention_mask"), torch.Tensor):
        return bool((example_inputs["attention_mask"] == 0).any())
    return False


def _dropout_of(m: nn.Module) -> float:
    for attr in ("attention_dropout", "attn_dropout", "dropout"):
        v = getattr(m, attr, None)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
        if isinstance(v, nn.Dropout):
            return float(v.p)
    return 0.0
