"""Outputs and resume of `llama-run hellaswag`: every output checked before the work starts, results
never lost to a failed write, samples never deleted for a run that does not start, a resume that
continues only the same run and never beside a live writer, and no score built on NaN."""
from __future__ import annotations

import fcntl
import os
import shutil
import struct
from pathlib import Path

import pytest
from click.testing import CliRunner

import llamafuse.runtime.cli as cli
from llamafuse.convert.sources import open_source
from llamafuse.convert.write import convert
from llamafuse.formats.tensorfile import read_header

from conftest import DATA
from test_run import llama_run, one_line_error, read_samples

VAL = DATA / "hellaswag" / "hellaswag_val.jsonl.gz"


@pytest.fixture(scope="module")
def model(tmp_path_factory, stories_meta: Path) -> Path:
    out = tmp_path_factory.mktemp("outputs") / "stories"
    convert(open_source(stories_meta), out, 1, "float32", progress=False)
    return out


def run(model: Path, *args: object, limit: int = 6, combined: bool = True):
    return llama_run("hellaswag", model, "--data", VAL, "--limit", limit, "--device", "cpu", *args, combined=combined)


@pytest.mark.parametrize("where", ["/proc/llamafuse-results.json", "/dev/null/results.json"])
def test_unwritable_output_refused_before_work(model: Path, where: str) -> None:
    line = one_line_error(run(model, "--output", where))
    assert where in line and "--output" in line


def test_unwritable_samples_refused_before_work(model: Path) -> None:
    assert "--samples" in one_line_error(run(model, "--samples", "/proc/llamafuse-samples.jsonl"))


def test_unwritable_logits_output(model: Path) -> None:
    p = llama_run("logits", model, "--text", "Hi", "--device", "cpu", "--output", "/proc/x.safetensors", combined=True)
    assert "/proc/x.safetensors" in one_line_error(p)


def test_output_and_samples_same_file(model: Path, tmp_path: Path) -> None:
    f = tmp_path / "both.json"
    assert "same file" in one_line_error(run(model, "--output", f, "--samples", tmp_path / "." / "both.json"))
    assert not f.exists()


def test_failed_results_write_still_prints_the_table(model: Path, tmp_path: Path, monkeypatch) -> None:
    """The output folder was fine when checked, but writing fails at the end (disk gone, say):
    the table is printed, then one line says the results were not saved, exit non-zero."""
    def broken(path: Path, data: bytes) -> None:
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(cli, "_write_atomic", broken)
    r = CliRunner().invoke(cli.main, ["hellaswag", str(model), "--data", str(VAL), "--limit", "3", "--device", "cpu",
                                      "--output", str(tmp_path / "r.json")])
    assert r.exit_code == 2, r.output
    assert "| hellaswag |     3 |" in r.stdout
    errors = r.stderr.strip().splitlines()
    assert errors[-1].startswith("llama-run: error: --output") and "not saved" in errors[-1]


def test_force_keeps_samples_when_the_run_cannot_start(model: Path, tmp_path: Path) -> None:
    samples = tmp_path / "s.jsonl"
    samples.write_text("precious\n")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"ind": 1}\n')
    line = one_line_error(llama_run("hellaswag", model, "--data", bad, "--device", "cpu", "--samples", samples,
                                    "--force", combined=True))
    assert "bad.jsonl line 1" in line
    assert samples.read_text() == "precious\n"


@pytest.fixture(scope="module")
def finished(model: Path, tmp_path_factory) -> Path:
    samples = tmp_path_factory.mktemp("resume") / "s.jsonl"
    p = run(model, "--samples", samples, combined=False)
    assert p.returncode == 0, p.stderr
    return samples


