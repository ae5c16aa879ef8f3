"""The model configuration shared by the converter and the runtime."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from .errors import LlamafuseError


@dataclass(frozen=True)
class ModelConfig:
    dim: int            # model width (6656 for LLaMA-30B)
    n_layers: int       # transformer blocks (60)
    n_heads: int        # query heads (52)
    n_kv_heads: int     # key/value heads (52; fewer with grouped-query attention)
    head_dim: int       # per-head width (128)
    ffn_dim: int        # SwiGLU hidden width (17920)
    vocab_size: int     # embedding rows (32000)
    norm_eps: float     # RMSNorm epsilon (1e-6)
    rope_theta: float = 10000.0
    max_seq_len: int = 2048  # rotary tables cover positions [0, max_seq_len)

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if f.type in ("int", int):
                if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                    raise LlamafuseError(f"config field '{f.name}' must be a positive integer, got {v!r}")
            elif not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
                raise LlamafuseError(f"config field '{f.name}' must be a positive number, got {v!r}")
        if self.head_dim % 2:
            raise LlamafuseError(f"config: head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.n_heads % self.n_kv_heads:
            raise LlamafuseError(
                f"config: n_heads ({self.n_heads}) is not a multiple of n_kv_heads ({self.n_kv_heads})")

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    def n_params(self) -> int:
        """Weights of the model proper (embedding and output counted once each)."""
        attn = self.dim * (self.q_dim + 2 * self.kv_dim) + self.q_dim * self.dim
        ffn = 3 * self.dim * self.ffn_dim
        return self.n_layers * (attn + ffn + 2 * self.dim) + 2 * self.vocab_size * self.dim + self.dim

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any, where: str = "config") -> "ModelConfig":
        if not isinstance(d, dict):
            raise LlamafuseError(f"{where}: expected an object, got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        missing = sorted(n for n in names - d.keys() if n not in ("rope_theta", "max_seq_len"))
        if missing:
            raise LlamafuseError(f"{where}: missing field(s) {', '.join(missing)}")
        unknown = sorted(d.keys() - names)
        if unknown:
            raise LlamafuseError(f"{where}: unknown field(s) {', '.join(unknown)}")
        try:
            return cls(**d)
        except LlamafuseError as e:
            raise LlamafuseError(f"{where}: {e}") from None
