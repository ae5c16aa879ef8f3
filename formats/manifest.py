"""manifest.json: what a converted folder holds, and how to check it."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .config import ModelConfig
from .errors import LlamafuseError
from .layout import check_tp

FORMAT_NAME = "llamafuse-shards"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
ROTARY = "rotate-half"  # the only on-disk rotary convention: pairs (i, i + head_dim/2)


@dataclass(frozen=True)
class RankFile:
    rank: int
    file: str    # name inside the folder, e.g. "rank-00-of-04.safetensors"
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    config: ModelConfig
    dtype: str                      # key of DTYPES
    tp: int
    ranks: tuple[RankFile, ...]
    tokenizer: str | None           # file name of the SentencePiece model, if copied
    source: dict[str, str] = field(default_factory=dict)  # {"layout": "meta"|"hf", "path": ...}

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def to_json(self) -> str:
        d = {
            "format": FORMAT_NAME, "version": FORMAT_VERSION, "config": self.config.to_dict(),
            "dtype": self.dtype, "rotary": ROTARY, "tp": self.tp,
            "ranks": [vars(r) for r in self.ranks], "tokenizer": self.tokenizer, "source": self.source,
        }
        return json.dumps(d, indent=2) + "\n"


def rank_file_name(rank: int, tp: int) -> str:
    return f"rank-{rank:02d}-of-{tp:02d}.safetensors"


def _get(d: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in d:
        raise LlamafuseError(f"{where}: missing field '{key}'")
    v = d[key]
    if not isinstance(v, kind) or isinstance(v, bool):
        raise LlamafuseError(f"{where}: field '{key}' has the wrong type ({type(v).__name__})")
    return v


def load_manifest(folder: Path) -> Manifest:
    """Read and validate `folder/manifest.json`."""
    path = Path(folder) / MANIFEST
    if not Path(folder).is_dir():
        raise LlamafuseError(f"{folder}: not a folder")
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError:
        raise LlamafuseError(f"{path}: not found (is this a llama-convert output folder?)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LlamafuseError(f"{path}: malformed ({e})") from None
    where = str(path)
    if not isinstance(d, dict) or d.get("format") != FORMAT_NAME:
        raise LlamafuseError(f"{where}: not a {FORMAT_NAME} manifest")
    version = d.get("version")
    if version != FORMAT_VERSION:
        raise LlamafuseError(f"{where}: format version {version!r} is not supported (this llamafuse reads {FORMAT_VERSION})")
    if d.get("rotary") != ROTARY:
        raise LlamafuseError(f"{where}: rotary convention {d.get('rotary')!r} is not supported")
    config = ModelConfig.from_dict(_get(d, "config", dict, where), f"{where}: config")
    dtype = _get(d, "dtype", str, where)
    if dtype not in DTYPES:
        raise LlamafuseError(f"{where}: dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    tp = _get(d, "tp", int, where)
    try:
        check_tp(config, tp)
    except LlamafuseError as e:
        raise LlamafuseError(f"{where}: {e}") from None
    ranks = []
    for i, r in enumerate(_get(d, "ranks", list, where)):
        w = f"{where}: ranks[{i}]"
        if not isinstance(r, dict):
            raise LlamafuseError(f"{w}: expected an object")
        rf = RankFile(_get(r, "rank", int, w), _get(r, "file", str, w), _get(r, "bytes", int, w),
                      _get(r, "sha256", str, w))
        if rf.rank != i or Path(rf.file).name != rf.file:
            raise LlamafuseError(f"{w}: bad rank number or file name")
        ranks.append(rf)
    if len(ranks) != tp:
        raise LlamafuseError(f"{where}: tp is {tp} but {len(ranks)} rank files are listed")
    tok = d.get("tokenizer")
    if tok is not None and (not isinstance(tok, str) or Path(tok).name != tok):
        raise LlamafuseError(f"{where}: bad tokenizer file name {tok!r}")
    source = d.get("source", {})
    if not isinstance(source, dict):
        raise LlamafuseError(f"{where}: field 'source' must be an object")
    return Manifest(config, dtype, tp, tuple(ranks), tok, source)


def sha256_file(path: Path, progress: Callable[[int], None] | None = None, chunk: int = 16 << 20) -> str:
    """Hex SHA-256 of a file; `progress(n)` is called with each chunk's size."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
            if progress:
                progress(len(block))
    return h.hexdigest()
