"""HellaSwag on a LLaMA-30B-shaped model: llamafuse vs HF transformers, on one GPU, in one run.

    python3 scripts/bench_hellaswag.py --data DATA.jsonl.gz --tokenizer tokenizer.model --out DIR

Parts (all by default, or pick with --parts): ceiling (GEMM rate at the layer shapes, and one
layer of each attention backend), eval (llama-run's code path on the full split), hf (lm-eval's
HF backend on a random sample, extrapolated), load (a converted tp=1 checkpoint of --load-layers
layers from /dev/shm onto the GPU), accuracy (fp16 vs float32 item log-likelihoods on a sample;
stories260K and a 52-head test model on GPU vs CPU float32). Weights are random, generated on the
GPU, laid out exactly as a converted checkpoint (formats.rank_tensor_specs). Prints a table last
and writes DIR/bench.json.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import sentencepiece as spm
import torch
import torch.nn.functional as F

from llamafuse.convert.plan import rope_tables
from llamafuse.formats import ModelConfig, RankLayout, rank_tensor_specs
from llamafuse.formats import names
from llamafuse.runtime import hellaswag
from llamafuse.runtime.evaluate import Settings, score_items
from llamafuse.runtime.load import fast_path
from llamafuse.runtime.model import BlockAttention, FlexAttention, Model
from llamafuse.runtime.parallel import Context

LLAMA_30B = ModelConfig(dim=6656, n_layers=60, n_heads=52, n_kv_heads=52, head_dim=128, ffn_dim=17920,
                        vocab_size=32000, norm_eps=1e-6, rope_theta=10000.0, max_seq_len=2048)
DEV = torch.device("cuda")


def bench_ms(fn, reps: int = 20, warmup: int = 3) -> float:
    """Median milliseconds of fn() over `reps` runs, timed with CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def random_weights(c: ModelConfig, dtype: torch.dtype = torch.float16, seed: int = 0) -> dict[str, torch.Tensor]:
    """A tp=1 rank file's tensors, random (matrices ~ N(0, 1/fan_in)), generated on the GPU."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    cos, sin = rope_tables(c)
    out = {}
    for name, shape, rope in rank_tensor_specs(c, 1):
        if rope:
            out[name] = (cos if name == names.ROPE_COS else sin).to(DEV)
        elif len(shape) == 1:
            out[name] = (1 + 0.1 * torch.randn(shape, generator=g, device=DEV)).to(dtype)
        else:
            std = 1.0 if name == names.EMBED else shape[1] ** -0.5
            t = torch.empty(shape, dtype=dtype, device=DEV)
            out[name] = t.normal_(0, std, generator=g)
    return out


def layer_flops(c: ModelConfig) -> int:
    """Multiply-add FLOPs per token of one layer's matrix products."""
    return 2 * (c.dim * (c.q_dim + 2 * c.kv_dim) + c.q_dim * c.dim + 3 * c.dim * c.ffn_dim)


def layer_gemms(c: ModelConfig, n: int):
    """A closure running one layer's four GEMMs at n tokens (random operands)."""
    x = torch.randn(n, c.dim, dtype=torch.float16, device=DEV)
    y = torch.randn(n, c.ffn_dim, dtype=torch.float16, device=DEV)
    w = {k: torch.randn(s, dtype=torch.float16, device=DEV) * 0.01 for k, s in
         {"qkv": (c.q_dim + 2 * c.kv_dim, c.dim), "o": (c.dim, c.q_dim), "gate_up": (2 * c.ffn_dim, c.dim),
          "down": (c.dim, c.ffn_dim)}.items()}

    def gemms() -> None:
        x @ w["qkv"].T
        x @ w["o"].T
        x @ w["gate_up"].T
        y @ w["down"].T
    return gemms


