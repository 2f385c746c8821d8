"""The moba-rewrite command, in process (`main(argv)`): every input kind, every output format,
each compared with an independently rewritten in-memory model (and onnxruntime for ONNX);
every error case with its one-line message and exit code."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import moba_rewrite as mr
from moba_rewrite import cli
from moba_rewrite.exporters.common import sample_inputs
from test_checkpoints import TinyNet, ids, logits, make_gpt2, make_llama, save_hf, tree_digest

POLICY = {"version": 1, "defaults": {"mode": "moba", "block_size": 8, "top_k": 2},
          "rules": [{"name": "dense-tail", "layers": "-1:", "mode": "dense"}]}
POLICY_YAML = """version: 1
defaults: {mode: moba, block_size: 8, top_k: 2}
rules:
  - name: dense-tail
    layers: "-1:"
    mode: dense
"""


def run(argv, capsys) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def rewritten(builder):
    """The independent reference: a fresh model from the same seed, rewritten in memory."""
    return mr.rewrite(builder(), POLICY)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    save_hf(make_llama(), root / "llama")
    save_hf(make_gpt2(), root / "gpt2")
    (root / "policy.yaml").write_text(POLICY_YAML)
    return root


# --------------------------------------------------------------------------- help and inspect

@pytest.mark.parametrize("argv", [[], ["inspect"], ["policy"], ["policy", "init"], ["policy", "check"],
                                  ["policy", "schema"], ["rewrite"], ["demo"], ["bench"], ["routes"],
                                  ["generate"]])
def test_help_everywhere(argv, capsys):
    code, out, _ = run(argv + ["--help"], capsys)
    assert code == 0
    assert out.startswith("usage: moba-rewrite")


def test_usage_errors_exit_2(capsys):
    code, _, err = run([], capsys)
    assert code == cli.EXIT_USAGE and "moba-rewrite: error:" in err
    code, _, err = run(["rewrite", "x", "--policy", "p.yaml", "--out", "o", "--format", "zip"], capsys)
    assert code == cli.EXIT_USAGE and "invalid choice: 'zip'" in err


@pytest.mark.parametrize("fmt,name,suffix", [("aoti", "model.so", ".pt2"), ("pt2", "model", ".pt2"),
                                             ("onnx", "model.pt2", ".onnx"), ("aoti", "model.PT2", ".pt2")])
def test_out_suffix_the_format_cannot_use_is_refused_before_any_work(tmp_path, capsys, fmt, name, suffix):
    out = tmp_path / name
    # the checkpoint and policy do not exist: the name is checked before they are read
    code, _, err = run(["rewrite", tmp_path / "missing", "--policy", tmp_path / "missing.yaml", "--out", out,
                        "--format", fmt], capsys)
    assert code == cli.EXIT_VALUE, err
    assert err.strip() == f"moba-rewrite: error: {out}: expected a name ending in {suffix} for --format {fmt}, got " \
                          f"{repr(out.suffix) if out.suffix else 'no suffix'}"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("arch,heads,kv", [("llama", 4, 2), ("gpt2", 4, 4)])
def test_inspect(work, capsys, arch, heads, kv):
    code, out, _ = run(["inspect", work / arch, "--json", "--no-progress"], capsys)
    assert code == 0
    data = json.loads(out)
    assert data["kind"] == "hf" and data["parameters"] > 0
    assert [s["layer"] for s in data["sites"]] == [0, 1]
    assert all(s["heads"] == heads and s["kv_heads"] == kv and s["head_dim"] == 8 and s["causal"] for s in data["sites"])
    code, out, _ = run(["inspect", work / arch, "--no-progress"], capsys)
    assert code == 0 and "2 attention sites" in out and data["sites"][1]["name"] in out


# --------------------------------------------------------------------------- rewrite, every format

def test_rewrite_hf_llama(work, tmp_path, capsys):
    src = work / "llama"
    before = tree_digest(src)
    out = tmp_path / "llama-moba"
    code, stdout, err = run(["rewrite", src, "--policy", work / "policy.yaml", "--out", out, "--seq-len", 40], capsys)
    assert code == 0, err
    assert "verified" in stdout and "1 of 2 attention sites use MoBA" in stdout
    assert tree_digest(src) == before  # the input is never modified
    assert (out / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()  # weights untouched
    assert mr.load_policy(json.loads((out / "moba_policy.json").read_text())) == mr.load_policy(POLICY)
    model = mr.load(out)
    reference = rewritten(make_llama)
    x = ids(57, seed=5)
    assert torch.allclose(logits(model, x), logits(reference, x), atol=1e-5)
    assert not torch.allclose(logits(model, x), logits(make_llama(), x), atol=1e-3)  # MoBA is active
    assert [p.name for p in tmp_path.iterdir()] == ["llama-moba"]  # no temporary leftovers


def test_rewrite_pt2_dynamic_gpt2(work, tmp_path, capsys):
    out = tmp_path / "gpt2.pt2"
    code, _, err = run(["rewrite", work / "gpt2", "--policy", work / "policy.yaml", "--out", out, "--format", "pt2",
                        "--dynamic", "--seq-len", 40, "-q"], capsys)
    assert code == 0, err
    ep = mr.load(out)
    assert sum("moba.attention" in str(n.target) for n in ep.graph.nodes) == 1
    reference = rewritten(make_gpt2)
    for n in (40, 71):
        x = ids(n, seed=n)
        assert torch.allclose(ep.module()(x), logits(reference, x), atol=1e-5)


@pytest.mark.parametrize("body", ["sparse", "dense"])
def test_rewrite_onnx_gpt2_runs_in_onnxruntime(work, tmp_path, capsys, body):
    from moba_rewrite.exporters.onnx import DOMAIN, run_onnxruntime

    import onnx

    out = tmp_path / "gpt2.onnx"
    flags = [] if body == "sparse" else ["--onnx-body", "dense"]  # sparse is the default
    code, stdout, err = run(["rewrite", work / "gpt2", "--policy", work / "policy.yaml", "--out", out,
                             "--format", "onnx", "--dynamic", "--seq-len", 40, *flags], capsys)
    assert code == 0, err
    assert "verified" in stdout
    proto = onnx.load(str(out))
    assert sum(n.domain == DOMAIN for n in proto.graph.node) == 1  # layer 0 MoBA, layer 1 dense
    (function,) = [f for f in proto.functions if f.domain == DOMAIN]
    assert any(n.op_type == "ScatterND" for n in function.node) == (body == "sparse")
    reference = rewritten(make_gpt2)
    for n in (40, 66):
        x = ids(n, seed=n)
        got = torch.as_tensor(run_onnxruntime(out, [x])[0])
        assert torch.allclose(got, logits(reference, x), atol=1e-4)
    assert not torch.allclose(got, logits(make_gpt2(), x), atol=1e-3)  # MoBA is active


def test_rewrite_pt2_input_at_graph_level(work, tmp_path, capsys):
    from moba_rewrite.exporters.pt2 import export_program, save_pt2

    dense_pt2 = tmp_path / "dense.pt2"
    dense = make_llama()
    save_pt2(export_program(dense, sample_inputs(dense, 48)), dense_pt2)
    code, out, err = run(["inspect", dense_pt2, "--json", "--no-progress"], capsys)
    assert code == 0 and [s["name"] for s in json.loads(out)["sites"]] == [
        "model.layers.0.self_attn", "model.layers.1.self_attn"]
    out = tmp_path / "moba.pt2"
    code, _, err = run(["rewrite", dense_pt2, "--policy", work / "policy.yaml", "--out", out, "--format", "pt2", "-q"],
                       capsys)
    assert code == 0, err
    ep = mr.load(out)
    reference = rewritten(make_llama)
    x = ids(48, seed=2)
    assert torch.allclose(ep.module()(x), logits(reference, x), atol=1e-5)
    code, _, err = run(["rewrite", dense_pt2, "--policy", work / "policy.yaml", "--out", tmp_path / "x", "-q"], capsys)
    assert code == cli.EXIT_VALUE and "expected pt2, aoti or onnx for a .pt2 input" in err


def test_rewrite_safetensors_with_config_and_trusted_pickle(work, tmp_path, capsys):
    weights = tmp_path / "w.safetensors"
    shutil.copy(work / "llama" / "model.safetensors", weights)
    out = tmp_path / "from-st"
    code, _, err = run(["rewrite", weights, "--config", work / "llama" / "config.json", "--policy",
                        work / "policy.yaml", "--out", out, "--seq-len", 40, "-q"], capsys)
    assert code == 0, err
    x = ids(50, seed=9)
    assert torch.allclose(logits(mr.load(out), x), logits(rewritten(make_llama), x), atol=1e-5)

    torch.manual_seed(0)
    net = TinyNet().eval()
    torch.save(net, tmp_path / "net.pt")
    one_site = {"version": 1, "defaults": {"mode": "moba", "block_size": 8, "top_k": 2}}
    (tmp_path / "one.json").write_text(json.dumps(one_site))
    code, _, err = run(["rewrite", tmp_path / "net.pt", "--policy", tmp_path / "one.json", "--out",
                        tmp_path / "net.pt2", "--format", "pt2", "--seq-len", 40, "-q"], capsys)
    assert code == cli.EXIT_PICKLE and err.startswith(f"moba-rewrite: error: {tmp_path / 'net.pt'}: expected a tensors-only")
    code, _, err = run(["rewrite", tmp_path / "net.pt", "--trust-pickle", "--policy", tmp_path / "one.json", "--out",
                        tmp_path / "net.pt2", "--format", "pt2", "--seq-len", 40, "-q"], capsys)
    assert code == 0, err
    reference = mr.rewrite(torch.load(tmp_path / "net.pt", weights_only=False), one_site, net.example_inputs(40))
    x = ids(40, seed=4)
    got = mr.load(tmp_path / "net.pt2").module()(x)
    assert torch.allclose(got, reference(x), atol=1e-5)
    assert not torch.allclose(got, net(x), atol=1e-3)


# --------------------------------------------------------------------------- errors

def _corrupt(work: Path, tmp: Path, what: str) -> Path:
    d = tmp / "ck"
    shutil.copytree(work / "llama", d)
    cfg = json.loads((d / "config.json").read_text())
    if what == "json":
        (d / "config.json").write_text("{ not json")
    else:
        (d / "config.json").write_text(json.dumps({**cfg, "model_type": "frobnicator"}))
    return d


@pytest.mark.parametrize("case", ["missing", "corrupt", "unknown_arch", "bad_policy", "exists", "unwritable",
                                  "seq_below_block", "pickle"])
def test_rewrite_errors(work, tmp_path, capsys, case):
    ckpt, policy, out = work / "llama", work / "policy.yaml", tmp_path / "out"
    extra: list = []
    if case == "missing":
        ckpt = tmp_path / "nope"
        code, where, text = cli.EXIT_CHECKPOINT, ckpt, "no such file or directory"
    elif case == "corrupt":
        ckpt = _corrupt(work, tmp_path, "json")
        code, where, text = cli.EXIT_CHECKPOINT, ckpt / "config.json", "expected valid JSON"
    elif case == "unknown_arch":
        ckpt = _corrupt(work, tmp_path, "arch")
        code, where, text = cli.EXIT_ARCHITECTURE, ckpt / "config.json", "expected a model_type transformers can build"
    elif case == "bad_policy":
        policy = tmp_path / "bad.yaml"
        policy.write_text("version: 1\ndefaults:\n  top_k: 0\n")
        code, where, text = cli.EXIT_POLICY, f"{policy}:3 defaults.top_k", "expected an integer >= 1"
    elif case == "exists":
        out.mkdir()
        code, where, text = cli.EXIT_OUTPUT_EXISTS, out, "expected a path that does not exist yet (pass --force"
    elif case == "unwritable":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "out"
        code, where, text = cli.EXIT_OUTPUT_UNWRITABLE, out, "expected a writable location"
    elif case == "seq_below_block":
        extra = ["--seq-len", 5]
        code, where, text = cli.EXIT_VALUE, "--seq-len", "expected at least one MoBA block (8 tokens"
    else:
        torch.save(TinyNet(), tmp_path / "net.pt")
        ckpt = tmp_path / "net.pt"
        code, where, text = cli.EXIT_PICKLE, ckpt, "expected a tensors-only file"
    got, stdout, err = run(["rewrite", ckpt, "--policy", policy, "--out", out, "-q", *extra], capsys)
    assert got == code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"moba-rewrite: error: {where}: {text}"), lines[0]
    if case != "exists":
        assert not out.exists()


def test_verification_failure_writes_nothing(work, tmp_path, capsys, monkeypatch):
    from moba_rewrite.cli import artifacts

    real = artifacts.artifact_runner

    def off_by_one(fmt, path, dtype=None, display=None):
        run = real(fmt, path, dtype, display)
        return lambda args: run(args) + 1.0

    monkeypatch.setattr(artifacts, "artifact_runner", off_by_one)
    out = tmp_path / "x-moba"  # hf: a staged directory (cheaper than an export; the check is the same)
    code, _, err = run(["rewrite", work / "gpt2", "--policy", work / "policy.yaml", "--out", out, "--seq-len", 24,
                        "-q"], capsys)
    assert code == cli.EXIT_VERIFY
    assert err.startswith(f"moba-rewrite: error: {out}: expected the written artifact to reproduce")
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_force_replaces_output(work, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    code, _, err = run(["rewrite", work / "gpt2", "--policy", work / "policy.yaml", "--out", out, "--seq-len", 24,
                        "--force", "-q"], capsys)
    assert code == 0, err
    assert not (out / "stale.txt").exists() and (out / "moba_policy.json").is_file()
    assert [r.decision for r in mr.load(out)._moba_report.rows] == ["moba", "dense"]
    assert [p.name for p in tmp_path.iterdir()] == ["o"]


# --------------------------------------------------------------------------- policy, routes, bench

def test_policy_commands(work, tmp_path, capsys):
    code, out, _ = run(["policy", "schema"], capsys)
    assert code == 0 and json.loads(out) == mr.policy.policy_schema()
    starter = tmp_path / "starter.yaml"
    code, _, err = run(["policy", "init", work / "llama", "--out", starter, "--no-progress"], capsys)
    assert code == 0, err
    assert "model.layers.1.self_attn" in starter.read_text()
    mr.load_policy(starter)
    code, _, err = run(["policy", "init", work / "llama", "-o", starter], capsys)
    assert code == cli.EXIT_OUTPUT_EXISTS
    code, out, err = run(["policy", "check", work / "policy.yaml", "--model", work / "gpt2", "--json"], capsys)
    assert code == 0, err
    assert [s["decision"] for s in json.loads(out)["sites"]] == ["moba", "dense"]
    # The spelling: the checkpoint as a second positional argument.
    code, out_positional, err = run(["policy", "check", work / "policy.yaml", work / "gpt2", "--json"], capsys)
    assert code == 0 and json.loads(out_positional) == json.loads(out), err
    code, _, err = run(["policy", "check", work / "policy.yaml", work / "gpt2", "--model", work / "llama"], capsys)
    assert code == cli.EXIT_USAGE and "expected one checkpoint" in err
    bad = tmp_path / "bad.json"
    bad.write_text('{"version": 1, "defaults": {"mode": "sparse"}}')
    code, _, err = run(["policy", "check", bad], capsys)
    assert code == cli.EXIT_POLICY and err.startswith(f"moba-rewrite: error: {bad}") and "defaults.mode" in err
    # dense_below: a change of semantics, shown by `policy check`; a bad value is a located error.
    short = tmp_path / "short.yaml"
    short.write_text("version: 1\ndefaults:\n  block_size: 8\n  dense_below: 4096\n")
    code, out, err = run(["policy", "check", short, work / "gpt2"], capsys)
    assert code == 0, err
    assert "dense_below" in out and "full attention when Tk < 4096 (dense_below: a change of semantics)" in out
    short.write_text("version: 1\ndefaults:\n  block_size: 8\n  dense_below: -5\n")
    code, _, err = run(["policy", "check", short], capsys)
    assert code == cli.EXIT_POLICY
    assert err.strip() == f"moba-rewrite: error: {short}:4 defaults.dense_below: expected an integer >= 1, got -5"


def test_routes_picture_and_maps(work, tmp_path, capsys):
    from moba_rewrite import routes

    png = tmp_path / "routes.png"
    code, out, err = run(["routes", work / "llama", "--policy", work / "policy.yaml", "--out", png, "--seq-len", 40,
                          "--heads", 2], capsys)
    assert code == 0, err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "1 MoBA sites x 2 heads" in out
    model = rewritten(make_llama)
    calls = routes.capture(model, (ids(40),))
    assert [c.name for c in calls] == ["model.layers.0.self_attn"]
    m = routes.route_map(calls[0])  # [heads, query blocks, key blocks]
    assert m.shape == (4, 5, 5)
    # causal, no mask: query block i attends its own block plus min(top_k - 1, i) earlier ones
    assert torch.equal(m.sum(-1), torch.tensor([1.0, 2, 2, 2, 2]).expand(4, 5))
    assert torch.equal(torch.diagonal(m, dim1=1, dim2=2), torch.ones(4, 5))
    assert float(m.triu(1).abs().sum()) == 0.0


def test_bench_builtin_table(capsys):
    code, out, err = run(["bench", "--builtin", "--seq-lens", "64,128", "--quick", "--device", "cpu",
                          "--block-size", "16"], capsys)
    assert code == 0, err
    assert "sdpa ms" in out and "moba[torch] ms" in out and out.count("\n") >= 4
    code, _, err = run(["bench", "--seq-lens", "6x"], capsys)
    assert code == cli.EXIT_VALUE and err.startswith("moba-rewrite: error: --seq-lens: expected")


def test_bench_runs_the_project_benchmark(tmp_path, capsys, monkeypatch):
    """In a checkout, `bench` hands its flags to benchmarks/bench_attention.py (stubbed: it is slow)."""
    from moba_rewrite.cli import misc_cmd

    script = misc_cmd.bench_script()
    assert script is not None and script.name == "bench_attention.py"
    fake = tmp_path / "bench_attention.py"
    fake.write_text("import json\ndef main(argv):\n    print('ARGV', json.dumps(argv))\n    return 0\n")
    monkeypatch.setattr(misc_cmd, "bench_script", lambda: fake)
    code, out, _ = run(["bench", "--quick", "--device", "cpu", "--plot", tmp_path / "b.png"], capsys)
    assert code == 0
    argv = json.loads(out.split("ARGV", 1)[1])
    assert argv[:4] == ["--device", "cpu", "--seq-lens", "2048,4096"]
    assert argv[-2:] == ["--plot", str(tmp_path / "b.png")] and "--repeats" in argv


def test_rewrite_prints_each_warning_once(work, tmp_path, capsys):
    """A policy rule that matches no site is a warning of the report; the report's table ends with
    its warnings, and the command printed them a second time after it."""
    policy = tmp_path / "unmatched.yaml"
    policy.write_text(POLICY_YAML + """  - name: nowhere
    match: "no.such.module.*"
    mode: dense
