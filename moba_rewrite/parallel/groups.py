"""Process groups for context parallelism: resolving `group=`, checking that every rank agrees,
and turning a failed collective into one clear error.

A dead or stalled rank makes the surviving ranks' next collective fail (gloo: connection closed,
or the group's timeout expires; NCCL: its watchdog). `collective(...)` re-raises that as a
`ContextParallelError` naming this rank, the step that failed and the usual causes, so a test or
a training job shows one line instead of a hang or a backend stack.
"""

from __future__ import annotations

import struct
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.distributed as dist
from torch import Tensor

from moba_rewrite.parallel.traffic import count


class ContextParallelError(RuntimeError):
    """A collective of the context-parallel attention failed (a rank died, timed out or diverged)."""


def resolve_group(group, who: str) -> dist.ProcessGroup:
    """`None` -> the default group; a 1-D `DeviceMesh` -> its group; a `ProcessGroup` as is.

    Raises `ValueError` when torch.distributed is not initialised, the mesh is not 1-D, or the
    group has a single rank (context parallelism over one rank is `moba_attention`)."""
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(f"{who}: torch.distributed is not initialised (call dist.init_process_group first)")
    from torch.distributed.device_mesh import DeviceMesh

    if isinstance(group, DeviceMesh):
        if group.ndim != 1:
            raise ValueError(f"{who}: group must be a 1-D DeviceMesh (e.g. mesh['cp']), got a {group.ndim}-D mesh "
                             f"with dims {group.mesh_dim_names}")
        group = group.get_group()
    pg = group if group is not None else dist.group.WORLD
    if not isinstance(pg, dist.ProcessGroup):
        raise ValueError(f"{who}: group must be a ProcessGroup, a 1-D DeviceMesh or None, got {type(group).__name__}")
    if dist.get_world_size(pg) < 2:
        raise ValueError(f"{who}: the group has a single rank; context parallelism needs at least 2 "
                         f"(call moba_rewrite.moba_attention on the whole sequence instead)")
    if dist.get_rank(pg) < 0:
        raise ValueError(f"{who}: this process (global rank {dist.get_rank()}) is not a member of the group")
    return pg


@contextmanager
def collective(who: str, step: str, pg: dist.ProcessGroup) -> Iterator[None]:
    """Run collectives; any failure becomes one `ContextParallelError` naming the rank and the step."""
    try:
        yield
    except ContextParallelError:
        raise
    except (RuntimeError, dist.DistError) as e:  # gloo / NCCL errors, timeouts, closed connections
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ContextParallelError(
            f"{who}: rank {dist.get_rank(pg)} of {dist.get_world_size(pg)}: {step} failed ({first}); a peer rank "
            f"died, stalled past the group's timeout, or called a different collective") from e


class InFlight:
    """An uneven all-to-all started without waiting (`async_op`): the caller computes meanwhile
    (gloo moves the bytes on its own thread, NCCL on its stream) and `wait()`s for the output.
    A failure, at the start or the wait, is one `ContextParallelError` naming the step."""

    def __init__(self, send: Tensor, recv: Tensor, send_counts: list[int], recv_counts: list[int],
                 pg: dist.ProcessGroup, who: str, step: str):
        self.send, self.recv, self.pg, self.who, self.step = send, recv, pg, who, step  # send: alive until done
        with collective(who, step, pg):
            self.work = dist.all_to_all_single(recv, send, output_split_sizes=recv_counts,
                                               input_split_sizes=send_counts, group=pg, async_op=True)

    def wait(self) -> Tensor:
        with collective(self.who, self.step, self.pg):
            self.work.wait()
        self.send = None
        return self.recv


_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_LAYOUT_CODES = {"contiguous": 0, "zigzag": 1}
_EXCHANGE_CODES = {"auto": 0, "keys": 1, "queries": 2}


