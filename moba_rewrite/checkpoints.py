"""Reading and writing model files safely.

Inputs (`read_checkpoint`, detected by `detect_kind`):

- `hf`: a Hugging Face model directory (`config.json` + `*.safetensors` or `pytorch_model*.bin`),
  built by transformers from local files only; `.bin` weights are read with
  `torch.load(weights_only=True)`; code shipped with the checkpoint runs only with
  `trust_remote_code=True`.
- `moba-hf`: such a directory written by `moba-rewrite rewrite --format hf` (it also holds
  `moba_policy.json`); `load` rewrites the model with that policy.
- `safetensors`: a `.safetensors` file plus a `config.json` (given, or beside the file).
- `pt2`: a `torch.export` program (`torch.export.save`).
- `aoti`: an AOTInductor package (`torch._inductor.aoti_compile_and_package`).
- `pickle`: a pickled full `nn.Module` (`torch.save(model)`). Unpickling runs arbitrary code
  from the file, so it is refused unless `trust_pickle=True`. A `.pt`/`.pth`/`.bin` file that
  holds only tensors (a state dict) is read safely and treated like a safetensors file.

Outputs are written by `atomic_output`: into a temporary path beside the target, moved into
place only when complete, never over an existing path without `force`, never into the input.

Every failure is a `CheckpointError` whose message is `<file>: <what was expected>` and whose
`exit_code` is the CLI's exit status (see docs/CLI.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from moba_rewrite.checkpoint_weights import (compare_state, estimated_parameters, loading_problem, size_problem,
                                             values_in)
from moba_rewrite.exit_codes import (
    EXIT_ARCHITECTURE,
    EXIT_CHECKPOINT,
    EXIT_EXPORT,
    EXIT_OUTPUT_EXISTS,
    EXIT_OUTPUT_UNWRITABLE,
    EXIT_PICKLE,
)
from moba_rewrite.third_party import held_back

POLICY_FILE = "moba_policy.json"
META_FILE = "moba_rewrite.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_HF_WEIGHT_NAMES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                    "pytorch_model.bin.index.json")


# --------------------------------------------------------------------------- errors

class CheckpointError(Exception):
    """A checkpoint or output path problem; `str()` is `<file>: <what was expected>`."""

    exit_code = EXIT_CHECKPOINT

    def __init__(self, path: str | os.PathLike, message: str) -> None:
        self.path = str(path)
        self.message = message
        super().__init__(f"{self.path}: {message}")


class CheckpointNotFound(CheckpointError):
    """The input path does not exist."""

    exit_code = EXIT_CHECKPOINT


class CorruptCheckpoint(CheckpointError):
    """The input exists but cannot be read as the kind of checkpoint it claims to be."""

    exit_code = EXIT_CHECKPOINT


class UnknownArchitecture(CheckpointError):
    """The config names a model type that transformers cannot build locally."""

    exit_code = EXIT_ARCHITECTURE


class PickleRefused(CheckpointError):
    """A pickled module was given without `trust_pickle=True`."""

    exit_code = EXIT_PICKLE


class OutputExists(CheckpointError):
    """The output path exists and `force` was not given."""

    exit_code = EXIT_OUTPUT_EXISTS


class SaveFailed(CheckpointError):
    """The model could not be saved for a reason other than the output's file system."""

    exit_code = EXIT_EXPORT


class OutputNotWritable(CheckpointError):
    """The output path cannot be created (permissions, read-only file system, or it is the input)."""

    exit_code = EXIT_OUTPUT_UNWRITABLE


# --------------------------------------------------------------------------- detection

def _zip_names(path: Path) -> list[str]:
    try:
        with zipfile.ZipFile(path) as zf:
            return zf.namelist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise CorruptCheckpoint(path, f"expected a .pt2 zip archive ({exc})") from exc


