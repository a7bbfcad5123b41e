"""Bad checkpoints and configs end in one line naming the file and the field or tensor, exit code 2.

Each case damages a copy of a small valid checkpoint in one way. Tensor-level damage is checked both
through `load_model` (an InputError) and through the CLI's `parity`, which loads our model before it
touches transformers, so the error surfaces there first.
"""

from __future__ import annotations

import json
import re
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from qwen3next_trt.cli import main
from qwen3next_trt.errors import InputError
from qwen3next_trt.model import Qwen3NextConfig, load_model, load_preset
from qwen3next_trt.model import checkpoint as checkpoint_module
from qwen3next_trt.model.loader import random_model, save_model

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
from micro import MICRO, VICTIM
DELETE = object()  # as a config value: remove the field


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    root = tmp_path_factory.mktemp("originals")
    model = random_model(Qwen3NextConfig.from_dict(MICRO), seed=0)
    return {"single": save_model(model, root / "single"), "sharded": save_model(model, root / "sharded", max_shard_bytes=2**14)}


@pytest.fixture
def single(originals, tmp_path):
    return shutil.copytree(originals["single"], tmp_path / "single")


@pytest.fixture
def sharded(originals, tmp_path):
    path = shutil.copytree(originals["sharded"], tmp_path / "sharded")
    assert (path / INDEX).exists()
    return path


def one_error_line(capsys, rc: int, *needles: str) -> str:
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    assert rc == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if value is DELETE:
            del config[key]
        else:
            config[key] = value
    (path / "config.json").write_text(json.dumps(config))


def edit_tensors(path, edit):
    tensors = load_file(str(path / SINGLE))
    edit(tensors)
    save_file(tensors, str(path / SINGLE), metadata={"format": "pt"})


def header_of(f) -> tuple[int, dict]:
    data = f.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    return n, json.loads(data[8 : 8 + n])


# ------------------------------------------------------------------------------------------------
# config.json


CONFIG_CASES = {
    "model_type missing": ({"model_type": DELETE}, ["model_type"]),
    "model_type llama": ({"model_type": "llama"}, ["model_type", "llama"]),
    "hidden_size missing": ({"hidden_size": DELETE}, ["hidden_size"]),
    "num_attention_heads a string": ({"num_attention_heads": "2"}, ["num_attention_heads"]),
    "layer_types wrong length": ({"layer_types": ["linear_attention"]}, ["layer_types"]),
    "rms_norm_eps a string": ({"rms_norm_eps": "1e-6"}, ["rms_norm_eps"]),
    "rope_theta a string": ({"rope_theta": "1e4"}, ["rope_theta"]),
    "partial_rotary_factor a string": ({"partial_rotary_factor": "0.25"}, ["partial_rotary_factor"]),
    "rope_scaling not an object": ({"rope_scaling": 5}, ["rope_scaling"]),
    "tie_word_embeddings a string": ({"tie_word_embeddings": "false"}, ["tie_word_embeddings"]),
    "rms_norm_eps negative": ({"rms_norm_eps": -1}, ["rms_norm_eps"]),
    "yarn factor a string": ({"rope_scaling": {"rope_type": "yarn", "factor": "4"}}, ["factor"]),
}


@pytest.mark.parametrize("command", ["info", "parity"])
@pytest.mark.parametrize(
    "case",
    list(CONFIG_CASES),
)
def test_bad_config(case, command, single, capsys):
    changes, needles = CONFIG_CASES[case]
    edit_config(single, **changes)
    with pytest.raises(InputError):
        load_model(single)
    one_error_line(capsys, main([command, "--model", str(single)]), "config.json", *needles)


@pytest.mark.parametrize("command", ["info", "parity"])
def test_missing_config(command, single, capsys):
    (single / "config.json").unlink()
    with pytest.raises(InputError):
        load_model(single)
    one_error_line(capsys, main([command, "--model", str(single)]), str(single / "config.json"))


