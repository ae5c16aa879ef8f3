"""The HellaSwag task: loading, validation, harness preprocessing/tokenization, scoring."""
from __future__ import annotations

import gzip
import json
import math
import sys
import types
from pathlib import Path

import pytest

from llamafuse.formats.errors import LlamafuseError
from llamafuse.formats.tokenizer import Tokenizer, read_tokenizer
from llamafuse.runtime.hellaswag import (
    Item,
    build_items,
    count_tokens,
    load_docs,
    preprocess,
    query_and_choices,
    sample_record,
    score,
    split_pair,
)

from conftest import DATA

VAL = DATA / "hellaswag" / "hellaswag_val.jsonl.gz"
TOKENIZER = DATA / "llama-tokenizer" / "tokenizer.model"
N_VAL = 10042
BOS = 1
SHARED, PAIRS, LONGEST = 1_900_944, 3_593_295, 170


@pytest.fixture(scope="module")
def sp() -> Tokenizer:
    return read_tokenizer(TOKENIZER, 32000)


def enc(tok: Tokenizer, text: str) -> list[int]:
    return tok.encode([text])[0]


@pytest.fixture(scope="module")
def val_docs() -> list[dict]:
    assert VAL.is_file(), f"missing test data {VAL}"
    return load_docs(str(VAL))


def good_row(**overrides) -> dict:
    row = {
        "ind": 24, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.",
        "ctx_b": "he", "label": 3,
        "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                    "is holding a rubik's cube.", "starts pulling up roofing on a roof."],
    }
    row.update(overrides)
    return row


def write_jsonl(path: Path, rows: list, gz: bool = False) -> Path:
    text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def make_item(label: int, choice_chars: tuple[int, ...], doc_id: int = 0) -> Item:
    return Item(doc_id=doc_id, ind=None, label=label, context=[1, 2],
                endings=((3,), (4, 5), (6,), (7,)), choice_chars=choice_chars)


# ---------------------------------------------------------------- real data


def test_real_data_token_counts(val_docs, sp):
    assert len(val_docs) == N_VAL
    items = build_items(val_docs, sp, None)
    assert count_tokens(items) == (SHARED, PAIRS, LONGEST)
    bos_items = build_items(val_docs, sp, BOS)
    assert all(it.context[0] == BOS for it in bos_items)
    assert count_tokens(bos_items) == (SHARED + N_VAL, PAIRS + 4 * N_VAL, LONGEST + 1)
    assert [it.endings for it in bos_items[:50]] == [it.endings for it in items[:50]]


def test_real_first_row(val_docs, sp):
    doc = val_docs[0]
    assert (doc["ind"], doc["label"]) == (24, 3)
    query, choices = query_and_choices(doc)
    assert query == "Roof shingle removal: A man is sitting on a roof. He"
    assert choices[3] == "starts pulling up roofing on a roof."
    item = build_items(val_docs[:1], sp, None)[0]
    assert (item.doc_id, item.ind, item.label) == (0, 24, 3)
    assert item.context == enc(sp, query)
    assert list(item.context) + list(item.endings[3]) == enc(sp, query + " " + choices[3])
    assert item.choice_chars == tuple(len(c) for c in choices)


# ---------------------------------------------------------------- preprocessing


@pytest.mark.parametrize("text, expected", [
    ("  plain text  ", "plain text"),
    ("How to cook rice [title] Rinse the rice.", "How to cook rice. Rinse the rice."),
    ("Choose a pot. [step] Fill it.", "Choose a pot. Fill it."),
    ("[header] Choose a pot [step] Fill it.", " Choose a pot Fill it."),  # strip comes first
    ("a [title] [step] b", "a.  b"),  # one pass of "  " -> " " leaves a double space
    ("one  two", "one two"),
])
def test_preprocess(text, expected):
    assert preprocess(text) == expected