def check_call_agreement(who: str, pg: dist.ProcessGroup, *, kind: str, q: Tensor, k: Tensor, block_size: int,
                         top_k: int, causal: bool, layout: str, seq_len: int, scale: float,
                         exchange: str = "auto", key_padding: bool = False, window: int | None = None,
                         packed: bool = False, chunk: int | None = None) -> None:
    """Fail on every rank unless all ranks make the same attention call (MoBA or dense, shapes and
    parameters alike); a MoBA site on one rank and a dense one on another is caught too."""
    check_same_on_all_ranks(who, pg, {
        "the attention kind (MoBA or dense)": {"moba": 1, "dense": 2}[kind], "batch size": q.shape[0],
        "query heads": q.shape[1], "key/value heads": k.shape[1], "head dim": q.shape[3], "T_local": q.shape[2],
        "block_size": block_size, "top_k": top_k, "causal": int(bool(causal)), "layout": _LAYOUT_CODES[layout],
        "seq_len": seq_len, "scale": float_bits(scale),
        "dtype": _DTYPES.index(q.dtype) if q.dtype in _DTYPES else -1,
        "exchange": _EXCHANGE_CODES.get(exchange, -1), "whether a key padding mask is given": int(key_padding),
        "sliding window": int(window or 0), "whether documents are packed": int(packed),
        "attention chunk": int(chunk or 0),
    }, q.device)


def float_bits(x: float) -> int:
    """A float as the int64 of its float64 bits (the all-ranks-agree check compares integers)."""
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def check_same_on_all_ranks(who: str, pg: dist.ProcessGroup, fields: dict[str, int], device) -> None:
    """All-gather `fields` (small integers) and raise `ValueError` on every rank if any differs.

    The error names the first differing field and its value on each rank. Every rank raises
    (they all see the same gathered values), so none is left waiting in a later collective."""
    names = list(fields)
    mine = torch.tensor([int(fields[n]) for n in names], dtype=torch.int64, device=device)
    with collective(who, "the check that all ranks agree on shapes and parameters", pg):
        everyone = all_gather_stacked(mine, pg)
    count("rank agreement check", mine.numel() * mine.element_size() * (everyone.shape[0] - 1))
    for i, name in enumerate(names):
        values = everyone[:, i].tolist()
        if len(set(values)) > 1:
            per_rank = ", ".join(f"rank {r}: {v}" for r, v in enumerate(values))
            raise ValueError(f"{who}: ranks disagree on {name} ({per_rank}); every rank must pass the same "
                             f"shapes and parameters")


# torch 2.13 renamed the single-tensor collectives (the old names warn); torch 2.11 has only the old ones.
_ALL_GATHER_SINGLE = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_REDUCE_SCATTER_SINGLE = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def all_gather_stacked(x: Tensor, pg: dist.ProcessGroup) -> Tensor:
    """`[W, *x.shape]`: every rank's `x` (same shape everywhere), gathered in rank order."""
    flat = x.contiguous().view(-1)
    out = flat.new_empty(dist.get_world_size(pg) * flat.numel())
    _ALL_GATHER_SINGLE(out, flat, group=pg)
    return out.view(-1, *x.shape)


def reduce_scatter_stacked(x: Tensor, pg: dist.ProcessGroup) -> Tensor:
    """Sum over ranks of `x[r]` (`x`: `[W, ...]`), returned on rank r."""
    flat = x.contiguous().view(-1)
    out = flat.new_empty(flat.numel() // x.shape[0])
    _REDUCE_SCATTER_SINGLE(out, flat, group=pg)
    return out.view(x.shape[1:])


def swap_with(x: Tensor, partner: int, pg: dist.ProcessGroup) -> Tensor:
    """`partner`'s `x` (same shape and dtype on both), for this rank's `x`: one send and one receive
    (`partner` is a rank of `pg`)."""
    x = x.contiguous()
    got = torch.empty_like(x)
    peer = dist.get_global_rank(pg, partner)
    for request in dist.batch_isend_irecv([dist.P2POp(dist.isend, x, peer, pg), dist.P2POp(dist.irecv, got, peer, pg)]):
        request.wait()
    return got
