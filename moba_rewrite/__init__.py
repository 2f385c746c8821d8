"""moba-rewrite: rewrite the attention of any PyTorch model into MoBA, layer by layer.

Public API (SPEC section 1): `moba_attention`, `load_policy`, `rewrite`, `compile`, `export`,
`plan`, `load`, `report_of`; `evaluate` and `calibrate`; `export_for_generation` (prefill and
decode programs over a static KV cache). Everything else is internal. Imports are lazy so
`import moba_rewrite` stays fast and registers the `moba::attention` op.
"""

from __future__ import annotations

import importlib
from typing import Any

from moba_rewrite.attention import moba_attention

__version__ = "0.1.0"

_LAZY = {
    "load_policy": "moba_rewrite.policy",
    "Policy": "moba_rewrite.policy",
    "Decision": "moba_rewrite.policy",
    "PolicyError": "moba_rewrite.policy",
    "rewrite": "moba_rewrite.api",
    "compile": "moba_rewrite.api",
    "export": "moba_rewrite.api",
    "plan": "moba_rewrite.api",
    "export_with_report": "moba_rewrite.api",
    "find_sites": "moba_rewrite.api",
    "report_of": "moba_rewrite.api",
    "load": "moba_rewrite.checkpoints",
    "RewriteReport": "moba_rewrite.report",
    "moba_attention_varlen": "moba_rewrite.attention.varlen",
    "key_block_means": "moba_rewrite.attention.block_means",
    "evaluate": "moba_rewrite.evaluation",
    "calibrate": "moba_rewrite.evaluation",
    "update_key_block_means_": "moba_rewrite.attention.block_means",
    "moba_attention_kv_cache": "moba_rewrite.attention.kv_cache",
    "export_for_generation": "moba_rewrite.exporters.generation",
}

__all__ = ["moba_attention", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'moba_rewrite' has no attribute {name!r}")
