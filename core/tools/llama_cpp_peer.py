"""llama.cpp as a ``dsv3 bench`` peer (``--against llama.cpp``): the same checkpoint converted to GGUF at the
same dtype, run through llama-cpp-python's low-level API (``llama_batch`` / ``llama_decode``) on token ids.

Both optional pieces are found at run time, never shipped: the ``llama_cpp`` module (``pip install
llama-cpp-python``, which builds llama.cpp from source) and llama.cpp's ``convert_hf_to_gguf.py`` (in the
llama-cpp-python sdist under ``vendor/llama.cpp``; ``--llama-cpp-src`` or ``$DSV3_LLAMA_CPP_SRC``). The
converter writes a DeepSeek-V3 checkpoint as architecture ``deepseek2``.

The converter needs a tokenizer in the checkpoint directory; prompts here are token ids, so a byte-level BPE
test tokenizer is written into a staging directory of links to the checkpoint's files (the checkpoint itself is
not touched). Its pre-tokenizer is unknown to the converter's hash table, so the converter is run through a
wrapper that maps an unrecognised pre-tokenizer to ``"gpt-2"`` (its generic byte-level BPE): that only names
how text would be split, which no benchmark run does.

Generation mirrors dsv3's greedy loop: prefill all B prompts in one ``llama_decode`` (sequence r = row r, one
unified KV cache), argmax of the last logits, then one ``llama_decode`` of B tokens per step; TTFT is call to
first token, decode time first to last token, as for dsv3.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ..errors import Dsv3Error

NAME = "llama.cpp"
SRC_ENV = "DSV3_LLAMA_CPP_SRC"
INSTALL_HINT = "pip install llama-cpp-python (it builds llama.cpp from source, ~25 min on 2 cores)"
CONVERTER_HINT = (
    "pip download --no-deps --no-binary :all: llama-cpp-python -d DIR, unpack it, and pass --llama-cpp-src "
    f"DIR/llama_cpp_python-VERSION/vendor/llama.cpp (or set {SRC_ENV})"
)
#: GGUF --outtype for each compute dtype; bfloat16 falls back to f16 when llama.cpp refuses bf16.
OUTTYPES = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}
GGML_TYPES = {"f32": 0, "f16": 1, "bf16": 30}  # ggml_type ids of the KV cache, the same dtype as the weights

# Run inside the converter's interpreter: argv = [converter, model dir, out file, outtype].
_WRAPPER = """
import runpy, sys
converter = sys.argv[1]
sys.path.insert(0, str(__import__("pathlib").Path(converter).parent))
import conversion.base as base
original = base.TextModel.get_vocab_base_pre
def pre(self, tokenizer):
    try:
        return original(self, tokenizer)
    except NotImplementedError:  # dsv3's byte-level BPE test tokenizer: generic byte-level BPE
        return "gpt-2"
base.TextModel.get_vocab_base_pre = pre
sys.argv = [converter, sys.argv[2], "--outfile", sys.argv[3], "--outtype", sys.argv[4]]
runpy.run_path(converter, run_name="__main__")
"""


def need_llama_cpp():
    """The ``llama_cpp`` module, or a Dsv3Error saying how to install it."""
    try:
        import llama_cpp
    except ImportError as exc:
        raise Dsv3Error(f"--against llama.cpp needs llama-cpp-python ({exc}): {INSTALL_HINT}") from None
    return llama_cpp


def find_converter(src: str | Path | None = None) -> Path:
    """llama.cpp's ``convert_hf_to_gguf.py`` under ``src`` (else ``$DSV3_LLAMA_CPP_SRC``), or a Dsv3Error.

    ``src`` may be the llama.cpp directory or an unpacked llama-cpp-python sdist (``vendor/llama.cpp`` inside).
    """
    src = src or os.environ.get(SRC_ENV)
    if not src:
        raise Dsv3Error(f"--against llama.cpp needs llama.cpp's convert_hf_to_gguf.py: {CONVERTER_HINT}")
    base = Path(src)
    for candidate in (base / "convert_hf_to_gguf.py", base / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"):
        if candidate.is_file():
            return candidate
    raise Dsv3Error(
        f"--llama-cpp-src {src}: no convert_hf_to_gguf.py there (nor in vendor/llama.cpp): {CONVERTER_HINT}"
    )


def write_test_tokenizer(path: Path, vocab_size: int, bos_id: int = 0, eos_id: int = 1) -> None:
    """A byte-level BPE tokenizer (tokenizer.json + tokenizer_config.json) for the converter.

    ids ``bos_id`` and ``eos_id`` are ``<s>`` / ``</s>``, then the 256 byte symbols, then merges of lowercase
    letter pairs while ids last; the converter pads the rest of ``vocab_size`` with unused tokens.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 258:
        raise Dsv3Error(f"vocab_size {vocab_size}: a byte-level test tokenizer for llama.cpp needs at least 258 ids")
    specials = {bos_id: "<s>", eos_id: "</s>"}
    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    letters = "abcdefghijklmnopqrstuvwxyz"
    pairs = [(a, b) for a in letters for b in letters]
    vocab: dict[str, int] = {}
    free = (i for i in range(vocab_size) if i not in specials)
    for sym in symbols:
        vocab[sym] = next(free)
    merges = []
    for a, b in pairs:
        i = next(free, None)
        if i is None:
            break
        vocab[a + b] = i
        merges.append((a, b))
    for i, tok in specials.items():
        vocab[tok] = i
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(str(path))


