"""The amd backend (not implemented yet: see its issue)."""
