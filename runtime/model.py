"""The fused LLaMA forward over packed token batches, one tensor-parallel rank of it.

A batch (`packing.Batch`) is one row of N tokens holding a prefix forest in depth-first order:
token k is visible to queries k..end[k]-1, its own subtree, so every token attends to exactly
the tokens of its own sequence so far, and shared prefixes are computed once.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from llamafuse.formats import ModelConfig, RankLayout
from llamafuse.formats import names

from .packing import Batch


class BlockAttention:
    """SDPA per block of Q consecutive queries against the keys that block can see.

    In depth-first order the keys visible to queries a..a+Q-1 are the ancestors of token a
    (the k < a with end[k] > a) and the block itself, so each block becomes a small dense
    problem with an explicit boolean mask. Works on the CPU and on every CUDA capability
    (on sm70 the memory-efficient kernel takes the mask).
    """

    def __init__(self, block: int = 128):
        self.block = block

    def prepare(self, b: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(key index [C, D+Q] into the row, mask [C, 1, Q, D+Q]) for C query blocks."""
        end, Q = b.end, self.block
        N = end.numel()
        C = -(-N // Q)
        ar = torch.arange(N, device=end.device)
        first = torch.arange(C, device=end.device) * Q                            # [C]
        ancestor = (ar[None, :] < first[:, None]) & (end[None, :] > first[:, None])  # [C, N]
        D = -(-int(ancestor.sum(1).max()) // 16) * 16                             # keys padded to 16s
        anc = torch.where(ancestor, ar, N).sort(dim=1).values[:, :D]              # N marks padding
        if anc.shape[1] < D:
            anc = F.pad(anc, (0, D - anc.shape[1]), value=N)
        own = first[:, None] + torch.arange(Q, device=end.device)                 # [C, Q]
        keys = torch.cat([anc, own], 1)                                           # [C, D+Q]
        valid = keys < N
        keys = keys.clamp(max=N - 1)
        q = own.clamp(max=N - 1)                                                  # padded queries repeat N-1
        mask = valid[:, None, :] & (keys[:, None, :] <= q[:, :, None]) & (q[:, :, None] < end[keys][:, None, :])
        return keys, mask[:, None]

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: Any) -> torch.Tensor:
        """q [N, H, hd], k/v [N, KV, hd] -> [N, H*hd]."""
        keys, mask = state
        N, H, hd = q.shape
        C, Q = mask.shape[0], mask.shape[2]
        qp = F.pad(q, (0, 0, 0, 0, 0, C * Q - N)).view(C, Q, H, hd).transpose(1, 2)  # [C, H, Q, hd]
        kp, vp = k[keys].transpose(1, 2), v[keys].transpose(1, 2)                    # [C, KV, D+Q, hd]
        if kp.shape[1] != H:
            kp, vp = kp.repeat_interleave(H // kp.shape[1], 1), vp.repeat_interleave(H // vp.shape[1], 1)
        o = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask)                # [C, H, Q, hd]
        return o.transpose(1, 2).reshape(C * Q, H * hd)[:N]


class FlexAttention:
    """FlexAttention over the packed row with a block-sparse mask (no padding, no copies).

    For sm80+ GPUs; the kernel is compiled once per batch shape, so pad batches to one length.
    `block` is the mask's (query, key) tile: blocks with no visible pair are skipped.
    """

    def __init__(self, block: tuple[int, int] = (128, 64)) -> None:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        self._create, self.block = create_block_mask, block
        self._flex = torch.compile(flex_attention, dynamic=False)

    def prepare(self, b: Batch) -> Any:
        end = b.end

        def visible(_b: Any, _h: Any, qi: torch.Tensor, ki: torch.Tensor) -> torch.Tensor:
            return (ki <= qi) & (qi < end[ki])
        n = end.numel()
        return self._create(visible, None, None, n, n, device=end.device, BLOCK_SIZE=self.block, _compile=True)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: Any) -> torch.Tensor:
        N, H, hd = q.shape
        o = self._flex(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                       block_mask=state, enable_gqa=k.shape[1] != H)                # [1, H, N, hd]
        return o[0].transpose(0, 1).reshape(N, H * hd)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * w


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary: x [N, heads, hd], cos/sin [N, 1, hd/2] float32."""
    a, b = x.float().chunk(2, dim=-1)
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1).type_as(x)


class Model:
    """One rank's share of the model; `group` is its tensor-parallel process group (or None)."""

    def __init__(self, config: ModelConfig, lay: RankLayout, tensors: dict[str, torch.Tensor],
                 group: dist.ProcessGroup | None = None, attention: BlockAttention | FlexAttention | None = None,
                 compile: bool = False):
        self.c, self.lay, self.w, self.group = config, lay, tensors, group
        self.attention = attention or BlockAttention()
        if compile:  # fuses norms, rotary, SiLU and residual adds; one graph for all layers
            self._block = torch.compile(self._block, dynamic=False)
        self.q_size = lay.n_heads * config.head_dim
        self.kv_size = lay.n_kv_heads * config.head_dim

    def _all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.lay.tp > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def layer(self, i: int, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn: Any) -> torch.Tensor:
        return self._block(h, cos, sin, attn, *(self.w[names.layer(i, p)] for p in names.LAYER_PARTS))

    def _block(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn: Any, attn_norm: torch.Tensor,
               qkv: torch.Tensor, o: torch.Tensor, ffn_norm: torch.Tensor, gate_up: torch.Tensor,
               down: torch.Tensor) -> torch.Tensor:
        """One transformer block; weights are arguments so a compiled block serves every layer."""
        eps, hd = self.c.norm_eps, self.c.head_dim
        x = rms_norm(h, attn_norm, eps)
        q, k, v = (x @ qkv.T).split([self.q_size, self.kv_size, self.kv_size], -1)
        q = rotate(q.view(-1, self.lay.n_heads, hd), cos, sin)                  # [N, H, hd]
        k = rotate(k.view(-1, self.lay.n_kv_heads, hd), cos, sin)               # [N, KV, hd]
        a = self.attention(q, k, v.view(-1, self.lay.n_kv_heads, hd), attn)     # [N, H*hd]
        h = h + self._all_reduce(a @ o.T)
        x = rms_norm(h, ffn_norm, eps)
        gate, up = (x @ gate_up.T).chunk(2, dim=-1)                             # [N, ffn/tp] each
        return h + self._all_reduce((F.silu(gate) * up) @ down.T)

    @torch.inference_mode()
    def logits(self, b: Batch) -> torch.Tensor:
        """Float32 logits [M, vocab/tp] of this rank's vocab slice at the selected tokens."""
        h = self.w[names.EMBED][b.tokens]                                       # [N, dim]
        cos = self.w[names.ROPE_COS][b.positions][:, None]                      # [N, 1, hd/2]
        sin = self.w[names.ROPE_SIN][b.positions][:, None]
        attn = self.attention.prepare(b)                                        # shared by all layers
        for i in range(self.c.n_layers):
            h = self.layer(i, h, cos, sin, attn)
        h = rms_norm(h[b.select], self.w[names.NORM], self.c.norm_eps)
        return (h @ self.w[names.OUTPUT].T).float()

    def full_logits(self, b: Batch) -> torch.Tensor:
        """Float32 logits [M, vocab], gathered over the tensor-parallel ranks."""
        local = self.logits(b)
        if self.lay.tp == 1:
            return local
        parts = [torch.empty_like(local) for _ in range(self.lay.tp)]
        dist.all_gather(parts, local, group=self.group)
        return torch.cat(parts, dim=-1)

    def target_logprobs(self, b: Batch, rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """log p(targets[t] | selected token rows[t]), [T] float32, by a vocab-parallel log-softmax.

        Several targets may share a row (sequences that share a prefix predict different tokens)."""
        local = self.logits(b)                                                  # [M, V/tp]
        mx = local.max(-1).values
        if self.lay.tp > 1:
            dist.all_reduce(mx, op=dist.ReduceOp.MAX, group=self.group)
        sumexp = (local - mx[:, None]).exp().sum(-1)
        lo, width = self.lay.vocab.start, local.shape[-1]
        inside = (targets >= lo) & (targets < lo + width)
        tgt = torch.where(inside, local[rows, (targets - lo).clamp(0, width - 1)], 0.0)
        if self.lay.tp > 1:
            both = torch.cat([sumexp, tgt])
            dist.all_reduce(both, group=self.group)
            sumexp, tgt = both.split([sumexp.numel(), tgt.numel()])
        return tgt - (mx + sumexp.log())[rows]
