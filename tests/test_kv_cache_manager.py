"""KVCacheManager: page ownership, refcounts, prefix-cache hits and LRU eviction."""

from __future__ import annotations

from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from jaxengine.engine.kv_cache_manager import KVCacheManager

PAGE = 4


def test_allocate_grows_the_table_and_free_returns_every_page():
    kv = KVCacheManager(num_pages=8, page_size=PAGE)
    assert kv.allocate("a", 5)  # 2 pages
    assert len(kv.tables["a"]) == 2
    assert kv.allocate("a", 9)  # 3 pages
    assert len(kv.tables["a"]) == 3 and kv.num_free_pages == 5
    kv.free("a")
    assert kv.num_free_pages == 8
    kv.check_invariants(live_request_ids=[])


def test_allocation_fails_without_side_effects_when_pages_run_out():
    kv = KVCacheManager(num_pages=3, page_size=PAGE)
    assert kv.allocate("a", 8)
    assert not kv.allocate("b", 8)
    assert "b" not in kv.tables and kv.num_free_pages == 1
    kv.check_invariants()


def test_full_pages_are_shared_by_a_prompt_with_the_same_prefix():
    kv = KVCacheManager(num_pages=16, page_size=PAGE)
    tokens = list(range(10))
    kv.allocate("a", len(tokens))
    kv.cache_pages("a", tokens, num_computed_tokens=10)
    hit = kv.get_cached_prefix(tokens + [99])
    assert hit == kv.tables["a"][:2]  # two full pages; the partial third is not shared
    assert kv.allocate("b", 11, shared_pages=hit)
    assert kv.tables["b"][:2] == hit and all(kv.ref_cnt[p] == 2 for p in hit)
    kv.check_invariants()


def test_the_page_holding_the_last_prompt_token_is_never_a_hit():
    kv = KVCacheManager(num_pages=16, page_size=PAGE)
    tokens = list(range(8))  # exactly two pages
    kv.allocate("a", 8)
    kv.cache_pages("a", tokens, 8)
    assert len(kv.get_cached_prefix(tokens)) == 1


def test_a_different_prefix_misses_even_with_equal_later_pages():
    kv = KVCacheManager(num_pages=16, page_size=PAGE)
    a = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    kv.allocate("a", 9)
    kv.cache_pages("a", a, 9)
    b = [0, 2, 3, 4, 5, 6, 7, 8, 9]  # same second page, different first: hash chain differs
    assert kv.get_cached_prefix(b) == []


def test_freed_pages_stay_cached_until_evicted_in_lru_order():
    kv = KVCacheManager(num_pages=4, page_size=PAGE)
    tokens = list(range(9))
    kv.allocate("a", 9)
    kv.cache_pages("a", tokens, 9)
    kv.free("a")
    assert kv.num_free_pages == 4
    assert len(kv.get_cached_prefix(tokens)) == 2  # still hits after free
    # the never-used page goes first, then the partial tail page, then the deepest cached page
    assert kv.allocate("b", 8)
    assert len(kv.get_cached_prefix(tokens)) == 2
    assert kv.allocate("c", 4)
    assert len(kv.get_cached_prefix(tokens)) == 1
    kv.check_invariants()


def test_prefix_caching_off_never_hits():
    kv = KVCacheManager(num_pages=8, page_size=PAGE, enable_prefix_caching=False)
    kv.allocate("a", 9)
    kv.cache_pages("a", list(range(9)), 9)
    assert kv.get_cached_prefix(list(range(9))) == []


class KVCacheMachine(RuleBasedStateMachine):
    """Random allocate / compute / share / free sequences keep the pool consistent."""

    def __init__(self):
        super().__init__()
        self.kv = KVCacheManager(num_pages=12, page_size=PAGE)
        self.tokens: dict[str, list[int]] = {}
        self.n = 0

    @rule(length=st.integers(1, 30), vocab=st.integers(1, 3), use_cache=st.booleans())
    def add(self, length, vocab, use_cache):
        rid = f"r{self.n}"
        self.n += 1
        tokens = [i % vocab for i in range(length)]
        shared = self.kv.get_cached_prefix(tokens) if use_cache else []
        free_before = self.kv.num_free_pages
        if self.kv.allocate(rid, length, shared):
            self.tokens[rid] = tokens
            self.kv.cache_pages(rid, tokens, length)
        else:
            assert rid not in self.kv.tables and self.kv.num_free_pages == free_before

    @precondition(lambda self: self.tokens)
    @rule(data=st.data(), extra=st.integers(1, 8))
    def grow(self, data, extra):
        rid = data.draw(st.sampled_from(sorted(self.tokens)))
        tokens = self.tokens[rid] + [7] * extra
        if self.kv.allocate(rid, len(tokens)):
            self.tokens[rid] = tokens
            self.kv.cache_pages(rid, tokens, len(tokens))

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def free(self, data):
        rid = data.draw(st.sampled_from(sorted(self.tokens)))
        del self.tokens[rid]
        self.kv.free(rid)

    @invariant()
    def consistent(self):
        self.kv.check_invariants(live_request_ids=self.tokens)
        owned = sum(1 for c in self.kv.ref_cnt if c > 0)
        assert owned + self.kv.num_free_pages == self.kv.num_pages

    def teardown(self):
        for rid in list(self.tokens):
            self.kv.free(rid)
        assert self.kv.num_free_pages == self.kv.num_pages
        assert all(c == 0 for c in self.kv.ref_cnt)


TestKVCacheMachine = KVCacheMachine.TestCase
TestKVCacheMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