def detect_kind(path: str | os.PathLike) -> str:
    """One of `hf`, `moba-hf`, `safetensors`, `pt2`, `aoti`, `generation`, `torch-file` for an existing path."""
    p = Path(path)
    if not p.exists():
        raise CheckpointNotFound(p, "no such file or directory; expected a Hugging Face model directory, "
                                    "a .safetensors file, a .pt2 file or a .pt file")
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise CorruptCheckpoint(p, "expected a Hugging Face model directory with a config.json")
        return "moba-hf" if (p / POLICY_FILE).is_file() else "hf"
    suffix = p.suffix.lower()
    if suffix == ".safetensors":
        return "safetensors"
    if suffix == ".pt2" or zipfile.is_zipfile(p) and suffix not in (".pt", ".pth", ".bin"):
        names = _zip_names(p)
        if any(n.endswith("extra/moba_generation.json") for n in names):
            return "generation"  # prefill + decode programs (rewrite --generate)
        if any("/data/aotinductor/" in n for n in names):
            return "aoti"
        if any(n.endswith("models/model.json") or "/serialized_exported_program" in n for n in names):
            return "pt2"
        raise CorruptCheckpoint(p, "expected a torch.export program or an AOTInductor package "
                                   "(.pt2 archive without either)")
    if suffix in (".pt", ".pth", ".bin"):
        return "torch-file"
    if suffix == ".json" and p.name == "config.json":
        raise CorruptCheckpoint(p, "expected the model directory (the folder holding config.json), "
                                   "not config.json itself")
    raise CorruptCheckpoint(p, "expected a Hugging Face model directory, a .safetensors file (with "
                               "--config), a .pt2 file or a .pt file")


# --------------------------------------------------------------------------- HF configs

def read_config_json(path: Path) -> dict:
    """Parse a config.json, with an error naming the file on bad JSON."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise CheckpointNotFound(path, "expected a Hugging Face config.json") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorruptCheckpoint(path, f"expected valid JSON (line {getattr(exc, 'lineno', '?')}: "
                                      f"{getattr(exc, 'msg', exc)})") from exc
    if not isinstance(data, dict):
        raise CorruptCheckpoint(path, "expected a JSON object with a model_type")
    return data


def build_config(config_path: Path, *, trust_remote_code: bool = False):
    """A transformers `PretrainedConfig` from a config.json, or `UnknownArchitecture`."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    data = read_config_json(config_path)
    model_type = data.get("model_type")
    remote = "auto_map" in data
    if model_type not in CONFIG_MAPPING:
        if remote and not trust_remote_code:
            raise UnknownArchitecture(
                config_path, f"model_type {model_type!r} comes with its own code (auto_map); expected an "
                             "architecture transformers knows, or pass --trust-remote-code if you trust "
                             "the checkpoint's code")
        if not remote:
            raise UnknownArchitecture(
                config_path, f"expected a model_type transformers can build locally, got {model_type!r}")
    try:
        return AutoConfig.from_pretrained(str(config_path.parent), trust_remote_code=trust_remote_code,
                                          local_files_only=True)
    except Exception as exc:  # transformers raises many kinds here
        raise CorruptCheckpoint(config_path, f"expected a config transformers can read ({_first_line(exc)})") from exc


