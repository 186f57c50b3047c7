"""``dsv3 eval perplexity``: strided perplexity of a text file, and KL divergence / top-1 agreement against
a reference run (cpu_ref float32 by default), as quantizations are judged (see ``dsv3.tools.eval``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import registry
from ..errors import Dsv3Error
from ..model.config import ModelConfig
from ..runtime.loading import DTYPES
from ..weights import ACT_QUANT_MODES
from .model_args import add_model_args, load_from_args

#: config.json key: the window length (tokens) the checkpoint was trained on; ``--context``'s default.
TRAIN_CONTEXT_KEY = "dsv3_train_context"
#: ``--context``'s default when the checkpoint gives no training context: DeepSeek-V2/V3 were pre-trained
#: on 4096-token sequences (their configs' ``rope_scaling.original_max_position_embeddings``; the 128K
#: positions come from YaRN extension), and a window's float32 logits (batch x 4096 x vocab) stay in memory.
CONTEXT_CAP = 4096


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "eval",
        help="model-level numerics: perplexity, KL divergence against a reference",
        description="Judge a model's numerics on real text rather than operator by operator. One evaluation so "
        "far: `dsv3 eval perplexity --text-file FILE` scores a text file, and with --against or "
        "--against-ckpt-path compares every next-token distribution with a reference run (as a quantized "
        "checkpoint or a new backend is judged; see docs/model-numerics.md).",
    )
    evals = p.add_subparsers(dest="eval_command", required=True)
    ppl = evals.add_parser(
        "perplexity",
        help="perplexity of a text file; with --against, KL divergence and top-1 agreement with a reference run",
        description="Perplexity over --text-file in sliding windows (each window scores only the tokens no earlier "
        "window scored). With --against BACKEND and/or --against-ckpt-path DIR the same windows also run through a "
        "reference model (default cpu_ref in float32 on the same checkpoint) and the report adds, per scored "
        "position, KL(reference || test) of the next-token distributions (mean, median, 99th percentile, max), "
        "the share of positions whose most likely token is the same, and the perplexity ratio test / reference. "
        "--config, --act-quant and --weight-format apply to the model under test only.",
    )
    add_model_args(ppl)
    ppl.add_argument(
        "--text-file",
        required=True,
        action="append",
        help="UTF-8 text to score, tokenized raw after a BOS; repeat to score several files as one stream",
    )
    ppl.add_argument("--against", help="reference backend (default cpu_ref when --against-ckpt-path is given)")
    ppl.add_argument(
        "--against-ckpt-path",
        help="reference checkpoint (default: the same one), e.g. the BF16 original of a quantized copy",
    )
    ppl.add_argument("--against-dtype", choices=sorted(DTYPES), help="reference compute dtype (default float32)")
    ppl.add_argument(
        "--against-act-quant", choices=ACT_QUANT_MODES, help="reference activation quantization (default none)"
    )
    ppl.add_argument(
        "--context",
        type=int,
        help=f"window length in tokens (default: the checkpoint's training context, config.json {TRAIN_CONTEXT_KEY}; "
        f"without it, max_position_embeddings capped at {CONTEXT_CAP}, DeepSeek-V3's pre-training length)",
    )
    ppl.add_argument("--stride", type=int, help="step between windows (default context / 2)")
    ppl.add_argument("--max-tokens", type=int, help="score only the first N tokens of the file (BOS included)")
    ppl.add_argument("--batch", type=int, default=4, help="windows per forward pass")
    ppl.add_argument(
        "--mtp",
        action="store_true",
        help="also score the checkpoint's first MTP module (its t+2 predictions) and the greedy acceptance "
        "rate --mtp 1 speculative decoding would have along this text",
    )
    ppl.add_argument("--json", metavar="FILE", help="also write the report as JSON to FILE")
    ppl.add_argument("--no-progress", dest="progress", action="store_false", default=None, help="no progress bar")
    return p


def _read_text(path: str) -> str:
    if Path(path).exists() and not Path(path).is_file():  # reading a FIFO blocks for ever, a device never ends
        raise Dsv3Error(f"--text-file {path}: not a regular file")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise Dsv3Error(f"--text-file {path}: no such file") from None
    except UnicodeDecodeError as exc:
        raise Dsv3Error(f"--text-file {path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise Dsv3Error(f"--text-file {path}: cannot read ({exc.strerror})") from None
    if not text.strip():
        raise Dsv3Error(f"--text-file {path}: the file is empty")
    return text


def _encode(engine, text: str) -> list[int]:
    """BOS + the raw text's ids; the tokenizer's max-length warning is moot here (windows are cut later)."""
    tok = engine._need_tokenizer()
    saved = getattr(tok, "model_max_length", None)
    try:
        if saved is not None:
            tok.model_max_length = int(1e30)
        return engine.encode(text, chat=False)
    finally:
        if saved is not None:
            tok.model_max_length = saved


def describe(engine, backend: str, dtype: str, act_quant: str) -> str:
    """One line naming what ran: backend, compute dtype, weight formats, activation quantization, checkpoint."""
    from ..model.graph import Linear

    if not hasattr(engine.model, "modules"):  # a whole-graph backend (onnxruntime): no Linear modules to list
        return f"{backend} {dtype}, whole exported graph  ({engine.path})"
    fmts = sorted({m.fmt for m in engine.model.modules() if isinstance(m, Linear)})
    return f"{backend} {dtype}, weights {'+'.join(fmts)}, act-quant {act_quant}  ({engine.path})"


def default_context(cfg: ModelConfig, config_file: str) -> tuple[int, str]:
    """``--context``'s default for a model and where it comes from (for the report)."""
    max_pos = cfg.max_position_embeddings
    train = cfg.extra.get(TRAIN_CONTEXT_KEY)
    if train is not None:
        if isinstance(train, bool) or not isinstance(train, int) or not 2 <= train <= max_pos:
            raise Dsv3Error(
                f"{config_file}: {TRAIN_CONTEXT_KEY} {train!r} must be an integer in [2, {max_pos}] "
                "(max_position_embeddings)"
            )
        return train, f"the model's training context ({TRAIN_CONTEXT_KEY} in {config_file})"
    if max_pos <= CONTEXT_CAP:
        return max_pos, f"max_position_embeddings ({config_file} gives no {TRAIN_CONTEXT_KEY})"
    return CONTEXT_CAP, (
        f"max_position_embeddings {max_pos} capped at {CONTEXT_CAP}, DeepSeek-V3's pre-training length "
        f"({config_file} gives no {TRAIN_CONTEXT_KEY})"
    )


