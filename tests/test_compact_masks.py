"""Nothing O(T^2) on the model path: compact masks (HF mask interface, graph passes), walked in
the exported and compiled graphs of real transformers models, and float masks that carry a
bias (Falcon's ALiBi) kept dense.

Every graph is walked for a value with two dims equal to the (symbolic or concrete) sequence
length; outputs are checked against the eagerly rewritten model (itself checked against an
independent oracle in test_hf.py) or the original model.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers import masking_utils

import moba_rewrite as mr
from moba_rewrite import api
from moba_rewrite.dynamo_backend import MobaBackend
from moba_rewrite.exporters.pt2 import export_program
from moba_rewrite.integrations import hf, hf_masks

T = 48
POLICY = {"version": 1, "defaults": {"block_size": 8, "top_k": 2}}


def _model(family: str, seed: int = 0):
    torch.manual_seed(seed)
    common = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=256)
    cfg = {
        "llama": lambda: transformers.LlamaConfig(num_key_value_heads=2, **common),
        "qwen2": lambda: transformers.Qwen2Config(num_key_value_heads=2, **common),
        "phi3": lambda: transformers.Phi3Config(num_key_value_heads=2, pad_token_id=0, bos_token_id=1,
                                                eos_token_id=2, **common),
        "gpt_neox": lambda: transformers.GPTNeoXConfig(**common),
    }[family]()
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def _inputs():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 64, (2, T), generator=g)
    pad = torch.ones(2, T, dtype=torch.long)
    pad[1, :5] = 0
    return ids, pad


def square_values(gm: torch.fx.GraphModule, t) -> list[str]:
    """Nodes whose value has two dims equal to the sequence length `t` (an int or a SymInt)."""
    out = []
    for n in gm.graph.nodes:
        v = n.meta.get("val", n.meta.get("example_value"))
        if isinstance(v, torch.Tensor) and sum(str(s) == str(t) for s in v.shape) >= 2:
            out.append(f"{n.name}{tuple(v.shape)}")
    return out


def _seq_symbol(ep) -> object:
    return next(n.meta["val"].shape[1] for n in ep.graph.nodes
                if n.op == "placeholder" and n.meta["val"].dtype == torch.long)


def _capture(model, *args, **kwargs) -> list[torch.fx.GraphModule]:
    graphs = []
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, fullgraph=True, backend=lambda gm, ex: graphs.append(gm) or gm.forward)(*args, **kwargs)
    return graphs


# torch 2.11's export of these transformers models with a dynamic length fails in their own code,
# without moba-rewrite too ("Constraints violated (seq)! ... min(8*s, 16*s) == 8*s"); 2.13 exports them.
_UPSTREAM_EXPORT = pytest.mark.skipif(torch.__version__ < (2, 13), reason="torch < 2.13 cannot export the transformers model "
                                                                "with a dynamic length (without moba-rewrite too)")


@pytest.mark.parametrize("family,padded", [pytest.param("llama", True, marks=_UPSTREAM_EXPORT),
                                           pytest.param("phi3", False, marks=_UPSTREAM_EXPORT), ("gpt_neox", True)])
def test_graph_pass_export_has_no_square_value(family, padded):
    """mr.export (the graph pass on the original model): causal masks become causal=True plus
    the key mask, with a dynamic sequence length, and the README's call works (no cache)."""
    model = _model(family)
    ids, pad = _inputs()
    kwargs = {"input_ids": ids, **({"attention_mask": pad} if padded else {})}
    seq = torch.export.Dim("seq", min=2, max=256)
    shapes = {k: {1: seq} for k in kwargs}
    ep, report = mr.export_with_report(model, (), POLICY, kwargs=kwargs, dynamic_shapes=shapes)
    assert [r.decision for r in report] == ["moba", "moba"], str(report)
    assert all(r.mask_kind == ("causal+padding" if padded else "causal") for r in report)
    assert square_values(ep.graph_module, _seq_symbol(ep)) == []
    nodes = [n for n in ep.graph.nodes if n.target is torch.ops.moba.attention.default]
    assert [n.args[6] for n in nodes] == [True, True]  # causal=True
    expected = mr.rewrite(_model(family), POLICY)
    with torch.no_grad():
        want = expected(**kwargs, use_cache=False).logits
        got = ep.module()(**kwargs)
    rows = pad.bool() if padded else torch.ones_like(pad, dtype=torch.bool)
    torch.testing.assert_close(got.logits[rows], want[rows], atol=2e-5, rtol=1e-4)
    assert got.past_key_values is None


