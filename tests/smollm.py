"""A Hugging Face-layout copy of a llama-architecture GGUF, written without llamafuse.

Weights are dequantized with gguf-py and stored as float32 safetensors; q/k rows get llama.cpp's
converter permutation undone (it maps Hugging Face's rotate-half rows to Meta's interleaved order,
`LlamaModel.permute` in convert_hf_to_gguf.py); config.json is written by transformers' own
LlamaConfig (transformers 5: the rotary base only under `rope_parameters`), tokenizer.json and
tokenizer_config.json by transformers' own GGUF tokenizer conversion.

    python tests/smollm.py MODEL.gguf OUT_DIR     # e.g. to run lm-evaluation-harness on the copy
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from gguf import GGUFReader
from gguf.quants import dequantize
from safetensors.torch import save_file

HF_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
            "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
            "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}


def unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's `permute`: w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2)."""
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def write_hf_copy(gguf_path: Path, out: Path) -> Path:
    from transformers import AutoTokenizer, LlamaConfig

    r = GGUFReader(gguf_path)
    meta = {k: f.contents() for k, f in r.fields.items() if not k.startswith("tokenizer.ggml.")
            or k.endswith("_token_id")}
    n_heads, n_kv = meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]
    sd: dict[str, torch.Tensor] = {}
    for t in r.tensors:
        w = np.array(dequantize(t.data, t.tensor_type), dtype=np.float32)
        if t.name == "token_embd.weight":
            name = "model.embed_tokens.weight"
        elif t.name == "output_norm.weight":
            name = "model.norm.weight"
        elif t.name == "output.weight":
            name = "lm_head.weight"
        else:
            _, i, part, _ = t.name.split(".")
            name = f"model.layers.{i}.{HF_NAMES[part]}.weight"
            if part in ("attn_q", "attn_k"):
                w = unpermute(w, n_heads if part == "attn_q" else n_kv)
        sd[name] = torch.from_numpy(w)
    out.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    tied = "lm_head.weight" not in sd
    LlamaConfig(
        vocab_size=sd["model.embed_tokens.weight"].shape[0], hidden_size=meta["llama.embedding_length"],
        intermediate_size=meta["llama.feed_forward_length"], num_hidden_layers=meta["llama.block_count"],
        num_attention_heads=n_heads, num_key_value_heads=n_kv,
        max_position_embeddings=meta["llama.context_length"],
        rms_norm_eps=float(str(np.float32(meta["llama.attention.layer_norm_rms_epsilon"]))),  # 1e-05 as written
        rope_parameters={"rope_type": "default", "rope_theta": meta["llama.rope.freq_base"]},
        tie_word_embeddings=tied, bos_token_id=meta["tokenizer.ggml.bos_token_id"],
        eos_token_id=meta["tokenizer.ggml.eos_token_id"], dtype="float32",
        architectures=["LlamaForCausalLM"]).save_pretrained(out)
    AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name).save_pretrained(out)
    return out


if __name__ == "__main__":
    write_hf_copy(Path(sys.argv[1]), Path(sys.argv[2]))
