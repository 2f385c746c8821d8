"""`GrowingDynamicLayer` holds what transformers' `DynamicLayer` holds, call for call, and MoBA sites of
a rewritten model decode with it.

The reference is transformers' own `DynamicLayer` driven through the same sequence of calls
(prefill, decode steps across buffer growth, crop, batch selection, beam reordering, repeat, reset).
"""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers.cache_utils import DynamicCache, DynamicLayer

import moba_rewrite as mr
from moba_rewrite.integrations.hf_cache_growth import GrowingDynamicLayer, capacity_for, grow_in_place

B, H, D = 2, 3, 4
MOBA = {"version": 1, "defaults": {"block_size": 4, "top_k": 2, "decode": "moba"}}


def _tiny_llama(policy: dict):
    """A random-weight 2-layer Llama (GQA) rewritten with `policy`, and its config."""
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.set_attn_implementation("sdpa")
    return mr.rewrite(model, policy), cfg


def _states(t: int, *, batch: int = B, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.randn(batch, H, t, D, generator=gen), torch.randn(batch, H, t, D + 1, generator=gen))


def _same(growing: DynamicLayer, plain: DynamicLayer) -> None:
    assert torch.equal(growing.keys, plain.keys) and torch.equal(growing.values, plain.values)
    assert growing.get_seq_length() == plain.get_seq_length()


def _pair() -> tuple[DynamicLayer, DynamicLayer]:
    growing = DynamicLayer()
    assert grow_in_place(growing)
    return growing, DynamicLayer()


def _update_both(growing, plain, k, v) -> None:
    got = growing.update(k, v)
    want = plain.update(k, v)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    _same(growing, plain)


def test_decode_across_growth_crop_select_repeat_and_reset_matches_dynamic_layer():
    gen = torch.Generator().manual_seed(0)
    growing, plain = _pair()
    prompt = 300
    _update_both(growing, plain, *_states(prompt, gen=gen))
    first = growing._moba_buffers[0]
    assert first.shape[2] == capacity_for(prompt) and growing.keys.data_ptr() == first.data_ptr()
    for _ in range(capacity_for(prompt) - prompt + 5):  # past the first buffer's end: one regrowth
        _update_both(growing, plain, *_states(1, gen=gen))
    assert growing._moba_buffers[0].shape[2] > first.shape[2]
    growing.crop(-7), plain.crop(-7)
    _same(growing, plain)
    _update_both(growing, plain, *_states(3, gen=gen))  # writes over the cropped slots
    order = torch.tensor([1, 0])
    growing.reorder_cache(order), plain.reorder_cache(order)  # a new tensor: the next update starts a new buffer
    _same(growing, plain)
    _update_both(growing, plain, *_states(1, gen=gen))
    growing.batch_select_indices(torch.tensor([1])), plain.batch_select_indices(torch.tensor([1]))
    _update_both(growing, plain, *_states(2, batch=1, gen=gen))
    growing.batch_repeat_interleave(2), plain.batch_repeat_interleave(2)
    _update_both(growing, plain, *_states(1, gen=gen))
    growing.reset(), plain.reset()
    _update_both(growing, plain, *_states(5, gen=gen))
    assert type(growing) is GrowingDynamicLayer


def test_decoding_copies_each_token_a_constant_number_of_times():
    gen = torch.Generator().manual_seed(1)
    growing, plain = _pair()
    _update_both(growing, plain, *_states(64, gen=gen))
    moves, copied = 0, 0
    pointer = growing._moba_buffers[0].data_ptr()
    for _ in range(3000):
        growing.update(*_states(1, gen=gen))
        if growing._moba_buffers[0].data_ptr() != pointer:  # a new buffer: the tokens so far were copied
            pointer = growing._moba_buffers[0].data_ptr()
            moves, copied = moves + 1, copied + growing.keys.shape[2]
    # capacity grows by a quarter (>= 256 slots) each time: 64 -> 3064 tokens takes a handful of new
    # buffers, and every token is copied a bounded number of times (a concatenation per step: 1500x)
    assert moves <= 12, moves
    assert copied <= 5 * growing.keys.shape[2], (copied, growing.keys.shape[2])


