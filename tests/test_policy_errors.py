"""Every kind of bad policy gets one line naming the file, the line, the key path and what was
expected. Messages are asserted whole: they are the product's user interface."""

from __future__ import annotations

import json

import pytest

from moba_rewrite.policy import PolicyError, load_policy


def error_of(tmp_path, name: str, text: str) -> PolicyError:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(PolicyError) as err:
        load_policy(path)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(str(path)), message
    return err.value


def short(err: PolicyError, tmp_path) -> str:
    return str(err).replace(str(tmp_path) + "/", "")


TOP_K_ZERO = {
    "hybrid.yaml": ("version: 1\ndefaults:\n  top_k: 3\nrules:\n  - layers: '-3:'\n    mode: dense\n"
                    "  - match: x\n    top_k: 0\n", 8),
    "hybrid.json": ('{\n  "version": 1,\n  "rules": [\n    {"layers": "-3:", "mode": "dense"},\n'
                    '    {"match": "x",\n     "top_k": 0}\n  ]\n}\n', 6),
    "hybrid.toml": ('version = 1\n\n[defaults]\ntop_k = 3\n\n[[rules]]\nlayers = "-3:"\nmode = "dense"\n\n'
                    '[[rules]]\nmatch = "x"\ntop_k = 0\n', 12),
}


@pytest.mark.parametrize("name", TOP_K_ZERO)
def test_top_k_below_one_names_file_line_path_and_expectation(tmp_path, name):
    text, line = TOP_K_ZERO[name]
    err = error_of(tmp_path, name, text)
    assert short(err, tmp_path) == f"{name}:{line} rules[1].top_k: expected an integer >= 1, got 0"
    assert (err.line, err.key_path, err.detail) == (line, "rules[1].top_k", "expected an integer >= 1, got 0")
    assert isinstance(err, ValueError)


