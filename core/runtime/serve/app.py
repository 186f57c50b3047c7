"""The HTTP side: an OpenAI-compatible FastAPI app in front of a :class:`~dsv3.runtime.serve.scheduler.Scheduler`.

Endpoints: ``GET /health`` (no key needed; slot usage and counters), ``GET /v1/models``,
``POST /v1/completions``, ``POST /v1/chat/completions`` (both with ``"stream": true`` as
server-sent events ending in ``data: [DONE]``), ``POST /tokenize``, ``POST /detokenize``,
``GET /tokenizer_info``, ``GET /version`` and ``GET /metrics`` (Prometheus; no key needed). Errors are OpenAI's JSON shape with a 4xx status
for the client's mistakes. Token ids travel from the scheduler thread to each request's asyncio
queue; text is decoded on the event loop. A request whose client goes away is cancelled, which
frees its slot before the next decode step.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import itertools
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from functools import partial

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ... import __version__
from ..engine import Engine
from ..logits_processing import LogitsParams
from . import reasoning, tool_calls
from .chat_output import ChatOutput, marker_decoder, message
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import CountRequests, RequestTimer, ServeMetrics
from .protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    logits_params_of,
    messages_of,
    parse,
    parse_json,
    prompts_of,
    stops_of,
    tools_list_of,
    tools_of,
)
from .scheduler import Event, Scheduler, SchedulerBusy, TokenLogprob
from .scheduler import Request as GenRequest
from .structured import Grammars, with_grammar
from .text import TextStream, first_stop


@dataclass(frozen=True)
class ServeSettings:
    """Limits and identity of a server (see ``dsv3 serve --help``)."""

    model_name: str
    max_model_len: int
    max_prompt_tokens: int
    max_tokens_limit: int
    max_request_bytes: int = 1 << 20
    api_key: str | None = None
    default_completion_tokens: int = 16  # OpenAI's default for /v1/completions without max_tokens
    disconnect_poll_s: float = 0.5
    reasoning_parser: str | None = None  # "deepseek_r1": chat answers' <think>...</think> as reasoning_content


@dataclass
class _Job:
    """A validated request: prompts as token ids and how to sample them."""

    prompts: list[list[int]]
    max_tokens: list[int]
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]
    stop_ids: frozenset[int]
    stream: bool
    include_usage: bool
    return_token_ids: bool
    logprobs: int | None = None  # top-k per token (None: no logprobs)
    echo: bool = False
    prompt_texts: list[str] = field(default_factory=list)  # what echo puts before each completion
    n: int = 1  # choices returned per prompt
    best_of: int = 1  # sequences generated per prompt (>= n): the n with the highest log-probability are returned
    processing: LogitsParams | None = None  # penalties, logit_bias, top_k, min_p, min_tokens (None: none)
    decode: Callable[[list[int]], str] | None = None  # token ids to text (None: engine.decode)
    parse_tools: bool = False  # chat: DeepSeek-V3 tool calls in the answer become tool_calls
    reasoning: bool = False  # chat: <think>...</think> becomes reasoning_content

    @property
    def parsed(self) -> bool:
        """Whether chat answers go through :class:`ChatOutput` (else the text is the content)."""
        return self.parse_tools or self.reasoning


@dataclass(eq=False)
class _Choice:
    req: GenRequest
    text: TextStream
    prompt_index: int = 0
    timer: RequestTimer | None = None
    ids: list[int] = field(default_factory=list)
    lps: list[TokenLogprob] = field(default_factory=list)  # one per id when logprobs were asked
    prompt_lps: tuple[TokenLogprob, ...] = ()
    finish: str | None = None
    error: str | None = None

    @property
    def done(self) -> bool:
        return self.finish is not None or self.error is not None


_GONE = object()  # queued when the client disconnected
_GROUPS = itertools.count()  # scheduler group ids: one per prompt of a request with n or best_of > 1
log = logging.getLogger("uvicorn.error")  # uvicorn's own log: its handler and --log-level


class _Run:
    """One HTTP request's sequences in the scheduler, and the events that come back for them."""

    def __init__(self, scheduler: Scheduler, job: _Job, engine: Engine, poll_s: float, metrics: ServeMetrics):
        self.scheduler, self.job, self.engine, self.poll_s = scheduler, job, engine, poll_s
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.disconnected = False
        self.choices = []
        per = max(job.n, job.best_of)  # sequences per prompt; choice j of a seeded request draws with seed + j
        # ranking best_of candidates needs each token's log-probability
        logprobs = job.logprobs if job.best_of <= job.n or job.logprobs is not None else 0
        for i, (prompt, max_tokens) in enumerate(zip(job.prompts, job.max_tokens, strict=True)):
            group = next(_GROUPS) if per > 1 else None  # one prefill for the prompt's sequences
            for j in range(per):
                req = GenRequest(
                    prompt,
                    max_tokens,
                    partial(self._push, len(self.choices)),
                    job.temperature,
                    job.top_p,
                    None if job.seed is None else job.seed + j,
                    job.stop_ids,
                    logprobs=logprobs,
                    prompt_logprobs=job.echo and job.logprobs is not None,
                    processing=job.processing,
                    group=group,
                )
                timer = metrics.timer(len(prompt) if j == 0 else 0)  # a prompt counts once for its choices
                self.choices.append(_Choice(req, TextStream(job.decode or engine.decode, job.stop), i, timer))

    def _push(self, index: int, event: Event) -> None:  # the scheduler thread
        with contextlib.suppress(RuntimeError):  # the loop is closed: the server is going down
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, event))

    def submit(self) -> None:
        try:
            for c in self.choices:
                self.scheduler.submit(c.req)
        except SchedulerBusy as exc:
            self.cancel()
            raise APIError(503, str(exc), type="server_error", code="server_overloaded") from None

    def cancel(self) -> None:
        for c in self.choices:
            if not c.done:
                self.scheduler.cancel(c.req)

    async def _watch(self, request: Request) -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(self.poll_s)
        self.queue.put_nowait(_GONE)

    async def updates(self, request: Request) -> AsyncIterator[tuple[int, str, Event]]:
        """(choice index, text delta, its event) until every choice is done; cancels what is left on exit."""
        watcher = asyncio.create_task(self._watch(request))
        try:
            while not all(c.done for c in self.choices):
                item = await self.queue.get()
                if item is _GONE:
                    self.disconnected = True
                    return
                i, ev = item
                c = self.choices[i]
                if c.done:  # events already in flight when a stop string ended it
                    continue
                c.ids.extend(ev.tokens)
                c.lps.extend(ev.logprobs)
                c.timer.tokens(len(ev.tokens))
                if ev.prompt_logprobs is not None:
                    c.prompt_lps = ev.prompt_logprobs
                delta, stopped = c.text.add(ev.tokens)
                if stopped:
                    c.finish = "stop"
                    self.scheduler.cancel(c.req)
                elif ev.error is not None:
                    c.error = ev.error
                elif ev.finish_reason is not None:
                    delta += c.text.finish()
                    c.finish = "stop" if c.text.stopped else ev.finish_reason
                if c.done:
                    c.timer.finish()
                yield i, delta, ev
        finally:
            watcher.cancel()
            self.cancel()

    def final_text(self, c: _Choice) -> str:
        """The whole completion decoded at once (as ``dsv3 run`` does), cut at the first stop string."""
        text = (self.job.decode or self.engine.decode)(c.ids)
        cut = first_stop(text, self.job.stop)
        return text if cut is None else text[:cut]

    def usage(self) -> dict:
        p = sum(len(x) for x in self.job.prompts)
        n = sum(len(c.ids) for c in self.choices)
        return {"prompt_tokens": p, "completion_tokens": n, "total_tokens": p + n}

    def returned(self) -> list[_Choice]:
        """The choices the response shows: all of them, or with ``best_of`` each prompt's ``n`` most likely
        (the highest sum of token log-probabilities; ties keep generation order)."""
        if self.job.best_of <= self.job.n:
            return self.choices
        per, out = self.job.best_of, []
        for i in range(len(self.job.prompts)):
            group = self.choices[i * per : (i + 1) * per]
            ranked = sorted(group, key=lambda c: -sum(lp.logprob for lp in c.lps))
            out += ranked[: self.job.n]
        return out

    def error(self) -> APIError | None:
        errors = [c.error for c in self.choices if c.error]
        return APIError(500, errors[0], type="server_error") if errors else None


