"""`.pt2`: a `torch.export` program whose MoBA sites are `moba::attention` nodes.

The program takes what `exporters.common.exportable(model)` takes (`input_ids` for Hugging
Face models); with `dynamic=True` its sequence length is symbolic. Load it back with
`moba_rewrite.load` or `torch.export.load` after `import moba_rewrite`.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor, nn
from torch.export import ExportedProgram

import moba_rewrite.attention.op  # noqa: F401  (registers torch.ops.moba before loading programs)
from moba_rewrite.exporters.common import exportable, failsafe_output, seq_dynamic_shapes


def export_program(model: nn.Module, args: tuple[Tensor, ...], *, dynamic: bool = False,
                   max_seq: int = 1 << 17, dynamic_shapes=None) -> ExportedProgram:
    """`torch.export` the (already rewritten) model on `args`; dynamic sequence if asked."""
    module = exportable(model)
    shapes = dynamic_shapes if dynamic_shapes is not None else (
        seq_dynamic_shapes(args, max_seq=max_seq) if dynamic else None)
    with torch.no_grad():
        return torch.export.export(module, args, dynamic_shapes=shapes, strict=False)


def save_pt2(program: ExportedProgram, path: str | os.PathLike) -> None:
    """Write `program` to `path` (a `.pt2` file); a failed write (disk full) raises
    `OutputWriteFailed` instead of aborting the process."""
    with failsafe_output(path) as f:
        torch.export.save(program, f)


def load_pt2(path: str | os.PathLike) -> ExportedProgram:
    """Read a `.pt2` program (the moba op is registered by importing this module)."""
    return torch.export.load(os.fspath(path))
