"""The lm-evaluation-harness backend against the harness's own `hf` backend on the same weights.

Both models run through the harness's evaluator (`simple_evaluate`) on the local copies of its
task configs in tests/tasks (arc_easy, winogrande, hellaswag, MMLU 5-shot, a perplexity task);
every request's log-likelihood and is_greedy, and every metric, must agree. Also: tp x replicas
processes (gloo), `llama-run lm-eval` against `llama-run hellaswag`, the tokenizer rules, and
one-line refusals of bad input before the model is loaded.

The task configs read `../shared/data` relative to the repository root, so this module runs there.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
from click.testing import CliRunner
from lm_eval import simple_evaluate
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

import llamafuse.runtime
import llamafuse.runtime.lm_eval as backend
from llamafuse.convert.sources import open_source
from llamafuse.convert.write import convert
from llamafuse.formats import LlamafuseError
from llamafuse.runtime.cli import main as llama_run_main
from llamafuse.runtime.lm_eval import LlamafuseLM

ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "tests" / "tasks"
LL_TOL = 1e-3       # float32 llamafuse vs float32 transformers, per request (rolling: per document)
SAME_TOL = 1e-4     # llamafuse against itself (tp, replicas)
PPL_REL = 1e-5      # perplexity metrics, from log-likelihoods within LL_TOL
N = 40              # docs per task (MMLU: 20, 5-shot)
SMALL_TASKS = ["arc_easy_local", "winogrande_local", "hellaswag_local", "pile_10k_local"]
MMLU = "mmlu_local_humanities"   # group of mmlu_local_world_religions


# ---------------------------------------------------------------- helpers


def evaluate(lm, tm: TaskManager, tasks: list[str], limit: int, num_fewshot: int | None = None) -> dict:
    return simple_evaluate(model=lm, tasks=tasks, limit=limit, num_fewshot=num_fewshot, task_manager=tm,
                           log_samples=True, bootstrap_iters=1000)


def responses(results: dict) -> dict[tuple[str, int, int], tuple]:
    """(task, doc_id, request index) -> the request's response: (ll, is_greedy), or (ll,) for rolling."""
    out = {}
    for task, samples in results["samples"].items():
        for s in samples:
            for j, (resp,) in enumerate(s["resps"]):
                out[task, s["doc_id"], j] = tuple(resp) if isinstance(resp, (tuple, list)) else (resp,)
    return out


def assert_same_requests(ours: dict, theirs: dict, tol: float, rolling_tol: float | None = None) -> float:
    """Every request: |dll| <= tol (a rolling document's sum: rolling_tol) and the same is_greedy;
    returns the largest |dll|."""
    a, b = responses(ours), responses(theirs)
    assert a.keys() == b.keys() and a
    worst = 0.0
    for key in a:
        d = abs(a[key][0] - b[key][0])
        worst = max(worst, d)
        assert d <= (tol if len(a[key]) == 2 or rolling_tol is None else rolling_tol), \
            f"{key}: {a[key]} vs {b[key]}"
        assert a[key][1:] == b[key][1:], f"{key}: is_greedy llamafuse {a[key]}, hf {b[key]}"
    return worst


def assert_same_metrics(ours: dict, theirs: dict) -> None:
    """Equal metrics: accuracies and their stderr exactly, perplexities to PPL_REL."""
    for section in ("results", "groups"):
        assert ours.get(section, {}).keys() == theirs.get(section, {}).keys()
        for task, metrics in theirs.get(section, {}).items():
            assert ours[section][task].keys() == metrics.keys()
            for k, v in metrics.items():
                if "perplexity" in k or "bits_per_byte" in k:
                    assert ours[section][task][k] == pytest.approx(v, rel=PPL_REL), (task, k)
                else:
                    assert ours[section][task][k] == v, (task, k)


def one_line_error(result) -> str:
    """A user error from the CLI: exit 2, no traceback, the last line is the only error line."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    err = result.stderr.strip().splitlines()
    assert err and err[-1].startswith("llama-run: error:"), result.stderr
    assert sum("llama-run: error" in line for line in err) == 1 and "Traceback" not in result.stderr
    return err[-1]


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def in_root():
    """The task configs' data paths are relative to the repository root."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)
        yield


