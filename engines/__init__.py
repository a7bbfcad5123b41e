"""engines/: compiles the exported ONNX into TensorRT engines (planned: issue 5)."""
