"""Attention over a packed prefix forest: two backends for one rule, and which one a device gets.

Query q sees key k iff k <= q < end[k] (packing.py). `prepare(batch)` builds what every layer of
one batch shares; calling the backend with q [N, H, hd], k/v [N, KV, hd] gives [N, H*hd].
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .packing import Batch


class BlockAttention:
    """SDPA per block of Q consecutive queries against the keys that block can see.

    In depth-first order the keys visible to queries a..a+Q-1 are the ancestors of token a
    (the k < a with end[k] > a) and the block itself, so each block becomes a small dense
    problem with an explicit boolean mask. Works on the CPU and on every CUDA capability
    (on sm70 the memory-efficient kernel takes the mask). Batches may have any length.
    """
    fixed_shape = False

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

    For sm80+ GPUs. Its kernels are compiled for one batch length, so every batch must be padded
    to the same length (`fixed_shape`). `block` is the mask's (query, key) tile: tiles with no
    visible pair are skipped. Each must be a multiple of the kernel's own tile, which torch picks
    by head width and dtype (up to 128, which always fits).
    """
    fixed_shape = True

    def __init__(self, block: tuple[int, int] = (128, 128)) -> None:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention
        self.block = block
        self._from_kv_blocks = BlockMask.from_kv_blocks
        self._flex = torch.compile(flex_attention, dynamic=False)

    def prepare(self, b: Batch) -> Any:
        """The forest's block mask, built from `end` with a few tensor ops (nothing to compile): a
        (query, key) tile is skipped when no pair in it is visible, runs without the mask function
        when every pair is, and with it otherwise. Key k is seen by queries k..end[k]-1."""
        end = b.end
        n, (Q, K) = end.numel(), self.block
        nq, nk = -(-n // Q), -(-n // K)
        key = torch.arange(nk * K, device=end.device).view(nk, K)                # [nk, K]
        seen_to = (F.pad(end, (0, nk * K - n)) - 1).view(nk, K)                  # padded keys: -1, unseen
        q0 = torch.arange(nq, device=end.device)[:, None, None] * Q              # [nq, 1, 1] first query
        some = ((key <= q0 + Q - 1) & (seen_to >= q0)).any(-1)                  # [nq, nk]
        every = ((key <= q0) & (seen_to >= q0 + Q - 1)).all(-1)                    # padded queries: unseen

        def ordered(tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            """[1, 1, nq] counts and [1, 1, nq, nk] indices of the marked tiles, ascending, first."""
            order = torch.argsort((~tiles).to(torch.int8), dim=-1, stable=True)
            return tiles.sum(-1, dtype=torch.int32)[None, None], order.to(torch.int32)[None, None]

        def visible(_b: Any, _h: Any, qi: torch.Tensor, ki: torch.Tensor) -> torch.Tensor:
            return (ki <= qi) & (qi < end[ki])
        return self._from_kv_blocks(*ordered(some & ~every), *ordered(every), BLOCK_SIZE=self.block,
                                    mask_mod=visible, seq_lengths=(n, n))

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: Any) -> torch.Tensor:
        N, H, hd = q.shape
        o = self._flex(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                       block_mask=state, enable_gqa=k.shape[1] != H)                # [1, H, N, hd]
        return o[0].transpose(0, 1).reshape(N, H * hd)


Attention = BlockAttention | FlexAttention
ATTENTION_CHOICES = ("auto", "blocks", "flex")


# How the block around BlockAttention is compiled on a GPU: compiling the work before and after the
# attention call made one 30B layer 34.23 -> 30.86 ms on an H200 forced onto this path
# (docs/bench/h200-run8-fp8.json; docs/performance.md, "The V100 path"). Not run on a V100.
BLOCKS_COMPILE_ON_CUDA: str | None = "around-attention"


def mask_tile(head_dim: int, dtype: torch.dtype) -> tuple[int, int]:
    """FlexAttention's mask tile. 128x64 skips more of the forest's sparse pattern (one LLaMA-30B
    layer 28.43 -> 28.20 ms on an H200, docs/performance.md); it fits the kernel that float16 with
    head_dim 128 gets. With head_dim 64 in float16 the kernel takes 128 keys at a time, which a
    64-key mask tile cannot feed (seen on the H200 with SmolLM2): every other case gets 128x128."""
    return (128, 64) if dtype == torch.float16 and head_dim >= 128 else (128, 128)


def attention_plan(device: torch.device, head_dim: int, requested: str = "auto") -> tuple[str, str | None]:
    """("flex" or "blocks", how to compile the block: a Model `compile` mode or None) for a device
    and the model's head width, decided without building anything.

    auto: FlexAttention and one compiled graph per block on sm80+ GPUs; SDPA with explicit
    masks on the CPU and on older GPUs such as the V100 (sm70), uncompiled on the CPU.
    FlexAttention needs head_dim >= 16, so tiny models take the mask path everywhere.
    """
    cuda = device.type == "cuda"
    modern = cuda and torch.cuda.get_device_capability(device) >= (8, 0)
    if requested == "auto":
        requested = "flex" if modern and head_dim >= 16 else "blocks"
    if requested == "flex":
        return "flex", "block" if modern else None
    return "blocks", BLOCKS_COMPILE_ON_CUDA if cuda else None


def choose_attention(device: torch.device, head_dim: int, requested: str = "auto",
                     dtype: torch.dtype = torch.float16) -> tuple[Attention, str | None]:
    """(backend, compile mode) as `attention_plan` decides them; `dtype` (the activations') sets
    FlexAttention's mask tile."""
    kind, compile = attention_plan(device, head_dim, requested)
    return (FlexAttention(mask_tile(head_dim, dtype)) if kind == "flex" else BlockAttention()), compile
