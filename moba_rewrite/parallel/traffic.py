"""Counting what context-parallel attention sends: bytes this rank hands to collectives for other
ranks (payload only; the transport's framing is not counted), per step.

    with record_traffic() as t:
        out = moba_attention_cp(q, k, v, block_size=512, top_k=3)
    t.bytes_sent, t.by_step   # e.g. {"block means": ..., "key/value blocks": ...}

Used by benchmarks/bench_cp.py and the tests of the communication volume.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator


@dataclass
class Traffic:
    """Bytes this rank sent to other ranks, in total and per step."""

    by_step: dict[str, int] = field(default_factory=dict)

    @property
    def bytes_sent(self) -> int:
        return sum(self.by_step.values())

    def add(self, step: str, nbytes: int) -> None:
        self.by_step[step] = self.by_step.get(step, 0) + int(nbytes)


_RECORDERS: list[Traffic] = []


@contextmanager
def record_traffic() -> Iterator[Traffic]:
    """Count the bytes sent by context-parallel calls made inside the block (nesting allowed)."""
    t = Traffic()
    _RECORDERS.append(t)
    try:
        yield t
    finally:
        _RECORDERS.remove(t)


def count(step: str, nbytes: int) -> None:
    """Add `nbytes` sent in `step` to every active recorder."""
    for t in _RECORDERS:
        t.add(step, nbytes)
