"""Loading never trusts a checkpoint's paths, code or sizes (issue 17, deliverable 2).

Each bad checkpoint ends in one Dsv3Error line naming the file, tensor or field, within seconds:
shard names that lead out of the directory, a tensor stored twice, index entries of the wrong type,
a tokenizer that needs the checkpoint's own Python code (under a pseudo-terminal, where transformers
used to ask "Do you wish to run the custom code? [y/N]"), chat templates that loop, blow up or misbehave,
FIFOs and devices where files should be, configs with impossible values, and weights holding NaN.
Cases that could hang on a defect run in a thread or a child process with a timeout.
"""

from __future__ import annotations

import json
import os
import pty
import select
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import dsv3
from dsv3.errors import Dsv3Error
from dsv3.model.config import config_from_dict, load_config
from dsv3.model.graph import ROPE_POSITIONS
from dsv3.model.rope import cos_sin_table
from dsv3.runtime import chat_template
from dsv3.runtime.checkpoint import has_nonfinite
from dsv3.runtime.loading import build_model
from tests.helpers import TINY, add_tiny_tokenizer

INDEX = "model.safetensors.index.json"
GEN = ["--dtype", "float32", "--temperature", "0", "--max-new-tokens", "2"]


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def _load_error(path: Path, **kw) -> str:
    """The one-line Dsv3Error that loading ``path`` gives (the test fails if loading succeeds)."""
    with pytest.raises(Dsv3Error) as info:
        dsv3.load(path, dtype="float32", progress=False, **kw)
    message = str(info.value)
    assert "\n" not in message
    return message


