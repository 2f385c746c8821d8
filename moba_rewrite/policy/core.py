"""Per-site policies: which attention sites become MoBA, and with which parameters.

A policy (YAML, TOML, JSON or a dict; reference: docs/POLICY.md) has `defaults` and an ordered
list of `rules`. A rule selects sites with `match` (module-name glob or `re:` regex), `class`,
`layers` (index, slice string, list; negative = from the last layer) and `ignore`, and sets
any of the defaults' fields.

Precedence, the one rule: a site starts from `defaults`; then every rule that selects it is
applied in file order, and a field set by a later rule replaces the same field set by an
earlier one. Fields a rule does not set are left as they were. Selectors of one rule AND
together; a rule without selectors selects every site; `ignore` removes sites from that rule.

Public functions: `load_policy`, `policy_schema`, `starter_policy_yaml`, `dump_policy`;
classes `Policy`, `Decision`, `Settings`, `Rule`, `PolicyError`.
"""

from __future__ import annotations

import copy
import fnmatch
import functools
import json
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from moba_rewrite.policy.errors import KeyPath, PolicyError, describe, did_you_mean, format_path
from moba_rewrite.policy.formats import FORMATS, MAX_POLICY_BYTES, NO_LINES, Locator, dumps, parse_text

if TYPE_CHECKING:
    from passes.sites import AttentionSite

__all__ = [
    "Decision", "Policy", "PolicyError", "Rule", "Settings", "dump_policy", "load_policy",
    "policy_schema", "starter_policy_yaml",
]

Mode = Literal["moba", "dense"]
Backend = Literal["auto", "reference", "torch", "triton", "flash_attn"]
DecodeMode = Literal["moba", "dense"]
OnUnsupported = Literal["dense", "error"]

# The shipped schema is the single source of the format's keys, enums and bounds: the hand
# validator below reads its tables from it, so the published schema is the one enforced.
_SCHEMA_PATH = Path(__file__).with_name("schema.json")
_SCHEMA: dict[str, Any] = json.loads(_SCHEMA_PATH.read_text(encoding="utf-8"))
_DEFS = _SCHEMA["$defs"]

TOP_KEYS: tuple[str, ...] = tuple(_SCHEMA["properties"])
SETTINGS_FIELDS: tuple[str, ...] = tuple(_DEFS["settings"]["properties"])
RULE_KEYS: tuple[str, ...] = tuple(_DEFS["rule"]["properties"])
SELECTOR_KEYS: tuple[str, ...] = ("match", "class", "layers", "ignore")
ENUMS: dict[str, tuple[str, ...]] = {f: tuple(_DEFS[f]["enum"]) for f in SETTINGS_FIELDS if "enum" in _DEFS[f]}
MINIMUMS: dict[str, int] = {f: _DEFS[f]["minimum"] for f in SETTINGS_FIELDS if "minimum" in _DEFS[f]}
MAXIMUMS: dict[str, int] = {f: _DEFS[f]["maximum"] for f in SETTINGS_FIELDS if "maximum" in _DEFS[f]}
VERSION: int = _SCHEMA["properties"]["version"]["const"]
_SLICE_RX = re.compile(_DEFS["layer_item"]["oneOf"][1]["pattern"])
_ZERO_STEP_RX = re.compile(r"^\s*[+-]?[0-9]*\s*:\s*[+-]?[0-9]*\s*:\s*[+-]?0+\s*$")

# Aliases people bring from other tools: a hint, never accepted silently.
_KEY_HINTS = {
    "targets": "match", "target": "match", "regex": "match", "pattern": "match", "name_pattern": "match",
    "module": "match", "modules": "match", "exclude": "ignore", "skip": "ignore",
    "layers_to_transform": "layers", "layer": "layers", "classes": "class", "module_class": "class",
    "topk": "top_k", "k": "top_k", "block": "block_size", "chunk_size": "block_size",
    "moba_chunk_size": "block_size", "moba_topk": "top_k", "kernel": "backend",
}


