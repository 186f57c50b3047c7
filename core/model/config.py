"""Model configuration: the fields of a Hugging Face DeepSeek-V2/V3 config.json, validated.

Reads both spellings of the RoPE settings (``rope_scaling`` + top-level ``rope_theta`` as in
the released checkpoints, or ``rope_parameters`` as transformers 5 writes them) and fills the
fields transformers omits from the ``model_type`` defaults (deepseek_v2: softmax scoring,
no bias; deepseek_v3: sigmoid scoring with e_score_correction_bias).
"""

from __future__ import annotations

import json
import math
import os
import stat
from dataclasses import dataclass, field, fields
from pathlib import Path

from ..errors import Dsv3Error
from ..weights import FP8_BLOCK, HP, INT8_W8A8, INT8_WO

#: Largest JSON/YAML file (config.json, an index, tokenizer_config.json) read into memory. Released configs
#: are ~2 KB and DeepSeek-V3's model.safetensors.index.json about 9 MB; anything past this is not a config.
MAX_JSON_BYTES = 64 * 2**20

# Upper bounds on a config's sizes. Each sits far above every published DeepSeek shape (hidden 7168, 61
# layers, 256 experts, 128 heads, vocab 129280, 163840 positions), yet low enough that no tensor the model
# builds has more than 2**60 elements (torch's storage sizes overflow past 2**63 bytes) and that a config
# cannot make dsv3 build millions of modules before the first weight is read (10**6 layers took hours).
#: hidden, intermediate and LoRA sizes, head dimensions.
MAX_WIDTH = 2**20
MAX_HEADS = 2**14
MAX_EXPERTS = 2**16
MAX_LAYERS = 2**12
MAX_VOCAB = 2**24
MAX_POSITIONS = 2**24  # a limit, not an allocation: context-length tables grow with the run (see rope)


@dataclass(frozen=True)
class Routing:
    """How the MoE gate chooses experts (see ``dsv3_op_moe_gate``)."""

    top_k: int
    n_experts: int
    scoring: str  # "sigmoid" or "softmax"
    n_group: int
    topk_group: int
    norm_topk_prob: bool
    scale: float
    has_bias: bool


@dataclass(frozen=True)
class YarnConfig:
    """YaRN RoPE extension (``rope_type == "yarn"``)."""

    factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0


@dataclass(frozen=True)
class QuantConfig:
    """``quantization_config`` of an FP8 (or INT8) checkpoint."""

    quant_method: str  # "fp8" or "int8"
    fmt: str = "e4m3"
    activation_scheme: str = "dynamic"
    weight_block_size: tuple[int, int] = (128, 128)
    scale_fmt: str | None = None


