"""plugins/: CUDA kernels for LinearAttention, CausalConvWithState and MoE as TensorRT plugins (the Python bindings and the C++ plugin library, plugins/cpp/)."""
