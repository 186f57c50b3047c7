"""Time to first token with and without prefix caching: N requests sharing a long system prompt.

    python scripts/prefix_cache_ttft.py                     # embedded model, 32 requests, 900 shared tokens
    python scripts/prefix_cache_ttft.py --requests 32 --shared 900 --rounds 3

Runs the server's scheduler in this process (no HTTP) on the embedded model. Each round submits all
requests at once (each: the shared tokens + 16 tokens of its own, max_tokens 1) and records, per
request, the seconds from submission to its first token; rounds alternate caching on and off, so load
drifts over both alike. Prints per mode the median over rounds of the mean, median and slowest TTFT,
the wall time until every request had its token, and the prompt tokens prefilled (counted by the
scheduler). Asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time

import torch

import dsv3
from dsv3.runtime.serve.scheduler import Request, Scheduler


def one_round(model, prompts: list[list[int]], caching: bool, chunk: int) -> dict:
    sched = Scheduler(model, max_batch=8, max_len=len(prompts[0]) + 8, prefix_caching=caching, prefill_chunk=chunk)
    sched.start()
    first: list[float] = [0.0] * len(prompts)
    done = [threading.Event() for _ in prompts]

    def sink(i: int, start: float):
        def put(ev):
            if ev.tokens and not first[i]:
                first[i] = time.perf_counter() - start
            if ev.finished:
                done[i].set()

        return put

    try:
        start = time.perf_counter()
        for i, p in enumerate(prompts):
            sched.submit(Request(p, 1, sink(i, start)))
        for d in done:
            d.wait(600)
        wall = time.perf_counter() - start
        stats = sched.stats()
    finally:
        sched.stop()
    return {
        "mean": statistics.mean(first),
        "median": statistics.median(first),
        "max": max(first),
        "wall": wall,
        "prefilled": stats["prefill_tokens"],
        "hits": stats["prefix_hit_tokens"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--shared", type=int, default=900, help="tokens of the shared system prompt")
    ap.add_argument("--rounds", type=int, default=3, help="rounds per mode, alternating")
    ap.add_argument("--prefill-chunk", type=int, default=512, help="as dsv3 serve's --prefill-chunk")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    engine = dsv3.load(progress=False)
    vocab = engine.cfg.vocab_size
    g = torch.Generator().manual_seed(0)
    shared = torch.randint(2, vocab, (args.shared,), generator=g).tolist()
    prompts = [shared + torch.randint(2, vocab, (16,), generator=g).tolist() for _ in range(args.requests)]
    print(f"load average {os.getloadavg()}, torch threads {torch.get_num_threads()}")
    print(f"{args.requests} requests: {args.shared} shared tokens + 16 own, max_tokens 1, embedded model")
    results: dict[bool, list[dict]] = {True: [], False: []}
    with torch.inference_mode():
        one_round(engine.model, prompts[:2], True, args.prefill_chunk)  # warm up
        for _ in range(args.rounds):
            for caching in (True, False):
                results[caching].append(one_round(engine.model, prompts, caching, args.prefill_chunk))
    print("| prefix caching | mean TTFT s | median TTFT s | slowest TTFT s | all first tokens s | prefilled tokens |")
    print("|---|---|---|---|---|---|")
    for caching in (False, True):
        rows = results[caching]
        med = {k: statistics.median(r[k] for r in rows) for k in ("mean", "median", "max", "wall")}
        print(
            f"| {'on' if caching else 'off'} | {med['mean']:.3f} | {med['median']:.3f} | {med['max']:.3f} | "
            f"{med['wall']:.3f} | {rows[0]['prefilled']} |"
        )
    print(f"load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
