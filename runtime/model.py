"""The fused LLaMA forward over packed token batches, one tensor-parallel rank of it.

A batch (`packing.Batch`) is one row of N tokens holding a prefix forest in depth-first order:
token k is visible to queries k..end[k]-1, its own subtree, so every token attends to exactly
the tokens of its own sequence so far, and shared prefixes are computed once.
"""
from __future__ import annotations

import os
from collections import deque
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from llamafuse.formats import ModelConfig, RankLayout
from llamafuse.formats import names

from .attention import Attention, BlockAttention
from .fp8 import fp8_linear
from .packing import Batch, make_batch, prefix_forest


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * w


def linear(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """x @ w.T; float8 weights (with their per-row scale) take the float8 product."""
    return x @ w.T if scale is None else fp8_linear(x, w, scale)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary: x [N, heads, hd], cos/sin [N, 1, hd/2] float32."""
    a, b = x.float().chunk(2, dim=-1)
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1).type_as(x)


def compile_in_process() -> None:
    """Have inductor compile kernels in this process rather than in a pool of worker processes
    (unless TORCHINDUCTOR_COMPILE_THREADS says otherwise): the block has a handful of kernels, which
    compiled cold in 5.6 s either way (run 14), and no pool of processes (one per CPU) then starts
    beside the threads reading the weights, nor in warm runs, which compile nothing."""
    if "TORCHINDUCTOR_COMPILE_THREADS" not in os.environ:
        import torch._inductor.config
        torch._inductor.config.compile_threads = 1


class Model:
    """One rank's share of the model; `group` is its tensor-parallel process group (or None).
    `tensors` (the rank file's, by name) may be set as `.w` after compiling (see `warm_up`)."""

    def __init__(self, config: ModelConfig, lay: RankLayout, tensors: dict[str, torch.Tensor],
                 group: dist.ProcessGroup | None = None, attention: Attention | None = None,
                 compile: str | None = None, pace: int = 0):
        """compile: None (eager), "block" (the whole block in one graph, for fixed-shape batches)
        or "around-attention" (the work before and after an eager attention call, any length).
        pace > 0 (CUDA): at most that many layers wait queued on the device, the thread sleeping
        meanwhile, for a model run beside Python in another thread: a launch into CUDA's full
        queue would block holding the GIL."""
        self.c, self.lay, self.w, self.group, self.pace = config, lay, tensors, group, pace
        self.attention = attention or BlockAttention()
        self.compiles = compile is not None
        if self.compiles:
            compile_in_process()
        if compile == "block":  # fuses norms, rotary, SiLU and residual adds; one graph serves all layers
            self._block = torch.compile(self._block, dynamic=False)
        elif compile == "around-attention":
            self._pre = torch.compile(self._pre, dynamic=True)
            self._post = torch.compile(self._post, dynamic=True)
        elif compile is not None:
            raise ValueError(f"compile must be None, 'block' or 'around-attention', not {compile!r}")
        self.q_size = lay.n_heads * config.head_dim
        self.kv_size = lay.n_kv_heads * config.head_dim

    def _all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.lay.tp > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def layer(self, i: int, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn: Any,
              w: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Block i on the model's weights (or on `w`, tensors named as the model's)."""
        w = self.w if w is None else w
        weights = [w[names.layer(i, p)] for p in names.LAYER_PARTS]
        scales = [w.get(names.scale(names.layer(i, p))) for p in names.MATRICES]  # float8 only
        return self._block(h, cos, sin, attn, *weights, *scales)

    def _block(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn: Any, attn_norm: torch.Tensor,
               qkv: torch.Tensor, o: torch.Tensor, ffn_norm: torch.Tensor, gate_up: torch.Tensor,
               down: torch.Tensor, *scales: torch.Tensor | None) -> torch.Tensor:
        """One transformer block; weights are arguments so a compiled block serves every layer."""
        qkv_s, o_s, gate_up_s, down_s = scales
        q, k, v = self._pre(h, cos, sin, attn_norm, qkv, qkv_s)
        a = self.attention(q, k, v, attn)                                       # [N, H*hd]
        return self._post(h, a, o, o_s, ffn_norm, gate_up, gate_up_s, down, down_s)

    def _pre(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn_norm: torch.Tensor,
             qkv: torch.Tensor, qkv_s: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Norm, the fused q/k/v product and rotary: q [N, H, hd], k and v [N, KV, hd]."""
        hd = self.c.head_dim
        x = rms_norm(h, attn_norm, self.c.norm_eps)
        q, k, v = linear(x, qkv, qkv_s).split([self.q_size, self.kv_size, self.kv_size], -1)
        q = rotate(q.view(-1, self.lay.n_heads, hd), cos, sin)
        k = rotate(k.view(-1, self.lay.n_kv_heads, hd), cos, sin)
        return q, k, v.view(-1, self.lay.n_kv_heads, hd)

    def _post(self, h: torch.Tensor, a: torch.Tensor, o: torch.Tensor, o_s: torch.Tensor | None,
              ffn_norm: torch.Tensor, gate_up: torch.Tensor, gate_up_s: torch.Tensor | None, down: torch.Tensor,
              down_s: torch.Tensor | None) -> torch.Tensor:
        """The attention output's product and residual, then the SwiGLU feed-forward and residual."""
        h = h + self._all_reduce(linear(a, o, o_s))
        x = rms_norm(h, ffn_norm, self.c.norm_eps)
        gate, up = linear(x, gate_up, gate_up_s).chunk(2, dim=-1)               # [N, ffn/tp] each
        return h + self._all_reduce(linear(F.silu(gate) * up, down, down_s))

    def warm_up(self, n: int, layer0: dict[str, torch.Tensor]) -> None:
        """Compile (or fetch from the compile cache) the kernels for batches of n tokens: one
        block's, run on a batch of filler tokens with `layer0` as layer 0's weights (placeholders
        will do: only shapes and dtypes matter, so this can run while the real weights load). The
        rest of the forward is eager. Inputs are made as `logits` makes them (the batch outside
        inference mode, the rest inside): the compiled code's guards check that too."""
        norm = layer0[names.layer(0, names.ATTN_NORM)]
        b = make_batch(prefix_forest([]), [0], pad_to=n).to(norm.device)
        with torch.inference_mode():
            cos, sin = (torch.zeros(n, 1, self.c.head_dim // 2, device=norm.device) for _ in "cs")  # [N, 1, hd/2]
            h = torch.zeros(n, self.c.dim, dtype=norm.dtype, device=norm.device)
            self.layer(0, h, cos, sin, self.attention.prepare(b), layer0)

    @torch.inference_mode()
    def logits(self, b: Batch) -> torch.Tensor:
        """Float32 logits [M, vocab/tp] of this rank's vocab slice at the selected tokens."""
        h = self.w[names.EMBED][b.tokens]                                       # [N, dim]
        cos = self.w[names.ROPE_COS][b.positions][:, None]                      # [N, 1, hd/2]
        sin = self.w[names.ROPE_SIN][b.positions][:, None]
        attn = self.attention.prepare(b)                                        # shared by all layers
        queued: deque[torch.cuda.Event] = deque()
        for i in range(self.c.n_layers):
            h = self.layer(i, h, cos, sin, attn)
            if self.pace:
                queued.append(torch.cuda.Event(blocking=True))
                queued[-1].record()
                if len(queued) > self.pace:
                    queued.popleft().synchronize()
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

    def target_logprobs(self, b: Batch, rows: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(log p(targets[t] | selected row rows[t]) [T] float32, is targets[t] the most likely
        token there [T] bool), by a vocab-parallel log-softmax.

        Several targets may share a row (sequences that share a prefix predict different tokens).
        A target tied with another token for the highest logit counts as greedy.
        """
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
        return tgt - (mx + sumexp.log())[rows], tgt >= mx[rows]
