"""The SentencePiece tokenizer that travels with a converted model."""
from __future__ import annotations

from pathlib import Path

import sentencepiece as spm

from .errors import LlamafuseError


def load_tokenizer(path: Path, vocab_size: int) -> spm.SentencePieceProcessor:
    """Load `path`, checking that it is a SentencePiece model with exactly `vocab_size` pieces."""
    if not Path(path).is_file():
        raise LlamafuseError(f"{path}: tokenizer not found")
    try:
        sp = spm.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError) as e:
        raise LlamafuseError(f"{path}: not a SentencePiece model ({str(e).splitlines()[0][:100]})") from None
    if sp.vocab_size() != vocab_size:
        raise LlamafuseError(f"{path}: tokenizer has {sp.vocab_size()} pieces but the model's vocabulary is {vocab_size}")
    return sp
