"""Decoders that number their tokens themselves, under context parallelism.

BART-family decoders (BART, mBART, PLBart, Marian, Pegasus, Blenderbot, BigBird-Pegasus) and
Whisper's decoder take no `position_ids`: the decoder numbers the tokens it is given
`cache_length .. cache_length + T - 1` and hands those numbers to its position embedding
(`embed_positions(input, cache_length, position_ids=...)`). Sharded, every rank would number its
own tokens from 0. Under `context_parallel`, a pre-hook on each such module replaces the numbers
with the tokens' global positions: the layout's in a prefill or training step (alignment padding
past the real length gets the last real position: no real token sees it), the cache slots' in a
sharded-cache decode step. It first checks that the module got consecutive numbers, as these
decoders make; a forward that never reaches such a module is an error (the model then numbered its
tokens some other way), never a silently shifted output.

Llama 4's NoPE layers scale their queries by a temperature of each token's index, which they count
from the tokens they are given (`arange(T) + cached tokens`: from 0 on every shard). Under
`context_parallel` their own scaling is switched off (`TemperatureTuning`) and the sharded
attention applies the same scaling at the tokens' global indices (`scale_queries`).

Rotary embeddings with dynamic NTK scaling or LongRoPE (Phi-3's long-context models) choose their
frequencies from the largest position of the call (`transformers.modeling_rope_utils.
dynamic_rope_update`), which on a shard is its own largest, smaller than the sequence's on all
but one rank. Under `context_parallel` (`GlobalRopeLength`) they are updated from the whole
sequence's largest real position (one all-reduce per call) and then run with that update.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moba_rewrite.parallel.layout import ShardLayout

_WHO = "context_parallel"


def numbering_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every module whose forward takes `cache_length` and `position_ids`:
    transformers' learned and sinusoidal position embeddings of decoders that count positions."""
    return [(name, m) for name, m in model.named_modules() if _numbers_positions(m)]


def _numbers_positions(module: nn.Module) -> bool:
    try:
        params = inspect.signature(type(module).forward).parameters
    except (TypeError, ValueError):
        return False
    return "cache_length" in params and "position_ids" in params


class GlobalNumbering:
    """The global positions a position embedding gets in this forward, and the hooks that give them.

    `hook`: the sharded attention (`hf_cp._ShardedAttention`): its process group, layout, real
    length and, in a decode step, the cache's filled length after the step (`decode_len`)."""

    def __init__(self, hook, modules: list[tuple[str, nn.Module]]) -> None:
        self.hook, self.modules, self.calls = hook, modules, 0

    def register(self, model: nn.Module) -> list:
        handles = [m.register_forward_pre_hook(self._pre(name), with_kwargs=True) for name, m in self.modules]
        handles.append(model.register_forward_pre_hook(self._start))
        handles.append(model.register_forward_hook(self._check_reached))
        return handles

    def positions(self, n: int, device) -> Tensor:
        """Global positions `[n]` of this rank's `n` tokens in the current forward."""
        return global_indices(self.hook, n, device)

    def _start(self, module, args):
        self.calls = 0

    def _check_reached(self, module, args, output):
        if not self.calls:
            names = ", ".join(name for name, _ in self.modules)
            raise RuntimeError(f"{_WHO}: {type(module).__name__} numbers its tokens itself, and this forward never "
                               f"called its position embedding ({names}) with them, so the shard's tokens may have "
                               f"been numbered from 0; not supported")

    def _pre(self, name: str):
        def give_global_positions(module, args, kwargs):
            in_args = "position_ids" not in kwargs and len(args) > 2
            given = args[2] if in_args else kwargs.get("position_ids")
            if not isinstance(given, Tensor) or given.dim() == 0 or given.is_floating_point():
                raise ValueError(f"{_WHO}: position embedding {name!r} was called without integer position_ids "
                                 f"(got {type(given).__name__}), so the global positions cannot be given to it")
            rows = given.reshape(-1, given.shape[-1])
            n = rows.shape[-1]
            counted = rows[:, :1] + torch.arange(n, device=given.device)
            if not torch.equal(rows, counted):
                raise ValueError(f"{_WHO}: position embedding {name!r} got position_ids that are not consecutive "
                                 f"numbers ({rows[0, :6].tolist()}...), not the decoder's own count; not supported")
            new = self.positions(n, given.device).to(given.dtype).view(*([1] * (given.dim() - 1)), n).expand_as(given)
            self.calls += 1
            if in_args:
                return (*args[:2], new, *args[3:]), kwargs
            return args, {**kwargs, "position_ids": new}
        return give_global_positions


def global_indices(hook, n: int, device, *, clamp: bool = True) -> Tensor:
    """Global indices `[n]` of this rank's `n` tokens in the current forward (`hook`: the sharded
    attention): the layout's in a prefill or training step (with `clamp`, alignment padding past the
    real length gets the last real index: no real token sees it), the newest cache slots' in a decode
    step."""
    if hook.decode_len is not None:  # the new tokens end the filled cache (every rank runs them all)
        return torch.arange(hook.decode_len - n, hook.decode_len, device=device)
    pg = hook.pg
    pos = ShardLayout(hook.layout, dist.get_world_size(pg), n).positions(dist.get_rank(pg), device)
    if clamp and hook.seq_len is not None:
        pos = pos.clamp(max=max(hook.seq_len - 1, 0))
    return pos


