"""The Python API: ``dsv3.load(path, backend=...)`` and the Engine it returns."""

from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from . import registry
from .checkpoint import (
    CheckpointFiles,
    apply_scale_fmt_and_prepare,
    check_layers_present,
    format_of_checkpoint,
    inside_checkpoint,
    load_weights,
    share_mtp_duplicates,
)
from .config import ModelConfig, load_config, read_file_bytes
from .errors import Dsv3Error
from .generate import SamplingParams, generate
from .model import ATTN_IMPLS, BuildOptions, Transformer
from .parallel import ParallelContext, agree_on_seed, check_layout
from .speculative import check_mtp, generate_speculative
from .text import check_text
from .weights import ACT_QUANT_MODES, HP

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


@dataclass
class Completion:
    """One prompt's result: the generated text and token ids (prompt excluded)."""

    prompt: str | list[int]
    text: str
    token_ids: list[int]
    finish_reason: str
    mtp: dict | None = None  # speculative-decoding statistics of this row (generate(..., mtp=K))


def embedded_model_path() -> Path | None:
    """The small model shipped inside the package, if this installation has it."""
    from importlib.resources import files

    try:
        path = Path(str(files("dsv3") / "embedded" / "tiny-dsv3"))
    except ModuleNotFoundError:
        return None
    return path if (path / "config.json").exists() else None


def _dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise Dsv3Error(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def build_model(
    cfg: ModelConfig,
    backend: str = registry.REFERENCE,
    dtype: str | torch.dtype = "float32",
    attn_impl: str = "absorb",
    act_quant: str = "none",
    formats: tuple[str, ...] = (HP,),
    fmt_of=None,
    device: str | None = None,
    parallel: ParallelContext | None = None,
) -> Transformer:
    """Instantiate a model (uninitialised weights) with the backend's operators resolved once.

    parallel: build only this rank's part (``dsv3.parallel``); an impossible split is a Dsv3Error here.
    """
    if attn_impl not in ATTN_IMPLS:
        raise Dsv3Error(f"unknown attention form {attn_impl!r}; choose one of {', '.join(ATTN_IMPLS)}")
    if act_quant not in ACT_QUANT_MODES:
        raise Dsv3Error(f"unknown --act-quant {act_quant!r}; choose one of {', '.join(ACT_QUANT_MODES)}")
    backends = registry.discover()
    chosen = registry.get_backend(backend, backends)
    torch_dtype = _dtype(dtype)
    if parallel is not None:
        check_layout(cfg, parallel.world_size, fmt_of)
    ops = registry.resolve_ops(chosen, formats, act_quant, torch_dtype, backends[registry.REFERENCE])
    opts = BuildOptions(torch_dtype, device or chosen.info.device, attn_impl, fmt_of, parallel)
    model = Transformer(cfg, ops, opts)
    model.backend_info = chosen.info
    return model


class Engine:
    """A loaded model, its tokenizer (if the checkpoint has one) and generation."""

    def __init__(self, model: Transformer, tokenizer=None, path: Path | None = None):
        self.model, self.tokenizer, self.path = model, tokenizer, path
        self.cfg = model.cfg

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
            if not getattr(tok, "chat_template", None):
                raise Dsv3Error("this tokenizer has no chat template; use raw completion")
            ids = tok.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
            )
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
            return list(ids)
        ids = tok.encode(prompt, add_special_tokens=False)
        if tok.bos_token_id is not None:
            ids = [tok.bos_token_id] + ids
        return ids

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
    ) -> list[Completion]:
        """Complete each prompt (text, or a list of token ids) and return one Completion per prompt.

        mtp: draft tokens per step for lossless speculative decoding with the checkpoint's MTP
        module (0: plain decoding); each Completion's ``mtp`` then holds its statistics.
        """
        check_mtp(self.model, mtp)
        if isinstance(prompts, (str, bytes)) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        ids = [p if isinstance(p, list) else self.encode(p, chat) for p in prompts]
        seed = agree_on_seed(self.model.opts.parallel, seed, temperature)  # same draws on every rank
        params = SamplingParams(max_new_tokens, temperature, top_p, seed, self.eos_ids)
        out = generate_speculative(self.model, ids, params, mtp) if mtp else generate(self.model, ids, params)
        rows = out.stats.get("mtp_rows") or [None] * len(ids)
        texts = [self.decode(o) if self.tokenizer is not None else "" for o in out.token_ids]
        return [
            Completion(p, t, o, r, m)
            for p, t, o, r, m in zip(prompts, texts, out.token_ids, out.finish_reasons, rows, strict=True)
        ]

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


