"""The recurrent layers of hybrid stacks under `context_parallel`: gated delta nets (Qwen3-Next,
Qwen3.5, OLMo-hybrid), Kimi-style delta attention (Kimi Linear, Bailing hybrid), Mamba-2 mixers
(Bamba, Granite 4.0-H, Nemotron-H, Zamba2, Falcon-H1), Mamba-1 mixers (Jamba, Zamba), LFM's
short convolutions (LFM2, LFM3) and RecurrentGemma's RG-LRU blocks, and the other transformers
models built the same way.

Their forward reaches functions of its own modeling module by name: `causal_conv1d_forward` (the
short causal convolution) and the recurrence (`torch_chunk_gated_delta_rule`,
`chunk_kimi_delta_attention`, `mamba2_chunk_scan` through `mamba2_scan_forward`,
`mamba_selective_scan`); transformers lists them as replaceable (`use_kernelized_func`: a kernel
runtime swaps them). While `sharded_recurrent_layers` is active those names refer to dispatchers:
called from one of the model's recurrent layers, they run the model's own functions on each chunk
of this rank's shard and carry the convolution history and the recurrent state across ranks
(`parallel.recurrence`); called from anywhere else, they are the originals. The rest of the layer
(projections, gates, norms, padding) is the model's own code, untouched. A layer whose forward did
not reach its recurrence's dispatcher (a kernel runtime replaced it) is an error. RecurrentGemma's
block calls its convolution as a module and its scan as a method: those are replaced on the
instance instead (`_method_dispatched`); its decoding state lives on the modules, so sharded-cache
decoding refuses it.

Sharded-cache decoding (`hf_cp_generate`) gives the prefill a cache whose recurrent layers are
replicated on every rank: the dispatchers store there the convolution's last inputs and the
recurrent state after the prompt's real tokens, and decode steps (the same new token on every rank)
run the layers as they are. Refused, in one line each: a cache holding earlier steps, packed
documents (`cu_seqlens`, `seq_idx`), a recurrent state passed in.
"""

from __future__ import annotations

import inspect
import sys
from contextlib import contextmanager
from typing import Callable, Iterator

import torch.distributed as dist
from torch import nn

from moba_rewrite.parallel.recurrence import (causal_conv_cp, delta_rule_cp, diagonal_scan_cp, last_inputs,
                                               selective_scan_cp, ssd_scan_cp)

_WHO = "context_parallel"
# The chunked delta rules (flash-linear-attention's signature) of transformers' modeling modules:
# the gated delta net's (scalar decay per head) and Kimi's delta attention (decay per channel).
_RULES = ("torch_chunk_gated_delta_rule", "chunk_kimi_delta_attention")
_CONV = "causal_conv1d_forward"
_SSD_FORWARD, _SSD_SCAN, _SSD_FUSED = "mamba2_scan_forward", "mamba2_chunk_scan", "mamba2_split_conv1d_scan_combined"
_MAMBA_FORWARD, _MAMBA_SCAN = "mamba_scan_forward", "mamba_selective_scan"
_ABSENT = object()  # an instance attribute that was not there before dispatching


def _dispatched_names(module: nn.Module) -> dict[str, str] | None:
    """{module-level function name: role} that `module`'s forward reaches by name, if it is a
    recurrent layer this module shards: a delta net (roles `conv`, `delta`), a Mamba-2 mixer
    (`conv`, `ssd`, and `fused`: the kernel-only fused training path, turned off while sharded), a
    Mamba-1 mixer (`conv`, `mamba1`) or a short convolution (`conv`)."""
    code = getattr(inspect.unwrap(type(module).forward), "__code__", None)
    space = vars(sys.modules.get(type(module).__module__, object))
    if code is None or _CONV not in code.co_names or _CONV not in space:
        return None
    rule = next((r for r in _RULES if r in code.co_names and r in space), None)
    if rule is not None:
        return {_CONV: "conv", rule: "delta"}
    if _SSD_FORWARD in code.co_names and _SSD_SCAN in space:
        names = {_CONV: "conv", _SSD_SCAN: "ssd"}
        if _SSD_FUSED in space:
            names[_SSD_FUSED] = "fused"
        return names
    if (_MAMBA_FORWARD in code.co_names or _MAMBA_SCAN in code.co_names) and _MAMBA_SCAN in space:  # Jamba; Zamba
        return {_CONV: "conv", _MAMBA_SCAN: "mamba1"}
    if type(module).__name__.endswith("ShortConv"):  # LFM2 / LFM3: gated, and mixing only by its convolution
        return {_CONV: "conv"}
    return None


