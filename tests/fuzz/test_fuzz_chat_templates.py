"""Fuzz chat templates: every template of tests/fuzz/templates.py's catalog (attribute tricks that would
create a marker file, runaway loops, recursion, huge output, template errors), then random ones built
from fragments, each rendered with odd messages through the tokenizer's apply_chat_template (what dsv3
run --chat and the server call: dsv3's bounded renderer).

All renders of a batch share one forked child, so the renderer process starts once, not per case. The
child lowers dsv3.runtime.chat_template.TIME_LIMIT_S to 1 s: what is checked (a runaway render stops at the limit
with one line) is the same, and a CI run does not spend 5 s on every loop.
"""

from __future__ import annotations

import random

import pytest

from tests.fuzz import templates
from tests.fuzz.cases import WEIRD, AreaTimer, copy_base, new_case
from tests.fuzz.harness import STATS, CaseDirs, assert_clean, cases_for, diff, run_batch, snapshot

pytestmark = pytest.mark.e2e

AREA = "chat-templates"
RENDER_LIMIT_S = 1.0
_child: dict = {}


def _messages(rng: random.Random) -> list:
    """A conversation: mostly well-formed, with odd contents, roles and shapes."""
    content = rng.choice(
        ["hello", "", "\ud800", "é😀\u202e", "x" * 10**5, None, 5, ["a"], {"type": "text", "text": "hi"}]
    )
    roles = rng.choice([["user"], ["system", "user"], ["user", "assistant", "user"], ["tool"], [""], [None]])
    messages = [{"role": r, "content": content if i == len(roles) - 1 else "fine"} for i, r in enumerate(roles)]
    if rng.random() < 0.2:
        messages[-1]["tool_calls"] = [{"function": {"name": "f", "arguments": rng.choice(WEIRD)}}]
    return messages


def _render(item: dict) -> dict:
    """In the batch child: render one case; its kind (error / run / traceback / code_executed / touched_outside)."""
    import dsv3
    from dsv3.errors import Dsv3Error
    from dsv3.runtime import chat_template

    dirs: CaseDirs = item["dirs"]
    if "engine" not in _child:
        chat_template.TIME_LIMIT_S = RENDER_LIMIT_S
        _child["engine"] = dsv3.load(item["ckpt"], dtype="float32", progress=False)
    tok = _child["engine"].tokenizer
    before = snapshot(dirs.sandbox)
    try:
        ids = tok.apply_chat_template(
            item["messages"], chat_template=item["template"], add_generation_prompt=True, tokenize=True
        )
        kind, detail = (
            "run",
            f"{len(ids['input_ids'] if isinstance(ids, dict) or hasattr(ids, 'keys') else ids)} tokens",
        )
    except Dsv3Error as exc:
        message = str(exc)
        kind, detail = ("error" if message and "\n" not in message else "unclear"), message
    except Exception as exc:  # anything but one Dsv3Error line is a traceback for a CLI user
        import traceback

        kind, detail = "traceback", "".join(traceback.format_exception(exc))[-1500:]
    kinds = [kind]
    ran = dirs.code_ran()
    if ran:
        kinds.append("code_executed")
        detail = f"planted code wrote {ran}; {detail}"
        for name in ran:  # the next case starts without it
            (dirs.markers / name).unlink()
    changed = diff(before, snapshot(dirs.sandbox))
    if changed:
        kinds.append("touched_outside")
        detail = f"changed: {changed[:8]}; {detail}"
    return {"kinds": kinds, "detail": detail}


def test_fuzz_chat_templates(bases, case_root):
    with AreaTimer(AREA):
        dirs = new_case(case_root, AREA, 0)
        ckpt = copy_base(bases["plain"], dirs)
        named = [(k, v) for k, v in templates.catalog(dirs.marker).items() if isinstance(v, str)]
        rng = random.Random(f"{AREA}")
        count = max(cases_for(AREA), len(named))
        cases = named + [(f"random-{i}", templates.random_template(rng)) for i in range(count - len(named))]
        items = [
            {"dirs": dirs, "ckpt": str(ckpt), "template": t, "messages": _messages(rng), "name": n} for n, t in cases
        ]
        answers = run_batch(items, _render, dirs)
        for item, answer in zip(items, answers, strict=True):
            if answer is None:
                answer = {"kinds": ["hang"], "detail": "no answer within the case timeout"}
            elif "kinds" not in answer:
                answer = {"kinds": [answer["kind"]], "detail": answer["detail"]}
            reproducer = (
                f"tok.apply_chat_template({item['messages']!r:.200}, chat_template={item['template']!r:.300}, "
                "add_generation_prompt=True) on dsv3.load(a tiny checkpoint).tokenizer"
            )
            STATS.record(AREA, answer["kinds"], item["name"], reproducer, answer["detail"])
    assert_clean(AREA)
