"""Artifacts that cannot lie (issue 16): no command destroys its input, an interrupted export leaves
nothing behind, NaN/Inf is an error where it enters, and flags are range-checked where parsed.

Every case asserts the exit code, one stderr line naming the flag / file / tensor, no traceback, and
that the files around it hash as before (nothing destroyed) with no hidden `.partial-*` folder or
lock left (nothing left behind). Inputs are a micro checkpoint (2 layers, hidden 32) and an
embed-only export of it (1.5 s); the two interrupted exports run as subprocesses.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from qwen3next_trt.cli import main
from qwen3next_trt.model import Qwen3NextConfig
from qwen3next_trt.model.loader import random_model, save_model
from qwen3next_trt.outputs import exclusive
from qwen3next_trt.runtime import generator as generator_module

from micro import MICRO, VICTIM


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    ckpt = save_model(random_model(Qwen3NextConfig.from_dict(MICRO), seed=0), root / "ckpt")
    assert main(["export", "--model", str(ckpt), "--out", str(root / "onnx"), "--layers", "embed"]) == 0
    return root


@pytest.fixture
def work(sources, tmp_path):
    """A private copy of the checkpoint and the export, in a folder nothing else writes to."""
    import shutil

    shutil.copytree(sources / "ckpt", tmp_path / "ckpt")
    shutil.copytree(sources / "onnx", tmp_path / "onnx")
    return tmp_path


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def one_line(capsys, rc: int, code: int, *needles: str, prefix: str = "error: ") -> str:
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    assert rc == code, err
    assert len(lines) == 1 and lines[0].startswith(prefix), err
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


# ------------------------------------------------------------------------------------------------
# 1. No destroyed input: refused before anything is written or deleted


def _foreign(w: Path) -> Path:
    d = w / "mine"
    (d / "sub").mkdir(parents=True)
    (d / "sub" / "notes.txt").write_text("keep me")
    return d


OUT_CASES = {
    # case: (argv from the work folder, words the error line holds)
    "export out = checkpoint, --force": (lambda w: ["export", "--model", w / "ckpt", "--out", w / "ckpt", "--force"], ["is the input checkpoint"]),
    "export out inside checkpoint": (lambda w: ["export", "--model", w / "ckpt", "--out", w / "ckpt" / "onnx", "--force"], ["is inside the input"]),
    "export out contains checkpoint": (lambda w: ["export", "--model", w / "ckpt", "--out", w, "--force"], ["contains the input"]),
    "export out contains --calib-file": (lambda w: ["export", "--model", w / "ckpt", "--out", w / "onnx", "--calib-file", w / "onnx" / "new.json"], ["contains the input --calib-file"]),
    "export out foreign, --force": (lambda w: ["export", "--model", w / "ckpt", "--out", _foreign(w), "--force", "--layers", "embed"], ["is not empty", "--force"]),
    "random-checkpoint out = its --model": (lambda w: ["random-checkpoint", "--model", w / "ckpt", "--out", w / "ckpt"], ["is the input checkpoint"]),
    "build out = onnx": (lambda w: ["build", "--onnx", w / "onnx", "--out", w / "onnx"], ["is the input export"]),
    "build out inside onnx": (lambda w: ["build", "--onnx", w / "onnx", "--out", w / "onnx" / "engines"], ["is inside the input export"]),
    "build out foreign": (lambda w: ["build", "--onnx", w / "onnx", "--out", _foreign(w)], ["is not an engines folder"]),
    "deploy out = onnx": (lambda w: ["deploy", "--onnx", w / "onnx", "--out", w / "onnx"], ["is the input export"]),
    "deploy out contains onnx": (lambda w: ["deploy", "--onnx", w / "onnx", "--out", w], ["contains the input export"]),
    "validate report = onnx": (lambda w: ["validate", "--onnx", w / "onnx", "--report", w / "onnx"], ["--report", "is the input export"]),
    "validate report inside checkpoint": (lambda w: ["validate", "--onnx", w / "onnx", "--model", w / "ckpt", "--report", w / "ckpt" / "r"], ["--report", "is inside the input checkpoint"]),
}


@pytest.mark.parametrize("case", list(OUT_CASES))
def test_output_that_would_destroy_is_refused(case, work, capsys):
    argv, needles = OUT_CASES[case]
    argv = [str(a) for a in argv(work)]
    before = snapshot(work)
    flag = "--report" if "--report" in argv else "--out"
    one_line(capsys, main(argv), 2, flag, *needles)
    assert snapshot(work) == before  # nothing destroyed, nothing created (no partial folder, no lock)


def test_export_replaces_only_its_own_export(work, capsys):
    """The positive side: an earlier export is replaced, and the checkpoint beside it is untouched."""
    ckpt = snapshot(work / "ckpt")
    (work / "onnx" / "stale.onnx").write_text("from an earlier export")
    assert main(["export", "--model", str(work / "ckpt"), "--out", str(work / "onnx"), "--layers", "embed"]) == 0
    assert not (work / "onnx" / "stale.onnx").exists() and (work / "onnx" / "manifest.json").is_file()
    assert snapshot(work / "ckpt") == ckpt
    assert sorted(p.name for p in work.iterdir()) == ["ckpt", "onnx"]


# ------------------------------------------------------------------------------------------------
# 2. Interrupted runs; one writer per --out


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_export_leaves_nothing(sig, work):
    out = work / "out"
    before = snapshot(work)
    proc = subprocess.Popen([sys.executable, "-m", "qwen3next_trt.cli", "export", "--model", str(work / "ckpt"), "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 90
        while not list(work.glob(".out.partial-*/*.onnx")):  # it has started writing
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.05)
        assert (work / ".out.lock").read_text().strip() == str(proc.pid)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + sig, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"interrupted: {sig.name}") and "Traceback" not in err, err
    assert snapshot(work) == before  # no out, no .out.partial-*, no .out.lock


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_stale_partials_and_lock_are_taken_over(work, capsys):
    out, dead = work / "out", _dead_pid()
    stale = work / f".out.partial-{dead}-abc"
    stale.mkdir()
    (stale / "layer_00.prefill.onnx").write_bytes(b"half")
    live = work / ".out.partial-1-xyz"  # pid 1 always runs: another writer's, not ours to remove
    live.mkdir()
    (work / ".out.lock").write_text(f"{dead}\n")  # left by a killed writer: no flock behind it
    assert main(["export", "--model", str(work / "ckpt"), "--out", str(out), "--layers", "embed"]) == 0
    assert not stale.exists() and live.is_dir() and not (work / ".out.lock").exists()
    assert (out / "manifest.json").is_file()


def test_second_writer_is_refused(work, capsys):
    out = work / "out"
    with exclusive(out, "--out"):  # another open file description: conflicts like another process
        before = snapshot(work)
        rc = main(["export", "--model", str(work / "ckpt"), "--out", str(out), "--layers", "embed"])
        one_line(capsys, rc, 2, f"--out {out}", f"in use by process {os.getpid()}")
        assert snapshot(work) == before
    assert not (work / ".out.lock").exists()


# ------------------------------------------------------------------------------------------------
# 3. Numbers that are not numbers


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_nonfinite_checkpoint_tensor(bad, work, capsys):
    shard = work / "ckpt" / "model.safetensors"
    tensors = load_file(str(shard))
    tensors[VICTIM][3, 5] = bad
    save_file(tensors, str(shard), metadata={"format": "pt"})
    before = snapshot(work)
    rc = main(["export", "--model", str(work / "ckpt"), "--out", str(work / "out"), "--layers", "1"])
    one_line(capsys, rc, 2, str(shard), VICTIM, "NaN/Inf", "(3, 5)")
    assert snapshot(work) == before


class _FakeModel:
    """The runtime's view of an export whose logits turn NaN on its fourth pass: the two prefills (the
    prompts differ in length), one decode, then NaN in the second decode."""

    def __init__(self, onnx_dir, session_factory, manifest=None, mtp=None):
        self.dir, self.calls, self.has_mtp = Path(onnx_dir), 0, False
        self.manifest = SimpleNamespace(context_limit=64, dtype="fp16", vocab_size=16)

    def new_store(self, batch, capacity):
        return SimpleNamespace(mask=np.zeros((batch, capacity), bool))

    def forward(self, ids, store, rows, positions, past, mode, keep_linear_inputs=False):
        self.calls += 1
        logits = np.zeros((len(rows), ids.shape[1], 16), np.float32)
        logits[..., 3] = 1.0
        if self.calls >= 4:
            logits[-1, -1, 5] = np.nan
        return logits, None, None


@pytest.mark.parametrize("temperature", ["0", "0.8"], ids=["greedy", "sampled"])
def test_nonfinite_logits_stop_generation(temperature, work, monkeypatch, capsys):
    monkeypatch.setattr(generator_module, "GraphModel", _FakeModel)
    rc = main(["generate", "--onnx", str(work / "onnx"), "--prompt-ids", "1,2", "--prompt-ids", "4", "--temperature", temperature,
               "--max-new-tokens", "8", "--stream"])
    out, err = capsys.readouterr()
    assert rc == 1 and "Traceback" not in out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {work / 'onnx'}: logits of request 1"), err
    assert "not finite" in lines[0] and "after 2 generated token(s)" in lines[0]
    assert [line.split()[0] for line in out.splitlines() if line[:3] in ("[0]", "[1]")] == ["[0]", "[1]"] * 2  # none from the NaN pass


# ------------------------------------------------------------------------------------------------
# 4. Range checks where flags are parsed


FLAG_CASES = {
    "--layers": (["export", "--model", "tiny", "--out", "{w}/out", "--layers", ""], "expected 'all'"),
    "--shard-mb": (["random-checkpoint", "--model", "tiny", "--out", "{w}/out", "--shard-mb", "0"], ">= 1"),
    "--threads": (["generate", "--onnx", "{w}/onnx", "--prompt-ids", "1", "--threads", "-2"], ">= 1"),
    "--generate": (["validate", "--onnx", "{w}/onnx", "--generate", "-3"], ">= 1"),
    "--atol": (["parity", "--model", "tiny", "--atol", "-1"], ">= 0"),
    "--max-seq": (["build", "--onnx", "{w}/onnx", "--out", "{w}/out", "--max-seq", "-4"], ">= 1"),
    "--max-context": (["build", "--onnx", "{w}/onnx", "--out", "{w}/out", "--max-context", "0"], ">= 1"),
}


@pytest.mark.parametrize("flag", list(FLAG_CASES))
def test_flag_out_of_range(flag, work, capsys):
    argv, expected = FLAG_CASES[flag]
    before = snapshot(work)
    with pytest.raises(SystemExit) as e:
        main([a.format(w=work) for a in argv])
    one_line(capsys, e.value.code, 2, f"error: {flag}: expected", expected)
    assert snapshot(work) == before
