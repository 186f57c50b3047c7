"""Speed and memory figures for a checkpoint, optionally side by side with transformers in the same run.

What is measured (every timing: ``--warmup`` untimed runs, then ``--repeats`` timed ones; min/median/max):

- each run is one greedy ``generate`` of N tokens (``--decode-tokens``) for B prompts of length L, timed
  inside it: time to first token (TTFT: prefill + lm_head + sampling, from dsv3's ``stats["ttft_s"]``; for
  transformers, when its streamer receives the first token) and decode time (first token to the last);
- prefill tokens/s = B * L / TTFT; decode tokens/s = B * (N - 1) / decode time;
- by prompt length at batch 1 (prefill, TTFT, and decode speed at that context), and by batch size at
  ``decode_prompt_len``; at each point the implementations (and dsv3 with each MTP draft count) take
  turns run by run, so load changes hit all alike. The point batch 1 / ``decode_prompt_len`` belongs to
  both sweeps and is measured once;
- KV-cache bytes per token, from the cache tensors each implementation allocates (dsv3: both MLA forms,
  through ``Transformer.new_cache``; transformers: the cache its ``generate`` returns);
- resident weight bytes per parameter: unique weight tensors (data + scales) / parameters;
- MTP, at every batch size: acceptance per draft position, tokens per main-model forward, decode tokens/s
  (the same window: tokens 2..N) and the speed-up over plain decoding, whose figure is the batch sweep's
  dsv3 row, timed in the same turns.

Prompts are random token ids (fixed seed), so no tokenizer is needed; decoding is greedy with EOS off, so
every run makes exactly the tokens asked for. Times are wall-clock (``time.perf_counter``); the process CPU
time of each run is recorded too, since on a shared machine it is steadier than wall time.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from .. import registry
from ..errors import Dsv3Error
from ..model.fp8_cache import entry_bytes
from ..model.graph import ATTN_IMPLS, Transformer
from ..runtime.engine import Engine
from ..runtime.generate import SamplingParams, generate
from ..runtime.loading import build_model
from ..runtime.speculative import generate_speculative
from .llama_cpp_peer import NAME as LLAMA_CPP
from .llama_cpp_peer import load_llama_cpp
from .output_files import write_atomically

SCHEMA = 2  # 2: MTP rows at every batch size, timed in the batch sweep's turns; speedup_per_run
#: What every figure measures (B rows, prompts of L tokens, N new tokens per row), for the JSON and the report.
TIMING = (
    "wall-clock seconds, median [min-max] of the timed runs; TTFT = call to first token (prefill + first "
    "sampled token); prefill tokens/s = B*L/TTFT; decode tokens/s = B*(N-1)/(t(token N) - t(token 1)), i.e. "
    "tokens 2..N of every row, TTFT excluded; MTP uses the same decode window; dsv3/peer: ratios of medians"
)
PEERS = ("transformers", "llama.cpp")


@dataclass
class BenchSettings:
    """What to measure. Lengths and counts are validated by :func:`check_settings`."""

    prompt_lens: tuple[int, ...] = (16, 64, 256)
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    decode_tokens: int = 32
    decode_prompt_len: int = 64
    repeats: int = 5
    warmup: int = 1
    mtp: tuple[int, ...] = (1, 2)  # draft counts; 0 (plain decoding, always measured) is dropped
    seed: int = 0

    def __post_init__(self) -> None:
        self.mtp = tuple(dict.fromkeys(k for k in self.mtp if k != 0))


def check_settings(s: BenchSettings, max_positions: int | None = None) -> None:
    """One clear Dsv3Error for settings that cannot run (on a model with ``max_positions`` positions)."""
    for name, values in (("--prompt-lens", s.prompt_lens), ("--batch-sizes", s.batch_sizes)):
        if not values or any(v <= 0 for v in values):
            raise Dsv3Error(f"{name} must be a comma-separated list of positive integers")
    if s.decode_tokens < 2:
        raise Dsv3Error("--decode-tokens must be at least 2 (decode speed is timed over tokens 2..N)")
    if s.decode_prompt_len <= 0:
        raise Dsv3Error("--decode-prompt-len must be positive")
    if s.repeats < 1 or s.warmup < 0:
        raise Dsv3Error("--repeats must be >= 1 and --warmup >= 0")
    if any(k < 0 for k in s.mtp):
        raise Dsv3Error("--mtp takes draft counts >= 0 (0: plain decoding only, which is always measured)")
    if max_positions is None:
        return
    longest = max(max(s.prompt_lens), s.decode_prompt_len) + s.decode_tokens
    if longest > max_positions:
        raise Dsv3Error(
            f"the longest run needs {longest} positions (prompt + --decode-tokens) but the model has "
            f"{max_positions} (max_position_embeddings); use shorter --prompt-lens/--decode-prompt-len"
        )


# --------------------------------------------------------------------------- timing
@dataclass
class Timing:
    wall: float
    cpu: float


def timed(fn: Callable[[], object]) -> tuple[Timing, object]:
    """Run ``fn`` once: (wall and process-CPU seconds, its result)."""
    c, t = time.process_time(), time.perf_counter()
    out = fn()
    return Timing(time.perf_counter() - t, time.process_time() - c), out


def spread(values: list[float], digits: int = 6) -> dict:
    """min / median / max (and every run) of a list of figures."""
    return {
        "min": round(min(values), digits),
        "median": round(statistics.median(values), digits),
        "max": round(max(values), digits),
        "runs": [round(v, digits) for v in values],
    }


# --------------------------------------------------------------------------- implementations
class DsRunner:
    """dsv3 through its own generation loop (greedy, no EOS)."""

    name = "dsv3"

    def __init__(self, engine: Engine):
        self.engine, self.model = engine, engine.model

    def generate(self, prompts: torch.Tensor, n: int, mtp: int = 0) -> tuple[list[list[int]], dict]:
        """prompts (B, L) int64 -> (B lists of exactly n token ids, stats)."""
        params = SamplingParams(max_new_tokens=n, temperature=0.0, top_p=1.0, seed=None, eos_ids=())
        ids = prompts.tolist()
        if mtp:
            out = generate_speculative(self.model, ids, params, mtp)
        else:
            out = generate(self.model, ids, params, self.engine.enforce_eager)
        return out.token_ids, out.stats

    def weights(self) -> dict:
        return dsv3_weight_bytes(self.model)


class _Clock:
    """A transformers streamer that notes when the prompt and each new token reach it (tokens on the host)."""

    def __init__(self):
        self.start, self.times = time.perf_counter(), []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


class HfRunner:
    """transformers' DeepseekV3ForCausalLM through ``generate`` (greedy, ``min_new_tokens = max_new_tokens``)."""

    name = "transformers"

    def __init__(self, model):
        from transformers import GenerationConfig

        self.model, self._config = model, GenerationConfig
        self.device = next(model.parameters()).device
        self.last_cache = None

    def generate(self, prompts: torch.Tensor, n: int, mtp: int = 0) -> tuple[list[list[int]], dict]:
        cfg = self.model.config
        eos = cfg.eos_token_id if cfg.eos_token_id is not None else 0
        eos = eos[0] if isinstance(eos, list) else eos
        gen = self._config(
            max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True, eos_token_id=eos, pad_token_id=eos
        )
        prompts = prompts.to(self.device)
        clock = _Clock()
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=prompts,
                attention_mask=torch.ones_like(prompts),
                generation_config=gen,
                return_dict_in_generate=True,
                streamer=clock,
            )
        self.last_cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        ids = out.sequences[:, prompts.shape[1] :].tolist()
        if any(len(r) != n for r in ids) or len(clock.times) != n + 1:
            raise Dsv3Error(f"transformers generated {[len(r) for r in ids]} tokens, not {n}")
        start, first, last = clock.start, clock.times[1], clock.times[-1]
        return ids, {"ttft_s": first - start, "decode_s": last - first}

    def weights(self) -> dict:
        """Every unique tensor of its state dict (parameters and saved buffers such as the routing bias)."""
        tensors = list(self.model.state_dict(keep_vars=True).values())
        return _bytes_per_param(tensors, _unique_numel(tensors))

    def kv_bytes_per_token(self) -> dict:
        """Every tensor of the cache its last ``generate`` returned, per cached token and row."""
        total, tokens, rows, layout = 0, 0, 1, "?"
        layers = getattr(self.last_cache, "layers", None) or []
        for i, layer in enumerate(layers):
            keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
            for t in (keys, values):
                if isinstance(t, torch.Tensor) and t.numel():
                    total += t.numel() * t.element_size()
                    rows, tokens = t.shape[0], max(tokens, t.shape[-2])
            if i == 0 and isinstance(keys, torch.Tensor):
                layout = f"per layer: keys {tuple(keys.shape)} + values {tuple(values.shape)} {keys.dtype}"
        return {"bytes_per_token": total // max(rows * tokens, 1), "layout": layout}


def _unique(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Tied / shared tensors (the MTP layer's embedding and head) once each."""
    seen, out = set(), []
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel(), t.dtype)
        if key not in seen:
            seen.add(key)
            out.append(t)
    return out


def _unique_numel(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() for t in _unique(tensors))


def _bytes_per_param(tensors: list[torch.Tensor], params: int, extra: int = 0) -> dict:
    total = extra + sum(t.numel() * t.element_size() for t in _unique(tensors))
    return {"bytes": total, "params": params, "bytes_per_param": round(total / max(params, 1), 4)}


def dsv3_weight_bytes(model: Transformer) -> dict:
    """Resident bytes of every unique weight tensor (data + scales) per parameter (scales are not parameters).

    ``derived_bytes``: weights the model derived at run time (the dequantized absorbed ``wkv_b`` of a
    quantized MLA), included in ``bytes``.
    """
    state = model.state_dict(keep_vars=True)
    params = _unique_numel([t for name, t in state.items() if not name.endswith(".scale")])
    derived = [m._absorbed for m in model.modules() if getattr(m, "_absorbed", None) is not None]
    out = _bytes_per_param(list(state.values()), params, sum(t.numel() * t.element_size() for t in derived))
    out["derived_bytes"] = sum(t.numel() * t.element_size() for t in derived)
    return out


def dsv3_kv_bytes(engine: Engine, backend: str, dtype: torch.dtype) -> dict:
    """Bytes per cached token for both MLA forms, from ``Transformer.new_cache`` (what generate allocates).

    The loaded form's cache is allocated for real on the model's device; the other form's is built on
    the meta device (same shapes and dtype, no memory).
    """
    out = {}
    for form in ATTN_IMPLS:
        if form == engine.model.opts.attn_impl:
            model = engine.model
        else:
            model = build_model(engine.cfg, backend, dtype, attn_impl=form, device="meta")
        # the absorbed form for each --kv-cache-dtype the backend offers (fp8: BackendInfo.kv_cache_fp8)
        kinds = ("auto", "fp8") if form == "absorb" and getattr(model.backend_info, "kv_cache_fp8", ()) else ("auto",)
        for kind in kinds:
            cache = model.new_cache(1, 1, kv_cache_dtype=kind)
            tensors = cache.main[0].tensors if cache.main else {}
            layout = " + ".join(f"{k} {tuple(t.shape[2:])} {t.dtype}" for k, t in tensors.items())
            if kind == "fp8":
                layout += " bytes (latent fp8 + float32 scale per 128 + roped key)"
            per_layer = cache.main[0].nbytes_per_token() if cache.main else 0
            name = form if kind == "auto" else f"{form}_{kind}"
            out[name] = {
                "bytes_per_token": cache.nbytes_per_token(),
                "bytes_per_token_per_layer": per_layer,
                "kv_cache_dtype": kind,
                "layout": f"per layer: {layout}",
            }
    return out


def kv_bytes_671b(dtype: torch.dtype = torch.bfloat16) -> dict:
    """Bytes per token per layer of the absorbed form's latent cache at the 671B shape (C 512, R 64, 61 layers)
    for each ``--kv-cache-dtype``: ``auto`` = (C + R) values of ``dtype``, ``fp8`` = ``fp8_cache.entry_bytes``."""
    c, r, layers = 512, 64, 61
    per_layer = {"auto": (c + r) * dtype.itemsize, "fp8": entry_bytes(c, r, dtype)}
    return {k: {"bytes_per_token_per_layer": v, "bytes_per_token": v * layers} for k, v in per_layer.items()}


def load_peer(path: Path, dtype: torch.dtype, device: torch.device):
    """(HfRunner or None, why not): load with transformers and make one token, quietly.

    A checkpoint transformers cannot load or run (e.g. FP8 weights on CPU) is reported, not raised:
    the dsv3 figures still stand.
    """
    try:
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging
    except ImportError as exc:
        return None, f"transformers is not installed ({exc})"
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device).eval()
        if type(model).__name__ not in ("DeepseekV3ForCausalLM", "DeepseekV2ForCausalLM"):
            return None, f"transformers loaded {type(model).__name__}, not a DeepSeek model"
        runner = HfRunner(model)
        runner.generate(torch.zeros(1, 2, dtype=torch.long), 1)
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else repr(exc)
        return None, f"transformers cannot run {path} ({type(exc).__name__}: {first}); peer skipped"
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    return runner, None


# --------------------------------------------------------------------------- measurements
def _prompts(batch: int, length: int, vocab: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + batch * 1009 + length)
    return torch.randint(0, vocab, (batch, length), generator=g)


def _run(runner, prompts: torch.Tensor, n: int, mtp: int = 0) -> dict:
    """One generate of ``n`` tokens: ids, TTFT, decode seconds, whole-run wall and process-CPU seconds."""
    t, (ids, stats) = timed(lambda: runner.generate(prompts, n, mtp))
    return {"ids": ids, "ttft": stats["ttft_s"], "decode": stats["decode_s"], "wall": t.wall, "cpu": t.cpu, **stats}


def _figures(runs: list[dict], b: int, length: int, n: int) -> dict:
    return {
        "ttft_s": spread([r["ttft"] for r in runs]),
        "prefill_tokens_per_s": spread([b * length / r["ttft"] for r in runs], 2),
        "decode_tokens_per_s": spread([b * (n - 1) / max(r["decode"], 1e-9) for r in runs], 2),
        "run_wall_s": spread([r["wall"] for r in runs]),
        "run_cpu_s": spread([r["cpu"] for r in runs]),
    }


def measure_point(runners: list, prompts: torch.Tensor, s: BenchSettings, log, mtp: tuple[int, ...] = ()) -> dict:
    """TTFT, prefill and decode figures of every runner at one (batch, prompt length), and of dsv3 drafting
    each k of ``mtp`` (``point["mtp"]``: one row per k); every setting takes its turn in each repetition."""
    b, length = prompts.shape
    n = s.decode_tokens
    plan = [(r, r.name, 0) for r in runners] + [(runners[0], f"mtp{k}", k) for k in mtp]
    for runner, _, k in plan:
        for _ in range(s.warmup):
            _run(runner, prompts, n, k)
    runs: dict[str, list[dict]] = {label: [] for _, label, _ in plan}
    for _ in range(s.repeats):
        for runner, label, k in plan:  # interleaved, so a change of machine load hits each alike
            runs[label].append(_run(runner, prompts, n, k))
    out: dict = {"batch": b, "prompt_len": length, "decode_tokens": n}
    for r in runners:
        out[r.name] = _figures(runs[r.name], b, length, n)
    if len(runners) > 1:
        first, peer = runners[0].name, runners[1].name
        out["same_tokens"] = runs[first][-1]["ids"] == runs[peer][-1]["ids"]
        out["first_difference"] = first_difference(runs[first][-1]["ids"], runs[peer][-1]["ids"])
        out["ratio"] = _ratios(out[first], out[peer])
    log(_point_line(out, [r.name for r in runners]))
    if mtp:
        plain = runs[runners[0].name]
        out["mtp"] = [_mtp_row(k, runs[f"mtp{k}"], plain, b, length, n) for k in mtp]
        for row in out["mtp"]:
            log(
                f"    mtp k={row['k']}: acceptance {row['acceptance_rate']}, {row['tokens_per_forward']:.2f} "
                f"tokens/forward, decode {row['decode_tokens_per_s']['median']:.1f} tok/s ({row['speedup']:.2f}x plain)"
            )
    return out


def first_difference(a: list[list[int]], b: list[list[int]]) -> dict | None:
    """Where two implementations' greedy tokens part: the earliest token index (0-based) over the rows and how
    many rows differ; None when every row is the same."""
    firsts = [
        next((i for i, (x, y) in enumerate(zip(r, s, strict=True)) if x != y), None) for r, s in zip(a, b, strict=True)
    ]
    diverged = [f for f in firsts if f is not None]
    return {"token": min(diverged), "rows": len(diverged)} if diverged else None


def _ratios(a: dict, b: dict) -> dict:
    """dsv3 / peer for each figure's median (tokens/s: > 1 is dsv3 faster; times: < 1 is dsv3 faster)."""
    return {k: round(a[k]["median"] / max(b[k]["median"], 1e-12), 3) for k in a}


def _decode_rates(runs: list[dict], b: int, n: int) -> list[float]:
    return [b * (n - 1) / max(r["decode"], 1e-9) for r in runs]


def _mtp_row(k: int, runs: list[dict], plain: list[dict], b: int, length: int, n: int) -> dict:
    """MTP with k drafts against plain decoding timed in the same turns (``plain``: the batch sweep's dsv3 runs)."""
    rates, base = _decode_rates(runs, b, n), _decode_rates(plain, b, n)
    stats = runs[-1]["mtp"]  # greedy: every run accepts the same drafts
    return {
        "k": k,
        "batch": b,
        "prompt_len": length,
        "decode_tokens": n,
        "acceptance_rate": stats["acceptance_rate"],
        "tokens_per_forward": stats["tokens_per_forward"],
        "decode_tokens_per_s": spread(rates, 2),
        "plain_decode_tokens_per_s": spread(base, 2),
        "speedup": round(statistics.median(rates) / max(statistics.median(base), 1e-12), 3),
        "speedup_per_run": spread([r / max(p, 1e-12) for r, p in zip(rates, base, strict=True)], 3),
        "same_tokens_as_plain": runs[-1]["ids"] == plain[-1]["ids"],
    }


def _point_line(p: dict, names: list[str]) -> str:
    parts = [
        f"{n}: TTFT {1e3 * p[n]['ttft_s']['median']:.1f} ms, decode {p[n]['decode_tokens_per_s']['median']:.1f} tok/s"
        for n in names
    ]
    return f"  batch {p['batch']}, prompt {p['prompt_len']}: " + "; ".join(parts)


def greedy_check(first, peer, vocab: int, seed: int, prompt_len: int = 16, n: int = 8) -> dict:
    """Both implementations' greedy tokens for one short random-id prompt, and where they first differ."""
    prompts = _prompts(1, prompt_len, vocab, seed + 7)
    a, _ = first.generate(prompts, n)
    b, _ = peer.generate(prompts, n)
    diff = next((i for i, (x, y) in enumerate(zip(a[0], b[0], strict=True)) if x != y), None)
    summary = (
        f"same {n} greedy tokens after a {prompt_len}-token prompt"
        if diff is None
        else f"greedy tokens differ from token {diff + 1} of {n} (after a {prompt_len}-token prompt)"
    )
    return {"same": diff is None, "first_difference": diff, first.name: a[0], peer.name: b[0], "summary": summary}


def touched_weight_bytes(model: Transformer, cfg) -> dict:
    """Bytes of weights one batch-1 decode token reads: every unique weight tensor (data + scales) of the main
    model (not the MTP layers), with the embedding counted as one row and each MoE layer's routed experts as
    top-k of n_routed_experts (``ffn.w*`` tensors of shape (E, ...)); ``wkv_b`` once (its absorbed halves hold
    the same values)."""
    e, k = cfg.n_routed_experts or 0, cfg.num_experts_per_tok or 0
    total, routed = 0, 0
    seen = set()
    for name, t in model.state_dict(keep_vars=True).items():
        # shared tensors once (a meta model, built for the count alone, has no storage to compare)
        key = id(t) if t.is_meta else (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel(), t.dtype)
        if key in seen or name.startswith("mtp."):
            continue
        seen.add(key)
        nbytes = t.numel() * t.element_size()
        if name == "embed":
            nbytes = t.shape[-1] * t.element_size()
        elif e and ".ffn.w" in name and t.dim() == 3 and t.shape[0] == e:
            nbytes = nbytes * k // e
            routed += nbytes
        total += nbytes
    return {"bytes": total, "routed_expert_bytes": routed, "experts_per_token": f"{k} of {e}"}


def memcpy_bandwidth(nbytes: int = 256 * 2**20, repeats: int = 5) -> dict:
    """Memory bandwidth over ``nbytes`` buffers (above the last-level caches of current CPUs), at torch's thread
    count, best of ``repeats``: ``copy_bytes_per_s`` = bytes read + written per second of ``dst.copy_(src)``,
    ``read_bytes_per_s`` = bytes read per second of a float32 ``sum`` (what streaming weights does);
    ``bytes_per_s`` = the faster of the two."""
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)  # fault the pages in
    copy = min(timed(lambda: dst.copy_(src))[0].wall for _ in range(repeats))
    read = min(timed(lambda: src.sum())[0].wall for _ in range(repeats))
    rates = {"copy_bytes_per_s": round(2 * nbytes / copy), "read_bytes_per_s": round(nbytes / read)}
    return {"buffer_bytes": nbytes, **rates, "bytes_per_s": max(rates.values())}


