"""The two models an evaluation compares, and how to get logits out of them.

The rewritten model is a copy of the original that *shares its weights* (parameters and
buffers are the same tensors; only the module objects are new), rewritten by `mr.rewrite`,
so the original is left untouched and no weight memory is spent twice. Both run the same
inputs in the same order.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from moba_rewrite import api
from moba_rewrite.evaluation.errors import NotALanguageModel
from moba_rewrite.exporters.common import first_tensor, is_hf_model, sample_inputs, text_config


def shared_copy(model: nn.Module) -> nn.Module:
    """A deep copy of `model` whose parameters and buffers are the original's own tensors."""
    memo: dict[int, Any] = {id(t): t for t in model.parameters()}
    memo.update({id(t): t for t in model.buffers()})
    return copy.deepcopy(model, memo)


def rewritten_copy(model: nn.Module, policy: Any, seq_len: int) -> nn.Module:
    """`mr.rewrite` of a weight-sharing copy of `model` (the report is at `._moba_report`)."""
    twin = shared_copy(model)
    api.rewrite(twin, policy, example_inputs=None if is_hf_model(model) else sample_inputs(model, seq_len))
    return twin


def max_positions(model: nn.Module) -> int | None:
    """The longest input the model's position embeddings allow (None: no limit known)."""
    for cfg in (text_config(model), getattr(model, "config", None)):
        for name in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
            value = getattr(cfg, name, None)
            if isinstance(value, int) and value > 0:
                return value
    return None


@torch.no_grad()
def logits(model: nn.Module, ids: Tensor) -> Tensor:
    """`[B, T, V]` next-token logits of `model` on token ids `[B, T]` (no KV cache)."""
    if is_hf_model(model):
        out = model(input_ids=ids, use_cache=False)
    else:
        out = model(ids)
    try:
        result = first_tensor(out)
    except TypeError:
        result = None
    if result is None or result.dim() != 3 or tuple(result.shape[:2]) != tuple(ids.shape):
        shape = None if result is None else list(result.shape)
        raise NotALanguageModel(type(model).__name__, f"expected a language model mapping token ids "
                                                      f"{list(ids.shape)} to logits [batch, tokens, vocab], got "
                                                      f"{shape}")
    return result


def random_windows(model: nn.Module, device: torch.device):
    """`f(seq_len, seed) -> [1, seq_len]` random ids in the model's vocabulary (or its example inputs);
    `f.label` says which."""
    def make(seq_len: int, seed: int) -> Tensor:
        args = sample_inputs(model, seq_len, seed=seed)
        ids = args[0]
        if not isinstance(ids, Tensor) or ids.dtype != torch.long or ids.dim() != 2:
            raise NotALanguageModel(type(model).__name__, "expected example inputs of token ids [batch, tokens]")
        return ids[:1].to(device)
    make.label = "random token ids" if is_hf_model(model) else f"{type(model).__name__}.example_inputs"
    return make