def test_config_not_json(single, capsys):
    (single / "config.json").write_text('{"model_type": "qwen3_next",')
    one_error_line(capsys, main(["info", "--model", str(single)]), "config.json", "JSON")


# ------------------------------------------------------------------------------------------------
# Files and tensors


def check_load_error(path, capsys, *needles: str) -> str:
    with pytest.raises(InputError) as e:
        load_model(path)
    for needle in needles:
        assert needle in str(e.value), f"{needle!r} not in {str(e.value)!r}"
    return one_error_line(capsys, main(["parity", "--model", str(path)]), *needles)


def test_index_names_missing_shard(sharded, capsys):
    index = json.loads((sharded / INDEX).read_text())
    index["weight_map"][VICTIM] = "model-00099-of-00099.safetensors"
    (sharded / INDEX).write_text(json.dumps(index))
    check_load_error(sharded, capsys, INDEX, "model-00099-of-00099.safetensors", VICTIM)
    one_error_line(capsys, main(["info", "--model", str(sharded)]), INDEX, "model-00099-of-00099.safetensors")


def test_index_without_weight_map(sharded, capsys):
    (sharded / INDEX).write_text(json.dumps({"weight_map": ["not", "an", "object"]}))
    check_load_error(sharded, capsys, INDEX, "weight_map")


def test_missing_tensor(single, capsys):
    edit_tensors(single, lambda t: t.pop(VICTIM))
    check_load_error(single, capsys, SINGLE, VICTIM, "missing")


def test_missing_tensor_sharded(sharded, capsys):
    index = json.loads((sharded / INDEX).read_text())
    del index["weight_map"][VICTIM]
    (sharded / INDEX).write_text(json.dumps(index))
    check_load_error(sharded, capsys, INDEX, VICTIM, "missing")


def test_wrong_shape(single, capsys):
    edit_tensors(single, lambda t: t.update({VICTIM: torch.zeros(32, 31)}))
    check_load_error(single, capsys, SINGLE, VICTIM, "(32, 31)", "(32, 32)")


def test_wrong_dtype(single, capsys):
    edit_tensors(single, lambda t: t.update({VICTIM: torch.zeros(32, 32, dtype=torch.int32)}))
    check_load_error(single, capsys, SINGLE, VICTIM, "int32")


