"""What other libraries print while we call them: held back, so that an error stays one line.

transformers logs a many-line LOAD REPORT before raising, torch warns about pickle protocols
before refusing a file, exporters log their progress. `held_back()` collects Python warnings
and log records (every logger that has its own handlers, and the root logger) while its
block runs:

- the block succeeds: the collected output is replayed as it would have been printed;
- the block raises: nothing is printed; the output is attached to the exception as a note
  (`exc.__notes__`), so a traceback (`--debug`) still shows it.

`set_passthrough(True)` (the command's `--debug`) turns holding back off everywhere.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Iterator

_PASSTHROUGH = False
_NOTE_HEADER = "output of other libraries held back while this failed:"


def set_passthrough(on: bool) -> None:
    """Let third-party output through as it happens (for `--debug`)."""
    global _PASSTHROUGH
    _PASSTHROUGH = bool(on)


class _Collector(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.NOTSET)
        self.records: list[tuple[logging.Logger, logging.LogRecord]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append((logging.getLogger(record.name), record))


def _loggers_with_handlers() -> list[logging.Logger]:
    found = [logging.getLogger()]
    for logger in list(logging.Logger.manager.loggerDict.values()):
        if isinstance(logger, logging.Logger) and logger.handlers:
            found.append(logger)
    return found


@contextlib.contextmanager
def held_back() -> Iterator[None]:
    """Hold back third-party warnings and log output while the block runs (see the module doc)."""
    if _PASSTHROUGH:
        yield
        return
    collector = _Collector()
    saved = [(lg, lg.handlers[:], lg.propagate) for lg in _loggers_with_handlers()]
    for lg, _, _ in saved:
        lg.handlers = [collector]
        if lg is not logging.getLogger():
            lg.propagate = False
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            yield
    except BaseException as exc:
        _restore(saved)
        text = _describe(collector.records, caught)
        if text and isinstance(exc, Exception):
            exc.add_note(f"{_NOTE_HEADER}\n{text}")
        raise
    _restore(saved)
    _replay(collector.records, caught)


def _restore(saved) -> None:
    for lg, handlers, propagate in saved:
        lg.handlers = handlers
        lg.propagate = propagate


def _describe(records, caught) -> str:
    lines = [f"{r.levelname}:{r.name}: {r.getMessage()}" for _, r in records]
    lines += [f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})" for w in caught]
    return "\n".join(lines)


def _replay(records, caught) -> None:
    for logger, record in records:
        logger.handle(record)
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
