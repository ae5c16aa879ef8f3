"""HellaSwag on a LLaMA-30B-shaped model on one GPU: llamafuse's engine in fp16 and float8.

    python3 scripts/bench_hellaswag.py --data DATA.jsonl.gz --tokenizer tokenizer.model --out DIR \
        [--parts layers,eval,fp8,load] [--layers 60] [--limit N]

Parts: fp8logits (full logits of float8 against fp16 on one batch), layers (one layer's time per variant: the four GEMMs alone in fp16 and float8, the compiled
FlexAttention block in fp16 and float8, the V100 path eager and with the work around attention
compiled), eval (the full split in fp16 through the engine `llama-run hellaswag` uses; GPU
busy/idle timeline, recompilations after the first batch, the GEMM ceiling measured right
after), fp8 (the same in float8, and its item log-likelihoods against fp16), load (a converted
file of --load-layers layers from /dev/shm onto the GPU: GB/s and pointer alignment). Weights are
random (matrices ~ N(0, 1/fan_in)), generated on the GPU in the converted tp=1 layout
(formats.rank_tensor_specs). Writes DIR/bench.json after every part and prints a table last.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import traceback
from pathlib import Path

import torch

from llamafuse.convert.plan import rope_tables
from llamafuse.convert.quantize import quantize_rows
from llamafuse.formats import ModelConfig, RankLayout, names, rank_tensor_specs
from llamafuse.formats.tokenizer import read_tokenizer
from llamafuse.runtime import hellaswag
from llamafuse.runtime.attention import BlockAttention, FlexAttention, mask_tile
from llamafuse.runtime.evaluate import Group, Settings, prepare, score_groups
from llamafuse.runtime.model import Model
from llamafuse.runtime.packing import pack_groups
from llamafuse.runtime.parallel import Context

from bench_e2e import RandomSource  # scripts/ is on the path when this file runs

LLAMA_30B = ModelConfig(dim=6656, n_layers=60, n_heads=52, n_kv_heads=52, head_dim=128, ffn_dim=17920,
                        vocab_size=32000, norm_eps=1e-6, rope_theta=10000.0, max_seq_len=2048)
DEV = torch.device("cuda")
CTX = Context(0, 1, 1, DEV, None, 0, 0, 1, time.time())


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


def random_weights(c: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """A tp=1 float16 rank file's tensors, random, generated on the GPU."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    cos, sin = rope_tables(c)
    out = {}
    for s in rank_tensor_specs(c, 1, "float16"):
        if s.name in (names.ROPE_COS, names.ROPE_SIN):
            out[s.name] = (cos if s.name == names.ROPE_COS else sin).to(DEV)
        elif len(s.shape) == 1:
            out[s.name] = (1 + 0.1 * torch.randn(s.shape, generator=g, device=DEV)).half()
        else:
            std = 1.0 if s.name == names.EMBED else s.shape[1] ** -0.5
            out[s.name] = torch.empty(s.shape, dtype=torch.float16, device=DEV).normal_(0, std, generator=g)
    return out


def to_float8(wts: dict[str, torch.Tensor], c: ModelConfig) -> dict[str, torch.Tensor]:
    """The same weights as a float8 rank file holds them (matrices e4m3 + per-row scales)."""
    out = {}
    for s in rank_tensor_specs(c, 1, "float8"):
        if s.name.endswith(".scale"):
            continue
        if s.dtype == torch.float8_e4m3fn:
            out[s.name], out[names.scale(s.name)] = quantize_rows(wts[s.name])
        else:
            out[s.name] = wts[s.name]
    return out


def layer_flops(c: ModelConfig) -> int:
    """Multiply-add FLOPs per token of one layer's matrix products."""
    return 2 * (c.dim * (c.q_dim + 2 * c.kv_dim) + c.q_dim * c.dim + 3 * c.dim * c.ffn_dim)