def floor_figures(floor: dict, batch_points: list[dict], impls: list[str]) -> dict:
    """The bandwidth floor of a batch-1 decode token (touched bytes / the faster memcpy bandwidth of the run)
    and each implementation's batch-1 decode time as a fraction of it (floor / time per token; 1 = at the
    floor)."""
    bw = max(floor["memcpy_before"]["bytes_per_s"], floor["memcpy_after"]["bytes_per_s"])
    floor_s = floor["touched"]["bytes"] / bw
    out = {**floor, "bytes_per_s": bw, "floor_ms_per_token": round(1e3 * floor_s, 4)}
    one = next((p for p in batch_points if p["batch"] == 1), None)
    if one is not None:
        out["fraction_of_floor"] = {
            name: round(floor_s * one[name]["decode_tokens_per_s"]["median"], 3) for name in impls
        }
    return out


def machine_info() -> dict:
    """What the figures were measured on (load average: other processes sharing the CPUs)."""
    info = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def run_bench(
    engine: Engine,
    settings: BenchSettings,
    backend: str = registry.REFERENCE,
    against: str | None = None,
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr),
    llama_cpp_src: str | None = None,
    gguf_dir: str | Path | None = None,
) -> dict:
    """Measure ``engine`` (and the peer named by ``against``) and return every figure as a JSON-ready dict.

    ``llama_cpp_src`` / ``gguf_dir``: for ``against="llama.cpp"``, where llama.cpp's converter is and where to
    keep the converted GGUF (default: a temporary directory); see ``dsv3.tools.llama_cpp_peer``.
    """
    model, cfg = engine.model, engine.cfg
    check_settings(settings, cfg.max_position_embeddings)
    if settings.mtp and not len(model.mtp):
        mtp_note = "checkpoint has no MTP layers (num_nextn_predict_layers=0): MTP not measured"
        settings = dataclasses.replace(settings, mtp=())
    else:
        mtp_note = None
    dtype = model.embed.dtype
    result: dict = {
        "schema": SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "load_average_before": _loadavg(),
        "checkpoint": _describe(engine, backend),
        "settings": dataclasses.asdict(settings),
        "timing": TIMING,
    }
    runners: list = [DsRunner(engine)]
    peer_status = None
    if against is not None:
        if against not in PEERS:
            raise Dsv3Error(f"--against {against!r}: choose one of {', '.join(PEERS)}")
        log(f"loading {against} ...")
        if against == LLAMA_CPP:  # a missing llama-cpp-python or converter is a Dsv3Error: asked for, not optional
            peer, notes = load_llama_cpp(
                engine.path, dtype, torch.get_num_threads(), llama_cpp_src, gguf_dir and Path(gguf_dir), log
            )
            runners.append(peer)
            peer_status = "ok" + (f" ({notes['fallback']})" if "fallback" in notes else "")
            result["peer_config"] = notes
        else:
            peer, why = load_peer(engine.path, dtype, model.embed.device)
            if peer is None:
                peer_status = why
                log(f"note: {why}")
            else:
                runners.append(peer)
                peer_status = "ok"
                result["peer_config"] = {
                    "class": type(peer.model).__name__,
                    "attn_implementation": getattr(peer.model.config, "_attn_implementation", None),
                    "experts_implementation": getattr(peer.model.config, "_experts_implementation", None),
                }
    result["against"] = {"name": against, "status": peer_status} if against else None
    if len(runners) > 1:
        result["against"]["greedy_check"] = greedy_check(runners[0], runners[1], cfg.vocab_size, settings.seed)
        log(f"greedy check: {result['against']['greedy_check']['summary']}")
    result["bandwidth_floor"] = {"touched": touched_weight_bytes(model, cfg), "memcpy_before": memcpy_bandwidth()}
    result["impls"] = [r.name for r in runners]
    vocab = cfg.vocab_size

    points: dict[tuple[int, int], dict] = {}

    def point(b: int, length: int) -> dict:
        """The point at (batch b, prompt length), measured once even when both sweeps ask for it."""
        if (b, length) not in points:
            in_batch_sweep = length == settings.decode_prompt_len and b in settings.batch_sizes
            mtp = settings.mtp if in_batch_sweep else ()
            prompts = _prompts(b, length, vocab, settings.seed)
            points[b, length] = measure_point(runners, prompts, settings, log, mtp)
        return points[b, length]

    log("by prompt length (batch 1) ...")
    result["prompt_lengths"] = [point(1, length) for length in settings.prompt_lens]
    log(f"by batch size (prompt {settings.decode_prompt_len}) ...")
    result["batch_sizes"] = [point(b, settings.decode_prompt_len) for b in settings.batch_sizes]
    rows = [row for p in result["batch_sizes"] for row in p.pop("mtp", [])]
    note = None if rows else (mtp_note or "not asked (--mtp 0)")
    result["mtp"] = {"rows": rows, "note": note}

    result["bandwidth_floor"]["memcpy_after"] = memcpy_bandwidth()
    result["bandwidth_floor"] = floor_figures(result["bandwidth_floor"], result["batch_sizes"], result["impls"])
    kv = {f"dsv3_{form}": v for form, v in dsv3_kv_bytes(engine, backend, dtype).items()}
    weights = {"dsv3": runners[0].weights()}
    if len(runners) > 1:
        peer = runners[1]
        if hasattr(peer, "kv_bytes_per_token"):
            kv[peer.name] = peer.kv_bytes_per_token()
        w = peer.weights()
        if "params" not in w:  # a GGUF file: per parameter of the same checkpoint (no MTP layers in GGUF)
            params = weights["dsv3"]["params"] - sum(p.numel() for p in model.mtp.parameters())
            w.update(params=params, bytes_per_param=round(w["bytes"] / max(params, 1), 4))
        weights[peer.name] = w
        if hasattr(peer, "close"):
            peer.close()
    result["kv_cache"] = kv
    result["kv_cache_671b"] = kv_bytes_671b()
    result["weights"] = weights
    result["load_average_after"] = _loadavg()
    return result


