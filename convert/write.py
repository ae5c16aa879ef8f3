"""Stream a Source into per-rank safetensors files, atomically, with bounded memory."""
from __future__ import annotations

import errno
import fcntl
import hashlib
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

from llamafuse.formats import FORMAT_NAME, LlamafuseError, Manifest, RankFile, RankLayout, check_tp, load_manifest
from llamafuse.formats.layout import rank_tensor_specs
from llamafuse.formats.manifest import DTYPES, MANIFEST, rank_file_name
from llamafuse.formats.tensorfile import fsync, pad_to, plan_header, write_tensor
from llamafuse.formats.tokenizer import load_tokenizer

from .plan import head_tensors, layer_tensors, rope_tables, tail_tensors
from .sources import Source

TOKENIZER = "tokenizer.model"


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


def _groups(src: Source, tp: int, dtype: torch.dtype) -> Iterator[list[dict[str, torch.Tensor]]]:
    """Per group (head, each layer, tail): one dict of fused tensors per rank, in file order."""
    c = src.config
    lays = [RankLayout(c, tp, r) for r in range(tp)]
    yield _group(src, "", dtype, lambda get: [head_tensors(get, dtype, rope_tables(c))] * tp)
    for i in range(c.n_layers):
        yield _group(src, f"layers.{i}.", dtype, lambda get: [layer_tensors(get, i, lay, src.rotary, dtype) for lay in lays])
    yield _group(src, "", dtype, lambda get: [tail_tensors(get, lay, dtype) for lay in lays])


def _group(src: Source, prefix: str, dtype: torch.dtype,
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
    """No NaN or inf in t: one pass, no copy (a NaN makes min and max NaN, an inf is one of them)."""
    lo, hi = torch.aminmax(t)
    return bool(lo.isfinite() & hi.isfinite())


def _not_finite(cache: dict[str, torch.Tensor], prefix: str, dtype: torch.dtype) -> str:
    """Which source tensor made a converted one non-finite, and how, worded for the user."""
    wider = {torch.float16: "--dtype bfloat16 or float32", torch.bfloat16: "--dtype float32"}.get(dtype)
    for part, t in cache.items():
        lo, hi = (float(x) for x in torch.aminmax(t))
        if math.isnan(lo):
            return f"{prefix + part} has NaN values in the source checkpoint"
        if math.isinf(lo) or math.isinf(hi):
            return f"{prefix + part} has infinite values in the source checkpoint"
        if not _finite(t.to(dtype)):
            return (f"{prefix + part} has values up to {max(-lo, hi):.4g}, which overflow "
                    f"{str(dtype).removeprefix('torch.')} (largest {torch.finfo(dtype).max:.6g})"
                    + (f"; {wider} can hold them" if wider else ""))
    return "a converted tensor is not finite"


def _write_shards(src: Source, tmp: Path, tp: int, dtype: torch.dtype, progress: bool) -> list[RankFile]:
    specs = rank_tensor_specs(src.config, tp)
    entries = [(n, torch.float32 if rope else dtype, shape) for n, shape, rope in specs]
    header, offsets = plan_header(entries, {"format": FORMAT_NAME, "tp": str(tp)})
    size = offsets[-1] + entries[-1][1].itemsize * math.prod(entries[-1][2])
    payload = sum(d.itemsize * math.prod(s) for _, d, s in entries)
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
                    h.update(pad_to(f, offsets[k]))
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


def planned_bytes(src: Source, tp: int, dtype: torch.dtype) -> int:
    specs = rank_tensor_specs(src.config, tp)
    return tp * sum(math.prod(s) * (4 if rope else dtype.itemsize) + 64 for _, s, rope in specs)


def convert(src: Source, out: Path, tp: int, dtype_name: str, force: bool = False,
            tokenizer: Path | None = None, progress: bool = True) -> Summary:
    """Convert `src` into `out`. Nothing appears in `out` until every file is complete."""
    t0 = time.perf_counter()
    out = Path(out)
    if dtype_name not in DTYPES:
        raise LlamafuseError(f"--dtype {dtype_name!r} is not one of {', '.join(DTYPES)}")
    dtype = DTYPES[dtype_name]
    check_tp(src.config, tp)
    check_destination(out, src.path, force)
    tok = tokenizer or src.tokenizer
    if tok is None:
        raise LlamafuseError(f"{src.path}: no tokenizer.model found beside the checkpoint (pass --tokenizer)")
    load_tokenizer(Path(tok), src.config.vocab_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    removed = _remove_dead_temporaries(out.parent)
    need, free = planned_bytes(src, tp, dtype), shutil.disk_usage(out.parent).free
    if need > free:
        raise LlamafuseError(f"{out.parent}: not enough disk space ({need / 1e9:.1f} GB needed, {free / 1e9:.1f} GB free)")
    try:
        tmp, lock = _temporary(out)
    except OSError as e:
        raise LlamafuseError(f"{out.parent}: cannot create a temporary folder ({e.strerror or e})") from None
    try:
        ranks = _write_shards(src, tmp, tp, dtype, progress)
        shutil.copyfile(tok, tmp / TOKENIZER)
        manifest = Manifest(src.config, dtype_name, tp, tuple(ranks), TOKENIZER,
                            {"layout": src.layout, "path": str(src.path.resolve())})
        (tmp / MANIFEST).write_text(manifest.to_json())
        _publish(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno == errno.ENOSPC:
            raise LlamafuseError(f"{out}: disk full while writing ({need / 1e9:.1f} GB needed)") from None
        raise LlamafuseError(f"{out}: write failed ({e.strerror or e})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        os.close(lock)
    files = [(r.file, r.bytes) for r in ranks] + [(TOKENIZER, (out / TOKENIZER).stat().st_size),
                                                   (MANIFEST, (out / MANIFEST).stat().st_size)]
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


def _publish(tmp: Path, out: Path) -> None:
    """Move the finished files into place; the manifest comes last, so it marks completion."""
    if not out.exists() or not any(out.iterdir()):
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
        return
    try:  # rank files of an earlier conversion (another tp, say) are ours to replace
        stale = [out / r.file for r in load_manifest(out).ranks]
    except LlamafuseError:
        stale = []
    (out / MANIFEST).unlink(missing_ok=True)  # a stale manifest must not describe new shards
    for f in stale:
        f.unlink(missing_ok=True)
    for f in sorted(tmp.iterdir(), key=lambda p: p.name == MANIFEST):
        os.replace(f, out / f.name)
    tmp.rmdir()