def test_truncated_in_data(single, capsys):
    f = single / SINGLE
    _, header = header_of(f)
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    f.write_bytes(f.read_bytes()[:-100])  # the last tensor in the data area loses its tail
    check_load_error(single, capsys, str(f), "truncated", f"'{last}'")


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_truncated_in_header(layout, single, sharded, capsys):
    path = single if layout == "single" else sharded
    f = path / SINGLE if layout == "single" else sorted(path.glob("model-*.safetensors"))[1]
    n, _ = header_of(f)
    f.write_bytes(f.read_bytes()[: 8 + n // 2])
    line = check_load_error(path, capsys, str(f), "header")
    if layout == "sharded":  # the index says which tensors were to come from the damaged shard
        named = re.search(r"tensor '([^']+)'", line)
        weight_map = json.loads((path / INDEX).read_text())["weight_map"]
        assert named and weight_map[named.group(1)] == f.name, line


def test_missing_shard_file(sharded, capsys):
    shard = sorted(sharded.glob("model-*.safetensors"))[1]
    shard.unlink()
    check_load_error(sharded, capsys, INDEX, shard.name)


# ------------------------------------------------------------------------------------------------
# FP8 weights and scales


def make_fp8(path, scale: torch.Tensor | None):
    """Store VICTIM as float8_e4m3fn with `scale` as its weight_scale_inv (None: no scale at all)."""
    edit_config(path, quantization_config={"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                           "weight_block_size": [128, 128]})

    def edit(tensors):
        w = tensors[VICTIM]
        s = w.abs().max() / 448
        tensors[VICTIM] = (w / s).to(torch.float8_e4m3fn)
        if scale is not None:
            tensors[VICTIM + "_scale_inv"] = scale

    edit_tensors(path, edit)


def test_fp8_valid_loads(single):
    make_fp8(single, torch.full((1, 1), 0.01))
    load_model(single)  # the damaged cases below differ from this one only in their scales


@pytest.mark.parametrize(
    "scale, needles",
    [
        (torch.full((2, 1), 0.01), ["(2, 1)", "(1, 1)"]),
        (torch.full((1,), 0.01), ["(1,)", "(1, 1)"]),
        (torch.zeros(1, 1), ["is 0.0"]),
        (torch.full((1, 1), -0.5), ["is -0.5"]),
        (torch.full((1, 1), float("inf")), ["is inf"]),
        (torch.full((1, 1), float("nan")), ["is nan"]),
    ],
    ids=["shape", "1-D", "zero", "negative", "inf", "nan"],
)
def test_fp8_bad_scale(scale, needles, single, capsys):
    make_fp8(single, scale)
    check_load_error(single, capsys, SINGLE, VICTIM + "_scale_inv", *needles)


def test_fp8_weight_without_scale(single, capsys):
    make_fp8(single, None)
    check_load_error(single, capsys, SINGLE, VICTIM, "float8_e4m3fn")


def test_bad_block_size(single, capsys):
    make_fp8(single, torch.full((1, 1), 0.01))
    edit_config(single, quantization_config={"quant_method": "fp8", "weight_block_size": [128]})
    check_load_error(single, capsys, "config.json", "weight_block_size")


# ------------------------------------------------------------------------------------------------
# Writing: no half-written output


def fail_on_second_shard(monkeypatch, error: BaseException):
    real, calls = checkpoint_module.save_file, []

    def save_file_then_fail(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            raise error
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(checkpoint_module, "save_file", save_file_then_fail)
    return calls


def test_failed_write_leaves_nothing(tmp_path, monkeypatch, capsys):
    calls = fail_on_second_shard(monkeypatch, OSError(28, "No space left on device"))
    out = tmp_path / "out" / "ckpt"
    rc = main(["random-checkpoint", "--model", "tiny", "--out", str(out), "--shard-mb", "1"])
    one_error_line(capsys, rc, str(out), "No space left")
    assert len(calls) == 2, "failed midway, after one shard was written"
    assert not out.exists() and list(out.parent.iterdir()) == []


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    fail_on_second_shard(monkeypatch, KeyboardInterrupt())
    out = tmp_path / "ckpt"
    with pytest.raises(KeyboardInterrupt):
        main(["random-checkpoint", "--model", "tiny", "--out", str(out), "--shard-mb", "1"])
    assert list(tmp_path.iterdir()) == []


def test_failed_rewrite_keeps_old_checkpoint(tmp_path, monkeypatch, capsys):
    out = tmp_path / "ckpt"
    assert main(["random-checkpoint", "--model", "tiny", "--out", str(out), "--shard-mb", "1", "--seed", "1"]) == 0
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    fail_on_second_shard(monkeypatch, OSError(28, "No space left on device"))
    one_error_line(capsys, main(["random-checkpoint", "--model", "tiny", "--out", str(out), "--shard-mb", "1", "--seed", "2"]), str(out))
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before
    assert list(tmp_path.iterdir()) == [out]


def test_rewrite_replaces_checkpoint(tmp_path, capsys):
    out = tmp_path / "ckpt"
    for seed in ("1", "2"):
        assert main(["random-checkpoint", "--model", "tiny", "--out", str(out), "--seed", seed]) == 0
    assert list(tmp_path.iterdir()) == [out]
    expected = random_model(load_preset("tiny"), seed=2).model.embed_tokens.weight
    assert torch.equal(load_model(out).model.embed_tokens.weight, expected)


def test_refuses_to_replace_other_directory(tmp_path, capsys):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    one_error_line(capsys, main(["random-checkpoint", "--model", "tiny", "--out", str(out)]), str(out))
    assert (out / "keep.txt").read_text() == "precious" and sorted(p.name for p in tmp_path.iterdir()) == ["notes"]
