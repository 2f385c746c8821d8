"""Do a checkpoint's weights fit its config? Checked before loading (size) and after (keys).

Before loading, `values_in(path)` counts the values a weights file holds from its header
alone (safetensors) or a memory map (torch files, `weights_only=True`), and
`estimated_parameters(build, config)` builds the model at one and at two layers on the meta
device (no memory) and extrapolates to the config's layer count. `size_problem` then says
why a config cannot be loaded: it asks for far more values than the weights hold (a config
of 20000 layers beside two layers of weights), or for more memory than the machine has. That
fails in a second instead of allocating for minutes.

After loading, `loading_problem` turns transformers' loading info (or the keys compared by
hand for a bare state dict) into one sentence naming a few missing, unexpected and
mismatched weights: every one of them means the model would not be the trained one.
"""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

# A config may ask for this many times the values its weights hold (plus a little) before
# the size check calls it a mismatch: tied or unsaved parameters never come near it.
_SLACK_FACTOR = 2
_SLACK_VALUES = 1 << 20
_NAMED = 3  # weights named per kind in a message


def values_in(path: Path) -> tuple[int, int]:
    """(values, bytes of tensor data) a weights file holds, without reading the data.

    safetensors: from the header (the library checks it against the file's size); a torch
    file: from a memory map (`weights_only=True`; read whole in the legacy pre-zip format).
    Raises what the readers raise.
    """
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        values = nbytes = 0
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                piece = f.get_slice(name)
                n = math.prod(piece.get_shape())
                values += n
                nbytes += n * _itemsize(piece.get_dtype())
        return values, nbytes
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:
        if "mmap" not in str(exc):
            raise
        obj = torch.load(str(path), map_location="cpu", weights_only=True)  # legacy (pre-zip) format
    tensors = [t for t in _tensors(obj)]
    return sum(t.numel() for t in tensors), sum(t.numel() * t.element_size() for t in tensors)


def _tensors(obj: Any) -> Iterable[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            if isinstance(value, torch.Tensor):
                yield value
            elif isinstance(value, dict):
                yield from (v for v in value.values() if isinstance(v, torch.Tensor))


def _itemsize(name: str) -> int:
    digits = "".join(c for c in name if c.isdigit())
    return max(1, int(digits) // 8) if digits else 1


def _layer_count(config) -> int | None:
    value = getattr(config, "num_hidden_layers", None)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def estimated_parameters(build: Callable[[Any], torch.nn.Module], config) -> int | None:
    """Parameters of `build(config)`, extrapolated from meta-device builds at 1 and 2 layers.

    None when the config has no `num_hidden_layers` or a small build fails (the check after
    loading still holds; only the early answer is lost).
    """
    layers = _layer_count(config)
    if layers is None or layers < 1:
        return None
    counts = []
    try:
        for n in (1, 2):
            small = copy.deepcopy(config)
            small.num_hidden_layers = n
            with torch.device("meta"):
                model = build(small)
            counts.append(sum(p.numel() for p in model.parameters()))
    except Exception:  # noqa: BLE001  (an estimate only: some configs do not shrink)
        return None
    per_layer = max(0, counts[1] - counts[0])
    return counts[0] + (layers - 1) * per_layer


def physical_memory() -> int | None:
    """Bytes of RAM on this machine (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover
        return None


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def size_problem(estimate: int | None, values: int, nbytes: int, config, *, allow_random_init: bool,
                 dtype: torch.dtype | None = None) -> tuple[str, bool] | None:
    """Why a model of `estimate` parameters cannot come from weights holding `values`, or None;
    with whether random initialisation would get past it."""
    if estimate is None:
        return None
    layers = _layer_count(config)
    itemsize = torch.empty((), dtype=dtype).element_size() if isinstance(dtype, torch.dtype) else (
        max(1, round(nbytes / values)) if values else 4)
    memory = physical_memory()
    if memory is not None and estimate * itemsize > memory:
        return (f"expected a model that fits in memory: config.json describes about {estimate:,} parameters "
                f"({layers} layers, {_gib(estimate * itemsize)}) and this machine has {_gib(memory)}"), False
    if not allow_random_init and estimate > _SLACK_FACTOR * values + _SLACK_VALUES:
        return (f"expected weights matching config.json: it describes about {estimate:,} parameters "
                f"({layers} layers) but the weights hold {values:,} values"), True
    return None


def loading_problem(missing: Iterable[str], unexpected: Iterable[str], mismatched: Iterable[Any]) -> str | None:
    """`missing a.b, c.d and 7 more; unexpected ...; shape of x: checkpoint [..] vs config [..]`, or None."""
    parts = []
    for what, keys in (("missing", sorted(missing)), ("unexpected", sorted(unexpected))):
        if keys:
            more = f" and {len(keys) - _NAMED} more" if len(keys) > _NAMED else ""
            parts.append(f"{what} {', '.join(keys[:_NAMED])}{more}")
    mismatched = sorted(mismatched, key=lambda m: m[0])
    if mismatched:
        shown = [f"{key} (checkpoint {list(ckpt)} vs config {list(model)})" for key, ckpt, model in mismatched[:_NAMED]]
        more = f" and {len(mismatched) - _NAMED} more" if len(mismatched) > _NAMED else ""
        parts.append(f"shape of {', '.join(shown)}{more}")
    return "; ".join(parts) or None


def compare_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> tuple[list[str], list[str], list]:
    """(missing, unexpected, mismatched) keys of a bare state dict against `model`, tied weights
    (shared parameters, or those the model declares tied) not counted as missing."""
    own = model.state_dict()
    tied = getattr(model, "_tied_weights_keys", None) or []
    tied = set(tied) | set(getattr(model, "all_tied_weights_keys", None) or {})
    shared = _shared_aliases(model)
    missing = [k for k in own if k not in state and k not in tied and not (shared.get(k, set()) & state.keys())]
    unexpected = [k for k in state if k not in own]
    mismatched = [(k, tuple(state[k].shape), tuple(own[k].shape)) for k in state
                  if k in own and tuple(state[k].shape) != tuple(own[k].shape)]
    return missing, unexpected, mismatched


def _shared_aliases(model: torch.nn.Module) -> dict[str, set[str]]:
    """Name -> the other names of the same parameter (tied embeddings share one tensor)."""
    by_id: dict[int, set[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), set()).add(name)
    return {name: names - {name} for names in by_id.values() for name in names}
