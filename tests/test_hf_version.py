"""An older transformers than the Hugging Face path supports stops every entry point with one
line naming both versions; models that are not transformers models do not care.

transformers 4.57.6 and 5.3.0 (both admitted by the old `transformers>=4.56` requirement) failed
inside the first forward with `TypeError: moba_sdpa_mask() missing 1 required positional
argument: 'q_length'`; 5.4 to 5.23 ignore the `cache=` argument the generation exporters pass
(`moba_rewrite/integrations/hf_version.py`). Here the installed version is replaced, so the test
runs on whatever transformers CI has."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import moba_rewrite as mr
from moba_rewrite import cli
from moba_rewrite.integrations import hf_version
from test_checkpoints import ids, make_llama, save_hf

POLICY = {"version": 1, "defaults": {"mode": "moba", "block_size": 8, "top_k": 2}}
TOO_OLD = "5.24.0"


@pytest.fixture
def old_transformers(monkeypatch):
    monkeypatch.setattr(hf_version, "installed", lambda: TOO_OLD)


def test_release_numbers():
    assert hf_version._release("5.25.0") == (5, 25)
    assert hf_version._release("5.4.0.dev0") == (5, 4)
    assert hf_version._release("4.57.6") == (4, 57)
    assert hf_version._release(hf_version.installed()) >= hf_version.MIN_TRANSFORMERS  # what CI installs
    assert hf_version.installed() == transformers.__version__


def test_pip_is_asked_for_the_same_floor():
    import tomllib
    from pathlib import Path

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    floor = ".".join(map(str, hf_version.MIN_TRANSFORMERS))
    assert f"transformers>={floor}" in project["dependencies"]


@pytest.mark.parametrize("entry", ["rewrite", "find_sites", "compile", "export"])
def test_every_library_entry_point_refuses_an_old_transformers(old_transformers, entry):
    model = make_llama()
    x = ids(24, seed=1)
    calls = {"rewrite": lambda: mr.rewrite(model, POLICY),
             "find_sites": lambda: mr.find_sites(model),
             "compile": lambda: mr.compile(model, POLICY),
             "export": lambda: mr.export(model, (x,), POLICY)}
    with pytest.raises(hf_version.UnsupportedTransformersError) as err:
        calls[entry]()
    message = str(err.value)
    assert f"transformers {TOO_OLD} is too old" in message and "transformers >= 5.25" in message and "\n" not in message
    assert model.config._attn_implementation == "sdpa"  # nothing was changed on the way


@pytest.mark.parametrize("command", ["rewrite", "inspect"])
def test_the_command_exits_12_with_one_line(old_transformers, tmp_path, capsys, command):
    src = save_hf(make_llama(), tmp_path / "llama")
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps(POLICY))
    out = tmp_path / "out"
    argv = {"rewrite": ["rewrite", src, "--policy", policy, "--out", out, "--seq-len", 40],
            "inspect": ["inspect", src]}[command]
    code = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == cli.EXIT_MISSING_PACKAGE, err
    assert err.count("\n") == 1 and f"transformers {TOO_OLD} is too old" in err
    assert "pip install -U 'transformers>=5.25'" in err
    assert not out.exists()


def test_models_that_are_not_transformers_models_do_not_ask(old_transformers):
    layer = torch.nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, batch_first=True, dropout=0.0).eval()
    x = torch.randn(1, 24, 32)
    rewritten = mr.rewrite(layer, {"version": 1, "defaults": {"mode": "moba", "block_size": 8, "top_k": 3}},
                           example_inputs=(x,))
    with torch.no_grad():  # top_k * block_size >= T: MoBA equals full attention
        assert torch.allclose(rewritten(x), layer(x), atol=1e-5)
