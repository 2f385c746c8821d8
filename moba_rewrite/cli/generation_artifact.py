"""`rewrite --generate`: rewrite a Hugging Face decoder, export its prefill and decode programs over
a static KV cache, write them atomically, and verify the written file against `generate()` of the
in-memory rewritten model (docs/CLI.md, docs/EXPORT.md)."""

from __future__ import annotations

import contextlib
from pathlib import Path

from moba_rewrite.cli import steps
from moba_rewrite.cli.errors import (EXIT_ARCHITECTURE, EXIT_EXPORT, EXIT_USAGE, EXIT_VALUE, EXIT_VERIFY, CliError,
                                     first_line)
from moba_rewrite.cli.output import print_report

GENERATE_FORMATS = ("pt2", "aoti", "onnx")


def check_request(fmt: str, generate: bool, max_seq_len: int | None, batch: int, dynamic: bool = False) -> None:
    """Flag combinations, checked before any work."""
    if generate and dynamic:
        raise CliError("--dynamic", "does not apply with --generate (the prefill program's prompt length is always "
                                    "dynamic, up to --max-seq-len)", EXIT_USAGE)
    if not generate:
        if max_seq_len is not None or batch != 1:
            raise CliError("--max-seq-len" if max_seq_len is not None else "--batch", "only applies with --generate",
                           EXIT_USAGE)
        return
    if fmt not in GENERATE_FORMATS:
        raise CliError("--generate", f"expected --format pt2, aoti or onnx (generation programs for a decoder "
                                     f"with a KV cache), got {fmt}", EXIT_VALUE)
    if max_seq_len is None:
        raise CliError("--generate", "expected --max-seq-len N (the KV cache's slots: prompt plus new tokens)",
                       EXIT_USAGE)
    if max_seq_len < 2:
        raise CliError("--max-seq-len", f"expected at least 2 slots, got {max_seq_len}", EXIT_VALUE)


def rewrite_for_generation(loaded, policy, out: Path, *, fmt: str, max_seq_len: int, batch: int, seq_len, dev,
                           force: bool, verify: bool, quiet: bool, bar, checkpoint):
    """Rewrite, export, write (pt2, compiled by AOTInductor, or an ONNX folder) and verify; returns
    (report, sample length, max diff, model)."""
    from moba_rewrite import checkpoints as ck
    from moba_rewrite.exporters.common import as_output_failure
    from moba_rewrite.exporters.generation import (GenerationExportError, export_for_generation, save_generation_aoti,
                                                   save_generation_pt2)
    from moba_rewrite.exporters.onnx_generation import save_generation_onnx

    writers = {"pt2": save_generation_pt2, "aoti": save_generation_aoti, "onnx": save_generation_onnx}

    if not loaded.is_hf:
        raise CliError("--generate", "expected a Hugging Face decoder-only language model", EXIT_VALUE)
    model = loaded.model.to(dev)
    steps.check_seq_len(max_seq_len, model, "--max-seq-len")
    n = min(seq_len if seq_len is not None else steps.default_seq_len(model, policy), max_seq_len - 1)
    args = steps.sample(model, n, dev)
    with bar.step("rewriting attention"):
        report = steps.plan_and_rewrite(model, policy, args, n)
    print_report(report, quiet=quiet)
    tokenizer = _checkpoint_tokenizer(checkpoint, quiet=quiet)
    with bar.step("exporting prefill and decode programs"):
        try:
            programs = export_for_generation(model, None, max_seq_len=max_seq_len, batch=batch, tokenizer=tokenizer)
        except GenerationExportError as exc:
            raise CliError("--generate", str(exc), EXIT_ARCHITECTURE) from exc
        except Exception as exc:
            raise CliError("", f"expected the rewritten model to export as generation programs "
                               f"({type(exc).__name__}: {first_line(exc, type(exc).__name__)})", EXIT_EXPORT) from exc
    with ck.atomic_output(out, directory=(fmt == "onnx"), force=force, inputs=(checkpoint,)) as staging:
        with bar.step(f"writing {fmt}"):
            try:
                writers[fmt](programs, staging)
            except Exception as exc:
                full = as_output_failure(exc)
                if full is not None:
                    raise full from exc  # a full disk is the output's problem (exit 7), not the export's
                raise CliError("", f"expected the generation programs to be written as {fmt} ({type(exc).__name__}: "
                                   f"{first_line(exc, type(exc).__name__)})", EXIT_EXPORT) from exc
        diff = None
        if verify:
            with bar.step("verifying"):
                diff = verify_generation(staging, model, programs.spec, n, display=out)
        with bar.step("moving into place"):
            pass
    return report, n, diff, model


