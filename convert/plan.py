"""Pure functions from full source tensors to one rank's fused tensors (no I/O)."""
from __future__ import annotations

import math
from typing import Callable

import torch

from llamafuse.formats import WEIGHT_DTYPES, ModelConfig, RankLayout
from llamafuse.formats import names

from .quantize import E4M3, quantize_rows


def interleaved_to_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder q/k rows from Meta's interleaved rotary pairs (2i, 2i+1) to rotate-half (i, i+d/2)."""
    rows, dim = w.shape
    hd = rows // n_heads
    return w.reshape(n_heads, hd // 2, 2, dim).transpose(1, 2).reshape(rows, dim)


def rope_frequencies(config: ModelConfig) -> torch.Tensor:
    """Rotary frequencies [head_dim/2] in float64, rescaled as `config.rope_scaling` says
    (transformers' `_compute_linear_scaling_rope_parameters` / `_compute_llama3_parameters`)."""
    hd = config.head_dim
    inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    s = config.rope_scaling
    if s is None:
        return inv_freq
    if s.type == "linear":
        return inv_freq / s.factor
    orig, low, high = s.original_max_position_embeddings, s.low_freq_factor, s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    long = torch.where(wavelen > orig / low, inv_freq / s.factor, inv_freq)      # long wavelengths scaled
    smooth = (orig / wavelen - low) / (high - low)
    blend = (1 - smooth) * inv_freq / s.factor + smooth * inv_freq
    medium = (wavelen >= orig / high) & (wavelen <= orig / low)
    return torch.where(medium, blend, long)


def rope_tables(config: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [max_seq_len, head_dim/2] float32, computed in float64."""
    angles = torch.outer(torch.arange(config.max_seq_len, dtype=torch.float64), rope_frequencies(config))
    return angles.cos().float(), angles.sin().float()


def _heads(w: torch.Tensor, heads: range, head_dim: int) -> torch.Tensor:
    return w[heads.start * head_dim: heads.stop * head_dim]


def layer_tensors(get: Callable[[str], torch.Tensor], i: int, lay: RankLayout, rotary: str,
                  dtype: str) -> dict[str, torch.Tensor]:
    """The fused tensors of layer `i` for one rank, in file order, in weight dtype `dtype`
    (formats.WEIGHT_DTYPES; float8 matrices come with their scales). `get(part)` returns the
    full source tensor."""
    c, hd = lay.config, lay.config.head_dim
    wq, wk = get("wq"), get("wk")
    if rotary == "interleaved":
        wq, wk = interleaved_to_half(wq, c.n_heads), interleaved_to_half(wk, c.n_kv_heads)
    q = _heads(wq, lay.heads, hd)
    k = _heads(wk, lay.kv_heads, hd)
    v = _heads(get("wv"), lay.kv_heads, hd)
    ffn = slice(lay.ffn.start, lay.ffn.stop)
    cols = slice(lay.heads.start * hd, lay.heads.stop * hd)
    out = {
        names.ATTN_NORM: get("attn_norm"),
        names.QKV: torch.cat([q, k, v]),
        names.O: get("wo")[:, cols],
        names.FFN_NORM: get("ffn_norm"),
        names.GATE_UP: torch.cat([get("w1")[ffn], get("w3")[ffn]]),
        names.DOWN: get("w2")[:, ffn],
    }
    matrix, other = WEIGHT_DTYPES[dtype]
    tensors = {}
    for part, t in out.items():
        name = names.layer(i, part)
        if part in names.MATRICES and matrix == E4M3:
            tensors[name], tensors[names.scale(name)] = quantize_rows(t)
        else:
            tensors[name] = t.to(matrix if part in names.MATRICES else other).contiguous()
    return tensors


def head_tensors(get: Callable[[str], torch.Tensor], dtype: str,
                 rope: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What every rank file starts with: the replicated embedding and the rotary tables."""
    other = WEIGHT_DTYPES[dtype][1]
    return {names.EMBED: get("embed").to(other).contiguous(), names.ROPE_COS: rope[0], names.ROPE_SIN: rope[1]}


def tail_tensors(get: Callable[[str], torch.Tensor], lay: RankLayout, dtype: str) -> dict[str, torch.Tensor]:
    """What every rank file ends with: the final norm and its rows of the vocab-parallel output head."""
    vocab, other = slice(lay.vocab.start, lay.vocab.stop), WEIGHT_DTYPES[dtype][1]
    return {names.NORM: get("norm").to(other).contiguous(),
            names.OUTPUT: get("output")[vocab].to(other, copy=True)}  # a copy: no rank pins the whole head
