"""The model configuration shared by the converter and the runtime."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from .errors import LlamafuseError

ROPE_SCALINGS = ("linear", "llama3")


@dataclass(frozen=True)
class RopeScaling:
    """How the rotary frequencies are rescaled for long contexts (Hugging Face's `rope_type`).

    linear: positions divided by `factor`. llama3 (Llama 3.1+): long wavelengths divided by
    `factor`, short ones kept, a smooth blend between (Meta's `apply_scaling`).
    """
    type: str
    factor: float
    low_freq_factor: float | None = None                 # llama3 only
    high_freq_factor: float | None = None                # llama3 only
    original_max_position_embeddings: int | None = None  # llama3 only

    def __post_init__(self) -> None:
        if self.type not in ROPE_SCALINGS:
            raise LlamafuseError(f"rope scaling type {self.type!r} is not supported ({', '.join(ROPE_SCALINGS)})")
        llama3 = ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        for name in ("factor", *llama3):
            v = getattr(self, name)
            if v is None and (name == "factor" or self.type == "llama3"):
                raise LlamafuseError(f"rope scaling {self.type}: missing '{name}'")
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0):
                raise LlamafuseError(f"rope scaling {self.type}: '{name}' must be a positive number, got {v!r}")
            if v is not None and self.type != "llama3" and name in llama3:
                raise LlamafuseError(f"rope scaling {self.type}: unexpected '{name}'")
        if self.type == "llama3" and self.high_freq_factor <= self.low_freq_factor:  # type: ignore[operator]
            raise LlamafuseError("rope scaling llama3: high_freq_factor must exceed low_freq_factor")


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
    rope_scaling: RopeScaling | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "rope_scaling":
                if v is not None and not isinstance(v, RopeScaling):
                    raise LlamafuseError(f"config field 'rope_scaling' must be a RopeScaling, got {v!r}")
            elif f.type in ("int", int):
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
        missing = sorted(n for n in names - d.keys() if n not in ("rope_theta", "max_seq_len", "rope_scaling"))
        if missing:
            raise LlamafuseError(f"{where}: missing field(s) {', '.join(missing)}")
        unknown = sorted(d.keys() - names)
        if unknown:
            raise LlamafuseError(f"{where}: unknown field(s) {', '.join(unknown)}")
        try:
            scaling = d.get("rope_scaling")
            if scaling is not None:
                if not isinstance(scaling, dict) or not scaling.keys() <= {f.name for f in fields(RopeScaling)}:
                    raise LlamafuseError(f"field 'rope_scaling' is malformed: {scaling!r}")
                scaling = RopeScaling(**scaling)
            return cls(**{**d, "rope_scaling": scaling})
        except (LlamafuseError, TypeError) as e:
            raise LlamafuseError(f"{where}: {e}") from None
