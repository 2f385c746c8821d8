"""When a MoBA call may skip the torch.library dispatcher and run its implementation directly.

Each custom-op layer (`moba::attention*`, then the backend's `moba::triton_attention`) costs
about 50-90 us of Python per call in eager mode: more than the kernels of a decode step at
128K. The ops are needed only when something records or transforms the call (autograd,
torch.compile / export tracers, dispatch or function modes, functorch transforms, the
TorchScript tracer, tensor subclasses); otherwise the implementation behind them is the same
code, so calling it directly changes nothing but the time.
"""

from __future__ import annotations

import torch
from torch import Tensor

_PLAIN = (Tensor, torch.nn.Parameter)
AUTOCAST_DEVICES = ("cpu", "cuda")


def autocast_on(t: Tensor) -> bool:
    """`torch.autocast` is enabled for `t`'s device (the MoBA ops then cast their inputs)."""
    return t.device.type in AUTOCAST_DEVICES and torch.is_autocast_enabled(t.device.type)


def plain_eager(*tensors: Tensor | None) -> bool:
    """True when no gradient is to be recorded for `tensors` (plain tensors) and nothing traces,
    intercepts or transforms torch calls right now."""
    if torch.compiler.is_compiling():  # first: Dynamo folds it to True and traces no further
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:  # a plain loop: this runs on every decode step
        if t is not None and (type(t) not in _PLAIN or (grad and t.requires_grad) or t.is_meta):
            return False  # meta tensors: the op's fake implementation answers them
    first = next((t for t in tensors if t is not None), None)
    if first is not None and autocast_on(first):
        return False  # the ops' autocast rule casts the inputs, as SDPA's does
    if torch.autograd.forward_ad._current_level >= 0:  # dual tensors: one behaviour for all backends
        return False
    return not (
        torch._C._len_torch_dispatch_stack() > 0
        or torch._C._is_torch_function_mode_enabled()
        or torch._C._get_tracing_state() is not None
        or torch._C._functorch.peek_interpreter_stack() is not None
    )
