"""A rewritten model's forward on model families we did not write, by `benchmarks/forward_sweep.py`'s
check (tiny models from transformers' own code, generic inputs):

- dense limit (`top_k * block_size` past every length): the rewrite gives the original's outputs;
- the report says what runs: a `moba` site runs a MoBA op and no dense attention, a `dense` one no
  MoBA op (seen by a dispatch mode independent of moba_rewrite);
- sparse (block 4, top-2): the outputs of the original model with the dense `reference` MoBA as
  its attention at the same sites;
- for some, `torch.compile` and `mr.export` of the same rewrite, and a right-padded batch of two.

What it found wrong before it was fixed: ALIGN's text tower (an encoder with eager attention):
transformers passes no mask to a bidirectional encoder without padding, and the eager attention
functions only add the mask, so None there is full attention; the rewrite read the module's
`is_causal` default and ran it causally (dense limit off by 0.01, silently). Qwen3-Omni's thinker:
the rewrite handed every eager call without a mask an all-ones `attention_mask` (meant for tracing,
where it keeps transformers from materialising a packed-sequence mask), and that model computes its
multimodal positions from one (it failed where the original ran).
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
import transformers

import moba_rewrite as mr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import forward_sweep  # noqa: E402


def _align_text(impl: str) -> transformers.AlignTextModel:
    torch.manual_seed(0)
    cfg = transformers.AlignTextConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                       intermediate_size=64, max_position_embeddings=64)
    cfg._attn_implementation = impl
    return transformers.AlignTextModel(cfg).eval()


def test_eager_encoder_without_mask_stays_bidirectional():
    """An eager-attention encoder that transformers hands no mask attends both ways."""
    model = _align_text("eager")
    ids = torch.randint(0, 64, (1, 24))
    with torch.no_grad():
        want = model(input_ids=ids).last_hidden_state
        limit = mr.rewrite(copy.deepcopy(model), forward_sweep.LIMIT, {"input_ids": ids})
        torch.testing.assert_close(limit(input_ids=ids).last_hidden_state, want, rtol=1e-4, atol=1e-4)
        sparse = mr.rewrite(copy.deepcopy(model), {"version": 1, "defaults": {"block_size": 4, "top_k": 2}},
                            {"input_ids": ids})
        assert all(not r.causal for r in sparse._moba_report.rows if r.decision == "moba")
        assert len(sparse._moba_report.moba_sites) == 2
        got = sparse(input_ids=ids).last_hidden_state
    # the independent oracle: the original model with the dense reference MoBA as its attention
    oracle = forward_sweep._oracle(model, sparse, prompt=None)
    with torch.no_grad():
        torch.testing.assert_close(got, oracle(input_ids=ids).last_hidden_state, rtol=1e-4, atol=1e-4)
    assert oracle._oracle_ran == set(sparse._moba_report.moba_sites)


FAMILIES = [  # (model type, base class, also torch.compile, mr.export and ONNX, on a padded batch)
    ("bert", "BertModel", True, False),
    ("bert", "BertModel", False, True),
    ("llama", "LlamaModel", True, False),
    ("llama", "LlamaModel", True, True),
    ("vit", "ViTModel", False, False),
    ("clip", "CLIPModel", False, False),
    ("t5", "T5Model", False, False),
    ("gpt2", "GPT2Model", False, True),
    ("qwen3_omni_moe_thinker", "Qwen3OmniMoeThinkerModel", False, False),
    ("nemotron3_diarization_audio", "Nemotron3DiarizationAudioModel", False, False),  # 2 key, 4 value heads
    ("qwen2_5_vl", "Qwen2_5_VLModel", False, False),  # a prompt with an image: vision tower and M-RoPE text
]


@pytest.mark.parametrize("model_type,class_name,more,padded", FAMILIES,
                         ids=[f[0] + ("/padded" if f[3] else "") for f in FAMILIES])
def test_forward_sweep_family(model_type, class_name, more, padded):
    if not hasattr(transformers, class_name):
        pytest.skip(f"this transformers has no {class_name}")
    status, detail = forward_sweep.sweep_one(model_type, class_name, 300, compiled=more, export=more, padded=padded,
                                             onnx=more and not padded)
    assert status == "equal", detail


def test_a_qwen_vl_model_is_checked_with_an_image():
    """The sweep's input for a Qwen-VL-style model carries an image, so its vision tower's attention
    runs and is rewritten (on a text-only prompt it never ran: not one of its sites was checked)."""
    import moba_rewrite as mr

    model, inputs = forward_sweep.zoo_sweep.build("qwen2_5_vl", "Qwen2_5_VLModel")
    assert {"pixel_values", "image_grid_thw"} <= set(inputs)
    sites = mr.rewrite(model, forward_sweep.SPARSE, inputs)._moba_report.moba_sites
    assert {"visual.blocks.0.attn", "visual.blocks.1.attn", "language_model.layers.0.self_attn"} <= set(sites), sites


def test_padded_batch_is_padded():
    """The padded batch hides the second row's last tokens: the original's output there differs from
    the same row unpadded (so the sweep's padded rows test the mask's path)."""
    model, inputs = forward_sweep.zoo_sweep.build("bert", "BertModel")
    batch = forward_sweep.padded_batch(model, inputs)
    assert batch["attention_mask"].tolist()[1][-5:] == [0] * 5 and batch["input_ids"].shape[0] == 2
    with torch.no_grad():
        out = model(**batch).last_hidden_state
    assert (out[0] - out[1]).abs().max() > 1e-3


def test_eager_call_keeps_the_callers_inputs():
    """A rewritten model's eager forward gets exactly the caller's arguments (nothing added)."""
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, use_cache=False)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 64, (1, 32))
    mr.rewrite(model, {"version": 1, "defaults": {"block_size": 8, "top_k": 2}}, {"input_ids": ids})
    seen = []
    model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(sorted(kwargs)), with_kwargs=True)
    with torch.no_grad():
        model(input_ids=ids)
    assert seen == [["input_ids"]]


def test_a_logits_view_is_its_own_view():
    """`exportable` of a model already given as its logits view (what a user may pass to
    `export_onnx`) is the same view: one input_ids in, the model's output out."""
    from moba_rewrite.exporters.common import exportable, logits_view

    model, inputs = forward_sweep.zoo_sweep.build("llama", "LlamaModel")
    view = logits_view(model)
    assert exportable(view) is view and logits_view(view) is view
    with torch.no_grad():
        torch.testing.assert_close(view(inputs["input_ids"]), model(**inputs).last_hidden_state)