def _model_class(config, trust_remote_code: bool):
    """The transformers class named by config.architectures, else the causal-LM / base auto class."""
    import transformers

    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    from transformers import AutoModel, AutoModelForCausalLM

    for auto in (AutoModelForCausalLM, AutoModel):
        try:
            mapping = auto._model_mapping
            if type(config) in mapping:
                return auto
        except Exception:  # pragma: no cover - mapping internals vary
            pass
    if trust_remote_code and getattr(config, "auto_map", None):
        return AutoModelForCausalLM
    raise UnknownArchitecture(getattr(config, "_name_or_path", "config.json") or "config.json",
                              f"expected an architecture transformers can build, got {config.model_type!r}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# --------------------------------------------------------------------------- weights

def _weight_values(path: Path) -> tuple[int, int]:
    """(values, bytes) a weights file holds, from its header; a corrupt file is a CorruptCheckpoint."""
    try:
        with held_back():
            return values_in(path)
    except Exception as exc:
        what = "a readable safetensors file" if path.suffix == ".safetensors" else \
            "a tensors-only torch file (weights_only=True)"
        raise CorruptCheckpoint(path, f"expected {what} ({_first_line(exc)})") from exc


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors from a safetensors file or a tensors-only torch file (`weights_only=True`)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        _weight_values(path)
        try:
            return load_file(str(path))
        except Exception as exc:
            raise CorruptCheckpoint(path, f"expected a readable safetensors file ({_first_line(exc)})") from exc
    try:
        with held_back():
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise CheckpointNotFound(path, "no such file") from exc
    except Exception as exc:
        raise CorruptCheckpoint(path, f"expected a state dict readable with weights_only=True ({_first_line(exc)})") from exc
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CorruptCheckpoint(path, "expected a dict of tensors (a state dict)")
    return obj


def _hf_weight_files(directory: Path) -> list[Path]:
    """The weight files of a model directory: regular files (or links to them) only."""
    files = (sorted(f for f in directory.glob("*.safetensors") if f.is_file())
             or sorted(f for f in directory.glob("pytorch_model*.bin") if f.is_file()))
    if not files:
        raise CorruptCheckpoint(directory, "expected weights beside config.json (model.safetensors or "
                                           "pytorch_model.bin)")
    return files


# --------------------------------------------------------------------------- loading

@dataclass
class Checkpoint:
    """What `read_checkpoint` found: the model (or program) and where it came from."""

    kind: str
    path: Path
    model: Any
    config: Any = None  # transformers config for HF models
    policy: dict | None = None  # the stored policy of a `moba-hf` directory
    meta: dict = field(default_factory=dict)
    random_init: str | None = None  # weights initialised randomly (allow_random_init): which, in words

    @property
    def is_hf(self) -> bool:
        return self.config is not None and isinstance(self.model, nn.Module)


def _torch_dtype(dtype: str | torch.dtype | None):
    if dtype is None or dtype == "auto":
        return dtype
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        value = getattr(torch, dtype)
    except AttributeError:
        value = None
    if not isinstance(value, torch.dtype):
        raise ValueError(f"dtype: expected auto, float32, float16 or bfloat16, got {dtype!r}")
    return value


def _model_builder(cls, trust_remote_code: bool):
    """`build(config) -> model` with fresh (random) weights, for the class `_model_class` chose."""
    if cls.__name__.startswith("Auto"):
        return lambda config: cls.from_config(config, trust_remote_code=trust_remote_code)
    return cls


def _check_size(config_path: Path, config, build, values: int, nbytes: int, *, allow_random_init: bool,
                dtype) -> None:
    """Fail at once when the config asks for far more than the weights hold or the machine has."""
    with held_back():
        estimate = estimated_parameters(build, config)
    problem = size_problem(estimate, values, nbytes, config, allow_random_init=allow_random_init, dtype=dtype)
    if problem:
        text, random_init_helps = problem
        raise CorruptCheckpoint(config_path, text + (_RANDOM_INIT_HINT if random_init_helps else ""))


_RANDOM_INIT_HINT = "; --allow-random-init (allow_random_init=True) would initialise such weights randomly"


def _load_hf_dir(directory: Path, *, trust_remote_code: bool, dtype, attn_implementation: str | None,
                 allow_random_init: bool = False):
    config = build_config(directory / "config.json", trust_remote_code=trust_remote_code)
    sizes = [_weight_values(f) for f in _hf_weight_files(directory)]
    cls = _model_class(config, trust_remote_code)
    _check_size(directory / "config.json", config, _model_builder(cls, trust_remote_code),
                sum(v for v, _ in sizes), sum(b for _, b in sizes), allow_random_init=allow_random_init,
                dtype=dtype)
    kwargs: dict[str, Any] = {"local_files_only": True, "trust_remote_code": trust_remote_code,
                              "output_loading_info": True, "ignore_mismatched_sizes": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    with held_back():  # transformers' LOAD REPORT: replayed if the load is accepted, else a note for --debug
        try:
            model, info = cls.from_pretrained(str(directory), config=config, **kwargs)
        except Exception as exc:
            raise CorruptCheckpoint(directory, f"expected weights matching config.json ({_first_line(exc)})") from exc
        problem = loading_problem(info.get("missing_keys", ()), info.get("unexpected_keys", ()),
                                  info.get("mismatched_keys", ()))
        if problem and not allow_random_init:
            raise CorruptCheckpoint(directory, f"expected weights matching config.json: {problem}{_RANDOM_INIT_HINT}")
    return model.eval(), config, problem


def _load_from_state_dict(weights: Path, config_path: Path | None, *, trust_remote_code: bool, dtype,
                          attn_implementation: str | None, allow_random_init: bool = False):
    if config_path is None:
        config_path = weights.parent / "config.json"
        if not config_path.is_file():
            raise CorruptCheckpoint(weights, "expected a config.json beside the weights file, or pass --config")
    config = build_config(config_path, trust_remote_code=trust_remote_code)
    if attn_implementation:
        config._attn_implementation = attn_implementation
    state = read_state_dict(weights)
    cls = _model_class(config, trust_remote_code)
    build = _model_builder(cls, trust_remote_code)
    _check_size(config_path, config, build, sum(t.numel() for t in state.values()),
                sum(t.numel() * t.element_size() for t in state.values()), allow_random_init=allow_random_init,
                dtype=dtype)
    try:
        with held_back():
            model = build(config)
            if isinstance(dtype, torch.dtype):
                model = model.to(dtype)
            missing, unexpected, mismatched = compare_state(model, state)
            problem = loading_problem(missing, unexpected, mismatched)
            if problem and not allow_random_init:
                raise CorruptCheckpoint(weights, f"expected weights matching {config_path}: {problem}"
                                                 f"{_RANDOM_INIT_HINT}")
            skip = {k for k, _, _ in mismatched} | set(unexpected)
            model.load_state_dict({k: v for k, v in state.items() if k not in skip}, strict=False)
            if hasattr(model, "tie_weights"):
                model.tie_weights()
    except CheckpointError:
        raise
    except Exception as exc:
        raise CorruptCheckpoint(weights, f"expected weights matching {config_path} ({_first_line(exc)})") from exc
    return model.eval(), config, problem


def _load_torch_file(path: Path, config_path: Path | None, *, trust_pickle: bool, trust_remote_code: bool,
                     dtype, attn_implementation: str | None, allow_random_init: bool = False):
    try:
        with held_back():  # torch warns about pickle protocols before refusing
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as safe_exc:  # objects the safe unpickler refuses to build
        if not trust_pickle:
            raise PickleRefused(
                path, "expected a tensors-only file; this one is a pickled Python object, and unpickling "
                      "runs arbitrary code from the file. Pass --trust-pickle (trust_pickle=True) only if "
                      "you trust its source, or save the model as a Hugging Face directory, safetensors "
                      "or .pt2") from safe_exc
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=False)
        except Exception as exc:
            raise CorruptCheckpoint(path, f"expected a torch.save file ({_first_line(exc)})") from exc
        if not isinstance(obj, nn.Module):
            raise CorruptCheckpoint(path, f"expected a pickled nn.Module, got {type(obj).__name__}")
        return obj.eval(), getattr(obj, "config", None), None, True
    except Exception as exc:  # not a refusal: a broken zip, a record shorter than its tensor, ...
        raise CorruptCheckpoint(path, f"expected a torch.save file ({_first_line(exc)})") from exc
    del obj
    model, config, problem = _load_from_state_dict(path, config_path, trust_remote_code=trust_remote_code,
                                                   dtype=dtype, attn_implementation=attn_implementation,
                                                   allow_random_init=allow_random_init)
    return model, config, problem, False


def read_checkpoint(path: str | os.PathLike, *, config: str | os.PathLike | None = None,
                    trust_pickle: bool = False, trust_remote_code: bool = False,
                    dtype: str | torch.dtype | None = None, attn_implementation: str | None = None,
                    allow_random_init: bool = False) -> Checkpoint:
    """Read any supported input without rewriting it (a `moba-hf` directory comes back dense,
    with its stored policy in `.policy`).

    Weights are loaded strictly: a weight the config needs but the checkpoint lacks, one the
    checkpoint holds but the config does not know, or one of another shape is a
    `CorruptCheckpoint` naming a few of them. `allow_random_init=True` initialises those
    weights randomly instead (and ignores unexpected ones); `.random_init` then says which.
    """
    p = Path(path)
    kind = detect_kind(p)
    config_path = Path(config) if config is not None else None
    if config_path is not None and not config_path.is_file():
        raise CheckpointNotFound(config_path, "expected a config.json file")
    tdtype = _torch_dtype(dtype)
    if kind in ("hf", "moba-hf"):
        model, cfg, problem = _load_hf_dir(p, trust_remote_code=trust_remote_code, dtype=tdtype,
                                           attn_implementation=attn_implementation,
                                           allow_random_init=allow_random_init)
        ck = Checkpoint(kind, p, model, cfg, random_init=problem)
        if kind == "moba-hf":
            ck.policy = _read_json(p / POLICY_FILE, "expected the policy written by moba-rewrite (JSON)")
            meta = p / META_FILE
            ck.meta = _read_json(meta, "expected moba-rewrite metadata (JSON)") if meta.is_file() else {}
        return ck
    if kind == "safetensors":
        model, cfg, problem = _load_from_state_dict(p, config_path, trust_remote_code=trust_remote_code,
                                                    dtype=tdtype, attn_implementation=attn_implementation,
                                                    allow_random_init=allow_random_init)
        return Checkpoint(kind, p, model, cfg, random_init=problem)
    if kind == "torch-file":
        model, cfg, problem, pickled = _load_torch_file(p, config_path, trust_pickle=trust_pickle,
                                                        trust_remote_code=trust_remote_code, dtype=tdtype,
                                                        attn_implementation=attn_implementation,
                                                        allow_random_init=allow_random_init)
        return Checkpoint("pickle" if pickled else "state-dict", p, model, cfg, random_init=problem)
    if kind == "pt2":
        import moba_rewrite.attention.op  # noqa: F401  (programs may hold moba nodes)

        try:
            with held_back():
                ep = torch.export.load(str(p))
        except Exception as exc:
            raise CorruptCheckpoint(p, f"expected a torch.export program ({_first_line(exc)})") from exc
        return Checkpoint(kind, p, ep)
    if kind == "generation":
        from moba_rewrite.exporters.generation import load_generation_programs

        try:
            with held_back():
                return Checkpoint(kind, p, load_generation_programs(p))
        except Exception as exc:
            raise CorruptCheckpoint(p, f"expected generation programs ({_first_line(exc)})") from exc
    if kind == "aoti":
        import moba_rewrite.attention.op  # noqa: F401  (the package calls moba::attention)

        try:
            with held_back():
                runner = torch._inductor.aoti_load_package(str(p))
        except Exception as exc:
            raise CorruptCheckpoint(p, f"expected an AOTInductor package for this machine ({_first_line(exc)})") from exc
        return Checkpoint(kind, p, runner)
    raise CorruptCheckpoint(p, f"unsupported input kind {kind}")  # pragma: no cover


def _read_json(path: Path, expected: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise CheckpointNotFound(path, expected) from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorruptCheckpoint(path, expected) from exc
    if not isinstance(data, dict):
        raise CorruptCheckpoint(path, expected)
    return data


def load(path: str | os.PathLike, *, trust_pickle: bool = False, trust_remote_code: bool = False,
         dtype: str | torch.dtype | None = None, allow_random_init: bool = False) -> Any:
    """Load a model written by `moba-rewrite rewrite` (or any supported input), ready to run.

    - a directory written with `--format hf` becomes the Hugging Face model with its attention
      rewritten by the stored policy (ready for `torch.compile` and `generate()`);
    - a `.pt2` program becomes a `torch.export.ExportedProgram`;
    - an AOTInductor package becomes its callable runner;
    - a generation artifact (`rewrite --generate`) becomes `exporters.generation.GenerationPrograms`;
    - a plain Hugging Face directory, safetensors file + config, or (with `trust_pickle=True`)
      pickled module is returned as it is, unrewritten.

    Weights must match the config (see `read_checkpoint`; `allow_random_init` relaxes that).
    """
    ck = read_checkpoint(path, trust_pickle=trust_pickle, trust_remote_code=trust_remote_code, dtype=dtype,
                         allow_random_init=allow_random_init)
    if ck.kind == "moba-hf":
        return apply_stored_policy(ck)
    return ck.model


def apply_stored_policy(ck: Checkpoint) -> nn.Module:
    """Rewrite a `moba-hf` checkpoint's model with the policy stored beside its weights."""
    from moba_rewrite import api
    from moba_rewrite.policy import load_policy

    try:
        policy = load_policy(ck.policy)
    except Exception as exc:
        raise CorruptCheckpoint(ck.path / POLICY_FILE, f"expected a valid policy ({_first_line(exc)})") from exc
    return api.rewrite(ck.model, policy)


# --------------------------------------------------------------------------- writing

def _is_within(child: Path, parent: Path) -> bool:
    try:
        child.resolve().relative_to(parent.resolve())
        return True
    except ValueError:
        return False


def check_output(target: str | os.PathLike, *, force: bool = False,
                 inputs: tuple[str | os.PathLike, ...] = ()) -> Path:
    """Fail early (before any slow work) if `target` cannot be written as asked."""
    t = Path(target)
    for src in inputs:
        s = Path(src)
        if s.exists() and (_is_within(t, s) or _is_within(s, t) or t.resolve() == s.resolve()):
            raise OutputNotWritable(t, f"expected an output path outside the input {s} (the input is never modified)")
    if t.exists() or t.is_symlink():
        if not force:
            raise OutputExists(t, "expected a path that does not exist yet (pass --force to replace it)")
    parent = t.parent if str(t.parent) else Path(".")
    existing = parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise OutputNotWritable(t, f"expected a writable location ({existing} is not writable)")
    return t


@contextlib.contextmanager
def atomic_output(target: str | os.PathLike, *, directory: bool, force: bool = False,
                  inputs: tuple[str | os.PathLike, ...] = ()) -> Iterator[Path]:
    """Yield a temporary path beside `target`; move it into place only if the block succeeds.

    `directory=True` yields an empty directory to fill; otherwise a file path to write. With
    `force`, an existing target is replaced only once the new one is complete.
    """
    t = check_output(target, force=force, inputs=inputs)
    parent = t.parent if str(t.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{t.name}.tmp-", dir=parent))
    except OSError as exc:
        raise OutputNotWritable(t, f"expected a writable location ({exc.strerror or exc})") from exc
    work = staging if directory else staging / t.name
    try:
        yield work
        if not work.exists():
            raise OutputNotWritable(t, "expected the writer to produce the output, but it wrote nothing")
        old = None
        if t.exists() or t.is_symlink():
            old = parent / f".{t.name}.old-{os.getpid()}"
            os.replace(t, old)
        try:
            os.replace(work, t)
        except OSError:
            if old is not None:
                os.replace(old, t)
            raise
        if old is not None:
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)
    except OSError as exc:
        raise OutputNotWritable(t, f"expected a writable location ({exc.strerror or exc})") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_hf_checkpoint(out_dir: Path, ck: Checkpoint, policy_dict: dict, meta: dict) -> None:
    """Fill `out_dir` with a `moba-hf` checkpoint: the input's files copied byte for byte (or
    the dense model saved with `save_pretrained`, always when weights were initialised
    randomly, so the artifact holds the model that was rewritten), plus the policy and
    metadata beside them. A failed read names the input file; a failed write raises OSError
    (the caller names the output).
    """
    if ck.kind in ("hf", "moba-hf") and ck.random_init is None:
        copy_checkpoint_files(ck.path, out_dir)
    elif ck.is_hf and hasattr(ck.model, "save_pretrained"):
        _save_pretrained(ck.model, out_dir)
    else:
        raise CheckpointError(ck.path, "expected a Hugging Face model for --format hf; use --format pt2, aoti "
                                       "or onnx for other models")
    (out_dir / POLICY_FILE).write_text(json.dumps(policy_dict, indent=2, sort_keys=True) + "\n")
    (out_dir / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def _save_pretrained(model: nn.Module, out_dir: Path) -> None:
    """`save_pretrained` with the model's original attention implementation (rewriting keeps the
    state_dict keys); a write failure deep in safetensors comes back as an OSError."""
    config = model.config
    impl = getattr(config, "_attn_implementation", None)
    if isinstance(impl, str) and impl.startswith("moba_"):
        config._attn_implementation = impl[len("moba_"):]
    try:
        with held_back():
            model.save_pretrained(str(out_dir))
    except OSError:
        raise
    except Exception as exc:
        if "error" in str(exc).lower() and ("io" in str(exc).lower() or "os " in str(exc).lower()):
            raise OSError(_first_line(exc)) from exc  # safetensors' IoError(Os { code: 28, ... })
        raise SaveFailed(out_dir, f"expected the model to save with save_pretrained ({_first_line(exc)})") from exc
    finally:
        config._attn_implementation = impl


_COPY_CHUNK = 8 << 20


def copy_checkpoint_files(src_dir: Path, out_dir: Path) -> None:
    """Copy the files a checkpoint directory consists of into `out_dir`, byte for byte.

    Regular files (a link to one is copied as the file it names: the Hugging Face cache
    links to blobs) in `src_dir` and its real subdirectories. Links to directories (a training
    script's `latest -> .` would recurse forever), hidden entries, special files and dangling
    links are not copied; `moba_policy.json` / `moba_rewrite.json` are written fresh.
    """
    for root, dirs, files in os.walk(src_dir, followlinks=False):
        here = Path(root)
        rel = here.relative_to(src_dir)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not (here / d).is_symlink())
        (out_dir / rel).mkdir(exist_ok=True)
        for name in sorted(files):
            if name.startswith(".") or (rel == Path(".") and name in (POLICY_FILE, META_FILE)):
                continue
            if (here / name).is_file():
                _copy_file(here / name, out_dir / rel / name)


def _copy_file(src: Path, dst: Path) -> None:
    """Copy one file; a read failure is the input's (CorruptCheckpoint), a write failure an OSError."""
    def unreadable(exc: OSError) -> CorruptCheckpoint:
        return CorruptCheckpoint(src, f"expected a readable file ({exc.strerror or exc})")

    try:
        fin = open(src, "rb")
    except OSError as exc:
        raise unreadable(exc) from exc
    with fin, open(dst, "xb") as fout:
        while True:
            try:
                chunk = fin.read(_COPY_CHUNK)
            except OSError as exc:
                raise unreadable(exc) from exc
            if not chunk:
                break
            fout.write(chunk)
    shutil.copystat(src, dst)