YAML_CASES = [
    # (text, expected message after "p.yaml")
    ("defaults:\n  block_size: 0\n", ":2 defaults.block_size: expected an integer >= 1, got 0"),
    ("defaults:\n  block_size: -512\n", ":2 defaults.block_size: expected an integer >= 1, got -512"),
    ("defaults:\n  block_size: '512'\n", ":2 defaults.block_size: expected an integer >= 1, got '512'"),
    ("defaults:\n  block_size: 512.0\n", ":2 defaults.block_size: expected an integer >= 1, got 512.0"),
    ("defaults:\n  top_k: true\n", ":2 defaults.top_k: expected an integer >= 1, got true (a boolean)"),
    ("defaults:\n  top_k:\n", ":2 defaults.top_k: expected an integer >= 1, got nothing (null)"),
    ("defaults:\n  backend: flash-attn\n",
     ":2 defaults.backend: expected one of 'auto', 'reference', 'torch', 'triton', 'flash_attn', "
     "got 'flash-attn' (did you mean 'flash_attn'?)"),
    ("defaults:\n  backend: cuda\n",
     ":2 defaults.backend: expected one of 'auto', 'reference', 'torch', 'triton', 'flash_attn', got 'cuda'"),
    ("rules:\n  - mode: sparse\n", ":2 rules[0].mode: expected one of 'moba', 'dense', got 'sparse'"),
    ("rules:\n  - decode: 1\n", ":2 rules[0].decode: expected one of 'moba', 'dense', got 1"),
    ("rules:\n  - layers: 0\n    on_unsupported: skip\n",
     ":3 rules[0].on_unsupported: expected one of 'dense', 'error', got 'skip'"),
    ("rule:\n  - mode: dense\n",
     ":1: unknown key 'rule' (did you mean 'rules'?); expected one of: version, description, strict, "
     "defaults, rules"),
    ("version: 1\ntop_k: 3\n",
     ":2: unknown key 'top_k' ('top_k' belongs under 'defaults:' or in a rule); expected one of: version, "
     "description, strict, defaults, rules"),
    ("defaults:\n  mode: moba\n  topk: 3\n",
     ":3 defaults: unknown key 'topk' (did you mean 'top_k'?); expected one of: mode, block_size, top_k, "
     "backend, decode, on_unsupported, dense_below"),
    ("rules:\n  - mode: dense\n    targets: ['x']\n",
     ":3 rules[0]: unknown key 'targets' (did you mean 'match'?); expected one of: name, match, class, "
     "layers, ignore, mode, block_size, top_k, backend, decode, on_unsupported, dense_below"),
    ("rules:\n  - mode: dense\n    classs: A\n",
     ":3 rules[0]: unknown key 'classs' (did you mean 'class'?); expected one of: name, match, class, "
     "layers, ignore, mode, block_size, top_k, backend, decode, on_unsupported, dense_below"),
    ("rules:\n  - mode: dense\n    match: ['a', 're:(b']\n",
     ":3 rules[0].match[1]: expected a valid regular expression after 're:', got '(b' "
     "(missing ), unterminated subpattern at position 0)"),
    ("rules:\n  - mode: dense\n    ignore: 're:a**'\n",
     ":3 rules[0].ignore: expected a valid regular expression after 're:', got 'a**' "
     "(multiple repeat at position 2)"),
    ("rules:\n  - mode: dense\n    match: 3\n",
     ":3 rules[0].match: expected a module-name pattern (glob or 're:' regex) or a non-empty list of "
     "them, got 3"),
    ("rules:\n  - mode: dense\n    match: []\n",
     ":3 rules[0].match: expected a module-name pattern (glob or 're:' regex) or a non-empty list of "
     "them, got a list"),
    ("rules:\n  - mode: dense\n    class: {a: 1}\n",
     ":3 rules[0].class: expected a class name pattern (glob or 're:' regex) or a non-empty list of "
     "them, got a mapping"),
    ("rules:\n  - mode: dense\n    layers: last3\n",
     ":3 rules[0].layers: expected a slice 'start:stop[:step]' of integers (e.g. '-3:', '0:4', '::2') "
     "or an integer, got 'last3'"),
    ("rules:\n  - mode: dense\n    layers: [0, '1:2:3:4']\n",
     ":3 rules[0].layers[1]: expected a slice 'start:stop[:step]' of integers (e.g. '-3:', '0:4', "
     "'::2') or an integer, got '1:2:3:4'"),
    ("rules:\n  - mode: dense\n    layers: '::0'\n", ":3 rules[0].layers: expected a non-zero slice step, got '::0'"),
    ("rules:\n  - mode: dense\n    layers: 2.5\n",
     ":3 rules[0].layers: expected a layer index, a slice like '-3:' or '0:4', or a non-empty list of "
     "these, got 2.5"),
    ("rules:\n  - mode: dense\n    layers: []\n",
     ":3 rules[0].layers: expected a layer index, a slice like '-3:' or '0:4', or a non-empty list of "
     "these, got an empty list"),
    ("rules:\n  - mode: dense\n    layers:\n      - 1\n      - [2]\n",
     ":5 rules[0].layers[1]: expected a layer index, a slice like '-3:' or '0:4', or a non-empty list "
     "of these, got a list"),
    ("rules:\n  - mode: dense\n  - match: 'a'\n    name: only-selects\n",
     ":3 rules[1]: a rule must set at least one of mode, block_size, top_k, backend, decode, "
     "on_unsupported, dense_below; this one only selects sites"),
    ("rules:\n  mode: dense\n", ":1 rules: expected a list of rules, got a mapping"),
    ("rules:\n  - dense\n",
     ":2 rules[0]: expected a mapping (a rule: selectors match/class/layers/ignore and settings), got 'dense'"),
    ("defaults: [1]\n", ":1 defaults: expected a mapping (of settings), got a list"),
    ("- version: 1\n", ":1: expected a mapping (with keys version, strict, defaults, rules), got a list"),
    ("version: 2\n", ":1 version: expected 1 (the only policy format version), got 2"),
    ("strict: 'yes'\n", ":1 strict: expected true or false, got 'yes'"),
    ("description: [a]\n", ":1 description: expected a string, got a list"),
    ("rules:\n  - name: 7\n    mode: dense\n", ":2 rules[0].name: expected a string, got 7"),
    ("1: x\n", ":1: expected text keys in the policy, got the key 1"),
    ("defaults:\n  top_k: 2\n  block_size: 64\n  top_k: 3\n",
     ":4 defaults: duplicate key 'top_k' (first written at line 2)"),
    ("", ": expected a mapping with keys version, defaults, rules; the file is empty"),
    ("# only a comment\n", ": expected a mapping with keys version, defaults, rules; the file is empty"),
    ("rules:\n  - layers: -3:\n    mode: dense\n",
     ":2: malformed YAML: mapping values are not allowed here (column 15); quote values that contain "
     "': ' or end in ':', e.g. layers: \"-3:\""),
    ("defaults:\n  mode: [moba\n", ":3: malformed YAML: expected ',' or ']', but got '<stream end>' (column 1)"),
    ("a: 1\n---\nb: 2\n", ":2: malformed YAML: expected a single document in the stream, but found "
                          "another document (column 1)"),
]


