"""GGUF sources on small synthetic files (fast): the real stories260K written as a GGUF fuses to the
same rank files as its Meta checkpoint; every supported tensor type dequantizes exactly as gguf-py
does and runs like the reference forward; metadata becomes the config (rope scaling included);
the SentencePiece tokenizer rebuilt from metadata encodes like SentencePiece and transformers;
`validate --reference model.gguf`; and bad files give one line, exit 2, nothing written.

Tensor types: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 are quantized from random weights by
gguf-py; Q2_K, Q3_K, Q4_K, Q5_K, Q6_K (which gguf-py only dequantizes) are random blocks.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
import sentencepiece as spm
import torch
from gguf import GGMLQuantizationType as Q

from llamafuse.convert.cli import main as convert_main
from llamafuse.convert.sources import open_source
from llamafuse.convert.write import convert
from llamafuse.formats import load_manifest
from llamafuse.formats.config import RopeScaling
from llamafuse.formats.reference import reference_logits
from llamafuse.formats.tokenizer import make_tokenizer
from llamafuse.runtime.cli import main as run_main
from llamafuse.runtime.validate import compare

from checkpoints import random_meta_state_dict
from conftest import DATA
from gguf_files import K_QUANTS, QUANTIZABLE, sentencepiece_vocab, write_llama_gguf
from helpers import hellaswag_texts, model_logits, one_line_error, run

STORIES_META = DATA / "stories260K" / "meta"
LLAMA_TOK = DATA / "llama-tokenizer" / "tokenizer.model"
SEQS = [[1, 15, 60, 200, 7, 300, 33], [1, 400, 12]]
TYPES = QUANTIZABLE + tuple(K_QUANTS)
GGUF_OF = {"embed": "token_embd.weight", "output": "token_embd.weight", "layers.1.wq": "blk.1.attn_q.weight",
           "layers.0.wk": "blk.0.attn_k.weight", "layers.0.w2": "blk.0.ffn_down.weight",
           "layers.1.ffn_norm": "blk.1.ffn_norm.weight"}


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gguf")


@pytest.fixture(scope="module")
def stories_vocab() -> dict:
    return sentencepiece_vocab(STORIES_META / "tokenizer.model")


@pytest.fixture(scope="module")
def stories_gguf(work, stories_vocab) -> Path:
    """stories260K's real weights as llama.cpp would store its Meta checkpoint (output tied, F32)."""
    sd = torch.load(STORIES_META / "consolidated.00.pth", weights_only=True)
    assert torch.equal(sd.pop("output.weight"), sd["tok_embeddings.weight"])
    return write_llama_gguf(work / "stories.gguf", sd, n_heads=8, n_kv_heads=4, vocab=stories_vocab)


@pytest.fixture(scope="module")
def random_sd() -> dict[str, torch.Tensor]:
    """Rows of 256 and 768 values (whole K-quant blocks); 4 heads of 64, 2 kv heads; vocab 512."""
    sd = random_meta_state_dict(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, vocab=512, multiple_of=256, seed=3)
    del sd["output.weight"]
    return sd


@pytest.fixture(scope="module")
def typed_gguf(work, random_sd, stories_vocab):
    made: dict[Q, Path] = {}

    def get(qtype: Q) -> Path:
        if qtype not in made:
            made[qtype] = write_llama_gguf(work / f"random-{qtype.name}.gguf", random_sd, n_heads=4, n_kv_heads=2,
                                           vocab=stories_vocab, qtype=qtype)
        return made[qtype]
    return get


# ---------------------------------------------------------------- weights and config


def test_stories_gguf_fuses_like_meta(work, stories_gguf):
    """The same weights from a GGUF and from Meta's checkpoint: equal configs, identical rank files
    (so the GGUF's q/k rows are taken as Meta's interleaved order, and the tied head is the embedding)."""
    src, meta = open_source(stories_gguf), open_source(STORIES_META)
    assert (src.layout, src.rotary, src.tied) == ("gguf", "interleaved", True)
    assert src.config == meta.config
    for tp in (1, 2):
        a, b = work / f"stories-gguf-tp{tp}", work / f"stories-meta-tp{tp}"
        convert(src, a, tp, "float32", progress=False)
        convert(meta, b, tp, "float32", progress=False)
        assert [r.sha256 for r in load_manifest(a).ranks] == [r.sha256 for r in load_manifest(b).ranks]
        assert load_manifest(a).source["layout"] == "gguf"


