"""`moba-rewrite demo` runs end to end (in process, a 512-token prompt: 4 blocks, so MoBA routes) and its artifacts hold up:
the rewritten checkpoint, the .pt2 program and the ONNX model all reproduce the MoBA model."""

from __future__ import annotations

import onnx
import torch

import moba_rewrite as mr
from moba_rewrite import cli, demo
from moba_rewrite.exporters.onnx import DOMAIN, run_onnxruntime


def test_demo_end_to_end(tmp_path, capsys):
    code = cli.main(["demo", "--out", str(tmp_path / "demo"), "--seq-len", "512", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0
    for heading in ("== inspect ==", "== rewrite", "torch.compile", "== export .pt2", "== export ONNX",
                    "== timings ==", "== files =="):
        assert heading in out
    work = tmp_path / "demo"
    model = mr.load(work / "llama-tiny-moba")
    assert [r.decision for r in model._moba_report.rows] == ["moba", "moba", "moba", "dense"]
    x = torch.randint(0, demo.DEMO_CONFIG["vocab_size"], (1, 300), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = model(input_ids=x, use_cache=False).logits
    ep = mr.load(work / "llama-tiny-moba.pt2")
    assert torch.allclose(ep.module()(x), expected, atol=1e-4)
    proto = onnx.load(str(work / "llama-tiny-moba.onnx"))
    assert sum(n.domain == DOMAIN for n in proto.graph.node) == 3
    got = torch.as_tensor(run_onnxruntime(work / "llama-tiny-moba.onnx", [x])[0])
    assert torch.allclose(got, expected, atol=1e-4)


def test_demo_refuses_short_prompt_and_busy_folder(tmp_path, capsys):
    code = cli.main(["demo", "--seq-len", "100"])
    assert code == cli.EXIT_VALUE
    assert capsys.readouterr().err.startswith("moba-rewrite: error: --seq-len: expected at least one MoBA block")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    code = cli.main(["demo", "--out", str(busy)])
    assert code == cli.EXIT_OUTPUT_EXISTS
    assert capsys.readouterr().err.startswith(f"moba-rewrite: error: {busy}: expected an empty or new folder")
