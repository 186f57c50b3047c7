"""Tool calls in DeepSeek-V3's own format, parsed from generated text (whole, or delta by delta).

DeepSeek-V3 writes its calls after any text of its answer, between its tokenizer's tool-call tokens::

    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME
    ```json
    {ARGS}
    ```<｜tool▁call▁end｜>
    <｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME2 ... <｜tool▁call▁end｜><｜tool▁calls▁end｜>

(the format its chat template renders an assistant's ``tool_calls`` in). :class:`ToolCallStream`
reads that text in pieces split anywhere (inside a marker too): text before the calls is content,
each call comes out as its name as soon as the name's line is complete, then its arguments as they
arrive. ``ARGS`` is passed on as the model wrote it (a JSON string, not re-encoded), without the
code fence and the whitespace around it. :func:`parse_tool_calls` is the same parser fed the whole
text at once, so a streamed answer reassembles to exactly the non-streamed one.

Lenient where the model is sloppy: a call may start without ``<｜tool▁calls▁begin｜>``, the fence may
be missing, text between calls is dropped, text after ``<｜tool▁calls▁end｜>`` is content again; a
call cut off by the end of generation keeps the arguments written so far.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

CALLS_BEGIN = "<｜tool▁calls▁begin｜>"
CALLS_END = "<｜tool▁calls▁end｜>"
CALL_BEGIN = "<｜tool▁call▁begin｜>"
CALL_END = "<｜tool▁call▁end｜>"
SEP = "<｜tool▁sep｜>"
#: The tokens the parser reads; a tokenizer that marks them special must not drop them when decoding.
MARKERS = (CALLS_BEGIN, CALLS_END, CALL_BEGIN, CALL_END, SEP)
FENCE = "```"
_TAIL = " \t\r\n`"  # what may follow the arguments before <｜tool▁call▁end｜>: the closing fence, whitespace


@dataclass
class ToolCall:
    """One parsed call: OpenAI's ``{"id", "type": "function", "function": {"name", "arguments"}}``."""

    id: str
    name: str
    arguments: str = ""  # JSON text, as the model wrote it

    def to_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def partial_suffix(text: str, markers: tuple[str, ...]) -> int:
    """Length of the longest end of ``text`` that is a proper beginning of one of ``markers`` (0 if none)."""
    best = 0
    for m in markers:
        for n in range(min(len(m) - 1, len(text)), best, -1):
            if text.endswith(m[:n]):
                best = n
                break
    return best