@pytest.mark.parametrize("qtype", TYPES, ids=[q.name for q in TYPES])
def test_tensor_type(work, typed_gguf, qtype):
    """Each weight is exactly gguf-py's dequantization of the file's bytes, and the converted model
    runs like the float64 reference forward over the GGUF."""
    path = typed_gguf(qtype)
    reader = gguf.GGUFReader(path)
    stored = {t.name: t for t in reader.tensors}
    assert stored["blk.0.attn_q.weight"].tensor_type == qtype
    src = open_source(path)
    for name, stored_name in GGUF_OF.items():
        t = stored[stored_name]
        want = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
        assert torch.equal(src.tensor(name), want), name
    assert src.tensor("layers.0.w1").abs().max() < 2  # sane weights: a test of numbers, not of infinities
    out = work / f"typed-{qtype.name}"
    convert(src, out, 1, "float32", progress=False)
    c = compare(model_logits(out, SEQS), reference_logits(path, SEQS))
    assert c.rel <= 1e-4 and c.top1 == 1.0, c


def test_tensor_parallel_q4_k(work, typed_gguf):
    path = typed_gguf(Q.Q4_K)
    out = work / "typed-Q4_K-tp2"
    convert(open_source(path), out, 2, "float32", progress=False)
    c = compare(model_logits(out, SEQS), reference_logits(path, SEQS))
    assert c.rel <= 1e-4 and c.top1 == 1.0, c


