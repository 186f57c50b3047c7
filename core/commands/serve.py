"""``dsv3 serve``: an OpenAI-compatible HTTP server with continuous batching (see docs/serving.md)."""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path

from ..errors import Dsv3Error
from ..runtime.serve.reasoning import PARSERS as REASONING_PARSERS
from .model_args import add_model_args, load_from_args

DEFAULT_MAX_MODEL_LEN = 4096


def add_parser(sub):
    p = sub.add_parser(
        "serve",
        help="serve the model behind an OpenAI-compatible HTTP API (continuous batching)",
        description="Load the model once and answer OpenAI-style requests over HTTP: POST /v1/completions and "
        '/v1/chat/completions (streamed with "stream": true), GET /v1/models and /health. Requests share the '
        "model by continuous batching: up to --max-batch sequences are decoded together, a new request joins at "
        "the next step, and long prompts are prefilled in chunks between decode steps. Bad requests get a 4xx "
        "answer in OpenAI's error shape. Needs the serve extra: pip install 'dsv3[serve]' (see docs/serving.md).",
    )
    add_model_args(p)
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (127.0.0.1: this machine only; 0.0.0.0: every interface)",
    )
    p.add_argument("--port", type=int, default=8000, help="TCP port (0: any free port)")
    p.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on /v1 (default: $DSV3_API_KEY when set, else no key)",
    )
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: checkpoint dir name)")
    p.add_argument("--max-batch", type=int, default=16, help="cache slots: sequences decoded together")
    p.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help=f"positions per slot, prompt + completion (default: min(max_position_embeddings, {DEFAULT_MAX_MODEL_LEN}))",
    )
    p.add_argument("--max-prompt-tokens", type=int, default=None, help="longest prompt (default: max-model-len - 1)")
    p.add_argument(
        "--max-tokens-limit",
        type=int,
        default=None,
        help="largest max_tokens a request may ask (default: max-model-len - 1)",
    )
    p.add_argument("--max-request-bytes", type=int, default=1 << 20, help="largest request body in bytes (1 MiB)")
    p.add_argument("--max-waiting", type=int, default=256, help="requests queued for a slot before 503s")
    p.add_argument(
        "--mtp",
        type=int,
        default=0,
        metavar="K",
        help="speculative decoding with the MTP module: K drafts per step, verified for every running request at once",
    )
    p.add_argument(
        "--prefill-chunk",
        type=int,
        default=512,
        metavar="N",
        help="prompt tokens prefilled between two decode steps, so a long prompt does not stall running "
        "requests (0: whole prompts)",
    )
    p.add_argument(
        "--max-total-tokens",
        type=int,
        default=None,
        metavar="N",
        help="cache positions the page pool holds for all requests together (default: enough for every slot at "
        "--max-model-len, capped at half the memory available after loading); requests are admitted while pages "
        "are free, and the newest is preempted (recomputed later) when the pool runs out",
    )
    p.add_argument("--page-size", type=int, default=None, help="cache positions per page (default 64)")
    p.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep prompts' full cache pages and reuse them for later prompts that start with the same tokens "
        "(default on; --no-enable-prefix-caching turns it off)",
    )
    p.add_argument(
        "--log-level", choices=("critical", "error", "warning", "info", "debug"), default="info", help="uvicorn logging"
    )
    p.add_argument(
        "--reasoning-parser",
        choices=REASONING_PARSERS,
        default=None,
        help="split chat answers' <think>...</think> text into reasoning_content (deepseek_r1: as vLLM's parser)",
    )
    return p


def _positive(args, *names: str) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise Dsv3Error(f"--{name.replace('_', '-')} must be at least 1 (got {value})")


