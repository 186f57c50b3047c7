"""Structured output for the server: a request's ``response_format`` or vLLM's ``guided_*`` fields -> a grammar.

``response_format`` (both endpoints, as vLLM takes it): ``{"type": "text"}`` (free text),
``{"type": "json_object"}`` or ``{"type": "json_schema", "json_schema": {"name", "schema", ...}}``.
vLLM's extras: ``guided_json`` (a schema), ``guided_regex``, ``guided_choice`` (a list of strings) and
``guided_grammar`` (EBNF). At most one of them per request. The grammar joins the request's logits
processing (:class:`~dsv3.runtime.logits_processing.LogitsParams` ``grammar``): its mask is applied
in the one logits stage, in plain and speculative decoding alike.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

from ..grammar import Grammar, GrammarCompiler, GrammarError
from ..logits_processing import LogitsParams
from ..sampling import SamplingError
from .protocol import APIError, ChatRequest, CompletionRequest

GUIDED = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")
FORMATS = ("text", "json_object", "json_schema")


class Grammars:
    """A server's grammar compiler, built from ``tokenizer`` on first use (once; thread-safe)."""

    def __init__(self, tokenizer: Any, vocab_size: int):
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self._compiler: GrammarCompiler | None = None
        self._lock = threading.Lock()

    def compiler(self, param: str) -> GrammarCompiler:
        with self._lock:
            if self._compiler is None:
                if self.tokenizer is None:
                    raise APIError(400, f"'{param}' needs the model's tokenizer, and this checkpoint has none", param)
                try:
                    self._compiler = GrammarCompiler(self.tokenizer, self.vocab_size)
                except Exception as exc:  # xgrammar is not installed, or cannot read this tokenizer
                    raise APIError(400, f"'{param}' is not available on this server: {exc}"[:500], param) from None
            return self._compiler


def _requested(req: CompletionRequest | ChatRequest) -> list[tuple[str, Any]]:
    """The structured-output fields the request sets (``response_format`` type text counts as unset)."""
    out = []
    fmt = getattr(req, "response_format", None)
    if fmt is None:
        fmt = (req.model_extra or {}).get("response_format")
    if fmt is not None:
        if not isinstance(fmt, dict) or fmt.get("type") not in FORMATS:
            got = fmt.get("type") if isinstance(fmt, dict) else fmt
            raise APIError(
                400,
                f"'response_format' must be an object whose 'type' is one of {', '.join(FORMATS)} (got {got!r})",
                "response_format",
            )
        if fmt["type"] != "text":
            out.append(("response_format", fmt))
    extra = req.model_extra or {}
    out += [(name, extra[name]) for name in GUIDED if extra.get(name) is not None]
    return out


def grammar_of(req: CompletionRequest | ChatRequest, grammars: Grammars) -> Grammar | None:
    """The request's grammar (None: free text); an APIError (400) naming the field for a bad one."""
    asked = _requested(req)
    if not asked:
        return None
    if len(asked) > 1:
        names = " and ".join(f"'{n}'" for n, _ in asked)
        raise APIError(400, f"give at most one structured-output field ({names} were given)", asked[1][0])
    param, value = asked[0]
    compiler = grammars.compiler(param)
    try:
        if param == "response_format":
            if value["type"] == "json_object":
                return compiler.json_object(param)
            spec = value.get("json_schema")
            if not isinstance(spec, dict) or "schema" not in spec:
                raise APIError(
                    400,
                    "'response_format' json_schema needs 'json_schema': {'name': ..., 'schema': {...}}",
                    "response_format",
                )
            return compiler.json_schema(spec["schema"], param)
        if param == "guided_json":
            return compiler.json_schema(value, param)
        if param == "guided_regex":
            return compiler.regex(value, param)
        if param == "guided_choice":
            return compiler.choice(value, param)
        return compiler.ebnf(value, param)
    except GrammarError as exc:
        raise APIError(400, str(exc)[:500], exc.param) from None


def with_grammar(
    processing: LogitsParams | None,
    req: CompletionRequest | ChatRequest,
    grammars: Grammars,
    stop_ids: frozenset[int],
) -> LogitsParams | None:
    """``processing`` with the request's grammar added (unchanged without one); 400s name the field."""
    grammar = grammar_of(req, grammars)
    if grammar is None:
        return processing
    param = _requested(req)[0][0]
    if not stop_ids:
        raise APIError(
            400, f"'{param}' needs a stop token to end on: drop 'ignore_eos' or give 'stop_token_ids'", param
        )
    if not grammar.can_start(sorted(stop_ids)):
        raise APIError(400, f"'{param}' cannot be written with this model's tokenizer (no token may start it)", param)
    params = dataclasses.replace(processing or LogitsParams(), grammar=grammar)
    try:
        return params.validate(grammars.vocab_size)
    except SamplingError as exc:
        raise APIError(400, f"'{exc.param}' {exc.reason}", exc.param) from None
