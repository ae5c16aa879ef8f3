"""Draw docs/performance.png from a session-2 bench.json (docs/bench/h200-run5-all-parts.json).

    python3 scripts/plot_performance.py BENCH.json OUT.png [EVAL.json]

EVAL.json, if given, is a later run whose eval part replaces BENCH's (e.g. the final code's run):
    python3 scripts/plot_performance.py docs/bench/h200-run5-all-parts.json docs/performance.png \
        docs/bench/h200-run7-final.json

Needs matplotlib (not a llamafuse dependency: `pip install matplotlib`).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def main(bench: Path, out: Path, final: Path | None = None) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("plot_performance: needs matplotlib (pip install matplotlib)")
    r = json.loads(bench.read_text())
    e = json.loads(final.read_text())["eval"] if final else r["eval"]
    ceiling = r["ceiling"]["tflops"] * 1e12
    bars = [("floor: shared contexts, 690 TFLOP/s", e["shared_context_flops"] / 690e12),
            ("work done / measured GEMM ceiling", e["flops"] / ceiling),
            ("llamafuse", e["seconds"]), ("HF transformers, batch 64", r["hf"]["batch64"]["extrapolated_s"]),
            ("HF transformers, batch 1", r["hf"]["batch1"]["extrapolated_s"])]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4), gridspec_kw={"width_ratios": [3, 2]})
    colors = ["#bbbbbb", "#999999", "#2a7ab9", "#d98c3a", "#d98c3a"]
    a.barh([n for n, _ in bars][::-1], [s for _, s in bars][::-1], color=colors[::-1])
    a.set_xscale("log")
    a.set_xlabel("seconds for the full HellaSwag validation split (log scale)")
    for i, (_, s) in enumerate(bars[::-1]):
        a.text(s * 1.05, i, f"{s:,.0f} s", va="center")
    a.set_xlim(100, max(s for _, s in bars) * 3)
    a.set_title(f"LLaMA-30B shape, fp16, one {r['device']}")
    layer = r["layer"]
    names = list(layer)
    b.bar(range(len(names) + 1), [r["ceiling"]["layer_gemm_ms"]] + [layer[n]["ms"] for n in names],
          color=["#999999"] + ["#2a7ab9"] * len(names))
    b.set_xticks(range(len(names) + 1), ["GEMMs only"] + names, rotation=20, ha="right", fontsize=8)
    b.set_ylabel(f"ms per layer, {r['ceiling']['tokens']} packed tokens")
    b.set_title("one transformer layer")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4):
        sys.exit(__doc__)
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]) if len(sys.argv) == 4 else None)
