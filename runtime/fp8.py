"""Float8 matrix products: e4m3 weights with per-row scales times activations quantized per token.

Only the four big products of each layer run in float8; attention, norms, softmax and the output
head stay in float16/float32. Inside the compiled block, quantizing an activation fuses into the
kernel that produced it (the norm, SiLU-times-up, the attention output's copy).
"""
from __future__ import annotations

import torch

from llamafuse.formats import LlamafuseError

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max
FAST_ACCUM = True  # measured on HellaSwag: see docs/performance.md


def fp8_linear(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """x [N, in] @ w.T for w [out, in] e4m3 with w_scale [out] float32; x is quantized to e4m3
    with one float32 scale per token. Returns x's dtype."""
    xf = x.float()
    scale = (xf.abs().amax(-1, keepdim=True) / E4M3_MAX).clamp(min=1e-12)       # [N, 1]
    xq = (xf / scale).to(E4M3)
    # Row-wise scaled products give bfloat16 (the kernels' supported output); the cast to x's
    # dtype fuses into whatever consumes the result.
    y = torch._scaled_mm(xq, w.T, scale_a=scale, scale_b=w_scale[None], out_dtype=torch.bfloat16,
                         use_fast_accum=FAST_ACCUM)
    return y.to(x.dtype)


def check_fp8_device(device: torch.device, shapes: list[tuple[int, ...]]) -> None:
    """Float8 products need FP8 matrix units (sm89+: Ada, Hopper and newer) on a GPU; the CPU runs
    them too (slowly), which the tests use. GPU kernels need both dims of every matrix to be
    multiples of 16."""
    if device.type != "cuda":
        return
    cap = torch.cuda.get_device_capability(device)
    if cap < (8, 9):
        raise LlamafuseError(f"float8 weights need a GPU with FP8 matrix units (compute capability 8.9 or newer); "
                             f"{torch.cuda.get_device_name(device)} is {cap[0]}.{cap[1]}: convert with --dtype float16")
    bad = next((s for s in shapes if s[0] % 16 or s[1] % 16), None)
    if bad is not None:
        raise LlamafuseError(f"float8 on a GPU needs matrix dimensions that are multiples of 16; this model has {bad}")