def policy_schema() -> dict[str, Any]:
    """The JSON Schema of the policy format (a copy of the one the validator reads its rules from)."""
    return copy.deepcopy(_SCHEMA)


# ----------------------------------------------------------------------------- dataclasses

@dataclass(frozen=True)
class Settings:
    """The per-site values a policy decides. Built-in defaults: MoBA, block 512, top-3."""

    mode: Mode = "moba"
    block_size: int = 512
    top_k: int = 3
    backend: Backend = "auto"
    decode: DecodeMode = "moba"
    on_unsupported: OnUnsupported = "dense"
    dense_below: int | None = None  # full attention for calls with fewer keys (a change of semantics)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if out["dense_below"] is None:  # not set: absent from files and dicts
            del out["dense_below"]
        return out


@dataclass(frozen=True)
class Decision:
    """What one site gets. `block_size`/`top_k`/`backend`/`decode` only matter for mode `moba`.

    `matched_rules` are the indices of the rules that selected the site (file order), and
    `reason` spells out what each of them set, e.g. `rules[2] (layers: -3:): mode=dense`.
    """

    mode: Mode
    block_size: int
    top_k: int
    backend: Backend
    decode: DecodeMode
    on_unsupported: OnUnsupported
    matched_rules: tuple[int, ...] = ()
    reason: str = "defaults (no rule matched)"
    dense_below: int | None = None  # full attention for calls with fewer keys (policy `dense_below`)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["matched_rules"] = list(self.matched_rules)
        if out["dense_below"] is None:  # not set: absent, as in the policy file
            del out["dense_below"]
        return out


@dataclass(frozen=True)
class Rule:
    """One entry of `rules`: selectors (None = not given) and the fields it sets (None = not set)."""

    index: int
    name: str | None = None
    match: tuple[str, ...] | None = None
    classes: tuple[str, ...] | None = None
    layers: tuple[int | str, ...] | None = None
    ignore: tuple[str, ...] | None = None
    mode: Mode | None = None
    block_size: int | None = None
    top_k: int | None = None
    backend: Backend | None = None
    decode: DecodeMode | None = None
    on_unsupported: OnUnsupported | None = None
    dense_below: int | None = None

    def overrides(self) -> dict[str, Any]:
        """The fields this rule sets, in the schema's order."""
        return {f: getattr(self, f) for f in SETTINGS_FIELDS if getattr(self, f) is not None}

    def selects(self, site: AttentionSite, num_layers: int) -> bool:
        """All given selectors hold and no `ignore` pattern matches the site's name."""
        if self.match is not None and not any(_pattern(p).fullmatch(site.name) for p in self.match):
            return False
        if self.classes is not None and not any(_pattern(p).fullmatch(site.module_class) for p in self.classes):
            return False
        if self.layers is not None and not any(_layer_hit(item, site.layer, num_layers) for item in self.layers):
            return False
        if self.ignore is not None and any(_pattern(p).fullmatch(site.name) for p in self.ignore):
            return False
        return True

    def label(self) -> str:
        """`rules[2] 'tail' (layers: -3:)`: how warnings and reasons name this rule."""
        parts = []
        for key, value in (("match", self.match), ("class", self.classes), ("layers", self.layers),
                           ("ignore", self.ignore)):
            if value is None:
                continue
            shown = [str(v) if key == "layers" else _quoted(v) for v in value]
            parts.append(f"{key}: {shown[0] if len(shown) == 1 else '[' + ', '.join(shown) + ']'}")
        name = f" {self.name!r}" if self.name is not None else ""
        return f"rules[{self.index}]{name} ({', '.join(parts) if parts else 'all sites'})"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.name is not None:
            out["name"] = self.name
        for key, value in (("match", self.match), ("class", self.classes), ("layers", self.layers),
                           ("ignore", self.ignore)):
            if value is not None:
                out[key] = value[0] if len(value) == 1 else list(value)
        out.update(self.overrides())
        return out


