"""runtime/device.py: decode steps with the states kept on the device (ONNX Runtime IO binding, CUDA
graphs on the GPU), against the host path and the PyTorch reference's own greedy decoding.

Without a GPU the same decoder runs on the CPU provider (its "device" values are host OrtValues), which
checks the binding logic: ping-pong DeltaNet states, attention's growing key/value fed back, the fixed
batch with rows finishing early. The GPU test runs it on the CUDA provider, with and without CUDA graphs.
$QWEN3NEXT_TRT_TEST_EXPORT: a tiny fp32 export to use instead of exporting one (the device machine).
"""

from __future__ import annotations

import os

import ml_dtypes
import numpy as np
import pytest
import torch

from qwen3next_trt.errors import InputError
from qwen3next_trt.runtime import Generator
from qwen3next_trt.sessions import CUDA_EP, OrtSession

from greedy import separated_greedy

N = 10


@pytest.fixture(scope="module")
def export_dir(request):
    given = os.environ.get("QWEN3NEXT_TRT_TEST_EXPORT")
    return given if given else request.getfixturevalue("tiny_export")


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(7)
    return [rng.integers(0, 512, n).tolist() for n in (9, 4, 9, 15)]


@pytest.fixture(scope="module")
def expected(prompts):
    from qwen3next_trt.model.loader import WeightSource

    reference = WeightSource("tiny", seed=0, dtype=torch.float32).whole_model(with_mtp=False).float()
    return separated_greedy(reference, prompts, N)


def test_device_decoder_on_cpu_equals_reference_greedy(export_dir, prompts, expected):
    gen = Generator(export_dir, device_resident=True, step_times=True)
    assert gen.generate(prompts, N) == expected
    st = gen.last_stats
    assert st.device_resident and st.decode_steps == N - 1 and st.cuda_graphs == []  # nothing is captured on the CPU
    assert set(st.step_parts_s) == {"embed", "DeltaNet layers", "attention layers", "final + logits to host"}


def test_rows_finishing_early_keep_the_others_exact(export_dir, prompts, expected):
    # a stop token ends row 1 after its 3rd token; the batch keeps its shape, the others go on unchanged
    stop = expected[1][2]
    want = []
    for e in expected:
        cut = e.index(stop) + 1 if stop in e else len(e)
        want.append(e[:cut])
    host = Generator(export_dir, device_resident=False).generate(prompts, N, stop_tokens=[stop])
    dev = Generator(export_dir, device_resident=True).generate(prompts, N, stop_tokens=[stop])
    assert dev == host == want


def test_device_states_equal_the_host_path_states(export_dir, prompts):
    # after the same decode steps, the states held on the device equal the host store's, layer by layer
    from qwen3next_trt.runtime.device import DeviceDecoder

    gen = Generator(export_dir, device_resident=False)
    m = gen.model
    B, T = 2, 6
    ids = np.array([prompts[0][:T], prompts[3][:T]], np.int64)
    store = m.new_store(B, T + 4)
    store.mask[:, : T + 3] = True
    logits, _, _ = m.forward(ids, store, np.arange(B), np.broadcast_to(np.arange(T), (B, T)), (0, 0), "prefill")
    tokens = logits[:, -1].argmax(-1)
    host_store = m.new_store(B, T + 4)
    for a, b in zip(host_store.layers, store.layers):
        for x, y in zip(a, b):
            x.buffer[:] = y.buffer
    host_store.mask[:] = store.mask
    dec = DeviceDecoder(m, store, T, cuda_graphs=False)
    for step in range(3):
        L = T + step
        got = dec.step(tokens, np.full(B, L), store.mask[:, : L + 1])
        want, _, _ = m.forward(tokens[:, None], host_store, np.arange(B), np.full((B, 1), L), (0, L), "decode")
        np.testing.assert_allclose(got, want[:, 0], rtol=0, atol=1e-5)
        tokens = want[:, 0].argmax(-1)
    for i in range(m.n_layers):
        for slot, value in zip(host_store.layers[i], dec.state(i)):
            ref = slot.buffer[:, :, : T + 3] if slot.grows else slot.buffer
            np.testing.assert_allclose(value, ref, rtol=0, atol=1e-5, err_msg=f"layer {i} {slot.input}")


def test_device_values_round_trip_bf16_and_fp8_bits(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    model = helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                                                [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                                                [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])]),
                              opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.save(model, str(tmp_path / "g.onnx"))
    s = OrtSession(tmp_path / "g.onnx")
    x = np.array([[1.0, 1.0 + 2**-9, -3.14159]], np.float32)
    v = s.device_value("tensor(bfloat16)", x)
    assert v.data_type() == "tensor(bfloat16)"
    np.testing.assert_array_equal(s.to_host(v), x.astype(ml_dtypes.bfloat16).astype(np.float32))
    bits = np.array([0, 0x38, 0x7E, 0xFE], np.uint8)  # 0, 1.0, 448, -448 in e4m3
    f8 = s.device_value("tensor(float8e4m3fn)", bits)
    assert f8.data_type() == "tensor(float8e4m3fn)" and np.array_equal(s.to_host(f8), bits)
    # a value overwritten in place keeps its buffer (what a captured CUDA graph needs)
    ptr = v.data_ptr()
    s.device_value("tensor(bfloat16)", -x, into=v)
    assert v.data_ptr() == ptr and np.array_equal(s.to_host(v), (-x).astype(ml_dtypes.bfloat16).astype(np.float32))
    with pytest.raises(InputError, match="cuda_graph needs device 'cuda'"):
        OrtSession(tmp_path / "g.onnx", cuda_graph=True)


def _cuda_provider() -> bool:
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return torch.cuda.is_available() and CUDA_EP in ort.get_available_providers()


@pytest.mark.gpu
@pytest.mark.parametrize("cuda_graphs", [False, True], ids=["no-graphs", "cuda-graphs"])
def test_cuda_provider_device_resident_equals_reference_greedy(export_dir, prompts, expected, cuda_graphs):
    if not _cuda_provider():
        pytest.skip("onnxruntime-gpu's CUDA provider is not available here (bench/device/ort_cuda.sh carries it)")
    gen = Generator(export_dir, device="cuda", cuda_graphs=cuda_graphs, step_times=True)
    assert gen.device_resident  # chosen by itself: every session is on the CUDA provider
    assert gen.generate(prompts, N) == expected
    st = gen.last_stats
    print(f"cuda_graphs={cuda_graphs}: captured {st.cuda_graphs}; notes {st.device_notes}; "
          f"{st.decode_steps} steps in {st.decode_s * 1e3:.1f} ms (setup {st.decode_setup_s * 1e3:.0f} ms); parts {st.step_parts_s}")
    if not cuda_graphs:
        assert st.cuda_graphs == []
    else:  # every fixed-shape graph is either captured or named with the provider's reason
        fixed = {"embed", "final"} | {f"layer_{i:02d}.decode" for i in range(gen.model.n_layers) if not gen.model.is_attention[i]}
        noted = {n.split(":")[0] for n in st.device_notes}
        assert set(st.cuda_graphs) | noted == fixed
