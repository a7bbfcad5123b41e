"""plugins/linear_attention: CUDA kernel (kernel.cu), TensorRT binding (binding.py), README."""
