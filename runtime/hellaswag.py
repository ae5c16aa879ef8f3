"""The HellaSwag task exactly as lm-evaluation-harness 0.4.x ``hellaswag`` defines it.

Loading and validating rows, the harness's preprocessing and ``_encode_pair`` tokenization,
and acc / acc_norm scoring from per-ending log-likelihoods.
"""
from __future__ import annotations

import gzip
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

import numpy as np

from llamafuse.formats.errors import LlamafuseError, one_line

from .evaluate import Group, Request

if TYPE_CHECKING:
    from llamafuse.formats.tokenizer import Tokenizer

HUB_ID = "Rowan/hellaswag"
HUB_SPLIT = "validation"
N_ENDINGS = 4
_LOCAL_SUFFIXES = (".jsonl", ".jsonl.gz")
_INT_RE = re.compile(r"-?\d+")


# ---------------------------------------------------------------- loading


def load_docs(data: str | None, limit: int | None = None) -> list[dict]:
    """Load and validate HellaSwag rows from a local .jsonl(.gz) file or a hub dataset id.

    ``None`` means the hub's ``Rowan/hellaswag`` validation split. ``limit`` keeps the first N rows.
    """
    if limit is not None and limit < 1:
        raise LlamafuseError(f"limit must be a positive number of rows, got {limit}")
    if data is None:
        source, rows = HUB_ID, _hub_rows(HUB_ID)
    else:
        path = Path(data)
        if path.is_file() and data.endswith(_LOCAL_SUFFIXES):
            source, rows = path.name, _jsonl_rows(path)
        elif not path.exists() and "/" in data and not path.suffix:
            source, rows = data, _hub_rows(data)
        elif path.exists():
            raise LlamafuseError(f"{data}: expected a .jsonl or .jsonl.gz file")
        else:
            raise LlamafuseError(f"{data}: no such file")
    docs = [_validate_row(where, row) for where, row in _take(rows, limit)]
    if not docs:
        raise LlamafuseError(f"{source}: contains no rows")
    return docs


def _take(rows: Iterable[tuple[str, Any]], limit: int | None) -> Iterator[tuple[str, Any]]:
    """The first ``limit`` rows (all if None)."""
    for i, row in enumerate(rows):
        if limit is not None and i >= limit:
            return
        yield row


def _jsonl_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """("NAME line N", parsed row) for the non-blank lines of a .jsonl or .jsonl.gz file."""
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise LlamafuseError(f"{path.name} line {lineno}: invalid JSON ({e.msg})") from None
                yield f"{path.name} line {lineno}", row
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise LlamafuseError(f"{path.name}: cannot read ({one_line(e)})") from None


def _hub_rows(name: str) -> list[tuple[str, Any]]:
    """("NAME row N", row) for the validation split of a hub dataset, N from 1; any failure
    becomes a LlamafuseError."""
    try:
        import datasets

        return [(f"{name} row {i}", row) for i, row in enumerate(datasets.load_dataset(name, split=HUB_SPLIT), 1)]
    except Exception as e:
        raise LlamafuseError(
            f"cannot load hub dataset {name!r} ({one_line(e)}); "
            "pass --data PATH to a local hellaswag .jsonl or .jsonl.gz file"
        ) from None


def _validate_row(where: str, row: Any) -> dict:
    """Check one row's fields; return it with ``label`` as int, ``ind`` present and ``_where``
    (its file and line) for later messages."""
    if not isinstance(row, dict):
        raise LlamafuseError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for field in ("activity_label", "ctx_a", "ctx_b"):
        if field not in row:
            raise LlamafuseError(f"{where}: missing field '{field}'")
        if not isinstance(row[field], str):
            raise LlamafuseError(f"{where}: field '{field}' must be a string")
    endings = row.get("endings")
    if endings is None:
        raise LlamafuseError(f"{where}: missing field 'endings'")
    if (not isinstance(endings, list) or len(endings) != N_ENDINGS
            or not all(isinstance(e, str) for e in endings)):
        raise LlamafuseError(f"{where}: field 'endings' must be a list of {N_ENDINGS} strings")
    ind = row.get("ind")
    if ind is not None and (isinstance(ind, bool) or not isinstance(ind, int)):
        raise LlamafuseError(f"{where}: field 'ind' must be an integer")
    return {**row, "ind": ind, "label": _parse_label(where, row), "_where": where}


def _parse_label(where: str, row: dict) -> int:
    """The gold index from an int or a string of an int, checked to be in 0..3."""
    if "label" not in row:
        raise LlamafuseError(f"{where}: missing field 'label'")
    raw = row["label"]
    if isinstance(raw, int) and not isinstance(raw, bool):
        label = raw
    elif isinstance(raw, str) and _INT_RE.fullmatch(raw.strip()):
        label = int(raw)
    else:
        raise LlamafuseError(f"{where}: label {raw!r} is not an integer")
    if not 0 <= label < N_ENDINGS:
        raise LlamafuseError(f"{where}: label {raw!r} out of range 0..{N_ENDINGS - 1}")
    return label


# ---------------------------------------------------------------- items


