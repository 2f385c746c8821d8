"""Reading checkpoints safely (every input kind, every refusal) and writing outputs atomically.

The builders at the top (`make_llama`, `make_gpt2`, `save_hf`, ...) are shared with the CLI
and export tests.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from moba_rewrite import checkpoints as ck

VOCAB = 96


# --------------------------------------------------------------------------- builders

def make_llama(layers: int = 2, seed: int = 0):
    """A tiny LlamaForCausalLM with GQA (4 query heads, 2 KV heads)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=0, eos_token_id=1, pad_token_id=None)
    return LlamaForCausalLM(cfg).eval()


def make_gpt2(layers: int = 2, seed: int = 0):
    """A tiny GPT2LMHeadModel (tied embeddings, no GQA, fused qkv projection)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_head=4, n_layer=layers, n_positions=256,
                     bos_token_id=0, eos_token_id=1)
    return GPT2LMHeadModel(cfg).eval()


def save_hf(model, directory: Path) -> Path:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model.save_pretrained(str(directory))
    return directory


def tree_digest(path: Path) -> dict[str, str]:
    """sha256 of every file under `path` (to prove an input was not modified)."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(f.relative_to(path.parent)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


def logits(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=x, use_cache=False).logits


class TinyNet(nn.Module):
    """A hand-written causal attention model (not Hugging Face) for pickle inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 32)
        self.qkv = nn.Linear(32, 96)
        self.out = nn.Linear(32, VOCAB)

    def forward(self, input_ids):
        x = self.emb(input_ids)
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, 4, 8).permute(2, 0, 3, 1, 4)
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, t, 32))

    def example_inputs(self, seq_len: int):
        return (torch.randint(0, VOCAB, (1, seq_len)),)


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("ck") / "llama"
    model = make_llama()
    save_hf(model, d)
    return d, model


# --------------------------------------------------------------------------- reading

def test_hf_directory_safetensors_and_bin(llama_dir, tmp_path):
    d, model = llama_dir
    x = ids(20)
    got = ck.read_checkpoint(d)
    assert got.kind == "hf" and got.is_hf
    assert torch.equal(logits(got.model, x), logits(model, x))
    # the same weights as pytorch_model.bin (read with weights_only=True)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shutil.copy(d / "config.json", bin_dir / "config.json")
    torch.save(model.state_dict(), bin_dir / "pytorch_model.bin")
    got = ck.read_checkpoint(bin_dir)
    assert got.kind == "hf" and torch.equal(logits(got.model, x), logits(model, x))


def test_safetensors_file_and_state_dict_with_config(llama_dir, tmp_path):
    d, model = llama_dir
    x = ids(20)
    got = ck.read_checkpoint(d / "model.safetensors")  # config.json found beside it
    assert got.kind == "safetensors" and torch.equal(logits(got.model, x), logits(model, x))
    lone = tmp_path / "weights.safetensors"
    shutil.copy(d / "model.safetensors", lone)
    with pytest.raises(ck.CorruptCheckpoint, match=r"weights\.safetensors: expected a config\.json beside"):
        ck.read_checkpoint(lone)
    got = ck.read_checkpoint(lone, config=d / "config.json")
    assert torch.equal(logits(got.model, x), logits(model, x))
    sd = tmp_path / "sd.pt"
    torch.save(model.state_dict(), sd)
    got = ck.read_checkpoint(sd, config=d / "config.json")
    assert got.kind == "state-dict" and torch.equal(logits(got.model, x), logits(model, x))


def test_pickled_module_refused_unless_trusted(tmp_path):
    net = TinyNet().eval()
    path = tmp_path / "net.pt"
    torch.save(net, path)
    with pytest.raises(ck.PickleRefused) as info:
        ck.read_checkpoint(path)
    assert info.value.exit_code == 9
    assert str(info.value).startswith(f"{path}: expected a tensors-only file")
    assert "arbitrary code" in str(info.value) and "--trust-pickle" in str(info.value)
    got = ck.read_checkpoint(path, trust_pickle=True)
    x = ids(12)
    assert got.kind == "pickle" and torch.equal(got.model(x), net(x))


@pytest.mark.parametrize("case", ["missing", "bad_json", "truncated_weights", "no_weights", "unknown_type",
                                  "remote_code", "bad_pt2", "bad_suffix"])
def test_read_errors_name_the_file_and_what_was_expected(llama_dir, tmp_path, case):
    d, _ = llama_dir
    target = tmp_path / "ck"
    if case != "missing" and case not in ("bad_pt2", "bad_suffix"):
        shutil.copytree(d, target)
    cfg = json.loads((d / "config.json").read_text())
    if case == "bad_json":
        (target / "config.json").write_text('{"model_type": "llama",')
        err, code, text = ck.CorruptCheckpoint, 3, f"{target / 'config.json'}: expected valid JSON"
    elif case == "missing":
        err, code, text = ck.CheckpointNotFound, 3, f"{target}: no such file or directory"
    elif case == "truncated_weights":
        w = target / "model.safetensors"
        w.write_bytes(w.read_bytes()[:100])
        err, code, text = ck.CorruptCheckpoint, 3, f"{w}: expected a readable safetensors file"
    elif case == "no_weights":
        (target / "model.safetensors").unlink()
        err, code, text = ck.CorruptCheckpoint, 3, f"{target}: expected weights beside config.json"
    elif case == "unknown_type":
        (target / "config.json").write_text(json.dumps({**cfg, "model_type": "frobnicator"}))
        err, code, text = (ck.UnknownArchitecture, 4,
                           f"{target / 'config.json'}: expected a model_type transformers can build locally, "
                           f"got 'frobnicator'")
    elif case == "remote_code":
        (target / "config.json").write_text(json.dumps({**cfg, "model_type": "custom-thing",
                                                         "auto_map": {"AutoConfig": "x.Config"}}))
        err, code, text = ck.UnknownArchitecture, 4, f"{target / 'config.json'}: model_type 'custom-thing' comes"
    elif case == "bad_pt2":
        target = tmp_path / "x.pt2"
        target.write_bytes(b"not a zip at all")
        err, code, text = ck.CorruptCheckpoint, 3, f"{target}: expected a .pt2 zip archive"
    else:
        target = tmp_path / "x.txt"
        target.write_text("hello")
        err, code, text = ck.CorruptCheckpoint, 3, f"{target}: expected a Hugging Face model directory"
    with pytest.raises(err) as info:
        ck.read_checkpoint(target)
    assert info.value.exit_code == code
    assert str(info.value).startswith(text)
    assert "\n" not in str(info.value)
    if case == "remote_code":
        assert "--trust-remote-code" in str(info.value)


# --------------------------------------------------------------------------- load()

def test_load_rewritten_hf_directory_and_pt2(llama_dir, tmp_path):
    import moba_rewrite as mr
    from moba_rewrite.exporters.common import sample_inputs
    from moba_rewrite.exporters.pt2 import export_program, save_pt2

    d, _ = llama_dir
    policy = {"version": 1, "defaults": {"mode": "moba", "block_size": 8, "top_k": 2},
              "rules": [{"layers": "-1:", "mode": "dense"}]}
    out = tmp_path / "moba"
    loaded = ck.read_checkpoint(d)
    with ck.atomic_output(out, directory=True, inputs=(d,)) as staging:
        ck.write_hf_checkpoint(staging, loaded, mr.load_policy(policy).to_dict(), {"format": "hf"})
    assert ck.detect_kind(out) == "moba-hf"
    x = ids(40, seed=3)
    reference = mr.rewrite(make_llama(), policy)
    model = mr.load(out)
    assert [r.decision for r in model._moba_report.rows] == ["moba", "dense"]
    assert torch.allclose(logits(model, x), logits(reference, x), atol=1e-5)
    assert not torch.allclose(logits(model, x), logits(make_llama(), x), atol=1e-3)  # MoBA is active
    # a .pt2 comes back as an ExportedProgram that runs the moba op
    program = export_program(model, sample_inputs(model, 40))
    save_pt2(program, tmp_path / "m.pt2")
    ep = mr.load(tmp_path / "m.pt2")
    assert isinstance(ep, torch.export.ExportedProgram)
    assert any("moba.attention" in str(n.target) for n in ep.graph.nodes)
    assert torch.allclose(ep.module()(x), logits(reference, x), atol=1e-5)


# --------------------------------------------------------------------------- writing

def test_atomic_output_refuses_replaces_and_cleans_up(tmp_path):
    out = tmp_path / "out.bin"
    out.write_text("old")
    with pytest.raises(ck.OutputExists) as info:
        with ck.atomic_output(out, directory=False) as tmp:
            tmp.write_text("new")
    assert info.value.exit_code == 6 and str(info.value).startswith(f"{out}: expected a path that does not exist")
    assert "--force" in str(info.value)
    # a failure inside the block leaves the old output and no temporary files
    with pytest.raises(RuntimeError):
        with ck.atomic_output(out, directory=False, force=True) as tmp:
            tmp.write_text("half")
            raise RuntimeError("export failed")
    assert out.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]
    with ck.atomic_output(out, directory=False, force=True) as tmp:
        assert tmp.parent.parent == tmp_path and not out.samefile(tmp.parent)
        tmp.write_text("new")
        assert out.read_text() == "old"  # nothing visible until complete
    assert out.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]
    d = tmp_path / "dir"
    with ck.atomic_output(d, directory=True) as tmp:
        (tmp / "a.txt").write_text("a")
    assert (d / "a.txt").read_text() == "a"


def test_output_unwritable_or_inside_input(llama_dir, tmp_path):
    d, _ = llama_dir
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ck.OutputNotWritable) as info:
        ck.check_output(blocker / "out")
    assert info.value.exit_code == 7 and str(info.value).startswith(f"{blocker / 'out'}: expected a writable location")
    with pytest.raises(ck.OutputNotWritable, match="outside the input"):
        ck.check_output(d / "sub", inputs=(d,))
    with pytest.raises(ck.OutputNotWritable, match="outside the input"):
        ck.check_output(d, force=True, inputs=(d,))
    before = tree_digest(d)
    assert tree_digest(d) == before
