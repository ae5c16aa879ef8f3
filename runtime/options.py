"""What every command resolves the same way from a model folder and its options: the device,
the replicas, the tokenizer, the BOS token. (`llama-run` and the lm-eval backend share them.)"""
from __future__ import annotations

from pathlib import Path

import torch

from llamafuse.formats import LlamafuseError, Manifest
from llamafuse.formats.manifest import sha256_file
from llamafuse.formats.tokenizer import Tokenizer, read_tokenizer


def resolve_device(name: str | None) -> str:
    """--device as given (cuda checked to exist), or cuda if there is one. GPUs are counted through
    NVML where it answers, which leaves this process's CUDA driver uninitialized: GPU ranks can
    then be forked from it (`parallel._start_method`)."""
    if name is None:
        return "cuda" if torch.cuda.device_count() > 0 else "cpu"
    if name == "cuda" and torch.cuda.device_count() == 0:
        raise LlamafuseError("--device cuda, but no CUDA device is available")
    return name


def resolve_replicas(device: str, tp: int, replicas: int | None) -> int:
    """Data-parallel copies: as asked (checked against the GPUs), else all GPUs / tp; 1 on the CPU."""
    if replicas is not None:
        if device == "cuda" and replicas * tp > torch.cuda.device_count():
            raise LlamafuseError(f"--replicas {replicas} x tp {tp} needs {replicas * tp} GPUs, "
                                 f"{torch.cuda.device_count()} available")
        return replicas
    if device == "cuda":
        if torch.cuda.device_count() < tp:
            raise LlamafuseError(f"the model has tp={tp} but only {torch.cuda.device_count()} GPU(s) are available")
        return torch.cuda.device_count() // tp
    return 1


def model_tokenizer(folder: Path, m: Manifest) -> Tokenizer:
    """The model's tokenizer, checked against the manifest's size and checksum."""
    path = folder / m.tokenizer.file
    if path.is_file() and (path.stat().st_size != m.tokenizer.bytes or sha256_file(path) != m.tokenizer.sha256):
        raise LlamafuseError(f"{path}: differs from the tokenizer the manifest records (size or sha256)")
    return read_tokenizer(path, m.config.vocab_size)


def bos_id(m: Manifest, bos: bool | None) -> int | None:
    """The BOS to put first: the tokenizer's own rule unless --bos/--no-bos says otherwise."""
    if not (m.tokenizer.add_bos if bos is None else bos):
        return None
    if m.tokenizer.bos_id is None:
        raise LlamafuseError(f"--bos: the model's tokenizer ({m.tokenizer.file}) has no BOS token")
    return m.tokenizer.bos_id
