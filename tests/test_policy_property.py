"""Property tests: random rule sets never crash `decide` and always give the decision an
independent oracle (fnmatch / re / Python list slicing, applied in file order) predicts; random
junk never raises anything but PolicyError, and the JSON schema agrees with the validator."""

from __future__ import annotations

import fnmatch
import re

import jsonschema
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moba_rewrite.policy.core import ENUMS, SETTINGS_FIELDS, Decision, PolicyError, load_policy, policy_schema
from passes.sites import AttentionSite

FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

NAME_PARTS = st.sampled_from(["model", "layers", "blocks", "attn", "self_attn", "vision", "0", "1", "12"])
SITE_NAMES = st.lists(NAME_PARTS, min_size=0, max_size=4).map(".".join)
CLASSES = st.sampled_from(["LlamaAttention", "VisionAttention", "Attn", "MultiheadAttention"])


@st.composite
def models(draw) -> list[AttentionSite]:
    n = draw(st.integers(1, 10))
    return [AttentionSite(draw(SITE_NAMES), draw(CLASSES), i) for i in range(n)]


GLOBS = st.one_of(SITE_NAMES, st.sampled_from(["*", "model.*", "*.attn", "*layers.?.*", "[mv]*", "*1*", ""]))
REGEXES = st.sampled_from([r"re:.*", r"re:model\..*", r"re:.*\.(0|1)\..*", r"re:(vision|model)\.\w+",
                           r"re:.*attn", r"re:"])
PATTERNS = st.one_of(GLOBS, REGEXES)
PATTERN_FIELD = st.one_of(PATTERNS, st.lists(PATTERNS, min_size=1, max_size=3))
CLASS_FIELD = st.one_of(CLASSES, st.sampled_from(["*Attention", "re:.*Attn.*"]),
                        st.lists(CLASSES, min_size=1, max_size=2))
BOUND = st.one_of(st.none(), st.integers(-12, 12))
SLICES = st.builds(
    lambda a, b, c: f"{'' if a is None else a}:{'' if b is None else b}" + ("" if c is None else f":{c}"),
    BOUND, BOUND, st.one_of(st.none(), st.integers(-3, 3).filter(bool)))
LAYER_ITEM = st.one_of(st.integers(-12, 12), SLICES)
LAYER_FIELD = st.one_of(LAYER_ITEM, st.lists(LAYER_ITEM, min_size=1, max_size=3))
SETTING_VALUES = {"mode": st.sampled_from(ENUMS["mode"]), "block_size": st.integers(1, 8192),
                  "top_k": st.integers(1, 64), "backend": st.sampled_from(ENUMS["backend"]),
                  "decode": st.sampled_from(ENUMS["decode"]),
                  "on_unsupported": st.sampled_from(ENUMS["on_unsupported"]),
                  "dense_below": st.integers(1, 1 << 20)}


@st.composite
def rules(draw) -> dict:
    rule = {}
    for key, strategy in (("match", PATTERN_FIELD), ("class", CLASS_FIELD), ("layers", LAYER_FIELD),
                          ("ignore", PATTERN_FIELD), ("name", NAME_PARTS)):
        if draw(st.booleans()):
            rule[key] = draw(strategy)
    chosen = draw(st.lists(st.sampled_from(SETTINGS_FIELDS), min_size=1, max_size=4, unique=True))
    rule.update({key: draw(SETTING_VALUES[key]) for key in chosen})
    return rule


@st.composite
def policies(draw) -> dict:
    defaults = draw(st.fixed_dictionaries({}, optional={k: v for k, v in SETTING_VALUES.items()}))
    return {"version": 1, "defaults": defaults, "rules": draw(st.lists(rules(), max_size=6))}


def as_list(value):
    return value if isinstance(value, list) else [value]


def pattern_hits(pattern: str, text: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], text) is not None
    return fnmatch.fnmatchcase(text, pattern)


