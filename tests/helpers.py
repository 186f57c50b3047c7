"""Tiny checkpoints for tests, made with transformers' DeepseekV3ForCausalLM (the external reference).

``make_checkpoint(dir, **overrides)`` saves a random model with save_pretrained, gives
``e_score_correction_bias`` non-zero values (it starts at zero), and with ``mtp=True`` appends one
MTP layer's tensors in the released layout (transformers does not write them).
``assert_close(got, want, tol)`` compares a backend's result with cpu_ref's the way the conformance
kit does (``dsv3.conformance`` Tolerance, rtol and atol).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file

if TYPE_CHECKING:
    from dsv3.conformance.tolerances import Tolerance

TINY = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    moe_intermediate_size=16,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=4,
    n_shared_experts=1,
    n_routed_experts=8,
    num_experts_per_tok=3,
    n_group=2,
    topk_group=1,
    first_k_dense_replace=1,
    q_lora_rank=16,
    kv_lora_rank=16,
    qk_nope_head_dim=8,
    qk_rope_head_dim=4,
    v_head_dim=8,
    max_position_embeddings=128,
    rope_theta=10000.0,
    rope_scaling={
        "type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 32,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    },
    routed_scaling_factor=2.5,
    norm_topk_prob=True,
    num_nextn_predict_layers=1,
    initializer_range=0.1,
    bos_token_id=0,
    eos_token_id=1,
)


def make_transformers_model(seed: int = 0, **overrides):
    """A random transformers DeepseekV3ForCausalLM (float32) with a non-zero routing bias."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(seed)
    cfg = DeepseekV3Config(**{**TINY, **overrides})
    model = DeepseekV3ForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for mod in model.modules():
            if hasattr(mod, "e_score_correction_bias"):
                mod.e_score_correction_bias.normal_(0.0, 0.3)
    return model


def make_checkpoint(path: str | Path, seed: int = 0, mtp: bool | int = False, **overrides) -> Path:
    """Save a random tiny checkpoint to ``path``; with ``mtp`` also MTP layers' tensors (True: one, n: n)."""
    path = Path(path)
    model = make_transformers_model(seed, **overrides)
    model.save_pretrained(path)
    if mtp:
        add_mtp_layer(path, seed, int(mtp))
    return path


def add_mtp_layer(path: Path, seed: int = 0, count: int = 1) -> None:
    """Append ``model.layers.{L..L+count-1}.*`` (``count`` MTP modules, released layout) to model.safetensors."""
    cfg = json.loads((path / "config.json").read_text())
    tensors = load_file(str(path / "model.safetensors"))
    n = cfg["num_hidden_layers"]
    src_layer = n - 1  # copy the shapes of the last decoder layer, fresh random values
    g = torch.Generator().manual_seed(seed + 1000)
    prefix = f"model.layers.{src_layer}."
    h = cfg["hidden_size"]
    for layer in range(n, n + count):
        for key, value in list(tensors.items()):
            if key.startswith(prefix):
                new = f"model.layers.{layer}." + key[len(prefix) :]
                if key.endswith("layernorm.weight"):
                    tensors[new] = torch.ones_like(value) + 0.1 * torch.randn(value.shape, generator=g)
                else:
                    tensors[new] = torch.randn(value.shape, generator=g) * value.float().std().clamp(min=0.02)
        base = f"model.layers.{layer}."
        tensors[base + "embed_tokens.weight"] = tensors["model.embed_tokens.weight"].clone()
        tensors[base + "shared_head.head.weight"] = tensors["lm_head.weight"].clone()
        tensors[base + "enorm.weight"] = torch.ones(h)
        tensors[base + "hnorm.weight"] = torch.ones(h)
        tensors[base + "shared_head.norm.weight"] = torch.ones(h)
        tensors[base + "eh_proj.weight"] = torch.randn(h, 2 * h, generator=g) * (2 * h) ** -0.5
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    cfg["num_nextn_predict_layers"] = count
    (path / "config.json").write_text(json.dumps(cfg, indent=2))


def make_transformers_v2_model(seed: int = 0, **overrides):
    """A random transformers DeepseekV2ForCausalLM (float32): softmax routing, no bias, no MTP."""
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    base = {k: v for k, v in TINY.items() if k != "num_nextn_predict_layers"}
    base.update(norm_topk_prob=False, topk_method="greedy", n_group=1, topk_group=1)
    torch.manual_seed(seed)
    cfg = DeepseekV2Config(**{**base, **overrides})
    return DeepseekV2ForCausalLM(cfg).float().eval()


def make_v2_checkpoint(path: str | Path, seed: int = 0, **overrides) -> Path:
    """Save a random tiny DeepSeek-V2 checkpoint (transformers' DeepseekV2ForCausalLM) to ``path``."""
    path = Path(path)
    make_transformers_v2_model(seed, **overrides).save_pretrained(path)
    return path


TINY_WORDS = ("the", "a", "cat", "dog", "sat", "ran", "on", "mat", "and", "hello", "world", "is", "big", "small")


