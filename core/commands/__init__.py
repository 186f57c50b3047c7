"""Subcommands of the ``dsv3`` command line, one module each."""
