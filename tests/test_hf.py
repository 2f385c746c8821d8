"""Hugging Face models (transformers classes from tiny configs, random weights, no downloads).

The oracle is independent of moba_rewrite.integrations.hf: a test-only attention function registered in
transformers' AttentionInterface that, for the layers the test picks, runs the dense
`reference` MoBA with a mask the test builds itself from the 2-D padding mask (causal via
the reference's own `causal=True`), and calls transformers' original function for the rest.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

import moba_rewrite as mr
from moba_rewrite import api
from moba_rewrite.integrations.hf import HFUnsupportedError
from moba_rewrite.kernels import reference

SEQ, BLOCK = 32, 8
LAYERS = 2


def _cfg(family: str):
    common = dict(vocab_size=64, max_position_embeddings=128)
    if family == "llama":
        return transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                                        num_attention_heads=4, num_key_value_heads=2, **common)
    if family == "qwen2":
        return transformers.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                                        num_attention_heads=4, num_key_value_heads=2, **common)
    if family == "mistral":
        return transformers.MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                                          num_attention_heads=4, num_key_value_heads=2, sliding_window=None,
                                          **common)
    if family == "phi3":
        return transformers.Phi3Config(hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                                       num_attention_heads=4, num_key_value_heads=2, pad_token_id=0,
                                       bos_token_id=1, eos_token_id=2, **common)
    if family == "gpt2":
        return transformers.GPT2Config(vocab_size=64, n_positions=128, n_embd=32, n_layer=LAYERS, n_head=4)
    if family == "gpt_neox":
        return transformers.GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                                          num_attention_heads=4, **common)
    if family == "bert":
        return transformers.BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                                       num_attention_heads=4, **common)
    raise ValueError(family)


DECODERS = ["llama", "qwen2", "mistral", "phi3", "gpt2", "gpt_neox"]
FAMILIES = DECODERS + ["bert"]


def make_model(family: str, impl: str):
    torch.manual_seed(0)
    cfg = _cfg(family)
    if family == "bert":
        model = transformers.BertModel(cfg, add_pooling_layer=False)
    else:
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    model.set_attn_implementation(impl)
    return model.eval()


def make_inputs(family: str):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 64, (2, SEQ), generator=g)
    mask = torch.ones(2, SEQ, dtype=torch.long)
    if family == "bert":
        mask[1, -7:] = 0  # right padding
    else:
        mask[1, :5] = 0  # left padding
    return ids, mask


def run(model, ids, mask) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def policy(block=BLOCK, top_k=2, dense_layers=None, **defaults):
    rules = [{"layers": list(dense_layers), "mode": "dense"}] if dense_layers else []
    return {"version": 1, "defaults": {"block_size": block, "top_k": top_k, **defaults}, "rules": rules}


# --------------------------------------------------------------------------------- the oracle

_ORACLE: dict = {"layers": {}, "pad": None, "decode_dense": False}


def _oracle_fn(origin: str):
    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        spec = _ORACLE["layers"].get(module)
        tq, tk = query.shape[2], key.shape[2]
        if spec is None or (tq == 1 and _ORACLE["decode_dense"]):
            if origin == "sdpa":
                fn = AttentionInterface._global_mapping["sdpa"]
            else:
                import sys

                fn = sys.modules[type(module).__module__].eager_attention_forward
            return fn(module, query, key, value, attention_mask, *args, **kwargs)
        block, top_k = spec
        pad0 = _ORACLE["pad"]
        pad = torch.cat([pad0, pad0.new_ones(pad0.shape[0], tk - pad0.shape[1])], 1) if tk > pad0.shape[1] else pad0
        visible = pad[:, None, None, :tk].bool()
        scale = kwargs.get("scaling") or query.shape[-1] ** -0.5
        out = reference.forward(query, key, value, block_size=block, top_k=top_k,
                                causal=bool(getattr(module, "is_causal", True)), scale=scale, attn_mask=visible)
        return out.transpose(1, 2).contiguous(), None

    return attention


for _origin in ("sdpa", "eager"):
    AttentionInterface.register(f"oracle_{_origin}", _oracle_fn(_origin))
    AttentionMaskInterface.register(f"oracle_{_origin}", ALL_MASK_ATTENTION_FUNCTIONS[_origin])


def oracle_model(family, impl, moba_layers, pad, block=BLOCK, top_k=2, decode_dense=False):
    model = make_model(family, impl)
    attn = [m for n, m in model.named_modules() if type(m).__name__.endswith("Attention")
            or type(m).__name__ == "BertSelfAttention"]
    attn = [m for m in attn if hasattr(m, "is_causal") or type(m).__name__ == "BertSelfAttention"]
    assert len(attn) == LAYERS, [type(m).__name__ for m in attn]
    _ORACLE["layers"] = {attn[i]: (block, top_k) for i in moba_layers}
    _ORACLE["pad"] = pad
    _ORACLE["decode_dense"] = decode_dense
    model.set_attn_implementation(f"oracle_{impl}")
    return model


def _rows(t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Outputs at non-padding positions only (padding rows are undefined in every model)."""
    return t[mask.bool()]


