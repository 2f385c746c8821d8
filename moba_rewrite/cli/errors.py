"""The command's failure vocabulary: exit statuses (docs/CLI.md), `CliError`, and the
mapping of library errors onto them (shared by every command)."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

# Exit statuses (docs/CLI.md), re-exported for the commands.
from moba_rewrite.exit_codes import (  # noqa: F401
    EXIT_OK,
    EXIT_INTERNAL,
    EXIT_USAGE,
    EXIT_CHECKPOINT,
    EXIT_ARCHITECTURE,
    EXIT_POLICY,
    EXIT_OUTPUT_EXISTS,
    EXIT_OUTPUT_UNWRITABLE,
    EXIT_VALUE,
    EXIT_PICKLE,
    EXIT_VERIFY,
    EXIT_EXPORT,
    EXIT_MISSING_PACKAGE,
    EXIT_INTERRUPTED,
    EXIT_TERMINATED,
)

PROG = "moba-rewrite"


class CliError(Exception):
    """A user-facing failure: `str()` is `<file or option>: <what was expected>`."""

    def __init__(self, where: str | os.PathLike, message: str, code: int) -> None:
        self.where = str(where)
        self.code = code
        super().__init__(f"{self.where}: {message}" if self.where else message)


def warn(message: str) -> None:
    """`moba-rewrite: warning: <message>` on standard error (the command goes on)."""
    import sys

    sys.stderr.write(f"{PROG}: warning: {message}\n")


# Optional packages: import name -> what to install (pyproject.toml's extras).
OPTIONAL_PACKAGES = {"matplotlib": "'moba-rewrite[plot]' (or: pip install matplotlib)"}


def missing_package(name: str, what: str) -> CliError:
    """The one-line answer when a package `what` needs is not installed (exit 12)."""
    top = name.split(".")[0]
    install = OPTIONAL_PACKAGES.get(top, top)
    return CliError("", f"{what} needs the Python package {top!r}, which is not installed; install it with: "
                        f"pip install {install}", EXIT_MISSING_PACKAGE)


def require(name: str, what: str) -> None:
    """Fail before any slow work when the optional package `name` is missing."""
    import importlib.util

    if importlib.util.find_spec(name) is None:
        raise missing_package(name, what)


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
    from moba_rewrite.integrations.hf_version import UnsupportedTransformersError
    from moba_rewrite.policy import PolicyError

    if isinstance(exc, PolicyError):
        return CliError("", str(exc), EXIT_POLICY)
    if isinstance(exc, UnsupportedTransformersError):
        return CliError("", str(exc), EXIT_MISSING_PACKAGE)
    return CliError("", f"expected a model moba-rewrite can {verb} ({type(exc).__name__}: "
                        f"{first_line(exc, type(exc).__name__)})", EXIT_ARCHITECTURE)
