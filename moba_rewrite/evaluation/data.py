"""Evaluation inputs: windows of token ids from `.ids` files, text files (with the checkpoint's
tokenizer), a text prompt, a tensor, or random ids when no data is given (said so).

Samples are the first S consecutive non-overlapping windows of `seq_len` tokens of the data
(files concatenated in the order given, each text file tokenized on its own), so two runs on
the same data and length see the same tokens.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from moba_rewrite.evaluation.errors import DataFileError, DataTooShort, NoTokenizer

IDS_SUFFIX = ".ids"


@dataclass
class Windows:
    """`ids` `[S, seq_len]` plus where they came from (for the report and the policy comments)."""

    ids: Tensor
    source: str  # "files" | "prompt" | "tensor" | "random"
    files: list[str] = field(default_factory=list)
    tokens: int = 0  # tokens available in the data
    notes: list[str] = field(default_factory=list)
    label: str = "random token ids"  # what made the windows when source is "random"

    @property
    def count(self) -> int:
        return int(self.ids.shape[0])

    def describe(self) -> str:
        if self.source == "random":
            return f"{self.label} ({self.count} x {self.ids.shape[1]}, seeds 0..{self.count - 1})"
        what = ", ".join(self.files) if self.files else self.source
        return f"{what}: {self.count} window(s) of {self.ids.shape[1]} tokens from {self.tokens}"


def read_ids_file(path: Path, vocab_size: int | None) -> list[int]:
    """Whitespace-separated integer token ids; each must lie in `[0, vocab_size)`."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataFileError(path, "expected a data file (.ids token ids or text), but it does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataFileError(path, f"expected a readable text file of token ids ({exc})") from None
    out: list[int] = []
    for line_no, line in enumerate(text.splitlines(), 1):
        for word in line.split():
            try:
                value = int(word)
            except ValueError:
                raise DataFileError(f"{path}:{line_no}", f"expected whitespace-separated integer token ids, "
                                                         f"got {word[:20]!r}") from None
            if value < 0 or (vocab_size is not None and value >= vocab_size):
                raise DataFileError(f"{path}:{line_no}", f"expected token ids in [0, {vocab_size}) for this "
                                                         f"model's vocabulary, got {value}")
            out.append(value)
    return out


def read_text_file(path: Path, tokenizer: Any) -> list[int]:
    """A text file tokenized as one document (with the tokenizer's special tokens)."""
    if not path.is_file():
        raise DataFileError(path, "expected a data file (.ids token ids or text), but it does not exist"
                            if not path.exists() else "expected a file, got a directory")
    if tokenizer is None:
        raise NoTokenizer(path, f"expected a checkpoint with a tokenizer to read text (none found); give token "
                                f"ids in a {IDS_SUFFIX} file instead")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataFileError(path, f"expected a UTF-8 text file ({exc})") from None
    return encode(tokenizer, text)


def encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text)["input_ids"])


def windows_of(tokens: Sequence[int] | Tensor, seq_len: int, samples: int, where: str) -> Tensor:
    """The first `samples` consecutive non-overlapping windows of `seq_len` tokens, `[S, seq_len]`."""
    flat = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)
    n = flat.numel() // seq_len
    if n == 0:
        raise DataTooShort(where, f"expected at least --seq-len {seq_len} tokens, got {flat.numel()}")
    n = min(n, samples)
    return flat[: n * seq_len].view(n, seq_len)


def load_windows(*, seq_len: int, samples: int, data: Any = None, prompt: str | None = None,
                 tokenizer: Any = None, vocab_size: int | None = None, random_inputs: Any = None) -> Windows:
    """Windows from `data` (paths, or a tensor of ids), `prompt` text, or random ids.

    `random_inputs(seq_len, seed)` makes one random window when there is no data (the model's
    own sample inputs: random ids in its vocabulary, or its `example_inputs`).
    """
    if prompt is not None:
        if tokenizer is None:
            raise NoTokenizer("--prompt", f"expected a checkpoint with a tokenizer to read text (none found); "
                                          f"give token ids in a {IDS_SUFFIX} file with --data instead")
        tokens = encode(tokenizer, prompt)
        return _finish(windows_of(tokens, seq_len, samples, "--prompt"), "prompt", [], len(tokens), samples)
    if isinstance(data, Tensor):
        if vocab_size is not None and data.numel() and (int(data.min()) < 0 or int(data.max()) >= vocab_size):
            raise DataFileError("data", f"expected token ids in [0, {vocab_size})")
        ids = data if data.dim() == 2 and data.shape[1] == seq_len else windows_of(data, seq_len, samples, "data")
        return _finish(ids[:samples], "tensor", [], int(data.numel()), samples)
    if data:
        paths = [Path(p) for p in ([data] if isinstance(data, (str, os.PathLike)) else data)]
        tokens: list[int] = []
        for p in paths:
            tokens += read_ids_file(p, vocab_size) if p.suffix == IDS_SUFFIX else read_text_file(p, tokenizer)
        where = "--data " + " ".join(str(p) for p in paths)
        return _finish(windows_of(tokens, seq_len, samples, where), "files", [str(p) for p in paths],
                       len(tokens), samples)
    if random_inputs is None:
        raise DataTooShort("data", "expected data or a way to make random inputs")
    ids = torch.cat([random_inputs(seq_len, seed) for seed in range(samples)])
    w = Windows(ids, "random", tokens=ids.numel(), label=getattr(random_inputs, "label", "random token ids"))
    w.notes.append(f"no --data: {w.describe()}; perplexity on such inputs says nothing about language "
                   "modelling, and KL / agreement on them only show how far the rewrite moves the outputs on "
                   "such inputs, not on real text")
    return w


def _finish(ids: Tensor, source: str, files: list[str], tokens: int, asked: int) -> Windows:
    w = Windows(ids, source, files, tokens)
    if w.count < asked:
        w.notes.append(f"the data holds {w.count} window(s) of {ids.shape[1]} tokens ({tokens} tokens); "
                       f"asked for {asked}")
    return w


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def find_tokenizer(checkpoint: str | os.PathLike) -> Any:
    """The checkpoint's tokenizer (from its directory, or the one beside a weights file), or None."""
    path = Path(checkpoint)
    folder = path if path.is_dir() else path.parent
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # noqa: BLE001  (any loader failure is a bad tokenizer file)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DataFileError(folder, f"expected a tokenizer transformers can load from its files ({first})") from exc
