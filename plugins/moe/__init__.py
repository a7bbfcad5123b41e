"""plugins/moe: CUDA kernel (kernel.cu), TensorRT binding (binding.py), README."""
