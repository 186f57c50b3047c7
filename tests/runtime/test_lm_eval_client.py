"""lm-evaluation-harness as a client of ``dsv3 serve``: ``local-completions`` on a loglikelihood task and
``local-chat-completions`` on a generate_until task, each a task YAML of our own over a local JSONL file
(nothing is downloaded), against a float32 server started here.

The loglikelihoods lm-eval reports must equal the ones computed directly from :meth:`Engine.logits` over
the very token ids lm-eval sent (its own ``_encode_pair``), to 1e-4: the server and the reference run the
same float32 model and differ only in how the work is split (cached prefill in the server, one uncached
forward here), which moves float32 log-probabilities by ~1e-6.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi", reason="dsv3 serve needs the 'serve' extra (fastapi, uvicorn)")
lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness is the test client (the 'test' extra)")

from lm_eval.models.openai_completions import LocalChatCompletion, LocalCompletionsAPI  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from tests.runtime import test_serve  # noqa: E402
from tests.runtime.test_serve import KEY, NAME  # noqa: E402

ckpt, engine, server = test_serve.ckpt, test_serve.engine, test_serve.server  # its fixtures
TOL = 1e-4

DOCS = [
    {"context": "the cat sat on", "continuation": " the mat"},
    {"context": "hello", "continuation": " world"},
    {"context": "a big dog", "continuation": " ran"},
    {"context": "the mat is big and", "continuation": " the cat is small"},
    {"context": "small", "continuation": " dog"},
]


def _task(tmp_path, name: str, body: str) -> TaskManager:
    data = tmp_path / f"{name}.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (tmp_path / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n{body}"
    )
    return TaskManager(include_path=str(tmp_path))


def test_local_completions_loglikelihoods_equal_engine_logits(ckpt, engine, server, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    tasks = _task(
        tmp_path,
        "dsv3_ll",
        'output_type: loglikelihood\ndoc_to_text: "{{context}}"\ndoc_to_target: "{{continuation}}"\n'
        "metric_list:\n  - metric: perplexity\n  - metric: acc\n",
    )
    lm = LocalCompletionsAPI(
        model=NAME, base_url=server[0] + "/v1/completions", tokenizer=str(ckpt), tokenizer_backend="huggingface"
    )
    out = lm_eval.simple_evaluate(model=lm, tasks=["dsv3_ll"], task_manager=tasks, log_samples=True)
    samples = out["samples"]["dsv3_ll"]
    assert len(samples) == len(DOCS)
    for s in samples:
        context, continuation = s["arguments"][0]
        ctx, cont = lm._encode_pair(context, continuation)
        lp = engine.logits([ctx + cont])[0].log_softmax(-1)  # row t scores token t + 1
        want = sum(lp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))
        got, greedy = s["resps"][0][0]
        assert abs(got - want) <= TOL, (context, got, want)
        is_greedy = all(lp[len(ctx) - 1 + i].argmax().item() == t for i, t in enumerate(cont))
        assert greedy == is_greedy
    assert out["results"]["dsv3_ll"]["perplexity,none"] > 1


def test_local_chat_completions_generate_until_equals_engine_generate(engine, server, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    tasks = _task(
        tmp_path,
        "dsv3_gen",
        'output_type: generate_until\ndoc_to_text: "{{context}}"\ndoc_to_target: "{{continuation}}"\n'
        "generation_kwargs:\n  until: ['zzz']\n  max_gen_toks: 6\n  do_sample: false\n  temperature: 0\n"
        "metric_list:\n  - metric: exact_match\n",
    )
    lm = LocalChatCompletion(model=NAME, base_url=server[0] + "/v1/chat/completions", tokenizer_backend=None)
    out = lm_eval.simple_evaluate(
        model=lm, tasks=["dsv3_gen"], task_manager=tasks, log_samples=True, apply_chat_template=True
    )
    samples = out["samples"]["dsv3_gen"]
    assert len(samples) == len(DOCS)
    for s in samples:
        context = s["doc"]["context"]
        want = engine.generate([context], 6, chat=True, temperature=0)[0].text
        assert s["resps"][0][0] == want, context
