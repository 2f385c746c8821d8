"""Hostile and careless checkpoints: each refused with its documented exit code and exactly one
line on stderr, the input unchanged and nothing written; weights that disagree with the config
are never accepted silently (issue 17), unless --allow-random-init asks for it.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
import time
from pathlib import Path

import pytest
import torch

from hostile_tools import assert_nothing_left, assert_refused, digest, run_in_process
from moba_rewrite import checkpoints as ck
from moba_rewrite.exit_codes import EXIT_CHECKPOINT, EXIT_OK, EXIT_PICKLE
from test_checkpoints import make_llama, save_hf

POLICY = "defaults: {block_size: 8, top_k: 2}\n"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile-ck")
    save_hf(make_llama(layers=2), root / "llama")
    (root / "policy.yaml").write_text(POLICY)
    return root


def variant(base: Path, tmp_path: Path, **config) -> Path:
    """A copy of the two-layer checkpoint whose config.json says something else."""
    d = tmp_path / "ckpt"
    shutil.copytree(base / "llama", d)
    data = json.loads((d / "config.json").read_text())
    data.update(config)
    (d / "config.json").write_text(json.dumps(data))
    return d


def refuse(argv, capfd, code: int, *, inputs: Path, out: Path | None = None, mentions: str | None = None) -> str:
    before = digest(inputs)
    line = assert_refused(run_in_process(argv, capfd), code, mentions=mentions)
    assert digest(inputs) == before, "the input was modified"
    if out is not None:
        assert_nothing_left(out)
    return line


# ------------------------------------------------------------------ config and weights disagree

@pytest.mark.parametrize("config, says", [
    ({"num_hidden_layers": 3}, "missing model.layers.2."),
    ({"num_hidden_layers": 1}, "unexpected model.layers.1."),
    ({"intermediate_size": 48}, "shape of model.layers.0.mlp.down_proj.weight (checkpoint [32, 64] vs config [32, 48])"),
])
def test_weights_that_do_not_match_the_config_are_refused(base, tmp_path, capfd, config, says):
    d = variant(base, tmp_path, **config)
    out = tmp_path / "out"
    line = refuse(["rewrite", d, "--policy", base / "policy.yaml", "--out", out, "--no-progress"], capfd,
                  EXIT_CHECKPOINT, inputs=d, out=out, mentions=says)
    assert "--allow-random-init" in line and "LOAD REPORT" not in line


def test_bare_safetensors_that_disagree_with_their_config_are_refused(base, tmp_path, capfd):
    d = variant(base, tmp_path, num_hidden_layers=3)
    refuse(["inspect", d / "model.safetensors", "--config", d / "config.json"], capfd, EXIT_CHECKPOINT,
           inputs=d, mentions="missing model.layers.2.")


def test_allow_random_init_writes_the_model_it_rewrote(base, tmp_path, capfd):
    """Opting in works, warns in one line, and the artifact holds the randomly initialised layer
    (saved, not copied), so it loads strictly and reproduces the rewritten model (verified)."""
    d = variant(base, tmp_path, num_hidden_layers=3)
    out = tmp_path / "out"
    got = run_in_process(["rewrite", d, "--policy", base / "policy.yaml", "--out", out, "--no-progress", "-q",
                          "--allow-random-init"], capfd)
    assert got.code == EXIT_OK, got.err
    ours = [line for line in got.err.splitlines() if line.startswith("moba-rewrite:")]
    assert len(ours) == 1 and "warning:" in ours[0] and "missing model.layers.2." in ours[0], got.err
    model = ck.load(out)  # strict: every weight is there now
    assert any("layers.2." in name for name, _ in model.named_parameters())


@pytest.mark.parametrize("config, says", [
    ({"num_hidden_layers": 200_000}, "describes about"),
    ({"hidden_size": 1 << 22, "intermediate_size": 1 << 24}, "fits in memory"),
])
def test_absurd_config_sizes_fail_fast(base, tmp_path, capfd, config, says):
    d = variant(base, tmp_path, **config)
    t0 = time.perf_counter()
    refuse(["inspect", d], capfd, EXIT_CHECKPOINT, inputs=d, mentions=says)
    assert time.perf_counter() - t0 < 60  # building 200k layers (or allocating terabytes) would not be


# --------------------------------------------------------------------------- corrupt files

def _rewrite_safetensors(path: Path, edit) -> None:
    """Apply `edit(header_dict, data_bytes) -> (header_dict, data_bytes)` to a safetensors file."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header, data = json.loads(raw[8:8 + n]), raw[8 + n:]
    header, data = edit(header, data)
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def _first_tensor(header: dict) -> str:
    return next(k for k in header if k != "__metadata__")