@pytest.mark.parametrize("family,padded", [("llama", True), ("qwen2", False)])
def test_rewritten_model_compiles_and_exports_without_square_values(family, padded):
    """The HF path: the moba mask functions hand compact masks under torch.compile (fullgraph)
    and torch.export (dynamic length), and to the pt2 exporter."""
    model = mr.rewrite(_model(family), POLICY)
    ids, pad = _inputs()
    kwargs = {"attention_mask": pad} if padded else {}
    with torch.no_grad():
        want = model(ids, **kwargs).logits
    for gm in _capture(model, ids, **kwargs):
        assert square_values(gm, T) == []
    if not padded:  # no cache, no mask: transformers would trace its packed-sequence [T, T] mask
        for gm in _capture(model, ids, use_cache=False):
            assert square_values(gm, T) == []

    class Call(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, ids, mask=None):
            return self.m(ids, attention_mask=mask).logits

    seq = torch.export.Dim("seq", min=2, max=256)
    args = (ids, pad) if padded else (ids,)
    ep = torch.export.export(Call(), args, dynamic_shapes=tuple({1: seq} for _ in args), strict=False)
    assert square_values(ep.graph_module, _seq_symbol(ep)) == []
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(*args), want, atol=2e-5, rtol=1e-4)
    if not padded:
        program = export_program(model, (ids[:1],), dynamic=True)
        assert square_values(program.graph_module, _seq_symbol(program)) == []


def test_mask_functions_compact_only_what_they_can_prove():
    model = mr.rewrite(_model("llama"), POLICY)
    cfg = model.config
    embeds = torch.zeros(2, T, 32)
    ids, pad = _inputs()
    assert cfg._attn_implementation == "moba_sdpa"
    assert masking_utils.create_causal_mask(cfg, embeds, None, None) is None
    compact = masking_utils.create_causal_mask(cfg, embeds, pad, None)
    assert compact.shape == (2, 1, 1, T) and hf_masks.compact_of(compact).padded
    assert torch.equal(compact[:, 0, 0], pad.bool())
    # Not provably causal AND key padding: the original mask, with the reason.
    full = masking_utils.create_causal_mask(cfg, embeds, pad, None, allow_is_causal_skip=False)
    assert full.shape == (2, 1, T, T) and "allow_is_causal_skip" in hf_masks.full_reason(full)
    windowed = transformers.MistralConfig(sliding_window=16)
    windowed._attn_implementation = "moba_sdpa"
    window = masking_utils.create_sliding_window_causal_mask(windowed, embeds, pad, None)
    assert window.shape == (2, 1, T, T) and hf_masks.full_reason(window) == "a sliding window"


def test_dense_sites_get_the_original_masks_bit_for_bit(monkeypatch):
    ids, pad = _inputs()
    seen: dict[str, list] = {"original": [], "rewritten": []}
    real = hf._dense_call

    def spy(origin, module, q, k, v, mask, *a, **kw):
        seen[spy.key].append(mask)
        return real(origin, module, q, k, v, mask, *a, **kw)

    monkeypatch.setattr(hf, "_dense_call", spy)
    for key, pol in (("original", {"defaults": {"mode": "dense"}}), ("rewritten", {**POLICY, "rules": [
            {"layers": -1, "mode": "dense"}]})):
        spy.key = key
        model = mr.rewrite(_model("llama"), pol)
        seen[key].clear()
        with torch.no_grad():
            model(ids, attention_mask=pad)
    # The dense layer of the hybrid model got exactly what the all-dense model's layers got.
    assert torch.equal(seen["rewritten"][-1], seen["original"][-1])


