"""`generate()` through a rewrite, over every causal LM class in transformers' registry.

For every model type in `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`, build the model from its default
config shrunk to a tiny size (`zoo_sweep.tiny_config`), then with a 24-token prompt and 8 new
tokens (greedy), with the default dynamic cache and with `cache_implementation="static"`, once
for a single prompt and once for a batch of two whose second prompt is left-padded (notes
`padded: ...`; not checked where the original cannot generate such a batch):

- **dense limit**: `mr.rewrite(copy, policy)` with `top_k * block_size >= 32` must generate the
  original model's tokens, every step's logits within 1e-4 (SPEC section 2 item 8): the cache
  path (in-place dynamic layers, block means, static-cache positions) may change nothing. Where
  the original model's own static-cache run differs from its dynamic-cache run, the rewritten
  static run may equal either (the row says which);
- **sparse** (block 4, top-2, so the gate chooses): `generate()` with either cache must give the
  tokens and logits (within 1e-4, plus what the original's own run with that cache differs from
  its uncached run when that is rounding below 1e-3) of an independent oracle: the original model with every MoBA
  site's attention replaced by the dense `reference` MoBA, generating with `use_cache=False` (the
  whole sequence recomputed every step, so no cache, no kept block means, no query placement is
  involved). At sliding-window sites the rows past the prompt attend densely (what the report
  promises there); sites the rewrite leaves dense, or calls it cannot run faithfully, stay the
  original attention.

    python benchmarks/generate_sweep.py                     # every causal LM type (about 30 minutes)
    python benchmarks/generate_sweep.py --only llama qwen3  # some
    python benchmarks/generate_sweep.py --vlm               # vision-language models, text-only prompts
    python benchmarks/generate_sweep.py --compiled          # also the compiled static decode

`--export` adds `mr.export` of the prefill (the graph path: export, then rewrite the graph) on the
padded batch: its logits must equal the eager rewrite's, at the same MoBA sites. Where the program
keeps sites dense that the eager rewrite runs as MoBA, with a reason in its report, the row says
`ok: gap: ...` (a coverage gap, not a silent difference); where export rewrites hand-written
attention eager cannot, logits are not compared.

`--compiled` adds a third check: `generate()` with a static cache and transformers' own compiled
decode step (`compile_config`, `fullgraph=True`, the `aot_eager` backend: Dynamo's graph without
Inductor's code generation, to keep the sweep short) must give the sparse rewrite's eager run;
not checked where the original model does not compile or its compiled run differs from its own
eager run.

`--dense-below N` gives the sparse rewrite the policy's `dense_below: N` (full attention while
the cache holds fewer than N keys; N = 28 with the 24-token prompt switches to MoBA at the fourth
step). Its calls are then decided by the cache's length, which the uncached oracle does not
share, so the sparse check becomes "the static run equals the dynamic run"; `--compiled` (the
compiled decode decides per step from the positions, inside the op) and `--export` compare as
usual.

A row per model type: `equal`, `DIFFERS` (with the error), `ERROR` (the rewritten model failed
where the original ran) or `skipped` (the original could not be built or could not generate).
Each model type runs in a child process (8 GiB address-space limit, `--seconds` per phase), so
one that exhausts memory or crashes is a row, not the end of the sweep.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import sys
import warnings
from collections import Counter

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402

from zoo_sweep import _short, config_patches, patch_note, time_limit, tiny_config  # noqa: E402

PROMPT, NEW = 24, 8
LIMIT = {"version": 1, "defaults": {"block_size": 8, "top_k": 8, "decode": "moba"}}  # 64 >= 32 tokens
SPARSE = {"version": 1, "defaults": {"block_size": 4, "top_k": 2, "decode": "moba"}}


_DORY_LOOPS = dict(num_hidden_layers=4, n_input_layers=1, n_recurrent_layers=2, n_output_layers=1,
                   layer_types=["full_attention", "full_attention", "sliding_attention", "full_attention"],
                   rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                    "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})
# Rows beyond the registry's defaults: (model type, config fields set on the tiny config). The tiny
# Dory config is not a valid loop (2 layers, 8 input and 8 output layers, each layer run twice into
# its own cache layer); these are valid ones, in both of Dory's cache modes for its loops.
# Zamba2 in 8 layers instead of its default 54 (two hybrid layers sharing its attention blocks, as
# the 54 do): the same structure, a sixth of the Mamba scans (the tests' variant; 61 s -> 11 s).
_ZAMBA2_SHORT = ["linear_attention", "linear_attention", "hybrid"] * 2 + ["linear_attention"] * 2
VARIANTS = {
    "dory/per_loop": ("dory", {**_DORY_LOOPS, "recurrent_kv_cache_mode": "per_loop"}),
    "dory/last_loop": ("dory", {**_DORY_LOOPS, "recurrent_kv_cache_mode": "last_loop"}),
    "zamba2/short": ("zamba2", {"num_hidden_layers": 8, "layers_block_type": _ZAMBA2_SHORT,
                                "layer_types": _ZAMBA2_SHORT, "hybrid_layer_ids": [2, 5]}),
}


def _generate(model, ids, cache: str, mask=None, **extra):
    kw = {"cache_implementation": "static"} if cache == "static" else {}
    if cache == "none":
        kw = {"use_cache": False}
    kw.update(extra)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids) if mask is None else mask, max_new_tokens=NEW,
                             min_new_tokens=NEW, do_sample=False, output_logits=True, return_dict_in_generate=True,
                             pad_token_id=0, **kw)
    return out.sequences, torch.stack(out.logits, dim=1).float()


def _differ(got, want, tolerance: float = 1e-4) -> float | None:
    """None when the tokens are equal and the logits within `tolerance`, else the largest logit error
    (inf when the tokens differ in shape)."""
    if got[0].shape != want[0].shape:
        return float("inf")
    err = (got[1] - want[1]).abs().max().item()
    return None if torch.equal(got[0], want[0]) and err <= tolerance else err


def _oracle(model, rewritten, prompt: int | None = PROMPT):
    """A copy of `model` whose MoBA sites (those of `rewritten`) run the dense reference MoBA.

    Uncached, it runs a whole generated sequence at once: at sliding-window sites the tokens past
    `prompt` (generated ones, decoded against the window as full attention) attend densely; None
    for a plain forward, where every token is the prompt's."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    from moba_rewrite.integrations import hf, hf_cache
    from moba_rewrite.kernels import reference

    oracle = copy.deepcopy(model)
    origin = hf.origin_of(model)
    moba = {row.name for row in rewritten._moba_report.rows if row.decision == "moba"}
    sites = {}  # oracle module -> whether its cache is a sliding window
    names = {}
    for name, module in oracle.named_modules():
        if name in moba and "the model's own sliding cache" not in hf_cache.sliding_note(module):
            # (at a model's own sliding cache layer every cached call runs the original attention:
            # generate() is dense there, as the report says)
            sites[module] = bool(hf_cache.sliding_note(module))
            names[module] = name
    oracle._oracle_ran = set()  # the MoBA sites the reference ran at (not hand-written ones)

    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        dropout = kwargs.get("dropout", args[0] if args else 0.0)
        if module not in sites or hf.unsupported_reasons(query, key, value, attention_mask, float(dropout or 0.0),
                                                        module.training, kwargs):
            return hf._dense_call(origin, module, query, key, value, attention_mask, *args, **kwargs)
        mask = attention_mask
        if mask is not None and mask.dtype != torch.bool:  # hidden keys at -inf; differentiable (a learned bias)
            mask = mask.masked_fill(mask <= torch.finfo(mask.dtype).min / 2, float("-inf"))
        # as the original function: without a mask SDPA cuts causally by the call's or the module's flag,
        # with one it applies the mask alone; eager functions only ever add the mask
        causal = kwargs.get("is_causal")
        causal = bool(causal) if causal is not None else bool(getattr(module, "is_causal", True))
        causal = causal and origin == "sdpa" and mask is None
        kw = dict(causal=causal, scale=kwargs.get("scaling") or query.shape[-1] ** -0.5, attn_mask=mask)
        out = reference.forward(query, key, value, block_size=SPARSE["defaults"]["block_size"],
                                top_k=SPARSE["defaults"]["top_k"], **kw)
        oracle._oracle_ran.add(names[module])
        if prompt is not None and sites[module] and query.shape[2] == key.shape[2]:  # generated tokens attend densely at sliding sites
            dense = reference.forward(query, key, value, block_size=1, top_k=key.shape[2], **kw)
            out[:, :, prompt:] = dense[:, :, prompt:]
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register("moba_sweep_oracle", attention)
    AttentionMaskInterface.register("moba_sweep_oracle", ALL_MASK_ATTENTION_FUNCTIONS[origin if origin == "sdpa" else "eager"])
    oracle.set_attn_implementation("moba_sweep_oracle")
    return oracle


