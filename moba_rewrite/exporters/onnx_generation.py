"""Generation programs as ONNX: a folder with `prefill.onnx`, `decode.onnx`, the spec and, when one
is carried, the tokenizer's files in `tokenizer/`.

Each program of `exporters.generation` is exported with torch's ONNX exporter. Its
`moba::attention_kv_cache` calls become, for a few queries (the decode program, static `Tq`),
the node `com.moba_rewrite::AttentionKVCache` (`exporters.onnx_kv_cache`): gated on the cached
block means, reading only the selected blocks of the cache. For the prefill (a symbolic prompt
length) they become the usual `com.moba_rewrite::Attention` node (`exporters.onnx`) on the filled
prefix of the cache: keys, values and mask sliced to `cache_position[-1] + 1` slots, so the
node's queries sit at their real positions (`Tk - Tq + i`) and empty slots are never seen.

The cache follows ONNX Runtime GenAI's convention: inputs `cache_0..` (the spec's order), the
updated tensors as outputs in the same order after the logits.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import onnx
import onnxscript
import torch
from onnxscript import opset20 as op

from moba_rewrite.exporters import onnx as moba_onnx
from moba_rewrite.exporters import onnx_kv_cache
from moba_rewrite.exporters import tokenizer_files
from moba_rewrite.exporters.generation import META_FILE, GenerationPrograms, GenerationSpec

PROGRAMS = ("prefill", "decode")


_KV_NODE_MAX_QUERIES = 16  # static query lengths up to which the cache node (gathered blocks) is used


def _kv_cache_node_translation(q, k_cache, v_cache, key_block_means, cache_position, attn_mask=None,
                               block_size: int = 512, top_k: int = 3, causal: bool = True, scale: float = 1.0,
                               backend: str = "auto", dense_below: int = 0):
    """`moba::attention_kv_cache` of a few queries (a decode step) as `com.moba_rewrite::AttentionKVCache`,
    gated on the cached means (full attention below `dense_below` filled slots); more queries (the
    prefill): `_kv_cache_translation`."""
    tq = q.shape[2] if q.shape is not None and len(q.shape) == 4 else None
    if not (isinstance(tq, int) and tq <= _KV_NODE_MAX_QUERIES):
        return _kv_cache_translation(q, k_cache, v_cache, key_block_means, cache_position, attn_mask, block_size,
                                     top_k, causal, scale, backend, dense_below)
    bias = moba_onnx.additive_bias(attn_mask, q)
    return onnx_kv_cache.node(q, k_cache, v_cache, key_block_means, cache_position, bias, block_size=block_size,
                              top_k=top_k, causal=causal, scale=scale, dense_below=dense_below)


def _kv_cache_translation(q, k_cache, v_cache, key_block_means, cache_position, attn_mask=None,
                          block_size: int = 512, top_k: int = 3, causal: bool = True, scale: float = 1.0,
                          backend: str = "auto", dense_below: int = 0):
    """`moba::attention_kv_cache` as `com.moba_rewrite::Attention` on the cache's filled prefix (its
    `dense_below` attribute: full attention below that many filled keys)."""
    filled = op.Add(op.Slice(cache_position, op.Constant(value_ints=[-1]), op.Constant(value_ints=[2**62])),
                    op.Constant(value_ints=[1]))
    start, keys_axis = op.Constant(value_ints=[0]), op.Constant(value_ints=[2])
    k = op.Slice(k_cache, start, filled, keys_axis)
    v = op.Slice(v_cache, start, filled, keys_axis)
    bias = None
    if attn_mask is not None:  # 0 / -inf first: a sliced value no longer says it is boolean
        zero = op.CastLike(op.Constant(value_float=0.0), q)
        if attn_mask.dtype == onnxscript.ir.DataType.BOOL:
            attn_mask = op.Where(attn_mask, zero, op.CastLike(op.Constant(value_float=float("-inf")), q))
        bias = op.CastLike(op.Slice(attn_mask, start, filled, op.Constant(value_ints=[-1])), q)
    return moba_onnx._moba_translation(q, k, v, bias, block_size, top_k, causal, scale, backend, dense_below)


def _index_copy_translation(x, dim: int, index, source):
    """`aten.index_copy` (the static cache's write of the new keys) as one `ScatterElements` along
    `dim`; the exporter's default goes through `index_put`, which transposes the whole cache to the
    front and back every step (O(cache) per layer, most of an ONNX decode step's time)."""
    rank = len(x.shape)
    dim = dim % rank
    shape = [1] * rank
    shape[dim] = -1
    indices = op.Expand(op.Reshape(op.Cast(index, to=onnx.TensorProto.INT64), op.Constant(value_ints=shape)),
                        op.Shape(source))
    return op.ScatterElements(x, indices, source, axis=dim)


def save_generation_onnx(programs: GenerationPrograms, directory: str | os.PathLike, *, body: str = "sparse") -> None:
    """Write `prefill.onnx`, `decode.onnx` and the spec into `directory` (created)."""
    kv = _kv_cache_node_translation if body == "sparse" else _kv_cache_translation  # dense: the plain statement
    table = {**moba_onnx.translation_table(), torch.ops.moba.attention_kv_cache.default: kv,
             torch.ops.aten.index_copy.default: _index_copy_translation}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    n_cache = len(programs.spec.cache)
    names = ["input_ids", "attention_mask", "cache_position", *(f"cache_{i}" for i in range(n_cache))]
    outputs = ["logits", *(f"present_{i}" for i in range(n_cache))]
    for name in PROGRAMS:
        program = getattr(programs, name)
        with moba_onnx.quiet_exporter(), torch.no_grad():
            exported = torch.onnx.export(program, dynamo=True, custom_translation_table=table,
                                         opset_version=moba_onnx.OPSET_VERSION, input_names=names,
                                         output_names=outputs, verbose=False, report=False)
        proto = exported.model_proto
        moba_onnx.attach_function(proto, body)
        onnx_kv_cache.attach_function(proto)
        onnx.checker.check_model(proto)
        onnx.save(proto, os.fspath(directory / f"{name}.onnx"))
    (directory / META_FILE).write_text(programs.spec.to_json())
    if programs.tokenizer_files:
        tokenizer_files.write_folder(programs.tokenizer_files, directory)


def load_generation_onnx(directory: str | os.PathLike) -> tuple[Callable, Callable, GenerationSpec]:
    """(prefill, decode, spec): onnxruntime sessions (CPU) as callables taking and returning tensors."""
    import onnxruntime as ort

    directory = Path(directory)
    spec = GenerationSpec.from_json((directory / META_FILE).read_text())
    options = ort.SessionOptions()
    options.log_severity_level = 3

    def runner(name: str) -> Callable:
        session = ort.InferenceSession(os.fspath(directory / f"{name}.onnx"), options,
                                       providers=["CPUExecutionProvider"])
        inputs = [i.name for i in session.get_inputs()]

        def run(*args: Any) -> list[torch.Tensor]:
            feeds = {n: a.detach().cpu().numpy() for n, a in zip(inputs, args)}
            return [torch.from_numpy(x) for x in session.run(None, feeds)]

        return run

    return runner("prefill"), runner("decode"), spec
