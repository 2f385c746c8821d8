"""A few fine-tuning steps of a model whose attention was rewritten to MoBA.

    python examples/finetune_moba.py

Checks that gradients reach the query/key/value projections of the MoBA layers (through
the attention; the top-k routing itself is discrete, as in the paper) and that the loss goes
down on a fixed batch.
"""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import moba_rewrite as mr

POLICY = {"version": 1, "defaults": {"mode": "moba", "block_size": 16, "top_k": 2},
          "rules": [{"layers": "-1:", "mode": "dense"}]}


def main() -> None:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         attention_dropout=0.0)
    model = LlamaForCausalLM(config)
    mr.rewrite(model, POLICY)
    print(model._moba_report)
    model.train()

    batch = torch.randint(0, 128, (4, 96))
    optim = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(8):
        loss = model(input_ids=batch, labels=batch).loss
        optim.zero_grad()
        loss.backward()
        if step == 0:
            attn = model.model.layers[0].self_attn  # a MoBA layer
            for name in ("q_proj", "k_proj", "v_proj"):
                grad = getattr(attn, name).weight.grad
                assert grad is not None and grad.abs().sum() > 0, f"no gradient reached {name}"
                print(f"layer 0 {name}: |grad| = {grad.norm():.3e}")
        optim.step()
        losses.append(loss.item())
        print(f"step {step}: loss {loss.item():.4f}")
    assert losses[-1] < losses[0] - 0.1, "loss did not decrease"
    print("ok: loss decreased and gradients flowed through the MoBA layers")


if __name__ == "__main__":
    main()