def preprocess(text: str) -> str:
    """The harness's HellaSwag text cleanup (WikiHow bracket artifacts, double spaces)."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


@dataclass(frozen=True)
class Item:
    """One tokenized HellaSwag question: a shared context and four continuations."""

    doc_id: int
    ind: int | None
    label: int
    context: list[int]
    endings: tuple[tuple[int, ...], ...]
    choice_chars: tuple[int, ...]

    @property
    def n_tokens(self) -> int:
        """Tokens to score when the context is shared by the four endings."""
        return len(self.context) + sum(len(e) for e in self.endings)

    @property
    def n_pair_tokens(self) -> int:
        """Tokens to score when each (context, ending) pair is run separately."""
        return sum(len(self.context) + len(e) for e in self.endings)

    def group(self) -> Group:
        """The item as requests to score: its context with each ending."""
        return Group(self.doc_id, tuple(Request(tuple(self.context), e) for e in self.endings))


def query_and_choices(doc: dict) -> tuple[str, list[str]]:
    """The harness's prompt text and the four preprocessed choice strings."""
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    query = preprocess(doc["activity_label"] + ": " + ctx)
    return query, [preprocess(e) for e in doc["endings"]]


def split_pair(context: str, continuation: str) -> tuple[str, str]:
    """Move the context's trailing whitespace to the front of the continuation (harness rule)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces == 0:
        return context, continuation
    return context[:-n_spaces], context[-n_spaces:] + continuation


def build_items(docs: Sequence[dict], tokenizer: Tokenizer, bos_id: int | None) -> list[Item]:
    """Tokenize validated docs as the harness's ``_encode_pair`` does, ``bos_id`` first if given."""
    contexts: list[str] = []
    wholes: list[str] = []
    all_choices: list[list[str]] = []
    for doc in docs:
        query, choices = query_and_choices(doc)
        pairs = [split_pair(query, " " + c) for c in choices]
        contexts.append(pairs[0][0])
        wholes.extend(ctx + cont for ctx, cont in pairs)
        all_choices.append(choices)
    prefix = [] if bos_id is None else [bos_id]
    ctx_ids = tokenizer.encode(contexts)
    whole_ids = tokenizer.encode(wholes)
    items = []
    for i, doc in enumerate(docs):
        context = prefix + ctx_ids[i]
        endings = tuple(
            tuple((prefix + whole_ids[N_ENDINGS * i + j])[len(context):]) for j in range(N_ENDINGS)
        )
        for j, ending in enumerate(endings):
            if not ending:
                raise LlamafuseError(f"{doc['_where']}: ending {j} has no tokens after the context")
        items.append(Item(
            doc_id=i,
            ind=doc.get("ind"),
            label=doc["label"],
            context=context,
            endings=endings,
            choice_chars=tuple(len(c) for c in all_choices[i]),
        ))
    return items


def count_tokens(items: Iterable[Item]) -> tuple[int, int, int]:
    """(tokens with shared contexts, tokens with separate pairs, longest context+ending)."""
    shared = pairs = longest = 0
    for item in items:
        shared += item.n_tokens
        pairs += item.n_pair_tokens
        longest = max(longest, len(item.context) + max(len(e) for e in item.endings))
    return shared, pairs, longest


# ---------------------------------------------------------------- scoring


def predictions(item: Item, lls: Sequence[float]) -> tuple[int, int]:
    """(argmax of log-likelihoods, argmax of log-likelihood per choice character); first max wins."""
    if len(lls) != len(item.endings):
        raise ValueError(f"doc {item.doc_id}: {len(lls)} log-likelihoods for {len(item.endings)} endings")
    arr = np.asarray(lls, dtype=np.float64)
    pred = int(np.argmax(arr))
    pred_norm = int(np.argmax(arr / np.asarray(item.choice_chars, dtype=np.float64)))
    return pred, pred_norm


def mean_stderr(values: Sequence[float]) -> float:
    """Standard error of the mean with the sample std (ddof=1), as the harness; 0.0 below 2 values."""
    n = len(values)
    if n < 2:
        return 0.0
    return float(np.std(np.asarray(values, dtype=np.float64), ddof=1) / math.sqrt(n))


def score(items: Sequence[Item], lls: Sequence[Sequence[float]]) -> dict:
    """acc and acc_norm (with standard errors) over items given each item's four log-likelihoods."""
    if len(items) != len(lls):
        raise ValueError(f"{len(lls)} log-likelihood rows for {len(items)} items")
    acc: list[float] = []
    acc_norm: list[float] = []
    for item, row in zip(items, lls):
        pred, pred_norm = predictions(item, row)
        acc.append(float(pred == item.label))
        acc_norm.append(float(pred_norm == item.label))
    n = len(items)
    return {
        "acc": sum(acc) / n if n else 0.0,
        "acc_norm": sum(acc_norm) / n if n else 0.0,
        "acc_stderr": mean_stderr(acc),
        "acc_norm_stderr": mean_stderr(acc_norm),
        "n": n,
    }


def sample_record(item: Item, lls: Sequence[float]) -> dict:
    """The per-item JSON record: ids, gold label, log-likelihoods and both predictions."""
    pred, pred_norm = predictions(item, lls)
    return {
        "doc_id": item.doc_id,
        "ind": item.ind,
        "label": item.label,
        "lls": [float(x) for x in lls],
        "pred": pred,
        "pred_norm": pred_norm,
    }
