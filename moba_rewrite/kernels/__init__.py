"""Kernel backends behind the `moba::attention` op, each exposing `forward` and `backward`.

- `registry`: backend names, `resolve_backend` (`auto` -> a backend for the device),
  `load_backend`;
- `reference`: dense masked MoBA, the definition every other backend is tested against;
- `eager`: when a call may skip the torch.library dispatcher (plain eager inference);
- `torch/`: the memory-efficient pure PyTorch backend (CPU default, GPU fallback);
- `triton/`: the fused GPU kernels and their launch configs;
- `flash_attn`: the paper's algorithm on flash-attn's varlen kernels (when installed).

The contract every backend fulfils is in docs/ARCHITECTURE.md. May import: torch, triton,
flash_attn, and modules of this package. Nothing else of moba_rewrite.
"""

from moba_rewrite.kernels.registry import BACKENDS, BackendUnavailable, load_backend, resolve_backend

__all__ = ["BACKENDS", "BackendUnavailable", "load_backend", "resolve_backend"]
