"""Triton kernels shared by the nvidia and amd backends.

Importing this package does not import triton. The kernel modules do (``quant``, ``dequant``,
``gemm``, ``moe``, ``norm``, ``mla``); ``ops`` builds the operator implementations the plugins
hand out and imports the kernel modules only when an operator is first called, so a backend can
describe its coverage on a machine without triton or a GPU.

With ``TRITON_INTERPRET=1`` set before the kernel modules are imported, every kernel runs through
Triton's interpreter on CPU tensors (how CI checks them without a GPU).
"""
