"""plugins/causal_conv: CUDA kernel (kernel.cu), TensorRT binding (binding.py), README."""
