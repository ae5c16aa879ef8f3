"""Checkpoints as people have them today.

Fast: Hugging Face configs written by transformers 5 (rotary base only under `rope_parameters`),
rope scaling `linear` and `llama3` in both spellings, explicit `head_dim`, tokenizer.json BOS
rules, and every config the model cannot honour refused with one line.

Slow (`-m slow`): the real pretrained SmolLM2-135M-Instruct, converted from its Q4_1 GGUF and from
a Hugging Face-layout copy of the same weights (transformers-5 config, transformers' tokenizer.json,
written by tests/smollm.py): identical rank files, float32 logits against the float64 reference and
transformers, the tokenizer against transformers', and HellaSwag's first 300 items item by item
against the independent one-pair-at-a-time harness re-implementation.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from llamafuse.convert.cli import main as convert_main
from llamafuse.convert.sources import open_source
from llamafuse.convert.tokenizer_files import gguf_tokenizer
from llamafuse.convert.write import convert
from llamafuse.formats import load_manifest
from llamafuse.formats.config import RopeScaling
from llamafuse.formats.manifest import sha256_file
from llamafuse.formats.reference import Reference, reference_logits
from llamafuse.formats.tensorfile import MappedFile
from llamafuse.runtime.cli import main as run_main
from llamafuse.runtime.validate import compare

from checkpoints import random_meta_state_dict
from conftest import CACHE, DATA
from gguf_files import sentencepiece_vocab, write_llama_gguf
from harness_reference import harness_metrics, harness_predictions, harness_scores
from helpers import VAL, hellaswag_texts, model_logits, one_line_error, read_docs, run

STORIES_HF = DATA / "stories260K" / "hf"
STORIES_META = DATA / "stories260K" / "meta"
SEQS = [[1, 15, 60, 200, 7, 300, 33] * 6, [1, 400, 12]]
N_ITEMS = 300
LL_TOL = 1e-3
ROOT = Path(__file__).resolve().parents[1]
REFERENCE_CODE = ("formats/reference.py", "tests/harness_reference.py")


def hf_copy(dst: Path, drop: tuple[str, ...] = (), **config) -> Path:
    """stories260K's HF folder with config.json changed: keys in `drop` removed, `config` set."""
    shutil.copytree(STORIES_HF, dst)
    for f in dst.iterdir():
        f.chmod(0o644)
    d = json.loads((dst / "config.json").read_text())
    for k in drop:
        d.pop(k)
    d.update(config)
    (dst / "config.json").write_text(json.dumps(d))
    return dst


TRANSFORMERS5 = {"drop": ("rope_theta", "torch_dtype"), "dtype": "float32"}


# ---------------------------------------------------------------- transformers 5 configs


def test_transformers5_config(tmp_path):
    """`rope_parameters` instead of `rope_theta`, `dtype` instead of `torch_dtype`: the same model,
    byte for byte."""
    new = hf_copy(tmp_path / "new", **TRANSFORMERS5, rope_parameters={"rope_theta": 10000.0, "rope_type": "default"})
    assert open_source(new).config == open_source(STORIES_HF).config
    convert(open_source(new), tmp_path / "a", 2, "float32", progress=False)
    convert(open_source(STORIES_HF), tmp_path / "b", 2, "float32", progress=False)
    assert load_manifest(tmp_path / "a").ranks == load_manifest(tmp_path / "b").ranks


def test_mistral_config_without_sliding_window(tmp_path):
    """Mistral's config names the same architecture when it sets no sliding window (v0.2 on)."""
    src = hf_copy(tmp_path / "src", model_type="mistral", architectures=["MistralForCausalLM"], sliding_window=None)
    assert open_source(src).config == open_source(STORIES_HF).config