def _lie_about_shape(header, data):
    name = _first_tensor(header)
    header[name]["shape"] = [1 << 20, 1 << 20]
    return header, data


def _offsets_past_the_end(header, data):
    name = _first_tensor(header)
    header[name]["data_offsets"] = [0, len(data) + (1 << 30)]
    return header, data


CORRUPTIONS = {
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    "header_length_lies": lambda p: p.write_bytes(struct.pack("<Q", 1 << 60) + p.read_bytes()[8:]),
    "garbage": lambda p: p.write_bytes(os.urandom(4096)),
    "empty": lambda p: p.write_bytes(b""),
    "shape_lies": lambda p: _rewrite_safetensors(p, _lie_about_shape),
    "offsets_past_the_end": lambda p: _rewrite_safetensors(p, _offsets_past_the_end),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_corrupt_safetensors_are_refused(base, tmp_path, capfd, corruption):
    d = variant(base, tmp_path)
    CORRUPTIONS[corruption](d / "model.safetensors")
    out = tmp_path / "out"
    refuse(["rewrite", d, "--policy", base / "policy.yaml", "--out", out, "--no-progress"], capfd,
           EXIT_CHECKPOINT, inputs=d, out=out, mentions="model.safetensors")


@pytest.mark.parametrize("case", ["config_not_json", "config_is_a_list", "config_is_a_fifo",
                                  "weights_are_a_directory", "weights_are_a_dangling_link"])
def test_broken_directories_are_refused(base, tmp_path, capfd, case):
    d = variant(base, tmp_path)
    if case == "config_not_json":
        (d / "config.json").write_text("{ not json")
    elif case == "config_is_a_list":
        (d / "config.json").write_text("[1, 2]")
    elif case == "config_is_a_fifo":
        (d / "config.json").unlink()
        os.mkfifo(d / "config.json")  # reading it would block forever
    elif case == "weights_are_a_directory":
        (d / "model.safetensors").unlink()
        (d / "model.safetensors").mkdir()
    else:
        (d / "model.safetensors").unlink()
        (d / "model.safetensors").symlink_to(tmp_path / "nowhere.safetensors")
    refuse(["inspect", d], capfd, EXIT_CHECKPOINT, inputs=d)


def test_pickle_with_a_payload_is_refused_without_running_it(tmp_path, capfd):
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "model.pt"
    evil.write_bytes(pickle.dumps({"weight": Payload()}, protocol=4))  # torch warns about protocol 4
    line = refuse(["inspect", evil], capfd, EXIT_PICKLE, inputs=evil, mentions="--trust-pickle")
    assert not marker.exists() and "protocol" not in line


def test_tensor_file_with_a_lying_storage_size_is_refused(base, tmp_path, capfd):
    """A torch zip whose tensor claims more bytes than its storage holds: weights_only refuses it."""
    src = tmp_path / "w.pt"
    torch.save({"w": torch.zeros(4)}, src)
    import zipfile

    bad = tmp_path / "weights.pt"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(bad, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item)
            if item.filename.endswith("/data/0"):
                data = data[:4]  # 1 float left of 4
            zout.writestr(item, data)
    shutil.copy(base / "llama" / "config.json", tmp_path / "config.json")
    refuse(["inspect", bad], capfd, EXIT_CHECKPOINT, inputs=bad)
