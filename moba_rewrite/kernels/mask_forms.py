"""Cheaper, equal forms of an attention mask, found by reading it at run time.

A traced graph often hands the op a mask that could not be simplified when it was traced: a
key-padding mask that hides nothing, or a full `[.., Tq, Tk]` mask that is exactly the causal
cut (aligned bottom-right) AND a key mask, materialised because the tracer could not rule out
something else (transformers builds such masks under torch.compile / torch.export). Kernels
call `simplify` first: it reads the mask (cheap next to the attention itself: a key mask is
`O(B * Tk)`, a full one is already `Tq x Tk` in memory) and returns an equal `(mask, causal)`
pair, so the kernel takes its causal fast path. Equal means equal: MoBA with `causal=False`
and a boolean mask that holds causality is MoBA with `causal=True` and the key part
(docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor

__all__ = ["simplify", "hides_nothing", "causal_key_part", "key_prefix"]

_CHUNK_ELEMS = 1 << 24  # mask elements compared per step (bounded temporaries)
# Masks already read, with what was found: a model hands the same mask tensor to every layer,
# so a full mask is read once per forward, not once per layer. Keyed by the tensor object and
# checked against its storage, version and layout, so a changed or reused tensor is read again.
_SEEN: dict[int, tuple[weakref.ref, tuple, Tensor | None]] = {}


def _capturing(t: Tensor) -> bool:
    """A CUDA graph is being captured: no host sync (reading a value) is allowed."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def key_prefix(mask: Tensor | None, keys: int) -> Tensor | None:
    """The mask over the first `keys` keys (a KV cache's filled prefix); one that broadcasts over the
    keys (last dim 1) or None is kept."""
    return mask[..., :keys] if mask is not None and mask.shape[-1] > 1 else mask


def hides_nothing(mask: Tensor | None) -> bool:
    """A boolean key mask (query-independent) that hides no key."""
    if mask is None or mask.dtype != torch.bool or mask.shape[-2:-1] not in ((1,), ()) or _capturing(mask):
        return False
    return bool(mask.all())


def _slice_is_causal(m: Tensor, tq: int, tk: int) -> bool:
    """`m` (`[Tq, Tk]` bool) == causal cut AND its last row, compared 8 keys per int64 word
    when the layout allows (an eighth of the element work), else byte by byte."""
    key = m[-1]
    off = tk - tq
    words = tk % 8 == 0 and m.is_contiguous()
    mw = m.view(torch.int64) if words else m
    kw = key.view(torch.int64) if words else key
    width = mw.shape[-1]
    idx = torch.arange(width, device=m.device)
    step = max(1, _CHUNK_ELEMS // width)
    for q0 in list(range(0, tq, step)):
        q1 = min(tq, q0 + step)
        pos = torch.arange(q0 + off, q1 + off, device=m.device)  # the rows' query positions
        if not words:
            want = (idx[None, :] <= pos[:, None]) & key
            if not torch.equal(mw[q0:q1], want):
                return False
            continue
        # Words whose 8 keys are all <= the position copy the key mask, words past it are 0,
        # the one word that straddles the position keeps the key bytes up to it.
        edge = (pos + 1) // 8
        want = torch.where(idx[None, :] < edge[:, None], kw, 0)
        inside = edge < width
        if bool(inside.any()):
            rows = torch.nonzero(inside).squeeze(1)
            e = edge[rows]
            cols = e[:, None] * 8 + torch.arange(8, device=m.device)
            part = key[cols] & (cols <= pos[rows, None])
            want[rows, e] = part.contiguous().view(torch.int64).squeeze(1)
        if not torch.equal(mw[q0:q1], want):
            return False
    return True


def causal_key_part(mask: Tensor, tq: int, tk: int) -> Tensor | None:
    """If the boolean `[.., Tq, Tk]` mask equals the causal cut (query i at position `Tk - Tq + i`)
    AND a key mask, that key mask (`[.., 1, Tk]`, the last query row); else None."""
    if mask.dtype != torch.bool or mask.dim() < 2 or tq < 2 or mask.shape[-2] != tq or mask.shape[-1] != tk \
            or _capturing(mask):
        return None
    stamp = (mask.data_ptr(), mask._version, tuple(mask.shape), mask.stride(), tq, tk)
    seen = _SEEN.get(id(mask))
    if seen is not None and seen[0]() is mask and seen[1] == stamp:
        return seen[2]
    found = _read_causal_key_part(mask, tq, tk)
    if len(_SEEN) > 64:
        _SEEN.clear()
    key = id(mask)
    _SEEN[key] = (weakref.ref(mask, lambda _, key=key: _SEEN.pop(key, None)), stamp, found)
    return found


def _read_causal_key_part(mask: Tensor, tq: int, tk: int) -> Tensor | None:
    m4 = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    bs = range(m4.shape[0]) if m4.stride(0) else range(1)  # broadcast (expanded) dims: one slice
    hs = range(m4.shape[1]) if m4.stride(1) else range(1)
    for b in bs:
        for h in hs:
            m = m4[b, h]
            rows = torch.tensor([0, tq // 2, tq - 2], device=m.device)
            if not torch.equal(m[rows], (torch.arange(tk, device=m.device)[None, :] <= rows[:, None] + (tk - tq))
                               & m[-1]):
                return None  # most masks that are not causal fail on a few rows
            if not _slice_is_causal(m, tq, tk):
                return None
    return m4[:, :, -1:, :].reshape(mask.shape[:-2] + (1, tk))


def simplify(q: Tensor, k: Tensor, mask: Tensor | None, causal: bool) -> tuple[Tensor | None, bool]:
    """`(mask, causal)` for the same MoBA (or full attention), in the cheapest form found."""
    if mask is None:
        return None, causal
    tq, tk = q.shape[2], k.shape[2]
    if not causal:
        key = causal_key_part(mask, tq, tk)
        if key is not None:
            mask, causal = key, True
    if hides_nothing(mask):
        return None, causal
    return mask, causal
