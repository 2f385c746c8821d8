"""Reading and writing policy files: YAML, TOML and JSON, with line numbers for messages.

`parse_text(text, fmt, source)` returns the plain data (dicts, lists, scalars) and a
`Locator` that maps a key path such as `("rules", 1, "top_k")` to the 1-based line where it
is written, so validation errors can say `hybrid.yaml:7`. Lines come from the parsers
themselves where they can give them: YAML node marks, the JSON scanner's positions; TOML has
no positions in `tomllib`, so its lines are a best-effort search of the text.

Hostile files are bounded: parsing and locating are linear in the file; nesting deeper than
`MAX_DEPTH` levels (a policy needs four) is refused with the line where it happens, before
any recursive parser sees it; YAML aliases are never walked twice, and a document whose
aliases would expand past `MAX_EXPANDED_VALUES` values (an alias bomb) is refused.

`dumps(data, fmt)` writes data back (TOML by a small writer that covers the policy shape:
top-level scalars, one level of tables, arrays of tables).
"""

from __future__ import annotations

import bisect
import json
import json.decoder
import json.scanner
import re
import tomllib
from collections.abc import Callable
from typing import Any

import yaml

from moba_rewrite.policy.errors import KeyPath, PolicyError, format_path

FORMATS: dict[str, str] = {".yaml": "yaml", ".yml": "yaml", ".toml": "toml", ".json": "json"}

MAX_POLICY_BYTES = 16 << 20  # a policy with 100k rules fits; a bigger file is a mistake
MAX_DEPTH = 32  # nesting levels (a policy needs 4: rules[i].match[j])
MAX_EXPANDED_VALUES = 1_000_000  # values a YAML document may hold once its aliases are expanded


class Locator:
    """Key path -> 1-based line; falls back to the nearest enclosing key that has a line."""

    def __init__(self, lines: dict[KeyPath, int] | None = None,
                 search: Callable[[KeyPath], int | None] | None = None):
        self._lines = lines or {}
        self._search = search

    def line_of(self, path: KeyPath) -> int | None:
        path = tuple(path)
        while True:
            line = self._lines.get(path)
            if line is None and self._search is not None:
                line = self._search(path)
            if line is not None or not path:
                return line
            path = path[:-1]


NO_LINES = Locator()


class _LineIndex:
    """Offset -> 1-based line in O(log n), from one pass over the text."""

    def __init__(self, text: str) -> None:
        self._starts = [m.end() for m in re.finditer("\n", text)]

    def line_at(self, offset: int) -> int:
        return bisect.bisect_right(self._starts, offset) + 1


def _too_deep(source: str, line: int | None) -> PolicyError:
    return PolicyError(source, line, "", f"expected at most {MAX_DEPTH} levels of nesting (a policy needs 4), "
                                         "got deeper")


# Strings (where brackets do not count), comments (TOML) and brackets, for the depth scan.
_JSON_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]')
_TOML_TOKENS = re.compile(r'"""(?:[^\\]|\\.)*?"""|\'\'\'[\s\S]*?\'\'\'|"(?:[^"\\\n]|\\.)*"|\'[^\'\n]*\''
                          r'|#[^\n]*|[\[\]{}]')


def _check_depth(text: str, tokens: re.Pattern[str], source: str) -> None:
    """Refuse nesting beyond MAX_DEPTH (recursive parsers would hit Python's recursion limit)."""
    depth = 0
    for m in tokens.finditer(text):
        c = m.group()
        if c in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                raise _too_deep(source, text.count("\n", 0, m.start()) + 1)
        elif c in "]}":
            depth -= 1


def parse_text(text: str, fmt: str, source: str) -> tuple[Any, Locator]:
    """Parse `text` as `fmt` ('yaml' | 'toml' | 'json'); malformed syntax raises PolicyError."""
    if fmt == "yaml":
        return _parse_yaml(text, source)
    if fmt == "json":
        _check_depth(text, _JSON_TOKENS, source)
        return _parse_json(text, source)
    if fmt == "toml":
        _check_depth(text, _TOML_TOKENS, source)
        return _parse_toml(text, source)
    raise ValueError(f"unknown policy format {fmt!r}, expected one of yaml, toml, json")


# --------------------------------------------------------------------------------------- YAML

