"""The `generate` command: greedy decoding with a generation artifact written by
`moba-rewrite rewrite --generate` (docs/EXPORT.md, "Generation programs").

This is the example a deployer copies: load the prefill and decode programs and the spec,
left-pad the prompts into one batch, run the prompt once (prefill), then one token at a time
(decode) against the static KV cache the programs take and return.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

from moba_rewrite.cli.errors import EXIT_CHECKPOINT, EXIT_OK, EXIT_VALUE, CliError, first_line


def load_artifact(path: str | Path) -> tuple[Callable, Callable, object]:
    """(prefill, decode, `GenerationSpec`) of a generation artifact; anything else exits 3."""
    from moba_rewrite.exporters.generation import GenerationExportError, load_generation

    path = Path(path)
    if not path.exists():
        raise CliError(path, "expected a generation artifact (written by rewrite --generate); no such file",
                       EXIT_CHECKPOINT)
    try:
        if path.is_dir():  # rewrite --format onnx --generate
            from moba_rewrite.exporters.onnx_generation import load_generation_onnx

            return load_generation_onnx(path)
        return load_generation(path)
    except GenerationExportError as exc:
        raise CliError("", str(exc), EXIT_CHECKPOINT) from exc
    except Exception as exc:  # not a zip archive, a plain program, ...
        raise CliError(path, f"expected a generation artifact written by rewrite --generate ({type(exc).__name__})",
                       EXIT_CHECKPOINT) from exc


def check_prompts(spec, prompts: list[list[int]], max_new_tokens: int) -> None:
    """One-line errors (exit 8) for prompts the programs cannot take."""
    if len(prompts) > spec.batch:
        raise CliError("--input-ids", f"expected at most {spec.batch} prompts (the exported batch), got "
                                      f"{len(prompts)}", EXIT_VALUE)
    for i, p in enumerate(prompts):
        bad = next((t for t in p if not 0 <= t < spec.vocab_size), None)
        if bad is not None:
            raise CliError("--input-ids", f"expected token ids in 0..{spec.vocab_size - 1} (the vocabulary), got "
                                          f"{bad} in prompt {i + 1}", EXIT_VALUE)
    longest = max(len(p) for p in prompts)
    if longest > spec.max_seq_len:
        raise CliError("--input-ids", f"expected prompts of at most {spec.max_seq_len} tokens (the exported "
                                      f"--max-seq-len), got {longest}", EXIT_VALUE)
    if longest + max_new_tokens - 1 > spec.max_seq_len:
        raise CliError("--max-new-tokens", f"expected the longest prompt ({longest} tokens) plus the new tokens "
                                           f"({max_new_tokens}) to fit the exported cache of {spec.max_seq_len} "
                                           f"slots; at most {spec.max_seq_len - longest + 1} new tokens",
                       EXIT_VALUE)


def greedy(prefill: Callable, decode: Callable, spec, prompts: list[list[int]], max_new_tokens: int
           ) -> list[list[int]]:
    """Greedy decoding: per prompt, the new token ids (stopping after an end-of-sequence id)."""
    import torch

    check_prompts(spec, prompts, max_new_tokens)
    rows = prompts + [prompts[0]] * (spec.batch - len(prompts))  # unused rows repeat a prompt, then are dropped
    width = max(len(p) for p in rows)
    ids = torch.full((spec.batch, width), spec.pad_token_id, dtype=torch.long)
    mask = torch.zeros((spec.batch, spec.max_seq_len), dtype=torch.long)  # 1: a real token in that cache slot
    for r, p in enumerate(rows):  # left padding: every prompt ends at slot width - 1
        ids[r, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[r, width - len(p):width] = 1
    cache = spec.empty_cache()
    first = prefill if width > 1 else decode  # the prefill program takes 2 tokens or more
    logits, *cache = first(ids, mask, torch.arange(width), *cache)
    new: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    for step in range(max_new_tokens):
        token = logits[:, -1].argmax(-1)
        for r in range(len(prompts)):
            if not done[r]:
                new[r].append(int(token[r]))
                done[r] = int(token[r]) in spec.eos_token_id
        if all(done) or step == max_new_tokens - 1:
            break
        position = width + step
        mask[:, position] = 1
        logits, *cache = decode(token[:, None], mask, torch.tensor([position]), *cache)
    return new


def load_tokenizer(artifact: str | Path, directory: str | None):
    """The tokenizer of `--tokenizer DIR`, else the one the artifact carries, else None."""
    from moba_rewrite.exporters import tokenizer_files

    if directory is not None:
        from moba_rewrite.evaluation.data import find_tokenizer

        try:
            tokenizer = find_tokenizer(directory)
        except Exception as exc:  # noqa: BLE001  (files transformers cannot load)
            raise CliError("--tokenizer", f"expected a tokenizer folder ({first_line(exc)})", EXIT_VALUE) from exc
        if tokenizer is None:
            raise CliError("--tokenizer", f"expected a folder with tokenizer files (tokenizer.json, ...), got "
                                          f"{directory}", EXIT_VALUE)
        return tokenizer
    try:
        files = tokenizer_files.read_artifact(artifact)
        return tokenizer_files.load(files) if files else None
    except Exception as exc:  # noqa: BLE001  (damaged carried files)
        raise CliError(artifact, f"expected the artifact's tokenizer files to load ({first_line(exc)})",
                       EXIT_CHECKPOINT) from exc


def cmd_generate(args: argparse.Namespace) -> int:
    prefill, decode, spec = load_artifact(args.artifact)
    tokenizer = load_tokenizer(args.artifact, args.tokenizer) if (args.prompt or args.tokenizer) else None
    if args.prompt:
        if tokenizer is None:
            raise CliError("--prompt", "expected a tokenizer: the artifact carries none (its checkpoint had no "
                                       "tokenizer files); give --tokenizer DIR, or token ids with --input-ids",
                           EXIT_VALUE)
        prompts = [list(tokenizer(text)["input_ids"]) for text in args.prompt]
        if not all(prompts):
            raise CliError("--prompt", "expected text the tokenizer turns into at least one token", EXIT_VALUE)
    else:
        prompts = args.input_ids
    if spec.logits_processing and not getattr(args, "quiet", False):
        from moba_rewrite.integrations.hf_generation_config import describe

        print(f"note: {args.artifact}: the checkpoint's generation config sets {describe(spec.logits_processing)}, "
              f"which transformers' generate() applies; this command decodes by plain argmax without them",
              file=sys.stderr)
    new = greedy(prefill, decode, spec, prompts, args.max_new_tokens)
    texts = [tokenizer.decode(tokens, skip_special_tokens=True) for tokens in new] if tokenizer is not None else None
    if args.json:
        print(json.dumps({"new_tokens": new, **({"new_text": texts} if texts is not None else {})}))
    else:
        for i, tokens in enumerate(new):
            print(f"prompt {i + 1}: {' '.join(map(str, tokens))}")
            if texts is not None:
                print(f"prompt {i + 1} text: {texts[i]!r}")
    return EXIT_OK


def token_ids(text: str) -> list[int]:
    """argparse type of `--input-ids`: `1,2,3` (commas or spaces)."""
    parts = [t for t in text.replace(",", " ").split() if t]
    if not parts:
        raise argparse.ArgumentTypeError("expected comma-separated token ids, got an empty list")
    try:
        return [int(t) for t in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r}") from None


def add_generate_parser(sub, leaves: list, leaf: Callable, positive: Callable) -> None:
    p = leaf(sub, "generate", cmd_generate, leaves, help="greedy decoding with a generation artifact",
             description="Run the prefill and decode programs of an artifact written by `rewrite --generate` "
                         "(greedy) and print the new token ids of each prompt (and their text when a tokenizer "
                         "is at hand).")
    p.add_argument("artifact", metavar="ARTIFACT",
                   help="written by rewrite --generate: a .pt2 (pt2 or aoti) or an ONNX folder")
    prompts = p.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--input-ids", type=token_ids, action="append", metavar="IDS",
                         help="a prompt as comma-separated token ids; repeat for a batch (left padded)")
    prompts.add_argument("--prompt", action="append", metavar="TEXT",
                         help="a prompt as text, tokenized by the tokenizer the artifact carries (or --tokenizer); "
                              "repeat for a batch")
    p.add_argument("--tokenizer", metavar="DIR",
                   help="a folder with tokenizer files, instead of the artifact's own (also decodes --input-ids)")
    p.add_argument("--max-new-tokens", type=positive, required=True, metavar="N", help="tokens to generate")
    p.add_argument("--json", action="store_true", help='print {"new_tokens": [[...], ...]} (one list per prompt; '
                                                       'with a tokenizer also "new_text")')