@pytest.mark.parametrize("text,expected", YAML_CASES, ids=[c[1][:60] for c in YAML_CASES])
def test_yaml_errors(tmp_path, text, expected):
    assert short(error_of(tmp_path, "p.yaml", text), tmp_path) == "p.yaml" + expected



def _json_says(text: str) -> str:
    """How the policy error reports Python's own JSON error (its wording and column changed in
    Python 3.13: a trailing comma is "Illegal trailing comma before end of object")."""
    try:
        json.loads(text)
    except json.JSONDecodeError as e:
        return f":{e.lineno}: malformed JSON: {e.msg} (column {e.colno})"
    raise AssertionError("valid JSON")


JSON_CASES = [
    ('{\n  "rules": [\n    {"mode": "dense",\n     "block_size": 0}\n  ]\n}',
     ":4 rules[0].block_size: expected an integer >= 1, got 0"),
    ('{\n  "defaults": {\n    "backend": "tritonn"\n  }\n}',
     ":3 defaults.backend: expected one of 'auto', 'reference', 'torch', 'triton', 'flash_attn', got "
     "'tritonn' (did you mean 'triton'?)"),
    ('{\n  "rules": [\n    {"mode": "dense"},\n    {"mode": "dense",\n     "layers": [0, "x"]}\n  ]\n}',
     ":5 rules[1].layers[1]: expected a slice 'start:stop[:step]' of integers (e.g. '-3:', '0:4', "
     "'::2') or an integer, got 'x'"),
    ('{\n  "strict": "true"\n}', ":2 strict: expected true or false, got 'true'"),
    ('{\n  "rules": [\n    {"mode": "dense",}\n  ]\n}', _json_says('{\n  "rules": [\n    {"mode": "dense",}\n  ]\n}')),
    ('{"rules": [}', ":1: malformed JSON: Expecting value (column 12)"),
    ('{"defaults": {"top_k": 1,\n "top_k": 2}}', ":2 defaults: duplicate key 'top_k' (first written at line 1)"),
    ('', ":1: malformed JSON: Expecting value (column 1)"),
    ('[]', ":1: expected a mapping (with keys version, strict, defaults, rules), got a list"),
]


@pytest.mark.parametrize("text,expected", JSON_CASES, ids=[c[1][:60] for c in JSON_CASES])
def test_json_errors(tmp_path, text, expected):
    assert short(error_of(tmp_path, "p.json", text), tmp_path) == "p.json" + expected