def load(
    ckpt_path: str | Path | None = None,
    backend: str = registry.REFERENCE,
    dtype: str | torch.dtype = "bfloat16",
    attn_impl: str = "absorb",
    act_quant: str = "none",
    config: str | Path | None = None,
    progress: bool | None = None,
    weight_format: str | None = None,
    parallel: ParallelContext | None = None,
) -> Engine:
    """Load a Hugging Face-format DeepSeek-V2/V3 checkpoint directory (default: the embedded model).

    config: optional JSON/YAML config overriding the directory's config.json.
    weight_format: the format to hold the checkpoint's quantized linears in, for a backend that
        converts them at load (``BackendInfo.convert_formats``, e.g. ascend: fp8_block -> hp or
        int8_w8a8); None takes the backend's default. Nothing converted is written to disk.
    parallel: this process's rank and world (``dsv3.parallel.init_from_env``): each rank reads and
        holds only its part of the weights; only rank 0 shows a progress bar.
    """
    if ckpt_path is None:
        ckpt_path = embedded_model_path()
        if ckpt_path is None:
            raise Dsv3Error("no --ckpt-path given and this installation has no embedded model")
    path = Path(ckpt_path)
    whole_model = registry.get_backend(backend).info.extra.get("whole_model")
    if whole_model is not None:  # a backend that runs whole exported graphs (onnxruntime), no operator table
        kw = dict(dtype=dtype, attn_impl=attn_impl, act_quant=act_quant, config=config, weight_format=weight_format)
        return Engine(whole_model(path, **kw, parallel=parallel, progress=progress), _load_tokenizer(path), path)
    files = CheckpointFiles(path)
    cfg = load_config(config if config is not None else inside_checkpoint(path, "config.json"))
    cfg = drop_absent_mtp(cfg, files)
    check_layers_present(files, cfg)  # before building: the config alone does not decide the model's size
    fmt_of, quant_suffix = format_of_checkpoint(files, cfg)
    if parallel is not None:  # before any weight is read; fp8 splits are checked as stored
        check_layout(cfg, parallel.world_size, fmt_of)
        progress = False if parallel.rank else progress
    src_fmt = HP if cfg.quantization is None else fmt_of_quantized(cfg)
    dst_fmt = conversion_target(registry.get_backend(backend).info, src_fmt, weight_format, path)
    converted: dict[str, tuple[str, str]] = {}  # filled while the model is built
    if dst_fmt != src_fmt:
        fmt_of = _converting(fmt_of, src_fmt, dst_fmt, converted)
    formats = tuple(dict.fromkeys((HP, dst_fmt)))
    model = build_model(cfg, backend, dtype, attn_impl, act_quant, formats, fmt_of, device="meta", parallel=parallel)
    device = model.backend_info.device
    convert = model.backend_info.convert_weight
    load_weights(
        model, files, cfg, quant_suffix, device, _dtype(dtype), progress, converted, convert, parallel=parallel
    )
    model.opts = dataclasses.replace(model.opts, device=device, fmt_of=fmt_of)
    scale_fmt = cfg.quantization.scale_fmt if cfg.quantization else None
    apply_scale_fmt_and_prepare(model, scale_fmt, model.backend_info.prepare_weight)
    share_mtp_duplicates(model)
    model.eval()
    if model.ops.fallbacks and model.ops.backend != registry.REFERENCE and not (parallel and parallel.rank):
        print(
            f"dsv3: backend {model.ops.backend} falls back to cpu_ref for: {', '.join(model.ops.fallbacks)}",
            file=sys.stderr,
        )
    return Engine(model, _load_tokenizer(path), path)


def conversion_target(info, src_fmt: str, requested: str | None, where: Path) -> str:
    """The format the model holds the checkpoint's ``src_fmt`` linears in on this backend.

    A backend converts what it lists in ``convert_formats`` (default: the first target); what it
    does not list it holds as stored. A request it cannot honour is a Dsv3Error.
    """
    allowed = tuple(info.convert_formats.get(src_fmt, ()))
    if requested is None:
        return allowed[0] if allowed else src_fmt
    if requested in allowed or (requested == src_fmt and not allowed):
        return requested
    if src_fmt == HP:
        raise Dsv3Error(f"weight format {requested!r}: {where} has no quantized weights to convert")
    choices = " or ".join(allowed) if allowed else f"{src_fmt} (as stored)"
    raise Dsv3Error(
        f"weight format {requested!r} is not available: backend {info.name} runs the {src_fmt} weights "
        f"of {where} as {choices}"
    )


