"""A random-weight Hugging Face-format checkpoint of a config, for benchmarks (``dsv3 bench --random CONFIG``).

Tensor names are the released layout (``dsv3.model.names.hf_name``: one tensor per routed expert), so the
checkpoint loads in dsv3, in transformers and in llama.cpp's converter alike. Values: linears
N(0, 1/fan_in) (activations keep their scale through the layers), norms 1, the routing bias N(0, 0.3)
(non-zero, so the biased top-k differs from the plain one), embeddings N(0, 1). Each tensor is drawn from
its own seeded generator, so the checkpoint depends only on (config, seed, dtype), and written in shards of
about 2 GB so that a multi-GB config never sits in memory twice.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import Dsv3Error
from ..model.config import builtin_config, config_from_dict, load_raw_config
from ..model.names import hf_name
from ..runtime.loading import DTYPES, build_model

SHARD_BYTES = 2 * 2**30
MARKER = "dsv3_random_checkpoint.json"  # what a directory was made from: reused only when it matches


def resolve_config(spec: str | Path) -> tuple[dict, str]:
    """(raw config dict, where it came from) for a file path or the name of a config in dsv3.configs."""
    path = Path(spec)
    if not path.exists() and not path.suffix and len(path.parts) == 1:
        path = builtin_config(str(spec))
    if not path.is_file():
        raise Dsv3Error(f"--random {spec}: no such config file or built-in config (see dsv3/configs)")
    raw = load_raw_config(path)
    if not isinstance(raw, dict):
        raise Dsv3Error(f"--random {spec}: the config must be a mapping")
    return raw, str(path)


def _value(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """One float32 tensor of the checkpoint, from a generator seeded by (seed, name)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
        return torch.ones(shape)
    if name.endswith("e_score_correction_bias"):
        return torch.randn(shape, generator=g) * 0.3
    if name.endswith("embed_tokens.weight"):
        return torch.randn(shape, generator=g)
    return torch.randn(shape, generator=g) * shape[-1] ** -0.5


def make_random_checkpoint(spec: str | Path, out: str | Path, dtype: str = "bfloat16", seed: int = 0) -> Path:
    """Write a random checkpoint of config ``spec`` (a file or a dsv3.configs name) to directory ``out``.

    Every floating tensor is stored in ``dtype`` (``float32`` / ``bfloat16`` / ``float16``) except the routing
    bias, kept float32 as in the released checkpoints. A directory already holding this (config, dtype, seed)
    is reused as is; one holding anything else is refused. Returns ``out``.
    """
    if dtype not in DTYPES:
        raise Dsv3Error(f"random checkpoint dtype {dtype!r}: choose one of {', '.join(sorted(DTYPES))}")
    raw, source = resolve_config(spec)
    cfg = config_from_dict(raw, source=source)
    out = Path(out)
    made_from = {"config": raw, "dtype": dtype, "seed": seed}
    marker = out / MARKER
    if marker.is_file():
        if json.loads(marker.read_text()) == made_from:
            return out
        raise Dsv3Error(f"{out} holds a random checkpoint of another config/dtype/seed; use another directory")
    if out.exists() and any(out.iterdir()):
        raise Dsv3Error(f"{out} exists and is not empty: give an empty or new directory for the random checkpoint")
    out.mkdir(parents=True, exist_ok=True)
    store = DTYPES[dtype]
    model = build_model(cfg, dtype="float32", device="meta")  # shapes only
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in model.state_dict(keep_vars=True).items():
        key = hf_name(name, cfg)
        per_expert = "{e}" in key
        names = [key.format(e=e) for e in range(t.shape[0])] if per_expert else [key]
        shape = tuple(t.shape[1:]) if per_expert else tuple(t.shape)
        for k in names:
            value = _value(k, shape, seed)
            value = value if k.endswith("e_score_correction_bias") else value.to(store)
            if size and size + value.numel() * value.element_size() > SHARD_BYTES:
                shards.append({})
                size = 0
            shards[-1][k] = value
            size += value.numel() * value.element_size()
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        file = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
        total += sum(v.numel() * v.element_size() for v in shard.values())
        shard.clear()
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    config = {**raw, "torch_dtype": dtype}
    config.setdefault("architectures", ["DeepseekV3ForCausalLM"])
    config.setdefault("model_type", "deepseek_v3")
    (out / "config.json").write_text(json.dumps(config, indent=2))
    marker.write_text(json.dumps(made_from))
    return out