@dataclass(frozen=True)
class ModelConfig:
    """A DeepSeek-V3-architecture model. Field names follow the Hugging Face config."""

    model_type: str = "deepseek_v3"
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_nextn_predict_layers: int = 0
    num_attention_heads: int = 128
    n_shared_experts: int = 1
    n_routed_experts: int = 256
    num_experts_per_tok: int = 8
    routed_scaling_factor: float = 2.5
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    n_group: int = 8
    topk_group: int = 4
    norm_topk_prob: bool = True
    first_k_dense_replace: int = 3
    moe_layer_freq: int = 1
    q_lora_rank: int | None = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    max_position_embeddings: int = 163840
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    yarn: YarnConfig | None = None
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    hidden_act: str = "silu"
    quantization: QuantConfig | None = None
    source: str = "<config>"
    extra: dict = field(default_factory=dict, compare=False)

    # -------------------------------------------------------------- derived
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def uses_bias(self) -> bool:
        return self.topk_method == "noaux_tc"

    def is_moe_layer(self, layer: int) -> bool:
        return (
            self.n_routed_experts > 0
            and layer >= self.first_k_dense_replace
            and layer % max(self.moe_layer_freq, 1) == 0
        )

    @property
    def routing(self) -> Routing:
        n_group = self.n_group if self.topk_method in ("noaux_tc", "group_limited_greedy") else 1
        return Routing(
            top_k=self.num_experts_per_tok,
            n_experts=self.n_routed_experts,
            scoring=self.scoring_func,
            n_group=max(n_group, 1),
            topk_group=self.topk_group if n_group > 1 else 1,
            norm_topk_prob=self.norm_topk_prob,
            scale=self.routed_scaling_factor,
            has_bias=self.uses_bias,
        )

    @property
    def softmax_scale(self) -> float:
        """qk_head_dim^-0.5, times mscale^2 with mscale = 0.1 * mscale_all_dim * ln(factor) + 1 under YaRN."""
        scale = self.qk_head_dim**-0.5
        if self.yarn is not None and self.yarn.factor > 1 and self.yarn.mscale_all_dim:
            m = 0.1 * self.yarn.mscale_all_dim * math.log(self.yarn.factor) + 1.0
            scale *= m * m
        return scale

    @property
    def eos_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(self.eos_token_id)

    # -------------------------------------------------------------- checks
    def validate(self) -> ModelConfig:
        """Raise a Dsv3Error naming the first field that contradicts another."""
        src = self.source

        def bad(msg: str) -> Dsv3Error:
            return Dsv3Error(f"{src}: {msg}")

        self._check_ranges()
        if self.qk_rope_head_dim % 2:
            raise bad(f"qk_rope_head_dim must be a positive even number, got {self.qk_rope_head_dim}")
        if self.scoring_func not in ("sigmoid", "softmax"):
            raise bad(f"scoring_func must be 'sigmoid' or 'softmax', got {self.scoring_func!r}")
        if self.topk_method not in ("noaux_tc", "greedy", "group_limited_greedy"):
            raise bad(f"unknown topk_method {self.topk_method!r}")
        if self.hidden_act != "silu":
            raise bad(f"hidden_act {self.hidden_act!r} is not supported (DeepSeek uses 'silu')")
        if self.n_routed_experts > 0:
            if self.num_experts_per_tok > self.n_routed_experts:
                raise bad(
                    f"num_experts_per_tok ({self.num_experts_per_tok}) > n_routed_experts ({self.n_routed_experts})"
                )
            if self.num_experts_per_tok <= 0:
                raise bad("num_experts_per_tok must be positive")
            r = self.routing
            if self.n_routed_experts % r.n_group:
                raise bad(f"n_routed_experts ({self.n_routed_experts}) is not divisible by n_group ({r.n_group})")
            if r.topk_group > r.n_group:
                raise bad(f"topk_group ({r.topk_group}) > n_group ({r.n_group})")
            per_group = self.n_routed_experts // r.n_group
            if r.n_group > 1 and r.has_bias and per_group < 2:
                raise bad("noaux_tc group scoring needs at least 2 experts per group")
            if r.topk_group * per_group < self.num_experts_per_tok:
                raise bad(
                    f"topk_group ({r.topk_group}) groups of {per_group} experts cannot supply "
                    f"num_experts_per_tok ({self.num_experts_per_tok})"
                )
        if self.first_k_dense_replace > self.num_hidden_layers:
            raise bad(
                f"first_k_dense_replace ({self.first_k_dense_replace}) > num_hidden_layers ({self.num_hidden_layers})"
            )
        if self.quantization is not None:
            q = self.quantization
            if q.quant_method not in ("fp8", "int8"):
                raise bad(f"quantization_config.quant_method {q.quant_method!r} is not supported (fp8, int8)")
            if q.quant_method == "fp8" and q.fmt != "e4m3":
                raise bad(f"quantization_config.fmt {q.fmt!r} is not supported (e4m3)")
            if q.quant_method == "fp8" and tuple(q.weight_block_size) != (128, 128):
                raise bad(f"quantization_config.weight_block_size {list(q.weight_block_size)} is not [128, 128]")
            if q.scale_fmt not in (None, "ue8m0"):
                raise bad(f"quantization_config.scale_fmt {q.scale_fmt!r} is not supported (ue8m0)")
        return self

    def _check_ranges(self) -> None:
        """Raise a Dsv3Error naming the first size, number or token id outside what a real model can have."""
        src = self.source
        sizes = {
            "vocab_size": (1, MAX_VOCAB),
            "hidden_size": (1, MAX_WIDTH),
            "intermediate_size": (1, MAX_WIDTH),
            "moe_intermediate_size": (1, MAX_WIDTH),
            "num_hidden_layers": (1, MAX_LAYERS),
            "num_nextn_predict_layers": (0, MAX_LAYERS),
            "num_attention_heads": (1, MAX_HEADS),
            "n_shared_experts": (0, MAX_EXPERTS),
            "n_routed_experts": (0, MAX_EXPERTS),
            "num_experts_per_tok": (0, MAX_EXPERTS),
            "n_group": (1, MAX_EXPERTS),
            "topk_group": (1, MAX_EXPERTS),
            "first_k_dense_replace": (0, MAX_LAYERS),
            "moe_layer_freq": (1, MAX_LAYERS),
            "kv_lora_rank": (1, MAX_WIDTH),
            "qk_nope_head_dim": (0, MAX_WIDTH),
            "qk_rope_head_dim": (1, MAX_WIDTH),
            "v_head_dim": (1, MAX_WIDTH),
            "max_position_embeddings": (1, MAX_POSITIONS),
        }
        if self.q_lora_rank is not None:
            sizes["q_lora_rank"] = (1, MAX_WIDTH)
        for name, (low, high) in sizes.items():
            _in_range(f"{src}: {name}", getattr(self, name), low, high)
        for name in ("rope_theta", "rms_norm_eps", "routed_scaling_factor"):
            _positive_finite(f"{src}: {name}", getattr(self, name))
        if self.yarn is not None:
            y = self.yarn
            _in_range(f"{src}: rope_scaling.factor", y.factor, 1.0, float(MAX_POSITIONS))
            _in_range(
                f"{src}: rope_scaling.original_max_position_embeddings",
                y.original_max_position_embeddings,
                1,
                MAX_POSITIONS,
            )
            for name in ("beta_fast", "beta_slow"):
                _positive_finite(f"{src}: rope_scaling.{name}", getattr(y, name))
            for name in ("mscale", "mscale_all_dim"):  # a negative one can make the table's scale 0/0
                _in_range(f"{src}: rope_scaling.{name}", getattr(y, name), 0.0, 1e3)
        ids = {"bos_token_id": () if self.bos_token_id is None else (self.bos_token_id,), "eos_token_id": self.eos_ids}
        for name, values in ids.items():
            for token in values:
                if not 0 <= token < self.vocab_size:
                    raise Dsv3Error(f"{src}: {name} {token} is outside the vocabulary [0, {self.vocab_size})")

    # -------------------------------------------------------------- I/O
    def to_hf_dict(self) -> dict:
        """A config.json in the released layout (rope_scaling + rope_theta)."""
        out = {"architectures": ["DeepseekV3ForCausalLM"]} if self.model_type == "deepseek_v3" else {}
        out.update(self.extra)
        for f in fields(self):
            if f.name in ("yarn", "quantization", "source", "extra"):
                continue
            out[f.name] = getattr(self, f.name)
        out["rope_scaling"] = None
        if self.yarn is not None:
            y = self.yarn
            out["rope_scaling"] = {
                "type": "yarn",
                "factor": y.factor,
                "original_max_position_embeddings": y.original_max_position_embeddings,
                "beta_fast": y.beta_fast,
                "beta_slow": y.beta_slow,
                "mscale": y.mscale,
                "mscale_all_dim": y.mscale_all_dim,
            }
        if self.quantization is not None:
            q = self.quantization
            out["quantization_config"] = {
                "quant_method": q.quant_method,
                "fmt": q.fmt,
                "activation_scheme": q.activation_scheme,
                "weight_block_size": list(q.weight_block_size),
            }
            if q.scale_fmt:
                out["quantization_config"]["scale_fmt"] = q.scale_fmt
        return out


