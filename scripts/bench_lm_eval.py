"""lm-eval tasks on a LLaMA-30B-shaped model with random weights: `llama-run lm-eval` against the
harness's own hf backend on the same GPU.

    python3 scripts/bench_lm_eval.py --tokenizer tokenizer.model --mmlu-data DIR --out DIR \
        [--parts llamafuse,hf] [--tasks mmlu,hellaswag] [--layers 60] [--hf-limits 1,3] [--hf-batch-size 64] [--device cuda] [--shape JSON]

Converts a random model as `bench_e2e.py` does (into --folder, kept for the next call), with
rotary tables for --max-seq-len positions (4096: every MMLU 5-shot prompt fits, so neither backend
cuts one), then per task: `llama-run lm-eval` on the whole task (the command's seconds and the
engine's own line), and the harness's hf backend (HFLM, fp16, --hf-batch-size) on a LlamaForCausalLM of
the same shape, built with random weights on the device, at two --limit sizes: the full task's
seconds are extrapolated from the marginal seconds per document (`bench_real_model.extrapolate`).
MMLU is the harness's 57 subject configs over local files (`count_tokens.write_configs`),
HellaSwag the local copy in tests/tasks: run from the repository root. Writes DIR/lm_eval.json
after every step.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

SCRIPTS = Path(__file__).parent
sys.path.insert(0, str(SCRIPTS))

from bench_e2e import LLAMA_30B  # noqa: E402
from bench_real_model import FULL, LIMIT_SCALE, extrapolate  # noqa: E402

TASKS = {"mmlu": (["count_mmlu_tasks"], 5), "hellaswag": (["hellaswag_local"], None)}


def shape(args: argparse.Namespace) -> dict:
    return {**LLAMA_30B, "n_layers": args.layers, "max_seq_len": args.max_seq_len, **json.loads(args.shape)}


def convert_folder(args: argparse.Namespace, report: dict) -> None:
    import torch

    from bench_e2e import RandomSource
    from llamafuse.convert.write import convert
    from llamafuse.formats import ModelConfig
    t0 = time.perf_counter()
    convert(RandomSource(ModelConfig(**shape(args)), args.tokenizer), args.folder, 1, "float16", progress=False)
    report["convert_s"] = time.perf_counter() - t0
    torch.cuda.empty_cache()


def run_llamafuse(task: str, include: Path, args: argparse.Namespace) -> dict:
    names, shots = TASKS[task]
    cmd = ["llama-run", "lm-eval", str(args.folder), "--tasks", ",".join(names), "--include-path",
           str(include if task == "mmlu" else Path("tests/tasks")), "--device", args.device]
    if shots is not None:
        cmd += ["--num-fewshot", str(shots)]
    log = args.out / f"llamafuse-{task}.txt"
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    return {"exit": rc, "wall_s": time.perf_counter() - t0,
            "engine": [ln for ln in log.read_text().splitlines() if "tokens run" in ln]}


def hf_child(args: argparse.Namespace) -> None:
    """One harness run with its hf backend; prints the seconds of `simple_evaluate` alone."""
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    c = shape(args)
    config = LlamaConfig(hidden_size=c["dim"], intermediate_size=c["ffn_dim"], num_hidden_layers=c["n_layers"],
                         num_attention_heads=c["n_heads"], num_key_value_heads=c["n_kv_heads"],
                         vocab_size=c["vocab_size"], max_position_embeddings=c["max_seq_len"],
                         rms_norm_eps=c["norm_eps"], rope_theta=c["rope_theta"], tie_word_embeddings=False)
    torch.set_default_dtype(torch.float16)
    with torch.device(args.device):
        model = LlamaForCausalLM(config).eval()
    tok = AutoTokenizer.from_pretrained(args.out / "hf-tokenizer")
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=args.hf_batch_size, max_length=c["max_seq_len"])
    names, shots = TASKS[args.hf_child]
    t0 = time.perf_counter()
    simple_evaluate(model=lm, tasks=names, num_fewshot=shots, limit=args.hf_limit,
                    task_manager=TaskManager(include_path=str(args.include)))
    print(f"RESULT {time.perf_counter() - t0}", flush=True)


def run_hf(task: str, include: Path, args: argparse.Namespace) -> dict:
    tokdir = args.out / "hf-tokenizer"   # the LLaMA tokenizer as transformers loads it
    tokdir.mkdir(exist_ok=True)
    shutil.copy(args.tokenizer, tokdir / "tokenizer.model")
    (tokdir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    walls: dict[int, float] = {}
    for limit in args.hf_limits:
        n = limit * LIMIT_SCALE[task]
        p = subprocess.run([sys.executable, __file__, "--hf-child", task, "--hf-limit", str(n), "--include",
                            str(include if task == "mmlu" else Path("tests/tasks")), "--out", str(args.out),
                            "--layers", str(args.layers), "--max-seq-len", str(args.max_seq_len), "--shape", args.shape,
                            "--tokenizer", str(args.tokenizer), "--mmlu-data", str(args.mmlu_data),
                            "--device", args.device, "--hf-batch-size", args.hf_batch_size], capture_output=True, text=True)
        (args.out / f"hf-{task}-{n}.txt").write_text(p.stdout + p.stderr)
        line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
        if not line:
            return {"exit": p.returncode, "error": p.stderr[-2000:], "wall_s_by_limit": walls}
        walls[n] = float(line[-1].split()[1])
    return {"wall_s_by_limit": walls, **extrapolate(walls, FULL[task])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokenizer", type=Path, required=True)
    ap.add_argument("--mmlu-data", type=Path, required=True, help="folder with MMLU's test.jsonl.gz and dev.jsonl.gz")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--parts", default="llamafuse,hf")
    ap.add_argument("--tasks", default="mmlu,hellaswag")
    ap.add_argument("--layers", type=int, default=60)
    ap.add_argument("--max-seq-len", type=int, default=4096)
    ap.add_argument("--shape", default="{}", help="JSON of ModelConfig fields replacing LLaMA-30B's (e.g. a small one)")
    ap.add_argument("--hf-limits", type=lambda v: [int(x) for x in v.split(",")], default=[1, 3],
                    help="two sample sizes for the hf backend: MMLU questions per subject (HellaSwag: 20x)")
    ap.add_argument("--hf-batch-size", default="64", help="HFLM batch_size: a number or auto (30B-shape MMLU: 64 and 16 run out of memory)")
    ap.add_argument("--folder", type=Path, default=Path("/dev/shm/llamafuse-lm-eval/model"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--hf-child", help=argparse.SUPPRESS)
    ap.add_argument("--hf-limit", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--include", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.hf_child:
        hf_child(args)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "lm_eval.json"
    report: dict = json.loads(path.read_text()) if path.is_file() else {"shape": shape(args)}
    save = lambda: path.write_text(json.dumps(report, indent=2))  # noqa: E731
    include = args.folder.parent / "mmlu-tasks"
    if not include.is_dir():
        from count_tokens import split_subjects, write_configs
        include.mkdir(parents=True)
        write_configs(split_subjects(args.mmlu_data, include), include)
    parts = args.parts.split(",")
    if "llamafuse" in parts and not (args.folder / "manifest.json").is_file():
        convert_folder(args, report)
        save()
    for task in args.tasks.split(","):
        for part, fn in (("llamafuse", run_llamafuse), ("hf", run_hf)):
            if part in parts:
                report[f"{part} {task}"] = fn(task, include, args)
                print(part, task, report[f"{part} {task}"], flush=True)
                save()


if __name__ == "__main__":
    main()
