"""Find a checkpoint's tokenizer file and its own BOS rule (what lm-eval's HF backend applies).

lm-evaluation-harness 0.4.x encodes with the tokenizer's default special-token behaviour:
LLaMA's SentencePiece tokenizer (LlamaTokenizer, `add_bos_token` true unless its
tokenizer_config.json says otherwise) puts BOS first; a tokenizer.json does whatever its
post-processor does (Llama 3 adds `<|begin_of_text|>`, SmolLM2 adds nothing), unless
tokenizer_config.json sets `add_bos_token` explicitly.
"""
from __future__ import annotations

import json
from pathlib import Path

from llamafuse.formats import LlamafuseError
from llamafuse.formats.tokenizer import HF_JSON, SENTENCEPIECE, TOKENIZER_FILES, TokenizerFile


def find_tokenizer(folders: list[Path], override: Path | None, prefer: str) -> TokenizerFile | None:
    """The tokenizer of a checkpoint: `override` if given, else the first of `prefer` and the
    other known file name found in `folders` (in order); None if there is none."""
    if override is not None:
        return read_tokenizer_file(Path(override), None)
    order = [prefer] + [n for n in TOKENIZER_FILES if n != prefer]
    for folder in folders:
        for name in order:
            if (folder / name).is_file():
                return read_tokenizer_file(folder / name, folder / "tokenizer_config.json")
    return None


def read_tokenizer_file(path: Path, config: Path | None) -> TokenizerFile:
    """Read `path` (SentencePiece *.model or Hugging Face *.json) and work out its BOS rule and ids."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise LlamafuseError(f"{path}: tokenizer not found") from None
    except OSError as e:
        raise LlamafuseError(f"{path}: cannot read ({e.strerror or e})") from None
    if path.suffix not in (".model", ".json"):
        raise LlamafuseError(f"{path}: a tokenizer must be a SentencePiece .model or a Hugging Face tokenizer .json")
    explicit = _config_add_bos(config) if config is not None and config.is_file() else None
    if path.suffix == ".model":
        import sentencepiece as spm
        try:
            sp = spm.SentencePieceProcessor(model_proto=data)
        except (RuntimeError, OSError) as e:
            raise LlamafuseError(f"{path}: not a SentencePiece model ({str(e).splitlines()[0][:100]})") from None
        bos, eos = sp.bos_id(), sp.eos_id()
        return TokenizerFile(SENTENCEPIECE, data, True if explicit is None else explicit,
                             bos if bos >= 0 else None, eos if eos >= 0 else None, str(path))
    return _hf_json(path, data, explicit, config)


def _config_add_bos(config: Path) -> bool | None:
    try:
        d = json.loads(config.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LlamafuseError(f"{config}: not valid JSON ({e})") from None
    v = d.get("add_bos_token") if isinstance(d, dict) else None
    if v is not None and not isinstance(v, bool):
        raise LlamafuseError(f"{config}: field 'add_bos_token' should be true or false, got {v!r}")
    return v


def _hf_json(path: Path, data: bytes, explicit: bool | None, config: Path | None) -> TokenizerFile:
    from tokenizers import Tokenizer
    try:
        tok = Tokenizer.from_str(data.decode())
    except Exception as e:  # noqa: BLE001 - the tokenizers library raises a bare Exception
        raise LlamafuseError(f"{path}: not a Hugging Face tokenizer.json ({str(e).splitlines()[0][:100]})") from None
    plain = tok.encode("a", add_special_tokens=False).ids
    special = tok.encode("a", add_special_tokens=True).ids
    adds_bos = len(special) > len(plain) and special[1:1 + len(plain)] == plain
    bos = special[0] if adds_bos else _special_id(tok, config, "bos_token")
    eos = _special_id(tok, config, "eos_token")
    if explicit and bos is None:
        raise LlamafuseError(f"{config}: add_bos_token is true but the tokenizer names no BOS token")
    return TokenizerFile(HF_JSON, data, adds_bos if explicit is None else explicit, bos, eos, str(path))


def _special_id(tok: object, config: Path | None, key: str) -> int | None:
    """The id of tokenizer_config.json's `key` token (a string or {"content": ...})."""
    if config is None or not config.is_file():
        return None
    d = json.loads(config.read_text())
    v = d.get(key) if isinstance(d, dict) else None
    if isinstance(v, dict):
        v = v.get("content")
    return tok.token_to_id(v) if isinstance(v, str) else None  # type: ignore[attr-defined]
