"""Why an evaluation or a calibration cannot run as asked: each error names the file or option
and what was expected, and carries the command's exit status (docs/CLI.md)."""

from __future__ import annotations

import os

from moba_rewrite.exit_codes import EXIT_ARCHITECTURE, EXIT_CHECKPOINT, EXIT_VALUE


class EvaluationError(ValueError):
    """Bad input for `evaluate` / `calibrate`; `str()` is `<file or option>: <what was expected>`."""

    exit_code = EXIT_VALUE

    def __init__(self, where: str | os.PathLike, message: str) -> None:
        self.where = os.fspath(where)
        self.message = message
        super().__init__(f"{self.where}: {message}" if self.where else message)


class DataFileError(EvaluationError):
    """A data file is missing, unreadable, or not what its suffix says (exit 3, like a checkpoint)."""

    exit_code = EXIT_CHECKPOINT


class DataTooShort(EvaluationError):
    """The data (or a passkey length) holds fewer tokens than one window needs (exit 8)."""


class NoTokenizer(EvaluationError):
    """Text was given but the checkpoint has no tokenizer to read it (exit 8)."""


class BudgetError(EvaluationError):
    """A calibration budget no policy can meet, or a grid that cannot route (exit 8)."""


class NotALanguageModel(EvaluationError):
    """The model does not map token ids `[batch, tokens]` to logits `[batch, tokens, vocab]` (exit 4)."""

    exit_code = EXIT_ARCHITECTURE
