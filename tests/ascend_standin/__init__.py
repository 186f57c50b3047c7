"""A test stand-in for torch_npu (see torch_npu/__init__.py) and the helpers that install it."""