def test_rope_theta_only_in_rope_parameters(tmp_path):
    """A base named only under `rope_parameters` is the one used; validate's reference reads it on its
    own, so a conversion that took the default base instead fails validation (exit 1)."""
    src = hf_copy(tmp_path / "src", **TRANSFORMERS5, rope_parameters={"rope_theta": 500000.0, "rope_type": "default"})
    assert open_source(src).config.rope_theta == 500000.0
    good, misread = tmp_path / "good", tmp_path / "misread"
    convert(open_source(src), good, 1, "float32", progress=False)
    convert(open_source(STORIES_HF), misread, 1, "float32", progress=False)  # the same weights, base 10000
    r = run(run_main, "validate", good, "--reference", src, "--device", "cpu")
    assert r.exit_code == 0 and "PASS" in r.stdout, r.output
    r = run(run_main, "validate", misread, "--reference", src, "--device", "cpu")
    assert r.exit_code == 1 and "FAIL" in r.stdout, r.output


LLAMA3 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


@pytest.mark.parametrize("spelling", ["transformers4", "transformers5"])
@pytest.mark.parametrize("kind", ["linear", "llama3"])
def test_rope_scaling(tmp_path, kind, spelling):
    """linear and llama3 scaling (its three wavelength bands all occur at head_dim 8 with an original
    context of 64), in either spelling: the rotary tables equal transformers' own frequencies, and
    the model runs like the reference forward, which computes the scaling its own way (Meta's loop)."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = {"factor": 2.0} if kind == "linear" else LLAMA3
    if spelling == "transformers4":
        src = hf_copy(tmp_path / "src", rope_scaling={"type": kind, **params})
    else:
        src = hf_copy(tmp_path / "src", **TRANSFORMERS5,
                      rope_parameters={"rope_type": kind, "rope_theta": 10000.0, **params})
    c = open_source(src).config
    assert c.rope_scaling == RopeScaling(kind, **params)
    out = tmp_path / "out"
    convert(open_source(src), out, 1, "float32", progress=False)
    hf = LlamaConfig(hidden_size=64, num_attention_heads=8, max_position_embeddings=512,
                     rope_parameters={"rope_type": kind, "rope_theta": 10000.0, **params})
    inv_freq, scale = ROPE_INIT_FUNCTIONS[kind](hf, "cpu")
    assert scale == 1.0
    angles = torch.outer(torch.arange(512, dtype=torch.float64), inv_freq.double())
    rope = MappedFile(out / "rank-00-of-01.safetensors")
    assert torch.allclose(rope.get("rope.cos").double(), angles.cos(), atol=1e-4)
    assert torch.allclose(rope.get("rope.sin").double(), angles.sin(), atol=1e-4)
    ref = reference_logits(src, SEQS)
    cmp = compare(model_logits(out, SEQS), ref)
    assert cmp.rel <= 1e-4 and cmp.top1 == 1.0, cmp
    assert compare(reference_logits(STORIES_HF, SEQS), ref).rel > 1e-3  # the scaling matters here


def test_explicit_head_dim(tmp_path):
    """head_dim 48 with hidden_size 128 and 4 heads (queries 192 wide): tp 1 and 2 run like the reference."""
    g = torch.Generator().manual_seed(7)
    dim, heads, kv, hd, ffn, vocab = 128, 4, 2, 48, 256, 512

    def w(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) / math.sqrt(shape[-1])
    sd = {"model.embed_tokens.weight": torch.randn(vocab, dim, generator=g), "model.norm.weight": 1 + 0.1 * w(dim),
          "lm_head.weight": w(vocab, dim)}
    for i in range(2):
        p = f"model.layers.{i}."
        sd.update({p + "self_attn.q_proj.weight": w(heads * hd, dim), p + "self_attn.k_proj.weight": w(kv * hd, dim),
                   p + "self_attn.v_proj.weight": w(kv * hd, dim), p + "self_attn.o_proj.weight": w(dim, heads * hd),
                   p + "mlp.gate_proj.weight": w(ffn, dim), p + "mlp.up_proj.weight": w(ffn, dim),
                   p + "mlp.down_proj.weight": w(dim, ffn), p + "input_layernorm.weight": 1 + 0.1 * w(dim),
                   p + "post_attention_layernorm.weight": 1 + 0.1 * w(dim)})
    src = tmp_path / "src"
    src.mkdir()
    save_file(sd, str(src / "model.safetensors"))
    shutil.copyfile(STORIES_HF / "tokenizer.model", src / "tokenizer.model")
    (src / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": dim, "intermediate_size": ffn,
        "num_hidden_layers": 2, "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": hd,
        "vocab_size": vocab, "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "dtype": "bfloat16",
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}}))
    assert open_source(src).config.head_dim == hd
    ref = reference_logits(src, SEQS)
    for tp in (1, 2):
        convert(open_source(src), tmp_path / f"tp{tp}", tp, "float32", progress=False)
        c = compare(model_logits(tmp_path / f"tp{tp}", SEQS), ref)
        assert c.rel <= 1e-4 and c.top1 == 1.0, (tp, c)


# ---------------------------------------------------------------- tokenizer.json BOS rule


def _stories_tokenizer_json(add_bos: bool) -> bytes:
    v = sentencepiece_vocab(STORIES_META / "tokenizer.model")
    from llamafuse.convert.tokenizer_files import GGUFVocab
    return gguf_tokenizer(GGUFVocab("llama", None, v["tokens"], v["types"], v["scores"], None, v["bos"], v["eos"],
                                    v["unk"], add_bos, None, None), "stories").data


@pytest.mark.parametrize("post_processor_bos,config_bos,want", [(True, None, True), (False, None, False),
                                                                 (True, False, False), (False, True, True)])
def test_tokenizer_json_bos_rule(tmp_path, post_processor_bos, config_bos, want):
    """tokenizer_config.json's add_bos_token when it sets one, else whatever tokenizer.json's
    post-processor adds; tokenizer.json wins over tokenizer.model, as in a fast tokenizer."""
    src = hf_copy(tmp_path / "src")
    (src / "tokenizer.json").write_bytes(_stories_tokenizer_json(post_processor_bos))
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    cfg.pop("add_bos_token")
    if config_bos is not None:
        cfg["add_bos_token"] = config_bos
    (src / "tokenizer_config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    convert(open_source(src), out, 1, "float32", progress=False)
    m = load_manifest(out)
    assert (m.tokenizer.file, m.tokenizer.add_bos, m.tokenizer.bos_id) == ("tokenizer.json", want, 1)


# ---------------------------------------------------------------- refused configs


def _wordlevel_tokenizer(n: int, eos_after: bool = False) -> str:
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(n)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if eos_after:
        tok.post_processor = processors.TemplateProcessing(single="$A w2", special_tokens=[("w2", 2)])
    return tok.to_str()


def _bad(case: str, tmp: Path) -> tuple[Path, list[str]]:
    src = tmp / "src"
    if case == "rope-type-yarn":
        return hf_copy(src, **TRANSFORMERS5, rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}), \
            ["config.json", "rope type 'yarn' is not supported"]
    if case == "rope-type-dynamic-tf4":
        return hf_copy(src, rope_scaling={"rope_type": "dynamic", "factor": 4.0}), ["rope type 'dynamic' is not supported"]
    if case == "rope-theta-disagrees":
        return hf_copy(src, rope_parameters={"rope_type": "default", "rope_theta": 5e5}), \
            ["rope_theta is 500000.0 in one place and 10000.0"]
    if case == "rope-llama3-incomplete":
        return hf_copy(src, rope_scaling={"rope_type": "llama3", "factor": 8.0}), \
            ["rope scaling llama3: missing 'low_freq_factor'"]
    if case == "rope-unknown-key":
        return hf_copy(src, rope_scaling={"rope_type": "linear", "factor": 2.0, "attention_factor": 0.5}), \
            ["rope type 'linear' with 'attention_factor' is not supported"]
    if case == "model-type":
        return hf_copy(src, model_type="qwen2"), ["model_type 'qwen2' is not supported"]
    if case == "architectures":
        return hf_copy(src, architectures=["MistralForCausalLM"]), ["architectures ['MistralForCausalLM'] is not supported"]
    if case == "sliding-window":
        return hf_copy(src, model_type="mistral", architectures=["MistralForCausalLM"], sliding_window=4096), \
            ["sliding_window 4096"]
    if case == "attention-bias":
        return hf_copy(src, attention_bias=True), ["attention_bias is true"]
    if case == "quantized":
        return hf_copy(src, quantization_config={"quant_method": "gptq"}), ["quantization_config"]
    if case == "dtype":
        return hf_copy(src, dtype="float8_e4m3fn"), ["dtype 'float8_e4m3fn' is not supported"]
    if case == "kv-heads-contradict-tensors":
        return hf_copy(src, num_key_value_heads=8), ["k_proj", "shape (32, 64)", "config.json implies (64, 64)"]
    if case == "head-dim-contradicts-tensors":
        return hf_copy(src, head_dim=16), ["q_proj", "config.json implies (128, 64)"]
    if case == "tokenizer-json-vocabulary":
        src = hf_copy(src)
        (src / "tokenizer.json").write_text(_wordlevel_tokenizer(1000))
        (src / "tokenizer_config.json").unlink()
        return src, ["tokenizer.json", "1000 tokens", "vocabulary is 512"]
    if case == "tokenizer-json-adds-eos":
        src = hf_copy(src)
        (src / "tokenizer.json").write_text(_wordlevel_tokenizer(100, eos_after=True))
        (src / "tokenizer_config.json").unlink()
        return src, ["tokenizer.json", "other than one leading BOS"]
    if case == "meta-use-scaled-rope":
        shutil.copytree(STORIES_META, src)
        for f in src.iterdir():
            f.chmod(0o644)
        p = json.loads((src / "params.json").read_text())
        (src / "params.json").write_text(json.dumps({**p, "use_scaled_rope": True}))
        return src, ["params.json", "use_scaled_rope"]
    raise AssertionError(case)


BAD = ["rope-type-yarn", "rope-type-dynamic-tf4", "rope-theta-disagrees", "rope-llama3-incomplete",
       "rope-unknown-key", "model-type", "architectures", "sliding-window", "attention-bias", "quantized", "dtype",
       "kv-heads-contradict-tensors", "head-dim-contradicts-tensors", "tokenizer-json-vocabulary",
       "tokenizer-json-adds-eos", "meta-use-scaled-rope"]


@pytest.mark.parametrize("case", BAD)
def test_refused(tmp_path, case):
    src, needles = _bad(case, tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    one_line_error(run(convert_main, src, tmp_path / "out"), "llama-convert", *needles)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


# ---------------------------------------------------------------- SmolLM2-135M (slow)


@pytest.fixture(scope="module")
def smol(tmp_path_factory, smollm2_gguf) -> dict:
    """The GGUF, its Hugging Face copy, and float32 conversions of both at tp 1 and 3."""
    from smollm import write_hf_copy

    root = tmp_path_factory.mktemp("smollm2")
    d = {"gguf": smollm2_gguf, "hf": write_hf_copy(smollm2_gguf, root / "hf")}
    for layout in ("gguf", "hf"):
        for tp in (1, 3):
            d[layout, tp] = root / f"{layout}-tp{tp}"
            convert(open_source(d[layout]), d[layout, tp], tp, "float32", progress=False)
    return d


@pytest.fixture(scope="module")
def smol_texts() -> list[list[int]]:
    return [[1] + list(range(300, 340)), [19556, 905, 216, 33, 34, 35, 36, 37], list(range(5000, 5100, 7))]


@pytest.fixture(scope="module")
def smol_reference(smol, smol_texts) -> list[torch.Tensor]:
    return reference_logits(smol["gguf"], smol_texts)


@pytest.mark.slow
def test_smollm2_gguf_and_hf_copy_fuse_identically(smol):
    """Same weights from the GGUF (interleaved q/k rows) and the HF copy (rotate-half): equal configs
    (rotary base 100000 read from `rope_parameters`), bit-identical rank files at tp 1 and 3."""
    g, h = open_source(smol["gguf"]), open_source(smol["hf"])
    assert g.config == h.config and g.config.rope_theta == 100000.0 and g.tied and h.tied
    assert (g.config.dim, g.config.n_layers, g.config.n_heads, g.config.n_kv_heads, g.config.vocab_size) == \
        (576, 30, 9, 3, 49152)
    for tp in (1, 3):
        assert load_manifest(smol["gguf", tp]).ranks == load_manifest(smol["hf", tp]).ranks
    for layout in ("gguf", "hf"):  # SmolLM2's tokenizer puts no BOS first
        t = load_manifest(smol[layout, 1]).tokenizer
        assert (t.file, t.add_bos, t.bos_id, t.eos_id) == ("tokenizer.json", False, 1, 2)


@pytest.mark.slow
def test_smollm2_references_agree(smol, smol_texts, smol_reference):
    """The float64 reference over the GGUF (interleaved rotary on its own rows) and over the HF copy
    (rotate-half), and transformers' LlamaForCausalLM on the HF copy, compute the same logits."""
    from transformers import LlamaForCausalLM

    # equal up to float64 rounding and the GGUF's float32 epsilon (9.99999975e-06 for 1e-05)
    assert compare(reference_logits(smol["hf"], smol_texts), smol_reference).rel < 1e-10
    model = LlamaForCausalLM.from_pretrained(str(smol["hf"]), dtype=torch.float32)
    with torch.no_grad():
        hf = [model(torch.tensor([s])).logits[0] for s in smol_texts]
    c = compare(hf, smol_reference)
    assert c.rel <= 1e-5 and c.top1 == 1.0, c


