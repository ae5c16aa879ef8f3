"""The oracle: a plain forward pass over a *source* checkpoint, independent of the converter.

`validate` and the tests compare the converted model against it, so it shares no code with
`llamafuse.convert` or `llamafuse.runtime`: it recognises the checkpoint itself (a Meta folder, a
Hugging Face folder or a GGUF file), reads the few hyperparameters it needs with its own lines
(params.json, config.json, GGUF metadata; sizes come from the tensors), loads tensors with the
libraries directly (torch.load, safetensors, gguf), computes the rotary frequencies (linear and
Llama 3 scaling included) itself, and runs every sequence causally on its own in float64 on the
CPU in the source's own rotary convention, one layer's weights in memory at a time.
"""
from __future__ import annotations

import json
import math
import pickle
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError

from .errors import LlamafuseError

_READ_ERRORS = (OSError, RuntimeError, ValueError, TypeError, IndexError, OverflowError, EOFError,
                pickle.UnpicklingError, SafetensorError)
LAYER = ("wq", "wk", "wv", "wo", "w1", "w2", "w3", "attn_norm", "ffn_norm")
# part -> (Meta name, dim its model-parallel shards are split on), Hugging Face name, GGUF name
_NAMES = {
    "embed": (("tok_embeddings.weight", 1), "model.embed_tokens.weight", "token_embd.weight"),
    "norm": (("norm.weight", None), "model.norm.weight", "output_norm.weight"),
    "output": (("output.weight", 0), "lm_head.weight", "output.weight"),
    "wq": (("attention.wq.weight", 0), "self_attn.q_proj.weight", "attn_q.weight"),
    "wk": (("attention.wk.weight", 0), "self_attn.k_proj.weight", "attn_k.weight"),
    "wv": (("attention.wv.weight", 0), "self_attn.v_proj.weight", "attn_v.weight"),
    "wo": (("attention.wo.weight", 1), "self_attn.o_proj.weight", "attn_output.weight"),
    "w1": (("feed_forward.w1.weight", 0), "mlp.gate_proj.weight", "ffn_gate.weight"),
    "w2": (("feed_forward.w2.weight", 1), "mlp.down_proj.weight", "ffn_down.weight"),
    "w3": (("feed_forward.w3.weight", 0), "mlp.up_proj.weight", "ffn_up.weight"),
    "attn_norm": (("attention_norm.weight", None), "input_layernorm.weight", "attn_norm.weight"),
    "ffn_norm": (("ffn_norm.weight", None), "post_attention_layernorm.weight", "ffn_norm.weight"),
}


