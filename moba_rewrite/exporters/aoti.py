"""AOTInductor packages: the exported program compiled ahead of time to a shared library.

`torch._inductor.aoti_compile_and_package` needs a C++ compiler on the machine that builds
the package. The package calls `moba::attention` through PyTorch's proxy executor, so the
process that loads it must `import moba_rewrite` first (`moba_rewrite.load` does).
"""

from __future__ import annotations

import os
from typing import Callable

import torch
from torch.export import ExportedProgram

import moba_rewrite.attention.op  # noqa: F401  (the package calls moba::attention)
from moba_rewrite.exporters.common import failsafe_output


def save_aoti(program: ExportedProgram, path: str | os.PathLike) -> None:
    """Compile `program` with AOTInductor and write the package to `path` (`.pt2`); a failed
    write (disk full) raises `OutputWriteFailed` instead of aborting the process."""
    import torch._inductor

    with failsafe_output(path) as f:
        torch._inductor.aoti_compile_and_package(program, package_path=f)


def load_aoti(path: str | os.PathLike) -> Callable:
    """The callable runner of an AOTInductor package."""
    import torch._inductor

    return torch._inductor.aoti_load_package(os.fspath(path))
