"""What every exporter needs: an exportable forward, sample inputs, and output comparison.

Hugging Face models are exported through `logits_view` (input_ids -> logits, no KV cache,
an all-ones attention mask so nothing O(T^2) is traced),
so the exported program, AOTInductor package and ONNX model all take one `input_ids`
tensor `[batch, seq]` and return one tensor (the logits, else the last hidden state, else the
model's first output tensor).
"""

from __future__ import annotations

import contextlib
import copy
import errno
import io
import os
from typing import Any, Iterator

import torch
from torch import Tensor, nn


def _logits_forward(self, input_ids: Tensor) -> Tensor:
    # An all-ones attention_mask says what is true (one unpadded sequence per row) and what
    # transformers cannot see while tracing without one: that position_ids do not restart
    # (packed sequences). Without it, the traced mask would be the full [T, T] packed mask.
    out = super(type(self), self).forward(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                          use_cache=False)
    for name in ("logits", "last_hidden_state"):
        value = getattr(out, name, None)
        if isinstance(value, Tensor):
            return value
    return first_tensor(out)  # e.g. DPR's pooler_output, FLAVA's first embedding


_VIEW_CLASSES: dict[type, type] = {}


def logits_view(model: nn.Module) -> nn.Module:
    """The same HF model (shared parameters and submodules) with `forward(input_ids) -> logits`.

    A shallow copy whose class is a subclass of the model's own, so module names in exported
    graphs stay the model's own (`model.layers.0.self_attn`, not `model.model.layers...`) and
    policy globs mean the same in every format. Base models return the last hidden state, models
    with neither their first output tensor. A view is its own view.
    """
    cls = type(model)
    if cls in _VIEW_CLASSES.values():
        return model
    view_cls = _VIEW_CLASSES.get(cls)
    if view_cls is None:
        view_cls = type(f"{cls.__name__}LogitsOnly", (cls,), {"forward": _logits_forward,
                                                               "__module__": cls.__module__})
        _VIEW_CLASSES[cls] = view_cls
    view = copy.copy(model)
    view.__class__ = view_cls
    return view


def is_hf_model(model: Any) -> bool:
    """True for transformers `PreTrainedModel`s (they take `input_ids`)."""
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, PreTrainedModel)


def text_config(model: Any) -> Any:
    """The config that holds a model's vocabulary and positions: a vision-language or other
    composite model's text (decoder) config, else the model's own config (None without one)."""
    cfg = getattr(model, "config", None)
    getter = getattr(cfg, "get_text_config", None)
    if callable(getter):
        try:
            return getter(decoder=True)
        except Exception:  # noqa: BLE001 (a composite config without a decoder: its own fields)
            return cfg
    return cfg


def vocab_size(model: Any) -> int | None:
    """The model's vocabulary size (its text config's, for composite models), None when it names none."""
    for value in (getattr(text_config(model), "vocab_size", None), getattr(getattr(model, "config", None),
                                                                          "vocab_size", None),
                  getattr(model, "vocab_size", None)):
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def exportable(model: nn.Module) -> nn.Module:
    """The module to hand to torch.export / ONNX: HF models as their `logits_view`."""
    return logits_view(model) if is_hf_model(model) else model


def sample_inputs(model: Any, seq_len: int, *, batch: int = 1, seed: int = 0) -> tuple[Tensor, ...]:
    """Deterministic sample inputs for `exportable(model)` at sequence length `seq_len`.

    HF models get random `input_ids`; other modules must define `example_inputs(seq_len)`
    returning a tuple of tensors; an ExportedProgram reuses the shapes it was exported with.
    """
    gen = torch.Generator().manual_seed(seed)
    if is_hf_model(model):
        vocab = vocab_size(model)
        if vocab is None:
            raise ValueError("sample inputs: expected config.vocab_size >= 1 for a Hugging Face model")
        device = next(model.parameters()).device
        return (torch.randint(0, vocab, (batch, seq_len), generator=gen).to(device),)
    maker = getattr(model, "example_inputs", None)
    if callable(maker):
        torch.manual_seed(seed)
        out = maker(seq_len)
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)
    raise ValueError(f"sample inputs: expected a Hugging Face model or a module with an example_inputs(seq_len) "
                     f"method, got {type(model).__name__}")