def test_a_model_without_logits_or_hidden_states_exports_its_first_output():
    """DPR returns a pooled embedding only: its logits view returns that (it raised AttributeError)."""
    from moba_rewrite.exporters.common import exportable

    model, inputs = forward_sweep.zoo_sweep.build("dpr", "DPRQuestionEncoder")
    with torch.no_grad():
        torch.testing.assert_close(exportable(model)(inputs["input_ids"]), model(**inputs).pooler_output)


def test_onnx_of_a_run_time_checked_mask_equals_the_eager_rewrite(tmp_path):
    """LayoutLM builds its float mask outside transformers' mask interface, so the traced rewrite
    reads the mask's values per call (`moba::attention_checked_mask`): in ONNX the node reads its bias
    the same way (`hidden_at`), and onnxruntime gives the eager rewrite's outputs (the export failed
    before). With `on_unsupported: error`, which a graph cannot raise, the export refuses in one line."""
    import moba_rewrite as mr
    from moba_rewrite.exporters import onnx as mo
    from moba_rewrite.exporters.common import exportable

    model, inputs = forward_sweep.zoo_sweep.build("layoutlm", "LayoutLMModel")
    ids = inputs["input_ids"]
    rewritten = mr.rewrite(copy.deepcopy(model), forward_sweep.SPARSE, inputs)
    proto = mo.export_onnx(rewritten, (ids,), tmp_path / "layoutlm.onnx")
    nodes = mo.moba_nodes(proto)
    assert len(nodes) == 2 and all(
        onnx_attr(n, "hidden_at") == torch.finfo(torch.float32).min / 2 for n in nodes)
    with torch.no_grad():
        want = exportable(rewritten)(ids)
    got = torch.as_tensor(mo.run_onnxruntime(tmp_path / "layoutlm.onnx", (ids,))[0])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    strict = {"version": 1, "defaults": {**forward_sweep.SPARSE["defaults"], "on_unsupported": "error"}}
    with pytest.raises(mo.OnnxExportUnsupported, match="^ONNX export: attention site .*on_unsupported: error"):
        mo.export_onnx(mr.rewrite(copy.deepcopy(model), strict, inputs), (ids,), tmp_path / "strict.onnx")
    assert not (tmp_path / "strict.onnx").exists()


def onnx_attr(node, name):
    import onnx

    return next(onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name)
