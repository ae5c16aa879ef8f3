"""Float8 weights: the converter's e4m3 rows with per-row scales, the runtime's float8 product,
the whole model within its tolerance of the float64 reference, and GPUs without FP8 refused."""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from llamafuse.convert.quantize import quantize_rows
from llamafuse.formats.reference import reference_logits
from llamafuse.convert.sources import open_source
from llamafuse.convert.write import convert
from llamafuse.formats import LlamafuseError, load_manifest, names
from llamafuse.formats.tensorfile import read_header
from llamafuse.formats.tokenizer import read_tokenizer
from llamafuse.runtime.fp8 import E4M3_MAX, check_fp8_device, fp8_linear
from llamafuse.runtime.parallel import launch
from llamafuse.runtime.validate import compare, logits_worker

from conftest import check_standard_safetensors


def test_quantize_rows_round_trip() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 96, generator=g) * torch.logspace(-3, 2, 64)[:, None]  # rows of very different size
    w[5] = 0
    q, scale = quantize_rows(w)
    assert q.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32 and scale.shape == (64,)
    assert scale[5] == 1 and torch.all(q[5].float() == 0)
    assert torch.allclose(q.float().abs().amax(1)[scale != 1], torch.tensor(E4M3_MAX))  # each row's max -> 448
    back = q.float() * scale[:, None]
    rel = (back - w).abs() / w.abs().amax(1, keepdim=True).clamp(min=1e-30)
    assert rel.max() <= 2 ** -4, rel.max()   # e4m3: 3 mantissa bits, half an ulp of the row's max at most


def test_fp8_linear_is_the_quantized_product() -> None:
    """The product equals quantize-per-token(x) @ dequantize(W).T, computed plainly in float64,
    to the bfloat16 rounding of the kernel's output."""
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(40, 128, generator=g).half(), torch.randn(48, 128, generator=g)
    q, scale = quantize_rows(w)
    xs = x.double().abs().amax(1, keepdim=True) / E4M3_MAX
    xq = (x.double() / xs).float().to(torch.float8_e4m3fn).double() * xs
    want = xq @ (q.double() * scale.double()[:, None]).T
    got = fp8_linear(x, q, scale)
    assert got.dtype == torch.float16
    assert ((got.double() - want).abs() / want.abs().clamp(min=1e-2)).max() <= 2 ** -7


@pytest.fixture(scope="module")
def fp8_stories(tmp_path_factory, stories_meta: Path) -> dict[int, Path]:
    outs = {}
    for tp in (1, 2):
        outs[tp] = tmp_path_factory.mktemp("fp8") / f"stories-fp8-tp{tp}"
        convert(open_source(stories_meta), outs[tp], tp, "float8", progress=False)
    return outs


def test_float8_rank_files(fp8_stories: dict[int, Path]) -> None:
    folder = fp8_stories[2]
    m = load_manifest(folder)
    assert m.dtype == "float8" and m.torch_dtype == torch.float16
    infos, _ = read_header(folder / m.ranks[0].file)
    qkv = names.layer(0, names.QKV)
    assert infos[qkv].dtype == torch.float8_e4m3fn and infos[names.scale(qkv)].dtype == torch.float32
    assert infos[names.scale(qkv)].shape == infos[qkv].shape[:1]
    assert infos[names.EMBED].dtype == infos[names.OUTPUT].dtype == infos[names.layer(0, names.ATTN_NORM)].dtype == torch.float16
    check_standard_safetensors(folder)


@pytest.mark.parametrize("tp", [1, 2])
def test_float8_model_within_tolerance(fp8_stories: dict[int, Path], stories_meta: Path, tp: int) -> None:
    """The whole float8 model (CPU float8 products) against the float64 reference over the source.
    (tp ranks quantize their own slice of a row-parallel input, so tp 1 and 2 differ by rounding.)"""
    folder = fp8_stories[tp]
    m = load_manifest(folder)
    tok = read_tokenizer(folder / m.tokenizer.file, m.config.vocab_size)
    seqs = [[1] + ids for ids in tok.encode(["Once upon a time, there was a little girl named Lily.",
                                             "She loved to play outside in the park with her dog."])]
    ours = launch(logits_worker, tp, 1, "cpu", folder, m, seqs)
    c = compare(ours, reference_logits(stories_meta, seqs))
    assert c.passes("float8"), c


def test_gpu_without_fp8_refused(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (7, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Tesla V100-SXM2-32GB")
    with pytest.raises(LlamafuseError, match="FP8 matrix units .* Tesla V100-SXM2-32GB is 7.0"):
        check_fp8_device(torch.device("cuda", 0), [(64, 64)])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (9, 0))
    check_fp8_device(torch.device("cuda", 0), [(64, 64)])
    with pytest.raises(LlamafuseError, match="multiples of 16"):
        check_fp8_device(torch.device("cuda", 0), [(64, 172)])


def test_float8_refused_before_loading(monkeypatch, tmp_path: Path, stories_meta: Path) -> None:
    """On a GPU without FP8 matrix units a run stops in one line before reading any weights."""
    from tqdm import tqdm

    from llamafuse.runtime import evaluate
    from llamafuse.runtime.parallel import Context
    out = tmp_path / "fp8"
    convert(open_source(stories_meta), out, 1, "float8", progress=False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (7, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Tesla V100-SXM2-32GB")
    reads: list[object] = []
    monkeypatch.setattr(evaluate, "load_rank", lambda *a, **k: reads.append(a))
    ctx = Context(0, 1, 1, torch.device("cuda", 0), None, 0, 0, 1, time.time())
    with pytest.raises(LlamafuseError, match="FP8 matrix units"), ThreadPoolExecutor(2) as pool:
        evaluate._Startup(ctx, out, load_manifest(out), evaluate.Settings(64, progress=False), pool,
                          tqdm(disable=True), "hellaswag")
    assert not reads


def test_float8_tolerance_still_catches_a_wrong_conversion(tmp_path: Path, stories_meta: Path) -> None:
    """The float8 tolerance is loose (quantization noise), but weights that are not the source's
    (gate and up swapped in every layer) still fail validation against it."""
    import shutil
    src = tmp_path / "swapped"
    shutil.copytree(stories_meta, src)
    sd = torch.load(src / "consolidated.00.pth", weights_only=True)
    for k in [k for k in sd if k.endswith("feed_forward.w1.weight")]:
        w3 = k.replace("w1", "w3")
        sd[k], sd[w3] = sd[w3].clone(), sd[k].clone()
    torch.save(sd, src / "consolidated.00.pth")
    out = tmp_path / "swapped-fp8"
    convert(open_source(src), out, 1, "float8", progress=False)
    m = load_manifest(out)
    tok = read_tokenizer(out / m.tokenizer.file, m.config.vocab_size)
    seqs = [[1] + ids for ids in tok.encode(["Once upon a time, there was a little girl named Lily.",
                                             "She loved to play outside in the park with her dog."])]
    c = compare(launch(logits_worker, 1, 1, "cpu", out, m, seqs), reference_logits(stories_meta, seqs))
    assert not c.passes("float8"), c
