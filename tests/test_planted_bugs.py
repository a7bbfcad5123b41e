"""The parity gate must catch broken exports: each test plants one bug in the export path only
(the reference the validator runs stays correct), exports, and asserts that validation fails on
the graphs the bug touches and passes elsewhere."""

import torch

from qwen3next_trt.export import custom_ops
from qwen3next_trt.export.exporter import Exporter
from qwen3next_trt.model import modeling_qwen3_next as modeling
from qwen3next_trt.validate.validator import Validator


def export_and_validate(tmp_path, layers="0,3"):
    out = tmp_path / "onnx"
    Exporter("tiny", out, layers=layers, progress=lambda m: None).run()
    return Validator(out, progress=lambda m: None).run()


def failing_graphs(report):
    return {r.graph for r in report.rows if not r.passed}


def test_correct_export_passes(tmp_path):
    report = export_and_validate(tmp_path)
    assert report.passed and not failing_graphs(report)


def test_swapped_q_k_grouping_is_caught(tmp_path, monkeypatch):
    split = modeling.Qwen3NextGatedDeltaNet.split_projections

    def swapped(self, qkvz, ba):
        q, k, v, z, b, a = split(self, qkvz, ba)
        return k, q, v, z, b, a

    with monkeypatch.context() as m:
        m.setattr(modeling.Qwen3NextGatedDeltaNet, "split_projections", swapped)
        out = tmp_path / "onnx"
        Exporter("tiny", out, layers="0,3", progress=lambda m: None).run()
    report = Validator(out, progress=lambda m: None).run()
    assert not report.passed
    assert failing_graphs(report) == {"layer_00.prefill", "layer_00.decode"}


def test_norm_without_plus_one_is_caught(tmp_path, monkeypatch):
    def plain_weight(self, x):
        return torch.nn.functional.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)

    with monkeypatch.context() as m:
        m.setattr(modeling.Qwen3NextRMSNorm, "forward", plain_weight)
        out = tmp_path / "onnx"
        Exporter("tiny", out, layers="0,3", progress=lambda m: None).run()
    report = Validator(out, progress=lambda m: None).run()
    assert {"layer_00.prefill", "layer_00.decode", "layer_03.prefill", "layer_03.decode"} <= failing_graphs(report)


def test_conv_state_off_by_one_is_caught(tmp_path, monkeypatch):
    conv = custom_ops._conv_kernel

    def shifted(x, weight, state):
        return conv(x, weight, torch.roll(state, 1, dims=-1))

    with monkeypatch.context() as m:
        m.setattr(custom_ops, "_conv_kernel", shifted)
        out = tmp_path / "onnx"
        Exporter("tiny", out, layers="0", progress=lambda m: None).run()
    report = Validator(out, progress=lambda m: None).run()
    assert failing_graphs(report) == {"layer_00.prefill", "layer_00.decode"}


def test_fp16_recurrent_state_is_caught(tmp_path, monkeypatch):
    scan = custom_ops._linear_attention_kernel

    def half_state(q, k, v, state, *rest):
        return scan(q, k, v, state.half().float(), *rest)

    with monkeypatch.context() as m:
        m.setattr(custom_ops, "_linear_attention_kernel", half_state)
        out = tmp_path / "onnx"
        Exporter("tiny", out, layers="0", progress=lambda m: None).run()
    report = Validator(out, progress=lambda m: None).run()
    assert "layer_00.decode" in failing_graphs(report)