def part_ceiling(c: ModelConfig, n: int, report: dict) -> None:
    gemms = layer_gemms(c, n)
    ms = bench_ms(gemms)
    torch.backends.cuda.preferred_blas_library("cublaslt")
    ms_lt = bench_ms(gemms)
    torch.backends.cuda.preferred_blas_library("cublas")
    print(f"layer GEMMs at {n} tokens: cuBLAS {ms:.2f} ms, cuBLASLt {ms_lt:.2f} ms", flush=True)
    del gemms
    sweep = {}
    for m in (4096, 8192, 16384, 32768, 65536):
        sweep[m] = layer_flops(c) * m / bench_ms(layer_gemms(c, m), reps=10) / 1e9
    print("GEMM TFLOP/s by tokens per batch:", {k: round(v) for k, v in sweep.items()}, flush=True)
    a = torch.randn(8192, 8192, dtype=torch.float16, device=DEV)
    ms_sq = bench_ms(lambda: a @ a)
    ab = a.bfloat16()
    ms_sq_bf16 = bench_ms(lambda: ab @ ab)
    del ab
    report["ceiling"] = {"tokens": n, "layer_gemm_ms": ms, "tflops": layer_flops(c) * n / ms / 1e9,
                         "cublaslt_tflops": layer_flops(c) * n / ms_lt / 1e9,
                         "square_8192_tflops": 2 * 8192 ** 3 / ms_sq / 1e9,
                         "square_8192_bf16_tflops": 2 * 8192 ** 3 / ms_sq_bf16 / 1e9,
                         "by_tokens": sweep}
    del a
    time_layers(n, report, (("flex+compile", FlexAttention(), True), ("no attention+compile", NoAttention(), True),
                            ("flex, eager", FlexAttention(), False), ("blocks (sm70 path)", BlockAttention(), False)))