@dataclass(frozen=True)
class Policy:
    """A validated policy. Compare with `==` (the file it came from is not part of equality).

    Precedence: defaults, then every selecting rule in file order, later rules overriding
    earlier ones field by field (see the module docstring and docs/POLICY.md).
    """

    defaults: Settings = Settings()
    rules: tuple[Rule, ...] = ()
    strict: bool = False
    version: int = VERSION
    description: str | None = None
    source: str = field(default="<dict>", compare=False)
    rule_lines: tuple[int | None, ...] = field(default=(), compare=False, repr=False)

    def decide(self, site: AttentionSite, num_layers: int) -> Decision:
        """The decision for one site of a model with `num_layers` attention sites (layers)."""
        if not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"num_layers must be an integer >= 1, got {num_layers!r}")
        if not 0 <= site.layer < num_layers:
            raise ValueError(f"site {site.name!r} has layer {site.layer}; expected 0 <= layer < "
                             f"num_layers ({num_layers})")
        values = {**self.defaults.to_dict(), "dense_below": self.defaults.dense_below}
        matched: list[int] = []
        reasons: list[str] = []
        for rule in self.rules:
            if rule.selects(site, num_layers):
                changes = rule.overrides()
                values.update(changes)
                matched.append(rule.index)
                reasons.append(f"{rule.label()}: " + ", ".join(f"{k}={v}" for k, v in changes.items()))
        reason = "; ".join(reasons) if reasons else "defaults (no rule matched)"
        return Decision(**values, matched_rules=tuple(matched), reason=reason)

    def decide_all(self, sites: list[AttentionSite]) -> tuple[list[Decision], list[str]]:
        """Decisions for all sites of one model, plus warnings about the policy against it.

        `num_layers` is 1 + the largest site layer. Warnings: a rule that selects no site, a
        layer index out of range or a slice that selects no layer, a rule whose every field is
        overridden by later rules at every site it selects. With `strict: true` the first
        warning is raised as a PolicyError instead (naming the rule's line).
        """
        num_layers = max((s.layer for s in sites), default=-1) + 1
        decisions = [self.decide(s, num_layers) for s in sites]
        problems: list[tuple[Rule, str, str]] = []  # (rule, key path suffix, detail)
        decisive: set[int] = set()
        for site, decision in zip(sites, decisions):
            last_setter: dict[str, int] = {}
            for index in decision.matched_rules:
                for key in self.rules[index].overrides():
                    last_setter[key] = index
            decisive.update(last_setter.values())
        hit_rules = set().union(*(d.matched_rules for d in decisions))
        for rule in self.rules:
            problems += [(rule, "layers", d) for d in _layer_problems(rule, num_layers)]
            if rule.index not in hit_rules:
                problems.append((rule, "", "matched no attention site" + _no_match_hint(rule, sites)))
            elif rule.index not in decisive:
                problems.append((rule, "", "never decides anything: every field it sets is overridden "
                                           "by later rules at every site it selects"))
        if problems and self.strict:
            rule, suffix, detail = problems[0]
            line = self.rule_lines[rule.index] if rule.index < len(self.rule_lines) else None
            path = f"rules[{rule.index}]" + (f".{suffix}" if suffix else "")
            raise PolicyError(self.source, line, path,
                              f"{detail} [{rule.label()}] (an error because strict: true)")
        warnings = [f"{rule.label()} {detail}" if not suffix else f"{rule.label()}: {detail}"
                    for rule, suffix, detail in problems]
        return decisions, warnings

    def to_dict(self) -> dict[str, Any]:
        """Plain data that `load_policy` turns back into an equal Policy (any format)."""
        out: dict[str, Any] = {"version": self.version}
        if self.description is not None:
            out["description"] = self.description
        out["strict"] = self.strict
        out["defaults"] = self.defaults.to_dict()
        out["rules"] = [r.to_dict() for r in self.rules]
        return out


# ------------------------------------------------------------------------------- matching

def _quoted(text: str) -> str:
    """'text' as written in the file: quotes, but backslashes of regexes left single."""
    return f"'{text}'"