@pytest.mark.parametrize("change,field", [
    (("--no-bos",), "bos"),
    (("--limit", "7"), "limit"),
    (("model",), "model"),
])
def test_resume_refuses_another_run(model: Path, finished: Path, tmp_path: Path, stories_meta: Path,
                                    change: tuple, field: str) -> None:
    samples = tmp_path / "s.jsonl"
    shutil.copyfile(finished, samples)
    target, args = model, [a for a in change if a != "model"]
    if "model" in change:  # the same weights converted again in another dtype: another model
        target = tmp_path / "fp16"
        convert(open_source(stories_meta), target, 1, "float16", progress=False)
    if "--limit" in args:
        p = llama_run("hellaswag", target, "--data", VAL, "--device", "cpu", "--samples", samples, "--resume", *args,
                      combined=True)
    else:
        p = run(target, "--samples", samples, "--resume", *args)
    line = one_line_error(p)
    assert "written by another run" in line and f"({field} was" in line, line
    assert samples.read_bytes() == finished.read_bytes()


def test_resume_refuses_another_data_file(model: Path, finished: Path, tmp_path: Path) -> None:
    samples = tmp_path / "s.jsonl"
    shutil.copyfile(finished, samples)
    other = tmp_path / "hellaswag_val.jsonl.gz"
    shutil.copyfile(VAL, other)   # a copy elsewhere: the same data
    p = llama_run("hellaswag", model, "--data", other, "--limit", 6, "--device", "cpu", "--samples", samples, "--resume")
    assert p.returncode == 0, p.stdout + p.stderr  # identical content is the same data set
    lines = Path(VAL).read_bytes()
    (tmp_path / "other.jsonl.gz").write_bytes(lines[:-1] + bytes([lines[-1] ^ 1]))
    line = one_line_error(llama_run("hellaswag", model, "--data", tmp_path / "other.jsonl.gz", "--limit", 6,
                                    "--device", "cpu", "--samples", samples, "--resume", combined=True))
    assert "(data was" in line


def test_resume_refuses_a_file_without_the_run_line(model: Path, finished: Path, tmp_path: Path) -> None:
    samples = tmp_path / "s.jsonl"
    samples.write_text("".join(finished.read_text().splitlines(keepends=True)[1:]))
    assert "which run wrote" in one_line_error(run(model, "--samples", samples, "--resume"))


def test_no_second_writer(model: Path, finished: Path, tmp_path: Path) -> None:
    """While one llama-run holds the samples file, another one neither resumes nor overwrites it."""
    samples = tmp_path / "s.jsonl"
    shutil.copyfile(finished, samples)
    fd = os.open(samples, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)   # as a live run holds it
    try:
        for extra in (("--resume",), ("--force",)):
            line = one_line_error(run(model, "--samples", samples, *extra))
            assert "another llama-run is writing" in line
    finally:
        os.close(fd)
    assert samples.read_bytes() == finished.read_bytes()
    assert len(read_samples(samples)) == 6


def test_nan_weights_give_no_score(model: Path, tmp_path: Path) -> None:
    """A model whose numbers are NaN (a damaged file the converter never wrote): scoring refuses,
    naming the items, and prints no score."""
    bad = tmp_path / "nan-model"
    shutil.copytree(model, bad)
    rank = bad / "rank-00-of-01.safetensors"
    t = read_header(rank)[0]["norm"]
    with open(rank, "r+b") as f:     # the final norm's first weight becomes NaN
        f.seek(t.begin)
        f.write(struct.pack("<f", float("nan")))
    samples = tmp_path / "s.jsonl"
    p = run(bad, "--samples", samples, "--output", tmp_path / "r.json", limit=3, combined=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    line = p.stderr.strip().splitlines()[-1]   # after the progress bar
    assert "non-finite log-likelihoods" in line and "0, 1, 2" in line, line
    assert line.startswith("llama-run: error:") and p.stdout == "" and not (tmp_path / "r.json").exists()
    assert read_samples(samples) == []


def test_items_longer_than_the_rotary_tables(tmp_path: Path, stories_meta: Path) -> None:
    """Items that need more positions than the model's rotary tables: one line naming the item."""
    short = tmp_path / "short"
    convert(open_source(stories_meta, max_seq_len=16), short, 1, "float32", progress=False)
    line = one_line_error(run(short, limit=3))
    assert "hellaswag doc 2: 163 positions" in line and "rotary tables cover 16 (12 of 12" in line, line  # the longest
