"""The ascend backend (not implemented yet: see its issue)."""
