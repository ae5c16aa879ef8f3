"""Peak memory of llama-convert on a scaled random Meta checkpoint (is it bounded by a layer?).

    python3 scripts/convert_memory.py [--dim 2048 --layers 12 --heads 16 --shards 4 --folder DIR]

Prints one JSON line and one human line. Memory is sampled from the converting subprocess's
/proc/<pid>/status. VmHWM (peak resident set) counts file-backed pages too: the memory-mapped
source shards and the page cache of what is read, which the kernel can drop at any time; so it
grows with the model even when the converter holds nothing. RssAnon counts only anonymous
pages (heap, tensors the converter allocated), which is the honest measure of what it holds.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from checkpoints import ffn_dim, write_meta_checkpoint  # noqa: E402

LLAMA_TOKENIZER = ROOT.parent / "shared" / "data" / "llama-tokenizer" / "tokenizer.model"
MULTIPLE_OF = 256
# The child reports its anonymous RSS after opening the source (torch imported, shards mapped),
# converts, then reports its own final VmHWM (the parent can no longer read it once it exits).
CHILD = """
import json, sys
from llamafuse.convert.sources import open_source
from llamafuse.convert.write import convert
def status():
    return {l.split(':')[0]: int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith(('Vm', 'Rss'))}
src = open_source(sys.argv[1])
print(json.dumps({"baseline": status()["RssAnon"]}), flush=True)
s = convert(src, sys.argv[2], int(sys.argv[3]), sys.argv[4], progress=False)
print(json.dumps({"seconds": s.seconds, "vmhwm": status()["VmHWM"]}), flush=True)
"""


def _read_status(pid: int) -> dict[str, int]:
    try:
        with open(f"/proc/{pid}/status") as f:
            return {l.split(":")[0]: int(l.split()[1]) * 1024 for l in f if l.startswith(("Vm", "Rss"))}
    except (FileNotFoundError, ProcessLookupError, ValueError, IndexError):
        return {}


def sizes(dim: int, layers: int, heads: int, vocab: int, itemsize: int) -> tuple[int, int]:
    """(model bytes, bytes of the largest unit the converter streams: a block, the embedding or the head)."""
    ffn = ffn_dim(dim, MULTIPLE_OF)
    block = (4 * dim * dim + 3 * dim * ffn + 2 * dim) * itemsize
    return layers * block + 2 * vocab * dim * itemsize + dim * itemsize, max(block, vocab * dim * itemsize)


def measure(folder: Path, *, dim: int = 2048, layers: int = 12, heads: int = 16, shards: int = 4, tp: int = 4,
            vocab: int = 32000, tokenizer: Path = LLAMA_TOKENIZER, dtype: str = "float16",
            interval: float = 0.002) -> dict[str, int | float]:
    """Write the checkpoint to folder/src, convert it to folder/out in a subprocess, return the figures."""
    folder = Path(folder)
    tdtype = getattr(torch, dtype)
    write_meta_checkpoint(folder / "src", dim=dim, n_layers=layers, n_heads=heads, vocab=vocab,
                          multiple_of=MULTIPLE_OF, shards=shards, tokenizer=tokenizer, dtype=tdtype)
    model_bytes, largest = sizes(dim, layers, heads, vocab, tdtype.itemsize)
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(folder / "src"), str(folder / "out"), str(tp), dtype],
                            stdout=subprocess.PIPE, text=True)
    baseline = json.loads(proc.stdout.readline())["baseline"]  # setup done; conversion starts now
    peak_anon = peak_hwm = 0
    while proc.poll() is None:
        st = _read_status(proc.pid)
        peak_anon, peak_hwm = max(peak_anon, st.get("RssAnon", 0)), max(peak_hwm, st.get("VmHWM", 0))
        time.sleep(interval)
    rest, _ = proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"conversion failed with exit status {proc.returncode}")
    final = json.loads(rest.strip().splitlines()[-1])
    return {"model_bytes": model_bytes, "largest_layer_bytes": largest, "baseline_rss_anon": baseline,
            "peak_rss_anon": peak_anon, "rss_anon_growth": peak_anon - baseline,
            "peak_vmhwm": max(peak_hwm, final["vmhwm"]), "seconds": round(final["seconds"], 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--tp", type=int, default=4)
    ap.add_argument("--folder", type=Path, default=None, help="work folder [default: a temporary one]")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=a.folder) as tmp:
        r = measure(Path(tmp), dim=a.dim, layers=a.layers, heads=a.heads, shards=a.shards, tp=a.tp)
    print(json.dumps(r))
    mb = 1 / 2**20
    print(f"model {r['model_bytes'] * mb:.0f} MiB, largest layer {r['largest_layer_bytes'] * mb:.0f} MiB: "
          f"anonymous RSS grew {r['rss_anon_growth'] * mb:.0f} MiB "
          f"({r['rss_anon_growth'] / r['largest_layer_bytes']:.2f} x largest layer), peak VmHWM "
          f"{r['peak_vmhwm'] * mb:.0f} MiB (incl. reclaimable file pages), {r['seconds']:.1f} s")


if __name__ == "__main__":
    main()
