"""The OpenAI request bodies this server accepts, and its error shape.

Scalars are checked by pydantic in strict mode (``"max_tokens": "5"`` is an error, not 5);
``prompt``, ``stop`` and ``messages`` have several legal shapes and are checked here, so an error
names the field and what it should be. Unknown fields are ignored; known ones that this server
does not implement (``suffix``...) are refused rather than ignored. Structured output
(``response_format``, vLLM's ``guided_*``) is checked by ``structured.py``, which needs the tokenizer.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, ValidationError

from ...errors import Dsv3Error
from ..generate import SamplingError, SamplingParams
from ..logits_processing import LogitsParams, logit_bias_of
from ..text import check_text

MAX_STOP_STRINGS = 16
MAX_LOGPROBS = 20  # OpenAI's cap on top logprobs (completions' logprobs, chat's top_logprobs)
MAX_CHOICES = 128  # the most ``n`` / ``best_of`` sequences one request may ask for, per prompt (OpenAI's cap)
MAX_JSON_DEPTH = 64  # OpenAI bodies nest a few levels; deeper ones would exhaust the recursion limit downstream


class APIError(Exception):
    """An error answered as OpenAI does: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
    ):
        message = message.encode("utf-8", "backslashreplace").decode("utf-8")  # echoed lone surrogates, escaped
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


