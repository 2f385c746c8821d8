"""What the command prints: progress bars with step timings, tables, reports, sizes."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator


@dataclass
class Progress:
    """A tqdm bar over the steps of one command, with per-step timings for the summary."""

    total: int
    enabled: bool = True
    timings: list[tuple[str, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        from tqdm.auto import tqdm

        show = self.enabled and (sys.stderr.isatty() or os.environ.get("MOBA_REWRITE_PROGRESS") == "1")
        self.bar = tqdm(total=self.total, disable=not show, file=sys.stderr, leave=False,
                        bar_format="{desc:<34} {bar} {n_fmt}/{total_fmt} [{elapsed}]", dynamic_ncols=True)

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        self.bar.set_description_str(name + " ...")
        self.bar.refresh()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings.append((name, time.perf_counter() - t0))
            self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def progress_for(args: argparse.Namespace, steps: int) -> Progress:
    """The bar of a command: off with `-q` or `--no-progress`."""
    return Progress(steps, enabled=not args.quiet and not args.no_progress)


def say(*parts: Any, quiet: bool = False) -> None:
    if not quiet:
        print(*parts, flush=True)


def table(rows: list[dict]) -> str:
    """Rows of equal keys as an aligned text table (`-` for None)."""
    if not rows:
        return "(no attention sites found)"
    keys = list(rows[0])
    cells = [[("-" if r[k] is None else str(r[k])) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    lines = ["  ".join(k.ljust(w) for k, w in zip(keys, widths)).rstrip(), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines)


def print_report(report, *, quiet: bool = False, blank_line: bool = True) -> None:
    """The rewrite report's table and its warnings (`str(report)` ends with them: once each)."""
    if quiet:
        return
    print(str(report))
    if blank_line:
        print(flush=True)


def size(path: Path) -> int:
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"  # pragma: no cover
