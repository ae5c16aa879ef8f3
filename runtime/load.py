"""Open a converted folder: check a rank file against the manifest, put its tensors on a device."""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from llamafuse.formats import LlamafuseError, Manifest, RankLayout, names, rank_tensor_specs
from llamafuse.formats.manifest import rank_metadata
from llamafuse.formats.tensorfile import MappedFile, TensorInfo, read_header

from .attention import BlockAttention, choose_attention
from .fp8 import check_fp8_device
from .model import Model
from .parallel import Context, device_threads, together

CHUNK = 64 << 20
THREADS = 16    # threads reading a rank file onto its GPU, each with two CHUNK pinned buffers
EAGER_PACE = 3  # layers the warm start's model keeps queued on a GPU (one 30B layer: ~34 ms, run 8)
ALIGN = 16  # GEMM kernels want 16-byte aligned operands; a tensor that is not gets its own copy


def check_rank_file(folder: Path, manifest: Manifest, rank: int) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Size, header, metadata, and exactly the tensors the format prescribes, in its order."""
    rf = manifest.ranks[rank]
    path = Path(folder) / rf.file
    if not path.is_file():
        raise LlamafuseError(f"{path}: rank file missing")
    size = path.stat().st_size
    if size != rf.bytes:
        raise LlamafuseError(f"{path}: {size} bytes, but the manifest says {rf.bytes} (truncated or replaced?)")
    infos, meta = read_header(path)
    if meta != rank_metadata(manifest.tp):
        raise LlamafuseError(f"{path}: __metadata__ is {meta}, expected {rank_metadata(manifest.tp)}")
    specs = rank_tensor_specs(manifest.config, manifest.tp, manifest.dtype)
    if list(infos) != [s.name for s in specs]:
        missing = sorted({s.name for s in specs} - set(infos))[:3]
        what = f"missing e.g. {missing}" if missing else "not in the format's order"
        raise LlamafuseError(f"{path}: tensors do not match the format ({what})")
    for s in specs:
        t = infos[s.name]
        if t.shape != s.shape or t.dtype != s.dtype:
            raise LlamafuseError(f"{path}: tensor '{s.name}' is {t.dtype} {t.shape}, expected {s.dtype} {s.shape}")
    return infos, meta


@dataclass(frozen=True)
class Part:
    """Part `index` of `count` equal parts of a rank file: what one of `count` replicas reads when
    they share the reading of the file they all load (see `swap_parts`)."""
    index: int
    count: int

    def span(self, size: int) -> tuple[int, int]:
        """(start, length) of this part in a file of `size` bytes; the parts are 16-byte multiples
        and cover `count * length >= size` bytes (the last one runs past the end)."""
        length = -(-size // (self.count * ALIGN)) * ALIGN
        return self.index * length, length


@dataclass(frozen=True)
class RankBytes:
    """A rank file's bytes on a device, in one allocation, and where each tensor lies in them."""
    data: torch.Tensor                # uint8, at least the file's size
    infos: dict[str, TensorInfo]

    def tensors(self) -> dict[str, torch.Tensor]:
        """Views of `data` by name; a tensor whose bytes are not 16-byte aligned is copied."""
        return _aligned({n: self.data[t.begin:t.end].view(t.dtype).view(t.shape) for n, t in self.infos.items()})


def _aligned(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: t if t.data_ptr() % ALIGN == 0 else t.clone() for n, t in tensors.items()}


def load_rank(folder: Path, manifest: Manifest, rank: int, device: torch.device,
              threads: int = THREADS) -> dict[str, torch.Tensor]:
    """Tensors of rank file `rank` on `device`. CPU: zero-copy views of a memory map. CUDA: views
    of the file's bytes in one device allocation (`read_rank`). Either way a tensor whose bytes are
    not 16-byte aligned is copied."""
    if device.type != "cpu":
        return read_rank(folder, manifest, rank, device, threads).tensors()
    infos, meta = check_rank_file(folder, manifest, rank)
    mf = MappedFile(Path(folder) / manifest.ranks[rank].file, (infos, meta))
    return _aligned({n: mf.get(n) for n in infos})


def read_rank(folder: Path, manifest: Manifest, rank: int, device: torch.device, threads: int = THREADS,
              part: Part | None = None) -> RankBytes:
    """Rank file `rank`, checked, read onto a CUDA device by several threads through pinned
    buffers: the whole file, or only `part` of it (the rest of `data` is left for `swap_parts`)."""
    infos, _ = check_rank_file(folder, manifest, rank)
    path = Path(folder) / manifest.ranks[rank].file
    return RankBytes(_copy_file_to_device(path, device, threads, part), infos)