def test_query_capitalizes_ctx_b_only():
    doc = good_row(activity_label="Sport", ctx_a="the man runs.", ctx_b="hE JUMPS")
    query, _ = query_and_choices(doc)
    assert query == "Sport: the man runs. He jumps"


# ---------------------------------------------------------------- trailing-space rule


def test_split_pair_moves_trailing_whitespace():
    assert split_pair("Hello world ", " there") == ("Hello world", "  there")
    assert split_pair("Hello world", " there") == ("Hello world", " there")
    assert split_pair("ab \t", "c") == ("ab", " \tc")


def test_build_items_context_ending_in_space(sp, tmp_path):
    # a trailing " [title]" becomes ". ", so the context ends in a space
    doc = good_row(activity_label="Sport", ctx_a="He wins [title]", ctx_b="", label="0",
                   endings=["Ending one.", "two", "three", "four"])
    query, _ = query_and_choices(doc)
    assert query == "Sport: He wins. "
    docs = load_docs(str(write_jsonl(tmp_path / "one.jsonl", [doc])))
    item = build_items(docs, sp, BOS)[0]
    assert item.context == [1] + enc(sp, "Sport: He wins.")
    assert item.context + list(item.endings[0]) == [1] + enc(sp, "Sport: He wins.  Ending one.")
    assert item.choice_chars == (len("Ending one."), 3, 5, 4)


# ---------------------------------------------------------------- scoring


def test_score_acc_vs_acc_norm():
    # item 0: raw argmax 0, per-char argmax 1 (gold, the long ending)
    # item 1: raw argmax 2 (gold, a short ending), per-char argmax 3
    items = [make_item(1, (10, 40, 10, 10), 0), make_item(2, (20, 20, 2, 20), 1)]
    lls = [[-8.0, -10.0, -20.0, -30.0], [-10.0, -12.0, -5.0, -5.5]]
    result = score(items, lls)
    assert result["acc"] == 0.5 and result["acc_norm"] == 0.5
    assert [sample_record(it, r)["pred"] for it, r in zip(items, lls)] == [0, 2]
    assert [sample_record(it, r)["pred_norm"] for it, r in zip(items, lls)] == [1, 3]
    assert result["n"] == 2


def test_score_ties_take_first_index():
    items = [make_item(1, (5, 5, 5, 5)), make_item(0, (5, 5, 5, 5))]
    lls = [[-3.0, -1.0, -1.0, -2.0], [-1.0, -1.0, -1.0, -1.0]]
    result = score(items, lls)
    assert result["acc"] == 1.0 and result["acc_norm"] == 1.0


def test_score_stderr_formula():
    items = [make_item(0, (1, 1, 1, 1), i) for i in range(4)]
    lls = [[0.0, -1, -1, -1]] * 3 + [[-1.0, 0, -1, -1]]
    result = score(items, lls)
    assert result["acc"] == 0.75
    hits = [1, 1, 1, 0]
    sd = math.sqrt(sum((h - 0.75) ** 2 for h in hits) / 3)
    assert result["acc_stderr"] == pytest.approx(sd / 2)
    assert result["acc_norm_stderr"] == pytest.approx(sd / 2)
    single = score(items[:1], lls[:1])
    assert single["acc_stderr"] == 0.0 and single["acc_norm_stderr"] == 0.0


def test_sample_record_is_plain_json():
    item = make_item(2, (3, 3, 3, 3), doc_id=7)
    rec = sample_record(item, [-1, -2, -0.5, -4])
    assert rec == {"doc_id": 7, "ind": None, "label": 2, "lls": [-1.0, -2.0, -0.5, -4.0],
                   "pred": 2, "pred_norm": 2}
    assert item.n_tokens == 2 + 5 and item.n_pair_tokens == 4 * 2 + 5


# ---------------------------------------------------------------- loading and bad input


