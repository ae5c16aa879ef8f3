"""Rank files are standard safetensors (gap-free, any reader opens them), and the reader enforces
every rule docs/format.md states: contiguous data, the format's tensor order, its metadata."""
from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch

from llamafuse.convert.sources import open_source
from llamafuse.convert.write import convert
from llamafuse.formats import LlamafuseError, load_manifest
from llamafuse.runtime.load import ALIGN, check_rank_file, load_rank

from checkpoints import write_meta_checkpoint
from conftest import check_standard_safetensors


@pytest.fixture(scope="module")
def odd_models(tmp_path_factory, stories_tokenizer: Path) -> dict[str, Path]:
    """Models whose tensor sizes are not multiples of 64 bytes (dim 72) or 16 (dim 36 in fp16)."""
    root = tmp_path_factory.mktemp("odd")
    srcs = {}
    for dim in (72, 36):
        srcs[dim] = root / f"src-{dim}"
        write_meta_checkpoint(srcs[dim], dim=dim, n_layers=2, n_heads=6, n_kv_heads=2, vocab=512, multiple_of=4, shards=1,
                              tokenizer=stories_tokenizer, seed=dim)
    outs = {}
    for name, dim, tp, dtype in (("72-tp1", 72, 1, "float32"), ("72-tp2", 72, 2, "float16"),
                                 ("36-fp16", 36, 2, "float16")):
        outs[name] = root / name
        convert(open_source(srcs[dim]), outs[name], tp, dtype, progress=False)
    return outs


@pytest.mark.parametrize("name", ["72-tp1", "72-tp2", "36-fp16"])
def test_rank_files_open_with_safetensors(odd_models: dict[str, Path], name: str) -> None:
    check_standard_safetensors(odd_models[name])


def test_misaligned_tensors_are_copied_aligned(odd_models: dict[str, Path]) -> None:
    """dim 36 in fp16: a norm of 72 bytes leaves the next tensor off a 16-byte boundary in the
    file; the loader hands out aligned copies with the same values."""
    folder = odd_models["36-fp16"]
    m = load_manifest(folder)
    infos, _ = check_rank_file(folder, m, 0)
    assert any(t.begin % ALIGN for t in infos.values())  # the file really has such tensors
    tensors = load_rank(folder, m, 0, torch.device("cpu"))
    assert all(t.data_ptr() % ALIGN == 0 for t in tensors.values())


def _rewrite(src: Path, dst: Path, order: list[str] | None = None, metadata: dict | None | str = "keep",
             gap: int = 0) -> None:
    """Rewrite a rank file (as another tool might) with another order, metadata or a gap."""
    raw = src.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    data = raw[8 + n:]
    meta = header.pop("__metadata__")
    names = order or list(header)
    new: dict = {} if metadata is None else {"__metadata__": meta if metadata == "keep" else metadata}
    body, pos = b"", 0
    for i, name in enumerate(names):
        b, e = header[name]["data_offsets"]
        if i == 1:
            body += b"\0" * gap
            pos += gap
        new[name] = {**header[name], "data_offsets": [pos, pos + e - b]}
        body += data[b:e]
        pos += e - b
    blob = json.dumps(new).encode()
    dst.write_bytes(struct.pack("<Q", len(blob)) + blob + body)


@pytest.mark.parametrize("case,message", [
    ("reordered", "not in the format's order"),
    ("no-metadata", "__metadata__"),
    ("other-version", "__metadata__"),
    ("gap", "leaves a gap of 64 bytes"),
    ("trailing", "bytes after the last tensor"),
])
def test_reader_enforces_the_format(odd_models: dict[str, Path], tmp_path: Path, case: str, message: str) -> None:
    folder = tmp_path / "model"
    shutil.copytree(odd_models["72-tp1"], folder)
    rank = folder / "rank-00-of-01.safetensors"
    names = list(check_rank_file(folder, load_manifest(folder), 0)[0])
    if case == "reordered":
        _rewrite(rank, rank, order=[names[1], names[0], *names[2:]])
    elif case == "no-metadata":
        _rewrite(rank, rank, metadata=None)
    elif case == "other-version":
        _rewrite(rank, rank, metadata={"format": "llamafuse-shards", "version": "1", "tp": "1"})
    elif case == "gap":
        _rewrite(rank, rank, gap=64)
    else:
        with open(rank, "ab") as f:
            f.write(b"\0" * 8)
    m = json.loads((folder / "manifest.json").read_text())  # sizes are checked first: keep them right
    m["ranks"][0]["bytes"] = rank.stat().st_size
    (folder / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(LlamafuseError, match=message):
        check_rank_file(folder, load_manifest(folder), 0)


@pytest.mark.parametrize("tp,changes,culprit", [
    (3, {}, "8 attention heads"), (4, {"n_kv_heads": 6, "n_heads": 12}, "6 key/value heads"),
    (2, {"ffn_dim": 101}, "feed-forward width 101"), (2, {"vocab_size": 513}, "vocabulary size 513")])
def test_tp_errors_name_what_it_does_not_divide(tp: int, changes: dict, culprit: str) -> None:
    from llamafuse.formats import ModelConfig, check_tp
    c = ModelConfig(**{"dim": 96, "n_layers": 1, "n_heads": 8, "n_kv_heads": 2, "head_dim": 12, "ffn_dim": 100,
                       "vocab_size": 512, "norm_eps": 1e-5, **changes})
    with pytest.raises(LlamafuseError, match=f"--tp {tp} .*{culprit}"):
        check_tp(c, tp)
