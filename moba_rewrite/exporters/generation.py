"""Generation programs: a rewritten Hugging Face decoder exported with a static KV cache.

`export_for_generation(model, policy, max_seq_len=, batch=)` returns a `GenerationPrograms`:
two `torch.export` programs over the same weights, in the style of transformers'
`TorchExportableModuleWithStaticCache` (integrations/executorch.py) but with the cache as
explicit inputs and outputs (ONNX Runtime GenAI's past / present convention), so a runner owns it:

    prefill(input_ids [B, T], attention_mask [B, L], cache_position [T], *cache) -> (logits [B, 1, V], *cache)
    decode (input_ids [B, 1], attention_mask [B, L], cache_position [1], *cache) -> (logits [B, 1, V], *cache)

`L` is `max_seq_len`, `B` the exported batch, `T` the prompt length (symbolic, 2..L). The cache
is, per decoder layer, `keys [B, Hkv, L, D]`, `values [B, Hkv, L, Dv]` and, for MoBA layers, the
gate's block means `[B, Hkv, ceil(L / block_size), D]` (fp32), kept beside the cache as decode
keeps them (`integrations.hf_cache`, op `moba::attention_kv_cache`). `attention_mask` covers the
cache's `L` slots: 1 for real tokens written so far and the current ones, 0 for left padding and
empty slots. Position ids come from the mask as `generate()` makes them (cumsum - 1, 0 on padding).
The programs write the new keys into the cache tensors in place (buffers a runner reuses) and also
return them. Logits are the last position's only (`logits_to_keep=1`).

Sliding-window layers get a full-length cache layer (as transformers' exportable modules do), with
the model's own window mask; their MoBA runs in the prefill only and decode steps attend densely
over the window, exactly what `generate()` does with the rewritten model (`hf_cache`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import Tensor, nn
from torch.export import Dim, ExportedProgram

import moba_rewrite.attention.kv_cache  # noqa: F401  (torch.ops.moba.attention_kv_cache)
from moba_rewrite.exporters.common import failsafe_output
from moba_rewrite.integrations.hf_generation_config import logits_processing

SLIDING_KINDS = ("sliding_attention", "chunked_attention", "hybrid_sliding")
META_FILE = "moba_generation.json"
FORMAT_TAG = "moba-rewrite generation v1"


class GenerationExportError(ValueError):
    """A model (or a request) that cannot become a faithful generation program."""


@dataclass
class GenerationSpec:
    """What a runner needs to know about a generation artifact (stored beside the programs)."""

    max_seq_len: int
    batch: int
    vocab_size: int
    pad_token_id: int
    cache: list[dict[str, Any]]  # per cache tensor: {"layer", "kind": keys|values|means, "shape", "dtype"}
    eos_token_id: list[int] = field(default_factory=list)
    format: str = FORMAT_TAG
    # what the model's generation config makes generate() do to the logits (repetition_penalty, ...):
    # a runner decoding by argmax says it does not apply them (`hf_generation_config`)
    logits_processing: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "GenerationSpec":
        data = json.loads(text)
        if data.get("format") != FORMAT_TAG:
            raise GenerationExportError(f"expected a {FORMAT_TAG!r} artifact, got format {data.get('format')!r}")
        return cls(**data)

    def empty_cache(self, device: str | torch.device = "cpu") -> list[Tensor]:
        """Zeroed cache tensors in the programs' input order."""
        return [torch.zeros(c["shape"], dtype=getattr(torch, c["dtype"]), device=device) for c in self.cache]


@dataclass
class GenerationPrograms:
    """The prefill and decode programs of a rewritten decoder, and their `GenerationSpec`:
    `ExportedProgram`s, or AOTInductor runners when loaded from an AOTInductor package."""

    prefill: Any
    decode: Any
    spec: GenerationSpec
    tokenizer_files: dict[str, bytes] = field(default_factory=dict)  # `save_pretrained` output, for runners


# --------------------------------------------------------------------------------------------
# The module that is exported