def _copy_file_to_device(path: Path, device: torch.device, threads: int, part: Part | None = None) -> torch.Tensor:
    """The file's bytes in one device allocation (with `part`: room for all parts, that part read):
    each thread reads chunks into its two pinned buffers in turn and copies them on its own stream.
    Its waits sleep, leaving the CPUs to what runs beside the loading (importing and running the
    compiler, the parent tokenizing)."""
    size = path.stat().st_size
    start, length = part.span(size) if part else (0, size)
    dev = torch.empty(length * part.count if part else size, dtype=torch.uint8, device=device)
    end = min(size, start + length)
    chunks = [(o, min(CHUNK, end - o)) for o in range(start, end, CHUNK)]
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
            ev = torch.cuda.Event(blocking=True)   # waited on asleep: a spinning wait keeps a core busy per thread
            ev.record(local.stream)
        local.events[k] = ev

    try:
        with device_threads(device, threads) as pool:
            list(pool.map(work, chunks))
        torch.cuda.synchronize(device)
    finally:
        os.close(fd)
    return dev


def swap_parts(data: torch.Tensor, part: Part, group: dist.ProcessGroup) -> None:
    """Every part of `data` from the rank that read it: an in-place all-gather over `group`, whose
    rank i read part i (NCCL: GPU to GPU, so each byte crosses the host once however many
    replicas there are). Afterwards `data` holds the whole file on every rank of `group`."""
    start, length = part.span(len(data))
    assert length * part.count == len(data), "data is not split in equal parts"
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor   # torch >= 2.13's name
    gather(data, data[start:start + length], group=group)


def check_device(ctx: Context, manifest: Manifest) -> None:
    """What this rank's device must support for the model (float8: FP8 matrix units), checked
    before any work."""
    if manifest.dtype == "float8":
        specs = rank_tensor_specs(manifest.config, manifest.tp, manifest.dtype)
        check_fp8_device(ctx.device, [s.shape for s in specs if s.name.endswith(tuple(names.MATRICES))])


def new_model(ctx: Context, manifest: Manifest, attention: str = "auto") -> Model:
    """This rank's model with its attention backend and compile mode, weights not loaded yet
    (`Model.w` is empty until set). Building it imports the compile stack where it compiles."""
    backend, compile = choose_attention(ctx.device, manifest.config.head_dim, attention, manifest.torch_dtype)
    return Model(manifest.config, RankLayout(manifest.config, manifest.tp, ctx.tp_rank), {}, ctx.tp_group,
                 backend, compile)


def eager_model(ctx: Context, manifest: Manifest, tensors: dict[str, torch.Tensor]) -> Model:
    """The uncompiled model that a rank whose model compiles scores its first batches with
    meanwhile (the warm start, `evaluate.Settings.eager_batches`): SDPA with masks, which needs no
    compiler, on the loaded weights. Its all-reduces go through `ctx.spare` while the compiled
    model's warm-up uses `ctx.tp_group` on a stream of its own, so neither waits on the other."""
    return Model(manifest.config, RankLayout(manifest.config, manifest.tp, ctx.tp_rank), tensors, ctx.spare,
                 BlockAttention(), None, EAGER_PACE if ctx.device.type == "cuda" else 0)


def placeholder_layer(manifest: Manifest, device: torch.device) -> dict[str, torch.Tensor]:
    """Zeros shaped like one rank's layer-0 tensors: what `Model.warm_up` compiles on while the
    weights load."""
    layer0 = {names.layer(0, p) for p in names.LAYER_PARTS}
    layer0 |= {names.scale(n) for n in layer0}
    return {s.name: torch.zeros(s.shape, dtype=s.dtype, device=device)
            for s in rank_tensor_specs(manifest.config, manifest.tp, manifest.dtype) if s.name in layer0}


def open_model(ctx: Context, folder: Path, manifest: Manifest, attention: str = "auto") -> Model:
    """Load this rank's file onto its device and build the model; all ranks fail together."""
    check_device(ctx, manifest)
    model = new_model(ctx, manifest, attention)
    model.w = together(ctx, lambda: load_rank(folder, manifest, ctx.tp_rank, ctx.device))
    return model
