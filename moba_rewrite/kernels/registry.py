"""Backend registry: one module per backend, each exposing `forward` and `backward`.

See docs/ARCHITECTURE.md for the contract every backend module fulfils.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

BACKENDS: tuple[str, ...] = ("auto", "reference", "torch", "triton", "flash_attn")
_MODULES = {
    "reference": "moba_rewrite.kernels.reference",
    "torch": "moba_rewrite.kernels.torch.blocks",
    "triton": "moba_rewrite.kernels.triton.backend",
    "flash_attn": "moba_rewrite.kernels.flash_attn",
}


_LOADED: dict[str, ModuleType] = {}  # imported once: this runs on every call


class BackendUnavailable(RuntimeError):
    """A backend was asked for by name but cannot run here (missing package or device)."""


def resolve_backend(name: str, device: torch.device, q=None, k=None, attn_mask=None, v=None) -> str:
    """Turn `auto` into the best backend that can run this call on `device`.

    On CUDA that is `triton` when it is importable and supports the call (dtype, head dims;
    given `q`/`k`/`v`), else `torch`; on other devices `torch`. Named backends pass through
    unchanged and raise their own clear error if they cannot run the call.
    """
    if name != "auto":
        return name
    if device.type == "cuda":
        try:
            triton = load_backend("triton")
        except BackendUnavailable:
            return "torch"
        if q is None or triton.supports(q, k, attn_mask, v=v):
            return "triton"
    return "torch"


def load_backend(name: str) -> ModuleType:
    """The kernel module for a concrete backend name."""
    module = _LOADED.get(name)
    if module is None:
        if name not in _MODULES:
            raise ValueError(f"unknown MoBA backend {name!r}; expected one of {', '.join(BACKENDS)}")
        try:
            module = importlib.import_module(_MODULES[name])
        except ImportError as exc:
            raise BackendUnavailable(f"MoBA backend {name!r} is not available here: {exc}") from exc
        _LOADED[name] = module
    available = getattr(module, "is_available", None)
    if available is not None and not available():
        reason = getattr(module, "unavailable_reason", lambda: "its requirements are not met")()
        raise BackendUnavailable(f"MoBA backend {name!r} is not available here: {reason}")
    return module
