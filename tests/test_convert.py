"""llama-convert: round trips against the float64 reference, Hugging Face variants, dtypes, the
manifest, every bad input through the CLI, atomicity, and memory bounded by a layer."""
from __future__ import annotations

import errno
import hashlib
import importlib.util
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import sentencepiece as spm
import torch
from click.testing import CliRunner, Result

import llamafuse.convert.write as write_mod
from llamafuse.convert.cli import main as cli_main
from llamafuse.convert.sources import open_source
from llamafuse.convert.write import convert
from llamafuse.formats import FORMAT_NAME, FORMAT_VERSION, LlamafuseError, load_manifest, rank_tensor_specs
from llamafuse.formats.interrupts import Interrupted
from llamafuse.formats.reference import reference_logits
from llamafuse.formats.tensorfile import DATA_ALIGN, read_header
from llamafuse.runtime.parallel import launch
from llamafuse.runtime.validate import compare, logits_worker

from checkpoints import (llama30b_like, load_meta_state_dict, write_hf_checkpoint, write_meta_checkpoint,
                         write_meta_from_state_dict)

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["Once upon a time, there was a little girl named Lily.", "She loved to play outside in the park."]
MiB = 1 << 20


def encode(tokenizer: Path, texts: list[str] = TEXTS) -> list[list[int]]:
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    return [[sp.bos_id()] + sp.encode(t) for t in texts]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def rank_shas(folder: Path) -> list[str]:
    return [r.sha256 for r in load_manifest(folder).ranks]


def leftovers(parent: Path) -> list[str]:
    """Temporary folders a conversion left behind."""
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name)


class Lab:
    """Checkpoints built on first use, and memoized references and conversions, for the session."""

    def __init__(self, root: Path, builders: dict[str, Callable[[Path], tuple[Path, Path]]]):
        self.root, self.builders = root, builders
        self._paths: dict[str, tuple[Path, Path]] = {}
        self._refs: dict[str, list[torch.Tensor]] = {}
        self._out: dict[tuple[str, int, str], Path] = {}
        self._logits: dict[tuple[str, int, str], list[torch.Tensor]] = {}

    def path(self, key: str) -> Path:
        if key not in self._paths:
            self._paths[key] = self.builders[key](self.root / "src" / key)
        return self._paths[key][0]

    def seqs(self, key: str) -> list[list[int]]:
        self.path(key)
        return encode(self._paths[key][1])

    def reference(self, key: str) -> list[torch.Tensor]:
        if key not in self._refs:
            self._refs[key] = reference_logits(self.path(key), self.seqs(key))
        return self._refs[key]

    def converted(self, key: str, tp: int, dtype: str = "float32") -> Path:
        if (key, tp, dtype) not in self._out:
            out = self.root / "out" / f"{key}-tp{tp}-{dtype}"
            convert(open_source(self.path(key)), out, tp, dtype, progress=False)
            self._out[key, tp, dtype] = out
        return self._out[key, tp, dtype]

    def logits(self, key: str, tp: int, dtype: str = "float32") -> list[torch.Tensor]:
        """Logits of the converted model, run on `tp` gloo processes (inline when tp is 1)."""
        if (key, tp, dtype) not in self._logits:
            out = self.converted(key, tp, dtype)
            self._logits[key, tp, dtype] = launch(logits_worker, tp, 1, "cpu", out, load_manifest(out), self.seqs(key))
        return self._logits[key, tp, dtype]


@pytest.fixture(scope="session")
def lab(tmp_path_factory, stories_meta, stories_hf, stories_tokenizer, llama_tokenizer) -> Lab:
    gqa: dict[str, dict[str, torch.Tensor]] = {}

    def gqa_state_dict() -> dict[str, torch.Tensor]:
        if not gqa:  # a small grouped-query model: 8 heads of 16, 2 kv heads, 2 Meta shards
            gqa["sd"] = write_meta_checkpoint(lab.root / "src" / "gqa-meta", dim=128, n_layers=2, n_heads=8,
                                              n_kv_heads=2, vocab=512, multiple_of=32, shards=2,
                                              tokenizer=stories_tokenizer, seed=1)
        return gqa["sd"]

    def hf_variant(fmt: str, shards: int, tied: bool = False) -> Callable[[Path], tuple[Path, Path]]:
        def build(folder: Path) -> tuple[Path, Path]:
            sd = dict(gqa_state_dict())
            if tied:
                sd["output.weight"] = sd["tok_embeddings.weight"]
            write_hf_checkpoint(folder, sd, n_heads=8, n_kv_heads=2, fmt=fmt, shards=shards,
                                tie_word_embeddings=tied, tokenizer=stories_tokenizer)
            return folder, stories_tokenizer
        return build

    def tied_meta(folder: Path) -> tuple[Path, Path]:
        sd = dict(gqa_state_dict())
        sd["output.weight"] = sd["tok_embeddings.weight"]
        write_meta_from_state_dict(folder, sd, n_heads=8, n_kv_heads=2, multiple_of=32, shards=2,
                                   tokenizer=stories_tokenizer)
        return folder, stories_tokenizer

    def gqa_meta(folder: Path) -> tuple[Path, Path]:
        gqa_state_dict()
        return folder, stories_tokenizer

    def llama30b(folder: Path) -> tuple[Path, Path]:
        llama30b_like(folder, llama_tokenizer)
        return folder, llama_tokenizer

    lab = Lab(tmp_path_factory.mktemp("convert"), {
        "stories-meta": lambda _: (stories_meta, stories_tokenizer),
        "stories-hf": lambda _: (stories_hf, stories_tokenizer),
        "llama30b": llama30b,
        "gqa-meta": gqa_meta,
        "gqa-tied-meta": tied_meta,
        "gqa-hf-safetensors-sharded": hf_variant("safetensors", 3),
        "gqa-hf-bin": hf_variant("bin", 1),
        "gqa-hf-bin-sharded": hf_variant("bin", 2),
        "gqa-hf-tied": hf_variant("safetensors", 1, tied=True),
    })
    return lab