def _inputs(vocab: int, padded: bool):
    """A 24-token prompt; `padded`: a batch of two, the second left-padded by 5 tokens."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, max(4, min(vocab, 1000)), (2 if padded else 1, PROMPT), generator=g)
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :5] = 0
        ids[1, :5] = 0
    return ids, mask


def _check(model, ids, mask, want: dict) -> list[str]:
    """The dense-limit and sparse checks of one input (module docstring); notes, "ok: ..." when fine."""
    import moba_rewrite as mr

    notes = []
    limit = mr.rewrite(copy.deepcopy(model), LIMIT)
    for cache, expected in want.items():
        got = _generate(limit, ids, cache, mask)
        err = _differ(got, expected)
        if err is None:
            continue
        if cache == "static" and _differ(got, want["dynamic"]) is None:
            notes.append(f"ok: the original's static run differs from its dynamic run by {err:.3g}; "
                         f"the rewrite's static run equals the dynamic one")
            continue
        notes.append(f"{cache}: logits differ by {err:.3g}, tokens {'equal' if err != float('inf') and torch.equal(got[0], expected[0]) else 'differ'}")
    del limit
    gc.collect()  # one copy at a time: models with a large vocabulary take gigabytes each
    sparse = mr.rewrite(copy.deepcopy(model), SPARSE)
    if "dense_below" in SPARSE["defaults"]:  # decided per call by the cache's length: no uncached oracle
        # below N the original's attention runs: where its own static and dynamic runs compute different things
        # (BERT-style decoders, more than fp32 rounding: 3e-5 for data2vec-text's padded batch in fp64 too), a
        # gate can then pick other blocks; no check there
        if _differ(want["static"], want["dynamic"], 1e-5) is not None:
            return notes + ["ok: sparse with dense_below not checked (the original's static run differs from its "
                            "dynamic run)"]
        oracle = _generate(sparse, ids, "dynamic", mask)
        got = _generate(sparse, ids, "static", mask)
        err = _differ(got, oracle)
        return notes + ([] if err is None else [f"sparse static: logits differ from the dynamic run by {err:.3g}"])
    oracle = _generate(_oracle(model, sparse), ids, "none", mask)
    gc.collect()
    uncached = _generate(model, ids, "none", mask)
    # the original's own cached runs differ from its uncached run by rounding (1e-4 for RemBERT's static
    # cache): the rewrite's may differ from the uncached oracle by as much more
    spread = {c: (_differ(want[c], uncached, 0.0) or 0.0) for c in want}
    if _differ(uncached, want["dynamic"]) is not None:
        # the original's cached run is not its uncached one (a cache that changes the model, such as
        # Dory's `last_loop`): no uncached oracle; the rewrite's two caches must agree
        if _differ(want["static"], want["dynamic"]) is not None:
            return notes + ["ok: sparse not checked (the original's cached runs differ from its use_cache=False "
                            "run and from each other)"]
        notes.append("ok: sparse checked static = dynamic only (the original's cached run differs from its "
                     "use_cache=False run, so the uncached reference does not apply)")
        oracle = _generate(sparse, ids, "dynamic", mask)
        spread = {c: 0.0 for c in spread}
    for cache in ("dynamic", "static"):
        got = _generate(sparse, ids, cache, mask)
        err = _differ(got, oracle, 1e-4 + (spread[cache] if spread[cache] < 1e-3 else 0.0))
        if not torch.isfinite(got[1]).all():
            notes.append(f"sparse {cache}: non-finite logits")
        elif err is not None:
            notes.append(f"sparse {cache}: logits differ from the reference MoBA by {err:.3g}, tokens "
                         f"{'equal' if err != float('inf') and torch.equal(got[0], oracle[0]) else 'differ'}")
    return notes


def _compiled(model, ids, mask):
    """`generate()` with a static cache and transformers' own compiled decode step (the path a GPU
    takes by itself: `compile_config`, here `fullgraph=True` on the `aot_eager` backend, on the CPU)."""
    from transformers import CompileConfig

    config = CompileConfig(backend="aot_eager", fullgraph=True)
    config._compile_all_devices = True  # transformers compiles on accelerators only unless told
    torch._dynamo.reset()
    try:
        return _generate(model, ids, "static", mask, compile_config=config)
    finally:
        torch._dynamo.reset()


def _compiled_notes(model, ids, mask) -> list[str]:
    """The sparse rewrite's compiled static decode must give its eager static run."""
    import moba_rewrite as mr

    try:
        original = _compiled(model, ids, mask)
    except Exception as e:  # noqa: BLE001
        return [f"ok: compiled not checked (the original does not compile: {_short(e)[:80]})"]
    if _differ(original, _generate(model, ids, "static", mask)) is not None:
        return ["ok: compiled not checked (the original's compiled run differs from its eager run)"]
    sparse = mr.rewrite(copy.deepcopy(model), SPARSE)
    err = _differ(_compiled(sparse, ids, mask), _generate(sparse, ids, "static", mask))
    return [] if err is None else [f"compiled static: logits differ from eager by {err:.3g}"]