def _method_dispatched(module: nn.Module) -> bool:
    """RecurrentGemma's (Griffin's) recurrent block: its forward calls its convolution as a module
    (`conv_1d`) and its recurrence as a method of its RG-LRU (`rg_lru._rnn_scan`), so both are replaced
    on the instance, not by name (recognised by transformers' name for the block, `*RecurrentBlock`)."""
    return (type(module).__name__.endswith("RecurrentBlock") and isinstance(getattr(module, "conv_1d", None), nn.Conv1d)
            and callable(getattr(getattr(module, "rg_lru", None), "_rnn_scan", None)))


def method_dispatched_layers(model: nn.Module) -> list[str]:
    """Names of the recurrent layers whose recurrence is a method of their own (RecurrentGemma's
    blocks, state kept on the modules, not in a cache)."""
    return [name for name, module in model.named_modules() if _method_dispatched(module)]


def _layer_index(name: str, module: nn.Module) -> int:
    """The decoder layer holding a recurrent layer: its `layer_idx`, else the last number in its name
    (`model.layers.3.temporal_block` -> 3)."""
    if getattr(module, "layer_idx", None) is not None:
        return int(module.layer_idx)
    numbers = [int(part) for part in name.split(".") if part.isdigit()]
    return numbers[-1] if numbers else -1


def _mixing_role(names: dict[str, str]) -> str:
    """The role whose dispatcher a layer's forward must reach to have mixed its tokens across ranks."""
    return next((r for r in names.values() if r not in ("conv", "fused")), "conv")


