"""`llama-run`: evaluate, dump logits, validate and verify a converted model folder."""
from __future__ import annotations

import hashlib
import json
import time
import os
import sys
import tempfile
from contextlib import nullcontext
from dataclasses import dataclass
from functools import wraps
from pathlib import Path
from typing import Any, Callable

import click
import torch
from tqdm import tqdm

from llamafuse.formats import LlamafuseError, Manifest, load_manifest
from llamafuse.formats.interrupts import interrupts, interruption
from llamafuse.formats.manifest import MANIFEST, sha256_file
from llamafuse.formats.tokenizer import Tokenizer

from . import hellaswag
from .attention import ATTENTION_CHOICES
from .evaluate import EAGER_BATCHES, Ready, RunResult, Settings, check_requests, plan, score_worker
from .load import THREADS
from .options import bos_id, model_tokenizer, resolve_device, resolve_replicas
from .parallel import Ranks, launch, launched_rank, start
from .samples import SampleWriter, SamplesFile
from .validate import TOLERANCE, compare, logits_worker

VALIDATION_TEXTS = (
    "The capital of France is Paris, and the capital of Germany is Berlin.",
    "Once upon a time, there was a little girl named Lily. She loved to play outside.",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
)


_IMPORTED = time.monotonic()


def process_age() -> float:
    """Seconds since this process started (from /proc on Linux; else since this module loaded)."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        return time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return time.monotonic() - _IMPORTED


def _fail(msg: str, code: int = 2) -> None:
    click.echo(f"llama-run: error: {msg}", err=True)
    sys.exit(code)


def user_errors(f: Callable[..., Any]) -> Callable[..., Any]:
    """Report LlamafuseError, SIGINT and SIGTERM as one line and a non-zero exit, never a traceback."""
    @wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with interrupts():  # SIGTERM (kill, timeout, schedulers) ends the run like Ctrl-C
                return f(*args, **kwargs)
        except (Exception, KeyboardInterrupt) as e:
            stop = interruption(e)    # first: an error that a stop signal caused reports the signal
            if stop is not None:
                _fail(str(stop), stop.exit_code)
            if isinstance(e, LlamafuseError):
                _fail(str(e))
            raise
    return wrapper


# ---------------------------------------------------------------- shared checks


def _check_output(path: Path | None, force: bool, option: str, hint: str = "use --force to overwrite") -> None:
    """`path` can be written (its folder exists and takes files) and is not overwritten by surprise."""
    if path is None:
        return
    if path.is_dir():
        raise LlamafuseError(f"{option} {path}: is a folder")
    if not path.parent.is_dir():
        raise LlamafuseError(f"{option} {path}: folder {path.parent} does not exist")
    if path.exists() and not force:
        raise LlamafuseError(f"{option} {path}: exists ({hint})")
    try:
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.check-"):
            pass
    except OSError as e:
        raise LlamafuseError(f"{option} {path}: cannot write in {path.parent} ({e.strerror or e})") from None


def _check_tokens(tokens: list[int], m: Manifest, where: str) -> None:
    """Token ids must index the embedding, and positions the rotary tables."""
    if not tokens:
        raise LlamafuseError(f"{where}: no tokens")
    if len(tokens) > m.config.max_seq_len:
        raise LlamafuseError(f"{where}: {len(tokens)} tokens, the model's rotary tables cover {m.config.max_seq_len}")
    bad = next((t for t in tokens if not 0 <= t < m.config.vocab_size), None)
    if bad is not None:
        raise LlamafuseError(f"{where}: token id {bad} is outside the vocabulary (0..{m.config.vocab_size - 1})")


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


device_opt = click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None,
                          help="Where to run [default: cuda if available].")
bos_opt = click.option("--bos/--no-bos", default=None,
                       help="Put BOS first, or not [default: the tokenizer's own rule, recorded in the manifest, "
                            "as lm-evaluation-harness's HF backend encodes].")
model_arg = click.argument("model", type=click.Path(path_type=Path))
load_threads_opt = click.option("--load-threads", type=click.IntRange(min=1), default=THREADS, show_default=True,
                                help="Threads reading the weights onto each GPU (two 64 MiB pinned buffers each).")
eager_batches_opt = click.option("--eager-batches", type=click.IntRange(min=0), default=EAGER_BATCHES,
                                 show_default=True,
                                 help="Where the model compiles: the batches of each replica scored uncompiled "
                                      "while the compiler gets ready (0: wait for it).")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Run a llamafuse-converted LLaMA: HellaSwag, logits, validation, checksums."""


# ---------------------------------------------------------------- hellaswag


