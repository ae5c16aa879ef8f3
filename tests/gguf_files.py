"""GGUF files for tests, written with the `gguf` package's own writer.

`write_llama_gguf` stores Meta-named (interleaved rotary) weights under llama.cpp's tensor names,
as llama.cpp's converter does for a Meta checkpoint, each 2-D weight in the quantization type the
test asks for. gguf-py quantizes F32/F16/BF16/Q8_0/Q4_0/Q4_1/Q5_0/Q5_1 itself; it only
dequantizes the K-quants, so for those the file holds random blocks with sane scales instead of
the given weights (`k_quant_blocks`), which is what tests of the dequantization path need.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np
import sentencepiece as spm
import torch
from gguf import GGMLQuantizationType as Q

QUANTIZABLE = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1)
# K-quant block layouts (ggml-common.h): bytes per 256-value block, offsets of its f16 super-block
# scales (d, and dmin where there is one), and a d that makes values of order 0.05
K_QUANTS = {Q.Q2_K: (84, (80, 82), 4e-3), Q.Q3_K: (110, (108,), 2e-3), Q.Q4_K: (144, (0, 2), 2e-4),
            Q.Q5_K: (176, (0, 2), 1e-4), Q.Q6_K: (210, (208,), 5e-5)}
META_TO_GGUF = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
                "output.weight": "output.weight"}
META_LAYER_TO_GGUF = {"attention.wq.weight": "attn_q", "attention.wk.weight": "attn_k",
                      "attention.wv.weight": "attn_v", "attention.wo.weight": "attn_output",
                      "feed_forward.w1.weight": "ffn_gate", "feed_forward.w2.weight": "ffn_down",
                      "feed_forward.w3.weight": "ffn_up", "attention_norm.weight": "attn_norm",
                      "ffn_norm.weight": "ffn_norm"}


def gguf_name(meta_name: str) -> str:
    if meta_name in META_TO_GGUF:
        return META_TO_GGUF[meta_name]
    _, i, rest = meta_name.split(".", 2)
    return f"blk.{i}.{META_LAYER_TO_GGUF[rest]}.weight"


def k_quant_blocks(rows: int, cols: int, qtype: Q, seed: int) -> np.ndarray:
    """Random K-quant data for a [rows, cols] tensor, its super-block scales set to give values of
    order 0.05."""
    size, scales, d = K_QUANTS[qtype]
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(rows * cols // 256, size), dtype=np.uint8)
    for off in scales:
        blocks[:, off:off + 2] = np.frombuffer(np.float16(d).tobytes(), np.uint8)
    return blocks.reshape(rows, cols // 256 * size)


def sentencepiece_vocab(model: Path) -> dict[str, Any]:
    """A SentencePiece model's vocabulary as llama.cpp's converter stores it (tokenizer.ggml.*)."""
    sp = spm.SentencePieceProcessor(model_file=str(model))
    n = sp.vocab_size()
    kinds = [gguf.TokenType.UNKNOWN if sp.is_unknown(i) else gguf.TokenType.CONTROL if sp.is_control(i)
             else gguf.TokenType.BYTE if sp.is_byte(i) else gguf.TokenType.UNUSED if sp.is_unused(i)
             else gguf.TokenType.NORMAL for i in range(n)]
    return {"model": "llama", "tokens": [sp.id_to_piece(i) for i in range(n)],
            "scores": [sp.get_score(i) for i in range(n)], "types": kinds,
            "bos": sp.bos_id(), "eos": sp.eos_id(), "unk": sp.unk_id()}


def write_llama_gguf(path: Path, sd: dict[str, torch.Tensor], *, n_heads: int, n_kv_heads: int, vocab: dict[str, Any],
                     qtype: Q = Q.F32, eps: float = 1e-5, theta: float = 10000.0, context: int = 2048,
                     arch: str = "llama", extra: dict[str, Any] | None = None,
                     extra_tensors: dict[str, np.ndarray] | None = None, seed: int = 0) -> Path:
    """A GGUF file of the Meta-named state dict `sd` (no output.weight: tied), norms in F32.

    `extra` maps further metadata keys to values (str, bool, int as uint32, float as float32, lists);
    `extra_tensors` are written as they are, in F32, under their own names."""
    w = gguf.GGUFWriter(str(path), arch)
    dim = sd["tok_embeddings.weight"].shape[1]
    n_layers = len({k.split(".")[1] for k in sd if k.startswith("layers.")})
    w.add_context_length(context)
    w.add_embedding_length(dim)
    w.add_block_count(n_layers)
    w.add_feed_forward_length(sd["layers.0.feed_forward.w1.weight"].shape[0])
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv_heads)
    w.add_rope_dimension_count(dim // n_heads)
    w.add_layer_norm_rms_eps(eps)
    w.add_rope_freq_base(theta)
    w.add_tokenizer_model(vocab["model"])
    if "pre" in vocab:
        w.add_tokenizer_pre(vocab["pre"])
    w.add_token_list(vocab["tokens"])
    if "scores" in vocab:
        w.add_token_scores(vocab["scores"])
    if "merges" in vocab:
        w.add_token_merges(vocab["merges"])
    w.add_token_types(vocab["types"])
    w.add_bos_token_id(vocab["bos"])
    w.add_eos_token_id(vocab["eos"])
    if vocab.get("unk") is not None:
        w.add_unk_token_id(vocab["unk"])
    for key, value in (extra or {}).items():
        _add(w, key, value)
    for k, (name, t) in enumerate(sd.items()):
        a = t.float().numpy()
        if a.ndim == 1 or qtype == Q.F32:
            w.add_tensor(gguf_name(name), a.astype(np.float32))
        elif qtype in K_QUANTS:
            w.add_tensor(gguf_name(name), k_quant_blocks(*a.shape, qtype, seed + k), raw_dtype=qtype)
        elif qtype in QUANTIZABLE:
            w.add_tensor(gguf_name(name), gguf.quants.quantize(a, qtype), raw_dtype=qtype)
        else:  # a type gguf-py cannot write: zero blocks of the right size
            w.add_tensor(gguf_name(name), np.zeros(gguf.quant_shape_to_byte_shape(a.shape, qtype), np.uint8),
                         raw_dtype=qtype)
    for name, a in (extra_tensors or {}).items():
        w.add_tensor(name, a.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _add(w: gguf.GGUFWriter, key: str, value: Any) -> None:
    if isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, int):
        w.add_uint32(key, value)
    elif isinstance(value, float):
        w.add_float32(key, value)
    elif isinstance(value, str):
        w.add_string(key, value)
    else:
        w.add_array(key, value)
