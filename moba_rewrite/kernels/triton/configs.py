"""Launch-configuration overrides for the Triton kernels (tile sizes, warps, stages, gate precision).

Each kernel family has a built-in default chosen from GPU timings (`benchmarks/RESULTS.md`).
`MOBA_TRITON_CONFIG` replaces them for tuning on another GPU without editing code, e.g.

    MOBA_TRITON_CONFIG="gate=64,64,4,2;fwd=128,64,8,3;bwd=64,64,8,2;gate_prec=split3;fwd_mode=single"

(`BLOCK_M,BLOCK_N,num_warps,num_stages` per family; `gate_decode` is the gate of calls with at
most 16 rows per KV head (decode: one query times the GQA group); `decode` is the split-KV
decode kernel's `SPAN,BLOCK_N,num_warps,num_stages`, SPAN keys of a block per program;
`gate_prec` is `tf32x3`, `split3` or `ieee` for bf16/fp16 inputs; `fwd_mode` is `single` or
`two_pass`). `fwd_piece_mib=N` bounds
the forward's fp32 output accumulator (2x a bf16 output) to about N MiB: the attention kernels
run over windows of (batch, KV head) rows, each with its own accumulator, after one gate and
routing for all; 0: one window (default `FWD_PIECE_MIB`).
`benchmarks/bench_gpu.py --sweep` sets `OVERRIDES` in-process to compare candidates side by
side. Tile overrides apply on GPU only: the interpreter keeps its own small tiles.
"""

from __future__ import annotations

import os

FAMILIES = ("gate", "gate_decode", "fwd", "bwd", "decode")
CHOICES = {"gate_prec": ("tf32x3", "split3", "ieee"), "fwd_mode": ("single", "two_pass")}
SIZES = ("fwd_piece_mib",)

OVERRIDES: dict[str, object] = {}

# Forward windows: the fp32 accumulator of a prefill forward stays under this many MiB, so the
# forward's peak is SDPA's plus a constant plus the O(T * H * top_k) routing (not 2x the output).
FWD_PIECE_MIB = 256


def _parse(text: str) -> dict[str, object]:
    out: dict[str, object] = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in (*FAMILIES, *CHOICES, *SIZES):
            raise ValueError(f"MOBA_TRITON_CONFIG: {part!r}: expected one of "
                             f"{', '.join(FAMILIES)}=M,N,WARPS,STAGES, {', '.join(CHOICES)}=NAME or "
                             f"{', '.join(SIZES)}=N")
        if key in SIZES:
            if not value.strip().isdigit():
                raise ValueError(f"MOBA_TRITON_CONFIG: {key}={value!r}: expected a whole number >= 0")
            out[key] = int(value)
            continue
        if key in CHOICES:
            if value.strip() not in CHOICES[key]:
                raise ValueError(f"MOBA_TRITON_CONFIG: {key}={value!r}: expected one of {CHOICES[key]}")
            out[key] = value.strip()
            continue
        try:
            nums = tuple(int(x) for x in value.split(","))
        except ValueError:
            nums = ()
        if len(nums) != 4 or any(n < 1 for n in nums):
            raise ValueError(f"MOBA_TRITON_CONFIG: {key}={value!r}: expected four positive integers "
                             "BLOCK_M,BLOCK_N,WARPS,STAGES")
        out[key] = nums
    return out


OVERRIDES.update(_parse(os.environ.get("MOBA_TRITON_CONFIG", "")))


def pick(family: str, default):
    """The override for `family` if one is set, else `default`."""
    return OVERRIDES.get(family, default)
