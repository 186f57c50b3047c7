"""``dsv3 bench``: prefill/decode speed, time to first token, KV-cache and weight memory, MTP gains per batch size.

Optionally side by side with transformers on the same checkpoint and dtype (``--against transformers``).
Prints a table; ``--json FILE`` writes every figure; ``--plot-dir DIR`` writes PNG plots (needs matplotlib).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from .. import registry
from ..errors import Dsv3Error
from ..tools.bench import (
    PEERS,
    BenchSettings,
    check_settings,
    format_report,
    need_matplotlib,
    run_bench,
    write_json,
    write_plots,
)
from ..tools.llama_cpp_peer import find_converter, need_llama_cpp
from ..tools.output_files import refuse_non_file
from ..tools.random_checkpoint import make_random_checkpoint
from .model_args import add_model_args, load_from_args


def _ints(text: str, flag: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise Dsv3Error(f"{flag} takes comma-separated integers, got {text!r}") from None


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "bench",
        help="measure speed and memory (optionally against transformers or llama.cpp)",
        description="Time the model on random prompt tokens: time to first token and prefill speed at batch 1 "
        "for each --prompt-lens, decode speed for each --batch-sizes (prompts of --decode-prompt-len tokens, "
        "--decode-tokens new tokens per row, the first token's time excluded), MTP speculative decoding against "
        "plain decoding at each batch size, KV-cache bytes per token and weight bytes. Each figure is the median "
        "[min-max] of --repeats timed runs after --warmup untimed ones and is printed with what it measured. "
        "--json FILE keeps every figure; --plot-dir DIR draws PNG plots (needs the bench extra: pip install "
        "'dsv3[bench]'); --against transformers runs the same measurements on transformers' implementation, "
        "--against llama.cpp on llama.cpp (llama-cpp-python) with the checkpoint converted to GGUF at the same "
        "dtype; --random CONFIG benches random weights of a config (e.g. bench-full-width). "
        "Whole-graph backends (onnxruntime) are refused (see docs/benchmarks.md).",
    )
    add_model_args(p)
    p.add_argument("--prompt-lens", default="16,64,256", help="prompt lengths for prefill/TTFT (batch 1)")
    p.add_argument(
        "--batch-sizes", default="1,8,32", help="batch sizes for decode speed and MTP (at --decode-prompt-len)"
    )
    p.add_argument("--decode-tokens", type=int, default=32, help="tokens generated per decode run")
    p.add_argument("--decode-prompt-len", type=int, default=64, help="prompt length of the batch-size and MTP runs")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per figure (min/median/max)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before them")
    p.add_argument(
        "--mtp",
        default="1,2",
        help="MTP draft counts to measure at every batch size, each against plain decoding timed in the same "
        "turns (0: plain decoding, always measured; --mtp 0: no MTP; skipped without MTP layers)",
    )
    p.add_argument("--against", choices=PEERS, help="also measure this implementation on the same checkpoint")
    p.add_argument(
        "--llama-cpp-src",
        default=None,
        help="--against llama.cpp: llama.cpp's source directory holding convert_hf_to_gguf.py (the llama-cpp-python "
        "sdist's vendor/llama.cpp; default $DSV3_LLAMA_CPP_SRC)",
    )
    p.add_argument(
        "--gguf-dir", default=None, help="--against llama.cpp: keep (and reuse) the converted GGUF here (default: temp)"
    )
    p.add_argument(
        "--random",
        metavar="CONFIG",
        default=None,
        help="bench a random-weight checkpoint of this config (a file, or a dsv3.configs name such as bench-mid or "
        "bench-full-width) instead of --ckpt-path; stored in --dtype",
    )
    p.add_argument(
        "--random-dir", default=None, help="--random: write (and reuse) the checkpoint here (default: a temp directory)"
    )
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompt token ids")
    p.add_argument("--json", help="write every figure to this JSON file")
    p.add_argument("--plot-dir", help="write PNG plots into this directory (needs matplotlib)")
    return p


def _check_not_whole_graph(name: str) -> None:
    """A whole-graph backend (e.g. onnxruntime) has no dsv3 model to take apart."""
    info = getattr(registry.discover().get(name), "info", None)
    if info is not None and info.whole_model is not None:
        raise Dsv3Error(
            f"--backend {name}: this backend runs a whole exported graph, which dsv3 bench cannot measure (it "
            "reads dsv3's own model: its KV cache, weight bytes, MTP modules); time it with dsv3 run --backend "
            f"{name}, or for onnxruntime with python -m dsv3.backends.onnxruntime.bench"
        )


def main(args) -> int:
    settings = BenchSettings(
        prompt_lens=_ints(args.prompt_lens, "--prompt-lens"),
        batch_sizes=_ints(args.batch_sizes, "--batch-sizes"),
        decode_tokens=args.decode_tokens,
        decode_prompt_len=args.decode_prompt_len,
        repeats=args.repeats,
        warmup=args.warmup,
        mtp=_ints(args.mtp, "--mtp"),
        seed=args.seed,
    )
    # everything that can fail fast does, before minutes of measuring
    check_settings(settings)
    if args.plot_dir:
        need_matplotlib()
    if args.json and not Path(args.json).resolve().parent.is_dir():
        raise Dsv3Error(f"--json {args.json}: directory {Path(args.json).resolve().parent} does not exist")
    if args.json:
        refuse_non_file(Path(args.json))
    _check_not_whole_graph(args.backend)
    if args.threads is not None:
        if args.threads < 1:
            raise Dsv3Error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    if args.against == "llama.cpp":  # fail before minutes of loading and converting
        need_llama_cpp()
        find_converter(args.llama_cpp_src)
    tmp = None
    if args.random:
        if args.ckpt_path:
            raise Dsv3Error("--random CONFIG makes its own checkpoint: give --random or --ckpt-path, not both")
        if args.random_dir is None:
            tmp = tempfile.TemporaryDirectory(prefix="dsv3-random-")
        where = Path(args.random_dir or tmp.name)
        print(f"dsv3: random checkpoint of {args.random} in {where} ...", file=sys.stderr)
        args.ckpt_path = str(make_random_checkpoint(args.random, where, args.dtype))
    try:
        engine = load_from_args(args, progress=False)
        result = run_bench(
            engine,
            settings,
            backend=args.backend,
            against=args.against,
            llama_cpp_src=args.llama_cpp_src,
            gguf_dir=args.gguf_dir,
        )
    finally:
        if tmp is not None:
            tmp.cleanup()
    print(format_report(result), flush=True)
    if args.json:
        print(f"dsv3: wrote {write_json(result, args.json)}", file=sys.stderr)
    if args.plot_dir:
        for path in write_plots(result, args.plot_dir):
            print(f"dsv3: wrote {path}", file=sys.stderr)
    return 0
