"""The Engine that dsv3.load returns: text in, completions out (tokenizer, chat template, plain or
speculative decoding) over a built model."""

from __future__ import annotations

from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import Dsv3Error
from ..model.graph import Transformer
from .distributed import agree_on_seed
from .generate import DecodeStep, SamplingParams, check_lengths, collect, generate_steps
from .logits_processing import LogitsParams
from .speculative import check_mtp, speculative_steps
from .text import IncrementalDecoder, check_text


def share(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """``(start, stop)`` of rank ``rank``'s contiguous share of ``n`` items, as even as possible (the
    first ``n % world_size`` ranks take one more; a rank may get none): 3 over 2 -> (0, 2), (2, 3)."""
    size, extra = divmod(n, world_size)
    start = rank * size + min(rank, extra)
    return start, start + size + (rank < extra)


@dataclass
class Completion:
    """One prompt's result: the generated text and token ids (prompt excluded)."""

    prompt: str | list[int]
    text: str
    token_ids: list[int]
    finish_reason: str
    mtp: dict | None = None  # speculative-decoding statistics of this row (generate(..., mtp=K))


class Engine:
    """A loaded model, its tokenizer (if the checkpoint has one) and generation."""

    def __init__(self, model: Transformer, tokenizer=None, path: Path | None = None):
        self.model, self.tokenizer, self.path = model, tokenizer, path
        self.cfg = model.cfg
        self.enforce_eager = False  # True: never replay captured decode steps (dsv3.runtime.graphs)

    # ----------------------------------------------------------------- tokens
    def default_chat(self) -> bool:
        """Whether prompts go through the chat template unless told otherwise.

        Yes when the tokenizer has a template, unless config.json says ``"dsv3_default_prompt": "raw"``
        (a completion model that also knows a chat format, like the embedded one).
        """
        tok = self._need_tokenizer()
        return bool(getattr(tok, "chat_template", None)) and self.cfg.extra.get("dsv3_default_prompt") != "raw"

    def encode(self, prompt: str, chat: bool | None = None) -> list[int]:
        """Token ids of a prompt; through the chat template by default (see ``default_chat``) or when chat=True."""
        tok = self._need_tokenizer()
        check_text(prompt, "prompt")
        use_chat = self.default_chat() if chat is None else chat
        if use_chat:
            return self.encode_chat([{"role": "user", "content": prompt}])
        ids = tok.encode(prompt, add_special_tokens=False)
        if tok.bos_token_id is not None:
            ids = [tok.bos_token_id] + ids
        return ids

    def encode_chat(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """Token ids of a conversation (``[{"role": ..., "content": ...}, ...]``) through the tokenizer's
        chat template, ending with the prompt for the assistant's turn.

        tools: OpenAI's ``[{"type": "function", "function": {...}}]``, passed to the template as
        transformers passes them (``tools``); messages may carry ``tool_calls`` / ``tool_call_id``."""
        tok = self._need_tokenizer()
        if not getattr(tok, "chat_template", None):
            raise Dsv3Error("this tokenizer has no chat template; use raw completion")
        for i, m in enumerate(messages):
            if isinstance(m.get("content"), str):
                check_text(m["content"], f"message {i}'s content")
        ids = tok.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # a BatchEncoding when the tokenizer returns a dict
            ids = ids["input_ids"]
        return list(ids)

    def decode(self, ids: list[int]) -> str:
        return self._need_tokenizer().decode(ids, skip_special_tokens=True)

    def _need_tokenizer(self):
        if self.tokenizer is None:
            raise Dsv3Error(f"{self.path}: no tokenizer files in the checkpoint; pass token ids instead of text")
        return self.tokenizer

    @property
    def eos_ids(self) -> tuple[int, ...]:
        ids = set(self.cfg.eos_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return tuple(sorted(ids))

    # ----------------------------------------------------------------- generation
    def generate(
        self,
        prompts: list[str] | list[list[int]],
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        chat: bool | None = None,
        mtp: int = 0,
        logits: LogitsParams | None = None,
        stop_token_ids: Iterable[int] = (),
    ) -> list[Completion]:
        """Complete each prompt (text, or a list of token ids) and return one Completion per prompt.

        mtp: draft tokens per step for lossless speculative decoding with the checkpoint's MTP
        module (0: plain decoding); each Completion's ``mtp`` then holds its statistics.
        logits: penalties, logit_bias, top_k, min_p, min_tokens (:class:`LogitsParams`; None: none);
        stop_token_ids: ids that end a completion ("stop") besides the checkpoint's EOS ids.
        """
        check_mtp(self.model, mtp)
        if isinstance(prompts, (str, bytes)) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        ids = [self._prompt_ids(p, chat) for p in prompts]
        params = self._params(max_new_tokens, temperature, top_p, seed, logits, stop_token_ids)
        if getattr(self.model, "ep", None) is not None:  # --dp-attention: this rank's share, then all gathered
            return self._generate_dp(prompts, ids, params, mtp)
        out = collect(self._steps(ids, params, mtp), len(ids))
        rows = out.stats.get("mtp_rows") or [None] * len(ids)
        texts = [self.decode(o) if self.tokenizer is not None else "" for o in out.token_ids]
        return [
            Completion(p, t, o, r, m)
            for p, t, o, r, m in zip(prompts, texts, out.token_ids, out.finish_reasons, rows, strict=True)
        ]

    def _generate_dp(self, prompts: list, ids: list[list[int]], params: SamplingParams, mtp: int) -> list[Completion]:
        """Data-parallel generate: every rank holds every prompt; rank r completes its contiguous share
        (:func:`share`), then serves the other ranks' MoE layers with no tokens until all are done, and
        every rank returns every Completion (gathered as JSON, in prompt order).

        A failure on one rank (a Dsv3Error or any other exception) still lets the others finish, then
        is raised on every rank (the original there, a Dsv3Error naming the rank elsewhere).
        """
        par = self.model.opts.par
        check_lengths(self.model, ids, params.validate(self.cfg.vocab_size).max_new_tokens)  # same on every rank
        lo, hi = share(len(ids), par.rank, par.world_size)
        mine: list[dict] = []
        failure: BaseException | None = None
        try:
            if hi > lo:
                out = collect(self._steps(ids[lo:hi], params, mtp), hi - lo)
                rows = out.stats.get("mtp_rows") or [None] * (hi - lo)
                for o, r, m in zip(out.token_ids, out.finish_reasons, rows, strict=True):
                    text = self.decode(o) if self.tokenizer is not None else ""
                    mine.append({"text": text, "token_ids": o, "finish_reason": r, "mtp": m})
        except Exception as exc:  # the other ranks must not wait for this one's MoE layers forever
            failure = exc
        self.model.ep.idle()
        parts = par.all_gather_object({"error": f"{type(failure).__name__}: {failure}"} if failure else mine)
        if failure is not None:
            raise failure
        for r, part in enumerate(parts):
            if isinstance(part, dict):
                raise Dsv3Error(f"--dp-attention: rank {r} failed: {part['error']}")
        done = [c for part in parts for c in part]
        return [
            Completion(p, c["text"], c["token_ids"], c["finish_reason"], c["mtp"])
            for p, c in zip(prompts, done, strict=True)
        ]

    def stream(
        self,
        prompt: str | list[int],
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        chat: bool | None = None,
        mtp: int = 0,
        logits: LogitsParams | None = None,
        stop_token_ids: Iterable[int] = (),
    ) -> Generator[str, None, Completion]:
        """Complete one prompt like :meth:`generate`, yielding the text in pieces as tokens are decoded.

        Joined, the pieces are the text ``generate`` returns for the same arguments (for tokenizers that
        never rewrite earlier text; the Completion's ``text`` is always the whole decode): each step
        decodes its new tokens with a little context (``runtime.text.IncrementalDecoder``), holding
        back a trailing U+FFFD (a character whose bytes have not all arrived). With mtp > 0 each speculative step's accepted tokens come out
        together. The generator's return value (``completion = yield from engine.stream(...)``) is the
        :class:`Completion`. Arguments are checked, and the prompt encoded, when ``stream`` is called.
        """
        self._need_tokenizer()
        check_mtp(self.model, mtp)
        ids = self._prompt_ids(prompt, chat)
        params = self._params(max_new_tokens, temperature, top_p, seed, logits, stop_token_ids)
        return self._pieces(prompt, self._steps([ids], params, mtp))

    def _pieces(self, prompt: str | list[int], steps: Iterator[DecodeStep]) -> Generator[str, None, Completion]:
        tokens: list[int] = []
        decoder = IncrementalDecoder(self.decode)  # each step decodes a few tokens, not the whole reply
        for step in steps:
            tokens.extend(step.tokens[0])
            piece = decoder.add(step.tokens[0])
            if step.finish_reasons is not None:
                piece += decoder.flush()
            if piece:
                yield piece
            if step.finish_reasons is not None:
                mtp = (step.stats or {}).get("mtp_rows")
                text = self.decode(tokens)
                return Completion(prompt, text, tokens, step.finish_reasons[0], mtp[0] if mtp else None)
        raise RuntimeError("decode steps ended without finish reasons")  # a bug in the step generator

    def _prompt_ids(self, prompt: str | list[int], chat: bool | None) -> list[int]:
        return prompt if isinstance(prompt, list) else self.encode(prompt, chat)

    def _params(
        self,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        seed: int | None,
        logits: LogitsParams | None = None,
        stop_token_ids: Iterable[int] = (),
    ) -> SamplingParams:
        seed = agree_on_seed(self.model.opts.parallel, seed, temperature)  # same draws on every rank
        extra = tuple(stop_token_ids)
        return SamplingParams(max_new_tokens, temperature, top_p, seed, self.eos_ids, logits or LogitsParams(), extra)

    def _steps(self, ids: list[list[int]], params: SamplingParams, mtp: int) -> Iterator[DecodeStep]:
        """Plain or speculative decode steps (both end with finish reasons and stats)."""
        if mtp:
            return speculative_steps(self.model, ids, params, mtp)
        return generate_steps(self.model, ids, params, self.enforce_eager)

    @torch.inference_mode()
    def logits(self, token_ids: torch.Tensor | list[list[int]]) -> torch.Tensor:
        """Full-sequence logits: token_ids (B, T) int64 -> (B, T, V) float32 (no cache)."""
        return self.model.logits(self.model(self._checked_tokens(token_ids)))

    @torch.inference_mode()
    def logits_with_mtp(self, token_ids: torch.Tensor | list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """token_ids (B, T) int64 -> main logits (B, T, V) and the first MTP module's (B, T-1, V), float32.

        MTP entry t combines the main model's hidden state at t with token t+1 and predicts token t+2
        (the draft that speculative decoding makes). One main forward serves both.
        """
        if not len(self.model.mtp):
            raise Dsv3Error("checkpoint has no MTP layers (num_nextn_predict_layers=0)")
        tokens = self._checked_tokens(token_ids)
        hidden = self.model(tokens)  # (B, T, D)
        positions = torch.arange(tokens.shape[1] - 1, device=tokens.device).expand(tokens.shape[0], -1)
        mtp_hidden = self.model.mtp_forward(0, hidden[:, :-1], tokens[:, 1:], positions)  # (B, T-1, D)
        return self.model.logits(hidden), self.model.mtp[0].logits(mtp_hidden)

    def _checked_tokens(self, token_ids: torch.Tensor | list[list[int]]) -> torch.Tensor:
        """token_ids as (B, T) int64 on the model's device, within the vocabulary and the position limit."""
        tokens = torch.as_tensor(token_ids, dtype=torch.long, device=self.model.embed.device)
        if tokens.dim() == 1:
            tokens = tokens.unsqueeze(0)
        if tokens.shape[-1] > self.cfg.max_position_embeddings:
            raise Dsv3Error(
                f"{tokens.shape[-1]} tokens exceed the model's limit of {self.cfg.max_position_embeddings} positions "
                "(max_position_embeddings)"
            )
        if tokens.numel() and not 0 <= int(tokens.min()) <= int(tokens.max()) < self.cfg.vocab_size:
            raise Dsv3Error(f"token ids must lie in [0, {self.cfg.vocab_size}) (vocab_size)")
        return tokens