def _export_notes(model, ids, mask) -> list[str]:
    """`mr.export` (the graph path: export, then rewrite the graph) must give the eager rewrite's
    logits and rewrite as many sites, for the prefill the program holds (`use_cache=False`)."""
    from moba_rewrite import api
    import moba_rewrite as mr

    kwargs = {"input_ids": ids, "attention_mask": mask}
    try:
        with torch.no_grad():
            torch.export.export(model, (), kwargs={**kwargs, "use_cache": False}, strict=False)
    except Exception as e:  # noqa: BLE001
        return [f"ok: export not checked (the original does not export: {_short(e)[:80]})"]
    gc.collect()
    eager = mr.rewrite(copy.deepcopy(model), SPARSE)
    with torch.no_grad():
        want = eager(**kwargs, use_cache=False).logits.float()
    eager_report = eager._moba_report
    del eager
    gc.collect()  # one copy at a time (RemBERT's head is 1.7 GB)
    ep, report = api.export_with_report(copy.deepcopy(model), (), SPARSE, kwargs=kwargs)
    with torch.no_grad():
        out = ep.module()(**kwargs)
    got = (out.logits if hasattr(out, "logits") else out["logits"] if isinstance(out, dict) else out[0]).float()
    notes = []
    eager_rows = {r.name: r for r in eager_report.rows}
    extra = set(report.moba_sites) - set(eager_report.moba_sites)
    if extra and all("mr.export and mr.compile rewrite it" in getattr(eager_rows.get(n), "reason", "") for n in extra):
        # hand-written attention eager rewriting cannot replace (the report says so): no eager reference
        return [f"ok: export rewrites {len(extra)} site(s) the eager rewrite keeps dense (hand-written attention "
                "in a module torch.fx cannot trace); logits not compared"]
    # by module: the program has a site per call (DiffLlama's two per module, looped models' repeats)
    rows = {r.name: r for r in report.rows}
    fewer = set(eager_report.moba_sites) - set(report.moba_sites)
    if fewer and not extra and all(n in rows and rows[n].decision != "moba" and rows[n].reason for n in fewer):
        # the program keeps them dense and its report says why: a gap in what export rewrites, not a silent one
        return [f"ok: gap: export keeps {sorted(fewer)} dense ({rows[sorted(fewer)[0]].reason[:90]}), the eager "
                "rewrite runs MoBA there; logits not compared"]
    if set(report.moba_sites) != set(eager_report.moba_sites):
        notes.append(f"export: MoBA at {sorted(set(report.moba_sites))} where the eager rewrite has "
                     f"{sorted(set(eager_report.moba_sites))}")
    if report.warnings and any("higher-order-op" in w for w in report.warnings):
        notes.append("export: " + next(w for w in report.warnings if "higher-order-op" in w))
    err = (got - want).abs().max().item() if got.shape == want.shape else float("inf")
    if err > 1e-4:
        notes.append(f"export: logits differ from the eager rewrite by {err:.3g}")
    return notes


