"""qwen3next_trt/sessions.py: what crosses a session's boundary in numpy (bfloat16 as float32, float8 as
its bits) and where ONNX Runtime placed each node; oracle: ml_dtypes' roundings, the graph's own nodes."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper

from qwen3next_trt.sessions import OrtSession, host_dtype


def _graph(path, nodes, inputs, outputs):
    model = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs), opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.save(model, str(path))
    return path


def test_bfloat16_ports_travel_as_float32(tmp_path):
    # a bf16 input passed through (the CPU provider has no bf16 arithmetic), and a float32 input cast
    # to bf16: both come back as float32
    path = _graph(tmp_path / "g.onnx",
                  [helper.make_node("Identity", ["b"], ["twice"]), helper.make_node("Cast", ["x"], ["y"], to=TensorProto.BFLOAT16)],
                  [helper.make_tensor_value_info("b", TensorProto.BFLOAT16, [2, 3]), helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                  [helper.make_tensor_value_info("twice", TensorProto.BFLOAT16, [2, 3]), helper.make_tensor_value_info("y", TensorProto.BFLOAT16, [2, 3])])
    rng = np.random.default_rng(0)
    b, x = rng.standard_normal((2, 3)).astype(np.float32), rng.standard_normal((2, 3)).astype(np.float32)
    twice, y = OrtSession(path).run(None, {"b": b, "x": x})
    as_bf16 = lambda a: a.astype(ml_dtypes.bfloat16).astype(np.float32)  # noqa: E731
    assert twice.dtype == np.float32 and np.array_equal(twice, as_bf16(b))  # rounded to bf16 on the way in
    assert np.array_equal(y, as_bf16(x))
    assert host_dtype("bfloat16") == np.float32 and host_dtype("float8e4m3fn") == np.uint8


def test_placement_names_every_node(tmp_path):
    path = _graph(tmp_path / "g.onnx", [helper.make_node("Relu", ["x"], ["r"], name="relu"), helper.make_node("Neg", ["r"], ["y"], name="neg")],
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])])
    placement = OrtSession(path).placement()
    assert sorted(n for nodes in placement.values() for n in nodes) == ["Neg neg", "Relu relu"]
    assert set(placement) == {"CPUExecutionProvider"}


def test_deterministic_compute_is_chosen_or_taken_from_the_environment(tmp_path, monkeypatch):
    # SessionOptions.use_deterministic_compute: off unless asked (measured on the H200: it does not make ONNX
    # Runtime 1.31.1's CUDA MoE repeatable, NOTES.md), by argument or QWEN3NEXT_TRT_ORT_DETERMINISTIC; kept by siblings
    import pytest

    from qwen3next_trt.errors import InputError
    from qwen3next_trt.sessions import ORT_DETERMINISTIC_ENV, session_options

    path = _graph(tmp_path / "g.onnx", [helper.make_node("Relu", ["x"], ["y"])],
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])])
    monkeypatch.delenv(ORT_DETERMINISTIC_ENV, raising=False)
    assert not session_options().use_deterministic_compute and not session_options(device="cuda").use_deterministic_compute
    assert OrtSession(path).deterministic is False
    on = OrtSession(path, deterministic=True)
    assert on.deterministic is True and on.session.get_session_options().use_deterministic_compute
    assert on.sibling(cuda_graph=False).deterministic is True
    x = np.arange(-2, 2, dtype=np.float32)
    assert np.array_equal(on.run(None, {"x": x})[0], np.maximum(x, 0))
    monkeypatch.setenv(ORT_DETERMINISTIC_ENV, "1")
    assert OrtSession(path).deterministic is True
    assert OrtSession(path, deterministic=False).deterministic is False  # the argument wins over the environment
    monkeypatch.setenv(ORT_DETERMINISTIC_ENV, "yes")
    with pytest.raises(InputError, match=ORT_DETERMINISTIC_ENV):
        OrtSession(path)
