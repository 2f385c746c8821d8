"""`sites`: per attention site, what MoBA does to its output on the q / k / v the model really
computes, captured in one dense forward.

Capture: a weight-sharing copy of the model is rewritten with a *capture policy*: every site
MoBA with top-1 and one block longer than the input, which is dense attention exactly (SPEC
section 2, "dense limit"), and each site with its own block size (`base + layer`), so every
`moba::attention` call names its site whatever order or how often it runs. A dispatch mode
sees each call's q, k, v, mask, causality and scale, measures them, and lets the call
compute. Sites the rewrite keeps dense (unsupported) are not captured; the caller says so.

Measure: for each query chunk, the dense attention weights P (fp32) once; for each MoBA
configuration (block size, top-k) the reference's `block_selection` gives the attended
blocks A, and MoBA's output is P restricted to A and renormalised (softmax over a subset =
the dense softmax renormalised over it), so
- `out_rel_err` = ||O_moba - O_dense|| / ||O_dense|| over every row and head,
- `kept_mass`   = mean over rows of sum(P over A): the dense attention mass MoBA keeps,
- `density`     = attended (query, key) pairs / pairs dense attention sees.
Queries are chunked (keys cut after the chunk's last query) where each row sees no key after
its own position, which leaves MoBA's selection unchanged; otherwise all rows at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

import moba_rewrite.attention.op  # noqa: F401  (registers torch.ops.moba)
from moba_rewrite import api
from moba_rewrite.evaluation.models import logits, shared_copy
from moba_rewrite.exporters.common import is_hf_model, sample_inputs
from moba_rewrite.kernels.reference import block_means, block_selection, compute_dtype, repeat_kv

Config = tuple[int, int]  # (block_size, top_k)
CHUNK_BYTES = 256 << 20  # fp32 weights held per query chunk


@dataclass
class Stats:
    """Sums over captured calls for one (site, configuration)."""

    err_sq: float = 0.0
    ref_sq: float = 0.0
    kept: float = 0.0
    rows: int = 0
    attended: float = 0.0
    visible: float = 0.0

    @property
    def out_rel_err(self) -> float:
        return math.sqrt(self.err_sq / self.ref_sq) if self.ref_sq > 0 else 0.0

    @property
    def kept_mass(self) -> float:
        return self.kept / self.rows if self.rows else 1.0

    @property
    def density(self) -> float:
        return self.attended / self.visible if self.visible else 1.0


@dataclass
class Capture:
    """What one capture run saw: per layer, per configuration, the sums; which layers were seen."""

    stats: dict[int, dict[Config, Stats]] = field(default_factory=dict)
    calls: dict[int, int] = field(default_factory=dict)
    report: object = None  # the capture rewrite's report (which sites could not be captured, and why)


# --------------------------------------------------------------------------- measuring one call

def _mask4(mask: Tensor | None) -> Tensor | None:
    return None if mask is None else mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))


def _rows(mask: Tensor | None, s: int, e: int, kend: int) -> Tensor | None:
    if mask is None:
        return None
    rows = mask[:, :, s:e] if mask.shape[2] > 1 else mask
    return rows[..., :kend] if rows.shape[3] > 1 else rows


def _sees_no_future(mask: Tensor | None, causal: bool, tq: int, tk: int, rows: int = 1024) -> bool:
    """True when no query sees a key after its own position (so keys can be cut after a chunk)."""
    if causal:
        return True
    if mask is None:
        return False
    visible = mask if mask.dtype == torch.bool else mask != float("-inf")
    keys = torch.arange(tk, device=mask.device)
    if visible.shape[2] == 1:  # one row for every query: the first query must see no later key
        return not bool((visible[..., 0, :] & (keys > tk - tq)).any())
    for s in range(0, tq, rows):  # row chunks bound the [rows, Tk] comparison
        qpos = torch.arange(tk - tq + s, tk - tq + min(tq, s + rows), device=mask.device)
        if bool((visible[:, :, s:s + rows] & (keys[None, :] > qpos[:, None])).any()):
            return False
    return True


def measure_call(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool, scale: float,
                 configs: Sequence[Config], into: dict[Config, Stats]) -> None:
    """Add one attention call's MoBA-vs-dense sums for every configuration to `into`."""
    b, hq, tq, _ = q.shape
    tk = k.shape[2]
    ct = compute_dtype(q.dtype)
    mask = _mask4(mask)
    kr, vr = repeat_kv(k, hq).to(ct), repeat_kv(v, hq).to(ct)
    means = {bs: block_means(k, bs) for bs in {c[0] for c in configs}}
    chunked = _sees_no_future(mask, causal, tq, tk)
    step = max(1, min(tq, CHUNK_BYTES // max(1, b * hq * tk * 4))) if chunked else tq
    for s in range(0, tq, step):
        e = min(tq, s + step)
        kend = tk - tq + e if chunked else tk
        q_c = q[:, :, s:e]
        m_c = _rows(mask, s, e, kend)
        scores = (q_c.to(ct) @ kr[:, :, :kend].transpose(-1, -2)) * scale
        visible = torch.ones_like(scores, dtype=torch.bool)
        if causal:
            qpos = torch.arange(tk - tq + s, tk - tq + e, device=q.device)
            visible = visible & (torch.arange(kend, device=q.device)[None, :] <= qpos[:, None])
        if m_c is not None:
            if m_c.dtype == torch.bool:
                visible = visible & m_c
            else:
                scores = scores + m_c.to(ct)
                visible = visible & (m_c != float("-inf"))
        scores = scores.masked_fill(~visible, float("-inf"))
        top = scores.amax(-1, keepdim=True)
        top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
        weights = torch.exp(scores - top)
        total = weights.sum(-1, keepdim=True)
        probs = weights / torch.where(total > 0, total, torch.ones_like(total))
        dense = probs @ vr[:, :, :kend]
        has_keys = total.squeeze(-1) > 0
        n_rows = int(has_keys.sum())
        n_visible = float(visible.sum())
        ref_sq = float(dense.double().pow(2).sum())
        for bs, top_k in configs:
            n_blocks = -(-kend // bs)
            sel = block_selection(q_c, k[:, :, :kend], block_size=bs, top_k=top_k, causal=causal, attn_mask=m_c,
                                  means=means[bs][:, :, :n_blocks])
            allowed = sel[..., torch.arange(kend, device=q.device) // bs] & visible
            kept_w = probs * allowed
            kept = kept_w.sum(-1, keepdim=True)
            moba = (kept_w / torch.where(kept > 0, kept, torch.ones_like(kept))) @ vr[:, :, :kend]
            st = into.setdefault((bs, top_k), Stats())
            st.err_sq += float((moba - dense).double().pow(2).sum())
            st.ref_sq += ref_sq
            st.kept += float(kept.squeeze(-1)[has_keys].double().sum())
            st.rows += n_rows
            st.attended += float(allowed.sum())
            st.visible += n_visible


# --------------------------------------------------------------------------- capturing

def capture_policy(num_sites: int, base: int, backend: str = "auto") -> dict:
    """Every site MoBA, top-1, one block of `base + layer` keys: dense attention, site-tagged."""
    return {"version": 1, "description": "moba-rewrite capture policy (dense limit, one block per site)",
            "defaults": {"mode": "moba", "block_size": base, "top_k": 1, "backend": backend, "decode": "moba",
                         "on_unsupported": "dense"},
            "rules": [{"layers": i, "block_size": base + i} for i in range(num_sites)]}


class _Tap(TorchDispatchMode):
    """Hands every `moba::attention` call of a capture-rewritten model to `on_call(layer, args)`."""

    def __init__(self, base: int, num_sites: int, on_call: Callable[[int, tuple], None]) -> None:
        super().__init__()
        self.base, self.num_sites, self.on_call = base, num_sites, on_call

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.moba.attention.default:
            layer = int(args[4]) - self.base
            if 0 <= layer < self.num_sites and int(args[5]) == 1:
                self.on_call(layer, args)
        return func(*args, **(kwargs or {}))


def capture(model: nn.Module, windows: Iterable[Tensor], configs: dict[int, list[Config]], *,
            seq_len: int, backend: str = "auto", bar=None) -> Capture:
    """One dense forward per window; for each layer in `configs`, every configuration measured.

    Returns the sums and the capture rewrite's report (sites it kept dense were not seen).
    """
    example = None if is_hf_model(model) else sample_inputs(model, seq_len)
    sites = api.find_sites(model, example)
    base = seq_len + 1
    twin = shared_copy(model)
    api.rewrite(twin, capture_policy(len(sites), base, backend), example_inputs=example)
    out = Capture(report=twin._moba_report)

    def on_call(layer: int, args: tuple) -> None:
        if layer not in configs:
            return
        q, k, v, mask, _bs, _top, causal, scale = args[:8]
        out.calls[layer] = out.calls.get(layer, 0) + 1
        measure_call(q, k, v, mask, bool(causal), float(scale), configs[layer], out.stats.setdefault(layer, {}))

    for ids in windows:
        with _Tap(base, len(sites), on_call):
            logits(twin, ids)
        if bar is not None:
            bar.update(1)
    return out
