"""What a MoBA rewrite costs in accuracy, and which sites should stay dense.

`evaluate` compares a model with its rewrite on the same inputs (tasks `kl`, `ppl`, `sites`,
`passkey`); `calibrate` measures every site's sensitivity from one dense forward and writes
a policy for a budget (dense layers or an end-to-end KL bound). One module per job: data
(windows of token ids), models (the weight-sharing rewritten copy, logits), kl, sites
(capture and per-site measures), passkey, evaluator, calibrator, tables, plot, errors.

Layer: beside `api` (it rewrites through `mr.rewrite`); it may import api, checkpoints,
exporters.common, integrations, policy, attention, kernels and exit_codes, never the CLI.
"""

from __future__ import annotations

from moba_rewrite.evaluation.errors import (BudgetError, DataFileError, DataTooShort, EvaluationError,
                                            NotALanguageModel, NoTokenizer)

__all__ = ["evaluate", "calibrate", "EvalResult", "CalibrationResult", "EvaluationError", "DataFileError",
           "DataTooShort", "NoTokenizer", "BudgetError", "NotALanguageModel", "TASKS"]


def __getattr__(name: str):
    if name in ("evaluate", "EvalResult", "TASKS"):
        from moba_rewrite.evaluation import evaluator as module

        return getattr(module, name)
    if name in ("calibrate", "CalibrationResult"):
        from moba_rewrite.evaluation import calibrator as module

        return getattr(module, name)
    raise AttributeError(f"module 'moba_rewrite.evaluation' has no attribute {name!r}")