@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, 3])
def test_smollm2_logits(smol, smol_texts, smol_reference, tp):
    """float32 logits of the converted model (the HF copy's rank files are the same bytes) against the
    float64 reference over the GGUF."""
    c = compare(model_logits(smol["gguf", tp], smol_texts), smol_reference)
    assert c.rel <= 1e-4 and c.top1 == 1.0, c


@pytest.mark.slow
def test_smollm2_tokenizer_is_transformers(smol):
    """Our tokenizer.json from the GGUF metadata, with the manifest's BOS rule, encodes every HellaSwag
    text as transformers' own GGUF tokenizer does with its default special tokens (the harness's way)."""
    from transformers import AutoTokenizer

    from llamafuse.formats.tokenizer import read_tokenizer

    m = load_manifest(smol["gguf", 1])
    texts = hellaswag_texts(10042)
    ours = read_tokenizer(smol["gguf", 1] / "tokenizer.json", 49152).encode(texts)
    assert not m.tokenizer.add_bos
    hf = AutoTokenizer.from_pretrained(str(smol["gguf"].parent), gguf_file=smol["gguf"].name)
    assert ours == hf(texts)["input_ids"]


@pytest.mark.slow
@pytest.mark.parametrize("pre", ["llama-bpe", "gpt-2"])
def test_byte_level_pre_tokenizers(tmp_path, smollm2_gguf, pre):
    """SmolLM2's vocabulary and merges under another `tokenizer.ggml.pre` (Llama 3's split pattern,
    GPT-2's), BOS added: encodes as transformers' GGUF tokenizer does, on HellaSwag and on digits,
    contractions and spaces, where the patterns differ."""
    import gguf
    from transformers import AutoTokenizer

    r = gguf.GGUFReader(smollm2_gguf)
    f = r.fields
    vocab = {"model": "gpt2", "pre": pre, "tokens": f["tokenizer.ggml.tokens"].contents(),
             "merges": f["tokenizer.ggml.merges"].contents(), "types": f["tokenizer.ggml.token_type"].contents(),
             "bos": 1, "eos": 2}
    sd = random_meta_state_dict(dim=64, n_layers=1, n_heads=4, vocab=49152, multiple_of=32)
    del sd["output.weight"]
    path = write_llama_gguf(tmp_path / "m.gguf", sd, n_heads=4, n_kv_heads=4, vocab=vocab,
                            qtype=gguf.GGMLQuantizationType.Q8_0, extra={"tokenizer.ggml.add_bos_token": True})
    tf = open_source(path).tokenizer_file()
    assert (tf.add_bos, tf.bos_id) == (True, 1)
    texts = hellaswag_texts(300) + ["In 1999, 12345 people said: I'LL go, you'd've  gone\n\n  twice", "x  \t y"]
    ours = [[1] + e.ids for e in Tokenizer.from_str(tf.data.decode()).encode_batch(texts, add_special_tokens=False)]
    hf = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    assert ours == hf(texts)["input_ids"]


