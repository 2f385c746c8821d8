"""Run a handful of small CPU ops on the calling thread alone.

A decode step is dozens of small ops. Each op that ATen runs in parallel (a gather of a few
blocks, a softmax, a batched matmul) opens an OpenMP region and waits at its barrier for every
intra-op thread; when other processes hold the cores, that wait is a whole scheduling slice, and
a step that takes half a millisecond alone took 20 ms (median) with two threads on a loaded
2-core machine. The work is too small to gain from a second thread, so it runs on one.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


@contextmanager
def single_threaded(device: torch.device) -> Iterator[None]:
    """One intra-op thread for the block (CPU only; elsewhere, when already one, and while a compiler
    traces, nothing changes). Setting the count costs well under a microsecond; the caller's count
    is restored."""
    n = 1 if device.type != "cpu" or torch.compiler.is_compiling() else torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