def _falcon(alibi: bool):
    torch.manual_seed(0)
    cfg = transformers.FalconConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                    alibi=alibi, new_decoder_architecture=False, multi_query=False,
                                    max_position_embeddings=256)
    return transformers.FalconForCausalLM(cfg).eval()


def test_falcon_alibi_in_the_mask_stays_dense_with_the_reason():
    ids, _ = _inputs()
    original = _falcon(alibi=True)
    with torch.no_grad():
        want = original(ids).logits
    model = mr.rewrite(_falcon(alibi=True), POLICY)
    report = model._moba_report
    assert [r.decision for r in report] == ["dense", "dense"]
    assert "ALiBi" in report[0].reason
    with torch.no_grad():
        assert torch.equal(model(ids).logits, want)
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        torch.testing.assert_close(compiled(ids).logits, want, atol=0, rtol=0)
    with pytest.raises(api.UnsupportedSiteError, match="ALiBi"):
        mr.rewrite(_falcon(alibi=True), {**POLICY, "defaults": {**POLICY["defaults"], "on_unsupported": "error"}})
    # Without ALiBi the same model is rewritten (the mask is kept full: Falcon builds on it).
    plain = mr.rewrite(_falcon(alibi=False), POLICY)._moba_report
    assert [r.decision for r in plain] == ["moba", "moba"] and "mask kept full" in plain[0].reason


def test_a_float_mask_is_read_per_call_when_traced():
    """A MoBA site fed a user's 4-D float mask: MoBA when it holds only 0 / -inf, the original
    attention when it carries a bias, decided per call inside one compiled graph."""
    ids, _ = _inputs()
    ids = ids[:1]
    model = mr.rewrite(_model("llama"), POLICY)
    original = _model("llama")
    cut = torch.ones(T, T, dtype=torch.bool).tril()
    visibility = torch.where(cut, 0.0, torch.finfo(torch.float32).min)[None, None]
    bias = visibility + torch.randn(1, 1, T, T, generator=torch.Generator().manual_seed(2)) * cut
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids, attention_mask=visibility).logits, model(ids).logits,
                                   atol=2e-5, rtol=1e-4)
        want = original(ids, attention_mask=bias).logits
        torch.testing.assert_close(compiled(ids, attention_mask=bias).logits, want, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(model(ids, attention_mask=bias).logits, want, atol=0, rtol=0)


def test_mr_compile_proves_the_packed_sequence_mask_of_a_cacheless_forward():
    """Without a cache or a 2-D mask, transformers traces the packed-sequence mask (position_ids
    restarts cannot be ruled out); the graph pass proves the model's own arange positions never
    restart and compacts it."""
    model = _model("llama")
    ids, _ = _inputs()
    graphs = []
    backend = MobaBackend(mr.load_policy(POLICY), inner=lambda gm, ex: graphs.append(gm) or gm.forward)
    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(model, backend=backend, fullgraph=True)(ids, use_cache=False).logits
        want = mr.rewrite(_model("llama"), POLICY)(ids).logits
    assert [r.decision for r in backend.report] == ["moba", "moba"]
    assert all(square_values(gm, T) == [] for gm in graphs)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_the_mask_proof_reads_comparisons_written_as_tensor_methods():
    """torch 2.11's Dynamo writes a tensor comparison in transformers' mask as the method `__eq__`
    (later ones: `operator.eq`); the proof reads both (under 2.11 it kept the [T, T] mask)."""
    import operator

    from passes import detect

    graphs = []
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(_model("llama"), backend=lambda gm, ex: graphs.append(gm) or gm.forward,
                      fullgraph=True)(_inputs()[0], use_cache=False)
    (gm,) = graphs
    methods = {operator.eq: "__eq__", operator.ne: "__ne__", operator.le: "__le__", operator.lt: "__lt__",
               operator.ge: "__ge__", operator.gt: "__gt__"}
    rewritten = 0
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in methods and isinstance(n.args[0], torch.fx.Node):
            n.op, n.target = "call_method", methods[n.target]
            rewritten += 1
    assert rewritten  # the comparisons this test is about are there
    gm.recompile()
    assert [f.compact is not None and f.compact.causal for f in detect.find_sites(gm)] == [True, True]


@pytest.mark.parametrize("form", ["sdpa_minmask", "hf_eager", "nanogpt", "gpt2_where"])
def test_graph_pass_compacts_handwritten_causal_masks(form):
    """Causal masks written by hand (arange comparisons, finfo.min, a tril buffer sliced to T)
    become causal=True with no mask, and the rewritten graph still equals the oracle."""
    from test_passes import expected, make, policy

    net, x = make(form)
    ep, report = mr.export_with_report(net, (x,), policy())
    assert [r.mask_kind for r in report] == ["causal", "causal"], str(report)
    nodes = [n for n in ep.graph.nodes if n.target is torch.ops.moba.attention.default]
    assert [(n.args[3], n.args[6]) for n in nodes] == [(None, True), (None, True)]
    assert not [n for n in ep.graph.nodes if n.op == "call_function"
                and getattr(n.meta.get("val"), "dtype", None) == torch.bool]  # the masks are gone
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x), expected(net, x, [0, 1]), atol=2e-5, rtol=1e-4)