def _staging(ckpt: Path, where: Path) -> Path:
    """A directory of links to the checkpoint's config and weights plus the test tokenizer."""
    stage = where / "hf"
    stage.mkdir(parents=True, exist_ok=True)
    for f in ckpt.iterdir():
        if f.suffix in (".safetensors", ".json") and not f.name.startswith("tokenizer"):
            link = stage / f.name
            if not link.exists():
                link.symlink_to(f.resolve())
    cfg = json.loads((ckpt / "config.json").read_text())
    eos = cfg.get("eos_token_id", 1)
    eos = eos[0] if isinstance(eos, list) else eos
    write_test_tokenizer(stage, cfg["vocab_size"], cfg.get("bos_token_id", 0) or 0, eos if eos is not None else 1)
    return stage


def convert_to_gguf(ckpt: Path, out: Path, outtype: str, converter: Path) -> Path:
    """Run llama.cpp's converter on ``ckpt`` into ``out`` (``outtype``: f32 / bf16 / f16); Dsv3Error on failure.

    Reuses ``out`` when it is newer than every checkpoint file.
    """
    newest = max(f.stat().st_mtime for f in ckpt.iterdir() if f.is_file())
    if out.is_file() and out.stat().st_mtime > newest:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="dsv3-gguf-") as tmp:
        stage = _staging(ckpt, Path(tmp))
        env = dict(os.environ)
        gguf_py = converter.parent / "gguf-py"
        if gguf_py.is_dir():  # the gguf package of the same llama.cpp version
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(gguf_py), env.get("PYTHONPATH")) if p)
        partial = out.with_name(out.name + ".partial")
        cmd = [sys.executable, "-c", _WRAPPER, str(converter), str(stage), str(partial), outtype]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0 or not partial.is_file():
            tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
            raise Dsv3Error(f"llama.cpp's converter failed on {ckpt} (--outtype {outtype}): {tail}")
        partial.replace(out)
    return out