@dataclass(frozen=True)
class HellaswagJob:
    """A checked HellaSwag run: what the ranks need to start."""
    folder: Path
    manifest: Manifest
    device: str
    replicas: int
    settings: Settings


@dataclass(frozen=True)
class HellaswagData:
    """The items' source, read while the ranks start."""
    docs: list[dict]          # validated rows
    tokenizer: Tokenizer      # the model's, checked against the manifest
    bos: int | None           # the BOS token put first, if any
    data: str                 # --data as given, or the hub id
    run: dict[str, Any]       # what defines the run, recorded in the samples file


@dataclass(frozen=True)
class HellaswagRun:
    """What a run produced: every item's log-likelihoods and how the time went."""
    source: HellaswagData
    items: list[hellaswag.Item]
    lls: dict[int, list[float]]   # doc id -> one log-likelihood per ending
    result: RunResult             # zeros where nothing was left to score
    startup_s: float              # process start until the ranks were started
    data_s: float                 # reading, tokenizing and packing the items (while started ranks load)
    resumed: int                  # items taken from --samples


@main.command("hellaswag")
@model_arg
@click.option("--data", default=None, help=f"Local .jsonl/.jsonl.gz or a hub id [default: {hellaswag.HUB_ID}].")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Score only the first N items.")
@bos_opt
@device_opt
@click.option("--output", type=click.Path(path_type=Path), default=None, help="Write results JSON here.")
@click.option("--samples", type=click.Path(path_type=Path), default=None, help="Write one JSON line per item here.")
@click.option("--batch-tokens", type=click.IntRange(min=1), default=None,
              help="Tokens per packed batch [default: 16384 on CUDA, 2048 on CPU].")
@click.option("--replicas", type=click.IntRange(min=1), default=None,
              help="Data-parallel copies of the model [default: all GPUs / tp; 1 on CPU].")
@click.option("--attention", type=click.Choice(ATTENTION_CHOICES), default="auto", show_default=True,
              help="Attention kernel: flex (FlexAttention, sm80+) or blocks (SDPA with a mask: CPU, V100).")
@load_threads_opt
@eager_batches_opt
@click.option("--resume", is_flag=True, help="Keep the items already in --samples and score the rest.")
@click.option("--force", is_flag=True, help="Overwrite existing --output/--samples files.")
@click.option("--json", "as_json", is_flag=True, help="Print the results JSON instead of a table.")
@user_errors
def hellaswag_cmd(model: Path, data: str | None, limit: int | None, bos: bool | None, device: str | None,
                  output: Path | None, samples: Path | None, batch_tokens: int | None, replicas: int | None,
                  attention: str, load_threads: int, eager_batches: int, resume: bool, force: bool,
                  as_json: bool) -> None:
    """Score the HellaSwag validation split (acc, acc_norm) exactly as lm-evaluation-harness."""
    owner = launched_rank() in (None, 0)   # under torchrun, rank 0 owns the output files
    if resume and samples is None:
        raise LlamafuseError("--resume needs --samples (the file to continue)")
    if owner:
        _check_output(output, force, "--output")
        _check_output(samples, force or resume, "--samples", "use --resume to continue it or --force to overwrite")
        if output is not None and samples is not None and output.resolve() == samples.resolve():
            raise LlamafuseError(f"--output and --samples are the same file ({output})")
    job = _hellaswag_job(model, device, batch_tokens, replicas, attention, load_threads, eager_batches)
    m = job.manifest
    with start(score_worker, m.tp, job.replicas, job.device, job.folder, m, job.settings) as ranks:
        run = _hellaswag_run(job, ranks, data, limit, bos, samples if owner else None, resume)
        _hellaswag_report(job, run, output, as_json)   # before the finished ranks are reaped


def _hellaswag_job(model: Path, device: str | None, batch_tokens: int | None, replicas: int | None,
                   attention: str, load_threads: int, eager_batches: int) -> HellaswagJob:
    m = load_manifest(model)
    dev = resolve_device(device)
    settings = Settings(batch_tokens or (16384 if dev == "cuda" else 2048), attention, label="hellaswag",
                        load_threads=load_threads, eager_batches=eager_batches)
    return HellaswagJob(model, m, dev, resolve_replicas(dev, m.tp, replicas), settings)


def _hellaswag_data(model: Path, m: Manifest, data: str | None, limit: int | None, bos: bool | None) -> HellaswagData:
    bos_token = bos_id(m, bos)
    docs = hellaswag.load_docs(data, limit)
    data_id = data or hellaswag.HUB_ID
    if Path(data_id).is_file():
        data_id = f"{Path(data_id).name} sha256:{sha256_file(Path(data_id))}"
    run = {"model": hashlib.sha256((model / MANIFEST).read_bytes()).hexdigest(), "bos": bos_token is not None,
           "data": data_id, "limit": limit}
    return HellaswagData(docs, model_tokenizer(model, m), bos_token, data or hellaswag.HUB_ID, run)