def test_graph_pass_keeps_masks_it_cannot_prove():
    """A sliding window (two position comparisons) is not causal AND a key mask: kept full."""
    import torch.nn.functional as F

    class Window(torch.nn.Module):
        def forward(self, q, k, v):
            i = torch.arange(q.shape[2])
            mask = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - 12)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    q, k, v = (torch.randn(1, 2, 40, 8) for _ in range(3))
    ep, report = mr.export_with_report(Window(), (q, k, v), POLICY)
    (node,) = [n for n in ep.graph.nodes if n.target is torch.ops.moba.attention.default]
    assert node.args[3] is not None and node.args[6] is False
    i = torch.arange(40)
    mask = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - 12)
    want = reference_moba(q, k, v, mask)
    torch.testing.assert_close(ep.module()(q, k, v), want, atol=2e-5, rtol=1e-4)


def reference_moba(q, k, v, mask):
    from moba_rewrite.kernels import reference

    return reference.forward(q, k, v, block_size=8, top_k=2, causal=False, scale=8 ** -0.5, attn_mask=mask)


def test_tril_buffers_are_read_in_one_pass():
    """A constant `tril` buffer's diagonal, found from one row and checked once: every diagonal of
    several shapes (and leading dims) agrees with a search over all of them; other patterns give None."""
    from passes.mask_proof import _tril_diagonal

    for shape in [(1, 1), (3, 7), (7, 3), (5, 5), (2, 1, 4, 6)]:
        r, c = shape[-2:]
        ones = torch.ones(shape, dtype=torch.bool)
        for d in range(-r - 1, c + 2):
            t = ones.tril(d)
            first = next(e for e in range(-r, c + 1) if torch.equal(t, ones.tril(e)))
            assert torch.equal(ones.tril(_tril_diagonal(t)), t) and torch.equal(ones.tril(first), t), (shape, d)
        assert _tril_diagonal(ones.triu(1)) is None if r > 1 else True
        noisy = ones.tril(0).clone()
        noisy[..., -1, 0] = False
        assert _tril_diagonal(noisy) is None if r > 1 else True
    assert _tril_diagonal(torch.ones(3, 3, dtype=torch.bool).tril().flip(-1)) is None
