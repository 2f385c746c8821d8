"""`moba-rewrite demo` runs end to end (in process, a 256-token prompt: 4 blocks of 64, so MoBA
routes) and its artifacts hold up: the rewritten checkpoint and the .pt2 program reproduce the
MoBA model at another length."""

from __future__ import annotations

import torch

import moba_rewrite as mr
from moba_rewrite import checkpoints, cli
from moba_rewrite.cli import demo


def test_demo_end_to_end(tmp_path, capsys):
    # --no-onnx: the ONNX path is the `rewrite --format onnx` tested in test_cli.py (test time budget)
    code = cli.main(["demo", "--out", str(tmp_path / "demo"), "--seq-len", "256", "--no-progress", "--no-onnx"])
    out, err = capsys.readouterr()
    assert code == 0
    for heading in ("== inspect ==", "== rewrite", "torch.compile", "== export .pt2", "== timings ==", "== files =="):
        assert heading in out
    work = tmp_path / "demo"
    model = mr.load(work / "llama-tiny-moba")
    assert [r.decision for r in model._moba_report.rows] == ["moba", "moba", "moba", "dense"]
    x = torch.randint(0, demo.DEMO_CONFIG["vocab_size"], (1, 300), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = model(input_ids=x, use_cache=False).logits
    ep = mr.load(work / "llama-tiny-moba.pt2")
    assert torch.allclose(ep.module()(x), expected, atol=1e-4)
    dense = checkpoints.read_checkpoint(work / "llama-tiny").model
    with torch.no_grad():
        assert not torch.allclose(dense(input_ids=x, use_cache=False).logits, expected, atol=1e-3)  # MoBA routes
    assert "compiled vs eager MoBA: max |diff|" in out
    assert "prompt of 256 tokens: original (dense)" in out and " ms, MoBA " in out
    assert "Writing model shards" not in out + err  # transformers' own progress bar stays out


def test_demo_refuses_short_prompt_and_busy_folder(tmp_path, capsys):
    code = cli.main(["demo", "--seq-len", "40"])
    assert code == cli.EXIT_VALUE
    assert capsys.readouterr().err.startswith("moba-rewrite: error: --seq-len: expected at least one MoBA block")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    code = cli.main(["demo", "--out", str(busy)])
    assert code == cli.EXIT_OUTPUT_EXISTS
    assert capsys.readouterr().err.startswith(f"moba-rewrite: error: {busy}: expected an empty or new folder")
