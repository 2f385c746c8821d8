"""One entry point for graph-level detection: every attention site of an FX graph.

Combines `find_sdpa` (SDPA in every spelling), `find_manual` (matmul -> softmax -> matmul
subgraphs, which also covers `nn.MultiheadAttention`'s own math path when traced),
`find_mha` (`F.multi_head_attention_forward` kept whole in recorded forwards) and
`find_generic` (attention in forms the others do not read: listed, kept dense), in graph
order, so a site's `layer` is its ordinal in execution order.
"""

from __future__ import annotations

import torch.fx as fx

from passes import find_generic, find_manual, find_mha, find_sdpa, fxutil, mask_proof
from passes.found import FoundSite, number_sites
from passes.sites import AttentionSite


def find_sites(gm: fx.GraphModule) -> list[FoundSite]:
    """All attention sites of `gm` in graph order (SDPA calls and hand-written attention)."""
    found = find_sdpa.find_sdpa(gm)
    taken = {f.out for f in found}
    found += [f for f in find_manual.find_manual(gm) if f.out not in taken]
    found += find_mha.find_mha_calls(gm)
    read = {n for f in found for n in f.covered} | {f.out for f in found}
    found += [f for f in find_generic.find_generic(gm, read) if f.out not in read]
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    found.sort(key=lambda f: order[f.out])
    for f in found:
        if f.kind == "sdpa" or f.kind == "manual":
            if f.module_class == "MultiheadAttention":
                f.kind = "mha"
        _compact(f, gm)
    return found


def _compact(f: FoundSite, gm: fx.GraphModule) -> None:
    """Prove the site's masks are the causal cut AND a key mask (then `f.compact` says which);
    a float mask proven that way is 0 / -inf, so its "may carry a bias" problem goes away."""
    infos = [m for m in [f.mask, *f.extra_masks] if m.node is not None]
    if not infos or f.is_causal:
        return
    proof = mask_proof.prove([(m.node, m.convert == "invert") for m in infos], f.tq, f.tk, root=gm)
    if proof is None:
        return
    f.compact = proof
    reasons = {m.reason or "attention mask of an unknown form" for m in infos if not m.usable}
    f.problems = [p for p in f.problems if p not in reasons]
    for m in infos:
        m.usable = True
        if m.convert == "none" and fxutil.dtype(m.node) is not None and fxutil.dtype(m.node).is_floating_point:
            m.convert = "float_to_bool"  # proven 0 / huge negative (for emitters that keep the mask)
    f.mask.kind = ("causal+padding" if proof.key is not None else "causal") if proof.causal else (
        "padding" if proof.key is not None else "none")


def sites_of(gm: fx.GraphModule) -> list[AttentionSite]:
    """`AttentionSite`s of a graph (layer = ordinal in graph order)."""
    return number_sites(find_sites(gm))
