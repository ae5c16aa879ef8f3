"""How a multi-process `llama-run` ends, on the CPU (stories260K, tp 2, gloo processes).

Real signals go to real processes: the parent, one rank, or the whole process group (Ctrl-C in a
terminal), at start-up and mid-run; ranks fail at load, mid-run and after the last collective
(tests/faults/sitecustomize.py, which spawned ranks import too); torchrun runs repeatedly. Each
case checks the exit code, the single line on stderr, that every process of the run is gone soon
after, and that the samples written so far are whole lines.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llamafuse.convert.sources import open_source
from llamafuse.convert.write import convert

from conftest import command

FAULTS = Path(__file__).resolve().parent / "faults"
GONE_S = 20      # every process of the run must be gone this soon (typically well under 1 s)
RUN_S = 120      # a run that has not ended by then hangs
LONG = 400       # items: ~15 s of scoring at --batch-tokens 100, signalled after the first batch




# ---------------------------------------------------------------- processes, from /proc


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, start time) of a process, None if there is none."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    return fields[0], int(fields[1]), int(fields[19])


def descendants(pid: int) -> dict[int, int]:
    """{pid: start time} of the live processes below `pid`, children first."""
    table = {int(d.name): st for d in Path("/proc").iterdir() if d.name.isdigit() and (st := _stat(int(d.name)))}
    by_start = sorted(table.items(), key=lambda kv: (kv[1][2], kv[0]))
    found: dict[int, int] = {}
    todo = [pid]
    while todo:
        parent = todo.pop(0)
        for p, (state, ppid, start) in by_start:
            if ppid == parent and state != "Z" and p not in found:
                found[p] = start
                todo.append(p)
    return found


def running(procs: dict[int, int]) -> list[int]:
    """Those of `procs` still running (a zombie or a reused pid does not count)."""
    return [p for p, start in procs.items() if (st := _stat(p)) and st[0] != "Z" and st[2] == start]


def wait_gone(procs: dict[int, int], what: str) -> None:
    end = time.monotonic() + GONE_S
    while running(procs):
        assert time.monotonic() < end, f"{what}: processes {running(procs)} still running {GONE_S} s later"
        time.sleep(0.05)


def ranks(pid: int) -> list[int]:
    """The spawned rank processes of a llama-run, in start order (rank 0 first)."""
    def cmdline(p: int) -> bytes:
        try:
            return Path(f"/proc/{p}/cmdline").read_bytes()
        except OSError:
            return b""
    return [p for p in descendants(pid) if b"spawn_main" in cmdline(p)]


# ---------------------------------------------------------------- a run


class Run:
    """`llama-run hellaswag` in its own session (so the test can signal its whole process group),
    stdout and stderr in files; `seen` collects every process of the run while it is watched."""

    def __init__(self, folder: Path, model: Path, val: Path, *, limit: int, fault: str | None = None):
        self.samples, self.err = folder / "samples.jsonl", folder / "stderr.txt"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(FAULTS), os.environ.get("PYTHONPATH")])),
               "TMPDIR": str(folder)}   # the ranks' report folder goes here: `rank_folders_left`
        if fault:
            env["LLAMAFUSE_FAULT"] = fault
        with open(folder / "stdout.txt", "wb") as out, open(self.err, "wb") as err:
            self.proc = subprocess.Popen(
                [*command("llama-run"), "hellaswag", str(model), "--data", str(val), "--limit", str(limit), "--device", "cpu",
                 "--batch-tokens", "100", "--samples", str(self.samples)],
                stdout=out, stderr=err, env=env, start_new_session=True,
                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # even if ours is ignored
        self.seen: dict[int, int] = {}

    def rank_folders_left(self) -> list[Path]:
        """The ranks' temporary report folders still there after the run."""
        return list(self.samples.parent.glob("llamafuse-ranks-*"))

    def watch_until(self, ready, what: str) -> None:
        end = time.monotonic() + RUN_S
        while not ready():
            assert self.proc.poll() is None, f"llama-run ended ({self.proc.returncode}) before {what}: {self.stderr()}"
            assert time.monotonic() < end, f"no {what} after {RUN_S} s"
            self.seen.update(descendants(self.proc.pid))
            time.sleep(0.05)
        self.seen.update(descendants(self.proc.pid))

    def started(self) -> bool:
        return len(ranks(self.proc.pid)) == 2

    def scoring(self) -> bool:
        """The first batch's records are in (after the line saying which run wrote the file)."""
        return self.samples.is_file() and self.samples.read_bytes().count(b"\n") >= 2

    def finish(self) -> int:
        """Wait for the exit; then every process of the run must be gone within GONE_S."""
        end = time.monotonic() + RUN_S
        while self.proc.poll() is None:
            assert time.monotonic() < end, f"llama-run still running after {RUN_S} s: {self.stderr()}"
            self.seen.update(descendants(self.proc.pid))
            time.sleep(0.05)
        wait_gone(self.seen, "after llama-run exited")
        return self.proc.returncode

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def error_lines(self) -> list[str]:
        """stderr less the progress bar (rank 0's tqdm, which ends without a newline)."""
        text = re.sub(r"hellaswag[^\[\r\n]*\[[^\]\r\n]*\]", "", self.stderr())
        return [line for line in re.split(r"[\r\n]+", text) if line.strip()]

    def one_line(self) -> str:
        lines = self.error_lines()
        assert len(lines) == 1 and lines[0].startswith("llama-run: error: "), self.stderr()
        return lines[0].removeprefix("llama-run: error: ")

    def samples_whole(self) -> int:
        """Samples written so far are whole records (a killed run never leaves half a line)."""
        data = self.samples.read_text() if self.samples.is_file() else ""
        assert not data or data.endswith("\n"), f"cut line: {data[-200:]!r}"
        recs = [json.loads(line) for line in data.splitlines()][1:]   # after the run's line
        assert all(set(r) >= {"doc_id", "lls"} and len(r["lls"]) == 4 for r in recs)
        return len(recs)