def recurrent_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every recurrent layer this module shards: those whose forward calls its
    modeling module's `causal_conv1d_forward` and a recurrence it can dispatch (a chunked delta rule,
    Mamba-2's or Mamba-1's scan), and LFM's short-convolution layers (`*ShortConv`: recognised by
    transformers' name for them, as a forward that calls the convolution does not show that it
    mixes tokens by nothing else)."""
    return [(name, module) for name, module in model.named_modules()
            if _dispatched_names(module) is not None or _method_dispatched(module)]


def uncovered_layers(model: nn.Module, layer_types: list[str], attention_kinds: set[str]) -> list[int]:
    """Indices of layers of a kind other than `attention_kinds` that hold no recurrent layer this
    module shards (their `layer_idx`)."""
    covered = {_layer_index(name, m) for name, m in recurrent_layers(model)}
    return [i for i, kind in enumerate(layer_types) if kind not in attention_kinds and i not in covered]


class _Running:
    """Which recurrent layer of the sharded model is running (None: the dispatchers pass through),
    and whether the forward is a decode step (every rank runs the same new tokens: pass through)."""

    def __init__(self, pg: dist.ProcessGroup, layout: str, seq_len: int | None, decoding: Callable[[], bool]):
        self.pg, self.layout, self.seq_len, self.decoding, self.layer = pg, layout, seq_len, decoding, None
        self.called: set[str] = set()  # roles the current layer's forward reached, sharded

    def sharded(self) -> bool:
        return self.layer is not None and not self.decoding()


def _refuse_unsupported(running: _Running, what: str, *, positional: bool, packed: bool = False,
                        earlier_state: bool = False) -> None:
    """One-line errors for a sharded call of a recurrence this module cannot carry across ranks."""
    if positional:
        raise ValueError(f"{_WHO}: {running.layer}: {what} was called in an unknown way (expected its options by "
                         f"keyword); this transformers version is not supported")
    if packed:
        raise ValueError(f"{_WHO}: {running.layer}: packed documents (cu_seqlens / seq_idx) in {what} cannot be "
                         f"sharded")
    if earlier_state:
        raise ValueError(f"{_WHO}: {running.layer}: a recurrent state from earlier steps was given to {what}; a "
                         f"sharded forward starts from the beginning of the sequence (pass use_cache=False)")


def _rule_dispatcher(original, running: _Running):
    def rule(query, key, value, *args, initial_state=None, output_final_state=False, cu_seqlens=None, **kwargs):
        if not running.sharded():
            return original(query, key, value, *args, initial_state=initial_state,
                            output_final_state=output_final_state, cu_seqlens=cu_seqlens, **kwargs)
        _refuse_unsupported(running, "the delta rule", positional=bool(args) or not {"g", "beta"} <= set(kwargs),
                            packed=cu_seqlens is not None, earlier_state=initial_state is not None)
        g, beta = kwargs.pop("g"), kwargs.pop("beta")
        running.called.add("delta")
        return delta_rule_cp(original, query, key, value, g, beta, pg=running.pg, layout=running.layout,
                             final_state=output_final_state, seq_len=running.seq_len, **kwargs)
    return rule


def _ssd_dispatcher(original, running: _Running):
    def scan(x, dt, A, B, C, *args, initial_states=None, return_final_states=False, seq_idx=None, cu_seqlens=None,
             **kwargs):
        if not running.sharded():
            return original(x, dt, A, B, C, *args, initial_states=initial_states,
                            return_final_states=return_final_states, seq_idx=seq_idx, cu_seqlens=cu_seqlens, **kwargs)
        _refuse_unsupported(running, "Mamba-2's scan", positional=bool(args),
                            packed=seq_idx is not None or cu_seqlens is not None,
                            earlier_state=initial_states is not None)
        running.called.add("ssd")
        return ssd_scan_cp(original, x, dt, A, B, C, pg=running.pg, layout=running.layout,
                           final_state=return_final_states, seq_len=running.seq_len, **kwargs)
    return scan


def _selective_scan_dispatcher(original, running: _Running):
    def scan(u, delta, A, B, C, *args, return_last_state=False, **kwargs):
        if not running.sharded():
            return original(u, delta, A, B, C, *args, return_last_state=return_last_state, **kwargs)
        _refuse_unsupported(running, "Mamba's selective scan", positional=bool(args))
        running.called.add("mamba1")
        return selective_scan_cp(original, u, delta, A, B, C, pg=running.pg, layout=running.layout,
                                 final_state=return_last_state, seq_len=running.seq_len, **kwargs)
    return scan


def _lru_dispatcher(original, running: _Running):
    """RecurrentGemma's RG-LRU scan (a method: `scan(x, a, reset, recurrent_states)`)."""
    def scan(hidden_states, recurrent_gate, reset, recurrent_states, *args, **kwargs):
        if not running.sharded():
            return original(hidden_states, recurrent_gate, reset, recurrent_states, *args, **kwargs)
        _refuse_unsupported(running, "the RG-LRU scan", positional=bool(args) or bool(kwargs),
                            earlier_state=recurrent_states is not None)
        running.called.add("lru")
        return diagonal_scan_cp(original, hidden_states, recurrent_gate, reset, pg=running.pg, layout=running.layout,
                                seq_len=running.seq_len)
    return scan


def _module_conv_dispatcher(original, kernel: int, running: _Running):
    """A convolution module's forward (padded by `kernel - 1` on both sides, its first `T` outputs
    causal, as RecurrentGemma's block uses it): over the sharded sequence, exactly `T` outputs."""
    def conv(x):
        if not running.sharded():
            return original(x)
        running.called.add("conv")
        return causal_conv_cp(lambda y: original(y)[..., :y.shape[-1]], x, kernel_size=kernel, pg=running.pg,
                              layout=running.layout)
    return conv


def _fused_dispatcher(original, running: _Running):
    """The fused conv + scan + norm + projection kernel of training: none while sharded (the
    layer then takes its unfused path, through the dispatched convolution and scan)."""
    def fused(*args, **kwargs):
        return None if running.sharded() else original(*args, **kwargs)
    return fused


