"""Process groups: one process per rank, started by llama-run itself or by torchrun.

`start(worker, ..., *early)` starts the ranks at once; `Ranks.run(*late)` hands them the rest of
their arguments (the data, read and tokenized meanwhile) and returns global rank 0's result. A
worker is called `worker(ctx, *early, later)`, where `later()` waits for the late arguments, so a
rank can load its weights and compile before its data exists. `launch` is both in one call.

World = replicas x tp. Ranks [r*tp, (r+1)*tp) form replica r's tensor-parallel group; each
replica scores its own share of the batches (data parallel).

Ranks started here are forked from this process where that is safe (GPU ranks; see
`_start_method`), which spares each a new interpreter and its imports, else spawned. They run
under torch.multiprocessing's ProcessContext, whose join raises as soon as one exits non-zero and
ends the others. Each rank leaves a report in a private folder (rank 0's holds the result), so
however a rank ends the parent names it in one line and never waits on a pipe. Ranks die with the
parent (PR_SET_PDEATHSIG, even when it is SIGKILLed); SIGINT or SIGTERM to the parent kills every
rank and raises `Interrupted`; Ctrl-C in a terminal (SIGINT to the whole process group) ends the
ranks silently.
"""
from __future__ import annotations

import ctypes
import gc
import logging
import multiprocessing
import os
import pickle
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing import resource_tracker
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TypeVar

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessContext, ProcessException

from llamafuse.formats import LlamafuseError
from llamafuse.formats.interrupts import STOP_SIGNALS, Interrupted, interrupts, on_stop_signals

T = TypeVar("T")

