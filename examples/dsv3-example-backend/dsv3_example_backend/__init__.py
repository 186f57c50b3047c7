"""dsv3-example-backend: an out-of-tree dsv3 backend implementing a few operators in plain PyTorch."""

__version__ = "0.1.0"