# ---------------------------------------------------------------------------------------------
# Round trips: converted folder, run by the runtime on tp processes == float64 reference on SOURCE

@pytest.mark.parametrize("key,tp", [("stories-meta", 1), ("stories-meta", 2), ("stories-meta", 4),
                                    ("stories-hf", 1), ("stories-hf", 2),
                                    ("llama30b", 1), ("llama30b", 2), ("llama30b", 4)])
def test_round_trip_float32(lab: Lab, key: str, tp: int) -> None:
    ours = lab.logits(key, tp)
    ref = lab.reference(key)
    assert [o.shape for o in ours] == [r.shape for r in ref]
    c = compare(ours, ref)
    assert c.rel <= 1e-4 and c.top1 == 1.0, c


def test_llama30b_like_layout(lab: Lab) -> None:
    folder = lab.path("llama30b")
    assert json.loads((folder / "params.json").read_text())["vocab_size"] == -1
    shard0 = torch.load(folder / "consolidated.00.pth", weights_only=True)
    assert sorted(p.name for p in folder.glob("consolidated.*.pth")) == [f"consolidated.0{i}.pth" for i in range(4)]
    assert shard0["tok_embeddings.weight"].shape == (32000, 52)          # split on dim 1
    assert shard0["layers.0.attention.wq.weight"].shape == (52, 208)      # 13 heads of 4 rows each
    assert shard0["layers.0.attention.wo.weight"].shape == (208, 52)      # split on dim 1
    assert shard0["output.weight"].shape == (8000, 208)
    assert shard0["norm.weight"].shape == (208,)                          # replicated
    assert shard0["rope.freqs"].shape == (2,)                             # LLaMA-1's unused buffer
    c = open_source(folder).config
    assert (c.n_heads, c.n_kv_heads, c.head_dim, c.dim, c.vocab_size, c.n_layers) == (52, 52, 4, 208, 32000, 2)
    # the reader reassembles exactly the weights that were sharded
    sd = load_meta_state_dict(folder)
    src = open_source(folder)
    assert torch.equal(src.tensor("layers.1.wo"), sd["layers.1.attention.wo.weight"])
    assert torch.equal(src.tensor("embed"), sd["tok_embeddings.weight"])


def test_stories_meta_and_hf_fuse_to_identical_files(lab: Lab, stories_meta: Path, stories_hf: Path) -> None:
    """Same weights, two layouts and rotary orders: the fused rank files must be bit-identical."""
    outs = []
    for path in (stories_meta, stories_hf):
        out = lab.root / "out" / f"stories-identical-{path.name}"
        convert(open_source(path, max_seq_len=512), out, 2, "float32", progress=False)
        outs.append(out)
    assert rank_shas(outs[0]) == rank_shas(outs[1])


# ---------------------------------------------------------------------------------------------
# Hugging Face variants

@pytest.mark.parametrize("variant", ["safetensors-sharded", "bin", "bin-sharded", "tied"])
def test_hf_variant_matches_meta_source(lab: Lab, variant: str) -> None:
    key, meta_key = f"gqa-hf-{variant}", ("gqa-tied-meta" if variant == "tied" else "gqa-meta")
    folder = lab.path(key)
    if variant.endswith("sharded"):
        assert any(folder.glob("*.index.json"))
    if variant == "tied":
        assert "lm_head.weight" not in read_header(folder / "model.safetensors")[0]
    src = open_source(folder)
    assert src.layout == "hf" and src.config == open_source(lab.path(meta_key)).config
    ref = lab.reference(meta_key)
    assert compare(lab.reference(key), ref).rel < 1e-12  # the readers agree at the source level
    c = compare(lab.logits(key, 1), ref)
    assert c.rel <= 1e-4 and c.top1 == 1.0, c
    for tp in (1, 2):  # and the fused files are bit-identical to the Meta source's
        assert rank_shas(lab.converted(key, tp)) == rank_shas(lab.converted(meta_key, tp))


