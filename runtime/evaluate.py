"""Score (context, continuation) requests with a loaded model.

Requests come in groups (a HellaSwag item's four endings, one lm-eval request) that are packed
whole into prefix-forest batches, so every shared prefix is computed once; each request gets
the summed log-likelihood of its continuation and whether every continuation token was the
model's greedy choice. Batches are queued on the device one ahead of reading results back.
"""
from __future__ import annotations

import math
import sys
import time
from concurrent.futures import Executor
from contextlib import nullcontext
from dataclasses import dataclass, fields, replace
from itertools import chain
from pathlib import Path
from typing import Callable, NamedTuple, Sequence, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from llamafuse.formats import LlamafuseError, Manifest

from .attention import attention_plan
from .load import (THREADS, Part, RankBytes, check_device, eager_model, load_rank, new_model, placeholder_layer,
                   read_rank, swap_parts)
from .model import Model
from .packing import Batch, make_batch, pack_groups, prefix_forest, to_device
from .parallel import Connections, Context, device_threads, peers_reachable, together


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


# The warm start's batches per replica: a fixed count, so that which batches run uncompiled never
# depends on timing and a run's scores are the same every time. At the 30B shape a warm rank's
# compiled model is ready ~3 s after its weights (run 24), while an uncompiled batch took 1.7-2.7x a
# compiled one's time beside the compiling thread (run 26): one batch fits that window, two do not.
EAGER_BATCHES = 1
# The interpreter's switch interval during the warm start. Every torch op releases the GIL, and
# getting it back from a thread running Python (the compiling one) takes up to this interval: at
# the default 5 ms, the ~50 ops of an uncompiled layer would wait longer than the GPU takes for it.
EAGER_SWITCH_S = 0.00025

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
    eager_batches: int = EAGER_BATCHES  # where the model compiles: the first batches of each replica,
                                        # scored uncompiled while the compiler gets ready (the warm start)


@dataclass(frozen=True)
class Ready:
    """How the ranks got their model ready, in seconds (across ranks: the slowest's of each)."""
    rank_start_s: float = 0.0   # from the ranks' start until every rank ran its worker (spawned: the
                                # interpreter, imports, the process group)
    build_s: float = 0.0        # building the model (importing the compile stack where it compiles)
    load_s: float = 0.0         # weights onto the device (replicas on GPUs: this rank's part of them)
    swap_s: float = 0.0         # replicas on GPUs: swapping the parts they read, once all have read theirs
    compile_s: float = 0.0      # compiling kernels on a filler batch, while the weights load
    total_s: float = 0.0        # from the ranks' start until every rank's model was ready (the compiled one;
                                # with the warm start: when it took over, after the uncompiled batches)
    scoring_s: float = 0.0      # from the ranks' start until every rank began scoring (the warm start: once
                                # its weights were on the device, on the uncompiled model)


@dataclass(frozen=True)
class Phases:
    """How a replica's eval time went, in seconds (across ranks: the slowest's of each)."""
    eager_batches: int = 0      # the warm start: batches scored on the uncompiled model
    eager_s: float = 0.0        # scoring them
    wait_s: float = 0.0         # then waiting for the compiled model
    steady_s: float = 0.0       # all of its batches at the rate of the model it ended on (the compiled one):
                                # the eval time without the warm start's slower batches and wait


T = TypeVar("T", Ready, Phases)


def _slowest(ranks: Sequence[T]) -> T:
    """Each field's largest value across the ranks' records."""
    return type(ranks[0])(*(max(getattr(r, f.name) for r in ranks) for f in fields(ranks[0])))


