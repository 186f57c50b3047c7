"""``dsv3 serve``: an OpenAI-compatible HTTP server with continuous batching.

- :mod:`dsv3.runtime.serve.scheduler`: the thread that owns the model and a pool of cache slots.
- :mod:`dsv3.runtime.serve.app`: the FastAPI app (endpoints, limits, API key, streaming).
- :mod:`dsv3.runtime.serve.protocol`: request validation and OpenAI's error shape.
- :mod:`dsv3.runtime.serve.text`: incremental detokenization and stop strings.
- :mod:`dsv3.runtime.serve.tool_calls`, :mod:`~dsv3.runtime.serve.reasoning`,
  :mod:`~dsv3.runtime.serve.chat_output`: DeepSeek-V3 tool calls and ``<think>`` reasoning parsed from answers.

FastAPI and uvicorn are an optional extra: ``pip install 'dsv3[serve]'``.
"""

from __future__ import annotations

import socket

from ...errors import Dsv3Error

LOOPBACK = ("127.0.0.1", "::1", "localhost")


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: any free port); a Dsv3Error when it cannot bind."""
    sock = None
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(2048)
    except OSError as exc:
        if sock is not None:
            sock.close()
        raise Dsv3Error(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock
