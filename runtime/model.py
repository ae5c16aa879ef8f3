"""The fused LLaMA forward over packed token batches, one tensor-parallel rank of it.

A batch packs many sequences into one row of N tokens with no padding. Each token carries
`item` (which sequence-group it belongs to) and `branch` (0 for a shared prefix, j > 0 for the
j-th continuation). Token a attends to token b iff they share an item, b comes no later than a,
and b is in the prefix or in a's own branch. A plain causal sequence is one item of branch 0;
a HellaSwag item is its context (branch 0) followed by its four endings (branches 1..4).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from llamafuse.formats import ModelConfig, RankLayout
from llamafuse.formats import names


@dataclass
class Batch:
    tokens: torch.Tensor     # [N] int64
    positions: torch.Tensor  # [N] int64, rotary position of each token
    item: torch.Tensor       # [N] int64, which sequence-group
    branch: torch.Tensor     # [N] int64, 0 = shared prefix, j = continuation j
    select: torch.Tensor     # [M] int64, tokens whose next-token logits are needed
    starts: torch.Tensor     # [G + 1] int64, where each group starts in the packed row, then N

    def to(self, device: torch.device) -> "Batch":
        return Batch(*(getattr(self, f).to(device, non_blocking=True) for f in self.__dataclass_fields__))


def make_batch(groups: list[tuple[list[int], list[list[int]]]], select: list[int], pad_to: int | None = None) -> Batch:
    """Pack (prefix, [continuations]) groups; `select` indexes the packed tokens to score.

    With `pad_to`, filler tokens (a causal group of their own) make the row exactly that long,
    so every batch has one shape.
    """
    toks, pos, item, branch, starts = [], [], [], [], []
    for g, (prefix, conts) in enumerate(groups):
        starts.append(len(toks))
        toks += prefix
        pos += range(len(prefix))
        item += [g] * len(prefix)
        branch += [0] * len(prefix)
        for j, cont in enumerate(conts, 1):
            toks += cont
            pos += range(len(prefix), len(prefix) + len(cont))
            item += [g] * len(cont)
            branch += [j] * len(cont)
    if pad_to is not None and pad_to > len(toks):
        n = pad_to - len(toks)
        starts.append(len(toks))
        toks += [0] * n
        pos += [0] * n
        item += [len(groups)] * n
        branch += [0] * n
    starts.append(len(toks))
    return Batch(*(torch.tensor(x, dtype=torch.long) for x in (toks, pos, item, branch, select, starts)))


class BlockAttention:
    """SDPA over each group padded to the batch's longest, with an explicit boolean mask.

    Works on the CPU and on every CUDA capability (on sm70 the memory-efficient kernel takes
    the mask); the masked N x N problem becomes B small S x S ones.
    """

    def prepare(self, b: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(pad_index [B*S], unpad_index [N], mask [B, 1, S, S]) for this batch."""
        starts = b.starts
        lens = starts[1:] - starts[:-1]
        B, S = lens.numel(), int(lens.max())
        ar = torch.arange(S, device=starts.device)
        valid = ar[None, :] < lens[:, None]                                       # [B, S]
        pad_index = torch.where(valid, starts[:-1, None] + ar[None, :], 0)
        unpad_index = torch.arange(B * S, device=starts.device).view(B, S)[valid]
        br = torch.where(valid, b.branch[pad_index], -1)                          # [B, S]
        causal = torch.ones(S, S, dtype=torch.bool, device=starts.device).tril()
        mask = causal & ((br[:, None, :] == 0) | (br[:, None, :] == br[:, :, None])) & valid[:, None, :]
        mask |= torch.eye(S, dtype=torch.bool, device=starts.device) & ~valid[:, :, None]  # padding sees itself
        return pad_index.view(-1), unpad_index, mask[:, None]

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: Any) -> torch.Tensor:
        """q [N, H, hd], k/v [N, KV, hd] -> [N, H*hd]."""
        pad_index, unpad_index, mask = state
        N, H, hd = q.shape
        B, S = mask.shape[0], mask.shape[-1]

        def pad(x: torch.Tensor) -> torch.Tensor:                                 # -> [B, heads, S, hd]
            return x[pad_index].view(B, S, x.shape[1], hd).transpose(1, 2)
        qp, kp, vp = pad(q), pad(k), pad(v)
        if kp.shape[1] != H:
            kp, vp = kp.repeat_interleave(H // kp.shape[1], 1), vp.repeat_interleave(H // vp.shape[1], 1)
        o = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask)           # [B, H, S, hd]
        return o.transpose(1, 2).reshape(B * S, H * hd)[unpad_index]


class FlexAttention:
    """FlexAttention over the packed row with a block-sparse mask (no padding, no copies).

    For sm80+ GPUs; the kernel is compiled once per batch shape, so pad batches to one length.
    """

    def __init__(self) -> None:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        self._create = create_block_mask
        self._flex = torch.compile(flex_attention, dynamic=False)

    def prepare(self, b: Batch) -> Any:
        item, branch = b.item, b.branch

        def visible(_b: Any, _h: Any, qi: torch.Tensor, ki: torch.Tensor) -> torch.Tensor:
            same = item[qi] == item[ki]
            return same & (ki <= qi) & ((branch[ki] == 0) | (branch[ki] == branch[qi]))
        n = item.numel()
        return self._create(visible, None, None, n, n, device=item.device, _compile=True)

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

    def target_logprobs(self, b: Batch, targets: torch.Tensor) -> torch.Tensor:
        """log p(targets[m] | selected token m), [M] float32, by a vocab-parallel log-softmax."""
        local = self.logits(b)
        mx = local.max(-1).values
        if self.lay.tp > 1:
            dist.all_reduce(mx, op=dist.ReduceOp.MAX, group=self.group)
        sumexp = (local - mx[:, None]).exp().sum(-1)
        lo = self.lay.vocab.start
        inside = (targets >= lo) & (targets < lo + local.shape[-1])
        tgt = torch.where(inside, local.gather(-1, (targets - lo).clamp(0, local.shape[-1] - 1)[:, None])[:, 0], 0.0)
        if self.lay.tp > 1:
            both = torch.stack([sumexp, tgt])
            dist.all_reduce(both, group=self.group)
            sumexp, tgt = both[0], both[1]
        return tgt - mx - sumexp.log()