def temperature_tuned(model: nn.Module) -> list[nn.Module]:
    """Attention modules that scale their queries by a temperature of each token's index (Llama 4's
    layers without RoPE: `attn_temperature_tuning`, `floor_scale`, `attn_scale`)."""
    return [m for m in model.modules() if getattr(m, "attn_temperature_tuning", None) is True
            and hasattr(m, "use_rope") and not m.use_rope and hasattr(m, "floor_scale") and hasattr(m, "attn_scale")]


@contextmanager
def TemperatureTuning(modules: list[nn.Module]) -> Iterator[None]:
    """While sharded: the modules' own query scaling (by their local token count) switched off;
    `scale_queries` applies it at global indices instead."""
    for m in modules:
        m.attn_temperature_tuning = False
    try:
        yield
    finally:
        for m in modules:
            m.attn_temperature_tuning = True


def scale_queries(query: Tensor, module: nn.Module, index: Tensor) -> Tensor:
    """`query` `[B, H, T, D]` scaled as Llama 4's attention scales it (`log1p(floor((i + 1) / floor_scale))
    * attn_scale + 1` for token index `i`, in float32, back to the query's dtype), at `index` `[T]`."""
    scales = torch.log1p(torch.floor((index.float() + 1.0) / module.floor_scale)) * module.attn_scale + 1.0
    return (query * scales.view(1, 1, -1, 1)).to(query.dtype)


def _position_scaled(kind) -> bool:
    return isinstance(kind, str) and ("dynamic" in kind or kind == "longrope")


def position_scaled_rotary(model: nn.Module) -> list[nn.Module]:
    """Rotary embeddings whose frequencies follow the largest position they are given (transformers'
    `rope_type` dynamic NTK or LongRoPE, also per layer type)."""
    found = []
    for m in model.modules():
        kinds = getattr(m, "rope_type", None)
        kinds = list(kinds.values()) if isinstance(kinds, dict) else [kinds]
        if any(_position_scaled(k) for k in kinds) and any(n.endswith("inv_freq") for n, _ in m.named_buffers(
                recurse=False)):
            found.append(m)
    return found


class GlobalRopeLength:
    """Pre- and post-hooks of position-scaled rotary embeddings under `context_parallel`: the
    frequencies are updated from the whole sequence's largest real position (an all-reduce over the
    group; alignment padding past the real length excluded), then the call runs as a plain rotary
    embedding with them (`rope_type` "default" for its duration), so no rank's own positions choose.

    `hook`: the sharded attention (`hf_cp._ShardedAttention`): its group, layout, real length and,
    in a decode step, the cache's filled length."""

    def __init__(self, hook, modules: list[nn.Module]) -> None:
        self.hook, self.modules = hook, modules
        self.saved: dict[int, object] = {}

    def register(self) -> list:
        return [h for m in self.modules for h in (m.register_forward_pre_hook(self._before, with_kwargs=True),
                                                  m.register_forward_hook(self._after))]

    @torch.compiler.disable  # a collective, and a call of the module itself: eager
    def _before(self, module, args, kwargs):
        x = args[0] if args else kwargs.get("x")
        positions = args[1] if len(args) > 1 else kwargs.get("position_ids")
        layer_type = args[2] if len(args) > 2 else kwargs.get("layer_type")
        hook = self.hook
        if not isinstance(positions, Tensor) or not isinstance(x, Tensor):
            raise ValueError(f"{_WHO}: rotary embedding {type(module).__name__} was called without position_ids, so "
                             f"its frequencies cannot be chosen from the whole sequence's positions")
        rows = positions.reshape(-1, positions.shape[-1]).long()
        if hook.decode_len is None and hook.seq_len is not None:  # alignment padding is no part of the sequence
            rows = rows[:, global_indices(hook, rows.shape[-1], rows.device, clamp=False) < hook.seq_len]
        largest = rows.max().reshape(1) if rows.numel() else torch.full((1,), -1, dtype=torch.long, device=rows.device)
        dist.all_reduce(largest, op=dist.ReduceOp.MAX, group=hook.pg)
        extra = {} if layer_type is None else {"layer_type": layer_type}
        type(module).forward(module, x, largest.clamp(min=0).view(1, 1).to(positions.dtype), **extra)  # the update
        kinds = module.rope_type
        self.saved[id(module)] = kinds
        module.rope_type = ({k: "default" if _position_scaled(v) else v for k, v in kinds.items()}
                            if isinstance(kinds, dict) else "default")
        return None

    def _after(self, module, args, output):
        module.rope_type = self.saved.pop(id(module))

    def restore(self) -> None:
        """Put back every `rope_type` a failed call left replaced."""
        for m in self.modules:
            if id(m) in self.saved:
                m.rope_type = self.saved.pop(id(m))
