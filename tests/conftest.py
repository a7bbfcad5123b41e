import os

import pytest
import torch

# Other kernel paths for the same tests (validate/README.md, "Tolerances"): QWEN3NEXT_TRT_TORCH_THREADS
# sets PyTorch's threads (1 changes how ATen splits reductions), ATEN_CPU_CAPABILITY=default|avx2 (set
# before Python starts) PyTorch's vector kernels, QWEN3NEXT_TRT_ORT_OPT_LEVEL / _ORT_THREADS ONNX Runtime's
# fusions and threads (qwen3next_trt/sessions.py). The suite's tolerances must hold under every combination.
torch.set_num_threads(int(os.environ.get("QWEN3NEXT_TRT_TORCH_THREADS", "2")))
if os.environ.get("QWEN3NEXT_TRT_NO_MKLDNN"):
    torch.backends.mkldnn.enabled = False


def pytest_collection_modifyitems(config, items):
    # GPU tests run only where CUDA is present.
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# ------------------------------------------------------------------------------------------------
# Shared by tests/test_export.py and tests/test_validate.py: one full fp32 export of the 'tiny'
# preset (every layer, embed, final, lm_head, mtp and the stitched `model` graph), made once per
# test session (~100 s on two cores). Tests that damage an export work on a copy.


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory):
    from qwen3next_trt.export.exporter import Exporter

    out = tmp_path_factory.mktemp("tiny_export") / "onnx"
    Exporter("tiny", out, progress=lambda m: None).run()
    return out