def _with_index(path: Path, weight_map) -> Path:
    (path / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def _split(path: Path, moved: list[str], shard: str = "model-00002-of-00002.safetensors") -> dict[str, str]:
    """Move ``moved`` tensors of model.safetensors into ``shard``; the index that describes the result."""
    tensors = load_file(str(path / "model.safetensors"))
    save_file({k: tensors.pop(k) for k in moved}, str(path / shard), metadata={"format": "pt"})
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return {**{k: "model.safetensors" for k in tensors}, **{k: shard for k in moved}}


# ------------------------------------------------------------------------------------------ shard paths
@pytest.mark.parametrize("how", ["dot-dot", "absolute", "symlink-out"])
def test_an_index_entry_leading_out_of_the_directory_is_refused(tiny_ckpt, tmp_path, how):
    """The weights outside are a valid copy: before, dsv3 read them and loaded without a word."""
    ckpt = _copy(tiny_ckpt, tmp_path / "ckpt")
    outside = tmp_path / "elsewhere.safetensors"
    shutil.move(ckpt / "model.safetensors", outside)
    names = list(load_file(str(outside)))
    target = {"dot-dot": "../elsewhere.safetensors", "absolute": str(outside), "symlink-out": "link.safetensors"}[how]
    if how == "symlink-out":
        (ckpt / "link.safetensors").symlink_to(outside)
    _with_index(ckpt, {name: target for name in names})
    message = _load_error(ckpt)
    assert INDEX in message and f"tensor {names[0]}" in message
    assert "outside the checkpoint directory" in message or "absolute path" in message


def test_a_safetensors_file_linking_out_of_the_directory_is_refused(tiny_ckpt, tmp_path):
    ckpt = _copy(tiny_ckpt, tmp_path / "ckpt")
    outside = tmp_path / "elsewhere.safetensors"
    shutil.move(ckpt / "model.safetensors", outside)
    (ckpt / "model.safetensors").symlink_to(outside)
    message = _load_error(ckpt)
    assert "ckpt/model.safetensors" in message and "outside the checkpoint directory" in message


def test_a_hugging_face_cache_snapshot_loads(tiny_ckpt, tmp_path):
    """snapshots/<rev>/ links into the repository's blobs/: the one way out that is allowed."""
    repo = tmp_path / "models--org--tiny"
    snapshot = repo / "snapshots" / "0123abc"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    add_tiny_tokenizer(_copy(tiny_ckpt, tmp_path / "plain"))
    for i, file in enumerate(sorted((tmp_path / "plain").iterdir())):
        shutil.copy(file, repo / "blobs" / f"blob{i}")
        (snapshot / file.name).symlink_to(f"../../blobs/blob{i}")
    engine = dsv3.load(snapshot, dtype="float32", progress=False)
    assert engine.encode("the cat", chat=False) == [0, 3, 5]


# ------------------------------------------------------------------------------------ tensors stored twice
def test_a_tensor_in_two_files_without_an_index_is_refused(tiny_ckpt, tmp_path):
    """Before, the file sorted last silently won."""
    ckpt = _copy(tiny_ckpt, tmp_path / "ckpt")
    twin = {"lm_head.weight": torch.zeros_like(load_file(str(ckpt / "model.safetensors"))["lm_head.weight"])}
    save_file(twin, str(ckpt / "model-zz.safetensors"), metadata={"format": "pt"})
    message = _load_error(ckpt)
    assert "lm_head.weight" in message and "stored once" in message and "model-zz.safetensors" in message


def test_a_tensor_in_two_files_of_an_index_is_refused(tiny_ckpt, tmp_path):
    ckpt = _copy(tiny_ckpt, tmp_path / "ckpt")
    weight_map = _split(ckpt, ["lm_head.weight"])
    tensors = load_file(str(ckpt / "model-00002-of-00002.safetensors"))
    tensors["model.norm.weight"] = torch.ones(TINY["hidden_size"])  # a second copy, not in the index
    save_file(tensors, str(ckpt / "model-00002-of-00002.safetensors"), metadata={"format": "pt"})
    message = _load_error(_with_index(ckpt, weight_map))
    assert "model.norm.weight" in message and "stored once" in message


def test_a_split_checkpoint_with_a_correct_index_loads(tiny_ckpt, tmp_path):
    ckpt = _copy(tiny_ckpt, tmp_path / "ckpt")
    _with_index(ckpt, _split(ckpt, ["lm_head.weight", "model.norm.weight"]))
    assert dsv3.load(ckpt, dtype="float32", progress=False).model.head.weight.shape[0] == TINY["vocab_size"]


@pytest.mark.parametrize(
    "index, must",
    [
        ({"weight_map": ["model.safetensors"]}, "weight_map"),
        ({"metadata": {}}, "no weight_map"),
        ([1, 2], "no weight_map"),
        ({"weight_map": {"lm_head.weight": 5}}, "tensor lm_head.weight"),
        ({"weight_map": {"lm_head.weight": None}}, "tensor lm_head.weight"),
        ('{"weight_map": {"lm_head.weight": "model.safetensors", "lm_head.weight": "x.safetensors"}}', "twice"),
        ({"weight_map": {"no.such.tensor": "model.safetensors"}}, "no.such.tensor"),
    ],
    ids=["list", "missing", "not-an-object", "int-name", "null-name", "key-twice", "listed-not-held"],
)
def test_an_index_of_the_wrong_shape_gets_one_line(tiny_ckpt, tmp_path, index, must):
    ckpt = _copy(tiny_ckpt, tmp_path / "ckpt")
    (ckpt / INDEX).write_text(index if isinstance(index, str) else json.dumps(index))
    message = _load_error(ckpt)
    assert INDEX in message or "model.safetensors" in message
    assert must in message


# ------------------------------------------------------------------------------------- tokenizer code
def _remote_code_checkpoint(tiny_ckpt: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A checkpoint whose tokenizer_config.json maps AutoTokenizer to its own tokenization_evil.py."""
    ckpt = add_tiny_tokenizer(_copy(tiny_ckpt, tmp_path / "ckpt"))
    marker = tmp_path / "CHECKPOINT_CODE_RAN"
    config = json.loads((ckpt / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": [None, "tokenization_evil.EvilTokenizer"]}
    (ckpt / "tokenizer_config.json").write_text(json.dumps(config))
    (ckpt / "tokenization_evil.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "from transformers import PreTrainedTokenizerFast\n\n\n"
        "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n"
    )
    return ckpt, marker


def _run_on_a_terminal(argv: list[str], env: dict, timeout: float) -> tuple[bytes, int | None]:
    """Run argv with a pseudo-terminal as stdin/stdout/stderr; answer "y" to a yes/no prompt as a user might.

    Returns everything written and the exit status (None: still running at the timeout, then killed).
    """
    pid, fd = pty.fork()
    if pid == 0:  # the child: become the command at once
        try:
            os.execve(argv[0], argv, env)
        finally:
            os._exit(127)
    output, answered, status = b"", False, None
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if select.select([fd], [], [], 0.2)[0]:
                try:
                    chunk = os.read(fd, 4096)
                except OSError:  # EIO: the child closed the terminal
                    chunk = b""
                output += chunk
                if b"[y/N]" in output and not answered:
                    os.write(fd, b"y\n")
                    answered = True
                if chunk:
                    continue
            done, code = os.waitpid(pid, os.WNOHANG)
            if done:
                status = os.waitstatus_to_exitcode(code)
                break
    finally:
        if status is None:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(fd)
    return output, status


def test_a_tokenizer_needing_checkpoint_code_is_refused_on_a_terminal_without_a_prompt(tiny_ckpt, tmp_path):
    """Before: transformers asked "Do you wish to run the custom code? [y/N]" and "y" ran the checkpoint's file."""
    ckpt, marker = _remote_code_checkpoint(tiny_ckpt, tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf"), "PYTHONWARNINGS": "ignore"}
    argv = [sys.executable, "-m", "dsv3", "run", "--ckpt-path", str(ckpt), "--prompt", "the cat", *GEN]
    output, status = _run_on_a_terminal(argv, env, timeout=120)
    text = output.decode(errors="replace")
    assert b"Do you wish" not in output and b"[y/N]" not in output, text
    assert not marker.exists(), "the checkpoint's tokenization_evil.py ran"
    assert status == 2, text
    assert "dsv3: error:" in text and "tokenizer_config.json" in text and "custom code" in text, text
    assert "Traceback" not in text


def test_the_api_refuses_remote_code_tokenizers_too(tiny_ckpt, tmp_path):
    ckpt, marker = _remote_code_checkpoint(tiny_ckpt, tmp_path)
    message = _load_error(ckpt)
    assert "custom code" in message and "EvilTokenizer" in message and not marker.exists()


def test_tokenizer_config_naming_outside_files_is_not_followed(tiny_ckpt, tmp_path):
    """fast_tokenizer_files names a tokenizer file per transformers version; it must not lead outside."""
    ckpt = add_tiny_tokenizer(_copy(tiny_ckpt, tmp_path / "ckpt"))
    (tmp_path / "other.json").write_text("not a tokenizer")
    config = json.loads((ckpt / "tokenizer_config.json").read_text())
    config["fast_tokenizer_files"] = ["tokenizer.4.0.0.json", "../../other.json"]
    (ckpt / "tokenizer_config.json").write_text(json.dumps(config))
    engine = dsv3.load(ckpt, dtype="float32", progress=False)
    assert engine.encode("the cat", chat=False) == [0, 3, 5]


# ------------------------------------------------------------------------------------- chat templates
@pytest.fixture(scope="module")
def chat_engine(tiny_ckpt, tmp_path_factory):
    return dsv3.load(add_tiny_tokenizer(_copy(tiny_ckpt, tmp_path_factory.mktemp("chat") / "ckpt")), dtype="float32")


def _within(fn, seconds: float):
    """fn() in a daemon thread: (finished in time, its result or exception)."""
    box: dict = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            box["value"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    return not thread.is_alive(), box.get("value")


def _chat_error(engine, template: str, seconds: float = 60) -> tuple[str, float]:
    """The Dsv3Error line of encoding a chat prompt through ``template``, and how long it took."""
    engine.tokenizer.chat_template = template
    start = time.monotonic()
    try:
        done, value = _within(lambda: engine.encode("the cat", chat=True), seconds)
    finally:
        engine.tokenizer.chat_template = None
    took = time.monotonic() - start
    assert done, f"rendering {template!r} was still running after {seconds} s"
    assert isinstance(value, Dsv3Error), f"{template!r} gave {value!r}"
    assert "\n" not in str(value)
    return str(value), took


def test_a_plain_template_renders_as_transformers_does(chat_engine):
    from transformers import AutoTokenizer

    template = "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    template += "{% if add_generation_prompt %}<assistant>{% endif %}"
    ref = AutoTokenizer.from_pretrained(str(chat_engine.path))
    ref.chat_template = chat_engine.tokenizer.chat_template = template
    try:
        messages = [{"role": "user", "content": "the cat sat"}]
        want = ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert chat_engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == want
        ids = ref.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
        assert chat_engine.encode("the cat sat", chat=True) == ids
    finally:
        chat_engine.tokenizer.chat_template = None


def test_a_runaway_loop_is_stopped_at_the_time_limit(chat_engine, monkeypatch):
    monkeypatch.setattr(chat_template, "TIME_LIMIT_S", 1.0)
    chat_template.render("warm", [[{"role": "user", "content": "x"}]], "warm-up")  # start the renderer first
    pid = chat_template._renderer.proc.pid
    loop = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    message, took = _chat_error(chat_engine, loop)
    assert "1 s render limit" in message and took < 20
    with pytest.raises(ProcessLookupError):  # the renderer running it was stopped, not left spinning
        os.kill(pid, 0)
    chat_engine.tokenizer.chat_template = "{{ messages[0]['content'] }}"  # and the next render works
    try:
        assert chat_engine.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "hi"
    finally:
        chat_engine.tokenizer.chat_template = None


def test_ctrl_c_mid_render_leaves_no_answer_for_the_next_render(chat_engine):
    """Found in review: an interrupted render left its answer in the pipe, read as the next render's."""
    slow = "{% for i in range(100000) %}{% for j in range(100) %}{% endfor %}{% endfor %}SLOW"
    conv = [[{"role": "user", "content": "x"}]]
    chat_template.render("warm", conv, "warm-up")

    def interrupt(*_):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 0.3)
    try:
        with pytest.raises(KeyboardInterrupt):
            chat_template.render(slow, conv, "slow")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert chat_template.render("B{{ messages[0]['content'] }}", conv, "b") == ["Bx"]
    assert chat_template.render("C{{ messages[0]['content'] }}", conv, "c") == ["Cx"]


def test_the_renderer_ignores_the_terminals_ctrl_c(chat_engine):
    """Ctrl-C reaches the whole foreground process group: the renderer must leave it to dsv3."""
    conv = [[{"role": "user", "content": "x"}]]
    chat_template.render("warm", conv, "warm-up")
    proc = chat_template._renderer.proc
    os.kill(proc.pid, signal.SIGINT)
    time.sleep(0.3)
    assert proc.poll() is None and chat_template._renderer.proc is proc
    assert chat_template.render("{{ messages[0]['content'] }}", conv, "after") == ["x"]


@pytest.mark.parametrize(
    "template, must",
    [
        ("{% for i in range(10**9) %}x{% endfor %}", "Range too big"),
        ("{{ 'x' * 10**9 }}", "MiB of memory"),
        ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "unsafe"),
        ("{{ raise_exception('roles must alternate') }}", "roles must alternate"),
        ("{% for m in messages %}{{ m['content'] }", "failed"),
        ("{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", "recursed too deeply"),
    ],
    ids=["range-1e9", "huge-string", "unsafe-attribute", "raise-exception", "syntax-error", "recursion"],
)
def test_a_misbehaving_template_ends_in_one_line(chat_engine, template, must):
    message, took = _chat_error(chat_engine, template)
    assert "chat template" in message and must in message and took < 30


def test_a_template_that_outputs_a_lone_surrogate_is_one_line(chat_engine):
    """Found by tests/fuzz: the tokenizer raised TypeError on the rendered text before."""
    message, _ = _chat_error(chat_engine, "\ud800{{ messages[0]['content'] }}")
    assert "chat template's output" in message and "lone surrogate" in message


def test_output_past_the_size_limit_is_refused(chat_engine, monkeypatch):
    monkeypatch.setattr(chat_template, "MAX_OUTPUT_CHARS", 10_000)
    message, _ = _chat_error(chat_engine, "{% for i in range(1000) %}{{ 'ab' * 50 }}{% endfor %}")
    assert "100000 characters" in message and "10000" in message


# -------------------------------------------------------------------------------- FIFOs and devices
def _in_child(fn, seconds: float) -> str | None:
    """fn() in a forked child: "Dsv3Error: <message>" or what else it ended with; None if it ran past ``seconds``.

    A child, not a thread: safetensors opens files while holding the GIL, so a thread blocked on a FIFO
    froze the whole test process.
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            try:
                fn()
                outcome = "returned"
            except Dsv3Error as exc:
                outcome = f"Dsv3Error: {exc}"
            except BaseException as exc:  # noqa: BLE001 - reported to the parent
                outcome = repr(exc)
            os.write(write_end, outcome.encode(errors="replace"))
        finally:
            os._exit(0)
    os.close(write_end)
    try:
        if not select.select([read_end], [], [], seconds)[0]:
            os.kill(pid, signal.SIGKILL)
            return None
        chunks = []
        while chunk := os.read(read_end, 65536):
            chunks.append(chunk)
        return b"".join(chunks).decode()
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)


@pytest.mark.parametrize("name", ["config.json", INDEX, "model.safetensors", "tokenizer.json"])
def test_a_fifo_where_a_file_should_be_is_refused_without_hanging(tiny_ckpt, tmp_path, name):
    """Before, opening the FIFO blocked for ever (until someone wrote to it)."""
    ckpt = add_tiny_tokenizer(_copy(tiny_ckpt, tmp_path / "ckpt"))
    if (ckpt / name).exists():
        (ckpt / name).unlink()
    os.mkfifo(ckpt / name)
    outcome = _in_child(lambda: dsv3.load(ckpt, dtype="float32", progress=False), 60)
    assert outcome is not None, f"loading with a FIFO as {name} hung"
    assert outcome.startswith("Dsv3Error: ") and name in outcome and "FIFO" in outcome, outcome


def test_a_device_where_a_shard_should_be_is_refused(tiny_ckpt, tmp_path):
    ckpt = _copy(tiny_ckpt, tmp_path / "ckpt")
    (ckpt / "model.safetensors").unlink()
    (ckpt / "model.safetensors").symlink_to("/dev/zero")
    assert "model.safetensors" in _load_error(ckpt)


def test_a_fifo_config_given_with_config_is_refused(tmp_path):
    fifo = tmp_path / "config.json"
    os.mkfifo(fifo)
    outcome = _in_child(lambda: load_config(fifo), 60)
    assert outcome is not None and outcome.startswith("Dsv3Error: ") and "FIFO" in outcome, outcome


# ---------------------------------------------------------------------------------------- configs
@pytest.mark.parametrize(
    "change, must",
    [
        ({"model_type": ["deepseek_v3"]}, "model_type"),
        ({"rope_scaling": {**TINY["rope_scaling"], "factor": "abc"}}, "rope_scaling.factor"),
        ({"rope_scaling": {**TINY["rope_scaling"], "original_max_position_embeddings": [32]}}, "original_max"),
        ({"rope_scaling": {**TINY["rope_scaling"], "mscale_all_dim": -20.0}}, "mscale_all_dim"),
        ({"rope_theta": 0}, "rope_theta"),
        ({"rope_theta": -1.0}, "rope_theta"),
        ({"rms_norm_eps": 0}, "rms_norm_eps"),
        ({"rms_norm_eps": float("nan")}, "rms_norm_eps"),
        ({"routed_scaling_factor": float("inf")}, "routed_scaling_factor"),
        ({"routed_scaling_factor": -2.5}, "routed_scaling_factor"),
        ({"hidden_size": -32}, "hidden_size"),
        ({"moe_intermediate_size": 0}, "moe_intermediate_size"),
        ({"moe_layer_freq": 0}, "moe_layer_freq"),
        ({"n_group": 0}, "n_group"),
        ({"num_nextn_predict_layers": -1}, "num_nextn_predict_layers"),
        ({"bos_token_id": 96}, "bos_token_id"),
        ({"eos_token_id": [1, -1]}, "eos_token_id"),
        ({"max_position_embeddings": 10**9}, "max_position_embeddings"),
        ({"num_hidden_layers": 10**6}, "num_hidden_layers"),
        ({"hidden_size": 10**400}, "hidden_size"),
        ({"quantization_config": {"quant_method": "fp8", "weight_block_size": 128}}, "weight_block_size"),
        ({"rope_scaling": None, "rope_theta": None, "rope_parameters": {"rope_theta": "big"}}, "rope_theta"),
    ],
)
def test_an_impossible_config_value_is_named(change, must):
    raw = {**TINY, **change}
    if raw.get("rope_theta", 0) is None:
        del raw["rope_theta"]
    with pytest.raises(Dsv3Error) as info:
        config_from_dict(raw, "ckpt/config.json")
    assert str(info.value).startswith("ckpt/config.json: ") and must in str(info.value)
    assert "\n" not in str(info.value) and len(str(info.value)) < 200


@pytest.mark.parametrize(
    "content, must", [(b"\xff\xfe{}", "not UTF-8"), (b"{'hidden_size': 7}", "cannot parse"), (b"[" * 100000, "parse")]
)
def test_a_config_that_is_not_utf8_json_is_named(tmp_path, content, must):
    (tmp_path / "config.json").write_bytes(content)
    with pytest.raises(Dsv3Error) as info:
        load_config(tmp_path)
    assert "config.json" in str(info.value) and must in str(info.value)


def test_the_rope_tables_grow_with_the_run_not_the_config():
    """A config may allow 2**24 positions: the tables start small and double as positions are used."""
    cfg = config_from_dict({**TINY, "max_position_embeddings": 2**24})
    model = build_model(cfg, dtype="float32", device="meta")
    assert model.rope_cos.shape[0] == ROPE_POSITIONS  # was 2**24 rows built up front
    cos, sin = model.rope(torch.tensor([[3, ROPE_POSITIONS + 5]]))
    assert model.rope_cos.shape[0] == 2 * ROPE_POSITIONS
    full_cos, full_sin = cos_sin_table(cfg, 3 * ROPE_POSITIONS)
    assert torch.equal(cos[0], full_cos[[3, ROPE_POSITIONS + 5]]) and torch.equal(
        sin[0], full_sin[[3, ROPE_POSITIONS + 5]]
    )
    with pytest.raises(Dsv3Error, match="max_position_embeddings"):
        model.extend_rope(2**24 + 1)


def test_layers_the_checkpoint_lacks_are_refused_before_building(tiny_ckpt, tmp_path):
    ckpt = _copy(tiny_ckpt, tmp_path / "ckpt")
    config = json.loads((ckpt / "config.json").read_text())
    config.update(num_hidden_layers=4000, num_nextn_predict_layers=0)
    (ckpt / "config.json").write_text(json.dumps(config))
    start = time.monotonic()
    message = _load_error(ckpt)
    assert "4000 layers declared" in message and "layer 4" in message and time.monotonic() - start < 10


# ------------------------------------------------------------------------------------ YAML configs
def test_a_yaml_config_with_aliases_is_refused_at_once(tmp_path):
    """Found by tests/fuzz: nine nested aliases expand to 9**9 strings (a hang, then out of memory)."""
    bomb = "a: &a ['x','x','x','x','x','x','x','x','x']\n" + "".join(
        f"{c}: &{c} [*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p}]\n"
        for p, c in zip("abcdefgh", "bcdefghi", strict=True)
    )
    (tmp_path / "config.yaml").write_text(bomb)
    start = time.monotonic()
    with pytest.raises(Dsv3Error, match=r"config.yaml: cannot parse: YAML aliases .* not allowed"):
        load_config(tmp_path / "config.yaml")
    assert time.monotonic() - start < 5


# ------------------------------------------------------------------------------------ non-finite weights
@pytest.mark.parametrize(
    "name", ["model.layers.0.self_attn.kv_a_layernorm.weight", "model.layers.2.mlp.experts.5.up_proj.weight"]
)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_weight_holding_nan_or_inf_is_named(tiny_ckpt, tmp_path, name, bad):
    """Before, it loaded and generation failed with "probability tensor contains either inf, nan"."""
    ckpt = _copy(tiny_ckpt, tmp_path / "ckpt")
    tensors = load_file(str(ckpt / "model.safetensors"))
    tensors[name].view(-1)[1] = bad
    save_file(tensors, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    message = _load_error(ckpt)
    assert name in message and "NaN or infinite" in message


def test_a_finite_weight_that_overflows_is_one_line_not_a_sampling_error(tiny_ckpt, tmp_path):
    """Found by tests/fuzz: a finite 3e38 passes the load check, makes inf logits, and sampling raised
    "probability tensor contains either inf, nan" before."""
    ckpt = _copy(tiny_ckpt, tmp_path / "ckpt")
    tensors = load_file(str(ckpt / "model.safetensors"))
    tensors["lm_head.weight"].view(-1)[:64] = 3e38
    save_file(tensors, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    engine = dsv3.load(ckpt, dtype="float32", progress=False)
    for mtp in (0, 1):  # plain decoding and the speculative decoder
        with pytest.raises(Dsv3Error) as info:
            engine.generate([[3, 4, 5]], max_new_tokens=2, temperature=1.0, seed=0, mtp=mtp)
        assert "logits hold inf or NaN" in str(info.value) and "\n" not in str(info.value)


def test_nonfinite_detection_per_dtype():
    fp8 = torch.tensor([0.5, -448.0, 448.0]).to(torch.float8_e4m3fn)
    assert not has_nonfinite(fp8)  # 448 is e4m3fn's largest value, 0x7E / 0xFE: not a NaN
    for nan_byte in (0x7F, 0xFF):
        bad = fp8.view(torch.uint8).clone()
        bad[1] = nan_byte
        assert has_nonfinite(bad.view(torch.float8_e4m3fn))
    assert has_nonfinite(torch.tensor([1.0, float("inf")]).to(torch.float8_e5m2))
    assert not has_nonfinite(torch.tensor([-128, 127], dtype=torch.int8))
    big = torch.full((1000,), 60000.0, dtype=torch.float16)  # the sum overflows; every value is finite
    assert not big.sum().isfinite() and not has_nonfinite(big)
    big[7] = float("nan")
    assert has_nonfinite(big)
    for dtype in (torch.bfloat16, torch.float32):
        t = torch.randn(64, dtype=dtype)
        assert not has_nonfinite(t)
        t[3] = float("-inf")
        assert has_nonfinite(t)


def test_a_prompt_with_a_lone_surrogate_is_one_line_from_the_python_api():
    engine = dsv3.load(progress=False)  # the embedded model: it has a tokenizer
    with pytest.raises(Dsv3Error, match="prompt is not valid Unicode"):
        engine.generate(["def f(\ud800):"], max_new_tokens=1)