_MODEL_TYPE_DEFAULTS = {
    "deepseek_v3": {"scoring_func": "sigmoid", "topk_method": "noaux_tc"},
    "deepseek_v2": {"scoring_func": "softmax", "topk_method": "greedy", "norm_topk_prob": False},
}


def config_from_dict(raw: dict, source: str = "<config>") -> ModelConfig:
    """Build a validated ModelConfig from a Hugging Face config dict (V2 or V3 spellings)."""
    if not isinstance(raw, dict):
        raise Dsv3Error(f"{source}: expected a JSON/YAML mapping at the top level")
    model_type = raw.get("model_type", "deepseek_v3")
    if not isinstance(model_type, str) or model_type not in _MODEL_TYPE_DEFAULTS:
        raise Dsv3Error(f"{source}: model_type {model_type!r} is not a DeepSeek-V2/V3 model")
    known = {f.name for f in fields(ModelConfig)} - {"yarn", "quantization", "source", "extra"}
    values: dict = dict(_MODEL_TYPE_DEFAULTS[model_type])
    values["model_type"] = model_type
    extra = {}
    for key, val in raw.items():
        if key in known:
            values[key] = val
        elif key not in ("rope_scaling", "rope_parameters", "quantization_config", "model_type"):
            extra[key] = val
    # null (or 0) in the file means "none"; a key the file omits keeps the dataclass default
    if "q_lora_rank" in values and values["q_lora_rank"] in (0, None):
        values["q_lora_rank"] = None
    for key, none_means in (("n_routed_experts", 0), ("n_group", 1), ("topk_group", 1), ("n_shared_experts", 0)):
        if key in values and values[key] is None:
            values[key] = none_means
    rope = raw.get("rope_scaling") or raw.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        raise Dsv3Error(f"{source}: rope_scaling must be a mapping or null")
    if "rope_theta" in rope and "rope_theta" not in raw:
        values["rope_theta"] = rope["rope_theta"]
    _check_types(values, source)
    if model_type == "deepseek_v2" and "topk_method" not in raw and values.get("n_group", 1) > 1:
        values["topk_method"] = "group_limited_greedy"
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "yarn":
        values["yarn"] = _yarn_config(rope, source)
    elif rope_type not in ("default", None):
        raise Dsv3Error(f"{source}: rope type {rope_type!r} is not supported (default, yarn)")

    q = raw.get("quantization_config")
    if q is not None:
        values["quantization"] = _quant_config(q, source)
    values["source"] = source
    values["extra"] = extra
    try:
        cfg = ModelConfig(**values)
    except TypeError as exc:
        raise Dsv3Error(f"{source}: {exc}") from None
    return cfg.validate()