class LlamaCppRunner:
    """llama.cpp on a GGUF file through llama-cpp-python's C API: greedy, token ids in and out."""

    name = NAME

    def __init__(self, gguf: Path, threads: int, kv_type: str, outtype: str):
        self.lc = lc = need_llama_cpp()
        self.gguf, self.threads, self.outtype = gguf, threads, outtype
        self.kv_type = GGML_TYPES[kv_type]
        lc.llama_backend_init()
        self._quiet = lc.llama_log_callback(lambda level, text, data: None)  # kept: C holds the pointer
        lc.llama_log_set(self._quiet, None)
        params = lc.llama_model_default_params()
        params.n_gpu_layers = 0
        self.model = lc.llama_model_load_from_file(str(gguf).encode(), params)
        if not self.model:
            raise Dsv3Error(f"llama.cpp could not load {gguf}")
        self.n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model))
        self._ctx = None  # (rows, positions per row, tokens per batch, ctx, batch)

    def _context(self, rows: int, positions: int, tokens: int):
        lc = self.lc
        have = self._ctx
        if have and have[0] == rows and have[1] >= positions and have[2] >= tokens:
            return have[3], have[4]
        self._free_context()
        p = lc.llama_context_default_params()
        per_row = -(-positions // 256) * 256
        p.n_ctx, p.n_seq_max, p.kv_unified = rows * per_row, rows, True
        p.n_batch = max(tokens, 512)
        p.n_threads = p.n_threads_batch = self.threads
        p.type_k = p.type_v = self.kv_type
        p.no_perf = True
        ctx = lc.llama_init_from_model(self.model, p)
        if not ctx:
            raise Dsv3Error(
                f"llama.cpp could not make a context ({rows} rows x {per_row} positions, KV {self.kv_type})"
            )
        batch = lc.llama_batch_init(p.n_batch, 0, rows)
        self._ctx = (rows, per_row, p.n_batch, ctx, batch)
        return ctx, batch

    def _free_context(self) -> None:
        if self._ctx:
            self.lc.llama_batch_free(self._ctx[4])
            self.lc.llama_free(self._ctx[3])
            self._ctx = None

    def close(self) -> None:
        self._free_context()
        if self.model:
            self.lc.llama_model_free(self.model)
            self.model = None

    def _decode(self, ctx, batch, rows: list[int], positions: list[int], tokens: list[int], out: list[bool]):
        """One llama_decode; the argmax of every output row's logits, in batch order."""
        import numpy as np

        lc = self.lc
        n = len(tokens)
        for i in range(n):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = tokens[i], positions[i], 1
            batch.seq_id[i][0], batch.logits[i] = rows[i], out[i]
        batch.n_tokens = n
        if lc.llama_decode(ctx, batch) != 0:
            raise Dsv3Error(f"llama.cpp: llama_decode failed on a batch of {n} tokens")
        k = sum(out)
        logits = np.ctypeslib.as_array(lc.llama_get_logits(ctx), shape=(k, self.n_vocab))
        return logits.argmax(axis=1).tolist()

    def generate(self, prompts: torch.Tensor, n: int, mtp: int = 0) -> tuple[list[list[int]], dict]:
        """prompts (B, L) int64 -> (B lists of exactly n greedy token ids, {"ttft_s", "decode_s"})."""
        b, length = prompts.shape
        ctx, batch = self._context(b, length + n, b * length)
        self.lc.llama_memory_clear(self.lc.llama_get_memory(ctx), True)
        ids = prompts.tolist()
        start = time.perf_counter()
        flat = [t for row in ids for t in row]
        rows = [r for r in range(b) for _ in range(length)]
        pos = list(range(length)) * b
        last = [p == length - 1 for p in pos]
        nxt = self._decode(ctx, batch, rows, pos, flat, last)
        first = time.perf_counter()
        out = [[t] for t in nxt]
        every, all_out = list(range(b)), [True] * b
        for step in range(n - 1):
            nxt = self._decode(ctx, batch, every, [length + step] * b, nxt, all_out)
            for row, t in zip(out, nxt, strict=True):
                row.append(t)
        end = time.perf_counter()
        return out, {"ttft_s": first - start, "decode_s": end - first}

    def weights(self) -> dict:
        """Bytes of the GGUF file (weights + metadata + vocab)."""
        return {"bytes": self.gguf.stat().st_size, "gguf": str(self.gguf), "outtype": self.outtype}


def load_llama_cpp(
    ckpt: Path, dtype: torch.dtype, threads: int, src: str | Path | None, gguf_dir: Path | None, log
) -> tuple[LlamaCppRunner, dict]:
    """Convert ``ckpt`` at ``dtype`` and load it: (runner, notes). Missing pieces are one-line Dsv3Errors.

    bfloat16: a GGUF in bf16 with a bf16 KV cache; if llama.cpp refuses it (conversion, load or context),
    f16 instead, and ``notes["fallback"]`` says why.
    """
    need_llama_cpp()
    converter = find_converter(src)
    if dtype not in OUTTYPES:
        raise Dsv3Error(f"--against llama.cpp: no GGUF type for dtype {dtype}; use float32 or bfloat16")
    tmp = None
    if gguf_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="dsv3-gguf-out-")
        gguf_dir = Path(tmp.name)
    outtypes = [OUTTYPES[dtype]] + (["f16"] if dtype == torch.bfloat16 else [])
    notes: dict = {"converter": str(converter)}
    last_error = None
    for outtype in outtypes:
        try:
            log(f"converting {ckpt} to GGUF ({outtype}) ...")
            t = time.perf_counter()
            gguf = convert_to_gguf(ckpt, Path(gguf_dir) / f"{ckpt.name}-{outtype}.gguf", outtype, converter)
            notes["convert_s"] = round(time.perf_counter() - t, 1)
            runner = LlamaCppRunner(gguf, threads, outtype, outtype)
            runner.generate(torch.zeros(1, 2, dtype=torch.long), 2)  # a context and one step work
        except Dsv3Error as exc:
            last_error = exc
            continue
        if outtype != outtypes[0]:
            notes["fallback"] = f"{outtypes[0]} refused ({last_error}); ran {outtype}"
        notes.update(gguf=str(gguf), outtype=outtype, kv_cache_type=outtype)
        runner._tmp = tmp  # the GGUF's temporary directory lives as long as the runner
        return runner, notes
    raise last_error