def test_jsonl_and_gz_load_and_limit(tmp_path):
    rows = [good_row(ind=i, label=str(i % 4)) for i in range(5)]
    plain = load_docs(str(write_jsonl(tmp_path / "v.jsonl", rows)))
    gz = load_docs(str(write_jsonl(tmp_path / "v.jsonl.gz", rows, gz=True)))
    assert [d["_where"] for d in gz] == [f"v.jsonl.gz line {i}" for i in range(1, 6)]
    assert [{**d, "_where": None} for d in plain] == [{**d, "_where": None} for d in gz]
    assert [d["label"] for d in plain] == [0, 1, 2, 3, 0]
    limited = load_docs(str(tmp_path / "v.jsonl.gz"), limit=2)
    assert [d["ind"] for d in limited] == [0, 1]
    no_ind = {k: v for k, v in good_row().items() if k != "ind"}
    assert load_docs(str(write_jsonl(tmp_path / "n.jsonl", [no_ind])))[0]["ind"] is None


def test_missing_file(tmp_path):
    with pytest.raises(LlamafuseError, match="no such file"):
        load_docs(str(tmp_path / "absent.jsonl"))
    with pytest.raises(LlamafuseError, match="no such file"):
        load_docs(str(tmp_path / "absent.jsonl.gz"))


def test_bad_json_line(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [good_row(), good_row(), '{"ind": 1,'])
    with pytest.raises(LlamafuseError, match=r"^bad\.jsonl line 3: invalid JSON"):
        load_docs(str(path))


@pytest.mark.parametrize("row, message", [
    ({k: v for k, v in good_row().items() if k != "ctx_b"}, "line 2: missing field 'ctx_b'"),
    ({k: v for k, v in good_row().items() if k != "label"}, "line 2: missing field 'label'"),
    ({k: v for k, v in good_row().items() if k != "endings"}, "line 2: missing field 'endings'"),
    (good_row(activity_label=3), "line 2: field 'activity_label' must be a string"),
    (good_row(endings=["a", "b", "c"]), "line 2: field 'endings' must be a list of 4 strings"),
    (good_row(endings=["a", "b", "c", 4]), "line 2: field 'endings' must be a list of 4 strings"),
    (good_row(label="7"), "line 2: label '7' out of range 0..3"),
    (good_row(label=-1), "line 2: label -1 out of range 0..3"),
    (good_row(label="three"), "line 2: label 'three' is not an integer"),
    (good_row(label=1.0), "line 2: label 1.0 is not an integer"),
    (good_row(label=True), "line 2: label True is not an integer"),
    ([1, 2], "line 2: expected a JSON object"),
])
def test_bad_rows(tmp_path, row, message):
    """Bad rows are named by their line in the file, counted from 1 as for bad JSON."""
    path = write_jsonl(tmp_path / "val.jsonl", [good_row(), row])
    with pytest.raises(LlamafuseError) as err:
        load_docs(str(path))
    assert str(err.value).startswith("val.jsonl " + message)


def test_limit_skips_later_bad_rows(tmp_path):
    path = write_jsonl(tmp_path / "val.jsonl", [good_row(), good_row(label=9)])
    assert len(load_docs(str(path), limit=1)) == 1
    with pytest.raises(LlamafuseError, match="limit"):
        load_docs(str(path), limit=0)


def test_hub_id_routes_to_datasets(monkeypatch):
    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        return [good_row(label="2"), good_row(label="1")]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=fake_load_dataset))
    docs = load_docs(None, limit=1)
    assert calls == [("Rowan/hellaswag", "validation")]
    assert docs[0]["_where"] == "Rowan/hellaswag row 1"
    assert [d["label"] for d in docs] == [2]
    load_docs("someone/hellaswag-copy")
    assert calls[-1] == ("someone/hellaswag-copy", "validation")


def test_hub_failure_suggests_data_path(monkeypatch):
    def failing(name, split):
        raise ConnectionError("offline\nmore detail")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=failing))
    with pytest.raises(LlamafuseError) as err:
        load_docs(None)
    message = str(err.value)
    assert "--data PATH" in message and "Rowan/hellaswag" in message and "\n" not in message
