"""Policy files: selectors, precedence, formats, round trips, warnings, starter file, schema.

The expected site sets are computed independently of moba_rewrite.policy: Python list
slicing for `layers`, fnmatch / re for names.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from moba_rewrite.policy import core as pol
from moba_rewrite.policy import (
    Decision, Policy, PolicyError, Settings, dump_policy, load_policy, policy_schema,
    starter_policy_yaml,
)
from passes.sites import AttentionSite

EXAMPLES = sorted((Path(__file__).parents[1] / "examples" / "policies").glob("*.yaml"))
SCHEMA_FILE = Path(pol.__file__).with_name("schema.json")


def make_sites() -> list[AttentionSite]:
    """A small VLM-like model: 2 vision blocks run first, then 6 decoder layers (8 layers)."""
    vision = [AttentionSite(f"vision.blocks.{i}.attn", "VisionAttention", i, causal=False,
                            num_heads=4, head_dim=32) for i in range(2)]
    text = [AttentionSite(f"model.layers.{i}.self_attn", "LlamaAttention", 2 + i, causal=True,
                          num_heads=8, num_kv_heads=2, head_dim=64) for i in range(6)]
    return vision + text


SITES = make_sites()
NAMES = [s.name for s in SITES]
N = len(SITES)


def selected(rule: dict) -> list[str]:
    """Names of the sites whose decision lists rules[0] as matched."""
    policy = load_policy({"rules": [rule]})
    decisions, _ = policy.decide_all(SITES)
    return [s.name for s, d in zip(SITES, decisions) if d.matched_rules == (0,)]


# ------------------------------------------------------------------------------ selectors

@pytest.mark.parametrize("glob", [
    "model.layers.*.self_attn", "model*", "*.attn", "model.layers.?.self_attn",
    "model.layers.[024].self_attn", "*layers.1*", "vision.blocks.1.attn", "Model*",
])
def test_match_glob_full_name_star_crosses_dots(glob):
    assert selected({"match": glob, "top_k": 2}) == [n for n in NAMES if fnmatch.fnmatchcase(n, glob)]


def test_glob_star_crosses_dots_and_must_cover_whole_name():
    assert selected({"match": "model*", "top_k": 2}) == NAMES[2:]          # crosses dots
    assert selected({"match": "layers", "top_k": 2}) == []                 # whole name only
    assert selected({"match": "*LAYERS*", "top_k": 2}) == []               # case-sensitive


@pytest.mark.parametrize("regex,expected", [
    (r"re:model\.layers\.[0-2]\.self_attn", NAMES[2:5]),
    (r"re:.*\.attn", NAMES[:2]),
    ("re:layers", []),                                   # full match, not search
    (r"re:(vision|model)\.(blocks|layers)\.1\..*", [NAMES[1], NAMES[3]]),
])
def test_match_regex_fullmatch(regex, expected):
    assert selected({"match": regex, "top_k": 2}) == expected


def test_match_list_is_any_of():
    assert selected({"match": ["vision.blocks.0.attn", r"re:model\.layers\.5\..*"], "top_k": 2}) == [
        NAMES[0], NAMES[7]]


@pytest.mark.parametrize("cls,expected", [
    ("LlamaAttention", NAMES[2:]), ("VisionAttention", NAMES[:2]), (["VisionAttention"], NAMES[:2]),
    (["LlamaAttention", "VisionAttention"], NAMES), ("*Attention", NAMES), ("re:Vision.*", NAMES[:2]),
    ("Attention", []),
])
def test_class_selector(cls, expected):
    assert selected({"class": cls, "mode": "dense"}) == expected


@pytest.mark.parametrize("spec", [
    "-3:", "0:4", "::2", ":-6", "1::3", "-1", "5:2", "-100:2", "2:100", "::-1", "-2::-2",
    " 1 : 7 : 2 ", "+1:3",
])
def test_layers_slice_is_python_slicing_over_layer_indices(spec):
    parts = [p.strip() for p in spec.strip().split(":")]
    if len(parts) == 1:
        expected_layers = [list(range(N))[int(parts[0])]]
    else:
        expected_layers = list(range(N))[slice(*(int(p) if p else None for p in parts))]
    got = selected({"layers": spec if ":" in spec else int(spec), "mode": "dense"})
    assert got == [s.name for s in SITES if s.layer in expected_layers]


@pytest.mark.parametrize("layers,expected_layers", [
    (0, [0]), (7, [7]), (-1, [7]), (-8, [0]), ([0, -1], [0, 7]), ([1, "-2:"], [1, 6, 7]),
    ([3, 3, -5], [3]), (8, []), (-9, []),
])
def test_layers_index_and_list_negative_from_last(layers, expected_layers):
    assert selected({"layers": layers, "mode": "dense"}) == [NAMES[i] for i in expected_layers]


def test_last_three_layers_dense_is_one_rule_for_any_depth():
    for n in (4, 8, 32):
        sites = [AttentionSite(f"m.l.{i}", "A", i) for i in range(n)]
        decisions, warnings = load_policy({"rules": [{"layers": "-3:", "mode": "dense"}]}).decide_all(sites)
        assert [d.mode for d in decisions] == ["moba"] * (n - 3) + ["dense"] * 3
        assert warnings == []


def test_ignore_excludes_sites_from_the_rule():
    assert selected({"ignore": "vision.*", "mode": "dense"}) == NAMES[2:]
    assert selected({"class": "LlamaAttention", "ignore": ["re:.*\\.[05]\\..*"], "mode": "dense"}) == NAMES[3:7]
    assert selected({"layers": "-3:", "ignore": "model.layers.5.self_attn", "mode": "dense"}) == NAMES[5:7]


def test_selectors_and_together_and_no_selector_selects_all():
    assert selected({"match": "model.*", "layers": "::2", "mode": "dense"}) == [NAMES[2], NAMES[4], NAMES[6]]
    assert selected({"class": "VisionAttention", "layers": "-3:", "mode": "dense"}) == []
    assert selected({"top_k": 4}) == NAMES
    assert selected({"name": "everything", "top_k": 4}) == NAMES


# ---------------------------------------------------------------- defaults and precedence

def test_builtin_defaults_and_reason_when_no_rule_matches():
    decision = load_policy({}).decide(SITES[0], N)
    assert decision == Decision("moba", 512, 3, "auto", "moba", "dense", (), "defaults (no rule matched)")
    assert Settings() == Settings("moba", 512, 3, "auto", "moba", "dense")


def test_partial_defaults_inherit_builtin_values_and_rules_inherit_defaults():
    policy = load_policy({"defaults": {"top_k": 5, "backend": "torch"},
                          "rules": [{"layers": -1, "mode": "dense"}, {"layers": 0, "block_size": 64}]})
    assert policy.defaults == Settings(top_k=5, backend="torch")
    decisions, _ = policy.decide_all(SITES)
    assert decisions[3] == Decision("moba", 512, 5, "torch", "moba", "dense", (), "defaults (no rule matched)")
    assert (decisions[7].mode, decisions[7].block_size, decisions[7].top_k, decisions[7].backend) == (
        "dense", 512, 5, "torch")
    assert (decisions[0].mode, decisions[0].block_size, decisions[0].top_k) == ("moba", 64, 5)


def test_precedence_later_rules_override_field_by_field():
    policy = load_policy({
        "defaults": {"block_size": 256},
        "rules": [
            {"top_k": 5, "block_size": 1024, "decode": "dense"},          # every site
            {"layers": "-3:", "mode": "dense", "top_k": 7},                # last three
            {"match": "model.layers.5.self_attn", "block_size": 2048},    # the last one
        ]})
    decisions, warnings = policy.decide_all(SITES)
    assert warnings == []
    fields = [(d.mode, d.block_size, d.top_k, d.decode, d.matched_rules) for d in decisions]
    assert fields[:5] == [("moba", 1024, 5, "dense", (0,))] * 5
    assert fields[5:7] == [("dense", 1024, 7, "dense", (0, 1))] * 2
    assert fields[7] == ("dense", 2048, 7, "dense", (0, 1, 2))
    assert decisions[7].reason == (
        "rules[0] (all sites): block_size=1024, top_k=5, decode=dense; "
        "rules[1] (layers: -3:): mode=dense, top_k=7; "
        "rules[2] (match: 'model.layers.5.self_attn'): block_size=2048")


def test_precedence_is_file_order_not_specificity():
    specific_first = {"rules": [{"layers": -1, "mode": "dense"}, {"mode": "moba"}]}
    general_first = {"rules": [{"mode": "moba"}, {"layers": -1, "mode": "dense"}]}
    assert load_policy(specific_first).decide(SITES[-1], N).mode == "moba"
    assert load_policy(general_first).decide(SITES[-1], N).mode == "dense"


def test_reason_names_rule_its_label_and_what_it_set():
    policy = load_policy({"rules": [{"match": "nothing", "top_k": 9}, {"name": "x", "top_k": 2},
                                    {"layers": "-3:", "mode": "dense"}]})
    d = policy.decide(SITES[-1], N)
    assert d.matched_rules == (1, 2)
    assert d.reason == "rules[1] 'x' (all sites): top_k=2; rules[2] (layers: -3:): mode=dense"
    assert d.to_dict() == {"mode": "dense", "block_size": 512, "top_k": 2, "backend": "auto",
                           "decode": "moba", "on_unsupported": "dense", "matched_rules": [1, 2],
                           "reason": d.reason}
    json.dumps(d.to_dict())


def test_decide_rejects_layer_outside_num_layers():
    policy = load_policy({})
    with pytest.raises(ValueError, match="layer 8; expected 0 <= layer < num_layers \\(8\\)"):
        policy.decide(AttentionSite("x", "A", 8), 8)
    with pytest.raises(ValueError, match="num_layers must be an integer >= 1"):
        policy.decide(AttentionSite("x", "A", 0), 0)


# -------------------------------------------------------------------------------- warnings

def test_rule_matching_nothing_is_a_warning():
    policy = load_policy({"rules": [{"layers": 0, "top_k": 2}, {"layers": -1, "top_k": 4},
                                    {"match": "foo.*", "mode": "dense"}]})
    decisions, warnings = policy.decide_all(SITES)
    assert len(decisions) == N
    assert warnings == ["rules[2] (match: 'foo.*') matched no attention site"]


def test_warning_hints_name_typos_and_regex_written_as_glob():
    policy = load_policy({"rules": [
        {"match": "model.layers.1.self_atn", "mode": "dense"},
        {"match": "model\\.layers\\.\\d+\\.self_attn", "mode": "dense"},
        {"class": "LlamaAtention", "mode": "dense"}]})
    _, warnings = policy.decide_all(SITES)
    assert warnings == [
        "rules[0] (match: 'model.layers.1.self_atn') matched no attention site "
        "(did you mean 'model.layers.1.self_attn'?)",
        r"rules[1] (match: 'model\.layers\.\d+\.self_attn') matched no attention site "
        r"('model\.layers\.\d+\.self_attn' is a glob; for a regular expression write "
        r"'re:model\.layers\.\d+\.self_attn')",
        "rules[2] (class: 'LlamaAtention') matched no attention site (did you mean 'LlamaAttention'?)",
    ]


def test_layer_out_of_range_and_empty_slice_warnings():
    policy = load_policy({"rules": [{"layers": [0, 8, -9], "mode": "dense"}, {"layers": "5:2", "top_k": 1}]})
    _, warnings = policy.decide_all(SITES)
    assert warnings == [
        "rules[0] (layers: [0, 8, -9]): layer 8 is out of range for 8 attention layers (valid: 0..7 or -8..-1)",
        "rules[0] (layers: [0, 8, -9]): layer -9 is out of range for 8 attention layers (valid: 0..7 or -8..-1)",
        "rules[1] (layers: 5:2): slice '5:2' selects no layer of 8",
        "rules[1] (layers: 5:2) matched no attention site",
    ]


def test_shadowed_rule_warning():
    policy = load_policy({"rules": [{"layers": "-2:", "top_k": 4}, {"top_k": 2}]})
    _, warnings = policy.decide_all(SITES)
    assert warnings == ["rules[0] (layers: -2:) never decides anything: every field it sets is "
                        "overridden by later rules at every site it selects"]
    # A rule that still decides one field somewhere is not shadowed.
    policy = load_policy({"rules": [{"layers": "-2:", "top_k": 4, "mode": "dense"}, {"top_k": 2}]})
    assert policy.decide_all(SITES)[1] == []


def test_strict_turns_warnings_into_errors_with_file_and_line(tmp_path):
    path = tmp_path / "strict.yaml"
    path.write_text("version: 1\nstrict: true\nrules:\n  - layers: -1\n    mode: dense\n"
                    "  - match: 'foo.*'\n    mode: dense\n")
    policy = load_policy(path)
    with pytest.raises(PolicyError) as err:
        policy.decide_all(SITES)
    assert str(err.value) == (f"{path}:6 rules[1]: matched no attention site [rules[1] (match: 'foo.*')] "
                              "(an error because strict: true)")
    assert (err.value.line, err.value.key_path) == (6, "rules[1]")
    ok = load_policy({"strict": True, "rules": [{"layers": -1, "mode": "dense"}]})
    assert ok.decide_all(SITES)[1] == []


# ---------------------------------------------------------------------- formats and trips

POLICY_DICT = {
    "version": 1,
    "description": "one policy, three formats",
    "strict": False,
    "defaults": {"mode": "moba", "block_size": 1024, "top_k": 4, "backend": "torch", "decode": "dense",
                 "on_unsupported": "error"},
    "rules": [
        {"name": "vision", "class": ["VisionAttention"], "ignore": "re:.*\\.0\\..*", "mode": "dense"},
        {"match": ["model.layers.*.self_attn", "re:lm\\.x"], "layers": [0, "-3:", "::2"], "top_k": 2,
         "backend": "triton"},
        {"layers": -1, "block_size": 64, "decode": "moba", "on_unsupported": "dense"},
    ],
}

YAML_TEXT = """\
version: 1
description: one policy, three formats
strict: false
defaults: {mode: moba, block_size: 1024, top_k: 4, backend: torch, decode: dense, on_unsupported: error}
rules:
  - name: vision
    class: [VisionAttention]
    ignore: 're:.*\\.0\\..*'
    mode: dense
  - match:
      - model.layers.*.self_attn
      - 're:lm\\.x'
    layers: [0, "-3:", "::2"]
    top_k: 2
    backend: triton
  - layers: -1
    block_size: 64
    decode: moba
    on_unsupported: dense
