"""How many attention sites does eager discovery list, over every transformers model class?

For every model type in transformers' registry (`MODEL_MAPPING_NAMES`: the base model class of
each architecture), build the model from its default config shrunk to a tiny size (hidden 32,
2 layers, 4 heads, ...), make inputs for its forward, and compare:

- truth: attention as the ops that run show it, counted independently of moba_rewrite: a
  `TorchDispatchMode` (aten level) counts every fused SDPA / multi-head-attention kernel and
  every softmax whose input comes from a product of two activations (no weight or buffer
  operand) and whose output multiplies an activation; each is attributed to the innermost
  module running (forward hooks), one site per (module, ordinal within one call);
- listed: `moba_rewrite.find_sites(model, inputs)` (the eager discovery `mr.plan` and
  `mr.rewrite` use), counted per module name.

    python benchmarks/zoo_sweep.py                       # every model type (~8 min on 2 cores)
    python benchmarks/zoo_sweep.py --only llama bloom    # some
    python benchmarks/zoo_sweep.py --json benchmarks/logs/zoo_sweep.json --markdown out.md
    python benchmarks/zoo_sweep.py --code /path/to/other/checkout   # measure another version

A model type that cannot be built tiny or given inputs generically is counted apart, with the
error; misses and extras are listed per model (benchmarks/RESULTS.md explains them).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import inspect
import json
import os
import signal
import sys
import time
import traceback
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402
from torch.utils.weak import WeakIdKeyDictionary  # noqa: E402

SIZES: dict[str, Any] = {
    "hidden_size": 32, "d_model": 32, "n_embd": 32, "embed_dim": 32, "dim": 32, "word_embed_proj_dim": 32,
    "num_hidden_layers": 2, "n_layer": 2, "n_layers": 2, "num_layers": 2, "encoder_layers": 2, "decoder_layers": 2,
    "num_decoder_layers": 2, "num_encoder_layers": 2,
    "num_attention_heads": 4, "n_head": 4, "n_heads": 4, "num_heads": 4, "encoder_attention_heads": 4,
    "decoder_attention_heads": 4, "num_key_value_heads": 2,
    "intermediate_size": 64, "ffn_dim": 64, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64, "d_ff": 64, "n_inner": 64,
    "head_dim": 8, "d_kv": 8, "input_embedding_size": 32, "output_embedding_size": 32,  # RemBERT: 1.7 GB at 1664
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "num_experts_per_tok": 2,
    "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32,
    "kv_lora_rank": 16, "q_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8,
    "mamba_n_heads": 4, "mamba_d_head": 16, "mamba_d_state": 16, "mamba_chunk_size": 16, "mamba_d_ssm": 64,  # Mamba-2 mixers
    "out_hidden_size": 32, "depth": 2,  # Qwen-VL-style vision towers: merged patches enter the 32-wide text model
}
LIST_SIZES: dict[str, int] = {"depths": 1, "num_heads": 2, "num_layers": 1, "num_attention_heads": 2,
                              "encoder_layers": 1, "decoder_layers": 1}
MAX_PARAMS = 150_000_000
SEQ = 16


# --------------------------------------------------------------------------------------------
# Tiny configs


def _fields(cls: type) -> set[str]:
    try:
        return set(inspect.signature(cls.__init__).parameters)
    except (TypeError, ValueError):
        return set()


def tiny_config(cls: type, depth: int = 0) -> Any:
    """`cls()` with its size fields shrunk (sub-configs too), built through the constructor so
    derived fields follow."""
    from transformers import PretrainedConfig

    default = cls()
    accepted = _fields(cls)
    kwargs: dict[str, Any] = {}
    for key, value in SIZES.items():
        current = getattr(default, key, None)
        if key not in accepted:
            continue
        if isinstance(current, int) and not isinstance(current, bool):
            kwargs[key] = value
        elif isinstance(current, (list, tuple)) and current and key in LIST_SIZES:
            kwargs[key] = [LIST_SIZES[key]] * len(current)
    for key, value in LIST_SIZES.items():
        current = getattr(default, key, None)
        if key in accepted and key not in kwargs and isinstance(current, (list, tuple)) and current:
            kwargs[key] = [value] * len(current)
    if depth < 3:
        for name in list(getattr(default, "sub_configs", {}) or {}):
            sub = getattr(default, name, None)
            if isinstance(sub, PretrainedConfig) and name in accepted:
                with contextlib.suppress(Exception):
                    kwargs[name] = tiny_config(type(sub), depth + 1)
    cfg = _construct(cls, kwargs, default)
    if cfg is not default:
        _fit_mrope_sections(cfg)
    depth_needed = _first_attention_layer(default) + 1
    if cfg is not default and not _has_attention_layer(cfg) and depth_needed > 0 \
            and isinstance(getattr(cfg, "num_hidden_layers", None), int):
        # A hybrid stack (Qwen3-Next, Qwen3.5, Jamba, Kimi Linear, ...) whose first layers are all
        # recurrent: keep layers up to its first attention layer, or the model has no site.
        cfg = _construct(cls, {**kwargs, "num_hidden_layers": depth_needed}, default)
    if cfg is not default and set(_layer_types(cfg)) == {"linear_attention"} \
            and isinstance(getattr(cfg, "num_hidden_layers", None), int):
        # A hybrid family whose default config is all recurrent (Bamba, Granite 4.0-H: their
        # checkpoints name the attention layers): attention at the last layer.
        n = cfg.num_hidden_layers
        if "attn_layer_indices" in accepted:
            cfg = _construct(cls, {**kwargs, "attn_layer_indices": [n - 1]}, default)
        elif "layer_types" in accepted:
            cfg = _construct(cls, {**kwargs, "layer_types": ["linear_attention"] * (n - 1) + ["full_attention"]},
                             default)
    return cfg


def _fit_mrope_sections(cfg: Any, depth: int = 0) -> None:
    """Multimodal RoPE (Qwen2-VL, Qwen2.5-VL, GLM-4V) splits half a head's dims into sections for
    time, height and width: scale them to the shrunk head (a text-only forward failed to split)."""
    rope = getattr(cfg, "rope_parameters", None)
    heads, hidden = getattr(cfg, "num_attention_heads", None), getattr(cfg, "hidden_size", None)
    head_dim = getattr(cfg, "head_dim", None) or (hidden // heads if isinstance(hidden, int) and isinstance(heads, int)
                                                  and heads > 0 else None)
    sections = rope.get("mrope_section") if isinstance(rope, dict) else None
    if sections is None and isinstance(rope, dict) and "mrope_section" in getattr(cfg, "ignore_keys_at_rope_validation",
                                                                                    ()):
        sections = [16, 24, 24]  # the modeling code's default when the config names none
    factor = (rope.get("partial_rotary_factor") if isinstance(rope, dict) else None) or \
        getattr(cfg, "partial_rotary_factor", None) or 1.0
    half = int(head_dim * factor) // 2 if isinstance(head_dim, int) else None
    if isinstance(sections, list) and sections and half and sum(sections) != half:
        total = sum(sections)
        fitted = [max(1, s * half // total) for s in sections]
        fitted[0] += half - sum(fitted)
        if min(fitted) >= 1:
            rope["mrope_section"] = fitted
    if depth < 3:
        for name in list(getattr(cfg, "sub_configs", {}) or {}):
            sub = getattr(cfg, name, None)
            if sub is not None and sub is not cfg and hasattr(sub, "to_dict"):
                _fit_mrope_sections(sub, depth + 1)


def _construct(cls: type, kwargs: dict[str, Any], default: Any) -> Any:
    try:
        return cls(**kwargs)
    except Exception:  # noqa: BLE001 (a combination the config rejects: keep what it accepts)
        for key in list(kwargs):
            trial = dict(kwargs)
            trial.pop(key)
            with contextlib.suppress(Exception):
                return cls(**trial)
        return default


ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention", "indexed_attention", "attention",
                         "hybrid")


def _layer_types(cfg: Any) -> list[str]:
    with contextlib.suppress(Exception):
        return [str(t) for t in (getattr(cfg, "layer_types", None) or [])]
    return []


def _has_attention_layer(cfg: Any) -> bool:
    types = _layer_types(cfg)
    return not types or any(t in ATTENTION_LAYER_TYPES for t in types)


def _first_attention_layer(cfg: Any) -> int:
    """Index of the first attention layer in `cfg.layer_types` (-1: none listed)."""
    return next((i for i, t in enumerate(_layer_types(cfg)) if t in ATTENTION_LAYER_TYPES), -1)


# --------------------------------------------------------------------------------------------
# Inputs


def _get(cfg: Any, *names: str, default: Any = None) -> Any:
    for owner in (cfg, getattr(cfg, "vision_config", None), getattr(cfg, "audio_config", None),
                  getattr(cfg, "encoder", None)):
        for n in names:
            v = getattr(owner, n, None) if owner is not None else None
            if v is not None:
                return v
    return default


def _input(name: str, cfg: Any, gen: torch.Generator) -> torch.Tensor | None:
    vocab = int(_get(cfg, "vocab_size", default=64) or 64)
    if name in ("input_ids", "decoder_input_ids"):
        n = SEQ if name == "input_ids" else SEQ // 2
        return torch.randint(min(3, vocab - 1), vocab, (1, n), generator=gen)
    if name == "pixel_values":
        size = _get(cfg, "image_size", default=32)
        size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        return torch.randn(1, _get(cfg, "num_channels", default=3), *size[-2:], generator=gen)
    if name in ("input_features", "input_features_t"):  # [B, mel, frames] (Whisper) or [B, frames, mel]
        mel = _get(cfg, "num_mel_bins", "feature_size", "input_feat_per_channel", "num_mel_bins", default=80)
        frames = 2 * int(_get(cfg, "max_source_positions", default=SEQ * 2) or SEQ * 2)
        x = torch.randn(1, mel, frames, generator=gen)
        return x.transpose(1, 2).contiguous() if name.endswith("_t") else x
    if name == "input_values":
        return torch.randn(1, 4000, generator=gen)
    return None


def _grid_image_inputs(cfg: Any, gen: torch.Generator) -> dict[str, Any] | None:
    """A prompt with one image in the Qwen-VL format (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5,
    GLM-4V): flattened patches `[h * w, C * t * p * p]`, `image_grid_thw`, the image's merged tokens
    in `input_ids` and `mm_token_type_ids` marking them; None when the config is not of that kind."""
    vision, image_token = getattr(cfg, "vision_config", None), getattr(cfg, "image_token_id", None)
    merge, patch = getattr(vision, "spatial_merge_size", None), getattr(vision, "patch_size", None)
    if not isinstance(image_token, int) or not isinstance(merge, int) or not isinstance(patch, int):
        return None
    channels = int(getattr(vision, "in_channels", getattr(vision, "in_chans", 3)) or 3)
    frames, side = int(getattr(vision, "temporal_patch_size", 1) or 1), 2 * merge
    vocab = int(_get(cfg.get_text_config(), "vocab_size", default=64) or 64)
    text = torch.randint(min(3, vocab - 1), vocab, (1, SEQ), generator=gen)
    text[text == image_token] = min(3, vocab - 1)
    ids = torch.cat([text[:, :4], torch.full((1, side * side // merge ** 2), image_token), text[:, 4:]], dim=1)
    return {"input_ids": ids, "pixel_values": torch.randn(side * side, channels * frames * patch * patch, generator=gen),
            "image_grid_thw": torch.tensor([[1, side, side]]), "mm_token_type_ids": (ids == image_token).long()}


def input_candidates(model: nn.Module) -> list[dict[str, Any]]:
    """Input sets to try, simplest first: the main input (+ decoder ids), then every generic
    input the forward takes (text + image models need both); a Qwen-VL-style model's prompt with
    an image comes first (its vision tower's attention runs only then)."""
    cfg = model.config
    params = inspect.signature(model.forward).parameters
    gen = torch.Generator().manual_seed(0)
    image = _grid_image_inputs(cfg, gen) if "image_grid_thw" in params and "mm_token_type_ids" in params else None
    main = getattr(model, "main_input_name", "input_ids")
    names = [main] if main in params else []
    if "input_ids" in params and not names:
        names = ["input_ids"]
    if "decoder_input_ids" in params and getattr(cfg, "is_encoder_decoder", False):
        names.append("decoder_input_ids")
    every = names + [n for n in ("input_ids", "pixel_values") if n in params and n not in names]
    out = []
    for choice in (names, every, [n + "_t" if n == "input_features" else n for n in names]):
        made = {n.removesuffix("_t"): _input(n, cfg, gen) for n in choice}
        if made and all(v is not None for v in made.values()) and all(
                set(made) != set(o) or any(made[k].shape != o[k].shape for k in made) for o in out):
            out.append(made)
    if image is not None:
        out.insert(0, image)
    if "use_cache" in params:
        for o in out:
            o["use_cache"] = False
    if not out:
        raise ValueError(f"no generic input for main input {main!r}")
    return out


# --------------------------------------------------------------------------------------------
# Ground truth: attention as the aten ops show it

_SDPA_OPS = {"_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
             "_native_multi_head_attention", "_transformer_encoder_layer_fwd", "_fused_sdp_choice"}
_MATMULS = {"mm": (0, 1), "bmm": (0, 1), "baddbmm": (1, 2), "addmm": (1, 2), "addbmm": (1, 2), "matmul": (0, 1)}
_SOFTMAX = {"_softmax", "softmax", "_safe_softmax"}
_VIEWS = {"view", "_unsafe_view", "t", "transpose", "permute", "expand", "slice", "select", "unsqueeze", "squeeze",
          "reshape", "alias", "detach", "_to_copy", "clone", "contiguous", "as_strided"}


class AttentionTruth(TorchDispatchMode):
    """Counts attention at the aten level (see the module docstring), per innermost module."""

    def __init__(self, stack: list[tuple[str, int]], weights: list[torch.Tensor]) -> None:
        super().__init__()
        self.stack = stack
        self.weight = WeakIdKeyDictionary()
        for w in weights:
            self.weight[w] = True
        self.tags = WeakIdKeyDictionary()  # tensor -> frozenset: "S" (scores lineage) and softmax ids
        self.softmax_owner: dict[int, tuple[str, int]] = {}
        self.found: list[tuple[str, int, str]] = []  # (owner, call, kind), in order
        self.done: set[int] = set()
        self.next_id = 0

    def _owner(self) -> tuple[str, int]:
        return self.stack[-1] if self.stack else ("", 1)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        try:
            self._see(func.overloadpacket.__name__, args, kwargs, out)
        except Exception:  # noqa: BLE001 (counting must never change what runs)
            pass
        return out

    def _see(self, name: str, args: tuple, kwargs: dict, out: Any) -> None:
        ins = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        outs = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
        if name in _SDPA_OPS:
            if name != "_fused_sdp_choice":
                self.found.append((*self._owner(), "fused"))
            return
        if name in _MATMULS:
            i, j = _MATMULS[name]
            a, b = args[i], args[j]
            if a in self.weight or b in self.weight:
                return
            probs = (self.tags.get(a, frozenset()) | self.tags.get(b, frozenset())) - {"S"}
            if probs:
                for p in sorted(probs):
                    if p not in self.done:
                        self.done.add(p)
                        self.found.append((*self._owner(), "softmax"))
                return
            for o in outs:
                self.tags[o] = frozenset({"S"})
            return
        if name in _SOFTMAX:
            if "S" in self.tags.get(args[0], frozenset()):
                self.next_id += 1
                for o in outs:
                    self.tags[o] = frozenset({self.next_id})
            return
        if name in _VIEWS and ins and ins[0] in self.weight:
            for o in outs:
                self.weight[o] = True
            return
        tags = frozenset().union(*(self.tags.get(t, frozenset()) for t in ins)) if ins else frozenset()
        if tags:
            for o in outs:
                self.tags[o] = tags | self.tags.get(o, frozenset())


def counted_run(model: nn.Module, inputs: dict, mode_class: type = None) -> tuple[Any, list[tuple[str, int, str]]]:
    """`model(**inputs)` under `mode_class` (default `AttentionTruth`): the output and the attention
    found, as (innermost module name, its call number, kind) in order."""
    names = {id(m): n for n, m in model.named_modules()}
    stack: list[tuple[str, int]] = []
    calls: Counter = Counter()
    handles = []

    def pre(m, *_):
        calls[id(m)] += 1
        stack.append((names.get(id(m), "?"), calls[id(m)]))

    def post(m, *_):
        stack.pop()

    for m in model.modules():
        handles.append(m.register_forward_pre_hook(pre))
        handles.append(m.register_forward_hook(post, always_call=True))
    weights = list(model.parameters()) + list(model.buffers())
    mode = (mode_class or AttentionTruth)(stack, weights)
    try:
        with torch.no_grad(), mode:
            out = model(**inputs)
    finally:
        for h in handles:
            h.remove()
    return out, mode.found


def truth_sites(model: nn.Module, inputs: dict) -> Counter:
    """Attention sites per module name: (module, ordinal in one call), calls merged."""
    _, found = counted_run(model, inputs)
    per_call: Counter = Counter((owner, call) for owner, call, _ in found)
    out: Counter = Counter()
    for (owner, _), n in per_call.items():
        out[owner] = max(out[owner], n)
    return out


# --------------------------------------------------------------------------------------------
# The sweep


@dataclass
class Row:
    model_type: str
    model_class: str
    status: str  # ok | build | inputs | forward | discovery | timeout
    truth: int = 0
    listed: int = 0
    extra: int = 0
    unread: int = 0  # listed sites whose form the rewrite does not read (dense)
    open_to_moba: int = 0  # listed sites with no reason to stay dense
    missed: list[str] = field(default_factory=list)
    extras: list[str] = field(default_factory=list)
    error: str = ""
    seconds: float = 0.0
    params: int = 0


class _Timeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: int):
    def handler(signum, frame):
        signal.alarm(2)  # again, should code under test swallow this one (`except Exception: return None`)
        raise _Timeout(f"over {seconds}s")

    old = signal.signal(signal.SIGALRM, handler)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return text[:240]