def main(args) -> int:
    _positive(
        args,
        "max_batch",
        "max_model_len",
        "max_prompt_tokens",
        "max_tokens_limit",
        "max_request_bytes",
        "max_waiting",
        "max_total_tokens",
        "page_size",
    )
    if args.mtp < 0:
        raise Dsv3Error("--mtp must be >= 0 (draft tokens per step)")
    if args.prefill_chunk < 0:
        raise Dsv3Error(f"--prefill-chunk must be >= 0 (0: whole prompts; got {args.prefill_chunk})")
    if not 0 <= args.port <= 65535:
        raise Dsv3Error(f"--port must be in 0..65535 (got {args.port})")
    try:
        import uvicorn

        from ..runtime.serve.app import ServeSettings, create_app, http_protocol
    except ImportError as exc:
        raise Dsv3Error(
            f"dsv3 serve needs FastAPI and uvicorn ({exc.name} is missing): pip install 'dsv3[serve]'"
        ) from None
    from ..runtime.distributed import init_for_backend

    parallel = init_for_backend(args.backend)  # several processes under torchrun: tensor-parallel serving
    try:
        if parallel.rank:
            return _follow(args, parallel)
        return _serve(args, parallel, uvicorn, ServeSettings, create_app, http_protocol)
    finally:
        parallel.close()


def _follow(args, parallel) -> int:
    """Ranks 1..N-1: load this rank's shard, then replay rank 0's model calls until it stops.

    Stop signals (Ctrl-C to the group, SIGTERM from torchrun) are rank 0's to act on: it drains and
    then releases this rank; a rank that left on its own would break the step in progress. Errors
    only this rank meets are printed with its rank (the CLI prints rank 0's).
    """
    from ..runtime.distributed import quiet_unless_rank0
    from ..runtime.serve.mirror import follow

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    try:
        with quiet_unless_rank0(parallel):
            if "error" in parallel.broadcast_object(None):  # rank 0 could not listen: nothing to serve
                return 2
            engine = load_from_args(args, parallel)
        follow(engine.model, parallel)
    except Dsv3Error as exc:
        print(f"dsv3: error (rank {parallel.rank}): {exc}", file=sys.stderr)
        return 2
    return 0


def _serve(args, parallel, uvicorn, ServeSettings, create_app, http_protocol) -> int:
    from ..runtime.serve import LOOPBACK, bind_socket
    from ..runtime.serve.mirror import MirroredModel
    from ..runtime.serve.scheduler import Scheduler
    from ..runtime.speculative import check_mtp

    try:
        sock = bind_socket(args.host, args.port)  # before the (slow) load, so a busy port fails fast
    except Dsv3Error as exc:
        parallel.broadcast_object({"error": str(exc)})
        raise
    parallel.broadcast_object({"ok": True})
    mirror = scheduler = None
    try:
        engine = load_from_args(args, parallel)
        model = engine.model
        if parallel.distributed:  # from here on every model call is replayed by the other ranks
            model = mirror = MirroredModel(engine.model, parallel)
        check_mtp(engine.model, args.mtp)
        if engine.tokenizer is None:
            raise Dsv3Error(f"{engine.path}: no tokenizer files in the checkpoint; dsv3 serve needs one")
        cfg = engine.cfg
        max_len = args.max_model_len or min(cfg.max_position_embeddings, DEFAULT_MAX_MODEL_LEN)
        if max_len > cfg.max_position_embeddings:
            raise Dsv3Error(
                f"--max-model-len {max_len} exceeds the model's max_position_embeddings ({cfg.max_position_embeddings})"
            )
        if max_len < 2:
            raise Dsv3Error("--max-model-len must be at least 2 (one prompt token and one generated token)")
        settings = ServeSettings(
            model_name=args.served_model_name or Path(str(engine.path)).name or "dsv3",
            max_model_len=max_len,
            max_prompt_tokens=min(args.max_prompt_tokens or max_len - 1, max_len - 1),
            max_tokens_limit=min(args.max_tokens_limit or max_len - 1, max_len - 1),
            max_request_bytes=args.max_request_bytes,
            api_key=args.api_key if args.api_key is not None else os.environ.get("DSV3_API_KEY") or None,
            reasoning_parser=args.reasoning_parser,
        )
        slot_len = max_len + (args.mtp + 1 if args.mtp else 0)
        per_token = cache_bytes(engine.model, 1, 1)
        total = args.max_total_tokens or default_total_tokens(engine.model, per_token, args.max_batch * slot_len)
        scheduler = Scheduler(
            model,
            args.max_batch,
            max_len,
            args.max_waiting,
            args.mtp,
            args.prefill_chunk,
            max_total_tokens=total,
            prefix_caching=args.enable_prefix_caching,
            page_size=args.page_size,
            enforce_eager=args.enforce_eager,
        )
        app = create_app(engine, scheduler, settings)
        host, port = sock.getsockname()[:2]
        mode = f"continuous batching with speculative decoding (mtp={args.mtp})" if args.mtp else "continuous batching"
        if parallel.distributed:
            mode += f", tensor parallel over {parallel.world_size} processes"
        pool = scheduler.pool
        mib = per_token * pool.num_pages * pool.page_size / 2**20
        cache = f"{pool.num_pages} pages of {pool.page_size}" if scheduler.paged else "contiguous rows"
        prefix = "prefix caching on" if pool.prefix_caching else "prefix caching off"
        print(
            f"dsv3: serving '{settings.model_name}' on http://{args.host}:{port}/v1 with {mode}: "
            f"{scheduler.max_batch} slots of up to {max_len} positions; cache of {scheduler.max_total_tokens} "
            f"positions ({cache}, {per_token} bytes per position, {mib:.1f} MiB), {prefix}",
            file=sys.stderr,
        )
        if args.host not in LOOPBACK and settings.api_key is None:
            print(
                f"dsv3: warning: listening on {host} without an API key: anyone who can reach it can use it",
                file=sys.stderr,
            )
        config = uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=5, http=http_protocol())
        server = uvicorn.Server(config)
        # uvicorn drains on SIGTERM and then re-raises it: with the default handler that would end this
        # process before the clean-up below (which releases the other ranks); raise an interrupt instead
        signal.signal(signal.SIGTERM, _interrupted)
        if mirror is not None:  # a failed model call under TP is fatal: stop serving, let torchrun end the job
            threading.Thread(target=_stop_when_dead, args=(scheduler, server), daemon=True).start()
        server.run(sockets=[sock])
        if scheduler.fatal is not None and mirror is not None:
            raise Dsv3Error(f"tensor-parallel serving stopped: {scheduler.fatal}")
    finally:
        sock.close()
        if scheduler is not None:
            # the app's shutdown normally stopped it; under TP wait for the step in progress however long it
            # takes: no model call may overlap the release below
            scheduler.stop(timeout=None if mirror is not None else 30.0)
        if mirror is not None:
            if scheduler is not None and scheduler.alive:
                mirror.mark_broken()
            mirror.close()
    return 0


