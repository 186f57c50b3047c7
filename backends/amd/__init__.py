"""The amd backend: the shared Triton kernels on ROCm GPUs, fp8 weights as e4m3fnuz on MI300."""