def _describe(engine: Engine, backend: str) -> dict:
    cfg, model = engine.cfg, engine.model
    return {
        "path": str(engine.path),
        "backend": backend,
        "dtype": str(model.embed.dtype).removeprefix("torch."),
        "attn_impl": model.opts.attn_impl,
        "act_quant": model.ops.act_quant,
        "quantization": cfg.quantization.quant_method if cfg.quantization else None,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "n_routed_experts": cfg.n_routed_experts,
        "num_experts_per_tok": cfg.num_experts_per_tok,
        "num_attention_heads": cfg.num_attention_heads,
        "kv_lora_rank": cfg.kv_lora_rank,
        "qk_rope_head_dim": cfg.qk_rope_head_dim,
        "vocab_size": cfg.vocab_size,
        "num_nextn_predict_layers": cfg.num_nextn_predict_layers,
    }


# --------------------------------------------------------------------------- reporting
def _fmt(st: dict, scale: float = 1.0, digits: int = 1) -> str:
    return f"{st['median'] * scale:.{digits}f} [{st['min'] * scale:.{digits}f}-{st['max'] * scale:.{digits}f}]"


def busy_note(r: dict) -> str | None:
    """A warning when the CPUs were loaded beyond their count around the run: figures then low and noisy."""
    m = r["machine"]
    loads = [x[0] for x in (r.get("load_average_before"), r.get("load_average_after")) if x]
    cpus = m.get("cpu_count") or 1
    if not loads or max(loads) <= cpus:
        return None
    note = (
        f"note: the machine was busy (1-minute load average up to {max(loads)} on {cpus} CPUs): figures are lower "
        "and noisier than on an idle machine; settings timed in the same turns (a table's row, MTP against plain) "
        "compare better than separate rows"
    )
    if m.get("torch_threads", 1) > 1:
        note += (
            f"; {m['torch_threads']} torch threads on busy cores wait for each other and can make a step many times "
            "slower: --threads 1 is steadier"
        )
    return note


