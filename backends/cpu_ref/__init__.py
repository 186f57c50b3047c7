"""cpu_ref: every operator in plain PyTorch. The numerics reference and the universal fallback.

Device-agnostic: these functions run on whatever device the tensors are on.
"""
