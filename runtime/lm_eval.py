"""An lm-evaluation-harness backend: every loglikelihood request scored through the prefix forest.

Importing this module registers `LlamafuseLM` as the harness's model `llamafuse`. The harness
hands the backend all requests of one type (of all tasks) at once; they are tokenized by the
harness's own rules (`TemplateLM._encode_pair`, its empty-context rule, HFLM's BOS rule and
rolling windows) and scored together by `evaluate.score_worker`, so contexts shared by a
question's choices, few-shot prompts shared by a task's questions and any other common prefix
are computed once. `run` is `llama-run lm-eval`: the harness's evaluator with this model.

Absolute imports only: `lm_eval` here is the harness, never this module.
"""
from __future__ import annotations

import functools
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from tqdm import tqdm
import lm_eval.models  # noqa: F401 - the harness's own models first: its registry loads them only when empty
from lm_eval import simple_evaluate
from lm_eval import utils as harness_utils
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.loggers import EvaluationTracker
from lm_eval.tasks import TaskManager

from llamafuse.formats import LlamafuseError, load_manifest
from llamafuse.formats.errors import one_line
from llamafuse.formats.tokenizer import Tokenizer

from .evaluate import EAGER_BATCHES, Group, Request, Score, Settings, check_requests, plan, score_worker
from .load import THREADS
from .options import bos_id, model_tokenizer, resolve_device, resolve_replicas
from .packing import pack_groups, prefix_forest
from .parallel import Ranks, launched_rank, start

ENCODE_BATCH = 4096  # texts per batched tokenizer call

GENERATION = "generate_until"


@dataclass(frozen=True)
class CallStats:
    """One call of the engine: what it ran and how long it took."""
    request_type: str   # "loglikelihood" or "loglikelihood_rolling"
    requests: int       # requests scored (rolling: windows)
    tokens: int         # forest tokens run
    hf_tokens: int      # what the harness's hf backend runs: each distinct input once
    request_tokens: int # what a backend running each request on its own runs
    load_s: float
    compile_s: float    # compiling kernels (sm80+ GPUs), while the weights load
    ready_s: float      # from the ranks' start until they began scoring (the warm start: their weights loaded,
                        # the compiler maybe still at work)
    eval_s: float       # all batches


