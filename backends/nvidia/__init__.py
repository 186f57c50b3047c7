"""The nvidia backend: the shared Triton kernels plus cuBLAS / cuBLASLt fast paths, on CUDA GPUs."""
