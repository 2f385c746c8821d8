"""`nn.MultiheadAttention` (alone or inside `nn.TransformerEncoderLayer` / `DecoderLayer`).

In graphs (export, Dynamo) MHA shows up as the SDPA call or the bmm/softmax math of
`F.multi_head_attention_forward` and is found by `find_sdpa` / `find_manual` with the MHA
as owner. For the eager rewrite, each MHA module gets its class swapped to
`MobaMultiheadAttention`: same object, same parameters and `state_dict()` keys, a forward
that computes in_proj -> MoBA -> out_proj for MoBA sites and defers to the original forward
for dense ones. The Transformer layers' fused fast paths (`_transformer_encoder_layer_fwd`,
nested-tensor conversion) read the MHA weights directly and would bypass that forward, so
they are switched off on the layers that hold a MoBA site (`activation_relu_or_gelu = 0`,
an attribute used only to pick the fast path's activation).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import torch.fx as fx

import moba_rewrite.attention.op  # noqa: F401
from passes import fxutil, masks
from passes.found import FoundSite, check_common
from passes.runtime import HIDDEN_BELOW, UnfaithfulSiteError
from passes.sites import AttentionSite


_MHA_ORDER = ("query", "key", "value", "embed_dim_to_check", "num_heads", "in_proj_weight", "in_proj_bias",
              "bias_k", "bias_v", "add_zero_attn", "dropout_p", "out_proj_weight", "out_proj_bias", "training",
              "key_padding_mask", "need_weights", "attn_mask")


def find_mha_calls(gm: fx.GraphModule) -> list[FoundSite]:
    """`F.multi_head_attention_forward` calls kept whole in a graph (a recorded forward,
    `passes.record`), with the facts of the call: lengths (inputs are `[T, B, E]`), heads,
    dropout while training, masks. Export and Dynamo graphs show MHA's SDPA / bmm math instead."""
    found = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not F.multi_head_attention_forward:
            continue
        a = {name: node.args[i] for i, name in enumerate(_MHA_ORDER) if i < len(node.args)}
        a.update(node.kwargs)
        q, k, v = a.get("query"), a.get("key"), a.get("value")
        if not all(isinstance(x, fx.Node) for x in (q, k, v)):
            continue
        name, cls = fxutil.owner(node)
        heads = a.get("num_heads") if isinstance(a.get("num_heads"), int) else None
        qs, ks = fxutil.shape(q), fxutil.shape(k)
        training = a.get("training", True)
        p = a.get("dropout_p", 0.0)
        mask_nodes = [m for m in (a.get("attn_mask"), a.get("key_padding_mask")) if isinstance(m, fx.Node)]
        mask = masks.MaskInfo(node=None) if not mask_nodes else masks.MaskInfo(
            node=mask_nodes[0], kind="padding" if a.get("attn_mask") is None else "bool", convert="mha")
        f = FoundSite(kind="mha", out=node, q=q, k=k, v=v, mask=mask, name=name, module_class=cls or "MultiheadAttention",
                      dropout_p=float(p) if training is not False and isinstance(p, (int, float)) else 0.0,
                      covered=[node])  # is_causal is only a hint beside attn_mask, which holds the mask
        if qs is not None and heads:
            f.num_heads = f.num_kv_heads = heads
            f.head_dim = f.v_head_dim = fxutil.static_int(qs[-1]) // heads if fxutil.static_int(qs[-1]) else None
            f.tq = qs[0]
        if ks is not None:
            f.tk = ks[0]
        if f.head_dim:
            f.scale = f.head_dim ** -0.5
        if a.get("bias_k") is not None or a.get("add_zero_attn") is True:
            f.problems.append("add_bias_kv / add_zero_attn extra key")
        check_common(f)
        found.append(f)
    return found


def find_mha_modules(model: nn.Module) -> list[tuple[str, nn.MultiheadAttention]]:
    """(fqn, module) for every nn.MultiheadAttention, in `named_modules()` order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]


def mha_site(name: str, m: nn.MultiheadAttention, layer: int, causal: bool | None = None) -> AttentionSite:
    problems = []
    if m.dropout > 0:
        problems.append(f"attention dropout p={m.dropout}: MoBA only while not training")
    return AttentionSite(
        name=name, module_class=type(m).__name__ if type(m) is not MobaMultiheadAttention else "MultiheadAttention",
        layer=layer, kind="mha", num_heads=m.num_heads, num_kv_heads=m.num_heads, head_dim=m.head_dim,
        causal=causal, mask_kind="unknown" if causal is None else ("causal" if causal else "none"),
        scale=m.head_dim ** -0.5, dropout_p=float(m.dropout), extra={"problems": problems, "layout": "mha"},
    )


def _additive(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """MHA mask -> additive float mask (-inf hides). Bool masks mean True = *not* allowed."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    mask = mask.to(dtype)
    # finfo.min-style "hidden" values would be finite; make them -inf so MoBA never gates on them.
    return mask.masked_fill(mask <= HIDDEN_BELOW, float("-inf"))