@pytest.mark.slow
def test_smollm2_validate_cli(smol):
    r = run(run_main, "validate", smol["gguf", 1], "--reference", smol["gguf"], "--device", "cpu")
    assert r.exit_code == 0 and "PASS" in r.stdout, r.output


def harness_reference_lls(smol: dict, docs: list[dict]) -> list[list[float]]:
    """The independent harness re-implementation's log-likelihoods for `docs` (float64, one pair at a
    time over the HF copy, tokenized by its transformers-written tokenizer.json, no BOS as that
    tokenizer adds none). They take minutes on two cores, so they are kept in the test cache under a
    key made of everything they are computed from: the HF copy's weights, config and tokenizer, the
    reference forward, the harness re-implementation, the data and the number of items."""
    hf = smol["hf"]
    h = hashlib.sha256()
    for part in (sha256_file(hf / "model.safetensors"), hf / "config.json", hf / "tokenizer.json",
                 *(ROOT / f for f in REFERENCE_CODE), VAL, str(len(docs))):
        h.update(part.read_bytes() if isinstance(part, Path) else part.encode())
    f = CACHE / f"smollm2-harness-reference-{h.hexdigest()[:20]}.json"
    if f.is_file():
        return json.loads(f.read_text())
    lls = harness_scores(Reference(hf), docs, Tokenizer.from_file(str(hf / "tokenizer.json")), None)
    tmp = f.with_suffix(f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(lls))
    os.replace(tmp, f)
    return lls


