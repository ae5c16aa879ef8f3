"""The fused LLaMA forward over packed token batches, one tensor-parallel rank of it.

A batch packs many sequences into one row of N tokens with no padding. Each token carries
`item` (which sequence-group it belongs to) and `branch` (0 for a shared prefix, j > 0 for the
j-th continuation). Token a attends to token b iff they share an item, b comes no later than a,
and b is in the prefix or in a's own branch. A plain causal sequence is one item of branch 0;
a HellaSwag item is its context (branch 0) followed by its four endings (branches 1..4).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

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
    # Padded per-item view for attention: pad_index [B*S] packed index of each slot (0 for
    # padding), unpad_index [N] slot of each packed token, mask [B, 1, S, S] bool.
    pad_index: torch.Tensor
    unpad_index: torch.Tensor
    mask: torch.Tensor

    def to(self, device: torch.device) -> "Batch":
        return Batch(*(getattr(self, f).to(device, non_blocking=True) for f in self.__dataclass_fields__))


def make_batch(groups: list[tuple[list[int], list[list[int]]]], select: list[int]) -> Batch:
    """Pack (prefix, [continuations]) groups; `select` indexes the packed tokens to score."""
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
    n = len(toks)
    starts.append(n)
    lens = [b - a for a, b in zip(starts, starts[1:])]
    B, S = len(groups), max(lens)
    slot = torch.arange(B * S).view(B, S)
    valid = torch.arange(S)[None, :] < torch.tensor(lens)[:, None]            # [B, S]
    pad_index = torch.zeros(B, S, dtype=torch.long)
    start_t = torch.tensor(starts[:-1])
    pad_index[valid] = (start_t[:, None] + torch.arange(S)[None, :])[valid]
    unpad_index = slot[valid]
    br = torch.tensor(branch, dtype=torch.long)
    br_pad = torch.where(valid, br[pad_index], -1)                             # [B, S]
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    same = (br_pad[:, None, :] == 0) | (br_pad[:, None, :] == br_pad[:, :, None])
    mask = causal & same & valid[:, None, :]
    mask |= torch.eye(S, dtype=torch.bool) & ~valid[:, :, None]                # padding sees itself
    return Batch(torch.tensor(toks, dtype=torch.long), torch.tensor(pos, dtype=torch.long),
                 torch.tensor(item, dtype=torch.long), br, torch.tensor(select, dtype=torch.long),
                 pad_index.view(-1), unpad_index, mask[:, None])


def attention_blocks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, b: Batch) -> torch.Tensor:
    """SDPA over each group padded to the batch's longest, with an explicit mask.

    q [N, H, hd], k/v [N, KV, hd] -> [N, H*hd]. Works on CPU and on every CUDA capability
    (the memory-efficient kernel takes the mask on sm70).
    """
    N, H, hd = q.shape
    B, S = b.mask.shape[0], b.mask.shape[-1]

    def pad(x: torch.Tensor) -> torch.Tensor:                                   # -> [B, heads, S, hd]
        return x[b.pad_index].view(B, S, x.shape[1], hd).transpose(1, 2)
    qp, kp, vp = pad(q), pad(k), pad(v)
    if kp.shape[1] != H:
        kp, vp = kp.repeat_interleave(H // kp.shape[1], 1), vp.repeat_interleave(H // vp.shape[1], 1)
    o = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=b.mask)          # [B, H, S, hd]
    return o.transpose(1, 2).reshape(B * S, H * hd)[b.unpad_index]


AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Batch], torch.Tensor]


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * w


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary: x [N, heads, hd], cos/sin [N, 1, hd/2] float32."""
    a, b = x.float().chunk(2, dim=-1)
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1).type_as(x)


class Model:
    """One rank's share of the model; `group` is its tensor-parallel process group (or None)."""

    def __init__(self, config: ModelConfig, lay: RankLayout, tensors: dict[str, torch.Tensor],
                 group: dist.ProcessGroup | None = None, attention: AttentionFn = attention_blocks):
        self.c, self.lay, self.w, self.group, self.attention = config, lay, tensors, group, attention
        self.q_size = lay.n_heads * config.head_dim
        self.kv_size = lay.n_kv_heads * config.head_dim

    def _all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.lay.tp > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def layer(self, i: int, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, b: Batch) -> torch.Tensor:
        w, c, hd = self.w, self.c, self.c.head_dim
        x = rms_norm(h, w[names.layer(i, names.ATTN_NORM)], c.norm_eps)
        q, k, v = (x @ w[names.layer(i, names.QKV)].T).split([self.q_size, self.kv_size, self.kv_size], -1)
        q = rotate(q.view(-1, self.lay.n_heads, hd), cos, sin)                  # [N, H, hd]
        k = rotate(k.view(-1, self.lay.n_kv_heads, hd), cos, sin)               # [N, KV, hd]
        o = self.attention(q, k, v.view(-1, self.lay.n_kv_heads, hd), b)        # [N, H*hd]
        h = h + self._all_reduce(o @ w[names.layer(i, names.O)].T)
        x = rms_norm(h, w[names.layer(i, names.FFN_NORM)], c.norm_eps)
        gate, up = (x @ w[names.layer(i, names.GATE_UP)].T).chunk(2, dim=-1)     # [N, ffn/tp] each
        return h + self._all_reduce((F.silu(gate) * up) @ w[names.layer(i, names.DOWN)].T)

    @torch.inference_mode()
    def logits(self, b: Batch) -> torch.Tensor:
        """Float32 logits [M, vocab/tp] of this rank's vocab slice at the selected tokens."""
        h = self.w[names.EMBED][b.tokens]                                       # [N, dim]
        cos = self.w[names.ROPE_COS][b.positions][:, None]                      # [N, 1, hd/2]
        sin = self.w[names.ROPE_SIN][b.positions][:, None]
        for i in range(self.c.n_layers):
            h = self.layer(i, h, cos, sin, b)
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