def layer_gemms(c: ModelConfig, n: int, fp8: bool):
    """A closure running one layer's four products at n tokens (activations quantized ahead for
    float8, i.e. the products alone)."""
    shapes = {"qkv": (c.q_dim + 2 * c.kv_dim, c.dim), "o": (c.dim, c.q_dim), "gate_up": (2 * c.ffn_dim, c.dim),
              "down": (c.dim, c.ffn_dim)}
    w = {k: torch.randn(s, dtype=torch.float16, device=DEV) * 0.01 for k, s in shapes.items()}
    x = {k: torch.randn(n, s[1], dtype=torch.float16, device=DEV) for k, s in shapes.items()}
    if not fp8:
        return lambda: [x[k] @ w[k].T for k in shapes]
    q = {k: quantize_rows(v) for k, v in w.items()}
    xq = {k: quantize_rows(v) for k, v in x.items()}
    return lambda: [torch._scaled_mm(xq[k][0], q[k][0].T, scale_a=xq[k][1][:, None], scale_b=q[k][1][None],
                                     out_dtype=torch.bfloat16, use_fast_accum=True) for k in shapes]


def part_layers(n: int, groups: list[Group], report: dict) -> None:
    one = ModelConfig(**{**LLAMA_30B.to_dict(), "n_layers": 1})
    out = {}
    for label, fp8 in (("GEMMs fp16", False), ("GEMMs float8", True)):
        ms = bench_ms(layer_gemms(one, n, fp8))
        out[label] = {"ms": ms, "tflops": layer_flops(one) * n / ms / 1e9}
    wts = random_weights(one)
    w8 = to_float8(wts, one)
    first = [groups[i] for i in pack_groups([[r.inputs for r in g.requests] for g in groups], n)[len(groups) // 200]]
    flex = lambda: FlexAttention(mask_tile(one.head_dim, torch.float16))  # noqa: E731
    variants = (("flex block fp16", wts, flex, "block"), ("flex block float8", w8, flex, "block"),
                ("V100 path: blocks, eager", wts, BlockAttention, None),
                ("V100 path: blocks, compiled around attention", wts, BlockAttention, "around-attention"))
    for label, w, attn_cls, mode in variants:
        attn = attn_cls()
        model = Model(one, RankLayout(one, 1, 0), w, None, attn, mode)
        b = prepare(first, n if attn.fixed_shape else None).batch.to(DEV)
        h = w[names.EMBED][b.tokens]
        cos, sin = w[names.ROPE_COS][b.positions][:, None], w[names.ROPE_SIN][b.positions][:, None]
        t0 = time.perf_counter()
        with torch.inference_mode():
            st = attn.prepare(b)
            model.layer(0, h, cos, sin, st)
            torch.cuda.synchronize()
            first_s = time.perf_counter() - t0
            ms = bench_ms(lambda: model.layer(0, h, cos, sin, st))
        out[label] = {"ms": ms, "first_call_s": first_s}
        print(f"layer {label}: {ms:.2f} ms (first call {first_s:.1f} s)", flush=True)
    report["layers"] = {"tokens": n, **out}


def unique_graphs() -> int:
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])


def run_eval(c: ModelConfig, wts: dict, groups: list[Group], items: list, args: argparse.Namespace, label: str) -> dict:
    model = Model(c, RankLayout(c, 1, 0), wts, None, FlexAttention(mask_tile(c.head_dim, torch.float16)), "block")
    settings = Settings(args.batch_tokens, progress=True, label=label)
    t0 = time.perf_counter()
    score_groups(CTX, model, groups[:64], settings)          # compile / warm up
    torch.cuda.synchronize()
    warm_s, graphs = time.perf_counter() - t0, unique_graphs()
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
    run = score_groups(CTX, model, groups, settings)
    busy = [s.elapsed_time(e) / 1e3 for s, e in events]
    idle = [e.elapsed_time(s2) / 1e3 for (_, e), (s2, _) in zip(events, events[1:])]
    lls = {k: [ll for ll, _ in v] for k, v in run.scores.items()}
    metrics = hellaswag.score(items, [lls[it.doc_id] for it in items])
    body = 2 * (c.n_params() - 2 * c.vocab_size * c.dim)
    batches = pack_groups([[r.inputs for r in g.requests] for g in groups], args.batch_tokens)
    rows = sum(prepare([groups[i] for i in b]).batch.select.numel() for b in batches)
    flops = body * run.tokens + 2 * c.vocab_size * c.dim * rows
    gemms = layer_gemms(c, args.batch_tokens, False)
    ceiling = layer_flops(c) * args.batch_tokens / bench_ms(gemms) / 1e9
    out = {"items": len(groups), "tokens": run.tokens, "scored_rows": rows, "flops": flops, "seconds": run.eval_s,
           "warmup_s": warm_s, "tokens_per_s": run.tokens / run.eval_s,
           "tflops": flops / run.eval_s / 1e12, "fp16_gemm_ceiling_tflops_after": ceiling,
           "fraction_of_fp16_ceiling": flops / run.eval_s / 1e12 / ceiling,
           "recompiles_after_warmup": unique_graphs() - graphs,
           "gpu_busy_s": sum(busy), "gpu_idle_between_batches_s": sum(idle), "batches": len(busy),
           "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9, "batch_tokens": args.batch_tokens,
           "acc": metrics["acc"], "acc_norm": metrics["acc_norm"]}
    print(f"{label}: {run.eval_s:.1f} s for {len(groups)} items, {run.tokens:,} tokens, {out['tflops']:.0f} TFLOP/s; "
          f"GPU idle {sum(idle):.2f} s; recompiles after warm-up {out['recompiles_after_warmup']}", flush=True)
    out["_lls"] = lls
    return out


