"""Process groups: one process per rank, started by llama-run itself or by torchrun.

World = replicas x tp. Ranks [r*tp, (r+1)*tp) form replica r's tensor-parallel group; each
replica scores its own share of the batches (data parallel).
"""
from __future__ import annotations

import os
import socket
import traceback
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from llamafuse.formats import LlamafuseError

# Never let NCCL/PyTorch use NVLink multicast (it can take a shared host's GPUs down).
SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


@dataclass(frozen=True)
class Context:
    rank: int                      # global rank
    world: int                     # replicas * tp
    tp: int
    device: torch.device
    tp_group: dist.ProcessGroup | None
    tp_rank: int
    replica: int
    replicas: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _make_context(rank: int, world: int, tp: int, device_type: str, local_rank: int) -> Context:
    device = torch.device("cuda", local_rank) if device_type == "cuda" else torch.device("cpu")
    if device_type == "cuda":
        torch.cuda.set_device(device)
    tp_group = None
    if world > 1:
        groups = [dist.new_group(list(range(r * tp, (r + 1) * tp))) for r in range(world // tp)]
        tp_group = groups[rank // tp]
    return Context(rank, world, tp, device, tp_group, rank % tp, rank // tp, world // tp)


def first_error(ctx: Context, error: str | None) -> str | None:
    """The lowest rank's error message, on every rank (so one rank's failure stops all, no hang)."""
    if ctx.world == 1:
        return error
    errors: list[str | None] = [None] * ctx.world
    dist.all_gather_object(errors, error)
    return next((e for e in errors if e is not None), None)


def _entry(rank: int, world: int, tp: int, device_type: str, port: int, queue: Any,
           worker: Callable[..., Any], args: tuple) -> None:
    os.environ.update(SAFE_ENV)
    if device_type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(minutes=30))
    try:
        result = worker(_make_context(rank, world, tp, device_type, rank), *args)
        if rank == 0:
            queue.put(("ok", result))
    except LlamafuseError as e:
        queue.put(("error", str(e)))
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which exits non-zero
        queue.put(("crash", f"rank {rank}: {type(e).__name__}: {e}\n{traceback.format_exc()}"))
    finally:
        dist.destroy_process_group()


def launched_rank() -> int | None:
    """This process's global rank when torchrun started it, else None."""
    return int(os.environ["RANK"]) if "WORLD_SIZE" in os.environ and "RANK" in os.environ else None


def launch(worker: Callable[..., Any], tp: int, replicas: int, device_type: str, *args: Any) -> Any:
    """Run `worker(ctx, *args)` on every rank; returns rank 0's result.

    Under torchrun (WORLD_SIZE set) this process is one rank; otherwise it spawns the ranks
    itself (or runs inline when there is a single rank).
    """
    os.environ.update(SAFE_ENV)
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:
        world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
        if world % tp:
            raise LlamafuseError(f"torchrun started {world} processes, not a multiple of the model's tp {tp}")
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
        return worker(_make_context(rank, world, tp, device_type, int(os.environ.get("LOCAL_RANK", rank))), *args)
    world = tp * replicas
    if world == 1:
        return worker(_make_context(0, 1, 1, device_type, 0), *args)
    spawn = mp.get_context("spawn")
    queue = spawn.SimpleQueue()
    port = _free_port()
    procs = [spawn.Process(target=_entry, args=(r, world, tp, device_type, port, queue, worker, args))
             for r in range(world)]
    for p in procs:
        p.start()
    status, payload = queue.get()
    if status != "ok":
        for p in procs:
            p.terminate()
    for p in procs:
        p.join()
    if status == "error":
        raise LlamafuseError(payload)
    if status == "crash":
        raise RuntimeError(payload)
    return payload
