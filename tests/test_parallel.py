"""Context-parallel MoBA (`moba_rewrite.parallel`, `integrations.hf_cp`): the pieces, checked in
this process, and rows of `benchmarks/cp_sweep.py`.

The distributed cases run on gloo ranks spawned once per suite (`cp_spawn`, `cp_workers`):
`test_parallel_two_ranks.py` (2 ranks) and `test_parallel_more_ranks.py` (4 and 3), files of
their own so that two test workers run them side by side.
"""

from __future__ import annotations

import pytest
import torch

from moba_rewrite.kernels import reference
from moba_rewrite.parallel import moba_attention_cp, shard_sequence
from moba_rewrite.parallel.gate import select_history
from moba_rewrite.parallel.layout import ShardLayout


# --------------------------------------------------------------------------------------------
# In-process pieces


@pytest.mark.parametrize("causal", [True, False])
def test_global_gate_equals_the_reference_selection(causal):
    """Gating every query against the whole sequence's block means picks the reference's blocks."""
    q, k = torch.randn(2, 4, 96, 8), torch.randn(2, 2, 96, 8)
    bs = 8
    want = reference.block_selection(q, k, block_size=bs, top_k=4, causal=causal)
    sel = select_history(q, reference.block_means(k, bs), torch.arange(96) // bs, top_k=4, causal=causal,
                         n_real=12)
    got = torch.zeros(2, 4, 96, 13, dtype=torch.bool)
    got.scatter_(-1, torch.where(sel < 0, 12, sel), True)
    got[..., torch.arange(96), torch.arange(96) // bs] = True
    assert torch.equal(got[..., :12], want)


def test_layouts_place_whole_chunks():
    lay = ShardLayout("zigzag", 4, 16)
    assert lay.positions(1).tolist() == list(range(8, 16)) + list(range(48, 56))
    assert lay.blocks(1, 4) == [2, 3, 12, 13]
    assert lay.chunk_order() == [(0, 0), (1, 0), (2, 0), (3, 0), (3, 1), (2, 1), (1, 1), (0, 1)]
    with pytest.raises(ValueError, match="straddle ranks.*T_local / 2"):
        lay.check_blocks(16, "test")
    assert ShardLayout("contiguous", 4, 16).positions(3).tolist() == list(range(48, 64))


def test_without_a_process_group_the_error_says_so():
    q = torch.randn(1, 1, 8, 4)
    with pytest.raises(ValueError, match="torch.distributed is not initialised"):
        moba_attention_cp(q, q, q, block_size=4, top_k=2)
    with pytest.raises(ValueError, match="not initialised"):
        shard_sequence(q)


def test_sliding_windows_are_read_from_transformers_mask_functions():
    """The window of transformers' causal sliding-window mask function (alone or combined with
    padding) is found; causal, bidirectional-window and chunked functions hold none. The chunk size
    of its chunked causal function (Llama 4) is found the same way; no other function holds one."""
    from transformers import masking_utils as mu

    from moba_rewrite.integrations.hf_masks import chunk_size_of, sliding_window_of

    assert sliding_window_of(mu.sliding_window_causal_mask_function(7)) == 7
    assert sliding_window_of(mu.and_masks(mu.sliding_window_causal_mask_function(5),
                                          mu.padding_mask_function(torch.ones(1, 3, dtype=torch.bool)))) == 5
    assert sliding_window_of(mu.causal_mask_function) is None
    assert sliding_window_of(mu.sliding_window_bidirectional_mask_function(4)) is None
    assert sliding_window_of(mu.chunked_causal_mask_function(4, torch.zeros(1, dtype=torch.long))) is None
    assert chunk_size_of(mu.chunked_causal_mask_function(12, torch.zeros(1, dtype=torch.long))) == 12
    assert chunk_size_of(mu.sliding_window_causal_mask_function(7)) is None
    assert chunk_size_of(mu.causal_mask_function) is None


@pytest.mark.parametrize("reason", ["chunked attention", "a combined mask function (extra and/or masks)",
                                    "a sliding window"])
def test_masks_that_cannot_be_sharded_are_one_clear_error(reason):
    """A kept mask whose meaning a shard's local pattern cannot show whole (a window with no known
    size among them) is refused, never checked locally and run as plain causal attention."""
    from moba_rewrite.integrations import hf_cp, hf_masks

    mask = torch.ones(1, 1, 8, 8, dtype=torch.bool).tril()
    setattr(mask, hf_masks.FULL_REASON, reason)
    with pytest.raises(ValueError, match="cannot carry across shards"):
        hf_cp._window("site", mask, {})
    with pytest.raises(ValueError, match="sliding window of 4 keys but its mask says none"):
        hf_cp._window("site", None, {"sliding_window": 4})


def test_a_rewrite_with_no_interface_site_is_refused_by_name():
    """Bloom's hand-written attention stays dense and off the attention interface: context
    parallelism says so (it used to tell the user to rewrite the model they had rewritten)."""
    import moba_rewrite as mr
    from transformers import BloomConfig, BloomForCausalLM

    from moba_rewrite.integrations.hf_cp import context_parallel

    model = mr.rewrite(BloomForCausalLM(BloomConfig(vocab_size=64, hidden_size=32, n_layer=1, n_head=4)),
                       {"version": 1, "defaults": {"block_size": 4, "top_k": 2}})
    with pytest.raises(ValueError, match="was rewritten, but none of its attention goes through .*BloomAttention"):
        with context_parallel(model):
            pass


def test_a_model_that_numbers_its_own_positions_needs_a_position_embedding_that_takes_them():
    """A model whose forward takes no position_ids numbers its shard's tokens itself: accepted when
    its position embedding takes the numbers (`cache_length`, `position_ids`: BART's decoder, given
    the global positions under context parallelism, checked on gloo ranks in cp_workers), refused
    by name otherwise (each shard would restart at 0)."""
    import moba_rewrite as mr
    from torch import nn
    from transformers import BartConfig, BartForCausalLM, LlamaConfig, LlamaForCausalLM

    from moba_rewrite.integrations.hf_cp import check_rewritten
    from moba_rewrite.integrations.hf_cp_positions import numbering_modules

    cfg = BartConfig(vocab_size=64, d_model=32, decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=64,
                     encoder_layers=1, encoder_attention_heads=4, encoder_ffn_dim=64, max_position_embeddings=64)
    policy = {"version": 1, "defaults": {"block_size": 4, "top_k": 2}}
    bart = mr.rewrite(BartForCausalLM(cfg), policy)
    assert [name for name, _ in numbering_modules(bart)] == ["model.decoder.embed_positions"]
    check_rewritten(bart)

    class NumbersItself(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self._moba_report, self.config = inner, inner._moba_report, inner.config

        def forward(self, input_ids, attention_mask=None):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)

    llama = mr.rewrite(LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                    num_hidden_layers=1, num_attention_heads=4)), policy)
    check_rewritten(llama)
    with pytest.raises(ValueError, match="NumbersItself.forward takes no position_ids"):
        check_rewritten(NumbersItself(llama))


