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
    from llamafuse.runtime.parallel import Connections
    file, part = files[ctx.tp_rank], Part(ctx.replica, ctx.replicas)
    start, length = part.span(len(file))
    data = torch.full((length * part.count,), 255, dtype=torch.uint8)
    mine = file[start:start + length]
    data[start:start + len(mine)] = torch.tensor(list(mine), dtype=torch.uint8)
    Connections([ctx.peers], ctx.device).wait(ctx.peers)   # as a GPU rank builds its peers' communicator
    swap_parts(data, part, ctx.peers)
    seen: list = [None] * ctx.world
    dist.all_gather_object(seen, (ctx.rank, dist.get_process_group_ranks(ctx.peers),
                                  bytes(data[:len(file)].tolist()) == file))
    return seen


def shared_reading(ctx: Context, folder: Path) -> list[tuple[int, bool, bool]]:
    """`evaluate._Startup` as replicas on GPUs run it (each reads a part of the rank file,
    connects to its peers and swaps parts), with CPU stand-ins for what needs CUDA (pinned memory,
    streams, events): every rank's (rank, its weights equal to the file's, it swapped), gathered."""
    from concurrent.futures import ThreadPoolExecutor
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
    evaluate._reading_plan = lambda c, warm: (Part(c.replica, c.replicas), [c.peers])
    m = load_manifest(folder)
    with ThreadPoolExecutor(2) as pool:
        startup = evaluate._Startup(ctx, folder, m, evaluate.Settings(64, progress=False), pool, tqdm(disable=True),
                                    "test")
        weights = startup.weights()
    torch.empty = empty
    whole = load_rank(folder, m, 0, torch.device("cpu"))
    same = weights.keys() == whole.keys() and all(torch.equal(weights[k], whole[k]) for k in whole)
    seen: list = [None] * ctx.world
    dist.all_gather_object(seen, (ctx.rank, same, startup.swap_s > 0))
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


def compiling_as_on_a_gpu(patch: Callable[[object, str, object], None], warm_up_delay: float = 0.0) -> list[tuple]:
    """Have this process's ranks build models that compile as on a GPU (the mask path's
    around-attention mode; `torch.compile` stood in for by the identity: what is under test is
    which model runs when, not the compiler) and log, in the list returned, each batch scored
    ("batch", compiles, thread, switch interval), all-reduce ("all_reduce", compiles, group) and
    warm-up ("warm_up", thread), the warm-up taking `warm_up_delay` seconds longer. `patch` is
    setattr or pytest's."""
    import sys
    import threading

    from llamafuse.runtime import evaluate, load
    from llamafuse.runtime.attention import BlockAttention
    from llamafuse.runtime.model import Model
    log: list[tuple] = []
    target_logprobs, all_reduce, warm_up = Model.target_logprobs, Model._all_reduce, Model.warm_up

    def scored(self, *args):
        log.append(("batch", self.compiles, threading.get_ident(), sys.getswitchinterval()))
        return target_logprobs(self, *args)

    def reduced(self, x):
        log.append(("all_reduce", self.compiles, self.group))
        return all_reduce(self, x)

    def warmed(self, *args):
        time.sleep(warm_up_delay)
        log.append(("warm_up", threading.get_ident()))
        return warm_up(self, *args)
    patch(evaluate, "attention_plan", lambda *a: ("blocks", "around-attention"))
    patch(load, "choose_attention", lambda *a: (BlockAttention(), "around-attention"))
    patch(torch, "compile", lambda f, **k: f)
    patch(Model, "target_logprobs", scored)
    patch(Model, "_all_reduce", reduced)
    patch(Model, "warm_up", warmed)
    return log


def warm_start(ctx: Context, folder: Path, work, eager_batches: int) -> tuple:
    """`score_worker` with a model that compiles (`compiling_as_on_a_gpu`) and a warm start of
    `eager_batches`: (rank 0's result, every rank's log with its groups named "spare" or "tp")."""
    from llamafuse.formats import load_manifest
    from llamafuse.runtime import evaluate
    log = compiling_as_on_a_gpu(setattr)
    settings = evaluate.Settings(300, progress=False, eager_batches=eager_batches)
    result = evaluate.score_worker(ctx, folder, load_manifest(folder), settings, lambda: (work,))
    name = {id(ctx.spare): "spare", id(ctx.tp_group): "tp"}
    mine = [(e[0], e[1], name.get(id(e[2]), "other")) if e[0] == "all_reduce" else e for e in log]
    seen: list = [None] * ctx.world
    dist.all_gather_object(seen, mine)
    return result, seen
