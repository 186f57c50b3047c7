"""The server's page pool: which cache pages are free, which a request holds, which keep a cached prefix.

Every layer's paged latent cache (``dsv3.model.cache.PagedLayerCache``) has the same ``num_pages``
pages, so one page index stands for one page in every layer (main and MTP). The pool hands pages
out to requests, takes them back, and, with prefix caching on, keeps the pages of finished prompts
so a later prompt that starts with the same tokens reads them instead of prefilling them again.

Prefix caching: a FULL page of a prompt is keyed by a hash chain, ``key_i = blake2b(key_{i-1} +
tokens of page i)``, so a key names the whole prefix up to that page's end, not just its own tokens
(128 bits: a collision would silently share a wrong page, so not Python's 64-bit ``hash``). A key
also covers whatever else decides the page's contents: the tokens the MTP layers read past the
page's end (their entry at position t is computed from tokens t+1 .. t+D: ``lookahead``), and an
``extra`` string folded into the first key (e.g. the cache dtype). A cached page is
shared read-only by reference count; the scheduler never writes into a page it matched (a request's
own writes start on the first position past the matched prefix, which is a page boundary).
Unreferenced cached pages stay cached until a page is needed and none is free; then the least
recently used one is evicted (its key forgotten).
"""

from __future__ import annotations

import array
import collections
import hashlib
from collections.abc import Sequence


class PagePool:
    """``num_pages`` cache pages of ``page_size`` positions each.

    Page states: free (in ``_free``), held (``refs[p] > 0``, by one request or, if cached, by several),
    or cached and unreferenced (in ``_evictable``, LRU first). ``lookahead`` is how many tokens past a
    page's end its contents depend on (the MTP layers' depth; 0 without MTP).
    """

    def __init__(self, num_pages: int, page_size: int, prefix_caching: bool = True, lookahead: int = 0):
        if num_pages < 1 or page_size < 1:
            raise ValueError(f"a page pool needs num_pages >= 1 and page_size >= 1 (got {num_pages}, {page_size})")
        self.num_pages, self.page_size = num_pages, page_size
        self.prefix_caching, self.lookahead = prefix_caching, lookahead
        self._free: collections.deque[int] = collections.deque(range(num_pages))
        self.refs = [0] * num_pages
        self._key_of: dict[int, bytes] = {}  # cached page -> its key
        self._page_of: dict[bytes, int] = {}  # key -> cached page
        self._evictable: collections.OrderedDict[int, None] = collections.OrderedDict()  # cached, refs 0; LRU first
        self.hit_pages = 0  # matched pages a request kept (the caller counts them: a failed admission gives them back)
        self.evicted = 0

    # ------------------------------------------------------------ counts
    @property
    def available(self) -> int:
        """Pages an allocation can get now: free ones and unreferenced cached ones (evicted on demand)."""
        return len(self._free) + len(self._evictable)

    def stats(self) -> dict[str, int]:
        cached = len(self._key_of)
        return {
            "pages_total": self.num_pages,
            "pages_used": self.num_pages - len(self._free) - len(self._evictable),
            "pages_free": len(self._free),
            "pages_cached": cached,
            "page_size": self.page_size,
            "prefix_hit_pages": self.hit_pages,
            "prefix_evicted_pages": self.evicted,
        }

    def pages_for(self, positions: int) -> int:
        """Pages that hold ``positions`` cache positions."""
        return -(-positions // self.page_size)

    # ------------------------------------------------------------ allocation
    def allocate(self, n: int) -> list[int] | None:
        """``n`` pages for one request (each referenced once), or None (and nothing taken) when fewer are available."""
        if n > self.available:
            return None
        out = []
        for _ in range(n):
            if self._free:
                page = self._free.popleft()
            else:  # evict the least recently used cached page
                page, _ = self._evictable.popitem(last=False)
                del self._page_of[self._key_of.pop(page)]
                self.evicted += 1
            self.refs[page] = 1
            out.append(page)
        return out

    def share(self, pages: Sequence[int]) -> None:
        """Another request takes held ``pages`` too (read-only: neither writes them again)."""
        for page in pages:
            if self.refs[page] < 1:
                raise RuntimeError(f"page {page} is not held: it cannot be shared")
            self.refs[page] += 1

    def release(self, pages: Sequence[int]) -> None:
        """A request lets go of ``pages``: unreferenced pages become free, or evictable if they are cached."""
        for page in pages:
            self.refs[page] -= 1
            if self.refs[page] < 0:
                raise RuntimeError(f"page {page} released more often than it was taken")
            if self.refs[page] == 0:
                if page in self._key_of:
                    self._evictable[page] = None  # most recently used last
                else:
                    self._free.append(page)

    # ------------------------------------------------------------ prefix caching
    def keys(self, tokens: Sequence[int], extra: str = "") -> list[bytes]:
        """The hash chain of ``tokens``' full pages whose contents are known: page i needs tokens up to
        ``(i + 1) * page_size + lookahead``. ``extra`` is folded into the first key (e.g. a cache dtype)."""
        size, keys = self.page_size, []
        parent = f"dsv3-prefix/{size}/{self.lookahead}/{extra}".encode()
        for i in range(max(0, (len(tokens) - self.lookahead) // size)):
            chunk = array.array("q", tokens[i * size : (i + 1) * size + self.lookahead]).tobytes()
            parent = hashlib.blake2b(parent + chunk, digest_size=16).digest()
            keys.append(parent)
        return keys

    def match(self, keys: Sequence[bytes], limit: int) -> list[int]:
        """The cached pages of the longest prefix of ``keys`` (at most ``limit`` pages), each referenced once more."""
        if not self.prefix_caching:
            return []
        pages = []
        for key in keys[:limit]:
            page = self._page_of.get(key)
            if page is None:
                break
            pages.append(page)
        for page in pages:
            if self.refs[page] == 0:
                del self._evictable[page]
            self.refs[page] += 1
        return pages

    def register(self, pages: Sequence[int], keys: Sequence[bytes]) -> None:
        """Say that ``pages[i]`` (held by the caller, written in full) holds the prefix keyed ``keys[i]``.

        A key already cached in another page keeps that one (this request's copy stays private).
        """
        if not self.prefix_caching:
            return
        for page, key in zip(pages, keys, strict=False):
            if key in self._page_of or page in self._key_of:
                continue
            self._page_of[key] = page
            self._key_of[page] = key
