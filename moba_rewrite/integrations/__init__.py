"""Integrations with model libraries whose attention is dispatched by name, not by graph.

- `hf`: Hugging Face transformers: the `moba_sdpa` / `moba_eager` attention functions on the
  `AttentionInterface`, site discovery by running the model once, applying decisions.
- `hf_cp`: a rewritten model on one sequence sharded across ranks (context parallelism).

May import: `moba_rewrite.attention`, `moba_rewrite.parallel`, `moba_rewrite.policy` (types),
`passes.sites`. Not the API, report, exporters or CLI.
"""
