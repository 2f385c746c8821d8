"""A rewritten model's gradients on model families we did not write, by `benchmarks/train_sweep.py`'s
check (tiny models from transformers' own code, generic inputs, a fixed random projection of every
output as the loss):

- dense limit (`top_k * block_size` past every length): the original model's gradients;
- sparse (block 4, top-2): the gradients of the original model with the dense `reference` MoBA
  (plain autograd) as its attention at the same sites;
- for some, `torch.compile` (Inductor) of the sparse rewrite: the eager rewrite's gradients.

What it found wrong before it was fixed: every compiled training step of a rewritten Hugging Face
model failed (Inductor asserts the gradient layout the backward op's fake promises, that of the
transposed q/k/v views attention modules pass; the op returned contiguous gradients). Swin folds
its learned relative position bias into the attention mask and initialises it to zero: the rewrite
read the mask as 0 / -inf, ran MoBA with a boolean mask and the bias table never got a gradient
(it would have trained without its position bias, silently). NVIDIA's Nemotron audio encoders
have 2 key heads and 4 value heads: the CPU flash path read the values by the keys' grouping (the
dense limit's outputs were off by 0.7%) and the backward raised.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import transformers

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import train_sweep  # noqa: E402

FAMILIES = [  # (model type, base class, also through Inductor)
    ("llama", "LlamaModel", True),
    ("bert", "BertModel", False),
    ("gpt2", "GPT2Model", False),
    ("vit", "ViTModel", False),
    ("clip", "CLIPModel", False),
    ("swin", "SwinModel", False),  # a learned bias in the mask, zero at initialisation (Inductor: llama's row)
    ("nemotron3_diarization_audio", "Nemotron3DiarizationAudioModel", False),  # 2 key heads, 4 value heads
]


@pytest.mark.parametrize("model_type,class_name,compiled", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_train_sweep_family(model_type, class_name, compiled):
    if not hasattr(transformers, class_name):
        pytest.skip(f"this transformers has no {class_name}")
    status, detail = train_sweep.sweep_one(model_type, class_name, 300, compiled=compiled)
    assert status == "equal", detail


def _scaled_key_gradient(backward, factor: float):
    def wrong(*args, **kwargs):
        dq, dk, dv = backward(*args, **kwargs)
        return dq, dk * factor, dv
    return wrong


def test_a_wrong_sparse_backward_is_caught(monkeypatch):
    """The sparse check compares with autograd through the reference: a backend whose key gradient is
    1% off makes the row differ, naming a parameter that gets it (a key projection)."""
    from moba_rewrite.kernels import load_backend

    torch_backend = load_backend("torch")
    monkeypatch.setattr(torch_backend, "backward", _scaled_key_gradient(torch_backend.backward, 1.01))
    status, detail = train_sweep.sweep_one("llama", "LlamaModel", 300)
    assert status == "DIFFERS" and "sparse: gradients differ" in detail and "k_proj" in detail, detail
    assert "dense limit" not in detail


def test_a_wrong_dense_limit_backward_is_caught(monkeypatch):
    """The dense-limit check compares with the original model's own gradients."""
    from moba_rewrite.kernels import dense

    monkeypatch.setattr(dense, "backward", _scaled_key_gradient(dense.backward, 1.01))
    status, detail = train_sweep.sweep_one("bert", "BertModel", 300)
    assert status == "DIFFERS" and "dense limit: gradients differ" in detail and "key" in detail, detail