# Never let NCCL/PyTorch use NVLink multicast (it can take a shared host's GPUs down).
SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
# A rank whose collective failed (most likely because a peer died) waits this long before it
# reports, so that the parent sees and names the rank that failed first and ends this one.
PEER_GRACE_S = 5.0
PR_SET_PDEATHSIG = 1


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
    launched: float                # time.time() when the ranks were started
    control: dist.ProcessGroup | None = None   # all ranks over gloo, for small messages (see _make_context)
    peers: dist.ProcessGroup | None = None     # the ranks of this tp rank, one per replica (they load one file)
    spare: dist.ProcessGroup | None = None     # tp > 1: tp_group's ranks again, a communicator of their own for
                                               # the warm start's uncompiled batches (see load.eager_model)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _make_context(rank: int, world: int, tp: int, device_type: str, local_rank: int, launched: float) -> Context:
    device = torch.device("cuda", local_rank) if device_type == "cuda" else torch.device("cpu")
    if device_type == "cuda":
        torch.cuda.set_device(device)
    replica_ranks = [list(range(r * tp, (r + 1) * tp)) for r in range(world // tp)]   # each replica's tp group
    tp_group = control = None
    if world > 1:
        tp_group = [dist.new_group(ranks) for ranks in replica_ranks][rank // tp]
        # Errors, skip sets and results go over the CPU, so NCCL carries only the model's tensors and
        # never builds a communicator of all ranks (on GPUs: a second of start-up, after loading).
        control = dist.new_group(backend="gloo")
    peers = spare = None
    if world > tp:
        peers = [dist.new_group(list(range(t, world, tp))) for t in range(tp)][rank % tp]
    if tp > 1:   # made last, so the groups above keep their names (the compiled block names tp_group's)
        spare = [dist.new_group(ranks) for ranks in replica_ranks][rank // tp]
    return Context(rank, world, tp, device, tp_group, rank % tp, rank // tp, world // tp, launched, control, peers,
                   spare)


def device_threads(device: torch.device, workers: int = 1) -> ThreadPoolExecutor:
    """Worker threads that run on `device`. CUDA's current device is per thread and a new thread
    starts on cuda:0, where a collective (NCCL places its buffers there), a pinned buffer or a
    kernel launch would otherwise land: every thread of a rank is started here."""
    if device.type != "cuda":
        return ThreadPoolExecutor(workers)
    return ThreadPoolExecutor(workers, initializer=torch.cuda.set_device, initargs=(device,))


def peers_reachable(ctx: Context) -> bool:
    """Whether this rank's GPU reaches its peers' GPUs (`Context.peers`) directly: all on this
    host (a rank's GPU is its local rank's) and CUDA peer access between them (NVLink, or PCIe
    where enabled). Otherwise what they send each other goes through host memory or a network."""
    if ctx.device.type != "cuda" or int(os.environ.get("LOCAL_WORLD_SIZE", ctx.world)) != ctx.world:
        return False
    return all(torch.cuda.can_device_access_peer(ctx.device, torch.device("cuda", r))
               for r in range(ctx.tp_rank, ctx.world, ctx.tp) if r != ctx.rank)


class Connections:
    """The groups' communicators, built one after another in the order given (NCCL builds a
    group's at its first collective: ~1-2 s on the H200s, run 21) in a thread of their own, on a
    stream of their own: their first collectives wait on no other work of the GPU (such as a warm
    start's batches, which wait on another communicator). A daemon thread: a rank that fails while
    a peer never connects is not held open by it. Every rank of a group must build it in the same
    order relative to its other groups."""

    def __init__(self, groups: Sequence[dist.ProcessGroup], device: torch.device):
        self._done: list[tuple[dist.ProcessGroup, Future[None]]] = [(g, Future()) for g in groups]
        if self._done:   # a lone GPU or CPU ranks: no thread, no stream
            threading.Thread(target=self._run, args=(device,), daemon=True, name="connect").start()

    def _run(self, device: torch.device) -> None:
        side = nullcontext()
        if device.type == "cuda":
            torch.cuda.set_device(device)
            side = torch.cuda.stream(torch.cuda.Stream(device))
        with side:
            for group, done in self._done:
                try:
                    dist.all_reduce(torch.zeros(1, device=device), group=group)
                    done.set_result(None)
                except BaseException as e:  # noqa: BLE001 - handed to whoever waits
                    for _, left in self._done:
                        if not left.done():
                            left.set_exception(e)
                    return

    def wait(self, group: dist.ProcessGroup | None) -> None:
        """Until `group`'s communicator is built (at once for a group not built here)."""
        for g, done in self._done:
            if g is group:
                done.result()


def together(ctx: Context, fn: Callable[[], T]) -> T:
    """fn() on every rank; a LlamafuseError on any rank raises the lowest rank's message on all of
    them (so one rank's failure stops all, no hang)."""
    error = result = None
    try:
        result = fn()
    except LlamafuseError as e:
        error = str(e)
    if ctx.world > 1:
        errors: list[str | None] = [None] * ctx.world
        dist.all_gather_object(errors, error, group=ctx.control)
        error = next((e for e in errors if e is not None), None)
    if error:
        raise LlamafuseError(error)
    return result


# ---------------------------------------------------------------- inside a spawned rank


def _die_with_parent(parent: int) -> None:
    """SIGKILL this process when the parent dies; exit now if it already has."""
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)


def _in_collective(e: BaseException) -> bool:
    """Whether `e` came out of torch.distributed (typically: a peer went away mid-collective)."""
    tb = e.__traceback__
    while tb is not None:
        if tb.tb_frame.f_globals.get("__name__", "").startswith("torch.distributed"):
            return True
        tb = tb.tb_next
    return False


def _describe(e: BaseException) -> str:
    """`Type: first line of the message (file.py:line)`, the line being where it was raised."""
    lines = str(e).strip().splitlines()
    where = traceback.extract_tb(e.__traceback__)[-1:]
    at = f" ({Path(where[0].filename).name}:{where[0].lineno})" if where else ""
    return f"{type(e).__name__}{': ' + lines[0] if lines else ''}{at}"


def _publish(reports: Path, name: str, obj: Any, world: int) -> None:
    """Pickle `obj` to `name-R` for every rank R: one file, a hard link each, so that each link
    appears whole (a rank waiting for it never reads part of it) and a rank removes its own."""
    (reports / name).write_bytes(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))
    for r in range(world):
        os.link(reports / name, reports / f"{name}-{r}")
    (reports / name).unlink()


def _take(reports: Path, name: str, rank: int, wait: bool = False) -> Any:
    """This rank's copy of what `_publish` wrote (waiting for it if asked), removed once read."""
    path = reports / f"{name}-{rank}"
    while wait and not path.exists():
        time.sleep(0.005)   # the parent writes it or ends this rank (and dies with it, see _die_with_parent)
    obj = pickle.loads(path.read_bytes())
    path.unlink()
    return obj


@dataclass
class _Later:
    """A started rank's late arguments, waited for and read on the first call."""
    reports: Path
    rank: int
    args: tuple | None = None

    def __call__(self) -> tuple:
        if self.args is None:
            self.args = _take(self.reports, "late", self.rank, wait=True)
        return self.args


def _entry(rank: int, world: int, tp: int, device_type: str, port: int, reports: str, parent: int,
           launched: float, forked: bool) -> None:
    """One started rank: run the job's worker, leave a report (kind, payload) for the parent, exit."""
    _die_with_parent(parent)
    for signum in STOP_SIGNALS:   # Ctrl-C ends a rank silently, the parent reports (a forked rank had its handlers)
        signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # held back while starting, see _held_back
    # A rank starts no processes. With fork as its default, a lock it makes (tqdm makes one) is
    # unlinked at once instead of being registered with the parent's resource tracker, which
    # would warn about it on stderr when the rank is killed.
    multiprocessing.set_start_method("fork", force=True)
    os.environ.update(SAFE_ENV)
    if forked:    # OpenMP hangs in a child forked after the parent used its thread pool, unless it stays at one
        torch.set_num_threads(1)
    elif device_type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    try:
        worker, early = _take(Path(reports), "job", rank)
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                                rank=rank, world_size=world, timeout=timedelta(minutes=30))
        ctx = _make_context(rank, world, tp, device_type, rank, launched)
        result = worker(ctx, *early, _Later(Path(reports), rank))
        outcome = ("ok", pickle.dumps(result if rank == 0 else None, protocol=pickle.HIGHEST_PROTOCOL))
    except LlamafuseError as e:
        outcome = ("error", str(e))
    except BaseException as e:  # noqa: BLE001 - any failure becomes one line in the parent
        lost = _in_collective(e)
        if lost:
            time.sleep(PEER_GRACE_S)
        outcome = ("lost" if lost else "crash", _describe(e))
    path = Path(reports) / f"rank-{rank}"
    path.with_suffix(".tmp").write_bytes(pickle.dumps(outcome, protocol=pickle.HIGHEST_PROTOCOL))
    os.replace(path.with_suffix(".tmp"), path)      # the parent reads whole reports only
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.exit(0 if outcome[0] == "ok" else 1)


# ---------------------------------------------------------------- in the parent


CUDA_ERROR_NOT_INITIALIZED = 3


def _cuda_driver_initialized() -> bool:
    """Whether this process has initialized the CUDA driver (cuInit): before that, every driver call
    but cuInit answers CUDA_ERROR_NOT_INITIALIZED. No driver, no CUDA: False."""
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return driver.cuDeviceGetCount(ctypes.byref(ctypes.c_int())) != CUDA_ERROR_NOT_INITIALIZED


def _start_method(device_type: str) -> str:
    """Ranks are forked where that is safe, which spares each a new interpreter and importing torch
    (seconds with its CUDA libraries), else spawned.

    Only GPU ranks, whose host work needs no intra-op threads (a child forked after the parent
    used OpenMP's thread pool hangs in its own unless it keeps one thread, which CPU ranks cannot
    afford); only from a single-threaded process (a lock another thread holds would stay locked
    in the child); only before this process initialized the CUDA driver, which a forked child
    cannot use (`options.resolve_device` counts GPUs without initializing it)."""
    if (device_type == "cuda" and sys.platform == "linux" and threading.active_count() == 1
            and not _cuda_driver_initialized()):
        return "fork"
    return "spawn"


def _read_report(reports: Path, rank: int) -> tuple[str, Any] | None:
    path = reports / f"rank-{rank}"
    return pickle.loads(path.read_bytes()) if path.is_file() else None


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _failure(pc: ProcessContext, reports: Path, first: int) -> str:
    """One line on why the run failed; `first` is the rank that ProcessContext saw fail first."""
    report = _read_report(reports, first)
    if report is None or report[0] == "ok":
        code = pc.processes[first].exitcode
        return (f"rank {first} was killed by {_signal_name(-code)}" if code < 0
                else f"rank {first} exited with code {code} before finishing")
    kind, message = report
    if kind == "lost":
        return f"rank {first} lost contact with the other ranks: {message}"
    return message if kind == "error" else f"rank {first} crashed: {message}"


def _check_quitters(pc: ProcessContext, reports: Path) -> None:
    """A rank that exits with code 0 without a report does not trip ProcessContext, and the
    others could wait for it until their timeout (30 minutes at start-up)."""
    gone = next((r for r, p in enumerate(pc.processes) if p.exitcode == 0 and _read_report(reports, r) is None), None)
    if gone is not None:
        raise LlamafuseError(f"rank {gone} exited before finishing (code 0)")


def _kill(pc: ProcessContext) -> None:
    for p in pc.processes:
        if p.is_alive():
            p.kill()
    for p in pc.processes:
        p.join()


@contextmanager
def _held_back(caught: list[int]) -> Iterator[None]:
    """While the ranks start: SIGINT and SIGTERM are recorded, not raised (a start cut short would
    lose the processes already running), and blocked in this thread, so the ranks inherit them
    blocked: a Ctrl-C that reaches a rank still importing torch cannot print a traceback there."""
    resource_tracker.ensure_running()  # started lazily, it would unblock both signals in this thread
    with on_stop_signals(lambda signum, frame: caught.append(signum)):
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            yield
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)


