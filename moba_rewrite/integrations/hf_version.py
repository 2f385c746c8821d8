"""The oldest transformers the Hugging Face path is built and tested on, checked before any use.

The compact masks, the cache layers, the generation exporters and the context-parallel hooks read
transformers' 5.x internals, which kept changing: with 4.57.6 and 5.0 to 5.3 the first forward
fails (`TypeError` from the mask builder: 5.4 passes `q_length` / `q_offset` in place of
`cache_position`); 5.24 names the models' cache argument `cache` (before: `past_key_values`, and a
`cache=` given to an older model is swallowed by its `**kwargs`), which the generation exporters
pass, so with 5.4 to 5.23 their static-cache programs fail; 5.24 refuses Qwen3.5's hybrid stack
under context parallelism, where 5.25 shards it (measured 2026-12-08, the suite's Hugging Face
files on each). CI runs the suite on 5.25, so that is the floor: every entry point that meets a
transformers model asks here first and stops with one line (pyproject.toml asks pip for the same
floor, so a plain install upgrades transformers instead).
"""

from __future__ import annotations

from packaging.version import Version

MIN_TRANSFORMERS = (5, 25)


class UnsupportedTransformersError(RuntimeError):
    """The installed transformers is older than the Hugging Face path supports."""


def _release(version: str) -> tuple[int, ...]:
    """(major, minor) of a version string such as `5.25.0` or `5.4.0.dev0`."""
    return Version(version).release[:2]


def installed() -> str:
    """The installed transformers' version string."""
    import transformers

    return str(getattr(transformers, "__version__", "0"))


def require_supported() -> None:
    """Raise `UnsupportedTransformersError` naming the installed and the needed version when
    transformers is older than `MIN_TRANSFORMERS`."""
    found = installed()
    if _release(found) < MIN_TRANSFORMERS:
        need = ".".join(map(str, MIN_TRANSFORMERS))
        raise UnsupportedTransformersError(
            f"transformers {found} is too old for Hugging Face models: moba-rewrite needs transformers >= {need} "
            f"(its attention mask and cache interfaces); upgrade with: pip install -U 'transformers>={need}'")