def compare_lls(items: list, a: dict, b: dict) -> dict:
    """Item log-likelihoods of run a against run b: largest difference and decisions that differ."""
    d, acc, norm = 0.0, 0, 0
    for it in items:
        x, y = a[it.doc_id], b[it.doc_id]
        d = max(d, max(abs(p - q) for p, q in zip(x, y)))
        px, py = hellaswag.predictions(it, x), hellaswag.predictions(it, y)
        acc += px[0] != py[0]
        norm += px[1] != py[1]
    return {"items": len(items), "max_dll": d, "acc_decisions_differ": acc, "acc_norm_decisions_differ": norm}


def part_fp8_logits(c: ModelConfig, wts: dict, groups: list[Group], n: int, report: dict) -> None:
    """Full logits of float8 against fp16 (same weights) on one real packed batch: relative
    error and top-1 agreement over every position."""
    b = prepare([groups[i] for i in pack_groups([[r.inputs for r in g.requests] for g in groups], n)[7]])
    batch = b.batch.to(DEV)
    batch.select = torch.arange(batch.tokens.numel(), device=DEV)
    out = {}
    for label, w in (("fp16", wts), ("float8", to_float8(wts, c))):
        out[label] = Model(c, RankLayout(c, 1, 0), w, None, BlockAttention(), None).logits(batch).double()
    a, r = out["float8"], out["fp16"]
    report["fp8_logits"] = {"positions": a.shape[0], "rel_err": float((a - r).norm() / r.norm()),
                            "max_abs_err": float((a - r).abs().max()),
                            "top1_agreement": float((a.argmax(-1) == r.argmax(-1)).double().mean())}
    print("float8 vs fp16 logits:", report["fp8_logits"], flush=True)


