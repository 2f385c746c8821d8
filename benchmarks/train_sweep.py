"""A rewritten model's gradients, over every model type in transformers' registry.

`forward_sweep.py` checks what a rewrite's forward computes; this checks its backward, on the same
tiny models and generic inputs (every base class of `MODEL_MAPPING_NAMES`). The loss is a fixed
random projection of every floating tensor of the output (so every output position gets a
gradient), taken in eval mode (no dropout: two runs must agree); the gradients compared are those
of every floating parameter that gets one:

- **dense limit**: the rewrite with `top_k * block_size >= 16384` must give the original model's
  gradients (each within 1e-3 of its own scale): the rewrite's backward wiring may change nothing;
- **sparse** (block 4, top-2): where every MoBA site is called through transformers'
  AttentionInterface, the gradients of the original model with the dense `reference` MoBA as its
  attention at those sites (plain autograd through masked softmax attention; independent of the
  backends' hand-written backward kernels);
- a row that fails either check in float32 runs both again in float64: where they pass there, the
  difference was rounding (a wrong gradient is as wrong in float64) and the row says so (`ok:
  float32 rounding`; SegFormer's last stage, 1.3e-3 in float32);
- `--compiled`: `torch.compile` of the sparse rewrite (Inductor by default, `--backend`) must
  give the eager sparse rewrite's loss and gradients (not checked where the original model does
  not compile, or where its own compiled gradients differ from its eager ones).

    python benchmarks/train_sweep.py                                  # every model type
    python benchmarks/train_sweep.py --only llama bert vit --compiled # some, through Inductor too

A row per model type: `equal`, `DIFFERS` (what differs), `ERROR` (the rewrite failed where the
original ran), `skipped` (the original could not be built, run twice alike, or differentiated) or
`no attention`. Exit status 1 when any row differs or errs.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import sys
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402

import forward_sweep  # noqa: E402  (sets the offline environment and the import path)
import zoo_sweep  # noqa: E402
from generate_sweep import SPARSE, _oracle  # noqa: E402

TOLERANCE = 1e-3


def _loss(out: Any) -> torch.Tensor:
    """A fixed random projection of every floating output tensor (seeded by its position and shape)."""
    total = None
    for i, t in enumerate(forward_sweep._tensors(out)):
        if not t.requires_grad:
            continue
        g = torch.Generator().manual_seed(1000 + i)
        weights = torch.randn(t.shape, generator=g, dtype=torch.float32).to(t.dtype)
        term = (t.nan_to_num(0.0) * weights).sum()
        total = term if total is None else total + term
    if total is None:
        raise ValueError("no output tensor depends on the parameters")
    return total


def gradients(model, inputs: dict[str, Any], call: Callable | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`(loss, {parameter name: gradient})` of one backward through `call(**inputs)` (default the model)."""
    model.zero_grad(set_to_none=True)
    loss = _loss((call if call is not None else model)(**inputs))
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def grad_error(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> tuple[float, str] | None:
    """None when every gradient of `got` is within TOLERANCE of `want`'s, relative to its scale, else
    (the largest scaled error, the parameter it is at); inf when the parameters differ. A gradient's
    scale is its largest magnitude, but at least a tenth of the largest in its module and a
    millionth of the largest of all: a key projection's bias has a zero gradient in exact arithmetic
    (softmax ignores a shift shared by all keys), and so do parameters the loss barely reaches, so
    their values are rounding noise on either side."""
    if got.keys() != want.keys():
        missing = sorted(set(want) ^ set(got))
        return float("inf"), f"gradients for other parameters ({', '.join(missing[:3])})"
    magnitude = {n: w.nan_to_num(0.0, 0.0, 0.0).abs().max().item() if w.numel() else 0.0 for n, w in want.items()}
    per_module: dict[str, float] = {}
    for name, m in magnitude.items():
        owner = name.rpartition(".")[0]
        per_module[owner] = max(per_module.get(owner, 0.0), m)
    overall = max(magnitude.values(), default=0.0)
    worst, where = 0.0, ""
    for name, w in want.items():
        g = got[name].double()
        w = w.double()
        if not torch.equal(torch.isnan(g), torch.isnan(w)):
            return float("nan"), name
        keep = ~torch.isnan(w)
        if keep.any():
            scale = max(magnitude[name], 0.1 * per_module[name.rpartition(".")[0]], 1e-6 * overall, 1e-12)
            err = (g - w)[keep].abs().max().item() / scale
            if err > worst:
                worst, where = err, name
    return None if worst <= TOLERANCE else (worst, where)


def _describe(what: str, err: tuple[float, str]) -> str:
    return f"{what}: gradients differ by {err[0]:.3g} (at {err[1]})"


def _compiled_notes(model, sparse, inputs, want: dict[str, torch.Tensor], backend: str) -> list[str]:
    torch._dynamo.reset()
    try:
        try:
            _, got = gradients(sparse, inputs, torch.compile(sparse, backend=backend))
        except Exception as e:  # noqa: BLE001
            try:
                original = copy.deepcopy(model)
                gradients(original, inputs, torch.compile(original, backend=backend))
            except Exception:  # noqa: BLE001
                return ["ok: compiled not checked (the original does not compile either)"]
            return [f"compiled: fails where the original compiles: {zoo_sweep._short(e)[:160]}"]
        err = grad_error(got, want)
        if err is None:
            return []
        original = copy.deepcopy(model)
        _, own_eager = gradients(original, inputs)
        torch._dynamo.reset()
        _, own_compiled = gradients(original, inputs, torch.compile(original, backend=backend))
        own = grad_error(own_compiled, own_eager)
        if own is not None:
            return [f"ok: compiled not checked (the original's own compiled gradients differ by {own[0]:.3g})"]
        return [_describe("compiled", err)]
    finally:
        torch._dynamo.reset()


def _eager_notes(pristine, inputs: dict[str, Any], want: dict[str, torch.Tensor]):
    """The dense-limit and sparse checks (module docstring): (notes, sparse rewrite, its gradients,
    its MoBA sites)."""
    import moba_rewrite as mr

    notes: list[str] = []
    limit = mr.rewrite(copy.deepcopy(pristine), forward_sweep.LIMIT, inputs)
    err = grad_error(gradients(limit, inputs)[1], want)
    if err is not None:
        notes.append(_describe("dense limit", err))
    del limit
    gc.collect()
    sparse = mr.rewrite(copy.deepcopy(pristine), SPARSE, inputs)
    _, got_sparse = gradients(sparse, inputs)
    moba = set(sparse._moba_report.moba_sites)
    if not moba:
        notes.append("ok: no MoBA site")
        return notes, sparse, got_sparse, moba
    oracle = _oracle(pristine, sparse, prompt=None)
    _, oracle_grads = gradients(oracle, inputs)
    covered = getattr(oracle, "_oracle_ran", set())
    if moba <= covered:
        err = grad_error(got_sparse, oracle_grads)
        if err is not None:
            notes.append(_describe("sparse", err))
    else:
        notes.append(f"ok: sparse not checked ({len(moba - covered)} MoBA site(s) not called through "
                     "transformers' AttentionInterface)")
    return notes, sparse, got_sparse, moba


def _recheck_in_float64(pristine, inputs: dict[str, Any], notes: list[str]) -> list[str]:
    """The same checks in float64: where they pass there, the float32 difference was rounding (a
    wrong gradient is as wrong in float64), and the row says so; else the float32 notes stand."""
    if next(pristine.parameters()).dtype != torch.float32:
        return notes
    model = copy.deepcopy(pristine).to(torch.float64)
    wide = {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in inputs.items()}
    try:
        _, want = gradients(copy.deepcopy(model), wide)
        wide_notes = _eager_notes(model, wide, want)[0]
    except Exception:  # noqa: BLE001  (a model that does not run in float64)
        return notes
    if any(not n.startswith("ok: ") for n in wide_notes):
        return notes
    return [f"ok: float32 rounding ({'; '.join(n for n in notes if not n.startswith('ok: '))}; equal in float64)"]


def sweep_one(model_type: str, class_name: str, seconds: int, compiled: bool = False,
              backend: str = "inductor") -> tuple[str, str]:
    try:
        with zoo_sweep.time_limit(seconds):
            model, inputs = zoo_sweep.build(model_type, class_name)
            # Some models cache tensors in eval mode (LeViT's attention biases, dropped by `train()`):
            # one built by a forward without gradients gives those parameters no gradient later, and a
            # rewrite (which toggles the mode) would. Start every copy without such a cache.
            model.train()
            model.eval()
            pristine = copy.deepcopy(model)
            loss, want = gradients(model, inputs)
            again_loss, again = gradients(model, inputs)
            if not want:
                return "skipped", "no parameter gets a gradient"
            if grad_error(again, want) is not None or not torch.equal(loss, again_loss):
                return "skipped", "the original's two backward passes differ"
            if not sum(zoo_sweep.truth_sites(model, inputs).values()):
                return "no attention", ""
    except Exception as e:  # noqa: BLE001
        return "skipped", zoo_sweep._short(e)
    stage = "dense limit and sparse"
    try:
        with zoo_sweep.time_limit(seconds):
            notes, sparse, got_sparse, moba = _eager_notes(pristine, inputs, want)
            if any(not n.startswith("ok: ") for n in notes):
                stage = "float64 recheck"
                notes = _recheck_in_float64(pristine, inputs, notes)
        if compiled and moba:
            stage = "compiled"
            with zoo_sweep.time_limit(seconds):
                notes += _compiled_notes(pristine, sparse, inputs, got_sparse, backend)
    except Exception as e:  # noqa: BLE001
        return zoo_sweep.error_row(stage, e)
    return zoo_sweep.verdict(notes)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", help="model types to run (default: every base model type)")
    ap.add_argument("--seconds", type=int, default=180, help="time limit per model and phase")
    ap.add_argument("--compiled", action="store_true", help="also torch.compile the sparse rewrite")
    ap.add_argument("--backend", default="inductor", help="torch.compile backend for --compiled (inductor)")
    ap.add_argument("--markdown", help="also write the table here")
    args = ap.parse_args(argv)
    title = f"gradients{f', compiled ({args.backend})' if args.compiled else ''}"
    return zoo_sweep.sweep_table(title, args.only, lambda t, c: sweep_one(t, c, args.seconds, args.compiled, args.backend),
                                 args.markdown)


if __name__ == "__main__":
    sys.exit(main())
