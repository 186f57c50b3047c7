"""``dsv3 run``: complete prompts (one, a file of them, or interactively) on a chosen backend."""

from __future__ import annotations

import argparse
import dataclasses
import json
import select
import sys
import time
from collections.abc import Generator
from pathlib import Path

from ..errors import Dsv3Error
from ..model.parallel import ParallelContext
from ..runtime.distributed import init_for_backend, quiet_unless_rank0
from ..runtime.engine import Completion
from ..runtime.generate import SamplingError, SamplingParams
from ..runtime.logits_processing import LogitsParams
from ..runtime.speculative import check_mtp, summarize, summary_line
from ..runtime.text import check_text
from .model_args import add_model_args, load_from_args


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "run",
        help="generate text from prompts",
        description="Complete prompts with a DeepSeek-V3-class model (without --ckpt-path, the small model "
        "shipped inside dsv3) on any installed backend: one or more --prompt, an --input-file with one prompt per "
        "line, or --interactive for a chat on the terminal. Completions go to stdout (--output-format jsonl: one "
        "JSON object per prompt with prompt, completion, token_ids, finish_reason and, with --mtp, the "
        "speculative-decoding counters); the token count and speed go to stderr. Started under torchrun, the "
        "model is split over the processes (docs/parallel.md).",
    )
    add_model_args(p)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", action="append", help="a prompt (repeat for a batch)")
    src.add_argument("--input-file", help="file with one prompt per line (batch completion)")
    src.add_argument(
        "--interactive",
        action="store_true",
        help="chat on the terminal, replies shown as they are decoded (/help, /clear, /exit; Ctrl-C stops a reply)",
    )
    p.add_argument("--max-new-tokens", type=int, default=200, help="most tokens generated per prompt")
    p.add_argument("--temperature", type=float, default=0.2, help="sampling temperature; 0 is greedy")
    p.add_argument(
        "--top-p",
        type=float,
        default=1.0,
        help="nucleus sampling: draw only from the most likely tokens whose probabilities add up to this (1: all)",
    )
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    g = p.add_argument_group("logits processing (as the server's request fields; defaults: off)")
    g.add_argument("--presence-penalty", type=float, default=0.0, help="subtracted once from a generated token [-2, 2]")
    g.add_argument(
        "--frequency-penalty", type=float, default=0.0, help="subtracted per occurrence among generated tokens [-2, 2]"
    )
    g.add_argument(
        "--repetition-penalty",
        type=float,
        default=1.0,
        help="divides positive (multiplies negative) logits of prompt and generated tokens [0.01, 100]",
    )
    g.add_argument("--logit-bias", nargs="+", default=[], metavar="ID=BIAS", help="add BIAS [-100, 100] to token ID")
    g.add_argument("--top-k", type=int, default=0, help="sample from the K most likely tokens only (0 or -1: all)")
    g.add_argument("--min-p", type=float, default=0.0, help="drop tokens less likely than this times the best [0, 1]")
    g.add_argument("--min-tokens", type=int, default=0, help="no stop token before this many tokens")
    g.add_argument("--stop-token-ids", nargs="+", type=int, default=[], metavar="ID", help="more ids that end a reply")
    p.add_argument(
        "--output-format",
        choices=("text", "jsonl"),
        default="text",
        help="text: the completions as plain text; jsonl: one JSON object per prompt",
    )
    p.add_argument(
        "--mtp",
        type=int,
        default=0,
        metavar="K",
        help="speculative decoding: K draft tokens per step from the MTP module (0: off)",
    )
    p.add_argument(
        "--dp-attention",
        action="store_true",
        help="under torchrun: data-parallel attention + expert parallelism: every rank holds all but the routed "
        "experts, completes its share of the prompts over its own cache, and sends tokens to their experts' ranks "
        "(all-to-all); default: tensor parallelism (docs/parallel.md)",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--chat",
        dest="chat",
        action="store_true",
        default=None,
        help="force the chat template (default: used when the tokenizer has one, unless config.json sets "
        "dsv3_default_prompt to raw, as the embedded model's does)",
    )
    mode.add_argument("--raw", dest="chat", action="store_false", help="force raw completion (no chat template)")
    return p


def _check_args(args) -> None:
    try:
        processing = _processing(args)
        SamplingParams(args.max_new_tokens, args.temperature, args.top_p, args.seed, (), **processing).validate()
    except SamplingError as exc:
        reason = exc.reason.replace("max_tokens", "--max-new-tokens") if exc.param == "min_tokens" else exc.reason
        raise Dsv3Error(f"--{exc.param.replace('_', '-')} {reason}") from None
    if args.mtp < 0:
        raise Dsv3Error("--mtp must be >= 0 (draft tokens per step)")