@functools.lru_cache(maxsize=1024)
def _pattern(pattern: str) -> re.Pattern[str]:
    """`re:...` -> that regex; anything else is a glob (`*` crosses dots). Use with fullmatch."""
    if pattern.startswith("re:"):
        return re.compile(pattern[3:])
    return re.compile(fnmatch.translate(pattern))


def _parse_slice(text: str) -> slice:
    parts = [p.strip() for p in text.split(":")]
    return slice(*(int(p) if p else None for p in parts))


def _layer_hit(item: int | str, layer: int, num_layers: int) -> bool:
    if isinstance(item, int):
        return (item + num_layers if item < 0 else item) == layer
    return layer in range(*_parse_slice(item).indices(num_layers))


def _layer_problems(rule: Rule, num_layers: int) -> list[str]:
    out = []
    for item in rule.layers or ():
        if isinstance(item, int):
            if not -num_layers <= item < num_layers:
                valid = f"0..{num_layers - 1} or -{num_layers}..-1" if num_layers else "none"
                out.append(f"layer {item} is out of range for {num_layers} attention layers (valid: {valid})")
        elif not range(*_parse_slice(item).indices(num_layers)):
            out.append(f"slice {item!r} selects no layer of {num_layers}")
    return out


def _no_match_hint(rule: Rule, sites: list[AttentionSite]) -> str:
    hints = []
    for pattern in rule.match or ():
        if pattern.startswith("re:"):
            continue
        if any(c in pattern for c in "\\+()^$|{}"):
            hints.append(f"{_quoted(pattern)} is a glob; for a regular expression write 're:{pattern}'")
        elif not any(c in pattern for c in "*?["):
            hints.append(did_you_mean(pattern, [s.name for s in sites]).strip(" ()"))
    for pattern in rule.classes or ():
        if not pattern.startswith("re:") and not any(c in pattern for c in "*?["):
            hints.append(did_you_mean(pattern, sorted({s.module_class for s in sites})).strip(" ()"))
    hints = [h for h in hints if h]
    return f" ({'; '.join(hints)})" if hints else ""


# ----------------------------------------------------------------------------- validation