def _yarn_config(rope: dict, source: str) -> YarnConfig:
    """``rope_scaling`` of type yarn, each field a number (ranges are checked by ``validate``)."""
    for key in ("factor", "original_max_position_embeddings"):
        if key not in rope:
            raise Dsv3Error(f"{source}: rope_scaling of type yarn lacks field {key!r}")

    def number(key: str, default: float | None = None, integer: bool = False):
        val = rope.get(key)
        if val is None or (default is not None and val == 0):  # null (or 0) in the file means the default
            return default
        wrong = isinstance(val, bool) or not isinstance(val, (int, float)) or not _finite(val)
        if wrong or (integer and isinstance(val, float) and not val.is_integer()):
            raise Dsv3Error(
                f"{source}: rope_scaling.{key} must be {'an integer' if integer else 'a number'}, got {_shown(val)}"
            )
        return int(val) if integer else float(val)

    return YarnConfig(
        factor=number("factor"),
        original_max_position_embeddings=number("original_max_position_embeddings", integer=True),
        beta_fast=number("beta_fast", 32.0),
        beta_slow=number("beta_slow", 1.0),
        mscale=1.0 if rope.get("mscale") is None else number("mscale"),
        mscale_all_dim=number("mscale_all_dim", 0.0),
    )


def _quant_config(q: object, source: str) -> QuantConfig:
    """``quantization_config``, each field of the type it must have (values are checked by ``validate``)."""
    if not isinstance(q, dict) or "quant_method" not in q:
        raise Dsv3Error(f"{source}: quantization_config lacks field 'quant_method'")
    for key in ("quant_method", "fmt", "activation_scheme", "scale_fmt"):
        if key in q and not isinstance(q[key], str) and not (key == "scale_fmt" and q[key] is None):
            raise Dsv3Error(f"{source}: quantization_config.{key} must be a string, got {_shown(q[key])}")
    block = q.get("weight_block_size", [128, 128])
    if not isinstance(block, (list, tuple)) or any(isinstance(b, bool) or not isinstance(b, int) for b in block):
        raise Dsv3Error(
            f"{source}: quantization_config.weight_block_size must be a list of integers, got {_shown(block)}"
        )
    return QuantConfig(
        quant_method=q["quant_method"],
        fmt=q.get("fmt", "e4m3"),
        activation_scheme=q.get("activation_scheme", "dynamic"),
        weight_block_size=tuple(block),
        scale_fmt=q.get("scale_fmt"),
    )