def test_gqa_round_trip_tp2(lab: Lab) -> None:
    c = compare(lab.logits("gqa-hf-safetensors-sharded", 2), lab.reference("gqa-meta"))
    assert c.rel <= 1e-4 and c.top1 == 1.0, c


# ---------------------------------------------------------------------------------------------
# Half precision

@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("key", ["stories-meta", "llama30b"])
def test_half_precision(lab: Lab, key: str, dtype: str) -> None:
    folder = lab.converted(key, 1, dtype)
    assert load_manifest(folder).dtype == dtype
    infos, _ = read_header(folder / "rank-00-of-01.safetensors")
    want = getattr(torch, dtype)
    for name, t in infos.items():
        assert t.dtype == (torch.float32 if name.startswith("rope.") else want), name
    assert compare(lab.logits(key, 1, dtype), lab.reference(key)).passes(dtype)


# ---------------------------------------------------------------------------------------------
# Manifest

def test_manifest_describes_the_files(lab: Lab, stories_meta: Path) -> None:
    folder = lab.converted("stories-meta", 2)
    d = json.loads((folder / "manifest.json").read_text())
    assert d["format"] == FORMAT_NAME and d["version"] == FORMAT_VERSION == 2
    assert d["dtype"] == "float32" and d["tp"] == 2 and d["rotary"] == "rotate-half"
    assert d["config"] == open_source(stories_meta).config.to_dict()
    assert d["source"]["layout"] == "meta" and Path(d["source"]["path"]) == stories_meta.resolve()
    tok = stories_meta / "tokenizer.model"
    assert d["tokenizer"] == {"file": "tokenizer.model", "add_bos": True, "bos_id": 1, "eos_id": 2,
                              "bytes": tok.stat().st_size, "sha256": sha256(tok)}
    assert sha256(folder / "tokenizer.model") == sha256(tok)
    assert [r["rank"] for r in d["ranks"]] == [0, 1]
    assert sorted(os.listdir(folder)) == sorted([r["file"] for r in d["ranks"]] + ["manifest.json", "tokenizer.model"])
    m = load_manifest(folder)
    specs = rank_tensor_specs(m.config, m.tp, m.dtype)
    for r, rf in zip(d["ranks"], m.ranks):
        path = folder / r["file"]
        assert path.stat().st_size == r["bytes"] == rf.bytes
        assert sha256(path) == r["sha256"] == rf.sha256
        infos, meta = read_header(path)
        assert meta == {"format": FORMAT_NAME, "version": "2", "tp": "2"}
        assert list(infos) == [t.name for t in specs]    # file order is the format's order
        ts = list(infos.values())
        assert ts[0].begin % DATA_ALIGN == 0              # header padded to the boundary
        assert all(a.end == b.begin for a, b in zip(ts, ts[1:])) and ts[-1].end == path.stat().st_size
        assert [t.shape for t in ts] == [t.shape for t in specs]
    assert d["ranks"][0]["sha256"] != d["ranks"][1]["sha256"]


def _drop(*path: str | int) -> Callable[[dict], None]:
    def f(d: dict) -> None:
        for p in path[:-1]:
            d = d[p]
        del d[path[-1]]
    return f


BAD_MANIFESTS: dict[str, tuple[Callable[[dict], None] | str, str]] = {
    "version": (lambda d: d.update(version=3), "version 3 is not supported"),
    "version-1": (lambda d: d.update(version=1), "convert the checkpoint again"),
    "no-tokenizer": (_drop("tokenizer"), "missing field 'tokenizer'"),
    "tokenizer-name": (lambda d: d["tokenizer"].update(file="../tok.model"), "file must be one of"),
    "tokenizer-bos": (lambda d: d["tokenizer"].update(bos_id=99999), "bos_id 99999 is outside"),
    "tokenizer-add-bos": (lambda d: d["tokenizer"].update(add_bos=1), "field 'add_bos' has the wrong type"),
    "format": (lambda d: d.update(format="something-else"), "not a llamafuse-shards manifest"),
    "no-config": (_drop("config"), "missing field 'config'"),
    "no-dtype": (_drop("dtype"), "missing field 'dtype'"),
    "no-tp": (_drop("tp"), "missing field 'tp'"),
    "no-ranks": (_drop("ranks"), "missing field 'ranks'"),
    "no-config-dim": (_drop("config", "dim"), "missing field(s) dim"),
    "no-sha": (_drop("ranks", 0, "sha256"), "missing field 'sha256'"),
    "no-rotary": (_drop("rotary"), "rotary convention None"),
    "tp-as-string": (lambda d: d.update(tp="2"), "field 'tp' has the wrong type"),
    "bad-dtype": (lambda d: d.update(dtype="int8"), "dtype 'int8'"),
    "rank-count": (lambda d: d["ranks"].pop(), "tp is 2 but 1 rank files"),
    "rank-path": (lambda d: d["ranks"][0].update(file="../evil.safetensors"), "bad rank number or file name"),
    "bad-tp": (lambda d: d.update(tp=3), "--tp 3 does not divide"),
    "malformed": ("{not json", "malformed"),
    "empty": ("", "malformed"),
    "array": ("[1, 2]", "not a llamafuse-shards manifest"),
}


