"""Reasoning text (``<think>...</think>``) split from the answer, as vLLM's ``deepseek_r1`` parser does.

DeepSeek-R1's chat template ends the prompt with ``<think>\\n``, so its output usually starts inside
the think block and only writes the closing ``</think>``; older templates let the model write
``<think>`` itself. Either way, as vLLM's ``deepseek_r1`` parser: the output is reasoning up to the
first ``</think>`` (a ``<think>`` before it is dropped, the text around it kept), the rest is the
answer's content; an output with no ``</think>`` is all reasoning (no content). Nothing is
stripped: R1's reasoning and content usually begin with a newline, as vLLM returns them.
:class:`ReasoningStream` does this delta by delta (a marker may be split across deltas);
:func:`parse_reasoning` is the same parser fed the whole text.
"""

from __future__ import annotations

from .tool_calls import partial_suffix

THINK_START = "<think>"
THINK_END = "</think>"
MARKERS = (THINK_START, THINK_END)
PARSERS = ("deepseek_r1",)  # the names ``dsv3 serve --reasoning-parser`` takes


class ReasoningStream:
    """``feed(text) -> (reasoning, content)`` deltas, then ``finish() -> (reasoning, content)``."""

    def __init__(self) -> None:
        self.thinking = True  # still inside the think block
        self._start_seen = False  # a <think> was dropped (only the first one is a marker)
        self._buf = ""

    def feed(self, text: str) -> tuple[str, str]:
        if not self.thinking:
            return "", text
        self._buf += text
        reasoning = []
        while True:
            markers = (THINK_END,) if self._start_seen else (THINK_END, THINK_START)
            found = [(i, m) for m in markers if (i := self._buf.find(m)) >= 0]
            if not found:
                break
            i, marker = min(found)
            reasoning.append(self._buf[:i])
            self._buf = self._buf[i + len(marker) :]
            if marker == THINK_END:
                self.thinking = False
                content, self._buf = self._buf, ""
                return "".join(reasoning), content
            self._start_seen = True
        keep = partial_suffix(self._buf, markers)
        reasoning.append(self._buf[: len(self._buf) - keep])
        self._buf = self._buf[len(self._buf) - keep :]
        return "".join(reasoning), ""

    def finish(self) -> tuple[str, str]:
        """The end of generation: text held back as a possible marker is reasoning after all."""
        rest, self._buf = self._buf, ""
        return rest, ""


def parse_reasoning(text: str) -> tuple[str, str | None]:
    """A whole completion: (reasoning, content or None when nothing follows ``</think>``, or no ``</think>``)."""
    stream = ReasoningStream()
    reasoning, content = stream.feed(text)
    rest, _ = stream.finish()
    return reasoning + rest, content or None