def _build(model_type: str, class_name: str, fields: dict):
    """The tiny model (sdpa where it has it) with `fields` set on its config, its vocabulary size, a
    prompt and the original's runs with both caches."""
    import transformers

    cfg = tiny_config(type(transformers.AutoConfig.for_model(model_type)))
    for key, value in fields.items():
        setattr(cfg, key, value)
    torch.manual_seed(0)
    model = getattr(transformers, class_name)(cfg).eval()
    try:
        model.set_attn_implementation("sdpa")
    except Exception:  # noqa: BLE001 - models without sdpa keep their eager attention
        pass
    vocab = int(getattr(cfg.get_text_config(decoder=True), "vocab_size", 0) or 64)
    ids, mask = _inputs(vocab, padded=False)
    want = {c: _generate(model, ids, c, mask) for c in ("dynamic", "static")}
    return model, vocab, ids, mask, want


def sweep_one(model_type: str, class_name: str, seconds: int, compiled: bool = False, export: bool = False,
              generate: bool = True) -> tuple[str, str]:
    """One row: the checks on a single prompt, then on a left-padded batch of two; `compiled`: then
    the compiled static decode (on the padded batch where it was checked); `export`: then `mr.export`
    on the padded batch; `generate=False`: without the first two."""
    model_type, fields = VARIANTS.get(model_type, (model_type, {}))
    import transformers

    first = None
    # MLA models (DeepSeek V2/V3, Kimi Linear, ...) expand their latent kv to every head, grouped
    # routers need experts per group: the tiny config is retried with zoo_sweep's patches
    for patch in config_patches(tiny_config(type(transformers.AutoConfig.for_model(model_type)))):
        try:
            with time_limit(seconds):
                model, vocab, ids, mask, want = _build(model_type, class_name, {**fields, **patch})
            break
        except Exception as e:  # noqa: BLE001
            first = first or e
    else:
        return "skipped", _short(first)
    notes = [f"ok: built with {patch_note(patch)}"] if patch else []
    try:
        with time_limit(seconds):
            notes += _check(model, ids, mask, want) if generate else []
    except Exception as e:  # noqa: BLE001
        return "ERROR", _short(e)
    try:  # the padded batch: skipped where the original cannot generate one
        with time_limit(seconds):
            ids, mask = _inputs(vocab, padded=True)
            want = {c: _generate(model, ids, c, mask) for c in ("dynamic", "static")}
            if not all(torch.isfinite(w[1]).all() for w in want.values()):
                raise ValueError("non-finite logits")
    except Exception as e:  # noqa: BLE001
        notes.append(f"ok: padded batch not checked (the original: {_short(e)[:80]})")
    else:
        try:
            with time_limit(seconds):
                notes += [n.replace("ok: ", "ok: padded: ") if n.startswith("ok: ") else f"padded: {n}"
                          for n in (_check(model, ids, mask, want) if generate else [])]
        except Exception as e:  # noqa: BLE001
            return "ERROR", f"padded batch: {_short(e)}"
    if any(n.startswith("ok: padded batch not checked") for n in notes):
        ids, mask = _inputs(vocab, padded=False)
    for name, on, check in (("export", export, _export_notes), ("compiled", compiled, _compiled_notes)):
        try:
            with time_limit(seconds):
                notes += check(model, ids, mask) if on else []
        except Exception as e:  # noqa: BLE001
            return "ERROR", f"{name}: {_short(e)}"
    bad = [n for n in notes if not n.startswith("ok: ")]
    return ("DIFFERS" if bad else "equal", "; ".join(notes))


