"""The chat template renderer's own process (see ``dsv3.runtime.chat_template``), run as a script.

Reads one JSON request per line on stdin and answers one JSON line on stdout: ``{"texts": [...]}`` or
``{"error": "..."}``. Renders with transformers' ``render_jinja_template``, the function
``apply_chat_template`` uses (jinja2's immutable sandbox), so the text is the same. Its address space is
limited to what it used after start-up plus the budget given as its one argument: a template that builds
a huge string gets a MemoryError here, not in the process holding the model. Only the standard library
is imported before transformers: this file runs without the dsv3 package (``python -I chat_worker.py``).
"""

from __future__ import annotations

import json
import signal
import sys


def _address_space() -> int | None:
    """This process's virtual memory size in bytes (Linux), or None where /proc does not say."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _limit_memory(budget: int) -> None:
    try:
        import resource

        used = _address_space()
        if used is not None:
            _, hard = resource.getrlimit(resource.RLIMIT_AS)
            soft = used + budget if hard == resource.RLIM_INFINITY else min(hard, used + budget)
            resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    except (ImportError, OSError, ValueError):
        pass  # no limit on this system: the parent's time limit still ends a runaway template


def _reply(obj: dict) -> None:
    sys.stdout.buffer.write(json.dumps(obj, ensure_ascii=True).encode() + b"\n")
    sys.stdout.buffer.flush()


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _render(request: dict, render) -> dict:
    texts, _ = render(
        conversations=request["conversations"],
        tools=request.get("tools"),
        documents=request.get("documents"),
        chat_template=request["template"],
        add_generation_prompt=request["add_generation_prompt"],
        continue_final_message=request["continue_final_message"],
        **request["kwargs"],
    )
    longest = max((len(t) for t in texts), default=0)
    if longest > request["max_chars"]:
        return {"error": f"wrote {longest} characters, more than the limit of {request['max_chars']}"}
    return {"texts": texts}


def main(budget: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C on the terminal is for the parent: it stops us if needed
    from transformers.utils.chat_template_utils import render_jinja_template

    _limit_memory(budget)
    _reply({"ready": True})
    for line in sys.stdin.buffer:
        try:
            _reply(_render(json.loads(line), render_jinja_template))
        except MemoryError:
            _reply({"error": f"needed more than {budget // 2**20} MiB of memory"})
            return  # start afresh: the parent starts a new process for the next template
        except RecursionError:
            _reply({"error": "recursed too deeply"})
        except Exception as exc:  # the template's own error (raise_exception, a sandbox refusal, a typo)
            _reply({"error": f"failed: {_first_line(exc)}"})


if __name__ == "__main__":
    main(int(sys.argv[1]))
