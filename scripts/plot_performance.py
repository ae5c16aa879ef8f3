"""Draw docs/performance.png from the H200 runs in docs/bench/.

    python3 scripts/plot_performance.py docs/bench docs/performance.png

Left: seconds for the full HellaSwag split on the LLaMA-30B shape: the engine in float8 and fp16
(run 8), `llama-run hellaswag` from process start, warm and cold, on one GPU and on two as tp 2
and as 2 replicas (run 27, fp16, with the warm start), HF transformers as lm-eval runs it
(session 2, run 5). Middle: one layer's milliseconds per variant (run 8). Right: a
real model's accuracy (SmolLM2-135M, full split) in float32, fp16 and float8 (run 11).
Needs matplotlib (not a llamafuse dependency: `pip install matplotlib`).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def main(bench: Path, out: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("plot_performance: needs matplotlib (pip install matplotlib)")
    r8 = json.loads((bench / "h200-run8-fp8.json").read_text())
    e2e = json.loads((bench / "h200-run27.json").read_text())
    r5 = json.loads((bench / "h200-run5-all-parts.json").read_text())
    r11 = json.loads((bench / "h200-run11-smollm2.json").read_text())["smollm2_hellaswag"]
    bars = [("llamafuse float8 (engine)", r8["fp8"]["seconds"], "#1b5e8c"),
            ("llamafuse fp16 (engine)", r8["eval"]["seconds"], "#2a7ab9"),
            *[(f"llama-run, fp16, {where}, {run}", e2e[key][run]["timing"]["wall_s"], color)
              for key, where, colors in (("tp1_60", "process start to results", ("#6aa6d6", "#9cc4e6")),
                                         ("tp2_60", "tp 2 on two H200s", ("#4e8f5a", "#8fc79a")),
                                         ("rep2_60", "2 replicas on two H200s", ("#3d8c8c", "#86c2c2")))
              for run, color in zip(("warm", "cold"), colors)],
            ("HF transformers, lm-eval style, batch 64", r5["hf"]["batch64"]["extrapolated_s"], "#d98c3a"),
            ("HF transformers, lm-eval style, batch 1", r5["hf"]["batch1"]["extrapolated_s"], "#d98c3a")]
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(17, 4.2), gridspec_kw={"width_ratios": [3, 2, 1.4]})
    a.barh([n for n, _, _ in bars][::-1], [s for _, s, _ in bars][::-1], color=[c for _, _, c in bars][::-1])
    a.set_xscale("log")
    a.set_xlabel("seconds for the full HellaSwag validation split (log scale)")
    for i, (_, s, _) in enumerate(bars[::-1]):
        a.text(s * 1.05, i, f"{s:,.0f} s", va="center")
    a.set_xlim(60, max(s for _, s, _ in bars) * 3)
    a.set_title(f"LLaMA-30B shape, {r8['device']} (one, or two where said)")
    layers = {k: v for k, v in r8["layers"].items() if isinstance(v, dict)}
    b.bar(range(len(layers)), [v["ms"] for v in layers.values()],
          color=["#999999" if k.startswith("GEMMs") else "#2a7ab9" for k in layers])
    b.set_xticks(range(len(layers)), list(layers), rotation=25, ha="right", fontsize=7)
    b.set_ylabel(f"ms per layer, {r8['layers']['tokens']} packed tokens")
    b.set_title("one transformer layer")
    dtypes = ["float32", "float16", "float8"]
    for k, (metric, color) in enumerate((("acc", "#9cc4e6"), ("acc_norm", "#2a7ab9"))):
        vals = [100 * r11[d][metric] for d in dtypes]
        c.bar([i + 0.4 * k for i in range(3)], vals, width=0.4, color=color, label=metric)
        for i, v in enumerate(vals):
            c.text(i + 0.4 * k, v + 0.3, f"{v:.2f}", ha="center", fontsize=7)
    c.set_xticks([i + 0.2 for i in range(3)], dtypes)
    c.set_ylim(30, 44)
    c.set_ylabel("HellaSwag %, 10,042 items")
    c.set_title("SmolLM2-135M by precision")
    c.legend(loc="upper right", fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(Path(sys.argv[1]), Path(sys.argv[2]))
