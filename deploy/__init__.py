"""deploy/: a Triton Inference Server model repository for the runtime and the engines."""
