"""`kl` and `ppl`: how far the rewritten model's next-token distributions move from the original's.

Per predicted position: KL(original || rewritten) = sum_v p(v) (log p(v) - log q(v)) of the
two softmaxes, in float64 from the logits, plus whether the two argmaxes agree; per window
the negative log-likelihood of the next token for perplexity. `Accumulator` gathers windows;
`summary()` gives the means, the max, and the mean KL per position bin (where in the window
the damage is).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

ROWS = 1024  # positions converted to float64 at once (bounds memory for large vocabularies)


def kl_per_position(original: Tensor, rewritten: Tensor) -> Tensor:
    """KL(softmax(original) || softmax(rewritten)) per row of `[N, V]` logits, float64 `[N]`."""
    out = []
    for i in range(0, original.shape[0], ROWS):
        lp = torch.log_softmax(original[i:i + ROWS].double(), -1)
        lq = torch.log_softmax(rewritten[i:i + ROWS].double(), -1)
        out.append((lp.exp() * (lp - lq)).sum(-1).clamp_min(0.0))
    return torch.cat(out) if out else original.new_zeros(0, dtype=torch.float64)


def nll_per_position(logits: Tensor, targets: Tensor) -> Tensor:
    """-log p(target) per row of `[N, V]` logits, float64 `[N]`."""
    out = []
    for i in range(0, logits.shape[0], ROWS):
        lp = torch.log_softmax(logits[i:i + ROWS].double(), -1)
        out.append(-lp.gather(-1, targets[i:i + ROWS, None]).squeeze(-1))
    return torch.cat(out) if out else logits.new_zeros(0, dtype=torch.float64)


@dataclass
class Accumulator:
    """Running sums over windows of one length."""

    seq_len: int
    kl: list[Tensor] = field(default_factory=list)  # [T] per window
    agree: list[Tensor] = field(default_factory=list)
    nll_original: list[Tensor] = field(default_factory=list)  # [T-1] per window
    nll_rewritten: list[Tensor] = field(default_factory=list)

    def add(self, ids: Tensor, original: Tensor, rewritten: Tensor) -> None:
        """One batch: token ids `[B, T]`, logits `[B, T, V]` of both models."""
        for b in range(ids.shape[0]):
            o, r = original[b].float(), rewritten[b].float()
            self.kl.append(kl_per_position(o, r).cpu())
            self.agree.append((o.argmax(-1) == r.argmax(-1)).cpu())
            target = ids[b, 1:].to(o.device)
            self.nll_original.append(nll_per_position(o[:-1], target).cpu())
            self.nll_rewritten.append(nll_per_position(r[:-1], target).cpu())

    def summary(self, bins: int = 32) -> dict:
        kl = torch.stack(self.kl)  # [S, T]
        per_pos = kl.mean(0)
        edges = torch.linspace(0, self.seq_len, min(bins, self.seq_len) + 1).round().long().tolist()
        by_pos = [{"start": a, "end": b, "mean": float(per_pos[a:b].mean())} for a, b in zip(edges, edges[1:]) if b > a]
        ppl_o = math.exp(float(torch.cat(self.nll_original).mean()))
        ppl_r = math.exp(float(torch.cat(self.nll_rewritten).mean()))
        return {
            "policy_kl": {"mean": float(kl.mean()), "max": float(kl.max()),
                          "p99": float(torch.quantile(kl.flatten().float(), 0.99)),
                          "positions": int(kl.numel())},
            "top1_agreement": float(torch.stack(self.agree).float().mean()),
            "kl_by_position": by_pos,
            "ppl": {"original": ppl_o, "rewritten": ppl_r, "ratio": ppl_r / ppl_o,
                    "tokens": int(torch.cat(self.nll_original).numel())},
        }
