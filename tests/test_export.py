"""AOTInductor: the one (slow) AOTI check. `rewrite --format aoti` compiles the rewritten
model with the C++ compiler, and the package, loaded back with `mr.load`, reproduces an
independently rewritten in-memory model at the exported and at another sequence length."""

from __future__ import annotations

import json
import zipfile

import torch

import moba_rewrite as mr
from moba_rewrite import cli
from test_checkpoints import ids, logits, make_gpt2, save_hf

POLICY_JSON = '{"version": 1, "defaults": {"mode": "moba", "block_size": 8, "top_k": 2}}'


def test_rewrite_to_aoti_package(tmp_path, capsys):
    save_hf(make_gpt2(layers=1), tmp_path / "gpt2")
    (tmp_path / "policy.json").write_text(POLICY_JSON)
    out = tmp_path / "gpt2.aoti.pt2"
    code = cli.main(["rewrite", str(tmp_path / "gpt2"), "--policy", str(tmp_path / "policy.json"), "--out", str(out),
                     "--format", "aoti", "--dynamic", "--seq-len", "32"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "verified" in captured.out
    assert any("/data/aotinductor/" in n for n in zipfile.ZipFile(out).namelist())
    runner = mr.load(out)
    reference = mr.rewrite(make_gpt2(layers=1), json.loads(POLICY_JSON))
    for n in (32, 45):
        x = ids(n, seed=n)
        got = runner(x)
        got = got[0] if isinstance(got, (list, tuple)) else got
        assert torch.allclose(got, logits(reference, x), atol=1e-4)
    assert not torch.allclose(got, logits(make_gpt2(layers=1), x), atol=1e-3)  # MoBA is active
