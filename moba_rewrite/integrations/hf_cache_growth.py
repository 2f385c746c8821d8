"""A Hugging Face `DynamicLayer` whose keys and values grow in place instead of by concatenation.

transformers' `DynamicLayer.update` appends a step's keys with `torch.cat([keys, new])`: every
decode step copies the whole cache of the layer, O(T) per token, which at a 32K cache is most of
a decode step on a CPU (88 ms of a 100 ms step on `benchmarks/bench_decode.py`'s model) and
would bound any attention speed-up. MoBA's decode reads only a few blocks of the cache, so at
MoBA sites the rewrite swaps the layer's class (`grow_in_place`) for `GrowingDynamicLayer`, which
keeps the keys and values in a buffer with spare room (a quarter more than needed, at least 256
tokens) and writes each step into it: `layer.keys` is a view of the first `filled` slots of
the buffer. A full buffer is replaced by one a quarter larger (amortised: each token is copied
a constant number of times). Costs: up to 25% more memory than the filled cache on these layers.

What the layer holds is what `DynamicLayer` would hold, token for token; every other method
(`crop`, `reset`, `batch_select_indices`, `reorder_cache`, ...) is `DynamicLayer`'s own: they
replace `keys` / `values` by a view of the buffer or by a new tensor, and `update` notices a key
tensor that is not a view of its buffer and starts a new buffer from it. Calls it cannot serve
in place go to `DynamicLayer.update` (a `torch.cat`): under tracing (`torch.compile`,
`torch.export`: no mutation of Python-held buffers in a graph), when the new states record
gradients (an in-place write would invalidate the previous step's saved tensors), and when
their shape, dtype or device differ from the cache's (where `DynamicLayer` raises or promotes).
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers.cache_utils import DynamicLayer

MIN_SLACK = 256  # spare slots of a new buffer, at least
GROWTH_DIVISOR = 4  # spare slots of a new buffer: a quarter of the tokens it holds


def capacity_for(tokens: int) -> int:
    """Slots of a buffer that must hold `tokens` tokens now and leave room for decoding."""
    return tokens + max(MIN_SLACK, tokens // GROWTH_DIVISOR)


class GrowingDynamicLayer(DynamicLayer):
    """`DynamicLayer` with amortised in-place growth (see the module docstring)."""

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if not self._writable(key_states, value_states):
            self._moba_buffers = None  # (an attribute store: Dynamo in torch 2.11 cannot trace `__dict__.pop`)
            return super().update(key_states, value_states, *args, **kwargs)
        filled = self.keys.shape[2] if self.keys.dim() == 4 else 0
        needed = filled + key_states.shape[2]
        buffers = self.__dict__.get("_moba_buffers")
        # an inference-mode buffer cannot be written outside inference mode (nor a normal one is what
        # inference mode would make): start a new one, as `torch.cat` would
        fresh = buffers is None or buffers[0].is_inference() != torch.is_inference_mode_enabled()
        if fresh or not self._views_of(buffers) or needed > buffers[0].shape[2]:
            buffers = self._new_buffers(key_states, value_states, filled, capacity_for(needed))
        for buffer, new, name in ((buffers[0], key_states, "keys"), (buffers[1], value_states, "values")):
            buffer[:, :, filled:needed].copy_(new)
            setattr(self, name, buffer[:, :, :needed])
        return self.keys, self.values

    def _writable(self, key_states: Tensor, value_states: Tensor) -> bool:
        """Whether this call can be written into a buffer without changing what `update` means."""
        if torch.compiler.is_compiling() or key_states.dim() != 4 or value_states.dim() != 4:
            return False
        if torch.is_grad_enabled() and (key_states.requires_grad or value_states.requires_grad):
            return False
        if key_states.shape[:2] != value_states.shape[:2] or key_states.shape[2] != value_states.shape[2]:
            return False
        for held, new in ((self.keys, key_states), (self.values, value_states)):
            if held.dtype != new.dtype or held.device != new.device:
                return False
            if held.dim() == 4 and (held.shape[:2] != new.shape[:2] or held.shape[3] != new.shape[3]):
                return False
            if held.dim() != 4 and held.numel() != 0:
                return False
        return True

    def _views_of(self, buffers: tuple[Tensor, Tensor]) -> bool:
        """Whether `keys` / `values` are still the leading slots of `buffers` (not replaced since)."""
        for held, buffer in ((self.keys, buffers[0]), (self.values, buffers[1])):
            if held.dim() != 4 or held.data_ptr() != buffer.data_ptr() or held.stride() != buffer.stride():
                return False
            if held.shape[:2] != buffer.shape[:2] or held.shape[3] != buffer.shape[3]:
                return False
        return True

    def _new_buffers(self, key_states: Tensor, value_states: Tensor, filled: int, capacity: int) -> tuple[Tensor, Tensor]:
        """Buffers of `capacity` slots holding the layer's `filled` tokens so far."""
        made = []
        for held, new in ((self.keys, key_states), (self.values, value_states)):
            buffer = new.new_empty((*new.shape[:2], capacity, new.shape[3]))
            if filled:
                buffer[:, :, :filled].copy_(held)
            made.append(buffer)
        self._moba_buffers = (made[0], made[1])
        return self._moba_buffers


def grow_in_place(layer: object) -> bool:
    """Make a plain `DynamicLayer` a `GrowingDynamicLayer` (its tokens unchanged); True if it is one
    now. Subclasses (sliding windows, quantized layers, ...) keep their own `update`."""
    if type(layer) is DynamicLayer:
        layer.__class__ = GrowingDynamicLayer
    return type(layer) is GrowingDynamicLayer
