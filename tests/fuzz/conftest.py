"""Fixtures of the fuzz suite (tiny checkpoints built once per session) and its summary.

The summary table (cases per area and what they ended in) is printed at the end of the session;
DSV3_FUZZ_REPORT=FILE also writes it as JSON.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from tests.fuzz.harness import STATS
from tests.helpers import add_tiny_tokenizer, make_checkpoint

INDEX = "model.safetensors.index.json"
#: A harmless chat template (the one of tests/runtime/test_serve.py).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}and{% endif %}"
)


def set_chat_template(path: Path, template: object) -> None:
    """Put ``template`` (any JSON value) into ``path``'s tokenizer_config.json as its chat_template."""
    file = path / "tokenizer_config.json"
    raw = json.loads(file.read_text())
    raw["chat_template"] = template
    file.write_text(json.dumps(raw))


def split_in_two(path: Path) -> None:
    """Turn ``path``'s model.safetensors into two shards and an index (the released layout)."""
    tensors = load_file(str(path / "model.safetensors"))
    names = sorted(tensors)
    first, second = names[: len(names) // 2], names[len(names) // 2 :]
    shards = {"model-00001-of-00002.safetensors": first, "model-00002-of-00002.safetensors": second}
    weight_map = {}
    for fname, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(path / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in keys})
    (path / "model.safetensors").unlink()
    (path / INDEX).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}, indent=2))


@pytest.fixture(scope="session")
def bases(tmp_path_factory) -> dict[str, Path]:
    """The unmutated checkpoints every case copies: plain (single file, tokenizer, one MTP layer),
    sharded (the same weights in two shards with an index) and chat (plain with a chat template)."""
    root = tmp_path_factory.mktemp("fuzz-bases")
    plain = make_checkpoint(root / "plain", seed=0, mtp=True)
    add_tiny_tokenizer(plain)
    sharded = Path(shutil.copytree(plain, root / "sharded"))
    split_in_two(sharded)
    chat = Path(shutil.copytree(plain, root / "chat"))
    set_chat_template(chat, CHAT_TEMPLATE)
    return {"plain": plain, "sharded": sharded, "chat": chat}


@pytest.fixture(scope="session")
def case_root(tmp_path_factory) -> Path:
    """Where the case directories go (a failing case's directory is kept, named in its reproducer)."""
    return tmp_path_factory.mktemp("fuzz-cases")


def pytest_terminal_summary(terminalreporter) -> None:
    if not STATS.counts:
        return
    terminalreporter.write_sep("=", "dsv3 fuzz summary")
    terminalreporter.write_line(STATS.table())
    report = os.environ.get("DSV3_FUZZ_REPORT")
    if report:
        Path(report).write_text(json.dumps(STATS.to_json(), indent=2) + "\n")
        terminalreporter.write_line(f"dsv3 fuzz: wrote {report}")
