"""Compatibility fix for the Triton interpreter (CPU runs of the kernels) of triton < 3.7.

The interpreter holds scalars as one-element numpy arrays and turns them into Python ints
with `int(array)` (`tensor.__index__`, used by `range(lo, hi, step)` with loaded bounds).
numpy >= 2.4 rejects `int()` of an array that is not 0-d, so every kernel loop with runtime
bounds failed there under triton 3.6 (the triton that torch 2.11 pins). Newer triton squeezes
the array first; this module does the same for versions that still need it, found by trying
the interpreter's own patch on a probe rather than by version numbers. Importing it applies
the fix once; it does nothing when triton is absent or its interpreter already copes.
"""

from __future__ import annotations

_APPLIED = False


def _index(self) -> int:
    return int(self.handle.data.squeeze())


def _interpreter_needs_fix(interpreter) -> bool:
    """Does the interpreter's `tensor.__index__` fail on a one-element scalar array?"""
    import numpy as np

    class _Probe:
        pass

    probe = _Probe()
    probe.handle = type("_Handle", (), {"data": np.ones(1, dtype=np.int32)})()
    scope = interpreter._LangPatchScope()
    try:
        interpreter._patch_lang_tensor(_Probe, scope)
        index = getattr(_Probe, "__index__", None)
        if index is None:
            return False  # the interpreter no longer converts this way
        try:
            return int(index(probe)) != 1
        except TypeError:
            return True
    finally:
        scope.restore()


def apply() -> bool:
    """Patch the interpreter's scalar-to-int conversion where needed; True when patched."""
    global _APPLIED
    if _APPLIED:
        return True
    try:
        from triton.runtime import interpreter
    except ImportError:  # no triton, or one without an interpreter: nothing to fix
        return False
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or not hasattr(interpreter, "_LangPatchScope"):
        return False  # internals changed: a triton newer than the bug
    if not _interpreter_needs_fix(interpreter):
        return False

    def _patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", _index)

    interpreter._patch_lang_tensor = _patch_lang_tensor
    _APPLIED = True
    return True


apply()