def _converting(fmt_of, src_fmt: str, dst_fmt: str, record: dict[str, tuple[str, str]]):
    """Wrap ``fmt_of`` so ``src_fmt`` linears are built in ``dst_fmt``, recording each in ``record``."""

    def fmt(module_path: str) -> str:
        stored = fmt_of(module_path)
        if stored != src_fmt:
            return stored
        record[module_path] = (src_fmt, dst_fmt)
        return dst_fmt

    return fmt


def drop_absent_mtp(cfg: ModelConfig, files: CheckpointFiles) -> ModelConfig:
    """transformers declares num_nextn_predict_layers but saves no MTP weights: such a checkpoint has none."""
    if cfg.num_nextn_predict_layers == 0:
        return cfg
    prefix = f"model.layers.{cfg.num_hidden_layers}."
    if any(k.startswith(prefix) for k in files.keys()):
        return cfg
    return dataclasses.replace(cfg, num_nextn_predict_layers=0)


def fmt_of_quantized(cfg: ModelConfig) -> str:
    """The format of the checkpoint's quantized linears (fp8_block, int8_w8a8 or int8_wo)."""
    from .quantize import checkpoint_format

    return checkpoint_format(cfg.quantization, cfg.source)


#: The files a Hugging Face tokenizer reads from a checkpoint directory. Only these, checked (regular
#: files inside the directory) and copied into a fresh directory, are shown to transformers: it never
#: sees the checkpoint's Python files, FIFOs or links out of the directory.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "config.json",
)
#: Largest tokenizer file read (DeepSeek-V3's tokenizer.json is 7.8 MB; the largest known ones ~35 MB).
MAX_TOKENIZER_FILE_BYTES = 512 * 2**20


def _load_tokenizer(path: Path):
    """The checkpoint's tokenizer (None when it has none), loaded without ever running checkpoint code.

    A tokenizer_config.json whose ``auto_map`` names a class (a ``tokenization_*.py`` of the checkpoint)
    is refused in one line: dsv3 does not run it, and transformers is never asked (on a terminal it
    would offer to run it). transformers also gets ``trust_remote_code=False`` and only the files of
    ``TOKENIZER_FILES``. Chat templates then render within limits (``dsv3.chat_template``).
    """
    if not any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer

    from .chat_template import guard

    with tempfile.TemporaryDirectory(prefix="dsv3-tokenizer-") as tmp:
        for name in TOKENIZER_FILES:
            if (path / name).exists() or (path / name).is_symlink():
                data = read_file_bytes(inside_checkpoint(path, name), MAX_TOKENIZER_FILE_BYTES)
                if name == "tokenizer_config.json":
                    data = _safe_tokenizer_config(path / name, data)
                Path(tmp, name).write_bytes(data)
        try:
            tok = AutoTokenizer.from_pretrained(tmp, trust_remote_code=False, local_files_only=True)
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise Dsv3Error(f"{path}: cannot load the tokenizer ({first})") from None
    tok.name_or_path = str(path)
    guard(tok, path)
    return tok


def _safe_tokenizer_config(file: Path, data: bytes) -> bytes:
    """tokenizer_config.json, refused if it needs custom code, less the keys that name other files or code."""
    try:
        raw = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise Dsv3Error(f"{file}: not UTF-8 JSON ({str(exc).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise Dsv3Error(f"{file}: expected a JSON object")
    auto_map = raw.pop("auto_map", None)
    entry = auto_map.get("AutoTokenizer") if isinstance(auto_map, dict) else auto_map
    if entry and (not isinstance(entry, (list, tuple)) or any(entry)):
        raise Dsv3Error(
            f"{file}: this checkpoint's tokenizer needs custom code (auto_map {entry!r}), which dsv3 does not run"
        )
    raw.pop("fast_tokenizer_files", None)  # names files by version: resolved against a directory we did not check
    return json.dumps(raw).encode()