def test_calls_it_cannot_serve_in_place_behave_as_dynamic_layer():
    gen = torch.Generator().manual_seed(2)
    growing, plain = _pair()
    _update_both(growing, plain, *_states(10, gen=gen))
    with pytest.raises(RuntimeError):  # a batch that disagrees with the cache: torch.cat's error, not a broadcast
        growing.update(*_states(1, batch=1, gen=gen))
    with pytest.raises(RuntimeError):
        plain.update(*_states(1, batch=1, gen=gen))
    _same(growing, plain)
    k, v = _states(1, gen=gen)
    _update_both(growing, plain, k.double(), v.double())  # promotion, as torch.cat does
    assert growing.keys.dtype == torch.float64
    k, v = _states(2, gen=gen)
    k.requires_grad_(True)
    _update_both(growing, plain, k, v)  # recorded for autograd: concatenated, nothing written in place
    assert growing.keys.requires_grad
    _update_both(growing, plain, *(s.double() for s in _states(1, gen=gen)))


def test_a_cache_filled_in_inference_mode_decodes_outside_it():
    """Prefill under `torch.inference_mode()`, decode under `torch.no_grad()` (in-place writes into an
    inference tensor are not allowed there): a new buffer, the same tokens as DynamicLayer."""
    gen = torch.Generator().manual_seed(3)
    growing, plain = _pair()
    with torch.inference_mode():
        _update_both(growing, plain, *_states(20, gen=gen))
    with torch.no_grad():
        for _ in range(3):
            _update_both(growing, plain, *_states(1, gen=gen))
    assert not growing.keys.is_inference()


def test_only_plain_dynamic_layers_are_swapped():
    from transformers.cache_utils import DynamicSlidingWindowLayer, StaticLayer

    assert not grow_in_place(DynamicSlidingWindowLayer(sliding_window=8))
    assert not grow_in_place(StaticLayer(max_cache_len=8))


def test_generate_grows_moba_sites_in_place_and_keeps_dense_sites_stock():
    policy = {"version": 1, "defaults": {"block_size": 4, "top_k": 2, "decode": "moba"},
              "rules": [{"layers": "-1:", "mode": "dense"}]}  # last layer dense
    ids = torch.randint(0, 64, (1, 14), generator=torch.Generator().manual_seed(3))
    model, cfg = _tiny_llama(policy)
    cache = DynamicCache(config=cfg)
    out = model.generate(ids, max_new_tokens=12, do_sample=False, past_key_values=cache)
    assert type(cache.layers[0]) is GrowingDynamicLayer and type(cache.layers[1]) is DynamicLayer
    assert cache.layers[0].get_seq_length() == cache.layers[1].get_seq_length() == out.shape[1] - 1
    # the tokens held at the MoBA site are the model's keys: recompute them without a cache
    ref_cache = DynamicCache(config=cfg)
    with torch.no_grad():
        model(out[:, :-1], past_key_values=ref_cache, use_cache=True)
    assert torch.allclose(cache.layers[0].keys, ref_cache.layers[0].keys, atol=1e-5)
    assert torch.allclose(cache.layers[0].values, ref_cache.layers[0].values, atol=1e-5)


def test_a_grown_cache_decodes_under_torch_compile_fullgraph():
    """Prefill eagerly (the layer grows in place), then decode with the compiled model: the compiled
    steps concatenate (no in-place writes in a graph) and equal eager steps on a copy of the cache."""
    import copy

    model, cfg = _tiny_llama(MOBA)
    cache = DynamicCache(config=cfg)
    with torch.no_grad():
        token = model(torch.randint(0, 64, (1, 14)), past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        assert type(cache.layers[0]) is GrowingDynamicLayer
        eager_cache = copy.deepcopy(cache)
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        for _ in range(3):
            got = compiled(token, past_key_values=cache, use_cache=True).logits
            want = model(token, past_key_values=eager_cache, use_cache=True).logits
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
            token = want[:, -1:].argmax(-1)
    assert cache.layers[0].get_seq_length() == eager_cache.layers[0].get_seq_length() == 17


def test_inference_mode_prefill_then_no_grad_decode():
    """A prefill under `torch.inference_mode()` and decode steps under `torch.no_grad()` (the cache,
    the kept block means and the kernels' per-thread scratch buffers all cross the mode boundary):
    the same logits as a run under `no_grad` alone."""
    model, cfg = _tiny_llama(MOBA)
    ids = torch.randint(0, 64, (1, 14), generator=torch.Generator().manual_seed(5))

    def run(prefill_mode):
        cache = DynamicCache(config=cfg)
        with prefill_mode():
            logits = [model(ids, past_key_values=cache, use_cache=True).logits[:, -1]]
        with torch.no_grad():
            for _ in range(6):
                token = logits[-1].argmax(-1, keepdim=True)
                logits.append(model(token, past_key_values=cache, use_cache=True).logits[:, -1])
        return torch.stack([x.clone() for x in logits])

    torch.testing.assert_close(run(torch.inference_mode), run(torch.no_grad), atol=1e-6, rtol=1e-6)
