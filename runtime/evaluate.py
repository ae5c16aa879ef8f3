"""Score HellaSwag items with a loaded model: pack, run, sum continuation log-likelihoods."""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from llamafuse.formats import LlamafuseError, load_manifest

from .hellaswag import Item, sample_record
from .load import open_model
from .model import Batch, FlexAttention, Model, make_batch
from .parallel import Context


@dataclass(frozen=True)
class Settings:
    batch_tokens: int
    samples: Path | None     # samples.jsonl to append to (replica leaders write)
    attention: str = "auto"  # "auto", "blocks" (SDPA + mask, any device) or "flex" (sm80+)
    progress: bool = True


def pack(items: list[Item], batch_tokens: int) -> list[list[int]]:
    """Indices of `items` in batches of at most batch_tokens tokens (first-fit decreasing).

    Longest items first; each goes into the first batch with room, so short items fill the
    gaps and batches come out nearly full. An item longer than the budget gets its own batch.
    """
    order = sorted(range(len(items)), key=lambda i: -items[i].n_tokens)
    batches: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = items[i].n_tokens
        k = next((k for k, r in enumerate(room) if r >= n), None)
        if k is None:
            batches.append([])
            room.append(batch_tokens)
            k = len(room) - 1
        batches[k].append(i)
        room[k] -= n
    return batches


def item_batch(items: list[Item], pad_to: int | None = None) -> tuple[Batch, torch.Tensor, torch.Tensor]:
    """The packed batch, the target token of each scored position, and its (item, ending) slot.

    Ending j of length L is scored at the context's last token and its own first L-1 tokens.
    """
    select, targets, slot = [], [], []
    start = 0
    for k, it in enumerate(items):
        last_ctx = start + len(it.context) - 1
        pos = start + len(it.context)
        for j, e in enumerate(it.endings):
            select += [last_ctx] + list(range(pos, pos + len(e) - 1))
            targets += e
            slot += [4 * k + j] * len(e)
            pos += len(e)
        start = pos
    batch = make_batch([(it.context, [list(e) for e in it.endings]) for it in items], select, pad_to)
    return batch, torch.tensor(targets, dtype=torch.long), torch.tensor(slot, dtype=torch.long)


def score_batch(model: Model, items: list[Item], device: torch.device, pad_to: int | None = None) -> torch.Tensor:
    """[len(items), 4] float64 summed log-likelihoods, left on `device` (no host sync)."""
    batch, targets, slot = item_batch(items, pad_to)
    lp = model.target_logprobs(batch.to(device), targets.to(device, non_blocking=True))
    out = torch.zeros(4 * len(items), dtype=torch.float64, device=device)
    return out.index_add_(0, slot.to(device, non_blocking=True), lp.double()).view(-1, 4)


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
    # Compiled kernels want one shape: pad every batch to the budget (first-fit keeps them full).
    pad_to = settings.batch_tokens if isinstance(model.attention, FlexAttention) else None
    batches = pack(items, settings.batch_tokens)[ctx.replica::ctx.replicas]
    leader = ctx.tp_rank == 0
    total = sum(items[i].n_tokens for b in batches for i in b)
    bar = tqdm(total=sum(len(b) for b in batches), unit="item", dynamic_ncols=True, mininterval=1.0,
               disable=not (settings.progress and ctx.is_main), desc=f"hellaswag x{ctx.replicas}" if ctx.replicas > 1 else "hellaswag")
    results: dict[int, list[float]] = {}
    done_tokens = 0
    t1 = time.perf_counter()

    def collect(its: list[Item], lls: torch.Tensor) -> None:
        nonlocal done_tokens
        rows = lls.cpu().tolist()                       # waits for this batch only
        recs = [sample_record(it, r) for it, r in zip(its, rows)]
        for it, r in zip(its, rows):
            results[it.doc_id] = r
        if leader and settings.samples:
            _append(settings.samples, recs)
        done_tokens += sum(it.n_tokens for it in its)
        bar.update(len(its))
        bar.set_postfix_str(f"{done_tokens / (time.perf_counter() - t1):,.0f} tok/s", refresh=False)

    if pad_to and ctx.is_main and settings.progress:
        tqdm.write("compiling kernels for the first batch (minutes on a fresh machine, cached afterwards)")
    pending = None
    first_s = 0.0
    try:
        for k, b in enumerate(batches):
            its = [items[i] for i in b]
            lls = score_batch(model, its, ctx.device, pad_to)  # queued on the device
            if pending:
                collect(*pending)                        # the previous batch, while this one runs
            pending = (its, lls)
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
        dist.gather_object({"results": results if leader else {}, "eval_s": eval_s, "first_s": first_s}, gathered, dst=0)
        if not ctx.is_main:
            return None
        results = {k: v for g in gathered for k, v in g["results"].items()}
        eval_s = max(g["eval_s"] for g in gathered)
        first_s = max(g["first_s"] for g in gathered)
        total = sum(it.n_tokens for it in items)
    return {"lls": results, "eval_s": eval_s, "first_batch_s": first_s, "tokens": total,
            "device": str(ctx.device), "replicas": ctx.replicas}
