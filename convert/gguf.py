"""llama.cpp GGUF files (architecture `llama`) as a converter source.

Hyperparameters come from the `llama.*` metadata, the tokenizer from `tokenizer.ggml.*` (built
into a tokenizer.json), and each weight is dequantized to float32 with ggml's own Python reader
(`gguf.quants.dequantize`) when it is asked for, one tensor at a time. llama.cpp's converter
stores q/k rows in Meta's interleaved rotary order (it permutes Hugging Face's rotate-half rows),
so the source is `interleaved`, like Meta's layout.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q, GGUFReader, GGUFValueType
from gguf.quants import dequantize

from llamafuse.formats import LlamafuseError, ModelConfig
from llamafuse.formats.config import RopeScaling
from llamafuse.formats.tokenizer import TokenizerFile

from .sources import DEFAULT_MAX_SEQ_LEN, Source, logical_shapes
from .tokenizer_files import GGUFVocab, gguf_tokenizer, read_tokenizer_file

SUPPORTED_TYPES = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1,
                   Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K)
_GLOBAL = {"embed": "token_embd.weight", "norm": "output_norm.weight", "output": "output.weight"}
_LAYER = {"wq": "attn_q", "wk": "attn_k", "wv": "attn_v", "wo": "attn_output", "w1": "ffn_gate",
          "w2": "ffn_down", "w3": "ffn_up", "attn_norm": "attn_norm", "ffn_norm": "ffn_norm"}
_KINDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false", list: "an array"}


if not callable(getattr(GGUFReader, "_get", None)):  # every read of the header goes through it
    raise ImportError("this gguf package's GGUFReader has no _get: llamafuse's bounds checks need updating")


class CheckedReader(GGUFReader):
    """gguf's reader with every read bounds-checked. The reader slices its memory map unchecked, so
    a truncated or hostile file would give short arrays, or loop over an absurd array count."""

    def _get(self, offset: int, dtype: Any, count: int = 1, override_order: Any = None) -> np.ndarray:
        end = int(offset) + np.dtype(dtype).itemsize * int(count)
        if not 0 <= int(offset) <= end <= len(self.data):
            raise ValueError(f"needs bytes {int(offset)}..{end} but the file has {len(self.data)} (truncated?)")
        return super()._get(offset, dtype, count, override_order)


def read_gguf(path: Path) -> GGUFReader:
    """Open and parse the header of a GGUF file; any defect is one LlamafuseError naming the file."""
    try:
        return CheckedReader(path)
    except (ValueError, KeyError, IndexError, OverflowError, MemoryError, UnicodeDecodeError) as e:
        raise LlamafuseError(f"{path}: not a valid GGUF file ({str(e).splitlines()[0][:160]})") from None
    except OSError as e:
        raise LlamafuseError(f"{path}: cannot read ({e.strerror or e})") from None


class GGUFSource(Source):
    """A llama-architecture GGUF file."""
    layout, rotary = "gguf", "interleaved"

    def __init__(self, path: Path, max_seq_len: int | None = None):
        self.path = path
        self.reader = read_gguf(path)
        arch = self._get("general.architecture", str)
        if arch != "llama":
            raise LlamafuseError(f"{path}: architecture '{arch}' is not supported (only 'llama')")
        if self._get("llama.expert_count", int, 0):
            raise LlamafuseError(f"{path}: mixture-of-experts models are not supported")
        self.tensors = {t.name: t for t in self.reader.tensors}
        if "rope_freqs.weight" in self.tensors:
            raise LlamafuseError(f"{path}: per-frequency rope factors (rope_freqs.weight, Llama 3.1+ GGUFs) are not "
                                 "supported; convert the Hugging Face checkpoint instead")
        self.tied = _GLOBAL["output"] not in self.tensors
        self.config = self._config(max_seq_len)
        self._names = {name: self._gguf_name(name) for name in logical_shapes(self.config)}
        self._check_tensors()

    def _get(self, key: str, kind: type, default: Any = ..., item: type | None = None) -> Any:
        """Metadata `key`, checked to be a `kind` (a list of `item`s); `default` if absent (an error
        if there is no default)."""
        f = self.reader.fields.get(key)
        if f is None:
            if default is ...:
                raise LlamafuseError(f"{self.path}: metadata '{key}' not found")
            return default
        try:
            v = f.contents()
        except (UnicodeDecodeError, IndexError) as e:
            raise LlamafuseError(f"{self.path}: metadata '{key}' is malformed ({e})") from None
        if kind is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if kind is float and f.types == [GGUFValueType.FLOAT32]:
            v = float(str(np.float32(v)))  # the decimal that was written: 1e-05, not 9.999999747378752e-06
        if not isinstance(v, kind) or (isinstance(v, bool) and kind is not bool):
            raise LlamafuseError(f"{self.path}: metadata '{key}' should be {_KINDS[kind]}, got {str(v)[:60]!r}")
        if item is not None and not all(isinstance(x, item) and not isinstance(x, bool) for x in v):
            raise LlamafuseError(f"{self.path}: metadata '{key}' should be an array of {item.__name__}")
        return v

    def _config(self, max_seq_len: int | None) -> ModelConfig:
        g = self._get
        dim, n_heads = g("llama.embedding_length", int), g("llama.attention.head_count", int)
        key_len = g("llama.attention.key_length", int, None)
        if key_len is not None and key_len != g("llama.attention.value_length", int, key_len):
            raise LlamafuseError(f"{self.path}: attention key and value lengths differ; not supported")
        if key_len is None and n_heads > 0 and dim % n_heads:
            raise LlamafuseError(f"{self.path}: embedding_length {dim} is not a multiple of head_count {n_heads}")
        head_dim = key_len or dim // max(n_heads, 1)
        rot = g("llama.rope.dimension_count", int, head_dim)
        if rot != head_dim:
            raise LlamafuseError(f"{self.path}: rope.dimension_count {rot} is not the head size {head_dim} "
                                 "(partial rotary is not supported)")
        emb = self.tensors.get(_GLOBAL["embed"])
        if emb is None:
            raise LlamafuseError(f"{self.path}: tensor '{_GLOBAL['embed']}' not found")
        vocab = int(emb.shape[1]) if len(emb.shape) == 2 else 0
        if g("llama.vocab_size", int, vocab) != vocab:
            raise LlamafuseError(f"{self.path}: llama.vocab_size {g('llama.vocab_size', int)} but "
                                 f"{_GLOBAL['embed']} has {vocab} rows")
        try:
            return ModelConfig(
                dim=dim, n_layers=g("llama.block_count", int), n_heads=n_heads,
                n_kv_heads=g("llama.attention.head_count_kv", int, n_heads), head_dim=head_dim,
                ffn_dim=g("llama.feed_forward_length", int), vocab_size=vocab,
                norm_eps=g("llama.attention.layer_norm_rms_epsilon", float),
                rope_theta=g("llama.rope.freq_base", float, 10000.0),
                max_seq_len=max_seq_len or g("llama.context_length", int, DEFAULT_MAX_SEQ_LEN),
                rope_scaling=self._rope_scaling())
        except LlamafuseError as e:
            raise LlamafuseError(f"{self.path}: {e}") from None

    def _rope_scaling(self) -> RopeScaling | None:
        kind = self._get("llama.rope.scaling.type", str, None)
        legacy = self._get("llama.rope.scale_linear", float, None)
        if kind in (None, "none"):
            return None if legacy is None else RopeScaling("linear", legacy)
        if kind != "linear":
            raise LlamafuseError(f"{self.path}: rope scaling type '{kind}' is not supported (linear)")
        return RopeScaling("linear", self._get("llama.rope.scaling.factor", float))

    def _gguf_name(self, name: str) -> str:
        if name == "output" and self.tied:
            return _GLOBAL["embed"]
        if name in _GLOBAL:
            return _GLOBAL[name]
        _, i, part = name.split(".")
        return f"blk.{i}.{_LAYER[part]}.weight"

    def _check_tensors(self) -> None:
        """Every tensor the config implies is there, in a supported type, with its shape; no others."""
        shapes = logical_shapes(self.config)
        for name, gname in self._names.items():
            t = self.tensors.get(gname)
            if t is None:
                raise LlamafuseError(f"{self.path}: tensor '{gname}' not found")
            if t.tensor_type not in SUPPORTED_TYPES:
                raise LlamafuseError(f"{self.path}: tensor '{gname}' has type {t.tensor_type.name}, not supported "
                                     f"({', '.join(q.name for q in SUPPORTED_TYPES)})")
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            if shape != shapes[name]:
                raise LlamafuseError(f"{self.path}: tensor '{gname}' has shape {shape}, the metadata implies {shapes[name]}")
        extra = sorted(set(self.tensors) - set(self._names.values()))
        if extra:
            raise LlamafuseError(f"{self.path}: unexpected tensor '{extra[0]}' (not part of a llama model)")

    def tensor(self, name: str) -> torch.Tensor:
        t = self.tensors[self._names[name]]
        try:
            values = dequantize(t.data, t.tensor_type)
        except (ValueError, NotImplementedError) as e:
            raise LlamafuseError(f"{self.path}: tensor '{t.name}' cannot be dequantized ({e})") from None
        return torch.from_numpy(np.require(values, np.float32, ["C", "W"]))

    def tokenizer_file(self, override: Path | None = None) -> TokenizerFile | None:
        if override is not None:
            return read_tokenizer_file(Path(override), None)
        g = self._get
        if g("tokenizer.ggml.model", str, None) is None:
            return None
        k = "tokenizer.ggml."
        vocab = GGUFVocab(
            model=g(k + "model", str), pre=g(k + "pre", str, None), tokens=g(k + "tokens", list, item=str),
            token_types=g(k + "token_type", list, None, int), scores=g(k + "scores", list, None, float),
            merges=g(k + "merges", list, None, str), bos_id=g(k + "bos_token_id", int, None),
            eos_id=g(k + "eos_token_id", int, None), unk_id=g(k + "unknown_token_id", int, None),
            add_bos=g(k + "add_bos_token", bool, None), add_eos=g(k + "add_eos_token", bool, None),
            add_space_prefix=g(k + "add_space_prefix", bool, None))
        return gguf_tokenizer(vocab, f"{self.path} (tokenizer.ggml metadata)")
