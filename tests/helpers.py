"""Small helpers shared by the GGUF and real-model tests."""
from __future__ import annotations

import gzip
import itertools
import json
from pathlib import Path

import torch
from click.testing import CliRunner, Result

from llamafuse.formats import load_manifest
from llamafuse.runtime.parallel import launch
from llamafuse.runtime.validate import logits_worker

from conftest import DATA
from harness_reference import process_doc

VAL = DATA / "hellaswag" / "hellaswag_val.jsonl.gz"


def read_docs(n: int) -> list[dict]:
    """The first n rows of the HellaSwag validation file."""
    with gzip.open(VAL, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in itertools.islice(f, n)]


def hellaswag_texts(n_docs: int) -> list[str]:
    """Every string the harness encodes for the first n_docs items: contexts and context + ending."""
    docs = [process_doc(d) for d in read_docs(n_docs)]
    return [t for d in docs for t in [d["query"]] + [d["query"] + " " + c for c in d["choices"]]]


def model_logits(folder: Path, seqs: list[list[int]]) -> list[torch.Tensor]:
    """float32 logits of a converted model (tp processes through gloo, inline at tp 1)."""
    m = load_manifest(folder)
    return launch(logits_worker, m.tp, 1, "cpu", folder, m, seqs)


def run(main, *args: object) -> Result:
    """Invoke a click command in-process."""
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(r: Result, prefix: str, *needles: str) -> str:
    """Exit 2, no traceback, exactly one error line (after any progress bar), naming `needles`."""
    assert "Traceback" not in r.output, r.output
    assert r.exit_code == 2, (r.exit_code, r.output, r.exception)
    lines = [ln for ln in r.stderr.replace("\r", "\n").splitlines() if ln.strip() and not ln.startswith("writing")]
    assert len(lines) == 1 and lines[0].startswith(f"{prefix}: error:"), lines
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]