class _Checker:
    """Walks raw policy data in file order and builds a Policy, failing on the first problem."""

    def __init__(self, source: str, locator: Locator):
        self.source = source
        self.locator = locator

    def fail(self, path: KeyPath, detail: str, at: KeyPath | None = None) -> PolicyError:
        line = self.locator.line_of(at if at is not None else path)
        return PolicyError(self.source, line, format_path(path), detail)

    def keys(self, data: Mapping[Any, Any], path: KeyPath, allowed: tuple[str, ...], what: str) -> None:
        for key in data:
            if not isinstance(key, str):
                raise self.fail(path, f"expected text keys in {what}, got the key {describe(key)}",
                                at=path + (str(key),))
            if key in allowed:
                continue
            hint = did_you_mean(key, allowed)
            if not hint and key in _KEY_HINTS and _KEY_HINTS[key] in allowed:
                hint = f" (did you mean {_KEY_HINTS[key]!r}?)"
            if not hint and what == "the policy" and key in SETTINGS_FIELDS:
                hint = f" ({key!r} belongs under 'defaults:' or in a rule)"
            raise self.fail(path, f"unknown key {key!r}{hint}; expected one of: {', '.join(allowed)}",
                            at=path + (key,))

    def mapping(self, value: Any, path: KeyPath, what: str) -> Mapping[Any, Any]:
        if not isinstance(value, Mapping):
            raise self.fail(path, f"expected a mapping ({what}), got {describe(value)}")
        return value

    def policy(self, data: Any) -> Policy:
        if data is None:
            raise self.fail((), "expected a mapping with keys version, defaults, rules; the file is empty")
        data = self.mapping(data, (), "with keys version, strict, defaults, rules")
        self.keys(data, (), TOP_KEYS, "the policy")
        version, description, strict = VERSION, None, False
        defaults, rules = Settings(), ()
        for key, value in data.items():  # file order, so the first problem reported is the first written
            if key == "version":
                if isinstance(value, bool) or not isinstance(value, int) or value != VERSION:
                    raise self.fail((key,), f"expected {VERSION} (the only policy format version), "
                                            f"got {describe(value)}")
            elif key == "description":
                if not isinstance(value, str):
                    raise self.fail((key,), f"expected a string, got {describe(value)}")
                description = value
            elif key == "strict":
                if not isinstance(value, bool):
                    raise self.fail((key,), f"expected true or false, got {describe(value)}")
                strict = value
            elif key == "defaults":
                raw = self.mapping(value, (key,), "of settings")
                self.keys(raw, (key,), SETTINGS_FIELDS, "defaults")
                defaults = Settings(**{k: self.setting(k, v, (key, k)) for k, v in raw.items()})
            else:  # rules
                if not isinstance(value, list):
                    raise self.fail((key,), f"expected a list of rules, got {describe(value)}")
                rules = tuple(self.rule(raw, i) for i, raw in enumerate(value))
        lines = tuple(self.locator.line_of(("rules", i)) for i in range(len(rules)))
        return Policy(defaults=defaults, rules=rules, strict=strict, version=VERSION,
                      description=description, source=self.source, rule_lines=lines)

    def setting(self, key: str, value: Any, path: KeyPath) -> Any:
        if key in ENUMS:
            choices = ENUMS[key]
            if not isinstance(value, str) or value not in choices:
                hint = did_you_mean(value, choices) if isinstance(value, str) else ""
                raise self.fail(path, f"expected one of {', '.join(map(repr, choices))}, "
                                      f"got {describe(value)}{hint}")
            return value
        minimum, maximum = MINIMUMS[key], MAXIMUMS.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.fail(path, f"expected an integer >= {minimum}, got {describe(value)}")
        if maximum is not None and value > maximum:  # the op's int arguments are 64-bit in traced graphs
            raise self.fail(path, f"expected an integer <= {maximum} (2**31 - 1), got {describe(value)}")
        return value

    def rule(self, raw: Any, i: int) -> Rule:
        path: KeyPath = ("rules", i)
        raw = self.mapping(raw, path, "a rule: selectors match/class/layers/ignore and settings")
        self.keys(raw, path, RULE_KEYS, "a rule")
        kwargs: dict[str, Any] = {"index": i}
        for key, value in raw.items():
            at = path + (key,)
            if key == "name":
                if not isinstance(value, str):
                    raise self.fail(at, f"expected a string, got {describe(value)}")
                kwargs["name"] = value
            elif key in ("match", "class", "ignore"):
                kwargs["classes" if key == "class" else key] = self.patterns(value, at, key)
            elif key == "layers":
                kwargs["layers"] = self.layers(value, at)
            else:
                kwargs[key] = self.setting(key, value, at)
        if not any(key in raw for key in SETTINGS_FIELDS):
            raise self.fail(path, f"a rule must set at least one of {', '.join(SETTINGS_FIELDS)}; "
                                  "this one only selects sites")
        return Rule(**kwargs)

    def patterns(self, value: Any, path: KeyPath, key: str) -> tuple[str, ...]:
        what = "class name" if key == "class" else "module-name"
        items = value if isinstance(value, list) else [value]
        if not items or not all(isinstance(p, str) for p in items):
            raise self.fail(path, f"expected a {what} pattern (glob or 're:' regex) or a non-empty "
                                  f"list of them, got {describe(value)}")
        for n, pattern in enumerate(items):
            if not pattern.startswith("re:"):
                continue  # a glob always translates to a valid regex: compiled when first matched
            try:
                _pattern(pattern)
            except re.error as err:
                where = path + (n,) if isinstance(value, list) else path
                raise self.fail(where, f"expected a valid regular expression after 're:', got "
                                       f"{pattern[3:]!r} ({err})") from None
        return tuple(items)

    def layers(self, value: Any, path: KeyPath) -> tuple[int | str, ...]:
        items = value if isinstance(value, list) else [value]
        if not items:
            raise self.fail(path, "expected a layer index, a slice like '-3:' or '0:4', or a "
                                  "non-empty list of these, got an empty list")
        out: list[int | str] = []
        for n, item in enumerate(items):
            where = path + (n,) if isinstance(value, list) else path
            if isinstance(item, int) and not isinstance(item, bool):
                out.append(item)
            elif isinstance(item, str) and _SLICE_RX.match(item):
                out.append("".join(item.split()))
            elif isinstance(item, str) and _ZERO_STEP_RX.match(item):
                raise self.fail(where, f"expected a non-zero slice step, got {item!r}")
            elif isinstance(item, str):
                raise self.fail(where, "expected a slice 'start:stop[:step]' of integers (e.g. '-3:', "
                                       f"'0:4', '::2') or an integer, got {item!r}")
            else:
                raise self.fail(where, "expected a layer index, a slice like '-3:' or '0:4', or a "
                                       f"non-empty list of these, got {describe(item)}")
        return tuple(out)