@pytest.fixture(scope="module")
def model(tmp_path_factory, stories_meta) -> Path:
    out = tmp_path_factory.mktemp("lifecycle") / "stories-tp2"
    convert(open_source(stories_meta), out, 2, "float32", progress=False)
    return out


@pytest.fixture(scope="module")
def val(data_dir) -> Path:
    return data_dir / "hellaswag" / "hellaswag_val.jsonl.gz"


def interrupted(line: str, code: int, signum: int) -> bool:
    """llama-run's report of SIGINT/SIGTERM: `interrupted by SIGTERM`, exit 128 + signal."""
    return (line, code) == (f"interrupted by {signal.Signals(signum).name}", 128 + signum)


# ---------------------------------------------------------------- signals


@pytest.mark.parametrize("target,signum,when", [
    ("parent", signal.SIGTERM, "scoring"),   # kill, timeout, job schedulers
    ("parent", signal.SIGINT, "scoring"),
    ("group", signal.SIGINT, "scoring"),     # Ctrl-C in a terminal: every process gets it
    ("group", signal.SIGINT, "started"),     # ... while the ranks are still starting (importing torch)
    ("parent", signal.SIGTERM, "started"),
    ("rank1", signal.SIGKILL, "scoring"),
    ("rank0", signal.SIGTERM, "scoring"),
], ids=lambda v: v.name if isinstance(v, signal.Signals) else v)
def test_signal(tmp_path, model, val, target, signum, when):
    run = Run(tmp_path, model, val, limit=LONG)
    run.watch_until(getattr(run, when), when)
    if target == "parent":
        os.kill(run.proc.pid, signum)
    elif target == "group":
        os.killpg(run.proc.pid, signum)
    else:
        os.kill(ranks(run.proc.pid)[int(target[-1])], signum)
    code = run.finish()
    line = run.one_line()
    assert not run.rank_folders_left()   # the parent saw the signal and cleaned up
    if target.startswith("rank"):
        assert code == 2 and line == f"rank {target[-1]} was killed by {signal.Signals(signum).name}", (code, line)
    else:
        assert interrupted(line, code, signum), (code, line)
    assert "Traceback" not in run.stderr()
    n = run.samples_whole()
    assert n < LONG and (n > 0 or when == "started")


