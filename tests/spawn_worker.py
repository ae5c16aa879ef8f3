"""A `launch` worker for tests of how ranks start (kept apart so a spawned rank imports little)."""
from __future__ import annotations

import torch.distributed as dist

from llamafuse.runtime.parallel import Context


def data_seen(ctx: Context, data: list[int]) -> list[tuple[int, int, int]]:
    """Every rank's (rank, len(data), sum(data)), gathered on all ranks."""
    seen: list = [None] * ctx.world
    dist.all_gather_object(seen, (ctx.rank, len(data), sum(data)))
    return seen