def _conv_dispatcher(original, running: _Running):
    def conv(conv1d, hidden_states, cache, layer_idx, *args, **kwargs):
        if not running.sharded():
            return original(conv1d, hidden_states, cache, layer_idx, *args, **kwargs)
        kernel = conv1d.kernel_size[0]
        running.called.add("conv")
        if cache is not None:  # the prefill of sharded-cache decoding: keep the state after the real tokens
            if not getattr(cache, "replicates_linear_states", False) or cache.get_conv_state(layer_idx) is not None:
                raise ValueError(f"{_WHO}: {running.layer}: a recurrent layer got a cache from earlier steps; a "
                                 f"sharded forward starts from the beginning of the sequence (pass use_cache=False, "
                                 f"or decode with hf_cp_generate.generate)")
            seq_len = running.seq_len if running.seq_len is not None else hidden_states.shape[-1] * dist.get_world_size(running.pg)
            cache.update_conv_state(last_inputs(hidden_states, kernel, seq_len=seq_len, pg=running.pg,
                                                layout=running.layout), layer_idx,
                                    state_idx=kwargs.get("state_idx", 0), conv_kernel_size=kernel)
        return causal_conv_cp(lambda x: original(conv1d, x, None, layer_idx, *args, **kwargs), hidden_states,
                              kernel_size=kernel, pg=running.pg, layout=running.layout)
    return conv


@contextmanager
def sharded_recurrent_layers(layers: list[tuple[str, nn.Module]], pg: dist.ProcessGroup, layout: str, *,
                             seq_len: int | None = None, decoding: Callable[[], bool] = lambda: False
                             ) -> Iterator[int]:
    """While active, the recurrent `layers` (a model's `recurrent_layers`) run over the whole sharded
    sequence (`seq_len`: its real length when padded; a cache given to the forward keeps their state
    after it), except in forwards `decoding()` calls decode steps, which run them as they are on
    every rank. Yields how many layers it covers (0: nothing changed)."""
    if not layers:
        yield 0
        return
    running = _Running(pg, layout, seq_len, decoding)
    names = {}  # id(namespace) -> (namespace, {name: role} to dispatch there)
    for _, m in layers:
        if not _method_dispatched(m):
            space = vars(sys.modules[type(m).__module__])
            names.setdefault(id(space), (space, {}))[1].update(_dispatched_names(m))
    dispatchers = {"conv": _conv_dispatcher, "delta": _rule_dispatcher, "ssd": _ssd_dispatcher,
                   "mamba1": _selective_scan_dispatcher, "fused": _fused_dispatcher}
    saved = []  # (namespace, name, original)
    handles = []
    try:
        for space, wanted in names.values():
            for name, role in sorted(wanted.items()):
                saved.append((space, name, space[name]))
                space[name] = dispatchers[role](space[name], running)
        for name, module in layers:
            if _method_dispatched(module):  # on the instance: its forward reaches them as attributes
                conv, lru = module.conv_1d, module.rg_lru
                saved.append((vars(conv), "forward", vars(conv).get("forward", _ABSENT)))
                conv.forward = _module_conv_dispatcher(conv.forward, conv.kernel_size[0], running)
                saved.append((vars(lru), "_rnn_scan", vars(lru).get("_rnn_scan", _ABSENT)))
                lru._rnn_scan = _lru_dispatcher(lru._rnn_scan, running)
                role = "lru"
            else:
                role = _mixing_role(_dispatched_names(module))
            handles.append(module.register_forward_pre_hook(_enter(running, name)))
            handles.append(module.register_forward_hook(_leave(running, role), always_call=True))
        yield len(layers)
    finally:
        for h in handles:
            h.remove()
        for space, name, original in reversed(saved):
            if original is _ABSENT:
                space.pop(name, None)
            else:
                space[name] = original


def _enter(running: _Running, name: str):
    def enter(module, args):
        running.layer, running.called = name, set()
    return enter


def _leave(running: _Running, role: str):
    """After a recurrent layer: it must have run its recurrence (`role`) through the dispatchers (a
    kernel runtime that replaced the layer's forward would have run it on this shard's tokens only)."""
    def leave(module, args, output):
        name, sharded = running.layer, running.sharded()
        running.layer = None
        if sharded and role not in running.called and output is not None:
            raise RuntimeError(f"{_WHO}: recurrent layer {name!r} ran without the sharded recurrence (its forward or "
                               f"scan was replaced, e.g. by a kernel runtime), so it saw only this rank's tokens")
    return leave
