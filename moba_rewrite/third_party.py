"""What other libraries print while we call them: held back, so that an error stays one line.

transformers logs a many-line LOAD REPORT before raising, torch warns about pickle protocols
before refusing a file, exporters log their progress. `held_back()` collects Python warnings
and log records (of every logger) while its block runs:

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


@contextlib.contextmanager
def held_back() -> Iterator[None]:
    """Hold back third-party warnings and log output while the block runs (see the module doc).

    Log records are caught where every logger hands them to its handlers
    (`logging.Logger.callHandlers`), so loggers and handlers created inside the block (a
    library imported on the way) are held back too; replaying calls the real handlers.
    """
    if _PASSTHROUGH:
        yield
        return
    records: list[tuple[logging.Logger, logging.LogRecord]] = []
    release = logging.Logger.callHandlers

    def collect(logger: logging.Logger, record: logging.LogRecord) -> None:
        records.append((logger, record))

    logging.Logger.callHandlers = collect  # type: ignore[method-assign]
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            yield
    except BaseException as exc:
        logging.Logger.callHandlers = release  # type: ignore[method-assign]
        text = _describe(records, caught)
        if text and isinstance(exc, Exception):
            exc.add_note(f"{_NOTE_HEADER}\n{text}")
        raise
    logging.Logger.callHandlers = release  # type: ignore[method-assign]
    for logger, record in records:
        logger.callHandlers(record)
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)


def _describe(records, caught) -> str:
    lines = [f"{r.levelname}:{r.name}: {r.getMessage()}" for _, r in records]
    lines += [f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})" for w in caught]
    return "\n".join(lines)
