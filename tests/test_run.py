"""`llama-run` end to end on the CPU: HellaSwag against an independent harness re-implementation,
packing / tensor-parallel invariance, output files, --resume, logits / validate / verify, and
one-line errors for bad input.

Every run goes through the real command line in a subprocess (tp > 1 spawns gloo processes).
"""
from __future__ import annotations

import contextlib
import gzip
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sentencepiece as spm
import torch

from llamafuse.convert.sources import open_source
from llamafuse.convert.write import convert
from llamafuse.formats.reference import Reference, reference_logits
from llamafuse.runtime.evaluate import EAGER_BATCHES

sys.path.insert(0, str(Path(__file__).resolve().parent))
from checkpoints import llama30b_like  # noqa: E402
from conftest import DATA, command  # noqa: E402
from harness_reference import (encode_pair, harness_metrics, harness_predictions, harness_scores,  # noqa: E402
                               loglikelihood, requests)

VAL = DATA / "hellaswag" / "hellaswag_val.jsonl.gz"
LLAMA_TOK = DATA / "llama-tokenizer" / "tokenizer.model"
STORIES_META = DATA / "stories260K" / "meta"

N_STORIES = 40      # items scored on stories260K
N_BIG = 12          # items scored on the random 52-head model
LL_TOL = 1e-3       # fused float32 runtime vs float64 unpacked reference, per summed log-likelihood
SAME_TOL = 1e-4     # the runtime against itself (batch size, tp)


# ---------------------------------------------------------------- helpers


LLAMA_RUN = command("llama-run")


def llama_run(*args, combined: bool = False, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `llama-run ARGS`; with combined, stderr is folded into stdout."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([*LLAMA_RUN, *map(str, args)], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT if combined else subprocess.PIPE,
                          text=True, timeout=timeout, env=env)


def read_docs(n: int) -> list[dict]:
    """The first n rows of the validation file, read without the product's loader."""
    with gzip.open(VAL, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in itertools.islice(f, n)]


def read_samples(path: Path) -> list[dict]:
    """The item records of a samples file (its first line says which run wrote it)."""
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert set(lines[0]) == {"llamafuse_run"}, lines[0]
    return lines[1:]


def hellaswag(folder: Path, out: Path, name: str, *extra, limit: int, batch_tokens: int = 300,
              bos: bool = True) -> dict:
    """Run `llama-run hellaswag`; returns results JSON, samples by doc_id and stdout."""
    results, samples = out / f"{name}.json", out / f"{name}.samples.jsonl"
    p = llama_run("hellaswag", folder, "--data", VAL, "--limit", limit, "--device", "cpu",
                  "--batch-tokens", batch_tokens, "--bos" if bos else "--no-bos",
                  "--output", results, "--samples", samples, *extra)
    assert p.returncode == 0, p.stdout + p.stderr
    recs = read_samples(samples)
    by_doc = {r["doc_id"]: r for r in recs}
    assert len(by_doc) == len(recs) == limit, "each item scored exactly once"
    return {"results": json.loads(results.read_text()), "records": recs, "samples": by_doc,
            "stdout": p.stdout, "samples_path": samples}


def lls_of(run: dict) -> dict[int, list[float]]:
    return {d: r["lls"] for d, r in run["samples"].items()}


def max_diff(a: dict[int, list[float]], b: dict[int, list[float]]) -> float:
    assert a.keys() == b.keys()
    return max(abs(x - y) for d in a for x, y in zip(a[d], b[d], strict=True))


def check_against_harness(run: dict, docs: list[dict], ref: list[list[float]]) -> None:
    """Item-by-item log-likelihoods, predictions and the aggregate metrics."""
    assert set(run["samples"]) == set(range(len(docs)))
    worst = 0.0
    for i, doc in enumerate(docs):
        rec = run["samples"][i]
        assert len(rec["lls"]) == 4
        for j in range(4):
            d = abs(rec["lls"][j] - ref[i][j])
            worst = max(worst, d)
            assert d <= LL_TOL, f"doc {i} ending {j}: llama-run {rec['lls'][j]!r}, harness {ref[i][j]!r}"
        assert rec["label"] == int(doc["label"])
        assert (rec["pred"], rec["pred_norm"]) == harness_predictions(doc, ref[i]), f"doc {i}"
    want = harness_metrics(docs, ref)
    got = run["results"]
    for k in ("acc", "acc_norm", "acc_stderr", "acc_norm_stderr"):
        assert got[k] == pytest.approx(want[k], abs=1e-12), k
    assert got["n"] == want["n"] == len(docs)


def one_line_error(p: subprocess.CompletedProcess) -> str:
    """Assert a user error: non-zero exit, exactly one line `llama-run: error: ...`, no traceback."""
    out = p.stdout.strip()
    assert p.returncode != 0, out
    assert "Traceback" not in out, out
    lines = out.splitlines()
    assert len(lines) == 1, f"expected one line, got:\n{out}"
    assert lines[0].startswith("llama-run: error:"), out
    return lines[0]


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    for p in (VAL, LLAMA_TOK, STORIES_META / "consolidated.00.pth"):
        assert p.is_file(), f"missing test data {p}"
    return tmp_path_factory.mktemp("run")


@pytest.fixture(scope="module")
def stories_src():
    return open_source(STORIES_META)


@pytest.fixture(scope="module")
def stories_ref() -> Reference:
    return Reference(STORIES_META)


@pytest.fixture(scope="module")
def stories_sp() -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(STORIES_META / "tokenizer.model"))


@pytest.fixture(scope="module")
def llama_sp() -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(LLAMA_TOK))


@pytest.fixture(scope="module")
def stories_out(work, stories_src) -> Path:
    out = work / "stories-tp1"
    convert(stories_src, out, 1, "float32", progress=False)
    return out


@pytest.fixture(scope="module")
def big_dir(work) -> Path:
    folder = work / "llama30b-like"
    llama30b_like(folder, LLAMA_TOK)
    return folder


@pytest.fixture(scope="module")
def big_src(big_dir):
    return open_source(big_dir)


@pytest.fixture(scope="module")
def big_ref(big_dir) -> Reference:
    return Reference(big_dir)


@pytest.fixture(scope="module")
def big_outs(work, big_src) -> dict[int, Path]:
    outs = {}
    for tp in (1, 2, 4):
        outs[tp] = work / f"big-tp{tp}"
        convert(big_src, outs[tp], tp, "float32", progress=False)
    return outs


@pytest.fixture(scope="module")
def stories_docs() -> list[dict]:
    return read_docs(N_STORIES)


@pytest.fixture(scope="module")
def big_docs() -> list[dict]:
    return read_docs(N_BIG)


@pytest.fixture(scope="module")
def stories_runs(work, stories_out) -> dict[bool, dict]:
    return {bos: hellaswag(stories_out, work, f"stories-bos{int(bos)}", limit=N_STORIES, bos=bos)
            for bos in (True, False)}


@pytest.fixture(scope="module")
def big_runs(work, big_outs) -> dict[bool, dict]:
    return {bos: hellaswag(big_outs[1], work, f"big-bos{int(bos)}", limit=N_BIG, bos=bos)
            for bos in (True, False)}


# ---------------------------------------------------------------- 1, 2: against the harness


def test_reference_sanity(stories_ref, stories_sp, llama_sp, stories_docs):
    """The harness re-implementation itself: BOS prefixes both context and whole as the harness
    does, a context's trailing space moves to the continuation, and the pretrained stories260K
    prefers a real sentence to the same words scrambled."""
    reqs_bos = requests(stories_docs[0], stories_sp, stories_sp.bos_id())
    reqs_nob = requests(stories_docs[0], stories_sp, None)
    for (cb, eb), (cn, en) in zip(reqs_bos, reqs_nob):
        assert cb == [stories_sp.bos_id()] + cn and eb == en and eb
    ctx, cont = encode_pair(llama_sp, "Lily went home ", "and slept.", None)  # LLaMA's keeps spaces
    assert ctx == llama_sp.encode("Lily went home") != llama_sp.encode("Lily went home ")
    assert ctx + cont == llama_sp.encode("Lily went home and slept.")
    ctx, real = encode_pair(stories_sp, "Once upon a time, there was a little girl named", " Lily.", stories_sp.bos_id())
    _, scrambled = encode_pair(stories_sp, "Once upon a time, there was a little girl named", " the.", stories_sp.bos_id())
    assert loglikelihood(stories_ref, ctx, real) > loglikelihood(stories_ref, ctx, scrambled) + 1


