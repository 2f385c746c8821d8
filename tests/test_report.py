"""The rewrite report names the class of every site's module, including sites in the root
module's own forward (found by tracing the root, where no nn_module_stack entry names it)."""

from __future__ import annotations

import json

import torch
import torch.nn as nn

import moba_rewrite as mr
from moba_rewrite import cli
from test_checkpoints import TinyNet

POLICY = {"version": 1, "defaults": {"mode": "moba", "block_size": 8, "top_k": 2}}


class ManualRoot(nn.Module):
    """Hand-written attention (matmul -> softmax -> matmul) in the root's forward."""

    def forward(self, q, k, v):
        return torch.softmax((q @ k.transpose(-1, -2)) * 8 ** -0.5, dim=-1) @ v


class Wrapper(nn.Module):
    """The root site of a TinyNet, seen one level down: its class is the child's."""

    def __init__(self) -> None:
        super().__init__()
        self.net = TinyNet()

    def forward(self, input_ids):
        return self.net(input_ids)


def _class_column(report) -> list[str]:
    lines = str(report).splitlines()
    start = lines[0].index("class")
    width = lines[1].split("  ")[2]  # dashes under layer, site, class
    return [line[start:start + len(width)].strip() for line in lines[2:2 + len(report.rows)]]


def test_root_sites_name_the_root_class():
    x = TinyNet().example_inputs(32)
    report = mr.plan(TinyNet(), POLICY, x)
    assert [(r.name, r.module_class) for r in report.rows] == [("", "TinyNet")]
    assert _class_column(report) == ["TinyNet"]
    q = torch.randn(1, 4, 32, 8)
    report = mr.plan(ManualRoot(), POLICY, (q, q, q))
    assert [(r.name, r.module_class, r.kind) for r in report.rows] == [("", "ManualRoot", "manual")]
    assert _class_column(report) == ["ManualRoot"]
    report = mr.plan(Wrapper(), POLICY, x)  # a nested site keeps its own module's class
    assert [(r.name, r.module_class) for r in report.rows] == [("net", "TinyNet")]


def test_class_rules_match_root_sites():
    """With the class known, a policy rule on it applies to the root's site (it matched nothing before)."""
    policy = {**POLICY, "rules": [{"name": "tiny-dense", "class": "TinyNet", "mode": "dense"}]}
    report = mr.plan(TinyNet(), policy, TinyNet().example_inputs(32))
    assert [r.decision for r in report.rows] == ["dense"] and "'tiny-dense'" in report.rows[0].reason
    assert not report.warnings


def test_cli_inspect_shows_the_root_class(tmp_path, capsys):
    torch.save(TinyNet().eval(), tmp_path / "net.pt")
    code = cli.main(["inspect", str(tmp_path / "net.pt"), "--trust-pickle", "--json", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0
    assert [(s["name"], s["class"]) for s in json.loads(out)["sites"]] == [("(root)", "TinyNet")]