@pytest.mark.parametrize("case", list(BAD_MANIFESTS))
def test_load_manifest_rejects(lab: Lab, tmp_path: Path, case: str) -> None:
    good = json.loads((lab.converted("stories-meta", 2) / "manifest.json").read_text())
    change, message = BAD_MANIFESTS[case]
    if callable(change):
        change(good)
        text = json.dumps(good)
    else:
        text = change
    (tmp_path / "manifest.json").write_text(text)
    with pytest.raises(LlamafuseError, match=re.escape(message)) as e:
        load_manifest(tmp_path)
    assert "manifest.json" in str(e.value)


def test_load_manifest_missing(tmp_path: Path) -> None:
    with pytest.raises(LlamafuseError, match="not found"):
        load_manifest(tmp_path)
    with pytest.raises(LlamafuseError, match="not a folder"):
        load_manifest(tmp_path / "nope")


# ---------------------------------------------------------------------------------------------
# Bad input through the CLI: exit 2, one `llama-convert: error:` line naming the culprit, no traceback

PROGRESS = re.compile(r"^writing: ")  # tqdm, if it failed mid-write


def run_cli(*args: object) -> Result:
    return CliRunner().invoke(cli_main, [str(a) for a in args])


def assert_user_error(r: Result, *needles: str) -> str:
    assert "Traceback" not in r.output, r.output
    assert r.exit_code == 2, (r.exit_code, r.output, r.exception)
    assert isinstance(r.exception, SystemExit), r.exception
    lines = [ln for ln in r.stderr.replace("\r", "\n").splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("llama-convert: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], lines
    assert all(PROGRESS.match(ln) for ln in lines[:-1]), lines
    for n in needles:
        assert n in errors[0], (n, errors[0])
    assert r.stdout == ""
    return errors[0]


def copy_source(src: Path, dst: Path, only: tuple[str, ...] | None = None) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if only is None or f.name in only:
            shutil.copyfile(f, dst / f.name)
    return dst


def safetensors_bytes(header: dict, data: bytes, length: int | None = None) -> bytes:
    blob = json.dumps(header).encode()
    return struct.pack("<Q", len(blob) if length is None else length) + blob + data


def hf_with_weights(tmp: Path, stories_hf: Path, weights: bytes) -> Path:
    src = copy_source(stories_hf, tmp / "src", only=("config.json", "tokenizer.model"))
    (src / "model.safetensors").write_bytes(weights)
    return src


class Evil:
    """Unpickling this would create a folder: weights_only loading must never run it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def _edit_json(path: Path, **changes: object) -> None:
    d = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            d.pop(k)
        else:
            d[k] = v
    path.write_text(json.dumps(d))


@pytest.fixture
def env(tmp_path: Path, stories_meta: Path, stories_hf: Path, llama_tokenizer: Path, lab: Lab):
    class Env:
        tmp, meta, hf, llama_tok, gqa = tmp_path, stories_meta, stories_hf, llama_tokenizer, lab.path("gqa-meta")
        out = tmp_path / "out"
    return Env


def case_missing_source(e):
    return [e.tmp / "nope", e.out], ["nope", "source not found"]


def case_source_is_file(e):
    (e.tmp / "f").write_text("x")
    return [e.tmp / "f", e.out], ["must be a folder"]


def case_empty_source(e):
    (e.tmp / "src").mkdir()
    return [e.tmp / "src", e.out], ["src", "empty"]


def case_unknown_layout(e):
    (e.tmp / "src").mkdir()
    (e.tmp / "src" / "notes.txt").write_bytes(os.urandom(100))
    return [e.tmp / "src", e.out], ["unknown layout"]


def case_missing_params(e):
    return [copy_source(e.meta, e.tmp / "src", only=("consolidated.00.pth",)), e.out], ["params.json", "not found"]


def case_missing_config(e):
    return [copy_source(e.hf, e.tmp / "src", only=("model.safetensors",)), e.out], ["config.json", "not found"]


def case_shard_gap(e):
    src = copy_source(e.gqa, e.tmp / "src")
    (src / "consolidated.01.pth").rename(src / "consolidated.02.pth")
    return [src, e.out], ["consolidated.00.pth", "consolidated.02.pth"]


def case_inconsistent_shards(e):
    src = copy_source(e.gqa, e.tmp / "src")
    sd = torch.load(src / "consolidated.01.pth", weights_only=True)
    sd["layers.1.attention.wq.weight"] = torch.zeros(65, 128)
    torch.save(sd, src / "consolidated.01.pth")
    return [src, e.out], ["consolidated.01.pth", "layers.1.attention.wq.weight", "(65, 128)"]


def case_shard_missing_tensor(e):
    src = copy_source(e.gqa, e.tmp / "src")
    sd = torch.load(src / "consolidated.01.pth", weights_only=True)
    del sd["layers.0.feed_forward.w2.weight"]
    torch.save(sd, src / "consolidated.01.pth")
    return [src, e.out], ["consolidated.01.pth", "layers.0.feed_forward.w2.weight"]


def case_params_disagree_with_tensors(e):
    src = copy_source(e.gqa, e.tmp / "src")
    _edit_json(src / "params.json", dim=256)
    return [src, e.out], ["params.json implies"]


def case_params_too_many_layers(e):
    src = copy_source(e.gqa, e.tmp / "src")
    _edit_json(src / "params.json", n_layers=3)
    return [src, e.out], ["layers.2.attention.wq.weight", "not found"]


def case_params_not_json(e):
    src = copy_source(e.meta, e.tmp / "src")
    (src / "params.json").write_text('{"dim": 64,')
    return [src, e.out], ["params.json", "not valid JSON"]


def case_params_bad_field(e):
    src = copy_source(e.meta, e.tmp / "src")
    _edit_json(src / "params.json", n_heads="8")
    return [src, e.out], ["params.json", "n_heads"]


def case_params_missing_field(e):
    src = copy_source(e.meta, e.tmp / "src")
    _edit_json(src / "params.json", n_layers=None)
    return [src, e.out], ["params.json", "n_layers"]


def case_config_missing_field(e):
    src = copy_source(e.hf, e.tmp / "src")
    _edit_json(src / "config.json", hidden_size=None)
    return [src, e.out], ["config.json", "hidden_size"]


def case_config_model_type(e):
    src = copy_source(e.hf, e.tmp / "src")
    _edit_json(src / "config.json", model_type="gpt2")
    return [src, e.out], ["config.json", "gpt2"]


def case_config_rope_scaling(e):  # linear and llama3 are supported (tests/test_real_models.py)
    src = copy_source(e.hf, e.tmp / "src")
    _edit_json(src / "config.json", rope_scaling={"type": "dynamic", "factor": 2.0})
    return [src, e.out], ["config.json", "rope type 'dynamic' is not supported"]


def case_config_wrong_shape(e):  # only caught when the tensor is read, i.e. mid-conversion
    src = copy_source(e.hf, e.tmp / "src")
    _edit_json(src / "config.json", intermediate_size=176)
    return [src, e.out], ["model.safetensors", "mlp.", "shape"]


def case_hf_tensor_missing(e):
    from safetensors.torch import load_file, save_file
    src = copy_source(e.hf, e.tmp / "src")
    sd = load_file(src / "model.safetensors")
    del sd["model.layers.3.self_attn.k_proj.weight"]
    save_file(sd, src / "model.safetensors")
    return [src, e.out], ["model.layers.3.self_attn.k_proj.weight", "not found"]


def case_index_lists_missing_file(e):
    src = copy_source(e.hf, e.tmp / "src")
    (src / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}))
    return [src, e.out], ["model-00002-of-00002.safetensors", "not found"]


def case_tp_does_not_divide_heads(e):
    return [e.meta, e.out, "--tp", 3], ["--tp 3", "8 attention heads"]


def case_tp_zero(e):
    return [e.meta, e.out, "--tp", 0], ["--tp must be >= 1"]


def case_tp_too_many_for_ffn(e):
    return [e.meta, e.out, "--tp", 8], ["--tp 8", "feed-forward width 172"]


def case_truncated_pth(e):
    src = copy_source(e.meta, e.tmp / "src")
    p = src / "consolidated.00.pth"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    return [src, e.out], ["consolidated.00.pth", "truncated"]


def case_garbage_pth(e):
    src = copy_source(e.meta, e.tmp / "src")
    (src / "consolidated.00.pth").write_bytes(os.urandom(4096))
    return [src, e.out], ["consolidated.00.pth", "unreadable"]


def case_pickled_object(e):
    src = copy_source(e.meta, e.tmp / "src", only=("params.json", "tokenizer.model"))
    torch.save({"tok_embeddings.weight": torch.zeros(2), "x": Evil(e.tmp / "pwned")}, src / "consolidated.00.pth")
    return [src, e.out], ["consolidated.00.pth", "refused"]


def case_pth_not_tensors(e):
    src = copy_source(e.meta, e.tmp / "src", only=("params.json", "tokenizer.model"))
    torch.save({"tok_embeddings.weight": 3}, src / "consolidated.00.pth")
    return [src, e.out], ["consolidated.00.pth", "dict of tensors"]


def case_truncated_safetensors(e):
    data = (e.hf / "model.safetensors").read_bytes()
    return [hf_with_weights(e.tmp, e.hf, data[: len(data) - 1000]), e.out], ["model.safetensors", "truncated"]


def case_safetensors_tiny(e):
    return [hf_with_weights(e.tmp, e.hf, b"\x01\x02"), e.out], ["model.safetensors", "truncated"]


def case_safetensors_huge_header(e):
    return [hf_with_weights(e.tmp, e.hf, safetensors_bytes({}, b"", length=1 << 62)), e.out], \
        ["model.safetensors", "header length"]


def case_safetensors_header_past_end(e):
    return [hf_with_weights(e.tmp, e.hf, safetensors_bytes({}, b"", length=10_000)), e.out], \
        ["model.safetensors", "header length 10000"]


def case_safetensors_overlap(e):
    h = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
         "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}
    return [hf_with_weights(e.tmp, e.hf, safetensors_bytes(h, bytes(24))), e.out], ["model.safetensors", "overlap"]


def case_safetensors_past_end(e):
    h = {"a": {"dtype": "F32", "shape": [1 << 20], "data_offsets": [0, 4 << 20]}}
    return [hf_with_weights(e.tmp, e.hf, safetensors_bytes(h, bytes(64))), e.out], ["model.safetensors", "data ends"]


def case_safetensors_offsets_vs_shape(e):
    h = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}
    return [hf_with_weights(e.tmp, e.hf, safetensors_bytes(h, bytes(8))), e.out], ["model.safetensors", "do not match"]


def case_safetensors_negative_offset(e):
    h = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}}
    return [hf_with_weights(e.tmp, e.hf, safetensors_bytes(h, bytes(8))), e.out], ["model.safetensors", "'a'"]


def case_safetensors_bad_dtype(e):
    h = {"a": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}
    return [hf_with_weights(e.tmp, e.hf, safetensors_bytes(h, bytes(16))), e.out], ["model.safetensors", "dtype"]


def case_safetensors_header_not_json(e):
    blob = b"\xff{not json"
    return [hf_with_weights(e.tmp, e.hf, struct.pack("<Q", len(blob)) + blob), e.out], \
        ["model.safetensors", "not valid JSON"]


def case_destination_is_file(e):
    e.out.write_text("mine")
    return [e.meta, e.out], ["out", "not a folder"]


def case_destination_is_source(e):
    src = copy_source(e.meta, e.tmp / "src")
    return [src, src, "--force"], ["destination is the source"]


def case_tokenizer_mismatch(e):
    return [e.meta, e.out, "--tokenizer", e.llama_tok], ["tokenizer.model", "32000 tokens", "vocabulary is 512"]


def case_tokenizer_missing(e):
    src = copy_source(e.meta, e.tmp / "src", only=("params.json", "consolidated.00.pth"))
    return [src, e.out], ["no tokenizer.model or tokenizer.json", "--tokenizer"]


def case_tokenizer_path_missing(e):
    return [e.meta, e.out, "--tokenizer", e.tmp / "tok.model"], ["tok.model", "not found"]


def case_tokenizer_not_sentencepiece(e):
    (e.tmp / "tok").mkdir()
    shutil.copyfile(e.meta / "params.json", e.tmp / "tok" / "tokenizer.model")
    return [e.meta, e.out, "--tokenizer", e.tmp / "tok" / "tokenizer.model"], ["tokenizer.model", "not a SentencePiece model"]


def case_tokenizer_other_name(e):
    shutil.copyfile(e.meta / "params.json", e.tmp / "params.txt")
    return [e.meta, e.out, "--tokenizer", e.tmp / "params.txt"], ["params.txt", "must be a SentencePiece"]


def case_tokenizer_json_garbage(e):
    return [e.meta, e.out, "--tokenizer", e.meta / "params.json"], ["params.json", "not a Hugging Face tokenizer.json"]


def case_params_zero_heads(e):
    src = copy_source(e.meta, e.tmp / "src")
    _edit_json(src / "params.json", n_heads=0)
    return [src, e.out], ["params.json", "'n_heads' must be positive"]


def case_config_zero_heads(e):
    src = copy_source(e.hf, e.tmp / "src")
    _edit_json(src / "config.json", num_attention_heads=0)
    return [src, e.out], ["config.json", "'num_attention_heads' must be positive"]


def case_index_escapes_folder(e):
    src = copy_source(e.hf, e.tmp / "src")
    (src / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.embed_tokens.weight": "../../x.safetensors"}}))
    return [src, e.out], ["model.safetensors.index.json", "../../x.safetensors", "not a file in the checkpoint folder"]


CASES = {name[5:]: f for name, f in list(globals().items()) if name.startswith("case_")}


@pytest.mark.parametrize("case", list(CASES))
def test_cli_rejects(env, case: str) -> None:
    args, needles = CASES[case](env)
    before = sorted(p.name for p in env.tmp.iterdir())
    assert_user_error(run_cli(*args, "--dtype", "float32"), *needles)
    assert sorted(p.name for p in env.tmp.iterdir()) == before  # nothing created (no out, no temp folder)
    assert not (env.tmp / "pwned").exists()


@pytest.mark.parametrize("args,needle", [(["--dtype", "int8"], "--dtype"), (["--max-seq-len", "0"], "--max-seq-len"),
                                         (["--tp", "two"], "--tp")])
def test_cli_usage_errors(env, args: list[str], needle: str) -> None:
    r = run_cli(env.meta, env.out, *args)
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert "Error: Invalid value" in r.stderr and needle in r.stderr
    assert not env.out.exists()


def test_cli_process_prints_one_line(tmp_path: Path, stories_meta: Path) -> None:
    """The installed entry point, as a real process: one stderr line, exit status 2."""
    exe = shutil.which("llama-convert")
    cmd = [exe] if exe else [sys.executable, "-c", "from llamafuse.convert.cli import main; main()"]
    bad = copy_source(stories_meta, tmp_path / "src")
    (bad / "consolidated.00.pth").write_bytes(b"PK\x03\x04 not really a zip")
    for src in (tmp_path / "missing", bad):
        p = subprocess.run(cmd + [str(src), str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
        assert p.returncode == 2 and p.stdout == ""
        lines = p.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("llama-convert: error:") and str(src) in lines[0], p.stderr
    assert not (tmp_path / "out").exists()


def test_destination_not_empty_without_force(env) -> None:
    env.out.mkdir()
    (env.out / "notes.txt").write_text("my notes")
    assert_user_error(run_cli(env.meta, env.out), "out", "not empty", "--force")
    assert os.listdir(env.out) == ["notes.txt"] and (env.out / "notes.txt").read_text() == "my notes"
    assert leftovers(env.tmp) == []


def test_destination_with_force_keeps_user_files(env) -> None:
    env.out.mkdir()
    (env.out / "notes.txt").write_text("my notes")
    r = run_cli(env.meta, env.out, "--force", "--tp", 2, "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert set(summary["files"]) == {"rank-00-of-02.safetensors", "rank-01-of-02.safetensors",
                                     "tokenizer.model", "manifest.json"}
    assert (env.out / "notes.txt").read_text() == "my notes"
    assert sorted(os.listdir(env.out)) == sorted(set(summary["files"]) | {"notes.txt"})
    m = load_manifest(env.out)
    assert m.tp == 2 and all(sha256(env.out / rf.file) == rf.sha256 for rf in m.ranks)
    assert leftovers(env.tmp) == []
    # and again over our own earlier output: replaced, still complete
    assert run_cli(env.meta, env.out, "--force", "--tp", 2).exit_code == 0
    assert load_manifest(env.out).ranks == m.ranks


def test_empty_destination_folder_is_fine(env) -> None:
    env.out.mkdir()
    assert run_cli(env.meta, env.out, "--dtype", "float32").exit_code == 0
    assert load_manifest(env.out).dtype == "float32"


def test_disk_space_checked_first(env, monkeypatch) -> None:
    real = shutil.disk_usage
    monkeypatch.setattr(write_mod.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    line = assert_user_error(run_cli(env.meta, env.out), "not enough disk space", "1.00kB free")
    assert re.search(r"\(\d+(\.\d+)?[kM]B needed", line), line  # a small model's size shows in kB/MB, not "0.0 GB"
    assert not env.out.exists() and leftovers(env.tmp) == []


def _fail_after(monkeypatch, n: int, exc: BaseException, seen: list[Path]) -> None:
    """Make the n-th write_tensor call raise `exc`, recording the temporary folder it wrote into."""
    real, calls = write_mod.write_tensor, [0]

    def write_tensor(f, t):
        calls[0] += 1
        if calls[0] >= n:
            seen.append(Path(f.name).parent)
            raise exc
        return real(f, t)
    monkeypatch.setattr(write_mod, "write_tensor", write_tensor)


def test_disk_full_mid_write(env, monkeypatch) -> None:
    seen: list[Path] = []
    _fail_after(monkeypatch, 20, OSError(errno.ENOSPC, "No space left on device"), seen)
    assert_user_error(run_cli(env.meta, env.out, "--tp", 2), "out", "disk full")
    assert seen and ".tmp-" in seen[0].name and not seen[0].exists()
    assert not env.out.exists() and leftovers(env.tmp) == []


def test_disk_full_mid_write_with_force(env, monkeypatch) -> None:
    env.out.mkdir()
    (env.out / "notes.txt").write_text("my notes")
    _fail_after(monkeypatch, 20, OSError(errno.ENOSPC, "No space left on device"), [])
    assert_user_error(run_cli(env.meta, env.out, "--force"), "disk full")
    assert os.listdir(env.out) == ["notes.txt"] and leftovers(env.tmp) == []


def test_other_os_error_mid_write(env, monkeypatch) -> None:
    _fail_after(monkeypatch, 5, OSError(errno.EIO, "Input/output error"), [])
    assert_user_error(run_cli(env.meta, env.out), "write failed", "Input/output error")
    assert not env.out.exists() and leftovers(env.tmp) == []


# ---------------------------------------------------------------------------------------------
# Atomicity

def test_failure_midway_leaves_nothing(tmp_path: Path, stories_meta: Path, monkeypatch) -> None:
    real, state = write_mod.layer_tensors, {}

    def layer_tensors(get, i, lay, rotary, dtype):
        if i == 3:
            state["tmp"] = [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
            state["files"] = sorted(os.listdir(state["tmp"][0]))
            raise RuntimeError("boom")
        return real(get, i, lay, rotary, dtype)
    monkeypatch.setattr(write_mod, "layer_tensors", layer_tensors)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"):
        convert(open_source(stories_meta), out, 2, "float32", progress=False)
    assert state["files"] == ["rank-00-of-02.safetensors", "rank-01-of-02.safetensors"]  # it was mid-way
    assert os.listdir(tmp_path) == []  # no destination, no manifest, no .out.tmp-*


def test_failure_midway_into_existing_folder(tmp_path: Path, stories_meta: Path, monkeypatch) -> None:
    out = tmp_path / "out"
    convert(open_source(stories_meta), out, 1, "float32", progress=False)
    (out / "notes.txt").write_text("my notes")
    before = {p.name: sha256(p) for p in out.iterdir()}
    monkeypatch.setattr(write_mod, "tail_tensors", lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        convert(open_source(stories_meta), out, 2, "float32", force=True, progress=False)
    assert {p.name: sha256(p) for p in out.iterdir()} == before  # the old conversion is intact
    assert leftovers(tmp_path) == []


def test_interrupt_through_cli(env, monkeypatch) -> None:
    _fail_after(monkeypatch, 10, KeyboardInterrupt(), [])
    r = run_cli(env.meta, env.out)
    assert r.exit_code == 130 and "interrupted" in r.stderr and "Traceback" not in r.output
    assert not env.out.exists() and leftovers(env.tmp) == []


def test_signal_inside_an_import_through_cli(env, monkeypatch) -> None:
    """A SIGTERM that lands while a C extension initializes surfaces as ImportError("initialization
    failed") raised from our Interrupted: it is reported as the signal, in one line, exit 143."""
    failed = ImportError("initialization failed")
    failed.__cause__ = Interrupted(signal.SIGTERM)
    _fail_after(monkeypatch, 10, failed, [])
    r = run_cli(env.meta, env.out)
    assert (r.exit_code, r.stderr.splitlines()[-1]) == (
        143, "llama-convert: interrupted by SIGTERM; nothing was written to the destination"), r.output
    assert "Traceback" not in r.output and not env.out.exists() and leftovers(env.tmp) == []


# ---------------------------------------------------------------------------------------------
# Memory: bounded by a layer, not by the model

def _memory_script():
    spec = importlib.util.spec_from_file_location("convert_memory", ROOT / "scripts" / "convert_memory.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_memory_bounded_by_a_layer(tmp_path: Path, stories_tokenizer: Path) -> None:
    """16 blocks of 6.5 MiB, tiny vocabulary: anonymous memory must not grow with the depth."""
    r = _memory_script().measure(tmp_path, dim=512, layers=16, heads=8, shards=4, tp=4, vocab=512,
                                 tokenizer=stories_tokenizer)
    assert r["model_bytes"] > 14 * r["largest_layer_bytes"]
    assert r["rss_anon_growth"] < 3 * r["largest_layer_bytes"] + 16 * MiB, r
    assert r["rss_anon_growth"] < r["model_bytes"] / 3, r
    assert r["peak_vmhwm"] >= r["peak_rss_anon"] > 0


def test_memory_bounded_with_large_vocabulary(tmp_path: Path, llama_tokenizer: Path) -> None:
    """The output head (31 MiB here) is the largest unit: at most a few copies of it, not tp of them."""
    r = _memory_script().measure(tmp_path, dim=512, layers=2, heads=8, shards=4, tp=4, vocab=32000,
                                 tokenizer=llama_tokenizer)
    assert r["largest_layer_bytes"] == 32000 * 512 * 2
    assert r["rss_anon_growth"] < 3 * r["largest_layer_bytes"] + 16 * MiB, r