def add_tiny_tokenizer(path: str | Path, vocab_size: int = TINY["vocab_size"]) -> Path:
    """Write a word-level tokenizer (tokenizer.json + tokenizer_config.json) of ``vocab_size`` tokens.

    Ids 0, 1, 2 are ``<s>`` (bos), ``</s>`` (eos) and ``<unk>``, matching TINY's bos/eos ids; then
    TINY_WORDS, then filler words ``w<i>``. No chat template, so dsv3 uses raw completion.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    path = Path(path)
    words = ["<s>", "</s>", "<unk>", *TINY_WORDS]
    words += [f"w{i}" for i in range(len(words), vocab_size)]
    vocab = {w: i for i, w in enumerate(words[:vocab_size])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(str(path))
    return path


# Shapes for quantization tests: dims above 128 and not multiples of 128 (160, 136, 144, 152, 288),
# so fp8 128x128 blocks have partial edge tiles; initializer_range 0.02 as in the released models
# (at 0.1 the tiny random model is chaotic: expert routing flips under 1% weight noise).
QUANT_SHAPES = dict(
    hidden_size=160,
    intermediate_size=288,
    moe_intermediate_size=136,
    q_lora_rank=144,
    kv_lora_rank=136,
    qk_nope_head_dim=32,
    qk_rope_head_dim=16,
    v_head_dim=32,
    initializer_range=0.02,
)


def quantize_checkpoint(src: str | Path, dst: str | Path, fmt: str = "fp8", **kwargs) -> Path:
    """Write ``src`` converted with ``dsv3 convert`` (fmt: fp8, int8, int8-wo, bf16, fp32...) to ``dst``."""
    from dsv3.tools.convert import convert_checkpoint

    return convert_checkpoint(src, dst, fmt, progress=False, **kwargs).out


def one_torch_thread():
    """Generator for a fixture: run with one intra-op thread, then restore the previous count.

    Tiny models gain nothing from threads, and on a busy shared machine OpenMP's waiting threads
    made a tiny generate() 20x slower (1.3 s against 0.065 s, measured on 2 loaded cores).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def pattern_tokens(n: int, length: int, vocab_size: int, generator: torch.Generator) -> torch.Tensor:
    """(n, length) int64 arithmetic progressions ``2 + (a + s*t) mod (V - 2)``, s in 1..3 (never bos 0 / eos 1)."""
    a = torch.randint(0, vocab_size - 2, (n, 1), generator=generator)
    s = torch.randint(1, 4, (n, 1), generator=generator)
    return 2 + (a + s * torch.arange(length)) % (vocab_size - 2)


def train_on_patterns(model, steps: int = 60, seed: int = 0, mtp_weight: float = 1.0) -> dict:
    """Train ``model`` in place (Adam, lr 1e-2) on :func:`pattern_tokens` with the main + MTP loss.

    A few dozen steps make the tiny model and its MTP module predict the progressions well but
    not perfectly, so speculative decoding sees both accepted and rejected drafts. Returns a copy
    of the trained state_dict (load it into another attention form of the same checkpoint).
    """
    from dsv3.tools.training import lm_and_mtp_loss

    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        total, _, _ = lm_and_mtp_loss(model, pattern_tokens(16, 16, model.cfg.vocab_size, g), mtp_weight)
        opt.zero_grad()
        total.backward()
        opt.step()
    model.eval()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_close(got: torch.Tensor, want: torch.Tensor, tol: Tolerance, what: str = "output") -> None:
    """``got`` (a backend's result) against ``want`` (cpu_ref's) by the conformance kit's own criterion.

    The comparison is ``dsv3.conformance.compare.compare_tensors``: elementwise
    ``|got - want| <= tol.atol + tol.rtol * (|want| + row rms)``, bit for bit (the sign of zero
    included) when both are 0. Shape and dtype must match, and both tensors must be finite: the
    hand-written ``max |diff|`` checks this replaces failed on any NaN, where the kit lets NaN pass
    where cpu_ref has NaN.
    """
    from dsv3.conformance.compare import compare_tensors

    assert got.shape == want.shape and got.dtype == want.dtype, (
        f"{what}: got {tuple(got.shape)} {got.dtype}, expected {tuple(want.shape)} {want.dtype}"
    )
    for name, t in (("got", got), ("expected", want)):
        if t.is_floating_point():
            bad = ~torch.isfinite(t.detach().cpu())
            assert not bool(bad.any()), f"{what}: {name} has {int(bad.sum())} non-finite values"
    outcome = compare_tensors(got, want.detach().cpu(), tol)
    assert outcome.ok, f"{what}: {outcome.message} (max abs error {outcome.max_abs:.3g}, mean {outcome.mean_abs:.3g})"


def assert_within_max(got: torch.Tensor, want: torch.Tensor, rtol: float, what: str, why: str = "") -> None:
    """max|got - want| <= rtol * max|want|: :func:`assert_close` with that bound as its absolute tolerance
    (the form the GPU-kernel and whole-model tests state their bounds in)."""
    top = want.double().abs().max().item() if want.numel() else 0.0
    tol = absolute(what, rtol * max(top, 1e-30), why or f"{rtol:g} of max|want|")
    assert_close(got, want, tol, what)


def absolute(name: str, atol: float, why: str) -> Tolerance:
    """A tolerance of ``atol`` absolute, nothing relative (for logits of O(1) whose bound was measured)."""
    from dsv3.conformance.tolerances import Tolerance

    return Tolerance(name, 0.0, why, atol=atol)
