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
from .layout import WEIGHT_DTYPES, check_tp
from .tokenizer import TOKENIZER_FILES

FORMAT_NAME = "llamafuse-shards"
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
ROTARY = "rotate-half"  # the only on-disk rotary convention: pairs (i, i + head_dim/2)


@dataclass(frozen=True)
class RankFile:
    rank: int
    file: str    # name inside the folder, e.g. "rank-00-of-04.safetensors"
    bytes: int
    sha256: str


@dataclass(frozen=True)
class TokenizerRecord:
    file: str              # "tokenizer.model" (SentencePiece) or "tokenizer.json" (HF tokenizers)
    add_bos: bool          # the tokenizer's own rule: BOS first when encoding (lm-eval's HF backend does)
    bos_id: int | None
    eos_id: int | None
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    config: ModelConfig
    dtype: str                      # key of WEIGHT_DTYPES
    tp: int
    ranks: tuple[RankFile, ...]
    tokenizer: TokenizerRecord
    source: dict[str, str] = field(default_factory=dict)  # {"layout": "meta"|"hf", "path": ...}

    @property
    def torch_dtype(self) -> torch.dtype:
        """The dtype of the activations, embedding, norms and head (float16 for float8 models)."""
        return WEIGHT_DTYPES[self.dtype][1]

    def files(self) -> list[tuple[str, int, str]]:
        """(file name, bytes, sha256) of every file the manifest vouches for."""
        t = self.tokenizer
        return [(r.file, r.bytes, r.sha256) for r in self.ranks] + [(t.file, t.bytes, t.sha256)]

    def to_json(self) -> str:
        d = {
            "format": FORMAT_NAME, "version": FORMAT_VERSION, "config": self.config.to_dict(),
            "dtype": self.dtype, "rotary": ROTARY, "tp": self.tp,
            "ranks": [vars(r) for r in self.ranks], "tokenizer": vars(self.tokenizer), "source": self.source,
        }
        return json.dumps(d, indent=2) + "\n"


def rank_file_name(rank: int, tp: int) -> str:
    return f"rank-{rank:02d}-of-{tp:02d}.safetensors"


def rank_metadata(tp: int) -> dict[str, str]:
    """The safetensors `__metadata__` of every rank file."""
    return {"format": FORMAT_NAME, "version": str(FORMAT_VERSION), "tp": str(tp)}


def _get(d: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str, optional: bool = False) -> Any:
    if key not in d:
        raise LlamafuseError(f"{where}: missing field '{key}'")
    v = d[key]
    if optional and v is None:
        return None
    if not isinstance(v, kind) or isinstance(v, bool) is not (kind is bool):
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
        hint = "; convert the checkpoint again with this llama-convert" if version == 1 else ""
        raise LlamafuseError(f"{where}: format version {version!r} is not supported (this llamafuse reads {FORMAT_VERSION}){hint}")
    if d.get("rotary") != ROTARY:
        raise LlamafuseError(f"{where}: rotary convention {d.get('rotary')!r} is not supported")
    config = ModelConfig.from_dict(_get(d, "config", dict, where), f"{where}: config")
    dtype = _get(d, "dtype", str, where)
    if dtype not in WEIGHT_DTYPES:
        raise LlamafuseError(f"{where}: dtype {dtype!r} is not one of {', '.join(WEIGHT_DTYPES)}")
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
    w = f"{where}: tokenizer"
    t = _get(d, "tokenizer", dict, where)
    tok = TokenizerRecord(_get(t, "file", str, w), _get(t, "add_bos", bool, w), _get(t, "bos_id", int, w, True),
                          _get(t, "eos_id", int, w, True), _get(t, "bytes", int, w), _get(t, "sha256", str, w))
    if tok.file not in TOKENIZER_FILES:
        raise LlamafuseError(f"{w}: file must be one of {', '.join(TOKENIZER_FILES)}, got {tok.file!r}")
    for name, tid in (("bos_id", tok.bos_id), ("eos_id", tok.eos_id)):
        if tid is not None and not 0 <= tid < config.vocab_size:
            raise LlamafuseError(f"{w}: {name} {tid} is outside the vocabulary")
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