def seq_dynamic_shapes(args: tuple[Tensor, ...], *, max_seq: int = 1 << 17) -> tuple:
    """`dynamic_shapes` marking dim 1 (the sequence) of every input as one dynamic `seq` dim."""
    seq = torch.export.Dim("seq", min=2, max=max_seq)
    return tuple({1: seq} if isinstance(a, Tensor) and a.dim() >= 2 else None for a in args)


class OutputWriteFailed(OSError):
    """Writing an artifact failed in the file system (disk full, file too large, I/O error)."""


_DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


def as_output_failure(exc: BaseException) -> OutputWriteFailed | None:
    """An exporter's failure that is really the output's file system being full, or None."""
    for e in (exc, exc.__cause__, exc.__context__):
        if isinstance(e, OutputWriteFailed):
            return e
        if isinstance(e, OSError) and e.errno in _DISK_FULL:
            return OutputWriteFailed(e.errno, e.strerror or str(e))
    return None


class _FailSafeFile(io.RawIOBase):
    """The file torch's C++ archive writer (`PyTorchStreamWriter`) writes a .pt2 into.

    That writer cannot survive a failed write: it finalises the archive again in its destructor,
    which throws a second time and aborts the whole process. So the first OSError is kept and
    every later write is accepted and dropped; `failsafe_output` raises the kept error once
    torch has finished.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__()
        self._file = open(path, "wb")  # noqa: SIM115  (closed by failsafe_output)
        self.error: OSError | None = None
        self._pos = 0

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def write(self, data) -> int:
        n = memoryview(data).nbytes
        if self.error is None:
            try:
                self._file.write(data)
            except OSError as exc:
                self.error = exc
        self._pos += n
        return n

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if self.error is None:
            try:
                self._pos = self._file.seek(offset, whence)
                return self._pos
            except OSError as exc:
                self.error = exc
        self._pos = offset if whence == os.SEEK_SET else self._pos + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def flush(self) -> None:
        if self.error is None:
            try:
                self._file.flush()
            except OSError as exc:
                self.error = exc

    def close_file(self) -> None:
        try:
            self._file.close()
        except OSError as exc:
            self.error = self.error or exc


@contextlib.contextmanager
def failsafe_output(path: str | os.PathLike) -> Iterator[io.RawIOBase]:
    """A writable, seekable file for torch's archive writers; raises `OutputWriteFailed` after the
    block if any write failed (instead of the process aborting), even if the block raised too."""
    sink = _FailSafeFile(path)
    try:
        yield sink
    except Exception:
        sink.close_file()
        if sink.error is None:
            raise
    else:
        sink.flush()
        sink.close_file()
    if sink.error is not None:
        err = sink.error
        raise OutputWriteFailed(err.errno, err.strerror or str(err)) from err


def first_tensor(out: Any) -> Tensor:
    """The first tensor of a model output (tensor, tuple/list, or a ModelOutput)."""
    if isinstance(out, Tensor):
        return out
    if isinstance(out, dict):
        for value in out.values():
            if isinstance(value, Tensor):
                return value
    if isinstance(out, (tuple, list)) and out:
        return first_tensor(out[0])
    logits = getattr(out, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    raise TypeError(f"expected a tensor output, got {type(out).__name__}")


def max_abs_diff(a: Any, b: Any) -> float:
    """Largest absolute difference between two outputs (numpy arrays or tensors)."""
    ta = torch.as_tensor(a).detach().float().cpu()
    tb = torch.as_tensor(b).detach().float().cpu()
    if ta.shape != tb.shape:
        raise ValueError(f"output shapes differ: {list(ta.shape)} vs {list(tb.shape)}")
    return float((ta - tb).abs().max()) if ta.numel() else 0.0
