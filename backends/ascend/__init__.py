"""The ascend backend: Huawei Ascend NPUs (910B-class) through torch_npu's fused operators.

Ascend 910B has no FP8: FP8 checkpoints are converted at load to BF16 or INT8 W8A8 (see
``convert.py`` and docs/ascend.md). torch_npu is imported lazily, never when this package is.
"""
