"""A checkpoint's tokenizer file and its own BOS rule (what lm-eval's HF backend applies).

lm-evaluation-harness 0.4.x encodes with the tokenizer's default special-token behaviour:
LLaMA's SentencePiece tokenizer (LlamaTokenizer, `add_bos_token` true unless its
tokenizer_config.json says otherwise) puts BOS first; a tokenizer.json does whatever its
post-processor does (Llama 3 adds `<|begin_of_text|>`, SmolLM2 adds nothing), unless
tokenizer_config.json sets `add_bos_token` explicitly.

A GGUF file carries no tokenizer file, only llama.cpp's `tokenizer.ggml.*` metadata; `gguf_tokenizer`
builds the tokenizer.json it describes, as transformers does when it loads a GGUF.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gguf import TokenType
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from llamafuse.formats import LlamafuseError
from llamafuse.formats.tokenizer import HF_JSON, SENTENCEPIECE, TOKENIZER_FILES, TokenizerFile

SPACE = "\u2581"  # SentencePiece's visible space
# Llama 3's split pattern (tiktoken's cl100k shape with digits in groups of up to three).
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


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
    settings = _tokenizer_config(config) if config is not None and config.is_file() else {}
    explicit = settings.get("add_bos_token")
    if explicit is not None and not isinstance(explicit, bool):
        raise LlamafuseError(f"{config}: field 'add_bos_token' should be true or false, got {explicit!r}")
    if settings.get("add_eos_token") is True:
        raise LlamafuseError(f"{config}: add_eos_token is true; tokenizers that append EOS are not supported")
    if path.suffix == ".model":
        import sentencepiece as spm
        try:
            sp = spm.SentencePieceProcessor(model_proto=data)
        except (RuntimeError, OSError) as e:
            raise LlamafuseError(f"{path}: not a SentencePiece model ({str(e).splitlines()[0][:100]})") from None
        bos, eos = sp.bos_id(), sp.eos_id()
        return TokenizerFile(SENTENCEPIECE, data, True if explicit is None else explicit,
                             bos if bos >= 0 else None, eos if eos >= 0 else None, str(path))
    return _hf_json(path, data, explicit, settings, config)


def _tokenizer_config(config: Path) -> dict[str, Any]:
    try:
        d = json.loads(config.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LlamafuseError(f"{config}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise LlamafuseError(f"{config}: expected a JSON object")
    return d


def _hf_json(path: Path, data: bytes, explicit: bool | None, settings: dict[str, Any],
             config: Path | None) -> TokenizerFile:
    try:
        tok = Tokenizer.from_str(data.decode())
    except Exception as e:  # noqa: BLE001 - the tokenizers library raises a bare Exception
        raise LlamafuseError(f"{path}: not a Hugging Face tokenizer.json ({str(e).splitlines()[0][:100]})") from None
    plain = tok.encode("a", add_special_tokens=False).ids
    special = tok.encode("a", add_special_tokens=True).ids
    adds_bos = len(special) == len(plain) + 1 and special[1:] == plain
    if special != plain and not adds_bos:
        raise LlamafuseError(f"{path}: its post-processor adds special tokens other than one leading BOS "
                             f"({special} for {plain}); not supported")
    bos = special[0] if adds_bos else _special_id(tok, settings, "bos_token")
    eos = _special_id(tok, settings, "eos_token")
    if explicit and bos is None:
        raise LlamafuseError(f"{config}: add_bos_token is true but the tokenizer names no BOS token")
    return TokenizerFile(HF_JSON, data, adds_bos if explicit is None else explicit, bos, eos, str(path))


def _special_id(tok: Tokenizer, settings: dict[str, Any], key: str) -> int | None:
    """The id of tokenizer_config.json's `key` token (a string or {"content": ...})."""
    v = settings.get(key)
    if isinstance(v, dict):
        v = v.get("content")
    return tok.token_to_id(v) if isinstance(v, str) else None


# ---------------------------------------------------------------- GGUF metadata -> tokenizer.json


@dataclass(frozen=True)
class GGUFVocab:
    """A GGUF file's tokenizer metadata (llama.cpp's `tokenizer.ggml.*` keys)."""
    model: str                      # "gpt2" (byte-level BPE) or "llama" (SentencePiece BPE)
    pre: str | None                 # the pre-tokenizer of a "gpt2" model
    tokens: list[str]
    token_types: list[int] | None   # gguf.TokenType values
    scores: list[float] | None
    merges: list[str] | None        # "left right"
    bos_id: int | None
    eos_id: int | None
    unk_id: int | None
    add_bos: bool | None
    add_eos: bool | None
    add_space_prefix: bool | None


def _byte_level(split: pre_tokenizers.PreTokenizer | None) -> pre_tokenizers.PreTokenizer:
    """GPT-2's byte-level pre-tokenizer, after `split` if given (which then replaces GPT-2's regex)."""
    if split is None:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    return pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


