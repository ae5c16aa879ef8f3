"""End to end as a user runs it: a converted LLaMA-30B-shaped folder, then `llama-run hellaswag`
in a fresh process with an empty compile cache (cold) and again with the cache it left (warm).

    python3 scripts/bench_e2e.py --data DATA.jsonl.gz --tokenizer tokenizer.model --out DIR \
        [--dtype float16|float8] [--layers 60] [--max-seq-len 2048] [--tp 1] [--replicas N] [--runs cold,warm] [--folder DIR]
        [--limit N] [--load-threads N] [--eager-batches N]

Weights are random (matrices ~ N(0, 1/fan_in)), drawn on the GPU and written by llama-convert's
writer (hashes, manifest and all), unless --folder already holds a converted model. A cold run
empties the compile cache (beside the folder) first; a warm one uses what the last run left;
`--runs ""` only converts; a run named cold* is cold, any other name (warm, warm2) warm. Each
run's results.json timing (wall time from process start and its parts) and the wall time seen
from outside go to DIR/e2e.json, its stderr to DIR/NAME.log. `--limit N` scores the first N items
only: a variant's start-up and ready parts in ~15 s (its wall / eval is no measure of the target).
The target's measure is wall / steady eval: the eval time of all batches at the compiled model's
rate (`steady_eval_s`), without the warm start's uncompiled batches and wait.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from llamafuse.convert.sources import logical_shapes
from llamafuse.convert.tokenizer_files import read_tokenizer_file
from llamafuse.convert.write import convert
from llamafuse.formats import ModelConfig

LLAMA_30B = dict(dim=6656, n_layers=60, n_heads=52, n_kv_heads=52, head_dim=128, ffn_dim=17920,
                 vocab_size=32000, norm_eps=1e-6, rope_theta=10000.0, max_seq_len=2048)


class RandomSource:
    """A converter Source of random weights in Meta's logical names, drawn on the GPU if there is one."""
    layout, rotary, path = "random", "rotate-half", Path("/dev/null")

    def __init__(self, c: ModelConfig, tokenizer: Path):
        self.config, self._tok = c, tokenizer
        self._device = "cuda" if torch.cuda.is_available() else "cpu"
        self._g = torch.Generator(device=self._device).manual_seed(0)

    def tokenizer_file(self, override: Path | None = None):
        return read_tokenizer_file(self._tok, None)

    def tensor(self, name: str) -> torch.Tensor:
        shape, part = logical_shapes(self.config)[name], name.split(".")[-1]
        if len(shape) == 1:
            t = 1 + 0.1 * torch.randn(shape, generator=self._g, device=self._device)
        else:
            t = torch.randn(shape, generator=self._g, device=self._device) * (1.0 if part == "embed" else shape[1] ** -0.5)
        return t.half().cpu()


def run_cli(folder: Path, args: argparse.Namespace, cache: Path, name: str) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"), "TRITON_CACHE_DIR": str(cache / "triton")}
    results = args.out / f"{name}.json"
    cmd = ["llama-run", "hellaswag", str(folder), "--data", args.data, "--device", "cuda", "--output", str(results),
           "--force", *(["--replicas", str(args.replicas)] if args.replicas else []),
           *(["--limit", str(args.limit)] if args.limit else []),
           *(["--load-threads", str(args.load_threads)] if args.load_threads else []),
           *(["--eager-batches", str(args.eager_batches)] if args.eager_batches is not None else [])]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    outside = time.perf_counter() - t0
    (args.out / f"{name}.log").write_text(p.stderr)
    print(p.stdout, p.stderr[-1500:], sep="\n", flush=True)
    if p.returncode != 0:
        return {"error": p.stderr[-2000:], "returncode": p.returncode}
    r = json.loads(results.read_text())
    t = r["timing"]
    print(f"{name}: wall {t['wall_s']:.1f} s (outside {outside:.1f} s) = start-up {t['startup_s']:.1f} + ready "
          f"{t['ready_s']:.1f} (ranks started {t['rank_start_s']:.1f}; load {t['load_s']:.1f} | build "
          f"{t['build_s']:.1f} + compile {t['compile_s']:.1f}; swap {t['swap_s']:.1f}; model ready "
          f"{t['model_ready_s']:.1f}) + eval {t['eval_s']:.1f} ({t['eager_batches']} uncompiled {t['eager_s']:.1f} + "
          f"wait {t['compile_wait_s']:.1f}; steady {t['steady_eval_s']:.1f}) + other {t['other_s']:.1f}; "
          f"wall / steady eval {t['wall_s'] / t['steady_eval_s']:.3f}", flush=True)
    return {"timing": t, "outside_wall_s": outside, "acc": r["acc"], "acc_norm": r["acc_norm"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--tokenizer", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--layers", type=int, default=60)
    ap.add_argument("--max-seq-len", type=int, default=2048, help="rotary table positions (lm-eval's MMLU: 4096)")
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks to convert for")
    ap.add_argument("--replicas", type=int, default=None, help="llama-run --replicas [default: all GPUs / tp]")
    ap.add_argument("--runs", default="cold,warm")
    ap.add_argument("--folder", type=Path, default=Path("/dev/shm/llamafuse-e2e/model"))
    ap.add_argument("--limit", type=int, default=None, help="llama-run hellaswag --limit (start-up variants)")
    ap.add_argument("--load-threads", type=int, default=None, help="llama-run hellaswag --load-threads")
    ap.add_argument("--eager-batches", type=int, default=None, help="llama-run hellaswag --eager-batches")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "dtype": args.dtype,
                    "layers": args.layers, "tp": args.tp, "replicas": args.replicas, "limit": args.limit,
                    "load_threads": args.load_threads, "eager_batches": args.eager_batches,
                    "pycache_prefix": os.environ.get("PYTHONPYCACHEPREFIX")}
    save = lambda: (args.out / "e2e.json").write_text(json.dumps(report, indent=2))  # noqa: E731
    if not (args.folder / "manifest.json").is_file():
        c = ModelConfig(**{**LLAMA_30B, "n_layers": args.layers, "max_seq_len": args.max_seq_len})
        t0 = time.perf_counter()
        convert(RandomSource(c, args.tokenizer), args.folder, args.tp, args.dtype, progress=False)
        report["convert_s"] = time.perf_counter() - t0
        print(f"converted in {report['convert_s']:.1f} s", flush=True)
        save()
    torch.cuda.empty_cache()
    cache = args.folder.parent / "compile-cache"
    for name in filter(None, args.runs.split(",")):
        if name.startswith("cold"):
            shutil.rmtree(cache, ignore_errors=True)
        report[name] = run_cli(args.folder, args, cache, name)
        save()
    sys.exit(0)


if __name__ == "__main__":
    main()