def test_a_position_embedding_gets_the_global_positions_only_from_its_decoders_own_count():
    """The hook on a BART-style position embedding replaces the decoder's consecutive numbers (here
    a decode step's: the new tokens end the sharded cache's filled length) and refuses numbers
    that are not consecutive or missing, rather than guess what they meant."""
    from types import SimpleNamespace

    from transformers.models.bart.modeling_bart import BartLearnedPositionalEmbedding

    from moba_rewrite.integrations.hf_cp_positions import GlobalNumbering

    embed = BartLearnedPositionalEmbedding(64, 8)
    numbering = GlobalNumbering(SimpleNamespace(decode_len=41), [("embed", embed)])
    handles = [embed.register_forward_pre_hook(numbering._pre("embed"), with_kwargs=True)]
    try:
        ids = torch.zeros(1, 2, dtype=torch.long)
        got = embed(ids, 7, position_ids=torch.tensor([7, 8]))  # the decoder's count: cache length 7
        torch.testing.assert_close(got, embed.weight[torch.tensor([39, 40]) + embed.offset][None], rtol=0, atol=0)
        assert numbering.calls == 1
        with pytest.raises(ValueError, match="not consecutive numbers"):
            embed(ids, 0, position_ids=torch.tensor([3, 1]))
        with pytest.raises(ValueError, match="called without integer position_ids"):
            embed(ids, 0)
    finally:
        for h in handles:
            h.remove()