def _layer_kinds(model: nn.Module) -> list[str]:
    """Each decoder layer's attention kind (`full_attention`, `sliding_attention`, ...)."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    config = model.config.get_text_config(decoder=True)
    return list(get_layer_types_and_kwargs(config)[0])


def _moba_modules(model: nn.Module) -> dict[int, nn.Module]:
    """layer index -> attention module, for modules with a MoBA decision."""
    out = {}
    for m in model.modules():
        d = getattr(m, "_moba_decision", None)
        if d is not None and d.mode == "moba" and isinstance(getattr(m, "layer_idx", None), int):
            out[m.layer_idx] = m
    return out


class _GenerationStep(nn.Module):
    """One forward of the model against a static cache given as tensors (see the module doc)."""

    def __init__(self, model: nn.Module, spec: GenerationSpec, block_sizes: dict[int, int]) -> None:
        super().__init__()
        self.model = model
        self.max_seq_len = spec.max_seq_len
        self.layout = [(c["layer"], c["kind"]) for c in spec.cache]
        self.block_sizes = block_sizes
        self.n_layers = 1 + max(layer for layer, _ in self.layout)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, cache_position: Tensor, *cache: Tensor):
        from transformers.cache_utils import StaticCache, StaticLayer

        from moba_rewrite.integrations.hf_cache import BlockMeans

        tensors: dict[tuple[int, str], Tensor] = dict(zip(self.layout, cache))
        static = StaticCache(config=self.model.config, max_cache_len=self.max_seq_len)
        static.layers = [StaticLayer(self.max_seq_len) for _ in range(self.n_layers)]
        for i, layer in enumerate(static.layers):
            keys, values = tensors[(i, "keys")], tensors[(i, "values")]
            layer.keys, layer.values = keys, values
            layer.device, layer.batch_size, layer.num_heads = keys.device, keys.shape[0], keys.shape[1]
            layer.k_head_dim, layer.v_head_dim = keys.shape[-1], values.shape[-1]
            layer.cumulative_length = cache_position[0].clone()
            layer.is_initialized = True
            if (i, "means") in tensors:
                layer.moba_block_means = BlockMeans(tensors[(i, "means")], self.block_sizes[i], keys)
        mask = attention_mask.to(torch.long)
        position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0).index_select(1, cache_position)
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, cache=static,
                         use_cache=True, logits_to_keep=1)
        updated = []
        for (i, kind) in self.layout:
            layer = static.layers[i]
            updated.append(layer.keys if kind == "keys" else layer.values if kind == "values"
                           else layer.moba_block_means.means)
        return (out.logits, *updated)


@contextlib.contextmanager
def _sliding_decode_dense(model: nn.Module, kinds: list[str]) -> Iterator[None]:
    """While the decode program is traced, MoBA sites on sliding-window layers decode densely (what
    `generate()` does there: the window has dropped the keys MoBA's blocks are cut from)."""
    saved = {}
    for idx, m in _moba_modules(model).items():
        if idx < len(kinds) and kinds[idx] in SLIDING_KINDS:
            saved[m] = m._moba_decision
            m._moba_decision = dataclasses.replace(m._moba_decision, decode="dense")
    try:
        yield
    finally:
        for m, d in saved.items():
            m._moba_decision = d


# --------------------------------------------------------------------------------------------
# Export


def _probe_cache(model: nn.Module, batch: int, max_seq_len: int) -> list[tuple[Tensor, Tensor]]:
    """(keys, values) of every decoder layer after a 2-token forward into a fresh static cache:
    the cache's shapes and dtypes as this model really writes them."""
    from transformers.cache_utils import StaticCache

    device = next(model.parameters()).device
    cache = StaticCache(config=model.config, max_cache_len=max_seq_len)
    ids = torch.zeros((batch, 2), dtype=torch.long, device=device)
    with torch.no_grad():
        model(input_ids=ids, cache=cache, use_cache=True)
    return [(layer.keys, layer.values) for layer in cache.layers]


def generation_spec(model: nn.Module, *, max_seq_len: int, batch: int) -> tuple[GenerationSpec, dict[int, int]]:
    """The cache layout of a rewritten model (and the block size of each MoBA layer)."""
    config = model.config.get_text_config(decoder=True)
    moba = _moba_modules(model)
    block_sizes = {i: int(m._moba_decision.block_size) for i, m in moba.items()}
    cache = []
    for i, (k, v) in enumerate(_probe_cache(model, batch, max_seq_len)):
        if k is None or k.dim() != 4:
            raise GenerationExportError(f"layer {i}: expected a [B, H, L, D] static cache layer, got "
                                        f"{None if k is None else list(k.shape)}")
        b, h, _, d = k.shape
        cache.append({"layer": i, "kind": "keys", "shape": [b, h, max_seq_len, d], "dtype": str(k.dtype)[6:]})
        cache.append({"layer": i, "kind": "values", "shape": [b, h, max_seq_len, v.shape[-1]],
                      "dtype": str(v.dtype)[6:]})
        if i in block_sizes:
            nb = -(-max_seq_len // block_sizes[i])
            cache.append({"layer": i, "kind": "means", "shape": [b, h, nb, d],
                          "dtype": str(torch.promote_types(k.dtype, torch.float32))[6:]})
    eos = getattr(model.generation_config, "eos_token_id", None) if hasattr(model, "generation_config") else None
    eos = [] if eos is None else [int(eos)] if isinstance(eos, int) else [int(e) for e in eos]
    pad = getattr(config, "pad_token_id", None)
    processing = {k: (v if isinstance(v, (int, float, str, bool)) else str(v))
                  for k, v in logits_processing(model).items()}
    spec = GenerationSpec(max_seq_len=max_seq_len, batch=batch, vocab_size=int(config.vocab_size),
                          pad_token_id=int(pad) if isinstance(pad, int) else 0, cache=cache, eos_token_id=eos,
                          logits_processing=processing)
    return spec, block_sizes


def _check_model(model: nn.Module, max_seq_len: int, batch: int) -> None:
    from moba_rewrite.integrations.hf import is_hf_model

    if not is_hf_model(model) or not hasattr(model, "generate"):
        raise GenerationExportError(f"expected a Hugging Face model that generates (a *ForCausalLM), got "
                                    f"{type(model).__name__}")
    if model.config.is_encoder_decoder:
        raise GenerationExportError(f"{type(model).__name__}: encoder-decoder models are not supported by "
                                    "generation programs (decoder-only language models are)")
    if max_seq_len < 2 or batch < 1:
        raise GenerationExportError(f"expected max_seq_len >= 2 and batch >= 1, got {max_seq_len} and {batch}")
    limit = getattr(model.config.get_text_config(decoder=True), "max_position_embeddings", None)
    if isinstance(limit, int) and max_seq_len > limit:
        raise GenerationExportError(f"max_seq_len {max_seq_len} exceeds the model's max_position_embeddings "
                                    f"{limit}")


def export_for_generation(model: nn.Module, policy: Any = None, *, max_seq_len: int, batch: int = 1,
                          tokenizer: Any = None) -> GenerationPrograms:
    """Rewrite `model` (a Hugging Face decoder-only LM) by `policy` (None: already rewritten) and export
    its prefill and decode programs over a static cache of `max_seq_len` slots for `batch` rows.
    `tokenizer` (a transformers tokenizer): carried into the saved artifact, for text prompts."""
    from moba_rewrite.exporters import tokenizer_files

    carried = tokenizer_files.files_of(tokenizer) if tokenizer is not None else {}
    if policy is not None:
        from moba_rewrite.api import rewrite

        rewrite(model, policy)
    _check_model(model, max_seq_len, batch)
    model.eval()
    spec, block_sizes = generation_spec(model, max_seq_len=max_seq_len, batch=batch)
    step = _GenerationStep(model, spec, block_sizes)
    device = next(model.parameters()).device
    cache = tuple(spec.empty_cache(device))
    mask = torch.ones((batch, max_seq_len), dtype=torch.long, device=device)
    n = min(max_seq_len, 4)
    prompt = (torch.zeros((batch, n), dtype=torch.long, device=device), mask, torch.arange(n, device=device))
    tokens = Dim("prompt_len", min=2, max=max_seq_len)
    shapes = ({1: tokens}, None, {0: tokens}, (None,) * len(cache))  # *cache is one tuple argument
    with torch.no_grad():
        prefill = torch.export.export(step, (*prompt, *spec.empty_cache(device)), dynamic_shapes=shapes,
                                      strict=False)
        one = (torch.zeros((batch, 1), dtype=torch.long, device=device), mask,
               torch.tensor([n], device=device))
        with _sliding_decode_dense(model, _layer_kinds(model)):
            decode = torch.export.export(step, (*one, *cache), strict=False)
    return GenerationPrograms(prefill, decode, spec, carried)


# --------------------------------------------------------------------------------------------
# Files


def _extra_files(programs: GenerationPrograms) -> dict[str, str]:
    """The archive's text members: the spec, and the tokenizer's files when carried."""
    from moba_rewrite.exporters import tokenizer_files

    extra = {META_FILE: programs.spec.to_json()}
    if programs.tokenizer_files:
        extra[tokenizer_files.ARCHIVE_MEMBER] = tokenizer_files.to_archive_text(programs.tokenizer_files)
    return extra


def save_generation_pt2(programs: GenerationPrograms, path: str | os.PathLike) -> None:
    """Both programs and the spec (and a carried tokenizer) in one `.pt2` archive (`torch.export.pt2_archive`)."""
    from torch.export.pt2_archive._package import package_pt2

    with failsafe_output(path) as f:
        package_pt2(f, exported_programs={"prefill": programs.prefill, "decode": programs.decode},
                    extra_files=_extra_files(programs))


def save_generation_aoti(programs: GenerationPrograms, path: str | os.PathLike) -> None:
    """Both programs compiled by AOTInductor into one package (models `prefill` and `decode`,
    loaded with `torch._inductor.package.load_package(path, name)`), the spec beside them.
    Needs a C++ compiler; the package calls `moba::attention_kv_cache` through the proxy executor."""
    import torch._inductor
    from torch.export.pt2_archive._package import package_pt2

    files = {}
    for name, program in (("prefill", programs.prefill), ("decode", programs.decode)):
        args, kwargs = program.example_inputs
        files[name] = torch._inductor.aot_compile(program.module(check_guards=False), args, kwargs,
                                                  options={"aot_inductor.package": True})
    with failsafe_output(path) as f:
        package_pt2(f, aoti_files=files, extra_files=_extra_files(programs))


def _is_aoti(path: str | os.PathLike) -> bool:
    import zipfile

    with zipfile.ZipFile(path) as zf:
        return any("/data/aotinductor/" in n for n in zf.namelist())


def load_generation_programs(path: str | os.PathLike) -> GenerationPrograms:
    """The programs and spec written by `save_generation_pt2` (`ExportedProgram`s) or
    `save_generation_aoti` (AOTInductor runners, callables)."""
    from torch.export.pt2_archive._package import load_pt2

    contents = load_pt2(os.fspath(path))
    programs = contents.aoti_runners if _is_aoti(path) else contents.exported_programs
    if set(programs) != {"prefill", "decode"} or META_FILE not in contents.extra_files:
        raise GenerationExportError(f"{path}: expected a generation program (prefill and decode programs and "
                                    f"{META_FILE}), got programs {sorted(programs)}")
    from moba_rewrite.exporters import tokenizer_files

    carried = contents.extra_files.get(tokenizer_files.ARCHIVE_MEMBER)
    return GenerationPrograms(programs["prefill"], programs["decode"],
                              GenerationSpec.from_json(contents.extra_files[META_FILE]),
                              tokenizer_files.from_archive_text(carried) if carried else {})


def load_generation(path: str | os.PathLike) -> tuple[Any, Any, GenerationSpec]:
    """(prefill, decode, spec) of a generation artifact (pt2 or AOTInductor): callables taking and
    returning tensors (ONNX folders: `exporters.onnx_generation.load_generation_onnx`)."""
    programs = load_generation_programs(path)
    if isinstance(programs.prefill, ExportedProgram):
        return programs.prefill.module(), programs.decode.module(), programs.spec
    return programs.prefill, programs.decode, programs.spec
