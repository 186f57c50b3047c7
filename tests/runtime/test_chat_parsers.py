"""The tool-call and reasoning parsers on strings: whole texts, and the same texts fed in pieces split
everywhere (inside the special tokens too), which must join to the whole-text result."""

from __future__ import annotations

import json
import random

import pytest

from dsv3.runtime.serve.chat_output import ChatOutput, message
from dsv3.runtime.serve.reasoning import ReasoningStream, parse_reasoning
from dsv3.runtime.serve.tool_calls import (
    CALL_BEGIN,
    CALL_END,
    CALLS_BEGIN,
    CALLS_END,
    SEP,
    ToolCallStream,
    parse_tool_calls,
)


def v3_call(name: str, args: dict) -> str:
    """One call as DeepSeek-V3 writes it (and its chat template renders it)."""
    return f"{CALL_BEGIN}function{SEP}{name}\n```json\n{json.dumps(args)}\n```{CALL_END}"


TWO_CALLS = (
    "Let me check."
    + CALLS_BEGIN
    + v3_call("get_weather", {"city": "Paris", "unit": "c"})
    + "\n"
    + v3_call("get_time", {"tz": "Europe/Paris", "note": "a `tick` } ```"})
    + CALLS_END
)


def pieces(text: str, rng: random.Random, max_len: int) -> list[str]:
    out, i = [], 0
    while i < len(text):
        n = rng.randint(1, max_len)
        out.append(text[i : i + n])
        i += n
    return out


def stream_tools(chunks: list[str]) -> tuple[str, list[dict]]:
    """Feed chunks; (joined content, calls reassembled from the streamed deltas as a client does)."""
    s = ToolCallStream()
    content, calls = [], {}
    for piece in [*chunks, None]:
        text, deltas = s.finish() if piece is None else s.feed(piece)
        content.append(text)
        for d in deltas:
            c = calls.setdefault(d["index"], {"id": None, "name": None, "arguments": ""})
            if "id" in d:
                assert c["id"] is None and d["type"] == "function"  # id, type and name come once, first
                c["id"], c["name"] = d["id"], d["function"]["name"]
            c["arguments"] += d["function"]["arguments"]
    assert sorted(calls) == list(range(len(calls)))
    return "".join(content), [calls[i] for i in sorted(calls)]


def test_whole_text_gives_the_content_and_the_calls_in_order():
    content, calls = parse_tool_calls(TWO_CALLS)
    assert content == "Let me check."
    assert [c.name for c in calls] == ["get_weather", "get_time"]
    assert [json.loads(c.arguments) for c in calls] == [
        {"city": "Paris", "unit": "c"},
        {"tz": "Europe/Paris", "note": "a `tick` } ```"},
    ]
    assert calls[0].arguments == json.dumps({"city": "Paris", "unit": "c"})  # as written, no fence, no newlines
    assert len({c.id for c in calls}) == 2 and all(c.id.startswith("call_") for c in calls)
    assert calls[0].to_openai()["type"] == "function"


def test_text_without_calls_is_content_and_a_partial_marker_at_the_end_is_kept():
    assert parse_tool_calls("plain answer")[0] == "plain answer"
    assert parse_tool_calls("ends with <｜tool▁ca") == ("ends with <｜tool▁ca", [])  # not a marker after all
    assert parse_tool_calls("")[0] == ""


@pytest.mark.parametrize("max_len", [1, 2, 3, 7, 40])
def test_every_split_joins_to_the_whole_text_result(max_len):
    want_content, want = parse_tool_calls(TWO_CALLS)
    rng = random.Random(max_len)
    for _ in range(20 if max_len > 1 else 1):
        content, calls = stream_tools(pieces(TWO_CALLS, rng, max_len))
        assert content == want_content
        assert [(c["name"], c["arguments"]) for c in calls] == [(c.name, c.arguments) for c in want]