def _hellaswag_run(job: HellaswagJob, ranks: Ranks, data: str | None, limit: int | None, bos: bool | None,
                   samples: Path | None, resume: bool) -> HellaswagRun:
    """Read, tokenize and plan the items while the ranks start, then score those not in --samples yet."""
    t0 = time.perf_counter()
    src = _hellaswag_data(job.folder, job.manifest, data, limit, bos)
    items = hellaswag.build_items(src.docs, src.tokenizer, src.bos)
    groups = [it.group() for it in items]
    check_requests([r for g in groups for r in g.requests],
                   [f"hellaswag doc {g.key}" for g in groups for _ in g.requests], job.manifest.config.max_seq_len)
    data_s = time.perf_counter() - t0
    with SamplesFile(samples, src.run, items, resume) if samples else nullcontext() as log:
        done = log.done if log else {}
        lls = dict(done)
        result = RunResult({}, Ready(), 0.0, 0, job.replicas, job.device)
        if len(done) < len(items) or launched_rank() is not None:  # under torchrun all ranks take part
            sink = SampleWriter(samples, {it.doc_id: it for it in items}) if samples else None
            t1 = time.perf_counter()
            work = plan(groups, frozenset(done), job.settings.batch_tokens, sink)
            data_s += time.perf_counter() - t1
            result = ranks.run(work)
            if result is None:  # a non-zero rank under torchrun: rank 0 reports
                sys.exit(0)
            lls.update({k: [ll for ll, _ in s] for k, s in result.scores.items()})
    startup_s = process_age() if ranks.launched is None else ranks.launched - (time.time() - process_age())
    return HellaswagRun(src, items, lls, result, startup_s, data_s, len(done))


def _hellaswag_report(job: HellaswagJob, run: HellaswagRun, output: Path | None, as_json: bool) -> None:
    r, m, src = run.result, job.manifest, run.source
    rd, ph = r.ready, r.phases
    metrics = hellaswag.score(run.items, [run.lls[it.doc_id] for it in run.items])
    wall = process_age()
    result = {
        "task": "hellaswag", **metrics,
        "timing": {"wall_s": round(wall, 3), "startup_s": round(run.startup_s, 3), "ready_s": round(rd.scoring_s, 3),
                   "rank_start_s": round(rd.rank_start_s, 3), "build_s": round(rd.build_s, 3),
                   "load_s": round(rd.load_s, 3), "swap_s": round(rd.swap_s, 3), "compile_s": round(rd.compile_s, 3),
                   "model_ready_s": round(rd.total_s, 3), "eval_s": round(r.eval_s, 3),
                   "eager_batches": ph.eager_batches, "eager_s": round(ph.eager_s, 3),
                   "compile_wait_s": round(ph.wait_s, 3), "steady_eval_s": round(ph.steady_s, 3),
                   "other_s": round(wall - run.startup_s - rd.scoring_s - r.eval_s, 3), "data_s": round(run.data_s, 3),
                   "tokens": r.tokens, "tokens_per_s": round(r.tokens / max(r.eval_s, 1e-9), 1),
                   "items": len(run.items) - run.resumed, "resumed_items": run.resumed},
        "settings": {"model": str(job.folder), "dtype": m.dtype, "tp": m.tp, "replicas": r.replicas,
                     "device": job.device, "bos": src.run["bos"], "batch_tokens": job.settings.batch_tokens,
                     "attention": job.settings.attention, "load_threads": job.settings.load_threads,
                     "eager_batches": job.settings.eager_batches, "data": src.data, "limit": src.run["limit"]},
    }
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        t = result["timing"]
        click.echo(f"| task      |     n |   acc  | stderr | acc_norm | stderr |\n"
                   f"|-----------|------:|-------:|-------:|---------:|-------:|\n"
                   f"| hellaswag | {metrics['n']:5d} | {100 * metrics['acc']:6.2f} | {100 * metrics['acc_stderr']:6.2f} "
                   f"| {100 * metrics['acc_norm']:8.2f} | {100 * metrics['acc_norm_stderr']:6.2f} |")
        warm = (f" ({t['eager_batches']} batch(es) per replica uncompiled {t['eager_s']:.1f} s while compiling, "
                f"then waited {t['compile_wait_s']:.1f} s for the compiled model; steady {t['steady_eval_s']:.1f} s)"
                if t["eager_batches"] else "")
        click.echo(f"wall {t['wall_s']:.1f} s: start-up {t['startup_s']:.1f} s, ready {t['ready_s']:.1f} s (ranks "
                   f"started {t['rank_start_s']:.1f} s; load {t['load_s']:.1f} s beside build {t['build_s']:.1f} s and "
                   f"compile {t['compile_s']:.1f} s; swap {t['swap_s']:.1f} s), eval {t['eval_s']:.1f} s{warm}, "
                   f"other {t['other_s']:.1f} s; data {t['data_s']:.1f} s; "
                   f"{t['tokens']:,} tokens ({t['tokens_per_s']:,.0f} tok/s) on {job.device} "
                   f"(tp {m.tp} x {r.replicas} replica(s), {m.dtype})")
    if output:
        try:
            _write_atomic(output, (json.dumps(result, indent=2) + "\n").encode())
        except OSError as e:
            raise LlamafuseError(f"--output {output}: could not be written ({e.strerror or e}); "
                                 "the results above were not saved") from None