TOML_CASES = [
    ('version = 1\n\n[defaults]\nmode = "moba"\nblock_size = -1\n',
     ":5 defaults.block_size: expected an integer >= 1, got -1"),
    ('[[rules]]\nmode = "dense"\n\n[[rules]]\nmode = "dense"\nmatch = "re:["\n',
     ":6 rules[1].match: expected a valid regular expression after 're:', got '[' "
     "(unterminated character set at position 0)"),
    ('[[rules]]\nmode = "dense"\nlayerz = 3\n',
     ":3 rules[0]: unknown key 'layerz' (did you mean 'layers'?); expected one of: name, match, class, "
     "layers, ignore, mode, block_size, top_k, backend, decode, on_unsupported, dense_below"),
    ('strict = 1\n', ":1 strict: expected true or false, got 1"),
    ('version = 1\n[defaults]\ntop_k = \n', ":3: malformed TOML: Invalid value (column 9)"),
    ('[defaults]\ntop_k = 1\ntop_k = 2\n', ":3: malformed TOML: Cannot overwrite a value (column 10)"),
    ('', ": expected a mapping with keys version, defaults, rules; the file is empty"),
]


@pytest.mark.parametrize("text,expected", TOML_CASES, ids=[c[1][:60] for c in TOML_CASES])
def test_toml_errors(tmp_path, text, expected):
    assert short(error_of(tmp_path, "p.toml", text), tmp_path) == "p.toml" + expected


def test_dict_errors_name_the_dict_and_key_path():
    with pytest.raises(PolicyError) as err:
        load_policy({"rules": [{"mode": "dense"}, {"top_k": 0}]})
    assert str(err.value) == "<dict> rules[1].top_k: expected an integer >= 1, got 0"
    assert err.value.line is None


def test_file_level_errors(tmp_path):
    with pytest.raises(PolicyError) as err:
        load_policy(tmp_path / "missing.yaml")
    assert str(err.value) == f"{tmp_path / 'missing.yaml'}: policy file not found"
    (tmp_path / "p.txt").write_text("version: 1\n")
    with pytest.raises(PolicyError) as err:
        load_policy(tmp_path / "p.txt")
    assert str(err.value) == (f"{tmp_path / 'p.txt'}: expected a policy file ending in .yaml, .yml, .toml "
                              "or .json, got '.txt'")
    (tmp_path / "d.yaml").mkdir()
    with pytest.raises(PolicyError) as err:
        load_policy(tmp_path / "d.yaml")
    assert str(err.value) == f"{tmp_path / 'd.yaml'}: expected a policy file, got a directory"
    (tmp_path / "bin.json").write_bytes(b'{"a": "\xff"}')
    with pytest.raises(PolicyError) as err:
        load_policy(tmp_path / "bin.json")
    assert str(err.value) == f"{tmp_path / 'bin.json'}: expected UTF-8 text (invalid start byte at byte 7)"


def test_first_error_in_file_order_is_reported(tmp_path):
    err = error_of(tmp_path, "p.yaml", "rules:\n  - top_k: 0\ndefaults:\n  top_k: 0\n")
    assert err.line == 2 and err.key_path == "rules[0].top_k"
    err = error_of(tmp_path, "p.json", json.dumps({"defaults": {"mode": "x"}, "rules": [{"top_k": 0}]}))
    assert err.key_path == "defaults.mode"


@pytest.mark.parametrize("text,expected", [
    ('version = 1\nrules = [\n  {mode = "dense"},\n  {top_k = 0},\n]\n', ":2 rules[1].top_k"),   # inline: the key
    ('version = 1\ndefaults.top_k = 0\n', ":2 defaults.top_k"),                               # dotted key
    ('[defaults]\nmode = "moba"\n\n[[rules]]\nmode = "dense"\n[rules.oops]\n', ":4 rules[0]"),  # odd layout
])
def test_toml_lines_are_best_effort_but_never_wrong_file(tmp_path, text, expected):
    assert short(error_of(tmp_path, "p.toml", text), tmp_path).startswith("p.toml" + expected)
