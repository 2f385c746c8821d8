"""`mr.evaluate` and `mr.calibrate` against independent computations: KL, agreement and perplexity
recomputed from an independently rewritten model's logits; per-site MoBA error and kept mass
against the dense reference on the same q/k/v; passkey prompts built as documented; and a
hand-built model whose retrieval layer needs a block MoBA's gate cannot see, which calibration
must keep dense."""

from __future__ import annotations

import math
import string

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

import moba_rewrite as mr
from moba_rewrite.evaluation import passkey as pk
from moba_rewrite.evaluation import sites as site_measure
from moba_rewrite.evaluation.data import load_windows, read_ids_file, windows_of
from moba_rewrite.evaluation.errors import (BudgetError, DataFileError, DataTooShort, EvaluationError,
                                            NoTokenizer)
from moba_rewrite.evaluation.kl import kl_per_position
from moba_rewrite.kernels import reference
from test_checkpoints import VOCAB, make_gpt2, make_llama, save_hf

POLICY = {"version": 1, "defaults": {"mode": "moba", "block_size": 8, "top_k": 2},
          "rules": [{"layers": "-1:", "mode": "dense"}]}


def hf_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


# --------------------------------------------------------------------------- kl / ppl

@pytest.mark.parametrize("make", [make_llama, make_gpt2])
def test_kl_agreement_and_ppl_equal_an_independent_computation(make):
    data = torch.randint(0, VOCAB, (3 * 48 + 5,), generator=torch.Generator().manual_seed(3))
    result = mr.evaluate(make(), POLICY, seq_len=48, data=data, tasks=["kl", "ppl"], samples=3)
    original, rewritten = make(), mr.rewrite(make(), POLICY)  # independent: same seed, own rewrite
    kls, agree, nll_o, nll_r = [], [], [], []
    for window in data[: 3 * 48].view(3, 48):
        ids = window[None]
        p, q = hf_logits(original, ids)[0].double(), hf_logits(rewritten, ids)[0].double()
        kls.append(F.kl_div(q.log_softmax(-1), p.log_softmax(-1), log_target=True, reduction="none").sum(-1))
        agree.append(p.argmax(-1) == q.argmax(-1))
        nll_o.append(F.cross_entropy(p[:-1], window[1:], reduction="none"))
        nll_r.append(F.cross_entropy(q[:-1], window[1:], reduction="none"))
    kl = torch.cat(kls)
    assert result["policy_kl"]["mean"] == pytest.approx(float(kl.mean()), rel=1e-6, abs=1e-12)
    assert result["policy_kl"]["max"] == pytest.approx(float(kl.max()), rel=1e-6)
    assert result["policy_kl"]["mean"] > 1e-6  # MoBA really routes at 48 tokens with block 8, top-2
    assert result["top1_agreement"] == pytest.approx(float(torch.cat(agree).double().mean()))
    assert result["ppl"]["original"] == pytest.approx(math.exp(float(torch.cat(nll_o).mean())), rel=1e-9)
    assert result["ppl"]["rewritten"] == pytest.approx(math.exp(float(torch.cat(nll_r).mean())), rel=1e-9)
    assert result["data"]["windows"] == 3 and result["data"]["source"] == "tensor"
    # the first top_k * block_size positions attend every earlier block: identical there
    assert result["kl_by_position"][0]["mean"] < 1e-10


def test_dense_limit_policy_has_zero_kl_and_the_original_is_untouched():
    model = make_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dense_limit = {"version": 1, "defaults": {"mode": "moba", "block_size": 16, "top_k": 3}}  # 48 >= 40 tokens
    result = mr.evaluate(model, dense_limit, seq_len=40, tasks=["kl"], samples=1)
    assert result["policy_kl"]["max"] < 1e-9 and result["top1_agreement"] == 1.0
    assert any("MoBA equals dense" in n for n in result["notes"])
    assert any("random token ids" in n for n in result["notes"])  # no data: said so
    assert not hasattr(model, "_moba_report") and model.config._attn_implementation == "sdpa"
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_kl_per_position_is_kl_divergence():
    p, q = torch.randn(5, 11), torch.randn(5, 11)
    expected = (p.softmax(-1) * (p.log_softmax(-1) - q.log_softmax(-1))).sum(-1)
    assert torch.allclose(kl_per_position(p, q).float(), expected, atol=1e-6)
    assert torch.all(kl_per_position(p, p) < 1e-12)