def test_models_that_mix_tokens_outside_attention_are_refused():
    """MiniMax's lightning attention (a linear-attention recurrence written inline in its forward:
    nothing to dispatch) mixes tokens outside attention: a shard would restart its state at its
    first token (the cp sweep once found Falcon-H1's sharded logits 0.0039 off, before its Mamba-2
    mixers got their state carried across ranks). The layer kinds are named; Falcon-H1's mixers and
    RecurrentGemma's recurrent blocks are carried (accepted), a plain Llama has none."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import cp_sweep

    import moba_rewrite as mr
    from moba_rewrite.integrations.hf_cp import check_rewritten, context_parallel, other_sequence_mixers

    model, _ = cp_sweep._build("minimax", "MiniMaxForCausalLM")
    mr.rewrite(model, cp_sweep.SPARSE)
    assert other_sequence_mixers(model) == ["layer types linear_attention"]
    with pytest.raises(ValueError, match="mixes tokens outside attention .layer types linear_attention."):
        with context_parallel(model):
            pass
    for model_type, class_name, mixers in (
            ("falcon_h1", "FalconH1ForCausalLM", ["layer types hybrid", "convolutions FalconH1Mixer.conv1d"]),
            ("recurrent_gemma", "RecurrentGemmaForCausalLM",
             ["layer types linear_attention", "convolutions RecurrentGemmaRecurrentBlock.conv_1d"])):
        carried, _ = cp_sweep._build(model_type, class_name)
        mr.rewrite(carried, cp_sweep.SPARSE)
        assert other_sequence_mixers(carried) == mixers
        check_rewritten(carried)  # its recurrent layers shard (hf_cp_linear)
    llama, _ = cp_sweep._build("llama", "LlamaForCausalLM")
    assert other_sequence_mixers(llama) == []


@pytest.mark.parametrize("model_type,class_name,generate,note", [
    ("gemma2", "Gemma2ForCausalLM", False, ""), ("gemma2", "Gemma2ForCausalLM", True, ""),
    ("moshi", "MoshiForCausalLM", True, ""), ("gpt_oss", "GptOssForCausalLM", True, ""),
    ("deepseek_v3", "DeepseekV3ForCausalLM", False, ""), ("gemma3_text", "Gemma3ForCausalLM", 3, ""),
    ("bert", "BertLMHeadModel", False, "packed documents refused: attention site 'bert.encoder.layer.0.attention.self' "
                                       "is not causal")])
def test_cp_sweep_rows(model_type, class_name, generate, note):
    """A row of `benchmarks/cp_sweep.py` (two forked gloo ranks): the prefill of one prompt, a padded
    batch and packed documents in both layouts (sharded logits = unsharded), or with `generate` sharded-cache
    decoding (tokens and logits = single-process `generate()`). Gemma 2: alternating sliding windows
    of 8 tokens crossing shards, soft-capped attention kept dense (decoded densely with the cap);
    Moshi: a causal mask but a sliding-window cache in `generate()`, so one process decodes over the
    window only (sharded decoding once attended every key: tokens differed from step 1); gpt-oss:
    attention sinks and sliding windows in decoding; DeepSeek-V3: MLA (a value head dim of its own)
    with packed documents (K and V all-gathered apart); BERT as a decoder-less LM (bidirectional):
    packed documents at a non-causal MoBA site are refused (they once ran causally: 0.008 off);
    Gemma 3 with beam search (`generate` = 3 beams): the prompt's last token, which transformers'
    loop feeds as a step, computed as one process prefills it (MoBA under the sliding window's
    mask, not the window's dense decode: the first token once differed)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import cp_sweep

    status, detail = cp_sweep.sweep_one(model_type, class_name, 120, generate=generate)
    assert status == "equal" and note in detail, detail


def test_while_sharded_every_kept_mask_is_materialised_with_its_reason():
    """Transformers skips a sliding-window or chunked mask a shard cannot tell from causal (fewer
    tokens than the window, no padding): while sharded, the MoBA mask function keeps it with its
    reason (and window), so every rank sees the same kind of mask and refuses or windows alike (a
    padded row on one rank only once made that rank alone refuse while the others waited)."""
    from transformers import masking_utils as mu

    from moba_rewrite.integrations import hf_masks

    mask_fn = hf_masks.make_mask_function("sdpa")
    kw = dict(batch_size=1, q_length=8, kv_length=8, attention_mask=torch.ones(1, 8, dtype=torch.bool),
              local_size=16, device="cpu")
    window, chunked = mu.sliding_window_causal_mask_function(16), mu.chunked_causal_mask_function(16, torch.zeros(1))
    assert mask_fn(mask_function=window, **kw) is None and mask_fn(mask_function=chunked, **kw) is None
    previous, hf_masks.SHARDED = hf_masks.SHARDED, True
    try:
        kept = mask_fn(mask_function=window, **kw)
        assert hf_masks.full_reason(kept) == "a sliding window" and hf_masks.window_of(kept) == 16
        kept = mask_fn(mask_function=chunked, **kw)
        assert hf_masks.full_reason(kept) == "chunked attention" and hf_masks.chunk_of(kept) == 16
    finally:
        hf_masks.SHARDED = previous


def test_chunk_start_is_the_earliest_key_any_row_sees():
    """`window.chunk_start` (what the chunked layers' key exchange plans from) against brute force
    over transformers' chunk rule: the first key in the same chunk as the query, over the rows'
    left paddings, rounded down to a block start."""
    from moba_rewrite.parallel.window import chunk_start

    for chunk in (1, 5, 20, 64):
        for pads in ((0,), (0, 7), (3, 11, 40), (25,)):
            for block in (1, 8):
                for start in range(0, 90, 3):
                    k = torch.arange(start + 1)
                    firsts = [int(((k - p) // chunk == (start - p) // chunk).nonzero()[0]) for p in pads]
                    assert chunk_start(start, chunk, pads, block) == min(firsts) // block * block, (chunk, pads, start)


def test_a_chunked_mask_with_more_in_it_is_refused_locally():
    """A chunked mask is applied at global positions only where the shard's own mask is exactly
    the chunked pattern (counted from the shard's first real token) over its padding: one that hides
    or shows anything else (an extra mask function) is an error, never run as plain chunks."""
    from transformers import masking_utils as mu

    from moba_rewrite.integrations import hf_cp

    t, chunk = 12, 5
    padding = torch.ones(2, t, dtype=torch.bool)
    padding[1, :3] = False
    left = torch.tensor([0, 3])

    def build(fn):
        idx = torch.arange(t)
        return torch.stack([torch.stack([torch.tensor([bool(fn(b, 0, q, k)) for k in idx]) for q in idx])
                            for b in range(2)])[:, None] & padding[:, None, None, :]

    plain = build(mu.chunked_causal_mask_function(chunk, left))
    hf_cp._check_mask("site", plain, t, True, padding, chunk=chunk)  # the pattern itself passes
    extra = build(mu.and_masks(mu.chunked_causal_mask_function(chunk, left), lambda b, h, q, k: k != 1))
    with pytest.raises(ValueError, match="not plain causal chunked attention"):
        hf_cp._check_mask("site", extra, t, True, padding, chunk=chunk)
    with pytest.raises(ValueError, match="not plain causal chunked attention"):  # chunks counted from 0: not it
        hf_cp._check_mask("site", build(mu.chunked_causal_mask_function(chunk, torch.zeros(2, dtype=torch.long))),
                          t, True, padding, chunk=chunk)


def test_rotary_embeddings_scaled_by_length_are_found():
    """`hf_cp_positions.position_scaled_rotary` finds transformers' rotary embeddings whose frequencies
    follow the longest position (LongRoPE, dynamic NTK), and no plain or statically scaled one
    (default, linear, YaRN, Llama 3): only those get the whole sequence's length under context parallelism."""
    from transformers import LlamaConfig, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM

    from moba_rewrite.integrations.hf_cp_positions import position_scaled_rotary

    common = dict(vocab_size=32, hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
    half = 32 // 4 // 2
    phi = Phi3ForCausalLM(Phi3Config(**common, original_max_position_embeddings=32, pad_token_id=0,
                                     rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                                      "short_factor": [1.0] * half, "long_factor": [2.0] * half,
                                                      "original_max_position_embeddings": 32}))
    assert position_scaled_rotary(phi) == [phi.model.rotary_emb]
    for rope, found in (({"rope_type": "dynamic", "factor": 2.0}, True), ({"rope_type": "default"}, False),
                        ({"rope_type": "linear", "factor": 2.0}, False),
                        ({"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32}, False)):
        llama = LlamaForCausalLM(LlamaConfig(**common, rope_parameters={"rope_theta": 10000.0, **rope}))
        assert position_scaled_rotary(llama) == ([llama.model.rotary_emb] if found else []), rope


def test_depend_on_ties_the_exchanges_to_the_result_with_a_zero_gradient():
    """`layout.depend_on`: the result is `out` (its gradient unchanged), each dependency gets a zero
    gradient (so the backward of the collective that made it runs on every rank), the result may be
    modified in place (a model's code may), and without autograd nothing is added."""
    from moba_rewrite.parallel.layout import depend_on

    x = torch.randn(5, requires_grad=True)
    dep = torch.randn(2, 3, requires_grad=True)
    y = depend_on(x * 3, dep)
    assert torch.equal(y, x.detach() * 3)
    y.mul_(2)
    y.sum().backward()
    assert torch.equal(x.grad, torch.full((5,), 6.0))
    assert dep.grad is not None and torch.equal(dep.grad, torch.zeros(2, 3))
    with torch.no_grad():
        out = x * 1
        assert depend_on(out, dep) is out
