"""qwen3next-trt: Qwen3-Next (PyTorch / HF checkpoints) -> ONNX -> TensorRT engines, with parity evidence.

The pipeline stages live in top-level folders of the repository and are mapped into this package:
qwen3next_trt.model <- model/, .export <- export/, .plugins <- plugins/, .engines <- engines/,
.validate <- validate/.
"""

__version__ = "0.1.0"