def _table(r: dict, key: str, label: str) -> list[str]:
    header = f"{label:>7} {'impl':<13} {'TTFT ms':>22} {'prefill tok/s':>24} {'decode tok/s':>24}"
    lines = [header]
    for p in r[key]:
        at = p["prompt_len"] if label == "prompt" else p["batch"]
        for name in r["impls"]:
            f = p[name]
            lines.append(
                f"{at:>7} {name:<13} {_fmt(f['ttft_s'], 1e3, 2):>22} {_fmt(f['prefill_tokens_per_s']):>24} "
                f"{_fmt(f['decode_tokens_per_s']):>24}"
            )
        if "ratio" in p:
            q = p["ratio"]
            same = "same tokens" if p["same_tokens"] else "tokens differ"
            if p.get("first_difference"):
                d = p["first_difference"]
                same = f"tokens differ from token {d['token'] + 1} in {d['rows']} row(s)"
            lines.append(
                f"{'':>7} {'dsv3/peer':<13} {q['ttft_s']:>21.2f}x {q['prefill_tokens_per_s']:>23.2f}x "
                f"{q['decode_tokens_per_s']:>23.2f}x  ({same})"
            )
    return lines


def _shared_point(r: dict) -> int | None:
    """The prompt length whose batch-1 row is the batch sweep's batch-1 row (the same runs), if any."""
    plen = r["settings"]["decode_prompt_len"]
    for p in r["prompt_lengths"]:
        for q in r["batch_sizes"]:
            if (p["prompt_len"], q["batch"], q["prompt_len"]) == (plen, 1, plen) and p["dsv3"] == q["dsv3"]:
                return plen
    return None