def test_a_marker_split_across_deltas_is_held_back_not_shown_as_content():
    s = ToolCallStream()
    half = len(CALLS_BEGIN) // 2
    assert s.feed("Hi " + CALLS_BEGIN[:half]) == ("Hi ", [])
    assert s.feed(CALLS_BEGIN[half:] + CALL_BEGIN[:3]) == ("", [])
    content, deltas = s.feed(CALL_BEGIN[3:] + f"function{SEP}lookup\n```json\n" + '{"q": ')
    assert content == ""
    assert deltas[0]["function"] == {"name": "lookup", "arguments": ""} and deltas[0]["index"] == 0
    assert deltas[1] == {"index": 0, "function": {"arguments": '{"q":'}}  # the trailing space may be the fence's
    content, deltas = s.feed('"x"}\n``')
    assert deltas == [{"index": 0, "function": {"arguments": ' "x"}'}}]
    content, deltas = s.feed("`" + CALL_END + CALLS_END + " bye")
    assert (content, deltas) == (" bye", [])  # text after the calls is content again
    assert s.calls[0].arguments == '{"q": "x"}'


def test_lenient_forms_and_a_call_cut_off_by_the_end_of_generation():
    # no <｜tool▁calls▁begin｜>, no fence, text between calls dropped
    text = f"{CALL_BEGIN}function{SEP}a\n{{}}{CALL_END} junk {CALL_BEGIN}function{SEP}b\n```json\n[1]\n```{CALL_END}"
    content, calls = parse_tool_calls(text)
    assert content == "" and [(c.name, c.arguments) for c in calls] == [("a", "{}"), ("b", "[1]")]
    # max_tokens reached inside the arguments: the call keeps what was written
    content, calls = parse_tool_calls(CALLS_BEGIN + f"{CALL_BEGIN}function{SEP}f\n```json\n" + '{"k": 1\n``')
    assert [(c.name, c.arguments) for c in calls] == [("f", '{"k": 1')]
    # ... inside the name's line: the name so far; before the separator: no call
    assert [c.name for c in parse_tool_calls(CALLS_BEGIN + CALL_BEGIN + f"function{SEP}ge")[1]] == ["ge"]
    assert parse_tool_calls(CALLS_BEGIN + CALL_BEGIN + "func") == ("", [])


R1 = "\nFirst, 2+2.\nSo 4.\n</think>\n\nThe answer is 4."


@pytest.mark.parametrize(
    ("text", "want"),
    [
        (R1, ("\nFirst, 2+2.\nSo 4.\n", "\n\nThe answer is 4.")),  # the prompt ended with <think>\n
        ("<think>hmm</think>ok", ("hmm", "ok")),  # the model opened the block itself
        ("still thinking", ("still thinking", None)),  # no </think>: all reasoning (as vLLM)
        ("done</think>", ("done", None)),
        ("a</think>b</think>c", ("a", "b</think>c")),  # only the first </think> ends the block
    ],
)
def test_reasoning_whole_text(text, want):
    assert parse_reasoning(text) == want


@pytest.mark.parametrize("text", [R1, "<think>hmm</think>ok", "x <thi", "a</thi", "<think><think>b</think>"])
def test_reasoning_every_split_joins_to_the_whole_text_result(text):
    want = parse_reasoning(text)
    for n in range(1, len(text) + 1):
        for start in range(0, n):  # every first-piece length below n, then pieces of n
            chunks = [text[:start]] + [text[i : i + n] for i in range(start, len(text), n)]
            s = ReasoningStream()
            got = [s.feed(c) for c in chunks] + [s.finish()]
            assert ("".join(r for r, _ in got), "".join(c for _, c in got) or None) == want


def test_reasoning_then_tool_calls_stream_as_the_whole_message():
    text = "<think>need weather</think>" + TWO_CALLS
    want = message(text, reasoning=True, tools=True)
    assert want["reasoning_content"] == "need weather" and want["content"] == "Let me check."
    assert [c["function"]["name"] for c in want["tool_calls"]] == ["get_weather", "get_time"]
    out = ChatOutput(reasoning=True, tools=True)
    deltas = [out.feed(ch) for ch in text] + [out.finish()]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == want["reasoning_content"]
    assert "".join(d.get("content", "") for d in deltas) == want["content"]
    args = {}
    for d in deltas:
        for t in d.get("tool_calls", []):
            args[t["index"]] = args.get(t["index"], "") + t["function"]["arguments"]
    assert [args[i] for i in sorted(args)] == [c["function"]["arguments"] for c in want["tool_calls"]]
    # without the tool parser the markers are plain text; without reasoning the think block is content
    assert message(text, reasoning=True, tools=False)["content"] == TWO_CALLS
    assert message(text, reasoning=False, tools=True)["content"] == "<think>need weather</think>Let me check."