# --------------------------------------------------------------------------- sites

@pytest.mark.parametrize("case", ["causal_gqa", "bool_mask_chunked", "non_causal_padding", "float_mask"])
def test_site_measure_matches_the_dense_reference(case, monkeypatch):
    g = torch.Generator().manual_seed(1)
    b, hq, hkv, t, d = 2, 4, 2, 37, 8
    q, k, v = (torch.randn(b, h, t, d, generator=g) for h in (hq, hkv, hkv))
    causal, mask = True, None
    if case == "bool_mask_chunked":  # HF's form: a boolean causal mask with causal=False
        monkeypatch.setattr(site_measure, "CHUNK_BYTES", 4 * b * hq * t * 5)  # 5 query rows per chunk
        causal, mask = False, torch.ones(t, t, dtype=torch.bool).tril()[None, None].expand(b, 1, t, t).clone()
        mask[1, :, :, :3] = False  # padding on the left of the second sequence
        mask[1, :, :3, 0] = True  # ...whose first rows would otherwise see nothing
    elif case == "non_causal_padding":
        causal, mask = False, torch.ones(b, 1, 1, t, dtype=torch.bool)
        mask[0, ..., -5:] = False
    elif case == "float_mask":
        monkeypatch.setattr(site_measure, "CHUNK_BYTES", 4 * b * hq * t * 7)
        mask = torch.zeros(t, t).masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
        mask[:, 5] = float("-inf")  # one key hidden from everyone
    configs = [(4, 2), (8, 3), (5, 1)]
    stats: dict = {}
    site_measure.measure_call(q, k, v, mask, causal, d ** -0.5, configs, stats)
    dense = reference.forward(q, k, v, block_size=t, top_k=1, causal=causal, scale=d ** -0.5, attn_mask=mask)
    probs = reference.attention_probs(q, k, block_size=t, top_k=1, causal=causal, scale=d ** -0.5, attn_mask=mask)
    for bs, top_k in configs:
        moba = reference.forward(q, k, v, block_size=bs, top_k=top_k, causal=causal, scale=d ** -0.5, attn_mask=mask)
        err = float((moba - dense).norm() / dense.norm())
        selected = reference.block_selection(q, k, block_size=bs, top_k=top_k, causal=causal, attn_mask=mask)
        allowed = selected[..., torch.arange(t) // bs]
        rows = probs.sum(-1) > 0
        kept = (probs * allowed).sum(-1)[rows].mean()
        density = float(((probs > 0) & allowed).sum() / (probs > 0).sum())
        got = stats[(bs, top_k)]
        assert got.out_rel_err == pytest.approx(err, rel=1e-4, abs=1e-6), (bs, top_k)
        assert got.kept_mass == pytest.approx(float(kept), rel=1e-5)
        assert got.density == pytest.approx(density, rel=1e-6)
        assert 0 < got.out_rel_err and got.kept_mass < 1


@pytest.mark.parametrize("make", [make_llama, make_gpt2])
def test_capture_policy_computes_the_original_attention(make):
    """The capture forward is the dense forward: same logits as the original model."""
    ids = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(5))
    capture = mr.rewrite(make(), site_measure.capture_policy(2, base=41))
    assert [r.decision for r in capture._moba_report.rows] == ["moba", "moba"]
    assert torch.allclose(hf_logits(capture, ids), hf_logits(make(), ids), atol=1e-5)


def test_evaluate_a_checkpoint_path_with_its_stored_policy(tmp_path):
    from moba_rewrite import checkpoints as ck

    save_hf(make_llama(), tmp_path / "dense")
    (tmp_path / "moba").mkdir()
    ck.write_hf_checkpoint(tmp_path / "moba", ck.read_checkpoint(tmp_path / "dense"), POLICY, {})
    result = mr.evaluate(tmp_path / "moba", seq_len=40, tasks=["kl"], samples=1)
    assert result["model"] == "moba" and mr.load_policy(result["policy"]) == mr.load_policy(POLICY)
    assert result["policy_kl"]["mean"] > 0
    with pytest.raises(EvaluationError, match="expected a policy"):
        mr.evaluate(tmp_path / "dense", seq_len=40, tasks=["kl"], samples=1)