@register_model("llamafuse")
class LlamafuseLM(TemplateLM):
    """A llamafuse-converted model folder as a harness model.

    `pretrained`: the folder; `device`: cpu or cuda [default: cuda if available]; `batch_tokens`:
    forest tokens per batch [default: 16384 on CUDA, 2048 on CPU]; `replicas`: data-parallel
    copies [default: all GPUs / tp; 1 on CPU]; `load_threads`: threads reading the weights onto
    each GPU [default: 16]; `eager_batches`: where the model compiles, the batches of each replica
    scored uncompiled while the compiler gets ready [default: `evaluate.EAGER_BATCHES`; 0 waits for
    it]. The harness's own `batch_size` and `max_batch_size` (which its CLI always passes) do not
    apply: batches are sized in tokens.
    """

    def __init__(self, pretrained: str | Path, device: str | None = None, batch_tokens: int | None = None,
                 replicas: int | None = None, attention: str = "auto", load_threads: int | str = THREADS,
                 eager_batches: int | str = EAGER_BATCHES, batch_size: int | str | None = None,
                 max_batch_size: int | None = None) -> None:
        super().__init__()
        if launched_rank() is not None:
            raise LlamafuseError("the lm-eval backend starts its own processes (tp and replicas); "
                                 "run it without torchrun")
        self.folder = Path(pretrained)
        self.manifest = load_manifest(self.folder)
        self.device_type = resolve_device(device)
        self.replicas = resolve_replicas(self.device_type, self.manifest.tp,
                                         None if replicas is None else _count("replicas", replicas))
        self.batch_tokens = (_count("batch_tokens", batch_tokens) if batch_tokens is not None
                             else 16384 if self.device_type == "cuda" else 2048)
        self.attention = attention
        self.load_threads = _count("load_threads", load_threads)
        self.eager_batches = _count("eager_batches", eager_batches, least=0)
        self.tok: Tokenizer = model_tokenizer(self.folder, self.manifest)
        self.bos = bos_id(self.manifest, None)   # the tokenizer's own rule: HFLM's add_special_tokens
        self.calls: list[CallStats] = []
        self._names: list[str] | None = None   # the requests' tasks and docs, during `loglikelihood`
        self._encoded: dict[str, np.ndarray] = {}  # texts encoded ahead, during one request type's call
        self._ahead: Ranks | None = None       # ranks started ahead for the next engine run (`ranks_ahead`)

    # ------------------------------------------------ tokenization (HFLM's rules on our tokenizer)

    @property
    def eot_token_id(self) -> int | None:
        return self.manifest.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        """HFLM's: BOS if the tokenizer has one, else EOS."""
        t = self.manifest.tokenizer
        token = t.bos_id if t.bos_id is not None else t.eos_id
        if token is None:
            raise LlamafuseError(f"the model's tokenizer ({t.file}) has neither a BOS nor an EOS token, "
                                 "which the harness puts before empty contexts and rolling windows")
        return token

    @property
    def max_length(self) -> int:
        """Positions the rotary tables cover."""
        return self.manifest.config.max_seq_len

    def tok_encode(self, string: str, add_special_tokens: bool | None = None) -> list[int]:
        """HFLM.tok_encode with default arguments: the tokenizer's own BOS rule (recorded in the
        manifest) unless `add_special_tokens` says otherwise or `string` already starts with the
        prefix token's text."""
        if add_special_tokens is None:
            add_special_tokens = not self._starts_with_prefix(string)
        ids = self._encode(string)
        return [self.bos, *ids] if add_special_tokens and self.bos is not None else ids

    def _encode(self, string: str) -> list[int]:
        ids = self._encoded.get(string)
        return self.tok.encode([string])[0] if ids is None else ids.tolist()

    def _encode_ahead(self, texts: set[str], disable_tqdm: bool) -> None:
        """Encode the texts the harness will ask for one at a time in large batches instead (the
        tokenizers spread a batch over the CPU's cores); only a cache, so a text missed here is
        encoded when asked for."""
        todo = list(texts)
        with tqdm(total=len(todo), desc="Encoding texts", unit="text", disable=disable_tqdm) as bar:
            for i in range(0, len(todo), ENCODE_BATCH):
                chunk = todo[i:i + ENCODE_BATCH]
                for text, ids in zip(chunk, self.tok.encode(chunk)):
                    self._encoded[text] = np.asarray(ids, dtype=np.int64)
                bar.update(len(chunk))

    def _starts_with_prefix(self, string: str) -> bool:
        t = self.manifest.tokenizer
        if t.bos_id is None and t.eos_id is None:
            return False
        token = self.prefix_token_id
        return string.startswith(self.tok.token_text(token))

    # ------------------------------------------------ the harness's request types

    def loglikelihood(self, requests: list[Instance], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """The harness's tokenization (TemplateLM.loglikelihood), then one engine run for all."""
        self._names = [_name(r) for r in requests]
        try:
            self._encode_ahead({t for r in requests for t in _pair_texts(*r.args)}, disable_tqdm)
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm)
        finally:
            self._names, self._encoded = None, {}

    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str], list[int], list[int]]],
                              disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        names = self._names or [f"request {i}" for i in range(len(requests))]
        reqs = [Request(tuple(ctx), tuple(cont)) for _, ctx, cont in requests]
        return self.score(reqs, names, "loglikelihood")

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        """HFLM's rolling windows at `max_length` (disjoint, one token of context at least), every
        window of every document scored in one engine run; a document's log-likelihood is the sum."""
        windows: list[Request] = []
        names: list[str] = []
        owner: list[int] = []
        try:
            self._encode_ahead({r.args[0] for r in requests}, disable_tqdm)
            for i, r in enumerate(requests):
                (string,) = r.args
                for ctx, cont in map(harness_utils.make_disjoint_window, harness_utils.get_rolling_token_windows(
                        token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                        max_seq_len=self.max_length, context_len=1)):
                    windows.append(Request(tuple(ctx), tuple(cont)))
                    names.append(_name(r))
                    owner.append(i)
        finally:
            self._encoded = {}
        totals = [0.0] * len(requests)
        for i, (ll, _) in zip(owner, self.score(windows, names, "loglikelihood_rolling")):
            totals[i] += ll
        return totals

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        tasks = sorted({str(r.task_name) for r in requests})
        raise LlamafuseError(f"task {', '.join(tasks)}: needs text generation (generate_until), "
                             "which llamafuse does not do (loglikelihood tasks only)")

    # ------------------------------------------------ the engine

    def score(self, requests: list[Request], names: list[str], request_type: str) -> list[Score]:
        """(log-likelihood, greedy) of each request: one model load and one run for all of them."""
        if not requests:
            return []
        check_requests(requests, names, self.max_length)
        groups = by_context(requests)
        with self._ranks() as ranks:
            result = ranks.run(plan(groups, frozenset(), self.batch_tokens))
        self.calls.append(CallStats(request_type, len(requests), result.tokens, hf_tokens(requests),
                                    sum(len(r.inputs) for r in requests), result.ready.load_s,
                                    result.ready.compile_s, result.ready.scoring_s, result.eval_s))
        return [score for g in groups for score in result.scores[g.key]]

    @contextmanager
    def ranks_ahead(self) -> Iterator[None]:
        """Within: the ranks for the next engine run are started now, so ranks in processes of
        their own (tp or replicas) load the weights and compile while the harness builds its
        requests; a rank running in this process starts at the call as always. Killed at the end
        if unused."""
        with self._start() as ranks:
            self._ahead = ranks
            try:
                yield
            finally:
                self._ahead = None

    @contextmanager
    def _ranks(self) -> Iterator[Ranks]:
        """The ranks started ahead, once; else new ones for this run."""
        if self._ahead is not None:
            ranks, self._ahead = self._ahead, None
            yield ranks
        else:
            with self._start() as ranks:
                yield ranks

    def _start(self) -> AbstractContextManager[Ranks]:
        settings = Settings(self.batch_tokens, self.attention, label="lm-eval", unit="context",
                            load_threads=self.load_threads, eager_batches=self.eager_batches)
        return start(score_worker, self.manifest.tp, self.replicas, self.device_type, self.folder, self.manifest,
                     settings)

    def get_model_info(self) -> dict[str, Any]:
        """Recorded in the harness's results under `config`."""
        m = self.manifest
        return {"model_path": str(self.folder), "model_dtype": m.dtype, "tp": m.tp, "replicas": self.replicas,
                "device": self.device_type, "batch_tokens": self.batch_tokens, "load_threads": self.load_threads,
                "eager_batches": self.eager_batches}