def format_report(r: dict) -> str:
    """The terminal table: medians with [min-max], then ratios dsv3/peer; every section says what it timed."""
    c, m, st = r["checkpoint"], r["machine"], r["settings"]
    n, plen = st["decode_tokens"], st["decode_prompt_len"]
    lines = [
        f"dsv3 bench: {c['path']}",
        f"  model: hidden {c['hidden_size']}, {c['num_hidden_layers']} layers, {c['n_routed_experts']} experts "
        f"(top {c['num_experts_per_tok']}), {c['num_attention_heads']} heads, vocab {c['vocab_size']}, "
        f"{r['weights']['dsv3']['params'] / 1e6:.1f}M parameters",
        f"  run: backend {c['backend']}, dtype {c['dtype']}, attention {c['attn_impl']}, "
        f"{m['torch_threads']} torch thread(s); {m['processor']}, {m['cpu_count']} CPUs; "
        f"load average {r['load_average_before']} -> {r['load_average_after']}",
        f"  each figure: median [min-max] of {st['repeats']} timed runs after {st['warmup']} warm-up; a run is one "
        f"greedy generate of {n} new tokens per row (EOS off) after random-id prompts (seed {st['seed']})",
        "  TTFT ms: call to first token (prefill + first sampled token); prefill tok/s = batch x prompt / TTFT",
        f"  decode tok/s = batch x {n - 1} / (time of token {n} - time of token 1): tokens 2..{n} of every row, "
        "TTFT excluded",
    ]
    note = busy_note(r)
    if note:
        lines.append(f"  {note}")
    if r["against"]:
        lines.append(f"  against {r['against']['name']}: {r['against']['status']}")
        if "greedy_check" in r["against"]:
            lines.append(f"  greedy check: {r['against']['greedy_check']['summary']}")
        peer_cfg = r.get("peer_config") or {}
        if "gguf" in peer_cfg:
            lines.append(
                f"  llama.cpp: {peer_cfg['gguf']} ({peer_cfg['outtype']} weights, {peer_cfg['kv_cache_type']} KV "
                f"cache), {m['torch_threads']} thread(s) for decode and prefill, token ids through llama_decode"
            )
        if len(r["impls"]) > 1:
            lines.append("  dsv3/peer rows: ratios of medians (tokens/s > 1 and TTFT < 1: dsv3 is faster)")
    lines += ["", f"By prompt length: batch 1, {n} new tokens", *_table(r, "prompt_lengths", "prompt")]
    shared = _shared_point(r)
    if shared is not None:
        lines.append(f"  (prompt {shared}: the same runs as batch 1 of the next table)")
    lines += ["", f"By batch size: prompt {plen}, {n} new tokens per row (tok/s: all rows together)"]
    lines += _table(r, "batch_sizes", "batch")
    lines += ["", "KV cache bytes per token: all layers, per layer"]
    for name, v in r["kv_cache"].items():
        per_layer = v.get("bytes_per_token_per_layer")
        per_layer = "" if per_layer is None else f"{per_layer:>6}"
        lines.append(f"  {name:<16} {v['bytes_per_token']:>10} {per_layer:>6}  {v['layout']}")
    at = r.get("kv_cache_671b")
    if at:
        shown = ", ".join(
            f"{k} {v['bytes_per_token_per_layer']} ({v['bytes_per_token']} all layers)" for k, v in at.items()
        )
        lines.append(f"  at the 671B shape (C 512, R 64, 61 layers, bf16) per layer: {shown}")
    fl = r.get("bandwidth_floor")
    if fl:
        t, b, a = fl["touched"], fl["memcpy_before"], fl["memcpy_after"]
        lines += [
            "",
            f"Bandwidth floor, batch-1 decode: a token reads {t['bytes'] / 1e6:.1f} MB of weights (routed experts "
            f"{t['experts_per_token']}; embedding one row) at {fl['bytes_per_s'] / 1e9:.2f} GB/s -> floor "
            f"{fl['floor_ms_per_token']:.2f} ms/token",
            f"  bandwidth: the best of {fl['memcpy_before']['buffer_bytes'] >> 20} MiB copies (read + write bytes) and "
            "sums (read bytes), GB/s before / after the runs: copy "
            f"{b['copy_bytes_per_s'] / 1e9:.2f} / {a['copy_bytes_per_s'] / 1e9:.2f}, read "
            f"{b['read_bytes_per_s'] / 1e9:.2f} / {a['read_bytes_per_s'] / 1e9:.2f} (weights the caches hold can beat it)",
        ]
        for name, frac in fl.get("fraction_of_floor", {}).items():
            lines.append(
                f"  {name:<14} batch-1 decode at {frac:.2f} of the floor's speed (floor time / time per token)"
            )
    lines += ["", "Resident weights"]
    for name, v in r["weights"].items():
        lines.append(
            f"  {name:<14} {v['bytes'] / 2**20:>10.1f} MiB / {v['params'] / 1e6:.2f}M parameters = "
            f"{v['bytes_per_param']:.3f} bytes per parameter"
        )
    lines += ["", f"MTP speculative decoding (dsv3, greedy): prompt {plen}, {n} new tokens per row"]
    if r["mtp"]["rows"]:
        lines.append(
            f"  decode tok/s over tokens 2..{n} of every row as above; plain = the dsv3 row of the batch table, "
            "timed in the same turns"
        )
        for row in r["mtp"]["rows"]:
            lines.append(
                f"  batch {row['batch']}, k={row['k']}: acceptance per draft position {row['acceptance_rate']}, "
                f"{row['tokens_per_forward']:.2f} tokens per main-model forward; decode "
                f"{_fmt(row['decode_tokens_per_s'])} tok/s vs plain {_fmt(row['plain_decode_tokens_per_s'])} = "
                f"{row['speedup']:.2f}x"
                + ("" if row["same_tokens_as_plain"] else " (tokens differ from plain decoding)")
            )
    else:
        lines.append(f"  {r['mtp']['note']}")
    return "\n".join(lines)


