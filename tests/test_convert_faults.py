"""llama-convert stopped mid-way or fed numbers that are not numbers.

SIGTERM and SIGINT to a real conversion leave nothing behind; a conversion killed outright leaves
its temporary folder, which the next conversion into the same folder removes, while a live
conversion's folder is never touched; folders get the umask's mode; NaN, inf, or a value that
overflows the target dtype in a Meta or HF source is refused in one line naming the tensor.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result

from llamafuse.convert.cli import main as cli_main
from llamafuse.formats import load_manifest

from checkpoints import load_meta_state_dict, write_hf_checkpoint, write_meta_from_state_dict
from conftest import command

FAULTS = Path(__file__).resolve().parent / "faults"
RUN_S = 120  # a conversion of stories260K slowed to 0.1 s per tensor takes ~7 s




def temporaries(parent: Path) -> list[Path]:
    return sorted(p for p in parent.iterdir() if ".tmp-" in p.name)


def messages(stderr: str) -> list[str]:
    """stderr less the progress bar."""
    return [ln for ln in re.split(r"[\r\n]+", stderr) if ln.strip() and not ln.startswith("writing:")]


class Conversion:
    """`llama-convert --tp 2 SRC OUT` in a subprocess, 0.1 s per tensor (tests/faults)."""

    def __init__(self, src: Path, out: Path):
        self.out = out
        env = {**os.environ, "LLAMAFUSE_SLOW_WRITE": "0.1",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(FAULTS), os.environ.get("PYTHONPATH")]))}
        self.proc = subprocess.Popen([*command("llama-convert"), "--tp", "2", str(src), str(out)], env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))

    def writing(self) -> Path:
        """Wait until rank files are being written; returns the temporary folder."""
        end = time.monotonic() + RUN_S
        while True:
            assert self.proc.poll() is None, f"ended ({self.proc.returncode}) before writing: {self.proc.communicate()}"
            assert time.monotonic() < end, "no rank file written"
            for tmp in temporaries(self.out.parent):
                if any(f.stat().st_size for f in tmp.glob("rank-*")):
                    return tmp
            time.sleep(0.02)

    def finish(self) -> tuple[int, str]:
        _, err = self.proc.communicate(timeout=RUN_S)
        return self.proc.returncode, err


def run_cli(*args: object) -> Result:
    return CliRunner().invoke(cli_main, [str(a) for a in args])


# ---------------------------------------------------------------- stopped mid-way


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_signal_mid_conversion_leaves_nothing(tmp_path, stories_meta, signum):
    conv = Conversion(stories_meta, tmp_path / "out")
    conv.writing()
    os.kill(conv.proc.pid, signum)
    code, err = conv.finish()
    assert code == 128 + signum, err
    assert messages(err) == [f"llama-convert: interrupted by {signum.name}; nothing was written to the destination"], err
    assert os.listdir(tmp_path) == []


def test_killed_conversion_is_removed_by_the_next(tmp_path, stories_meta):
    conv = Conversion(stories_meta, tmp_path / "out")
    dead = conv.writing()
    conv.proc.kill()
    assert conv.finish()[0] == -signal.SIGKILL
    assert temporaries(tmp_path) == [dead]  # what SIGKILL leaves (GBs for a real model)

    r = run_cli("--tp", 2, stories_meta, tmp_path / "other")  # another OUT, the same parent folder
    assert r.exit_code == 0, r.output
    assert messages(r.stderr) == [f"llama-convert: removed {dead}, left by a conversion that was killed"]
    assert os.listdir(tmp_path) == ["other"] and load_manifest(tmp_path / "other").tp == 2


def test_live_conversion_is_kept(tmp_path, stories_meta):
    conv = Conversion(stories_meta, tmp_path / "out")
    live = conv.writing()
    os.kill(conv.proc.pid, signal.SIGSTOP)  # alive, and certainly not finished while the other runs
    try:
        r = run_cli("--tp", 2, stories_meta, tmp_path / "other")
    finally:
        os.kill(conv.proc.pid, signal.SIGCONT)
    assert r.exit_code == 0, r.output
    assert messages(r.stderr) == [] and live.is_dir()
    code, err = conv.finish()
    assert code == 0, err
    assert sorted(os.listdir(tmp_path)) == ["other", "out"]
    assert [f.sha256 for f in load_manifest(tmp_path / "out").ranks] == [f.sha256 for f in load_manifest(tmp_path / "other").ranks]


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=oct)
def test_folders_follow_the_umask(tmp_path, stories_meta, umask):
    old = os.umask(umask)
    try:
        r = run_cli("--tp", 2, stories_meta, tmp_path / "out")
    finally:
        os.umask(old)
    assert r.exit_code == 0, r.output
    out = tmp_path / "out"
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # as mkdir makes it, not mkdtemp's 0700
    assert {f.name: f.stat().st_mode & 0o777 for f in out.iterdir()} == {
        f.name: 0o666 & ~umask for f in out.iterdir()}


# ---------------------------------------------------------------- numbers that are not numbers


@pytest.fixture(scope="module")
def stories_sd(stories_meta) -> dict[str, torch.Tensor]:
    return load_meta_state_dict(stories_meta)


def bad_source(folder: Path, sd: dict[str, torch.Tensor], layout: str, name: str, value: float,
               tokenizer: Path) -> Path:
    """stories260K with one element of Meta tensor `name` set to `value`, in Meta or HF layout."""
    sd = {k: v.clone() for k, v in sd.items()}
    sd[name].view(-1)[-3] = value
    if layout == "meta":
        write_meta_from_state_dict(folder, sd, n_heads=8, n_kv_heads=4, multiple_of=4, shards=2, tokenizer=tokenizer)
    else:
        write_hf_checkpoint(folder, sd, n_heads=8, n_kv_heads=4, tokenizer=tokenizer)
    return folder


NOT_FINITE = {  # case: (layout, Meta tensor, value, --dtype, the error after 'SRC: ')
    "meta-nan": ("meta", "layers.3.attention.wq.weight", float("nan"), "float32",
                 "layers.3.wq has NaN values in the source checkpoint"),
    "meta-inf": ("meta", "tok_embeddings.weight", -float("inf"), "bfloat16",
                 "embed has infinite values in the source checkpoint"),
    "meta-overflow": ("meta", "layers.1.feed_forward.w2.weight", 1e6, "float16",
                      "layers.1.w2 has values up to 1e+06, which overflow float16 (largest 65504); "
                      "--dtype bfloat16 or float32 can hold them"),
    "hf-nan": ("hf", "layers.2.attention.wk.weight", float("nan"), "float16",
               "layers.2.wk has NaN values in the source checkpoint"),
    "hf-inf": ("hf", "output.weight", float("inf"), "float32", "output has infinite values in the source checkpoint"),
    "hf-overflow": ("hf", "norm.weight", -7e4, "float16",
                    "norm has values up to 7e+04, which overflow float16 (largest 65504); "
                    "--dtype bfloat16 or float32 can hold them"),
}


@pytest.mark.parametrize("case", list(NOT_FINITE))
def test_not_finite_is_refused(tmp_path, stories_sd, stories_tokenizer, case):
    layout, name, value, dtype, why = NOT_FINITE[case]
    src = bad_source(tmp_path / "src", stories_sd, layout, name, value, stories_tokenizer)
    r = run_cli("--tp", 2, "--dtype", dtype, src, tmp_path / "out")
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert messages(r.stderr) == [f"llama-convert: error: {src}: {why}"], r.stderr
    assert os.listdir(tmp_path) == ["src"]  # no OUT, no temporary folder


def test_overflow_is_fine_in_a_wider_dtype(tmp_path, stories_sd, stories_tokenizer):
    src = bad_source(tmp_path / "src", stories_sd, "meta", "layers.1.feed_forward.w2.weight", 1e6, stories_tokenizer)
    r = run_cli("--dtype", "bfloat16", src, tmp_path / "out")
    assert r.exit_code == 0, r.output
    assert load_manifest(tmp_path / "out").dtype == "bfloat16"
