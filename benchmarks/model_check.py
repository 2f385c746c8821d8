"""Correctness of the rewritten model path on one device and dtype (the GPU check's first step).

    python benchmarks/model_check.py --device cuda --dtype bfloat16      # in benchmarks/gpu_model_check.sh
    python benchmarks/model_check.py                                     # the same on the CPU

A small random-weight `LlamaForCausalLM` (GQA, 2 layers, head dim 64) is checked the ways a user
runs it, each against an independent answer. MoBA's routing is discrete, so whole-model logits
are compared only where rounding cannot move a block choice:

* in `--dtype`, dense limit (`top_k * block_size >= T`): the rewritten model's logits equal the
  original's, eager and `torch.compile(fullgraph=True)`;
* in `--dtype`, sparse (block 32 / top-2 over 256 tokens): every MoBA attention call of an eager
  prefill and of `generate()` with the dynamic and the static cache equals the dense MoBA
  `reference` on that call's own inputs (same device and dtype: the gate sees the same values);
* in fp32 on `--device`, sparse: logits of the eager and the compiled model, and every step of
  `generate()` (dynamic and static cache, teacher-forced), equal the CPU fp32 run's, whose path
  the test suite checks against the reference; and with a policy's `dense_below` crossed
  mid-decode, transformers' own compiled static decode (CUDA graphs on a GPU) = the eager one.

Prints one line per check and exits non-zero if any fails.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402

TOL = {torch.float32: 2e-4, torch.bfloat16: 6e-2, torch.float16: 1e-2}  # max |logit error|, logits ~ N(0, 1)
SITE_TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}  # max |attention output error|


def _generate(model, prompt: torch.Tensor, cache: str):
    kw = {"cache_implementation": "static"} if cache == "static" else {}
    return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=24, do_sample=False,
                          output_logits=True, return_dict_in_generate=True, pad_token_id=0, **kw)


def _model(device: str, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=1024)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    model.set_attn_implementation("sdpa")
    return model.to(device=device, dtype=dtype)


def _policy(block: int, top_k: int) -> dict:
    return {"version": 1, "defaults": {"block_size": block, "top_k": top_k, "decode": "moba"}}


class SiteOracle:
    """Wraps the rewritten model's attention function: each MoBA call's output is compared with the
    dense `reference` MoBA of the same query, keys and values (the filled prefix of a static cache)."""

    def __init__(self, impl: str) -> None:
        from transformers import AttentionInterface

        self.impl, self.inner = impl, AttentionInterface._global_mapping[impl]
        self.worst, self.calls = 0.0, 0
        AttentionInterface._global_mapping[impl] = self

    def close(self) -> None:
        from transformers import AttentionInterface

        AttentionInterface._global_mapping[self.impl] = self.inner

    def __call__(self, module, query, key, value, attention_mask, *args, **kwargs):
        from moba_rewrite.integrations import hf_cache
        from moba_rewrite.kernels import reference

        cache = next((kwargs.get(n) for n in ("moba_kv_cache",) if kwargs.get(n) is not None), None)
        out = self.inner(module, query, key, value, attention_mask, *args, **kwargs)
        decision = getattr(module, "_moba_decision", None)
        if decision is None or decision.mode != "moba":
            return out
        filled = key.shape[2]
        layer = hf_cache.cache_layer(module, cache) if cache is not None else None
        if layer is not None and hasattr(layer, "max_cache_len") and key.shape[2] == layer.max_cache_len:
            filled = int(layer.cumulative_length)  # a static layer: the written prefix
        scale = kwargs.get("scaling") or query.shape[-1] ** -0.5
        g = query.shape[1] // key.shape[1]
        k, v = (x[:, :, :filled].repeat_interleave(g, dim=1) for x in (key, value))
        want = reference.forward(query, k, v, block_size=int(decision.block_size), top_k=int(decision.top_k),
                                 causal=True, scale=scale, attn_mask=None)
        got = out[0].transpose(1, 2)
        self.worst = max(self.worst, (got.float() - want.float()).abs().max().item())
        self.calls += 1
        return out


def main() -> int:
    import moba_rewrite as mr

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    tol = TOL[dtype]
    failed = []

    def check(name: str, got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
        err = (got.float().cpu() - want.float().cpu()).abs().max().item()
        ok = err <= tol
        print(f"{'ok  ' if ok else 'FAIL'} {name}: max |error| {err:.3g} (tolerance {tol:g})", flush=True)
        if not ok:
            failed.append(name)

    ids = torch.randint(0, 512, (2, 256), generator=torch.Generator().manual_seed(1))
    dev_ids = ids.to(args.device)
    prompt = dev_ids[:, :200]
    with torch.no_grad():
        original = _model(args.device, dtype)
        want = original(dev_ids).logits
        limit = mr.rewrite(copy.deepcopy(original), _policy(64, 4))  # 4 x 64 >= 256: full attention
        check(f"{args.dtype}, dense limit, eager = original", limit(dev_ids).logits, want, tol)
        torch._dynamo.reset()
        check(f"{args.dtype}, dense limit, compiled = original",
              torch.compile(limit, fullgraph=True)(dev_ids).logits, want, tol)

        sparse = mr.rewrite(_model(args.device, dtype), _policy(32, 2))
        for what, run in (("eager prefill", lambda: sparse(dev_ids)),
                          ("generate, dynamic cache", lambda: _generate(sparse, prompt, "dynamic")),
                          ("generate, static cache", lambda: _generate(sparse, prompt, "static"))):
            oracle = SiteOracle(sparse.config._attn_implementation)
            try:
                run()
            finally:
                oracle.close()
            check(f"{args.dtype}, sparse, {what}: {oracle.calls} MoBA calls = reference on their inputs",
                  torch.tensor(oracle.worst), torch.tensor(0.0), SITE_TOL[dtype] if oracle.calls else -1.0)

        reference = mr.rewrite(_model("cpu", torch.float32), _policy(32, 2))
        want = reference(ids).logits
        assert (want - mr.rewrite(_model("cpu", torch.float32), _policy(64, 4))(ids).logits).abs().max() > 1e-3, \
            "the sparse policy does not change the output: nothing is checked"
        sparse32 = mr.rewrite(_model(args.device, torch.float32), _policy(32, 2))
        tol32 = TOL[torch.float32]
        check("fp32, sparse, eager = CPU fp32", sparse32(dev_ids).logits, want, tol32)
        torch._dynamo.reset()
        check("fp32, sparse, compiled = CPU fp32", torch.compile(sparse32, fullgraph=True)(dev_ids).logits, want, tol32)
        for cache in ("dynamic", "static"):
            out = _generate(sparse32, prompt, cache)
            steps = torch.stack(out.logits, dim=1)  # [B, new, vocab]
            teacher = reference(out.sequences[:, :-1].cpu()).logits[:, prompt.shape[1] - 1:]  # same tokens, recomputed
            check(f"fp32, generate, {cache} cache, every step = CPU fp32", steps, teacher, tol32)
        # dense_below crossed mid-decode (10 steps of full attention, then MoBA), compiled by transformers
        # itself (reduce-overhead on CUDA: the op's on-device choice while the graph is captured)
        from transformers import CompileConfig

        below = mr.rewrite(_model(args.device, torch.float32), {"version": 1, "defaults": {
            "block_size": 32, "top_k": 2, "decode": "moba", "dense_below": prompt.shape[1] + 10}})
        eager = _generate(below, prompt, "static")
        config = CompileConfig(fullgraph=True, mode="reduce-overhead" if args.device.startswith("cuda") else "default",
                               backend="inductor" if args.device.startswith("cuda") else "aot_eager")
        config._compile_all_devices = True
        torch._dynamo.reset()
        compiled = below.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=24, do_sample=False,
                                  output_logits=True, return_dict_in_generate=True, pad_token_id=0,
                                  cache_implementation="static", compile_config=config)
        torch._dynamo.reset()
        check("fp32, dense_below crossed mid-decode, compiled static decode = eager",
              torch.stack(compiled.logits, dim=1), torch.stack(eager.logits, dim=1), tol32)
    print("model_check:", "all passed" if not failed else f"{len(failed)} failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
