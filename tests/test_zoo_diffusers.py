"""Diffusion transformers from diffusers (tiny configs, random weights): their `Attention`
modules go through attention processors (`AttnProcessor2_0` calls SDPA itself; Wan's
processor calls diffusers' `dispatch_attention_fn`), so torch.fx cannot trace them and the
eager rewrite routes their SDPA calls at run time.

Expected from the models' definitions: image self attention (`attn1`) is MoBA, non-causal;
text cross attention (`attn2`: 16 or 32 image tokens attend 6 text tokens) stays dense, more
queries than keys. Checked eagerly against the oracle (`zoo_oracle`), at the dense limit,
under `torch.compile(fullgraph=True)`, through `mr.compile` and through `mr.export`.
"""

from __future__ import annotations

import diffusers  # the `test` extra installs it
import pytest
import torch

import moba_rewrite as mr
from moba_rewrite import api
from moba_rewrite.dynamo_backend import MobaBackend
from passes.rewrite import UnsupportedSiteError
from zoo_oracle import sdpa_oracle

BLOCK, TOP_K, DENSE_TOP_K = 4, 2, 8


def policy(top_k: int = TOP_K, **defaults) -> dict:
    return {"version": 1, "defaults": {"block_size": BLOCK, "top_k": top_k, **defaults}}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def pixart():
    torch.manual_seed(0)
    model = diffusers.PixArtTransformer2DModel(
        sample_size=8, num_layers=2, num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
        patch_size=2, cross_attention_dim=32, caption_channels=24, norm_type="ada_norm_single",
        use_additional_conditions=False).eval()
    inputs = {"hidden_states": torch.randn(1, 4, 8, 8, generator=_gen(1)),  # 16 image tokens
              "encoder_hidden_states": torch.randn(1, 6, 24, generator=_gen(2)), "timestep": torch.tensor([10])}
    return model, inputs, "transformer_blocks.{}.{}", "Tq=16 > Tk=6"


def wan():
    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=24, freq_dim=16, ffn_dim=64, num_layers=2, rope_max_seq_len=64).eval()
    inputs = {"hidden_states": torch.randn(1, 4, 2, 8, 8, generator=_gen(1)),  # 2 frames x 16: 32 tokens
              "encoder_hidden_states": torch.randn(1, 6, 24, generator=_gen(2)), "timestep": torch.tensor([10])}
    return model, inputs, "blocks.{}.{}", "Tq=32 > Tk=6"


def _out(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).sample


def _expected(fmt: str, cross: str) -> list[tuple[str, str, str]]:
    out = []
    for i in range(2):
        out += [(fmt.format(i, "attn1"), "moba", "defaults"), (fmt.format(i, "attn2"), "dense", cross)]
    return out


@pytest.mark.parametrize("build", [pixart, wan])
def test_dit_eager_rewrite(build):
    model, inputs, fmt, cross = build()
    original = _out(model, inputs)
    expect = _expected(fmt, cross)
    report = mr.plan(model, policy(), inputs)
    assert [(r.name, r.decision, r.causal) for r in report] == [(n, d, False) for n, d, _ in expect], str(report)
    assert all(why in r.reason for r, (_, _, why) in zip(report, expect)), str(report)
    with pytest.raises(UnsupportedSiteError, match="more queries than keys"):
        mr.plan(model, policy(on_unsupported="error"), inputs)

    mr.rewrite(model, policy(top_k=DENSE_TOP_K), inputs)
    torch.testing.assert_close(_out(model, inputs), original, atol=3e-5, rtol=1e-4)
    mr.rewrite(model, policy(), inputs)
    got = _out(model, inputs)
    moba = set(mr.report_of(model).moba_sites)
    assert moba == {n for n, d, _ in expect if d == "moba"}
    oracle_model, _, _, _ = build()
    with sdpa_oracle(oracle_model, moba, block=BLOCK, top_k=TOP_K):
        want = _out(oracle_model, inputs)
    assert (got - original).abs().max() > 1e-4
    torch.testing.assert_close(got, want, atol=3e-5, rtol=1e-4)
    if build is pixart:
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(_out(compiled, inputs), want, atol=3e-5, rtol=1e-4)


def test_dit_compile_and_export():
    model, inputs, fmt, cross = pixart()
    expect = [(n, d) for n, d, _ in _expected(fmt, cross)]
    oracle_model, _, _, _ = pixart()
    with sdpa_oracle(oracle_model, {n for n, d in expect if d == "moba"}, block=BLOCK, top_k=TOP_K):
        want = _out(oracle_model, inputs)

    ep, report = api.export_with_report(model, (), policy(), kwargs=inputs)
    assert [(r.name, r.decision) for r in report] == expect, str(report)
    assert cross in report[1].reason
    torch.testing.assert_close(ep.module()(**inputs).sample, want, atol=3e-5, rtol=1e-4)

    # mr.compile's pass (MobaBackend) with aot_eager instead of Inductor: the same rewrite, no C++ build.
    torch._dynamo.reset()
    sites = mr.find_sites(model, inputs)
    backend = MobaBackend(mr.load_policy(policy()), sites=sites, inner=torch._dynamo.lookup_backend("aot_eager"))
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    torch.testing.assert_close(_out(compiled, inputs), want, atol=3e-5, rtol=1e-4)
    assert [(r.name, r.decision) for r in backend.report] == expect, str(backend.report)