def build(model_type: str, class_name: str, row: Row | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """The tiny model of `model_type` (eval mode, seed 0) and the first generic inputs its forward
    runs on; `row` (if given) gets the parameter count and the stage reached. Raises on failure."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    row = row or Row(model_type, class_name, "build")
    cls = getattr(transformers, class_name)
    base = tiny_config(CONFIG_MAPPING[model_type])
    patches = config_patches(base)
    for attempt, patch in enumerate(patches):
        cfg = _patched(base, patch)
        try:
            return _build_with(cls, cfg, row)
        except ValueError as exc:
            if "after shrinking" in str(exc) or attempt == len(patches) - 1:
                raise
        except Exception:  # noqa: BLE001 (a shrunk size the model cannot run: try the next patch)
            if attempt == len(patches) - 1:
                raise
    raise AssertionError("unreachable")


def config_patches(cfg: Any) -> list[dict[str, Any]]:
    """Config changes tried in turn when the shrunk model does not run: none first; then as many
    key/value heads as query heads (MLA stacks that expand the latent to every head: Kimi Linear,
    Bailing hybrid), one expert group (grouped routers need experts per group) and rotary
    dimensions that fit a shrunk head (GPT-J, CodeGen)."""
    heads = getattr(cfg, "num_attention_heads", None)
    patches: list[dict[str, Any]] = [{}]
    if isinstance(heads, int) and getattr(cfg, "num_key_value_heads", heads) != heads:
        patches.append({"num_key_value_heads": heads})
    if getattr(cfg, "num_expert_group", None) not in (None, 1):
        patches.append({**patches[-1], "num_expert_group": 1, "topk_group": 1})
    if hasattr(cfg, "num_experts_per_tok") and cfg.num_experts_per_tok is None and \
            isinstance(getattr(cfg, "n_routed_experts", None), int):
        patches.append({**patches[-1], "num_experts_per_tok": 2})  # DeepSeek-V2: routing top-k left unset
    hidden, rotary = getattr(cfg, "n_embd", getattr(cfg, "hidden_size", None)), getattr(cfg, "rotary_dim", None)
    if isinstance(heads, int) and isinstance(hidden, int) and isinstance(rotary, int) and rotary > hidden // heads:
        patches.append({**patches[-1], "rotary_dim": hidden // heads})  # GPT-J, CodeGen: rotary dims of a head
    return patches


def patch_note(patch: dict[str, Any]) -> str:
    """How a row's model was built when a patch was needed (said in the sweep's table)."""
    words = {"num_key_value_heads": "num_key_value_heads = num_attention_heads", "num_expert_group": "one expert group",
             "rotary_dim": "rotary_dim = head_dim", "num_experts_per_tok": "two experts per token"}
    return ", ".join(words[k] for k in patch if k in words)


def _patched(cfg: Any, patch: dict[str, Any]) -> Any:
    if not patch:
        return cfg
    return type(cfg)(**{**cfg.to_diff_dict(), **patch})


def _build_with(cls: type, cfg: Any, row: Row) -> tuple[nn.Module, dict[str, Any]]:
    row.status = "build"
    with torch.device("meta"):
        row.params = sum(p.numel() for p in cls(cfg).parameters())
    if row.params > MAX_PARAMS:
        raise ValueError(f"{row.params / 1e6:.0f}M parameters after shrinking (limit {MAX_PARAMS / 1e6:.0f}M)")
    torch.manual_seed(0)
    model = cls(cfg).eval()
    row.status = "inputs"
    candidates = input_candidates(model)
    row.status = "forward"
    for i, inputs in enumerate(candidates):
        try:
            with torch.no_grad():  # first call: lazy set-up (BigBird swaps its attention module)
                model(**inputs)
            return model, inputs
        except Exception:
            if i == len(candidates) - 1:
                raise
    raise AssertionError("unreachable")


def sweep_one(model_type: str, class_name: str, seconds: int) -> Row:
    row = Row(model_type, class_name, "build")
    start = time.time()
    try:
        with time_limit(seconds):
            try:
                model, inputs = build(model_type, class_name, row)
            except ValueError as exc:
                if "after shrinking" not in str(exc):
                    raise
                row.error = str(exc)
                return row
            truth = truth_sites(model, inputs)
            row.status = "discovery"
            import moba_rewrite as mr

            listed: Counter = Counter()
            for s in mr.find_sites(model, inputs):  # a row may stand for several calls (DiffLlama)
                listed[s.name] += int(s.extra.get("calls", 1))
                problems = s.extra.get("problems", [])
                row.unread += any("does not read" in p for p in problems)
                row.open_to_moba += not problems
            row.status = "ok"
    except _Timeout as exc:
        row.status, row.error = "timeout", str(exc)
        return row
    except Exception as exc:  # noqa: BLE001 (every failure is a row of the report)
        row.error = _short(exc)
        if os.environ.get("ZOO_SWEEP_TRACE"):
            traceback.print_exc()
        return row
    finally:
        row.seconds = round(time.time() - start, 2)
    row.truth = sum(truth.values())
    matched = {n: min(c, listed.get(n, 0)) for n, c in truth.items()}
    row.listed = sum(matched.values())
    row.missed = [f"{n} x{c - matched[n]}" for n, c in truth.items() if c > matched[n]]
    row.extras = [f"{n} x{c - truth.get(n, 0)}" for n, c in listed.items() if c > truth.get(n, 0)]
    row.extra = sum(c - truth.get(n, 0) for n, c in listed.items() if c > truth.get(n, 0))
    return row


def registry() -> list[tuple[str, str]]:
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    out = []
    for model_type, names in MODEL_MAPPING_NAMES.items():
        name = names[0] if isinstance(names, (list, tuple)) else names
        out.append((model_type, name))
    return out


def summary(rows: list[Row]) -> str:
    ok = [r for r in rows if r.status == "ok"]
    truth = sum(r.truth for r in ok)
    listed = sum(r.listed for r in ok)
    with_attention = [r for r in ok if r.truth]
    complete = [r for r in with_attention if r.listed == r.truth]
    failed = Counter(r.status for r in rows if r.status != "ok")
    lines = [
        f"model types in the registry: {len(rows)}; built and run: {len(ok)} "
        f"({', '.join(f'{k}: {v}' for k, v in sorted(failed.items())) or 'no failures'})",
        f"attention sites (truth): {truth}; listed by discovery: {listed} "
        f"({100 * listed / max(truth, 1):.1f}%); extra rows: {sum(r.extra for r in ok)}; listed in a form the "
        f"rewrite does not read (dense): {sum(r.unread for r in ok)}; with no reason to stay dense: "
        f"{sum(r.open_to_moba for r in ok)}",
        f"models with attention: {len(with_attention)}; every site listed: {len(complete)} "
        f"({100 * len(complete) / max(len(with_attention), 1):.1f}%)",
    ]
    return "\n".join(lines)


def markdown(rows: list[Row]) -> str:
    out = ["| model type | class | status | truth | listed | extra | missed / error |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.status == "ok" and not r.missed and not r.extras:
            continue
        detail = "; ".join(r.missed + [f"extra {e}" for e in r.extras]) if r.status == "ok" else r.error
        out.append(f"| {r.model_type} | {r.model_class} | {r.status} | {r.truth} | {r.listed} | {r.extra} | "
                   f"{detail.replace('|', '/')[:300]} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="*", help="model types to run (default: all)")
    ap.add_argument("--seconds", type=int, default=120, help="time limit per model")
    ap.add_argument("--json", help="write every row as JSON here")
    ap.add_argument("--markdown", help="write the table of misses and failures here")
    ap.add_argument("--code", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                    help="checkout whose moba_rewrite is measured (default: this one)")
    args = ap.parse_args(argv)
    sys.path.insert(0, os.path.abspath(args.code))
    warnings.filterwarnings("ignore")
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    rows = []
    for model_type, class_name in registry():
        if args.only and model_type not in args.only:
            continue
        row = sweep_one(model_type, class_name, args.seconds)
        rows.append(row)
        mark = "ok " if row.status == "ok" and not row.missed else row.status
        print(f"{mark:9} {model_type:32} truth {row.truth:3} listed {row.listed:3} extra {row.extra:2} "
              f"{row.seconds:6.1f}s  {'; '.join(row.missed)[:120] or row.error[:120]}", flush=True)
        gc.collect()
    print()
    print(summary(rows))
    if args.json:
        with open(args.json, "w") as f:  # one row per line: small diffs between runs
            f.write('{"summary": ' + json.dumps(summary(rows)) + ',\n "rows": [\n')
            f.write(",\n".join("  " + json.dumps(asdict(r)) for r in rows) + "\n]}\n")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(summary(rows) + "\n\n" + markdown(rows) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


def error_row(stage: str, exc: BaseException) -> tuple[str, str]:
    """A sweep row for a rewrite that failed where the original ran (`ZOO_SWEEP_TRACE=1`: print the
    traceback too)."""
    if os.environ.get("ZOO_SWEEP_TRACE"):
        traceback.print_exc()
    return "ERROR", f"{stage}: {_short(exc)}"


def verdict(notes: list[str]) -> tuple[str, str]:
    """A sweep row from its notes: `DIFFERS` when any note is not an `ok: ` one, else `equal`."""
    return ("DIFFERS" if any(not n.startswith("ok: ") for n in notes) else "equal"), "; ".join(notes)


def sweep_table(title: str, only: list[str] | None, row, markdown: str | None) -> int:
    """`row(model_type, class_name) -> (status, detail)` for every registry type (those in `only`,
    when given) this transformers has, printed as a markdown table row by row under `title` (torch
    and transformers versions prepended), warnings off, at most 2 threads; the tally and exit
    status of `finish_table`."""
    import transformers

    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    types = [(t, c) for t, c in registry() if not only or t in only]
    counts: Counter = Counter()
    lines = [f"torch {torch.__version__}, transformers {transformers.__version__}; {len(types)} model types; {title}",
             "", "| model type | class | result | detail |", "|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    start = time.time()
    for model_type, class_name in types:
        if not hasattr(transformers, class_name):
            continue
        status, detail = row(model_type, class_name)
        counts[status] += 1
        lines.append(f"| {model_type} | {class_name} | {status} | {detail.replace('|', '/')} |")
        print(lines[-1], flush=True)
        gc.collect()
    return finish_table(lines, counts, start, markdown)


def finish_table(lines: list[str], counts: Counter, start: float, markdown: str | None) -> int:
    """Print a sweep's tally (and write its table to `markdown`); exit status 1 when a row differs or errs."""
    tail = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())) + f" ({time.time() - start:.0f} s)"
    print("\n" + tail)
    if markdown:
        with open(markdown, "w") as f:
            f.write("\n".join(lines) + "\n\n" + tail + "\n")
    return 1 if counts["DIFFERS"] or counts["ERROR"] else 0