@pytest.mark.parametrize("bos", [True, False], ids=["bos", "no-bos"])
def test_stories_matches_harness(bos, stories_runs, stories_ref, stories_sp, stories_docs, stories_out):
    from llamafuse.formats.tokenizer import read_tokenizer
    from llamafuse.runtime.hellaswag import build_items, load_docs
    from llamafuse.runtime.packing import pack_groups, prefix_forest

    def sequences(item):
        return [r.inputs for r in item.group().requests]

    # Precondition: --batch-tokens 300 really packs several items per batch, in unequal batches.
    tok = read_tokenizer(stories_out / "tokenizer.model", 512)
    items = build_items(load_docs(str(VAL), N_STORIES), tok, 1 if bos else None)
    batches = pack_groups([sequences(it) for it in items], 300)
    assert 1 < len(batches) < len(items)
    assert max(map(len, batches)) >= 2 and len({len(b) for b in batches}) > 1
    # ... and items in a batch share prefixes, so the comparison covers cross-item sharing.
    together = sum(len(prefix_forest([s for i in b for s in sequences(items[i])])) for b in batches)
    assert together < sum(len(prefix_forest(sequences(it))) for it in items)

    ref = harness_scores(stories_ref, stories_docs, stories_sp, stories_sp.bos_id() if bos else None)
    check_against_harness(stories_runs[bos], stories_docs, ref)


@pytest.mark.parametrize("bos", [True, False], ids=["bos", "no-bos"])
def test_llama30b_like_matches_harness(bos, big_runs, big_ref, llama_sp, big_docs):
    ref = harness_scores(big_ref, big_docs, llama_sp, llama_sp.bos_id() if bos else None)
    check_against_harness(big_runs[bos], big_docs, ref)


def test_bos_changes_scores(stories_runs):
    assert max_diff(lls_of(stories_runs[True]), lls_of(stories_runs[False])) > 0.1


# ---------------------------------------------------------------- 3, 4: invariance


def test_batch_size_independence(work, stories_out, stories_runs):
    small = hellaswag(stories_out, work, "stories-bt200", limit=N_STORIES, batch_tokens=200)
    large = hellaswag(stories_out, work, "stories-bt5000", limit=N_STORIES, batch_tokens=5000)
    assert max_diff(lls_of(small), lls_of(large)) <= SAME_TOL
    assert max_diff(lls_of(small), lls_of(stories_runs[True])) <= SAME_TOL
    for k in ("acc", "acc_norm"):
        assert small["results"][k] == large["results"][k] == stories_runs[True]["results"][k]
    assert large["results"]["settings"]["batch_tokens"] == 5000


@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_parallel_matches_tp1(tp, work, big_outs, big_runs):
    run = hellaswag(big_outs[tp], work, f"big-tp{tp}", limit=N_BIG, batch_tokens=300)
    assert run["results"]["settings"]["tp"] == tp
    assert max_diff(lls_of(run), lls_of(big_runs[True])) <= SAME_TOL
    for k in ("acc", "acc_norm"):
        assert run["results"][k] == big_runs[True]["results"][k]


def test_replicas_match_single_process(work, stories_out, stories_runs):
    """Two data-parallel CPU replicas (gloo) split the batches and still score every item once;
    the timing's parts add up, none negative (eval: from when every rank began scoring until the
    last one ended), ready counting from the ranks' start (their own start-up in it)."""
    run = hellaswag(stories_out, work, "stories-rep2", "--replicas", 2, limit=N_STORIES)
    assert run["results"]["settings"]["replicas"] == 2
    assert max_diff(lls_of(run), lls_of(stories_runs[True])) <= SAME_TOL
    t = run["results"]["timing"]
    assert t["tokens"] == stories_runs[True]["results"]["timing"]["tokens"]
    assert t["ready_s"] >= t["load_s"] > 0 and t["data_s"] > 0  # ready: from the ranks' start (spawn, imports)
    assert 0.3 < t["rank_start_s"] < t["ready_s"]   # a spawned rank starts an interpreter and imports torch
    assert t["wall_s"] == pytest.approx(t["startup_s"] + t["ready_s"] + t["eval_s"] + t["other_s"], abs=0.01)
    assert t["other_s"] >= 0


def test_results_written_before_the_ranks_are_reaped(work, stories_out):
    """`llama-run hellaswag` with ranks in other processes writes --output before it reaps the
    finished ranks (which the kernel meanwhile tears down: GPU contexts take a while)."""
    out = work / "reaped.json"
    script = f"""
from pathlib import Path
from llamafuse.runtime import cli, parallel
kill, out = parallel._kill, Path({str(out)!r})
def seen_then_kill(pc):
    out.with_suffix(".seen").write_text(str(out.is_file()))
    kill(pc)
parallel._kill = seen_then_kill
cli.main(args=["hellaswag", {str(stories_out)!r}, "--data", {str(VAL)!r}, "--limit", "4", "--device", "cpu",
               "--replicas", "2", "--output", str(out)], prog_name="llama-run")
"""
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert out.with_suffix(".seen").read_text() == "True"


def test_tp2_times_two_replicas_matches_tp1(work, big_outs, big_runs):
    """tp 2 x 2 replicas: four gloo processes, two tensor-parallel groups splitting the batches."""
    run = hellaswag(big_outs[2], work, "big-tp2-rep2", "--replicas", 2, limit=N_BIG, batch_tokens=300)
    s = run["results"]["settings"]
    assert (s["tp"], s["replicas"]) == (2, 2)
    assert max_diff(lls_of(run), lls_of(big_runs[True])) <= SAME_TOL
    assert len(lls_of(run)) == N_BIG


def test_under_torchrun_matches_tp1(work, big_outs, big_runs):
    """`torchrun --nproc-per-node 2 -m llamafuse.runtime.cli hellaswag` on a tp 2 folder: the
    processes join torchrun's group instead of spawning their own; rank 0 writes the outputs."""
    samples = work / "torchrun.samples.jsonl"
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                        "-m", "llamafuse.runtime.cli", "hellaswag", str(big_outs[2]), "--data", str(VAL),
                        "--limit", str(N_BIG), "--device", "cpu", "--batch-tokens", "300",
                        "--samples", str(samples)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.count("| hellaswag |") == 1, p.stdout
    recs = {r["doc_id"]: r["lls"] for r in read_samples(samples)}
    assert max_diff(recs, lls_of(big_runs[True])) <= SAME_TOL


# ---------------------------------------------------------------- 5: output files


def test_rank_threads_run_on_the_rank_device(monkeypatch):
    """CUDA's current device is per thread and a new thread starts on cuda:0: the workers of
    `device_threads` set the rank's device before any task (run 14: a rank's collective from a
    thread on cuda:0 hung tp 2 and replicas on two GPUs), and no other runtime module starts a
    thread any other way."""
    import ast
    import threading
    import time as _time

    from llamafuse.runtime import parallel
    calls: dict[int, list] = {}
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.setdefault(threading.get_ident(), []).append(d))
    with parallel.device_threads(torch.device("cuda", 1), 2) as pool:
        seen = list(pool.map(lambda _: (_time.sleep(0.02), list(calls.get(threading.get_ident(), [])))[1], range(6)))
    assert len(calls) == 2 and all(devices[:1] == [torch.device("cuda", 1)] for devices in seen)
    with parallel.device_threads(torch.device("cpu")) as pool:
        pool.submit(lambda: None).result()
    assert len(calls) == 2
    for f in Path(parallel.__file__).parent.glob("*.py"):
        used = {getattr(n, "id", getattr(n, "attr", None)) for n in ast.walk(ast.parse(f.read_text()))}
        assert f.name == "parallel.py" or not used & {"ThreadPoolExecutor", "Thread"}, f"{f.name} starts threads"


