"""A chat answer's text split into what OpenAI's message holds: ``reasoning_content``, ``content``, ``tool_calls``.

The reasoning parser (``--reasoning-parser``) reads first, the tool-call parser (a request with
``tools``) reads what the reasoning parser left as content. Streamed and whole answers go through the
same parsers, so the deltas of a stream join to the non-streamed message.
"""

from __future__ import annotations

from collections.abc import Callable

from . import reasoning as _reasoning
from . import tool_calls as _tools


class ChatOutput:
    """``feed(text) -> delta`` and ``finish() -> delta``: OpenAI chat delta fields, only those with news.

    A delta may hold ``reasoning_content`` (str), ``content`` (str) and ``tool_calls`` (streamed
    tool-call entries, see :class:`~dsv3.runtime.serve.tool_calls.ToolCallStream`).
    """

    def __init__(self, reasoning: bool, tools: bool):
        self.reasoning = _reasoning.ReasoningStream() if reasoning else None
        self.tools = _tools.ToolCallStream() if tools else None

    @property
    def calls(self) -> list[_tools.ToolCall]:
        return self.tools.calls if self.tools is not None else []

    def feed(self, text: str) -> dict:
        thought, content = self.reasoning.feed(text) if self.reasoning is not None else ("", text)
        return self._delta(thought, *self._tool_feed(content))

    def finish(self) -> dict:
        thought, content = self.reasoning.finish() if self.reasoning is not None else ("", "")
        content, calls = self._tool_feed(content)
        if self.tools is not None:
            rest, more = self.tools.finish()
            content, calls = content + rest, calls + more
        return self._delta(thought, content, calls)

    def _tool_feed(self, content: str) -> tuple[str, list[dict]]:
        if self.tools is None or not content:
            return content, []
        return self.tools.feed(content)

    @staticmethod
    def _delta(thought: str, content: str, calls: list[dict]) -> dict:
        delta: dict = {}
        if thought:
            delta["reasoning_content"] = thought
        if content:
            delta["content"] = content
        if calls:
            delta["tool_calls"] = calls
        return delta


def message(text: str, reasoning: bool, tools: bool) -> dict:
    """The non-streamed message fields for a whole answer: ``content`` (None when empty), plus
    ``reasoning_content`` with a reasoning parser (None when there is none) and ``tool_calls`` when
    the answer holds calls."""
    out = ChatOutput(reasoning, tools)
    parts = [out.feed(text), out.finish()]
    msg: dict = {"content": "".join(p.get("content", "") for p in parts) or None}
    if reasoning:
        msg["reasoning_content"] = "".join(p.get("reasoning_content", "") for p in parts) or None
    if out.calls:
        msg["tool_calls"] = [c.to_openai() for c in out.calls]
    return msg


def marker_decoder(tokenizer, markers: tuple[str, ...]) -> Callable[[list[int]], str]:
    """``decode(ids)`` that drops special tokens (as the server's decode does) but keeps ``markers``.

    A tokenizer may mark the tool-call or think tokens special, and decoding with
    ``skip_special_tokens`` would remove exactly the text the parsers read.
    """
    keep = {i for m in markers if (i := _tools.token_id(tokenizer, m)) is not None}
    drop = set(tokenizer.all_special_ids) - keep

    def decode(ids: list[int]) -> str:
        return tokenizer.decode([i for i in ids if i not in drop], skip_special_tokens=False)

    return decode
