"""engines/: compiles the exported ONNX into TensorRT engines (engines/README.md)."""
