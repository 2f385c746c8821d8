"""Autocast rules for the MoBA ops: inside `torch.autocast`, they compute in the autocast dtype.

`scaled_dot_product_attention`, which a rewrite replaces, is on autocast's lower-precision list:
under `torch.autocast` it casts every floating input but float64 (q, k, v, a float mask) to the
autocast dtype and returns that dtype. A custom op has no such rule unless it is given one, and
models routinely hand attention mixed dtypes there (RoPE in fp32 makes q and k fp32 while v
comes from a bf16 projection). Without a rule the op saw those mixed inputs: eager calls
computed in a precision the original never used, and compiled training failed in the dense
kernel ("Expected query, key, and value to have the same dtype"). The rule below is the one
SDPA has, for every forward op and autocast device; backward ops run on the inputs the forward
saved (already cast), as autograd runs them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moba_rewrite.kernels.eager import AUTOCAST_DEVICES, autocast_on

_LIB = torch.library.Library("moba", "FRAGMENT")
_AUTOCAST_KEYS = {device: "Autocast" + device.upper() for device in AUTOCAST_DEVICES}


def _eligible(x) -> bool:
    return isinstance(x, Tensor) and x.is_floating_point() and x.dtype != torch.float64


def _cast(x, dtype: torch.dtype):
    return x.to(dtype) if _eligible(x) else x


def active(*tensors: Tensor | None) -> bool:
    """Autocast is on for the device of the first tensor given (the op would cast its inputs)."""
    first = next((t for t in tensors if t is not None), None)
    return first is not None and autocast_on(first)


def cast_inputs(*xs):
    """`xs` as the autocast rule would hand them to the op (call where `active` holds): for the
    public functions, so their argument checks see what the op will compute with."""
    dtype = torch.get_autocast_dtype(next(x for x in xs if isinstance(x, Tensor)).device.type)
    return tuple(_cast(x, dtype) for x in xs)


def register(op_name: str) -> None:
    """Give `moba::op_name` SDPA's autocast rule on every autocast device."""
    overload = getattr(torch.ops.moba, op_name).default

    for device, key in _AUTOCAST_KEYS.items():
        if not torch.amp.is_autocast_available(device):
            continue

        def kernel(_keyset, *args, _device=device, **kwargs):
            dtype = torch.get_autocast_dtype(_device)
            with torch.autocast(_device, enabled=False):
                return overload(*(_cast(a, dtype) for a in args), **{k: _cast(v, dtype) for k, v in kwargs.items()})

        _LIB.impl(op_name, kernel, key, with_keyset=True)
