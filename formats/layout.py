"""How a model is split over `tp` ranks, and the exact tensors each rank file holds."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import names
from .config import ModelConfig
from .errors import LlamafuseError


def check_tp(config: ModelConfig, tp: int) -> None:
    """Raise unless the model splits evenly over `tp` ranks."""
    if tp < 1:
        raise LlamafuseError(f"--tp must be >= 1, got {tp}")
    if config.n_heads % tp:
        raise LlamafuseError(f"--tp {tp} does not divide the {config.n_heads} attention heads")
    if config.n_kv_heads % tp and tp % config.n_kv_heads:
        raise LlamafuseError(
            f"--tp {tp} neither divides nor is a multiple of the {config.n_kv_heads} key/value heads")
    if config.ffn_dim % tp:
        raise LlamafuseError(f"--tp {tp} does not divide the feed-forward width {config.ffn_dim}")
    if config.vocab_size % tp:
        raise LlamafuseError(f"--tp {tp} does not divide the vocabulary size {config.vocab_size}")


@dataclass(frozen=True)
class RankLayout:
    """Which heads, ffn columns and vocab rows rank `rank` of `tp` owns.

    Query heads, ffn columns and output-head rows are split in contiguous blocks. Key/value
    heads are split the same way when tp divides them; when there are fewer kv heads than
    ranks, each rank holds a copy of the one kv head its query heads use.
    """
    config: ModelConfig
    tp: int
    rank: int

    def __post_init__(self) -> None:
        check_tp(self.config, self.tp)
        if not 0 <= self.rank < self.tp:
            raise LlamafuseError(f"rank {self.rank} out of range for tp {self.tp}")

    @property
    def n_heads(self) -> int:
        return self.config.n_heads // self.tp

    @property
    def n_kv_heads(self) -> int:
        return max(1, self.config.n_kv_heads // self.tp)

    @property
    def heads(self) -> range:
        return range(self.rank * self.n_heads, (self.rank + 1) * self.n_heads)

    @property
    def kv_heads(self) -> range:
        first = self.heads.start // (self.config.n_heads // self.config.n_kv_heads)
        return range(first, first + self.n_kv_heads)

    @property
    def ffn(self) -> range:
        n = self.config.ffn_dim // self.tp
        return range(self.rank * n, (self.rank + 1) * n)

    @property
    def vocab(self) -> range:
        n = self.config.vocab_size // self.tp
        return range(self.rank * n, (self.rank + 1) * n)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype


# Weight dtypes a converted model may have: (dtype of the four big matrices per layer, of the rest).
# float8: e4m3 matrices with a float32 scale per output row; embedding, norms and head in float16.
WEIGHT_DTYPES: dict[str, tuple[torch.dtype, torch.dtype]] = {
    "float16": (torch.float16, torch.float16), "bfloat16": (torch.bfloat16, torch.bfloat16),
    "float32": (torch.float32, torch.float32), "float8": (torch.float8_e4m3fn, torch.float16),
}


def rank_tensor_specs(config: ModelConfig, tp: int, dtype: str) -> list[TensorSpec]:
    """Every tensor of one rank file, in file order. All ranks hold the same names and shapes;
    rotary tables and float8 scales are float32."""
    matrix, other = WEIGHT_DTYPES[dtype]
    lay = RankLayout(config, tp, 0)
    d, hd, f32 = config.dim, config.head_dim, torch.float32
    specs = [TensorSpec(names.EMBED, (config.vocab_size, d), other),
             TensorSpec(names.ROPE_COS, (config.max_seq_len, hd // 2), f32),
             TensorSpec(names.ROPE_SIN, (config.max_seq_len, hd // 2), f32)]
    per_layer = {
        names.ATTN_NORM: (d,),
        names.QKV: ((lay.n_heads + 2 * lay.n_kv_heads) * hd, d),
        names.O: (d, lay.n_heads * hd),
        names.FFN_NORM: (d,),
        names.GATE_UP: (2 * len(lay.ffn), d),
        names.DOWN: (d, len(lay.ffn)),
    }
    for i in range(config.n_layers):
        for part in names.LAYER_PARTS:
            name, shape = names.layer(i, part), per_layer[part]
            if part in names.MATRICES:
                specs.append(TensorSpec(name, shape, matrix))
                if matrix.itemsize == 1:
                    specs.append(TensorSpec(names.scale(name), shape[:1], f32))
            else:
                specs.append(TensorSpec(name, shape, other))
    specs += [TensorSpec(names.NORM, (d,), other), TensorSpec(names.OUTPUT, (len(lay.vocab), d), other)]
    return specs