def part_load(args: argparse.Namespace, report: dict) -> None:
    from llamafuse.convert.write import convert
    from llamafuse.formats import load_manifest
    from llamafuse.runtime.load import load_rank
    c = ModelConfig(**{**LLAMA_30B.to_dict(), "n_layers": args.load_layers})
    folder = Path(tempfile.mkdtemp(dir="/dev/shm")) / "ckpt"
    t0 = time.perf_counter()
    convert(RandomSource(c, Path(args.tokenizer)), folder, 1, "float16", progress=False)  # bench_e2e.py's
    write_s = time.perf_counter() - t0
    m = load_manifest(folder)
    runs, misaligned = [], None
    for _ in range(3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        t = load_rank(folder, m, 0, DEV)
        torch.cuda.synchronize()
        runs.append(time.perf_counter() - t0)
        misaligned = sum(x.data_ptr() % 16 != 0 for x in t.values())
        del t
        torch.cuda.empty_cache()
    size = m.ranks[0].bytes
    report["load"] = {"bytes": size, "layers": args.load_layers, "seconds": statistics.median(runs),
                      "gb_per_s": size / statistics.median(runs) / 1e9, "convert_write_s": write_s,
                      "tensors_not_16_byte_aligned": misaligned}
    print(f"load: {size / 1e9:.1f} GB in {statistics.median(runs):.2f} s, {misaligned} tensors not 16-byte aligned", flush=True)
    import shutil
    shutil.rmtree(folder.parent)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--parts", default="layers,eval,fp8,load")
    ap.add_argument("--layers", type=int, default=60, help="Layers of the 30B shape (60 = the real model).")
    ap.add_argument("--limit", type=int, default=None, help="Items of the split (default all 10042).")
    ap.add_argument("--batch-tokens", type=int, default=16384)
    ap.add_argument("--load-layers", type=int, default=8)
    args = ap.parse_args()
    parts = args.parts.split(",")
    torch.backends.cuda.matmul.allow_tf32 = False
    c = ModelConfig(**{**LLAMA_30B.to_dict(), "n_layers": args.layers})
    t0 = time.perf_counter()
    items = hellaswag.build_items(hellaswag.load_docs(args.data, args.limit),
                                  read_tokenizer(Path(args.tokenizer), c.vocab_size), 1)
    groups = [it.group() for it in items]
    report: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "layers": args.layers,
                    "tokenize_s": time.perf_counter() - t0}
    args.out.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        clean = {k: ({kk: vv for kk, vv in v.items() if not kk.startswith("_")} if isinstance(v, dict) else v)
                 for k, v in report.items()}
        (args.out / "bench.json").write_text(json.dumps(clean, indent=2))
    def part(name: str, fn) -> None:
        """Run one part; a failure is recorded and the next part still runs (device time is dear)."""
        if name not in parts:
            return
        try:
            fn()
        except Exception as e:  # noqa: BLE001
            report.setdefault("errors", {})[name] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        save()
        torch.cuda.empty_cache()

    part("layers", lambda: part_layers(args.batch_tokens, groups, report))
    wts = random_weights(c) if {"eval", "fp8", "fp8logits"} & set(parts) else {}
    part("fp8logits", lambda: part_fp8_logits(c, wts, groups, args.batch_tokens, report))
    part("fp8", lambda: report.__setitem__("fp8", run_eval(c, to_float8(wts, c), groups, items, args, "hellaswag float8")))
    part("eval", lambda: report.__setitem__("eval", run_eval(c, wts, groups, items, args, "hellaswag fp16")))
    if "_lls" in report.get("fp8", {}) and "_lls" in report.get("eval", {}):
        report["fp8"]["vs_fp16"] = compare_lls(items, report["fp8"]["_lls"], report["eval"]["_lls"])
        print("float8 vs fp16:", report["fp8"]["vs_fp16"], flush=True)
        save()
    wts.clear()
    part("load", lambda: part_load(args, report))
    print_table(report)


def print_table(r: dict) -> None:
    rows = [(f"one layer: {k}", f"{v['ms']:.2f} ms" + (f" ({v['tflops']:.0f} TFLOP/s)" if "tflops" in v else ""))
            for k, v in r.get("layers", {}).items() if isinstance(v, dict)]
    for key in ("eval", "fp8"):
        e = r.get(key)
        if e:
            rows.append((f"{key} full split", f"{e['seconds']:.1f} s ({e['tokens']:,} tokens, {e['tflops']:.0f} TFLOP/s, "
                                              f"warm-up {e['warmup_s']:.1f} s, recompiles {e['recompiles_after_warmup']})"))
    if "vs_fp16" in r.get("fp8", {}):
        v = r["fp8"]["vs_fp16"]
        rows.append(("float8 vs fp16", f"max |dll| {v['max_dll']:.3f}, decisions differ {v['acc_decisions_differ']} (acc) / "
                                       f"{v['acc_norm_decisions_differ']} (acc_norm) of {v['items']}"))
    if "load" in r:
        rows.append(("load page cache -> GPU", f"{r['load']['gb_per_s']:.1f} GB/s, {r['load']['tensors_not_16_byte_aligned']} misaligned"))
    w = max((len(a) for a, _ in rows), default=0)
    print("\n" + "\n".join(f"{a:<{w}}  {b}" for a, b in rows))


if __name__ == "__main__":
    main()