class Reference:
    """A source checkpoint, read plainly: `logits` runs sequences through it."""

    def __init__(self, path: Path):
        self.path = path = Path(path)
        opener = (self._open_gguf if path.is_file() and path.suffix == ".gguf" else
                  self._open_meta if (path / "params.json").is_file() else
                  self._open_hf if (path / "config.json").is_file() else None)
        if opener is not None:
            try:
                opener(path)
            except KeyError as e:
                raise LlamafuseError(f"{path}: hyperparameter {e} not found") from None
            except _READ_ERRORS as e:
                raise LlamafuseError(f"{path}: unreadable ({str(e).splitlines()[0][:160]})") from None
        elif (path / "manifest.json").is_file():
            raise LlamafuseError(f"{path}: a llama-convert output folder; the reference must be the source checkpoint")
        elif path.exists():
            raise LlamafuseError(f"{path}: not a Meta (params.json) or Hugging Face (config.json) folder, nor a .gguf file")
        else:
            raise LlamafuseError(f"{path}: not found")
        self.vocab_size, self.dim = self.tensor("embed").shape

    # ------------------------------------------------------------ reading each layout

    def _open_meta(self, path: Path) -> None:
        p = _json(path / "params.json")
        if p.get("use_scaled_rope"):
            raise LlamafuseError(f"{path / 'params.json'}: use_scaled_rope is not supported by the reference")
        shards = [torch.load(f, map_location="cpu", mmap=True, weights_only=True)
                  for f in sorted(path.glob("consolidated.*.pth"))]
        if not shards:
            raise LlamafuseError(f"{path}: no consolidated.NN.pth shards")
        self.rotary, self.n_layers, self.n_heads = "interleaved", p["n_layers"], p["n_heads"]
        self.head_dim, self.eps = None, p.get("norm_eps", 1e-5)
        self.inv_freq = lambda hd: _rope(p.get("rope_theta", 10000.0), hd, None)

        def get(part: str, layer: int | None) -> torch.Tensor:
            (name, dim), _, _ = _NAMES[part]
            name = name if layer is None else f"layers.{layer}.{name}"
            if part == "output" and name not in shards[0]:
                return get("embed", None)
            parts = [sd[name] for sd in shards]
            return parts[0] if dim is None or len(parts) == 1 else torch.cat(parts, dim=dim)
        self._get = get

    def _open_hf(self, path: Path) -> None:
        from safetensors import safe_open
        c = _json(path / "config.json")
        if c.get("model_type", "llama") not in ("llama", "mistral"):
            raise LlamafuseError(f"{path / 'config.json'}: model_type {c.get('model_type')!r} is not supported by the reference")
        rope = {**(c.get("rope_scaling") or {}), **(c.get("rope_parameters") or {})}  # transformers 4, then 5
        theta = rope.get("rope_theta", c.get("rope_theta", 10000.0))
        self.rotary, self.n_layers, self.n_heads = "rotate-half", c["num_hidden_layers"], c["num_attention_heads"]
        self.head_dim, self.eps = c.get("head_dim"), c.get("rms_norm_eps", 1e-6)
        self.inv_freq = lambda hd: _rope(theta, hd, rope)
        tied = c.get("tie_word_embeddings", False)
        index = path / "model.safetensors.index.json"
        bin_index = path / "pytorch_model.bin.index.json"
        if index.is_file() or bin_index.is_file():
            where = {k: path / v for k, v in _json(index if index.is_file() else bin_index)["weight_map"].items()}
        else:
            single = path / "model.safetensors" if (path / "model.safetensors").is_file() else path / "pytorch_model.bin"
            where = {k: single for k in _keys(single)}
        opened: dict[Path, Any] = {}

        def load(f: Path) -> Any:
            if f not in opened:
                opened[f] = (safe_open(str(f), "pt") if f.suffix == ".safetensors"
                             else torch.load(f, map_location="cpu", mmap=True, weights_only=True))
            return opened[f]

        def get(part: str, layer: int | None) -> torch.Tensor:
            if part == "output" and tied:
                part = "embed"
            name = _NAMES[part][1] if layer is None else f"model.layers.{layer}.{_NAMES[part][1]}"
            f = load(where[name])
            return f.get_tensor(name) if hasattr(f, "get_tensor") else f[name]
        self._get = get

    def _open_gguf(self, path: Path) -> None:
        from gguf import GGUFReader
        from gguf.quants import dequantize
        r = GGUFReader(path)
        meta = {k: f.contents() for k, f in r.fields.items() if not k.startswith("tokenizer.")}
        if meta.get("general.architecture") != "llama":
            raise LlamafuseError(f"{path}: architecture {meta.get('general.architecture')!r} is not supported by the reference")
        tensors = {t.name: t for t in r.tensors}
        legacy = meta.get("llama.rope.scale_linear")  # older files' spelling of linear scaling
        scaling = meta.get("llama.rope.scaling.type", "none" if legacy is None else "linear")
        rope = {"rope_type": "default" if scaling == "none" else scaling,
                "factor": meta.get("llama.rope.scaling.factor", legacy)}
        factors = tensors.get("rope_freqs.weight")  # llama.cpp's per-frequency divisors (Llama 3.1+)
        self.rotary, self.n_layers = "interleaved", meta["llama.block_count"]
        self.n_heads, self.head_dim = meta["llama.attention.head_count"], meta.get("llama.attention.key_length")
        self.eps = meta["llama.attention.layer_norm_rms_epsilon"]
        theta = meta.get("llama.rope.freq_base", 10000.0)
        self.inv_freq = lambda hd: _rope(theta, hd, rope) / (1 if factors is None else torch.from_numpy(
            dequantize(factors.data, factors.tensor_type)).double())

        def get(part: str, layer: int | None) -> torch.Tensor:
            name = _NAMES[part][2] if layer is None else f"blk.{layer}.{_NAMES[part][2]}"
            if part == "output" and name not in tensors:
                return get("embed", None)
            t = tensors[name]
            return torch.tensor(dequantize(t.data, t.tensor_type))
        self._get = get

    # ------------------------------------------------------------ the forward pass

    def tensor(self, part: str, layer: int | None = None) -> torch.Tensor:
        """The full weight `part` (of `layer`) as the source stores it."""
        try:
            return self._get(part, layer)
        except KeyError as e:
            raise LlamafuseError(f"{self.path}: tensor {e} not found") from None
        except _READ_ERRORS as e:
            raise LlamafuseError(f"{self.path}: unreadable ({str(e).splitlines()[0][:160]})") from None

    def logits(self, sequences: list[list[int]], dtype: torch.dtype = torch.float64,
               last: list[int] | None = None) -> list[torch.Tensor]:
        """Logits [T, vocab] for each token sequence, run causally on its own; with `last`, only
        those of sequence j's last `last[j]` positions."""
        result: list[torch.Tensor] = [torch.empty(0)] * len(sequences)
        for j, lg in self.stream(sequences, dtype, last):
            result[j] = lg
        return result

    @torch.no_grad()
    def stream(self, sequences: list[list[int]], dtype: torch.dtype = torch.float64,
               last: list[int] | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        """(j, logits of sequence j) for every sequence, as `logits` computes them, one at a time
        once all layers have run (sequences of equal length run through the layers as a batch)."""
        emb = self.tensor("embed")
        if any(not 0 <= t < self.vocab_size for s in sequences for t in s):
            raise LlamafuseError(f"{self.path}: a token id is outside the vocabulary (0..{self.vocab_size - 1})")
        groups: dict[int, list[int]] = {}
        for j, s in enumerate(sequences):
            groups.setdefault(len(s), []).append(j)
        hs = {T: emb[torch.tensor([sequences[j] for j in js])].to(dtype) for T, js in groups.items()}
        hd = self.head_dim or self.dim // self.n_heads
        angles = torch.outer(torch.arange(max(groups), dtype=torch.float64), self.inv_freq(hd))
        for i in range(self.n_layers):
            w = {k: self.tensor(k, i).to(dtype) for k in LAYER}
            for T, h in hs.items():
                hs[T] = self._block(h, w, angles[:T].to(dtype), hd)
        norm, out = self.tensor("norm").to(dtype), self.tensor("output").to(dtype)
        for T, js in groups.items():
            for b, j in enumerate(js):
                n = T if last is None else last[j]
                yield j, _rms_norm(hs[T][b, T - n:], norm, self.eps) @ out.T

    def _block(self, h: torch.Tensor, w: dict[str, torch.Tensor], angles: torch.Tensor, hd: int) -> torch.Tensor:
        B, T, _ = h.shape
        x = _rms_norm(h, w["attn_norm"], self.eps)
        q = _rotate((x @ w["wq"].T).view(B, T, -1, hd), angles, self.rotary)
        k = _rotate((x @ w["wk"].T).view(B, T, -1, hd), angles, self.rotary)
        v = (x @ w["wv"].T).view(B, T, -1, hd)
        rep = q.shape[2] // k.shape[2]
        k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        p = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        h = h + torch.einsum("bhqk,bkhd->bqhd", p, v).reshape(B, T, -1) @ w["wo"].T
        x = _rms_norm(h, w["ffn_norm"], self.eps)
        return h + (torch.nn.functional.silu(x @ w["w1"].T) * (x @ w["w3"].T)) @ w["w2"].T


def reference_logits(path: Path, sequences: list[list[int]], dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
    """Logits [T, vocab] of the source checkpoint at `path` for each token sequence."""
    return Reference(path).logits(sequences, dtype)


def _keys(f: Path) -> list[str]:
    """The tensor names in a single-file Hugging Face checkpoint."""
    from safetensors import safe_open
    if not f.is_file():
        raise LlamafuseError(f"{f.parent}: no model.safetensors, pytorch_model.bin or index file")
    if f.suffix == ".safetensors":
        with safe_open(str(f), "pt") as st:
            return list(st.keys())
    return list(torch.load(f, map_location="cpu", mmap=True, weights_only=True))


def _json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise LlamafuseError(f"{path}: unreadable ({e})") from None


def _rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rope(theta: float, hd: int, rope: dict[str, Any] | None) -> torch.Tensor:
    """Rotary frequencies [hd/2] (float64) for base `theta` and Hugging Face-style `rope` parameters."""
    freqs = [theta ** (-2 * i / hd) for i in range(hd // 2)]
    kind = (rope or {}).get("rope_type", (rope or {}).get("type", "default"))
    if kind == "linear":
        freqs = [f / rope["factor"] for f in freqs]  # type: ignore[index]
    elif kind == "llama3":  # Meta's apply_scaling
        factor, lo, hi = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]  # type: ignore[index]
        old = rope["original_max_position_embeddings"]  # type: ignore[index]
        scaled: list[float] = []
        for f in freqs:
            wavelen = 2 * math.pi / f
            if wavelen < old / hi:
                scaled.append(f)
            elif wavelen > old / lo:
                scaled.append(f / factor)
            else:
                smooth = (old / wavelen - lo) / (hi - lo)
                scaled.append((1 - smooth) * f / factor + smooth * f)
        freqs = scaled
    elif kind != "default":
        raise LlamafuseError(f"rope type {kind!r} is not supported by the reference")
    return torch.tensor(freqs, dtype=torch.float64)


def _rotate(x: torch.Tensor, angles: torch.Tensor, convention: str) -> torch.Tensor:
    """x [B, T, heads, hd] rotated by position: pairs (2i, 2i+1) if interleaved, else (i, i+hd/2)."""
    cos, sin = angles.cos()[:, None, :], angles.sin()[:, None, :]
    hd = x.shape[-1]
    if convention == "interleaved":
        a, b = x[..., 0::2], x[..., 1::2]
        return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)
    a, b = x[..., : hd // 2], x[..., hd // 2:]
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)

