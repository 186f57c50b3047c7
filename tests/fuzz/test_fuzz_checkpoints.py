"""Fuzz checkpoints: mutated config.json, safetensors files and headers, indexes, file types, tokenizer
files, planted code (a tokenization_*.py named by auto_map, pickles) and chat templates, each tried with
a small dsv3 command (run, convert, eval perplexity, parity) in a forked child.

Cases go round the mutators in turn (every mutator is tried at the default size), each with random
parameters; every fourth case stacks a second mutator. What must be refused (a file that leads out of
the checkpoint, a device) is marked: a successful run then counts as read_outside.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dsv3.runtime.tokenizer import TOKENIZER_FILES
from tests.fuzz import templates
from tests.fuzz.cases import AreaTimer, command_on, copy_base, mutate_config, new_case, run_cli_case, weird
from tests.fuzz.conftest import INDEX, set_chat_template
from tests.fuzz.harness import CaseDirs, assert_clean, cases_for

pytestmark = pytest.mark.e2e

AREA = "checkpoints"
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
#: Files every command that loads a checkpoint reads (dsv3 convert also copies every other top-level file).
READ_BY_ALL = {"config.json", "model.safetensors", INDEX, *SHARDS, *TOKENIZER_FILES}


@dataclass
class Ctx:
    """One case's mutation state: where it runs, what must be refused, how it must be run."""

    dirs: CaseDirs
    ckpt: Path
    rng: random.Random
    linked_out: set[str] = field(default_factory=set)  # names that are links out of the checkpoint
    refuse: str | None = None  # the input must be refused whatever the command
    command: str | None = None  # the command this mutation needs (e.g. "chat")

    def existing(self, *names: str) -> str:
        """One of ``names`` (or of the checkpoint's files) that exists here."""
        have = [n for n in names if (self.ckpt / n).exists()] or sorted(p.name for p in self.ckpt.iterdir())
        return self.rng.choice(have)

    def safetensors(self) -> Path:
        return self.ckpt / self.existing("model.safetensors", *SHARDS)

    def outside(self, name: str) -> Path:
        self.dirs.outside.mkdir(exist_ok=True)
        return self.dirs.outside / name


Mutator = Callable[[Ctx], str]
MUTATORS: list[tuple[str, str, Mutator]] = []  # (name, base checkpoint, mutator)


def mutator(base: str = "plain") -> Callable[[Mutator], Mutator]:
    def register(fn: Mutator) -> Mutator:
        MUTATORS.append((fn.__name__, base, fn))
        return fn

    return register


def _replace(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


ANY_FILE = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
)


# ------------------------------------------------------------------------------------------ file types
@mutator()
def fifo(ctx: Ctx) -> str:
    name = ctx.existing(*ANY_FILE)
    _replace(ctx.ckpt / name)
    os.mkfifo(ctx.ckpt / name)
    return f"{name} is a FIFO"


@mutator()
def directory(ctx: Ctx) -> str:
    name = ctx.existing(*ANY_FILE)
    _replace(ctx.ckpt / name)
    (ctx.ckpt / name).mkdir()
    (ctx.ckpt / name / "x").write_text("{}")
    return f"{name} is a directory"


@mutator()
def empty_file(ctx: Ctx) -> str:
    name = ctx.existing(*ANY_FILE)
    (ctx.ckpt / name).write_bytes(b"")
    return f"{name} is empty"


@mutator()
def symlink_out(ctx: Ctx) -> str:
    """A valid copy outside the checkpoint, linked in: loading it means reading outside."""
    name = ctx.existing(*ANY_FILE)
    target = ctx.outside(name)
    shutil.move(ctx.ckpt / name, target)
    absolute = ctx.rng.random() < 0.5
    (ctx.ckpt / name).symlink_to(target if absolute else Path("..") / "outside" / name)
    ctx.linked_out.add(name)
    return f"{name} -> {'absolute' if absolute else 'relative'} link to a valid copy outside the checkpoint"


@mutator()
def symlink_device(ctx: Ctx) -> str:
    name = ctx.existing(*ANY_FILE)
    dev = ctx.rng.choice(["/dev/zero", "/dev/null", "/dev/urandom"])
    _replace(ctx.ckpt / name)
    (ctx.ckpt / name).symlink_to(dev)
    ctx.linked_out.add(name)  # refused by every command that reads it (see the test)
    return f"{name} -> {dev}"


@mutator()
def symlink_broken(ctx: Ctx) -> str:
    name = ctx.existing(*ANY_FILE)
    _replace(ctx.ckpt / name)
    loop = ctx.rng.random() < 0.5
    (ctx.ckpt / name).symlink_to(name if loop else "no-such-file")
    return f"{name} is a {'self-referencing' if loop else 'dangling'} link"


@mutator()
def sparse_huge(ctx: Ctx) -> str:
    """A file that says it is 1 TiB (sparse: nothing is written)."""
    name = ctx.existing(*ANY_FILE)
    with open(ctx.ckpt / name, "r+b") as f:
        f.truncate(2**40)
    return f"{name} padded to 1 TiB (sparse)"


@mutator()
def truncated(ctx: Ctx) -> str:
    name = ctx.existing(*ANY_FILE)
    data = (ctx.ckpt / name).read_bytes()
    keep = ctx.rng.randint(0, max(0, len(data) - 1))
    (ctx.ckpt / name).write_bytes(data[:keep])
    return f"{name} truncated to {keep} of {len(data)} bytes"


@mutator()
def garbage(ctx: Ctx) -> str:
    name = ctx.existing(*ANY_FILE)
    n = ctx.rng.choice([1, 7, 8, 9, 100, 5000])
    (ctx.ckpt / name).write_bytes(ctx.rng.randbytes(n))
    return f"{name} replaced by {n} random bytes"


# ------------------------------------------------------------------------------------------ safetensors
def _split_file(path: Path) -> tuple[int, dict, bytes]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return n, json.loads(data[8 : 8 + n]), data[8 + n :]


def _write_file(path: Path, header: object, body: bytes, raw: bytes | None = None) -> None:
    text = raw if raw is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + body)


@mutator()
def header_length(ctx: Ctx) -> str:
    path = ctx.safetensors()
    n, _, _ = _split_file(path)
    data = bytearray(path.read_bytes())
    value = ctx.rng.choice([0, 1, n - 1, n + 1, len(data), 2**31, 2**63 - 1, 2**64 - 1, 100_000_001, 99_999_999])
    data[:8] = struct.pack("<Q", value)
    path.write_bytes(bytes(data))
    return f"{path.name}: header length field {value} (really {n})"