def test_sites_task_on_a_hf_model_matches_the_reference_on_its_own_qkv():
    """The capture forward is dense (same logits), sees each MoBA site once per window, and its
    error for layer 0 equals the reference's on layer 0's q/k/v taken from the model by hand."""
    model = make_llama()
    ids = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(2))
    result = mr.evaluate(model, POLICY, seq_len=40, data=ids, tasks=["sites"], samples=1)
    rows = {s["layer"]: s for s in result["sites"]}
    assert rows[1]["decision"] == "dense" and rows[1]["out_rel_err"] == 0.0 and not rows[1]["measured"]
    assert rows[0]["measured"] and rows[0]["calls"] == 1
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        h = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids))
        shape = (1, 40, -1, attn.head_dim)
        q = attn.q_proj(h).view(shape).transpose(1, 2)
        k = attn.k_proj(h).view(shape).transpose(1, 2)
        v = attn.v_proj(h).view(shape).transpose(1, 2)
        cos, sin = model.model.rotary_emb(h, torch.arange(40)[None])
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
    args = dict(causal=True, scale=attn.scaling, attn_mask=None)
    dense = reference.forward(q, k, v, block_size=40, top_k=1, **args)
    moba = reference.forward(q, k, v, block_size=8, top_k=2, **args)
    assert rows[0]["out_rel_err"] == pytest.approx(float((moba - dense).norm() / dense.norm()), rel=1e-4)


# --------------------------------------------------------------------------- calibration