def _checkpoint_tokenizer(checkpoint, *, quiet: bool):
    """The checkpoint's tokenizer, carried into the artifact for `generate --prompt`; None (said so)
    when it has none or its files do not load: the programs do not need it."""
    from moba_rewrite.evaluation.data import find_tokenizer

    try:
        tokenizer = find_tokenizer(checkpoint)
    except Exception as exc:  # noqa: BLE001  (a broken tokenizer does not stop the export)
        print(f"warning: {checkpoint}: tokenizer not carried into the artifact ({first_line(exc)}); "
              f"generate takes --input-ids or --tokenizer DIR")
        return None
    if tokenizer is None and not quiet:
        print(f"note: {checkpoint}: no tokenizer files; the artifact takes token ids (generate --input-ids)")
    return tokenizer


@contextlib.contextmanager
def plain_generation_config(model):
    """`model.generate()` without the checkpoint's generation config (its repetition penalty, forced
    tokens, ...: transformers applies them even when an explicit config is passed), so that greedy
    `generate()` is the argmax the `generate` command's runner takes."""
    from transformers import GenerationConfig

    saved = model.generation_config
    model.generation_config = GenerationConfig()
    try:
        yield
    finally:
        model.generation_config = saved


def verify_generation(path: Path, model, spec, prompt_len: int, *, display: Path) -> float:
    """Greedy tokens and their logits from the written file against `generate()` of the in-memory
    model, on a batch of `spec.batch` prompts (the second one left padded); max |diff| of the logits."""
    import torch

    from moba_rewrite.cli import generate_cmd
    from moba_rewrite.cli.artifacts import verify

    new = min(3, spec.max_seq_len - prompt_len + 1)
    g = torch.Generator().manual_seed(0)
    lengths = [prompt_len - (r % 2) * max(1, prompt_len // 4) for r in range(spec.batch)]
    prompts = [torch.randint(0, spec.vocab_size, (n,), generator=g).tolist() for n in lengths]
    prefill, decode, _ = generate_cmd.load_artifact(path)
    seen = []

    def keep(fn):
        def run(*a):
            out = fn(*a)
            seen.append(out[0][:, -1])
            return out
        return run

    try:
        got = generate_cmd.greedy(keep(prefill), keep(decode), spec, prompts, new)
    except CliError:
        raise
    except Exception as exc:
        raise CliError(display, f"expected the written generation programs to load and run ({type(exc).__name__}: "
                                f"{first_line(exc)}); nothing was written", EXIT_VERIFY) from exc
    device = next(model.parameters()).device
    ids = torch.full((spec.batch, prompt_len), spec.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, prompt_len - len(p):], mask[r, prompt_len - len(p):] = torch.tensor(p), 1
    with torch.no_grad(), plain_generation_config(model):  # the programs' runner decodes by argmax
        want = model.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=new, do_sample=False,
                              pad_token_id=spec.pad_token_id, eos_token_id=None, output_logits=True,
                              return_dict_in_generate=True)
    steps_run = len(seen)
    diff = verify(str(display), torch.stack(seen).cpu(), torch.stack(want.logits[:steps_run]).cpu())
    expected = want.sequences[:, prompt_len:].tolist()
    for r, tokens in enumerate(got):
        if tokens != expected[r][:len(tokens)]:
            raise CliError(display, f"expected the written programs to generate what the rewritten model generates "
                                    f"(prompt {r + 1}: {tokens} vs {expected[r][:len(tokens)]}); nothing was written",
                           EXIT_VERIFY)
    return diff
