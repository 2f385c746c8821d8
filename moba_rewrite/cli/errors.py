"""The command's failure vocabulary: exit statuses (docs/CLI.md), `CliError`, and the
mapping of library errors onto them (shared by every command)."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

PROG = "moba-rewrite"

# Exit statuses (docs/CLI.md).
EXIT_OK = 0
EXIT_INTERNAL = 1  # a bug or an unexpected failure (rerun with --debug)
EXIT_USAGE = 2  # bad command line (argparse)
EXIT_CHECKPOINT = 3  # input missing, unreadable or corrupt
EXIT_ARCHITECTURE = 4  # model cannot be built or rewritten (unknown architecture, unsupported site)
EXIT_POLICY = 5  # bad policy file
EXIT_OUTPUT_EXISTS = 6  # output exists and --force was not given
EXIT_OUTPUT_UNWRITABLE = 7  # output cannot be written
EXIT_VALUE = 8  # an option's value does not fit the model or policy (e.g. --seq-len below one block)
EXIT_PICKLE = 9  # pickled module refused without --trust-pickle
EXIT_VERIFY = 10  # the written artifact does not reproduce the rewritten model
EXIT_EXPORT = 11  # export / compile of the rewritten model failed


class CliError(Exception):
    """A user-facing failure: `str()` is `<file or option>: <what was expected>`."""

    def __init__(self, where: str | os.PathLike, message: str, code: int) -> None:
        self.where = str(where)
        self.code = code
        super().__init__(f"{self.where}: {message}" if self.where else message)


def first_line(exc: BaseException, default: str = "") -> str:
    """The first line of an exception's message (`default` when it has none): for one-line errors."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else default


@contextlib.contextmanager
def checkpoint_errors() -> Iterator[None]:
    """Re-raise `checkpoints.CheckpointError` (bad input or output path) as a `CliError` with its exit code."""
    from moba_rewrite import checkpoints as ck

    try:
        yield
    except ck.CheckpointError as exc:
        raise CliError("", str(exc), exc.exit_code) from exc


def rewrite_error(exc: Exception, verb: str = "rewrite") -> CliError:
    """A library failure while planning or rewriting: a policy error (5) or an unsupported model (4)."""
    from moba_rewrite.policy import PolicyError

    if isinstance(exc, PolicyError):
        return CliError("", str(exc), EXIT_POLICY)
    return CliError("", f"expected a model moba-rewrite can {verb} ({type(exc).__name__}: "
                        f"{first_line(exc, type(exc).__name__)})", EXIT_ARCHITECTURE)