def _read_text_file(path: Path) -> str:
    """A prompt file's text: UTF-8 (a leading BOM dropped); one line naming the fault otherwise."""
    if not path.exists():
        raise Dsv3Error(f"{path}: input file not found")
    if not path.is_file():
        raise Dsv3Error(f"{path}: not a regular file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise Dsv3Error(f"{path}: cannot read it ({exc.strerror or exc})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise Dsv3Error(f"{path}: not UTF-8 text (byte 0x{data[exc.start]:02x} on line {line})") from None


def _read_prompts(args) -> list[str]:
    if args.input_file:
        path = Path(args.input_file)
        prompts = [line for line in _read_text_file(path).splitlines() if line.strip()]
        if not prompts:
            raise Dsv3Error(f"{path}: no prompts in the file")
        return prompts
    if args.prompt:
        many = len(args.prompt) > 1
        return [check_text(p, f"--prompt #{i + 1}" if many else "--prompt") for i, p in enumerate(args.prompt)]
    raise Dsv3Error("give --prompt TEXT, --input-file FILE or --interactive")


def main(args) -> int:
    _check_args(args)
    parallel = init_for_backend(args.backend)  # several processes under torchrun (WORLD_SIZE > 1)
    if getattr(args, "dp_attention", False):
        if not parallel.distributed:
            raise Dsv3Error("--dp-attention needs several processes: launch dsv3 run under torchrun (WORLD_SIZE > 1)")
        parallel = dataclasses.replace(parallel, dp_attention=True)
    try:
        with quiet_unless_rank0(parallel):
            return _main(args, parallel)
    finally:
        parallel.close()


def _main(args, parallel: ParallelContext) -> int:
    prompts = None if args.interactive else parallel.on_rank0(lambda: _read_prompts(args))
    engine = load_from_args(args, parallel)
    check_mtp(engine.model, args.mtp)  # before the first prompt, in interactive mode too
    if args.interactive:
        return _interactive(engine, args, parallel)
    start = time.perf_counter()
    streaming = _streams_one(args, parallel)
    if streaming:
        stream = engine.stream(prompts[0], *_sampling(args), chat=args.chat, mtp=args.mtp, **_processing(args))
        results = [_show_stream(stream)]
    else:
        results = engine.generate(prompts, *_sampling(args), chat=args.chat, mtp=args.mtp, **_processing(args))
    elapsed = time.perf_counter() - start
    if not streaming:
        _print_results(results, args.output_format)
    n = sum(len(r.token_ids) for r in results)
    print(f"dsv3: {n} tokens in {elapsed:.2f} s ({n / max(elapsed, 1e-9):.1f} tokens/s)", file=sys.stderr)
    if args.mtp:
        print(summary_line(summarize([r.mtp for r in results], n, elapsed)), file=sys.stderr)
    return 0


def _print_results(results: list[Completion], output_format: str) -> None:
    for r in results:
        if output_format == "jsonl":
            record = {
                "prompt": r.prompt,
                "completion": r.text,
                "token_ids": r.token_ids,
                "finish_reason": r.finish_reason,
            }
            if r.mtp is not None:
                record["mtp"] = r.mtp
            print(json.dumps(record, ensure_ascii=False), flush=True)
        elif len(results) == 1:
            print(r.text, flush=True)
        else:
            print(f"Prompt: {r.prompt}\nCompletion: {r.text}\n", flush=True)


def _sampling(args) -> tuple[int, float, float, int | None]:
    return args.max_new_tokens, args.temperature, args.top_p, args.seed


def _processing(args) -> dict:
    """Engine.generate / stream's ``logits`` and ``stop_token_ids`` from the flags (SamplingError when malformed)."""
    bias = {}
    for item in args.logit_bias:
        tok, sep, value = item.partition("=")
        try:
            bias[int(tok)] = float(value)
        except ValueError:
            raise SamplingError("logit_bias", f"takes ID=BIAS pairs, e.g. 42=-5 (got {item!r})") from None
        if not sep:
            raise SamplingError("logit_bias", f"takes ID=BIAS pairs, e.g. 42=-5 (got {item!r})")
    logits = LogitsParams(
        args.presence_penalty,
        args.frequency_penalty,
        args.repetition_penalty,
        bias,
        args.top_k,
        args.min_p,
        args.min_tokens,
    )
    return {"logits": logits, "stop_token_ids": tuple(args.stop_token_ids)}


def _streams_one(args, parallel: ParallelContext) -> bool:
    """One --prompt, text output, to a terminal, in one process: show the completion as it is decoded.

    Under torchrun every rank keeps to engine.generate (only rank 0's stdout is a terminal)."""
    one = bool(args.prompt) and len(args.prompt) == 1 and args.output_format == "text"
    return one and not parallel.distributed and _isatty(sys.stdout)


def _isatty(stream) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def _show_stream(pieces: Generator[str, None, Completion]) -> Completion:
    """Write each piece to stdout as it comes (the line is ended after it); return the Completion."""
    while True:
        try:
            piece = next(pieces)
        except StopIteration as end:
            print(flush=True)
            return end.value
        sys.stdout.write(piece)
        sys.stdout.flush()


def _note(text: str) -> None:
    """A line about the session (not model text) on stderr, so stdout holds only the replies."""
    print(text, file=sys.stderr, flush=True)


HELP = """commands:
  /help   this list
  /clear  forget the conversation so far
  /exit   leave (Ctrl-D too; Ctrl-C at the prompt too)
Ctrl-C while a reply is written stops that reply."""


def _read_line(parallel: ParallelContext) -> str | None:
    """One line from the terminal, read on rank 0 and broadcast to every rank; None at end of input
    (Ctrl-D) or at Ctrl-C."""

    def read() -> str | None:
        try:
            if _isatty(sys.stdin):
                print(">>> ", end="", flush=True)
                # wait here, not in input(): a Ctrl-C that lands just before input() blocks in read()
                # would only be acted on after the next line; this loop sees it within 0.2 s
                while not select.select([sys.stdin], [], [], 0.2)[0]:
                    pass
                return input()
            return input(">>> ")
        except (EOFError, KeyboardInterrupt):
            print(flush=True)
            return None

    return parallel.on_rank0(read)


def _interactive(engine, args, parallel: ParallelContext | None = None) -> int:
    parallel = parallel or ParallelContext()
    engine._need_tokenizer()
    chat = engine.default_chat() if args.chat is None else args.chat
    # several processes must decode in step: a reply stopped on one rank alone would leave the others
    # waiting in a collective, so under torchrun replies are printed whole and Ctrl-C ends the run
    stream = not parallel.distributed
    if hasattr(sys.stdin, "reconfigure"):  # a line that is not UTF-8 is refused by check_text, not by input()
        sys.stdin.reconfigure(errors="surrogateescape")
    if _isatty(sys.stdin):
        _note("dsv3: type a message; /help lists the commands")
    messages: list[dict] = []
    while True:
        line = _read_line(parallel)
        if line is None or line.strip() == "/exit":
            return 0
        if line.strip() == "/clear":
            messages.clear()
            _note("(conversation cleared)")
            continue
        if line.strip() == "/help":
            _note(HELP)
            continue
        if not line.strip():
            continue
        turn = [*messages, {"role": "user", "content": line}]
        try:
            check_text(line, "that line")
            ids = engine.encode_chat(turn) if chat else engine.encode(line, chat=False)
            if stream:
                text = _reply(engine.stream(ids, *_sampling(args), mtp=args.mtp, **_processing(args)))
            else:
                text = engine.generate([ids], *_sampling(args), mtp=args.mtp, **_processing(args))[0].text
                print(text, flush=True)
        except Dsv3Error as exc:  # e.g. the conversation outgrew the context: say so, keep the session
            print(f"dsv3: error: {exc}", file=sys.stderr)
            continue
        except KeyboardInterrupt:  # while the prompt was being encoded (before any reply): keep the session
            if not stream:
                raise
            print(flush=True)
            _note("(stopped)")
            continue
        if chat:
            messages = [*turn, {"role": "assistant", "content": text}]


def _reply(pieces: Generator[str, None, Completion]) -> str:
    """Stream one reply to stdout and return its text; Ctrl-C stops it there (what was shown stays the reply)."""
    shown: list[str] = []
    try:
        while True:
            try:
                piece = next(pieces)
            except StopIteration as done:  # the generator's return value: the Completion
                print(flush=True)
                return done.value.text
            shown.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
    except KeyboardInterrupt:
        pieces.close()
        print(flush=True)
        _note("(stopped)")
    except Dsv3Error:
        if shown:
            print(flush=True)
        raise
    return "".join(shown)