@contextmanager
def _frozen() -> Iterator[None]:
    """Within: this process's objects sit in the garbage collector's permanent generation, so a
    rank forked meanwhile never scans what it inherited (nor copies the pages on write): its
    collections while it imports the compile stack look at its own objects only (run 17: a rank
    was ready 1.2 s sooner). A spawned rank inherits nothing either way."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@contextmanager
def _spawn_log_quiet() -> Iterator[None]:
    """ProcessContext logs a warning for each rank it ends; the one-line error says it all."""
    log = logging.getLogger("torch.multiprocessing.spawn")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


class Ranks:
    """The ranks `start` began. `launched` is time.time() when they were started; None until then
    (ranks that run in this process start when `run` is called)."""
    launched: float | None = None

    def run(self, *late: Any) -> Any:
        """Hand every rank the late arguments; global rank 0's result (None on other ranks under
        torchrun). Call once."""
        raise NotImplementedError


class _InProcess(Ranks):
    """The only rank, or this process's rank under torchrun: the worker runs in `run`."""

    def __init__(self, worker: Callable[..., Any], early: tuple, device_type: str, tp: int):
        self.worker, self.early, self.device_type, self.tp = worker, early, device_type, tp

    def run(self, *late: Any) -> Any:
        self.launched = time.time()
        rank = launched_rank()
        if rank is None:
            ctx = _make_context(0, 1, 1, self.device_type, 0, self.launched)
            return self.worker(ctx, *self.early, lambda: late)
        world = int(os.environ["WORLD_SIZE"])
        if world % self.tp:
            raise LlamafuseError(f"torchrun started {world} processes, not a multiple of the model's tp {self.tp}")
        own = not dist.is_initialized()
        if own:
            dist.init_process_group("nccl" if self.device_type == "cuda" else "gloo")
        try:
            ctx = _make_context(rank, world, self.tp, self.device_type, int(os.environ.get("LOCAL_RANK", rank)),
                                self.launched)
            return self.worker(ctx, *self.early, lambda: late)
        finally:
            if own:  # left to interpreter teardown, gloo's threads can abort the process after success
                dist.destroy_process_group()


