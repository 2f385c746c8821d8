"""Rewrite a hand-written (non Hugging Face) model: one block calls scaled_dot_product_attention,
the other writes attention out by hand (matmul -> scale -> mask -> softmax -> matmul).

    python examples/rewrite_custom_model.py

Checks: with `top_k * block_size >= sequence length` MoBA is exactly ordinary attention, so
the rewritten model reproduces the original; with a sparse policy the outputs change.
"""

import torch
import torch.nn.functional as F
from torch import nn

import moba_rewrite as mr


class SdpaBlock(nn.Module):
    def __init__(self, dim: int = 64, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return x + self.proj(y.transpose(1, 2).reshape(b, t, d))


class HandWrittenBlock(nn.Module):
    def __init__(self, dim: int = 64, heads: int = 4, max_len: int = 512) -> None:
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.register_buffer("causal", torch.ones(max_len, max_len, dtype=torch.bool).tril(), persistent=False)

    def forward(self, x):
        b, t, d = x.shape
        h = self.heads

        def split(z):
            return z.view(b, t, h, d // h).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        scores = (q @ k.transpose(-1, -2)) * self.scale
        scores = scores.masked_fill(~self.causal[:t, :t], float("-inf"))  # GPT-2 style mask buffer
        y = scores.softmax(dim=-1) @ v
        return x + self.proj(y.transpose(1, 2).reshape(b, t, d))


class TinyTransformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([SdpaBlock(), HandWrittenBlock()])

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def main() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 96, 64)
    original = TinyTransformer().eval()
    with torch.no_grad():
        expected = original(x)

    dense_limit = {"version": 1, "defaults": {"mode": "moba", "block_size": 32, "top_k": 3}}  # 3 * 32 >= 96
    model = TinyTransformer().eval()
    model.load_state_dict(original.state_dict())
    mr.rewrite(model, dense_limit, example_inputs=(x,))
    print(model._moba_report)
    assert len(model._moba_report.moba_sites) == 2, "both blocks should be MoBA sites"
    with torch.no_grad():
        same = model(x)
    print(f"dense limit: max |MoBA - original| = {(same - expected).abs().max():.2e}")
    assert torch.allclose(same, expected, atol=1e-5)

    sparse = {"version": 1, "defaults": {"mode": "moba", "block_size": 16, "top_k": 2}}
    mr.rewrite(model, sparse, example_inputs=(x,))
    with torch.no_grad():
        routed = model(x)
    print(f"block 16 / top-2:  max |MoBA - original| = {(routed - expected).abs().max():.2e} (routing is sparse)")
    assert not torch.allclose(routed, expected, atol=1e-3)
    print("ok: both attention styles were rewritten")


if __name__ == "__main__":
    main()