class _YamlLoader(yaml.SafeLoader):
    """SafeLoader without YAML 1.1's base-60 numbers, so `layers: 1:30` is never the int 90,
    and with nesting limited to MAX_DEPTH while composing (the composer recurses)."""

    _depth = 0

    def compose_node(self, parent, index):  # noqa: D102
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise yaml.MarkedYAMLError(problem=f"nesting deeper than {MAX_DEPTH} levels",
                                           problem_mark=self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


_INT, _FLOAT = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
_YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (_INT, _FLOAT)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_YamlLoader.add_implicit_resolver(
    _INT,
    re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"),
)
_YamlLoader.add_implicit_resolver(
    _FLOAT,
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                   |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                   |[-+]?\.(?:inf|Inf|INF)
                   |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def _parse_yaml(text: str, source: str) -> tuple[Any, Locator]:
    try:
        loader = _YamlLoader(text)  # the reader refuses control characters right here
    except yaml.reader.ReaderError as err:
        line = text.count("\n", 0, err.position) + 1
        char = f"#x{err.character:04x}" if isinstance(err.character, int) else repr(err.character)
        raise PolicyError(source, line, "", f"malformed YAML: unacceptable character {char} ({err.reason})") from None
    try:
        node = loader.get_single_node()
        lines: dict[KeyPath, int] = {}
        if node is not None:
            lines[()] = node.start_mark.line + 1
            expanded = _yaml_lines(node, (), lines, source, {})
            if expanded > MAX_EXPANDED_VALUES:
                raise PolicyError(source, None, "", f"expected at most {MAX_EXPANDED_VALUES:,} values once YAML "
                                                    f"aliases are expanded, got {expanded:,} (aliases of aliases)")
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        line = mark.line + 1 if mark is not None else None
        if err.problem and err.problem.startswith("nesting deeper"):
            raise _too_deep(source, line) from None
        problem = err.problem or err.context or "syntax error"
        if err.context and problem.startswith("but "):
            problem = f"{err.context}, {problem}"
        column = f" (column {mark.column + 1})" if mark is not None else ""
        hint = ""
        if "mapping values are not allowed" in problem:
            hint = "; quote values that contain ': ' or end in ':', e.g. layers: \"-3:\""
        raise PolicyError(source, line, "", f"malformed YAML: {problem}{column}{hint}") from None
    except yaml.YAMLError as err:
        raise PolicyError(source, None, "", f"malformed YAML: {err}") from None
    finally:
        loader.dispose()
    return data, Locator(lines)


_IN_PROGRESS = -1


def _yaml_lines(node: yaml.Node, path: KeyPath, lines: dict[KeyPath, int], source: str,
                expanded: dict[int, int]) -> int:
    """Record key lines under `node`, each node once (an alias's target is walked where it is
    first written; paths through later aliases fall back to the alias's own line). Returns how
    many values the node holds with aliases expanded (memoised in `expanded`, so linear)."""
    known = expanded.get(id(node))
    if known == _IN_PROGRESS:
        raise PolicyError(source, node.start_mark.line + 1, format_path(path),
                          "expected no alias that contains itself (a recursive YAML structure)")
    if known is not None:
        return known
    expanded[id(node)] = _IN_PROGRESS
    total = 1
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                total += _yaml_lines(value_node, path, {}, source, expanded)
                continue
            key = key_node.value
            line = key_node.start_mark.line + 1
            if key in seen:
                raise PolicyError(source, line, format_path(path),
                                  f"duplicate key {key!r} (first written at line {seen[key]})")
            seen[key] = line
            lines[path + (key,)] = line
            total += _yaml_lines(value_node, path + (key,), lines, source, expanded)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[path + (i,)] = item.start_mark.line + 1
            total += _yaml_lines(item, path + (i,), lines, source, expanded)
    expanded[id(node)] = total
    return total


def _parse_json(text: str, source: str) -> tuple[Any, Locator]:
    where: dict[int, dict[Any, int]] = {}  # id(container) -> {key or index: offset of value}
    duplicate: list[tuple[int, str, int, int]] = []  # (id(obj), key, offset, first offset)

    def parse_object(s_and_end, strict, scan_once, object_hook, object_pairs_hook, memo=None):
        offsets: list[int] = []

        def scan_value(string: str, idx: int):
            offsets.append(idx)
            return scan_once(string, idx)

        pairs, end = json.decoder.JSONObject(s_and_end, strict, scan_value, None,
                                             lambda p: p, memo)
        obj: dict[str, Any] = {}
        positions: dict[Any, int] = {}
        for (key, value), offset in zip(pairs, offsets):
            if key in obj and not duplicate:
                duplicate.append((id(obj), key, offset, positions[key]))
            obj[key] = value
            positions[key] = offset
        where[id(obj)] = positions
        return obj, end

    def parse_array(s_and_end, scan_once):
        offsets: list[int] = []

        def scan_value(string: str, idx: int):
            offsets.append(idx)
            return scan_once(string, idx)

        values, end = json.decoder.JSONArray(s_and_end, scan_value)
        where[id(values)] = dict(enumerate(offsets))
        return values, end

    decoder = json.JSONDecoder()
    decoder.parse_object = parse_object
    decoder.parse_array = parse_array
    decoder.scan_once = json.scanner.py_make_scanner(decoder)
    try:
        data = decoder.decode(text)
    except json.JSONDecodeError as err:
        raise PolicyError(source, err.lineno, "", f"malformed JSON: {err.msg} (column {err.colno})") from None

    line_at = _LineIndex(text).line_at

    lines: dict[KeyPath, int] = {}

    def walk(obj: Any, path: KeyPath) -> None:
        positions = where.get(id(obj))
        if positions is None:
            return
        items = obj.items() if isinstance(obj, dict) else enumerate(obj)
        for key, value in items:
            lines[path + (key,)] = line_at(positions[key])
            check_duplicate(value, path + (key,))
            walk(value, path + (key,))

    def check_duplicate(obj: Any, path: KeyPath) -> None:
        if duplicate and id(obj) == duplicate[0][0]:
            _, key, offset, first = duplicate[0]
            raise PolicyError(source, line_at(offset), format_path(path),
                              f"duplicate key {key!r} (first written at line {line_at(first)})")

    lines[()] = line_at(len(text) - len(text.lstrip()))
    check_duplicate(data, ())
    walk(data, ())
    return data, Locator(lines)


# --------------------------------------------------------------------------------------- TOML

_TOML_POS = re.compile(r"\s*\(at line (\d+), column (\d+)\)\s*$")
_TOML_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\]]*?)\s*\]\]?\s*(#.*)?$")


def _parse_toml(text: str, source: str) -> tuple[Any, Locator]:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        msg = str(err)
        found = _TOML_POS.search(msg)
        line = int(found.group(1)) if found else None
        if found:
            msg = f"{msg[:found.start()]} (column {found.group(2)})"
        raise PolicyError(source, line, "", f"malformed TOML: {msg}") from None
    if not data:
        data = None  # only comments or blank lines: an empty file, as in YAML
    return data, Locator(search=_toml_search(text))


def _toml_search(text: str) -> Callable[[KeyPath], int | None]:
    """Best-effort line lookup: tomllib keeps no positions, so find headers and `key =` lines."""
    lines = text.splitlines()
    sections: list[tuple[str, bool, int]] = []  # (table name, is array-of-tables, 0-based line)
    for n, line in enumerate(lines):
        m = _TOML_HEADER.match(line)
        if m and not line.lstrip().startswith("#"):
            sections.append((m.group(2).strip().strip('"\''), m.group(1) == "[[", n))

    def key_line(key: str, start: int, stop: int) -> int | None:
        rx = re.compile(rf"""^\s*(?:{re.escape(key)}|"{re.escape(key)}"|'{re.escape(key)}')\s*[=.]""")
        for n in range(start, stop):
            if rx.match(lines[n]):
                return n + 1
        return None

    # (name, is array-of-tables) -> spans of its sections in file order: one pass, O(1) lookups
    spans: dict[tuple[str, bool], list[tuple[int, int]]] = {}
    for k, (sname, is_array, n) in enumerate(sections):
        stop = sections[k + 1][2] if k + 1 < len(sections) else len(lines)
        spans.setdefault((sname, is_array), []).append((n, stop))

    def section_span(name: str, index: int | None) -> tuple[int, int] | None:
        found = spans.get((name, index is not None), [])
        i = 0 if index is None else index
        return found[i] if 0 <= i < len(found) else None

    top_stop = sections[0][2] if sections else len(lines)

    def search(path: KeyPath) -> int | None:
        if len(path) == 1 and isinstance(path[0], str):
            span = section_span(path[0], None)
            if span is None and spans.get((path[0], True)):
                return spans[(path[0], True)][0][0] + 1
            return span[0] + 1 if span else key_line(path[0], 0, top_stop)
        if len(path) >= 2 and isinstance(path[0], str):
            index = path[1] if isinstance(path[1], int) else None
            span = section_span(path[0], index)
            if span is None:  # a dotted key at the top: defaults.top_k = 0
                if index is None and isinstance(path[1], str):
                    return key_line(f"{path[0]}.{path[1]}", 0, top_stop) or key_line(path[0], 0, top_stop)
                return None
            rest = path[2:] if index is not None else path[1:]
            if not rest:
                return span[0] + 1
            if isinstance(rest[0], str):
                return key_line(rest[0], span[0] + 1, span[1])
        return None

    return search


# ------------------------------------------------------------------------------------ writing

def dumps(data: dict[str, Any], fmt: str) -> str:
    """Serialise plain policy data as `fmt` ('yaml' | 'toml' | 'json')."""
    if fmt == "yaml":
        return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    if fmt == "json":
        return json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    if fmt == "toml":
        return _toml_dumps(data)
    raise ValueError(f"unknown policy format {fmt!r}, expected one of yaml, toml, json")


_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.match(key) else _toml_value(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        # JSON string escapes are valid TOML basic-string escapes; TOML also forbids raw DEL.
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as a TOML policy value")


def _toml_dumps(data: dict[str, Any]) -> str:
    scalars, tables, arrays = [], [], []
    for key, value in data.items():
        if isinstance(value, dict):
            tables.append((key, value))
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            arrays.append((key, value))
        else:
            scalars.append(f"{_toml_key(key)} = {_toml_value(value)}")
    out = list(scalars)
    for key, table in tables:
        out += ["", f"[{_toml_key(key)}]"] + [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in table.items()]
    for key, items in arrays:
        for item in items:
            out += ["", f"[[{_toml_key(key)}]]"] + [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in item.items()]
    return "\n".join(out).lstrip("\n") + "\n"
