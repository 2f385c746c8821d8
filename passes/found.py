"""`FoundSite`: an attention site located in an FX graph, with the nodes a rewrite needs.

Detection passes (`find_sdpa`, `find_manual`, `find_mha`) return these; `number_sites`
orders them and turns them into `AttentionSite`s (the facts a policy decides on);
`passes.rewrite` replaces them with the `moba::attention` op.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx

from passes import fxutil
from passes.masks import MaskInfo
from passes.sites import AttentionSite


@dataclass
class FoundSite:
    """One attention computation in a graph.

    `q`, `k`, `v` are the operands in SDPA layout (`[B, H, T, D]`, or `[B*H, T, D]` when
    `layout == "3d"`); `k_transposed` says `k` was found as `k^T`. `out` is the node whose
    value is the attention output (the SDPA call or the final matmul); `users_via_getitem`
    marks the tuple-returning aten variants whose output 0 is read through `getitem`.
    `problems` lists what keeps it from being rewritten faithfully (empty when it can be).
    """

    kind: str
    out: fx.Node
    q: fx.Node
    k: fx.Node
    v: fx.Node
    mask: MaskInfo
    name: str
    module_class: str
    is_causal: bool = False
    scale: float | None = None
    scale_on_q: bool = False
    dropout_p: Any = 0.0
    enable_gqa: bool = False
    k_transposed: bool = False
    layout: str = "4d"
    kv_source: fx.Node | None = None  # un-repeated K when GQA was written as repeat_kv
    v_source: fx.Node | None = None
    num_heads: int | None = None
    num_kv_heads: int | None = None
    head_dim: int | None = None
    v_head_dim: int | None = None
    tq: Any = None
    tk: Any = None
    problems: list[str] = field(default_factory=list)
    extra_masks: list[MaskInfo] = field(default_factory=list)  # further masks, AND-ed with `mask`
    users_via_getitem: bool = False
    covered: list[fx.Node] = field(default_factory=list)
    # Scale factors computed from shapes at run time ("mul" / "div", node): the eager path
    # multiplies them into `scale` in the graph; the op path cannot take them.
    scale_factors: list[tuple[str, fx.Node]] = field(default_factory=list)
    # The masks proven to be MoBA's causal cut AND a key mask (`passes.mask_proof.CompactMask`):
    # the rewrite hands the op `causal` and the key mask `[B, 1, 1, Tk]` instead of the full mask.
    compact: Any = None

    @property
    def causal_flag(self) -> bool | None:
        """Causality for the report: the flag, a recognised causal mask, or unknown."""
        if self.is_causal or self.mask.kind in ("causal", "causal+padding"):
            return True
        if self.mask.kind in ("none", "padding"):
            return False
        return None

    def site(self, layer: int) -> AttentionSite:
        seq = fxutil.static_int(self.tq)
        return AttentionSite(
            name=self.name,
            module_class=self.module_class,
            layer=layer,
            kind=self.kind,  # type: ignore[arg-type]
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            causal=self.causal_flag,
            mask_kind=("causal" if self.is_causal and self.mask.kind == "none" else self.mask.kind),  # type: ignore[arg-type]
            scale=None if self.scale_factors else self.scale,  # None: computed from shapes at run time
            dropout_p=float(self.dropout_p) if isinstance(self.dropout_p, (int, float)) else -1.0,
            seq_len=seq,
            node_name=self.out.name,
            extra={"problems": list(self.problems), "layout": self.layout},
        )


def check_common(f: FoundSite) -> None:
    """Fill `problems` with the reasons shared by every site kind."""
    if isinstance(f.dropout_p, fx.Node):
        f.problems.append("attention dropout probability is computed in the graph (training)")
    elif isinstance(f.dropout_p, (int, float)) and f.dropout_p > 0:
        f.problems.append(f"attention dropout p={f.dropout_p} (training); MoBA has no attention dropout")
    if f.tq is not None and f.tk is not None:
        iq, ik = fxutil.static_int(f.tq), fxutil.static_int(f.tk)
        if iq is not None and ik is not None and iq > ik:
            f.problems.append(f"more queries than keys (Tq={iq} > Tk={ik}, cross attention)")
    if f.is_causal:
        same = fxutil.same_size(f.tq, f.tk) if f.tq is not None and f.tk is not None else None
        if same is False:
            f.problems.append(
                "is_causal=True with Tq != Tk: SDPA aligns the causal mask top-left, MoBA bottom-right"
            )
        elif same is None and f.tq is not None:
            f.problems.append("is_causal=True and Tq == Tk cannot be proven for these dynamic shapes")
    dts = {fxutil.dtype(x) for x in (f.q, f.k, f.v)}
    if None not in dts and len(dts) > 1:
        f.problems.append(f"q, k and v have different dtypes ({', '.join(sorted(str(d) for d in dts))})")
    if not f.mask.usable:
        f.problems.append(f.mask.reason or "attention mask of an unknown form")
    if f.is_causal and f.mask.node is not None:
        f.problems.append("both is_causal=True and an attention mask")


def number_sites(found: list[FoundSite]) -> list[AttentionSite]:
    """Sites in graph order (= execution order), layer = ordinal."""
    return [f.site(i) for i, f in enumerate(found)]