def write_json(result: dict, path: str | Path) -> Path:
    """Write atomically: a partial file never replaces an existing one."""
    return write_atomically(path, json.dumps(result, indent=2) + "\n")


def need_matplotlib():
    """pyplot with the non-interactive backend, or a Dsv3Error saying how to get it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise Dsv3Error("--plot-dir needs matplotlib: pip install 'dsv3[bench]' (or pip install matplotlib)") from None
    return plt


def write_plots(result: dict, out_dir: str | Path) -> list[Path]:
    """PNG plots: decode tokens/s vs batch, prefill and decode tokens/s vs prompt length, bytes per token, and
    (with MTP rows) MTP speed-up and acceptance per draft position vs batch."""
    plt = need_matplotlib()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    impls, c, n = result["impls"], result["checkpoint"], result["settings"]["decode_tokens"]
    plen = result["settings"]["decode_prompt_len"]
    subtitle = (
        f"hidden {c['hidden_size']}, {c['num_hidden_layers']} layers, {c['n_routed_experts']} experts, {c['dtype']}"
    )
    written = []

    def curve(ax, points, x_key, y_key, label):
        xs = [p[x_key] for p in points]
        med = [p[label][y_key]["median"] for p in points]
        lo = [m - p[label][y_key]["min"] for m, p in zip(med, points, strict=True)]
        hi = [p[label][y_key]["max"] - m for m, p in zip(med, points, strict=True)]
        ax.errorbar(xs, med, yerr=[lo, hi], marker="o", capsize=3, label=label)

    def log_axis(ax, values):
        ax.set_xscale("log", base=2)
        ax.set_xticks(values, [str(v) for v in values])
        ax.minorticks_off()

    def save(fig, name):
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in impls:
        curve(ax, result["batch_sizes"], "batch", "decode_tokens_per_s", name)
    log_axis(ax, [p["batch"] for p in result["batch_sizes"]])
    ax.set(
        xlabel="batch size",
        ylabel=f"decode tokens/s (tokens 2..{n}, all rows)",
        title=f"Decode, prompt {plen}, {n} new tokens per row\n{subtitle}",
    )
    ax.legend()
    ax.grid(alpha=0.3)
    save(fig, "decode_vs_batch.png")

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name in impls:
        curve(axes[0], result["prompt_lengths"], "prompt_len", "prefill_tokens_per_s", name)
        curve(axes[1], result["prompt_lengths"], "prompt_len", "decode_tokens_per_s", name)
    axes[0].set(
        xlabel="prompt length", ylabel="prefill tokens/s (prompt / TTFT)", title=f"Prefill, batch 1\n{subtitle}"
    )
    axes[1].set(
        xlabel="prompt length (context)",
        ylabel=f"decode tokens/s (tokens 2..{n})",
        title=f"Decode, batch 1, {n} new tokens\n{subtitle}",
    )
    for ax in axes:
        log_axis(ax, [p["prompt_len"] for p in result["prompt_lengths"]])
        ax.legend()
        ax.grid(alpha=0.3)
    save(fig, "tokens_vs_prompt_length.png")

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    kv = result["kv_cache"]
    names = list(kv)
    bars = axes[0].bar(names, [kv[n]["bytes_per_token"] for n in names], color=["C0", "C2", "C1"][: len(names)])
    axes[0].bar_label(bars)
    axes[0].set(ylabel="bytes per token", title=f"KV cache per token\n{subtitle}")
    w = result["weights"]
    bars = axes[1].bar(list(w), [w[n]["bytes_per_param"] for n in w], color=["C0", "C1"][: len(w)])
    axes[1].bar_label(bars, fmt="%.3f")
    axes[1].set(ylabel="bytes per parameter", title="Resident weights")
    save(fig, "memory_per_token.png")
    if result["mtp"]["rows"]:
        save(_mtp_figure(plt, result, subtitle, log_axis), "mtp_vs_batch.png")
    return written


def _mtp_figure(plt, result: dict, subtitle: str, log_axis):
    """MTP speed-up over plain decoding (error bars: min-max of the per-run ratios) and acceptance per draft
    position, both against batch size, one line per draft count k."""
    rows, n = result["mtp"]["rows"], result["settings"]["decode_tokens"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for i, k in enumerate(sorted({row["k"] for row in rows})):
        mine = [row for row in rows if row["k"] == k]
        xs = [row["batch"] for row in mine]
        ys = [row["speedup"] for row in mine]
        lo = [max(y - row["speedup_per_run"]["min"], 0.0) for y, row in zip(ys, mine, strict=True)]
        hi = [max(row["speedup_per_run"]["max"] - y, 0.0) for y, row in zip(ys, mine, strict=True)]
        axes[0].errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, color=f"C{i}", label=f"k={k}")
        for j, style in zip(range(k), ("-", "--", ":", "-."), strict=False):
            acc = [row["acceptance_rate"][j] for row in mine]
            axes[1].plot(xs, acc, marker="o", linestyle=style, color=f"C{i}", label=f"k={k}, draft j={j + 1}")
    axes[0].axhline(1.0, color="grey", linestyle="--", linewidth=1, label="plain decoding")
    plen = result["settings"]["decode_prompt_len"]
    axes[0].set(
        xlabel="batch size",
        ylabel=f"decode speed-up over plain (tokens 2..{n})",
        title=f"MTP speed-up, prompt {plen}, {n} new tokens\n{subtitle}",
    )
    axes[1].set(xlabel="batch size", ylabel="share of verify steps accepting draft j", ylim=(0, 1.05))
    axes[1].set_title("MTP acceptance per draft position (greedy)\nrandom-id prompts")
    batches = sorted({row["batch"] for row in rows})
    for ax in axes:
        log_axis(ax, batches)
        ax.legend(fontsize="small")
        ax.grid(alpha=0.3)
    return fig
