"""A `launch` worker for tests of how ranks start (kept apart so a spawned rank imports little)."""
from __future__ import annotations

import atexit
import os
import time
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from llamafuse.runtime.parallel import Context


def data_seen(ctx: Context, data: list[int]) -> list[tuple[int, int, int]]:
    """Every rank's (rank, len(data), sum(data)), gathered on all ranks."""
    seen: list = [None] * ctx.world
    dist.all_gather_object(seen, (ctx.rank, len(data), sum(data)))
    return seen


def swapped_parts(ctx: Context, files: list[bytes]) -> list[tuple[int, list[int], bool]]:
    """Each rank holds only its part of its tp rank's file (`files[tp_rank]`, read as its replica's
    `Part`), the rest filler, connects to its peers and swaps parts with them: every rank's (rank,
    its peers' global ranks, whether it then holds the whole file), gathered on all ranks."""
    from llamafuse.runtime.load import Part, swap_parts
    from llamafuse.runtime.parallel import connect
    file, part = files[ctx.tp_rank], Part(ctx.replica, ctx.replicas)
    start, length = part.span(len(file))
    data = torch.full((length * part.count,), 255, dtype=torch.uint8)
    mine = file[start:start + length]
    data[start:start + len(mine)] = torch.tensor(list(mine), dtype=torch.uint8)
    connect(ctx.peers, ctx.device)()   # as a GPU rank builds its peers' communicator beside its read
    swap_parts(data, part, ctx.peers)
    seen: list = [None] * ctx.world
    dist.all_gather_object(seen, (ctx.rank, dist.get_process_group_ranks(ctx.peers),
                                  bytes(data[:len(file)].tolist()) == file))
    return seen


def shared_reading(ctx: Context, folder: Path) -> list[tuple[int, bool, bool]]:
    """`evaluate._ready_model` as replicas on GPUs run it (each reads a part of the rank file,
    connects to its peers and swaps parts), with CPU stand-ins for what needs CUDA (pinned memory,
    streams, events): every rank's (rank, its weights equal to the file's, it swapped), gathered."""
    from contextlib import nullcontext

    from tqdm import tqdm

    from llamafuse.formats import load_manifest
    from llamafuse.runtime import evaluate
    from llamafuse.runtime.load import Part, load_rank

    class Event:
        def __init__(self, **kwargs) -> None:
            pass

        def record(self, stream=None) -> None:
            pass

        def synchronize(self) -> None:
            pass
    empty = torch.empty
    torch.empty = lambda *a, pin_memory=False, **k: empty(*a, **k)   # this rank's process only
    torch.cuda.Event, torch.cuda.Stream, torch.cuda.stream = Event, lambda device: None, lambda s: nullcontext()
    torch.cuda.synchronize = lambda device=None: None
    evaluate._reading_plan = lambda c: (Part(c.replica, c.replicas), c.peers)
    m = load_manifest(folder)
    model, ready = evaluate._ready_model(ctx, folder, m, evaluate.Settings(64, progress=False), tqdm(disable=True),
                                         "test", 0.0)
    torch.empty = empty
    whole = load_rank(folder, m, 0, torch.device("cpu"))
    same = model.w.keys() == whole.keys() and all(torch.equal(model.w[k], whole[k]) for k in whole)
    seen: list = [None] * ctx.world
    dist.all_gather_object(seen, (ctx.rank, same, ready.swap_s > 0))
    return seen


def mark_then_sum(ctx: Context, folder: Path, later: Callable[[], tuple]) -> list[tuple[int, int]]:
    """A `start` worker: leave `started-RANK` (holding this process's pid) in `folder`, then wait
    for the data; every rank's (rank, sum(data)), gathered on all ranks."""
    (folder / f".started-{ctx.rank}").write_text(str(os.getpid()))
    os.replace(folder / f".started-{ctx.rank}", folder / f"started-{ctx.rank}")
    (data,) = later()
    seen: list = [None] * ctx.world
    dist.all_gather_object(seen, (ctx.rank, sum(data)))
    return seen


def slow_exit(ctx: Context, seconds: float) -> int:
    """Returns this rank's pid, and then takes `seconds` to exit (a slow teardown)."""
    atexit.register(time.sleep, seconds)
    return os.getpid()


MARK: str | None = None   # set by a test in its own process: a forked rank sees it, a spawned one does not


def rank_state(ctx: Context) -> dict:
    """What a rank inherited: its parent, MARK, its stop-signal handlers, torch's intra-op threads,
    whether the objects it inherited are frozen (out of its garbage collector's reach)."""
    import gc
    import signal

    import torch
    return {"rank": ctx.rank, "parent": os.getppid(), "mark": MARK, "threads": torch.get_num_threads(),
            "frozen": gc.get_freeze_count() > 0,
            "default_handlers": all(signal.getsignal(s) == signal.SIG_DFL for s in (signal.SIGINT, signal.SIGTERM))}


def gathered_state(ctx: Context) -> list[dict]:
    """Every rank's `rank_state`, gathered on all ranks."""
    seen: list = [None] * ctx.world
    dist.all_gather_object(seen, rank_state(ctx))
    return seen


def control_group(ctx: Context) -> tuple[str, bool]:
    """(backend of ctx.control, whether it is a group of its own rather than the default one)."""
    return dist.get_backend(ctx.control), ctx.control is not dist.GroupMember.WORLD
