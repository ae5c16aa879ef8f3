"""`llama-convert SRC OUT`: the command-line front of the converter."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from llamafuse.formats import LlamafuseError
from llamafuse.formats import WEIGHT_DTYPES
from llamafuse.formats.interrupts import interrupts, interruption

from .sources import open_source
from .write import convert, size_text


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--tp", default=1, show_default=True,
              help="Tensor-parallel ranks to write: must divide the heads, the ffn width and the vocabulary, "
                   "and divide or be a multiple of the key/value heads.")
@click.option("--dtype", "dtype", default="float16", show_default=True, type=click.Choice(list(WEIGHT_DTYPES)),
              help="Weight dtype on disk (rotary tables are always float32). float8: the four matrix products "
                   "of each layer in e4m3 with per-row scales, the rest float16; runs on FP8 GPUs (sm89+).")
@click.option("--max-seq-len", type=click.IntRange(min=1), default=None,
              help="Positions covered by the rotary tables [default: from the checkpoint, else 2048].")
@click.option("--tokenizer", type=click.Path(path_type=Path), default=None,
              help="tokenizer.model (SentencePiece) or tokenizer.json (HF) [default: found beside the checkpoint].")
@click.option("--force", is_flag=True, help="Write into a non-empty OUT (only our own files are replaced).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def main(src: Path, out: Path, tp: int, dtype: str, max_seq_len: int | None, tokenizer: Path | None,
         force: bool, as_json: bool) -> None:
    """Convert a LLaMA checkpoint (Meta or Hugging Face layout, detected) in SRC to llamafuse
    rank files in OUT: fused QKV and gate/up per rank, rotary tables, manifest, tokenizer."""
    try:
        with interrupts():  # SIGTERM (kill, timeout, job schedulers) cleans up like Ctrl-C
            source = open_source(src, max_seq_len)
            summary = convert(source, out, tp, dtype, force=force, tokenizer=tokenizer, progress=True)
    except (Exception, KeyboardInterrupt) as e:
        stop = interruption(e)    # first: an error that a stop signal caused reports the signal
        if stop is not None:
            click.echo(f"llama-convert: {stop}; nothing was written to the destination", err=True)
            sys.exit(stop.exit_code)
        if isinstance(e, LlamafuseError):
            click.echo(f"llama-convert: error: {e}", err=True)
            sys.exit(2)
        raise
    for tmp in summary.removed:
        click.echo(f"llama-convert: removed {tmp}, left by a conversion that was killed", err=True)
    total = sum(n for _, n in summary.files)
    c = source.config
    if as_json:
        click.echo(json.dumps({"out": str(summary.out), "layout": source.layout, "config": c.to_dict(), "tp": tp,
                               "dtype": dtype, "files": dict(summary.files), "bytes": total,
                               "seconds": round(summary.seconds, 3)}))
        return
    click.echo(f"{source.layout} checkpoint {src}: {c.n_layers} layers, dim {c.dim}, {c.n_heads} heads "
               f"({c.n_kv_heads} kv), ffn {c.ffn_dim}, vocab {c.vocab_size} -> tp={tp} {dtype}")
    for name, n in summary.files:
        click.echo(f"  {name:32s} {size_text(n):>10s}")
    click.echo(f"wrote {len(summary.files)} files, {size_text(total)} to {summary.out} "
               f"in {summary.seconds:.1f} s ({size_text(int(total / max(summary.seconds, 1e-9)))}/s)")
