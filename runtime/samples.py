"""The samples file of a HellaSwag run: one JSON line per scored item, appended as batches finish.

Its first line says which run wrote it (model, tokenizer, BOS, data, limit), so `--resume`
continues only the same run. While a run writes it, the file is locked (flock), so a second
run cannot write beside it.
"""
from __future__ import annotations

import fcntl
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from llamafuse.formats import LlamafuseError

from .evaluate import Group, Score
from .hellaswag import N_ENDINGS, Item, sample_record

HEADER_KEY = "llamafuse_run"


class SamplesFile:
    """An open, locked samples file. Use as a context manager; the lock goes with it."""

    def __init__(self, path: Path, run: dict[str, Any], items: Sequence[Item], resume: bool):
        self.path, self.run = path, run
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise LlamafuseError(f"{path}: cannot open for writing ({e.strerror or e})") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise LlamafuseError(f"{path}: another llama-run is writing this samples file") from None
        try:
            self.done = self._resume(items) if resume else self._start()
        except BaseException:
            os.close(self.fd)
            raise

    def __enter__(self) -> "SamplesFile":
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)  # releases the lock

    def _start(self) -> dict[int, list[float]]:
        os.ftruncate(self.fd, 0)
        os.write(self.fd, (json.dumps({HEADER_KEY: self.run}) + "\n").encode())
        return {}

    def _resume(self, items: Sequence[Item]) -> dict[int, list[float]]:
        """Items already scored; a last line cut short by an interruption is dropped."""
        with open(self.fd, "rb", closefd=False) as f:
            text = f.read().decode("utf-8", errors="replace")
        if not text:
            return self._start()
        if not text.endswith("\n"):
            text = text[: text.rfind("\n") + 1]
            os.ftruncate(self.fd, len(text.encode()))
        lines = text.splitlines()
        _check_header(self.path, lines[0] if lines else "", self.run)
        done = {}
        for i, line in enumerate(lines[1:], 2):
            try:
                r = json.loads(line)
                doc, lls = int(r["doc_id"]), [float(x) for x in r["lls"]]
            except (ValueError, KeyError, TypeError):
                raise LlamafuseError(f"{self.path} line {i}: not a samples record (cannot resume from it)") from None
            if (not 0 <= doc < len(items) or len(lls) != N_ENDINGS
                    or (r.get("ind"), r.get("label")) != (items[doc].ind, items[doc].label)):
                raise LlamafuseError(f"{self.path} line {i}: doc_id {doc} does not match this data set")
            done[doc] = lls
        return done


def _check_header(path: Path, line: str, run: dict[str, Any]) -> None:
    try:
        old = json.loads(line)[HEADER_KEY]
    except (ValueError, KeyError, TypeError):
        raise LlamafuseError(f"{path}: line 1 does not say which run wrote the file (cannot resume from it)") from None
    if not isinstance(old, dict):
        raise LlamafuseError(f"{path}: line 1 is malformed (cannot resume from it)")
    diff = [k for k in sorted(run.keys() | old.keys()) if old.get(k) != run.get(k)]
    if diff:
        k = diff[0]
        raise LlamafuseError(f"{path}: written by another run ({k} was {old.get(k)!r}, now {run.get(k)!r}); "
                             "use --force to start it over")


@dataclass(frozen=True)
class SampleWriter:
    """Appends each finished batch's records (called on replica leaders, in rank processes)."""
    path: Path
    items: dict[int, Item]

    def __call__(self, groups: list[Group], scores: list[list[Score]]) -> None:
        recs = [sample_record(self.items[g.key], [ll for ll, _ in s]) for g, s in zip(groups, scores)]
        data = "".join(json.dumps(r) + "\n" for r in recs).encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, data)  # one write per batch: whole lines, even with several writers
        finally:
            os.close(fd)
