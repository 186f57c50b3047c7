"""Triton kernels shared by the nvidia and amd backends.

Importing this package does not import triton. The kernel modules do (``quant``, ``dequant``,
``gemm``, ``moe``, ``norm``, ``mla``, ``paged``, ``attention``, ``jit_utils``). These do not: ``target`` (what
differs between the GPU vendors, as data), ``ops`` (one builder per operator, the implementations
they hand out, usability checks), ``plugin_hooks`` (the plugins' hooks, written once for any
target) and ``runtime``. The kernel modules are imported when an operator is first called, so a
backend can describe its coverage on a machine without triton or a GPU.

With ``TRITON_INTERPRET=1`` set before the kernel modules are imported, every kernel runs through
Triton's interpreter on CPU tensors (how CI checks them without a GPU).
"""