def oracle_selects(rule: dict, site: AttentionSite, n: int) -> bool:
    if "match" in rule and not any(pattern_hits(p, site.name) for p in as_list(rule["match"])):
        return False
    if "class" in rule and not any(pattern_hits(p, site.module_class) for p in as_list(rule["class"])):
        return False
    if "layers" in rule:
        chosen: set[int] = set()
        for item in as_list(rule["layers"]):
            if isinstance(item, int):
                if -n <= item < n:
                    chosen.add(list(range(n))[item])
            else:
                chosen.update(list(range(n))[slice(*(int(p) if p else None for p in item.split(":")))])
        if site.layer not in chosen:
            return False
    if "ignore" in rule and any(pattern_hits(p, site.name) for p in as_list(rule["ignore"])):
        return False
    return True


@FAST
@given(policies(), models())
def test_random_rule_sets_decide_like_the_oracle(data, sites):
    policy = load_policy(data)
    decisions, warnings = policy.decide_all(sites)
    assert len(decisions) == len(sites) and all(isinstance(w, str) for w in warnings)
    n = len(sites)
    base = {"mode": "moba", "block_size": 512, "top_k": 3, "backend": "auto", "decode": "moba",
            "on_unsupported": "dense", "dense_below": None, **data["defaults"]}
    for site, decision in zip(sites, decisions):
        assert isinstance(decision, Decision)
        expected = dict(base)
        matched = []
        for i, rule in enumerate(data["rules"]):
            if oracle_selects(rule, site, n):
                matched.append(i)
                expected.update({k: v for k, v in rule.items() if k in SETTINGS_FIELDS})
        assert decision.matched_rules == tuple(matched)
        assert {k: getattr(decision, k) for k in SETTINGS_FIELDS} == expected
        assert decision.mode in ENUMS["mode"] and decision.backend in ENUMS["backend"]
        assert decision.block_size >= 1 and decision.top_k >= 1
        assert decision.reason and all(f"rules[{i}]" in decision.reason for i in matched)
        assert decision == policy.decide(site, n)
    for i in range(len(data["rules"])):
        if not any(i in d.matched_rules for d in decisions):
            assert any(w.startswith(f"rules[{i}]") and "matched no attention site" in w for w in warnings)
    strict = load_policy({**data, "strict": True})
    try:
        assert strict.decide_all(sites)[1] == []
        assert warnings == []
    except PolicyError as err:
        assert warnings and "(an error because strict: true)" in str(err)


# Junk built from the format's own vocabulary, near-misses included. Left out on purpose: floats
# (JSON Schema counts 3.0 as an integer, the validator does not) and invalid regexes (a schema
# cannot check them; the validator does).
KEYS = st.sampled_from(["version", "strict", "defaults", "rules", "description", "name", "match", "class",
                        "layers", "ignore", "mode", "block_size", "top_k", "backend", "decode",
                        "on_unsupported", "dense_below", "rule", "topk", "targets"])
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-2, 3), st.sampled_from(
        ["moba", "dense", "auto", "torch", "triton", "flash_attn", "reference", "error", "sparse", "-3:",
         "0:4", "::2", "::0", "1:2:3:4", "abc", "3", "model.*", "re:.*", ""]))
JUNK = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                     st.dictionaries(KEYS, inner, max_size=4)), max_leaves=12)


@st.composite
def junk_policies(draw) -> dict:
    """A valid policy with 0-2 mutations (a key set to junk, or a key removed), or pure junk."""
    if draw(st.integers(0, 4)) == 0:
        return draw(st.dictionaries(KEYS, JUNK, max_size=4))
    doc = draw(policies())
    for _ in range(draw(st.integers(0, 2))):
        targets = [doc] + [v for v in (doc.get("defaults"),) if isinstance(v, dict)]
        if isinstance(doc.get("rules"), list):
            targets += [r for r in doc["rules"] if isinstance(r, dict)]
        target = targets[draw(st.integers(0, len(targets) - 1))]
        if target and draw(st.booleans()):
            del target[draw(st.sampled_from(sorted(target)))]
        else:
            target[draw(KEYS)] = draw(JUNK)
    return doc


SCHEMA_VALIDATOR = jsonschema.Draft202012Validator(policy_schema())


@FAST
@given(junk_policies())
def test_junk_raises_only_policy_error_and_schema_agrees(doc):
    try:
        load_policy(doc)
        accepted = True
    except PolicyError as err:
        accepted = False
        assert str(err).startswith("<dict>") and "\n" not in str(err)
    assert SCHEMA_VALIDATOR.is_valid(doc) == accepted, doc
