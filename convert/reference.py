"""A plain, unfused forward pass over a *source* checkpoint, for validation.

It follows the original LLaMA code (interleaved or rotate-half rotary as the source stores it),
runs on the CPU in float64 by default and streams one layer's weights at a time, so it works on
a 30B source within a workstation's memory.
"""
from __future__ import annotations

import torch

from .sources import LAYER_WEIGHTS, Source


def _rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rotary(x: torch.Tensor, theta: float, convention: str) -> torch.Tensor:
    """x [T, heads, hd] rotated by position in the source's own convention."""
    T, _, hd = x.shape
    inv = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = torch.outer(torch.arange(T, dtype=torch.float64), inv).to(x.dtype)[:, None, :]
    cos, sin = ang.cos(), ang.sin()
    if convention == "interleaved":
        a, b = x[..., 0::2], x[..., 1::2]
        return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)
    a, b = x[..., : hd // 2], x[..., hd // 2:]
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)


@torch.no_grad()
def reference_logits(src: Source, sequences: list[list[int]], dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
    """Logits [T, vocab] (in `dtype`) for each token sequence, each run causally on its own."""
    c = src.config
    emb = src.tensor("embed")
    hs = [emb[torch.tensor(s, dtype=torch.long)].to(dtype) for s in sequences]
    for i in range(c.n_layers):
        w = {k: src.tensor(f"layers.{i}.{k}").to(dtype) for k in LAYER_WEIGHTS}
        for j, h in enumerate(hs):
            T = h.shape[0]
            x = _rms_norm(h, w["attn_norm"], c.norm_eps)
            q = _rotary((x @ w["wq"].T).view(T, c.n_heads, c.head_dim), c.rope_theta, src.rotary)
            k = _rotary((x @ w["wk"].T).view(T, c.n_kv_heads, c.head_dim), c.rope_theta, src.rotary)
            v = (x @ w["wv"].T).view(T, c.n_kv_heads, c.head_dim)
            rep = c.n_heads // c.n_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            scores = torch.einsum("qhd,khd->hqk", q, k) / c.head_dim ** 0.5
            causal = torch.ones(T, T, dtype=torch.bool).tril()
            p = scores.masked_fill(~causal, float("-inf")).softmax(-1)
            h = h + torch.einsum("hqk,khd->qhd", p, v).reshape(T, -1) @ w["wo"].T
            x = _rms_norm(h, w["ffn_norm"], c.norm_eps)
            hs[j] = h + (torch.nn.functional.silu(x @ w["w1"].T) * (x @ w["w3"].T)) @ w["w2"].T
    norm, out = src.tensor("norm").to(dtype), src.tensor("output").to(dtype)
    return [_rms_norm(h, norm, c.norm_eps) @ out.T for h in hs]
