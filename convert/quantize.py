"""Float8 (e4m3) weights with one float32 scale per output row."""
from __future__ import annotations

import torch

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max  # 448


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q [rows, cols] e4m3, scale [rows] float32) with w ~= q * scale[:, None].

    Each row is scaled so its largest magnitude maps to e4m3's largest value; an all-zero row
    gets scale 1. Computed in float32.
    """
    w = w.float()
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    return (w / scale[:, None]).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale
