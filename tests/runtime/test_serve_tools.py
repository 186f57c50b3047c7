"""Tool calling and reasoning through the server, with the openai client, on a tiny checkpoint whose
tokenizer carries DeepSeek-V3's special tokens and a DeepSeek-V3-like chat template (written here).

The model's output is scripted: the scheduler's sampling is replaced by one that hands each request
the token ids of a fixed text, so the parsed calls are known exactly; everything else (prefill,
decode steps, detokenization, parsing, streaming) runs as in production.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi", reason="dsv3 serve needs the 'serve' extra (fastapi, uvicorn)")
httpx = pytest.importorskip("httpx", reason="the serving tests need httpx")
openai = pytest.importorskip("openai", reason="the serving tests use the openai client")

import dsv3  # noqa: E402
from dsv3.runtime.serve.app import ServeSettings  # noqa: E402
from dsv3.runtime.serve.tool_calls import CALL_BEGIN, CALL_END, CALLS_BEGIN, CALLS_END, SEP  # noqa: E402
from tests.helpers import make_checkpoint  # noqa: E402
from tests.runtime.test_serve import KEY, WAIT_S, serving  # noqa: E402

NAME = "tiny-v3"
BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
SPECIALS = [
    BOS,
    EOS,
    "<｜User｜>",
    "<｜Assistant｜>",
    CALLS_BEGIN,
    CALLS_END,
    CALL_BEGIN,
    CALL_END,
    SEP,
    "<｜tool▁outputs▁begin｜>",
    "<｜tool▁outputs▁end｜>",
    "<｜tool▁output▁begin｜>",
    "<｜tool▁output▁end｜>",
]
# DeepSeek-V3's conversation format (system text first, <｜User｜> / <｜Assistant｜> turns, calls between
# the tool-call tokens, tool outputs between the tool-output tokens and no <｜Assistant｜> tag for the
# answer after them), plus the tools listed after the system text as vLLM's DeepSeek-V3 tool template does.
TEMPLATE = "".join(
    [
        r"{%- set ns = namespace(system='', outputs=false) -%}",
        r"{%- for m in messages if m['role'] == 'system' %}{% set ns.system = ns.system + m['content'] %}{% endfor -%}",
        r"{{ bos_token }}{{ ns.system }}",
        r"{%- if tools %}{{ '\n\n## Tools\n' }}{% for t in tools %}",
        r"{{ '\n### ' + t['function']['name'] + '\n' + (t['function']['description'] or '') }}",
        r"{{ '\nParameters: ' + (t['function']['parameters'] | tojson) + '\n' }}{% endfor %}{% endif -%}",
        r"{%- for m in messages -%}",
        r"{%- if m['role'] == 'tool' -%}",
        r"{%- if not ns.outputs %}{{ '<｜tool▁outputs▁begin｜>' }}{% set ns.outputs = true %}{% endif -%}",
        r"{{ '<｜tool▁output▁begin｜>' + m['content'] + '<｜tool▁output▁end｜>' }}",
        r"{%- elif m['role'] != 'system' -%}",
        r"{%- set after_outputs = ns.outputs -%}",
        r"{%- if ns.outputs %}{{ '<｜tool▁outputs▁end｜>' }}{% set ns.outputs = false %}{% endif -%}",
        r"{%- if m['role'] == 'user' %}{{ '<｜User｜>' + m['content'] }}{% else -%}",
        r"{%- if not after_outputs %}{{ '<｜Assistant｜>' }}{% endif %}{{ m['content'] or '' }}",
        r"{%- if m['tool_calls'] %}{{ '<｜tool▁calls▁begin｜>' }}{% for c in m['tool_calls'] -%}",
        r"{%- if not loop.first %}{{ '\n' }}{% endif -%}",
        r"{{ '<｜tool▁call▁begin｜>' + c['type'] + '<｜tool▁sep｜>' + c['function']['name'] }}",
        r"{{ '\n```json\n' + c['function']['arguments'] + '\n```<｜tool▁call▁end｜>' }}",
        r"{%- endfor %}{{ '<｜tool▁calls▁end｜>' }}{% endif %}{{ '<｜end▁of▁sentence｜>' }}",
        r"{%- endif -%}{%- endif -%}{%- endfor -%}",
        r"{%- if ns.outputs %}{{ '<｜tool▁outputs▁end｜>' }}{% elif add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif -%}",
    ]
)
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CALL_TEXT = (
    "Let me look."
    + CALLS_BEGIN
    + f'{CALL_BEGIN}function{SEP}get_weather\n```json\n{{"city": "Paris"}}\n```{CALL_END}\n'
    + f'{CALL_BEGIN}function{SEP}get_weather\n```json\n{{"city": "Lyon"}}\n```{CALL_END}'
    + CALLS_END
)
MESSAGES = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "Weather in Paris and Lyon?"},
]


def byte_level_tokenizer(path) -> None:
    """A byte-level BPE without merges (id = byte value), DeepSeek-V3's special tokens (the tool-call
    ones marked special, so decoding that skips special tokens would drop them) and R1's non-special
    ``<think>`` / ``</think>``, with TEMPLATE as its chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    printable = {*range(33, 127), *range(161, 173), *range(174, 256)}  # the byte-level alphabet's own chars
    extra = iter(range(256, 512))
    chars = {b: chr(b if b in printable else next(extra)) for b in range(256)}
    tok = Tokenizer(models.BPE(vocab={chars[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, additional_special_tokens=SPECIALS[2:]
    )
    fast.add_tokens(["<think>", "</think>"])
    fast.chat_template = TEMPLATE
    fast.save_pretrained(str(path))


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    path = tmp_path_factory.mktemp("serve_tools") / "tiny"
    make_checkpoint(path, seed=5, vocab_size=272, bos_token_id=256, eos_token_id=257, max_position_embeddings=1024)
    byte_level_tokenizer(path)
    engine = dsv3.load(path, dtype="float32")
    assert engine.tokenizer.convert_tokens_to_ids([BOS, EOS]) == [256, 257]
    return engine


SETTINGS = ServeSettings(
    model_name=NAME,
    max_model_len=1024,
    max_prompt_tokens=900,
    max_tokens_limit=120,
    max_request_bytes=1 << 16,
    api_key=KEY,
    disconnect_poll_s=0.05,
)


class Script:
    """Replaces ``scheduler._sample``: the n-th request admitted gets the n-th text's token ids, then EOS."""

    def __init__(self, engine):
        self.engine, self.texts, self.prompts, self._ids = engine, [], [], {}

    def __call__(self, logits, rows):
        tokens = []
        for a in rows:
            if id(a.req) not in self._ids:
                text = self.texts.pop(0)
                self.prompts.append(a.req.prompt)
                ids = self.engine.tokenizer.encode(text, add_special_tokens=False)
                self._ids[id(a.req)] = iter([*ids, self.engine.tokenizer.eos_token_id])
            tokens.append(next(self._ids[id(a.req)]))
        return tokens, logits

    def prompt_text(self, i: int) -> str:
        return self.engine.tokenizer.decode(self.prompts[i], skip_special_tokens=False)


@pytest.fixture(scope="module")
def served(engine):
    with serving(engine, SETTINGS) as (url, scheduler):
        script = Script(engine)
        scheduler._sample = script
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=WAIT_S)
        yield url, client, script


def streamed(client, **kw):
    """A streamed chat answer reassembled as a client does: (content, reasoning, calls by index, finish)."""
    content, reasoning, calls, finish = [], [], {}, None
    for chunk in client.chat.completions.create(model=NAME, stream=True, **kw):
        choice = chunk.choices[0]
        delta = choice.delta
        content.append(delta.content or "")
        reasoning.append((delta.model_extra or {}).get("reasoning_content") or "")
        for t in delta.tool_calls or []:
            c = calls.setdefault(t.index, {"id": None, "name": None, "arguments": ""})
            if t.id is not None:
                assert c["id"] is None and t.type == "function"
                c["id"], c["name"] = t.id, t.function.name
            c["arguments"] += t.function.arguments or ""
        finish = choice.finish_reason or finish
    return "".join(content), "".join(reasoning), [calls[i] for i in sorted(calls)], finish


def test_a_tool_call_round_trip_and_its_stream(served):
    url, client, script = served
    script.texts[:] = [CALL_TEXT, CALL_TEXT, "It is 21 C in Paris and 19 C in Lyon."]
    r = client.chat.completions.create(model=NAME, messages=MESSAGES, tools=[WEATHER], max_tokens=120)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me look."
    calls = choice.message.tool_calls
    assert [(c.type, c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("function", "get_weather", {"city": "Paris"}),
        ("function", "get_weather", {"city": "Lyon"}),
    ]
    assert calls[0].function.arguments == '{"city": "Paris"}' and calls[0].id != calls[1].id
    # the template listed the tool for the model
    assert '### get_weather\nCurrent weather of a city\nParameters: {"type": "object"' in script.prompt_text(0)
    assert r.usage.completion_tokens == len(engine_ids(served, CALL_TEXT)) + 1  # + EOS
    tokenized = httpx.post(
        url + "/tokenize", json={"messages": MESSAGES, "tools": [WEATHER]}, headers={"Authorization": f"Bearer {KEY}"}
    )
    assert tokenized.json()["tokens"] == list(script.prompts[0])  # /tokenize renders the tools as chat does

    content, reasoning, s_calls, finish = streamed(client, messages=MESSAGES, tools=[WEATHER], max_tokens=120)
    assert (content, reasoning, finish) == ("Let me look.", "", "tool_calls")
    assert [(c["name"], c["arguments"]) for c in s_calls] == [(c.function.name, c.function.arguments) for c in calls]
    assert all(c["id"].startswith("call_") for c in s_calls)

    # the calls and their results go back through the template; the model answers
    follow = [
        *MESSAGES,
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": calls[0].id, "content": '{"temp_c": 21}'},
        {"role": "tool", "tool_call_id": calls[1].id, "content": '{"temp_c": 19}'},
    ]
    r2 = client.chat.completions.create(model=NAME, messages=follow, tools=[WEATHER], max_tokens=120)
    assert r2.choices[0].message.content == "It is 21 C in Paris and 19 C in Lyon."
    assert r2.choices[0].finish_reason == "stop" and not r2.choices[0].message.tool_calls
    prompt = script.prompt_text(2)
    assert prompt.endswith(
        "<｜Assistant｜>Let me look." + CALL_TEXT[len("Let me look.") :] + EOS + "<｜tool▁outputs▁begin｜>"
        '<｜tool▁output▁begin｜>{"temp_c": 21}<｜tool▁output▁end｜><｜tool▁output▁begin｜>{"temp_c": 19}'
        "<｜tool▁output▁end｜><｜tool▁outputs▁end｜>"
    )
    assert not script.texts


def engine_ids(served, text):
    return served[2].engine.tokenizer.encode(text, add_special_tokens=False)


def test_tool_choice_none_leaves_the_text_as_text_and_bad_requests_are_400s(served, engine):
    url, client, script = served
    script.texts[:] = [CALL_TEXT]
    r = client.chat.completions.create(
        model=NAME, messages=MESSAGES, tools=[WEATHER], tool_choice="none", max_tokens=120
    )
    assert r.choices[0].finish_reason == "stop" and not r.choices[0].message.tool_calls
    assert 'get_weather\n```json\n{"city": "Paris"}' in r.choices[0].message.content

    def status(body):
        resp = httpx.post(
            url + "/v1/chat/completions",
            json={"model": NAME, "messages": MESSAGES, "max_tokens": 4, **body},
            headers={"Authorization": f"Bearer {KEY}"},
            timeout=WAIT_S,
        )
        return resp.status_code, resp.json()["error"]["param"]

    named = {"type": "function", "function": {"name": "get_time"}}
    assert status({"tools": [WEATHER], "tool_choice": named}) == (400, "tool_choice")
    assert status({"tools": [{"type": "function", "function": {}}]}) == (400, "tools.0.function.name")
    assert status({"tool_choice": "required"}) == (400, "tool_choice")
    bad_call = {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {"x": 1}}]}
    assert status({"messages": [*MESSAGES, bad_call]}) == (400, "messages.2.tool_calls.0")
    tok = engine.tokenizer
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"  # knows no tools
    try:
        assert status({"tools": [WEATHER]}) == (400, "tools")
    finally:
        tok.chat_template = TEMPLATE
    assert not script.texts


R1_TEXT = "\nThe user wants 2+2.\nThat is 4.\n</think>\n\n2 + 2 = 4."


def test_reasoning_parser_returns_the_think_block_as_reasoning_content(engine):
    settings = ServeSettings(**{**SETTINGS.__dict__, "reasoning_parser": "deepseek_r1"})
    with serving(engine, settings) as (url, scheduler):
        script = Script(engine)
        scheduler._sample = script
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=WAIT_S)
        msgs = [{"role": "user", "content": "2+2?"}]
        script.texts[:] = [R1_TEXT, R1_TEXT, "<think>still thinking when max_tokens came"]
        r = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=120)
        msg = r.choices[0].message
        assert msg.model_extra["reasoning_content"] == "\nThe user wants 2+2.\nThat is 4.\n"
        assert msg.content == "\n\n2 + 2 = 4." and r.choices[0].finish_reason == "stop"
        content, reasoning, calls, finish = streamed(client, messages=msgs, max_tokens=120)
        assert (content, reasoning, calls, finish) == (msg.content, msg.model_extra["reasoning_content"], [], "stop")
        # no </think> before the end: all reasoning, no content (as vLLM's deepseek_r1)
        r = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=120)
        assert r.choices[0].message.content is None
        assert r.choices[0].message.model_extra["reasoning_content"] == "still thinking when max_tokens came"


def test_each_streamed_choice_has_its_own_parser(served):
    url, client, script = served
    script.texts[:] = [CALL_TEXT, "No call needed."]  # choice 0 calls, choice 1 answers (one prefill, forked)
    content, args, finish = {}, {}, {}
    stream = client.chat.completions.create(
        model=NAME, messages=MESSAGES, tools=[WEATHER], max_tokens=120, n=2, stream=True
    )
    for chunk in stream:
        for ch in chunk.choices:
            content[ch.index] = content.get(ch.index, "") + (ch.delta.content or "")
            for t in ch.delta.tool_calls or []:
                key = (ch.index, t.index)
                args[key] = args.get(key, "") + (t.function.arguments or "")
            finish[ch.index] = ch.finish_reason or finish.get(ch.index)
    assert content == {0: "Let me look.", 1: "No call needed."}
    assert args == {(0, 0): '{"city": "Paris"}', (0, 1): '{"city": "Lyon"}'}
    assert finish == {0: "tool_calls", 1: "stop"}
    assert not script.texts
