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
    "torch": "moba_rewrite.kernels.torch_blocks",
    "triton": "moba_rewrite.kernels.triton_backend",
    "flash_attn": "moba_rewrite.kernels.flash_attn",
}


class BackendUnavailable(RuntimeError):
    """A backend was asked for by name but cannot run here (missing package or device)."""


def _importable(name: str) -> bool:
    try:
        load_backend(name)
    except BackendUnavailable:
        return False
    return True


def resolve_backend(name: str, device: torch.device) -> str:
    """Turn `auto` into the best backend that can run on `device`; other names pass through."""
    if name != "auto":
        return name
    if device.type == "cuda" and _importable("triton"):
        return "triton"
    return "torch"


def load_backend(name: str) -> ModuleType:
    """The kernel module for a concrete backend name."""
    if name not in _MODULES:
        raise ValueError(f"unknown MoBA backend {name!r}; expected one of {', '.join(BACKENDS)}")
    try:
        module = importlib.import_module(_MODULES[name])
    except ImportError as exc:
        raise BackendUnavailable(f"MoBA backend {name!r} is not available here: {exc}") from exc
    available = getattr(module, "is_available", None)
    if available is not None and not available():
        reason = getattr(module, "unavailable_reason", lambda: "its requirements are not met")()
        raise BackendUnavailable(f"MoBA backend {name!r} is not available here: {reason}")
    return module
