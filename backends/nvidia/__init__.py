"""The nvidia backend (not implemented yet: see its issue)."""