def time_layers(n: int, report: dict, variants) -> None:
    """One whole 30B layer per (label, attention, compile), on a real packed batch of n tokens."""
    ms = report.get("ceiling", {}).get("layer_gemm_ms") or bench_ms(layer_gemms(LLAMA_30B, n))
    lay = RankLayout(LLAMA_30B, 1, 0)
    one = LLAMA_30B.__class__(**{**LLAMA_30B.to_dict(), "n_layers": 1})
    wts = random_weights(one)
    items = report["_items"]
    from llamafuse.runtime.evaluate import item_batch, pack
    first = [items[i] for i in pack(items, n)[len(items) // 200]]
    for label, attn, compile in variants:
        model = Model(one, lay, wts, None, attn, compile)
        b = item_batch(first, n if isinstance(attn, (FlexAttention, NoAttention)) else None).batch.to(DEV)
        h = wts[names.EMBED][b.tokens]
        cos, sin = wts[names.ROPE_COS][b.positions][:, None], wts[names.ROPE_SIN][b.positions][:, None]
        t0 = time.perf_counter()
        with torch.inference_mode():
            st = attn.prepare(b)
            model.layer(0, h, cos, sin, st)
            torch.cuda.synchronize()
            compile_s = time.perf_counter() - t0
            ms_layer = bench_ms(lambda: model.layer(0, h, cos, sin, st))
            ms_prep = bench_ms(lambda: attn.prepare(b), reps=5)
        report.setdefault("layer", {})[label] = {"ms": ms_layer, "prepare_ms": ms_prep, "first_call_s": compile_s,
                                                 "vs_gemm": ms_layer / ms}
        print(f"layer {label}: {ms_layer:.2f} ms (GEMMs {ms:.2f} ms), prepare {ms_prep:.2f} ms, first {compile_s:.1f} s", flush=True)
    del wts


class NoAttention:
    """Skips attention (q passes through): isolates the attention kernel's share of a layer."""

    def prepare(self, b):
        return None

    def __call__(self, q, k, v, state):
        return q.reshape(q.shape[0], -1)


def part_eval(c: ModelConfig, items: list, args: argparse.Namespace, report: dict) -> dict[str, torch.Tensor]:
    from llamafuse.runtime.evaluate import item_batch, pack
    wts = random_weights(c)
    attn, compile = fast_path(DEV, c.head_dim, args.attention)
    model = Model(c, RankLayout(c, 1, 0), wts, None, attn, compile)
    ctx = Context(0, 1, 1, DEV, None, 0, 0, 1)
    settings = Settings(args.batch_tokens, None, args.attention, progress=True)
    t0 = time.perf_counter()
    score_items(ctx, model, items[:64], settings)   # compile / warm up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")          # report any host sync inside the loop
    score_items(ctx, model, items[64:128], settings)
    torch.cuda.set_sync_debug_mode(0)
    warm_s = time.perf_counter() - t0
    # Timeline: CUDA events around each batch's forward show whether the GPU ever waits for the host.
    events, forward = [], model.target_logprobs

    def timed(*a):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        out = forward(*a)
        e.record()
        events.append((s, e))
        return out
    model.target_logprobs = timed
    torch.cuda.reset_peak_memory_stats()
    run = score_items(ctx, model, items, settings)
    busy = [s.elapsed_time(e) / 1e3 for s, e in events]
    idle = [e.elapsed_time(s2) / 1e3 for (_, e), (s2, _) in zip(events, events[1:])]
    # Work done: every forest token through the 60 layers, the output head at each distinct scored row.
    rows = sum(item_batch([items[i] for i in b]).batch.select.numel() for b in pack(items, args.batch_tokens))
    body = 2 * (c.n_params() - 2 * c.vocab_size * c.dim)
    flops = body * run["tokens"] + 2 * c.vocab_size * c.dim * rows
    shared, pairs, _ = hellaswag.count_tokens(items)
    scored = sum(len(e) for it in items for e in it.endings)
    shared_flops = body * shared + 2 * c.vocab_size * c.dim * scored   # the brief's shared-context count
    ceiling = report.get("ceiling", {}).get("tflops", args.ceiling)
    report["eval"] = {"items": len(items), "tokens": run["tokens"], "scored_rows": rows, "flops": flops,
                      "shared_context_tokens": shared, "shared_context_flops": shared_flops, "pair_tokens": pairs,
                      "seconds": run["eval_s"], "warmup_s": warm_s, "tokens_per_s": run["tokens"] / run["eval_s"],
                      "tflops": flops / run["eval_s"] / 1e12, "ceiling_tflops": ceiling,
                      "fraction_of_ceiling": flops / run["eval_s"] / 1e12 / ceiling,
                      "floor_s": flops / (ceiling * 1e12), "shared_context_floor_s": shared_flops / (ceiling * 1e12),
                      "gpu_busy_s": sum(busy), "gpu_idle_between_batches_s": sum(idle), "batches": len(busy),
                      "batch_ms_median": 1e3 * statistics.median(busy), "batch_ms_max": 1e3 * max(busy),
                      "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9, "batch_tokens": args.batch_tokens,
                      "attention": type(attn).__name__, "compile": compile}
    gemms = layer_gemms(c, args.batch_tokens)
    report["eval"]["hot_ceiling_tflops"] = layer_flops(c) * args.batch_tokens / bench_ms(gemms) / 1e9
    del gemms
    report["_lls"] = run["lls"]
    print(f"eval: {run['eval_s']:.1f} s for {len(items)} items, {run['tokens']:,} tokens; GPU busy {sum(busy):.1f} s, "
          f"idle between batches {sum(idle):.2f} s; GEMM ceiling right after: {report['eval']['hot_ceiling_tflops']:.0f} TFLOP/s",
          flush=True)
    return wts


def hf_model(c: ModelConfig, wts: dict[str, torch.Tensor]):
    """transformers' LlamaForCausalLM sharing our tensors (views; no extra memory)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(hidden_size=c.dim, intermediate_size=c.ffn_dim, num_hidden_layers=c.n_layers,
                      num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads, vocab_size=c.vocab_size,
                      rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta, max_position_embeddings=c.max_seq_len,
                      torch_dtype=torch.float16)
    with torch.device("meta"):
        m = LlamaForCausalLM(cfg)
    q, kv = c.q_dim, c.kv_dim
    sd = {"model.embed_tokens.weight": wts[names.EMBED], "model.norm.weight": wts[names.NORM],
          "lm_head.weight": wts[names.OUTPUT]}
    for i in range(c.n_layers):
        L = lambda p: wts[names.layer(i, p)]  # noqa: E731
        p = f"model.layers.{i}."
        sd.update({p + "self_attn.q_proj.weight": L(names.QKV)[:q], p + "self_attn.k_proj.weight": L(names.QKV)[q:q + kv],
                   p + "self_attn.v_proj.weight": L(names.QKV)[q + kv:], p + "self_attn.o_proj.weight": L(names.O),
                   p + "mlp.gate_proj.weight": L(names.GATE_UP)[:c.ffn_dim], p + "mlp.up_proj.weight": L(names.GATE_UP)[c.ffn_dim:],
                   p + "mlp.down_proj.weight": L(names.DOWN), p + "input_layernorm.weight": L(names.ATTN_NORM),
                   p + "post_attention_layernorm.weight": L(names.FFN_NORM)})
    m.load_state_dict(sd, assign=True, strict=True)
    m.model.rotary_emb = type(m.model.rotary_emb)(config=cfg, device=DEV)
    return m.eval()


def hf_pairs_lls(m, pairs: list[tuple[list[int], list[int]]], batch: int) -> tuple[float, list[float]]:
    """lm-eval HF backend: one right-padded row per (context, ending), longest first; seconds, lls."""
    order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
    lls = [0.0] * len(pairs)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.inference_mode():
        for s in range(0, len(order), batch):
            idx = order[s:s + batch]
            rows = [(pairs[i][0] + pairs[i][1])[:-1] for i in idx]
            L = max(map(len, rows))
            inp = torch.tensor([r + [0] * (L - len(r)) for r in rows], device=DEV)
            logp = F.log_softmax(m(inp).logits, dim=-1)
            for r, i in enumerate(idx):
                ctx, cont = pairs[i]
                pos = torch.arange(len(ctx) - 1, len(ctx) - 1 + len(cont), device=DEV)
                lls[i] = float(logp[r, pos, torch.tensor(cont, device=DEV)].float().sum())
    torch.cuda.synchronize()
    return time.perf_counter() - t0, lls


def part_hf(c: ModelConfig, wts: dict, items: list, args: argparse.Namespace, report: dict) -> None:
    m = hf_model(c, wts)
    rng = random.Random(0)
    all_pairs = sum(len(it.endings) for it in items)
    out = {}
    for batch, n_items in ((64, args.hf_items_b64), (1, args.hf_items_b1)):
        sample = rng.sample(items, n_items)
        pairs = [(it.context, list(e)) for it in sample for e in it.endings]
        hf_pairs_lls(m, pairs[: min(len(pairs), batch * 2)], batch)   # warm up
        secs, lls = hf_pairs_lls(m, pairs, batch)
        ours = report.get("_lls", {})
        diffs = [abs(lls[4 * k + j] - ours[it.doc_id][j]) for k, it in enumerate(sample) for j in range(4) if it.doc_id in ours]
        out[f"batch{batch}"] = {"pairs": len(pairs), "seconds": secs, "extrapolated_s": secs / len(pairs) * all_pairs,
                                "max_dll_vs_ours": max(diffs) if diffs else None}
        print(f"hf batch {batch}: {secs:.1f} s for {len(pairs)} pairs -> {secs / len(pairs) * all_pairs:.0f} s", flush=True)
    report["hf"] = out
    del m


class RandomSource:
    """A converter Source of random-looking bytes in the 30B shape (load timing only)."""
    layout, rotary, path, tokenizer = "bench", "rotate-half", Path("/dev/null"), None

    def __init__(self, c: ModelConfig):
        self.config = c

    def tensor(self, name: str) -> torch.Tensor:
        c = self.config
        part = name.split(".")[-1]
        shape = {"embed": (c.vocab_size, c.dim), "output": (c.vocab_size, c.dim), "wq": (c.q_dim, c.dim),
                 "wk": (c.kv_dim, c.dim), "wv": (c.kv_dim, c.dim), "wo": (c.dim, c.q_dim), "w1": (c.ffn_dim, c.dim),
                 "w3": (c.ffn_dim, c.dim), "w2": (c.dim, c.ffn_dim)}.get(part, (c.dim,))
        return torch.empty(shape, dtype=torch.float16).uniform_(-1, 1) if len(shape) == 1 else torch.empty(shape, dtype=torch.float16)


def part_load(args: argparse.Namespace, report: dict) -> None:
    from llamafuse.convert.write import convert
    from llamafuse.formats import load_manifest
    from llamafuse.runtime.load import load_rank
    c = ModelConfig(**{**LLAMA_30B.to_dict(), "n_layers": args.load_layers})
    folder = Path(tempfile.mkdtemp(dir="/dev/shm")) / "ckpt"
    src = RandomSource(c)
    t0 = time.perf_counter()
    convert(src, folder, 1, "float16", tokenizer=Path(args.tokenizer), progress=False)
    write_s = time.perf_counter() - t0
    m = load_manifest(folder)
    size = m.ranks[0].bytes
    runs = []
    for _ in range(3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        t = load_rank(folder, m, 0, DEV)
        torch.cuda.synchronize()
        runs.append(time.perf_counter() - t0)
        del t
        torch.cuda.empty_cache()
    report["load"] = {"bytes": size, "layers": args.load_layers, "seconds": statistics.median(runs),
                      "gb_per_s": size / statistics.median(runs) / 1e9, "convert_write_s": write_s,
                      "convert_gb_per_s": size / write_s / 1e9}
    print(f"load: {size / 1e9:.1f} GB in {statistics.median(runs):.2f} s", flush=True)
    import shutil
    shutil.rmtree(folder.parent)


class Upcast(dict):
    """Weights read as float32 on access: a float32 run of fp16 weights, one layer at a time."""

    def __getitem__(self, k: str) -> torch.Tensor:
        return super().__getitem__(k).float()


def part_accuracy(c: ModelConfig, wts: dict, items: list, args: argparse.Namespace, report: dict) -> None:
    rng = random.Random(1)
    sample = rng.sample(items, args.acc_items)
    ctx = Context(0, 1, 1, DEV, None, 0, 0, 1)
    settings = Settings(4096, None, "blocks", progress=False)
    fp32 = score_items(ctx, Model(c, RankLayout(c, 1, 0), Upcast(wts), None, BlockAttention(), False), sample, settings)["lls"]
    fp16 = report.get("_lls") or {}
    report["accuracy"] = {"fp16_vs_fp32": _compare(sample, fp16, fp32)}
    print("accuracy fp16 vs fp32:", report["accuracy"]["fp16_vs_fp32"], flush=True)


def _compare(sample: list, a: dict, b: dict) -> dict:
    d, acc, norm, near = 0.0, 0, 0, 0
    for it in sample:
        if it.doc_id not in a:
            continue
        x, y = a[it.doc_id], b[it.doc_id]
        d = max(d, max(abs(p - q) for p, q in zip(x, y)))
        px, py = hellaswag.predictions(it, x), hellaswag.predictions(it, y)
        acc += px[0] != py[0]
        norm += px[1] != py[1]
        ys = sorted(y, reverse=True)
        near += (px[0] != py[0]) and ys[0] - ys[1] < 2 * max(abs(p - q) for p, q in zip(x, y))
    return {"items": len(sample), "max_dll": d, "acc_decisions_differ": acc, "acc_norm_decisions_differ": norm,
            "differing_within_rounding": near}


def part_small_models(args: argparse.Namespace, report: dict) -> None:
    """stories260K and the 52-head test model: GPU fp16 (llama-run's path) vs CPU float32."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from checkpoints import llama30b_like
    from llamafuse.convert.sources import open_source
    from llamafuse.convert.write import convert
    from llamafuse.formats import load_manifest
    from llamafuse.runtime.load import open_model
    tmp = Path(tempfile.mkdtemp())
    srcs = {"stories260K": Path(args.stories), "llama30b_like": tmp / "src52"}
    llama30b_like(srcs["llama30b_like"], Path(args.tokenizer))
    docs = hellaswag.load_docs(args.data, args.small_items)
    out = {}
    for name, src in srcs.items():
        runs = {}
        for dev, dtype in ((torch.device("cpu"), "float32"), (DEV, "float16")):
            folder = tmp / f"{name}-{dtype}"
            convert(open_source(src), folder, 1, dtype, progress=False)
            m = load_manifest(folder)
            sp = spm.SentencePieceProcessor(model_file=str(folder / m.tokenizer))
            its = hellaswag.build_items(docs, sp, True)
            ctx = Context(0, 1, 1, dev, None, 0, 0, 1)
            model = open_model(ctx, folder, m, "auto")
            runs[dev.type] = score_items(ctx, model, its, Settings(2048 if dev.type == "cpu" else 8192, None, progress=False))["lls"]
        out[name] = _compare(its, runs["cuda"], runs["cpu"])
        print(f"{name}: GPU fp16 vs CPU fp32 {out[name]}", flush=True)
    report["small_models"] = out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--stories", default=".bench/stories260K/meta")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--parts", default="ceiling,eval,hf,accuracy,load,small")
    ap.add_argument("--layers", type=int, default=60, help="Layers of the 30B shape (60 = the real model).")
    ap.add_argument("--limit", type=int, default=None, help="Items of the split (default all 10042).")
    ap.add_argument("--batch-tokens", type=int, default=16384)
    ap.add_argument("--attention", default="auto", choices=["auto", "flex", "blocks"])
    ap.add_argument("--ceiling", type=float, default=690.0, help="TFLOP/s, if the ceiling part is skipped.")
    ap.add_argument("--hf-items-b64", type=int, default=128)
    ap.add_argument("--hf-items-b1", type=int, default=16)
    ap.add_argument("--acc-items", type=int, default=100)
    ap.add_argument("--small-items", type=int, default=300)
    ap.add_argument("--load-layers", type=int, default=8)
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    torch.backends.cuda.matmul.allow_tf32 = False
    c = ModelConfig(**{**LLAMA_30B.to_dict(), "n_layers": args.layers})
    sp = spm.SentencePieceProcessor(model_file=args.tokenizer)
    t0 = time.perf_counter()
    items = hellaswag.build_items(hellaswag.load_docs(args.data, args.limit), sp, True)
    report: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "layers": args.layers,
                    "tokenize_s": time.perf_counter() - t0, "_items": items}
    args.out.mkdir(parents=True, exist_ok=True)
    def save() -> None:
        (args.out / "bench.json").write_text(json.dumps({k: v for k, v in report.items() if not k.startswith("_")}, indent=2))
    if "ceiling" in parts:
        part_ceiling(c, args.batch_tokens, report)
        save()
    wts = part_eval(c, items, args, report) if "eval" in parts else random_weights(c)
    save()
    if "hf" in parts:
        part_hf(c, wts, items, args, report)
        save()
    if "accuracy" in parts:
        part_accuracy(c, wts, items, args, report)
        save()
    del wts
    torch.cuda.empty_cache()
    if "load" in parts:
        part_load(args, report)
        save()
    if "small" in parts:
        part_small_models(args, report)
        save()
    if "flexblocks" in parts:   # FlexAttention mask tiles (query, key): finer key tiles skip more
        time_layers(args.batch_tokens, report, [(f"flex {q}x{k}+compile", FlexAttention((q, k)), True)
                                                for q, k in ((128, 128), (128, 64))])
        save()
    print_table(report)


def print_table(r: dict) -> None:
    rows = []
    if "ceiling" in r:
        rows.append(("GEMM ceiling (layer shapes)", f"{r['ceiling']['tflops']:.0f} TFLOP/s"))
    for k, v in r.get("layer", {}).items():
        rows.append((f"one layer, {k}", f"{v['ms']:.2f} ms ({v['vs_gemm']:.3f} x GEMMs)"))
    e = r.get("eval")
    if e:
        rows += [("llamafuse eval", f"{e['seconds']:.1f} s  ({e['tokens']:,} tokens, {e['tokens_per_s']:,.0f} tok/s, "
                                    f"{e['tflops']:.0f} TFLOP/s, {100 * e['fraction_of_ceiling']:.1f}% of ceiling)"),
                 ("GPU busy / idle between batches", f"{e['gpu_busy_s']:.1f} s / {e['gpu_idle_between_batches_s']:.2f} s"),
                 ("GEMM ceiling right after the eval", f"{e['hot_ceiling_tflops']:.0f} TFLOP/s"),
                 ("floor: work done / ceiling", f"{e['floor_s']:.1f} s"),
                 ("floor: shared-context work / ceiling", f"{e['shared_context_floor_s']:.1f} s"),
                 ("peak GPU memory", f"{e['peak_mem_gb']:.1f} GB")]
    for k, v in r.get("hf", {}).items():
        sp = f", speed-up {v['extrapolated_s'] / e['seconds']:.1f}x" if e else ""
        rows.append((f"HF transformers {k}", f"{v['extrapolated_s']:.0f} s (extrapolated from {v['pairs']} pairs){sp}"))
    if "load" in r:
        rows.append(("load page cache -> GPU", f"{r['load']['gb_per_s']:.1f} GB/s ({r['load']['bytes'] / 1e9:.1f} GB)"))
    if "accuracy" in r:
        a = r["accuracy"]["fp16_vs_fp32"]
        rows.append(("fp16 vs fp32 (30B shape)", f"max |dll| {a['max_dll']:.4f}, decisions differ {a['acc_decisions_differ']}/{a['acc_norm_decisions_differ']} of {a['items']}"))
    for k, a in r.get("small_models", {}).items():
        rows.append((f"{k} GPU fp16 vs CPU fp32", f"max |dll| {a['max_dll']:.4f}, decisions differ {a['acc_decisions_differ']}/{a['acc_norm_decisions_differ']} of {a['items']}"))
    w = max(len(a) for a, _ in rows)
    print("\n" + "\n".join(f"{a:<{w}}  {b}" for a, b in rows))


if __name__ == "__main__":
    main()