def _count(name: str, value: int | str, least: int = 1) -> int:
    """A model argument that must be an integer >= `least` (the harness passes them as strings)."""
    try:
        n = int(value)
    except ValueError:
        n = least - 1
    if n < least:
        raise LlamafuseError(f"{name} must be {'a positive' if least == 1 else 'a non-negative'} integer, "
                             f"got {value!r}")
    return n


def by_context(requests: list[Request]) -> list[Group]:
    """Runs of consecutive requests with the same context (a question's choices, a HellaSwag
    item's endings, as the harness lists them) as one group each, so they share a batch: the
    batches `llama-run hellaswag` packs for the same items, and the same scores."""
    groups: list[Group] = []
    for r in requests:
        if groups and groups[-1].requests[0].context == r.context:
            groups[-1] = Group(groups[-1].key, (*groups[-1].requests, r))
        else:
            groups.append(Group(len(groups), (r,)))
    return groups


def _pair_texts(context: str, continuation: str) -> tuple[str, ...]:
    """The texts TemplateLM.loglikelihood encodes for one pair: the whole text and the context less
    its trailing whitespace (`_encode_pair`), or the continuation alone after an empty context."""
    return (context + continuation, context.rstrip()) if context else (continuation,)


def _name(r: Instance) -> str:
    """Where a request comes from, for messages."""
    return f"task {r.task_name} doc {r.doc_id}"


def hf_tokens(requests: list[Request]) -> int:
    """Tokens the harness's hf backend runs: one forward per distinct input (context + continuation
    less its last token; its `logits_cache` shares one forward among one-token continuations)."""
    return sum(len(x) for x in {tuple(r.inputs) for r in requests})


def forest_tokens(requests: list[Request], batch_tokens: int | None) -> int:
    """Tokens the engine runs for `requests` at `batch_tokens` per batch (None: all in one forest)."""
    seqs = [r.inputs for r in requests]
    if batch_tokens is None:
        return len(prefix_forest(seqs))
    return sum(len(prefix_forest([seqs[i] for i in b])) for b in pack_groups([[s] for s in seqs], batch_tokens))


# ---------------------------------------------------------------- llama-run lm-eval


@dataclass(frozen=True)
class Job:
    """A checked `llama-run lm-eval` run: tasks loaded, nothing scored yet."""
    lm: LlamafuseLM
    task_manager: TaskManager
    tasks: list[Any]                   # the requested tasks and groups (harness objects)