class ToolCallStream:
    """Incremental parser: ``feed(text) -> (content, deltas)``, then ``finish() -> (content, deltas)``.

    ``deltas`` are OpenAI's streamed ``tool_calls`` entries: the first for a call is
    ``{"index", "id", "type": "function", "function": {"name", "arguments": ""}}``, later ones
    ``{"index", "function": {"arguments": piece}}``; joined per index they give :attr:`calls`.
    Text that might be the start of a marker is held back until the next piece settles it.
    """

    def __init__(self) -> None:
        self.calls: list[ToolCall] = []
        self._state = "text"  # text | section | header | fence | args
        self._buf = ""  # text received and not yet consumed
        self._current: ToolCall | None = None  # the call whose arguments are being read (None: a nameless one)
        self._args = ""  # its raw argument text so far
        self._sent = 0  # characters of its (trimmed) arguments already sent

    # ------------------------------------------------------------------ public
    def feed(self, text: str) -> tuple[str, list[dict]]:
        self._buf += text
        content: list[str] = []
        deltas: list[dict] = []
        while self._step(content, deltas, final=False):
            pass
        return "".join(content), deltas

    def finish(self) -> tuple[str, list[dict]]:
        """The end of generation: held-back text, and the rest of a call that was cut off."""
        content: list[str] = []
        deltas: list[dict] = []
        while self._step(content, deltas, final=True):
            pass
        if self._state == "text":
            content.append(self._buf)
        elif self._state == "header":
            self._start_from_header(self._buf, deltas)  # a name cut off before its line ended
        elif self._state == "args":
            self._args += self._buf[: len(self._buf) - partial_suffix(self._buf, (CALL_END,))]
            self._send_args(self._trimmed(), deltas)
        self._buf, self._state = "", "text"
        return "".join(content), deltas

    # ----------------------------------------------------------------- machine
    def _step(self, content: list[str], deltas: list[dict], final: bool) -> bool:
        """Consume what the current state can; True when it changed state (run again)."""
        buf, state = self._buf, self._state
        if state == "text":
            at = _first(buf, (CALLS_BEGIN, CALL_BEGIN))
            if at is None:
                keep = 0 if final else partial_suffix(buf, (CALLS_BEGIN, CALL_BEGIN))
                content.append(buf[: len(buf) - keep])
                self._buf = buf[len(buf) - keep :]
                return False
            i, marker = at
            content.append(buf[:i])
            self._buf = buf[i + len(marker) :]
            self._state = "header" if marker == CALL_BEGIN else "section"
            return True
        if state == "section":  # between calls: wait for the next call or the end of the calls
            at = _first(buf, (CALL_BEGIN, CALLS_END))
            if at is None:
                keep = partial_suffix(buf, (CALL_BEGIN, CALLS_END))
                self._buf = buf[len(buf) - keep :]  # anything else between calls is dropped
                return False
            i, marker = at
            self._buf = buf[i + len(marker) :]
            self._state = "header" if marker == CALL_BEGIN else "text"
            return True
        if state == "header":  # TYPE<｜tool▁sep｜>NAME\n
            end = buf.find(CALL_END)
            sep = buf.find(SEP)
            line = buf.find("\n", sep + len(SEP)) if sep >= 0 else -1
            if line >= 0 and (end < 0 or line < end):
                self._start_from_header(buf[:line], deltas)
                self._buf, self._state = buf[line + 1 :], "fence"
                return True
            if end >= 0:  # a call with no arguments line: TYPE<｜tool▁sep｜>NAME<｜tool▁call▁end｜>
                self._start_from_header(buf[:end], deltas)
                self._buf, self._state = buf[end + len(CALL_END) :], "section"
                return True
            return False
        if state == "fence":  # an optional ```json line before the arguments
            stripped = buf.lstrip(" \t\r\n")
            if stripped.startswith(FENCE):
                line = stripped.find("\n")
                if line < 0:
                    return False
                self._buf, self._state = stripped[line + 1 :], "args"
                return True
            if not stripped or (FENCE.startswith(stripped) and not final):
                return False
            self._state = "args"
            return True
        # args: up to <｜tool▁call▁end｜>, less the closing fence
        i = buf.find(CALL_END)
        if i >= 0:
            self._args += buf[:i]
            self._send_args(self._trimmed(), deltas)
            self._buf, self._state = buf[i + len(CALL_END) :], "section"
            return True
        keep = partial_suffix(buf, (CALL_END,))
        self._args += buf[: len(buf) - keep]
        self._buf = buf[len(buf) - keep :]
        self._send_args(self._trimmed(), deltas)
        return False

    def _start_from_header(self, header: str, deltas: list[dict]) -> None:
        """A call from its header ``TYPE<｜tool▁sep｜>NAME``; none (its arguments ignored) without a name."""
        self._args, self._sent, self._current = "", 0, None
        _, sep, name = header.partition(SEP)
        name = name.strip()
        if not sep or not name:
            return
        self._current = ToolCall(new_call_id(), name)
        self.calls.append(self._current)
        deltas.append({"index": len(self.calls) - 1, **self._current.to_openai()})

    def _trimmed(self) -> str:
        # leading whitespace and a trailing fence never belong to JSON; what is sent stays a prefix of
        # the final arguments because the trimmed text always ends on a character kept for good
        return self._args.lstrip(" \t\r\n").rstrip(_TAIL)

    def _send_args(self, args: str, deltas: list[dict]) -> None:
        if self._current is None or len(args) <= self._sent:
            return
        piece = args[self._sent :]
        self._current.arguments += piece
        self._sent = len(args)
        deltas.append({"index": len(self.calls) - 1, "function": {"arguments": piece}})


def _first(text: str, markers: tuple[str, ...]) -> tuple[int, str] | None:
    """The earliest of ``markers`` in ``text``: (index, marker), or None."""
    found = [(i, m) for m in markers if (i := text.find(m)) >= 0]
    return min(found) if found else None


def parse_tool_calls(text: str) -> tuple[str, list[ToolCall]]:
    """A whole completion: (the content around the calls, the calls in order)."""
    stream = ToolCallStream()
    content, _ = stream.feed(text)
    rest, _ = stream.finish()
    return content + rest, stream.calls


def token_id(tokenizer, token: str) -> int | None:
    """The id of ``token`` as one token of the vocabulary, or None (without building the whole vocabulary)."""
    i = tokenizer.convert_tokens_to_ids(token)
    if i is None or (i == tokenizer.unk_token_id and token != tokenizer.unk_token):
        return None
    return i


def template_problem(tokenizer, tools: list | None = None) -> str | None:
    """Why this tokenizer cannot take ``tools`` in DeepSeek-V3's format (None: it can).

    The chat template must know tools at all (its source mentions ``tools`` or ``tool_calls``: a
    template that does not would drop them silently), and the vocabulary must hold the tool-call
    tokens (the model writes calls with them).
    """
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        return "this model's tokenizer has no chat template"
    try:
        source = tokenizer.get_chat_template(None, tools)
    except Exception as exc:  # noqa: BLE001 - e.g. several named templates and none for tools
        return f"this model's chat template cannot be chosen for tools ({exc})"
    if "tools" not in source and "tool_calls" not in source:
        return "this model's chat template has no tool format (it never mentions 'tools' or 'tool_calls')"
    missing = [m for m in (CALLS_BEGIN, CALL_BEGIN, SEP, CALL_END) if token_id(tokenizer, m) is None]
    if missing:
        return f"this model's tokenizer lacks DeepSeek-V3's tool-call tokens ({', '.join(missing)})"
    return None