# ---------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("family", FAMILIES)
def test_family(family, impl):
    ids, mask = make_inputs(family)
    model = make_model(family, impl)
    original = run(model, ids, mask)

    report = mr.plan(model, policy())
    assert len(report) == LAYERS
    assert [r.layer for r in report] == list(range(LAYERS))
    assert all(r.decision == "moba" for r in report)
    assert report[0].num_heads == 4
    if family in ("llama", "qwen2", "mistral", "phi3"):
        assert report[0].num_kv_heads == 2
    assert report[0].causal is (family != "bert")

    # Dense limit: top_k * block_size >= seq_len gives the original model back.
    mr.rewrite(model, policy(top_k=SEQ // BLOCK))
    torch.testing.assert_close(_rows(run(model, ids, mask), mask), _rows(original, mask), atol=2e-5, rtol=1e-4)

    # Sparse on layer 0, layer 1 dense: differs from the original, equals the oracle.
    mr.rewrite(model, policy(dense_layers=[1]))
    sparse = run(model, ids, mask)
    assert (_rows(sparse, mask) - _rows(original, mask)).abs().max() > 1e-3
    expected = run(oracle_model(family, impl, [0], mask), ids, mask)
    torch.testing.assert_close(_rows(sparse, mask), _rows(expected, mask), atol=2e-5, rtol=1e-4)
    assert model._moba_report.moba_sites == [model._moba_report[0].name]

    # All dense: bit-for-bit the original.
    mr.rewrite(model, {"version": 1, "defaults": {"mode": "dense"}})
    assert torch.equal(run(model, ids, mask), original)


def test_state_dict_and_report_table():
    model = make_model("llama", "sdpa")
    keys = list(model.state_dict())
    mr.rewrite(model, policy(dense_layers=[-1]))
    assert list(model.state_dict()) == keys
    rep = model._moba_report
    text = str(rep)
    assert "model.layers.0.self_attn" in text and "LlamaAttention" in text
    data = rep.to_dict()
    assert [s["decision"] for s in data["sites"]] == ["moba", "dense"]
    assert mr.RewriteReport.from_dict(data).to_dict() == data


@pytest.mark.parametrize("family,impl,decode", [("llama", "sdpa", "moba"), ("gpt2", "eager", "dense"),
                                                ("mistral", "eager", "moba")])
def test_generate_matches_reference_path(family, impl, decode):
    ids, mask = make_inputs(family)
    ids, mask = ids[:, :20], mask[:, :20]
    model = make_model(family, impl)
    mr.rewrite(model, policy(block=4, top_k=2, dense_layers=[1], decode=decode))
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    got = model.generate(ids, attention_mask=mask, **kw)
    oracle = oracle_model(family, impl, [0], mask, block=4, top_k=2, decode_dense=(decode == "dense"))
    want = oracle.generate(ids, attention_mask=mask, **kw)
    assert torch.equal(got, want)
    plain = make_model(family, impl).generate(ids, attention_mask=mask, **kw)
    assert got.shape == plain.shape


def test_compile_fullgraph_of_rewritten_model():
    ids, mask = make_inputs("llama")
    model = make_model("llama", "sdpa")
    mr.rewrite(model, policy(dense_layers=[1]))
    eager = run(model, ids, mask)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(run(compiled, ids, mask), eager, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_inductor_training_step_of_rewritten_model_matches_eager(family):
    """torch.compile (Inductor) of a rewritten model in training: loss and every parameter's gradient
    equal eager. Attention modules hand the op transposed views; the compiled backward asserts each
    gradient's layout (this failed on every step before the backward ops kept their inputs' layouts)."""
    ids, mask = make_inputs(family)
    model = make_model(family, "sdpa")
    mr.rewrite(model, policy(dense_layers=[1])).train()

    def step(m):
        model.zero_grad()
        loss = m(input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    torch._dynamo.reset()
    loss, grads = step(model)
    compiled_loss, compiled_grads = step(torch.compile(model))
    torch.testing.assert_close(compiled_loss, loss, atol=1e-5, rtol=1e-5)
    assert compiled_grads.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("family,impl", [("llama", "sdpa"), ("gpt2", "eager"), ("bert", "sdpa")])
def test_export_matches_eager_rewrite(family, impl):
    ids, mask = make_inputs(family)
    model = make_model(family, impl)
    original = run(model, ids, mask)
    kwargs = {"input_ids": ids, "attention_mask": mask}
    if family != "bert":
        kwargs["use_cache"] = False
    # dense limit
    ep = mr.export(model, (), policy(top_k=SEQ // BLOCK), kwargs=kwargs)
    nodes = [n for n in ep.graph.nodes if n.op == "call_function" and "moba.attention" in str(n.target)]
    assert len(nodes) == LAYERS
    out = ep.module()(**kwargs)
    out = out.logits if hasattr(out, "logits") else out.last_hidden_state
    torch.testing.assert_close(_rows(out, mask), _rows(original, mask), atol=2e-5, rtol=1e-4)
    # sparse, layer 1 dense
    ep, report = api.export_with_report(model, (), policy(dense_layers=[1]), kwargs=kwargs)
    assert [r.decision for r in report] == ["moba", "dense"]
    out = ep.module()(**kwargs)
    out = out.logits if hasattr(out, "logits") else out.last_hidden_state
    expected = run(oracle_model(family, impl, [0], mask), ids, mask)
    torch.testing.assert_close(_rows(out, mask), _rows(expected, mask), atol=2e-5, rtol=1e-4)


def test_hybrid_last3_dense_and_unmatched_rule():
    cfg = _cfg("llama")
    cfg.num_hidden_layers = 5
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    pol = {"version": 1, "defaults": {"block_size": BLOCK, "top_k": 2},
           "rules": [{"layers": "-3:", "mode": "dense"}, {"match": "nothing.here.*", "top_k": 5}]}
    mr.rewrite(model, pol)
    rep = model._moba_report
    assert [r.decision for r in rep] == ["moba", "moba", "dense", "dense", "dense"]
    assert any("matched no attention site" in w for w in rep.warnings)
    assert "warning:" in str(rep)


def test_on_unsupported_error_dropout_while_training():
    ids, mask = make_inputs("gpt2")
    model = make_model("gpt2", "sdpa")  # attn_pdrop = 0.1
    mr.rewrite(model, policy(on_unsupported="error"))
    run(model, ids, mask)  # eval: fine
    model.train()
    with pytest.raises(HFUnsupportedError, match="dropout"):
        model(input_ids=ids, attention_mask=mask)
    # With on_unsupported: dense, training runs the original attention (same dropout draws).
    mr.rewrite(model, policy())
    torch.manual_seed(3)
    got = model(input_ids=ids, attention_mask=mask).logits
    plain = make_model("gpt2", "sdpa").train()
    torch.manual_seed(3)
    want = plain(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(got, want)


@pytest.mark.parametrize("impl", ["eager"])
def test_dynamo_pass_on_hf_graph(impl):
    """The torch.compile pass on Dynamo's graph of unmodified HF code (the eager math and its
    additive mask; Dynamo's SDPA spelling is covered in test_passes)."""
    from torch._dynamo.backends.common import aot_autograd

    from moba_rewrite.dynamo_backend import MobaBackend

    ids, mask = make_inputs("llama")
    model = make_model("llama", impl)
    backend = MobaBackend(mr.load_policy(policy(dense_layers=[1])), sites=api.find_sites(model),
                          inner=aot_autograd(fw_compiler=lambda gm, ex: gm.forward))
    torch._dynamo.reset()
    got = run(torch.compile(model, backend=backend, fullgraph=True), ids, mask)
    assert [(r.name, r.decision) for r in backend.report] == [("model.layers.0.self_attn", "moba"),
                                                              ("model.layers.1.self_attn", "dense")]
    expected = run(oracle_model("llama", impl, [0], mask), ids, mask)
    torch.testing.assert_close(_rows(got, mask), _rows(expected, mask), atol=2e-5, rtol=1e-4)


def test_gpt2_reorder_and_upcast_dense_sites_exact():
    torch.manual_seed(0)
    cfg = _cfg("gpt2")
    cfg.reorder_and_upcast_attn = True
    model = transformers.GPT2LMHeadModel(cfg).eval()
    model.set_attn_implementation("eager")
    ids, mask = make_inputs("gpt2")
    original = run(model, ids, mask)
    mr.rewrite(model, policy(dense_layers=[1]))
    assert not torch.equal(run(model, ids, mask), original)
    mr.rewrite(model, {"version": 1, "defaults": {"mode": "dense"}})
    assert torch.equal(run(model, ids, mask), original)


def test_attention_the_sample_input_never_ran_is_named_in_the_report():
    """A vision-language model rewritten on a text sample: its vision tower's attention never ran,
    so it is no row of the report; the report says so in one warning (it keeps the original
    attention). Given an example with an image, the vision sites are rows, and at the dense limit
    the model with an image equals the original."""
    import copy
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import zoo_sweep
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    cfg = zoo_sweep.tiny_config(Qwen2_5_VLConfig)
    vision = cfg.vision_config
    vision.depth, vision.out_hidden_size = 2, cfg.get_text_config().hidden_size
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    policy = {"version": 1, "defaults": {"block_size": 4, "top_k": 64}}
    text_only = mr.rewrite(copy.deepcopy(model), policy)
    assert [r.name for r in text_only._moba_report.rows] == [f"model.language_model.layers.{i}.self_attn"
                                                             for i in range(2)]
    assert text_only._moba_report.warnings == [
        "2 attention module(s) did not run on the sample input (Qwen2_5_VLVisionAttention x2; first: "
        "model.visual.blocks.0.attn), so they are not in this report and keep the original attention "
        "(mr.rewrite(model, policy, example_inputs) with inputs that reach them rewrites them)"]
    side, merge = 4 * vision.spatial_merge_size, vision.spatial_merge_size
    pixels = torch.randn(side * side, 3 * vision.temporal_patch_size * vision.patch_size ** 2)
    ids = torch.cat([torch.randint(3, 100, (1, 10)), torch.full((1, side * side // merge ** 2), cfg.image_token_id),
                     torch.randint(3, 100, (1, 30))], dim=1)
    inputs = dict(input_ids=ids, pixel_values=pixels, image_grid_thw=torch.tensor([[1, side, side]]),
                  mm_token_type_ids=(ids == cfg.image_token_id).long(), use_cache=False)
    with_image = mr.rewrite(copy.deepcopy(model), policy, example_inputs=inputs)
    assert [r.name for r in with_image._moba_report.rows][:2] == ["model.visual.blocks.0.attn",
                                                                   "model.visual.blocks.1.attn"]
    assert with_image._moba_report.warnings == []
    with torch.no_grad():
        want = model(**inputs).logits
        torch.testing.assert_close(with_image(**inputs).logits, want, rtol=0, atol=1e-5)
        torch.testing.assert_close(text_only(**inputs).logits, want, rtol=0, atol=1e-5)
def test_a_sub_model_that_refuses_sdpa_keeps_its_own_kind_of_attention():
    """Apertus 1.5's vision tokenizer runs eager attention inside an sdpa model and refuses every
    sdpa-named implementation: `rewrite` raised transformers' error for the whole model. Each
    sub-model now routes through the MoBA implementation of its own kind (`moba_sdpa` for the text
    model, `moba_eager` for the tokenizers), and the dense-limit rewrite equals the original."""
    import sys
    from pathlib import Path

    import torch
    import transformers

    import moba_rewrite as mr

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import zoo_sweep

    if not hasattr(transformers, "Apertus1p5ForConditionalGeneration"):
        pytest.skip("this transformers has no Apertus 1.5")
    cfg = zoo_sweep.tiny_config(transformers.Apertus1p5Config)
    torch.manual_seed(0)
    model = transformers.Apertus1p5ForConditionalGeneration(cfg).eval()
    ids = torch.randint(3, 90, (1, 24))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    mr.rewrite(model, {"version": 1, "defaults": {"mode": "moba", "block_size": 8, "top_k": 8}})
    assert model.config.text_config._attn_implementation == "moba_sdpa"
    assert model.config.vision_config._attn_implementation == "moba_eager"
    assert model._moba_report.moba_sites, model._moba_report
    with torch.no_grad():
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
