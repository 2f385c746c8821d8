"""Hostile policy files: alias bombs, recursive aliases, deep nesting, huge files, special files,
out-of-range numbers and random mutations of valid files. Each is a one-line PolicyError (exit 5
on the command line) in time and memory linear in the file (issue 17).
"""

from __future__ import annotations

import json
import os
import textwrap

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hostile_tools import assert_refused, run_in_process, run_python
from moba_rewrite.exit_codes import EXIT_POLICY
from moba_rewrite.policy import PolicyError, load_policy
from moba_rewrite.policy.formats import MAX_DEPTH

VALID = {
    "yaml": "version: 1\ndefaults: {block_size: 64, top_k: 3}\nrules:\n  - match: '*.attn'\n    layers: '-1:'\n"
            "    mode: dense\n",
    "json": json.dumps({"version": 1, "defaults": {"block_size": 64, "top_k": 3},
                        "rules": [{"match": "*.attn", "layers": "-1:", "mode": "dense"}]}, indent=1),
    "toml": "version = 1\n[defaults]\nblock_size = 64\ntop_k = 3\n[[rules]]\nmatch = '*.attn'\nlayers = '-1:'\n"
            "mode = 'dense'\n",
}


def yaml_alias_bomb(levels: int = 9, width: int = 9) -> str:
    lines = ["a0: &a0 [" + ", ".join(["x"] * width) + "]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]" for i in range(1, levels)]
    return "\n".join(lines) + f"\nrules: *a{levels - 1}\n"


def nested(fmt: str, depth: int) -> str:
    if fmt == "json":
        return '{"defaults": {"top_k": ' + "[" * depth + "]" * depth + "}}"
    if fmt == "yaml":
        return "defaults: {top_k: " + "[" * depth + "]" * depth + "}\n"
    return "[defaults]\ntop_k = " + "[" * depth + "]" * depth + "\n"


def big_json(n_rules: int) -> str:
    rules = [{"match": f"model.layers.{i}.self_attn", "top_k": 2} for i in range(n_rules)]
    return json.dumps({"version": 1, "rules": rules}, indent=2)


def test_bombs_and_huge_files_in_bounded_time_and_memory(tmp_path):
    """In a subprocess limited to 2 GiB more address space than torch's import takes, and 60 s of
    CPU: a 10-line alias bomb (~10^9 values when expanded), 5000-level nesting in every format,
    and a 2 MB JSON policy (a quadratic line lookup took minutes at 10 MB). The limit is set after
    the import: a CUDA build of torch maps more than 2 GiB of libraries on its own."""
    files = {"bomb.yaml": yaml_alias_bomb(), "recursive.yaml": "rules: &r\n  - match: x\n    top_k: 2\n  - *r\n",
             "deep.json": nested("json", 5000), "deep.yaml": nested("yaml", 5000), "deep.toml": nested("toml", 5000),
             "big.json": big_json(25_000)}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    code = textwrap.dedent(f"""
        import resource, time
        from moba_rewrite.policy import PolicyError, load_policy
        mapped = int(next(line for line in open("/proc/self/status") if line.startswith("VmSize:")).split()[1]) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (mapped + (2 << 30),) * 2)
        for name in {sorted(files)!r}:
            t0 = time.process_time()
            try:
                p = load_policy(name)
                print(name, "ok", len(p.rules), round(time.process_time() - t0, 2))
            except PolicyError as exc:
                print(name, "error", round(time.process_time() - t0, 2), str(exc).replace(chr(10), " "))
    """)
    got = run_python(code, cwd=tmp_path, memory=None, cpu_s=60)
    assert got.code == 0, got.err
    results = {line.split()[0]: line for line in got.out.splitlines()}
    assert "once YAML aliases are expanded" in results["bomb.yaml"]
    assert "alias that contains itself" in results["recursive.yaml"]
    for name, line in (("deep.json", 1), ("deep.yaml", 1), ("deep.toml", 2)):
        assert f"{name}:{line}: expected at most {MAX_DEPTH} levels of nesting" in results[name], results[name]
    assert results["big.json"].startswith("big.json ok 25000"), results["big.json"]


@pytest.mark.parametrize("fmt", ["json", "yaml", "toml"])
@given(depth=st.one_of(st.integers(1, 300), st.integers(MAX_DEPTH - 3, MAX_DEPTH + 1)))
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_any_nesting_depth_is_a_located_policy_error(tmp_path, fmt, depth):
    path = tmp_path / f"p.{fmt}"
    path.write_text(nested(fmt, depth))
    with pytest.raises(PolicyError) as err:
        load_policy(path)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{path}:")
    outer = 0 if fmt == "toml" else 2  # the document and `defaults` mappings (TOML: a table header)
    expected = "levels of nesting" if depth + outer > MAX_DEPTH else "defaults.top_k: expected an integer"
    assert expected in message, message


MUTATIONS = st.sampled_from(["[", "]", "{", "}", "&a ", "*a", "<<: *a", "'", '"', "\\", "\n  ", ":", "- ", "#",
                             "99999999999999999999999", "-1", "nan", "\x00", "\udcff", "é", "\t", "="])


@given(fmt=st.sampled_from(sorted(VALID)), cuts=st.lists(st.tuples(st.integers(0, 400), MUTATIONS), max_size=6))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_mutated_policy_files_load_or_fail_in_one_line(tmp_path, fmt, cuts):
    """Valid files with random insertions: a Policy, or a one-line PolicyError naming the file,
    never another exception."""
    text = VALID[fmt]
    for at, piece in cuts:
        at = min(at, len(text))
        text = text[:at] + piece + text[at:]
    path = tmp_path / f"p.{fmt}"
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    try:
        load_policy(path)
    except PolicyError as exc:
        assert "\n" not in str(exc) and str(exc).startswith(str(path))


@pytest.mark.parametrize("case, says", [
    ("top_k_beyond_int64", "expected an integer <= 2147483647"),
    ("block_size_beyond_int32", "expected an integer <= 2147483647"),
    ("fifo", "expected a regular policy file"),
    ("too_big", "expected a policy file of at most 16 MiB"),
    ("not_utf8", "expected UTF-8 text"),
])
def test_policy_check_refuses_in_one_line(tmp_path, capfd, case, says):
    path = tmp_path / "p.yaml"
    if case == "top_k_beyond_int64":
        path.write_text("defaults: {top_k: 100000000000000000000}\n")
    elif case == "block_size_beyond_int32":
        path.write_text("rules: [{layers: 0, block_size: 2147483648}]\n")
    elif case == "fifo":
        os.mkfifo(path)  # reading it would block forever
    elif case == "too_big":
        with open(path, "wb") as f:
            f.truncate((16 << 20) + 1)  # sparse: no real disk use
    else:
        path.write_bytes(b"defaults: {top_k: \xff}\n")
    assert_refused(run_in_process(["policy", "check", path], capfd), EXIT_POLICY, mentions=says)