class _Started(Ranks):
    """Rank processes started by `_start_processes`, waiting for their late arguments."""

    def __init__(self, pc: ProcessContext, reports: Path, launched: float):
        self.pc, self.reports, self.launched = pc, reports, launched

    def run(self, *late: Any) -> Any:
        """Returns once every rank has left its report, without waiting for their teardown (the
        process group's and the interpreter's: seconds on GPUs): they are killed now, and
        `_start_processes` reaps them when the block ends."""
        world = len(self.pc.processes)
        _publish(self.reports, "late", late, world)
        try:
            while not self.pc.join(timeout=0.02):
                _check_quitters(self.pc, self.reports)
                if all((self.reports / f"rank-{r}").is_file() for r in range(world)):
                    break
        except ProcessException as e:  # every rank has been ended and joined
            raise LlamafuseError(_failure(self.pc, self.reports, e.error_index)) from None
        for p in self.pc.processes:   # the kernel frees their memory while the caller reports
            if p.is_alive():
                p.kill()
        reports = [_read_report(self.reports, r) for r in range(world)]
        failed = next((r for r, (kind, _) in enumerate(reports) if kind != "ok"), None)
        if failed is not None:
            raise LlamafuseError(_failure(self.pc, self.reports, failed))
        return pickle.loads(reports[0][1])


