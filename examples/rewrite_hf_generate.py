"""Rewrite a Hugging Face model's attention into MoBA in Python, then generate text.

Runs on a tiny random-weight Llama so it needs no download; with a real checkpoint use
`AutoModelForCausalLM.from_pretrained(path)` instead and a tokenizer for real text.

    python examples/rewrite_hf_generate.py

It checks that `generate()` with the KV cache gives the same greedy tokens as recomputing
the whole sequence at every step (MoBA routes each query the same way in both), for MoBA
decode and for the policy's dense-decode option.
"""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import moba_rewrite as mr

POLICY = {
    "version": 1,
    "defaults": {"mode": "moba", "block_size": 32, "top_k": 2, "decode": "moba"},
    "rules": [{"name": "dense-tail", "layers": "-1:", "mode": "dense"}],  # layer-wise hybrid
}


def greedy_without_cache(model, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    ids = prompt
    for _ in range(new_tokens):
        logits = model(input_ids=ids, use_cache=False).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids


def main() -> None:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         bos_token_id=0, eos_token_id=None, pad_token_id=0)
    model = LlamaForCausalLM(config).eval()
    prompt = torch.randint(1, 256, (1, 150))

    mr.rewrite(model, POLICY)
    print(model._moba_report)

    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None)
        check = greedy_without_cache(model, prompt, 12)
    print("generated token ids:", out[0, prompt.shape[1]:].tolist())
    assert torch.equal(out, check), "generate() with KV cache differs from full recomputation"

    # Prefill with MoBA, decode dense: one line in the policy.
    mr.rewrite(model, {**POLICY, "defaults": {**POLICY["defaults"], "decode": "dense"}})
    with torch.no_grad():
        out_dense_decode = model.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None)
    print("with dense decode:  ", out_dense_decode[0, prompt.shape[1]:].tolist())
    print("ok: generate() works on the rewritten model")


if __name__ == "__main__":
    main()
