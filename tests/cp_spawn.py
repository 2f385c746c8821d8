"""Spawning gloo ranks from pytest for the context-parallel tests (no test cases here; `check_case` asserts one case's results).

`run_suite(world, suite)` starts `world` processes from a fork server (torch, transformers and
moba_rewrite imported once, in the server, so each rank starts in a fraction of a second), each
rank joins a gloo group on a free port with a short timeout and runs the suite's cases in order
(`cp_workers.SUITES`), writing one JSON file of results. The parent waits with a deadline, kills
any rank still running after it, and returns `{case: {rank: "ok" | error text}}`; a rank that
never reported shows as missing, so a hang is one clear failure, never a stuck test run.
"""

from __future__ import annotations

import json
import multiprocessing
import socket
import tempfile
import time
from pathlib import Path

_CTX = None


def _context():
    global _CTX
    if _CTX is None:
        _CTX = multiprocessing.get_context("forkserver")
        _CTX.set_forkserver_preload(["torch", "transformers", "moba_rewrite.parallel", "cp_workers"])
    return _CTX


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_suite(world: int, suite: str, *, deadline_s: float = 480.0) -> dict[str, dict[int, str]]:
    """Run `cp_workers.SUITES[suite]` on `world` gloo ranks; results per case and rank."""
    import cp_workers

    ctx = _context()
    out_dir = Path(tempfile.mkdtemp(prefix="moba-cp-"))
    port = free_port()
    procs = [ctx.Process(target=cp_workers.rank_main, args=(rank, world, port, str(out_dir), suite), daemon=True)
             for rank in range(world)]
    for p in procs:
        p.start()
    end = time.monotonic() + deadline_s
    for p in procs:
        p.join(max(0.0, end - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(5)
    results: dict[str, dict[int, str]] = {}
    for rank in range(world):
        path = out_dir / f"rank{rank}.json"
        done = json.loads(path.read_text()) if path.exists() else {}
        for case, status in done.items():
            results.setdefault(case, {})[rank] = status
    return results


def check_case(results: dict, case: str, world: int) -> None:
    """Fail unless every rank reported "ok" for `case` (naming each rank's error, or its silence)."""
    per_rank = results.get(case, {})
    problems = [f"rank {r}: {per_rank.get(r, 'no result (the rank died or hung past the deadline)')}"
                for r in range(world) if per_rank.get(r) != "ok"]
    assert not problems, f"{case} failed:\n" + "\n".join(problems)


def case_names(suite: str) -> list[str]:
    import cp_workers

    return [f.__name__ for f in cp_workers.SUITES[suite]]