def prepare(model: Path, tasks: str, include_path: tuple[Path, ...], device: str | None,
            batch_tokens: int | None, replicas: int | None, attention: str, load_threads: int = THREADS,
            eager_batches: int = EAGER_BATCHES) -> Job:
    """Check everything that can be checked before the model is loaded: the model folder, the
    include paths, the task names, and that no task needs generation."""
    lm = LlamafuseLM(model, device, batch_tokens, replicas, attention, load_threads, eager_batches)
    for p in include_path:
        if not p.is_dir():
            raise LlamafuseError(f"--include-path {p}: no such folder")
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    if not names:
        raise LlamafuseError("--tasks: no task names")
    tm = TaskManager(include_path=[str(p) for p in include_path] or None)
    unknown = [n for n in names if n not in tm.all_tasks]
    if unknown:
        raise LlamafuseError(f"unknown task(s): {', '.join(unknown)} (see `lm-eval ls tasks`; "
                             "--include-path DIR adds a folder of task configs)")
    try:
        loaded = tm.load(names)
    except Exception as e:  # noqa: BLE001 - a task's config or data: the harness raises anything
        raise LlamafuseError(f"--tasks {tasks}: the harness could not load them ({one_line(e)})") from None
    generating = sorted(n for n, t in loaded["tasks"].items() if t.OUTPUT_TYPE == GENERATION)
    if generating:
        raise LlamafuseError(f"task {', '.join(generating)}: needs text generation (generate_until), "
                             "which llamafuse does not do (loglikelihood tasks only)")
    children = {c for kids in loaded.get("group_map", {}).values() for c in kids}
    top = [g for n, g in loaded.get("groups", {}).items() if n not in children]
    top += [t for n, t in loaded["tasks"].items() if n not in children]
    return Job(lm, tm, top)


@contextmanager
def compiled_templates() -> Iterator[None]:
    """Within: the harness compiles each Jinja prompt template once, not once for every document it
    renders (`lm_eval.utils.apply_template`; the harness's issue #1286). Same environment, same
    renders; MMLU 5-shot's time outside scoring on a 2-core CPU: 137.5 s -> 64.0 s."""
    apply = harness_utils.apply_template
    compile_once = functools.lru_cache(maxsize=None)(harness_utils.env.from_string)
    harness_utils.apply_template = lambda template, doc: compile_once(template).render(**doc)
    try:
        yield
    finally:
        harness_utils.apply_template = apply


def run(job: Job, num_fewshot: int | None, limit: int | None, log_samples: bool,
        output_path: Path | None) -> dict:
    """The harness's evaluator with our model; its result files under `output_path` as its CLI
    writes them. Returns the harness's results (samples removed)."""
    tracker = EvaluationTracker(output_path=str(output_path)) if output_path else None
    lm = job.lm
    with compiled_templates(), lm.ranks_ahead():
        results = simple_evaluate(model=lm, model_args={"pretrained": str(lm.folder), **lm.get_model_info()},
                                  tasks=job.tasks, num_fewshot=num_fewshot, limit=limit, log_samples=log_samples,
                                  evaluation_tracker=tracker, task_manager=job.task_manager)
    samples = results.pop("samples", None) if log_samples else None
    if tracker is not None:
        tracker.save_results_aggregated(results=results, samples=samples)
        if samples is not None:
            for task in results["configs"]:
                tracker.save_results_samples(task_name=task, samples=samples[task])
    return results


def report(job: Job, results: dict, num_fewshot: int | None, limit: int | None) -> str:
    """The harness's tables, then what the engine ran."""
    lm, m = job.lm, job.lm.manifest
    lines = [f"llamafuse ({lm.folder}, {m.dtype}, tp {m.tp} x {lm.replicas} replica(s) on {lm.device_type}), "
             f"limit: {limit}, num_fewshot: {num_fewshot}, batch_tokens: {lm.batch_tokens}",
             harness_utils.make_table(results)]
    if "groups" in results:
        lines.append(harness_utils.make_table(results, "groups"))
    for c in lm.calls:
        lines.append(f"{c.request_type}: {c.requests:,} requests, {c.tokens:,} tokens run (hf backend: "
                     f"{c.hf_tokens:,}, {c.hf_tokens / max(c.tokens, 1):.2f}x; one forward per request: "
                     f"{c.request_tokens:,}); ready {c.ready_s:.1f} s (load {c.load_s:.1f} s; compile "
                     f"{c.compile_s:.1f} s beside it and any uncompiled batches), eval {c.eval_s:.1f} s, "
                     f"{c.tokens / max(c.eval_s, 1e-9):,.0f} tok/s")
    return "\n".join(lines)

