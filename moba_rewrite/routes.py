"""The routes picture: which key blocks each query block selected, per MoBA layer and head.

`capture` runs a rewritten model once and records the q / k (and mask and parameters) of
every `moba::attention` call, in execution order; `route_map` turns one call into the
fraction of a query block's queries that attend each key block, using the dense reference's
`block_selection` (the definition of MoBA's routing); `draw` writes the grid as an image.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

import moba_rewrite.attention.op  # noqa: F401  (registers torch.ops.moba)
from moba_rewrite.kernels.reference import block_selection


@dataclass
class CapturedCall:
    """One `moba::attention` call: its inputs (detached) and MoBA parameters."""

    q: Tensor
    k: Tensor
    attn_mask: Tensor | None
    block_size: int
    top_k: int
    causal: bool
    name: str = ""


class _Capture(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[CapturedCall] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.moba.attention.default:
            q, k, _v, mask, block_size, top_k, causal = args[:7]
            self.calls.append(CapturedCall(q.detach().clone(), k.detach().clone(),
                                           None if mask is None else mask.detach().clone(),
                                           int(block_size), int(top_k), bool(causal)))
        return func(*args, **kwargs)


def capture(model: Any, inputs: Sequence[Tensor], names: Sequence[str] | None = None) -> list[CapturedCall]:
    """Run `model` (a rewritten model; HF models through `input_ids`) once and record its MoBA calls.

    `names` (e.g. the report's MoBA site names in layer order) label the calls in order;
    by default the report stored on the model (`model._moba_report`) is used.
    """
    from moba_rewrite.exporters.common import exportable

    module = exportable(model)
    with torch.no_grad(), _Capture() as cap:
        module(*inputs)
    if names is None:
        report = getattr(model, "_moba_report", None)
        names = [r.name for r in report.rows if r.decision == "moba"] if report is not None else []
    for i, call in enumerate(cap.calls):
        call.name = names[i] if i < len(names) else f"moba call {i}"
    return cap.calls


def route_map(call: CapturedCall, batch: int = 0) -> Tensor:
    """`[Hq, query blocks, key blocks]`: fraction of each query block's queries that attend each key block."""
    mask = call.attn_mask
    if mask is not None and mask.dim() == 4 and mask.shape[0] > 1:
        mask = mask[batch:batch + 1]
    q, k = call.q[batch:batch + 1], call.k[batch:batch + 1]
    selected = block_selection(q, k, block_size=call.block_size, top_k=call.top_k, causal=call.causal,
                               attn_mask=mask)[0].float()  # [Hq, Tq, nb]
    tq, tk = q.shape[2], k.shape[2]
    q_block = (torch.arange(tk - tq, tk) // call.block_size).to(selected.device)
    n_qb = int(q_block.max()) + 1 - int(q_block.min())
    rows = q_block - q_block.min()
    sums = torch.zeros(selected.shape[0], n_qb, selected.shape[2], device=selected.device)
    sums.index_add_(1, rows, selected)
    counts = torch.bincount(rows, minlength=n_qb).clamp(min=1).to(sums)
    return (sums / counts[None, :, None]).cpu()


def draw(calls: Sequence[CapturedCall], path: str | os.PathLike, *, max_heads: int = 4, title: str = "") -> dict:
    """Draw a grid (rows: MoBA layers, columns: heads) of `route_map`s to `path` (PNG)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    if not calls:
        raise ValueError("routes: expected at least one MoBA site; the policy made every site dense")
    maps = [route_map(c) for c in calls]
    heads = min(max_heads, max(m.shape[0] for m in maps))
    fig, axes = plt.subplots(len(maps), heads, figsize=(2.6 * heads + 1, 2.4 * len(maps) + 0.6), squeeze=False)
    image = None
    for row, (call, m) in enumerate(zip(calls, maps)):
        for h in range(heads):
            ax = axes[row][h]
            if h >= m.shape[0]:
                ax.axis("off")
                continue
            image = ax.imshow(m[h].numpy(), vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto",
                              interpolation="nearest", origin="upper")
            ax.set_title(f"{call.name or f'site {row}'}\nhead {h}" if h == 0 else f"head {h}", fontsize=7)
            ax.set_xlabel("key block", fontsize=7)
            if h == 0:
                ax.set_ylabel(f"query block\n(block {call.block_size}, top-{call.top_k})", fontsize=7)
            ax.tick_params(labelsize=6)
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.6, label="share of the block's queries that attend")
    if title:
        fig.suptitle(f"MoBA routes: {title}", fontsize=9)
    fig.savefig(os.fspath(path), format="png", dpi=110)
    plt.close(fig)
    return {"layers": len(maps), "heads": heads}
