"""Policies: which attention sites become MoBA, and with which parameters (docs/POLICY.md).

- `core`: `Policy`, `Decision`, `Settings`, `Rule`, `load_policy`, `dump_policy`, the checker
  and the precedence rule (read its docstring);
- `formats`: YAML / TOML / JSON parsing with line numbers, and writing;
- `errors`: `PolicyError` (file, line, key path, what was expected);
- `starter`: the commented starter policy `moba-rewrite policy init` writes;
- `schema.json`: the published JSON Schema, the single source of keys, enums and bounds.

May import: pyyaml and the standard library (`passes.sites.AttentionSite` for type hints only).
"""

from moba_rewrite.policy.core import (Decision, Policy, PolicyError, Rule, Settings, dump_policy, load_policy,
                                      policy_schema, starter_policy_yaml)

__all__ = ["Decision", "Policy", "PolicyError", "Rule", "Settings", "dump_policy", "load_policy",
           "policy_schema", "starter_policy_yaml"]
