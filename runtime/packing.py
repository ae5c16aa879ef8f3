"""Packing token sequences into one row of tokens as a prefix forest, and groups into batches.

A token's hidden state depends only on the tokens before it, so sequences that start alike
need their common prefix computed once. The packed row holds a forest of prefix trees in
depth-first order; the subtree of token k is the range [k, end[k]), and query q attends to
key k iff k <= q < end[k], i.e. iff k is q or one of its ancestors: exactly the tokens of q's
own sequence so far. A plain causal sequence is a chain; a HellaSwag item is its context with
four branches (which may share their first tokens), and items with a common start share it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch


@dataclass
class Batch:
    tokens: torch.Tensor     # [N] int64
    positions: torch.Tensor  # [N] int64, depth in its tree = rotary position
    end: torch.Tensor        # [N] int64, one past the last token of each token's subtree
    select: torch.Tensor     # [M] int64, tokens whose next-token logits are needed

    def to(self, device: torch.device) -> "Batch":
        return Batch(*(to_device(getattr(self, f), device) for f in self.__dataclass_fields__))


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a host tensor to `device` without blocking the host (pinned first on CUDA: a copy
    from pageable memory is staged by the driver while the host waits)."""
    if device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


@dataclass(frozen=True)
class Forest:
    """The prefix forest of some sequences, laid out depth-first (host side)."""
    tokens: list[int]
    positions: list[int]
    end: list[int]
    index: list[list[int]]   # index[s][t]: where token t of sequence s sits in the row

    def __len__(self) -> int:
        return len(self.tokens)


def prefix_forest(seqs: Sequence[Sequence[int]]) -> Forest:
    """Merge common prefixes of `seqs` into a forest and number its nodes depth-first."""
    children: list[dict[int, int]] = [{}]            # node 0 is a virtual root
    token, parent = [-1], [-1]
    paths = []
    for seq in seqs:
        node, path = 0, []
        for t in seq:
            nxt = children[node].get(t)
            if nxt is None:
                nxt = len(token)
                children[node][t] = nxt
                children.append({})
                token.append(t)
                parent.append(node)
            path.append(nxt)
            node = nxt
        paths.append(path)
    n = len(token)
    size = [1] * n
    for v in range(n - 1, 0, -1):                   # parents are created before their children
        size[parent[v]] += size[v]
    pre = [-1] * n
    for v in range(n):                              # pre-order number: parent's + earlier siblings
        nxt = pre[v] + 1
        for c in children[v].values():
            pre[c] = nxt
            nxt += size[c]
    tokens, positions, end = [0] * (n - 1), [0] * (n - 1), [0] * (n - 1)
    depth = [-1] * n
    for v in range(1, n):
        depth[v] = depth[parent[v]] + 1
        p = pre[v]
        tokens[p], positions[p], end[p] = token[v], depth[v], p + size[v]
    return Forest(tokens, positions, end, [[pre[v] for v in path] for path in paths])


def make_batch(forest: Forest, select: Sequence[int], pad_to: int | None = None) -> Batch:
    """The device-ready batch of a forest; `select` indexes the tokens to score.

    With `pad_to`, filler tokens that see only themselves make the row exactly that long,
    so every batch has one shape.
    """
    tokens, positions, end = list(forest.tokens), list(forest.positions), list(forest.end)
    if pad_to is not None and pad_to > len(tokens):
        n = len(tokens)
        tokens += [0] * (pad_to - n)
        positions += [0] * (pad_to - n)
        end += range(n + 1, pad_to + 1)
    return Batch(*(torch.tensor(x, dtype=torch.long) for x in (tokens, positions, end, list(select))))


def pack_groups(groups: Sequence[Sequence[Sequence[int]]], budget: int, misses: int = 16) -> list[list[int]]:
    """Indices of `groups` (each a few sequences scored together) in batches whose prefix
    forest has at most `budget` tokens.

    Groups are taken in sorted order, so neighbours share their prefixes. A group that does not
    fit is left for the next batch, and after `misses` of those the batch is closed, so later
    small groups fill the gaps. In sorted order a sequence adds len - (common prefix with the
    one before) tokens; groups whose sequences interleave are over-counted, never under.
    A group larger than the budget gets a batch of its own.
    """
    ordered = [sorted(map(list, g)) for g in groups]
    seqs = [[np.asarray(s, dtype=np.int64) for s in g] for g in ordered]
    todo = sorted(range(len(groups)), key=ordered.__getitem__)
    batches = []
    while todo:
        batch: list[int] = []
        left: list[int] = []
        size, last, i = 0, np.zeros(0, dtype=np.int64), 0
        while i < len(todo) and len(left) < misses:
            g, i = todo[i], i + 1
            ss = seqs[g]
            new = sum(len(s) - _common(p, s) for p, s in zip([last, *ss], ss))
            if batch and size + new > budget:
                left.append(g)
                continue
            batch.append(g)
            size += new
            last = ss[-1]
        batches.append(batch)
        todo = left + todo[i:]
    return batches


def _common(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the common prefix of two token arrays."""
    m = min(len(a), len(b))
    diff = np.flatnonzero(a[:m] != b[:m])
    return int(diff[0]) if diff.size else m
