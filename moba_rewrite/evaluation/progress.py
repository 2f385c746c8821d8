"""The progress bar of long evaluations: tqdm on standard error, drawn on a terminal or with
MOBA_REWRITE_PROGRESS=1 (the command's convention), never when `enabled` is False."""

from __future__ import annotations

import os
import sys


def bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    show = enabled and (sys.stderr.isatty() or os.environ.get("MOBA_REWRITE_PROGRESS") == "1")
    return tqdm(total=total, desc=desc, disable=not show, file=sys.stderr, leave=False, dynamic_ncols=True,
                bar_format="{desc:<34} {bar} {n_fmt}/{total_fmt} [{elapsed}<{remaining}]")
