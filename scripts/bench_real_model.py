"""A real pretrained model on one GPU: HellaSwag in float32, fp16 and float8 through the CLI, and
lm-eval tasks through `llama-run lm-eval` against the harness's own hf backend on a sample.

    python3 scripts/bench_real_model.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf --data hellaswag_val.jsonl.gz \
        --mmlu-data DIR --out DIR [--parts hellaswag,lm-eval,hf] [--hf-limits 5,15]

Converts the GGUF three times (llama-convert --dtype float32|float16|float8), scores the full
HellaSwag split with each (llama-run hellaswag --samples), and compares their decisions item by
item with float32's; then full MMLU 5-shot (the harness's 57 subject configs over local files) and
HellaSwag through `llama-run lm-eval` on the fp16 folder, and the harness's hf backend at two
--limit sizes (the full task's time extrapolated from the marginal time per document). Run from the repository root (the local task configs read
../shared/data). Writes DIR/real.json after every step.
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


FULL = {"mmlu": (14042, 57), "hellaswag": (10042, 1)}   # (documents, tasks the limit applies to)
LIMIT_SCALE = {"mmlu": 1, "hellaswag": 20}   # a sample size is MMLU questions per subject; HellaSwag items: 20x


def extrapolate(walls: dict[int, float], full: tuple[int, int]) -> dict:
    """The full task's seconds from two runs at different --limit: the marginal seconds per
    document times the documents, plus what the smaller run spent outside its documents."""
    (n1, w1), (n2, w2) = sorted(walls.items())[:2]
    docs, tasks = full
    per_doc = (w2 - w1) / ((n2 - n1) * tasks)
    return {"s_per_doc": per_doc, "fixed_s": w1 - per_doc * n1 * tasks, "full_s_extrapolated": w1 + per_doc * (docs - n1 * tasks)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", type=Path, required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("/dev/shm/llamafuse-real"))
    ap.add_argument("--parts", default="hellaswag,lm-eval,hf")
    ap.add_argument("--mmlu-data", type=Path, required=True, help="folder with MMLU's test.jsonl.gz and dev.jsonl.gz")
    ap.add_argument("--hf-limits", type=lambda v: [int(x) for x in v.split(",")], default=[5, 15],
                    help="two sample sizes for the harness's hf backend: MMLU questions per subject (HellaSwag: 20x)")
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
    model, include = args.work / "float16", args.work / "mmlu-tasks"
    if {"lm-eval", "hf"} & set(parts):   # the harness's 57 MMLU subject configs over the local files
        sys.path.insert(0, str(Path(__file__).parent))
        from count_tokens import split_subjects, write_configs
        include.mkdir(parents=True, exist_ok=True)
        write_configs(split_subjects(args.mmlu_data, include), include)
    tasks = {"mmlu": ["--include-path", str(include), "--tasks", "count_mmlu_tasks", "--num-fewshot", "5"],
             "hellaswag": ["--include-path", "tests/tasks", "--tasks", "hellaswag_local"]}
    if "lm-eval" in parts:
        for task, targs in tasks.items():
            out = args.out / f"lm-eval-{task}.txt"
            t0 = time.perf_counter()
            with open(out, "w") as f:
                rc = subprocess.run(["llama-run", "lm-eval", str(model), *targs, "--device", "cuda"],
                                    stdout=f, stderr=subprocess.STDOUT).returncode
            report[f"lm-eval {task}"] = {"exit": rc, "wall_s": time.perf_counter() - t0,
                                         "engine": [ln for ln in out.read_text().splitlines() if "tokens run" in ln]}
            print(task, report[f"lm-eval {task}"], flush=True)
            save()
    if "hf" in parts:   # the harness's own hf backend on two samples, on an HF copy of the same weights
        hf = args.work / "hf"
        rc, _ = sh([sys.executable, "-c", "import sys; from pathlib import Path; sys.path.insert(0, 'tests'); "
                    f"from smollm import write_hf_copy; write_hf_copy(Path({str(args.gguf)!r}), Path({str(hf)!r}))"], log)
        if rc:
            sys.exit(f"writing the Hugging Face copy failed (exit {rc}); see {log}")
        for task, targs in tasks.items():
            harness = [a.replace("--include-path", "--include_path").replace("--num-fewshot", "--num_fewshot")
                       for a in targs]
            walls = {}
            for limit in args.hf_limits:
                n = limit * LIMIT_SCALE[task]
                rc, walls[n] = sh([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
                                   f"pretrained={hf},dtype=float16", *harness, "--device", "cuda",
                                   "--batch_size", "64", "--limit", str(n)], log)
                report[f"hf {task}"] = {"exit": rc, "wall_s_by_limit": walls}
                save()
            report[f"hf {task}"].update(extrapolate(walls, FULL[task]))
            print(task, report[f"hf {task}"], flush=True)
            save()
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
