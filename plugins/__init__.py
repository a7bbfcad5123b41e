"""plugins/: CUDA kernels for LinearAttention, CausalConvWithState and MoE as TensorRT plugins (planned: issue 5)."""
