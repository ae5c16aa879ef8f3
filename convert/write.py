"""Stream a Source into per-rank safetensors files, atomically, with bounded memory."""
from __future__ import annotations

import errno
import math
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from tqdm import tqdm

from llamafuse.formats import LlamafuseError, Manifest, RankFile, RankLayout, check_tp
from llamafuse.formats.layout import rank_tensor_specs
from llamafuse.formats.layout import WEIGHT_DTYPES
from llamafuse.formats.manifest import MANIFEST, TokenizerRecord, rank_file_name, rank_metadata
from llamafuse.formats.tensorfile import fsync, plan_header, write_tensor
from llamafuse.formats.tokenizer import TokenizerFile, make_tokenizer

from .plan import head_tensors, layer_tensors, rope_tables, tail_tensors
from .sources import Source



@dataclass(frozen=True)
class Summary:
    out: Path
    files: list[tuple[str, int]]
    seconds: float


def check_destination(out: Path, src: Path, force: bool) -> None:
    if out.resolve() == src.resolve():
        raise LlamafuseError(f"{out}: the destination is the source folder")
    if out.exists() and not out.is_dir():
        raise LlamafuseError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise LlamafuseError(f"{out}: exists and is not empty (use --force to write into it)")


def _groups(src: Source, tp: int, dtype: str) -> Iterator[list[dict[str, torch.Tensor]]]:
    """Per group (head, each layer, tail): one dict of fused tensors per rank, in file order."""
    c = src.config
    lays = [RankLayout(c, tp, r) for r in range(tp)]
    head = head_tensors(src.tensor, dtype, rope_tables(c))
    yield [head] * tp
    del head
    for i in range(c.n_layers):
        yield [layer_tensors(get, i, lay, src.rotary, dtype) for get in [_cached(src, f"layers.{i}.")] for lay in lays]
    yield [tail_tensors(get, lay, dtype) for get in [_cached(src, "")] for lay in lays]


def _cached(src: Source, prefix: str) -> Callable[[str], torch.Tensor]:
    """src.tensor(prefix + part), each read (and, for Meta shards, concatenated) once."""
    cache: dict[str, torch.Tensor] = {}

    def get(part: str) -> torch.Tensor:
        if part not in cache:
            cache[part] = src.tensor(prefix + part)
        return cache[part]
    return get


def _write_shards(src: Source, tmp: Path, tp: int, dtype: str, progress: bool) -> list[RankFile]:
    entries = [(t.name, t.dtype, t.shape) for t in rank_tensor_specs(src.config, tp, dtype)]
    header, offsets = plan_header(entries, rank_metadata(tp))
    payload = sum(d.itemsize * math.prod(s) for _, d, s in entries)
    size = offsets[0] + payload
    files = [open(tmp / rank_file_name(r, tp), "wb") for r in range(tp)]
    hashes = [hashlib.sha256() for _ in range(tp)]
    bar = tqdm(total=payload * tp, unit="B", unit_scale=True, unit_divisor=1024, desc="writing",
               disable=not progress, dynamic_ncols=True)
    try:
        for f, h in zip(files, hashes):
            f.write(header)
            h.update(header)
        k = 0  # index into entries, the same for all ranks
        for group in _groups(src, tp, dtype):
            for name in group[0]:
                ename, edtype, eshape = entries[k]
                for r, (f, h) in enumerate(zip(files, hashes)):
                    t = group[r][name]
                    if name != ename or t.dtype != edtype or tuple(t.shape) != eshape:
                        raise RuntimeError(f"plan mismatch at {name}: {t.dtype} {tuple(t.shape)} vs {ename} {edtype} {eshape}")
                    if f.tell() != offsets[k]:
                        raise RuntimeError(f"writer at byte {f.tell()}, {name} planned at {offsets[k]}")
                    h.update(write_tensor(f, t))
                    bar.update(t.numel() * t.element_size())
                k += 1
            del group  # free this layer before the next one is read
        for f in files:
            fsync(f)
    finally:
        for f in files:
            f.close()
        bar.close()
    return [RankFile(r, rank_file_name(r, tp), size, h.hexdigest()) for r, h in enumerate(hashes)]


