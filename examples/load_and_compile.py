"""Load a checkpoint written by `moba-rewrite rewrite --format hf` and torch.compile it.

    python examples/load_and_compile.py [CKPT_MOBA]

Without an argument it first makes one: a tiny Llama checkpoint, rewritten with the
`moba-rewrite` command (run in process here; on a shell it is
`moba-rewrite rewrite ./ckpt --policy hybrid.yaml --out ./ckpt-moba`).
"""

import sys
import tempfile
from pathlib import Path

import torch

import moba_rewrite as mr
from moba_rewrite import cli


def make_rewritten_checkpoint(work: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    LlamaForCausalLM(config).save_pretrained(str(work / "ckpt"))
    (work / "hybrid.yaml").write_text(
        "version: 1\n"
        "defaults: {mode: moba, block_size: 32, top_k: 2}\n"
        "rules:\n"
        "  - {name: dense-tail, layers: '-1:', mode: dense}\n")
    code = cli.main(["rewrite", str(work / "ckpt"), "--policy", str(work / "hybrid.yaml"),
                     "--out", str(work / "ckpt-moba"), "--seq-len", "96", "--quiet"])
    if code:
        raise SystemExit(code)
    return work / "ckpt-moba"


def main() -> None:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else make_rewritten_checkpoint(Path(tempfile.mkdtemp()))
    model = mr.load(path)  # the HF model with its attention rewritten by the stored policy
    print(model._moba_report)
    compiled = torch.compile(model, fullgraph=True)
    ids = torch.randint(0, model.config.vocab_size, (1, 160))
    with torch.no_grad():
        eager = model(input_ids=ids, use_cache=False).logits
        fast = compiled(input_ids=ids, use_cache=False).logits
    diff = (fast - eager).abs().max().item()
    print(f"compiled vs eager: max |diff| = {diff:.2e}")
    assert diff < 1e-4
    print(f"ok: {path} loaded and compiled")


if __name__ == "__main__":
    main()