@pytest.fixture(scope="module")
def tm() -> TaskManager:
    return TaskManager(include_path=str(TASKS))


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("lm_eval")


@pytest.fixture(scope="module")
def stories_json(work, stories_hf) -> Path:
    """stories260K in the HF layout with the tokenizer.json that transformers makes of its
    tokenizer.model, so that both backends read one tokenizer (transformers 5 does not apply the
    SentencePiece model's whitespace collapsing: see test_sentencepiece_tokenizer_vs_transformers)."""
    from transformers import AutoTokenizer
    folder = work / "stories-hf-json"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        (folder / name).symlink_to(stories_hf / name)
    AutoTokenizer.from_pretrained(str(stories_hf)).save_pretrained(str(folder))
    assert not (folder / "tokenizer.model").exists()
    return folder


def converted(work: Path, src: Path, name: str, tp: int = 1, max_seq_len: int | None = None) -> Path:
    out = work / name
    convert(open_source(src, max_seq_len), out, tp, "float32", progress=False)
    return out


@pytest.fixture(scope="module")
def ours_512(work, stories_json) -> Path:
    return converted(work, stories_json, "stories-512")


@pytest.fixture(scope="module")
def ours_1k(work, stories_json) -> Path:
    """Rotary tables for 1024 positions: MMLU 5-shot prompts in stories260K's 512-piece vocabulary."""
    return converted(work, stories_json, "stories-1k", max_seq_len=1024)


@pytest.fixture(scope="module")
def ours_sp(work, stories_hf) -> Path:
    """stories260K with its own SentencePiece tokenizer.model (what `llama-convert` picks)."""
    return converted(work, stories_hf, "stories-sp")


