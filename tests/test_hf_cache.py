"""Hugging Face generation with MoBA against every cache kind: `generate()` with the default
`DynamicCache`, `cache_implementation="static"`, an explicit `StaticCache`, chunked prefill,
beam search, and a compiled decode step.

The oracle is independent of the code under test: the same model routed through a test-only
attention function that runs the dense `reference` MoBA (causal, with transformers' own mask)
and generates with `use_cache=False`, i.e. recomputes the whole sequence at every step. At
sliding-window sites the rows past the prompt attend densely (what the rewrite promises there).
"""

from __future__ import annotations

import sys

import pytest
import torch
import transformers
from transformers import AttentionInterface, DynamicCache, StaticCache
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

import moba_rewrite as mr
from moba_rewrite.integrations.hf_cache import KVCacheError
from moba_rewrite.kernels import reference

BLOCK, TOP_K, PROMPT, NEW = 4, 2, 14, 10  # 4 blocks of prompt; decode crosses two block boundaries

_ORACLE: dict = {"sites": {}, "prompt": PROMPT}


def _oracle_attention(module, query, key, value, attention_mask, *args, **kwargs):
    sliding = _ORACLE["sites"].get(module)
    if sliding is None:  # a dense site
        return AttentionInterface._global_mapping["sdpa"](module, query, key, value, attention_mask, *args, **kwargs)
    assert query.shape[2] == key.shape[2], "the oracle recomputes the whole sequence"
    kw = dict(causal=True, scale=kwargs.get("scaling") or query.shape[-1] ** -0.5, attn_mask=attention_mask)
    out = reference.forward(query, key, value, block_size=BLOCK, top_k=TOP_K, **kw)
    if sliding:  # generated tokens attend densely (the dense limit of the reference)
        dense = reference.forward(query, key, value, block_size=BLOCK, top_k=key.shape[2], **kw)
        out[:, :, _ORACLE["prompt"]:] = dense[:, :, _ORACLE["prompt"]:]
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register("oracle_cache", _oracle_attention)
AttentionMaskInterface.register("oracle_cache", ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def _config(family: str):
    common = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128)
    if family == "llama":
        return transformers.LlamaConfig(**common)
    if family == "qwen3":
        return transformers.Qwen3Config(head_dim=8, **common)
    if family == "qwen2_sliding":  # layer 0 full attention, layer 1 a sliding window shorter than the prompt
        return transformers.Qwen2Config(use_sliding_window=True, sliding_window=8, max_window_layers=1, **common)
    raise ValueError(family)


def _model(family: str, attn: str = "sdpa"):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_config(family)).eval()
    model.set_attn_implementation(attn)
    return model


def _attention_modules(model):
    return [m for m in model.modules() if type(m).__name__.endswith("Attention")]


def _rewritten(family: str):
    model = _model(family)
    mr.rewrite(model, {"version": 1, "defaults": {"block_size": BLOCK, "top_k": TOP_K, "decode": "moba"}})
    return model


def _oracle(family: str):
    model = _model(family)
    kinds = model.config.layer_types if family == "qwen2_sliding" else ["full_attention"] * 2
    _ORACLE["sites"] = {m: kind == "sliding_attention" for m, kind in zip(_attention_modules(model), kinds)}
    model.set_attn_implementation("oracle_cache")
    return model


def _prompts():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 64, (2, PROMPT), generator=g)
    mask = torch.ones(2, PROMPT, dtype=torch.long)
    mask[1, :3] = 0  # a left-padded batch of two prompts
    return ids, mask


