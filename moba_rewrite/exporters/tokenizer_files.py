"""A tokenizer carried inside a generation artifact, so `moba-rewrite generate --prompt "text"` needs
nothing beside the artifact (docs/EXPORT.md, "Generation programs").

The tokenizer is written with `save_pretrained` and its files travel as bytes: base64 in one JSON
member of a `.pt2` archive (the archive's extra files are text), or a `tokenizer/` folder beside
the ONNX programs. Loading goes back through `AutoTokenizer.from_pretrained(local_files_only=True)`.
"""

from __future__ import annotations

import base64
import json
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any

ARCHIVE_MEMBER = "moba_tokenizer.json"  # extra file of a .pt2 archive
FOLDER = "tokenizer"  # beside the programs of an ONNX folder
_MAX_BYTES = 256 << 20  # a tokenizer is megabytes; anything larger is not one


class TokenizerFilesError(ValueError):
    """A tokenizer that cannot be carried, or carried files that do not load."""


def files_of(tokenizer: Any) -> dict[str, bytes]:
    """The files `tokenizer.save_pretrained` writes, by name."""
    with tempfile.TemporaryDirectory(prefix="moba-tokenizer-") as tmp:
        tokenizer.save_pretrained(tmp)
        files = {p.name: p.read_bytes() for p in sorted(Path(tmp).iterdir()) if p.is_file()}
    total = sum(len(b) for b in files.values())
    if total > _MAX_BYTES:
        raise TokenizerFilesError(f"expected tokenizer files of at most {_MAX_BYTES >> 20} MiB, got {total >> 20} MiB")
    return files


def to_archive_text(files: dict[str, bytes]) -> str:
    return json.dumps({"files": {name: base64.b64encode(data).decode("ascii") for name, data in files.items()}})


def from_archive_text(text: str) -> dict[str, bytes]:
    return {name: base64.b64decode(data) for name, data in json.loads(text)["files"].items()}


def write_folder(files: dict[str, bytes], directory: str | os.PathLike) -> None:
    folder = Path(directory) / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)


def read_artifact(path: str | os.PathLike) -> dict[str, bytes]:
    """The tokenizer files a generation artifact carries (a `.pt2` archive or an ONNX folder); {} if none."""
    path = Path(path)
    if path.is_dir():
        folder = path / FOLDER
        return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()} if folder.is_dir() else {}
    with zipfile.ZipFile(path) as zf:
        member = next((n for n in zf.namelist() if n.endswith(f"extra/{ARCHIVE_MEMBER}")), None)
        return from_archive_text(zf.read(member).decode("utf-8")) if member else {}


def load(files: dict[str, bytes]) -> Any:
    """A transformers tokenizer from carried files."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="moba-tokenizer-") as tmp:
        for name, data in files.items():
            if Path(name).name != name or name.startswith("."):
                raise TokenizerFilesError(f"expected plain tokenizer file names, got {name!r}")
            (Path(tmp) / name).write_bytes(data)
        try:
            return AutoTokenizer.from_pretrained(tmp, local_files_only=True)
        except Exception as exc:  # noqa: BLE001  (any loader failure: files transformers cannot read)
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise TokenizerFilesError(f"expected tokenizer files transformers can load ({first})") from exc