def _child(model_type: str, class_name: str, seconds: int, flags: tuple[str, ...] = ()) -> tuple[str, str]:
    """`sweep_one` in a child process with an address-space limit; a crash or kill is a row."""
    import json
    import resource
    import subprocess

    def limit_memory():
        resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))

    try:
        run = subprocess.run([sys.executable, __file__, "--one", model_type, class_name, "--seconds", str(seconds)]
                             + list(flags),
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
    ap.add_argument("--compiled", action="store_true",
                    help="also check the compiled static decode (transformers' compile_config, fullgraph)")
    ap.add_argument("--export", action="store_true",
                    help="also check mr.export (the exported, graph-rewritten prefill) against the eager rewrite")
    ap.add_argument("--no-generate", action="store_true", help="skip the generate() checks (with --compiled/--export)")
    ap.add_argument("--dense-below", type=int, default=0, metavar="N",
                    help="give the sparse rewrite the policy's dense_below N (full attention while the cache "
                         "holds fewer than N keys; the prompt has 24): its static run must equal its dynamic run "
                         "(no uncached oracle), and --compiled / --export compare as usual")
    ap.add_argument("--vlm", action="store_true",
                    help="the image-text-to-text types that are no causal LM type instead (Qwen2.5-VL, GLM-4V, "
                         "LLaVA, ...): their generating class on text-only prompts")
    ap.add_argument("--one", nargs=2, metavar=("TYPE", "CLASS"), help=argparse.SUPPRESS)  # a child's job
    args = ap.parse_args(argv)
    if args.dense_below:
        SPARSE["defaults"]["dense_below"] = args.dense_below
    if args.one:
        import json

        warnings.filterwarnings("ignore")
        print(json.dumps(sweep_one(args.one[0], args.one[1], args.seconds, args.compiled, args.export,
                                   not args.no_generate)))
        return 0
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    types = sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items())
    types += [(row, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[base]) for row, (base, _) in VARIANTS.items()]
    if args.vlm:
        from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES as VLM

        types = sorted((t, c) for t, c in VLM.items() if t not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    if args.only:
        types = [(t, c) for t, c in types if t in args.only]
    counts: Counter = Counter()
    kinds = "image-text-to-text types (text-only prompts)" if args.vlm else "causal LM types"
    print(f"torch {torch.__version__}, transformers {transformers.__version__}; {len(types)} {kinds}")
    print("| model type | class | result | detail |")
    print("|---|---|---|---|")
    for model_type, class_name in types:
        if not hasattr(transformers, class_name):
            continue
        flags = tuple(f for f, on in (("--compiled", args.compiled), ("--export", args.export),
                                      ("--no-generate", args.no_generate)) if on)
        flags += ("--dense-below", str(args.dense_below)) if args.dense_below else ()
        status, detail = _child(model_type, class_name, args.seconds, flags)
        counts[status] += 1
        print(f"| {model_type} | {class_name} | {status} | {detail} |", flush=True)
    print("\n" + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())))
    return 1 if counts["DIFFERS"] or counts["ERROR"] else 0


if __name__ == "__main__":
    sys.exit(main())
