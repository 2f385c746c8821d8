"""Context parallelism through a rewrite, over every causal LM type in transformers' registry.

For every model type in `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`, built tiny as `generate_sweep.py`
builds it (`zoo_sweep.tiny_config`, seed 0, SDPA where the model has it; sliding windows cut to 8
tokens and Llama 4's attention chunks to 10, so that they cross shards, and its query
temperature's floor scale to 8 tokens, so that it varies across them) and rewritten sparse
(block 4, top-2, so the gate chooses), two
gloo ranks (`--world`) on this machine run the prefill with the sequence sharded
(`shard_inputs`, `context_parallel`), in the contiguous and the zigzag layout, on
one 37-token prompt, on a batch of two whose second row is left-padded by 5 tokens
(`shard_attention_mask`), and on that batch packed with documents (position ids restarting at
each, no attention mask: `context_parallel(packed=True)`). The logits at real tokens must equal the unsharded rewrite's run of the
same inputs and positions (1e-4 of their scale): the shards must see global positions, the
global masks and every block of the whole sequence, whatever the model does around its attention.

A row per model type: `equal`; `DIFFERS` (a silent difference: what and by how much); `refused`
(context parallelism raised its own one-line error for something it does not support, named in
the row: loud, by design); `ERROR` (anything else failed where the unsharded model ran); `skipped`
(the original cannot be built tiny or run). Each model type runs in two fresh forked ranks with a
deadline, so a hang or crash is a row, not the end of the sweep.

With `--generate` each model type instead decodes 10 greedy tokens with its KV cache sharded
(`hf_cp_generate.generate`: the prompt prefilled under context parallelism, every decode step
against the sharded cache), one prompt and the left-padded batch; tokens and logits must equal
single-process `generate()` of the same rewritten model.

    python benchmarks/cp_sweep.py                       # every causal LM type (about 15 minutes)
    python benchmarks/cp_sweep.py --only llama gpt2 opt  # some
    python benchmarks/cp_sweep.py --world 4              # four ranks (shorter shards, more boundaries)
    python benchmarks/cp_sweep.py --generate             # sharded-cache decoding (hf_cp_generate) vs generate()
    python benchmarks/cp_sweep.py --generate --beams 3   # the same with beam search
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import socket
import sys
import tempfile
import time
import warnings
from collections import Counter

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

from forward_sweep import _error as scaled_error  # noqa: E402
from zoo_sweep import MAX_PARAMS, _short, config_patches, finish_table, tiny_config  # noqa: E402

SPARSE = {"version": 1, "defaults": {"block_size": 4, "top_k": 2}}
T, HIDDEN_PAD = 37, 5
WINDOW = 8  # sliding windows, where a model has them
CHUNK = 10  # chunked attention (Llama 4), where a model has it: not a multiple of the block
WORLD = 2  # ranks (--world)
NEW = 10  # new tokens (--generate)
PACKED = ((11, 17, 9), (20, 17))  # documents packed in each row of the third case (a start at the shard edge)


def _build(model_type: str, class_name: str):
    """The tiny model (SDPA where it has it); retried with `zoo_sweep.config_patches` (MLA-style
    models: one kv head per head; grouped routers: one expert group)."""
    import transformers

    last = None
    for fields in config_patches(tiny_config(type(transformers.AutoConfig.for_model(model_type)))):
        try:
            cfg = tiny_config(type(transformers.AutoConfig.for_model(model_type)))
            for key, value in fields.items():
                setattr(cfg, key, value)
            for sub in {id(c): c for c in (cfg, cfg.get_text_config(decoder=True))}.values():
                if isinstance(getattr(sub, "sliding_window", None), int) and sub.sliding_window > WINDOW:
                    sub.sliding_window = WINDOW  # shorter than a shard, so that windows cross shards
                if isinstance(getattr(sub, "attention_chunk_size", None), int) and sub.attention_chunk_size > CHUNK:
                    sub.attention_chunk_size = CHUNK  # Llama 4's chunked layers: chunks that cross shards and blocks
                if isinstance(getattr(sub, "floor_scale", None), int) and sub.floor_scale > WINDOW:
                    sub.floor_scale = WINDOW  # Llama 4's query temperature by token index: varies within the prompt
            with torch.device("meta"):
                params = sum(p.numel() for p in getattr(transformers, class_name)(cfg).parameters())
            if params > MAX_PARAMS:
                raise ValueError(f"{params / 1e6:.0f}M parameters after shrinking (limit {MAX_PARAMS / 1e6:.0f}M)")
            torch.manual_seed(0)
            model = getattr(transformers, class_name)(cfg).eval()
            try:
                model.set_attn_implementation("sdpa")
            except Exception:  # noqa: BLE001 - eager-only models keep it
                pass
            vocab = int(getattr(cfg.get_text_config(decoder=True), "vocab_size", 0) or 64)
            ids = torch.randint(3, max(4, min(vocab, 1000)), (1, T), generator=torch.Generator().manual_seed(1))
            with torch.no_grad():
                model(input_ids=ids, position_ids=torch.arange(T)[None], use_cache=False)
            return model, vocab
        except Exception as e:  # noqa: BLE001
            last = e
    raise last


def _rank(rank: int, world: int, port: int, model_type: str, class_name: str, out: str,
          generate: bool = False) -> None:
    """One rank: build, rewrite, run unsharded and sharded (the prefill, or with `generate` the
    sharded-cache decoding), write its findings as JSON."""
    import torch.distributed as dist

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    result: dict = {"status": "equal", "notes": []}
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        import moba_rewrite as mr
        from moba_rewrite.integrations.hf_cp import context_parallel, shard_attention_mask, shard_inputs
        from moba_rewrite.parallel import unshard_sequence

        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=60))
        try:
            model, vocab = _build(model_type, class_name)
        except Exception as e:  # noqa: BLE001
            result.update(status="skipped", notes=[_short(e)])
            return
        try:
            mr.rewrite(model, SPARSE)
        except Exception as e:  # noqa: BLE001
            result.update(status="skipped", notes=[f"the rewrite: {_short(e)}"])
            return
        moba = sum(row.decision == "moba" for row in model._moba_report.rows)
        gen = torch.Generator().manual_seed(2)
        ids = torch.randint(3, max(4, min(vocab, 1000)), (2, T), generator=gen)
        mask = torch.ones(2, T, dtype=torch.long)
        mask[1, :HIDDEN_PAD] = 0
        positions = torch.arange(T).expand(2, -1)
        if generate:
            _check_generate(model, ids, mask, result, beams=int(generate))
            if result["status"] == "equal":
                result["notes"].append(f"ok: {moba} MoBA site(s)")
            return
        packed = torch.stack([torch.cat([torch.arange(n) for n in lengths]) for lengths in PACKED])
        for case, batch, batch_mask, batch_pos in (("one prompt", ids[:1], None, positions[:1]),
                                                   ("padded batch", ids, mask, positions),
                                                   ("packed documents", ids, None, packed)):
            kw = {} if batch_mask is None else {"attention_mask": batch_mask}
            is_packed = case == "packed documents"
            with torch.no_grad():
                try:
                    want = model(input_ids=batch, position_ids=batch_pos, use_cache=False, **kw).logits
                except Exception as e:  # noqa: BLE001
                    result["notes"].append(f"ok: {case} not checked (the unsharded model: {_short(e)[:80]})")
                    continue
                real = torch.ones_like(batch, dtype=torch.bool) if batch_mask is None else batch_mask.bool()
                for layout in ("contiguous", "zigzag"):
                    try:
                        local_ids, pos, seq_len = shard_inputs(model, batch, layout=layout,
                                                               position_ids=batch_pos if is_packed else None)
                        local_kw = {} if batch_mask is None else {
                            "attention_mask": shard_attention_mask(model, batch_mask, layout=layout)}
                        with context_parallel(model, layout=layout, seq_len=seq_len, packed=is_packed):
                            local = model(input_ids=local_ids, position_ids=pos, use_cache=False, **local_kw).logits
                    except Exception as e:  # noqa: BLE001
                        text = _short(e)
                        if is_packed and "context_parallel:" in text:  # a note: the other cases are the row's
                            why = text[text.index("context_parallel:") + len("context_parallel:"):].strip()
                            result["notes"].append(f"packed documents refused: {why[:120]}")
                            break
                        if "context_parallel:" in text:
                            result.update(status="refused", notes=[text[text.index("context_parallel:"):][:200]])
                        else:
                            result.update(status="ERROR", notes=[f"{case}, {layout}: {text[:200]}"])
                        return
                    got = unshard_sequence(local, layout=layout, dim=1, seq_len=seq_len)
                    err = scaled_error([got[real]], [want[real]])
                    if err is not None:
                        result["status"] = "DIFFERS"
                        result["notes"].append(f"{case}, {layout}: logits differ from the unsharded run by {err:.3g}")
        result["notes"].append(f"ok: {moba} MoBA site(s)")
    except Exception as e:  # noqa: BLE001
        result.update(status="ERROR", notes=[_short(e)[:200]])
    finally:
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
        if dist.is_initialized():
            dist.destroy_process_group()


def _check_generate(model, ids, mask, result: dict, beams: int = 1) -> None:
    """Sharded-cache decoding (`hf_cp_generate.generate`, NEW greedy tokens) against single-process
    `generate()` of the same rewritten model: the same tokens, logits within 1e-4 of their scale
    (with `beams` > 1, beam search: the same sequences)."""
    from moba_rewrite.integrations.hf_cp_generate import generate

    beam = {"num_beams": beams} if beams > 1 else {}
    checked = 0
    for case, batch, batch_mask in (("one prompt", ids[:1], torch.ones_like(ids[:1])), ("padded batch", ids, mask)):
        with torch.no_grad():
            try:
                want = model.generate(batch, attention_mask=batch_mask, max_new_tokens=NEW, do_sample=False,
                                      output_logits=True, return_dict_in_generate=True, pad_token_id=0, **beam)
            except Exception as e:  # noqa: BLE001
                result["notes"].append(f"ok: {case} not checked (generate(): {_short(e)[:80]})")
                continue
        try:
            if beam:
                got = generate(model, batch, attention_mask=batch_mask, max_new_tokens=NEW, pad_token_id=0, **beam)
                logits = torch.stack(want.logits, dim=1).float()  # not returned with beams: the sequences decide
            else:
                got, logits = generate(model, batch, attention_mask=batch_mask, max_new_tokens=NEW, return_logits=True)
        except Exception as e:  # noqa: BLE001
            text = _short(e)
            for who in ("hf_cp.generate:", "context_parallel:", "moba_decode_cp:"):
                if who in text:
                    result.update(status="refused", notes=[text[text.index(who):][:200]])
                    return
            result.update(status="ERROR", notes=[f"{case}: {text[:200]}"])
            return
        checked += 1
        expected = torch.stack(want.logits, dim=1).float()
        n = min(logits.shape[1], expected.shape[1])
        err = scaled_error([logits[:, :n]], [expected[:, :n]])
        if not torch.equal(got, want.sequences) or err is not None:
            first = (got[:, T:] != want.sequences[:, T:]).any(0).nonzero() if got.shape == want.sequences.shape \
                else None
            where = f"first different token at step {int(first[0])}" if first is not None and len(first) else \
                "the same tokens"
            result["status"] = "DIFFERS"
            result["notes"].append(f"{case}: {where}; logits differ by {err if err is not None else 0:.3g}")
    if not checked and result["status"] == "equal":  # generate() itself cannot run here: nothing compared
        result["status"] = "skipped"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sweep_one(model_type: str, class_name: str, seconds: int, world: int = WORLD,
              generate: bool = False) -> tuple[str, str]:
    """`world` forked ranks for one model type; the row's status and detail."""
    ctx = multiprocessing.get_context("fork")
    with tempfile.TemporaryDirectory() as out:
        port = _free_port()
        procs = [ctx.Process(target=_rank, args=(r, world, port, model_type, class_name, out, generate))
                 for r in range(world)]
        for p in procs:
            p.start()
        end = time.monotonic() + seconds
        for p in procs:
            p.join(max(0.0, end - time.monotonic()))
        hung = [p for p in procs if p.is_alive()]
        for p in hung:
            p.kill()
            p.join(5)
        results = []
        for r in range(world):
            path = os.path.join(out, f"rank{r}.json")
            results.append(json.load(open(path)) if os.path.exists(path) else None)
    if hung or any(r is None for r in results):
        return "ERROR", f"a rank hung or died (deadline {seconds} s)"
    order = ("DIFFERS", "ERROR", "refused", "skipped", "equal")
    status = min((r["status"] for r in results), key=order.index)
    notes = list(dict.fromkeys(n for r in results for n in r["notes"]))  # both ranks see the same, mostly
    return status, "; ".join(notes)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", help="model types to run (default: every causal LM type)")
    ap.add_argument("--seconds", type=int, default=120, help="deadline per model type")
    ap.add_argument("--world", type=int, default=WORLD, help="gloo ranks (2)")
    ap.add_argument("--generate", action="store_true",
                    help=f"check sharded-cache decoding ({NEW} greedy tokens) against generate() instead of the prefill")
    ap.add_argument("--beams", type=int, default=1, help="with --generate: beam search with this many beams")
    ap.add_argument("--markdown", help="also write the table here")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    types = sorted((t, c) for t, c in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items() if hasattr(transformers, c))
    if args.only:
        types = [(t, c) for t, c in types if t in args.only]
    lines = [f"torch {torch.__version__}, transformers {transformers.__version__}; {len(types)} causal LM types, "
             f"{args.world} gloo ranks, block 4 / top-2, {T} tokens"
             + (f", sharded-cache decoding of {NEW} tokens vs generate()" if args.generate else ", the prefill")
             + (f", {args.beams} beams" if args.generate and args.beams > 1 else ""), "",
             "| model type | class | result | detail |", "|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    counts: Counter = Counter()
    start = time.time()
    for model_type, class_name in types:
        status, detail = sweep_one(model_type, class_name, args.seconds, args.world,
                                   args.beams if args.generate else 0)
        counts[status] += 1
        lines.append(f"| {model_type} | {class_name} | {status} | {detail.replace('|', '/')} |")
        print(lines[-1], flush=True)
    return finish_table(lines, counts, start, args.markdown)


if __name__ == "__main__":
    sys.exit(main())
