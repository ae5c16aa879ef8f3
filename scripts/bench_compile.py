"""Where the first batch's compile time goes, on a fresh machine (empty compile cache) and again.

    python3 scripts/bench_compile.py --out DIR [--dtype float16] [--batch-tokens 16384] [--runs cold,warm] [--no-profile]

Each run is a fresh process on one layer of a LLaMA-30B-shaped model with random weights (the
block graph is the same for every layer): seconds to import the compile stack, to build the
FlexAttention mask for a batch and to compile the block (`Model.warm_up`), the
compile stack's own phase times, and the calls that took the most time (cProfile, this thread;
--no-profile leaves it out, as it slows Python-heavy work such as compiling in this process).
Kernels compile where the runtime has them compile (`model.compile_in_process`) unless
TORCHINDUCTOR_COMPILE_THREADS is set. Caches live under DIR/cache (cold: emptied first). Writes
DIR/compile.json.
"""
from __future__ import annotations

import argparse
import cProfile
import dataclasses
import io
import json
import os
import pstats
import shutil
import subprocess
import sys
import time
from pathlib import Path

T0 = time.perf_counter()


def child(args: argparse.Namespace) -> dict:
    import torch
    out: dict = {"import_torch_s": time.perf_counter() - T0}
    prof = cProfile.Profile()
    if args.profile:
        prof.enable()
    t = time.perf_counter()
    from llamafuse.formats import RankLayout
    from llamafuse.runtime.attention import choose_attention
    from llamafuse.runtime.model import Model
    from llamafuse.runtime.packing import make_batch, prefix_forest
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_hellaswag import LLAMA_30B, random_weights, to_float8
    c = dataclasses.replace(LLAMA_30B, n_layers=1)
    dev = torch.device("cuda")
    wts = random_weights(c)
    if args.dtype == "float8":
        wts = to_float8(wts, c)
    torch.cuda.synchronize()
    out["weights_s"] = time.perf_counter() - t
    t = time.perf_counter()
    backend, mode = choose_attention(dev, c.head_dim, "auto", torch.float16)
    model = Model(c, RankLayout(c, 1, 0), wts, None, backend, mode)
    out["setup_s"] = time.perf_counter() - t
    b = make_batch(prefix_forest([]), [0], pad_to=args.batch_tokens).to(dev)
    t = time.perf_counter()
    backend.prepare(b)
    torch.cuda.synchronize()
    out["mask_s"] = time.perf_counter() - t
    t = time.perf_counter()
    model.warm_up(args.batch_tokens, wts)   # what a run does while its weights load
    torch.cuda.synchronize()
    out["block_s"] = time.perf_counter() - t
    if args.profile:
        prof.disable()
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(45)
        out["profile_cumulative"] = s.getvalue().splitlines()[-60:]
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(25)
        out["profile_tottime"] = s.getvalue().splitlines()[-35:]
    import torch._inductor.config
    out["compile_threads"] = torch._inductor.config.compile_threads
    from torch._dynamo.utils import compile_times
    out["compile_times"] = compile_times(repr="str").splitlines()
    out["total_s"] = time.perf_counter() - T0
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--dtype", default="float16", choices=["float16", "float8"])
    ap.add_argument("--batch-tokens", type=int, default=16384)
    ap.add_argument("--runs", default="cold,warm")
    ap.add_argument("--no-profile", dest="profile", action="store_false")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    cache = args.out / "cache"
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"), "TRITON_CACHE_DIR": str(cache / "triton")}
    report: dict = {"dtype": args.dtype, "batch_tokens": args.batch_tokens, "profile": args.profile,
                    "TORCHINDUCTOR_COMPILE_THREADS": os.environ.get("TORCHINDUCTOR_COMPILE_THREADS")}
    for run in args.runs.split(","):
        if run == "cold":
            shutil.rmtree(cache, ignore_errors=True)
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, __file__, "--child", "--out", str(args.out), "--dtype", args.dtype,
                            "--batch-tokens", str(args.batch_tokens), *([] if args.profile else ["--no-profile"])], env=env, capture_output=True, text=True)
        line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
        report[run] = json.loads(line[-1][7:]) if line else {"error": p.stderr[-3000:]}
        report[run]["process_s"] = time.perf_counter() - t0
        r = report[run]
        print(run, {k: round(v, 2) for k, v in r.items() if isinstance(v, float)}, flush=True)
        (args.out / "compile.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