"""

TOML_TEXT = """\
version = 1
description = "one policy, three formats"
strict = false

[defaults]
mode = "moba"
block_size = 1024
top_k = 4
backend = "torch"
decode = "dense"
on_unsupported = "error"

[[rules]]
name = "vision"
class = ["VisionAttention"]
ignore = 're:.*\\.0\\..*'
mode = "dense"

[[rules]]
match = ["model.layers.*.self_attn", 're:lm\\.x']
layers = [0, "-3:", "::2"]
top_k = 2
backend = "triton"

[[rules]]
layers = -1
block_size = 64
decode = "moba"
on_unsupported = "dense"
"""


def test_yaml_yml_toml_json_and_dict_give_identical_policies(tmp_path):
    files = {"p.yaml": YAML_TEXT, "p.yml": YAML_TEXT, "p.toml": TOML_TEXT,
             "p.json": json.dumps(POLICY_DICT, indent=2)}
    policies = []
    for name, text in files.items():
        (tmp_path / name).write_text(text)
        policies.append(load_policy(tmp_path / name))
    policies.append(load_policy(str(tmp_path / "p.yaml")))
    reference = load_policy(POLICY_DICT)
    assert all(p == reference for p in policies)
    assert [p.source for p in policies[:2]] == [str(tmp_path / "p.yaml"), str(tmp_path / "p.yml")]
    assert reference.source == "<dict>"
    assert [p.decide_all(SITES) for p in policies] == [reference.decide_all(SITES)] * len(policies)
    assert reference.decide(SITES[1], N).mode == "dense" and reference.decide(SITES[0], N).mode == "moba"


@pytest.mark.parametrize("ext", ["yaml", "yml", "json", "toml"])
def test_round_trip_dict_file_dict(tmp_path, ext):
    for source in [POLICY_DICT, {}, *EXAMPLES]:
        policy = load_policy(source)
        path = tmp_path / f"out.{ext}"
        dump_policy(policy, path)
        again = load_policy(path)
        assert again == policy
        assert again.to_dict() == policy.to_dict()
        assert load_policy(policy.to_dict()) == policy


def test_to_dict_is_plain_data_with_resolved_defaults():
    data = load_policy({"defaults": {"top_k": 4}, "rules": [{"match": "a", "layers": ["-3:"], "top_k": 2}]}).to_dict()
    assert data == {"version": 1, "strict": False,
                    "defaults": {"mode": "moba", "block_size": 512, "top_k": 4, "backend": "auto",
                                 "decode": "moba", "on_unsupported": "dense"},
                    "rules": [{"match": "a", "layers": "-3:", "top_k": 2}]}
    assert json.loads(json.dumps(data)) == data


def test_toml_writer_escapes_strings(tmp_path):
    policy = load_policy({"description": 'quote " back \\ tab \t del \x7f é', "rules": [
        {"name": "n'1", "match": "re:a\\.b\\d", "mode": "dense"}]})
    dump_policy(policy, tmp_path / "p.toml")
    assert load_policy(tmp_path / "p.toml") == policy


def test_yaml_base60_numbers_are_not_ints(tmp_path):
    """YAML 1.1 reads 1:30 as 90; a slice must stay a slice."""
    path = tmp_path / "p.yaml"
    path.write_text("rules:\n  - layers: 1:3\n    mode: dense\n")
    assert load_policy(path).rules[0].layers == ("1:3",)
    assert selected({"layers": "1:3", "mode": "dense"}) == NAMES[1:3]


def test_load_policy_accepts_a_policy_and_rejects_other_types():
    policy = load_policy({})
    assert isinstance(policy, Policy) and load_policy(policy) is policy
    with pytest.raises(TypeError, match="expects a path, a dict or a Policy, got int"):
        load_policy(3)


def test_examples_load_and_do_what_their_names_say():
    by_name = {p.stem: load_policy(p) for p in EXAMPLES}
    assert set(by_name) >= {"all_moba", "hybrid_last3_dense", "llama8b_1m_paper", "decode_dense"}
    for path in EXAMPLES:
        assert path.read_text().lstrip().startswith("#"), f"{path.name} must be documented by comments"
    llama = [AttentionSite(f"model.layers.{i}.self_attn", "LlamaAttention", i) for i in range(32)]
    modes = lambda name: [d.mode for d in by_name[name].decide_all(llama)[0]]  # noqa: E731
    assert modes("all_moba") == ["moba"] * 32
    assert modes("hybrid_last3_dense") == ["moba"] * 29 + ["dense"] * 3
    assert modes("decode_dense") == ["moba"] * 29 + ["dense"] * 3
    assert {d.decode for d in by_name["decode_dense"].decide_all(llama)[0]} == {"dense"}
    decisions, warnings = by_name["llama8b_1m_paper"].decide_all(llama)
    assert warnings == []
    assert [(d.mode, d.block_size, d.top_k) for d in decisions] == [("moba", 4096, 12)] * 29 + [
        ("dense", 4096, 12)] * 3
    with pytest.raises(PolicyError, match="matched no attention site"):   # strict, wrong model
        by_name["llama8b_1m_paper"].decide_all(SITES[:2])


# ----------------------------------------------------------------------------- starter file

def test_starter_policy_lists_sites_and_is_the_layer_wise_hybrid(tmp_path):
    llama = [AttentionSite(f"model.layers.{i}.self_attn", "LlamaAttention", i, num_heads=8,
                           num_kv_heads=2, head_dim=64, causal=True) for i in range(6)]
    text = starter_policy_yaml(llama, model_name="tiny-llama")
    assert "tiny-llama" in text
    for site in llama:
        assert any(site.name in line and line.startswith("#") for line in text.splitlines())
    assert "heads 8/2 kv, head_dim 64, causal" in text
    path = tmp_path / "starter.yaml"
    path.write_text(text)
    policy = load_policy(path)
    assert policy.defaults == Settings("moba", 512, 3, "auto", "moba", "dense")
    decisions, warnings = policy.decide_all(llama)
    assert warnings == []
    assert [d.mode for d in decisions] == ["moba"] * 3 + ["dense"] * 3
    # Every commented example is itself a valid rule for this model.
    examples = [line.replace("  # ", "  ", 1) for line in text.splitlines() if line.startswith("  # ")]
    rule_lines = [line for line in examples if not line.lstrip().startswith(("#", "Layer", "More"))]
    extra = yaml.safe_load("rules:\n" + "\n".join(rule_lines))
    assert len(extra["rules"]) == 5
    decisions, warnings = load_policy(extra).decide_all(llama)
    assert warnings == []


def test_starter_policy_for_small_or_empty_models_is_valid():
    two = [AttentionSite("", "Attn", 0), AttentionSite("blocks.1", "Attn", 1)]
    for sites in (two, []):
        text = starter_policy_yaml(sites)
        policy = load_policy(yaml.safe_load(text))
        assert policy.rules == ()
        assert all(d.mode == "moba" for d in policy.decide_all(sites)[0])
    assert "(root)" in starter_policy_yaml(two)


# ---------------------------------------------------------------------------------- schema

def test_published_schema_is_the_shipped_file_and_the_validator_tables():
    schema = policy_schema()
    assert schema == json.loads(SCHEMA_FILE.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    assert pol.TOP_KEYS == tuple(schema["properties"])
    assert pol.RULE_KEYS == ("name", *pol.SELECTOR_KEYS, *pol.SETTINGS_FIELDS)
    assert pol.SETTINGS_FIELDS == tuple(f.name for f in dataclasses.fields(Settings))
    assert pol.SETTINGS_FIELDS == tuple(f.name for f in dataclasses.fields(Decision) if f.name not in ("matched_rules", "reason"))
    assert pol.ENUMS == {"mode": ("moba", "dense"), "backend": ("auto", "reference", "torch", "triton", "flash_attn"),
                         "decode": ("moba", "dense"), "on_unsupported": ("dense", "error")}
    assert pol.MINIMUMS == {"block_size": 1, "top_k": 1, "dense_below": 1}
    from moba_rewrite.kernels import BACKENDS
    assert pol.ENUMS["backend"] == BACKENDS
    schema["properties"].clear()   # a copy: callers cannot change what is enforced
    assert policy_schema()["properties"]


def test_schema_accepts_every_example_and_starter_and_round_trip():
    validator = jsonschema.Draft202012Validator(policy_schema())
    sites = [AttentionSite(f"model.layers.{i}.self_attn", "LlamaAttention", i) for i in range(8)]
    documents = [yaml.safe_load(p.read_text()) for p in EXAMPLES]
    documents += [yaml.safe_load(starter_policy_yaml(sites)), POLICY_DICT, {},
                  load_policy(POLICY_DICT).to_dict()]
    for doc in documents:
        validator.validate(doc)


INVALID = [
    {"version": 2}, {"version": "1"}, {"strict": "yes"}, {"description": 3}, {"rule": []},
    {"top_k": 3}, {"defaults": []}, {"defaults": {"top_k": 0}}, {"defaults": {"block_size": -1}},
    {"defaults": {"block_size": "512"}}, {"defaults": {"block_size": True}},
    {"defaults": {"backend": "flash-attn"}}, {"defaults": {"mode": "sparse"}},
    {"defaults": {"decode": "off"}}, {"defaults": {"on_unsupported": "skip"}},
    {"defaults": {"topk": 3}}, {"rules": {}}, {"rules": ["x"]}, {"rules": [{}]},
    {"rules": [{"match": "x"}]}, {"rules": [{"targets": "x", "mode": "dense"}]},
    {"rules": [{"match": 3, "mode": "dense"}]}, {"rules": [{"match": [], "mode": "dense"}]},
    {"rules": [{"class": ["A", 1], "mode": "dense"}]}, {"rules": [{"ignore": None, "mode": "dense"}]},
    {"rules": [{"layers": "abc", "mode": "dense"}]}, {"rules": [{"layers": [], "mode": "dense"}]},
    {"rules": [{"layers": True, "mode": "dense"}]}, {"rules": [{"layers": "::0", "mode": "dense"}]},
    {"rules": [{"layers": "1:2:3:4", "mode": "dense"}]}, {"rules": [{"layers": "3", "mode": "dense"}]},
    {"rules": [{"layers": [0, [1]], "mode": "dense"}]}, {"rules": [{"name": 1, "mode": "dense"}]},
    {"rules": [{"top_k": 0}]}, {"rules": [{"mode": None}]},
]


@pytest.mark.parametrize("doc", INVALID, ids=[json.dumps(d) for d in INVALID])
def test_schema_rejects_what_the_validator_rejects(doc):
    with pytest.raises(PolicyError):
        load_policy(doc)
    assert not jsonschema.Draft202012Validator(policy_schema()).is_valid(doc)


# ------------------------------------------------------------------------------------ docs

def test_policy_md_examples_load_and_precedence_example_holds(tmp_path):
    text = (Path(__file__).parents[1] / "docs" / "POLICY.md").read_text()
    blocks = re.findall(r"```(yaml|toml)\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 3
    llama = [AttentionSite(f"model.layers.{i}.self_attn", "LlamaAttention", i) for i in range(32)]
    for n, (fmt, body) in enumerate(blocks):
        path = tmp_path / f"doc{n}.{fmt}"
        path.write_text(body)
        load_policy(path).decide_all(llama)
    precedence = next(load_policy(yaml.safe_load(body)) for fmt, body in blocks if "rules[2]" in body)
    decisions, _ = precedence.decide_all(llama)
    assert {(d.mode, d.block_size, d.top_k) for d in decisions[:29]} == {("moba", 1024, 5)}
    assert [(d.mode, d.block_size, d.top_k) for d in decisions[29:]] == [
        ("dense", 1024, 5), ("dense", 1024, 5), ("dense", 2048, 5)]
    assert decisions[31].matched_rules == (0, 1, 2)
    assert decisions[31].reason in " ".join(text.split())
