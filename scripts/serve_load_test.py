"""Load test for ``dsv3 serve`` on loopback: concurrent streaming clients, checked against greedy references.

For each ``--max-batch`` value it starts ``dsv3 serve`` in a subprocess, sends ``--clients``
concurrent streaming /v1/completions requests (temperature 0) with the ``openai`` client, checks
every answer token for token against ``Engine.generate`` on that prompt alone (what ``dsv3 run``
does), checks /health (every slot free, nothing lost) and that /metrics moved by exactly the burst
(requests answered, tokens generated, TTFT and end-to-end observations), and prints throughput and latencies.
Comparing ``--max-batch 16`` with ``--max-batch 1`` shows what continuous batching buys;
``--mtp 0,1`` runs each slot count without and with MTP speculative decoding (``dsv3 serve --mtp``).

    python scripts/serve_load_test.py --clients 32 --max-tokens 32 --max-batch 16,1
    python scripts/serve_load_test.py --clients 16 --max-tokens 32 --max-batch 8 --mtp 0,1

Everything is bounded: ``--timeout`` seconds per run, a fixed number of requests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time

import httpx
import openai
import torch

import dsv3

SUBJECTS = ["the weather", "a dragon", "Python", "the sea", "a robot", "music", "the moon", "coffee"]


def prompts(n: int) -> list[str]:
    """n different prompts of different lengths."""
    return [f"Story {i} about {SUBJECTS[i % len(SUBJECTS)]}:" + " and then" * (i % 5) for i in range(n)]


def start_server(args, max_batch: int, mtp: int) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "dsv3", "serve", "--port", "0", "--dtype", args.dtype, "--log-level", "warning"]
    cmd += ["--max-batch", str(max_batch), "--max-model-len", str(args.max_model_len), "--max-waiting", "1024"]
    cmd += ["--mtp", str(mtp)]
    if args.ckpt_path:
        cmd += ["--ckpt-path", args.ckpt_path]
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + args.timeout
    for line in proc.stderr:  # "dsv3: serving '...' on http://127.0.0.1:PORT/v1 ..."
        m = re.search(r"on (http://\S+?)/v1 ", line)
        if m:
            url = m.group(1)
            break
        if time.monotonic() > deadline:
            break
    else:
        raise SystemExit(f"dsv3 serve exited with {proc.wait()} before listening")
    threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep draining its log
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("dsv3 serve did not become healthy in time")


async def one_client(client: openai.AsyncOpenAI, model: str, prompt: str, max_tokens: int, t0: float) -> dict:
    start = time.perf_counter()
    first = None
    text, ids, finish = [], [], None
    stream = await client.completions.create(
        model=model,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        extra_body={"return_token_ids": True},
    )
    async for chunk in stream:
        if not chunk.choices:
            continue
        c = chunk.choices[0]
        if first is None and (c.text or (c.model_extra or {}).get("token_ids")):
            first = time.perf_counter()
        text.append(c.text or "")
        ids += (c.model_extra or {}).get("token_ids") or []
        finish = c.finish_reason or finish
    end = time.perf_counter()
    return {
        "text": "".join(text),
        "ids": ids,
        "finish": finish,
        "latency": end - start,
        "ttft": (first or end) - start,
        "end": end - t0,
    }


async def burst(url: str, model: str, ps: list[str], max_tokens: int, timeout: float) -> tuple[list, float]:
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=timeout)
    t0 = time.perf_counter()
    tasks = [one_client(client, model, p, max_tokens, t0) for p in ps]
    results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout)
    wall = time.perf_counter() - t0
    await client.close()
    return results, wall


METRICS = (
    "dsv3_http_requests_total[/v1/completions,200]",
    "dsv3_generation_tokens_total",
    "dsv3_time_to_first_token_seconds_count",
    "dsv3_e2e_request_latency_seconds_count",
    "dsv3_prefill_tokens_total",
)


def metrics(url: str) -> dict[str, float]:
    """GET /metrics parsed with prometheus_client's parser: the samples METRICS names."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=30).text):
        for s in family.samples:
            labels = ",".join(s.labels[k] for k in ("endpoint", "status") if k in s.labels)
            out[s.name + (f"[{labels}]" if labels else "")] = s.value
    return out


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt-path", default=None, help="checkpoint directory (default: the embedded model)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-model-len", type=int, default=256)
    ap.add_argument("--max-batch", default="16,1", help="comma-separated slot counts to compare")
    ap.add_argument("--mtp", default="0", help="comma-separated MTP draft counts (0: plain decoding) to compare")
    ap.add_argument(
        "--threads", type=int, default=None, help="torch threads for the server (OMP_NUM_THREADS) and the references"
    )
    ap.add_argument("--timeout", type=float, default=900, help="seconds allowed per run")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args()

    ps = prompts(args.clients)
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} before the run", flush=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    engine = dsv3.load(args.ckpt_path, dtype=args.dtype, progress=False)
    t = time.perf_counter()
    refs = [engine.generate([p], args.max_tokens, temperature=0, chat=False)[0] for p in ps]
    ref_s = time.perf_counter() - t
    print(f"references: {len(refs)} prompts, Engine.generate one at a time, {ref_s:.1f} s", flush=True)
    del engine

    report = {"clients": args.clients, "max_tokens": args.max_tokens, "runs": []}
    failed = False
    configs = [(int(b), int(k)) for b in args.max_batch.split(",") for k in args.mtp.split(",")]
    for max_batch, mtp in configs:
        proc, url = start_server(args, max_batch, mtp)
        try:
            model = httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]
            asyncio.run(burst(url, model, ps[:1], 4, args.timeout))  # warm-up
            before = metrics(url)
            results, wall = asyncio.run(burst(url, model, ps, args.max_tokens, args.timeout))
            health = httpx.get(url + "/health", timeout=30).json()
            after = metrics(url)
        finally:
            proc.terminate()
            proc.wait(30)
        errors = [r for r in results if isinstance(r, BaseException)]
        ok = [r for r in results if not isinstance(r, BaseException)]
        wrong = [
            i
            for i, (r, ref) in enumerate(zip(results, refs, strict=True))
            if not isinstance(r, BaseException)
            and (r["ids"] != ref.token_ids or r["text"] != ref.text or r["finish"] != ref.finish_reason)
        ]
        tokens = sum(len(r["ids"]) for r in ok)
        run = {
            "max_batch": max_batch,
            "mtp": mtp,
            "answered": len(ok),
            "errors": len(errors),
            "mismatches": len(wrong),
            "completion_tokens": tokens,
            "wall_s": round(wall, 2),
            "tokens_per_s": round(tokens / wall, 1),
            "requests_per_s": round(len(ok) / wall, 2),
            "latency_p50_s": round(statistics.median([r["latency"] for r in ok]), 2) if ok else None,
            "latency_p95_s": round(pct([r["latency"] for r in ok], 0.95), 2) if ok else None,
            "ttft_p50_s": round(statistics.median([r["ttft"] for r in ok]), 2) if ok else None,
            "ttft_p95_s": round(pct([r["ttft"] for r in ok], 0.95), 2) if ok else None,
            "peak_batch": health["peak_batch"],
            "slots_used_after": health["slots_used"],
            "finished": health["finished"],
            "load_avg_after": round(os.getloadavg()[0], 1),
        }
        # /metrics moved with the load: its counters are this burst's requests and tokens
        moved = {k: after.get(k, 0) - before.get(k, 0) for k in METRICS}
        run["metrics_delta"] = moved
        metrics_ok = (
            moved["dsv3_http_requests_total[/v1/completions,200]"] == len(ok)
            and moved["dsv3_generation_tokens_total"] == tokens
            and moved["dsv3_time_to_first_token_seconds_count"] == len(ok)
            and moved["dsv3_e2e_request_latency_seconds_count"] == len(ok)
        )
        run["metrics_ok"] = metrics_ok
        if mtp:
            run["steps"] = health["steps"]
            run["acceptance_rate"] = round(health["accepted_drafts"] / max(health["drafts"], 1), 3)
        report["runs"].append(run)
        print(json.dumps(run), flush=True)
        for e in errors[:3]:
            print(f"  error: {type(e).__name__}: {e}", flush=True)
        for i in wrong[:3]:
            print(f"  mismatch on prompt {i}: {results[i]['ids']} != {refs[i].token_ids}", flush=True)
        lost = len(ps) - len(ok)
        if errors or wrong or lost or health["slots_used"] or health["finished"] != len(ps) + 1 or not metrics_ok:
            failed = True
    if len(report["runs"]) >= 2:
        last = report["runs"][-1]
        for run in report["runs"][:-1]:
            print(
                f"max_batch {run['max_batch']} mtp {run['mtp']}: {run['tokens_per_s']} tokens/s vs max_batch "
                f"{last['max_batch']} mtp {last['mtp']}: {last['tokens_per_s']} tokens/s "
                f"({run['tokens_per_s'] / last['tokens_per_s']:.2f}x)"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    print("FAILED" if failed else "OK: every request answered, every answer equal to its greedy reference")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
