"""The `eval` and `calibrate` commands in process (`main(argv)`): files written, numbers equal to
the library's on the same inputs, and every bad input as a one-line error with its exit code."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

import moba_rewrite as mr
from moba_rewrite import cli
from test_checkpoints import VOCAB, make_llama, save_hf
from test_evaluation import char_tokenizer

POLICY_YAML = """version: 1
defaults: {mode: moba, block_size: 8, top_k: 2}
rules:
  - layers: "-1:"
    mode: dense
"""


def run(argv, capsys) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    save_hf(make_llama(), root / "llama")
    save_hf(make_llama(), root / "llama-tok")
    char_tokenizer().save_pretrained(str(root / "llama-tok"))
    (root / "policy.yaml").write_text(POLICY_YAML)
    ids = torch.randint(0, VOCAB, (200,), generator=torch.Generator().manual_seed(7))
    (root / "data.ids").write_text("\n".join(" ".join(map(str, row)) for row in ids.view(20, 10).tolist()) + "\n")
    return root


@pytest.mark.parametrize("command", ["eval", "calibrate"])
def test_help(command, capsys):
    code, out, _ = run([command, "--help"], capsys)
    assert code == 0 and out.startswith(f"usage: moba-rewrite {command}")


def test_eval_writes_table_json_and_plot(work, tmp_path, capsys):
    out_json, out_png = tmp_path / "e.json", tmp_path / "e.png"
    code, out, err = run(["eval", work / "llama", "--policy", work / "policy.yaml", "--seq-len", 48, "--data",
                          work / "data.ids", "--samples", 2, "--tasks", "kl,ppl,sites", "--json", out_json,
                          "--plot", out_png, "--no-progress"], capsys)
    assert code == 0, err
    doc = json.loads(out_json.read_text())
    assert set(doc["policy_kl"]) >= {"mean", "max"} and 0 < doc["top1_agreement"] <= 1
    assert [set(s) >= {"name", "layer", "out_rel_err", "kept_mass"} for s in doc["sites"]] == [True, True]
    assert doc["data"]["source"] == "files" and doc["data"]["windows"] == 2 and doc["data"]["tokens"] == 200
    assert "KL(original || rewritten)" in out and "model.layers.0.self_attn" in out
    assert out_png.read_bytes()[:4] == b"\x89PNG"
    ids = torch.tensor([int(x) for x in (work / "data.ids").read_text().split()])
    lib = mr.evaluate(make_llama(), POLICY_YAML and yaml.safe_load(POLICY_YAML), seq_len=48, data=ids,
                      tasks=["kl"], samples=2)
    assert doc["policy_kl"]["mean"] == pytest.approx(lib["policy_kl"]["mean"], rel=1e-9)


def test_eval_with_a_tokenizer_text_and_passkey(work, tmp_path, capsys):
    code, out, err = run(["eval", work / "llama-tok", "--policy", work / "policy.yaml", "--seq-len", 16,
                          "--prompt", "The grass is green. The sky is blue.", "--tasks", "kl,passkey",
                          "--passkey-lengths", 180, "--passkey-depths", "0,1", "--samples", 2, "--json", "-"], capsys)
    assert code == 0, err
    doc = json.loads(out)
    assert doc["data"]["source"] == "prompt" and doc["data"]["windows"] == 2
    assert doc["passkey"]["format"].startswith("text") and doc["passkey"]["lengths"] == [180]
    short = tmp_path / "short.txt"
    short.write_text("too short")
    code, _, err = run(["eval", work / "llama-tok", "--policy", work / "policy.yaml", "--seq-len", 16,
                        "--data", short, "--tasks", "kl"], capsys)
    assert code == cli.EXIT_VALUE and err.count("\n") == 1
    assert "expected at least --seq-len 16 tokens, got 9" in err


def test_eval_uses_the_policy_stored_by_rewrite(work, tmp_path, capsys):
    out_dir = tmp_path / "llama-moba"
    code, _, err = run(["rewrite", work / "llama", "--policy", work / "policy.yaml", "--out", out_dir,
                        "--no-verify", "-q"], capsys)
    assert code == 0, err
    code, out, err = run(["eval", out_dir, "--seq-len", 40, "--tasks", "kl", "--json", "-"], capsys)
    assert code == 0, err
    assert mr.load_policy(json.loads(out)["policy"]) == mr.load_policy(yaml.safe_load(POLICY_YAML))


@pytest.mark.parametrize("argv,code,message", [
    (["--data", "{w}/missing.ids"], cli.EXIT_CHECKPOINT, "missing.ids: expected a data file"),
    (["--prompt", "hello there"], cli.EXIT_VALUE, "--prompt: expected a checkpoint with a tokenizer"),
    (["--tasks", "kl,bleu"], cli.EXIT_USAGE, "--tasks: expected a comma-separated subset"),
    (["--seq-len", 999], cli.EXIT_VALUE, "expected at most the model's 256 positions"),
    (["--json", "{w}/policy.yaml"], cli.EXIT_OUTPUT_EXISTS, "pass --force"),
    (["--passkey-depths", "0,2"], cli.EXIT_USAGE, "--passkey-depths: expected depths between 0 and 1"),
])
def test_eval_errors(work, capsys, argv, code, message):
    base = ["eval", work / "llama", "--policy", work / "policy.yaml", "--seq-len", 32, "--no-progress"]
    argv = [str(a).format(w=work) for a in argv]
    if "--seq-len" in argv:
        base = base[:4] + base[6:]
    got, _, err = run(base + argv, capsys)
    assert got == code, err
    assert err.startswith("moba-rewrite: error: ") and err.count("\n") == 1 and message in err


def test_eval_without_a_policy_on_a_plain_checkpoint(work, capsys):
    code, _, err = run(["eval", work / "llama", "--seq-len", 32], capsys)
    assert code == cli.EXIT_USAGE and "--policy: expected a policy file" in err


def test_calibrate_writes_a_commented_policy(work, tmp_path, capsys):
    out, js = tmp_path / "cal.yaml", tmp_path / "cal.json"
    code, stdout, err = run(["calibrate", work / "llama", "--seq-len", 48, "--dense-layers", 1, "--grid",
                             "block_size=8", "top_k=2,3", "--samples", 1, "--out", out, "--json", js,
                             "--no-progress"], capsys)
    assert code == 0, err
    text = out.read_text()
    policy = mr.load_policy(yaml.safe_load(text))
    decisions, _ = policy.decide_all(mr.find_sites(make_llama()))
    assert sorted(d.mode for d in decisions) == ["dense", "moba"]
    measured = json.loads(js.read_text())
    dense_layer = next(s for s in measured["sites"] if s["choice"] == "dense")
    other = next(s for s in measured["sites"] if s["choice"] != "dense")
    assert dense_layer["sensitivity"] >= other["sensitivity"]  # the most sensitive site is the dense one
    assert text.startswith("# MoBA policy written by `moba-rewrite calibrate`")
    assert "b8/k2" in text and "48 tokens" in text and "random token ids" in text
    assert f"wrote {out}" in stdout


@pytest.mark.parametrize("argv,code,message", [
    (["--dense-layers", 2], cli.EXIT_VALUE, "--dense-layers: expected fewer than the 2 site(s)"),
    (["--dense-layers", 1, "--max-kl", 0.1], cli.EXIT_USAGE, "not allowed with argument"),
    ([], cli.EXIT_USAGE, "one of the arguments --dense-layers --max-kl is required"),
    (["--max-kl", -1], cli.EXIT_USAGE, "expected a KL bound >= 0"),
    (["--dense-layers", 0, "--grid", "block_size=64"], cli.EXIT_VALUE, "--grid: expected grid points with top_k"),
    (["--dense-layers", 0, "--grid", "blocks=8"], cli.EXIT_USAGE, "--grid: expected block_size=N,N"),
    (["--dense-layers", 0, "--out", "{t}/p.json"], cli.EXIT_VALUE, "--out: expected a .yaml or .yml path"),
])
def test_calibrate_errors(work, tmp_path, capsys, argv, code, message):
    argv = [str(a).format(t=tmp_path) for a in argv]
    out = [] if "--out" in argv else ["--out", tmp_path / "p.yaml"]
    got, _, err = run(["calibrate", work / "llama", "--seq-len", 48, "--samples", 1, "--grid", "block_size=8",
                       "top_k=2", *out, *argv], capsys)
    assert got == code, err
    last = err.strip().splitlines()[-1]  # argparse errors print the usage first
    assert last.startswith("moba-rewrite: error: ") and message in last
    assert not (tmp_path / "p.yaml").exists()
