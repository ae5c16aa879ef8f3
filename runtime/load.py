"""Open a converted folder: validate the manifest and a rank file, map its tensors onto a device."""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from llamafuse.formats import LlamafuseError, Manifest, RankLayout, rank_tensor_specs
from llamafuse.formats.tensorfile import MappedFile, TensorInfo, read_header

from .model import BlockAttention, FlexAttention, Model
from .parallel import Context, first_error

CHUNK = 64 << 20


def check_rank_file(folder: Path, manifest: Manifest, rank: int) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Cheap integrity checks: size, header, and exactly the tensors the format prescribes."""
    rf = manifest.ranks[rank]
    path = Path(folder) / rf.file
    if not path.is_file():
        raise LlamafuseError(f"{path}: rank file missing")
    size = path.stat().st_size
    if size != rf.bytes:
        raise LlamafuseError(f"{path}: {size} bytes, but the manifest says {rf.bytes} (truncated or replaced?)")
    infos, meta = read_header(path)
    specs = rank_tensor_specs(manifest.config, manifest.tp)
    if set(infos) != {n for n, _, _ in specs}:
        missing = sorted({n for n, _, _ in specs} - set(infos))[:3]
        raise LlamafuseError(f"{path}: tensors do not match the manifest (missing e.g. {missing})")
    for name, shape, rope in specs:
        want = torch.float32 if rope else manifest.torch_dtype
        t = infos[name]
        if t.shape != shape or t.dtype != want:
            raise LlamafuseError(f"{path}: tensor '{name}' is {t.dtype} {t.shape}, expected {want} {shape}")
    return infos, meta


def load_rank(folder: Path, manifest: Manifest, rank: int, device: torch.device,
              threads: int = 16) -> dict[str, torch.Tensor]:
    """Tensors of rank file `rank` on `device`. CPU: zero-copy mmap views. CUDA: the file is
    streamed through pinned buffers by several threads straight into one device allocation."""
    infos, meta = check_rank_file(folder, manifest, rank)
    path = Path(folder) / manifest.ranks[rank].file
    if device.type == "cpu":
        mf = MappedFile(path, (infos, meta))
        return {n: mf.get(n) for n in infos}
    buf = _copy_file_to_device(path, device, threads)
    return {n: buf[t.begin:t.end].view(t.dtype).view(t.shape) for n, t in infos.items()}


def _copy_file_to_device(path: Path, device: torch.device, threads: int) -> torch.Tensor:
    size = path.stat().st_size
    dev = torch.empty(size, dtype=torch.uint8, device=device)
    chunks = [(o, min(CHUNK, size - o)) for o in range(0, size, CHUNK)]
    fd = os.open(path, os.O_RDONLY)
    local = threading.local()

    def work(chunk: tuple[int, int]) -> None:
        off, n = chunk
        if not hasattr(local, "bufs"):
            local.bufs = [torch.empty(CHUNK, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
            local.events = [None, None]
            local.stream = torch.cuda.Stream(device)
            local.k = 0
        k = local.k = local.k ^ 1
        if local.events[k] is not None:
            local.events[k].synchronize()   # this pinned buffer's previous copy is done
        host = local.bufs[k]
        got = os.preadv(fd, [memoryview(host.numpy())[:n]], off)
        if got != n:
            raise LlamafuseError(f"{path}: short read at byte {off} (file changed while loading?)")
        with torch.cuda.stream(local.stream):
            dev[off:off + n].copy_(host[:n], non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(local.stream)
        local.events[k] = ev

    try:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(work, chunks))
        torch.cuda.synchronize(device)
    finally:
        os.close(fd)
    return dev


def fast_path(device: torch.device, head_dim: int, attention: str = "auto") -> tuple[BlockAttention | FlexAttention, bool]:
    """(attention backend, compile?) for a device: FlexAttention and torch.compile on sm80+;
    SDPA with explicit masks, uncompiled, on the CPU and on older GPUs such as the V100 (sm70).
    FlexAttention needs head_dim >= 16, so tiny test models use the mask path everywhere."""
    modern = device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)
    if attention == "auto":
        attention = "flex" if modern and head_dim >= 16 else "blocks"
    flex = attention == "flex"
    return (FlexAttention() if flex else BlockAttention()), modern and flex  # compile wants fixed shapes


def open_model(ctx: Context, folder: Path, manifest: Manifest, attention: str = "auto") -> Model:
    """Load this rank's file onto its device and build the model; all ranks fail together."""
    error = None
    try:
        tensors = load_rank(folder, manifest, ctx.tp_rank, ctx.device)
    except LlamafuseError as e:
        error = str(e)
    error = first_error(ctx, error)
    if error:
        raise LlamafuseError(error)
    backend, compile = fast_path(ctx.device, manifest.config.head_dim, attention)
    return Model(manifest.config, RankLayout(manifest.config, manifest.tp, ctx.tp_rank), tensors, ctx.tp_group,
                 backend, compile)
