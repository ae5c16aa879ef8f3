"""Stream a Source into per-rank safetensors files, atomically, with bounded memory."""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import math
import os
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from tqdm import tqdm

from llamafuse.formats import LlamafuseError, Manifest, RankFile, RankLayout, check_tp
from llamafuse.formats.layout import WEIGHT_DTYPES, rank_tensor_specs
from llamafuse.formats.manifest import MANIFEST, TokenizerRecord, rank_file_name, rank_metadata
from llamafuse.formats.tensorfile import fsync, plan_header, write_tensor
from llamafuse.formats.tokenizer import TokenizerFile, make_tokenizer

from .plan import head_tensors, layer_tensors, rope_tables, tail_tensors
from .sources import MATRIX_WEIGHTS, Source



@dataclass(frozen=True)
class Summary:
    out: Path
    files: list[tuple[str, int]]
    seconds: float
    removed: list[Path]  # temporary folders of dead conversions, removed first


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
    yield _group(src, "", dtype, lambda get: [head_tensors(get, dtype, rope_tables(c))] * tp)
    for i in range(c.n_layers):
        yield _group(src, f"layers.{i}.", dtype, lambda get: [layer_tensors(get, i, lay, src.rotary, dtype) for lay in lays])
    yield _group(src, "", dtype, lambda get: [tail_tensors(get, lay, dtype) for lay in lays])


def _group(src: Source, prefix: str, dtype: str,
           build: Callable[[Callable[[str], torch.Tensor]], list[dict[str, torch.Tensor]]]) -> list[dict[str, torch.Tensor]]:
    """build(get), get(part) being src.tensor(prefix + part) read (and, for Meta shards,
    concatenated) once. The source tensors are freed on return; the result must be finite."""
    cache: dict[str, torch.Tensor] = {}

    def get(part: str) -> torch.Tensor:
        if part not in cache:
            cache[part] = src.tensor(prefix + part)
        return cache[part]
    group = build(get)
    if not all(_finite(t) for t in {id(t): t for ts in group for t in ts.values()}.values()):
        raise LlamafuseError(f"{src.path}: {_not_finite(cache, prefix, dtype)}")
    return group


def _finite(t: torch.Tensor) -> bool:
    """No NaN or inf in t: one pass, no copy (a NaN makes min and max NaN, an inf is one of them).
    Float8 matrices are not looked at: their scales are, and carry any NaN or inf of the source."""
    if t.dtype == torch.float8_e4m3fn:
        return True
    lo, hi = torch.aminmax(t)
    return bool(lo.isfinite() & hi.isfinite())


def _not_finite(cache: dict[str, torch.Tensor], prefix: str, dtype: str) -> str:
    """Which source tensor made a converted one non-finite, and how, worded for the user."""
    matrix, other = WEIGHT_DTYPES[dtype]
    for part, t in cache.items():
        lo, hi = (float(x) for x in torch.aminmax(t))
        if math.isnan(lo):
            return f"{prefix + part} has NaN values in the source checkpoint"
        if math.isinf(lo) or math.isinf(hi):
            return f"{prefix + part} has infinite values in the source checkpoint"
        target = matrix if part in MATRIX_WEIGHTS else other
        if target.itemsize > 1 and not _finite(t.to(target)):  # float8 matrices are scaled: no overflow
            wider = {torch.float16: "--dtype bfloat16 or float32", torch.bfloat16: "--dtype float32"}.get(target)
            return (f"{prefix + part} has values up to {max(-lo, hi):.4g}, which overflow "
                    f"{str(target).removeprefix('torch.')} (largest {torch.finfo(target).max:.6g})"
                    + (f"; {wider} can hold them" if wider else ""))
    return "a converted tensor is not finite"


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
    removed = _remove_dead_temporaries(out.parent)
    need, free = planned_bytes(src, tp, dtype), shutil.disk_usage(out.parent).free
    if need > free:
        raise LlamafuseError(f"{out.parent}: not enough disk space ({size_text(need)} needed, {size_text(free)} free)")
    try:
        tmp, lock = _temporary(out)
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
    finally:
        os.close(lock)
    files = [(name, n) for name, n, _ in manifest.files()] + [(MANIFEST, (out / MANIFEST).stat().st_size)]
    return Summary(out, files, time.perf_counter() - t0, removed)


def _temporary(out: Path) -> tuple[Path, int]:
    """A new folder `.OUT.tmp-*` beside OUT, made as mkdir makes folders (the umask applies; it
    becomes OUT), and a descriptor of it holding an flock until closed, taken before anything is
    written into it. (Where the file system has no flock, the folder is never taken for dead.)"""
    tmp = out.parent / f".{out.name}.tmp-{secrets.token_hex(8)}"
    tmp.mkdir()
    fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # blocks only while another run looks at the empty folder
    except OSError:
        pass
    return tmp, fd


def _remove_dead_temporaries(parent: Path) -> list[Path]:
    """Remove the temporary folders in `parent` that conversions killed outright (SIGKILL, power
    loss) left behind; returns them. A live conversion holds the lock on its folder until it
    ends, and a folder that is still empty may be about to be locked, so only a non-empty folder
    whose lock can be taken is dead."""
    removed = []
    for tmp in sorted(parent.glob(".*.tmp-" + "[0-9a-f]" * 16)):  # named by _temporary
        try:
            fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:  # not a folder, or already gone
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if any(tmp.iterdir()):
                shutil.rmtree(tmp, ignore_errors=True)
                removed.append(tmp)
        except OSError:  # locked: a live conversion
            pass
        finally:
            os.close(fd)
    return removed


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
