"""Integrity as part of the contract (issues 12 and 16): the manifest records the size and sha256 of
every file it names, and every stage that reads an export verifies what it uses; engines are tied to
the graph and weights they were built from.

Each case damages a private copy of a micro export (2 layers, hidden 32, every graph) and asserts:
exit 2, one `error:` line naming the file / field, no traceback, and the same damage the other way
round passes (the check is not a blanket refusal). Hashes are compared against hashlib directly.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from qwen3next_trt.cli import main
from qwen3next_trt.export.manifest import Manifest
from qwen3next_trt.hashing import verified_sha256
from qwen3next_trt.model import Qwen3NextConfig
from qwen3next_trt.model.loader import random_model, save_model

from micro import MICRO


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Two full exports of the micro model with different weights (seed 0 and seed 1), and engines
    for export A's embed graph (TensorRT-RTX builds ahead of time on the CPU)."""
    root = tmp_path_factory.mktemp("integrity")
    for name, seed in (("a", 0), ("b", 1)):
        ckpt = save_model(random_model(Qwen3NextConfig.from_dict(MICRO), seed=seed), root / f"ckpt_{name}")
        assert main(["export", "--model", str(ckpt), "--out", str(root / name)]) == 0
    assert main(["build", "--onnx", str(root / "a"), "--out", str(root / "engines_a"), "--graphs", "embed"]) == 0
    return root


@pytest.fixture
def export(exports, tmp_path):
    shutil.copytree(exports / "a", tmp_path / "onnx")
    return tmp_path / "onnx"


def one_line(capsys, rc: int, *needles: str) -> str:
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def _manifest(d: Path) -> dict:
    return json.loads((d / "manifest.json").read_text())


def _write_manifest(d: Path, m: dict):
    (d / "manifest.json").write_text(json.dumps(m))


def test_manifest_hashes_are_the_files_sha256(exports):
    m = _manifest(exports / "a")
    for g in m["graphs"]:
        assert g["sha256"] == hashlib.sha256((exports / "a" / g["file"]).read_bytes()).hexdigest()
    for w in m["weights"].values():
        assert w["sha256"] == hashlib.sha256((exports / "a" / w["file"]).read_bytes()).hexdigest()