def _interrupted(_sig, _frame) -> None:
    raise KeyboardInterrupt


def _stop_when_dead(scheduler, server) -> None:
    """Ask uvicorn to exit once the scheduler thread has died (its model call failed)."""
    while scheduler.fatal is None:
        time.sleep(0.2)
        if server.should_exit:
            return
    server.should_exit = True


def default_total_tokens(model, per_token: int, wanted: int) -> int:
    """``wanted`` cache positions (every slot at full length), capped at half the memory available now
    on the model's device (host memory on a CPU), and at least one page."""
    import torch

    device = model.embed.device
    if device.type == "cpu":
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    else:
        free = torch.accelerator.get_memory_info(device)[0]
    return max(1, min(wanted, free // 2 // max(per_token, 1)))


def cache_bytes(model, max_batch: int, max_len: int) -> int:
    """Bytes the scheduler's cache takes: every main and MTP layer, ``max_batch x max_len`` positions
    (an fp8 latent cache, ``--kv-cache-dtype fp8``: ``fp8_cache.entry_bytes`` per layer)."""
    from ..model.fp8_cache import entry_bytes

    per_token = 0
    attns = [layer.attn for layer in model.layers] + [m.block.attn for m in model.mtp]
    fp8 = getattr(getattr(model, "opts", None), "kv_cache_dtype", "auto") == "fp8"
    for attn in attns:
        shapes = attn.cache_shapes()
        if fp8 and "kv" in shapes:  # the absorbed form's latent cache in the fp8 layout
            per_token += entry_bytes(shapes["kv"][0], shapes["pe"][0], model.embed.dtype)
        else:
            per_token += sum(math.prod(s) for s in shapes.values()) * model.embed.element_size()
    return per_token * max_batch * max_len
