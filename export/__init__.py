"""export/: traces the reference model layer by layer into ONNX graphs, and owns the contract every later
stage reads (manifest.py); each graph kind is defined once in kinds.py."""