def planned_bytes(src: Source, tp: int, dtype: str) -> int:
    specs = rank_tensor_specs(src.config, tp, dtype)
    return tp * (sum(math.prod(t.shape) * t.dtype.itemsize for t in specs) + (1 << 20))


def size_text(n: int) -> str:
    """Bytes in a unit that shows the number: 931B, 2.46MB, 65.2GB."""
    return tqdm.format_sizeof(n, suffix="B", divisor=1000)


def convert(src: Source, out: Path, tp: int, dtype: str, force: bool = False,
            tokenizer: Path | None = None, progress: bool = True) -> Summary:
    """Convert `src` into `out`. Nothing appears in `out` until every file is complete."""
    t0 = time.perf_counter()
    out = Path(out)
    if dtype not in WEIGHT_DTYPES:
        raise LlamafuseError(f"--dtype {dtype!r} is not one of {', '.join(WEIGHT_DTYPES)}")
    check_tp(src.config, tp)
    check_destination(out, src.path, force)
    tok = src.tokenizer_file(tokenizer)
    if tok is None:
        raise LlamafuseError(f"{src.path}: no tokenizer.model or tokenizer.json found beside the checkpoint (pass --tokenizer)")
    make_tokenizer(tok.name, tok.data, src.config.vocab_size, tok.origin)
    out.parent.mkdir(parents=True, exist_ok=True)
    need, free = planned_bytes(src, tp, dtype), shutil.disk_usage(out.parent).free
    if need > free:
        raise LlamafuseError(f"{out.parent}: not enough disk space ({size_text(need)} needed, {size_text(free)} free)")
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as e:
        raise LlamafuseError(f"{out.parent}: cannot create a temporary folder ({e.strerror or e})") from None
    try:
        ranks = _write_shards(src, tmp, tp, dtype, progress)
        manifest = Manifest(src.config, dtype, tp, tuple(ranks), _write_tokenizer(tok, tmp),
                            {"layout": src.layout, "path": str(src.path.resolve())})
        (tmp / MANIFEST).write_text(manifest.to_json())
        _publish(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno == errno.ENOSPC:
            raise LlamafuseError(f"{out}: disk full while writing ({size_text(need)} needed)") from None
        raise LlamafuseError(f"{out}: write failed ({e.strerror or e})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    files = [(name, n) for name, n, _ in manifest.files()] + [(MANIFEST, (out / MANIFEST).stat().st_size)]
    return Summary(out, files, time.perf_counter() - t0)


def _write_tokenizer(tok: TokenizerFile, folder: Path) -> TokenizerRecord:
    with open(folder / tok.name, "wb") as f:
        f.write(tok.data)
        fsync(f)
    return TokenizerRecord(tok.name, tok.add_bos, tok.bos_id, tok.eos_id, len(tok.data),
                           hashlib.sha256(tok.data).hexdigest())


def _publish(tmp: Path, out: Path) -> None:
    """Move the finished files into place; the manifest comes last, so it marks completion."""
    if not out.exists() or not any(out.iterdir()):
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
        return
    stale = [out / name for name in _listed_files(out)]
    (out / MANIFEST).unlink(missing_ok=True)  # a stale manifest must not describe new shards
    for f in stale:
        f.unlink(missing_ok=True)
    for f in sorted(tmp.iterdir(), key=lambda p: p.name == MANIFEST):
        os.replace(f, out / f.name)
    tmp.rmdir()


def _listed_files(out: Path) -> list[str]:
    """Files an earlier conversion's manifest (of any version) lists in `out`: ours to replace."""
    try:
        d = json.loads((out / MANIFEST).read_text())
        tok = d.get("tokenizer")
        names = [r["file"] for r in d["ranks"]] + [tok.get("file") if isinstance(tok, dict) else tok]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []
    return [n for n in names if isinstance(n, str) and Path(n).name == n and n != MANIFEST]
