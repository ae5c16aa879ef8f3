"""`llama-run`: evaluate, dump logits, validate and verify a converted folder."""
from __future__ import annotations

import json
import os
import sys
from functools import wraps
from pathlib import Path
from typing import Any, Callable

import click
import sentencepiece as spm
import torch
from tqdm import tqdm

from llamafuse.formats import LlamafuseError, Manifest, load_manifest
from llamafuse.formats.manifest import sha256_file
from llamafuse.formats.tokenizer import load_tokenizer

from . import hellaswag
from .evaluate import Settings, hellaswag_worker
from .parallel import launch
from .validate import TOLERANCE, compare, logits_worker

VALIDATION_TEXTS = (
    "The capital of France is Paris, and the capital of Germany is Berlin.",
    "Once upon a time, there was a little girl named Lily. She loved to play outside.",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
)


def _fail(msg: str, code: int = 2) -> None:
    click.echo(f"llama-run: error: {msg}", err=True)
    sys.exit(code)


def user_errors(f: Callable[..., Any]) -> Callable[..., Any]:
    """Report LlamafuseError as one line and a non-zero exit, never a traceback."""
    @wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return f(*args, **kwargs)
        except LlamafuseError as e:
            _fail(str(e))
        except KeyboardInterrupt:
            _fail("interrupted", 130)
    return wrapper


def _device(name: str | None) -> str:
    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise LlamafuseError("--device cuda, but no CUDA device is available")
    return name


def _replicas(device: str, tp: int, replicas: int | None) -> int:
    if replicas is not None:
        if device == "cuda" and replicas * tp > torch.cuda.device_count():
            raise LlamafuseError(f"--replicas {replicas} x tp {tp} needs {replicas * tp} GPUs, "
                                 f"{torch.cuda.device_count()} available")
        return replicas
    if device == "cuda":
        if torch.cuda.device_count() < tp:
            raise LlamafuseError(f"the model has tp={tp} but only {torch.cuda.device_count()} GPU(s) are available")
        return torch.cuda.device_count() // tp
    return 1


def _tokenizer(folder: Path, m: Manifest) -> spm.SentencePieceProcessor:
    if m.tokenizer is None:
        raise LlamafuseError(f"{folder}: the manifest names no tokenizer")
    return load_tokenizer(folder / m.tokenizer, m.config.vocab_size)


def _check_new(path: Path | None, force: bool) -> None:
    if path is None:
        return
    if not path.parent.is_dir():
        raise LlamafuseError(f"{path}: folder {path.parent} does not exist")
    if path.exists() and not force:
        raise LlamafuseError(f"{path}: exists (use --force to overwrite)")


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
    tmp.write_bytes(data)
    os.replace(tmp, path)


device_opt = click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None,
                          help="Where to run [default: cuda if available].")
bos_opt = click.option("--bos/--no-bos", default=True, show_default=True,
                       help="Prepend BOS (harness >= 0.4.10 for LLaMA); --no-bos matches older published runs.")
