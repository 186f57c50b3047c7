#!/usr/bin/env python3
"""How long a running stream stalls while the server prefills a long prompt, by --prefill-chunk.

    python scripts/prefill_stall.py --ckpt-path DIR --prompt-len 1024 --chunks 0,512,128 [--threads 1]

For each chunk size: one request decodes (greedy, no stop) in the scheduler; once it streams, a
request with a --prompt-len random prompt arrives. Prints the longest gap between two tokens of
the running request while the long prompt is prefilled, the long request's time to first token,
and checks both answers against generate() alone.
"""

from __future__ import annotations

import argparse
import queue
import time

import torch

import dsv3
from dsv3.runtime.generate import SamplingParams, generate
from dsv3.runtime.serve.scheduler import Request, Scheduler


def run(engine, chunk: int, prompt_len: int, decode_tokens: int) -> dict:
    model = engine.model
    g = torch.Generator().manual_seed(0)
    short = torch.randint(2, engine.cfg.vocab_size, (8,), generator=g).tolist()
    long_prompt = torch.randint(2, engine.cfg.vocab_size, (prompt_len,), generator=g).tolist()
    sched = Scheduler(model, max_batch=2, max_len=prompt_len + decode_tokens + 8, prefill_chunk=chunk)
    events: queue.Queue = queue.Queue()
    first_long: list[float] = []
    sched.start()
    try:
        sched.submit(Request(short, decode_tokens, lambda ev: events.put((time.perf_counter(), ev))))
        short_ids = list(events.get(timeout=600)[1].tokens)
        t_submit = time.perf_counter()
        long_ids: list[int] = []

        def long_sink(ev):
            if not first_long:
                first_long.append(time.perf_counter())
            long_ids.extend(ev.tokens)

        sched.submit(Request(long_prompt, 4, long_sink))
        times = [t_submit]
        while True:
            t, ev = events.get(timeout=600)
            times.append(t)
            short_ids.extend(ev.tokens)
            if ev.finished:
                break
    finally:
        sched.stop()
    while not first_long:
        time.sleep(0.01)
    gaps = [b - a for a, b in zip(times, times[1:], strict=False) if a <= first_long[0]]
    ok_long = long_ids == generate(model, [long_prompt], SamplingParams(4, eos_ids=())).token_ids[0]
    ok_short = short_ids == generate(model, [short], SamplingParams(decode_tokens, eos_ids=())).token_ids[0]
    return {
        "chunk": chunk,
        "max_gap_s": max(gaps),
        "ttft_long_s": first_long[0] - t_submit,
        "answers_match_generate": ok_long and ok_short,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt-path", default=None)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--prompt-len", type=int, default=1024)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--chunks", default="0,512,128")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    engine = dsv3.load(args.ckpt_path, dtype=args.dtype, progress=False)
    print("chunk  longest gap of the running stream (s)  TTFT of the long prompt (s)  both answers == generate()")
    for chunk in (int(c) for c in args.chunks.split(",")):
        r = run(engine, chunk, args.prompt_len, args.decode_tokens)
        print(
            f"{r['chunk']:>5}  {r['max_gap_s']:>38.3f}  {r['ttft_long_s']:>27.3f}  {r['answers_match_generate']}",
            flush=True,
        )


if __name__ == "__main__":
    main()
