"""Readers for source checkpoints. Each exposes the full (unsharded) tensors by logical name.

Logical names: `embed`, `norm`, `output`, and per layer `layers.{i}.{wq,wk,wv,wo,w1,w2,w3,
attn_norm,ffn_norm}` (w1 = gate, w3 = up, w2 = down), in the source's dtype and rotary order.
Tensors are memory-mapped and fetched one at a time, so memory stays bounded by a layer.
Meta and Hugging Face folders are read here, GGUF files in `gguf.py`; `open_source` tells them apart.
"""
from __future__ import annotations

import json
import math
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from llamafuse.formats import LlamafuseError, ModelConfig
from llamafuse.formats.config import RopeScaling
from llamafuse.formats.tensorfile import MappedFile
from llamafuse.formats.tokenizer import HF_JSON, SENTENCEPIECE, TokenizerFile

from .tokenizer_files import find_tokenizer

LAYER_WEIGHTS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3", "attn_norm", "ffn_norm")
MATRIX_WEIGHTS = frozenset(LAYER_WEIGHTS[:7])  # fused into the products a float8 model stores in e4m3
DEFAULT_MAX_SEQ_LEN = 2048


class Source:
    """A checkpoint on disk. `rotary` is 'interleaved' (Meta, GGUF) or 'rotate-half' (HF)."""
    layout: str
    rotary: str
    config: ModelConfig
    path: Path
    tokenizer_folders: tuple[Path, ...] = ()  # where to look for a tokenizer file, in order
    tokenizer_prefer = SENTENCEPIECE          # which file name wins where both are present

    def tensor(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def tokenizer_file(self, override: Path | None = None) -> TokenizerFile | None:
        """The checkpoint's tokenizer (or `override`), with its BOS rule."""
        return find_tokenizer(list(self.tokenizer_folders), override, self.tokenizer_prefer)


def logical_shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The full shape of every logical tensor a checkpoint of config `c` must hold."""
    layer = {"wq": (c.q_dim, c.dim), "wk": (c.kv_dim, c.dim), "wv": (c.kv_dim, c.dim),
             "wo": (c.dim, c.q_dim), "w1": (c.ffn_dim, c.dim), "w2": (c.dim, c.ffn_dim),
             "w3": (c.ffn_dim, c.dim), "attn_norm": (c.dim,), "ffn_norm": (c.dim,)}
    shapes = {"embed": (c.vocab_size, c.dim), "norm": (c.dim,), "output": (c.vocab_size, c.dim)}
    for i in range(c.n_layers):
        shapes.update({f"layers.{i}.{k}": v for k, v in layer.items()})
    return shapes


def _read_json(path: Path) -> dict[str, Any]:
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError:
        raise LlamafuseError(f"{path}: not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LlamafuseError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise LlamafuseError(f"{path}: expected a JSON object")
    return d


def _field(d: dict[str, Any], key: str, path: Path, kind: type = int, default: Any = ...,
           positive: bool = True) -> Any:
    """d[key] checked to be a `kind` (and > 0 unless not `positive`); `default` if absent."""
    v = d.get(key, default)
    if v is ...:
        raise LlamafuseError(f"{path}: missing field '{key}'")
    if v is None and default is None:
        return None
    if kind is float and isinstance(v, int) and not isinstance(v, bool):
        v = float(v)
    if not isinstance(v, kind) or (isinstance(v, bool) and kind is not bool):
        raise LlamafuseError(f"{path}: field '{key}' should be {kind.__name__}, got {v!r}")
    if positive and v <= 0:
        raise LlamafuseError(f"{path}: field '{key}' must be positive, got {v!r}")
    return v


def _load_pth(path: Path) -> dict[str, torch.Tensor]:
    """torch.load with mmap and weights_only: no pickled code runs."""
    try:
        try:
            sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError:
            if not _is_legacy_pth(path):
                raise
            # Legacy (pre-zip) serialization cannot be memory-mapped: read it whole.
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise LlamafuseError(f"{path}: refused, it holds more than plain tensors ({str(e).splitlines()[0][:120]})") from None
    except (RuntimeError, OSError, EOFError, zipfile.BadZipFile, ValueError) as e:
        raise LlamafuseError(f"{path}: unreadable or truncated ({str(e).splitlines()[0][:120]})") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise LlamafuseError(f"{path}: expected a dict of tensors")
    return sd


def _is_legacy_pth(path: Path) -> bool:
    """torch.save(..., _use_new_zipfile_serialization=False): a pickled magic number first."""
    with open(path, "rb") as f:
        return f.read(4) == b"\x80\x02\x8a\x0a" and not zipfile.is_zipfile(path)


def _check_shape(name: str, t: torch.Tensor, shape: tuple[int, ...], where: Path) -> torch.Tensor:
    if tuple(t.shape) != shape:
        raise LlamafuseError(f"{where}: tensor '{name}' has shape {tuple(t.shape)}, expected {shape}")
    return t


class MetaSource(Source):
    """Meta's layout: `params.json` + `consolidated.NN.pth` model-parallel shards."""
    layout, rotary = "meta", "interleaved"
    # logical suffix -> (Meta name suffix, dim the shards are split on or None if replicated)
    _LAYER = {"wq": ("attention.wq.weight", 0), "wk": ("attention.wk.weight", 0),
              "wv": ("attention.wv.weight", 0), "wo": ("attention.wo.weight", 1),
              "w1": ("feed_forward.w1.weight", 0), "w2": ("feed_forward.w2.weight", 1),
              "w3": ("feed_forward.w3.weight", 0), "attn_norm": ("attention_norm.weight", None),
              "ffn_norm": ("ffn_norm.weight", None)}
    _GLOBAL = {"embed": ("tok_embeddings.weight", 1), "norm": ("norm.weight", None),
               "output": ("output.weight", 0)}

    def __init__(self, path: Path, max_seq_len: int | None = None):
        self.path = path
        files = sorted(path.glob("consolidated.*.pth"))
        if not files:
            raise LlamafuseError(f"{path}: no consolidated.NN.pth shards found")
        expected = [f"consolidated.{i:02d}.pth" for i in range(len(files))]
        if [f.name for f in files] != expected:
            raise LlamafuseError(f"{path}: shards should be {expected[0]} .. {expected[-1]}, found {[f.name for f in files]}")
        params_path = path / "params.json"
        if not params_path.is_file():
            raise LlamafuseError(f"{params_path}: not found (Meta checkpoints need params.json)")
        p = _read_json(params_path)
        if p.get("use_scaled_rope"):
            raise LlamafuseError(f"{params_path}: use_scaled_rope (Llama 3.1+) is not supported in Meta's layout, "
                                 "which does not record the scaling; convert the Hugging Face checkpoint instead")
        self.files = files
        self.shards = [_load_pth(f) for f in files]
        self._check_shards()
        dim, n_heads = _field(p, "dim", params_path), _field(p, "n_heads", params_path)
        n_layers = _field(p, "n_layers", params_path)
        n_kv = _field(p, "n_kv_heads", params_path, int, None) or n_heads
        if dim % n_heads:
            raise LlamafuseError(f"{params_path}: dim {dim} is not a multiple of n_heads {n_heads}")
        vocab = _field(p, "vocab_size", params_path, int, -1, positive=False)
        emb = self.shards[0].get("tok_embeddings.weight")
        if emb is None:
            raise LlamafuseError(f"{files[0]}: tensor 'tok_embeddings.weight' not found")
        if vocab <= 0:
            vocab = emb.shape[0]  # params.json says -1: take it from the tensors
        mult = _field(p, "multiple_of", params_path, int, 256)
        ffn_mult = _field(p, "ffn_dim_multiplier", params_path, float, None)
        hidden = int(2 * 4 * dim / 3)
        if ffn_mult is not None:
            hidden = int(ffn_mult * hidden)
        ffn = mult * math.ceil(hidden / mult)
        try:
            self.config = ModelConfig(
                dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv, head_dim=dim // n_heads,
                ffn_dim=ffn, vocab_size=vocab, norm_eps=_field(p, "norm_eps", params_path, float, 1e-5),
                rope_theta=_field(p, "rope_theta", params_path, float, 10000.0),
                max_seq_len=max_seq_len or _field(p, "max_seq_len", params_path, int, DEFAULT_MAX_SEQ_LEN))
        except LlamafuseError as e:
            raise LlamafuseError(f"{params_path}: {e}") from None
        self.tokenizer_folders = (path, path.parent)
        self._check_config()

    def _check_shards(self) -> None:
        keys = set(self.shards[0])
        for f, sd in zip(self.files[1:], self.shards[1:]):
            if set(sd) != keys:
                diff = sorted(keys ^ set(sd))[:3]
                raise LlamafuseError(f"{f}: holds different tensors than {self.files[0].name} (e.g. {diff})")
            for k, t in sd.items():
                if t.shape != self.shards[0][k].shape:
                    raise LlamafuseError(f"{f}: tensor '{k}' has shape {tuple(t.shape)} but "
                                         f"{tuple(self.shards[0][k].shape)} in {self.files[0].name}")

    def _check_config(self) -> None:
        """Every tensor of the checkpoint has the shape params.json implies."""
        for name, shape in logical_shapes(self.config).items():
            if name == "output" and "output.weight" not in self.shards[0]:
                continue  # tied to the embedding
            meta, dim = self._meta_name(name)
            t = self.shards[0].get(meta)
            if t is None:
                raise LlamafuseError(f"{self.files[0]}: tensor '{meta}' not found")
            full = list(t.shape)
            if dim is not None and len(full) == 2:
                full[dim] *= len(self.shards)
            if tuple(full) != shape:
                raise LlamafuseError(f"{self.path}: tensor '{meta}' has combined shape {tuple(full)}, "
                                     f"params.json implies {shape}")

    def _meta_name(self, name: str) -> tuple[str, int | None]:
        if name in self._GLOBAL:
            return self._GLOBAL[name]
        _, i, part = name.split(".")
        suffix, dim = self._LAYER[part]
        return f"layers.{i}.{suffix}", dim

    def tensor(self, name: str) -> torch.Tensor:
        if name == "output" and "output.weight" not in self.shards[0]:
            name = "embed"
        meta, dim = self._meta_name(name)
        parts = [sd[meta] for sd in self.shards]
        return parts[0] if dim is None or len(parts) == 1 else torch.cat(parts, dim=dim)


class HFSource(Source):
    """Hugging Face layout: `config.json` + safetensors or .bin weights (single or indexed)."""
    layout, rotary = "hf", "rotate-half"
    tokenizer_prefer = HF_JSON  # what lm-eval's HF backend (a fast tokenizer) uses
    _LAYER = {"wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj",
              "wo": "self_attn.o_proj", "w1": "mlp.gate_proj", "w2": "mlp.down_proj",
              "w3": "mlp.up_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}

    def __init__(self, path: Path, max_seq_len: int | None = None):
        self.path = path
        cfg_path = path / "config.json"
        if not cfg_path.is_file():
            raise LlamafuseError(f"{cfg_path}: not found (Hugging Face checkpoints need config.json)")
        d = _read_json(cfg_path)
        self.config = hf_config(d, cfg_path, max_seq_len)
        self.tied = _field(d, "tie_word_embeddings", cfg_path, bool, False, positive=False)
        self._where: dict[str, Path] = {}
        self._open: dict[Path, MappedFile | _TensorDict] = {}
        self._index_files()
        self.tokenizer_folders = (path,)
        self._shapes = logical_shapes(self.config)
        self._check_tensors()

    def _check_tensors(self) -> None:
        """Every tensor config.json implies is there with its shape, and no tensor it does not imply."""
        wanted = {self._hf_name(name): name for name in self._shapes}
        for hf, name in wanted.items():
            if hf not in self._where:
                raise LlamafuseError(f"{self.path}: tensor '{hf}' not found in the checkpoint")
            f = self._file(self._where[hf])
            if hf not in f.tensors:
                raise LlamafuseError(f"{self._where[hf]}: tensor '{hf}' not found (the index lists it there)")
            shape = tuple(f.tensors[hf].shape)
            if shape != self._shapes[name]:
                raise LlamafuseError(f"{self._where[hf]}: tensor '{hf}' has shape {shape}, "
                                     f"config.json implies {self._shapes[name]}")
        ignored = ("lm_head.weight",) if self.tied else ()  # transformers ties it to the embedding
        extra = sorted(k for k in self._where if k not in wanted and k not in ignored
                       and not k.endswith("rotary_emb.inv_freq"))  # a derived buffer older checkpoints saved
        if extra:
            raise LlamafuseError(f"{self.path}: tensor '{extra[0]}' is not part of the model config.json describes")

    def _index_files(self) -> None:
        p = self.path
        for index, kind in (("model.safetensors.index.json", "st"), ("pytorch_model.bin.index.json", "bin")):
            if (p / index).is_file():
                wm = _read_json(p / index).get("weight_map")
                if not isinstance(wm, dict):
                    raise LlamafuseError(f"{p / index}: missing 'weight_map'")
                for v in wm.values():
                    if not isinstance(v, str) or Path(v).name != v:
                        raise LlamafuseError(f"{p / index}: weight_map names {v!r}, not a file in the checkpoint folder")
                self._where = {k: p / v for k, v in wm.items()}
                for f in set(self._where.values()):
                    if not f.is_file():
                        raise LlamafuseError(f"{f}: listed in {index} but not found")
                return
        for single in ("model.safetensors", "pytorch_model.bin"):
            if (p / single).is_file():
                self._where = {k: p / single for k in self._keys(p / single)}
                return
        raise LlamafuseError(f"{p}: no model.safetensors, pytorch_model.bin or index file found")

    def _keys(self, f: Path) -> list[str]:
        return self._file(f).keys()

    def _file(self, f: Path) -> MappedFile | _TensorDict:
        if f not in self._open:
            self._open[f] = MappedFile(f) if f.suffix == ".safetensors" else _TensorDict(_load_pth(f))
        return self._open[f]

    def _hf_name(self, name: str) -> str:
        if name == "embed":
            return "model.embed_tokens.weight"
        if name == "norm":
            return "model.norm.weight"
        if name == "output":
            return "model.embed_tokens.weight" if self.tied else "lm_head.weight"
        _, i, part = name.split(".")
        return f"model.layers.{i}.{self._LAYER[part]}.weight"

    def tensor(self, name: str) -> torch.Tensor:
        hf = self._hf_name(name)
        t = self._file(self._where[hf]).get(hf)
        return _check_shape(hf, t, self._shapes[name], self._where[hf])


class _TensorDict:
    """A loaded .bin state dict with MappedFile's interface."""
    def __init__(self, sd: dict[str, torch.Tensor]):
        self.tensors = sd

    def keys(self) -> list[str]:
        return list(self.tensors)

    def get(self, name: str) -> torch.Tensor:
        return self.tensors[name]


HF_MODELS = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}
HF_DTYPES = ("float32", "float16", "bfloat16", "float64")
_ROPE_KEYS = {"linear": {"factor"},
              "llama3": {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}}


def hf_config(d: dict[str, Any], path: Path, max_seq_len: int | None) -> ModelConfig:
    """The model a Hugging Face config.json describes (transformers 4 or 5 spelling). Anything it
    names that the model here cannot honour is refused, never ignored."""
    mt = d.get("model_type", "llama")
    if mt not in HF_MODELS:
        raise LlamafuseError(f"{path}: model_type '{mt}' is not supported ({', '.join(HF_MODELS)})")
    archs = d.get("architectures")
    if archs is not None and archs != [HF_MODELS[mt]]:
        raise LlamafuseError(f"{path}: architectures {archs} is not supported ({HF_MODELS[mt]})")
    if d.get("sliding_window") is not None:
        raise LlamafuseError(f"{path}: sliding-window attention (sliding_window {d['sliding_window']}) is not supported")
    for key in ("attention_bias", "mlp_bias"):
        if d.get(key):
            raise LlamafuseError(f"{path}: {key} is true; biases are not supported")
    if d.get("hidden_act", "silu") != "silu":
        raise LlamafuseError(f"{path}: hidden_act '{d['hidden_act']}' is not supported (silu)")
    if d.get("quantization_config") is not None:
        raise LlamafuseError(f"{path}: quantized checkpoints (quantization_config) are not supported")
    for key in ("torch_dtype", "dtype"):
        if d.get(key) is not None and d[key] not in HF_DTYPES:
            raise LlamafuseError(f"{path}: {key} '{d[key]}' is not supported ({', '.join(HF_DTYPES)})")
    dim, n_heads = _field(d, "hidden_size", path), _field(d, "num_attention_heads", path)
    head_dim = _field(d, "head_dim", path, int, None)
    if head_dim is None and dim % n_heads:
        raise LlamafuseError(f"{path}: hidden_size {dim} is not a multiple of num_attention_heads {n_heads} "
                             "and there is no head_dim")
    theta, scaling = _hf_rope(d, path)
    try:
        return ModelConfig(
            dim=dim, n_layers=_field(d, "num_hidden_layers", path), n_heads=n_heads,
            n_kv_heads=_field(d, "num_key_value_heads", path, int, None) or n_heads,
            head_dim=head_dim or dim // n_heads,
            ffn_dim=_field(d, "intermediate_size", path), vocab_size=_field(d, "vocab_size", path),
            norm_eps=_field(d, "rms_norm_eps", path, float, 1e-6), rope_theta=theta,
            max_seq_len=max_seq_len or _field(d, "max_position_embeddings", path, int, DEFAULT_MAX_SEQ_LEN),
            rope_scaling=scaling)
    except LlamafuseError as e:
        raise LlamafuseError(f"{path}: {e}") from None


def _hf_rope(d: dict[str, Any], path: Path) -> tuple[float, RopeScaling | None]:
    """Rotary base and scaling from `rope_parameters` (transformers 5) and/or `rope_theta` +
    `rope_scaling` (transformers 4); where both spell a value they must agree."""
    merged: dict[str, Any] = {}
    top = {"rope_theta": d["rope_theta"]} if d.get("rope_theta") is not None else {}
    for where, part in (("rope_parameters", d.get("rope_parameters")), ("rope_scaling", d.get("rope_scaling")),
                        ("rope_theta", top)):
        if part is None:
            continue
        if not isinstance(part, dict):
            raise LlamafuseError(f"{path}: '{where}' should be an object, got {part!r}")
        for k, v in part.items():
            k = "rope_type" if k == "type" else k
            if k in merged and merged[k] != v:
                raise LlamafuseError(f"{path}: {k} is {merged[k]!r} in one place and {v!r} in '{where}'")
            merged[k] = v
    theta = _field(merged, "rope_theta", path, float, 10000.0)
    kind = merged.pop("rope_type", "default")
    merged.pop("rope_theta", None)
    if kind != "default" and kind not in _ROPE_KEYS:
        raise LlamafuseError(f"{path}: rope type {kind!r} is not supported (default, {', '.join(_ROPE_KEYS)})")
    extra = sorted(merged.keys() - _ROPE_KEYS.get(kind, set()))
    if extra:
        raise LlamafuseError(f"{path}: rope type {kind!r} with '{extra[0]}' is not supported")
    if kind == "default":
        return theta, None
    try:
        return theta, RopeScaling(kind, **merged)
    except LlamafuseError as e:
        raise LlamafuseError(f"{path}: {e}") from None


def open_source(path: Path, max_seq_len: int | None = None) -> Source:
    """Detect the layout of `path` (a Meta or Hugging Face folder, or a GGUF file) and open it."""
    path = Path(path)
    if not path.exists():
        raise LlamafuseError(f"{path}: source not found")
    if path.is_file() and path.suffix == ".gguf":
        from .gguf import GGUFSource
        return GGUFSource(path, max_seq_len)
    if not path.is_dir():
        raise LlamafuseError(f"{path}: source must be a folder or a .gguf file")
    entries = [e.name for e in path.iterdir()]
    if not entries:
        raise LlamafuseError(f"{path}: source folder is empty")
    if "manifest.json" in entries and not {"params.json", "config.json"} & set(entries):
        raise LlamafuseError(f"{path}: a llama-convert output folder, not a source checkpoint")
    if "params.json" in entries or any(e.startswith("consolidated.") for e in entries):
        return MetaSource(path, max_seq_len)
    if "config.json" in entries or any(e.endswith((".safetensors", ".bin", ".index.json")) for e in entries):
        return HFSource(path, max_seq_len)
    raise LlamafuseError(f"{path}: unknown layout (expected Meta params.json + consolidated.NN.pth, "
                         "or Hugging Face config.json + weights)")