folder_arg = click.argument("out", type=click.Path(path_type=Path))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Run a llamafuse-converted LLaMA: HellaSwag, logits, validation, checksums."""


@main.command("hellaswag")
@folder_arg
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
@click.option("--attention", type=click.Choice(["auto", "blocks", "flex"]), default="auto", show_default=True,
              help="Attention kernel: flex (FlexAttention, sm80+) or blocks (SDPA with a mask: CPU, V100).")
@click.option("--resume", is_flag=True, help="Keep the items already in --samples and score the rest.")
@click.option("--force", is_flag=True, help="Overwrite existing --output/--samples files.")
@click.option("--json", "as_json", is_flag=True, help="Print the results JSON instead of a table.")
@user_errors
def hellaswag_cmd(out: Path, data: str | None, limit: int | None, bos: bool, device: str | None,
                  output: Path | None, samples: Path | None, batch_tokens: int | None, replicas: int | None,
                  attention: str, resume: bool, force: bool, as_json: bool) -> None:
    """Score the HellaSwag validation split (acc, acc_norm) exactly as lm-evaluation-harness."""
    m = load_manifest(out)
    dev = _device(device)
    n_rep = _replicas(dev, m.tp, replicas)
    sp = _tokenizer(out, m)
    batch_tokens = batch_tokens or (16384 if dev == "cuda" else 2048)
    _check_new(output, force)
    if resume and samples is None:
        raise LlamafuseError("--resume needs --samples (the file to continue)")
    if samples is not None and not samples.parent.is_dir():
        raise LlamafuseError(f"{samples}: folder {samples.parent} does not exist")
    if samples is not None and samples.exists() and not resume:
        if not force:
            raise LlamafuseError(f"{samples}: exists (use --resume to continue it or --force to overwrite)")
        samples.unlink(missing_ok=True)
    items = hellaswag.build_items(hellaswag.load_docs(data, limit), sp, bos)
    longest = max(len(it.context) + max(map(len, it.endings)) for it in items)
    if longest > m.config.max_seq_len:
        raise LlamafuseError(f"an item needs {longest} positions, the model's rotary tables cover {m.config.max_seq_len}")
    done = _read_samples(samples, items) if resume and samples.exists() else {}
    todo = [it for it in items if it.doc_id not in done]
    run = {"lls": {}, "load_s": 0.0, "eval_s": 0.0, "first_batch_s": 0.0, "tokens": 0, "device": dev, "replicas": n_rep}
    if todo:
        run = launch(hellaswag_worker, m.tp, n_rep, dev, out, todo, Settings(batch_tokens, samples, attention))
        if run is None:  # a non-zero rank under torchrun: rank 0 reports
            return
    lls = {**done, **run["lls"]}
    metrics = hellaswag.score(items, [lls[it.doc_id] for it in items])
    result = {
        "task": "hellaswag", **metrics,
        "timing": {"load_s": round(run["load_s"], 3), "eval_s": round(run["eval_s"], 3),
                   "first_batch_s": round(run["first_batch_s"], 3),
                   "tokens": run["tokens"], "tokens_per_s": round(run["tokens"] / max(run["eval_s"], 1e-9), 1),
                   "items": len(todo), "resumed_items": len(items) - len(todo)},
        "settings": {"model": str(out), "dtype": m.dtype, "tp": m.tp, "replicas": run["replicas"], "device": dev,
                     "bos": bos, "batch_tokens": batch_tokens, "attention": attention, "data": data or hellaswag.HUB_ID, "limit": limit},
    }
    if output:
        _write_atomic(output, (json.dumps(result, indent=2) + "\n").encode())
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    t = result["timing"]
    click.echo(f"| task      |     n |   acc  | stderr | acc_norm | stderr |\n"
               f"|-----------|------:|-------:|-------:|---------:|-------:|\n"
               f"| hellaswag | {metrics['n']:5d} | {100 * metrics['acc']:6.2f} | {100 * metrics['acc_stderr']:6.2f} "
               f"| {100 * metrics['acc_norm']:8.2f} | {100 * metrics['acc_norm_stderr']:6.2f} |")
    click.echo(f"load {t['load_s']:.1f} s, eval {t['eval_s']:.1f} s, {t['tokens']:,} tokens "
               f"({t['tokens_per_s']:,.0f} tok/s) on {dev} (tp {m.tp} x {run['replicas']} replica(s), {m.dtype})")


def _read_samples(path: Path, items: list[hellaswag.Item]) -> dict[int, list[float]]:
    """Finished items of an interrupted run; each record must match this data set's row.

    A last line cut short by the interruption is dropped from the file, so appending resumes cleanly.
    """
    text = path.read_text()
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
        os.truncate(path, len(text.encode()))
    done = {}
    for i, line in enumerate(text.splitlines(), 1):
        try:
            r = json.loads(line)
            doc, lls = int(r["doc_id"]), [float(x) for x in r["lls"]]
        except (ValueError, KeyError, TypeError):
            raise LlamafuseError(f"{path} line {i}: not a samples record (cannot resume from it)") from None
        if not 0 <= doc < len(items) or len(lls) != 4 or (r.get("ind"), r.get("label")) != (items[doc].ind, items[doc].label):
            raise LlamafuseError(f"{path} line {i}: doc_id {doc} does not match this data set (other --data or --limit?)")
        done[doc] = lls
    return done


@main.command("logits")
@folder_arg
@click.option("--text", required=True, help="Text to run.")
@bos_opt
@device_opt
@click.option("--output", type=click.Path(path_type=Path), required=True, help="FILE.safetensors to write.")
@click.option("--force", is_flag=True, help="Overwrite --output.")
@user_errors
def logits_cmd(out: Path, text: str, bos: bool, device: str | None, output: Path, force: bool) -> None:
    """Write `tokens` (int64 [T]) and float32 `logits` [T, vocab] for TEXT."""
    from safetensors.torch import save
    m = load_manifest(out)
    dev = _device(device)
    _check_new(output, force)
    sp = _tokenizer(out, m)
    tokens = ([sp.bos_id()] if bos else []) + sp.encode(text)
    _check_tokens(tokens, m, "--text")
    result = launch(logits_worker, m.tp, 1, dev, out, [tokens])
    if result is None:  # a non-zero rank under torchrun
        return
    logits = result[0]
    _write_atomic(output, save({"tokens": torch.tensor(tokens, dtype=torch.long), "logits": logits.contiguous()}))
    click.echo(f"wrote {output}: {len(tokens)} tokens x {logits.shape[1]} logits")


@main.command("validate")
@folder_arg
@click.option("--reference", type=click.Path(path_type=Path), required=True,
              help="The source checkpoint folder, or a logits .safetensors (tokens, logits).")
@device_opt
@user_errors
def validate_cmd(out: Path, reference: Path, device: str | None) -> None:
    """Compare the converted model's logits with a reference; exit 1 if outside tolerance."""
    m = load_manifest(out)
    dev = _device(device)
    if reference.is_dir():
        from llamafuse.convert.reference import reference_logits
        from llamafuse.convert.sources import open_source
        sp = _tokenizer(out, m)
        seqs = [[sp.bos_id()] + sp.encode(t) for t in VALIDATION_TEXTS]
        ref = reference_logits(open_source(reference), seqs)
        what = f"float64 reference forward over {reference}"
    elif reference.is_file():
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
        raise LlamafuseError(f"{reference}: not found")
    ours = launch(logits_worker, m.tp, 1, dev, out, seqs)
    if ours is None:  # a non-zero rank under torchrun
        return
    c = compare(ours, ref)
    rel_tol, top1_tol = TOLERANCE[m.dtype]
    ok = c.passes(m.dtype)
    click.echo(f"validate {out} ({m.dtype}, tp {m.tp}) against {what}\n"
               f"  positions {c.n}, max |err| {c.max_abs:.3e}, relative error {c.rel:.3e} (tolerance {rel_tol:.0e}), "
               f"top-1 agreement {100 * c.top1:.2f}% (needs {100 * top1_tol:.0f}%)\n  {'PASS' if ok else 'FAIL'}")
    sys.exit(0 if ok else 1)


@main.command("verify")
@folder_arg
@user_errors
def verify_cmd(out: Path) -> None:
    """Recompute every checksum in the manifest; name any file that differs."""
    m = load_manifest(out)
    bad = []
    with tqdm(total=sum(r.bytes for r in m.ranks), unit="B", unit_scale=True, desc="verifying") as bar:
        for r in m.ranks:
            path = out / r.file
            if not path.is_file():
                bad.append(f"{r.file}: missing")
                continue
            if path.stat().st_size != r.bytes:
                bad.append(f"{r.file}: {path.stat().st_size} bytes, manifest says {r.bytes}")
                continue
            if sha256_file(path, bar.update) != r.sha256:
                bad.append(f"{r.file}: sha256 differs from the manifest")
    for b in bad:
        click.echo(f"llama-run: verify: {out / b}", err=True)
    if bad:
        sys.exit(1)
    click.echo(f"{out}: all {len(m.ranks)} rank files match the manifest")


if __name__ == "__main__":
    main()
