"""MoBA activation: a model trained with dense attention, rewritten to MoBA, then trained on with MoBA.

    python examples/activate_moba.py                   # a few minutes on a 2-core CPU
    python examples/activate_moba.py --quick           # seconds: the pipeline only (numbers mean nothing)

The MoBA paper's recipe at toy scale. A tiny Llama-style model (transformers' LlamaForCausalLM)
learns a long-range retrieval task with dense attention: the ids passkey of `moba-rewrite eval`
(a marker and a 4-token key hidden at a random depth in random filler; at the end the marker
again, and the model must reproduce the key), with a length curriculum up to --seq-len tokens,
until it solves it. Then:

1. `mr.evaluate` on held-out prompts: the dense model's accuracy, and the accuracy of its MoBA
   rewrite (hybrid policy: the last --dense-tail layers stay dense) -- the drop;
2. continued training of the rewritten model with MoBA for a fixed budget (--moba-steps), with a
   length curriculum of its own from 4 blocks up to --seq-len (trained at --seq-len at once, the
   gate rarely selects the needle's block, so attention gets no signal to learn from: 150 steps
   left the accuracy where it was in our runs, see benchmarks/RESULTS.md);
3. `mr.evaluate` again: the activated model's accuracy under MoBA -- the recovery.

It prints the three accuracies and saves a plot (--plot). Same held-out prompts (same seed)
for every measurement; training prompts come from another random stream. bf16 autocast and
gradient checkpointing are used where they help (CUDA; --grad-ckpt to force the latter).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import moba_rewrite as mr
from moba_rewrite.evaluation import passkey

VOCAB = 64
KEY_LEN = 4
SOLVED = 0.95  # dense training stops once held-out accuracy at the full length reaches this


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-len", type=int, default=1024, help="final training and evaluation length (default 1024)")
    p.add_argument("--layers", type=int, default=2, help="decoder layers (default 2)")
    p.add_argument("--hidden", type=int, default=64, help="hidden size (default 64; 4 heads)")
    p.add_argument("--block-size", type=int, default=64, help="MoBA block size (default 64)")
    p.add_argument("--top-k", type=int, default=3, help="MoBA top-k, own block included (default 3)")
    p.add_argument("--dense-tail", type=int, default=1, help="last layers kept dense (default 1)")
    p.add_argument("--dense-steps", type=int, default=600, help="most dense training steps (default 600)")
    p.add_argument("--moba-steps", type=int, default=400, help="MoBA training steps, the fixed budget (default 400)")
    p.add_argument("--batch", type=int, default=16, help="training batch (default 16)")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (default 3e-3)")
    p.add_argument("--eval-samples", type=int, default=16, help="held-out prompts per depth (default 16)")
    p.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing (default: on CUDA only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", default="activate_moba.png", help="where to save the plot (default activate_moba.png)")
    p.add_argument("--save-dense", metavar="DIR",
                   help="also save the dense-trained checkpoint (Hugging Face directory) and held-out task sequences "
                        "(DIR/passkey.ids), for `moba-rewrite eval` / `calibrate`")
    p.add_argument("--quick", action="store_true", help="tiny budget for tests: 128 tokens, a few steps")
    args = p.parse_args(argv)
    if args.quick:
        args.seq_len, args.block_size, args.dense_steps, args.moba_steps = 128, 16, 6, 3
        args.eval_samples, args.batch = 1, 4
    return args


def build_model(args, device) -> LlamaForCausalLM:
    torch.manual_seed(args.seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                      num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=max(2048, args.seq_len), attention_dropout=0.0,
                      attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).to(device)


def policy(args) -> dict:
    return {"version": 1, "description": "activation example: MoBA, the last layers dense (layer-wise hybrid)",
            "defaults": {"mode": "moba", "block_size": args.block_size, "top_k": args.top_k},
            "rules": [{"name": "dense-tail", "layers": f"-{args.dense_tail}:", "mode": "dense"}]
            if args.dense_tail > 0 else []}


class Trainer:
    """A plain PyTorch loop: AdamW, gradient clipping, loss on the answer tokens only."""

    def __init__(self, model, args, device) -> None:
        self.model, self.args, self.device = model, args, device
        self.opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
        self.gen = torch.Generator().manual_seed(args.seed + 1)  # training prompts: not the held-out stream
        self.autocast = device.type == "cuda" and torch.cuda.is_bf16_supported()
        self.log: list[tuple[int, int, float, str]] = []  # (step, length, loss, phase)
        if args.grad_ckpt or device.type == "cuda":
            model.gradient_checkpointing_enable()

    def step(self, length: int, phase: str) -> float:
        x, y = passkey.ids_batch(VOCAB, length, self.args.batch, key_len=KEY_LEN, generator=self.gen)
        self.model.train()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            loss = self.model(input_ids=x.to(self.device), labels=y.to(self.device), use_cache=False).loss
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.model.eval()
        value = float(loss.detach())
        self.log.append((len(self.log), length, value, phase))
        return value


@torch.no_grad()
def quick_accuracy(model, length: int, device, count: int = 32) -> float:
    """Held-out accuracy for the curriculum (its own seed, not the final evaluation's prompts)."""
    x, _ = passkey.ids_batch(VOCAB, length, count, key_len=KEY_LEN, generator=torch.Generator().manual_seed(12345))
    out = model(input_ids=x.to(device), use_cache=False).logits
    return sum(passkey.retrieved(out[i], passkey.PasskeySample(x[i], length - KEY_LEN, 0, 0.0))
               for i in range(count)) / count


def curriculum(model, trainer: Trainer, lengths: list[int], steps: int, phase: str, device, bar,
               stop_when_solved: bool) -> tuple[int, float, list[tuple[int, int]]]:
    """Train through `lengths`, moving to the next once held-out accuracy (of the model as it runs:
    dense, or MoBA once rewritten) reaches 0.9; checks every 20 steps. Returns (steps run, last
    accuracy, [(step, length) where each stage began])."""
    stage, acc, starts = 0, 0.0, [(0, lengths[0])]
    for step in range(steps):
        loss = trainer.step(lengths[stage], phase)
        bar.set_postfix_str(f"len {lengths[stage]} loss {loss:.3f} acc {acc:.2f}")
        bar.update(1)
        if (step + 1) % 20 == 0 or step + 1 == steps:
            acc = quick_accuracy(model, lengths[stage], device)
            if acc >= 0.9 and stage < len(lengths) - 1:
                stage += 1
                starts.append((step + 1, lengths[stage]))
            elif stop_when_solved and acc >= SOLVED and stage == len(lengths) - 1:
                return step + 1, acc, starts
    return steps, acc, starts


def lengths_from(first: int, last: int) -> list[int]:
    """first, 2 first, 4 first, ... below `last`, then `last`."""
    out = []
    while first < last:
        out.append(first)
        first *= 2
    return out + [last]


def measure(model, args, name: str) -> dict:
    """`mr.evaluate` of `model`'s weights, dense against rewritten: passkey accuracy per depth on
    held-out prompts, and KL / per-site MoBA error on held-out task sequences (the same every time)."""
    result = mr.evaluate(model, policy(args), seq_len=args.seq_len, data=held_out(args), tasks=["kl", "sites", "passkey"],
                         samples=args.eval_samples, passkey_key_len=KEY_LEN, seed=args.seed, name=name)
    return result.data


def held_out(args) -> torch.Tensor:
    """Held-out task sequences `[eval_samples, seq_len]` (the same every call): eval's kl / sites data."""
    ids, _ = passkey.ids_batch(VOCAB, args.seq_len, args.eval_samples, key_len=KEY_LEN,
                               generator=torch.Generator().manual_seed(args.seed + 2))
    return ids


def save_dense(model, args) -> None:
    from pathlib import Path

    out = Path(args.save_dense)
    model.save_pretrained(str(out))
    (out / "passkey.ids").write_text("\n".join(" ".join(map(str, row)) for row in held_out(args).tolist()) + "\n")
    print(f"saved the dense-trained checkpoint and {args.eval_samples} held-out task sequences in {out}")


def dense_copy(model, args, device) -> LlamaForCausalLM:
    """The same weights in a fresh (unrewritten) model: what `evaluate` takes as the original."""
    fresh = build_model(args, device)
    fresh.load_state_dict(model.state_dict())
    return fresh.eval()


def plot(path: str, before: dict, after: dict, log, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    depths = before["passkey"]["depths"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.8))
    a1.plot(depths, before["passkey"]["original"][0], "o-", label="dense (trained dense)")
    a1.plot(depths, before["passkey"]["rewritten"][0], "s--", label="MoBA, before activation")
    a1.plot(depths, after["passkey"]["rewritten"][0], "^-", label=f"MoBA, after {args.moba_steps} MoBA steps")
    a1.set_xlabel("needle depth (0 = start of context)")
    a1.set_ylabel("passkey accuracy")
    a1.set_ylim(-0.05, 1.05)
    a1.set_title(f"{args.seq_len} tokens, block {args.block_size}, top-{args.top_k}, "
                 f"last {args.dense_tail} layer(s) dense", fontsize=9)
    a1.legend(fontsize=8)
    for phase, style in (("dense", "C0"), ("moba", "C2")):
        pts = [(s, loss) for s, _, loss, ph in log if ph == phase]
        if pts:
            a2.plot(*zip(*pts), style, lw=0.8, label=f"{phase} training")
    a2.set_yscale("log")
    a2.set_xlabel("step")
    a2.set_ylabel("loss on the answer tokens")
    a2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    from tqdm.auto import tqdm

    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.perf_counter()
    model = build_model(args, device)
    trainer = Trainer(model, args, device)
    show = sys.stderr.isatty() or os.environ.get("MOBA_REWRITE_PROGRESS") == "1"
    with tqdm(total=args.dense_steps, desc="dense training", disable=not show, file=sys.stderr) as bar:
        steps, acc, stages = curriculum(model, trainer, lengths_from(32, args.seq_len), args.dense_steps, "dense",
                                        device, bar, stop_when_solved=True)
    solved = acc >= SOLVED
    print(f"dense training: {steps} steps (lengths {', '.join(f'{n} from step {s}' for s, n in stages)}), "
          f"held-out accuracy {acc:.0%} at {args.seq_len} tokens "
          f"({'solved' if solved else 'NOT solved: the numbers below say little'}), {time.perf_counter() - t0:.0f} s")

    if args.save_dense:
        save_dense(model, args)
    before = measure(model, args, "trained dense")
    dense_acc = before["passkey"]["mean"]["original"]
    drop_acc = before["passkey"]["mean"]["rewritten"]
    print(f"rewrite: mean KL(dense || MoBA) {before['policy_kl']['mean']:.4f}, top-1 agreement "
          f"{before['top1_agreement']:.1%} on {args.eval_samples} held-out task sequences")

    mr.rewrite(model, policy(args))
    print(model._moba_report)
    t1 = time.perf_counter()
    # Activation, as the paper extends context step by step: from 4 blocks (where the needle's block
    # is often among the selected ones, so attention learns to tell it apart) up to --seq-len.
    with tqdm(total=args.moba_steps, desc="MoBA training", disable=not show, file=sys.stderr) as bar:
        _, _, stages = curriculum(model, trainer, lengths_from(min(4 * args.block_size, args.seq_len), args.seq_len),
                                  args.moba_steps, "moba", device, bar, stop_when_solved=False)
    print(f"MoBA training: {args.moba_steps} steps (lengths {', '.join(f'{n} from step {s}' for s, n in stages)}), "
          f"{time.perf_counter() - t1:.0f} s")

    after = measure(dense_copy(model, args, device), args, "activated")
    moba_acc = after["passkey"]["mean"]["rewritten"]
    print(f"\npasskey accuracy at {args.seq_len} tokens ({len(before['passkey']['depths'])} depths x "
          f"{args.eval_samples} held-out prompts, whole 4-token key by greedy decoding):")
    rows = [("dense model (trained dense)", dense_acc), ("MoBA rewrite, before activation (drop)", drop_acc),
            (f"MoBA after {args.moba_steps} MoBA steps (recovery)", moba_acc)]
    for label, value in rows:
        print(f"  {label + ':':<44}{value:7.1%}")
    print(f"  (the activated weights run dense: {after['passkey']['mean']['original']:.1%})")
    for row_b, row_a in zip(before["sites"], after["sites"]):
        if row_b["decision"] == "moba":
            print(f"  {row_b['name']}: attention mass MoBA keeps {row_b['kept_mass']:.1%} before activation, "
                  f"{row_a['kept_mass']:.1%} after (output error {row_b['out_rel_err']:.3f} -> "
                  f"{row_a['out_rel_err']:.3f})")
    if args.plot:
        plot(args.plot, before, after, trainer.log, args)
        print(f"plot: {args.plot}")
    print(f"total {time.perf_counter() - t0:.0f} s on {device}")
    if args.quick:
        print("ok: the activation pipeline ran end to end (--quick: too few steps for the accuracies to mean anything)")
    else:
        print(f"ok: dense {dense_acc:.0%} -> MoBA {drop_acc:.0%} -> activated MoBA {moba_acc:.0%}")


if __name__ == "__main__":
    main()