def test_small_messages_go_over_a_cpu_group():
    """Errors, skip sets and results (every object collective of the runtime) go over
    `Context.control`, a gloo group of all ranks of its own: on GPUs NCCL then carries only the
    model's tensors and never builds a communicator of all ranks."""
    import ast

    from llamafuse.runtime import parallel
    from spawn_worker import control_group
    assert parallel.launch(control_group, 2, 1, "cpu") == ("gloo", True)
    calls = 0
    for f in Path(parallel.__file__).parent.glob("*.py"):
        for n in ast.walk(ast.parse(f.read_text())):
            if isinstance(n, ast.Call) and getattr(n.func, "attr", "").endswith(("_object", "_object_list")):
                calls += 1
                group = [ast.unparse(k.value) for k in n.keywords if k.arg == "group"]
                assert group == ["ctx.control"], f"{f.name}:{n.lineno} {ast.unparse(n)}"
    assert calls >= 3


def test_gpu_loader_copies_every_byte_and_sleeps_while_it_waits(tmp_path, monkeypatch):
    """The CUDA loader (run here with CPU stand-ins for pinned memory, streams and events) copies
    every byte of the file through its chunks and double buffers, and waits on blocking events: a
    spinning wait keeps a core busy per loader thread, starving the compile stack's import and the
    compiler that run beside it on the rank."""
    from contextlib import nullcontext

    from llamafuse.runtime import load
    made: list[bool] = []   # each event's `blocking`

    class Event:   # torch.cuda.Event's signature
        def __init__(self, enable_timing: bool = False, blocking: bool = False, interprocess: bool = False):
            made.append(blocking)

        def record(self, stream=None) -> None:
            pass

        def synchronize(self) -> None:
            pass
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, pin_memory=False, **k: empty(*a, **k))
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device: None)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: nullcontext())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(load, "CHUNK", 1000)
    data = os.urandom(10_500)
    (tmp_path / "rank.safetensors").write_bytes(data)
    out = load._copy_file_to_device(tmp_path / "rank.safetensors", torch.device("cpu"), 3)
    assert bytes(out.numpy()) == data
    assert len(made) == 11 and all(made)
    # Replicas sharing the file: each reads its part into room for all of them; the parts cover it.
    whole = bytearray()
    for i in range(3):
        part = load.Part(i, 3)
        start, length = part.span(len(data))
        out = load._copy_file_to_device(tmp_path / "rank.safetensors", torch.device("cpu"), 3, part)
        assert len(out) == 3 * length
        whole += bytes(out[start:start + length].numpy())
    assert bytes(whole[:len(data)]) == data and len(made) == 11 + 3 * 4


def test_spawned_ranks_read_the_job_from_a_file(monkeypatch):
    """What goes down each spawned rank's start pipe stays small whatever the job's size (the
    parent would otherwise wait on each rank in turn to import its modules before starting the
    next); every rank gets the whole job."""
    import pickle

    from llamafuse.runtime import parallel
    from spawn_worker import data_seen
    sizes: list[int] = []
    start = parallel.mp.start_processes

    def recording(fn, args, **kwargs):
        sizes.append(len(pickle.dumps(args)))
        return start(fn, args, **kwargs)
    monkeypatch.setattr(parallel.mp, "start_processes", recording)
    data = list(range(200_000))
    assert parallel.launch(data_seen, 2, 1, "cpu", data) == [(0, len(data), sum(data)), (1, len(data), sum(data))]
    assert len(sizes) == 1 and sizes[0] < 1000, sizes


def _wait_started(folder: Path, world: int) -> list[int]:
    """The pids the ranks of a `mark_then_sum` run left in `folder`, once all have."""
    end = time.monotonic() + 120
    while not all((folder / f"started-{r}").exists() for r in range(world)):
        assert time.monotonic() < end, "the ranks did not start within 120 s"
        time.sleep(0.02)
    return [int((folder / f"started-{r}").read_text()) for r in range(world)]