# ---------------------------------------------------------------- logits, validate, verify


@main.command("logits")
@model_arg
@click.option("--text", required=True, help="Text to run.")
@bos_opt
@device_opt
@click.option("--output", type=click.Path(path_type=Path), required=True, help="FILE.safetensors to write.")
@click.option("--force", is_flag=True, help="Overwrite --output.")
@user_errors
def logits_cmd(model: Path, text: str, bos: bool | None, device: str | None, output: Path, force: bool) -> None:
    """Write `tokens` (int64 [T]) and float32 `logits` [T, vocab] for TEXT."""
    from safetensors.torch import save
    m = load_manifest(model)
    dev = resolve_device(device)
    _check_output(output, force, "--output")
    bos_token = bos_id(m, bos)
    tokens = ([] if bos_token is None else [bos_token]) + model_tokenizer(model, m).encode([text])[0]
    _check_tokens(tokens, m, "--text")
    result = launch(logits_worker, m.tp, 1, dev, model, m, [tokens])
    if result is None:  # a non-zero rank under torchrun
        return
    logits = result[0]
    try:
        _write_atomic(output, save({"tokens": torch.tensor(tokens, dtype=torch.long), "logits": logits.contiguous()}))
    except OSError as e:
        raise LlamafuseError(f"--output {output}: could not be written ({e.strerror or e})") from None
    click.echo(f"wrote {output}: {len(tokens)} tokens x {logits.shape[1]} logits")


@main.command("validate")
@model_arg
@click.option("--reference", type=click.Path(path_type=Path), required=True,
              help="The source checkpoint (Meta or Hugging Face folder, or .gguf file), or a logits "
                   ".safetensors (tokens, logits).")
@device_opt
@user_errors
def validate_cmd(model: Path, reference: Path, device: str | None) -> None:
    """Compare the converted model's logits with a reference: exit 0 on PASS, 1 on FAIL (outside the
    dtype's tolerance), 2 on bad input."""
    m = load_manifest(model)
    dev = resolve_device(device)
    if reference.is_file() and reference.suffix == ".safetensors":
        from llamafuse.formats.tensorfile import MappedFile
        f = MappedFile(reference)
        if not {"tokens", "logits"} <= set(f.keys()):
            raise LlamafuseError(f"{reference}: needs tensors 'tokens' and 'logits'")
        tokens, logits = f.get("tokens"), f.get("logits")
        if tokens.ndim != 1 or logits.shape != (tokens.shape[0], m.config.vocab_size):
            raise LlamafuseError(f"{reference}: logits {tuple(logits.shape)} do not match {tokens.shape[0]} tokens x vocab {m.config.vocab_size}")
        seqs, ref, what = [tokens.tolist()], [logits.clone()], f"logits file {reference}"
        _check_tokens(seqs[0], m, str(reference))
    else:
        from llamafuse.formats.reference import Reference
        source = Reference(reference)
        if source.vocab_size != m.config.vocab_size:
            raise LlamafuseError(f"{reference}: its vocabulary has {source.vocab_size} tokens but the model's has "
                                 f"{m.config.vocab_size}; it is not this model's source")
        bos_token = bos_id(m, None)
        seqs = [([] if bos_token is None else [bos_token]) + ids
                for ids in model_tokenizer(model, m).encode(list(VALIDATION_TEXTS))]
        ref = source.logits(seqs)
        what = f"float64 reference forward over {reference}"
    ours = launch(logits_worker, m.tp, 1, dev, model, m, seqs)
    if ours is None:  # a non-zero rank under torchrun
        return
    c = compare(ours, ref)
    rel_tol, top1_tol = TOLERANCE[m.dtype]
    ok = c.passes(m.dtype)
    click.echo(f"validate {model} ({m.dtype}, tp {m.tp}) against {what}\n"
               f"  positions {c.n}, max |err| {c.max_abs:.3e}, relative error {c.rel:.3e} (tolerance {rel_tol:.0e}), "
               f"top-1 agreement {100 * c.top1:.2f}% (needs {100 * top1_tol:.0f}%)\n  {'PASS' if ok else 'FAIL'}")
    sys.exit(0 if ok else 1)


