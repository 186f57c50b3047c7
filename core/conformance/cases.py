"""Generated cases for every operator: tiny shapes, awkward sizes, edge values and the real shapes of
the published models (671B DeepSeek-V3 first: hidden 7168, q_lora 1536, kv_lora 512, rope 64,
128 heads, 256 experts top-8 in 8 groups of which 4 are eligible).

``CASE_GENERATORS[op](spec)`` lists the cases for one operator, weight format, activation mode and
compute dtype. A :class:`Case` builds its tensors only when run (on the CPU; the runner moves them
to the backend's device), from a seed derived from its name, so every run sees the same numbers.
Cases marked ``quick=False`` are the expensive ones (large weights); ``--quick`` leaves them out.
Costs are bounded: real hidden sizes with a few tokens, and at most one or two routed experts of
real size.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..model import fp8_cache
from ..model.config import ModelConfig, Routing, YarnConfig
from ..weights import FP8_BLOCK, HP, INT8_W8A8, INT8_WO, Weight

#: DeepSeek-V3 (671B) as released: YaRN factor 40 over 4096 positions, mscale_all_dim 1.
V3 = dataclasses.replace(
    ModelConfig(), yarn=YarnConfig(factor=40.0, original_max_position_embeddings=4096, mscale=1.0, mscale_all_dim=1.0)
)
#: DeepSeek-V2 (236B) routing: softmax scores, 8 groups (top 3 by their max), scale 16, no bias.
V2_ROUTING = Routing(
    top_k=6, n_experts=160, scoring="softmax", n_group=8, topk_group=3, norm_topk_prob=False, scale=16.0, has_bias=False
)
V2_HIDDEN = 5120
#: DeepSeek-V2-Lite (16B): 64 experts, 6 active, one group, hidden 2048, expert width 1408.
V2_LITE_ROUTING = Routing(
    top_k=6, n_experts=64, scoring="softmax", n_group=1, topk_group=1, norm_topk_prob=False, scale=1.0, has_bias=False
)
V2_LITE_HIDDEN, V2_LITE_MOE_INTER = 2048, 1408


@dataclass(frozen=True)
class Spec:
    """One row of the conformance table: an operator in one weight format, mode and compute dtype."""

    op: str
    fmt: str = HP
    act_quant: str = "none"
    dtype: torch.dtype = torch.float32
    kv_cache: torch.dtype | None = None  # paged cache ops: an fp8 dtype for the FP8 latent cache's cases


@dataclass(frozen=True)
class GeneratorSeed:
    """Stands for a ``torch.Generator`` argument; the runner creates it on the backend's device."""

    seed: int | None


@dataclass
class CaseData:
    """The operator's positional arguments (CPU tensors) and how to judge its result.

    check: ``"tensor"`` (compare with cpu_ref), ``"routing"`` (expert sets + weights), ``"sample"``, or
        ``"in_place"`` (the op returns None and writes argument ``info["writes"]``, which is compared).
    """

    args: tuple
    check: str = "tensor"
    info: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Case:
    """A named case; ``build()`` makes its tensors."""

    name: str
    about: str
    build: Callable[[], CaseData]
    quick: bool = True


# ---------------------------------------------------------------------------------------- helpers
def _gen(*key: object) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32("|".join(map(str, key)).encode()))


def _randn(g: torch.Generator, shape: tuple[int, ...], std: float = 1.0) -> torch.Tensor:
    return torch.randn(shape, generator=g) * std


def _sprinkle(t: torch.Tensor, big: float) -> torch.Tensor:
    """Put 0, -0.0, +big and -big at the start of ``t`` (flattened), in place; returns ``t``."""
    flat = t.view(-1)
    for i, v in enumerate((0.0, -0.0, big, -big)[: flat.numel()]):
        flat[i] = v
    return t


def _big(dtype: torch.dtype) -> float:
    """A large magnitude that the dtype holds and whose square float32 still holds."""
    return 6e4 if dtype == torch.float16 else 3e15


def _case(
    cases: list[Case], spec: Spec, name: str, about: str, fn: Callable[[torch.Generator], CaseData], quick: bool = True
) -> None:
    key = (spec.op, spec.fmt, spec.act_quant, str(spec.dtype), name)
    cases.append(Case(name, about, lambda: fn(_gen(*key)), quick))


