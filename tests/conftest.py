"""Shared fixtures: the real test data in ../shared/data beside the checkout."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
DATA = TESTS.parents[1] / "shared" / "data"
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))  # `import checkpoints` from any test module


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
