"""export/: traces the reference model layer by layer into ONNX (planned: issue 3)."""