def make_weight(
    g: torch.Generator,
    shape: tuple[int, ...],
    fmt: str,
    dtype: torch.dtype,
    scale_fmt: str | None = None,
    zero_tile: bool = False,
    nonfinite: bool = False,
) -> Weight:
    """A random ``(..., out, in)`` weight in ``fmt``, ~N(0, 1/in), with a gain of 0.1..10 per 128x128 tile.

    The uneven tile gains make a block scale applied to the wrong tile (a transposed scale grid) visible.
    nonfinite: a NaN at (0, 1) and a +inf at (min(out, 130) - 1, min(in, 140) - 1) before quantizing
    (different 128 x 128 tiles when the weight has them), so quantized formats carry NaN scales there.
    """
    from ..backends.cpu_ref import quant

    out_f, in_f = shape[-2:]
    w = _randn(g, shape, in_f**-0.5)
    tiles = shape[:-2] + (-(-out_f // 128), -(-in_f // 128))
    gains = 10 ** (torch.rand(tiles, generator=g) * 2 - 1)
    w *= gains.repeat_interleave(128, -2).repeat_interleave(128, -1)[..., :out_f, :in_f]
    if zero_tile:
        w[..., :128, :128] = 0.0
    if nonfinite:
        w[..., 0, 1 % in_f] = float("nan")
        w[..., min(out_f, 130) - 1, min(in_f, 140) - 1] = float("inf")
    if fmt == HP:
        return Weight(w.to(dtype), HP)
    if fmt == FP8_BLOCK:
        q = quant.quantize_weight_fp8(w)
        return Weight(q.data, FP8_BLOCK, q.scale, q.block_size, scale_fmt)
    if fmt in (INT8_W8A8, INT8_WO):
        q = quant.quantize_weight_int8(w, fmt)
        return Weight(q.data, fmt, q.scale)
    raise ValueError(f"unknown weight format {fmt!r}")


def _nonfinite_rows(x: torch.Tensor) -> torch.Tensor:
    """In place on the rows of ``x (..., K)``: row 0 a NaN in channel 3, row 1 a +inf in the second 128-channel
    group (or the first), row 2 a -inf in the last channel (a partial group when K % 128 != 0); later
    rows stay finite (and must stay so). Returns x."""
    rows, k = x.view(-1, x.shape[-1]), x.shape[-1]
    for r, (col, value) in enumerate(((3 % k, math.nan), (min(130, k - 1), math.inf), (k - 1, -math.inf))):
        if r < rows.shape[0]:
            rows[r, col] = value
    return x


def _activations(
    g: torch.Generator, shape: tuple[int, ...], dtype: torch.dtype, edges: bool, nonfinite: bool = False
) -> torch.Tensor:
    """Activations ~N(0, 1); with ``edges``: a zero row, -0.0, one outlier per 128 channels, a 1e3 row;
    with ``nonfinite``: NaN, +inf and -inf in rows 0-2 (:func:`_nonfinite_rows`)."""
    x = _randn(g, shape)
    if nonfinite:
        return _nonfinite_rows(x).to(dtype)
    if edges:
        rows = x.view(-1, shape[-1])
        rows[0] = 0.0
        if rows.shape[0] > 1:
            rows[1, ::3] = -0.0
            rows[1, ::128] = 50.0
        if rows.shape[0] > 2:
            rows[2] *= 1e3
    return x.to(dtype)


# ---------------------------------------------------------------------------------------- norms / embedding
def cases_embedding(spec: Spec) -> list[Case]:
    cases: list[Case] = []

    def build(v: int, d: int, b: int, t: int, edges: bool = False):
        def fn(g: torch.Generator) -> CaseData:
            weight = _randn(g, (v, d)).to(spec.dtype)
            if edges:
                _sprinkle(weight, _big(spec.dtype))
            ids = torch.randint(0, v, (b, t), generator=g)
            ids.view(-1)[0], ids.view(-1)[-1] = 0, v - 1  # both ends of the table
            return CaseData((ids, weight))

        return fn

    _case(cases, spec, "tiny", "V=4, D=2, one token", build(4, 2, 1, 1))
    _case(
        cases,
        spec,
        "awkward",
        "V=97, D=200, B=2 x T=5, first and last rows, -0.0 and large",
        build(97, 200, 2, 5, True),
    )
    _case(cases, spec, "671B-vocab", f"V={V3.vocab_size} (D=16), B=2 x T=3", build(V3.vocab_size, 16, 2, 3))
    _case(cases, spec, "671B-hidden", f"D={V3.hidden_size} (V=512), 1 token", build(512, V3.hidden_size, 1, 1))
    return cases


def cases_rms_norm(spec: Spec) -> list[Case]:
    cases: list[Case] = []
    eps = V3.rms_norm_eps

    def build(shape: tuple[int, ...], eps: float = eps, std: float = 1.0, edges: bool = False):
        def fn(g: torch.Generator) -> CaseData:
            x = _randn(g, shape, std)
            if edges:
                rows = x.view(-1, shape[-1])
                rows[0] = 0.0
                rows[1] = -0.0
                _sprinkle(rows[2], _big(spec.dtype))
            w = (1.0 + _randn(g, shape[-1:], 0.3)).to(spec.dtype)
            return CaseData((x.to(spec.dtype), w, eps))

        return fn

    h, ql, kvl = V3.hidden_size, V3.q_lora_rank, V3.kv_lora_rank
    _case(cases, spec, "tiny", "(1, 4)", build((1, 4)))
    _case(cases, spec, "D=1", "(3, 1): one channel", build((3, 1)))
    _case(cases, spec, "671B-hidden-1tok", f"(1, 1, {h}): one token", build((1, 1, h)))
    _case(cases, spec, "671B-hidden", f"(3, {h})", build((3, h)))
    _case(cases, spec, "671B-q_lora", f"(2, 5, {ql})", build((2, 5, ql)))
    _case(cases, spec, "671B-kv_lora", f"(4, {kvl})", build((4, kvl)))
    _case(cases, spec, "awkward", "(2, 3, 100)", build((2, 3, 100)))
    _case(cases, spec, "small-x", f"x ~ 1e-3 so that eps={eps:g} matters", build((4, 256), std=1e-3))
    _case(cases, spec, "eps=0.5", "a large eps", build((4, 64), eps=0.5))
    _case(cases, spec, "edges", "a zero row, a -0.0 row, 0/-0.0/large values", build((3, 130), edges=True))
    return cases


# ---------------------------------------------------------------------------------------- rotary
def cases_rotary(spec: Spec) -> list[Case]:
    cases: list[Case] = []

    def build(b: int, t: int, h: int, r: int, edges: bool = False, far: bool = False):
        def fn(g: torch.Generator) -> CaseData:
            x = _randn(g, (b, t, h, r))
            if edges:
                _sprinkle(x, 1e4)
            pos = torch.randint(0, V3.max_position_embeddings if far else 64, (b, t, 1), generator=g).float()
            freqs = 1.0 / (V3.rope_theta ** (torch.arange(0, r, 2).float() / r))
            angle = pos * freqs  # (B, T, R/2)
            return CaseData((x.to(spec.dtype), angle.cos(), angle.sin()))

        return fn

    rope, heads = V3.qk_rope_head_dim, V3.num_attention_heads
    _case(cases, spec, "tiny", "(1, 1, 1, 2)", build(1, 1, 1, 2))
    _case(cases, spec, "671B-q_pe", f"(1, 3, {heads}, {rope})", build(1, 3, heads, rope))
    _case(cases, spec, "671B-k_pe", f"(2, 4, 1, {rope}): the shared key part", build(2, 4, 1, rope))
    _case(
        cases,
        spec,
        "671B-decode",
        f"(2, 1, {heads}, {rope}) at positions up to 163840",
        build(2, 1, heads, rope, far=True),
    )
    _case(cases, spec, "awkward", "(1, 5, 3, 6): R/2 odd", build(1, 5, 3, 6))
    _case(cases, spec, "edges", "0, -0.0, +-1e4", build(2, 2, 2, 8, edges=True))
    return cases


# ---------------------------------------------------------------------------------------- MLA attention
def _positions(b: int, t: int, starts: list[int], expand: bool) -> torch.Tensor:
    if expand:  # what a full-sequence forward passes: one row broadcast over the batch (stride 0)
        return torch.arange(t).expand(b, t)
    return torch.stack([torch.arange(s, s + t) for s in starts])


def _stale(cache: torch.Tensor, q_pos: torch.Tensor, value: float) -> None:
    """Fill cache entries past each row's last position with ``value`` (they must be ignored)."""
    for row in range(cache.shape[0]):
        cache[row, int(q_pos[row].max()) + 1 :] = value


def cases_attention(spec: Spec) -> list[Case]:
    cases: list[Case] = []
    scale = V3.softmax_scale

    def build(b, t, s, h, dqk, dv, starts, expand=False, mode="random"):
        def fn(g: torch.Generator) -> CaseData:
            q, k, v = _randn(g, (b, t, h, dqk)), _randn(g, (b, s, h, dqk)), _randn(g, (b, s, h, dv))
            if mode == "uniform":
                q.zero_()  # every visible key ties: a uniform average
            if mode == "large":
                q, k = q * 8, k * 8  # scores ~ +-100: softmax must subtract the max
            q_pos = _positions(b, t, starts, expand)
            _stale(k, q_pos, 1e3)
            _stale(v, q_pos, 1e3)
            return CaseData((q.to(spec.dtype), k.to(spec.dtype), v.to(spec.dtype), q_pos, scale))

        return fn

    h, dqk, dv = V3.num_attention_heads, V3.qk_head_dim, V3.v_head_dim
    _case(cases, spec, "tiny", "B1 T1 S1 H1, Dqk 4, Dv 2", build(1, 1, 1, 1, 4, 2, [0]))
    _case(
        cases,
        spec,
        "671B-prefill",
        f"B1 T4, H{h}, Dqk {dqk}, Dv {dv}, positions broadcast",
        build(1, 4, 4, h, dqk, dv, [0], expand=True),
    )
    _case(
        cases,
        spec,
        "671B-decode",
        f"B2 T1 S9 at positions 8 and 3 (stale cache past 3), H{h}",
        build(2, 1, 9, h, dqk, dv, [8, 3]),
    )
    _case(
        cases,
        spec,
        "rows-apart",
        "B3 T1 S10 at positions 0, 4, 9; H4 Dqk 24 Dv 8",
        build(3, 1, 10, 4, 24, 8, [0, 4, 9]),
    )
    _case(cases, spec, "chunked", "B1 T3 at positions 5..7 over S8 (a prefill chunk)", build(1, 3, 8, 3, 13, 5, [5]))
    _case(
        cases,
        spec,
        "ties",
        "q = 0: every visible key scores the same",
        build(2, 2, 4, 2, 16, 8, [0, 2], mode="uniform"),
    )
    _case(
        cases,
        spec,
        "large-scores",
        "scores ~ +-100 (exp overflows without the max subtracted)",
        build(1, 3, 3, 2, 64, 16, [0], mode="large"),
    )
    return cases


def cases_mla_latent_attention(spec: Spec) -> list[Case]:
    cases: list[Case] = []
    scale = V3.softmax_scale

    def build(b, t, s, h, c, r, starts, expand=False, mode="random"):
        def fn(g: torch.Generator) -> CaseData:
            ql, qp = _randn(g, (b, t, h, c)), _randn(g, (b, t, h, r))
            kv, pe = _randn(g, (b, s, c)), _randn(g, (b, s, r))
            if mode == "uniform":
                ql.zero_()
                qp.zero_()
            if mode == "large":
                ql, kv = ql * 6, kv * 6
            q_pos = _positions(b, t, starts, expand)
            _stale(kv, q_pos, 1e3)
            _stale(pe, q_pos, -1e3)
            args = (ql.to(spec.dtype), qp.to(spec.dtype), kv.to(spec.dtype), pe.to(spec.dtype), q_pos, scale)
            return CaseData(args)

        return fn

    h, c, r = V3.num_attention_heads, V3.kv_lora_rank, V3.qk_rope_head_dim
    _case(cases, spec, "tiny", "B1 T1 S1 H1, C4, R2", build(1, 1, 1, 1, 4, 2, [0]))
    _case(
        cases,
        spec,
        "671B-decode",
        f"B2 T1 S17 at positions 16 and 7, H{h} C{c} R{r}",
        build(2, 1, 17, h, c, r, [16, 7]),
    )
    _case(
        cases,
        spec,
        "671B-prefill",
        f"B1 T6, H{h} C{c} R{r}, positions broadcast",
        build(1, 6, 6, h, c, r, [0], expand=True),
    )
    _case(
        cases, spec, "chunked", "B2 T3 at positions 4..6 and 0..2 over S7; H5 C48 R6", build(2, 3, 7, 5, 48, 6, [4, 0])
    )
    _case(
        cases,
        spec,
        "ties",
        "q = 0: every visible latent scores the same",
        build(1, 2, 3, 2, 32, 4, [1], mode="uniform"),
    )
    _case(cases, spec, "large-scores", "scores ~ +-100", build(1, 2, 4, 2, 64, 8, [2], mode="large"))
    return cases


# ---------------------------------------------------------------------------------------- paged latent cache
@dataclass(frozen=True)
class PagedRows:
    """Which pages each batch row uses: row b has ``seq_lens[b]`` entries, its pages listed in order."""

    seq_lens: list[int]
    page_size: int
    pages: list[list[int]]  # pages[b]: row b's pages, ceil(seq_lens[b] / page_size) of them
    num_pages: int

    def block_table(self) -> torch.Tensor:
        """(B, M) int32, one column more than the longest row needs; unused entries -1 or out of range."""
        width = max(len(p) for p in self.pages) + 1
        table = torch.empty((len(self.pages), width), dtype=torch.int32)
        for b, pages in enumerate(self.pages):
            table[b] = -1 if b % 2 == 0 else self.num_pages + 7  # never read: a -1 or a page that does not exist
            table[b, : len(pages)] = torch.tensor(pages, dtype=torch.int32)
        return table

    def used(self) -> torch.Tensor:
        """(P, page_size) bool: entries that are one of some row's first seq_lens[b] positions."""
        used = torch.zeros((self.num_pages, self.page_size), dtype=torch.bool)
        for length, pages in zip(self.seq_lens, self.pages, strict=True):
            for j in range(length):
                used[pages[j // self.page_size], j % self.page_size] = True
        return used


def paged_rows(
    g: torch.Generator, seq_lens: list[int], page_size: int, spare: int, share: tuple[tuple[int, int, int], ...] = ()
) -> PagedRows:
    """Rows of ``seq_lens`` entries on pages drawn at random from ``spare`` more pages than they need.

    share: ``(a, b, k)``: row b's first k pages are row a's (a shared prefix; row a comes first).
    """
    need = [-(-n // page_size) for n in seq_lens]
    total = sum(need) - sum(k for _, _, k in share) + spare
    free = torch.randperm(total, generator=g).tolist()
    pages: list[list[int]] = []
    for b, n in enumerate(need):
        shared = next(((a, k) for a, row, k in share if row == b), None)
        mine = list(pages[shared[0]][: shared[1]]) if shared else []
        while len(mine) < n:
            mine.append(free.pop())
        pages.append(mine)
    return PagedRows(seq_lens, page_size, pages, total)


def fp8_pages(g: torch.Generator, num_pages: int, page_size: int, c: int, r: int, spec: Spec) -> torch.Tensor:
    """An FP8 latent cache (P, page_size, W) of ``spec.kv_cache`` holding random entries (latents of mixed
    magnitudes per tile, so the scales differ), encoded as ``dsv3.model.fp8_cache`` defines."""
    n = num_pages * page_size
    kv = _randn(g, (n, c)) * torch.exp(_randn(g, (n, 1)))  # per-token magnitudes e^N(0,1)
    pe = _randn(g, (n, r))
    entries = fp8_cache.encode_entries(kv.to(spec.dtype), pe.to(spec.dtype), spec.kv_cache)
    return entries.view(num_pages, page_size, -1)


def garbage_bytes(cache: torch.Tensor, where: torch.Tensor) -> None:
    """Fill the entries of an fp8 cache (P, page_size, W) at ``where (P, page_size) bool`` with 0xFF bytes:
    a NaN latent byte (e4m3fn), a NaN scale and a NaN roped key (freed pages, the rest of a last page)."""
    cache.view(torch.uint8)[where] = 0xFF


def cases_paged_cache_write_fp8(spec: Spec) -> list[Case]:
    """The FP8 latent cache (``spec.kv_cache``): each written entry bit-exact, every other byte untouched."""
    cases: list[Case] = []

    def build(num_pages: int, page_size: int, c: int, r: int, slots: list[int], freed_page=None, odd=False):
        def fn(g: torch.Generator) -> CaseData:
            w = fp8_cache.entry_bytes(c, r, spec.dtype)
            stale = torch.randint(0, 256, (num_pages, page_size, w), generator=g, dtype=torch.uint8)
            cache = stale.view(spec.kv_cache)  # what earlier requests left there: any bytes
            if freed_page is not None:
                garbage_bytes(cache, torch.arange(num_pages).unsqueeze(1).expand(-1, page_size) == freed_page)
            n = len(slots)
            kv = _randn(g, (n, c)) * torch.exp(2 * _randn(g, (n, 1)))  # magnitudes over a few decades
            pe = _randn(g, (n, r))
            if odd and n >= 3:  # an all-zero tile, a NaN in one tile, an infinity in another
                kv[0, : min(c, 128)] = 0.0
                kv[1, 1] = float("nan")
                kv[2, c - 1] = float("inf")
            if n:
                _sprinkle(kv[-1], 17.0)  # 0, -0, +-17 (the value the interpreter's e4m3fn cast rounds wrongly)
            slot_mapping = torch.tensor(slots, dtype=torch.int64)
            args = (cache, kv.to(spec.dtype), pe.to(spec.dtype), slot_mapping)
            return CaseData(args, check="in_place", info={"writes": 0})

        return fn

    def scattered(num_pages: int, page_size: int, n: int, pad: int) -> list[int]:
        g = _gen("paged_cache_write_fp8", "slots", num_pages, page_size, n)
        slots = torch.randperm(num_pages * page_size, generator=g)[:n].tolist()
        return [-1] + slots[: n // 2] + [-1] * (pad - 2) + slots[n // 2 :] + [-1]

    c, r = V3.kv_lora_rank, V3.qk_rope_head_dim
    name = str(spec.kv_cache).removeprefix("torch.float8_")
    _case(cases, spec, f"fp8-{name}-tiny", "P2 page 2, C4 R2 (one partial tile), one token", build(2, 2, 4, 2, [3]))
    _case(cases, spec, f"fp8-{name}-one-token", "one token at offset 0 of a fresh page", build(4, 4, 16, 4, [8]))
    _case(
        cases,
        spec,
        f"fp8-{name}-scattered",
        "P6 page 4, C200 R8 (a full and a partial tile): 9 tokens at random slots, padding, a garbage page",
        build(6, 4, 200, 8, scattered(6, 4, 9, 4), freed_page=5),
    )
    _case(
        cases,
        spec,
        f"fp8-{name}-page-boundary",
        "a chunk crossing from page 2's last offsets into page 0, C256 R16",
        build(3, 4, 256, 16, [2 * 4 + 2, 2 * 4 + 3, 0, 1], freed_page=1),
    )
    _case(
        cases,
        spec,
        f"fp8-{name}-nonfinite",
        "a zero tile, a NaN in one tile and an infinity in another (their tiles read back NaN), C384 R16",
        build(4, 4, 384, 16, [5, 6, 7, 12], odd=True),
    )
    _case(cases, spec, f"fp8-{name}-all-padding", "every slot -1", build(3, 4, 16, 4, [-1, -1, -1]))
    _case(
        cases,
        spec,
        f"fp8-{name}-671B-decode",
        f"P16 page 64, C{c} R{r} (656 bytes per entry in bf16): 4 decode tokens and 2 padding, a garbage page",
        build(16, 64, c, r, scattered(16, 64, 4, 2), freed_page=3),
        quick=False,
    )
    _case(
        cases,
        spec,
        f"fp8-{name}-671B-prefill",
        f"page 64, C{c} R{r}: 70 tokens from offset 10 of page 5 on into page 2, with a NaN and an infinity",
        build(8, 64, c, r, [5 * 64 + i for i in range(10, 64)] + [2 * 64 + i for i in range(16)], 7, odd=True),
        quick=False,
    )
    return cases


def cases_paged_cache_write(spec: Spec) -> list[Case]:
    if spec.kv_cache is not None:
        return cases_paged_cache_write_fp8(spec)
    cases: list[Case] = []

    def build(num_pages: int, page_size: int, c: int, r: int, slots: list[int], freed_page: int | None = None):
        def fn(g: torch.Generator) -> CaseData:
            cache = _randn(g, (num_pages, page_size, c + r))  # what earlier requests left there
            if freed_page is not None:
                cache[freed_page] = float("nan")  # a freed page's stale entries: untouched ones must stay NaN
            n = len(slots)
            kv, pe = _randn(g, (n, c)), _randn(g, (n, r))
            slot_mapping = torch.tensor(slots, dtype=torch.int64)
            args = (cache.to(spec.dtype), kv.to(spec.dtype), pe.to(spec.dtype), slot_mapping)
            return CaseData(args, check="in_place", info={"writes": 0})

        return fn

    def scattered(num_pages: int, page_size: int, n: int, pad: int) -> list[int]:
        g = _gen("paged_cache_write", "slots", num_pages, page_size, n)
        slots = torch.randperm(num_pages * page_size, generator=g)[:n].tolist()
        return [-1] + slots[: n // 2] + [-1] * (pad - 2) + slots[n // 2 :] + [-1]  # padding first, inside, last

    c, r = V3.kv_lora_rank, V3.qk_rope_head_dim
    _case(cases, spec, "tiny", "P2 page 2, C4 R2, one token at slot 3", build(2, 2, 4, 2, [3]))
    _case(cases, spec, "one-token", "one token at offset 0 of a fresh page (P4 page 4)", build(4, 4, 8, 2, [8]))
    _case(
        cases,
        spec,
        "scattered",
        "P6 page 4, C16 R4: 9 tokens at random slots, padding (-1) first, inside and last, a NaN page",
        build(6, 4, 16, 4, scattered(6, 4, 9, 4), freed_page=5),
    )
    _case(
        cases,
        spec,
        "page-boundary",
        "a chunk crossing from page 2's last offsets into page 0 (not adjacent); page 1 a NaN page",
        build(3, 4, 16, 4, [2 * 4 + 2, 2 * 4 + 3, 0, 1], freed_page=1),
    )
    _case(cases, spec, "all-padding", "every slot -1: nothing is written", build(3, 4, 8, 4, [-1, -1, -1]))
    _case(
        cases,
        spec,
        "671B-decode",
        f"P16 page 64, C{c} R{r}: 4 decode tokens and 2 padding, a NaN page",
        build(16, 64, c, r, scattered(16, 64, 4, 2), freed_page=3),
        quick=False,
    )
    _case(
        cases,
        spec,
        "671B-prefill",
        f"page 64, C{c} R{r}: 70 tokens from offset 10 of page 5 on into page 2",
        build(8, 64, c, r, [5 * 64 + i for i in range(10, 64)] + [2 * 64 + i for i in range(16)], freed_page=7),
        quick=False,
    )
    return cases


def cases_mla_paged_attention_fp8(spec: Spec) -> list[Case]:
    """Attention over an FP8 latent cache (``spec.kv_cache``) written by cpu_ref's encoding; stale entries
    (spare pages, past each row's length) are 0xFF bytes: NaN latents, scales and roped keys."""
    cases: list[Case] = []
    scale = V3.softmax_scale

    def build(seq_lens, t, h, c, r, page_size, spare=2, share=()):
        def fn(g: torch.Generator) -> CaseData:
            rows = paged_rows(g, list(seq_lens), page_size, spare, share)
            b = len(seq_lens)
            ql, qp = _randn(g, (b, t, h, c)), _randn(g, (b, t, h, r))
            cache = fp8_pages(g, rows.num_pages, page_size, c, r, spec)
            garbage_bytes(cache, ~rows.used())
            seq = torch.tensor(seq_lens, dtype=torch.int32)
            args = (ql.to(spec.dtype), qp.to(spec.dtype), cache, rows.block_table(), seq, scale)
            return CaseData(args)

        return fn

    h, c, r = V3.num_attention_heads, V3.kv_lora_rank, V3.qk_rope_head_dim
    name = str(spec.kv_cache).removeprefix("torch.float8_")
    _case(cases, spec, f"fp8-{name}-tiny", "B1 T1, one entry on page size 2, H1 C4 R2", build([1], 1, 1, 4, 2, 2, 1))
    _case(cases, spec, f"fp8-{name}-one-token", "B2 T1: two rows of one token each", build([1, 1], 1, 3, 16, 4, 4))
    _case(
        cases,
        spec,
        f"fp8-{name}-random-pages",
        "B3 T1 of 5, 12, 7 entries on random pages of 4, C200 (a partial tile); garbage in spare pages",
        build([5, 12, 7], 1, 4, 200, 8, 4, spare=3),
    )
    _case(
        cases,
        spec,
        f"fp8-{name}-shared-pages",
        "B3 T1: rows sharing prefix pages (row 1 ends inside a shared page)",
        build([10, 6, 13], 1, 4, 256, 8, 4, share=((0, 1, 2), (0, 2, 1))),
    )
    _case(
        cases,
        spec,
        f"fp8-{name}-page-boundary",
        "B4 T1 of 4, 5, 8, 9 entries on pages of 4",
        build([4, 5, 8, 9], 1, 4, 128, 8, 4),
    )
    _case(cases, spec, f"fp8-{name}-causal-chunk", "B2 T3 across a page boundary", build([10, 3], 3, 5, 48, 6, 4))
    _case(
        cases,
        spec,
        f"fp8-{name}-671B-decode",
        f"B4 T1 of 1, 64, 65, 300 entries, page 64, H{h} C{c} R{r}",
        build([1, 64, 65, 300], 1, h, c, r, 64),
        quick=False,
    )
    return cases


def cases_mla_paged_attention(spec: Spec) -> list[Case]:
    if spec.kv_cache is not None:
        return cases_mla_paged_attention_fp8(spec)
    cases: list[Case] = []
    scale = V3.softmax_scale

    def build(seq_lens, t, h, c, r, page_size, spare=2, share=(), mode="random"):
        def fn(g: torch.Generator) -> CaseData:
            rows = paged_rows(g, list(seq_lens), page_size, spare, share)
            b = len(seq_lens)
            ql, qp = _randn(g, (b, t, h, c)), _randn(g, (b, t, h, r))
            cache = _randn(g, (rows.num_pages, page_size, c + r))
            if mode == "uniform":
                ql.zero_()
                qp.zero_()
            if mode == "large":
                ql, cache = ql * 6, cache * 6
            cache[~rows.used()] = float("nan")  # stale: the rest of last pages and the spare (freed) pages
            seq = torch.tensor(seq_lens, dtype=torch.int32)
            args = (ql.to(spec.dtype), qp.to(spec.dtype), cache.to(spec.dtype), rows.block_table(), seq, scale)
            return CaseData(args)

        return fn

    h, c, r = V3.num_attention_heads, V3.kv_lora_rank, V3.qk_rope_head_dim
    _case(cases, spec, "tiny", "B1 T1, one entry on page size 2, H1 C4 R2", build([1], 1, 1, 4, 2, 2, spare=1))
    _case(cases, spec, "one-token", "B2 T1: two fresh rows of one token each (page 4)", build([1, 1], 1, 3, 16, 4, 4))
    _case(
        cases,
        spec,
        "random-pages",
        "B3 T1 of 5, 12, 7 entries on random pages of 4; NaN in spare pages and past each length",
        build([5, 12, 7], 1, 4, 32, 8, 4, spare=3),
    )
    _case(
        cases,
        spec,
        "shared-pages",
        "B3 T1: row 1 ends inside a page it shares with row 0 (row 0's later entries there must not be "
        "read), row 2 shares row 0's first page and goes on on its own",
        build([10, 6, 13], 1, 4, 32, 8, 4, share=((0, 1, 2), (0, 2, 1))),
    )
    _case(
        cases,
        spec,
        "page-boundary",
        "B4 T1 of 4, 5, 8, 9 entries on pages of 4 (k * page_size and k * page_size + 1)",
        build([4, 5, 8, 9], 1, 4, 32, 8, 4),
    )
    _case(
        cases,
        spec,
        "causal-prefill",
        "B1 T6: a whole prompt of 6 over pages of 4, causal",
        build([6], 6, 3, 24, 6, 4),
    )
    _case(
        cases,
        spec,
        "causal-chunk",
        "B2 T3: positions 7..9 (across a page boundary) and a fresh prompt of 3; pages of 4",
        build([10, 3], 3, 5, 48, 6, 4),
    )
    _case(
        cases,
        spec,
        "page-size-1",
        "B2 T2 of 3 and 5 entries, one entry per page",
        build([3, 5], 2, 2, 16, 4, 1, spare=2),
    )
    _case(
        cases,
        spec,
        "ties",
        "q = 0: every visible entry scores the same",
        build([5, 2], 2, 2, 32, 4, 4, mode="uniform"),
    )
    _case(cases, spec, "large-scores", "scores ~ +-100", build([6], 2, 2, 64, 8, 4, mode="large"))
    _case(
        cases,
        spec,
        "671B-decode",
        f"B4 T1 of 1, 64, 65, 300 entries, page 64, H{h} C{c} R{r}",
        build([1, 64, 65, 300], 1, h, c, r, 64),
        quick=False,
    )
    _case(
        cases,
        spec,
        "671B-chunk",
        f"B2 T8 of 128 and 136 entries sharing their first 2 pages of 64, H{h} C{c} R{r}",
        build([128, 136], 8, h, c, r, 64, share=((0, 1, 2),)),
        quick=False,
    )
    return cases


# ---------------------------------------------------------------------------------------- GEMM and quantization
def cases_linear(spec: Spec) -> list[Case]:
    cases: list[Case] = []

    def build(
        lead: tuple[int, ...],
        in_f: int,
        out_f: int,
        edges: bool = False,
        scale_fmt: str | None = None,
        zero_tile: bool = False,
        nonfinite: str = "",
    ):
        def fn(g: torch.Generator) -> CaseData:
            w = make_weight(g, (out_f, in_f), spec.fmt, spec.dtype, scale_fmt, zero_tile, nonfinite == "weight")
            return CaseData((_activations(g, (*lead, in_f), spec.dtype, edges, nonfinite == "x"), w))

        return fn

    d, ql, kvl, r = V3.hidden_size, V3.q_lora_rank, V3.kv_lora_rank, V3.qk_rope_head_dim
    h, dqk, dv = V3.num_attention_heads, V3.qk_head_dim, V3.v_head_dim
    _case(cases, spec, "tiny", "(1, 16) x (8, 16)", build((1,), 16, 8))
    _case(
        cases,
        spec,
        "671B-wkv_a-1tok",
        f"(1, 1, {d}) -> {kvl + r}: one token, out not a multiple of 128",
        build((1, 1), d, kvl + r),
    )
    _case(cases, spec, "awkward", "(5, 200) -> 72", build((5,), 200, 72, edges=True))
    _case(cases, spec, "awkward-3d", "(2, 3, 130) -> 257", build((2, 3), 130, 257))
    _case(
        cases, spec, "square-grid", "(4, 256) -> 256: a 2x2 block grid, uneven gains", build((4,), 256, 256, edges=True)
    )
    _case(cases, spec, "grid-3x3", "(3, 300) -> 260, an all-zero tile", build((3,), 300, 260, zero_tile=True))
    # the non-finite rule (dsv3.weights): quantized, a group holding NaN or inf makes its token's outputs NaN
    _case(
        cases,
        spec,
        "nonfinite-x",
        "(4, 300) -> 136: NaN, +inf, -inf (in a partial group) in rows 0-2; row 3 finite",
        build((4,), 300, 136, nonfinite="x"),
    )
    _case(
        cases,
        spec,
        "nonfinite-w",
        "(3, 300) -> 136: a NaN in weight tile (0, 0), a +inf in tile (1, 1)",
        build((3,), 300, 136, nonfinite="weight"),
    )
    if spec.fmt == FP8_BLOCK:
        _case(
            cases,
            spec,
            "ue8m0",
            "(3, 384) -> 128 with power-of-two activation scales",
            build((3,), 384, 128, edges=True, scale_fmt="ue8m0"),
        )
        _case(
            cases,
            spec,
            "ue8m0-nonfinite",
            "(4, 300) -> 128, power-of-two scales: a NaN or inf group's scale stays NaN (never 1.0)",
            build((4,), 300, 128, scale_fmt="ue8m0", nonfinite="x"),
        )
    _case(cases, spec, "671B-wq_a", f"(3, {d}) -> {ql}", build((3,), d, ql), quick=False)
    _case(cases, spec, "671B-wq_b", f"(2, {ql}) -> {h * dqk}", build((2,), ql, h * dqk), quick=False)
    _case(
        cases,
        spec,
        "671B-wkv_b",
        f"(2, {kvl}) -> {h * (V3.qk_nope_head_dim + dv)}",
        build((2,), kvl, h * (V3.qk_nope_head_dim + dv)),
        quick=False,
    )
    _case(
        cases,
        spec,
        "671B-shared-w2",
        f"(4, {V3.moe_intermediate_size}) -> {d}, edge values",
        build((4,), V3.moe_intermediate_size, d, edges=True),
        quick=False,
    )
    return cases


def cases_dequantize(spec: Spec) -> list[Case]:
    cases: list[Case] = []

    def build(shape: tuple[int, ...], zero_tile: bool = False, nonfinite: bool = False):
        def fn(g: torch.Generator) -> CaseData:
            w = make_weight(g, shape, spec.fmt, torch.bfloat16, zero_tile=zero_tile, nonfinite=nonfinite)
            if spec.fmt == HP and not nonfinite:
                _sprinkle(w.data, 3e4)
            if nonfinite and w.scale is not None:  # a checkpoint's own inf and NaN scales, applied as stored
                w.scale.view(-1)[-1] = math.inf
                w.scale.view(-1)[-2] = math.nan
            return CaseData((w, spec.dtype))

        return fn

    d, kvl, r = V3.hidden_size, V3.kv_lora_rank, V3.qk_rope_head_dim
    wkv_b = V3.num_attention_heads * (V3.qk_nope_head_dim + V3.v_head_dim)
    _case(cases, spec, "tiny", "(8, 16)", build((8, 16)))
    _case(cases, spec, "awkward", "(200, 72), an all-zero tile", build((200, 72), zero_tile=True))
    _case(cases, spec, "awkward-2", "(130, 257)", build((130, 257)))
    _case(cases, spec, "experts", "(3, 136, 200): a stack of expert weights", build((3, 136, 200)))
    _case(
        cases,
        spec,
        "nonfinite",
        "(260, 300): NaN and +inf values (NaN scales when quantized), stored inf and NaN scales",
        build((260, 300), nonfinite=True),
    )
    _case(
        cases,
        spec,
        "671B-wkv_b-head",
        f"one head of wkv_b: ({V3.qk_nope_head_dim + V3.v_head_dim}, {kvl})",
        build((V3.qk_nope_head_dim + V3.v_head_dim, kvl)),
    )
    _case(cases, spec, "671B-wkv_a", f"({kvl + r}, {d})", build((kvl + r, d)), quick=False)
    _case(
        cases, spec, "671B-wkv_b", f"({wkv_b}, {kvl}): what absorbed MLA dequantizes", build((wkv_b, kvl)), quick=False
    )
    return cases


# ---------------------------------------------------------------------------------------- MoE
def routing_margin(x: torch.Tensor, gate_weight: torch.Tensor, bias: torch.Tensor | None, r: Routing) -> torch.Tensor:
    """(N,) how far each token is from a tie that would change its expert set (0: a boundary tie).

    The gap between the last eligible and the first ineligible group score, and between the k-th
    and (k+1)-th choice score, relative to the largest choice score. Written from the hookspec,
    independently of cpu_ref, so cases whose expert set is decided by float noise can be left out.
    """
    scores = x.double() @ gate_weight.double().t()
    scores = scores.sigmoid() if r.scoring == "sigmoid" else scores.softmax(dim=-1)
    choice = scores if bias is None else scores + bias.double()
    n, margin = x.shape[0], torch.full((x.shape[0],), math.inf, dtype=torch.float64)
    if r.n_group > 1:
        grouped = choice.view(n, r.n_group, -1)
        gscore = grouped.amax(-1) if bias is None else grouped.topk(2, -1).values.sum(-1)
        top = gscore.sort(-1, descending=True).values
        if r.topk_group < r.n_group:
            margin = top[:, r.topk_group - 1] - top[:, r.topk_group]
        keep = torch.zeros_like(gscore, dtype=torch.bool).scatter_(1, gscore.topk(r.topk_group, -1).indices, True)
        choice = grouped.masked_fill(~keep.unsqueeze(-1), -math.inf).flatten(1)
    top = choice.sort(-1, descending=True).values
    if r.top_k < top.shape[1] and bool(torch.isfinite(top[:, r.top_k]).any()):
        gap = top[:, r.top_k - 1] - top[:, r.top_k]
        margin = torch.minimum(margin, torch.where(torch.isfinite(gap), gap, math.inf))
    return margin / top[:, :1].abs().squeeze(1).clamp(min=1e-30)


def cases_moe_gate(spec: Spec) -> list[Case]:
    cases: list[Case] = []
    v3 = V3.routing

    def build(n: int, d: int, r: Routing, bias: bool, mode: str = "random"):
        def fn(g: torch.Generator) -> CaseData:
            e = r.n_experts
            gw = _randn(g, (e, d), d**-0.5)
            b = _randn(g, (e,), 0.3) if bias else None
            x = _randn(g, (4 * n + 8, d))
            if mode == "ties":  # two identical experts, both always chosen: equal weights, any order
                gw[5] = gw[3]
                b[3] = b[5] = 5.0
            if mode == "zeros":  # every score is sigmoid(0) = 0.5: the bias alone decides
                x.zero_()
                b = (torch.linspace(-1, 1, e)[torch.randperm(e, generator=g)]).contiguous()
            if mode == "large":
                x = x * 50  # saturated scores: many exactly 0 or 1
            x = x.to(spec.dtype)
            margin = routing_margin(x.float(), gw, b, r)
            keep = x[margin > 1e-3][:n]
            if keep.shape[0] == 0:
                raise RuntimeError("conformance kit: no routing case without a near-tie")
            return CaseData((keep, gw, b, r), check="routing")

        return fn

    d = V3.hidden_size
    tiny = Routing(
        top_k=2,
        n_experts=4,
        scoring="softmax",
        n_group=1,
        topk_group=1,
        norm_topk_prob=False,
        scale=1.0,
        has_bias=False,
    )
    k1 = dataclasses.replace(v3, top_k=1, n_experts=8, n_group=2, topk_group=1)
    _case(cases, spec, "tiny", "E4 top-2, softmax, no groups", build(3, 8, tiny, False))
    _case(
        cases,
        spec,
        "671B",
        f"N4, D{d}, E{v3.n_experts} top-{v3.top_k}, {v3.n_group} groups of which "
        f"{v3.topk_group}, sigmoid + bias, scale {v3.scale}",
        build(4, d, v3, True),
    )
    _case(cases, spec, "671B-1tok", "one token, V3 routing", build(1, d, v3, True))
    _case(
        cases,
        spec,
        "236B",
        f"V2 group-limited: E160 top-6, 8 groups of which 3 (by max), softmax, D{V2_HIDDEN}",
        build(3, V2_HIDDEN, V2_ROUTING, False),
    )
    _case(
        cases,
        spec,
        "16B",
        f"V2-Lite: E64 top-6, softmax, D{V2_LITE_HIDDEN}",
        build(3, V2_LITE_HIDDEN, V2_LITE_ROUTING, False),
    )
    _case(cases, spec, "top-1", "k = 1 normalized: every weight is the scale 2.5, 2 groups", build(5, 64, k1, True))
    k1_raw = dataclasses.replace(k1, norm_topk_prob=False)
    _case(cases, spec, "top-1-raw", "k = 1 without norm_topk_prob: the score x scale", build(5, 64, k1_raw, True))
    _case(cases, spec, "ties", "two identical experts, both chosen (order free)", build(4, 128, v3, True, "ties"))
    _case(cases, spec, "zeros", "x = 0: equal scores, the bias decides", build(2, 128, v3, True, "zeros"))
    _case(cases, spec, "saturated", "x x 50: sigmoid scores saturate at 0 and 1", build(4, 128, v3, True, "large"))
    return cases


def cases_moe_experts(spec: Spec) -> list[Case]:
    cases: list[Case] = []

    def build(
        n: int,
        k: int,
        d: int,
        inter: int,
        e_total: int,
        e_local: int,
        offset: int,
        edges: bool = False,
        nonfinite: bool = False,
    ):
        def fn(g: torch.Generator) -> CaseData:
            x = _activations(g, (n, d), spec.dtype, edges, nonfinite)
            ids = torch.stack([torch.randperm(e_total, generator=g)[:k] for _ in range(n)])
            if e_local < e_total and e_total - e_local >= k:  # token 0 is wholly another rank's
                outside = [i for i in range(e_total) if not offset <= i < offset + e_local]
                ids[0] = torch.tensor(outside[:k])
            if e_local < e_total and n > 1:  # token 1 uses this rank's first and last expert
                ids[1, 0], ids[1, -1] = offset, offset + e_local - 1
            weights = torch.rand((n, k), generator=g) + 0.1
            weights = weights / weights.sum(-1, keepdim=True) * 2.5
            w1 = make_weight(g, (e_local, inter, d), spec.fmt, spec.dtype)
            w3 = make_weight(g, (e_local, inter, d), spec.fmt, spec.dtype)
            w2 = make_weight(g, (e_local, d, inter), spec.fmt, spec.dtype)
            return CaseData((x, weights, ids, w1, w3, w2, offset))

        return fn

    d, inter = V3.hidden_size, V3.moe_intermediate_size
    _case(cases, spec, "tiny", "N3 top-2 of E4, D16, I8", build(3, 2, 16, 8, 4, 4, 0))
    _case(cases, spec, "1tok", "one token, top-2 of E4, D32, I16", build(1, 2, 32, 16, 4, 4, 0))
    _case(
        cases,
        spec,
        "rank-slice",
        "experts 8..11 of 16 held here (offset 8): others contribute nothing",
        build(4, 3, 64, 32, 16, 4, 8),
    )
    _case(cases, spec, "awkward", "N5 top-2 of E3, D200, I72, edge values", build(5, 2, 200, 72, 3, 3, 0, edges=True))
    _case(
        cases,
        spec,
        "nonfinite",
        "N5 top-2 of E3, D200, I72: NaN, +inf, -inf in tokens 0-2 reach only their own outputs",
        build(5, 2, 200, 72, 3, 3, 0, nonfinite=True),
    )
    _case(
        cases,
        spec,
        "16B-experts",
        f"V2-Lite shapes: D{V2_LITE_HIDDEN}, I{V2_LITE_MOE_INTER}, experts 10..11 of 64, top-6",
        build(3, 6, V2_LITE_HIDDEN, V2_LITE_MOE_INTER, 64, 2, 10),
        quick=False,
    )
    _case(
        cases,
        spec,
        "671B-expert",
        f"671B shapes: D{d}, I{inter}, expert 37 of 256, top-8",
        build(2, 8, d, inter, 256, 1, 37),
        quick=False,
    )
    return cases


def cases_silu_and_mul(spec: Spec) -> list[Case]:
    cases: list[Case] = []

    def build(shape: tuple[int, ...], edges: bool = False):
        def fn(g: torch.Generator) -> CaseData:
            gate, up = _randn(g, shape, 2.0), _randn(g, shape)
            if edges:
                specials = torch.tensor([-1e4, -100.0, -20.0, -0.0, 0.0, 20.0, 100.0, 1e4])
                gate.view(-1)[: specials.numel()] = specials[: gate.numel()]
                up.view(-1)[-4:] = torch.tensor([0.0, -0.0, 1e4, -1e4])[-min(4, up.numel()) :]
            return CaseData((gate.to(spec.dtype), up.to(spec.dtype)))

        return fn

    inter, moe = V3.intermediate_size, V3.moe_intermediate_size
    _case(cases, spec, "tiny", "(1, 1)", build((1, 1)))
    _case(cases, spec, "671B-moe", f"(4, {moe})", build((4, moe)))
    _case(cases, spec, "671B-dense-1tok", f"(1, 1, {inter})", build((1, 1, inter)))
    _case(cases, spec, "671B-dense", f"(2, 3, {inter})", build((2, 3, inter)), quick=False)
    _case(cases, spec, "awkward", "(3, 1407)", build((3, 1407)))
    _case(cases, spec, "edges", "gate at +-1e4, +-100, +-20, +-0; up at 0, -0.0, +-1e4", build((2, 16), edges=True))
    return cases


# ---------------------------------------------------------------------------------------- sampling
def cases_sample(spec: Spec) -> list[Case]:
    cases: list[Case] = []
    vocab = V3.vocab_size

    def build(
        b: int,
        v: int,
        temps: list[float],
        tops: list[float],
        seed: int | None = 1234,
        mode: str = "random",
        distribution: bool = False,
    ):
        def fn(g: torch.Generator) -> CaseData:
            logits = _randn(g, (b, v), 3.0)
            if mode == "ties":  # the maximum appears three times in every row
                top = logits.max(-1, keepdim=True).values + 1.0
                for j in (2, v // 2, v - 1):
                    logits[:, j : j + 1] = top
            if mode == "masked":  # -inf everywhere but a few tokens
                keep = logits.clone()
                logits.fill_(-math.inf)
                logits[:, :5] = keep[:, :5]
            if distribution:
                logits = logits[:1].expand(b, v).contiguous()
            t = torch.tensor((temps * b)[:b], dtype=torch.float32)
            p = torch.tensor((tops * b)[:b], dtype=torch.float32)
            return CaseData((logits, t, p, GeneratorSeed(seed)), check="sample", info={"distribution": distribution})

        return fn

    _case(cases, spec, "tiny", "B1 V2, greedy", build(1, 2, [0.0], [1.0]))
    _case(cases, spec, "671B-greedy", f"B3 V{vocab}, temperature 0", build(3, vocab, [0.0], [1.0]))
    _case(
        cases,
        spec,
        "greedy-ties",
        "the maximum appears three times: any of them",
        build(2, 50, [0.0], [1.0], mode="ties"),
    )
    _case(
        cases,
        spec,
        "671B-mixed",
        f"B4 V{vocab}: greedy and sampled rows, top-p 0.9 and 0.5",
        build(4, vocab, [0.0, 0.8, 0.0, 1.0], [1.0, 0.9, 1.0, 0.5]),
    )
    _case(cases, spec, "top-p-tiny", "top_p 1e-6: the nucleus is the argmax alone", build(3, 1000, [1.0], [1e-6]))
    _case(cases, spec, "masked", "-inf logits are never drawn", build(4, 300, [1.5], [1.0], mode="masked"))
    _case(
        cases, spec, "no-generator", "generator None: still inside the nucleus", build(2, 100, [0.7], [0.8], seed=None)
    )
    _case(
        cases,
        spec,
        "distribution",
        "4000 rows of the same 8 logits at T 1.3, top-p 0.9: frequencies",
        build(4000, 8, [1.3], [0.9], distribution=True),
    )
    return cases


#: Every operator's case generator. Adding a hookspec without an entry here fails the meta-tests.
CASE_GENERATORS: dict[str, Callable[[Spec], list[Case]]] = {
    "embedding": cases_embedding,
    "rms_norm": cases_rms_norm,
    "rotary": cases_rotary,
    "attention": cases_attention,
    "mla_latent_attention": cases_mla_latent_attention,
    "paged_cache_write": cases_paged_cache_write,
    "mla_paged_attention": cases_mla_paged_attention,
    "linear": cases_linear,
    "dequantize": cases_dequantize,
    "moe_gate": cases_moe_gate,
    "moe_experts": cases_moe_experts,
    "silu_and_mul": cases_silu_and_mul,
    "sample": cases_sample,
}


def uncovered_ops(op_names: tuple[str, ...] | None = None) -> list[str]:
    """Operators of the contract without a case generator (the meta-tests require none)."""
    from ..hookspecs import OP_NAMES

    return [op for op in (OP_NAMES if op_names is None else op_names) if op not in CASE_GENERATORS]


def cases_for(spec: Spec, quick: bool = False) -> list[Case]:
    """The cases of one table row (the cheap ones only when ``quick``)."""
    return [c for c in CASE_GENERATORS[spec.op](spec) if c.quick or not quick]