class _Attention(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


class RetrievalToy(nn.Module):
    """Three causal attention layers (a hand-built language model, not Hugging Face).

    Layers 0 and 2 are local: q = k = a position code whose dot product falls with distance,
    so attention stays within a few tokens. Layer 1 is a retrieval head: every query looks for
    the marker token at position 0 (key 10 against 2 for ordinary tokens, so dense attention
    reads it), but the rest of the marker's block holds "low" tokens (key -1), so the block's
    mean key -- MoBA's gate -- ranks it last: MoBA cannot find the block it needs.
    """

    V, MARK = 32, 0

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.layers = nn.ModuleList([_Attention() for _ in range(3)])
        values = torch.randn(self.V, 8, generator=g) * 0.1
        values[self.MARK, 0] = 5.0
        self.register_buffer("values", values)
        self.register_buffer("unembed", torch.randn(8, self.V, generator=g))

    def qkv(self, ids):
        b, t = ids.shape
        angle = torch.arange(t, dtype=torch.float32) * (math.pi / 512)
        local = F.pad(torch.stack([angle.cos(), angle.sin()], -1) * math.sqrt(80.0), (0, 6)).expand(b, 1, t, 8)
        key = torch.where(ids == self.MARK, 10.0, torch.where(ids < 8, -1.0, 2.0))[:, None, :, None]
        query = torch.full((b, 1, t, 1), 2.0)
        v = self.values[ids][:, None]
        return [(local, local, v), (F.pad(query, (0, 7)), F.pad(key, (0, 7)), v), (local, local, v)]

    def forward(self, ids):
        out = self.values[ids]
        for layer, (q, k, v) in zip(self.layers, self.qkv(ids)):
            out = out + layer(q, k, v)[:, 0]
        return out @ self.unembed

    def example_inputs(self, seq_len):
        ids = torch.randint(8, self.V, (1, seq_len))
        ids[0, 1:64] = torch.randint(1, 8, (63,))
        ids[0, 0] = self.MARK
        return (ids,)


GRID = {"block_size": [16, 32], "top_k": [2, 3]}


def test_calibrate_keeps_the_retrieval_layer_dense():
    toy = RetrievalToy()
    by_count = mr.calibrate(toy, seq_len=256, dense_layers=1, grid=GRID, samples=2)
    assert [s.choice is None for s in by_count.sites] == [False, True, False]
    assert by_count.sites[1].sensitivity > 5 * max(by_count.sites[0].sensitivity, by_count.sites[2].sensitivity)
    by_kl = mr.calibrate(toy, seq_len=256, max_kl=0.01, grid=GRID, samples=2)
    assert [s.choice is None for s in by_kl.sites] == [False, True, False]
    assert by_kl.check["policy_kl"]["mean"] <= 0.01 and by_kl.check["moba_sites"] == 2
    # within the budget, the local layers go sparser than with the dense-layers budget
    assert by_kl.sites[0].stats[by_kl.sites[0].choice].density < by_count.sites[0].stats[by_count.sites[0].choice].density
    # the written policy is the chosen one, and its comments carry the measurements
    text = by_kl.to_yaml()
    policy = mr.load_policy(yaml.safe_load(text))
    decisions, _ = policy.decide_all(mr.find_sites(toy, toy.example_inputs(64)))
    assert [d.mode for d in decisions] == ["moba", "dense", "moba"]
    assert [(d.block_size, d.top_k) for d in decisions if d.mode == "moba"] == [by_kl.sites[0].choice] * 2
    comments = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    assert f"{by_kl.sites[1].stats[(16, 2)].out_rel_err:.3f}" in comments and "--max-kl 0.01" in comments
    assert "RetrievalToy.example_inputs" in comments and "256 tokens" in comments
    # the end-to-end check is the kl task: the same number mr.evaluate reports for that policy
    again = mr.evaluate(toy, by_kl.policy, seq_len=256, tasks=["kl"], samples=2)
    assert again["policy_kl"]["mean"] == pytest.approx(by_kl.check["policy_kl"]["mean"], rel=1e-6)


def test_calibration_budgets_that_cannot_be_met():
    toy = RetrievalToy()
    with pytest.raises(BudgetError, match="leaves no MoBA site"):
        mr.calibrate(toy, seq_len=128, dense_layers=3, grid=GRID, samples=1)
    with pytest.raises(BudgetError, match="already gives mean KL"):
        mr.calibrate(toy, seq_len=128, max_kl=0.0, grid={"block_size": [16], "top_k": [2]}, samples=1)
    with pytest.raises(BudgetError, match="top_k x block_size < --seq-len"):
        mr.calibrate(toy, seq_len=64, dense_layers=0, grid={"block_size": [32], "top_k": [2, 3]}, samples=1)
    with pytest.raises(BudgetError, match="exactly one budget"):
        mr.calibrate(toy, seq_len=64, dense_layers=1, max_kl=0.1, samples=1)


# --------------------------------------------------------------------------- passkey

def test_ids_passkey_prompt_layout_and_scoring():
    s = pk.ids_sample(64, 100, 0.5, key_len=4, generator=torch.Generator().manual_seed(0))
    ids = s.input_ids
    assert ids.numel() == 100 and s.answer_start == 96
    mark = 63
    assert ids[s.needle_pos] == mark and ids[95] == mark and (ids == mark).sum() == 2
    assert torch.equal(ids[s.needle_pos + 1:s.needle_pos + 5], ids[96:])  # the answer is the needle's key
    assert s.needle_pos == round(0.5 * (100 - 10))
    assert all(32 + 7 * j <= int(ids[96 + j]) < 32 + 7 * (j + 1) for j in range(4))  # one slice per key token
    oracle = F.one_hot(torch.cat([ids[1:], ids[:1]]), 64).float()  # predicts every next token
    assert pk.retrieved(oracle, s)
    oracle[97, :] = 0
    oracle[97, 0] = 1  # one wrong answer token fails the whole key
    assert not pk.retrieved(oracle, s)
    again = pk.samples(100, [0.0, 1.0], 2, vocab_size=64, seed=0)
    assert torch.equal(again[1][0].input_ids, pk.samples(100, [0.0, 1.0], 2, vocab_size=64, seed=0)[1][0].input_ids)
    assert again[0][0].needle_pos == 0 and again[1][0].needle_pos == 100 - 10


def char_tokenizer():
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = ["<unk>", "<s>"] + list(string.ascii_letters + string.digits + " .,?!'")
    tok = Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>")


def test_text_passkey_prompt():
    tok = char_tokenizer()
    s = pk.text_sample(tok, 300, 0.25, generator=torch.Generator().manual_seed(4))
    def text_of(ids):  # a character-level tokenizer: decode by joining its tokens
        return "".join(tok.convert_ids_to_tokens(ids.tolist()))

    text = text_of(s.input_ids[1:])
    assert s.input_ids.numel() == 300 and s.input_ids[0] == tok.bos_token_id
    key = text_of(s.input_ids[s.answer_start:]).strip()
    assert len(key) == 5 and key.isdigit()
    assert f"The pass key is {key}. Remember it." in text and text.endswith(f"What is the pass key? The pass key is {key}")
    with pytest.raises(DataTooShort, match="--passkey-lengths"):
        pk.text_sample(tok, 60, 0.5)


def test_passkey_on_random_weights_says_it_means_nothing():
    result = mr.evaluate(make_llama(), POLICY, seq_len=48, tasks=["passkey"], samples=1,
                         passkey_depths=[0.0, 1.0])
    p = result["passkey"]
    assert len(p["original"]) == 1 and len(p["original"][0]) == 2 and not p["meaningful"]
    assert any("cannot show what MoBA costs" in n for n in result["notes"])


# --------------------------------------------------------------------------- data

def test_windows_and_data_errors(tmp_path):
    ids = tmp_path / "a.ids"
    ids.write_text("1 2 3\n4 5\n6 7 8 9 10\n")
    assert read_ids_file(ids, 96) == list(range(1, 11))
    assert windows_of(list(range(10)), 3, 2, "x").tolist() == [[0, 1, 2], [3, 4, 5]]
    w = load_windows(seq_len=4, samples=5, data=[ids])
    assert w.ids.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]] and "holds 2 window(s)" in w.notes[0]
    (tmp_path / "bad.ids").write_text("1 2\n3 x\n")
    with pytest.raises(DataFileError, match=r"bad.ids:2: expected whitespace-separated integer token ids"):
        load_windows(seq_len=2, samples=1, data=[tmp_path / "bad.ids"])
    with pytest.raises(DataFileError, match=r"expected token ids in \[0, 8\)"):
        load_windows(seq_len=2, samples=1, data=[ids], vocab_size=8)
    with pytest.raises(DataFileError, match="does not exist") as exc:
        load_windows(seq_len=2, samples=1, data=[tmp_path / "missing.ids"])
    assert exc.value.exit_code == 3
    with pytest.raises(DataTooShort, match="expected at least --seq-len 11 tokens, got 10") as exc:
        load_windows(seq_len=11, samples=1, data=[ids])
    assert exc.value.exit_code == 8
    (tmp_path / "t.txt").write_text("some text")
    with pytest.raises(NoTokenizer, match="expected a checkpoint with a tokenizer"):
        load_windows(seq_len=2, samples=1, data=[tmp_path / "t.txt"])
    with pytest.raises(NoTokenizer, match="--prompt"):
        load_windows(seq_len=2, samples=1, prompt="hello")
    tok = char_tokenizer()
    w = load_windows(seq_len=4, samples=9, prompt="Hi there.", tokenizer=tok)
    assert w.ids.tolist() == [tok("Hi there.")["input_ids"][:8][i:i + 4] for i in (0, 4)]
    with pytest.raises(EvaluationError, match="--tasks"):
        mr.evaluate(make_llama(), POLICY, seq_len=32, tasks=["bleu"])
    with pytest.raises(EvaluationError, match="at most the model's 256 positions"):
        mr.evaluate(make_llama(), POLICY, seq_len=300, tasks=["kl"])


def test_dense_layers_is_exact_when_sites_tie():
    """Layers 0 and 2 of the toy are the same local head (equal errors): K=2 keeps exactly two dense."""
    result = mr.calibrate(RetrievalToy(), seq_len=128, dense_layers=2, grid={"block_size": [16], "top_k": [2]},
                          samples=1)
    assert [s.choice is None for s in result.sites] == [True, True, False]
    assert result.check["moba_sites"] == 1