def _check_types(values: dict, source: str) -> None:
    """Raise a Dsv3Error naming the first field whose JSON/YAML type is wrong; 7168.0 is taken as 7168."""
    for f in fields(ModelConfig):
        if f.name not in values or not isinstance(f.type, str):
            continue
        val, kind = values[f.name], f.type.replace(" | None", "")
        if val is None and kind != f.type:
            continue
        if kind == "int":
            if isinstance(val, float) and val.is_integer():
                values[f.name] = int(val)
            elif isinstance(val, bool) or not isinstance(val, int):
                raise Dsv3Error(f"{source}: field {f.name} must be an integer, got {_shown(val)}")
        elif kind == "float" and (isinstance(val, bool) or not isinstance(val, (int, float)) or not _finite(val)):
            raise Dsv3Error(f"{source}: field {f.name} must be a finite number, got {_shown(val)}")
        elif kind == "bool" and not isinstance(val, bool):
            raise Dsv3Error(f"{source}: field {f.name} must be true or false, got {_shown(val)}")
        elif kind == "str" and not isinstance(val, str):
            raise Dsv3Error(f"{source}: field {f.name} must be a string, got {_shown(val)}")
        elif f.name == "eos_token_id":
            ids = val if isinstance(val, list) else [val]
            if not ids or any(isinstance(i, bool) or not isinstance(i, int) for i in ids):
                raise Dsv3Error(
                    f"{source}: field eos_token_id must be an integer or a list of integers, got {_shown(val)}"
                )


def load_config(path: str | Path) -> ModelConfig:
    """Read a config from a JSON or YAML file (or a checkpoint directory's config.json)."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.exists() and not path.suffix and len(path.parts) == 1:
        path = builtin_config(str(path))  # e.g. --config deepseek-v3-671b
    if not path.exists():
        raise Dsv3Error(f"{path}: config file not found")
    return config_from_dict(load_raw_config(path), source=str(path))


def load_raw_config(path: Path) -> object:
    """The data of a JSON or YAML config file (not yet checked: see ``config_from_dict``)."""
    if path.suffix in (".yaml", ".yml"):
        return _parse(path, read_text_file(path), _yaml_without_aliases)
    return read_json_file(path)


def read_file_bytes(path: Path, limit: int) -> bytes:
    """The bytes of ``path``, which must be a regular file of at most ``limit`` bytes; else a Dsv3Error.

    A FIFO or a device would block or never end: the type is checked before opening (stat opens
    nothing) and again on the open descriptor, opened non-blocking so that even a swapped-in FIFO
    cannot hang the open.
    """
    try:
        check_regular_file(path)
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise Dsv3Error(f"{path}: cannot open ({exc.strerror or exc})") from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise Dsv3Error(f"{path}: not a regular file")
        if info.st_size > limit:
            raise Dsv3Error(f"{path}: {info.st_size} bytes, more than the {limit} such a file may have")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise Dsv3Error(f"{path}: more than the {limit} bytes such a file may have")
    return data


def check_regular_file(path: Path, what: str = "") -> None:
    """A Dsv3Error unless ``path`` (symlinks followed) is a regular file: never a FIFO, device or directory.

    what: what the file is for, named in the message (e.g. an index entry).
    """
    said = f"{what}: " if what else ""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise Dsv3Error(f"{path}: {said}file not found") from None
    except OSError as exc:
        raise Dsv3Error(f"{path}: {said}cannot read ({exc.strerror or exc})") from None
    if not stat.S_ISREG(mode):
        kind = "a FIFO" if stat.S_ISFIFO(mode) else "a directory" if stat.S_ISDIR(mode) else "a device or socket"
        raise Dsv3Error(f"{path}: {said}not a regular file ({kind})")


def read_text_file(path: Path, limit: int = MAX_JSON_BYTES) -> str:
    """A regular file's text (see ``read_file_bytes``), which must be UTF-8."""
    try:
        return read_file_bytes(path, limit).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Dsv3Error(f"{path}: not UTF-8 text (byte {exc.start})") from None


