"""Synthetic LLaMA checkpoints on disk, in Meta's and Hugging Face's layouts.

Shared by the converter tests, the runtime tests and the benchmarks. Weights are random but
scaled so activations stay O(1) through the network: matrices ~ N(0, 1/sqrt(fan_in)),
norms ~ 1 + 0.1 N(0, 1), embeddings ~ N(0, 1).
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

# Meta checkpoint names -> the dim model-parallel shards are split on (None: replicated).
META_GLOBAL = {"tok_embeddings.weight": 1, "norm.weight": None, "output.weight": 0, "rope.freqs": None}
META_LAYER = {"attention.wq.weight": 0, "attention.wk.weight": 0, "attention.wv.weight": 0,
              "attention.wo.weight": 1, "feed_forward.w1.weight": 0, "feed_forward.w2.weight": 1,
              "feed_forward.w3.weight": 0, "attention_norm.weight": None, "ffn_norm.weight": None}
HF_LAYER = {"attention.wq.weight": "self_attn.q_proj.weight", "attention.wk.weight": "self_attn.k_proj.weight",
            "attention.wv.weight": "self_attn.v_proj.weight", "attention.wo.weight": "self_attn.o_proj.weight",
            "feed_forward.w1.weight": "mlp.gate_proj.weight", "feed_forward.w2.weight": "mlp.down_proj.weight",
            "feed_forward.w3.weight": "mlp.up_proj.weight", "attention_norm.weight": "input_layernorm.weight",
            "ffn_norm.weight": "post_attention_layernorm.weight"}


def ffn_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None = None) -> int:
    """Meta's SwiGLU hidden width (as in llama/model.py)."""
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * math.ceil(hidden / multiple_of)


def meta_shapes(dim: int, n_heads: int, n_kv_heads: int, vocab: int, ffn: int) -> dict[str, tuple[int, ...]]:
    hd = dim // n_heads
    return {"tok_embeddings.weight": (vocab, dim), "norm.weight": (dim,), "output.weight": (vocab, dim),
            "attention.wq.weight": (n_heads * hd, dim), "attention.wk.weight": (n_kv_heads * hd, dim),
            "attention.wv.weight": (n_kv_heads * hd, dim), "attention.wo.weight": (dim, n_heads * hd),
            "feed_forward.w1.weight": (ffn, dim), "feed_forward.w2.weight": (dim, ffn),
            "feed_forward.w3.weight": (ffn, dim), "attention_norm.weight": (dim,), "ffn_norm.weight": (dim,)}


def random_meta_state_dict(*, dim: int, n_layers: int, n_heads: int, n_kv_heads: int | None = None,
                           vocab: int, multiple_of: int, seed: int = 0,
                           dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A full (unsharded) Meta-named state dict of random weights."""
    n_kv_heads = n_kv_heads or n_heads
    shapes = meta_shapes(dim, n_heads, n_kv_heads, vocab, ffn_dim(dim, multiple_of))
    g = torch.Generator().manual_seed(seed)

    def make(name: str) -> torch.Tensor:
        shape = shapes[name.split(".", 2)[2] if name.startswith("layers.") else name]
        if len(shape) == 1:
            t = 1 + 0.1 * torch.randn(shape, generator=g)
        elif name == "tok_embeddings.weight":
            t = torch.randn(shape, generator=g)
        else:
            t = torch.randn(shape, generator=g) / math.sqrt(shape[1])
        return t.to(dtype)

    names = ["tok_embeddings.weight"]
    for i in range(n_layers):
        names += [f"layers.{i}.{k}" for k in META_LAYER]
    names += ["norm.weight", "output.weight"]
    return {n: make(n) for n in names}


def split_dim(name: str) -> int | None:
    """The dim Meta splits `name` on across model-parallel shards (None: replicated)."""
    if name.startswith("layers."):
        return META_LAYER[name.split(".", 2)[2]]
    return META_GLOBAL[name]


def save_meta_shards(folder: Path, sd: dict[str, torch.Tensor], shards: int) -> None:
    """Split a full state dict into consolidated.NN.pth files exactly as Meta does."""
    for s in range(shards):
        part = {}
        for name, t in sd.items():
            d = split_dim(name)
            part[name] = t.clone() if d is None else t.chunk(shards, dim=d)[s].clone()
        torch.save(part, folder / f"consolidated.{s:02d}.pth")
        del part


def write_meta_checkpoint(folder: Path, *, dim: int, n_layers: int, n_heads: int, n_kv_heads: int | None = None,
                          vocab: int, multiple_of: int, shards: int, tokenizer: Path | None = None, seed: int = 0,
                          vocab_size_in_params: int = -1, dtype: torch.dtype = torch.float32,
                          rope_freqs: bool = False) -> dict[str, torch.Tensor]:
    """A random Meta-layout checkpoint in `folder`; returns its full (unsharded) state dict
    (without the unused `rope.freqs` buffer that LLaMA-1 shards carry when rope_freqs is set)."""
    sd = random_meta_state_dict(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                                vocab=vocab, multiple_of=multiple_of, seed=seed, dtype=dtype)
    write_meta_from_state_dict(folder, sd, n_heads=n_heads, n_kv_heads=n_kv_heads, multiple_of=multiple_of,
                               shards=shards, tokenizer=tokenizer, vocab_size_in_params=vocab_size_in_params,
                               rope_freqs=rope_freqs)
    return sd


def write_meta_from_state_dict(folder: Path, sd: dict[str, torch.Tensor], *, n_heads: int,
                               n_kv_heads: int | None = None, multiple_of: int, shards: int,
                               tokenizer: Path | None = None, vocab_size_in_params: int = -1,
                               rope_freqs: bool = False) -> None:
    """consolidated.NN.pth shards + params.json (+ tokenizer.model) for a full Meta-named state dict.

    rope_freqs: also store LLaMA-1's `rope.freqs` buffer (inverse frequencies, replicated), which
    readers must ignore.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dim = sd["tok_embeddings.weight"].shape[1]
    if rope_freqs:
        hd = dim // n_heads
        sd = {**sd, "rope.freqs": 1.0 / 10000.0 ** (torch.arange(0, hd, 2).float() / hd)}
    save_meta_shards(folder, sd, shards)
    n_layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("layers."))
    params = {"dim": dim, "n_layers": n_layers, "n_heads": n_heads, "multiple_of": multiple_of,
              "norm_eps": 1e-6, "vocab_size": vocab_size_in_params}
    if n_kv_heads is not None:
        params["n_kv_heads"] = n_kv_heads
    (folder / "params.json").write_text(json.dumps(params))
    if tokenizer is not None:
        shutil.copyfile(tokenizer, folder / "tokenizer.model")