@contextmanager
def _start_processes(worker: Callable[..., Any], world: int, tp: int, device_type: str,
                     early: tuple) -> Iterator[Ranks]:
    """Start `world` rank processes (forked or spawned: see `_start_method`); ranks still running
    when the block ends are killed. Each rank reads the job and later its late arguments from its
    own link to a file in the reports folder: passed as process arguments to spawned ranks they
    would go down each rank's start pipe, and the parent would wait on every rank in turn to import
    its modules before it could start the next."""
    with tempfile.TemporaryDirectory(prefix="llamafuse-ranks-") as folder, _spawn_log_quiet():
        reports, caught, pc = Path(folder), [], None
        _publish(reports, "job", (worker, early), world)
        method = _start_method(device_type)
        launched = time.time()
        try:
            with _held_back(caught), _frozen():
                pc = mp.start_processes(_entry, (world, tp, device_type, _free_port(), folder, os.getpid(), launched,
                                                 method == "fork"), nprocs=world, join=False, start_method=method)
            if caught:
                raise Interrupted(caught[0])
            yield _Started(pc, reports, launched)
        finally:
            if pc is not None:
                _kill(pc)


def launched_rank() -> int | None:
    """This process's global rank when torchrun started it, else None."""
    return int(os.environ["RANK"]) if "WORLD_SIZE" in os.environ and "RANK" in os.environ else None


@contextmanager
def start(worker: Callable[..., Any], tp: int, replicas: int, device_type: str, *early: Any) -> Iterator[Ranks]:
    """Start the ranks for `worker(ctx, *early, later)`; `.run(*late)` on what this yields finishes
    the job. A LlamafuseError on any rank, or any rank failing, raises LlamafuseError from `run`;
    SIGINT or SIGTERM raises Interrupted once every rank is gone; ranks still running when the
    block ends are killed.

    Under torchrun (WORLD_SIZE set) this process is one rank; otherwise the ranks are started here
    now, forked or spawned (or, for a single rank, run in this process when `run` is called).
    """
    os.environ.update(SAFE_ENV)
    with interrupts():
        if launched_rank() is not None or tp * replicas == 1:
            yield _InProcess(worker, early, device_type, tp)
        else:
            with _start_processes(worker, tp * replicas, tp, device_type, early) as ranks:
                yield ranks


@dataclass(frozen=True)
class _AllNow:
    """A worker that takes all its arguments at once, as a `start` worker."""
    worker: Callable[..., Any]

    def __call__(self, ctx: Context, later: Callable[[], tuple]) -> Any:
        return self.worker(ctx, *later())


def launch(worker: Callable[..., Any], tp: int, replicas: int, device_type: str, *args: Any) -> Any:
    """Run `worker(ctx, *args)` on every rank: `start` and `run` at once."""
    with start(_AllNow(worker), tp, replicas, device_type) as ranks:
        return ranks.run(*args)