class MobaMultiheadAttention(nn.MultiheadAttention):
    """nn.MultiheadAttention whose attention is MoBA where `self._moba_decision` says so."""

    _moba_decision: Any = None
    _moba_site: str = ""

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False):
        d = self._moba_decision
        if d is None or d.mode != "moba":
            return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                                   attn_mask=attn_mask, average_attn_weights=average_attn_weights,
                                   is_causal=is_causal)
        problems = []
        if self.training and self.dropout > 0:
            problems.append(f"attention dropout p={self.dropout} while training")
        if self.bias_k is not None or self.add_zero_attn:
            problems.append("add_bias_kv / add_zero_attn extra key")
        unbatched = query.dim() == 2
        tq = query.shape[0] if (unbatched or not self.batch_first) else query.shape[1]
        tk = key.shape[0] if (unbatched or not self.batch_first) else key.shape[1]
        if tq > tk:
            problems.append(f"more queries than keys (Tq={tq} > Tk={tk})")
        if is_causal and attn_mask is None:
            raise RuntimeError("MultiheadAttention: is_causal=True needs attn_mask (a hint, as in PyTorch)")
        if problems:
            if d.on_unsupported == "error":
                raise UnfaithfulSiteError(f"attention site {self._moba_site!r}: {'; '.join(problems)}")
            return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                                   attn_mask=attn_mask, average_attn_weights=average_attn_weights,
                                   is_causal=is_causal)
        if unbatched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        # [T, B, E] from here on, as in F.multi_head_attention_forward.
        t_q, bsz, embed = query.shape
        h, hd = self.num_heads, self.head_dim
        if self._qkv_same_embed_dim:
            w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        b_q = b_k = b_v = None
        if self.in_proj_bias is not None:
            b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        q = F.linear(query, w_q, b_q)
        k = F.linear(key, w_k, b_k)
        v = F.linear(value, w_v, b_v)
        t_k = k.shape[0]
        q = q.reshape(t_q, bsz, h, hd).permute(1, 2, 0, 3)
        k = k.reshape(t_k, bsz, h, hd).permute(1, 2, 0, 3)
        v = v.reshape(t_k, bsz, h, hd).permute(1, 2, 0, 3)
        mask = _additive(attn_mask, q.dtype)
        if mask is not None:
            mask = mask.reshape(bsz, h, t_q, t_k) if mask.dim() == 3 else mask.reshape(1, 1, t_q, t_k)
        kpm = _additive(key_padding_mask, q.dtype)
        if kpm is not None:
            kpm = kpm.reshape(bsz, 1, 1, t_k)
            mask = kpm if mask is None else mask + kpm
        if t_q == 1 and d.decode == "dense":
            top_k = -(-t_k // d.block_size)  # MoBA's dense limit: ordinary attention
        else:
            top_k = d.top_k
        extra = (int(d.dense_below),) if getattr(d, "dense_below", None) else ()
        out = torch.ops.moba.attention(q, k, v, mask, int(d.block_size), int(top_k), False, hd ** -0.5, str(d.backend),
                                       *extra)
        out = out.permute(2, 0, 1, 3).reshape(t_q, bsz, embed)
        out = F.linear(out, self.out_proj.weight, self.out_proj.bias)
        if unbatched:
            out = out.squeeze(1)
        elif self.batch_first:
            out = out.transpose(0, 1)
        return out, None


def install(model: nn.Module, modules: list[tuple[str, nn.MultiheadAttention]], decisions: list[Any]) -> None:
    """Swap each MHA's class to `MobaMultiheadAttention` and store its decision on it."""
    swapped = set()
    for (name, m), d in zip(modules, decisions):
        if type(m) is nn.MultiheadAttention:
            m.__class__ = MobaMultiheadAttention
        m._moba_decision = d
        m._moba_site = name
        if d.mode == "moba":
            swapped.add(id(m))
    for layer in model.modules():
        if isinstance(layer, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
            if id(getattr(layer, "self_attn", None)) in swapped or id(getattr(layer, "multihead_attn", None)) in swapped:
                layer.activation_relu_or_gelu = 0  # no fused fast path: it would bypass the MHA forward
