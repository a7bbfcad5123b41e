"""validate/: numerical parity of the reference against transformers, ONNX Runtime and TensorRT."""
