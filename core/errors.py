"""The one exception type users see: the CLI prints its message on one line and exits non-zero."""


class Dsv3Error(Exception):
    """A user-facing error: bad input, an unusable backend, a contradictory config.

    The message must name the file, tensor or field at fault and fit on one line.
    """
