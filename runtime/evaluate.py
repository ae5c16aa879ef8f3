"""Score (context, continuation) requests with a loaded model.

Requests come in groups (a HellaSwag item's four endings, one lm-eval request) that are packed
whole into prefix-forest batches, so every shared prefix is computed once; each request gets
the summed log-likelihood of its continuation and whether every continuation token was the
model's greedy choice. Batches are queued on the device one ahead of reading results back.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, fields
from itertools import chain
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from llamafuse.formats import LlamafuseError, Manifest

from .load import (THREADS, Part, RankBytes, check_device, load_rank, new_model, placeholder_layer, read_rank,
                   swap_parts)
from .model import Model
from .packing import Batch, make_batch, pack_groups, prefix_forest, to_device
from .parallel import Context, connect, device_threads, peers_reachable, together


@dataclass(frozen=True)
class Request:
    """Score `continuation` after `context` (token ids; both non-empty)."""
    context: tuple[int, ...]
    continuation: tuple[int, ...]

    @property
    def inputs(self) -> list[int]:
        """What the model runs: the context and the continuation less its last token."""
        return [*self.context, *self.continuation[:-1]]


@dataclass(frozen=True)
class Group:
    """Requests scored in one batch and reported together; `key` is the caller's id for them."""
    key: int
    requests: tuple[Request, ...]


Score = tuple[float, bool]   # (log-likelihood of the continuation, all of its tokens greedy)
Sink = Callable[[list[Group], list[list[Score]]], None]  # told of each finished batch (replica leaders)


@dataclass(frozen=True)
class Settings:
    batch_tokens: int
    attention: str = "auto"      # "auto", "blocks" (SDPA + mask, any device) or "flex" (sm80+)
    progress: bool = True
    label: str = "scoring"       # progress bar title
    unit: str = "item"           # what a group is called in progress and messages
    load_threads: int = THREADS  # threads reading the weights onto each GPU


@dataclass(frozen=True)
class Ready:
    """How the ranks got their model ready, in seconds (across ranks: the slowest's of each)."""
    rank_start_s: float = 0.0   # from the ranks' start until every rank ran its worker (spawned: the
                                # interpreter, imports, the process group)
    build_s: float = 0.0        # building the model (importing the compile stack where it compiles)
    load_s: float = 0.0         # weights onto the device (replicas on GPUs: this rank's part of them)
    swap_s: float = 0.0         # replicas on GPUs: swapping the parts they read, once all have compiled
    compile_s: float = 0.0      # compiling kernels on a filler batch, while the weights load
    total_s: float = 0.0        # from the ranks' start until every rank's model was ready

    @staticmethod
    def slowest(ranks: Sequence[Ready]) -> Ready:
        return Ready(*(max(getattr(r, f.name) for r in ranks) for f in fields(Ready)))


@dataclass(frozen=True)
class RunResult:
    """What a run returns on global rank 0."""
    scores: dict[int, list[Score]]   # group key -> one Score per request
    ready: Ready
    eval_s: float                    # all batches
    tokens: int                      # forest tokens run (filler excluded)
    replicas: int
    device: str


class Prepared(NamedTuple):
    batch: Batch
    rows: torch.Tensor     # [T] per scored token: its row among batch.select
    targets: torch.Tensor  # [T] the token it scores
    slot: torch.Tensor     # [T] its request, numbered across the batch's groups
    tokens: int            # tokens in the forest (without filler)


def prepare(groups: Sequence[Group], pad_to: int | None = None) -> Prepared:
    """The packed batch of some groups and what to score in it.

    A continuation is scored at the context's last token and at its own tokens but the last;
    requests that share a prefix share those rows.
    """
    reqs = [r for g in groups for r in g.requests]
    forest = prefix_forest([r.inputs for r in reqs])
    row_of: dict[int, int] = {}
    rows, targets, slot = [], [], []
    for j, r in enumerate(reqs):
        path = forest.index[j]
        for t in range(len(r.continuation)):
            rows.append(row_of.setdefault(path[len(r.context) - 1 + t], len(row_of)))
        targets += r.continuation
        slot += [j] * len(r.continuation)
    return Prepared(make_batch(forest, list(row_of), pad_to),
                    *(torch.tensor(x, dtype=torch.long) for x in (rows, targets, slot)), len(forest))


