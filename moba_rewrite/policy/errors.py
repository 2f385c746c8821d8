"""PolicyError: one-line, actionable messages about a policy file.

Every message has the shape `<file>[:<line>] <key path>: <what was expected, what was found>`,
for example `hybrid.yaml:7 rules[1].top_k: expected an integer >= 1, got 0`, so editors and
terminals can jump to the place and a person knows what to write there.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence

PathPart = str | int
KeyPath = tuple[PathPart, ...]


def format_path(path: Sequence[PathPart]) -> str:
    """`("rules", 1, "top_k")` -> `rules[1].top_k` (the spelling used in every message)."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """` (did you mean 'rules'?)` for the closest choice, or `""` when nothing is close."""
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def describe(value: object) -> str:
    """How a found value is shown in a message: its repr, kept short, with its type if odd."""
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return text


class PolicyError(ValueError):
    """A policy that cannot be used as written. The message is a single line.

    Attributes: `source` (file name as given, or `<dict>`), `line` (1-based, or None where the
    format does not say), `key_path` (e.g. `rules[1].top_k`, "" for the whole file) and
    `detail` (what was expected and what was found).
    """

    def __init__(self, source: str, line: int | None, key_path: str, detail: str):
        self.source = source
        self.line = line
        self.key_path = key_path
        self.detail = " ".join(str(detail).split())
        where = source if line is None else f"{source}:{line}"
        text = f"{where} {key_path}: {self.detail}" if key_path else f"{where}: {self.detail}"
        super().__init__(text)
