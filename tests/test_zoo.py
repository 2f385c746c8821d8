"""A zoo of models we did not write (transformers classes and torch.nn layers from tiny configs,
random weights), each with the outcome its definition implies for every attention site:
MoBA, or dense with the reason written down here. For each model:

- `mr.plan` lists every site, with exactly these decisions and reasons;
- `on_unsupported: error` raises when a site selected for MoBA cannot take it;
- the dense limit (`top_k * block_size >= T`) gives the original model back;
- a sparse policy equals the oracle (`zoo_oracle`: reference MoBA at exactly the sites the
  report calls MoBA, the others untouched) and differs from the original where MoBA runs;
- a model with no MoBA site is bit-for-bit the original.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F
import transformers as T
from torch import nn

import moba_rewrite as mr
from moba_rewrite.integrations.hf import HFUnsupportedError
from passes.rewrite import UnsupportedSiteError
from passes.runtime import UnfaithfulSiteError
from zoo_oracle import sdpa_oracle

SEQ, BLOCK, TOP_K = 32, 4, 2
DENSE_TOP_K = SEQ // BLOCK  # every key in range: MoBA's dense limit


def policy(top_k: int = TOP_K, **defaults: Any) -> dict:
    return {"version": 1, "defaults": {"block_size": BLOCK, "top_k": top_k, **defaults}}


def ids(n: int = SEQ, batch: int = 1, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 64, (batch, n), generator=torch.Generator().manual_seed(seed))


@dataclass
class Case:
    build: Callable[[], nn.Module]
    inputs: Callable[[], dict]
    expect: list[tuple[str, str, str]]  # (site, "moba" | "dense", a fragment of the reason)

    def model(self) -> nn.Module:
        torch.manual_seed(0)
        return self.build().eval()


def _lm(cls, cfg):
    return lambda: cls(cfg).to(torch.float32)


def _sdpa(model: nn.Module) -> nn.Module:
    model.set_attn_implementation("sdpa")
    return model


FALCON = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, new_decoder_architecture=False,
              multi_query=False, max_position_embeddings=256)
LM = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
MOBA = "defaults (no rule matched)"
ALIBI = "additive bias on the scores (the input of baddbmm, e.g. ALiBi)"
BIAS = "may carry a bias"
CROSS = "more queries than keys"


def _layers(fmt: str, outcome: str, why: str, n: int = 2) -> list[tuple[str, str, str]]:
    return [(fmt.format(i), outcome, why) for i in range(n)]


CASES: dict[str, Case] = {
    # Decoder LMs. BLOOM writes attention by hand: baddbmm(alibi, q, k^T) -> softmax -> bmm.
    "bloom": Case(_lm(T.BloomForCausalLM, T.BloomConfig(vocab_size=64, hidden_size=32, n_layer=2, n_head=4)),
                  lambda: {"input_ids": ids()}, _layers("transformer.h.{}.self_attention", "dense", ALIBI)),
    # Falcon with `alibi=True` carries ALiBi inside the float attention mask; without it the mask
    # is kept full (Falcon builds on the materialised mask) and the sites are MoBA.
    "falcon_alibi": Case(_lm(T.FalconForCausalLM, T.FalconConfig(**FALCON, alibi=True)),
                         lambda: {"input_ids": ids()}, _layers("transformer.h.{}.self_attention", "dense", "ALiBi")),
    "falcon": Case(_lm(T.FalconForCausalLM, T.FalconConfig(**FALCON, alibi=False)),
                   lambda: {"input_ids": ids()}, _layers("transformer.h.{}.self_attention", "moba", "mask kept full")),
    # MPT adds its ALiBi `position_bias` to q @ k^T * scale by hand.
    "mpt": Case(_lm(T.MptForCausalLM, T.MptConfig(vocab_size=64, d_model=32, n_heads=4, n_layers=2, expansion_ratio=2)),
                lambda: {"input_ids": ids()}, _layers("transformer.blocks.{}.attn", "dense", BIAS)),
    "gemma2_softcap": Case(_lm(T.Gemma2ForCausalLM, T.Gemma2Config(
        **LM, num_key_value_heads=2, head_dim=8, pad_token_id=0, attn_logit_softcapping=50.0)),
        lambda: {"input_ids": ids()}, _layers("model.layers.{}.self_attn", "dense", "soft-capping (softcap)")),
    "gpt_oss_sinks_moe": Case(_lm(T.GptOssForCausalLM, T.GptOssConfig(
        **LM, num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2, pad_token_id=0)),
        lambda: {"input_ids": ids()}, _layers("model.layers.{}.self_attn", "dense", "attention sinks")),
    "mistral_sliding_window": Case(lambda: _sdpa(T.MistralForCausalLM(T.MistralConfig(
        **LM, num_key_value_heads=2, sliding_window=12))),
        lambda: {"input_ids": ids()}, _layers("model.layers.{}.self_attn", "moba", MOBA)),
    "mixtral_moe": Case(lambda: _sdpa(T.MixtralForCausalLM(T.MixtralConfig(
        **LM, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2))),
        lambda: {"input_ids": ids()}, _layers("model.layers.{}.self_attn", "moba", MOBA)),
    # DeepSeek-V3 multi-head latent attention: value head dim 12, query/key head dim 8 + 8 (MoBA gates
    # on q/k and attends with the 12-wide values).
    "deepseek_v3_mla": Case(lambda: _sdpa(T.DeepseekV3ForCausalLM(T.DeepseekV3Config(
        **LM, num_key_value_heads=4, moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2,
        n_group=1, topk_group=1, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
        v_head_dim=12, first_k_dense_replace=1, pad_token_id=0))),
        lambda: {"input_ids": ids()}, _layers("model.layers.{}.self_attn", "moba", MOBA)),
    # Encoder-decoders. Whisper's decoder (24 tokens) is longer than its encoder (16 frames).
    "whisper": Case(lambda: _sdpa(T.WhisperModel(T.WhisperConfig(
        vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=8,
        max_source_positions=16, max_target_positions=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        decoder_start_token_id=1))),
        lambda: {"input_features": torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(2)),
                 "decoder_input_ids": ids(24)},
        [("encoder.layers.0.self_attn", "moba", MOBA), ("decoder.layers.0.self_attn", "moba", MOBA),
         ("decoder.layers.0.encoder_attn", "dense", f"{CROSS} (Tq=24 > Tk=16")]),
    # T5 adds a relative position bias to every attention.
    "t5": Case(lambda: _sdpa(T.T5Model(T.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                                  num_heads=4, decoder_start_token_id=0))),
               lambda: {"input_ids": ids(), "decoder_input_ids": ids(16)},
               [("encoder.block.0.layer.0.SelfAttention", "dense", "position bias"),
                ("decoder.block.0.layer.0.SelfAttention", "dense", "position bias"),
                ("decoder.block.0.layer.1.EncDecAttention", "dense", "position bias")]),
    # BART with a decoder shorter than the encoder: cross attention is MoBA too.
    "bart": Case(lambda: _sdpa(T.BartModel(T.BartConfig(
        vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=2))),
        lambda: {"input_ids": ids(), "decoder_input_ids": ids(24)},
        [("encoder.layers.0.self_attn", "moba", MOBA), ("decoder.layers.0.self_attn", "moba", MOBA),
         ("decoder.layers.0.encoder_attn", "moba", MOBA)]),
    # Encoders: RoBERTa applies attention dropout 0.1 while training (reported, MoBA in eval).
    "roberta": Case(lambda: _sdpa(T.RobertaModel(T.RobertaConfig(**LM, max_position_embeddings=64, pad_token_id=1),
                                                 add_pooling_layer=False)),
                    lambda: {"input_ids": ids()},
                    _layers("encoder.layer.{}.attention.self", "moba", "while training: attention dropout p=0.1")),
    "vit": Case(lambda: _sdpa(T.ViTModel(T.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                     intermediate_size=64, image_size=32, patch_size=8),
                                         add_pooling_layer=False)),
                lambda: {"pixel_values": torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))},
                _layers("layers.{}.attention", "moba", MOBA)),
    # torch.nn: a decoder (24 tokens) longer than its encoder (16): cross attention stays dense.
    "nn_transformer": Case(lambda: nn.Transformer(d_model=32, nhead=4, num_encoder_layers=1, num_decoder_layers=1,
                                                  dim_feedforward=64, dropout=0.1, batch_first=True),
                           lambda: {"src": torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(2)),
                                    "tgt": torch.randn(1, 24, 32, generator=torch.Generator().manual_seed(3))},
                           [("encoder.layers.0.self_attn", "moba", "while training: attention dropout p=0.1"),
                            ("decoder.layers.0.self_attn", "moba", "while training: attention dropout p=0.1"),
                            ("decoder.layers.0.multihead_attn", "dense", f"{CROSS} (Tq=24 > Tk=16")]),
}


def _out(model: nn.Module, inputs: dict) -> torch.Tensor:
    with torch.enable_grad():  # keeps nn.TransformerEncoderLayer off its fused path in the oracle too
        out = model(**inputs)
    for key in ("last_hidden_state", "logits", "sample"):
        if hasattr(out, key):
            return getattr(out, key).detach()
    return out.detach()


@pytest.mark.parametrize("name", list(CASES))
def test_zoo_model(name):
    case = CASES[name]
    model, inputs = case.model(), case.inputs()
    original = _out(model, inputs)

    report = mr.plan(model, policy(), inputs)
    assert [(r.name, r.decision) for r in report] == [(n, d) for n, d, _ in case.expect], str(report)
    for row, (_, _, why) in zip(report, case.expect):
        assert why in row.reason, (row.name, row.reason)
    if any(d == "dense" for _, d, _ in case.expect):
        with pytest.raises(UnsupportedSiteError):
            mr.plan(model, policy(on_unsupported="error"), inputs)

    mr.rewrite(model, policy(top_k=DENSE_TOP_K), inputs)
    torch.testing.assert_close(_out(model, inputs), original, atol=3e-5, rtol=1e-4)

    mr.rewrite(model, policy(), inputs)
    got = _out(model, inputs)
    moba = set(mr.report_of(model).moba_sites)
    assert moba == {n for n, d, _ in case.expect if d == "moba"}
    if not moba:
        assert torch.equal(got, original)
        return
    assert (got - original).abs().max() > 1e-4
    oracle_model = case.model()
    with sdpa_oracle(oracle_model, moba, block=BLOCK, top_k=TOP_K):
        want = _out(oracle_model, inputs)
    torch.testing.assert_close(got, want, atol=3e-5, rtol=1e-4)


# ------------------------------------------------------------------ dropout, one rule everywhere


class TimmStyleAttention(nn.Module):
    """A timm-style block: passes `dropout_p` to SDPA itself while training (no nn.Dropout call)."""

    def __init__(self, dim: int = 32, heads: int = 4, attn_drop: float = 0.1):
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.attn_drop = nn.Dropout(attn_drop)

    def forward(self, x, **kwargs):  # **kwargs: torch.fx's eager machinery cannot stand in for it
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


def test_dropout_passed_to_sdpa_is_reported_and_runs_dense_while_training():
    torch.manual_seed(0)
    model = nn.Sequential(TimmStyleAttention(), TimmStyleAttention()).eval()
    x = torch.randn(2, SEQ, 32)
    for training in (False, True):  # the report does not depend on the mode the model is in
        model.train(training)
        report = mr.plan(model, policy(), (x,))
        assert [(r.name, r.decision) for r in report] == [("0", "moba"), ("1", "moba")]
        assert all("while training: attention dropout p=0.1 -> dense" in r.reason for r in report), str(report)
    model.eval()
    mr.rewrite(model, policy(), (x,))
    plain = nn.Sequential(TimmStyleAttention(), TimmStyleAttention()).eval()
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        got = model(x)
        with sdpa_oracle(plain, {"0", "1"}, block=BLOCK, top_k=TOP_K):
            want = plain(x)
    torch.testing.assert_close(got, want, atol=3e-5, rtol=1e-4)
    model.train()
    torch.manual_seed(5)
    trained = model(x)
    torch.manual_seed(5)
    torch.testing.assert_close(trained, plain.train()(x))  # the original attention, same dropout draws
    mr.rewrite(model.eval(), policy(on_unsupported="error"), (x,))
    model.train()
    with pytest.raises(UnfaithfulSiteError, match="dropout"):
        model(x)


def test_hf_dropout_read_from_the_training_call_not_attribute_names():
    """RoBERTa passes `dropout=0.0 if not training else p` to the interface; the report reads
    p from a training-mode forward, and training raises with `on_unsupported: error`."""
    model = CASES["roberta"].model()
    inputs = CASES["roberta"].inputs()
    mr.rewrite(model, policy(on_unsupported="error"), inputs)
    assert all(r.decision == "moba" and "p=0.1" in r.reason for r in mr.report_of(model))
    model.train()
    with pytest.raises(HFUnsupportedError, match="dropout"):
        model(**inputs)


# ------------------------------------------------------------------ code torch.fx cannot trace


class BranchyAttention(nn.Module):
    """SDPA behind Python control flow on a shape, `torch.finfo` and a `**kwargs` forward."""

    def __init__(self, dim: int = 32, heads: int = 4):
        super().__init__()
        self.heads, self.qkv = heads, nn.Linear(dim, 3 * dim)

    def forward(self, x, mask=None, **kwargs):
        if x.shape[1] > 8:
            x = x * 1.5
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        floor = torch.finfo(q.dtype).min
        if mask is not None:
            mask = torch.where(mask, 0.0, floor)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)


def test_untraceable_sdpa_module_is_rewritten_with_example_inputs():
    torch.manual_seed(0)
    model = nn.Sequential(BranchyAttention()).eval()
    x = torch.randn(2, SEQ, 32)
    with torch.no_grad():
        original = model(x)
    report = mr.plan(model, policy(), (x,))
    assert [(r.name, r.decision, r.causal) for r in report] == [("0", "moba", True)]
    mr.rewrite(model, policy(top_k=DENSE_TOP_K), (x,))
    with torch.no_grad():
        torch.testing.assert_close(model(x), original, atol=3e-5, rtol=1e-4)
    mr.rewrite(model, policy(), (x,))
    plain = nn.Sequential(BranchyAttention()).eval()
    plain.load_state_dict(model.state_dict())
    with torch.no_grad(), sdpa_oracle(plain, {"0"}, block=BLOCK, top_k=TOP_K):
        want = plain(x)
    with torch.no_grad():
        got = model(x)
        assert (got - original).abs().max() > 1e-4
        torch.testing.assert_close(got, want, atol=3e-5, rtol=1e-4)
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(x), want, atol=3e-5, rtol=1e-4)


# ------------------------------------------------------------------ moba-rewrite inspect


@pytest.mark.parametrize("name", ["bloom", "falcon_alibi", "mpt", "gemma2_softcap", "gpt_oss_sinks_moe", "deepseek_v3_mla",
                                  "mixtral_moe", "mistral_sliding_window"])
def test_cli_inspect_lists_every_site_with_why_it_stays_dense(name, tmp_path, capsys):
    import json

    from moba_rewrite import cli

    case = CASES[name]
    case.model().save_pretrained(str(tmp_path / name))
    assert cli.main(["inspect", str(tmp_path / name), "--json", "--no-progress"]) == 0
    sites = json.loads(capsys.readouterr().out)["sites"]
    assert [s["name"] for s in sites] == [n for n, _, _ in case.expect]
    for s, (_, outcome, why) in zip(sites, case.expect):
        if outcome == "dense":
            assert why in (s["notes"] or ""), s
        else:
            assert s["notes"] is None or "stays dense" not in s["notes"], s
    assert cli.main(["inspect", str(tmp_path / name), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"{len(sites)} attention sites" in out and "notes" in out


# ------------------------------------------------------------------ graph patterns (export, Dynamo)


class Bmm3dAttention(nn.Module):
    """3-D bmm attention whose scores are viewed 4-D for a `where` with a tensor constant, and a
    scale from `torch.sqrt(torch.tensor(d))`: torch.fx cannot trace `torch.finfo(scores.dtype)`."""

    def __init__(self, dim: int = 32, heads: int = 4):
        super().__init__()
        self.heads, self.qkv = heads, nn.Linear(dim, 3 * dim)

    def forward(self, x):
        b, t, c = x.shape
        d = c // self.heads
        q, k, v = (z.reshape(b * self.heads, t, d) for z in
                   self.qkv(x).view(b, t, 3, self.heads, d).permute(2, 0, 3, 1, 4).unbind(0))
        scores = (torch.bmm(q, k.transpose(1, 2)) / torch.sqrt(torch.tensor(float(d)))).view(b, self.heads, t, t)
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        scores = torch.where(causal, scores, torch.tensor(torch.finfo(scores.dtype).min))
        return torch.bmm(scores.softmax(-1).view(b * self.heads, t, t), v).view(b, self.heads, t, d)


def test_graph_patterns_bmm_views_and_tensor_constants():
    from moba_rewrite import api
    from moba_rewrite.kernels import reference

    torch.manual_seed(0)
    model = nn.Sequential(Bmm3dAttention()).eval()
    x = torch.randn(2, SEQ, 32)
    q, k, v = model[0].qkv(x).view(2, SEQ, 3, 4, 8).permute(2, 0, 3, 1, 4).unbind(0)
    want = reference.forward(q, k, v, block_size=BLOCK, top_k=TOP_K, causal=True, scale=8 ** -0.5,
                             attn_mask=None).detach()
    ep, report = api.export_with_report(model, (x,), policy())
    assert [(r.name, r.decision, r.causal) for r in report] == [("0", "moba", True)], str(report)
    torch.testing.assert_close(ep.module()(x), want, atol=3e-5, rtol=1e-4)
    # the eager rewrite lists it, dense: it has no graph of a module torch.fx cannot trace
    row = mr.plan(model, policy(), (x,))[0]
    assert row.decision == "dense" and "torch.fx cannot trace" in row.reason and "mr.export" in row.reason


def test_bloom_sites_in_export_graphs_are_dense_with_the_alibi_reason():
    from moba_rewrite import api

    model, inputs = CASES["bloom"].model(), CASES["bloom"].inputs()
    ep, report = api.export_with_report(model, (), policy(), kwargs={**inputs, "use_cache": False})
    assert [(r.name, r.decision) for r in report] == [(n, "dense") for n, _, _ in CASES["bloom"].expect]
    assert all(ALIBI in r.reason for r in report), str(report)


class Outer(nn.Module):
    """Routed owner (a `**kwargs` forward) holding another routed owner; its own SDPA call comes
    after the inner one's, and a shared inner module is called twice (one site)."""

    def __init__(self):
        super().__init__()
        self.inner = BranchyAttention()
        self.qkv = nn.Linear(32, 96)

    def forward(self, x, **kwargs):
        x = self.inner(self.inner(x).transpose(1, 2).reshape(x.shape))
        y = x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1)
        q, k, v = self.qkv(y).view(y.shape[0], y.shape[1], 3, 4, 8).permute(2, 0, 3, 1, 4).unbind(0)
        return F.scaled_dot_product_attention(q, k, v)


def test_nested_routed_owners_each_count_their_own_calls():
    torch.manual_seed(0)
    model = Outer().eval()
    x = torch.randn(2, SEQ, 32)
    pol = {**policy(), "rules": [{"match": "inner", "mode": "dense"}]}
    report = mr.plan(model, pol, (x,))
    assert [(r.name, r.decision) for r in report] == [("inner", "dense"), ("", "moba")], str(report)
    with torch.no_grad():
        original = model(x)
        mr.rewrite(model, pol, (x,))
        got = model(x)
        plain = Outer().eval()
        plain.load_state_dict(model.state_dict())
        with sdpa_oracle(plain, {""}, block=BLOCK, top_k=TOP_K):
            want = plain(x)
    assert (got - original).abs().max() > 1e-4
    torch.testing.assert_close(got, want, atol=3e-5, rtol=1e-4)