PositiveInt = Annotated[int, Field(strict=True, ge=1)]
# types only: the ranges are SamplingParams.validate's (as for dsv3 run), plus OpenAI's cap on temperature
Temperature = Annotated[float, Field(strict=True, le=2)]
TopP = Annotated[float, Field(strict=True)]
Seed = Annotated[int, Field(strict=True)]
Penalty = Annotated[float, Field(strict=True, ge=-2, le=2)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: StrictBool | None = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: StrictStr
    max_tokens: PositiveInt | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    n: Annotated[int, Field(strict=True, ge=1, le=MAX_CHOICES)] | None = None
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    stop: Any = None
    seed: Seed | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict | None = None
    user: StrictStr | None = None
    # extensions (as vLLM names them): generate past EOS tokens; return the generated token ids
    ignore_eos: StrictBool | None = False
    return_token_ids: StrictBool | None = False
    # vLLM's sampling extensions (ranges: LogitsParams.validate)
    repetition_penalty: Annotated[float, Field(strict=True)] | None = None
    top_k: Annotated[int, Field(strict=True)] | None = None
    min_p: Annotated[float, Field(strict=True)] | None = None
    min_tokens: Annotated[int, Field(strict=True)] | None = None
    stop_token_ids: list[Annotated[int, Field(strict=True)]] | None = None


class CompletionRequest(_Common):
    prompt: Any
    max_tokens: Annotated[int, Field(strict=True, ge=0)] | None = None  # 0: with echo, only score the prompt
    echo: StrictBool | None = False
    suffix: StrictStr | None = None
    best_of: Annotated[int, Field(strict=True, ge=1, le=MAX_CHOICES)] | None = None
    logprobs: Annotated[int, Field(strict=True, ge=0, le=MAX_LOGPROBS)] | None = None


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: StrictStr | None = None
    prompt: StrictStr | None = None
    messages: Any = None
    add_special_tokens: StrictBool = True  # for a prompt: False leaves out the BOS token /v1/completions adds
    tools: list | None = None  # with messages: passed to the chat template, as chat does


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: StrictStr | None = None
    tokens: list[Annotated[int, Field(strict=True)]]


class ChatRequest(_Common):
    messages: Any
    max_completion_tokens: PositiveInt | None = None
    logprobs: StrictBool | None = False
    top_logprobs: Annotated[int, Field(strict=True, ge=0, le=MAX_LOGPROBS)] | None = None
    tools: list | None = None
    tool_choice: Any = None
    parallel_tool_calls: StrictBool | None = None  # accepted; DeepSeek-V3 writes one or more calls as it likes
    response_format: dict | None = None


def parse_json(body: bytes) -> Any:
    """A request body decoded as JSON; an APIError (400) if it is not JSON or nests too deeply."""
    too_deep = APIError(400, f"the request body nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        data = json.loads(body)
    except RecursionError:
        raise too_deep from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError(400, f"the request body is not valid JSON ({exc})") from None
    stack = [(data, 1)] if isinstance(data, (dict, list)) else []
    while stack:
        value, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise too_deep
        items = value.values() if isinstance(value, dict) else value
        stack.extend((v, depth + 1) for v in items if isinstance(v, (dict, list)))
    return data


def parse(model: type[BaseModel], data: Any) -> Any:
    """Validate a decoded JSON body; an APIError (400) naming the first bad field."""
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        req = model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = ".".join(str(p) for p in err["loc"])
        if err["type"] == "missing":
            raise APIError(400, f"missing required field '{param}'", param) from None
        raise APIError(400, f"'{param}': {err['msg']} (got {err.get('input')!r})"[:500], param) from None
    if not isinstance(req, (CompletionRequest, ChatRequest)):
        return req
    temperature, top_p = (1.0 if v is None else v for v in (req.temperature, req.top_p))
    try:
        SamplingParams(1, temperature, top_p, req.seed).validate()
    except SamplingError as exc:
        raise APIError(400, f"'{exc.param}' {exc.reason}", exc.param) from None
    logits_params_of(req)  # 400 naming a bad penalty, logit_bias, top_k, min_p or min_tokens
    if isinstance(req, CompletionRequest):
        if req.max_tokens == 0 and not req.echo:
            raise APIError(400, "'max_tokens' may be 0 only with 'echo': true (to score the prompt)", "max_tokens")
        if req.suffix:
            raise APIError(400, "'suffix' is not supported", "suffix")
        if req.best_of is not None and req.best_of < (req.n or 1):
            raise APIError(400, f"'best_of' ({req.best_of}) must be at least 'n' ({req.n or 1})", "best_of")
        if req.best_of is not None and req.best_of > (req.n or 1) and req.stream:
            raise APIError(
                400, "'best_of' larger than 'n' cannot be streamed (the best are known at the end)", "best_of"
            )
    else:
        if (req.model_extra or {}).get("echo"):
            raise APIError(400, "'echo' is only supported by /v1/completions", "echo")
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
        tools_of(req)  # 400 naming a malformed tools entry or tool_choice
    return req


def logits_params_of(req: CompletionRequest | ChatRequest, vocab_size: int | None = None) -> LogitsParams | None:
    """The request's logits processing (None when it asks for none); an APIError (400) naming the bad field.

    vocab_size: when given, logit_bias ids must lie in the vocabulary. min_tokens against max_tokens
    is the caller's (the budget may be the server's default).
    """
    try:
        params = LogitsParams(
            req.presence_penalty or 0.0,
            req.frequency_penalty or 0.0,
            1.0 if req.repetition_penalty is None else req.repetition_penalty,
            logit_bias_of(req.logit_bias) if req.logit_bias is not None else {},
            req.top_k or 0,
            req.min_p or 0.0,
            req.min_tokens or 0,
        ).validate(vocab_size)
    except SamplingError as exc:
        raise APIError(400, f"'{exc.param}' {exc.reason}", exc.param) from None
    return params if params.active else None


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def prompts_of(value: Any) -> list[str | list[int]]:
    """``prompt``: a string, a list of strings, a list of token ids, or a list of such lists."""
    shape = "a string, a list of strings, a list of token ids or a list of lists of token ids"
    if isinstance(value, str):
        return [_text(value, "prompt")]
    if not isinstance(value, list) or not value:
        raise APIError(400, f"'prompt' must be {shape} (non-empty)", "prompt")
    if all(isinstance(p, str) for p in value):
        return [_text(p, f"prompt.{i}") for i, p in enumerate(value)]
    if all(_is_int(t) for t in value):
        return [list(value)]
    if all(isinstance(p, list) and p and all(_is_int(t) for t in p) for p in value):
        return [list(p) for p in value]
    raise APIError(400, f"'prompt' must be {shape}", "prompt")


def _text(value: str, param: str) -> str:
    """A prompt or message string, checked as ``dsv3 run`` checks its prompts (no lone surrogates)."""
    try:
        return check_text(value, f"'{param}'")
    except Dsv3Error as exc:
        raise APIError(400, str(exc), param) from None


def stops_of(value: Any) -> tuple[str, ...]:
    """``stop``: null, a string or a list of up to MAX_STOP_STRINGS non-empty strings."""
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or len(items) > MAX_STOP_STRINGS or not all(isinstance(s, str) and s for s in items):
        raise APIError(400, f"'stop' must be a non-empty string or a list of up to {MAX_STOP_STRINGS} of them", "stop")
    return tuple(items)


TOOL_CHOICES = ("none", "auto", "required")


def tools_list_of(value: list | None) -> list[dict] | None:
    """``tools``: None (or empty), or a list of ``{"type": "function", "function": {"name", "description"?,
    "parameters"?}}``; an APIError (400) naming the bad entry."""
    for i, tool in enumerate(value or []):
        where = f"tools.{i}"
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict):
            raise APIError(400, f"'{where}' must be {{'type': 'function', 'function': {{'name', ...}}}}", where)
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise APIError(400, f"'{where}.function.name' must be a non-empty string", f"{where}.function.name")
        if fn.get("description") is not None and not isinstance(fn["description"], str):
            raise APIError(400, f"'{where}.function.description' must be a string", f"{where}.function.description")
        if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
            raise APIError(
                400, f"'{where}.function.parameters' must be a JSON schema object", f"{where}.function.parameters"
            )
    return value or None


def tools_of(req: ChatRequest) -> tuple[list[dict] | None, bool]:
    """``tools`` and ``tool_choice`` checked: (the tools for the chat template or None, whether to parse calls).

    ``tool_choice``: ``"none"`` (calls stay text), ``"auto"`` (the default with tools), ``"required"`` or
    ``{"type": "function", "function": {"name": one of the tools}}``.
    """
    tools = tools_list_of(req.tools)
    names = [t["function"]["name"] for t in tools or []]
    choice = req.tool_choice if req.tool_choice is not None else ("auto" if tools else "none")
    if isinstance(choice, dict):
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if choice.get("type") != "function" or not isinstance(name, str):
            raise APIError(
                400,
                "'tool_choice' must be none, auto, required or {'type': 'function', 'function': {'name'}}",
                "tool_choice",
            )
        if name not in names:
            raise APIError(400, f"'tool_choice' names the function {name!r}, which is not in 'tools'", "tool_choice")
    elif choice not in TOOL_CHOICES:
        raise APIError(
            400, f"'tool_choice' must be one of {', '.join(TOOL_CHOICES)} or a named function", "tool_choice"
        )
    elif choice == "required" and not tools:
        raise APIError(400, "'tool_choice' 'required' needs 'tools'", "tool_choice")
    return tools, bool(tools) and choice != "none"


ROLES = ("system", "developer", "user", "assistant", "tool")


def _tool_calls_of(value: Any, where: str) -> list[dict]:
    """An assistant message's ``tool_calls``, as its chat template reads them (``arguments`` a JSON string)."""
    if not isinstance(value, list):
        raise APIError(400, f"'{where}' must be a list of tool calls", where)
    out = []
    for j, call in enumerate(value):
        at = f"{where}.{j}"
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise APIError(400, f"'{at}' must be {{'type': 'function', 'function': {{'name', 'arguments'}}}}", at)
        args = fn.get("arguments", "{}")
        if isinstance(args, dict):  # OpenAI sends a string; some clients send the object
            args = json.dumps(args, ensure_ascii=False)
        if not isinstance(args, str):
            raise APIError(400, f"'{at}.function.arguments' must be a JSON string", f"{at}.function.arguments")
        _text(args, f"{at}.function.arguments")
        entry = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
        if isinstance(call.get("id"), str):
            entry["id"] = call["id"]
        out.append(entry)
    return out


def messages_of(value: Any) -> list[dict[str, Any]]:
    """``messages``: a non-empty list of ``{"role", "content"}``; content a string or a list of text parts.

    An assistant message may carry ``tool_calls`` (its content may then be null: it stays None for
    the template) and a tool message its ``tool_call_id``; both are passed to the chat template.
    """
    if not isinstance(value, list) or not value:
        raise APIError(400, "'messages' must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(value):
        where = f"messages.{i}"
        if not isinstance(m, dict):
            raise APIError(400, f"'{where}' must be an object with 'role' and 'content'", where)
        role = m.get("role")
        if role not in ROLES:
            raise APIError(400, f"'{where}.role' must be one of {', '.join(ROLES)} (got {role!r})", f"{where}.role")
        content = m.get("content")
        calls = (
            _tool_calls_of(m["tool_calls"], f"{where}.tool_calls")
            if role == "assistant" and m.get("tool_calls")
            else None
        )
        if content is None and role == "assistant" and calls is None:
            content = ""
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise APIError(400, f"'{where}.content.{j}': only text parts are supported", f"{where}.content.{j}")
                texts.append(part["text"])
            content = "".join(texts)
        if calls is not None and content in (None, ""):
            out.append({"role": "assistant", "content": None, "tool_calls": calls})
            continue
        if not isinstance(content, str):
            raise APIError(400, f"'{where}.content' must be a string or a list of text parts", f"{where}.content")
        _text(content, f"{where}.content")
        msg: dict[str, Any] = {"role": "system" if role == "developer" else role, "content": content}
        if calls is not None:
            msg["tool_calls"] = calls
        if role == "tool" and m.get("tool_call_id") is not None:
            if not isinstance(m["tool_call_id"], str):
                raise APIError(400, f"'{where}.tool_call_id' must be a string", f"{where}.tool_call_id")
            msg["tool_call_id"] = m["tool_call_id"]
        out.append(msg)
    return out
