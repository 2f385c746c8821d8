"""One sequence across two ranks: a rewritten Hugging Face model's prefill, training step and
decoding under context parallelism, each checked against the same model in one process.

    python examples/context_parallel.py                            # starts 2 gloo ranks on this machine
    python examples/context_parallel.py --hybrid                   # a Qwen3.5-style hybrid stack instead
    torchrun --nproc_per_node 2 examples/context_parallel.py       # or let torchrun start them

Every rank builds the same tiny Llama (MoBA block 16 / top-2, the last layer dense: a hybrid
policy; `--hybrid`: a Qwen3.5 stack, gated delta nets with MoBA attention every 4th layer, whose
recurrent state crosses the ranks) and the same batch, and holds a zigzag shard of the sequence
(`shard_inputs`):

1. prefill: the sharded logits, gathered, equal the unsharded model's;
2. training step: the loss of the sharded batch (labels shifted before sharding, summed over the
   ranks) and every parameter's gradient (summed over the ranks) equal the unsharded step's;
3. decoding: `hf_cp_generate.generate` keeps the KV cache sharded and gives `generate()`'s tokens.

On GPUs use NCCL and one device per rank (`init_process_group("nccl")`, the tensors on
`cuda:<local rank>`); nothing else changes. docs/CONTEXT_PARALLEL.md has the details.
"""

from __future__ import annotations

import datetime
import os
import socket
import subprocess
import sys

WORLD = 2
POLICY = {"version": 1, "defaults": {"mode": "moba", "block_size": 16, "top_k": 2},
          "rules": [{"layers": "-1:", "mode": "dense"}]}


def _model():
    import torch
    import transformers

    import moba_rewrite as mr

    torch.manual_seed(0)
    sizes = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                 max_position_embeddings=512, attention_dropout=0.0)
    if os.environ.get("EXAMPLE_HYBRID") == "1" or "--hybrid" in sys.argv[1:]:  # delta nets, MoBA every 4th layer
        config = transformers.Qwen3_5TextConfig(**sizes, num_hidden_layers=4, head_dim=16, linear_num_key_heads=2,
                                                linear_num_value_heads=4, linear_key_head_dim=16,
                                                linear_value_head_dim=16)
        return mr.rewrite(transformers.Qwen3_5ForCausalLM(config), {**POLICY, "rules": []})
    config = transformers.LlamaConfig(**sizes, num_hidden_layers=3)
    return mr.rewrite(transformers.LlamaForCausalLM(config), POLICY)


def _check(name: str, got, want, atol: float = 1e-4) -> None:
    err = (got - want).abs().max().item()
    assert err <= atol, f"{name}: sharded vs one process differ by {err:.2e}"


def run_rank() -> None:
    """One rank's work (started by `main` or by torchrun: RANK, WORLD_SIZE, MASTER_ADDR/PORT set)."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from moba_rewrite.integrations.hf_cp import context_parallel, shard_inputs
    from moba_rewrite.integrations.hf_cp_generate import generate
    from moba_rewrite.parallel import shard_sequence, unshard_sequence

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank = dist.get_rank()
    model = _model()
    ids = torch.randint(0, 128, (2, 180), generator=torch.Generator().manual_seed(1))
    local_ids, pos, seq_len = shard_inputs(model, ids, layout="zigzag")

    # 1. prefill
    model.eval()
    with torch.no_grad():
        want = model(input_ids=ids, use_cache=False).logits
        with context_parallel(model, layout="zigzag", seq_len=seq_len):
            local = model(input_ids=local_ids, position_ids=pos, use_cache=False).logits
    _check("prefill logits", unshard_sequence(local, layout="zigzag", dim=1, seq_len=seq_len), want)

    # 2. training step: labels shifted before sharding; the loss summed over the ranks
    labels = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], dim=1)
    n_labels = int((labels != -100).sum())
    model.train()
    model.zero_grad()
    F.cross_entropy(model(input_ids=ids, use_cache=False).logits.flatten(0, 1), labels.flatten(),
                    ignore_index=-100, reduction="sum").div(n_labels).backward()
    want_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    local_labels = shard_sequence(labels, layout="zigzag", dim=1, block_size=16, pad_value=-100)
    with context_parallel(model, layout="zigzag", seq_len=seq_len):
        logits = model(input_ids=local_ids, position_ids=pos, use_cache=False).logits
        loss = F.cross_entropy(logits.flatten(0, 1), local_labels.flatten(), ignore_index=-100,
                               reduction="sum") / n_labels
        loss.backward()  # inside the context: every rank joins the backward's exchanges
    total = loss.detach().clone()
    dist.all_reduce(total)
    for name, param in model.named_parameters():
        dist.all_reduce(param.grad)  # what FSDP / DDP do over the context-parallel ranks
        _check(f"gradient of {name}", param.grad, want_grads[name], atol=1e-5)

    # 3. decoding with the KV cache left sharded
    model.eval()
    prompt = ids[:, :100]
    tokens = generate(model, prompt, max_new_tokens=12)
    with torch.no_grad():
        want_tokens = model.generate(prompt, max_new_tokens=12, do_sample=False, attention_mask=torch.ones_like(prompt))
    assert torch.equal(tokens, want_tokens), "sharded-cache decoding chose other tokens than generate()"
    if rank == 0:
        print(f"rank 0 ({type(model).__name__}): prefill logits, loss {total.item():.4f} and {len(want_grads)} "
              f"gradients, and 12 decoded tokens equal one process's")
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    """Start WORLD ranks of this script, as torchrun would, and wait for them."""
    env = {**os.environ, "WORLD_SIZE": str(WORLD), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "OMP_NUM_THREADS": "1", "EXAMPLE_HYBRID": "1" if "--hybrid" in sys.argv[1:] else "0"}
    ranks = [subprocess.Popen([sys.executable, __file__], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(WORLD)]
    failed = []
    for r, proc in enumerate(ranks):
        try:
            out, _ = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for p in ranks:
                p.kill()
            raise SystemExit(f"rank {r} did not finish within 300 s")
        print(out, end="")
        if proc.returncode:
            failed.append(r)
    if failed:
        raise SystemExit(f"ranks {failed} failed (their output above)")
    print(f"ok: {WORLD} ranks ran a sharded prefill, training step and decoding equal to one process")


if __name__ == "__main__":
    run_rank() if "RANK" in os.environ else main()