@mutator()
def header_entry(ctx: Ctx) -> str:
    """One tensor's header entry with an odd dtype, shape or data_offsets."""
    path = ctx.safetensors()
    _, header, body = _split_file(path)
    tensor = ctx.rng.choice(sorted(k for k in header if k != "__metadata__"))
    key = ctx.rng.choice(["dtype", "shape", "data_offsets", None])
    entry = header[tensor]
    choices = {
        "dtype": ["F64", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2", "I64", "F16", "BF16", "XYZ", "", 5, None],
        "shape": [[], [0], [-1], [2**40, 2**40], [2**63], "a", [1.5], [None], entry["shape"][::-1], [1] * 64],
        "data_offsets": [[0, 0], [0, 10**12], [5, 2], [-1, 3], [0], "x", [0, 2**64], [len(body), len(body) + 4]],
    }
    if key is None:
        header[tensor] = weird(ctx.rng)
        change = f"entry replaced by {header[tensor]!r:.40}"
    else:
        entry[key] = ctx.rng.choice(choices[key])
        change = f"{key} = {entry[key]!r:.40}"
    _write_file(path, header, body)
    return f"{path.name}: header entry of {tensor}: {change}"


@mutator()
def header_metadata(ctx: Ctx) -> str:
    path = ctx.safetensors()
    _, header, body = _split_file(path)
    value = ctx.rng.choice([{"format": "tf"}, {"format": 5}, {"x": "y" * 10**5}, [], "pt", None, {"format": None}])
    header["__metadata__"] = value
    _write_file(path, header, body)
    return f"{path.name}: __metadata__ = {value!r:.40}"


@mutator()
def header_raw(ctx: Ctx) -> str:
    """Header bytes that are not the JSON object safetensors expects."""
    path = ctx.safetensors()
    n, header, body = _split_file(path)
    text = json.dumps(header).encode()
    raw = ctx.rng.choice(
        [
            b"[]",
            b"null",
            b"{",
            text + b"   ",
            text[:-1] + b', "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}',
            text.replace(b'"F32"', b'"F32\xff"', 1),
            b'{"a": 1, "a": 2}',
            b"{" * 100_000,
        ]
    )
    _write_file(path, None, body, raw=raw)
    return f"{path.name}: header bytes {raw[:40]!r}..."


@mutator()
def flip_bytes(ctx: Ctx) -> str:
    path = ctx.safetensors()
    data = bytearray(path.read_bytes())
    n, _, _ = _split_file(path)
    in_header = ctx.rng.random() < 0.5
    lo, hi = (0, 8 + n) if in_header else (8 + n, len(data))
    spots = sorted(ctx.rng.randrange(lo, hi) for _ in range(ctx.rng.randint(1, 8)))
    for i in spots:
        data[i] = ctx.rng.randrange(256)
    path.write_bytes(bytes(data))
    return f"{path.name}: random bytes at {spots} ({'header' if in_header else 'data'})"


def _tensors(ctx: Ctx) -> tuple[Path, dict[str, torch.Tensor]]:
    path = ctx.safetensors()
    return path, load_file(str(path))


def _save(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file(tensors, str(path), metadata={"format": "pt"})


@mutator()
def nonfinite_weight(ctx: Ctx) -> str:
    path, tensors = _tensors(ctx)
    name = ctx.rng.choice(sorted(k for k, v in tensors.items() if v.is_floating_point()))
    value = ctx.rng.choice([float("nan"), float("inf"), float("-inf"), 3e38])
    t = tensors[name].clone()
    t.view(-1)[ctx.rng.randrange(t.numel())] = value
    tensors[name] = t
    _save(path, tensors)
    return f"{path.name}: one element of {name} = {value}"


@mutator()
def tensor_shape(ctx: Ctx) -> str:
    path, tensors = _tensors(ctx)
    name = ctx.rng.choice(sorted(tensors))
    shape = list(tensors[name].shape)
    new = ctx.rng.choice([[d + 1 for d in shape], shape[::-1], [*shape, 1], shape[:-1] or [2], [0] * len(shape)])
    tensors[name] = torch.zeros(new)
    _save(path, tensors)
    return f"{path.name}: {name} has shape {new} (not {shape})"


@mutator()
def tensor_dtype(ctx: Ctx) -> str:
    path, tensors = _tensors(ctx)
    name = ctx.rng.choice(sorted(tensors))
    dtype = ctx.rng.choice(
        [
            torch.int32,
            torch.int8,
            torch.uint8,
            torch.bool,
            torch.float16,
            torch.bfloat16,
            torch.float64,
            torch.float8_e4m3fn,
            torch.int64,
        ]
    )
    tensors[name] = tensors[name].to(dtype)
    _save(path, tensors)
    return f"{path.name}: {name} stored as {dtype}"


@mutator()
def tensor_names(ctx: Ctx) -> str:
    path, tensors = _tensors(ctx)
    name = ctx.rng.choice(sorted(tensors))
    how = ctx.rng.choice(["drop", "rename", "extra", "extra-layer"])
    if how == "drop":
        del tensors[name]
    elif how == "rename":
        tensors[name + ".x"] = tensors.pop(name)
    elif how == "extra":
        tensors["lm_head.bias"] = torch.zeros(3)
    else:
        tensors["model.layers.99.self_attn.q_a_proj.weight"] = torch.zeros(2, 2)
    _save(path, tensors)
    return f"{path.name}: {how} {name}"


@mutator()
def stored_twice(ctx: Ctx) -> str:
    """A second safetensors file (no index) holding a tensor model.safetensors holds too."""
    tensors = load_file(str(ctx.ckpt / "model.safetensors"))
    name = ctx.rng.choice(sorted(tensors))
    _save(ctx.ckpt / "extra.safetensors", {name: tensors[name].clone()})
    return f"extra.safetensors also holds {name}"


# ------------------------------------------------------------------------------------------ index
@mutator("sharded")
def index_weight_map(ctx: Ctx) -> str:
    raw = json.loads((ctx.ckpt / INDEX).read_text())
    raw["weight_map"] = weird(ctx.rng) if ctx.rng.random() < 0.5 else list(raw["weight_map"].items())
    (ctx.ckpt / INDEX).write_text(json.dumps(raw))
    return f"index weight_map = {raw['weight_map']!r:.50}"


@mutator("sharded")
def index_entry(ctx: Ctx) -> str:
    raw = json.loads((ctx.ckpt / INDEX).read_text())
    tensor = ctx.rng.choice(sorted(raw["weight_map"]))
    shard = raw["weight_map"][tensor]
    value = ctx.rng.choice(
        [
            weird(ctx.rng),
            "missing.safetensors",
            SHARDS[0] if shard == SHARDS[1] else SHARDS[1],
            f"./{shard}",
            f"sub/../{shard}",
            "",
        ]
    )
    raw["weight_map"][tensor] = value
    (ctx.ckpt / INDEX).write_text(json.dumps(raw))
    return f"index entry for {tensor} = {value!r:.50} (was {shard})"


@mutator("sharded")
def index_escape(ctx: Ctx) -> str:
    """An index entry naming a valid shard outside the checkpoint (../, absolute, a link inside that leads out)."""
    raw = json.loads((ctx.ckpt / INDEX).read_text())
    shard = ctx.rng.choice(SHARDS)
    target = ctx.outside(shard)
    shutil.move(ctx.ckpt / shard, target)
    how = ctx.rng.choice(["dot-dot", "absolute", "link"])
    name = {"dot-dot": f"../outside/{shard}", "absolute": str(target), "link": "linked.safetensors"}[how]
    if how == "link":
        (ctx.ckpt / name).symlink_to(target)
    raw["weight_map"] = {k: (name if v == shard else v) for k, v in raw["weight_map"].items()}
    (ctx.ckpt / INDEX).write_text(json.dumps(raw))
    ctx.refuse = f"index entries name {name}, outside the checkpoint"
    return f"index names {shard} as {name} ({how})"


@mutator("sharded")
def index_coverage(ctx: Ctx) -> str:
    raw = json.loads((ctx.ckpt / INDEX).read_text())
    how = ctx.rng.choice(["missing-entry", "ghost-entry", "both-shards"])
    tensor = ctx.rng.choice(sorted(raw["weight_map"]))
    if how == "missing-entry":
        del raw["weight_map"][tensor]
    elif how == "ghost-entry":
        raw["weight_map"]["model.layers.0.ghost.weight"] = SHARDS[0]
    else:
        shard = raw["weight_map"][tensor]
        other = SHARDS[1] if shard == SHARDS[0] else SHARDS[0]
        extra = load_file(str(ctx.ckpt / shard))[tensor]
        tensors = load_file(str(ctx.ckpt / other))
        tensors[tensor] = extra.clone()
        _save(ctx.ckpt / other, tensors)
    (ctx.ckpt / INDEX).write_text(json.dumps(raw))
    return f"index: {how} ({tensor})"


@mutator("sharded")
def index_text(ctx: Ctx) -> str:
    text = ctx.rng.choice(
        [
            b"",
            b"[]",
            b"null",
            b"{",
            b"\xff\xfe{}",
            b'{"weight_map": {}, "weight_map": {}}',
            b"[" * 100_000,
            b'{"metadata": 1}',
        ]
    )
    (ctx.ckpt / INDEX).write_bytes(text)
    return f"index file is {text[:30]!r}"


@mutator()
def index_beside_single_file(ctx: Ctx) -> str:
    """An index next to model.safetensors that names only part of it."""
    names = sorted(load_file(str(ctx.ckpt / "model.safetensors")))
    keep = names[: ctx.rng.randint(0, len(names))]
    (ctx.ckpt / INDEX).write_text(json.dumps({"weight_map": {k: "model.safetensors" for k in keep}}))
    return f"index beside model.safetensors listing {len(keep)} of {len(names)} tensors"


# ------------------------------------------------------------------------------------------ planted code
class _Payload:
    """Unpickling this creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pickle')",))


@mutator()
def pickled_weights(ctx: Ctx) -> str:
    name = ctx.rng.choice(["pytorch_model.bin", "model.pt", "model.pth", "model.ckpt", "weights.pkl"])
    how = ctx.rng.choice(["instead", "beside", "as-safetensors"])
    payload = {"model.embed_tokens.weight": _Payload(ctx.dirs.marker)}
    if how == "as-safetensors":
        (ctx.ckpt / "model.safetensors").write_bytes(pickle.dumps(payload))
        return "model.safetensors holds a pickle that runs code"
    torch.save(payload, ctx.ckpt / name)
    if how == "instead":
        (ctx.ckpt / "model.safetensors").unlink()
    return f"{name} (a pickle that runs code) {how} model.safetensors"


def _plant_code(ctx: Ctx, module: str) -> None:
    (ctx.ckpt / f"{module}.py").write_text(
        f"open({str(ctx.dirs.marker)!r}, 'w').write({module!r})\n"
        "from transformers import PreTrainedTokenizerFast, PretrainedConfig\n"
        "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n"
        "class EvilConfig(PretrainedConfig):\n    model_type = 'evil'\n"
    )


@mutator()
def tokenizer_auto_map(ctx: Ctx) -> str:
    _plant_code(ctx, "tokenization_evil")
    value = ctx.rng.choice(
        [
            {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]},
            {"AutoTokenizer": [None, "tokenization_evil.EvilTokenizer"]},
            {"AutoTokenizer": "tokenization_evil.EvilTokenizer"},
            "tokenization_evil.EvilTokenizer",
            ["tokenization_evil.EvilTokenizer", "tokenization_evil.EvilTokenizer"],
            {"AutoTokenizer": [None, None]},
            {"AutoTokenizer": [5, {}]},
            {"AutoConfig": "tokenization_evil.EvilConfig"},
        ]
    )
    raw = json.loads((ctx.ckpt / "tokenizer_config.json").read_text())
    raw["auto_map"] = value
    if ctx.rng.random() < 0.5:
        raw["tokenizer_class"] = "EvilTokenizer"
    (ctx.ckpt / "tokenizer_config.json").write_text(json.dumps(raw))
    return f"tokenizer_config.json auto_map = {value!r} (tokenization_evil.py planted)"


@mutator()
def config_auto_map(ctx: Ctx) -> str:
    _plant_code(ctx, "configuration_evil")
    _plant_code(ctx, "tokenization_evil")
    raw = json.loads((ctx.ckpt / "config.json").read_text())
    raw["auto_map"] = {
        "AutoConfig": "configuration_evil.EvilConfig",
        "AutoTokenizer": ["tokenization_evil.EvilTokenizer", None],
    }
    if ctx.rng.random() < 0.5:
        raw["model_type"] = "evil"
    raw["trust_remote_code"] = True
    (ctx.ckpt / "config.json").write_text(json.dumps(raw))
    tok = json.loads((ctx.ckpt / "tokenizer_config.json").read_text())
    tok.pop("tokenizer_class", None)
    (ctx.ckpt / "tokenizer_config.json").write_text(json.dumps(tok))
    return f"config.json auto_map names planted code (model_type {raw['model_type']})"


@mutator()
def unknown_tokenizer_class(ctx: Ctx) -> str:
    _plant_code(ctx, "tokenization_evil")
    raw = json.loads((ctx.ckpt / "tokenizer_config.json").read_text())
    raw["tokenizer_class"] = ctx.rng.choice(["EvilTokenizer", "EvilTokenizerFast", "", 5, None, ["a"], "os.system"])
    (ctx.ckpt / "tokenizer_config.json").write_text(json.dumps(raw))
    return f"tokenizer_class = {raw['tokenizer_class']!r}"


# ------------------------------------------------------------------------------------------ chat templates
@mutator("chat")
def chat_template_value(ctx: Ctx) -> str:
    name, template = ctx.rng.choice(sorted(templates.catalog(ctx.dirs.marker).items(), key=lambda kv: kv[0]))
    set_chat_template(ctx.ckpt, template)
    ctx.command = "chat"
    return f"chat_template {name}"


@mutator("chat")
def chat_template_file(ctx: Ctx) -> str:
    file = ctx.ckpt / "chat_template.jinja"
    how = ctx.rng.choice(["trick", "fifo", "link-out", "not-utf8", "random"])
    if how == "trick":
        file.write_text(templates.catalog(ctx.dirs.marker)["cycler-globals-os"])
    elif how == "fifo":
        os.mkfifo(file)
    elif how == "link-out":
        ctx.outside("chat_template.jinja").write_text("{{ 'outside' }}")
        file.symlink_to(ctx.outside("chat_template.jinja"))
        ctx.linked_out.add(file.name)
    elif how == "not-utf8":
        file.write_bytes(b"\xff\xfe{{ bos_token }}")
    else:
        file.write_text(templates.random_template(ctx.rng))
    ctx.command = "chat"
    return f"chat_template.jinja: {how}"


# ------------------------------------------------------------------------------------------ config.json, tokenizer files
@mutator()
def config_fields(ctx: Ctx) -> str:
    raw = json.loads((ctx.ckpt / "config.json").read_text())
    done = mutate_config(raw, ctx.rng, ctx.rng.randint(1, 3))
    (ctx.ckpt / "config.json").write_text(json.dumps(raw))
    return "config.json " + ", ".join(done)


@mutator()
def config_text(ctx: Ctx) -> str:
    good = (ctx.ckpt / "config.json").read_bytes()
    text = ctx.rng.choice(
        [
            b"\xff\xfe" + good,
            b"\xef\xbb\xbf" + good,
            b"[]",
            b"null",
            b"{" * 100_000,
            good[:-3],
            good.replace(b"{", b'{"a": NaN,', 1),
            b'{"model_type": "deepseek_v3"}',
        ]
    )
    (ctx.ckpt / "config.json").write_bytes(text)
    return f"config.json is {text[:30]!r}..."


@mutator()
def tokenizer_fields(ctx: Ctx) -> str:
    name = ctx.rng.choice(["tokenizer_config.json", "special_tokens_map.json", "tokenizer.json", "added_tokens.json"])
    path = ctx.ckpt / name
    raw = json.loads(path.read_text()) if path.exists() else {}
    keys = sorted(raw) or ["bos_token"]
    keys += ["model_max_length", "bos_token", "eos_token", "added_tokens_decoder", "padding_side", "chat_template"]
    key = ctx.rng.choice(keys)
    raw[key] = weird(ctx.rng, raw.get(key))
    path.write_text(json.dumps(raw))
    return f"{name} {key} = {raw[key]!r:.40}"


# ------------------------------------------------------------------------------------------ the test
def _build(i: int, bases: dict[str, Path], dirs: CaseDirs, rng: random.Random) -> tuple[str, Ctx]:
    picks = [MUTATORS[i % len(MUTATORS)]]
    if i % 4 == 3:  # stacked with a second mutator on the same base
        picks.append(rng.choice([m for m in MUTATORS if m[1] == picks[0][1]]))
    ctx = Ctx(dirs, copy_base(bases[picks[0][1]], dirs), rng)
    described = [f"{picks[0][0]}: {picks[0][2](ctx)}"]
    for name, _, fn in picks[1:]:
        try:
            described.append(f"{name}: {fn(ctx)}")
        except (OSError, ValueError, TypeError, KeyError, AttributeError, IndexError, RuntimeError, SafetensorError):
            pass  # the first mutation left nothing this one applies to (e.g. the index is no longer JSON)
    return "; ".join(described), ctx


def test_fuzz_checkpoints(bases, case_root):
    with AreaTimer(AREA):
        for i in range(cases_for(AREA)):
            rng = random.Random(f"{AREA}:{i}")
            dirs = new_case(case_root, AREA, i)
            described, ctx = _build(i, bases, dirs, rng)
            cmd, argv, codes = command_on(ctx.ckpt, dirs, rng, (ctx.command,) if ctx.command else None)
            refuse = ctx.refuse
            read = {n for n in ctx.linked_out if n in READ_BY_ALL or cmd == "convert"}
            if read and refuse is None:
                refuse = f"{sorted(read)} lead out of the checkpoint"
            run_cli_case(AREA, f"[{i}] {described} | dsv3 {cmd}", dirs, argv, codes, refuse)
    assert_clean(AREA)
