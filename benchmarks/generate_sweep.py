"""`generate()` through a rewrite, over every causal LM class in transformers' registry.

For every model type in `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`, build the model from its default
config shrunk to a tiny size (`zoo_sweep.tiny_config`), then with a 24-token prompt and 8 new
tokens (greedy), with the default dynamic cache and with `cache_implementation="static"`:

- **dense limit**: `mr.rewrite(copy, policy)` with `top_k * block_size >= 32` must generate the
  original model's tokens, every step's logits within 1e-4 (SPEC section 2 item 8): the cache
  path (in-place dynamic layers, block means, static-cache positions) may change nothing. Where
  the original model's own static-cache run differs from its dynamic-cache run, the rewritten
  static run may equal either (the row says which);
- **sparse** (block 4, top-2): `generate()` must run and give finite logits (no oracle here; the
  test suite checks sparse decoding against the reference for its families).

    python benchmarks/generate_sweep.py                     # every causal LM type (a few minutes)
    python benchmarks/generate_sweep.py --only llama qwen3  # some

A row per model type: `equal`, `DIFFERS` (with the error), `ERROR` (the rewritten model failed
where the original ran) or `skipped` (the original could not be built or could not generate).
Each model type runs in a child process (8 GiB address-space limit, `--seconds` per phase), so
one that exhausts memory or crashes is a row, not the end of the sweep.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import warnings
from collections import Counter

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402

from zoo_sweep import _short, time_limit, tiny_config  # noqa: E402

PROMPT, NEW = 24, 8
LIMIT = {"version": 1, "defaults": {"block_size": 8, "top_k": 8, "decode": "moba"}}  # 64 >= 32 tokens
SPARSE = {"version": 1, "defaults": {"block_size": 4, "top_k": 2, "decode": "moba"}}


def _generate(model, ids, cache: str):
    kw = {"cache_implementation": "static"} if cache == "static" else {}
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, min_new_tokens=NEW,
                             do_sample=False, output_logits=True, return_dict_in_generate=True,
                             pad_token_id=0, **kw)
    return out.sequences, torch.stack(out.logits, dim=1).float()


def sweep_one(model_type: str, class_name: str, seconds: int) -> tuple[str, str]:
    import transformers
    import moba_rewrite as mr

    try:
        with time_limit(seconds):
            cfg = tiny_config(type(transformers.AutoConfig.for_model(model_type)))
            torch.manual_seed(0)
            model = getattr(transformers, class_name)(cfg).eval()
            try:
                model.set_attn_implementation("sdpa")
            except Exception:  # noqa: BLE001 - models without sdpa keep their eager attention
                pass
            vocab = int(getattr(cfg.get_text_config(decoder=True), "vocab_size", 0) or 64)
            ids = torch.randint(3, max(4, min(vocab, 1000)), (1, PROMPT), generator=torch.Generator().manual_seed(1))
            want = {c: _generate(model, ids, c) for c in ("dynamic", "static")}
    except Exception as e:  # noqa: BLE001
        return "skipped", _short(e)
    try:
        with time_limit(seconds):
            limit = mr.rewrite(copy.deepcopy(model), LIMIT)
            notes = []
            for cache, (tokens, logits) in want.items():
                got_tokens, got_logits = _generate(limit, ids, cache)
                err = (got_logits - logits).abs().max().item()
                if torch.equal(got_tokens, tokens) and err <= 1e-4:
                    continue
                dyn_tokens, dyn_logits = want["dynamic"]
                dyn_err = (got_logits - dyn_logits).abs().max().item()
                if cache == "static" and torch.equal(got_tokens, dyn_tokens) and dyn_err <= 1e-4:
                    notes.append(f"ok: the original's static run differs from its dynamic run by {err:.3g}; "
                                 f"the rewrite's static run equals the dynamic one")
                    continue
                notes.append(f"{cache}: logits differ by {err:.3g}, tokens "
                             f"{'equal' if torch.equal(got_tokens, tokens) else 'differ'}")
            sparse = mr.rewrite(copy.deepcopy(model), SPARSE)
            for cache in ("dynamic", "static"):
                _, logits = _generate(sparse, ids, cache)
                if not torch.isfinite(logits).all():
                    notes.append(f"sparse {cache}: non-finite logits")
    except Exception as e:  # noqa: BLE001
        return "ERROR", _short(e)
    bad = [n for n in notes if not n.startswith("ok: ")]
    return ("DIFFERS" if bad else "equal", "; ".join(notes))


def _child(model_type: str, class_name: str, seconds: int) -> tuple[str, str]:
    """`sweep_one` in a child process with an address-space limit; a crash or kill is a row."""
    import json
    import resource
    import subprocess

    def limit_memory():
        resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))

    try:
        run = subprocess.run([sys.executable, __file__, "--one", model_type, class_name, "--seconds", str(seconds)],
                             capture_output=True, text=True, timeout=3 * seconds + 30, preexec_fn=limit_memory)
    except subprocess.TimeoutExpired:
        return "skipped", f"child over {3 * seconds + 30}s"
    last = run.stdout.strip().splitlines()[-1:] or [""]
    try:
        status, detail = json.loads(last[0])
    except ValueError:
        return "skipped", f"child exited {run.returncode}: {(run.stderr.strip().splitlines() or [''])[-1][:200]}"
    return status, detail


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", help="model types to run (default: every causal LM type)")
    ap.add_argument("--seconds", type=int, default=60, help="time limit per model and phase")
    ap.add_argument("--one", nargs=2, metavar=("TYPE", "CLASS"), help=argparse.SUPPRESS)  # a child's job
    args = ap.parse_args(argv)
    if args.one:
        import json

        warnings.filterwarnings("ignore")
        print(json.dumps(sweep_one(args.one[0], args.one[1], args.seconds)))
        return 0
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    types = sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items())
    if args.only:
        types = [(t, c) for t, c in types if t in args.only]
    counts: Counter = Counter()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}; {len(types)} causal LM types")
    print("| model type | class | result | detail |")
    print("|---|---|---|---|")
    for model_type, class_name in types:
        if not hasattr(transformers, class_name):
            continue
        status, detail = _child(model_type, class_name, args.seconds)
        counts[status] += 1
        print(f"| {model_type} | {class_name} | {status} | {detail} |", flush=True)
    print("\n" + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())))
    return 1 if counts["DIFFERS"] or counts["ERROR"] else 0


if __name__ == "__main__":
    sys.exit(main())