def _flip_byte(path: Path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


GENERATE = ["generate", "--prompt-ids", "1,2,3", "--max-new-tokens", "2"]
DAMAGE = {
    # case: (damage to the copied export (export, exports root), the words the one error line holds)
    "weights overwritten, same size": (lambda d, r: _flip_byte(d / "layer_01.weights"), ["layer_01.weights", "content hash"]),
    "weights from another export": (lambda d, r: shutil.copyfile(r / "b" / "layer_00.weights", d / "layer_00.weights"),
                                    ["layer_00.weights", "content hash"]),
    "weights truncated": (lambda d, r: (d / "final.weights").write_bytes((d / "final.weights").read_bytes()[:100]),
                          ["final.weights", "100 bytes"]),
    "graph replaced by garbage": (lambda d, r: (d / "layer_00.decode.onnx").write_bytes(b"\x00garbage" * 50),
                                  ["layer_00.decode.onnx"]),
    "graph file missing": (lambda d, r: (d / "embed.onnx").unlink(), ["embed.onnx", "missing"]),
    "manifest: fewer layers": (lambda d, r: _write_manifest(d, {**_manifest(d), "config": {**_manifest(d)["config"], "num_hidden_layers": 1}}),
                               ["manifest.json", "num_hidden_layers"]),
    "manifest: version 1": (lambda d, r: _write_manifest(d, {**_manifest(d), "version": 1}), ["manifest.json", "version 1"]),
    "manifest: not JSON": (lambda d, r: (d / "manifest.json").write_text("{ not json"), ["manifest.json", "not valid JSON"]),
    "manifest: a field missing": (lambda d, r: _write_manifest(d, {k: v for k, v in _manifest(d).items() if k != "weights"}),
                                  ["manifest.json", "'weights'"]),
}


# every damage through `generate`; one of each class (a file's bytes, a graph, the manifest) through the other readers
MATRIX = [(case, "generate") for case in DAMAGE] + [
    (case, command) for command in ("validate", "build", "deploy")
    for case in ("weights from another export", "graph replaced by garbage", "manifest: fewer layers")]


@pytest.mark.parametrize("case,command", MATRIX)
def test_damaged_export_is_refused_by_every_reader(case, command, exports, export, tmp_path, capsys):
    damage, needles = DAMAGE[case]
    damage(export, exports)
    argv = {"generate": [*GENERATE, "--onnx", str(export)],
            "validate": ["validate", "--onnx", str(export), "--generate", "2"],
            "build": ["build", "--onnx", str(export), "--out", str(tmp_path / "engines")],
            "deploy": ["deploy", "--onnx", str(export), "--out", str(tmp_path / "repo")]}[command]
    one_line(capsys, main(argv), *needles)
    assert not (tmp_path / "engines").exists() and not (tmp_path / "repo").exists()


def test_undamaged_copy_runs(export, capsys):
    assert main([*GENERATE, "--onnx", str(export)]) == 0


def test_engine_of_another_export_is_refused(exports, tmp_path, capsys):
    # engines built from export a, used with export b: the same graph names, other bytes
    engines = tmp_path / "engines"
    shutil.copytree(exports / "engines_a", engines)
    # (the embed graph's ONNX bytes are the same in both exports: its weights file is what differs)
    one_line(capsys, main([*GENERATE, "--onnx", str(exports / "b"), "--engines", str(engines)]), "embed.engine.json",
             str(exports / "b" / "embed.weights"), "rebuild")
    one_line(capsys, main(["deploy", "--onnx", str(exports / "b"), "--engines", str(engines), "--out", str(tmp_path / "repo")]),
             "embed.engine.json", "rebuild")
    assert not (tmp_path / "repo").exists()


def test_engine_files_that_lie_are_named(exports, tmp_path, capsys):
    engines = tmp_path / "engines"
    shutil.copytree(exports / "engines_a", engines)
    (engines / "embed.engine").unlink()
    one_line(capsys, main(["inspect", str(engines / "embed.engine")]), "embed.engine", "missing")
    (engines / "embed.engine.json").write_text("{ not json")
    one_line(capsys, main(["inspect", str(engines)]), "embed.engine.json", "not valid JSON")
    one_line(capsys, main(["inspect", str(tmp_path / "nothing.engine")]), "nothing.engine.json", "not found")


def test_verified_hash_is_cached_per_file_identity(tmp_path, monkeypatch):
    monkeypatch.setenv("QWEN3NEXT_TRT_HASH_CACHE", str(tmp_path / "cache.json"))
    f = tmp_path / "w.bin"
    f.write_bytes(b"a" * 1000)
    want = hashlib.sha256(b"a" * 1000).hexdigest()
    assert verified_sha256(f) == (want, True)
    assert verified_sha256(f) == (want, False)  # the same file: the recorded hash
    f.write_bytes(b"b" * 1000)  # same size, other bytes: its identity changed, so it is hashed again
    assert verified_sha256(f) == (hashlib.sha256(b"b" * 1000).hexdigest(), True)
    (tmp_path / "cache.json").write_text("garbage")  # an unreadable cache is only a cache
    assert verified_sha256(f)[0] == hashlib.sha256(b"b" * 1000).hexdigest()


def test_hash_cache_forgets_files_that_are_gone(tmp_path, monkeypatch):
    from qwen3next_trt import hashing

    monkeypatch.setenv("QWEN3NEXT_TRT_HASH_CACHE", str(tmp_path / "cache.json"))
    monkeypatch.setattr(hashing, "CACHE_ENTRIES", 3)
    files = [tmp_path / f"w{i}.bin" for i in range(5)]
    for i, f in enumerate(files):
        f.write_bytes(bytes([i]) * 10)
        verified_sha256(f)
        if i < 3:
            f.unlink()  # gone before the next one is recorded
    kept = json.loads((tmp_path / "cache.json").read_text())
    assert set(kept) == {str(f.resolve()) for f in files[3:]}
    assert verified_sha256(files[4]) == (hashlib.sha256(bytes([4]) * 10).hexdigest(), False)


def test_manifest_round_trips(exports):
    m = Manifest.load(exports / "a")
    assert m.to_json() == {k: v for k, v in _manifest(exports / "a").items()}
    assert m.n_layers == MICRO["num_hidden_layers"] and m.generation_graphs()[:2] == ["embed", "final"]
    assert [g.name for g in m.select("layer_01")] == ["layer_01.prefill", "layer_01.decode"]


def test_validate_refuses_a_manifest_whose_config_is_not_its_source(export, capsys):
    # a consistent edit (one layer fewer, its graphs and the stitched model dropped) still differs
    # from the weight source the manifest names, which is what validate rebuilds the reference from
    m = _manifest(export)
    m["config"]["num_hidden_layers"] = 1
    m["graphs"] = [g for g in m["graphs"] if not g["name"].startswith(("layer_01", "model"))]
    _write_manifest(export, m)
    one_line(capsys, main(["validate", "--onnx", str(export), "--generate", "2"]), "manifest.json", "num_hidden_layers")


def _afile(tmp_path: Path) -> Path:
    (tmp_path / "afile").write_text("x")
    return tmp_path / "afile"


UNWRITABLE = {
    # case: (argv given the export and a scratch folder, words the one error line holds)
    "export --out under a file": (lambda e, t: ["export", "--model", "tiny", "--out", _afile(t) / "sub", "--layers", "embed"],
                                  ["--out", "is a file"]),
    "validate --report is a file": (lambda e, t: ["validate", "--onnx", e, "--report", _afile(t)], ["--report", "not a folder"]),
    "generate --json is a folder": (lambda e, t: [*GENERATE, "--onnx", e, "--json", t], ["--json", "is a folder"]),
    "generate --json under a file": (lambda e, t: [*GENERATE, "--onnx", e, "--json", _afile(t) / "x.json"], ["--json", "is a file"]),
    "calibrate --out under a file": (lambda e, t: ["calibrate", "--model", "tiny", "--out", _afile(t) / "c.json"], ["--out", "is a file"]),
    "export --calib-file is a folder": (lambda e, t: ["export", "--model", "tiny", "--out", t / "o", "--activations", "fp8",
                                                       "--precision", "fp8", "--calib-file", t], ["--calib-file", "is a folder"]),
}


def _exit_code(argv: list[str]) -> int:
    """main's return code, or the one argparse exits with (a flag refused where it is parsed)."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


@pytest.mark.parametrize("case", list(UNWRITABLE))
def test_outputs_that_cannot_be_written_are_named(case, export, tmp_path, capsys):
    argv, needles = UNWRITABLE[case]
    before = sorted(p.name for p in tmp_path.iterdir())
    one_line(capsys, _exit_code([str(a) for a in argv(export, tmp_path)]), *needles)
    assert sorted(p.name for p in tmp_path.iterdir()) in (before, sorted(before + ["afile"]))


def test_prompt_bytes_are_the_arguments_own_bytes():
    from qwen3next_trt.cli import prompt_from_bytes

    raw = b"\xff\xfeA\xc3\xa9"  # not UTF-8 as a whole: still a valid byte prompt (argv arrives surrogate-escaped)
    assert prompt_from_bytes(os.fsdecode(raw)) == list(raw)
    assert prompt_from_bytes("é") == [0xC3, 0xA9]