def check_requests(requests: Sequence[Request], names: Sequence[str], max_len: int) -> None:
    """Every request has tokens to score and fits the model's rotary tables; `names[i]` says where
    request i comes from (a longer one is refused where the harness's hf backend would cut the
    context's left end)."""
    for r, name in zip(requests, names):
        if not r.context or not r.continuation:
            raise LlamafuseError(f"{name}: a request needs a non-empty context and continuation (in tokens)")
    long = [(len(r.inputs), name) for r, name in zip(requests, names) if len(r.inputs) > max_len]
    if long:
        n, name = max(long)
        raise LlamafuseError(f"{name}: {n} positions, the model's rotary tables cover {max_len} "
                             f"({len(long)} of {len(requests)} requests are too long)")


class Readback:
    """A device result copied to the host as soon as its own work is done.

    `.cpu()` later would be queued behind everything enqueued since, so reading batch k while
    batch k+1 runs would wait for k+1 as well and leave the GPU idle while the host builds k+2.
    """

    def __init__(self, t: torch.Tensor):
        if t.device.type == "cuda":
            self.host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            self.host.copy_(t, non_blocking=True)
            self.done: torch.cuda.Event | None = torch.cuda.Event()
            self.done.record()
        else:
            self.host, self.done = t, None

    def get(self) -> torch.Tensor:
        if self.done is not None:
            self.done.synchronize()
        return self.host


def score_batch(model: Model, groups: Sequence[Group], device: torch.device,
                pad_to: int | None = None) -> tuple[Readback, int]:
    """[requests, 2] float64 (log-likelihood, tokens that were not the greedy choice) on its way
    to the host, and the tokens run. Nothing here waits for the device."""
    p = prepare(groups, pad_to)
    rows, targets, slot = (to_device(x, device) for x in (p.rows, p.targets, p.slot))
    lp, greedy = model.target_logprobs(p.batch.to(device), rows, targets)
    n = sum(len(g.requests) for g in groups)
    out = torch.zeros(n, 2, dtype=torch.float64, device=device)
    out.index_add_(0, slot, torch.stack([lp.double(), (~greedy).double()], 1))
    return Readback(out), p.tokens


class GroupTable(Sequence[Group]):
    """Groups in four flat arrays, rebuilt one at a time when indexed: how `plan` hands them to the
    ranks. Arrays pickle as a few buffers; the full HellaSwag split as Group objects took each rank
    0.45 s of unpickling on this project's CPU, GIL-bound beside its compile-stack import."""

    def __init__(self, groups: Sequence[Group]):
        requests = [r for g in groups for r in g.requests]
        self.keys = np.array([g.key for g in groups], dtype=np.int64)                          # [G]
        self.first = np.cumsum([0] + [len(g.requests) for g in groups], dtype=np.int64)   # [G+1] into requests
        self.split = np.array([len(r.context) for r in requests], dtype=np.int64)         # [R] context lengths
        self.start = np.cumsum([0] + [len(r.context) + len(r.continuation) for r in requests],
                               dtype=np.int64)                                            # [R+1] into tokens
        self.tokens = np.fromiter(chain.from_iterable(chain(r.context, r.continuation) for r in requests),
                                  dtype=np.int32, count=int(self.start[-1]))              # [T]

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> Group:  # type: ignore[override]  # no slices
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        a, b = self.first[i], self.first[i + 1]
        base = int(self.start[a])
        toks = self.tokens[base:self.start[b]].tolist()
        cuts = (self.start[a:b + 1] - base).tolist()
        ctx = (self.split[a:b] + self.start[a:b] - base).tolist()
        return Group(int(self.keys[i]), tuple(Request(tuple(toks[s:c]), tuple(toks[c:e]))
                                              for s, c, e in zip(cuts, ctx, cuts[1:])))


@dataclass(frozen=True)
class Work:
    """What `score_worker`'s ranks are handed once the caller has the data (see `plan`)."""
    groups: Sequence[Group]       # the groups to score: those whose key `skip` lacks
    batches: list[list[int]]      # indices into groups, one list per batch
    skip: frozenset[int]          # keys already scored (resumed), not in groups
    sink: Sink | None = None


def plan(groups: Sequence[Group], skip: frozenset[int], batch_tokens: int, sink: Sink | None = None) -> Work:
    """The groups not in `skip` (as a `GroupTable`), packed into batches of `batch_tokens`. The
    caller plans, in its own process, which waits while the ranks load, rather than every rank
    beside its load and compile (packing the full HellaSwag split: 0.8 s of Python on this
    project's CPU)."""
    todo = [g for g in groups if g.key not in skip]
    return Work(GroupTable(todo), pack_groups([[r.inputs for r in g.requests] for g in todo], batch_tokens),
                skip, sink)


