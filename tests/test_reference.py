"""The dense reference against hand-computed cases and an independent per-query loop.

The reference is the oracle for every backend, so it is checked here against the SPEC's
rules written out a second time, plainly, one query at a time.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from moba_rewrite.kernels import reference


def loop_moba(q, k, v, *, block_size, top_k, causal, scale=None, attn_mask=None):
    """SPEC section 2 one query at a time, with Python lists: slow and obviously right."""
    b, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    scale = d**-0.5 if scale is None else scale
    n_blocks = math.ceil(tk / block_size)
    out = torch.zeros(b, hq, tq, d, dtype=torch.float64)
    visible = torch.ones(b, hq, tq, tk, dtype=torch.bool)
    if attn_mask is not None:
        m = attn_mask if attn_mask.dtype == torch.bool else attn_mask != float("-inf")
        visible = m.expand(b, hq, tq, tk)
    for bi in range(b):
        for h in range(hq):
            kh = h // (hq // hkv)
            keys, vals = k[bi, kh].double(), v[bi, kh].double()
            means = [keys[j * block_size : (j + 1) * block_size].mean(0) for j in range(n_blocks)]
            for i in range(tq):
                pos = tk - tq + i
                own = pos // block_size
                qi = q[bi, h, i].double()
                cands = [j for j in range(n_blocks) if (j < own if causal else j != own)]
                cands = [j for j in cands if visible[bi, h, i, j * block_size : (j + 1) * block_size].any()]
                cands.sort(key=lambda j: -(qi @ means[j]).item())
                chosen = {own, *cands[: top_k - 1]}
                idx = [t for t in range(tk) if t // block_size in chosen and visible[bi, h, i, t]]
                if causal:
                    idx = [t for t in idx if t <= pos]
                if not idx:
                    continue
                s = (keys[idx] @ qi) * scale
                if attn_mask is not None and attn_mask.dtype != torch.bool:
                    s = s + attn_mask.expand(b, hq, tq, tk)[bi, h, i, idx].double()
                out[bi, h, i] = torch.softmax(s, 0) @ vals[idx]
    return out


def run_reference(q, k, v, **kw):
    kw.setdefault("scale", q.shape[-1] ** -0.5)
    kw.setdefault("attn_mask", None)
    return reference.forward(q, k, v, **kw)


def controlled_keys(means_per_block, block_size):
    """Keys whose blocks have the given mean along dim 0 (D=2): the gate is known exactly."""
    rows = []
    for m in means_per_block:
        for t in range(block_size):
            offset = 0.5 if t % 2 == 0 else -0.5  # zero-sum jitter keeps the mean
            rows.append([m, offset])
    return torch.tensor(rows, dtype=torch.float32)[None, None]


def test_selection_hand_computed_causal():
    # 4 blocks of 2 keys, block means along x: 1, 3, 2, 5. Query direction +x, so the gate
    # ranks earlier blocks 1 > 2 > 0.
    k = controlled_keys([1.0, 3.0, 2.0, 5.0], 2)
    q = torch.tensor([1.0, 0.0]).expand(1, 1, 8, 2).contiguous()
    sel = reference.block_selection(q, k, block_size=2, top_k=2, causal=True)[0, 0]
    expected = {
        0: {0}, 1: {0},          # block 0: nothing earlier
        2: {1, 0}, 3: {1, 0},    # block 1: only block 0 is a candidate
        4: {2, 1}, 5: {2, 1},    # block 2: best of {0, 1} is 1
        6: {3, 1}, 7: {3, 1},    # block 3: best of {0, 1, 2} is 1
    }
    for i, blocks in expected.items():
        assert set(torch.nonzero(sel[i]).flatten().tolist()) == blocks, i
    sel3 = reference.block_selection(q, k, block_size=2, top_k=3, causal=True)[0, 0]
    assert set(torch.nonzero(sel3[7]).flatten().tolist()) == {3, 1, 2}
    assert set(torch.nonzero(sel3[5]).flatten().tolist()) == {2, 1, 0}


def test_selection_hand_computed_noncausal_and_negative_query():
    k = controlled_keys([1.0, 3.0, 2.0, 5.0], 2)
    q = torch.tensor([1.0, 0.0]).expand(1, 1, 8, 2).contiguous()
    sel = reference.block_selection(q, k, block_size=2, top_k=3, causal=False)[0, 0]
    assert set(torch.nonzero(sel[0]).flatten().tolist()) == {0, 3, 1}  # own + best two others
    assert set(torch.nonzero(sel[7]).flatten().tolist()) == {3, 1, 2}
    # A query pointing the other way prefers the smallest means.
    sel_neg = reference.block_selection(-q, k, block_size=2, top_k=2, causal=False)[0, 0]
    assert set(torch.nonzero(sel_neg[7]).flatten().tolist()) == {3, 0}


def test_selection_masked_blocks_are_never_candidates():
    k = controlled_keys([1.0, 3.0, 2.0, 5.0], 2)
    q = torch.tensor([1.0, 0.0]).expand(1, 1, 8, 2).contiguous()
    mask = torch.ones(8, 8, dtype=torch.bool)
    mask[:, 2:4] = False  # hide block 1 entirely: the gate's favourite
    sel = reference.block_selection(q, k, block_size=2, top_k=2, causal=True, attn_mask=mask)[0, 0]
    assert set(torch.nonzero(sel[7]).flatten().tolist()) == {3, 2}
    mask[:, 3] = True  # one visible key is enough to be a candidate again
    sel = reference.block_selection(q, k, block_size=2, top_k=2, causal=True, attn_mask=mask)[0, 0]
    assert set(torch.nonzero(sel[7]).flatten().tolist()) == {3, 1}


def test_partial_last_block_mean_uses_its_own_keys():
    # Tk = 5, block 2: the last block holds one key; its mean is that key.
    k = torch.tensor([[0.0, 0], [0, 0], [1, 0], [1, 0], [10, 0]])[None, None]
    means = reference.block_means(k, 2)[0, 0]
    assert torch.equal(means, torch.tensor([[0.0, 0], [1, 0], [10, 0]]))


def test_output_hand_computed_decode():
    # Decode: one query at position 5 of 6 keys, block 2, top-2. Own block 2 (keys 4, 5);
    # candidates 0 (mean 0) and 1 (mean 1): block 1 wins. Attended keys: 2, 3, 4, 5.
    k = torch.tensor([[0.0, 1], [0, -1], [1, 1], [1, -1], [0, 0], [0, 0]])[None, None]
    v = torch.arange(6.0)[None, None, :, None].expand(1, 1, 6, 2).contiguous()
    q = torch.tensor([[[[1.0, 0.0]]]])
    out = run_reference(q, k, v, block_size=2, top_k=2, causal=True, scale=1.0)
    s = torch.tensor([1.0, 1.0, 0.0, 0.0])  # q . k for keys 2, 3, 4, 5
    w = torch.softmax(s, 0)
    expected = (w * torch.tensor([2.0, 3, 4, 5])).sum()
    assert torch.allclose(out[0, 0, 0], expected.expand(2))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("tq,tk,bs,top_k", [(13, 13, 4, 2), (1, 13, 4, 3), (5, 13, 3, 2), (7, 7, 16, 3), (9, 20, 4, 1)])
def test_reference_matches_per_query_loop(causal, tq, tk, bs, top_k):
    q = torch.randn(2, 4, tq, 8, dtype=torch.float64)
    k = torch.randn(2, 2, tk, 8, dtype=torch.float64)
    v = torch.randn(2, 2, tk, 8, dtype=torch.float64)
    got = run_reference(q, k, v, block_size=bs, top_k=top_k, causal=causal)
    assert torch.allclose(got, loop_moba(q, k, v, block_size=bs, top_k=top_k, causal=causal), atol=1e-10)


@pytest.mark.parametrize("float_mask", [False, True])
def test_reference_matches_loop_with_padding_mask_and_empty_rows(float_mask):
    q = torch.randn(2, 2, 6, 8, dtype=torch.float64)
    k = torch.randn(2, 2, 12, 8, dtype=torch.float64)
    v = torch.randn(2, 2, 12, 8, dtype=torch.float64)
    mask = torch.ones(2, 1, 6, 12, dtype=torch.bool)
    mask[0, :, :, :3] = False  # left padding in batch 0
    mask[1, :, 2, :] = False  # one query in batch 1 sees nothing
    attn_mask = mask
    if float_mask:
        attn_mask = torch.zeros(mask.shape, dtype=torch.float64).masked_fill(~mask, float("-inf"))
        attn_mask = attn_mask + torch.randn(mask.shape, dtype=torch.float64).abs() * mask * 0.1
    got = run_reference(q, k, v, block_size=4, top_k=2, causal=True, attn_mask=attn_mask)
    want = loop_moba(q, k, v, block_size=4, top_k=2, causal=True, attn_mask=attn_mask)
    assert torch.allclose(got, want, atol=1e-10)
    assert not got.isnan().any()
    assert torch.equal(got[1, :, 2], torch.zeros_like(got[1, :, 2]))


@pytest.mark.parametrize("causal", [True, False])
def test_dense_limit_equals_sdpa(causal):
    q, k, v = (torch.randn(1, 4, 19, 8, dtype=torch.float64) for _ in range(3))
    got = run_reference(q, k, v, block_size=5, top_k=4, causal=causal)  # 4 * 5 >= 19
    assert torch.allclose(got, F.scaled_dot_product_attention(q, k, v, is_causal=causal), atol=1e-12)


def test_reference_gradients_flow_to_qkv():
    q, k, v = (torch.randn(1, 2, 9, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out = run_reference(q, k, v, block_size=3, top_k=2, causal=True)
    dq, dk, dv = torch.autograd.grad((out * torch.randn_like(out)).sum(), (q, k, v))
    assert all(g.abs().sum() > 0 for g in (dq, dk, dv))