def test_parent_killed(tmp_path, model, val):
    """SIGKILL of the parent cannot be handled there: the ranks follow it (PR_SET_PDEATHSIG). Its
    empty report folder is left in the temporary directory."""
    run = Run(tmp_path, model, val, limit=LONG)
    run.watch_until(run.scoring, "scoring")
    os.kill(run.proc.pid, signal.SIGKILL)
    assert run.finish() == -signal.SIGKILL
    (left,) = run.rank_folders_left()   # so the other tests' "none left" looks in the right place
    assert not any(left.iterdir())
    run.samples_whole()


# ---------------------------------------------------------------- a rank failing


RANK_FAULTS = {  # LLAMAFUSE_FAULT -> the line llama-run must print
    "1:init:exit0": r"rank 1 exited before finishing \(code 0\)",  # rank 0 would wait 30 min for it
    "1:load:raise": r"rank 1 crashed: ZeroDivisionError: division by zero \(sitecustomize\.py:\d+\)",
    "0:load:kill": r"rank 0 was killed by SIGKILL",
    "0:batch:raise": r"rank 0 crashed: ZeroDivisionError: division by zero \(sitecustomize\.py:\d+\)",
    "1:batch:error": r"injected error on rank 1",
    "1:batch:exit3": r"rank 1 exited with code 3 before finishing",
    "0:end:exit0": r"rank 0 exited before finishing \(code 0\)",
    "1:end:kill": r"rank 1 was killed by SIGKILL",
}


@pytest.mark.parametrize("fault", list(RANK_FAULTS))
def test_rank_fails(tmp_path, model, val, fault):
    """RANK:POINT:HOW (see tests/faults): one line naming the rank and what happened, exit 2."""
    run = Run(tmp_path, model, val, limit=12, fault=fault)
    code = run.finish()
    line = run.one_line()
    assert code == 2 and re.fullmatch(RANK_FAULTS[fault], line), (code, line)
    assert "Traceback" not in run.stderr()
    assert not run.rank_folders_left()
    run.samples_whole()


def test_parent_error_after_ranks_started(tmp_path, model, val):
    """The ranks start before the parent tokenizes the data; a doc it then refuses (longer than
    the model's rotary tables) ends them all: one line naming the doc, exit 2, nothing left."""
    import gzip
    with gzip.open(val, "rt") as f:
        rows = [json.loads(next(f)) for _ in range(3)]
    rows[1]["ctx_a"] = "word " * 2000
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = Run(tmp_path, model, data, limit=3)
    code = run.finish()
    line = run.one_line()
    assert code == 2 and line.startswith("hellaswag doc 1:") and "rotary tables cover" in line, (code, line)
    assert "Traceback" not in run.stderr()
    assert not run.rank_folders_left()


# ---------------------------------------------------------------- torchrun


@pytest.mark.slow
def test_torchrun_exits_zero_every_time(tmp_path, model, val):
    """The process group is destroyed before exit: gloo's threads left to interpreter teardown
    aborted about one run in ten ('terminate called without an active exception', exit 1).
    Six runs, two at a time (the load makes the race likelier)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "llamafuse.runtime.cli", "hellaswag", str(model), "--data", str(val), "--limit", "4",
           "--device", "cpu"]
    for pair in range(3):
        procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
        for p in procs:
            out = p.communicate(timeout=RUN_S)[0]
            assert p.returncode == 0, out
            assert out.count("| hellaswag |") == 1 and "terminate called" not in out, out