def _check_ids(ids: list[int], param: str, vocab: int) -> list[int]:
    """A prompt's token ids, checked: non-empty and inside the vocabulary."""
    if not ids:
        raise APIError(400, f"'{param}' is empty", param)
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise APIError(400, f"'{param}' has token id {bad}, outside the vocabulary [0, {vocab})", param)
    return ids


def _job(
    req: CompletionRequest | ChatRequest,
    prompts: list[list[int]],
    param: str,
    default_tokens: int,
    settings: ServeSettings,
    eos_ids: tuple[int, ...],
    vocab_size: int,
) -> _Job:
    """Check the prompts, token budget and sampling fields against the server's limits and the
    vocabulary; 400s name the field at fault."""
    processing = logits_params_of(req, vocab_size)
    stop_token_ids = req.stop_token_ids or []
    bad = next((t for t in stop_token_ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise APIError(
            400, f"'stop_token_ids' has token id {bad}, outside the vocabulary [0, {vocab_size})", "stop_token_ids"
        )
    stop_ids = frozenset(stop_token_ids) | (frozenset() if req.ignore_eos else frozenset(eos_ids))
    if processing is not None and processing.min_tokens and len(stop_ids) >= vocab_size:
        raise APIError(400, "with 'min_tokens', 'stop_token_ids' must leave some token to generate", "stop_token_ids")
    chat_limit = isinstance(req, ChatRequest) and req.max_tokens is None and req.max_completion_tokens is not None
    limit_name = "max_completion_tokens" if chat_limit else "max_tokens"
    requested = req.max_completion_tokens if chat_limit else req.max_tokens
    if requested is not None and requested > settings.max_tokens_limit:
        raise APIError(
            400,
            f"'{limit_name}' is {requested}, more than this server's limit of {settings.max_tokens_limit}",
            limit_name,
        )
    budgets = []
    for ids in prompts:
        n = len(ids)
        if n > settings.max_prompt_tokens:
            raise APIError(
                400,
                f"the prompt has {n} tokens, more than this server's limit of {settings.max_prompt_tokens}",
                param,
                "context_length_exceeded",
            )
        room = settings.max_model_len - n
        if requested is not None and requested > room:
            raise APIError(
                400,
                f"this model's maximum context length is {settings.max_model_len} tokens; the prompt has {n} "
                f"and '{limit_name}' asks for {requested} more",
                limit_name,
                "context_length_exceeded",
            )
        budget = requested if requested is not None else min(default_tokens, settings.max_tokens_limit, room)
        if budget < 1 and requested != 0:  # 0 was asked for: echo, only the prompt scored
            raise APIError(
                400,
                f"the prompt has {n} tokens and leaves no room to generate within the model's "
                f"maximum context length of {settings.max_model_len}",
                param,
                "context_length_exceeded",
            )
        if processing is not None and processing.min_tokens > budget:
            raise APIError(
                400,
                f"'min_tokens' ({processing.min_tokens}) is more than the {budget} tokens to generate",
                "min_tokens",
            )
        budgets.append(budget)
    return _Job(
        prompts,
        budgets,
        1.0 if req.temperature is None else float(req.temperature),
        1.0 if req.top_p is None else float(req.top_p),
        req.seed,
        stops_of(req.stop),
        stop_ids,
        bool(req.stream),
        bool(req.stream and req.stream_options and req.stream_options.include_usage),
        bool(req.return_token_ids),
        _top_k(req),
        bool(getattr(req, "echo", False)),
        processing=processing,
        n=req.n or 1,
        best_of=getattr(req, "best_of", None) or 1,
    )


def _top_k(req: CompletionRequest | ChatRequest) -> int | None:
    """How many top logprobs each token gets (None: no logprobs): completions' ``logprobs``, chat's ``top_logprobs``."""
    if isinstance(req, CompletionRequest):
        return req.logprobs
    return (req.top_logprobs or 0) if req.logprobs else None


def _chat_logprobs(engine: Engine, entries: list[tuple[int, TokenLogprob]]) -> dict:
    """OpenAI's chat logprobs, ``{"content": [{"token", "logprob", "bytes", "top_logprobs"}, ...]}``.

    ``token`` is the id decoded alone (special tokens included) and ``bytes`` its UTF-8, so a token
    holding part of a multi-byte character shows U+FFFD, not its raw bytes.
    """

    def one(t: int, v: float) -> dict:
        s = _token_str(engine, t)
        return {"token": s, "logprob": v, "bytes": list(s.encode("utf-8"))}

    return {"content": [one(t, lp.logprob) | {"top_logprobs": [one(i, v) for i, v in lp.top]} for t, lp in entries]}


def _logprobs(engine: Engine, entries: list[tuple[int, TokenLogprob | None]], offset: int) -> tuple[dict, int]:
    """OpenAI's completions logprobs for (token id, its logprob or None) entries, text offsets from ``offset``.

    Tokens are shown as each id decoded alone, special tokens included; ``text_offset`` adds up the
    lengths of the pieces as the text shows them (special tokens: none).
    """
    tokens, values, tops, offsets = [], [], [], []
    for t, lp in entries:
        tokens.append(_token_str(engine, t))
        offsets.append(offset)
        offset += len(engine.decode([t])) if engine.tokenizer is not None else 0
        values.append(None if lp is None else lp.logprob)
        if lp is None:
            tops.append(None)
            continue
        top: dict[str, float] = {}
        for tid, v in lp.top:  # best first; two ids shown alike keep the better one
            top.setdefault(_token_str(engine, tid), v)
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}, offset


def _token_str(engine: Engine, t: int) -> str:
    """A token as logprobs show it: decoded alone, special tokens included (so EOS is not ``""``)."""
    if engine.tokenizer is None:
        return f"token_id:{t}"
    return engine.tokenizer.decode([t], skip_special_tokens=False)


def _plain_ids(engine: Engine, text: str) -> list[int]:
    """The text's token ids alone, without the BOS token that a completion prompt starts with."""
    if engine.tokenizer is None:
        raise APIError(400, "this model has no tokenizer; send token ids", "prompt")
    return list(engine.tokenizer.encode(text, add_special_tokens=False))


def _prompt_entries(prompt: list[int], lps: tuple[TokenLogprob, ...]) -> list[tuple[int, TokenLogprob | None]]:
    """A prompt's tokens with their logprobs; the first token has none (nothing before it predicts it)."""
    return list(zip(prompt, (None, *lps), strict=True))


def _chat_ids(engine: Engine, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
    """The conversation (and its tools) through the tokenizer's chat template, ready for the assistant's turn."""
    if not getattr(engine.tokenizer, "chat_template", None):
        raise APIError(400, "this model's tokenizer has no chat template; use /v1/completions", "messages")
    if tools is not None:
        problem = tool_calls.template_problem(engine.tokenizer, tools)
        if problem is not None:
            raise APIError(400, f"'tools' cannot be used: {problem}", "tools")
    try:
        return engine.encode_chat(messages, tools)
    except Exception as exc:  # the template rejected the conversation (e.g. role order)
        raise APIError(400, f"the chat template rejected these messages: {exc}", "messages") from None


def _sse(obj: dict | str) -> str:
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n"


def _body(run: _Run, head: dict, chat: bool) -> dict:
    """The whole (non-streaming) response; a 500 APIError if generation failed."""
    err = run.error()
    if err is not None:
        raise err
    choices = []
    job = run.job
    for i, c in enumerate(run.returned()):
        text = run.final_text(c)
        choice: dict = {"index": i}
        logprobs = None
        finish = c.finish
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
            if job.parsed:
                choice["message"] |= message(text, job.reasoning, job.parse_tools)
                if finish == "stop" and "tool_calls" in choice["message"]:
                    finish = "tool_calls"
            if job.logprobs is not None:
                logprobs = _chat_logprobs(run.engine, list(zip(c.ids, c.lps, strict=True)))
        else:
            prompt_text = job.prompt_texts[c.prompt_index] if job.echo else ""
            choice["text"] = prompt_text + text
            if job.logprobs is not None:
                entries = _prompt_entries(c.req.prompt, c.prompt_lps) if job.echo else []
                logprobs = _logprobs(run.engine, entries + list(zip(c.ids, c.lps, strict=True)), 0)[0]
        choice |= {"logprobs": logprobs, "finish_reason": finish}
        if run.job.return_token_ids:
            choice["token_ids"] = c.ids
        choices.append(choice)
    return {**head, "choices": choices, "usage": run.usage()}


async def _stream_events(request: Request, run: _Run, head: dict, chat: bool) -> AsyncIterator[str]:
    """Server-sent events: OpenAI chunks as tokens arrive, the usage chunk if asked, then ``[DONE]``."""

    job = run.job
    offsets = [0] * len(run.choices)  # text_offset so far, per choice
    echoed = [not job.echo] * len(run.choices)
    outputs = [ChatOutput(job.reasoning, job.parse_tools) if chat and job.parsed else None for _ in run.choices]

    def chunk(
        i: int,
        text: str | dict | None,
        finish: str | None,
        ids: tuple[int, ...] | None = None,
        entries: list[tuple[int, TokenLogprob | None]] | None = None,
    ) -> str:
        if chat:
            delta = text if isinstance(text, dict) else {} if text is None else {"content": text}
            choice = {"index": i, "delta": delta}
        else:
            choice = {"index": i, "text": text or ""}
        logprobs = None
        if entries is not None and job.logprobs is not None:
            if chat:
                logprobs = _chat_logprobs(run.engine, entries)
            else:
                logprobs, offsets[i] = _logprobs(run.engine, entries, offsets[i])
        choice |= {"logprobs": logprobs, "finish_reason": finish}
        if ids is not None:
            choice["token_ids"] = list(ids)
        return _sse({**head, "choices": [choice]})

    try:
        if chat:
            role = {"role": "assistant", "content": ""}
            for i in range(len(run.choices)):
                yield _sse({**head, "choices": [{"index": i, "delta": role, "logprobs": None, "finish_reason": None}]})
        async for i, delta, ev in run.updates(request):
            c, ids = run.choices[i], ev.tokens
            if c.error is not None:
                yield _sse(APIError(500, c.error, type="server_error").body())
                continue
            if not echoed[i]:  # the prompt first, with its logprobs
                echoed[i] = True
                yield chunk(
                    i, job.prompt_texts[c.prompt_index], None, None, _prompt_entries(c.req.prompt, c.prompt_lps)
                )
            out, finish = outputs[i], c.finish
            if out is not None:  # the text split into reasoning_content / content / tool_calls
                delta = out.feed(delta) if delta else {}
                if c.finish is not None:
                    delta = _merge(delta, out.finish())
                    if finish == "stop" and out.calls:
                        finish = "tool_calls"
            if delta or (ids and (job.return_token_ids or job.logprobs is not None)):
                entries = list(zip(ids, ev.logprobs, strict=True)) if job.logprobs is not None else None
                yield chunk(i, delta, None, ids if job.return_token_ids else None, entries)
            if c.finish is not None:
                yield chunk(i, None if chat else "", finish)
        if run.disconnected:
            return
        if run.job.include_usage:
            yield _sse({**head, "choices": [], "usage": run.usage()})
        yield _sse("[DONE]")
    finally:
        run.cancel()


def _merge(a: dict, b: dict) -> dict:
    """Two chat deltas as one: text fields joined, tool-call entries in order."""
    out = dict(a)
    for key, value in b.items():
        out[key] = out[key] + value if key in out else value
    return out


def http_protocol() -> type:
    """uvicorn's HTTP protocol class, answering a request it cannot parse as HTTP with OpenAI's error shape.

    uvicorn (h11 or httptools) refuses such a request itself, before the app sees it, with one
    warning line and a text/plain 400; this subclass sends that 400 as JSON. Pass it as
    ``uvicorn.Config(http=...)``.
    """
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    class JsonErrorHTTPProtocol(AutoHTTPProtocol):
        def send_400_response(self, msg: str) -> None:
            body = json.dumps(APIError(400, msg).body()).encode()
            head = b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: %d\r\n" % len(body)
            self.transport.write(head + b"connection: close\r\n\r\n" + body)
            self.transport.close()

    return JsonErrorHTTPProtocol


def create_app(engine: Engine, scheduler: Scheduler, settings: ServeSettings) -> FastAPI:
    """The FastAPI app; its lifespan starts and stops ``scheduler``."""

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        scheduler.start()
        try:
            yield
        finally:
            await asyncio.to_thread(scheduler.stop)

    app = FastAPI(title="dsv3", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())
    metrics = ServeMetrics(scheduler.stats)
    grammars = Grammars(engine.tokenizer, engine.cfg.vocab_size)  # structured output: compiled on first use
    endpoints = {"/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions"}
    endpoints |= {"/tokenize", "/detokenize", "/tokenizer_info", "/version"}
    app.add_middleware(CountRequests, metrics=metrics, endpoints=frozenset(endpoints))

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=METRICS_CONTENT_TYPE)

    @app.exception_handler(APIError)
    async def _api_error(_request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else None
        return JSONResponse(APIError(exc.status_code, str(exc.detail), code=code).body(), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(APIError(400, str(exc.errors()[0].get("msg"))).body(), status_code=400)

    @app.exception_handler(Exception)
    async def _internal_error(_request: Request, exc: Exception) -> JSONResponse:
        err = APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error")
        return JSONResponse(err.body(), status_code=500)

    def check_auth(request: Request) -> None:
        if settings.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), settings.api_key.encode()):
            raise APIError(
                401, "invalid or missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key"
            )

    async def read_json(request: Request):
        limit = settings.max_request_bytes
        too_big = APIError(413, f"request body larger than this server's limit of {limit} bytes", code="too_large")
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise too_big
        body = bytearray()
        try:
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise too_big
        except ClientDisconnect:  # nobody to answer: one line in the log, not a traceback
            client = f"{request.client.host}:{request.client.port}" if request.client else "a client"
            log.warning("%s disconnected while sending the body of %s %s", client, request.method, request.url.path)
            raise APIError(499, "the client disconnected while sending the request body") from None
        return parse_json(bytes(body))

    def check_model(name: str) -> None:
        if name != settings.model_name:
            raise APIError(
                404,
                f"the model '{name}' does not exist; this server serves '{settings.model_name}'",
                "model",
                "model_not_found",
            )

    # ------------------------------------------------------------ routes
    @app.get("/health")
    async def health() -> JSONResponse:
        ok = scheduler.alive and scheduler.fatal is None
        body = {"status": "ok" if ok else "error", "model": settings.model_name, **scheduler.stats()}
        if scheduler.fatal:
            body["error"] = scheduler.fatal
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        check_auth(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str, request: Request) -> dict:
        check_auth(request)
        check_model(name)
        return model_card()

    def model_card() -> dict:
        card = {"id": settings.model_name, "object": "model", "created": created, "owned_by": "dsv3"}
        return {**card, "max_model_len": settings.max_model_len}

    @app.post("/v1/completions")
    async def completions(request: Request):
        check_auth(request)
        req = parse(CompletionRequest, await read_json(request))
        check_model(req.model)
        vocab = engine.cfg.vocab_size
        given = prompts_of(req.prompt)
        prompts = [
            _check_ids(engine.encode(p, chat=False) if isinstance(p, str) else p, "prompt", vocab) for p in given
        ]
        if scheduler.mtp and req.logprobs is not None:
            raise APIError(400, "'logprobs' is not supported with speculative decoding (--mtp)", "logprobs")
        if scheduler.mtp and req.max_tokens == 0:
            raise APIError(400, "'max_tokens': 0 is not supported with speculative decoding (--mtp)", "max_tokens")
        if scheduler.mtp and (req.best_of or 1) > (req.n or 1):
            raise APIError(400, "'best_of' is not supported with speculative decoding (--mtp)", "best_of")
        job = _job(req, prompts, "prompt", settings.default_completion_tokens, settings, engine.eos_ids, vocab)
        job.processing = with_grammar(job.processing, req, grammars, job.stop_ids)
        if job.echo:
            job.prompt_texts = [
                p if isinstance(p, str) else engine.decode(ids) for p, ids in zip(given, prompts, strict=True)
            ]
        return await respond(request, job, chat=False)

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict:
        check_auth(request)
        req = parse(TokenizeRequest, await read_json(request))
        if req.model is not None:
            check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give exactly one of 'prompt' (a string) and 'messages'", "prompt")
        if req.prompt is not None:
            text = prompts_of(req.prompt)[0]
            ids = engine.encode(text, chat=False) if req.add_special_tokens else _plain_ids(engine, text)
        else:
            ids = _chat_ids(engine, messages_of(req.messages), tools_list_of(req.tools))
        return {"tokens": ids, "count": len(ids), "max_model_len": settings.max_model_len}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict:
        check_auth(request)
        req = parse(DetokenizeRequest, await read_json(request))
        if req.model is not None:
            check_model(req.model)
        bad = next((t for t in req.tokens if not 0 <= t < engine.cfg.vocab_size), None)
        if bad is not None:
            raise APIError(400, f"'tokens' has token id {bad}, outside the vocabulary", "tokens")
        return {"prompt": engine.decode(req.tokens)}

    @app.get("/tokenizer_info")
    async def tokenizer_info(request: Request) -> dict:
        check_auth(request)
        tok = engine.tokenizer
        if tok is None:
            raise APIError(404, "this model has no tokenizer", code="not_found")
        return {
            "tokenizer_class": type(tok).__name__,
            "eos_token": tok.eos_token,
            "bos_token": tok.bos_token,
            "pad_token": tok.pad_token,
            "model_max_length": settings.max_model_len,
            "chat_template": getattr(tok, "chat_template", None),
        }

    @app.get("/version")
    async def version() -> dict:
        return {"version": __version__}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_auth(request)
        req = parse(ChatRequest, await read_json(request))
        check_model(req.model)
        tools, parse_tools = tools_of(req)
        ids = _check_ids(_chat_ids(engine, messages_of(req.messages), tools), "messages", engine.cfg.vocab_size)
        if scheduler.mtp and req.logprobs:
            raise APIError(400, "'logprobs' is not supported with speculative decoding (--mtp)", "logprobs")
        job = _job(req, [ids], "messages", settings.max_tokens_limit, settings, engine.eos_ids, engine.cfg.vocab_size)
        job.parse_tools, job.reasoning = parse_tools, settings.reasoning_parser is not None
        if job.parsed:  # the parsers read the marker tokens, which a tokenizer may call special
            markers = (tool_calls.MARKERS if job.parse_tools else ()) + (reasoning.MARKERS if job.reasoning else ())
            job.decode = marker_decoder(engine.tokenizer, markers)
        job.processing = with_grammar(job.processing, req, grammars, job.stop_ids)
        return await respond(request, job, chat=True)

    async def respond(request: Request, job: _Job, chat: bool):
        run = _Run(scheduler, job, engine, settings.disconnect_poll_s, metrics)
        run.submit()
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        head = {
            "id": rid,
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": settings.model_name,
        }
        if job.stream:
            head["object"] = "chat.completion.chunk" if chat else "text_completion"
            events = _stream_events(request, run, head, chat)
            headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            return StreamingResponse(
                events, media_type="text/event-stream", headers=headers, background=BackgroundTask(run.cancel)
            )
        async for _ in run.updates(request):
            pass
        if run.disconnected:
            return JSONResponse({}, status_code=499)  # nobody is listening any more
        return _body(run, head, chat)

    return app
