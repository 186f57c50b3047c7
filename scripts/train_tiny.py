"""Train the embedded tiny DeepSeek-V3-architecture model on the Python standard library, on CPU.

Corpus: the ``.py`` files of this interpreter's standard library (``sysconfig`` "stdlib" path),
without ``test``/``tests``/``idle_test`` directories and ``site-packages``, in sorted order; a file
goes to the held-out split when the first byte of the SHA-256 of its relative path is below
``--heldout-frac * 256``. A byte-level BPE tokenizer (``tokenizers``) is trained on the training
files. A few percent of training documents are chat-formatted (docstring as the user turn, the
function as the assistant turn) so the chat template means something.

Model: dsv3's own graph (cpu_ref, float32, naive MLA): MLA with q/kv compression, DeepSeekMoE
(shared + routed experts, sigmoid scores, group-limited routing, first layer dense), one MTP
module sharing the embedding and head. Loss: next-token + ``--mtp-weight`` * MTP (token t+2).
Auxiliary-loss-free balancing: after each step every MoE's routing bias moves by
``gamma * sign(mean_load - load)``. AdamW, warmup + cosine LR, gradient clipping.

The cpu_ref operators are plain PyTorch, so ``--device cuda`` trains the same graph on a GPU.
``--report DIR`` measures an export (held-out loss, unigram baseline, expert load, MTP acceptance).

Reproducible: batches are drawn from a generator seeded by (seed, step), so the same seed and
steps give the same loss curve, and ``--resume`` continues exactly where a checkpoint stopped.
Artefacts (tokenizer, token streams, checkpoints, log) go to ``--out``; ``--export DIR`` writes
the Hugging Face layout of the released model (BF16) and ``--export-fp8 DIR`` the block-FP8 copy.

    python scripts/train_tiny.py --out /work/train_runs/tiny --steps 1000
    python scripts/train_tiny.py --out /work/train_runs/tiny --steps 1000 --resume
    python scripts/train_tiny.py --out /work/train_runs/tiny --export-only --export core/embedded/tiny-dsv3
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import math
import sys
import sysconfig
import textwrap
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from dsv3.model.config import ModelConfig
from dsv3.model.names import hf_name
from dsv3.runtime.loading import build_model
from dsv3.tools.training import (
    init_weights,
    lm_and_mtp_loss,
    moe_modules,
    start_load_counting,
    stop_load_counting,
    tie_mtp_shared,
    update_routing_bias,
)

SPECIAL_TOKENS = ["<|bos|>", "<|eos|>", "<|pad|>", "<|user|>", "<|assistant|>", "<|system|>"]
BOS, EOS, PAD = 0, 1, 2
EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}<|system|>{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}<|user|>{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}<|assistant|>{{ message['content'] }}{{ eos_token }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

PRESETS = {
    # for tests: a few thousand parameters
    "test": dict(
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        n_routed_experts=4,
        num_experts_per_tok=1,
        n_group=2,
        topk_group=1,
        q_lora_rank=16,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=8,
        max_position_embeddings=256,
    ),
    # the embedded model
    "tiny": dict(
        hidden_size=256,
        intermediate_size=640,
        moe_intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_group=4,
        topk_group=2,
        q_lora_rank=96,
        kv_lora_rank=64,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        max_position_embeddings=1024,
    ),
}


# ---------------------------------------------------------------------------------------------- corpus
def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def corpus_files(
    root: Path, heldout_frac: float, max_files: int | None = None, heldout_max_bytes: int = 100_000
) -> tuple[list[Path], list[Path]]:
    """Sorted ``.py`` files under root split (by a hash of the relative path) into train and held-out.

    Files over ``heldout_max_bytes`` always train: one of them (pydoc_data/topics.py, 0.7 MB of
    English prose in a string) would otherwise make the held-out set mostly not code.
    """
    files = [
        f for f in sorted(root.rglob("*.py")) if not EXCLUDED_DIRS & set(f.relative_to(root).parts[:-1]) and f.is_file()
    ]
    if max_files is not None:
        files = files[:max_files]
    cut = int(heldout_frac * 256)
    train, heldout = [], []
    for f in files:
        h = hashlib.sha256(f.relative_to(root).as_posix().encode()).digest()[0]
        (heldout if h < cut and f.stat().st_size <= heldout_max_bytes else train).append(f)
    if not heldout:  # tiny corpora in tests: hold out the last file
        heldout.append(train.pop())
    return train, heldout


def read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def chat_examples(text: str, max_chars: int = 1200) -> list[tuple[str, str]]:
    """(request, function source) pairs from the documented top-level functions and methods of a file."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return []
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        doc = ast.get_docstring(node)
        src = ast.get_source_segment(text, node)
        if not doc or not src or len(src) > max_chars:
            continue
        summary = doc.strip().split("\n\n")[0].replace("\n", " ")
        out.append((f"Write a Python function `{node.name}`: {summary}", textwrap.dedent(src)))
    return out