def score_worker(ctx: Context, folder: Path, manifest: Manifest, settings: Settings,
                 later: Callable[[], tuple[Work]]) -> RunResult | None:
    """Every rank runs this (a `parallel.start` worker): load the model, then score the work's
    batches (replanned if global rank 0 skips other keys); the result on global rank 0. A thread
    loads the weights and compiles the kernels while this one waits for the work (`later`: the
    caller reads, tokenizes and plans meanwhile)."""
    rank_start_s = time.time() - ctx.launched
    title = f"{settings.label} x{ctx.replicas}" if ctx.replicas > 1 else settings.label
    bar = tqdm(unit=settings.unit, dynamic_ncols=True, mininterval=1.0, delay=2.0,
               disable=not (settings.progress and ctx.is_main), desc=f"{title}: loading weights")
    try:
        with device_threads(ctx.device) as pool:
            readying = pool.submit(_ready_model, ctx, folder, manifest, settings, bar, title, rank_start_s)
            work, = later()
            model, ready = readying.result()
        if ctx.world > 1:  # under torchrun only rank 0 has read the samples file: its skip counts
            box = [work.skip]
            dist.broadcast_object_list(box, src=0, group=ctx.control)   # after the start-up's, never beside them
            if box[0] != work.skip:
                work = plan(work.groups, box[0], settings.batch_tokens, work.sink)
        bar.set_description_str(title, refresh=False)
        return score_groups(ctx, model, work.groups, settings, work.sink, work.batches, bar, ready)
    finally:
        bar.close()


def _ready_model(ctx: Context, folder: Path, manifest: Manifest, settings: Settings, bar: tqdm,
                 title: str, rank_start_s: float) -> tuple[Model, Ready]:
    """The model with its weights on the device and its kernels compiled: a thread reads the
    weights while this one builds the model (importing the compile stack) and compiles on
    placeholder weights, so loading overlaps both.

    On GPUs, NCCL builds a group's communicator at its first collective (1-2 s, run 21). The group
    whose first collective comes next (tp > 1: the compile's all-reduces; replicas: their swap)
    has it built in a thread from the start, beside the compile stack's import and the read.

    Replicas of a tp 1 model on GPUs that reach each other directly (`peers_reachable`) share the
    reading: each reads its part of the one rank file and the GPUs swap parts once every rank
    compiled, so the host copies the file once, not once per GPU (run 20: two replicas copied
    65 GB each, ~46 GB/s in all). With tp > 1 each rank reads its whole file: the replicas'
    communicator would be built beside the tp group's, and two built side by side could wait on
    each other; built after it, it would cost its seconds on the way."""
    check_device(ctx, manifest)
    t0 = time.perf_counter()
    part, first = _reading_plan(ctx)
    connected = connect(first, ctx.device) if first is not None else None

    def load() -> tuple[dict[str, torch.Tensor] | RankBytes, float]:
        n = settings.load_threads
        got = (read_rank(folder, manifest, ctx.tp_rank, ctx.device, n, part) if part
               else load_rank(folder, manifest, ctx.tp_rank, ctx.device, n))
        if ctx.device.type == "cuda":
            torch.cuda.synchronize(ctx.device)
        return got, time.perf_counter() - t0

    with device_threads(ctx.device) as pool:
        loading = pool.submit(load)
        model = new_model(ctx, manifest, settings.attention)
        build_s = time.perf_counter() - t0
        if ctx.tp > 1 and connected:
            connected()   # before the tp group's first collective (the compile's or the first batch's)
        compile_s = 0.0
        if model.compiles:
            bar.set_description_str(f"{title}: loading weights and compiling (minutes on a fresh machine, "
                                    "cached afterwards)")
            t1 = time.perf_counter()
            model.warm_up(settings.batch_tokens, placeholder_layer(manifest, ctx.device))
            if ctx.device.type == "cuda":
                torch.cuda.synchronize(ctx.device)
            compile_s = time.perf_counter() - t1
        loaded, load_s = together(ctx, loading.result)   # after every rank compiled: collectives matched
    swap_s = 0.0
    if isinstance(loaded, RankBytes):
        t2 = time.perf_counter()
        connected()
        swap_parts(loaded.data, part, ctx.peers)
        torch.cuda.synchronize(ctx.device)
        swap_s = time.perf_counter() - t2
        loaded = loaded.tensors()
    model.w = loaded
    return model, Ready(rank_start_s=rank_start_s, build_s=build_s, load_s=load_s, swap_s=swap_s,
                        compile_s=compile_s, total_s=time.time() - ctx.launched)


