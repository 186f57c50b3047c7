"""The checkpoint's tokenizer, loaded from a checked copy of its files: no remote code, no prompt;
its chat templates render within limits (dsv3.runtime.chat_template)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from ..errors import Dsv3Error
from ..model.config import read_file_bytes
from .checkpoint import (
    inside_checkpoint,
)

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


def load_tokenizer(path: Path):
    """The checkpoint's tokenizer (None when it has none), loaded without ever running checkpoint code.

    A tokenizer_config.json whose ``auto_map`` names a class (a ``tokenization_*.py`` of the checkpoint)
    is refused in one line: dsv3 does not run it, and transformers is never asked (on a terminal it
    would offer to run it). transformers also gets ``trust_remote_code=False`` and only the files of
    ``TOKENIZER_FILES``. Chat templates then render within limits (``dsv3.runtime.chat_template``).
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