# tokenizer.ggml.pre -> the pre-tokenizer transformers gives the tokenizer when it loads the GGUF,
# which is what lm-eval's HF backend sees. (For "smollm" llama.cpp also isolates every \p{N}
# character; transformers does not, which differs only on non-ASCII numerals such as "½".)
GGUF_PRE_TOKENIZERS = {
    None: lambda: _byte_level(None),
    "default": lambda: _byte_level(None),
    "gpt-2": lambda: _byte_level(None),
    "smollm": lambda: _byte_level(None),
    "llama-bpe": lambda: _byte_level(pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated")),
}


def gguf_tokenizer(v: GGUFVocab, origin: str) -> TokenizerFile:
    """The tokenizer.json that GGUF metadata `v` describes, with its BOS rule (transformers' defaults
    where the file is silent: BOS for a SentencePiece vocabulary, none for a byte-level one)."""
    if v.model not in ("gpt2", "llama"):
        raise LlamafuseError(f"{origin}: tokenizer.ggml.model {v.model!r} is not supported (gpt2, llama)")
    if v.add_eos:
        raise LlamafuseError(f"{origin}: tokenizer.ggml.add_eos_token is true; tokenizers that append EOS are not supported")
    n = len(v.tokens)
    for what, lst in (("token_type", v.token_types), ("scores", v.scores)):
        if lst is not None and len(lst) != n:
            raise LlamafuseError(f"{origin}: tokenizer.ggml.{what} has {len(lst)} entries for {n} tokens")
    for what, tid in (("bos_token_id", v.bos_id), ("eos_token_id", v.eos_id), ("unknown_token_id", v.unk_id)):
        if tid is not None and not 0 <= tid < n:
            raise LlamafuseError(f"{origin}: tokenizer.ggml.{what} {tid} is not one of the {n} tokens")
    if len(set(v.tokens)) != n:
        raise LlamafuseError(f"{origin}: tokenizer.ggml.tokens lists a token twice")
    types = v.token_types or [TokenType.NORMAL] * n
    try:
        tok = _sentencepiece_bpe(v, types, origin) if v.model == "llama" else _byte_level_bpe(v, origin)
    except LlamafuseError:
        raise
    except Exception as e:  # noqa: BLE001 - the tokenizers library raises a bare Exception
        raise LlamafuseError(f"{origin}: cannot build its tokenizer ({str(e).splitlines()[0][:120]})") from None
    byte_level = v.model == "gpt2"
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t, k in zip(v.tokens, types)
                            if k in (TokenType.CONTROL, TokenType.UNKNOWN)
                            and (not byte_level or set(t) <= alphabet)])  # others: llama.cpp mislabels
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t, k in zip(v.tokens, types)
                    if k == TokenType.USER_DEFINED])
    add_bos = v.model == "llama" if v.add_bos is None else v.add_bos
    if add_bos:
        if v.bos_id is None:
            raise LlamafuseError(f"{origin}: tokenizer.ggml.add_bos_token is true but there is no bos_token_id")
        bos = v.tokens[v.bos_id]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, v.bos_id)])
    return TokenizerFile(HF_JSON, tok.to_str().encode(), add_bos, v.bos_id, v.eos_id, origin)


def _byte_level_bpe(v: GGUFVocab, origin: str) -> Tokenizer:
    if v.merges is None:
        raise LlamafuseError(f"{origin}: a gpt2 tokenizer needs tokenizer.ggml.merges")
    if v.pre not in GGUF_PRE_TOKENIZERS:
        known = ", ".join(k for k in GGUF_PRE_TOKENIZERS if k)
        raise LlamafuseError(f"{origin}: tokenizer.ggml.pre {v.pre!r} is not supported ({known})")
    merges = [tuple(m.split(" ")) for m in v.merges]
    bad = next((m for m in merges if len(m) != 2), None)
    if bad is not None:
        raise LlamafuseError(f"{origin}: tokenizer.ggml.merges holds {' '.join(bad)!r}, not two tokens")
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(v.tokens)}, merges, continuing_subword_prefix="",
                               end_of_word_suffix="", fuse_unk=False))
    tok.pre_tokenizer = GGUF_PRE_TOKENIZERS[v.pre]()
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece_bpe(v: GGUFVocab, types: list[int], origin: str) -> Tokenizer:
    """SentencePiece BPE as a tokenizers BPE with byte fallback: merges ranked by the score of the
    piece they make (SentencePiece's order), the visible space prepended and substituted."""
    if v.scores is None and v.merges is None:
        raise LlamafuseError(f"{origin}: a llama tokenizer needs tokenizer.ggml.scores or tokenizer.ggml.merges")
    merges = ([tuple(m.split(" ")) for m in v.merges] if v.merges is not None
              else _merges_from_scores(v.tokens, v.scores, types))  # type: ignore[arg-type]
    unk = v.tokens[v.unk_id] if v.unk_id is not None else None
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(v.tokens)}, merges, unk_token=unk, fuse_unk=True,
                               byte_fallback=True))
    spaces: list = [normalizers.Replace(" ", SPACE)]
    decode: list = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if v.add_space_prefix is not False:  # SentencePiece's add_dummy_prefix, on unless the file says not
        spaces.insert(0, normalizers.Prepend(SPACE))
        decode.append(decoders.Strip(" ", 1, 0))
    tok.normalizer = normalizers.Sequence(spaces)
    tok.decoder = decoders.Sequence(decode)
    return tok


def _merges_from_scores(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """Every split of a normal piece into two normal pieces, best piece score first."""
    ids = {t: i for i, (t, k) in enumerate(zip(tokens, types)) if k == TokenType.NORMAL}
    ranked = [(-scores[i], ids[p[:k]], ids[p[k:]]) for p, i in ids.items() for k in range(1, len(p))
              if p[:k] in ids and p[k:] in ids]
    ranked.sort()
    return [(tokens[a], tokens[b]) for _, a, b in ranked]