def test_linear_rope_scaling_from_metadata(work, random_sd, stories_vocab):
    """llama.rope.scaling.* becomes the config's rope scaling and the rotary tables; the reference
    reads the metadata on its own and agrees. Unscaled, the logits would differ."""
    scaled = write_llama_gguf(work / "linear.gguf", random_sd, n_heads=4, n_kv_heads=2, vocab=stories_vocab,
                              extra={"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0})
    src = open_source(scaled)
    assert src.config.rope_scaling == RopeScaling("linear", 4.0)
    out = work / "linear"
    convert(src, out, 1, "float32", progress=False)
    assert load_manifest(out).config.rope_scaling == RopeScaling("linear", 4.0)
    seqs = [list(range(1, 60))]
    ref = reference_logits(scaled, seqs)
    c = compare(model_logits(out, seqs), ref)
    assert c.rel <= 1e-4 and c.top1 == 1.0, c
    plain = write_llama_gguf(work / "plain.gguf", random_sd, n_heads=4, n_kv_heads=2, vocab=stories_vocab)
    assert compare(reference_logits(plain, seqs), ref).rel > 1e-3


# ---------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def llama_tok_gguf(work) -> Path:
    """A tiny model carrying the real LLaMA tokenizer (32000 pieces) in its metadata."""
    sd = random_meta_state_dict(dim=64, n_layers=1, n_heads=4, vocab=32000, multiple_of=32, seed=5)
    del sd["output.weight"]
    return write_llama_gguf(work / "llama-tok.gguf", sd, n_heads=4, n_kv_heads=4,
                            vocab=sentencepiece_vocab(LLAMA_TOK), qtype=Q.Q8_0)


def test_sentencepiece_tokenizer_from_metadata(llama_tok_gguf):
    """The tokenizer.json built from a `llama` (SentencePiece) GGUF gives SentencePiece's ids on the
    HellaSwag texts (and on odd whitespace, unknown characters, empty text), BOS first as LLaMA's
    tokenizer does; on the HellaSwag texts transformers' own GGUF tokenizer agrees. (It differs from
    SentencePiece on text that starts with two spaces, which the harness's texts never do.)"""
    from transformers import AutoTokenizer

    tf = open_source(llama_tok_gguf).tokenizer_file()
    assert (tf.name, tf.add_bos, tf.bos_id, tf.eos_id) == ("tokenizer.json", True, 1, 2)
    texts = hellaswag_texts(400)
    odd = ["  two  spaces\n\nnew line\ttab", "naïve café 東京 🙂 ½", " ", ""]
    ours = make_tokenizer(tf.name, tf.data, 32000, tf.origin).encode(texts + odd)
    assert ours == spm.SentencePieceProcessor(model_file=str(LLAMA_TOK)).encode(texts + odd)
    hf = AutoTokenizer.from_pretrained(str(llama_tok_gguf.parent), gguf_file=llama_tok_gguf.name)
    assert [[tf.bos_id] + ids for ids in ours[:len(texts)]] == hf(texts)["input_ids"]  # the harness's encoding


def test_tokenizer_travels_with_the_model(work, stories_gguf):
    out = work / "stories-gguf-tp1"
    if not out.exists():
        convert(open_source(stories_gguf), out, 1, "float32", progress=False)
    m = load_manifest(out)
    assert (m.tokenizer.file, m.tokenizer.add_bos, m.tokenizer.bos_id, m.tokenizer.eos_id) == ("tokenizer.json", True, 1, 2)
    assert json.loads((out / "tokenizer.json").read_text())["model"]["byte_fallback"] is True


# ---------------------------------------------------------------- validate


def test_validate_against_gguf(work, typed_gguf):
    out = work / "typed-Q6_K"
    if not out.exists():
        convert(open_source(typed_gguf(Q.Q6_K)), out, 1, "float32", progress=False)
    r = run(run_main, "validate", out, "--reference", typed_gguf(Q.Q6_K), "--device", "cpu")
    assert r.exit_code == 0 and "PASS" in r.stdout, r.output


def test_validate_other_model_same_vocabulary_fails(work, typed_gguf, stories_gguf):
    """Another model with the model's vocabulary size is a FAIL (exit 1), not bad input."""
    out = work / "typed-Q8_0"
    if not out.exists():
        convert(open_source(typed_gguf(Q.Q8_0)), out, 1, "float32", progress=False)
    r = run(run_main, "validate", out, "--reference", stories_gguf, "--device", "cpu")
    assert r.exit_code == 1 and "FAIL" in r.stdout and "Traceback" not in r.output, r.output


def test_validate_bad_references(work, typed_gguf, llama_tok_gguf):
    """Bad input is one line and exit 2: a source of another vocabulary, a converted folder, nothing."""
    out = work / "typed-Q8_0"
    if not out.exists():
        convert(open_source(typed_gguf(Q.Q8_0)), out, 1, "float32", progress=False)
    for ref, needle in ((llama_tok_gguf, "32000 tokens but the model's has 512"),
                        (out, "a llama-convert output folder"), (work / "nowhere.gguf", "not found")):
        one_line_error(run(run_main, "validate", out, "--reference", ref, "--device", "cpu"), "llama-run", needle)


# ---------------------------------------------------------------- bad files


def _patch(data: bytearray, after: bytes, fmt: str, value: int, skip: int = 0) -> bytearray:
    """Overwrite the `fmt` value found `skip` bytes after the first occurrence of `after`."""
    at = data.index(after) + len(after) + skip
    data[at:at + struct.calcsize(fmt)] = struct.pack(fmt, value)
    return data


def _bad(case: str, work: Path, good: Path, random_sd: dict, vocab: dict) -> tuple[Path, list[str]]:
    """(a bad source file, what its error line must say)."""
    f = work / "bad" / f"{case}.gguf"
    f.parent.mkdir(exist_ok=True)
    data = bytearray(good.read_bytes())
    kw = dict(n_heads=4, n_kv_heads=2, vocab=vocab)
    if case == "other-architecture":
        return write_llama_gguf(f, random_sd, arch="qwen2", **kw), ["architecture 'qwen2' is not supported"]
    if case == "unsupported-type":
        return write_llama_gguf(f, random_sd, qtype=Q.IQ4_NL, **kw), ["token_embd.weight", "type IQ4_NL, not supported"]
    if case == "truncated-data":
        f.write_bytes(data[: len(data) * 2 // 3])
        return f, ["not a valid GGUF file", "truncated"]
    if case == "truncated-header":
        f.write_bytes(data[:300])
        return f, ["not a valid GGUF file"]
    if case == "not-gguf":
        f.write_bytes(b"PK\x03\x04" + bytes(1000))
        return f, ["not a valid GGUF file", "magic"]
    if case == "huge-string-length":  # the first metadata key's length
        f.write_bytes(_patch(data, b"GGUF", "<Q", 1 << 62, skip=20))
        return f, ["not a valid GGUF file"]
    if case == "huge-array-count":  # tokenizer.ggml.tokens: u32 type, u32 item type, u64 count
        f.write_bytes(_patch(data, b"tokenizer.ggml.tokens", "<Q", 1 << 60, skip=8))
        return f, ["not a valid GGUF file"]
    if case == "huge-tensor-count":
        f.write_bytes(_patch(data, b"GGUF", "<Q", 1 << 62, skip=4))
        return f, ["not a valid GGUF file"]
    if case == "tensor-offset-past-end":  # token_embd.weight: u32 n_dims, 2 x u64 dims, u32 type, u64 offset
        f.write_bytes(_patch(data, b"token_embd.weight", "<Q", 1 << 40, skip=24))
        return f, ["not a valid GGUF file"]
    if case == "metadata-contradicts-tensors":
        return write_llama_gguf(f, random_sd, n_heads=4, n_kv_heads=4, vocab=vocab), \
            ["blk.0.attn_k.weight", "shape (128, 256)", "metadata implies (256, 256)"]
    if case == "rope-scaling-yarn":
        return write_llama_gguf(f, random_sd, extra={"llama.rope.scaling.type": "yarn"}, **kw), \
            ["rope scaling type 'yarn' is not supported"]
    if case == "rope-freqs":
        return write_llama_gguf(f, random_sd, extra_tensors={"rope_freqs.weight": np.ones(32)}, **kw), \
            ["rope_freqs.weight", "not supported"]
    if case == "unexpected-tensor":
        return write_llama_gguf(f, random_sd, extra_tensors={"blk.0.attn_q.bias": np.zeros(256)}, **kw), \
            ["unexpected tensor 'blk.0.attn_q.bias'"]
    if case == "metadata-wrong-type":
        return write_llama_gguf(f, random_sd, extra={"llama.expert_count": "eight"}, **kw), \
            ["llama.expert_count", "should be an integer"]
    if case == "tokenizer-larger-than-vocabulary":
        return write_llama_gguf(f, random_sd, n_heads=4, n_kv_heads=2, vocab=sentencepiece_vocab(LLAMA_TOK)), \
            ["32000 tokens", "vocabulary is 512"]
    if case == "unknown-pre-tokenizer":
        tokens = byte_level_alphabet() + ["\u0120t"]
        v = {"model": "gpt2", "pre": "qwen2", "tokens": tokens, "merges": ["\u0120 t"], "types": [1] * len(tokens),
             "bos": 0, "eos": 1}
        return write_llama_gguf(f, random_sd, n_heads=4, n_kv_heads=2, vocab=v), \
            ["tokenizer.ggml.pre 'qwen2' is not supported"]
    if case == "not-a-gguf-suffix":
        f = f.with_suffix(".bin")
        f.write_bytes(data)
        return f, ["must be a folder or a .gguf file"]
    raise AssertionError(case)


def byte_level_alphabet() -> list[str]:
    from tokenizers.pre_tokenizers import ByteLevel
    return sorted(ByteLevel.alphabet())


BAD = ["other-architecture", "unsupported-type", "truncated-data", "truncated-header", "not-gguf",
       "huge-string-length", "huge-array-count", "huge-tensor-count", "tensor-offset-past-end",
       "metadata-contradicts-tensors", "rope-scaling-yarn", "rope-freqs", "unexpected-tensor",
       "metadata-wrong-type", "tokenizer-larger-than-vocabulary", "unknown-pre-tokenizer", "not-a-gguf-suffix"]


@pytest.mark.parametrize("case", BAD)
def test_bad_gguf(case, work, typed_gguf, random_sd, stories_vocab, tmp_path):
    bad, needles = _bad(case, work, typed_gguf(Q.Q4_0), random_sd, stories_vocab)
    out = tmp_path / "out"
    line = one_line_error(run(convert_main, bad, out), "llama-convert", str(bad), *needles)
    assert list(tmp_path.iterdir()) == [], line  # nothing written, no temporary folder left