def context_and_source(args, cfg: ModelConfig, config_file: str) -> tuple[int, str]:
    """The window length to use and a phrase saying where it came from; a --context past the training
    context is said too, since perplexity beyond it measures what the model never learned."""
    default, why = default_context(cfg, config_file)
    if args.context is None:
        context, source = default, why
    else:
        context, source = args.context, "--context"
        train = cfg.extra.get(TRAIN_CONTEXT_KEY)
        if train is not None and context > train:
            source += f"; longer than the {train}-token training context, so perplexity is higher than trained"
    if context > cfg.max_position_embeddings:
        raise Dsv3Error(
            f"--context {context} exceeds the model's {cfg.max_position_embeddings} positions (max_position_embeddings)"
        )
    return context, source


def main(args) -> int:
    from ..runtime.loading import load
    from ..tools.eval import evaluate
    from ..tools.output_files import refuse_non_file, write_atomically

    has_ref = args.against is not None or args.against_ckpt_path is not None
    if not has_ref and (args.against_dtype is not None or args.against_act_quant is not None):
        raise Dsv3Error("--against-dtype/--against-act-quant need a reference: --against or --against-ckpt-path")
    if args.max_tokens is not None and args.max_tokens < 2:
        raise Dsv3Error(f"--max-tokens {args.max_tokens}: must be at least 2")
    if args.json and not Path(args.json).parent.exists():
        raise Dsv3Error(f"--json {args.json}: directory {Path(args.json).parent} does not exist")
    if args.json:
        refuse_non_file(Path(args.json))
    texts = [_read_text(f) for f in args.text_file]  # before the (slow) loads

    engine = load_from_args(args, progress=args.progress)
    if args.mtp and not len(engine.model.mtp):
        why = getattr(engine.model, "no_mtp_reason", f"{engine.path} has no MTP layers (num_nextn_predict_layers=0)")
        raise Dsv3Error(f"--mtp: {why}")
    context, context_source = context_and_source(
        args, engine.cfg, args.config or str(Path(engine.path) / "config.json")
    )
    stride = args.stride if args.stride is not None else max(1, context // 2)
    tokens = [t for text in texts for t in _encode(engine, text)]  # each file a document: BOS + its ids
    if args.max_tokens is not None:
        tokens = tokens[: args.max_tokens]
    setup = {
        "text_files": [str(f) for f in args.text_file],
        "tokens": len(tokens),
        "context_source": context_source,
        "test": describe(engine, args.backend, args.dtype, args.act_quant),
    }
    reference = None
    if has_ref:
        ref_backend = args.against or registry.REFERENCE
        ref_dtype = args.against_dtype or "float32"
        ref_act = args.against_act_quant or "none"
        ref = load(
            args.against_ckpt_path or engine.path,
            ref_backend,
            ref_dtype,
            args.attn_impl,
            ref_act,
            progress=args.progress,
        )
        if ref.cfg.vocab_size != engine.cfg.vocab_size:
            raise Dsv3Error(
                f"--against-ckpt-path {ref.path}: vocabulary of {ref.cfg.vocab_size} tokens, "
                f"the model under test has {engine.cfg.vocab_size}"
            )
        if ref.tokenizer is not None and ref.path != engine.path:
            ref_tokens = [t for text in texts for t in _encode(ref, text)]
            if ref_tokens[: len(tokens)] != tokens:
                raise Dsv3Error(f"--against-ckpt-path {ref.path}: its tokenizer splits the text differently")
        if args.mtp and not len(ref.model.mtp):
            raise Dsv3Error(f"--mtp: the reference {ref.path} has no MTP layers (num_nextn_predict_layers=0)")
        if context > ref.cfg.max_position_embeddings:
            raise Dsv3Error(
                f"context {context} ({context_source}) exceeds the reference's {ref.cfg.max_position_embeddings} "
                "positions; pass a shorter --context"
            )
        reference = ref.logits_with_mtp if args.mtp else ref.logits
        setup["reference"] = describe(ref, ref_backend, ref_dtype, ref_act)

    logits_fn = engine.logits_with_mtp if args.mtp else engine.logits
    report = evaluate(logits_fn, tokens, context, stride, reference, args.batch, args.progress, mtp=args.mtp)
    report.setup = setup
    names = [Path(f).name for f in args.text_file]
    print(f"dsv3 eval perplexity: {', '.join(names) if len(names) <= 3 else f'{len(names)} files'}", flush=True)
    print(report.format_text(), flush=True)
    if args.json:
        import json

        write_atomically(Path(args.json), json.dumps(report.to_dict(), indent=2) + "\n")
    return 0