def documents(files: list[Path], chat_every: int) -> list[str]:
    """File texts, plus every ``chat_every``-th documented function as a chat-formatted document."""
    docs = []
    n_fn = 0
    for f in files:
        text = read_text(f)
        docs.append(text)
        if chat_every <= 0:
            continue
        for request, answer in chat_examples(text):
            n_fn += 1
            if n_fn % chat_every == 0:
                docs.append(("chat", request, answer))
    return docs


# ------------------------------------------------------------------------------------------- tokenizer
def train_tokenizer(files: list[Path], vocab_size: int, out_dir: Path, max_len: int):
    """Train a byte-level BPE on the files; save tokenizer.json + tokenizer_config.json; return it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((read_text(f) for f in files), trainer)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    write_tokenizer_config(out_dir, max_len)
    return tok


def write_tokenizer_config(out_dir: Path, max_len: int) -> None:
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|bos|>",
        "eos_token": "<|eos|>",
        "pad_token": "<|pad|>",
        "additional_special_tokens": ["<|user|>", "<|assistant|>", "<|system|>"],
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_len,
        "chat_template": CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def encode_documents(tok, docs: list) -> torch.Tensor:
    """One token stream: ``<|bos|> doc <|eos|>`` per document (chat documents through the template)."""
    user, assistant = tok.token_to_id("<|user|>"), tok.token_to_id("<|assistant|>")
    plain = [d for d in docs if isinstance(d, str)]
    encoded = iter(tok.encode_batch(plain))
    ids: list[int] = []
    for d in docs:
        if isinstance(d, str):
            ids += [BOS, *next(encoded).ids, EOS]
        else:
            _, request, answer = d
            ids += [BOS, user, *tok.encode(request).ids, assistant, *tok.encode(answer).ids, EOS]
    return torch.tensor(ids, dtype=torch.int32)


def prepare_data(args) -> tuple[object, torch.Tensor, torch.Tensor, dict]:
    """Tokenizer and token streams, built once per --out and reused (on resume, for export)."""
    from tokenizers import Tokenizer

    out = Path(args.out)
    data_file, tok_dir = out / "data.safetensors", out / "tokenizer"
    if data_file.exists() and (tok_dir / "tokenizer.json").exists():
        tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
        data = load_file(str(data_file))
        info = json.loads((out / "data.json").read_text())
        return tok, data["train"].long(), data["heldout"].long(), info
    root = Path(args.corpus_dir) if args.corpus_dir else stdlib_dir()
    train_files, heldout_files = corpus_files(root, args.heldout_frac, args.max_files)
    if not args.progress:
        print(f"corpus: {len(train_files)} train files, {len(heldout_files)} held-out files", file=sys.stderr)
    t0 = time.perf_counter()
    tok = train_tokenizer(train_files, args.vocab_size, tok_dir, PRESETS[args.preset]["max_position_embeddings"])
    train = encode_documents(tok, documents(train_files, args.chat_every))
    heldout = encode_documents(tok, documents(heldout_files, 0))
    info = {
        "corpus_root": str(root),
        "python": sys.version.split()[0],
        "train_files": len(train_files),
        "heldout_files": len(heldout_files),
        "heldout_names": [f.relative_to(root).as_posix() for f in heldout_files],
        "train_bytes": sum(f.stat().st_size for f in train_files),
        "heldout_bytes": sum(f.stat().st_size for f in heldout_files),
        "train_tokens": int(train.numel()),
        "heldout_tokens": int(heldout.numel()),
        "vocab_size": tok.get_vocab_size(),
        "prepare_seconds": round(time.perf_counter() - t0, 1),
    }
    save_file({"train": train, "heldout": heldout}, str(data_file))
    (out / "data.json").write_text(json.dumps(info, indent=2) + "\n")
    return tok, train.long(), heldout.long(), info


def unigram_loss(train: torch.Tensor, heldout: torch.Tensor, vocab: int) -> float:
    """Cross-entropy (nats/token) of held-out tokens under the add-one-smoothed training unigram."""
    counts = torch.bincount(train, minlength=vocab).double() + 1.0
    logp = (counts / counts.sum()).log()
    return float(-logp[heldout[1:]].mean())


# ------------------------------------------------------------------------------------------- the model
def model_config(preset: str, vocab: int) -> ModelConfig:
    p = PRESETS[preset]
    return ModelConfig(
        model_type="deepseek_v3",
        vocab_size=vocab,
        n_shared_experts=1,
        routed_scaling_factor=1.0,
        scoring_func="sigmoid",
        topk_method="noaux_tc",
        norm_topk_prob=True,
        first_k_dense_replace=1,
        moe_layer_freq=1,
        num_nextn_predict_layers=1,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        bos_token_id=BOS,
        eos_token_id=EOS,
        source=f"preset {preset}",
        **p,
    ).validate()


def make_model(cfg: ModelConfig, seed: int, device: str = "cpu"):
    """dsv3's graph with the cpu_ref operators (plain PyTorch: they run wherever the tensors are)."""
    model = build_model(cfg, backend="cpu_ref", dtype="float32", attn_impl="naive", device=device)
    tie_mtp_shared(model)
    init_weights(model, seed)
    model.train()
    return model


