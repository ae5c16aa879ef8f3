"""A real pretrained model on one GPU: HellaSwag in float32, fp16 and float8 through the CLI, and
lm-eval tasks through `llama-run lm-eval` against the harness's own hf backend on a sample.

    python3 scripts/bench_real_model.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf --data hellaswag_val.jsonl.gz \
        --out DIR [--parts hellaswag,lm-eval,hf] [--tasks mmlu,hellaswag] [--hf-limit 100]

Converts the GGUF three times (llama-convert --dtype float32|float16|float8), scores the full
HellaSwag split with each (llama-run hellaswag --samples), and compares their decisions item by
item with float32's. Writes DIR/real.json after every step and prints a table last.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def sh(cmd: list[str], log: Path) -> tuple[int, float]:
    """Run a command, its output appended to `log`; (exit code, seconds)."""
    t0 = time.perf_counter()
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    return rc, time.perf_counter() - t0


def samples(path: Path) -> dict[int, dict]:
    lines = path.read_text().splitlines()[1:]  # after the run's line
    return {r["doc_id"]: r for r in map(json.loads, lines)}


def decisions(a: dict[int, dict], b: dict[int, dict]) -> dict:
    """How many items' acc / acc_norm predictions differ, and the largest log-likelihood gap."""
    return {"acc_decisions_differ": sum(a[d]["pred"] != b[d]["pred"] for d in a),
            "acc_norm_decisions_differ": sum(a[d]["pred_norm"] != b[d]["pred_norm"] for d in a),
            "max_dll": max(abs(x - y) for d in a for x, y in zip(a[d]["lls"], b[d]["lls"]))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", type=Path, required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/dev/shm/llamafuse-real"))
    ap.add_argument("--parts", default="hellaswag,lm-eval,hf")
    ap.add_argument("--tasks", default="mmlu,hellaswag")
    ap.add_argument("--num-fewshot", type=int, default=5, help="For --tasks mmlu (the usual 5-shot).")
    ap.add_argument("--hf-limit", type=int, default=100, help="Docs per task for the harness's hf backend sample.")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    log, report = args.out / "log.txt", {"gguf": str(args.gguf)}
    save = lambda: (args.out / "real.json").write_text(json.dumps(report, indent=2))  # noqa: E731
    parts = args.parts.split(",")
    if "hellaswag" in parts:
        runs = {}
        for dtype in ("float32", "float16", "float8"):
            folder = args.work / dtype
            rc, secs = sh(["llama-convert", "--force", "--dtype", dtype, str(args.gguf), str(folder)], log)
            if rc:
                report[dtype] = {"error": f"llama-convert exit {rc}"}
                continue
            res, smp = args.out / f"hellaswag-{dtype}.json", args.work / f"samples-{dtype}.jsonl"
            rc, wall = sh(["llama-run", "hellaswag", str(folder), "--data", args.data, "--device", "cuda",
                           "--output", str(res), "--samples", str(smp), "--force"], log)
            if rc:
                report[dtype] = {"error": f"llama-run exit {rc}"}
                continue
            r = json.loads(res.read_text())
            runs[dtype] = samples(smp)
            report[dtype] = {"acc": r["acc"], "acc_norm": r["acc_norm"], "timing": r["timing"], "convert_s": secs}
            if dtype != "float32" and "float32" in runs:
                report[dtype]["vs_float32"] = decisions(runs[dtype], runs["float32"])
            if dtype == "float8" and "float16" in runs:
                report[dtype]["vs_float16"] = decisions(runs[dtype], runs["float16"])
            print(dtype, report[dtype], flush=True)
            save()
    model = args.work / "float16"
    if "lm-eval" in parts:
        for task in args.tasks.split(","):
            fewshot = ["--num-fewshot", str(args.num_fewshot)] if task == "mmlu" else []
            out = args.out / f"lm-eval-{task}"
            rc, wall = sh(["llama-run", "lm-eval", str(model), "--tasks", task, *fewshot, "--device", "cuda",
                           "--output-path", str(out)], log)
            report[f"lm-eval {task}"] = {"exit": rc, "wall_s": wall}
            print(task, report[f"lm-eval {task}"], flush=True)
            save()
    if "hf" in parts:   # the harness's own hf backend on a sample, on an HF copy of the same weights
        hf = args.work / "hf"
        rc, _ = sh([sys.executable, "-c", "import sys; sys.path.insert(0, 'tests'); from smollm import write_hf_copy; "
                    f"write_hf_copy({str(args.gguf)!r}, {str(hf)!r})"], log)
        for task in args.tasks.split(","):
            fewshot = ["--num_fewshot", str(args.num_fewshot)] if task == "mmlu" else []
            rc, wall = sh([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
                           f"pretrained={hf},dtype=float16", "--tasks", task, *fewshot, "--device", "cuda",
                           "--batch_size", "64", "--limit", str(args.hf_limit)], log)
            report[f"hf {task}"] = {"exit": rc, "wall_s": wall, "limit": args.hf_limit}
            print(task, report[f"hf {task}"], flush=True)
            save()
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
