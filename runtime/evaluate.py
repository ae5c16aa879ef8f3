"""Score HellaSwag items with a loaded model: pack, run, sum continuation log-likelihoods."""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
from tqdm import tqdm

from llamafuse.formats import LlamafuseError, load_manifest

from .hellaswag import Item, sample_record
from .load import open_model
from .model import FlexAttention, Model
from .packing import Batch, make_batch, pack_groups, prefix_forest, to_device
from .parallel import Context


@dataclass(frozen=True)
class Settings:
    batch_tokens: int
    samples: Path | None     # samples.jsonl to append to (replica leaders write)
    attention: str = "auto"  # "auto", "blocks" (SDPA + mask, any device) or "flex" (sm80+)
    progress: bool = True


def sequences(item: Item) -> list[list[int]]:
    """The model inputs of an item: context + ending, less the ending's last token (never an input)."""
    return [item.context + list(e[:-1]) for e in item.endings]


def pack(items: list[Item], batch_tokens: int) -> list[list[int]]:
    """Indices of `items` in batches whose prefix forest has at most batch_tokens tokens."""
    return pack_groups([sequences(it) for it in items], batch_tokens)


class ItemBatch(NamedTuple):
    batch: Batch
    rows: torch.Tensor     # [T] per scored token: its row among batch.select
    targets: torch.Tensor  # [T] the token it scores
    slot: torch.Tensor     # [T] its (item, ending) as 4 * item + ending
    tokens: int            # tokens in the forest (without filler)


def item_batch(items: list[Item], pad_to: int | None = None) -> ItemBatch:
    """The packed batch of some items and what to score in it.

    Ending e is scored at the context's last token and at its own first len(e) - 1 tokens;
    sequences that share a prefix share those rows.
    """
    forest = prefix_forest([s for it in items for s in sequences(it)])
    row_of: dict[int, int] = {}
    rows, targets, slot = [], [], []
    for k, it in enumerate(items):
        for j, e in enumerate(it.endings):
            path = forest.index[4 * k + j]
            for t, tok in enumerate(e):
                rows.append(row_of.setdefault(path[len(it.context) - 1 + t], len(row_of)))
            targets += e
            slot += [4 * k + j] * len(e)
    return ItemBatch(make_batch(forest, list(row_of), pad_to),
                     *(torch.tensor(x, dtype=torch.long) for x in (rows, targets, slot)), len(forest))


def score_batch(model: Model, items: list[Item], device: torch.device, pad_to: int | None = None) -> tuple[Readback, int]:
    """The [len(items), 4] float64 summed log-likelihoods on their way to the host, and the
    tokens run. Nothing here waits for the device."""
    ib = item_batch(items, pad_to)
    rows, targets, slot = (to_device(x, device) for x in (ib.rows, ib.targets, ib.slot))
    lp = model.target_logprobs(ib.batch.to(device), rows, targets)
    out = torch.zeros(4 * len(items), dtype=torch.float64, device=device)
    return Readback(out.index_add_(0, slot, lp.double()).view(-1, 4)), ib.tokens


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


def _append(path: Path, records: list[dict]) -> None:
    data = "".join(json.dumps(r) + "\n" for r in records).encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)  # one write per batch: whole lines, even with several writers
    finally:
        os.close(fd)


def hellaswag_worker(ctx: Context, folder: Path, items: list[Item], settings: Settings) -> dict | None:
    """Every rank runs this; returns {doc_id: lls} and timings on global rank 0."""
    t0 = time.perf_counter()
    model = open_model(ctx, folder, load_manifest(folder), settings.attention)
    if ctx.device.type == "cuda":
        torch.cuda.synchronize(ctx.device)
    load_s = time.perf_counter() - t0
    out = score_items(ctx, model, items, settings)
    if out is not None:
        out["load_s"] = load_s
    return out


def score_items(ctx: Context, model: Model, items: list[Item], settings: Settings) -> dict | None:
    """Score this replica's share of the batches; rank 0 gets everyone's {doc_id: lls}."""
    # Compiled kernels want one shape: pad every batch to the budget (packing keeps them full).
    pad_to = settings.batch_tokens if isinstance(model.attention, FlexAttention) else None
    batches = pack(items, settings.batch_tokens)[ctx.replica::ctx.replicas]
    leader = ctx.tp_rank == 0
    bar = tqdm(total=sum(len(b) for b in batches), unit="item", dynamic_ncols=True, mininterval=1.0,
               disable=not (settings.progress and ctx.is_main), desc=f"hellaswag x{ctx.replicas}" if ctx.replicas > 1 else "hellaswag")
    results: dict[int, list[float]] = {}
    done_tokens = 0
    t1 = time.perf_counter()

    def collect(its: list[Item], lls: Readback, tokens: int) -> None:
        nonlocal done_tokens
        rows = lls.get().tolist()                       # waits for this batch only
        recs = [sample_record(it, r) for it, r in zip(its, rows)]
        for it, r in zip(its, rows):
            results[it.doc_id] = r
        if leader and settings.samples:
            _append(settings.samples, recs)
        done_tokens += tokens
        bar.update(len(its))
        bar.set_postfix_str(f"{done_tokens / (time.perf_counter() - t1):,.0f} tok/s", refresh=False)

    if pad_to and ctx.is_main and settings.progress:
        tqdm.write("compiling kernels for the first batch (minutes on a fresh machine, cached afterwards)")
    pending = None
    first_s = 0.0
    try:
        for k, b in enumerate(batches):
            its = [items[i] for i in b]
            lls, tokens = score_batch(model, its, ctx.device, pad_to)  # queued on the device
            if pending:
                collect(*pending)                        # the previous batch, while this one runs
            pending = (its, lls, tokens)
            if k == 0:                                   # includes compilation: timed on its own
                collect(*pending)
                pending, first_s = None, time.perf_counter() - t1
        if pending:
            collect(*pending)
    except torch.cuda.OutOfMemoryError:
        raise LlamafuseError(f"out of GPU memory at --batch-tokens {settings.batch_tokens}; "
                             f"try --batch-tokens {settings.batch_tokens // 2}") from None
    finally:
        bar.close()
    eval_s = time.perf_counter() - t1
    if ctx.world > 1:
        gathered: list[dict] | None = [{} for _ in range(ctx.world)] if ctx.is_main else None
        dist.gather_object({"results": results if leader else {}, "eval_s": eval_s, "first_s": first_s,
                            "tokens": done_tokens if leader else 0}, gathered, dst=0)
        if not ctx.is_main:
            return None
        results = {k: v for g in gathered for k, v in g["results"].items()}
        eval_s = max(g["eval_s"] for g in gathered)
        first_s = max(g["first_s"] for g in gathered)
        done_tokens = sum(g["tokens"] for g in gathered)
    return {"lls": results, "eval_s": eval_s, "first_batch_s": first_s, "tokens": done_tokens,
            "device": str(ctx.device), "replicas": ctx.replicas}
