"""Tensor names inside a rank file. Defined here once; converter and runtime both use them."""

EMBED = "embed"          # [vocab, dim], replicated on every rank
NORM = "norm"            # [dim], final RMSNorm
OUTPUT = "output"        # [vocab / tp, dim], vocab-parallel rows of the output head
ROPE_COS = "rope.cos"    # [max_seq_len, head_dim / 2] float32, rotate-half convention
ROPE_SIN = "rope.sin"

ATTN_NORM = "attn_norm"  # [dim]
QKV = "qkv"              # [(q_local + 2 * kv_local) * head_dim, dim]: rows q | k | v
O = "o"                  # [dim, q_local * head_dim], row-parallel (input columns split)
FFN_NORM = "ffn_norm"    # [dim]
GATE_UP = "gate_up"      # [2 * ffn_local, dim]: rows gate (w1) | up (w3)
DOWN = "down"            # [dim, ffn_local], row-parallel

LAYER_PARTS = (ATTN_NORM, QKV, O, FFN_NORM, GATE_UP, DOWN)
MATRICES = (QKV, O, GATE_UP, DOWN)   # the products float8 models store in e4m3


def layer(i: int, part: str) -> str:
    return f"layers.{i}.{part}"


def scale(name: str) -> str:
    """[rows] float32: per-output-row dequantization scale of a float8 matrix (float8 models only)."""
    return f"{name}.scale"