@pytest.fixture(scope="module")
def hf_runs(tm, stories_json) -> dict[str, dict]:
    hf = HFLM(pretrained=str(stories_json), dtype="float32", device="cpu", batch_size=16)
    hf_1k = HFLM(pretrained=str(stories_json), dtype="float32", device="cpu", batch_size=16, max_length=1024)
    return {"small": evaluate(hf, tm, SMALL_TASKS, N), "mmlu": evaluate(hf_1k, tm, [MMLU], N // 2, 5)}


@pytest.fixture(scope="module")
def our_runs(tm, ours_512, ours_1k) -> dict[str, tuple[dict, LlamafuseLM]]:
    lm, lm_1k = LlamafuseLM(ours_512, device="cpu"), LlamafuseLM(ours_1k, device="cpu", batch_tokens=8192)
    return {"small": (evaluate(lm, tm, SMALL_TASKS, N), lm), "mmlu": (evaluate(lm_1k, tm, [MMLU], N // 2, 5), lm_1k)}


# ---------------------------------------------------------------- against the hf backend


def test_stories_requests_match_hf_backend(our_runs, hf_runs):
    """arc_easy, winogrande, hellaswag (40 docs each) and the rolling perplexity task: every
    request's log-likelihood within 1e-3 and the same is_greedy as the harness's hf backend."""
    worst = assert_same_requests(our_runs["small"][0], hf_runs["small"], LL_TOL)
    print(f"max |dll| vs hf backend: {worst:.2e}")


def test_stories_metrics_match_hf_backend(our_runs, hf_runs):
    assert_same_metrics(our_runs["small"][0], hf_runs["small"])


def test_mmlu_5shot_matches_hf_backend(our_runs, hf_runs):
    """One MMLU subject, 5-shot (20 questions): requests, the subject's and the group's metrics."""
    ours = our_runs["mmlu"][0]
    assert ours["n-shot"]["mmlu_local_world_religions"] == 5
    worst = assert_same_requests(ours, hf_runs["mmlu"], LL_TOL)
    assert_same_metrics(ours, hf_runs["mmlu"])
    print(f"max |dll| vs hf backend: {worst:.2e}")


def test_one_engine_run_per_request_type(our_runs):
    """All tasks' requests of a type are scored in one engine run, and (MMLU 5-shot, all in one
    batch) every distinct prefix of the requests' inputs is computed exactly once: the 5-shot prompt
    for all questions, each question for its 4 choices."""
    results, lm = our_runs["small"]
    n = {t: sum(len(s["arguments"]) for s in samples) for t, samples in results["samples"].items()}
    assert [(c.request_type, c.requests) for c in lm.calls] == [
        ("loglikelihood", n["arc_easy_local"] + n["winogrande_local"] + n["hellaswag_local"]),
        ("loglikelihood_rolling", lm.calls[1].requests)]
    assert lm.calls[1].requests > n["pile_10k_local"] == N   # some passages took several windows
    results, lm_1k = our_runs["mmlu"]
    inputs = [[*c, *x[:-1]] for s in results["samples"]["mmlu_local_world_religions"]
              for c, x in (lm_1k._encode_pair(*args) for args in s["arguments"])]
    prefixes = {tuple(seq[:k]) for seq in inputs for k in range(1, len(seq) + 1)}
    (mmlu,) = lm_1k.calls
    assert (mmlu.requests, mmlu.tokens) == (4 * (N // 2), len(prefixes))
    assert mmlu.hf_tokens == sum(len(x) for x in {tuple(seq) for seq in inputs}) < mmlu.request_tokens
    print(f"MMLU 5-shot, 20 questions: {mmlu.tokens} forest tokens, hf backend {mmlu.hf_tokens}, "
          f"one forward per request {mmlu.request_tokens}")


def test_tokenizer_rules_match_hf_backend(stories_json, ours_512):
    """HFLM's tokenization on an empty context (the prefix token), a context that already starts
    with BOS's text (no second BOS), and rolling windows at the model's length (a document longer
    than 512 tokens), checked through both backends' log-likelihoods."""
    hf = HFLM(pretrained=str(stories_json), dtype="float32", device="cpu", batch_size=4)
    ours = LlamafuseLM(ours_512, device="cpu")
    text = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. "
    ll = [Instance("loglikelihood", {}, args, i, ("rules", i, 1)) for i, args in enumerate(
        [("", " Once upon a time"), ("", "Once"), ("<s>Once upon a time,", " there was"), ("Lily", " played.")])]
    assert [hf._encode_pair(*r.args) for r in ll[2:]] == [ours._encode_pair(*r.args) for r in ll[2:]]
    for a, b in zip(ours.loglikelihood(ll), hf.loglikelihood(ll), strict=True):
        assert a[1] == b[1] and abs(a[0] - b[0]) <= LL_TOL
    rolling = [Instance("loglikelihood_rolling", {}, (text * k,), 0, ("rules", k, 1)) for k in (1, 40)]
    assert len(ours.tok_encode(rolling[1].args[0])) > 2 * ours.max_length == 2 * hf.max_length
    for a, b in zip(ours.loglikelihood_rolling(rolling), hf.loglikelihood_rolling(rolling), strict=True):
        assert abs(a - b) <= LL_TOL
    assert ours.calls[-1].requests > len(rolling)   # the long document took several windows


def test_texts_encoded_ahead_in_batches(ours_512, monkeypatch):
    """Every text the harness's tokenization asks for (whole texts, contexts less trailing spaces,
    continuations after an empty context, rolling documents) was encoded ahead in one batched
    call, and the scores are those of encoding each text when asked."""
    lm = LlamafuseLM(ours_512, device="cpu")
    calls: list[int] = []
    real = lm.tok.encode
    monkeypatch.setattr(lm.tok, "encode", lambda texts: calls.append(len(texts)) or real(texts))
    ll = [Instance("loglikelihood", {}, args, i, ("ahead", i, 1)) for i, args in enumerate(
        [("", " Once upon a time"), ("Lily went ", "home."), ("Lily went ", "out."), ("<s>Once upon", " a time")])]
    rolling = [Instance("loglikelihood_rolling", {}, ("Once upon a time, there was a girl. " * 30,), 0, ("ahead", 9, 1))]
    ahead = lm.loglikelihood(ll), lm.loglikelihood_rolling(rolling)
    assert calls == [6, 1], calls   # one batch per request type; nothing encoded one at a time later
    monkeypatch.setattr(lm, "_encode_ahead", lambda texts, disable_tqdm: None)
    assert (lm.loglikelihood(ll), lm.loglikelihood_rolling(rolling)) == ahead
    assert not lm._encoded


def test_sentencepiece_tokenizer_vs_transformers(ours_sp, stories_hf, hf_runs):
    """With stories260K's own tokenizer.model, requests tokenize exactly as the hf backend's
    except where the text has a run of spaces: the SentencePiece model collapses it
    (remove_extra_whitespaces), transformers 5's LlamaTokenizer does not."""
    hf = HFLM(pretrained=str(stories_hf), dtype="float32", device="cpu", batch_size=1)
    ours = LlamafuseLM(ours_sp, device="cpu")
    pairs = [args for run in hf_runs.values() for samples in run["samples"].values() for s in samples
             for args in s["arguments"] if len(args) == 2]
    differ = [p for p in pairs if ours._encode_pair(*p) != hf._encode_pair(*p)]
    assert differ == [(c, x) for c, x in pairs if "  " in c + x]
    print(f"{len(differ)} of {len(pairs)} requests tokenize differently (runs of spaces)")


@pytest.mark.slow
def test_tp_and_replicas_match_one_process(tm, work, stories_json, our_runs):
    """tp 2 x 2 replicas (4 gloo processes): the same scores as one process, for loglikelihood
    requests (within 1e-4) and rolling documents (sums over hundreds of tokens: 1e-3)."""
    lm = LlamafuseLM(converted(work, stories_json, "stories-tp2", tp=2), device="cpu", replicas=2)
    tasks = ["winogrande_local", "pile_10k_local"]
    ours = evaluate(lm, tm, tasks, N)
    one = {**our_runs["small"][0], "samples": {t: our_runs["small"][0]["samples"][t] for t in tasks}}
    assert_same_requests(ours, one, SAME_TOL, rolling_tol=LL_TOL)
    assert [c.request_type for c in lm.calls] == ["loglikelihood", "loglikelihood_rolling"]


def test_ranks_started_before_the_harness_builds_requests(tm, work, ours_512, monkeypatch):
    """`llama-run lm-eval` (`backend.run`) starts its ranks before the harness builds any request,
    so spawned ranks (2 replicas here) load and compile meanwhile: that one start serves the first
    engine run; the next request type starts its own ranks."""
    events: list[str] = []
    real_start = backend.start

    @contextmanager
    def start(*args, **kwargs):
        events.append("start")
        with real_start(*args, **kwargs) as ranks:
            yield ranks

    def recorded(name):
        method = getattr(LlamafuseLM, name)
        return lambda self, *args, **kwargs: (events.append(name), method(self, *args, **kwargs))[1]
    monkeypatch.setattr(backend, "start", start)
    for name in ("loglikelihood", "loglikelihood_rolling"):
        monkeypatch.setattr(LlamafuseLM, name, recorded(name))
    monkeypatch.setattr(backend, "TaskManager", lambda include_path=None: tm)
    job = backend.prepare(ours_512, "winogrande_local,pile_10k_local", (TASKS,), "cpu", None, 2, "auto")
    results = backend.run(job, None, 10, False, None)
    assert events == ["start", "loglikelihood", "loglikelihood_rolling", "start"]
    assert [c.request_type for c in job.lm.calls] == ["loglikelihood", "loglikelihood_rolling"]
    assert set(results["results"]) == {"winogrande_local", "pile_10k_local"}


def test_registered_as_llamafuse(tm, ours_512, our_runs):
    """`simple_evaluate(model="llamafuse", model_args="pretrained=...")` once the module is imported;
    the harness's own models stay available."""
    from lm_eval.api.registry import get_model
    assert get_model("llamafuse") is LlamafuseLM and get_model("hf") is HFLM
    r = simple_evaluate(model="llamafuse", model_args=f"pretrained={ours_512},device=cpu,batch_tokens=512",
                        tasks=["arc_easy_local"], limit=10, task_manager=tm, log_samples=True, bootstrap_iters=0)
    ten = {**our_runs["small"][0], "samples": {"arc_easy_local": our_runs["small"][0]["samples"]["arc_easy_local"][:10]}}
    assert_same_requests(r, ten, SAME_TOL)


def test_prompt_templates_compiled_once(tm, monkeypatch):
    """Within `compiled_templates` (around `llama-run lm-eval`'s evaluation) the harness compiles
    each distinct prompt template once instead of once for every document it renders, and builds
    the very same requests (MMLU 5-shot, 20 questions)."""
    from lm_eval import utils
    compiled: list[str] = []
    from_string = utils.env.from_string
    monkeypatch.setattr(utils.env, "from_string", lambda source: (compiled.append(source), from_string(source))[1])
    name = "mmlu_local_world_religions"

    def requests() -> list[tuple]:
        task = tm.load([name])["tasks"][name]
        task.set_config(key="num_fewshot", value=5)
        task.build_all_requests(limit=N // 2)
        return [i.args for i in task.instances]
    before, original = requests(), utils.apply_template
    per_document = len(compiled)
    compiled.clear()
    with backend.compiled_templates():
        assert requests() == before
    assert len(compiled) == len(set(compiled)) and per_document > 10 * len(compiled), (per_document, len(compiled))
    assert utils.apply_template is original   # restored on the way out


# ---------------------------------------------------------------- llama-run lm-eval


def test_cli_hellaswag_matches_llama_run_hellaswag(ours_sp, work, data_dir):
    """`llama-run lm-eval MODEL --tasks hellaswag` (the real command, in its own process) and
    `llama-run hellaswag MODEL` run the same batches (the same tokens) and give the same scores
    (40 docs); the harness's result and samples files are written."""
    out = work / "harness-out"
    p = subprocess.run([sys.executable, "-m", "llamafuse.runtime.cli", "lm-eval", str(ours_sp), "--include-path",
                        str(TASKS), "--tasks", "hellaswag_local", "--limit", str(N), "--device", "cpu",
                        "--output-path", str(out), "--log-samples"],
                       capture_output=True, text=True, cwd=ROOT, timeout=600, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert p.returncode == 0, p.stderr
    assert "|hellaswag_local|" in p.stdout and "loglikelihood: 160 requests" in p.stdout
    (results_file,) = out.rglob("results_*.json")
    (samples_file,) = out.rglob("samples_hellaswag_local_*.jsonl")
    assert len(samples_file.read_text().splitlines()) == N
    harness = json.loads(results_file.read_text())["results"]["hellaswag_local"]
    q = CliRunner().invoke(llama_run_main, ["hellaswag", str(ours_sp), "--limit", str(N), "--device", "cpu", "--json",
                                            "--data", str(data_dir / "hellaswag" / "hellaswag_val.jsonl.gz")])
    assert q.exit_code == 0, q.output
    ours = json.loads(q.stdout)
    assert ours["n"] == N
    assert f"loglikelihood: 160 requests, {ours['timing']['tokens']:,} tokens run" in p.stdout
    for k in ("acc", "acc_norm"):
        assert harness[f"{k},none"] == pytest.approx(ours[k], abs=1e-12), k
        assert harness[f"{k}_stderr,none"] == pytest.approx(ours[f"{k}_stderr"], abs=1e-12), k


def test_load_threads_and_eager_batches_reach_the_ranks_and_bad_model_args_are_one_line(ours_512, monkeypatch):
    """`load_threads` and `eager_batches` (as the harness passes model arguments: strings) go into
    the ranks' Settings and the results' config; a model argument that is not a positive integer
    (eager_batches: not a non-negative one) is one clear error; llama-run lm-eval's options of the
    same names are checked and handed to the backend."""
    from llamafuse.runtime.evaluate import EAGER_BATCHES
    seen: list = []

    @contextmanager
    def start(*args, **kwargs):
        seen.append(args[-1])
        yield None
    monkeypatch.setattr(backend, "start", start)
    lm = LlamafuseLM(ours_512, device="cpu", load_threads="3", eager_batches="0")
    with lm._start():
        pass
    assert seen[0].load_threads == 3 and lm.get_model_info()["load_threads"] == 3
    assert seen[0].eager_batches == 0 and lm.get_model_info()["eager_batches"] == 0
    assert LlamafuseLM(ours_512, device="cpu").eager_batches == EAGER_BATCHES   # the default
    for name, bad in [("load_threads", "0"), ("load_threads", "many"), ("batch_tokens", "-1"), ("replicas", "x")]:
        with pytest.raises(LlamafuseError, match=f"^{name} must be a positive integer, got '{bad}'$"):
            LlamafuseLM(ours_512, device="cpu", **{name: bad})
    for bad in ("-1", "two"):
        with pytest.raises(LlamafuseError, match=f"^eager_batches must be a non-negative integer, got '{bad}'$"):
            LlamafuseLM(ours_512, device="cpu", eager_batches=bad)
    prepared: list = []
    monkeypatch.setattr(backend, "prepare", lambda *a: (prepared.append(a), _stop())[1])
    r = CliRunner().invoke(llama_run_main, ["lm-eval", str(ours_512), "--tasks", "arc_easy_local", "--device", "cpu",
                                            "--load-threads", "4", "--eager-batches", "5"])
    assert r.exit_code == 2 and "stopped after prepare" in r.output and prepared[0][-2:] == (4, 5), r.output
    for option in ("--load-threads", "--eager-batches"):
        r = CliRunner().invoke(llama_run_main, ["lm-eval", str(ours_512), "--tasks", "arc_easy_local",
                                                option, "-1"])
        assert r.exit_code == 2 and f"Invalid value for '{option}'" in r.output


def _stop() -> None:
    raise LlamafuseError("stopped after prepare")


def test_cli_starts_its_ranks_from_one_thread(ours_sp):
    """`llama-run lm-eval` (the real command, in its own process) keeps tqdm's monitor thread from
    starting (the harness's progress bars start it while it loads the tasks), so this process runs
    one thread whenever it starts ranks (here 2 CPU replicas): what forking GPU ranks needs
    (`parallel._start_method`)."""
    script = f"""
import json, threading
from llamafuse.runtime import cli, parallel
seen, real = [], parallel._start_method
def spy(device_type):
    seen.append(sorted(t.name for t in threading.enumerate()))
    return real(device_type)
parallel._start_method = spy
try:
    cli.main(["lm-eval", {str(ours_sp)!r}, "--include-path", {str(TASKS)!r}, "--tasks", "arc_easy_local",
              "--limit", "4", "--device", "cpu", "--replicas", "2"], standalone_mode=False)
finally:
    print("STARTS " + json.dumps(seen))
"""
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=600,
                       env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert p.returncode == 0, p.stderr
    assert "|arc_easy_local|" in p.stdout
    starts = json.loads(p.stdout.split("STARTS ")[-1])
    assert starts and all(threads == ["MainThread"] for threads in starts), starts


@pytest.fixture()
def no_model(monkeypatch, tm):
    """Fail the test if the engine runs (ranks may be started ahead: no rank process here, and
    none that runs in this process loads anything before `run`); the module's TaskManager stands
    in for the CLI's own (the same include path; indexing the harness's tasks takes seconds)."""
    from llamafuse.runtime.parallel import Ranks

    class NoRun(Ranks):
        def run(self, *late):
            raise AssertionError("the model was run")

    @contextmanager
    def start(*args, **kwargs):
        yield NoRun()

    def task_manager(include_path=None):
        assert include_path == [str(TASKS)]
        return tm
    monkeypatch.setattr(backend, "start", start)
    monkeypatch.setattr(backend, "TaskManager", task_manager)


def run_cli(*args) -> object:
    return CliRunner().invoke(llama_run_main, ["lm-eval", *map(str, args)])


def test_cli_refuses_generation_task(ours_sp, no_model):
    line = one_line_error(run_cli(ours_sp, "--include-path", TASKS, "--tasks", "arc_easy_local,arc_easy_gen_local",
                                  "--device", "cpu"))
    assert "arc_easy_gen_local" in line and "generate_until" in line and "arc_easy_local," not in line


def test_cli_refuses_requests_beyond_rotary_tables(ours_sp, no_model):
    """MMLU 5-shot prompts exceed stories260K's 512 positions: refused, naming the task."""
    line = one_line_error(run_cli(ours_sp, "--include-path", TASKS, "--tasks", MMLU, "--num-fewshot", 5,
                                  "--limit", 20, "--device", "cpu"))
    assert "task mmlu_local_world_religions doc" in line and "rotary tables cover 512" in line


def test_cli_refuses_unknown_task(ours_sp, no_model):
    line = one_line_error(run_cli(ours_sp, "--include-path", TASKS, "--tasks", "arc_easy_local,no_such_task",
                                  "--device", "cpu"))
    assert "unknown task(s): no_such_task " in line


def test_cli_refuses_missing_include_path(ours_sp, work, no_model):
    line = one_line_error(run_cli(ours_sp, "--include-path", work / "nowhere", "--tasks", "arc_easy_local"))
    assert "--include-path" in line and "nowhere" in line


def test_cli_without_the_harness(ours_sp, monkeypatch):
    """Without lm-eval installed (the core install), `llama-run lm-eval` says how to get it."""
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    monkeypatch.delitem(sys.modules, "llamafuse.runtime.lm_eval")
    monkeypatch.delattr(llamafuse.runtime, "lm_eval")
    line = one_line_error(run_cli(ours_sp, "--tasks", "arc_easy"))
    assert "pip install 'llamafuse[lm-eval]'" in line


# ---------------------------------------------------------------- SmolLM2 (real 135M model)

SMOL_RUNS = ((["arc_easy_local", "winogrande_local", "hellaswag_local", "pile_10k_local"], 5, None), ([MMLU], 3, 5))


@pytest.fixture(scope="module")
def smollm2_hf(work, smollm2_gguf) -> Path:
    """An HF-layout copy of SmolLM2-135M as transformers reads the GGUF (dequantized to float32),
    with transformers' tokenizer.json. `rope_theta` is also written at the top level, where
    transformers 4 kept it and where llama-convert reads it (transformers 5 nests it)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder = work / "smollm2-hf"
    folder.mkdir()
    model = AutoModelForCausalLM.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name,
                                                 dtype=torch.float32)
    assert model.config.tie_word_embeddings
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"},
              str(folder / "model.safetensors"))
    config = model.config.to_dict()
    del config["quantization_config"]
    config["rope_theta"] = config["rope_parameters"]["rope_theta"]
    (folder / "config.json").write_text(json.dumps(config))
    AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def smollm2_hf_runs(tm, smollm2_hf) -> list[dict]:
    """The hf backend with its `softmax_dtype=float64`: by default it sums a document's hundreds of
    token log-probabilities in float32, which alone moves SmolLM2's rolling totals by up to 2.4e-3
    (llamafuse sums in float64; against the float64 hf backend they agree within 6e-5)."""
    hf = HFLM(pretrained=str(smollm2_hf), dtype="float32", device="cpu", batch_size=8, softmax_dtype="float64")
    return [evaluate(hf, tm, tasks, limit, shots) for tasks, limit, shots in SMOL_RUNS]


def check_smollm2(folder: Path, tm: TaskManager, hf_runs: list[dict]) -> None:
    ours = LlamafuseLM(folder, device="cpu")
    assert (ours.max_length, ours.prefix_token_id, ours.bos) == (8192, 1, None)   # no BOS: SmolLM2's own rule
    for (tasks, limit, shots), theirs in zip(SMOL_RUNS, hf_runs, strict=True):
        mine = evaluate(ours, tm, tasks, limit, shots)
        worst = assert_same_requests(mine, theirs, LL_TOL)
        assert_same_metrics(mine, theirs)
        print(f"SmolLM2 {', '.join(tasks)}: max |dll| vs hf backend {worst:.2e}")


@pytest.mark.slow
def test_smollm2_matches_hf_backend(tm, work, smollm2_hf, smollm2_hf_runs):
    """SmolLM2-135M (HF copy converted by llama-convert): arc_easy, winogrande, hellaswag,
    perplexity (5 docs each) and MMLU 5-shot (3 questions) equal the hf backend's, request by request."""
    check_smollm2(converted(work, smollm2_hf, "smollm2"), tm, smollm2_hf_runs)


@pytest.mark.slow
def test_smollm2_gguf_matches_hf_backend(tm, work, smollm2_gguf, smollm2_hf_runs):
    """The same with `llama-convert SmolLM2.gguf`: our GGUF reading against transformers'."""
    if importlib.util.find_spec("llamafuse.convert.gguf") is None:
        pytest.skip("llamafuse.convert.gguf is not in this tree yet (GGUF conversion, branch real)")
    out = work / "smollm2-gguf"
    p = subprocess.run([str(Path(sys.executable).with_name("llama-convert")), "--dtype", "float32",
                        str(smollm2_gguf), str(out)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    check_smollm2(out, tm, smollm2_hf_runs)