# --------------------------------------------------------------------------------- loading

def load_policy(source: str | os.PathLike[str] | Mapping[str, Any] | Policy) -> Policy:
    """Read and validate a policy: a .yaml/.yml, .toml or .json file, a dict, or a Policy.

    Raises PolicyError (a ValueError) with `file:line key.path: expected ...` for anything
    wrong, including a missing file or malformed syntax. A `str` is always a path.
    """
    if isinstance(source, Policy):
        return source
    if isinstance(source, Mapping):
        return _Checker("<dict>", NO_LINES).policy(source)
    if not isinstance(source, str | os.PathLike):
        raise TypeError(f"load_policy expects a path, a dict or a Policy, got {type(source).__name__}")
    path = Path(os.fspath(source))
    name = os.fspath(source)
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise PolicyError(name, None, "", "expected a policy file ending in .yaml, .yml, .toml or "
                                          f".json, got {path.suffix or 'no extension'!r}")
    try:
        text = _read_policy_text(path, name)
    except FileNotFoundError:
        raise PolicyError(name, None, "", "policy file not found") from None
    except IsADirectoryError:
        raise PolicyError(name, None, "", "expected a policy file, got a directory") from None
    except UnicodeDecodeError as err:
        raise PolicyError(name, None, "", f"expected UTF-8 text ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise PolicyError(name, None, "", f"cannot read the policy file ({err.strerror})") from None
    data, locator = parse_text(text, fmt, name)
    return _Checker(name, locator).policy(data)


def _read_policy_text(path: Path, name: str) -> str:
    """The file's text: a regular file of at most MAX_POLICY_BYTES (a FIFO would block forever)."""
    info = path.stat()
    if stat.S_ISDIR(info.st_mode):
        raise IsADirectoryError(name)
    if not stat.S_ISREG(info.st_mode):
        raise PolicyError(name, None, "", "expected a regular policy file, got a special file (FIFO, device "
                                          "or socket)")
    if info.st_size > MAX_POLICY_BYTES:
        raise PolicyError(name, None, "", f"expected a policy file of at most {MAX_POLICY_BYTES >> 20} MiB, "
                                          f"got {info.st_size / 2**20:.1f} MiB")
    return path.read_text(encoding="utf-8")


def dump_policy(policy: Policy, path: str | os.PathLike[str]) -> None:
    """Write `policy` to `path` in the format its extension names (.yaml/.yml, .toml, .json)."""
    fmt = FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise ValueError(f"expected a path ending in .yaml, .yml, .toml or .json, got {os.fspath(path)!r}")
    Path(path).write_text(dumps(policy.to_dict(), fmt), encoding="utf-8")


def starter_policy_yaml(sites: list[AttentionSite], model_name: str = "") -> str:
    """The commented starter file `moba-rewrite policy init` writes (see policy_starter)."""
    from moba_rewrite.policy.starter import starter_yaml

    return starter_yaml(sites, model_name)


assert tuple(f.name for f in fields(Settings)) == SETTINGS_FIELDS, "schema and Settings disagree"
