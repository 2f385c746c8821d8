"""Under `torch.autocast` the MoBA ops follow SDPA's rule: every floating input but float64 is cast
to the autocast dtype, the result has that dtype. Models hand attention mixed dtypes there (RoPE in
fp32 makes q and k fp32 while v comes from a bf16 projection); before the rule, compiled training
under autocast failed in the dense kernel and eager calls computed in a precision the original
never used."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

import moba_rewrite as mr

BF16 = torch.bfloat16


def _mixed(seed=0, b=1, hq=4, hkv=2, t=32, d=16):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, t, d, generator=g)
    k = torch.randn(b, hkv, t, d, generator=g)
    v = torch.randn(b, hkv, t, d, generator=g).to(BF16)
    return q, k, v


@pytest.mark.parametrize("block_size", [8, 32])  # MoBA routing, and the dense limit
@pytest.mark.parametrize("grad", [False, True])
def test_op_under_autocast_equals_the_op_on_cast_inputs(block_size, grad):
    q, k, v = _mixed()
    q.requires_grad_(grad)
    kw = dict(block_size=block_size, top_k=2, enable_gqa=True)
    with torch.autocast("cpu", dtype=BF16):
        got = mr.moba_attention(q, k, v, **kw)
        via_op = torch.ops.moba.attention(q, k, v, None, block_size, 2, True, 0.25, "auto")
    want = mr.moba_attention(q.detach().to(BF16), k.to(BF16), v, **kw)
    assert got.dtype == BF16 == via_op.dtype
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    torch.testing.assert_close(via_op, mr.moba_attention(q.detach().to(BF16), k.to(BF16), v, scale=0.25, **kw),
                               atol=0, rtol=0)
    if grad:
        got.float().sum().backward()
        assert q.grad is not None and q.grad.dtype == torch.float32


def test_kv_cache_op_under_autocast_equals_the_op_on_cast_inputs():
    q, k, v = _mixed(t=40)
    means = mr.key_block_means(k, 8)
    pos = torch.tensor([39])
    with torch.autocast("cpu", dtype=BF16):
        got = mr.moba_attention_kv_cache(q[:, :, -1:], k, v, means, pos, block_size=8, top_k=2, enable_gqa=True)
    want = mr.moba_attention_kv_cache(q[:, :, -1:].to(BF16), k.to(BF16), v, means.to(BF16), pos, block_size=8,
                                      top_k=2, enable_gqa=True)
    assert got.dtype == BF16
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def _llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, attention_dropout=0.0)
    return transformers.LlamaForCausalLM(cfg)


@pytest.mark.parametrize("block_size", [8, 64])  # MoBA routing over 8 blocks, and the dense limit
def test_training_step_under_autocast_eager_and_compiled(block_size):
    """A rewritten Llama's training step under CPU autocast (bf16): the compiled step (Inductor)
    gives the eager step's loss and gradients; at the dense limit the logits are the original
    model's under the same autocast (both attend in bf16)."""
    base = _llama()
    ids = torch.randint(0, 128, (2, 64), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, -9:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    model = mr.rewrite(copy.deepcopy(base), {"version": 1, "defaults": {"block_size": block_size, "top_k": 2}}).train()

    def step(call):
        model.zero_grad()
        with torch.autocast("cpu", dtype=BF16):
            out = call(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False)
        out.loss.backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters()}

    torch._dynamo.reset()
    eager, grads = step(model)
    compiled, compiled_grads = step(torch.compile(model))
    torch._dynamo.reset()
    torch.testing.assert_close(compiled.loss, eager.loss, atol=2e-3, rtol=2e-3)
    for name, grad in grads.items():
        scale = grad.abs().max().clamp_min(1e-6)
        assert (compiled_grads[name] - grad).abs().max() / scale < 3e-2, name
    if block_size * 2 >= ids.shape[1]:
        with torch.no_grad(), torch.autocast("cpu", dtype=BF16):
            want = base.train()(input_ids=ids, attention_mask=mask).logits
            got = model(input_ids=ids, attention_mask=mask).logits
        real = mask.bool()
        torch.testing.assert_close(got[real].float(), want[real].float(), atol=3e-2, rtol=3e-2)