def _reading_plan(ctx: Context) -> tuple[Part | None, dist.ProcessGroup | None]:
    """(the part of its rank file this rank reads, None for all of it; the group whose NCCL
    communicator to build from the start, if any): see `_ready_model`."""
    if ctx.device.type != "cuda":
        return None, None
    if ctx.tp > 1:
        return None, ctx.tp_group
    if ctx.peers is not None and peers_reachable(ctx):
        return Part(ctx.replica, ctx.replicas), ctx.peers
    return None, None


def score_groups(ctx: Context, model: Model, groups: Sequence[Group], settings: Settings, sink: Sink | None = None,
                 batches: list[list[int]] | None = None, bar: tqdm | None = None,
                 ready: Ready = Ready()) -> RunResult | None:
    """Score this replica's share of `batches` (indices of `groups`; packed here if None);
    global rank 0 gets everyone's scores."""
    pad_to = settings.batch_tokens if model.attention.fixed_shape else None
    if batches is None:
        batches = pack_groups([[r.inputs for r in g.requests] for g in groups], settings.batch_tokens)
    mine = batches[ctx.replica::ctx.replicas]
    leader = ctx.tp_rank == 0
    own_bar = bar is None
    if own_bar:
        bar = tqdm(unit=settings.unit, dynamic_ncols=True, mininterval=1.0, desc=settings.label,
                   disable=not (settings.progress and ctx.is_main))
    bar.total = sum(len(b) for b in mine)   # this replica's share (no refresh: the bar may be delayed)
    scores: dict[int, list[Score]] = {}
    done_tokens = 0
    t1 = time.perf_counter()

    def collect(gs: list[Group], result: Readback, tokens: int) -> None:
        nonlocal done_tokens
        per_group = _split(gs, result.get().tolist())    # waits for this batch only
        bad = sorted(g.key for g, s in zip(gs, per_group) if not all(math.isfinite(ll) for ll, _ in s))
        if bad:
            raise LlamafuseError(f"non-finite log-likelihoods (NaN or inf) for {settings.unit}(s) "
                                 f"{', '.join(map(str, bad[:5]))}{' ...' if len(bad) > 5 else ''}: "
                                 "the model's numbers overflow; no score is reported")
        for g, s in zip(gs, per_group):
            scores[g.key] = s
        if leader and sink is not None:
            sink(gs, per_group)
        done_tokens += tokens
        bar.update(len(gs))
        bar.set_postfix_str(f"{done_tokens / (time.perf_counter() - t1):,.0f} tok/s", refresh=False)

    pending = None
    try:
        for b in mine:
            gs = [groups[i] for i in b]
            result, tokens = score_batch(model, gs, ctx.device, pad_to)  # queued on the device
            if pending:
                collect(*pending)                        # the previous batch, while this one runs
            pending = (gs, result, tokens)
        if pending:
            collect(*pending)
    except torch.cuda.OutOfMemoryError:
        raise LlamafuseError(f"out of GPU memory at --batch-tokens {settings.batch_tokens}; "
                             f"try --batch-tokens {settings.batch_tokens // 2}") from None
    finally:
        if own_bar:
            bar.close()
    mine_result = RunResult(scores if leader else {}, ready, time.perf_counter() - t1,
                            done_tokens if leader else 0, ctx.replicas, str(ctx.device))
    if ctx.world == 1:
        return mine_result
    gathered: list[RunResult] | None = [mine_result] * ctx.world if ctx.is_main else None
    dist.gather_object(mine_result, gathered, dst=0, group=ctx.control)
    if not ctx.is_main:
        return None
    return RunResult({k: v for g in gathered for k, v in g.scores.items()},
                     Ready.slowest([g.ready for g in gathered]), max(g.eval_s for g in gathered),
                     sum(g.tokens for g in gathered), ctx.replicas, str(ctx.device))


def _split(groups: Sequence[Group], flat: list[list[float]]) -> list[list[Score]]:
    out, i = [], 0
    for g in groups:
        n = len(g.requests)
        out.append([(ll, misses == 0) for ll, misses in flat[i:i + n]])
        i += n
    return out