def test_hellaswag_reads_its_data_once_the_ranks_started(stories_out, monkeypatch):
    """`llama-run hellaswag` starts its ranks (they load and compile meanwhile) before it reads,
    checks and tokenizes the data."""
    from contextlib import contextmanager

    from click.testing import CliRunner

    from llamafuse.runtime import cli, hellaswag as task
    events: list = []
    real_start, real_load = cli.start, task.load_docs

    @contextmanager
    def start(*args, **kwargs):
        events.append("start")
        with real_start(*args, **kwargs) as ranks:
            yield ranks
    monkeypatch.setattr(cli, "start", start)
    monkeypatch.setattr(task, "load_docs", lambda *a: (events.append("read"), real_load(*a))[1])
    r = CliRunner().invoke(cli.main, ["hellaswag", str(stories_out), "--data", str(VAL), "--limit", "2",
                                      "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert events == ["start", "read"]


@pytest.mark.parametrize("where", ["import", "import-in-user-error", "finalizer"])
def test_signal_lost_on_its_way_is_reported_as_the_signal(stories_out, monkeypatch, where):
    """A SIGINT that lands while a C extension initializes (sentencepiece, reading the tokenizer)
    surfaces as ImportError("initialization failed") raised from our Interrupted, perhaps inside a
    LlamafuseError raised while handling it; one that lands in a finalizer (`__del__`) is lost
    there, and the run then fails otherwise (its ranks got the SIGINT too). Each time `llama-run`
    reports the signal, in one line, exit 130."""
    from click.testing import CliRunner

    from llamafuse.formats import LlamafuseError
    from llamafuse.formats.interrupts import Interrupted
    from llamafuse.runtime import cli, options

    class Finalizer:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)    # the handler runs here, and its exception cannot leave __del__

    def read_tokenizer(*args):
        if where == "finalizer":
            Finalizer()
            raise LlamafuseError("rank 1 was killed by SIGINT")
        try:
            raise ImportError("initialization failed") from Interrupted(signal.SIGINT)
        except ImportError:
            if where == "import-in-user-error":
                raise LlamafuseError("cannot read the tokenizer") from None
            raise
    monkeypatch.setattr(options, "read_tokenizer", read_tokenizer)
    r = CliRunner().invoke(cli.main, ["hellaswag", str(stories_out), "--data", str(VAL), "--limit", "2",
                                      "--device", "cpu"])
    assert (r.exit_code, r.stderr.splitlines()) == (130, ["llama-run: error: interrupted by SIGINT"]), r.output


def test_load_threads_reach_the_loader(stories_out, monkeypatch):
    """`llama-run hellaswag --load-threads N` records N in the results' settings, and a rank reads
    its weights with N threads (`Settings.load_threads`); 0 is refused in one line. So is
    `--eager-batches -1`, and `--eager-batches 0` is recorded."""
    from click.testing import CliRunner
    from tqdm import tqdm

    from llamafuse.formats import load_manifest
    from llamafuse.runtime import cli, evaluate, parallel
    from llamafuse.runtime.parallel import Context
    for option, good, bad in (("--load-threads", 3, 0), ("--eager-batches", 0, -1)):
        r = CliRunner().invoke(cli.main, ["hellaswag", str(stories_out), "--data", str(VAL), "--limit", "2",
                                          "--device", "cpu", option, str(good), "--json"])
        assert r.exit_code == 0, r.output
        assert json.loads(r.stdout)["settings"][option[2:].replace("-", "_")] == good
        r = CliRunner().invoke(cli.main, ["hellaswag", str(stories_out), "--device", "cpu", option, str(bad)])
        assert r.exit_code == 2 and f"Invalid value for '{option}'" in r.output
    threads: list = []
    real = evaluate.load_rank
    monkeypatch.setattr(evaluate, "load_rank", lambda *a: (threads.append(a[4]), real(*a))[1])
    ctx = Context(0, 1, 1, torch.device("cpu"), None, 0, 0, 1, time.time())
    with parallel.device_threads(ctx.device, 2) as pool:
        evaluate._Startup(ctx, stories_out, load_manifest(stories_out), evaluate.Settings(64, progress=False,
                          load_threads=5), pool, tqdm(disable=True), "test").weights()
    assert threads == [5]


def test_planned_groups_travel_to_the_ranks_as_arrays_and_come_back_equal():
    """`plan` hands the ranks its groups as a `GroupTable`: pickled, it holds flat arrays and no
    Group or Request objects (the ranks unpickle buffers, not a Python object per token), and
    indexed it gives back each group exactly, in order, negative indices too."""
    import pickle
    import pickletools

    import numpy as np

    from llamafuse.runtime.evaluate import Group, GroupTable, Request, plan

    rng = np.random.default_rng(0)

    def request() -> Request:
        return Request(tuple(rng.integers(0, 32000, rng.integers(1, 9)).tolist()),
                       tuple(rng.integers(0, 32000, rng.integers(1, 5)).tolist()))
    groups = [Group(k, tuple(request() for _ in range(rng.integers(1, 5)))) for k in range(7, 40)]
    work = plan(groups, frozenset({8, 20}), 64)
    assert isinstance(work.groups, GroupTable)
    data = pickle.dumps(work, protocol=pickle.HIGHEST_PROTOCOL)
    strings = {arg for op, arg, _ in pickletools.genops(data) if isinstance(arg, str)}   # incl. class names
    assert "GroupTable" in strings and not strings & {"Group", "Request"}
    back = pickle.loads(data).groups
    todo = [g for g in groups if g.key not in {8, 20}]
    assert len(back) == len(todo) and list(back) == todo
    assert back[-1] == todo[-1] and back[-len(todo)] == todo[0]
    with pytest.raises(IndexError):
        back[len(todo)]
    assert list(GroupTable([])) == []


def test_ranks_score_the_batches_their_caller_planned(stories_out, monkeypatch):
    """`score_worker` scores the `Work`'s batches as the caller packed them (`evaluate.plan`, in the
    command's process while the ranks load) and packs nothing itself; the scores do not depend on
    the packing."""
    from llamafuse.formats import load_manifest
    from llamafuse.formats.tokenizer import read_tokenizer
    from llamafuse.runtime import evaluate
    from llamafuse.runtime.hellaswag import build_items, load_docs
    from llamafuse.runtime.packing import prefix_forest
    from llamafuse.runtime.parallel import Context

    m = load_manifest(stories_out)
    items = build_items(load_docs(str(VAL), 12), read_tokenizer(stories_out / "tokenizer.model", 512), 1)
    groups = [it.group() for it in items]
    settings = evaluate.Settings(4096, progress=False)
    packed = evaluate.plan(groups, frozenset({groups[0].key}), settings.batch_tokens)
    assert [g.key for g in packed.groups] == [g.key for g in groups[1:]] and len(packed.batches) == 1
    alone = evaluate.Work(packed.groups, [[i] for i in range(len(packed.groups))], packed.skip)

    def run(work: evaluate.Work) -> evaluate.RunResult:
        ctx = Context(0, 1, 1, torch.device("cpu"), None, 0, 0, 1, time.time())
        return evaluate.score_worker(ctx, stories_out, m, settings, lambda: (work,))
    whole = run(packed)
    monkeypatch.setattr(evaluate, "pack_groups", lambda *a, **k: pytest.fail("a rank packed"))
    one_each = run(alone)
    forest = lambda gs: len(prefix_forest([r.inputs for g in gs for r in g.requests]))  # noqa: E731
    assert whole.tokens == forest(packed.groups)
    assert one_each.tokens == sum(forest([g]) for g in packed.groups) > whole.tokens
    assert sorted(one_each.scores) == sorted(whole.scores) == [g.key for g in groups[1:]]
    for k, s in whole.scores.items():
        assert [ll for ll, _ in one_each.scores[k]] == pytest.approx([ll for ll, _ in s], abs=SAME_TOL)


def test_parts_of_a_rank_file_cover_it_in_aligned_equal_parts():
    """`Part.span`: the parts are equal 16-byte multiples, one after another from byte 0, and
    together cover the file (the last may run past its end)."""
    from llamafuse.runtime.load import ALIGN, Part
    for size in (1, 15, 16, 1000, 4099, 65 << 20):
        for count in range(1, 6):
            spans = [Part(i, count).span(size) for i in range(count)]
            length = spans[0][1]
            assert length % ALIGN == 0 and all(n == length for _, n in spans)
            assert [start for start, _ in spans] == [i * length for i in range(count)]
            assert count * length - ALIGN * count < size <= count * length


def test_gpu_ranks_build_their_first_communicators_early_and_replicas_share_reading(monkeypatch):
    """`_reading_plan`: on GPUs a tp > 1 rank has its tp group's communicator built from the start
    (and, for a warm start, first its spare group's, which the uncompiled batches use) and reads
    its whole file; replicas of a tp 1 model read a part each and build their peers' communicator,
    if their GPUs reach each other directly on one host (else each reads all of it); a lone GPU and
    CPU ranks (gloo, memory maps) do neither."""
    from llamafuse.runtime.evaluate import _reading_plan
    from llamafuse.runtime.load import Part
    from llamafuse.runtime.parallel import Context
    tp, peers, spare = object(), object(), object()
    reach: list = []
    p2p = {1}   # the GPUs with peer access to the others
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.cuda, "can_device_access_peer",
                        lambda d, p: (reach.append((d.index, p.index)), d.index in p2p)[1])

    def ctx(device: str, n_tp: int, replicas: int) -> Context:
        dev = torch.device("cuda", 1) if device == "cuda" else torch.device("cpu")   # rank 1's GPU
        return Context(1, n_tp * replicas, n_tp, dev, tp if n_tp > 1 else None, 1 % n_tp,
                       1 // n_tp, replicas, 0.0, None, peers if replicas > 1 else None, spare if n_tp > 1 else None)
    assert _reading_plan(ctx("cuda", 2, 1), False) == (None, [tp])
    assert _reading_plan(ctx("cuda", 2, 1), True) == (None, [spare, tp])
    assert _reading_plan(ctx("cuda", 2, 2), False) == (None, [tp])
    for warm in (False, True):
        assert _reading_plan(ctx("cuda", 1, 2), warm) == (Part(1, 2), [peers]) and reach == [(1, 0)]
        reach.clear()
    p2p.clear()
    assert _reading_plan(ctx("cuda", 1, 2), True) == (None, [])   # no peer access: each reads its file
    p2p.add(1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")                # torchrun, one rank per host
    assert _reading_plan(ctx("cuda", 1, 2), True) == (None, [])
    assert _reading_plan(ctx("cuda", 1, 1), True) == (None, [])
    assert _reading_plan(ctx("cpu", 2, 2), True) == (None, [])
    assert _reading_plan(ctx("cpu", 1, 2), True) == (None, [])


def test_replicas_swap_the_parts_they_read():
    """`Context.peers` holds the ranks of one tp rank, one per replica; once connected (`connect`)
    and after `swap_parts` each of them holds the whole of its tp rank's file though it read (held)
    only its own part. tp 2 x 2
    replicas over gloo (on GPUs NCCL, GPU to GPU)."""
    from llamafuse.runtime import parallel
    from spawn_worker import swapped_parts
    files = [bytes((7 * i + 3 * t) % 251 for i in range(1000 + 37 * t)) for t in range(2)]
    seen = parallel.launch(swapped_parts, 2, 2, "cpu", files)
    assert seen == [(0, [0, 2], True), (1, [1, 3], True), (2, [0, 2], True), (3, [1, 3], True)]


def test_replicas_sharing_their_reading_get_the_whole_model(stories_out):
    """Two replicas getting their model ready as on GPUs (each reads its part of the rank file and
    they swap parts; CUDA's pinned memory, streams and events stood in for on the CPU) both end
    with every tensor equal to the file's."""
    from llamafuse.runtime import parallel
    from spawn_worker import shared_reading
    assert parallel.launch(shared_reading, 1, 2, "cpu", stories_out) == [(0, True, True), (1, True, True)]


def _planned(folder: Path, n_items: int, batch_tokens: int = 300):
    """The first `n_items` HellaSwag items for the model in `folder`, planned as llama-run plans them."""
    from llamafuse.formats import load_manifest
    from llamafuse.formats.tokenizer import read_tokenizer
    from llamafuse.runtime import evaluate
    from llamafuse.runtime.hellaswag import build_items, load_docs
    m = load_manifest(folder)
    tok = read_tokenizer(folder / m.tokenizer.file, m.config.vocab_size)
    items = build_items(load_docs(str(VAL), n_items), tok, m.tokenizer.bos_id)
    return evaluate.plan([it.group() for it in items], frozenset(), batch_tokens)


def _score_here(folder: Path, work, eager_batches: int):
    """`score_worker` as a lone rank in this process runs it."""
    from llamafuse.formats import load_manifest
    from llamafuse.runtime import evaluate
    from llamafuse.runtime.parallel import Context
    ctx = Context(0, 1, 1, torch.device("cpu"), None, 0, 0, 1, time.time())
    settings = evaluate.Settings(300, progress=False, eager_batches=eager_batches)
    return evaluate.score_worker(ctx, folder, load_manifest(folder), settings, lambda: (work,))


def test_warm_start_scores_the_first_batches_uncompiled_then_switches(stories_out, monkeypatch):
    """Where the model compiles (as on a GPU; the compiler stood in for), a rank scores its first
    `eager_batches` batches on the uncompiled model while another thread builds and warms up the
    compiled one, then every other batch on the compiled one. Which batches run uncompiled is
    fixed by the count, never by timing: a warm-up 1.5 s slower changes nothing but the wait. The
    uncompiled batches run with the interpreter's switch interval lowered (`EAGER_SWITCH_S`), the
    rest with it as it was; CUDA's cached memory is freed once, at the switch. The scores equal a
    run without the warm start; the phases are reported."""
    import sys
    import threading

    from llamafuse.runtime.evaluate import EAGER_SWITCH_S

    from spawn_worker import compiling_as_on_a_gpu
    work = _planned(stories_out, 24)
    n = len(work.batches)
    assert n >= 5
    cold = None
    for eager_batches, delay in ((0, 0.0), (2, 0.0), (2, 1.5)):
        log = compiling_as_on_a_gpu(monkeypatch.setattr, delay)
        monkeypatch.setattr(torch.cuda, "empty_cache", lambda: log.append(("empty_cache",)))
        result = _score_here(stories_out, work, eager_batches)
        batches = [e for e in log if e[0] == "batch"]
        assert [compiles for _, compiles, *_ in batches] == [False] * eager_batches + [True] * (n - eager_batches)
        assert {thread for _, _, thread, _ in batches} == {threading.get_ident()}
        default = sys.getswitchinterval()
        assert [interval for *_, interval in batches] == [EAGER_SWITCH_S] * eager_batches + [default] * (
            n - eager_batches) and default != EAGER_SWITCH_S
        assert [e[0] for e in log].count("warm_up") == 1 and next(e for e in log if e[0] == "warm_up")[1] != \
            threading.get_ident()
        # the caches the uncompiled batches and the compile's stream held are freed once, at the switch
        assert [e[0] for e in log if e[0] in ("batch", "empty_cache")] == (
            ["batch"] * eager_batches + ["empty_cache"] + ["batch"] * (n - eager_batches) if eager_batches
            else ["batch"] * n)
        ph = result.phases
        assert ph.eager_batches == eager_batches and ph.steady_s > 0
        assert (ph.eager_s > 0) == (eager_batches > 0) and (ph.wait_s > 1.0) == (delay > 0)
        assert result.ready.scoring_s <= result.ready.total_s or not eager_batches
        if cold is None:
            cold = result.scores
            continue
        assert sorted(result.scores) == sorted(cold)
        for k, s in result.scores.items():
            assert [ll for ll, _ in s] == pytest.approx([ll for ll, _ in cold[k]], abs=SAME_TOL)


def test_warm_start_with_fewer_batches_runs_them_all_uncompiled(stories_out, monkeypatch):
    """A replica with no more batches than the warm start's scores them all on the uncompiled
    model and still ends cleanly (the compiling thread finishes first); on the CPU, where nothing
    compiles, there is no warm start at all."""
    from spawn_worker import compiling_as_on_a_gpu
    work = _planned(stories_out, 4, batch_tokens=4096)
    assert len(work.batches) == 1
    with monkeypatch.context() as patched:
        log = compiling_as_on_a_gpu(patched.setattr)
        result = _score_here(stories_out, work, 3)
        assert [e[1] for e in log if e[0] == "batch"] == [False] and result.phases.eager_batches == 1
    result = _score_here(stories_out, work, 3)
    assert result.phases.eager_batches == 0 and result.phases.steady_s == pytest.approx(result.eval_s)


def test_warm_start_under_tensor_parallelism_keeps_its_all_reduces_apart(work, big_outs):
    """tp 2 (gloo processes): the uncompiled batches' all-reduces go through the spare group and
    the compiled model's (its warm-up's, beside them in another thread, and the later batches')
    through the tp group, so neither waits on the other's; both ranks switch at the same batch and
    the scores equal tp 1's."""
    from llamafuse.runtime import parallel
    from spawn_worker import warm_start
    planned = _planned(big_outs[2], 16)
    n = len(planned.batches)
    result, logs = parallel.launch(warm_start, 2, 1, "cpu", big_outs[2], planned, 2)
    for log in logs:
        assert [e[1] for e in log if e[0] == "batch"] == [False] * 2 + [True] * (n - 2)
        reduces = {(compiles, group) for kind, compiles, group in (e for e in log if e[0] == "all_reduce")}
        assert reduces == {(False, "spare"), (True, "tp")}
    assert result.phases.eager_batches == 2
    alone = _score_here(big_outs[1], planned, 0)
    assert sorted(result.scores) == sorted(alone.scores)
    for k, s in result.scores.items():
        assert [ll for ll, _ in s] == pytest.approx([ll for ll, _ in alone.scores[k]], abs=SAME_TOL)


def test_connections_are_built_in_order_and_report_failures(monkeypatch):
    """`Connections` builds the groups' communicators one after another in the order given, in a
    thread of its own; `wait` returns once a group's is built (at once for a group not among
    them) and raises, for that group and every later one, what building it raised."""
    import threading

    from llamafuse.runtime import parallel
    built: list[tuple[str, int]] = []
    release = threading.Event()

    def all_reduce(t, group=None):
        release.wait(10)
        if group == "bad":
            raise RuntimeError("peer gone")
        built.append((group, threading.get_ident()))
    monkeypatch.setattr(parallel.dist, "all_reduce", all_reduce)
    c = parallel.Connections(["a", "b"], torch.device("cpu"))
    c.wait("not built here")
    release.set()
    c.wait("b")
    assert [g for g, _ in built] == ["a", "b"] and built[0][1] != threading.get_ident()
    c = parallel.Connections(["a", "bad", "c"], torch.device("cpu"))
    c.wait("a")
    for g in ("bad", "c"):
        with pytest.raises(RuntimeError, match="peer gone"):
            c.wait(g)


def test_spawned_ranks_start_before_their_data(tmp_path):
    """`start` starts the ranks at once: every rank is running before `run` hands them the data
    (llama-run tokenizes meanwhile), and then every rank gets it."""
    from llamafuse.runtime import parallel
    from spawn_worker import mark_then_sum
    with parallel.start(mark_then_sum, 2, 1, "cpu", tmp_path) as ranks:
        assert ranks.launched is not None and ranks.launched <= time.time()
        _wait_started(tmp_path, 2)
        assert ranks.run([1, 2, 3]) == [(0, 6), (1, 6)]


def test_ranks_never_given_their_data_are_ended(tmp_path, monkeypatch):
    """When the caller fails after starting the ranks (bad data, say), leaving the block kills the
    ranks that wait for their data and removes their folder."""
    import tempfile

    from llamafuse.runtime import parallel
    from spawn_worker import mark_then_sum
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    with pytest.raises(ValueError, match="bad data"):
        with parallel.start(mark_then_sum, 2, 1, "cpu", tmp_path):
            pids = _wait_started(tmp_path, 2)
            raise ValueError("bad data")
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not any((tmp_path / "tmp").iterdir())


def test_results_do_not_wait_for_rank_teardown():
    """Once every rank has left its report the parent has the result: a rank's teardown (the
    process group's and the interpreter's, seconds on GPUs; here two minutes) is cut short."""
    from llamafuse.runtime import parallel
    from spawn_worker import slow_exit
    t0 = time.monotonic()
    pid = parallel.launch(slow_exit, 2, 1, "cpu", 120.0)
    assert time.monotonic() - t0 < 60
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_gpu_ranks_are_forked_only_where_safe(monkeypatch):
    """GPU ranks are forked from a single-threaded process whose CUDA driver is not initialized;
    otherwise, and for CPU ranks, they are spawned. Whether the driver is initialized is asked of
    the driver itself (CUDA_ERROR_NOT_INITIALIZED before cuInit); no driver counts as not."""
    import ctypes
    import threading

    from llamafuse.runtime import parallel
    initialized, threads = [False], [1]
    monkeypatch.setattr(parallel, "_cuda_driver_initialized", lambda: initialized[0])
    monkeypatch.setattr(threading, "active_count", lambda: threads[0])
    assert parallel._start_method("cuda") == "fork"
    assert parallel._start_method("cpu") == "spawn"
    initialized[0] = True
    assert parallel._start_method("cuda") == "spawn"
    initialized[0], threads[0] = False, 2
    assert parallel._start_method("cuda") == "spawn"
    monkeypatch.undo()

    class Driver:
        def __init__(self, answer: int):
            self.cuDeviceGetCount = lambda count: answer
    for answer, expected in ((parallel.CUDA_ERROR_NOT_INITIALIZED, False), (0, True), (100, True)):
        monkeypatch.setattr(ctypes, "CDLL", lambda name, answer=answer: Driver(answer))
        assert parallel._cuda_driver_initialized() is expected
    def missing(name):
        raise OSError(name)
    monkeypatch.setattr(ctypes, "CDLL", missing)
    assert parallel._cuda_driver_initialized() is False


def test_device_resolved_without_initializing_cuda(monkeypatch):
    """--device is resolved from the GPU count (NVML where it answers), never from
    `torch.cuda.is_available()`, whose default check initializes the CUDA driver and so would keep
    GPU ranks from being forked; a named device that is missing is one clear error."""
    from llamafuse.formats import LlamafuseError
    from llamafuse.runtime.options import resolve_device

    def poisons():
        raise AssertionError("torch.cuda.is_available() initializes the CUDA driver")
    monkeypatch.setattr(torch.cuda, "is_available", poisons)
    gpus = [2]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus[0])
    assert (resolve_device(None), resolve_device("cpu"), resolve_device("cuda")) == ("cuda", "cpu", "cuda")
    gpus[0] = 0
    assert resolve_device(None) == "cpu"
    with pytest.raises(LlamafuseError, match="--device cuda, but no CUDA device is available"):
        resolve_device("cuda")


def test_forked_ranks(monkeypatch):
    """Forked ranks (as GPU ranks start; here on the CPU) are this process's children with its
    modules already imported and frozen out of their garbage collector's reach, do not inherit
    its stop-signal handlers (Ctrl-C ends a rank silently), keep one intra-op thread (OpenMP hangs
    in a fork otherwise)."""
    import gc

    import spawn_worker

    from llamafuse.runtime import parallel
    monkeypatch.setattr(parallel, "_start_method", lambda device_type: "fork")
    monkeypatch.setattr(spawn_worker, "MARK", "set in the parent")
    monkeypatch.setattr(os, "cpu_count", lambda: 8)   # a CPU rank would take 4 threads (as forked ranks see it)
    states = parallel.launch(spawn_worker.gathered_state, 2, 1, "cpu")
    assert [s["rank"] for s in states] == [0, 1]
    for s in states:
        assert s == {**s, "parent": os.getpid(), "mark": "set in the parent", "threads": 1, "default_handlers": True,
                     "frozen": True}
    assert gc.get_freeze_count() == 0   # frozen in this process only while forking
    monkeypatch.setattr(parallel, "_start_method", lambda device_type: "spawn")
    assert {(s["mark"], s["frozen"]) for s in parallel.launch(spawn_worker.gathered_state, 2, 1, "cpu")} == {(None, False)}


def test_forked_ranks_die_with_their_parent(tmp_path):
    """A parent SIGKILLed while its forked ranks wait for their data takes them with it."""
    script = tmp_path / "parent.py"
    script.write_text(f"""
import sys, time
sys.path.insert(0, {str(Path(__file__).parent)!r})
from pathlib import Path
from llamafuse.runtime import parallel
from spawn_worker import mark_then_sum
parallel._start_method = lambda device_type: "fork"
with parallel.start(mark_then_sum, 2, 1, "cpu", Path({str(tmp_path)!r})) as ranks:
    time.sleep(600)
""")
    parent = subprocess.Popen([sys.executable, str(script)])
    try:
        pids = _wait_started(tmp_path, 2)
    finally:
        parent.kill()
        parent.wait()
    end = time.monotonic() + 30
    for pid in pids:
        while _running(pid):
            assert time.monotonic() < end, f"forked rank {pid} outlived its parent"
            time.sleep(0.05)


def _running(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def test_results_and_samples_fields(stories_runs, stories_docs, stories_sp, stories_out):
    run = stories_runs[True]
    r = run["results"]
    assert r["task"] == "hellaswag"
    assert r["n"] == N_STORIES
    for k in ("acc", "acc_norm", "acc_stderr", "acc_norm_stderr"):
        assert isinstance(r[k], float) and 0.0 <= r[k] <= 1.0, k
    t = r["timing"]
    for k in ("wall_s", "startup_s", "ready_s", "rank_start_s", "build_s", "load_s", "swap_s", "compile_s",
              "model_ready_s", "eval_s", "eager_batches", "eager_s", "compile_wait_s", "steady_eval_s", "other_s",
              "data_s", "tokens", "tokens_per_s"):
        assert k in t and t[k] >= 0, k
    assert t["eval_s"] > 0 and t["tokens_per_s"] > 0 and t["compile_s"] == 0  # nothing compiles on the CPU
    assert t["eager_batches"] == t["eager_s"] == t["compile_wait_s"] == 0   # so there is no warm start
    assert t["steady_eval_s"] == pytest.approx(t["eval_s"], abs=0.002) and t["model_ready_s"] <= t["ready_s"]
    assert t["swap_s"] == 0   # replicas share their reading on GPUs only
    assert t["startup_s"] > 0.5   # counted from the process start: at least the imports
    assert 0 < t["data_s"] < t["startup_s"]   # one rank in this process starts after the tokenizing
    assert t["ready_s"] >= t["load_s"] > 0   # loading and compiling overlap: ready is the longer of them
    assert t["ready_s"] >= t["build_s"] + t["compile_s"]
    assert t["wall_s"] == pytest.approx(t["startup_s"] + t["ready_s"] + t["eval_s"] + t["other_s"], abs=0.01)
    # Tokens run: every distinct input prefix (context + ending less its last token) at least
    # once, and no more than one context per item plus its endings (counted independently).
    reqs = [requests(d, stories_sp, stories_sp.bos_id()) for d in stories_docs]
    inputs = [c + e[:-1] for rs in reqs for c, e in rs]
    distinct = len({tuple(x[:t + 1]) for x in inputs for t in range(len(x))})
    per_item = sum(len(rs[0][0]) + sum(len(e) - 1 for _, e in rs) for rs in reqs)
    assert distinct <= t["tokens"] < per_item
    s = r["settings"]
    assert s["model"] == str(stories_out) and s["dtype"] == "float32" and s["tp"] == 1
    assert s["replicas"] == 1 and s["device"] == "cpu"
    assert s["batch_tokens"] == 300 and s["limit"] == N_STORIES and s["data"] == str(VAL)
    assert s["eager_batches"] == EAGER_BATCHES   # the default, recorded
    assert s["bos"] is True and stories_runs[False]["results"]["settings"]["bos"] is False

    for rec in run["records"]:
        assert set(rec) == {"doc_id", "ind", "label", "lls", "pred", "pred_norm"}
        doc = stories_docs[rec["doc_id"]]
        assert rec["ind"] == doc["ind"] and rec["label"] == int(doc["label"])
        assert len(rec["lls"]) == 4 and all(isinstance(x, float) for x in rec["lls"])
        assert (rec["pred"], rec["pred_norm"]) == harness_predictions(doc, rec["lls"])

    # The human table on stdout.
    lines = run["stdout"].splitlines()
    row = next(line for line in lines if line.startswith("| hellaswag |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells == ["hellaswag", str(N_STORIES), f"{100 * r['acc']:.2f}", f"{100 * r['acc_stderr']:.2f}",
                     f"{100 * r['acc_norm']:.2f}", f"{100 * r['acc_norm_stderr']:.2f}"]
    assert any(line.startswith("| task") for line in lines)
    assert "tok/s" in run["stdout"] and "tp 1" in run["stdout"]


def test_json_flag_prints_results(work, stories_out):
    p = llama_run("hellaswag", stories_out, "--data", VAL, "--limit", 3, "--device", "cpu", "--json")
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert r["n"] == 3 and "timing" in r and "settings" in r


# ---------------------------------------------------------------- 6: --resume


def test_resume(work, stories_out):
    first = hellaswag(stories_out, work, "resume-a", limit=20)
    samples = work / "resume.samples.jsonl"
    lines = first["samples_path"].read_text().splitlines(keepends=True)  # the run's line, then 20 items
    samples.write_text("".join(lines[:8]) + lines[8][:25])  # killed in the middle of the 8th item
    kept = {json.loads(line)["doc_id"] for line in lines[1:8]}

    out = work / "resume-b.json"
    p = llama_run("hellaswag", stories_out, "--data", VAL, "--limit", 20, "--device", "cpu",
                  "--batch-tokens", 300, "--samples", samples, "--resume", "--output", out)
    assert p.returncode == 0, p.stdout + p.stderr
    recs = read_samples(samples)
    assert len(recs) == 20
    assert {r["doc_id"] for r in recs} == set(range(20))
    by_doc = {r["doc_id"]: r for r in recs}
    for d, r in by_doc.items():
        a, b = first["samples"][d], r
        assert (a["pred"], a["pred_norm"], a["label"]) == (b["pred"], b["pred_norm"], b["label"])
        for x, y in zip(a["lls"], b["lls"], strict=True):
            assert abs(x - y) <= (0.0 if d in kept else SAME_TOL), d
    res = json.loads(out.read_text())
    for k in ("acc", "acc_norm", "acc_stderr", "acc_norm_stderr", "n"):
        assert res[k] == first["results"][k], k
    assert res["timing"]["resumed_items"] == 7 and res["timing"]["items"] == 13

    # Resuming a complete file scores nothing and still reports the same metrics.
    p = llama_run("hellaswag", stories_out, "--data", VAL, "--limit", 20, "--device", "cpu",
                  "--samples", samples, "--resume", "--json")
    assert p.returncode == 0, p.stderr
    res2 = json.loads(p.stdout)
    assert res2["acc"] == first["results"]["acc"] and res2["timing"]["resumed_items"] == 20
    assert len(read_samples(samples)) == 20


def test_resume_needs_samples(stories_out):
    p = llama_run("hellaswag", stories_out, "--data", VAL, "--limit", 2, "--device", "cpu", "--resume",
                  combined=True)
    assert "--samples" in one_line_error(p)


# ---------------------------------------------------------------- 7: logits and validate


TEXT = "Once upon a time, there was a little girl named Lily."


@pytest.fixture(scope="module")
def logits_file(work, stories_out) -> Path:
    f = work / "stories-logits.safetensors"
    p = llama_run("logits", stories_out, "--text", TEXT, "--device", "cpu", "--output", f)
    assert p.returncode == 0, p.stdout + p.stderr
    return f


def test_logits_file(logits_file, stories_sp):
    from safetensors.torch import load_file
    t = load_file(str(logits_file))
    assert set(t) == {"tokens", "logits"}
    tokens, logits = t["tokens"], t["logits"]
    want = [stories_sp.bos_id()] + stories_sp.encode(TEXT)
    assert tokens.dtype == torch.int64 and tokens.tolist() == want
    assert logits.dtype == torch.float32 and logits.shape == (len(want), 512)
    ref = reference_logits(STORIES_META, [want])[0]
    assert float((logits.double() - ref).norm() / ref.norm()) < 1e-5
    assert torch.equal(logits.argmax(-1), ref.argmax(-1))


def test_logits_no_bos_and_force(work, stories_out, logits_file, stories_sp):
    from safetensors.torch import load_file
    f = work / "nobos.safetensors"
    f.write_bytes(b"old")
    p = llama_run("logits", stories_out, "--text", TEXT, "--no-bos", "--device", "cpu", "--output", f, combined=True)
    assert "exists" in one_line_error(p) and f.read_bytes() == b"old"
    p = llama_run("logits", stories_out, "--text", TEXT, "--no-bos", "--device", "cpu", "--output", f, "--force")
    assert p.returncode == 0, p.stderr
    assert load_file(str(f))["tokens"].tolist() == stories_sp.encode(TEXT)


def test_validate_against_logits_file(logits_file, stories_out):
    p = llama_run("validate", stories_out, "--reference", logits_file, "--device", "cpu")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "PASS" in p.stdout


@pytest.mark.parametrize("layout", ["meta", "hf"])
def test_validate_against_source(layout, stories_out):
    """The Meta conversion against its own source, and against the same weights in HF layout
    (the reference forward then uses rotate-half rotary on permuted q/k rows)."""
    p = llama_run("validate", stories_out, "--reference", STORIES_META.parent / layout, "--device", "cpu")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "PASS" in p.stdout


def test_validate_detects_different_weights(work):
    """A conversion of slightly different weights fails validation against the original source."""
    altered = work / "stories-altered-src"
    shutil.copytree(STORIES_META, altered)
    for f in altered.iterdir():
        f.chmod(0o644)
    sd = torch.load(altered / "consolidated.00.pth", map_location="cpu", weights_only=True)
    key = "layers.0.attention.wq.weight"
    assert key in sd
    sd = {k: v.clone() for k, v in sd.items()}
    sd[key] = sd[key] * 1.2
    torch.save(sd, altered / "consolidated.00.pth")
    out = work / "stories-altered-tp1"
    convert(open_source(altered), out, 1, "float32", progress=False)
    p = llama_run("validate", out, "--reference", STORIES_META, "--device", "cpu")
    assert p.returncode == 1, p.stdout + p.stderr
    assert "FAIL" in p.stdout
    assert "Traceback" not in p.stderr


# ---------------------------------------------------------------- 8: verify


def test_verify(work, stories_out):
    p = llama_run("verify", stories_out)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "match" in p.stdout

    bad = work / "stories-flipped"
    shutil.copytree(stories_out, bad)
    rank = bad / "rank-00-of-01.safetensors"
    size = rank.stat().st_size
    with open(rank, "r+b") as f:
        f.seek(size // 2)
        b = f.read(1)
        f.seek(size // 2)
        f.write(bytes([b[0] ^ 0xFF]))
    assert rank.stat().st_size == size
    p = llama_run("verify", bad)
    assert p.returncode == 1, p.stdout + p.stderr
    assert "rank-00-of-01.safetensors" in p.stderr and "sha256" in p.stderr
    assert "Traceback" not in p.stderr

    swapped = work / "stories-other-tokenizer"       # the manifest vouches for the tokenizer too
    shutil.copytree(stories_out, swapped)
    with open(swapped / "tokenizer.model", "ab") as f:
        f.write(b"\0")
    p = llama_run("verify", swapped)
    assert p.returncode == 1 and "tokenizer.model" in p.stderr and "Traceback" not in p.stderr, p.stderr


# ---------------------------------------------------------------- 9: bad input


def _copy(src: Path, dst: Path) -> Path:
    if not dst.exists():
        shutil.copytree(src, dst)
    return dst


def _bad_case(case: str, work: Path, stories_out: Path) -> tuple[list, str]:
    """(extra CLI args after `hellaswag`, a substring the error must contain)."""
    base = ["--data", VAL, "--limit", 2, "--device", "cpu"]
    d = work / "bad" / case
    d.parent.mkdir(exist_ok=True)
    if case == "missing-folder":
        return [d, *base], str(d)
    if case == "no-manifest":
        d.mkdir()
        return [d, *base], "manifest.json"
    if case == "version-99":
        _copy(stories_out, d)
        m = json.loads((d / "manifest.json").read_text())
        m["version"] = 99
        (d / "manifest.json").write_text(json.dumps(m))
        return [d, *base], "version 99"
    if case == "truncated-rank":
        _copy(stories_out, d)
        rank = d / "rank-00-of-01.safetensors"
        data = rank.read_bytes()
        rank.write_bytes(data[:-100])
        return [d, *base], "rank-00-of-01.safetensors"
    if case == "missing-rank":
        _copy(stories_out, d)
        (d / "rank-00-of-01.safetensors").unlink()
        return [d, *base], "rank-00-of-01.safetensors"
    if case == "tokenizer-vocab":
        _copy(stories_out, d)
        shutil.copyfile(LLAMA_TOK, d / "tokenizer.model")
        return [d, *base], "differs from the tokenizer the manifest records"
    if case == "row-missing-field":
        rows = read_docs(3)
        del rows[1]["ctx_b"]
        f = d.with_suffix(".jsonl")
        f.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return [stories_out, "--data", f, "--device", "cpu"], "line 2: missing field 'ctx_b'"
    if case == "label-out-of-range":
        rows = read_docs(3)
        rows[2]["label"] = "4"
        f = d.with_suffix(".jsonl")
        f.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return [stories_out, "--data", f, "--device", "cpu"], "line 3"
    if case == "data-not-found":
        return [stories_out, "--data", work / "nowhere" / "hellaswag.jsonl", "--device", "cpu"], "nowhere"
    if case == "output-exists":
        f = d.with_suffix(".json")
        f.write_text("{}")
        return [stories_out, *base, "--output", f], "--force"
    if case == "samples-exist":
        f = d.with_suffix(".jsonl")
        f.write_text("")
        return [stories_out, *base, "--samples", f], "--resume"
    if case == "device-cuda":
        return [stories_out, "--data", VAL, "--limit", 2, "--device", "cuda"], "cuda"
    raise AssertionError(case)


BAD_CASES = ["missing-folder", "no-manifest", "version-99", "truncated-rank", "missing-rank", "tokenizer-vocab",
             "row-missing-field", "label-out-of-range", "data-not-found", "output-exists", "samples-exist",
             "device-cuda"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_is_one_line(case, work, stories_out):
    if case == "device-cuda" and torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    args, must = _bad_case(case, work, stories_out)
    line = one_line_error(llama_run("hellaswag", *args, combined=True))
    assert must in line, line
    if case == "output-exists":
        assert (work / "bad" / "output-exists.json").read_text() == "{}"


def test_bad_reference_and_verify_errors(work, stories_out):
    line = one_line_error(llama_run("validate", stories_out, "--reference", work / "no-such-ref", "--device", "cpu",
                                    combined=True))
    assert "no-such-ref" in line
    line = one_line_error(llama_run("verify", work / "no-such-folder", combined=True))
    assert "no-such-folder" in line


def test_tp_rank_error_is_one_line(work, big_outs):
    """A damaged rank file of a tp 4 folder stops all four processes with one line, no hang."""
    d = _copy(big_outs[4], work / "bad" / "big-tp4-truncated")
    rank = d / "rank-02-of-04.safetensors"
    rank.write_bytes(rank.read_bytes()[:-10])
    line = one_line_error(llama_run("hellaswag", d, "--data", VAL, "--limit", 2, "--device", "cpu",
                                    combined=True, timeout=120))
    assert "rank-02-of-04" in line, line


# ---------------------------------------------------------------- unchecked paths and ids


def test_samples_in_missing_folder(work, stories_out):
    one_line_error(llama_run("hellaswag", stories_out, "--data", VAL, "--limit", 2, "--device", "cpu",
                             "--samples", work / "no-such-dir" / "s.jsonl", combined=True))


def test_output_in_missing_folder(work, stories_out):
    one_line_error(llama_run("hellaswag", stories_out, "--data", VAL, "--limit", 2, "--device", "cpu",
                             "--output", work / "no-such-dir" / "r.json", combined=True))


def test_reference_tokens_outside_vocab(work, stories_out):
    from safetensors.torch import save_file
    f = work / "bad-token-ids.safetensors"
    save_file({"tokens": torch.tensor([1, 99999]), "logits": torch.zeros(2, 512)}, str(f))
    one_line_error(llama_run("validate", stories_out, "--reference", f, "--device", "cpu", combined=True))


def test_logits_text_longer_than_rotary_tables(work, stories_out):
    one_line_error(llama_run("logits", stories_out, "--text", "Lily ran. " * 1500, "--device", "cpu",
                             "--output", work / "too-long.safetensors", combined=True))


class _Stream:
    def synchronize(self) -> None:
        pass


class _Streams:
    """CUDA streams stood in for on the CPU: `torch.cuda.stream(s)` makes `s` this thread's
    current stream (`current()`) within its block."""

    def __init__(self, monkeypatch) -> None:
        import threading
        self.local = threading.local()
        monkeypatch.setattr(torch.cuda, "set_device", lambda d: None)
        monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: _Stream())
        monkeypatch.setattr(torch.cuda, "stream", self.stream)

    def current(self):
        return getattr(self.local, "stream", None)

    @contextlib.contextmanager
    def stream(self, s):
        before, self.local.stream = self.current(), s
        try:
            yield
        finally:
            self.local.stream = before


def test_gpu_start_up_collectives_run_on_streams_of_their_own(monkeypatch, stories_out):
    """On a GPU (stood in for), `Connections` builds its communicators, and `_Startup` compiles
    (the warm-up's all-reduces), each on a side stream, never the default one that the warm start's
    uncompiled batches queue on, so neither waits on those batches' collectives."""
    from llamafuse.formats import load_manifest
    from llamafuse.runtime import evaluate, parallel
    streams = _Streams(monkeypatch)
    seen: list = []
    monkeypatch.setattr(torch, "zeros", lambda *a, **k: None)
    monkeypatch.setattr(parallel.dist, "all_reduce", lambda t, group=None: seen.append((group, streams.current())))
    parallel.Connections(["a", "b"], torch.device("cuda", 0)).wait("b")
    assert [g for g, _ in seen] == ["a", "b"] and all(s is not None for _, s in seen)

    class Compiling:
        compiles = True

        def warm_up(self, n, layer0):
            seen.append(("warm_up", streams.current()))
    startup = object.__new__(evaluate._Startup)
    startup.ctx = parallel.Context(0, 1, 1, torch.device("cuda", 0), None, 0, 0, 1, time.time())
    startup.manifest, startup.settings = load_manifest(stories_out), evaluate.Settings(64, progress=False)
    startup.t0, startup.warm, startup.connected = time.perf_counter(), True, parallel.Connections([], startup.ctx.device)
    monkeypatch.setattr(evaluate, "new_model", lambda *a: Compiling())
    monkeypatch.setattr(evaluate, "placeholder_layer", lambda *a: {})
    seen.clear()
    startup._build(None, "test")
    assert seen[0][0] == "warm_up" and seen[0][1] is not None


def test_the_warm_start_model_is_uncompiled_paced_and_on_the_spare_group(stories_out):
    """`load.eager_model`: the mask path (no compiler), on the weights given, its all-reduces on
    `Context.spare`; paced on a GPU (`EAGER_PACE` layers queued), not on the CPU."""
    from llamafuse.formats import load_manifest
    from llamafuse.runtime.attention import BlockAttention
    from llamafuse.runtime.load import EAGER_PACE, eager_model
    from llamafuse.runtime.parallel import Context
    m, spare, weights = load_manifest(stories_out), object(), {"w": torch.zeros(1)}
    for device, pace in ((torch.device("cuda", 0), EAGER_PACE), (torch.device("cpu"), 0)):
        ctx = Context(0, 2, 2, device, object(), 0, 0, 1, 0.0, None, None, spare)
        model = eager_model(ctx, m, weights)
        assert not model.compiles and isinstance(model.attention, BlockAttention)
        assert model.group is spare and model.w is weights and model.pace == pace
    assert EAGER_PACE > 0
