"""Chat templates rendered within a time, output and memory limit.

A checkpoint's chat template is a program (Jinja). transformers renders it in jinja2's sandbox, which
refuses unsafe attributes but bounds neither time nor memory: ``{% for i in range(10**5) %}{% for j in
range(10**5) %}...`` runs for hours and ``{{ 'x' * 10**9 }}`` takes a gigabyte, inside the process that
holds the model. Here the template runs in a small separate process (``dsv3.runtime.chat_worker``: the same
transformers function, so the same text) whose address space is limited; a render that takes longer than
``TIME_LIMIT_S`` is stopped by killing that process, and one whose text is longer than
``MAX_OUTPUT_CHARS`` is refused. Every failure is one Dsv3Error line. The process starts on the first
render (about a second: it imports transformers) and serves every later one.

``guard(tokenizer, source)`` replaces the tokenizer's ``apply_chat_template`` by :func:`apply_chat_template`,
so every caller (the CLI, the server, the API) renders this way.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import subprocess
import sys
import threading
import time
from pathlib import Path

from ..errors import Dsv3Error
from .text import check_text

#: Longest a render may take. A real template renders a long conversation in milliseconds.
TIME_LIMIT_S = 5.0
#: Most characters a render may write: 163840 tokens (DeepSeek-V3's context) are about 1 MB of text.
MAX_OUTPUT_CHARS = 16 * 2**20
#: Memory the renderer may take beyond what it holds after start-up (~180 MB of address space).
MEMORY_BUDGET = 512 * 2**20
#: Longest the renderer may take to start (imports transformers: ~1 s; more on a loaded machine).
START_LIMIT_S = 120.0

_WORKER_FILE = Path(__file__).with_name("chat_worker.py")


class _Renderer:
    """The renderer process of this Python process, with its pipes."""

    def __init__(self) -> None:
        env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        self.owner = os.getpid()  # a forked child must not share this process's pipes
        self.proc = subprocess.Popen(
            [sys.executable, "-I", str(_WORKER_FILE), str(MEMORY_BUDGET)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
            bufsize=0,
        )
        self._pending = b""
        if self.read(START_LIMIT_S, 4096) != {"ready": True}:
            self.stop()
            raise Dsv3Error("the chat template renderer did not start (is transformers installed?)")

    def alive(self) -> bool:
        return self.owner == os.getpid() and self.proc.poll() is None

    def ask(self, request: bytes, timeout: float, limit: int) -> dict | None:
        """Send one request line; its answer, or None when ``timeout`` passes first."""
        try:
            self.proc.stdin.write(request)
        except OSError:  # it ended since the last render (killed from outside)
            return {"error": "ended before rendering (its process was stopped)"}
        return self.read(timeout, limit)

    def read(self, timeout: float, limit: int) -> dict | None:
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._pending:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                return {"error": f"ended unexpectedly (exit status {self.proc.wait()})"}
            self._pending += chunk
            if len(self._pending) > limit:
                return {"error": "answered with more text than the output limit"}
        line, _, self._pending = self._pending.partition(b"\n")
        return json.loads(line)

    def stop(self) -> None:
        if self.owner == os.getpid() and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


_lock = threading.Lock()
_renderer: _Renderer | None = None


def _stop() -> None:
    global _renderer
    if _renderer is not None:
        _renderer.stop()
        _renderer = None


atexit.register(_stop)


def render(
    template: str,
    conversations: list,
    source: str,
    add_generation_prompt: bool = False,
    continue_final_message: bool | str = False,
    tools: list | None = None,
    documents: list | None = None,
    kwargs: dict | None = None,
) -> list[str]:
    """Each conversation through ``template`` (see ``render_jinja_template``); a Dsv3Error naming ``source``."""
    global _renderer
    request = {
        "template": template,
        "conversations": conversations,
        "add_generation_prompt": add_generation_prompt,
        "continue_final_message": continue_final_message,
        "tools": tools,
        "documents": documents,
        "kwargs": kwargs or {},
        "max_chars": MAX_OUTPUT_CHARS,
    }
    try:
        line = json.dumps(request, ensure_ascii=True, default=str).encode() + b"\n"
    except (TypeError, ValueError) as exc:
        raise Dsv3Error(f"{source}: chat messages must be JSON data ({exc})") from None
    limit = 12 * MAX_OUTPUT_CHARS * len(conversations) + 65536  # ensure_ascii: up to 12 bytes a character
    with _lock:
        if _renderer is None or not _renderer.alive():
            _renderer = _Renderer()
        try:
            answer = _renderer.ask(line, TIME_LIMIT_S, limit)
        except BaseException:  # Ctrl-C mid-render: its answer would be read as the next render's
            _stop()
            raise
        if answer is None or "texts" not in answer:
            _stop()  # stopped mid-render, or it may be in a bad state: the next render starts afresh
    if answer is None:
        raise Dsv3Error(f"{source}: the chat template ran past the {TIME_LIMIT_S:g} s render limit (stopped)")
    if "texts" not in answer:
        raise Dsv3Error(f"{source}: the chat template {answer['error']}")
    return answer["texts"]


def apply_chat_template(
    tok,
    source: str,
    conversation: list,
    tools: list | None = None,
    documents: list | None = None,
    chat_template: str | None = None,
    add_generation_prompt: bool = False,
    continue_final_message: bool | str = False,
    tokenize: bool = True,
    return_dict: bool = True,
    tokenizer_kwargs: dict | None = None,
    **kwargs,
):
    """transformers' ``apply_chat_template`` (the arguments dsv3 uses), rendered by :func:`render`.

    Returns the text (``tokenize=False``), else the tokenizer's encoding (``return_dict``) or its ids.
    """
    for option in ("return_assistant_tokens_mask", "sanitize_control_tokens"):
        if kwargs.pop(option, False):
            raise Dsv3Error(f"apply_chat_template({option}=True) is not supported by dsv3's bounded renderer")
    encode = {k: kwargs.pop(k) for k in ("padding", "truncation", "max_length", "return_tensors") if k in kwargs}
    template = tok.get_chat_template(chat_template, tools)
    batched = bool(conversation) and isinstance(conversation[0], (list, tuple))
    conversations = [list(c) for c in conversation] if batched else [conversation]
    if not all(conversations):
        raise Dsv3Error(f"{source}: cannot apply the chat template to an empty conversation")
    if tools is not None:
        from transformers.utils import get_json_schema

        tools = [t if isinstance(t, dict) else get_json_schema(t) for t in tools]
    variables = {**tok.special_tokens_map, **kwargs}  # as transformers: the caller's variables win
    texts = render(
        template, conversations, source, add_generation_prompt, continue_final_message, tools, documents, variables
    )
    for i, text in enumerate(texts):  # a template can emit a lone surrogate no tokenizer accepts
        check_text(text, f"{source}: the chat template's output" + (f" for conversation {i}" if batched else ""))
    rendered = texts if batched else texts[0]
    if not tokenize:
        return rendered
    out = tok(rendered, add_special_tokens=False, **encode, **(tokenizer_kwargs or {}))
    return out if return_dict else out["input_ids"]


def guard(tok, source: str | Path) -> None:
    """Make ``tok.apply_chat_template`` render through :func:`render` (within its limits)."""

    def bounded(conversation, *args, **kwargs):
        return apply_chat_template(tok, str(source), conversation, *args, **kwargs)

    bounded.__doc__ = apply_chat_template.__doc__
    tok.apply_chat_template = bounded
