"""Tokens MMLU's loglikelihood requests cost: the harness's hf backend versus llamafuse's prefix forest.

Tokenizer only, no weights are loaded. The requests are the harness's own: its installed MMLU
subject configs (prompts, few-shot examples, `first_n` sampler), run by its evaluator with a
`LlamafuseLM` that tokenizes exactly as `llama-run lm-eval` and records the requests instead of
scoring them. The data comes from local copies of cais/mmlu (one file per split holding every
subject: `test.jsonl.gz`, `dev.jsonl.gz`), split per subject into a temporary folder as the
hub's per-subject configs hold it.

    python scripts/count_tokens.py out/llama30b --mmlu-data ../shared/data/tasks/mmlu --num-fewshot 5

Counts (input tokens, i.e. context + continuation less its last token):
  each request on its own   every (question, choice) pair run separately (vLLM, hf without logits_cache)
  hf backend                one forward per distinct input (HFLM's default logits_cache: the four
                            one-token choices " A".." D" of a question share one forward)
  llamafuse                 prefix-forest tokens at --batch-tokens (what `llama-run lm-eval` runs)
  llamafuse, one forest     all requests in one forest (the floor: every distinct prefix once)
"""
from __future__ import annotations

import argparse
import gzip
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from llamafuse.formats import LlamafuseError
from llamafuse.runtime.evaluate import Request, Score
from llamafuse.runtime.lm_eval import LlamafuseLM, forest_tokens, hf_tokens


class RecordingLM(LlamafuseLM):
    """Tokenizes as the backend does; keeps the requests and scores nothing."""

    requests: list[Request]

    def score(self, requests: list[Request], names: list[str], request_type: str) -> list[Score]:
        self.requests = requests
        return [(0.0, False)] * len(requests)


def split_subjects(data: Path, out: Path) -> list[str]:
    """Write `out/{split}_{subject}.jsonl` for the test and dev splits; the subjects found."""
    rows: dict[tuple[str, str], list[str]] = defaultdict(list)
    for split in ("test", "dev"):
        with gzip.open(data / f"{split}.jsonl.gz", "rt", encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    rows[split, json.loads(line)["subject"]].append(line)
    for (split, subject), lines in rows.items():
        (out / f"{split}_{subject}.jsonl").write_text("".join(lines), encoding="utf-8")
    return sorted({s for split, s in rows if split == "test"})


def write_configs(subjects: list[str], out: Path) -> list[str]:
    """One task per subject: the harness's own config (included) reading the local files."""
    import lm_eval
    harness = Path(lm_eval.__file__).parent / "tasks" / "mmlu" / "default"
    names = []
    for s in subjects:
        config = harness / f"mmlu_{s}.yaml"
        if not config.is_file():
            raise LlamafuseError(f"subject {s!r}: the installed harness has no {config}")
        name = f"count_mmlu_{s}"
        (out / f"{name}.yaml").write_text(json.dumps({
            "include": str(config), "task": name, "tag": "count_mmlu_tasks", "dataset_path": "json",
            "dataset_name": None,
            "dataset_kwargs": {"data_files": {"test": str(out / f"test_{s}.jsonl"), "dev": str(out / f"dev_{s}.jsonl")}},
        }))
        names.append(name)
    return names


def count(model: Path, data: Path, num_fewshot: int, batch_tokens: list[int], subjects: list[str] | None,
          limit: int | None) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    t0 = time.perf_counter()
    lm = RecordingLM(model, device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        found = split_subjects(data, Path(tmp))
        missing = sorted(set(subjects or []) - set(found))
        if missing:
            raise LlamafuseError(f"{data}: no test rows for subject(s) {', '.join(missing)}")
        names = write_configs(subjects or found, Path(tmp))
        simple_evaluate(model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit, log_samples=False,
                        bootstrap_iters=0, task_manager=TaskManager(include_path=tmp))
    t1 = time.perf_counter()
    reqs = lm.requests
    result = {
        "model": str(model), "tokenizer": lm.manifest.tokenizer.file, "subjects": len(names),
        "num_fewshot": num_fewshot, "limit": limit, "requests": len(reqs),
        "contexts": len({r.context for r in reqs}),
        "tokens": {"each_request": sum(len(r.inputs) for r in reqs), "hf_backend": hf_tokens(reqs),
                   **{f"llamafuse_batch_{b}": forest_tokens(reqs, b) for b in batch_tokens},
                   "llamafuse_one_forest": forest_tokens(reqs, None)},
        "seconds": {"requests": round(t1 - t0, 1), "counting": round(time.perf_counter() - t1, 1)},
    }
    return result


def table(r: dict) -> str:
    hf = r["tokens"]["hf_backend"]
    lines = [f"MMLU {r['num_fewshot']}-shot, {r['subjects']} subjects, {r['contexts']:,} distinct contexts, "
             f"{r['requests']:,} requests, tokenizer {r['tokenizer']} of {r['model']}",
             "| who runs it | tokens | vs hf backend |", "| --- | ---: | ---: |"]
    for k, n in r["tokens"].items():
        lines.append(f"| {k.replace('_', ' ')} | {n:,} | {n / hf:.3f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", type=Path, help="a llama-convert output folder (only its tokenizer is read)")
    p.add_argument("--mmlu-data", type=Path, required=True, help="folder with test.jsonl.gz and dev.jsonl.gz")
    p.add_argument("--num-fewshot", type=int, default=5)
    p.add_argument("--batch-tokens", type=int, nargs="+", default=[16384, 2048])
    p.add_argument("--subjects", nargs="+", default=None, help="only these subjects [default: all]")
    p.add_argument("--limit", type=int, default=None, help="only the first N questions of each subject")
    p.add_argument("--json", type=Path, default=None, help="also write the counts here")
    a = p.parse_args()
    try:
        r = count(a.model, a.mmlu_data, a.num_fewshot, a.batch_tokens, a.subjects, a.limit)
    except LlamafuseError as e:
        sys.exit(f"count_tokens: error: {e}")
    print(table(r))
    print(json.dumps(r))
    if a.json:
        a.json.write_text(json.dumps(r, indent=2) + "\n")


if __name__ == "__main__":
    main()