def read_json_file(path: Path, limit: int = MAX_JSON_BYTES, unique_keys: bool = False):
    """A regular UTF-8 JSON file's data; unique_keys: a key given twice in one object is a Dsv3Error."""

    def pairs(items: list[tuple[str, object]]) -> dict:
        out: dict = {}
        for key, value in items:
            if key in out:
                raise ValueError(f"key {key!r} appears twice")
            out[key] = value
        return out

    hook = pairs if unique_keys else None
    return _parse(path, read_text_file(path, limit), lambda text: json.loads(text, object_pairs_hook=hook))


def _yaml_without_aliases(text: str):
    """yaml.safe_load that refuses aliases (``*name``; an anchor alone is harmless): nested aliases expand exponentially
    (a few hundred bytes that take minutes and gigabytes), and no model config needs them."""
    import yaml

    class Loader(yaml.SafeLoader):
        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                raise yaml.YAMLError(
                    f"YAML aliases (*name) are not allowed in a config (line {self.peek_event().start_mark.line + 1})"
                )
            return super().compose_node(parent, index)

    return yaml.load(text, Loader=Loader)  # noqa: S506 (a SafeLoader)


def _parse(path: Path, text: str, parse):
    try:
        return parse(text)
    except Exception as exc:  # JSON/YAML syntax, nesting too deep (RecursionError), a duplicate key
        lines = str(exc).splitlines() or [type(exc).__name__]
        raise Dsv3Error(f"{path}: cannot parse: {lines[0]}") from None


def _shown(value: object, limit: int = 60) -> str:
    """repr of a config value, cut short: a message stays one readable line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _finite(value: object) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def _in_range(what: str, value: float, low: float, high: float) -> None:
    if not (_finite(value) and low <= value <= high):
        raise Dsv3Error(f"{what} must be in [{low}, {high}], got {_shown(value)}")


def _positive_finite(what: str, value: float) -> None:
    if not (_finite(value) and value > 0):
        raise Dsv3Error(f"{what} must be a positive finite number, got {_shown(value)}")


def builtin_config(name: str) -> Path:
    """Path of a config shipped in dsv3.configs (e.g. ``deepseek-v3-671b``)."""
    from importlib.resources import files

    for suffix in (".json", ".yaml"):
        candidate = files("dsv3.configs") / f"{name}{suffix}"
        if candidate.is_file():
            return Path(str(candidate))
    raise Dsv3Error(f"{name}: config file not found (and no built-in config of that name)")


def checkpoint_format(q: QuantConfig | None, source: str = "config.json") -> str:
    """The weight format of a checkpoint's quantized linears, from its ``quantization_config``.

    fp8 + activation_scheme dynamic -> fp8_block; int8 + dynamic -> int8_w8a8;
    int8 + weight_only -> int8_wo. Anything else is a Dsv3Error naming the field.
    """
    if q is None:
        return HP
    if q.quant_method == "fp8":
        if q.activation_scheme != "dynamic":
            raise Dsv3Error(
                f"{source}: quantization_config.activation_scheme {q.activation_scheme!r} is not supported "
                "for fp8 (dynamic)"
            )
        return FP8_BLOCK
    if q.quant_method == "int8":
        if q.activation_scheme == "dynamic":
            return INT8_W8A8
        if q.activation_scheme == "weight_only":
            return INT8_WO
        raise Dsv3Error(
            f"{source}: quantization_config.activation_scheme {q.activation_scheme!r} is not supported "
            "for int8 (dynamic, weight_only)"
        )
    raise Dsv3Error(f"{source}: quantization_config.quant_method {q.quant_method!r} is not supported (fp8, int8)")