@pytest.mark.slow
def test_smollm2_hellaswag_matches_harness(smol, tmp_path):
    """HellaSwag's first 300 items, float32 on the CPU, the tokenizer's own BOS rule (none): every
    log-likelihood within 1e-3 of the independent float64 one-pair-at-a-time re-implementation, the
    same predictions and metrics."""
    docs = read_docs(N_ITEMS)
    samples, results = tmp_path / "samples.jsonl", tmp_path / "results.json"
    p = subprocess.run([sys.executable, "-c", "from llamafuse.runtime.cli import main; main()", "hellaswag",
                        str(smol["gguf", 1]), "--data", str(VAL), "--limit", str(N_ITEMS), "--device", "cpu",
                        "--samples", str(samples), "--output", str(results)], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    res = json.loads(results.read_text())
    assert res["settings"]["bos"] is False
    recs = {r["doc_id"]: r for r in map(json.loads, samples.read_text().splitlines()[1:])}
    ref = harness_reference_lls(smol, docs)
    worst = max(abs(a - b) for i in range(N_ITEMS) for a, b in zip(recs[i]["lls"], ref[i], strict=True))
    want = harness_metrics(docs, ref)
    print(json.dumps({"model": "SmolLM2-135M-Instruct Q4_1 (dequantized, float32)", "items": N_ITEMS,
                      "acc": res["acc"], "acc_norm": res["acc_norm"], "max_abs_dll": worst,
                      "eval_s": res["timing"]["eval_s"]}))
    assert worst <= LL_TOL
    for i, doc in enumerate(docs):
        assert (recs[i]["pred"], recs[i]["pred_norm"]) == harness_predictions(doc, ref[i]), i
    for k in ("acc", "acc_norm", "acc_stderr", "acc_norm_stderr"):
        assert res[k] == pytest.approx(want[k], abs=1e-12), k