""")
    code, out, err = run(["rewrite", work / "llama", "--policy", policy, "--format", "hf", "--out", tmp_path / "out"],
                         capsys)
    assert code == 0, err
    warnings = [line for line in out.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "matched no attention site" in warnings[0], out


def test_rewrite_a_vision_language_checkpoint(tmp_path, capsys):
    """Qwen2.5-VL keeps its vocabulary in its text config: the command's sample input read the top
    config and refused the checkpoint ("expected config.vocab_size >= 1"). Now it rewrites the text
    decoder, names the vision tower it did not reach in one warning, and the written model loads
    back equal to the in-memory rewrite."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import zoo_sweep
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    cfg = zoo_sweep.tiny_config(Qwen2_5_VLConfig)
    torch.manual_seed(0)
    Qwen2_5_VLForConditionalGeneration(cfg).save_pretrained(tmp_path / "vl")
    (tmp_path / "policy.yaml").write_text(POLICY_YAML)
    code, out, err = run(["rewrite", tmp_path / "vl", "--policy", tmp_path / "policy.yaml", "--format", "hf",
                          "--out", tmp_path / "out"], capsys)
    assert code == 0, err
    assert "model.language_model.layers.0.self_attn" in out and "verified" in out, out
    warnings = [line for line in out.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "Qwen2_5_VLVisionAttention x2" in warnings[0], out