def batch_at(stream: torch.Tensor, seed: int, step: int, batch: int, seq_len: int) -> torch.Tensor:
    """Random windows (batch, seq_len) of the stream, a pure function of (seed, step)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, stream.numel() - seq_len, (batch,), generator=g)
    return torch.stack([stream[s : s + seq_len] for s in starts.tolist()])


def eval_windows(stream: torch.Tensor, n: int, seq_len: int) -> torch.Tensor:
    """n windows (n, seq_len) spread evenly over the stream (deterministic)."""
    n = max(1, min(n, stream.numel() // seq_len))
    stride = (stream.numel() - seq_len) // n
    return torch.stack([stream[i * stride : i * stride + seq_len] for i in range(n)])


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, batch: int, mtp_weight: float) -> dict:
    model.eval()
    lm = mtp = 0.0
    for i in range(0, windows.shape[0], batch):
        chunk = windows[i : i + batch].to(model.embed.device)
        _, a, m = lm_and_mtp_loss(model, chunk, 1.0)
        lm += float(a) * chunk.shape[0]
        mtp += float(m) * chunk.shape[0]
    model.train()
    n = windows.shape[0]
    return {"lm": lm / n, "mtp": mtp / n}


def lr_at(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
    floor = args.lr * args.min_lr_ratio
    return floor + (args.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model, args) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8)


# ----------------------------------------------------------------------------------------- checkpoints
def save_checkpoint(path: Path, model, opt, step: int, history: list[dict]) -> None:
    tensors = {f"model.{k}": v.detach().cpu().clone() for k, v in _unique_state(model).items()}
    names = {id(p): n for n, p in model.named_parameters()}
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p)
            if st:
                tensors[f"opt.{names[id(p)]}.exp_avg"] = st["exp_avg"].cpu().clone()
                tensors[f"opt.{names[id(p)]}.exp_avg_sq"] = st["exp_avg_sq"].cpu().clone()
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp))
    tmp.replace(path)
    meta = path.with_suffix(".json")
    meta_tmp = meta.with_suffix(".json.tmp")
    meta_tmp.write_text(json.dumps({"step": step, "history": history}) + "\n")
    meta_tmp.replace(meta)


def _unique_state(model) -> dict[str, torch.Tensor]:
    """Parameters (each shared tensor once, under its first name) and routing-bias buffers."""
    out = {n: p for n, p in model.named_parameters()}
    out.update({n: b for n, b in model.named_buffers() if n.endswith("gate_bias")})
    return out


def save_weights(out_dir: Path, model, shard_bytes: int = 15_000_000) -> None:
    """The trained weights only (fp32, shared tensors once) as ``weights-NNNNN.safetensors`` shards."""
    out_dir.mkdir(parents=True, exist_ok=True)
    shards: list[dict] = [{}]
    size = 0
    for name, t in _unique_state(model).items():
        t = t.detach().cpu().float().contiguous().clone()
        if size and size + t.numel() * 4 > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += t.numel() * 4
    for i, shard in enumerate(shards):
        save_file(shard, str(out_dir / f"weights-{i + 1:05d}.safetensors"))


def load_weights_only(out_dir: Path, model) -> None:
    tensors = {}
    for f in sorted(out_dir.glob("weights-*.safetensors")):
        tensors.update(load_file(str(f)))
    with torch.no_grad():
        for name, t in _unique_state(model).items():
            t.copy_(tensors[name])


def load_checkpoint(path: Path, model, opt) -> tuple[int, list[dict]]:
    tensors = load_file(str(path))
    state = _unique_state(model)
    with torch.no_grad():
        for name, t in state.items():
            t.copy_(tensors[f"model.{name}"])
    names = {id(p): n for n, p in model.named_parameters()}
    meta = json.loads(path.with_suffix(".json").read_text())
    step = meta["step"]
    for group in opt.param_groups:
        for p in group["params"]:
            key = f"opt.{names[id(p)]}.exp_avg"
            if key in tensors:
                opt.state[p] = {
                    "step": torch.tensor(float(step)),
                    "exp_avg": tensors[key].to(p.device),
                    "exp_avg_sq": tensors[f"opt.{names[id(p)]}.exp_avg_sq"].to(p.device),
                }
    return step, meta["history"]


# ------------------------------------------------------------------------------------------------ train
def train(args) -> list[dict]:
    """Run (or continue) training; returns the history: one record per step (loss) and per eval."""
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok, train_stream, heldout_stream, info = prepare_data(args)
    cfg = model_config(args.preset, tok.get_vocab_size())
    model = make_model(cfg, args.seed, args.device)
    opt = make_optimizer(model, args)
    if args.export_only:
        load_weights_only(out, model)
        args._model, args._cfg, args._tok, args._info = model.cpu(), cfg, tok, info
        return []
    ckpt = out / "checkpoint.safetensors"
    step, history = 0, []
    if args.resume and ckpt.exists():
        step, history = load_checkpoint(ckpt, model, opt)
    windows = eval_windows(heldout_stream, args.eval_windows, args.seq_len)
    start_load_counting(model)
    log = open(out / "log.jsonl", "a") if args.log else None
    bar = tqdm(total=args.steps, initial=step, desc="train", unit="step", disable=not args.progress)
    t0 = time.perf_counter()
    while step < args.steps:
        lr = lr_at(step, args)
        for group in opt.param_groups:
            group["lr"] = lr
        tokens = batch_at(train_stream, args.seed, step, args.batch, args.seq_len).to(args.device)
        loss, lm, mtp = lm_and_mtp_loss(model, tokens, args.mtp_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        update_routing_bias(model, args.bias_gamma)
        step += 1
        rec = {"kind": "train", "step": step, "loss": loss.item(), "lm": lm.item(), "mtp": mtp.item()}
        rec.update(lr=lr, gnorm=float(gnorm), seconds=round(time.perf_counter() - t0, 2))
        history.append(rec)
        if log:
            log.write(json.dumps(rec) + "\n")
            log.flush()
        bar.update(1)
        bar.set_postfix(lm=f"{lm.item():.3f}", mtp=f"{mtp.item():.3f}")
        if args.eval_every and (step % args.eval_every == 0 or step == args.steps):
            stop_load_counting(model)
            ev = {"kind": "eval", "step": step, **evaluate(model, windows, args.batch, args.mtp_weight)}
            start_load_counting(model)
            history.append(ev)
            if log:
                log.write(json.dumps(ev) + "\n")
                log.flush()
            tqdm.write(f"step {step}: held-out lm {ev['lm']:.4f} mtp {ev['mtp']:.4f}", file=sys.stderr)
        if args.ckpt_every and (step % args.ckpt_every == 0 or step == args.steps):
            save_checkpoint(ckpt, model, opt, step, history)
        if args.stop_at_step and step == args.stop_at_step:
            save_checkpoint(ckpt, model, opt, step, history)
            break
        if args.stop_after and time.perf_counter() - t0 > args.stop_after:
            save_checkpoint(ckpt, model, opt, step, history)
            tqdm.write(f"stopping at step {step} (--stop-after)", file=sys.stderr)
            break
    bar.close()
    if log:
        log.close()
    stop_load_counting(model)
    if args.save_weights:
        save_weights(out, model)
    model = model.cpu()
    model.trained_steps = step
    args._model, args._cfg, args._tok, args._info = model, cfg, tok, info
    return history


# ----------------------------------------------------------------------------------------------- export
def hf_config(cfg: ModelConfig, dtype: str, train_context: int) -> dict:
    """The released config.json; ``train_context``: the training window (``dsv3 eval perplexity``'s default)."""
    d = cfg.to_hf_dict()
    d.update(
        num_key_value_heads=cfg.num_attention_heads,
        attention_bias=False,
        attention_dropout=0.0,
        initializer_range=0.02,
        use_cache=True,
        torch_dtype=dtype,
        rope_scaling=None,
        # a completion model: `dsv3 run` uses the chat template only with --chat
        dsv3_default_prompt="raw",
        dsv3_train_context=train_context,
    )
    for k in ("source",):
        d.pop(k, None)
    return dict(sorted(d.items()))


def hf_tensors(model, cfg: ModelConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The model's weights under their Hugging Face names, experts unstacked, MTP copies included."""
    out = {}
    state = model.state_dict()  # shared MTP embed/head appear under both names
    for name, t in state.items():
        if name.startswith("rope_"):
            continue
        hf = hf_name(name, cfg)
        keep_fp32 = name.endswith(("gate_weight", "gate_bias"))
        t = t.detach().float() if keep_fp32 else t.detach().to(dtype)
        if "{e}" in hf:
            for e in range(t.shape[0]):
                out[hf.format(e=e)] = t[e].clone().contiguous()
        else:
            out[hf] = t.clone().contiguous()
    return out


def export_hf(model, cfg: ModelConfig, tok_dir: Path, out_dir: Path, train_context: int) -> None:
    """Write config.json, model.safetensors (BF16) and the tokenizer files in the released layout."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(hf_config(cfg, "bfloat16", train_context), indent=2) + "\n")
    gen = {"bos_token_id": BOS, "eos_token_id": EOS, "do_sample": False}
    (out_dir / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    save_file(hf_tensors(model, cfg, torch.bfloat16), str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (out_dir / f).write_bytes((tok_dir / f).read_bytes())


def export_fp8(bf16_dir: Path, out_dir: Path) -> None:
    """The released block-FP8 copy of a BF16 export, through ``dsv3 convert --to fp8``."""
    from dsv3.tools.convert import convert_checkpoint

    convert_checkpoint(bf16_dir, out_dir, "fp8", force=True, progress=False)


# ----------------------------------------------------------------------------------------------- report
def heldout_prompts(heldout_stream: torch.Tensor, tok, n: int, prompt_tokens: int) -> list[list[int]]:
    """n prompts: ``<|bos|>`` + the first ``prompt_tokens`` tokens of held-out windows that start a line."""
    nl_ids = {i for t, i in tok.get_vocab().items() if "\u010a" in t or "Ċ" in t}  # tokens holding a newline
    stream = heldout_stream.tolist()
    stride = max(1, len(stream) // n)
    prompts = []
    for i in range(n):
        j = i * stride
        while j < len(stream) - prompt_tokens and stream[j] not in nl_ids:
            j += 1
        body = [t for t in stream[j + 1 : j + 1 + prompt_tokens] if t > 5]
        if body:
            prompts.append([BOS, *body])
    return prompts


@torch.no_grad()
def report(ckpt_dir: Path, args) -> dict:
    """Held-out loss and perplexity, unigram baseline, expert load balance and MTP acceptance of an export."""
    import dsv3

    torch.set_num_threads(args.threads)
    tok, train_stream, heldout_stream, info = prepare_data(args)
    engine = dsv3.load(ckpt_dir, dtype="float32", progress=False)
    model = engine.model
    t = args.seq_len
    n = (heldout_stream.numel() - 1) // t
    windows = heldout_stream[: n * t].view(n, t)
    start_load_counting(model)
    lm = mtp = 0.0
    for i in range(0, n, args.batch):
        chunk = windows[i : i + args.batch]
        _, a, m = lm_and_mtp_loss(model, chunk, 1.0)
        lm += float(a) * chunk.shape[0]
        mtp += float(m) * chunk.shape[0]
    loads = {}
    for name, moe in moe_modules(model):
        if name.startswith("mtp."):
            continue  # the MTP block also ran on the held-out windows above, but report main layers
        load = moe.load
        loads[name] = {
            "tokens_per_expert": [int(x) for x in load.tolist()],
            "max_over_min": round(float(load.max() / load.min()), 3) if load.min() > 0 else float("inf"),
            "dead_experts": int((load == 0).sum()),
        }
    mtp_loads = {n_: [int(x) for x in m.load.tolist()] for n_, m in moe_modules(model) if n_.startswith("mtp.")}
    stop_load_counting(model)
    uni = unigram_loss(train_stream, heldout_stream, tok.get_vocab_size())
    prompts = heldout_prompts(heldout_stream, tok, args.report_prompts, 24)
    t0 = time.perf_counter()
    results = engine.generate(prompts, max_new_tokens=args.report_new_tokens, temperature=0.0, mtp=1)
    elapsed = time.perf_counter() - t0
    steps = sum(r.mtp["steps"] for r in results)
    accepted = sum(r.mtp["accepted"][0] for r in results)
    return {
        "heldout_tokens_scored": int(n * (t - 1)),
        "heldout_loss": round(lm / n, 4),
        "heldout_perplexity": round(math.exp(lm / n), 2),
        "heldout_mtp_loss": round(mtp / n, 4),
        "unigram_loss": round(uni, 4),
        "unigram_perplexity": round(math.exp(uni), 1),
        "expert_load": loads,
        "mtp_block_expert_load": mtp_loads,
        "mtp_acceptance": round(accepted / steps, 4) if steps else 0.0,
        "mtp_prompts": len(prompts),
        "mtp_new_tokens": sum(len(r.token_ids) for r in results),
        "mtp_tokens_per_forward": round(sum(r.mtp["tokens_per_forward"] * r.mtp["steps"] for r in results) / steps, 3),
        "mtp_generate_seconds": round(elapsed, 1),
        "data": {k: v for k, v in info.items() if k != "heldout_names"},
    }


# --------------------------------------------------------------------------------------------------- cli
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="/work/train_runs/tiny", help="run directory (data, checkpoint, log)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--mtp-weight", type=float, default=0.3)
    p.add_argument("--bias-gamma", type=float, default=1e-3, help="routing-bias update speed")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--heldout-frac", type=float, default=0.05)
    p.add_argument("--chat-every", type=int, default=8, help="every n-th documented function as a chat example")
    p.add_argument("--corpus-dir", help="default: this interpreter's standard library")
    p.add_argument("--max-files", type=int, help="use only the first n files (tests)")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-windows", type=int, default=64)
    p.add_argument("--ckpt-every", type=int, default=25)
    p.add_argument("--stop-after", type=float, default=0, help="save and stop after this many seconds")
    p.add_argument(
        "--stop-at-step", type=int, default=0, help="save and stop at this step (the schedule keeps --steps)"
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="torch device for training (the cpu_ref ops are plain PyTorch)")
    p.add_argument("--save-weights", action="store_true", help="also write weights-only fp32 shards to --out")
    p.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.safetensors")
    p.add_argument("--export", help="write the BF16 Hugging Face layout here at the end")
    p.add_argument("--export-fp8", help="write the block-FP8 copy here (needs --export)")
    p.add_argument("--export-only", action="store_true", help="load the checkpoint and export, no training")
    p.add_argument("--report", help="measure an exported checkpoint directory (held-out data from --out)")
    p.add_argument("--report-prompts", type=int, default=32)
    p.add_argument("--report-new-tokens", type=int, default=48)
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--no-log", dest="log", action="store_false")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report:
        print(json.dumps(report(Path(args.report), args), indent=1))
        return 0
    if args.export_only and not list(Path(args.out).glob("weights-*.safetensors")):
        print(f"{args.out}: no weights-*.safetensors to export (train with --save-weights)", file=sys.stderr)
        return 2
    train(args)
    if args.export:
        export_hf(args._model, args._cfg, Path(args.out) / "tokenizer", Path(args.export), args.seq_len)
        if args.export_fp8:
            export_fp8(Path(args.export), Path(args.export_fp8))
    return 0


if __name__ == "__main__":
    sys.exit(main())