def load_meta_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """Merge a Meta checkpoint's shards back into one state dict."""
    files = sorted(Path(folder).glob("consolidated.*.pth"))
    parts = [torch.load(f, map_location="cpu", weights_only=True) for f in files]
    out = {}
    for name in parts[0]:
        d = split_dim(name)
        out[name] = parts[0][name] if d is None or len(parts) == 1 else torch.cat([p[name] for p in parts], dim=d)
    return out


def permute_rotate_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Hugging Face's convert_llama_weights_to_hf permutation of q/k rows (interleaved -> rotate-half)."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def write_hf_checkpoint(folder: Path, sd: dict[str, torch.Tensor], *, n_heads: int, n_kv_heads: int | None = None,
                        norm_eps: float = 1e-6, max_position_embeddings: int = 2048, fmt: str = "safetensors",
                        shards: int = 1, tie_word_embeddings: bool = False, tokenizer: Path | None = None) -> None:
    """A Hugging Face-layout checkpoint in `folder` from a full Meta-named state dict.

    fmt: "safetensors" or "bin"; shards > 1 writes model-0000k-of-0000n files plus an index.
    With tie_word_embeddings, no lm_head.weight is written (the embedding is the output head).
    """
    if fmt not in ("safetensors", "bin"):
        raise ValueError(f"fmt must be 'safetensors' or 'bin', not {fmt!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n_kv_heads = n_kv_heads or n_heads
    vocab, dim = sd["tok_embeddings.weight"].shape
    n_layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("layers."))
    hf: dict[str, torch.Tensor] = {"model.embed_tokens.weight": sd["tok_embeddings.weight"]}
    for i in range(n_layers):
        for meta, name in HF_LAYER.items():
            t = sd[f"layers.{i}.{meta}"]
            if meta == "attention.wq.weight":
                t = permute_rotate_half(t, n_heads)
            elif meta == "attention.wk.weight":
                t = permute_rotate_half(t, n_kv_heads)
            hf[f"model.layers.{i}.{name}"] = t
    hf["model.norm.weight"] = sd["norm.weight"]
    if not tie_word_embeddings:
        hf["lm_head.weight"] = sd["output.weight"]
    hf = {k: v.contiguous().clone() for k, v in hf.items()}
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": dim,
              "intermediate_size": sd["layers.0.feed_forward.w1.weight"].shape[0], "num_hidden_layers": n_layers,
              "num_attention_heads": n_heads, "num_key_value_heads": n_kv_heads, "vocab_size": vocab,
              "max_position_embeddings": max_position_embeddings, "rms_norm_eps": norm_eps,
              "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": tie_word_embeddings,
              "torch_dtype": str(sd["norm.weight"].dtype).removeprefix("torch.")}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    ext, base = ("safetensors", "model") if fmt == "safetensors" else ("bin", "pytorch_model")

    def save(tensors: dict[str, torch.Tensor], path: Path) -> None:
        if fmt == "safetensors":
            save_file(tensors, str(path), metadata={"format": "pt"})
        else:
            torch.save(tensors, path)

    if shards == 1:
        save(hf, folder / f"{base}.{ext}")
    else:
        names = list(hf)
        per = -(-len(names) // shards)
        weight_map = {}
        for s in range(shards):
            fname = f"{base}-{s + 1:05d}-of-{shards:05d}.{ext}"
            chunk = {n: hf[n] for n in names[s * per:(s + 1) * per]}
            save(chunk, folder / fname)
            weight_map.update({n: fname for n in chunk})
        total = sum(t.numel() * t.element_size() for t in hf.values())
        (folder / f"{base}.{ext}.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    if tokenizer is not None:
        shutil.copyfile(tokenizer, folder / "tokenizer.model")


def llama30b_like(folder: Path, tokenizer: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """LLaMA-30B's head layout in miniature: 52 heads of width 4 (dim 208), 2 layers, the real
    32000-piece LLaMA vocabulary, 4 Meta model-parallel shards carrying LLaMA-1's `rope.freqs`
    buffer, and params.json vocab_size -1."""
    return write_meta_checkpoint(folder, dim=208, n_layers=2, n_heads=52, vocab=32000, multiple_of=32,
                                 shards=4, tokenizer=tokenizer, seed=seed, vocab_size_in_params=-1,
                                 rope_freqs=True)
