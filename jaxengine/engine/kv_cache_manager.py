"""KVCacheManager: the page pool, per-request page tables, prefix caching.  Plain Python.

Pages are fixed-size (page_size tokens of K and V for every layer).  A request owns a list of page
ids (its page table).  With prefix caching, every *full* page that has been computed is registered
under a hash chained over the page contents, hash(parent_hash, tokens); a new request whose prompt
starts with the same tokens takes those pages instead of recomputing them (refcount + 1).  A page
whose refcount drops to zero goes to the tail of the free queue but keeps its hash, so it can still
be hit until it is reused for something else: the free queue is also the LRU eviction order.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Iterable, Sequence


def hash_page(parent_hash: int | None, tokens: Sequence[int]) -> int:
    # Python's hash of a tuple of ints is deterministic (no PYTHONHASHSEED salt), so every
    # process of a multi-host job computes the same chain.
    return hash((parent_hash, tuple(tokens)))


class KVCacheManager:
    def __init__(self, num_pages: int, page_size: int, enable_prefix_caching: bool = True):
        if num_pages < 1:
            raise ValueError(f"num_pages must be >= 1, got {num_pages}")
        self.num_pages = num_pages
        self.page_size = page_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_cnt = [0] * num_pages
        # page id -> None, in eviction order (head first); holds exactly the pages with ref_cnt 0
        self._free: OrderedDict[int, None] = OrderedDict((p, None) for p in range(num_pages))
        self._hash_to_page: dict[int, int] = {}
        self._page_hash: list[int | None] = [None] * num_pages
        self.tables: dict[str, list[int]] = {}
        # per request: hashes of its full pages computed so far (a prefix of its table)
        self._req_hashes: dict[str, list[int]] = {}
        # prefix-cache statistics, in tokens
        self.num_queried_tokens = 0
        self.num_hit_tokens = 0

    # ----------------------------------------------------------------------------------- queries
    @property
    def num_free_pages(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_pages

    def pages_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def get_cached_prefix(self, token_ids: Sequence[int]) -> list[int]:
        """Pages holding the longest cached prefix of token_ids, in full pages.

        The page holding the last token is never returned: at least one token must be computed so
        that the step has a position to sample from.
        """
        if not self.enable_prefix_caching:
            return []
        pages: list[int] = []
        parent = None
        max_pages = (len(token_ids) - 1) // self.page_size
        for i in range(max_pages):
            h = hash_page(parent, token_ids[i * self.page_size:(i + 1) * self.page_size])
            page = self._hash_to_page.get(h)
            if page is None:
                break
            pages.append(page)
            parent = h
        self.num_queried_tokens += len(token_ids)
        self.num_hit_tokens += len(pages) * self.page_size
        return pages

    # ------------------------------------------------------------------------------- allocation
    def allocate(self, request_id: str, num_tokens: int, shared_pages: Sequence[int] = ()) -> bool:
        """Grow the request's table to hold num_tokens; False (and no change) if pages run out.

        shared_pages (prefix-cache hits or a sibling's prompt pages) start a new table.
        """
        table = self.tables.get(request_id)
        if table is None:
            if shared_pages and len(shared_pages) * self.page_size > num_tokens:
                raise ValueError("shared pages exceed the requested token count")
            # taking a cached page out of the free queue makes one fewer page available
            reclaim = sum(1 for p in shared_pages if self.ref_cnt[p] == 0)
            need = self.pages_needed(num_tokens) - len(shared_pages)
            if need + reclaim > len(self._free):
                return False
            table = []
            for p in shared_pages:
                self._touch(p)
                table.append(p)
            self.tables[request_id] = table
            self._req_hashes[request_id] = [self._page_hash[p] for p in shared_pages]  # type: ignore[misc]
        else:
            need = self.pages_needed(num_tokens) - len(table)
            if need > len(self._free):
                return False
        for _ in range(max(need, 0)):
            table.append(self._pop_free())
        return True

    def _touch(self, page: int) -> None:
        if self.ref_cnt[page] == 0:
            del self._free[page]
        self.ref_cnt[page] += 1

    def _pop_free(self) -> int:
        page, _ = self._free.popitem(last=False)
        h = self._page_hash[page]
        if h is not None:  # evict: this page's old contents are about to be overwritten
            if self._hash_to_page.get(h) == page:
                del self._hash_to_page[h]
            self._page_hash[page] = None
        self.ref_cnt[page] = 1
        return page

    def cache_pages(self, request_id: str, token_ids: Sequence[int], num_computed_tokens: int) -> None:
        """Register the request's full pages whose tokens have all been computed."""
        if not self.enable_prefix_caching:
            return
        table = self.tables[request_id]
        hashes = self._req_hashes[request_id]
        num_full = min(num_computed_tokens // self.page_size, len(table))
        parent = hashes[-1] if hashes else None
        for i in range(len(hashes), num_full):
            h = hash_page(parent, token_ids[i * self.page_size:(i + 1) * self.page_size])
            hashes.append(h)
            page = table[i]
            if h not in self._hash_to_page and self._page_hash[page] is None:
                self._hash_to_page[h] = page
                self._page_hash[page] = h
            parent = h

    def free(self, request_id: str) -> None:
        """Return the request's pages.  Tail pages first in the free queue: evicted sooner."""
        table = self.tables.pop(request_id, None)
        self._req_hashes.pop(request_id, None)
        if table is None:
            return
        for page in reversed(table):
            self.ref_cnt[page] -= 1
            assert self.ref_cnt[page] >= 0, f"page {page} freed more often than taken"
            if self.ref_cnt[page] == 0:
                self._free[page] = None

    def reset_prefix_cache(self) -> None:
        for page in list(self._free):
            h = self._page_hash[page]
            if h is not None:
                self._hash_to_page.pop(h, None)
                self._page_hash[page] = None

    # ---------------------------------------------------------------------------- invariants
    def check_invariants(self, live_request_ids: Iterable[str] | None = None) -> None:
        """Assert the pool's bookkeeping is consistent (used by the property tests)."""
        counts = [0] * self.num_pages
        for table in self.tables.values():
            assert len(set(table)) == len(table), "a page appears twice in one table"
            for p in table:
                counts[p] += 1
        assert counts == self.ref_cnt, "refcounts disagree with the tables"
        assert all(c >= 0 for c in self.ref_cnt)
        free = set(self._free)
        assert len(free) == len(self._free)
        assert free == {p for p in range(self.num_pages) if self.ref_cnt[p] == 0}, \
            "free queue must hold exactly the unreferenced pages"
        for h, p in self._hash_to_page.items():
            assert self._page_hash[p] == h
        if live_request_ids is not None:
            assert set(self.tables) <= set(live_request_ids), "pages held by a request that is gone"
