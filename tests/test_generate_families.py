"""`generate()` through a rewrite on model families whose cache use is unusual, each built tiny from
transformers' own code, by `benchmarks/generate_sweep.py`'s check (a prompt of 24 tokens, 8 new,
greedy, dynamic and static cache):

- dense limit: the rewrite gives the original model's tokens and logits (within 1e-4);
- sparse (block 4, top-2): the tokens and logits of an independent oracle, the original model with
  the dense `reference` MoBA at its MoBA sites generating with `use_cache=False` (nothing cached);
- both for one prompt and for a left-padded batch of two; for some families also transformers'
  own compiled static decode (`compile_config`, fullgraph) = the eager run.

The families, and what each found wrong before it was fixed:
- Dory (valid looped configs, `per_loop` and `last_loop` cache modes), HRM: the layers run in
  loops write cache layer `layer_idx + offset`; the rewrite looked up `layer_idx` (kept block means
  of another loop, a false "StaticCache too small"); Dory's `last_loop` reads a static layer through
  a read-only view (queries placed at the end of the buffer);
- Inkling: transformers' own causal skip (no mask, more keys than queries) at a dense site was
  rebuilt as a bottom-right mask where SDPA aligns top-left;
- Zamba2 (hybrid recurrent layers with shared attention blocks; 8 layers, two of them hybrid);
- GOT-OCR2 (a model whose attention transformers cannot switch at the top, rewritten by routing its
  SDPA calls): decode steps with a mask fold the GQA query heads into the query length (ran dense),
  and static-cache calls got MoBA over the unfilled slots (compiled: ran dense).
- GOT-OCR2 again, exported: `mr.export(model, (input_ids,), policy)` returned the cache object
  torch.export cannot output (only models whose attention transformers can switch got
  `use_cache=False` by default);
- BART (a decoder whose forward also builds a bidirectional mask): compiled, the mask function's
  reason words read a `__qualname__` Dynamo cannot give (an internal Dynamo error);
- exported: HRM runs its early reasoning cycles under `torch.no_grad()`, which export made
  `wrap_with_set_grad_enabled` regions whose attention the graph pass did not see (6 of 16 calls
  dense, unreported: 7.7e-4 from the eager rewrite); AFMoE `view`s the attention output through
  a reshape, which broke on MoBA's contiguous output;
- DeepSeek-V3 (multi-head latent attention: keys of head dim 16, values of 8; built with as many
  kv heads as heads, which MLA needs);
- Qwen3.5 (gated delta-net layers with a gated attention layer every fourth; the sweeps' tiny
  configs had kept only the first two layers, all recurrent, so no hybrid stack of this kind was
  checked until the tiny config kept layers up to the first attention layer);
- Qwen2.5-VL on text-only prompts (multimodal RoPE: 3-D position ids; the sweeps' tiny config
  kept the default RoPE sections of a 128-dim head, so no vision-language model generated in them);
- UnlimitedOcr (its own sliding cache layer: keeps the prompt, slides over decoded tokens):
  MoBA decode read that layer's counters as a standard window's, so even the dense-limit
  rewrite's dynamic-cache tokens differed from the original (0.79 in the logits); such layers
  now run the original attention on every cached call, as the report says;
- Llama: the plain case, as a control.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import generate_sweep  # noqa: E402

FAMILIES = [  # (model type, class, also check the compiled static decode)
    ("llama", "LlamaForCausalLM", True),
    ("dory/per_loop", "DoryForCausalLM", True),
    ("dory/last_loop", "DoryForCausalLM", False),
    ("hrm_text", "HrmTextForCausalLM", False),
    ("inkling_text", "InklingForCausalLM", False),
    ("zamba2/short", "Zamba2ForCausalLM", False),
    ("got_ocr2", "GotOcr2ForConditionalGeneration", True),
    ("bart", "BartForCausalLM", True),
    ("deepseek_v3", "DeepseekV3ForCausalLM", False),
    ("afmoe", "AfmoeForCausalLM", False),
    ("qwen3_5_text", "Qwen3_5ForCausalLM", True),
    ("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", False),
    ("unlimited_ocr", "UnlimitedOcrForConditionalGeneration", False),
]


EXPORTED = {"llama", "got_ocr2", "hrm_text", "afmoe"}  # also `mr.export` (padded batch) = the eager rewrite


@pytest.mark.parametrize("model_type,class_name,compiled", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_generate_equals_the_original_and_the_reference(model_type, class_name, compiled):
    status, detail = generate_sweep.sweep_one(model_type, class_name, seconds=300, compiled=compiled,
                                              export=model_type in EXPORTED)
    assert status == "equal", detail
    if model_type != "dory/last_loop":  # there the uncached oracle does not apply (the row says so)
        assert "sparse" not in detail, detail
    assert not any(f"{what} not checked" in detail for what in ("padded batch", "compiled", "export")), detail
    assert ("num_key_value_heads" in detail) == (model_type == "deepseek_v3"), detail


def test_hybrid_stacks_are_checked_with_their_attention_layer():
    """The sweeps' tiny configs keep a hybrid stack's layers up to its first attention layer (two
    layers of Qwen3.5 are both gated delta-nets: such a model has no site, and `generate()` was
    skipped for it), and the Qwen3.5 row above rewrites that layer to MoBA."""
    import transformers

    import moba_rewrite as mr
    import zoo_sweep

    for model_type in ("qwen3_5_text", "qwen3_next", "jamba", "recurrent_gemma"):
        cfg = zoo_sweep.tiny_config(type(transformers.AutoConfig.for_model(model_type)))
        assert set(cfg.layer_types) & set(zoo_sweep.ATTENTION_LAYER_TYPES), (model_type, cfg.layer_types)
        assert cfg.num_hidden_layers <= 5, (model_type, cfg.num_hidden_layers)
    cfg = zoo_sweep.tiny_config(transformers.Qwen3_5TextConfig)
    model = mr.rewrite(transformers.Qwen3_5ForCausalLM(cfg).eval(), generate_sweep.SPARSE)
    assert model._moba_report.moba_sites == ["model.layers.3.self_attn"], model._moba_report.moba_sites