GEN = dict(max_new_tokens=NEW, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
_WANT: dict = {}


def _want(family: str, **kw):
    key = (family, tuple(sorted(kw.items())))
    if key not in _WANT:
        ids, mask = _prompts()
        with torch.no_grad():
            _WANT[key] = _oracle(family).generate(ids, attention_mask=mask, use_cache=False, **GEN, **kw)
    return _WANT[key]


def _check(got, want):
    assert torch.equal(got.sequences, want.sequences)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(want.logits), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("cache", ["dynamic", "static", "explicit_static"])
@pytest.mark.parametrize("family", ["llama", "qwen3", "qwen2_sliding"])
def test_generate_equals_the_reference_token_for_token(family, cache):
    model = _rewritten(family)
    ids, mask = _prompts()
    kw = {}
    if cache == "static":
        kw["cache_implementation"] = "static"
    elif cache == "explicit_static":
        kw["cache"] = StaticCache(config=model.config, max_cache_len=PROMPT + NEW + 3)  # 27: a partial last block
    with torch.no_grad():
        got = model.generate(ids, attention_mask=mask, **GEN, **kw)
    _check(got, _want(family))
    if cache != "dynamic":  # the means live beside the full-attention layers of the cache, one buffer each
        layers = (kw.get("cache") or got.cache).layers
        full = [layer for layer in layers if not layer.is_sliding]
        assert full and all(layer.moba_block_means.means.shape[2] == -(-layer.max_cache_len // BLOCK) for layer in full)
        assert not any("moba_block_means" in vars(layer) for layer in layers if layer.is_sliding)


@pytest.mark.parametrize("make_cache", [lambda cfg: StaticCache(config=cfg, max_cache_len=PROMPT + 8),
                                        lambda cfg: DynamicCache(config=cfg)], ids=["static", "dynamic"])
def test_chunked_prefill_then_decode(make_cache):
    """A prompt fed in two chunks (8 + 6 tokens, the second across a block boundary), then decode steps."""
    model = _rewritten("llama")
    ids, mask = _prompts()
    want = _want("llama")
    cache = make_cache(model.config)
    seq, logits = ids, []
    with torch.no_grad():
        for a, e in ((0, 8), (8, PROMPT)):
            am = mask[:, :e]
            pid = (am.cumsum(-1) - 1).clamp(min=0)[:, a:e]
            out = model(input_ids=ids[:, a:e], attention_mask=am, position_ids=pid, cache=cache, use_cache=True)
        for step in range(6):
            logits.append(out.logits[:, -1])
            seq = torch.cat([seq, logits[-1].argmax(-1, keepdim=True)], 1)
            am = torch.cat([mask, mask.new_ones(2, step + 1)], 1)
            pid = (am.cumsum(-1) - 1)[:, -1:]
            out = model(input_ids=seq[:, -1:], attention_mask=am, position_ids=pid, cache=cache, use_cache=True)
    assert torch.equal(seq, want.sequences[:, :PROMPT + 6])
    torch.testing.assert_close(torch.stack(logits), torch.stack(want.logits[:6]), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_beam_search_reorders_the_means_with_the_cache(cache):
    model = _rewritten("llama")
    ids, mask = _prompts()
    kw = dict(num_beams=2, num_return_sequences=2)
    with torch.no_grad():
        got = model.generate(ids, attention_mask=mask, **GEN, **kw,
                             **({"cache_implementation": "static"} if cache == "static" else {}))
    want = _want("llama", **kw)
    assert torch.equal(got.sequences, want.sequences)


@pytest.mark.parametrize("cache", ["dynamic", "explicit_static"])
def test_assisted_decoding_crops_and_rewrites_the_cache(cache):
    """Prompt-lookup (assisted) decoding verifies several draft tokens per call and crops the cache
    back when drafts are rejected: tokens and logits still equal the reference."""
    model = _rewritten("llama")
    ids, mask = _prompts()
    ids, mask = ids[:1], mask[:1]
    kw = dict(prompt_lookup_num_tokens=3)
    if cache == "explicit_static":
        kw["cache"] = StaticCache(config=model.config, max_cache_len=PROMPT + NEW + 8)
    with torch.no_grad():
        got = model.generate(ids, attention_mask=mask, **GEN, **kw)
        want = _oracle("llama").generate(ids, attention_mask=mask, use_cache=False, **GEN)
    _check(got, want)


@pytest.mark.parametrize("copy_with", ["deepcopy", "torch.save"])
def test_a_copied_prompt_cache_generates_as_the_reference(copy_with):
    """The prompt-reuse pattern (prefill once, copy the cache per request): the copy, deep-copied or
    saved and loaded, is the cache's own class again and its kept block means are rebuilt, so
    generating from it gives the reference; the original cache is untouched and generates too."""
    import copy
    import io

    model = _rewritten("llama")
    ids, mask = _prompts()
    ids, mask = ids[:1], mask[:1]
    with torch.no_grad():
        prompt_cache = model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], use_cache=True).cache
        if copy_with == "deepcopy":
            copied = copy.deepcopy(prompt_cache)
        else:
            buf = io.BytesIO()
            torch.save(prompt_cache, buf)
            buf.seek(0)
            copied = torch.load(buf, weights_only=False)  # our own object, written just above
        assert type(copied) is DynamicCache
        want = _oracle("llama").generate(ids, attention_mask=mask, use_cache=False, **GEN)
        for cache in (copied, prompt_cache):
            _check(model.generate(ids, attention_mask=mask, cache=cache, **GEN), want)


@pytest.mark.parametrize("dense_below", [0, PROMPT + 3])
def test_compiled_decode_step_with_a_static_cache(dense_below):
    """torch.compile(fullgraph=True) of decode steps reads the positions and means on the device:
    one graph for every step, the same logits as eager. With a policy's `dense_below` that the
    cache passes mid-decode (the first two steps full attention, the next two MoBA) the op decides
    per step from the positions (it raised NotImplementedError under compile before)."""
    model = _model("llama")
    extra = {"dense_below": dense_below} if dense_below else {}
    mr.rewrite(model, {"version": 1, "defaults": {"block_size": BLOCK, "top_k": TOP_K, "decode": "moba", **extra}})
    ids, mask = _prompts()

    def decode(fn):
        length = PROMPT + 4
        cache = StaticCache(config=model.config, max_cache_len=length)
        full = torch.cat([mask, mask.new_zeros(2, 4)], 1)  # a fixed-length mask, as for any static decode
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True)
            logits = []
            for step in range(4):
                full[:, PROMPT + step] = 1
                out = fn(input_ids=out.logits[:, -1:].argmax(-1).contiguous(), attention_mask=full.clone(),
                         position_ids=full.cumsum(-1)[:, PROMPT + step:PROMPT + step + 1] - 1, cache=cache,
                         use_cache=True)
                logits.append(out.logits[:, -1])
        return torch.stack(logits)

    torch._dynamo.reset()
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()
    try:
        got = decode(torch.compile(model, fullgraph=True, backend=counter))
    finally:
        torch._dynamo.reset()
    assert counter.frame_count == 1
    eager = decode(model)
    torch.testing.assert_close(got, eager, atol=1e-6, rtol=1e-6)
    if dense_below:  # full attention, then MoBA: the original's first two steps, then other logits than it
        original = _model("llama")
        mr.rewrite(original, {"version": 1, "defaults": {"block_size": BLOCK, "top_k": PROMPT + 4}})  # = dense
        dense = decode(original)
        torch.testing.assert_close(eager[:2], dense[:2], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(eager[2:], dense[2:], atol=1e-3)


def test_static_cache_smaller_than_the_prompt_is_named():
    model = _rewritten("llama")
    ids, mask = _prompts()
    with pytest.raises(KVCacheError, match=r"StaticCache too small: layer 0 \(model.layers.0.self_attn\) holds max_cache_len=10 .* positions 0..13"):
        model(input_ids=ids, attention_mask=mask, cache=StaticCache(config=model.config, max_cache_len=10),
              use_cache=True)


def test_report_says_sliding_sites_decode_densely():
    rows = mr.plan(_model("qwen2_sliding"), {"version": 1, "defaults": {"block_size": BLOCK}})
    assert "sliding-window cache" not in rows[0].reason and "sliding-window cache" in rows[1].reason


def test_training_with_the_cache_on_is_differentiable():
    """`use_cache` defaults to on while training: the call records gradients, so it takes the
    differentiable op; the gradients equal those of a forward without a cache."""
    ids, mask = _prompts()
    grads = []
    for use_cache in (True, False):
        model = _rewritten("llama").train()
        model(input_ids=ids, attention_mask=mask, labels=ids, use_cache=use_cache).loss.backward()
        grads.append(model.model.layers[0].self_attn.k_proj.weight.grad)
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_dense_below_every_cache_length_generates_as_the_original(cache):
    """`dense_below` above every length the cache reaches: each call, prefill and decode, computes
    full attention, so generation is the original model's."""
    model = _model("llama")
    mr.rewrite(model, {"version": 1, "defaults": {"block_size": BLOCK, "top_k": TOP_K, "decode": "moba",
                                                  "dense_below": PROMPT + NEW + 8}})
    ids, mask = _prompts()
    kw = {"cache_implementation": "static"} if cache == "static" else {}
    with torch.no_grad():
        got = model.generate(ids, attention_mask=mask, **GEN, **kw)
        want = _model("llama").generate(ids, attention_mask=mask, **GEN, **kw)
    _check(got, want)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_the_reference_backend_ignores_dense_below_in_every_call(cache):
    """The `reference` backend (the oracle) computes MoBA whatever `dense_below` says, in the prefill
    and in cached decode calls alike (decode steps once ran full attention under it while the
    prefill ran MoBA)."""
    ids, mask = _prompts()
    kw = {"cache_implementation": "static"} if cache == "static" else {}
    out = []
    for extra in ({"dense_below": PROMPT + NEW + 8}, {}):
        model = _model("llama")
        mr.rewrite(model, {"version": 1, "defaults": {"block_size": BLOCK, "top_k": TOP_K, "decode": "moba",
                                                      "backend": "reference", **extra}})
        with torch.no_grad():
            out.append(model.generate(ids, attention_mask=mask, **GEN, **kw))
    _check(out[0], out[1])


def test_a_float_mask_with_a_static_cache_under_tracing_is_refused():
    """A user's 4-D float mask cannot be read for a bias inside a graph whose queries sit in a
    static cache: a clear error, never MoBA on a mask it could not check."""
    model = _rewritten("llama")
    ids, _ = _prompts()
    cache = StaticCache(config=model.config, max_cache_len=PROMPT + 2)
    cut = torch.ones(PROMPT, PROMPT + 2, dtype=torch.bool).tril()
    float_mask = torch.where(cut, 0.0, torch.finfo(torch.float32).min)[None, None].expand(2, 1, -1, -1)
    torch._dynamo.reset()
    try:
        with torch.no_grad(), pytest.raises(Exception, match="StaticCache"):
            torch.compile(model, fullgraph=True, backend="eager")(
                input_ids=ids, attention_mask=float_mask, cache=cache, use_cache=True)
    finally:
        torch._dynamo.reset()
