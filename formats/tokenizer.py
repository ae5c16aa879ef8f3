"""The tokenizer that travels with a converted model: SentencePiece or Hugging Face tokenizers.

One interface for both: `encode` turns texts into ids *without* special tokens; whether a BOS
goes first is a separate rule (the tokenizer's own, recorded in the manifest, or the user's).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .errors import LlamafuseError

SENTENCEPIECE, HF_JSON = "tokenizer.model", "tokenizer.json"
TOKENIZER_FILES = (SENTENCEPIECE, HF_JSON)


@dataclass(frozen=True)
class TokenizerFile:
    """A tokenizer as a source checkpoint provides it, before it is copied into OUT."""
    name: str           # one of TOKENIZER_FILES
    data: bytes
    add_bos: bool       # does the tokenizer itself put BOS first (as lm-eval's HF backend encodes)?
    bos_id: int | None  # the BOS token, if the tokenizer has one
    eos_id: int | None
    origin: str         # where it came from, for messages


class Tokenizer:
    """Encode texts to token ids, without special tokens."""
    vocab_size: int     # every id the tokenizer can produce is below this

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        raise NotImplementedError

    def token_text(self, token: int) -> str:
        """The text of one token as the tokenizer spells it (special tokens as `<s>` etc.)."""
        raise NotImplementedError


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, data: bytes, where: str):
        import sentencepiece as spm
        try:
            self.sp = spm.SentencePieceProcessor(model_proto=data)
        except (RuntimeError, OSError, TypeError) as e:
            raise LlamafuseError(f"{where}: not a SentencePiece model ({str(e).splitlines()[0][:100]})") from None
        self.vocab_size = self.sp.vocab_size()

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        return self.sp.encode(list(texts))

    def token_text(self, token: int) -> str:
        return self.sp.id_to_piece(token)


class HFTokenizer(Tokenizer):
    def __init__(self, data: bytes, where: str):
        from tokenizers import Tokenizer as RustTokenizer
        try:
            self.tok = RustTokenizer.from_str(data.decode())
        except Exception as e:  # noqa: BLE001 - the tokenizers library raises a bare Exception
            raise LlamafuseError(f"{where}: not a Hugging Face tokenizer.json ({str(e).splitlines()[0][:100]})") from None
        vocab = self.tok.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1 if vocab else 0

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

    def token_text(self, token: int) -> str:
        return self.tok.id_to_token(token)


def make_tokenizer(name: str, data: bytes, model_vocab: int, where: str) -> Tokenizer:
    """The tokenizer in `data` (file `name`), checked to produce only ids the model's embedding has
    (a tokenizer smaller than the embedding is fine: models often pad their vocabulary)."""
    if name not in TOKENIZER_FILES:
        raise LlamafuseError(f"{where}: tokenizer file must be one of {', '.join(TOKENIZER_FILES)}, got {name!r}")
    tok = SentencePieceTokenizer(data, where) if name == SENTENCEPIECE else HFTokenizer(data, where)
    if tok.vocab_size > model_vocab:
        raise LlamafuseError(f"{where}: the tokenizer has {tok.vocab_size} tokens (ids up to {tok.vocab_size - 1}) "
                             f"but the model's vocabulary is {model_vocab}")
    return tok


def read_tokenizer(path: Path, model_vocab: int) -> Tokenizer:
    """Load the tokenizer file at `path` (its kind from its name)."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise LlamafuseError(f"{path}: tokenizer not found") from None
    except OSError as e:
        raise LlamafuseError(f"{path}: cannot read ({e.strerror or e})") from None
    return make_tokenizer(Path(path).name, data, model_vocab, str(path))