@main.command("verify")
@model_arg
@user_errors
def verify_cmd(model: Path) -> None:
    """Recompute every checksum in the manifest (rank files and tokenizer); name any file that differs."""
    m = load_manifest(model)
    files = m.files()
    bad = []
    with tqdm(total=sum(n for _, n, _ in files), unit="B", unit_scale=True, desc="verifying") as bar:
        for name, size, sha in files:
            path = model / name
            if not path.is_file():
                bad.append(f"{name}: missing")
            elif path.stat().st_size != size:
                bad.append(f"{name}: {path.stat().st_size} bytes, manifest says {size}")
            elif sha256_file(path, bar.update) != sha:
                bad.append(f"{name}: sha256 differs from the manifest")
    for b in bad:
        click.echo(f"llama-run: verify: {model / b}", err=True)
    if bad:
        sys.exit(1)
    click.echo(f"{model}: all {len(files)} files ({len(m.ranks)} rank files and the tokenizer) match the manifest")


# ---------------------------------------------------------------- lm-eval


@main.command("lm-eval")
@model_arg
@click.option("--tasks", required=True, help="Comma-separated lm-evaluation-harness task or group names.")
@click.option("--num-fewshot", type=click.IntRange(min=0), default=None,
              help="Few-shot examples per prompt [default: each task's own].")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Score only the first N docs of each task.")
@click.option("--include-path", type=click.Path(path_type=Path), multiple=True,
              help="A folder of extra task configs (repeatable).")
@click.option("--output-path", type=click.Path(path_type=Path), default=None,
              help="Write the harness's result files here (a folder, or a .json file).")
@click.option("--log-samples", is_flag=True, help="Also write every doc's requests and scores (needs --output-path).")
@click.option("--batch-tokens", type=click.IntRange(min=1), default=None,
              help="Tokens per packed batch [default: 16384 on CUDA, 2048 on CPU].")
@device_opt
@click.option("--replicas", type=click.IntRange(min=1), default=None,
              help="Data-parallel copies of the model [default: all GPUs / tp; 1 on CPU].")
@click.option("--attention", type=click.Choice(ATTENTION_CHOICES), default="auto", show_default=True,
              help="Attention kernel: flex (FlexAttention, sm80+) or blocks (SDPA with a mask: CPU, V100).")
@load_threads_opt
@eager_batches_opt
@user_errors
def lm_eval_cmd(model: Path, tasks: str, num_fewshot: int | None, limit: int | None, include_path: tuple[Path, ...],
                output_path: Path | None, log_samples: bool, batch_tokens: int | None, device: str | None,
                replicas: int | None, attention: str, load_threads: int, eager_batches: int) -> None:
    """Run lm-evaluation-harness tasks (loglikelihood and perplexity) with every shared prefix
    computed once; prints the harness's results table. Needs `pip install 'llamafuse[lm-eval]'`."""
    if log_samples and output_path is None:
        raise LlamafuseError("--log-samples needs --output-path (where the samples go)")
    if output_path is not None:
        _check_output_folder(output_path)
    try:
        from . import lm_eval as backend
    except ImportError as e:
        raise LlamafuseError(f"lm-evaluation-harness is not installed ({e}); "
                             "pip install 'llamafuse[lm-eval]'") from None
    tqdm.monitor_interval = 0   # no monitor thread: GPU ranks are forked only from a single-threaded process
    job = backend.prepare(model, tasks, include_path, device, batch_tokens, replicas, attention, load_threads,
                          eager_batches)
    results = backend.run(job, num_fewshot, limit, log_samples, output_path)
    click.echo(backend.report(job, results, num_fewshot, limit))


def _check_output_folder(path: Path) -> None:
    """The harness can create its files under `path` (checked now, not after the evaluation)."""
    folder = path.parent if path.suffix == ".json" else path
    if path.suffix != ".json" and path.is_file():
        raise LlamafuseError(f"--output-path {path}: is a file (give a folder or a .json file)")
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise LlamafuseError(f"--output-path {path}: cannot write in {existing}")


if __name__ == "__main__":
    main()