@dataclass(frozen=True)
class RunResult:
    """What a run returns on global rank 0."""
    scores: dict[int, list[Score]]   # group key -> one Score per request
    ready: Ready
    eval_s: float                    # all batches: from when every rank began scoring until the last one ended
    tokens: int                      # forest tokens run (filler excluded)
    replicas: int
    device: str
    phases: Phases = Phases()


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
    batches (replanned if global rank 0 skips other keys); the result on global rank 0.

    Threads load the weights and build and compile the model (`_Startup`) while this one waits for
    the work (`later`: the caller reads, tokenizes and plans meanwhile). Where the model compiles,
    this thread scores each replica's first `settings.eager_batches` batches on the uncompiled
    model (`load.eager_model`) as soon as the weights are on the device, and the rest on the
    compiled one (the warm start)."""
    rank_start_s = time.time() - ctx.launched
    title = f"{settings.label} x{ctx.replicas}" if ctx.replicas > 1 else settings.label
    bar = tqdm(unit=settings.unit, dynamic_ncols=True, mininterval=1.0, delay=2.0,
               disable=not (settings.progress and ctx.is_main), desc=f"{title}: loading weights")
    try:
        with device_threads(ctx.device, 2) as pool:
            startup = _Startup(ctx, folder, manifest, settings, pool, bar, title)
            work, = later()
            if ctx.world > 1:  # under torchrun only rank 0 has read the samples file: its skip counts
                box = [work.skip]
                dist.broadcast_object_list(box, src=0, group=ctx.control)  # this thread makes every control call
                if box[0] != work.skip:
                    work = plan(work.groups, box[0], settings.batch_tokens, work.sink)
            weights = startup.weights()
            ready = Ready(rank_start_s=rank_start_s, load_s=startup.load_s, swap_s=startup.swap_s)

            def compiled() -> tuple[Model, Ready]:
                model, r = startup.model(weights, ready)
                bar.set_description_str(title, refresh=False)
                return model, r
            if startup.warm:
                bar.set_description_str(f"{title}: compiling (minutes on a fresh machine, cached afterwards), "
                                        "scoring uncompiled meanwhile", refresh=False)
                return score_groups(ctx, startup.eager_model(weights), work.groups, settings, work.sink,
                                    work.batches, bar, ready, then=compiled)
            model, ready = compiled()
            return score_groups(ctx, model, work.groups, settings, work.sink, work.batches, bar, ready)
    finally:
        bar.close()


class _Startup:
    """A rank's model on its way: one thread reads the weights while another builds the model
    (importing the compile stack) and compiles it on placeholder weights, so loading overlaps
    both.

    On GPUs, NCCL builds a group's communicator at its first collective (1-2 s, run 21); those
    whose first collective comes during start-up are built from the start beside the import and
    the read (`parallel.Connections`): with tp > 1 the tp group's (the compile's all-reduces) and,
    for a warm start, `ctx.spare` (its batches' all-reduces); replicas their peers' (the swap).

    Replicas of a tp 1 model on GPUs that reach each other directly (`peers_reachable`) share the
    reading: each reads its part of the one rank file and the GPUs swap parts, so the host copies
    the file once, not once per GPU (run 20: two replicas copied 65 GB each, ~46 GB/s in all).
    With tp > 1 each rank reads its whole file: the replicas' communicator would be built beside
    the tp group's, and two built side by side could wait on each other; built after it, it would
    cost its seconds on the way."""

    def __init__(self, ctx: Context, folder: Path, manifest: Manifest, settings: Settings, pool: Executor,
                 bar: tqdm, title: str):
        check_device(ctx, manifest)
        self.ctx, self.manifest, self.settings = ctx, manifest, settings
        self.t0 = time.perf_counter()
        compiles = attention_plan(ctx.device, manifest.config.head_dim, settings.attention)[1] is not None
        self.warm = compiles and settings.eager_batches > 0
        self.part, groups = _reading_plan(ctx, self.warm)
        self.connected = Connections(groups, ctx.device)
        self.load_s = self.swap_s = 0.0
        self.loading = pool.submit(self._load, folder)
        self.building = pool.submit(self._build, bar, title)

    def _load(self, folder: Path) -> tuple[dict[str, torch.Tensor] | RankBytes, float]:
        ctx, n = self.ctx, self.settings.load_threads
        got = (read_rank(folder, self.manifest, ctx.tp_rank, ctx.device, n, self.part) if self.part
               else load_rank(folder, self.manifest, ctx.tp_rank, ctx.device, n))
        if ctx.device.type == "cuda":
            torch.cuda.synchronize(ctx.device)
        return got, time.perf_counter() - self.t0

    def _build(self, bar: tqdm, title: str) -> tuple[Model, float, float]:
        """(the model without its weights, build_s, compile_s). It compiles on a stream of its own:
        its all-reduces then wait on nothing the warm start's batches queue meanwhile."""
        ctx = self.ctx
        model = new_model(ctx, self.manifest, self.settings.attention)
        build_s = time.perf_counter() - self.t0
        compile_s = 0.0
        if model.compiles:
            self.connected.wait(ctx.tp_group)   # before the tp group's first collective
            if not self.warm:
                bar.set_description_str(f"{title}: loading weights and compiling (minutes on a fresh machine, "
                                        "cached afterwards)")
            t1 = time.perf_counter()
            side = torch.cuda.Stream(ctx.device) if ctx.device.type == "cuda" else None
            with torch.cuda.stream(side) if side else nullcontext():
                model.warm_up(self.settings.batch_tokens, placeholder_layer(self.manifest, ctx.device))
            if side:
                side.synchronize()
            compile_s = time.perf_counter() - t1
        return model, build_s, compile_s

    def weights(self) -> dict[str, torch.Tensor]:
        """The rank's tensors on its device, once every rank's are (all fail together); replicas
        that shared the reading swap their parts first."""
        loaded, self.load_s = together(self.ctx, self.loading.result)
        if isinstance(loaded, RankBytes):
            t = time.perf_counter()
            self.connected.wait(self.ctx.peers)
            swap_parts(loaded.data, self.part, self.ctx.peers)
            torch.cuda.synchronize(self.ctx.device)
            self.swap_s = time.perf_counter() - t
            return loaded.tensors()
        return loaded

    def eager_model(self, weights: dict[str, torch.Tensor]) -> Model:
        """The warm start's uncompiled model on `weights`, its communicator built."""
        self.connected.wait(self.ctx.spare)
        return eager_model(self.ctx, self.manifest, weights)

    def model(self, weights: dict[str, torch.Tensor], ready: Ready) -> tuple[Model, Ready]:
        """The compiled model (waited for) on `weights`, and `ready` completed."""
        model, build_s, compile_s = self.building.result()
        model.w = weights
        return model, replace(ready, build_s=build_s, compile_s=compile_s, total_s=time.time() - self.ctx.launched)


def _reading_plan(ctx: Context, warm: bool) -> tuple[Part | None, list[dist.ProcessGroup]]:
    """(the part of its rank file this rank reads, None for all of it; the groups whose NCCL
    communicators to build from the start, in order): see `_Startup`."""
    if ctx.device.type != "cuda":
        return None, []
    if ctx.tp > 1:
        return None, [ctx.spare, ctx.tp_group] if warm else [ctx.tp_group]
    if ctx.peers is not None and peers_reachable(ctx):
        return Part(ctx.replica, ctx.replicas), [ctx.peers]
    return None, []


def score_groups(ctx: Context, model: Model, groups: Sequence[Group], settings: Settings, sink: Sink | None = None,
                 batches: list[list[int]] | None = None, bar: tqdm | None = None, ready: Ready = Ready(),
                 then: Callable[[], tuple[Model, Ready]] | None = None) -> RunResult | None:
    """Score this replica's share of `batches` (indices of `groups`; packed here if None) with
    `model`; global rank 0 gets everyone's scores. Given `then` (the warm start), `model` scores the
    first `settings.eager_batches` of them and `then()` gives the model for the rest and its
    `Ready`."""
    if batches is None:
        batches = pack_groups([[r.inputs for r in g.requests] for g in groups], settings.batch_tokens)
    mine = batches[ctx.replica::ctx.replicas]
    switch = settings.eager_batches if then is not None else None
    leader = ctx.tp_rank == 0
    own_bar = bar is None
    if own_bar:
        bar = tqdm(unit=settings.unit, dynamic_ncols=True, mininterval=1.0, desc=settings.label,
                   disable=not (settings.progress and ctx.is_main))
    bar.total = sum(len(b) for b in mine)   # this replica's share (no refresh: the bar may be delayed)
    scores: dict[int, list[Score]] = {}
    done_tokens = 0
    switch_interval = sys.getswitchinterval()
    if then is not None:
        sys.setswitchinterval(EAGER_SWITCH_S)
    began = time.time() - ctx.launched
    ready = replace(ready, scoring_s=began, total_s=began) if then else replace(ready, scoring_s=began)
    t1 = t_final = time.perf_counter()
    eager_s = wait_s = 0.0

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
        for j, b in enumerate(mine):
            if j == switch:
                if pending:
                    collect(*pending)
                    pending = None
                t = time.perf_counter()
                eager_s = t - t1
                sys.setswitchinterval(switch_interval)
                model, r = then()
                torch.cuda.empty_cache()   # what the uncompiled batches and the compile's stream held (smaller GPUs)
                ready = replace(r, scoring_s=ready.scoring_s)
                t_final = time.perf_counter()
                wait_s = t_final - t
            gs = [groups[i] for i in b]
            pad_to = settings.batch_tokens if model.attention.fixed_shape else None
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
        sys.setswitchinterval(switch_interval)
        if own_bar:
            bar.close()
    end = time.perf_counter()
    if switch is None:
        phases = Phases(steady_s=end - t1)
    elif len(mine) > switch:
        phases = Phases(switch, eager_s, wait_s, (end - t_final) * len(mine) / (len(mine) - switch))
    else:   # too few batches to switch: all of them ran uncompiled
        phases = Phases(len(mine), end - t1, 0.0, end - t1)
    mine_result = RunResult(scores if leader else {}, ready, end - t1, done_tokens if leader else 0,
                            ctx.replicas, str(ctx.device), phases)
    if ctx.world == 1:
        return mine_result
    gathered: list[RunResult] | None = [mine_result] * ctx.world if ctx.is_main else None
    dist.gather_object(mine_result, gathered, dst=0, group=ctx.control)
    if not ctx.is_main:
        return None
    ready = _slowest([g.ready for g in gathered])
    return RunResult({k: v for g in gathered for k, v in g.scores.items()}, ready,
                     max(g.ready.scoring_s + g.eval_s for g in gathered) - ready.scoring_s,  # until the last ended
                     sum(g.tokens for g in gathered), ctx.replicas, str(ctx.device),
                     _slowest([g.phases for g in gathered]))


def _split(groups: Sequence[Group], flat: list[list[float]]) -> list[list[Score]]:
    out, i = [], 0
    for g in groups:
        n = len(g.requests)
        out.append([(ll, misses == 0) for ll, misses in flat[i:i + n]])
        i += n
    return out
