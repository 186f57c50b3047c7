"""Structured output: grammars (JSON, a JSON schema, a regex, a choice, EBNF) that mask each sequence's logits.

The engine is xgrammar (optional: the ``serve`` extra; imported when a grammar is first built).
Among the well-kept ones it had the cheapest per-token mask on CPU here (docs/serving.md,
"Structured output"), it compiles a schema in milliseconds, and its matcher rolls back, which
speculative decoding needs to score a grammar at every drafted position.

- :class:`GrammarCompiler`: once per tokenizer (a server builds one): the vocabulary as the engine
  sees it (each id's bytes, from the checkpoint's Hugging Face tokenizer), and compiled grammars;
- :class:`Grammar`: one compiled grammar, immutable, shared by every sequence that uses it (it goes
  in :class:`dsv3.runtime.logits_processing.LogitsParams` as ``grammar``);
- :class:`GrammarRow`: one sequence's matcher. :func:`~dsv3.runtime.logits_processing.penalize`
  asks it for the allowed tokens at each scored position (:meth:`GrammarRow.allowed`) and
  :meth:`GrammarRow.extend` advances it with each token the sequence keeps.

The grammar ends on one of the sequence's stop ids (EOS, ``stop_token_ids``): once the text is
complete the mask allows only those, so the sequence ends with finish reason "stop".
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import torch

from ..errors import Dsv3Error

_ENGINE_PREFIX = re.compile(r"^\[[0-9:]+\] \S+:\d+: (Check failed: .*? is false: )?")  # xgrammar's C++ location


class GrammarError(Dsv3Error):
    """A grammar that cannot be compiled; ``param`` names the request field it came from."""

    def __init__(self, param: str, reason: str):
        super().__init__(f"'{param}' {reason}")
        self.param, self.reason = param, reason


def _xgrammar():
    try:
        import xgrammar
    except ImportError:  # pragma: no cover - the serve and test extras install it
        raise Dsv3Error("structured output needs xgrammar: pip install 'dsv3[serve]' (or xgrammar)") from None
    return xgrammar


def _engine_message(exc: Exception) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return _ENGINE_PREFIX.sub("", text)


class Grammar:
    """A compiled grammar over a vocabulary of ``vocab_size`` ids (immutable; matchers come from it)."""

    def __init__(self, compiled: Any, vocab_size: int, kind: str):
        self.compiled, self.vocab_size, self.kind = compiled, vocab_size, kind

    def __repr__(self) -> str:
        return f"Grammar({self.kind}, vocab_size={self.vocab_size})"

    def can_start(self, stop_ids: list[int]) -> bool:
        """Whether some token of the vocabulary may come first (False: the tokenizer cannot spell it)."""
        return bool(self.row(stop_ids, "cpu").bitmask([], 1).any())

    def row(self, stop_ids: list[int], device: torch.device | str) -> GrammarRow:
        """A fresh matcher for one sequence that ends on any of ``stop_ids`` (non-empty)."""
        if not stop_ids:
            raise Dsv3Error("a grammar needs a stop token to end on (EOS or stop_token_ids; not ignore_eos alone)")
        xgr = _xgrammar()
        matcher = xgr.GrammarMatcher(self.compiled, override_stop_tokens=sorted(stop_ids))
        return GrammarRow(matcher, self.vocab_size, torch.device(device))


class GrammarCompiler:
    """The vocabulary of ``tokenizer`` (a Hugging Face tokenizer) padded to ``vocab_size`` ids, and its grammars.

    Build one per tokenizer (a few ms for 4096 ids; see docs/serving.md for a 129,280-id vocabulary):
    every compile reuses it, and xgrammar caches compiled grammars. Ids past the tokenizer's own
    (padding rows of the embedding) are never allowed.
    """

    def __init__(self, tokenizer: Any, vocab_size: int, max_threads: int = 2):
        xgr = _xgrammar()
        self.vocab_size = vocab_size
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        self._compiler = xgr.GrammarCompiler(self.info, max_threads=max_threads)

    def _compile(self, param: str, kind: str, build) -> Grammar:
        try:
            return Grammar(build(), self.vocab_size, kind)
        except (RuntimeError, ValueError, TypeError) as exc:
            raise GrammarError(param, f"is not a valid {kind}: {_engine_message(exc)}") from None

    def json_object(self, param: str = "response_format") -> Grammar:
        """Any JSON object (OpenAI's ``json_object``), compact: no whitespace between tokens."""
        schema = json.dumps({"type": "object"})
        return self._compile(
            param,
            "JSON object",
            lambda: self._compiler.compile_json_schema(schema, any_whitespace=False, strict_mode=False),
        )

    def json_schema(self, schema: Any, param: str = "response_format", strict: bool = True) -> Grammar:
        """JSON matching ``schema`` (a dict or its JSON text), compact. strict: objects have no properties
        beyond those the schema names (xgrammar's strict_mode; OpenAI's structured outputs are strict)."""
        if isinstance(schema, str):
            text = schema
        elif isinstance(schema, (dict, bool)):
            text = json.dumps(schema)
        else:
            raise GrammarError(param, f"must be a JSON schema (an object), got {type(schema).__name__}")
        return self._compile(
            param,
            "JSON schema",
            lambda: self._compiler.compile_json_schema(text, any_whitespace=False, strict_mode=strict),
        )

    def regex(self, pattern: str, param: str = "guided_regex") -> Grammar:
        """Text matching the regular expression ``pattern`` (whole)."""
        if not isinstance(pattern, str) or not pattern:
            raise GrammarError(param, "must be a non-empty regular expression string")
        return self._compile(param, "regular expression", lambda: self._compiler.compile_regex(pattern))

    def choice(self, options: list[str], param: str = "guided_choice") -> Grammar:
        """Exactly one of ``options`` (non-empty strings)."""
        if not isinstance(options, list) or not options or not all(isinstance(o, str) and o for o in options):
            raise GrammarError(param, "must be a non-empty list of non-empty strings")
        ebnf = "root ::= " + " | ".join(json.dumps(o) for o in dict.fromkeys(options))
        return self._compile(param, "choice", lambda: self._compiler.compile_grammar(ebnf))

    def ebnf(self, grammar: str, param: str = "guided_grammar") -> Grammar:
        """Text in the language of an EBNF grammar (GBNF, as llama.cpp and vLLM write it; its rule ``root``)."""
        if not isinstance(grammar, str) or not grammar.strip():
            raise GrammarError(param, "must be a non-empty EBNF grammar string")
        return self._compile(param, "EBNF grammar", lambda: self._compiler.compile_grammar(grammar))


_BITS = ((torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1).bool()  # (256, 8): byte value -> its bits


class GrammarRow:
    """One sequence's place in its grammar: an xgrammar matcher, advanced with each kept token.

    ``mask_`` scores several positions at once (the speculative verifier's drafted positions) by
    advancing the matcher through the drafts and rolling it back; a position the grammar cannot reach
    (after a draft it rejects, or after its end) is left unconstrained: no token there can be kept.
    """

    def __init__(self, matcher: Any, vocab_size: int, device: torch.device):
        self.matcher, self.vocab_size, self.device = matcher, vocab_size, device
        self._xgr = _xgrammar()
        self._words = -(-vocab_size // 32)
        self._bits = _BITS.to(device) if device.type != "cpu" else None
        self.rejected = 0  # kept tokens the grammar did not accept (0 unless a caller bypassed the mask)

    @property
    def done(self) -> bool:
        """Whether the grammar has ended (a stop id was accepted)."""
        return bool(self.matcher.is_terminated())

    def extend(self, tokens: list[int]) -> None:
        """Advance through tokens the sequence kept (in order)."""
        for t in tokens:
            if self.matcher.is_terminated() or not self.matcher.accept_token(int(t)):
                self.rejected += 1

    def bitmask(self, prefix: list[int], n_pos: int) -> torch.Tensor:
        """The allowed tokens at ``n_pos`` positions as an xgrammar bitmask (P, ceil(V / 32)) int32 on the host
        (bit j of word w: id 32 w + j allowed). Position p follows ``prefix[:len(prefix) - n_pos + 1 + p]``
        (prefix: tokens after the kept ones; len(prefix) >= n_pos - 1). An unreachable position is all ones.
        The matcher ends where it began.
        """
        first = len(prefix) - n_pos + 1
        bitmask = torch.full((n_pos, self._words), -1, dtype=torch.int32)
        m, advanced, alive = self.matcher, 0, True
        for t in prefix[:first]:
            if m.is_terminated() or not m.accept_token(int(t)):
                alive = False
                break
            advanced += 1
        for p in range(n_pos):
            if not alive or m.is_terminated():
                break
            m.fill_next_token_bitmask(bitmask, p)
            if p + 1 < n_pos:
                if not m.accept_token(int(prefix[first + p])):
                    break
                advanced += 1
        if advanced:
            m.rollback(advanced)
        return bitmask

    def mask_(self, logits: torch.Tensor, prefix: list[int]) -> None:
        """Set the tokens the grammar does not allow to -inf, in place: logits (P, V) float32, contiguous,
        position p after ``prefix`` as in :meth:`bitmask`."""
        bitmask = self.bitmask(prefix, logits.shape[0])
        if not bool(bitmask.any(-1).all()):  # all -inf: nothing to sample (a vocabulary that cannot spell it)
            raise Dsv3Error("the grammar allows no token of this vocabulary next (the tokenizer cannot express it)")
        if logits.device.type == "cpu":  # xgrammar's CPU kernel: the cheapest here (docs/serving.md)
            self._xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=self.vocab_size, backend="cpu")
            return
        # elsewhere plain PyTorch on the logits' device: each byte of the mask -> its 8 bits by a table
        table = self._bits if self._bits is not None and self._bits.device == logits.device else _BITS.to(logits.device)
        raw = (
            bitmask.to(logits.device).view(torch.uint8).long()
        )  # little-endian: byte k of word w holds ids 32 w + 8 k ..
        allowed = table[raw].view(logits.shape[0], -1)[:, : logits.shape[-1]]
        logits.masked_fill_(~allowed, -math.inf)
