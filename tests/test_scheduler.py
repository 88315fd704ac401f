"""Scheduler invariants under random workloads, with a fake runner (plain Python, fast)."""

from __future__ import annotations

import random

from hypothesis import example, given, settings, strategies as st

from jaxengine.config import SchedulerConfig
from jaxengine.engine.kv_cache_manager import KVCacheManager
from jaxengine.engine.request import Request, RequestStatus
from jaxengine.engine.scheduler import PENDING_TOKEN, Scheduler
from jaxengine.sampling_params import SamplingParams


def run_to_completion(sched: Scheduler, rng: random.Random, vocab: int = 4, max_steps: int = 5000,
                      pipelined: bool = False):
    """Drive the scheduler like EngineCore does; pipelined: step N+1 is scheduled before the
    tokens of step N are known (asynchronous scheduling)."""
    kv = sched.kv
    steps = 0
    inflight = None
    while sched.has_unfinished() or inflight:
        out = sched.schedule()
        for s in out.seqs:  # only the last input token of a request can still be pending
            assert PENDING_TOKEN not in s.token_ids[:-1]
            assert pipelined or PENDING_TOKEN not in s.token_ids
        steps += 1
        assert steps < max_steps, "scheduler made no progress"
        assert out.num_batched_tokens <= sched.config.max_num_batched_tokens
        assert sum(len(s.token_ids) for s in out.seqs) == out.num_batched_tokens
        assert len(sched.running) <= sched.config.max_num_seqs
        assert len({s.request_id for s in out.seqs}) == len(out.seqs)
        k = out.num_steps
        if k > 1:  # multi-step: decodes only, one input token each
            assert all(len(s.token_ids) == 1 and s.sample for s in out.seqs)
        for s in out.seqs:
            table = kv.tables[s.request_id]
            assert len(table) * kv.page_size >= s.start_pos + len(s.token_ids) + k - 1, "pages cover the step"
            assert s.page_table == table[:len(s.page_table)] and len(s.page_table) == len(table)
        kv.check_invariants(live_request_ids=sched.requests)

        def sampled():
            draw = (lambda: rng.randrange(vocab)) if k == 1 else (lambda: [rng.randrange(vocab) for _ in range(k)])
            return {s.request_id: draw() for s in out.seqs if s.sample}

        if pipelined:
            if inflight is not None:
                sched.update(*inflight)
            inflight = (out, sampled()) if out.seqs else None
        else:
            sched.update(out, sampled())
        kv.check_invariants(live_request_ids=sched.requests)
    return steps


@settings(max_examples=90, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    num_pages=st.integers(8, 40),
    page_size=st.sampled_from([2, 4, 8]),
    budget=st.integers(1, 48),
    max_num_seqs=st.integers(1, 8),
    prefix_caching=st.booleans(),
    chunked=st.booleans(),
    pipelined=st.booleans(),
    eos=st.booleans(),
    lengths=st.lists(st.tuples(st.integers(1, 30), st.integers(1, 12)), min_size=1, max_size=12),
    num_scheduler_steps=st.sampled_from([1, 1, 3]),
)
# found by hypothesis: r0's pages for a multi-step were allocated, r1's could not be, and the step
# fell back to a single one holding r0's extra page; multi-step now allocates all or none
@example(seed=0, num_pages=8, page_size=2, budget=1, max_num_seqs=2, prefix_caching=False, chunked=False,
         pipelined=False, eos=False, lengths=[(1, 10), (30, 10)], num_scheduler_steps=3)
def test_random_workloads_finish_within_budgets_and_return_every_page(
        seed, num_pages, page_size, budget, max_num_seqs, prefix_caching, chunked, pipelined, eos,
        lengths, num_scheduler_steps):
    max_model_len = 48
    if num_pages * page_size < max_model_len:
        num_pages = -(-max_model_len // page_size)
    if not chunked:
        budget = max(budget, max_model_len)
    cfg = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
                          max_model_len=max_model_len, enable_chunked_prefill=chunked,
                          num_scheduler_steps=num_scheduler_steps)
    kv = KVCacheManager(num_pages, page_size, prefix_caching)
    sched = Scheduler(cfg, kv)
    rng = random.Random(seed)
    reqs = []
    for i, (plen, max_tokens) in enumerate(lengths):
        # shared prefixes make prefix-cache hits likely
        prompt = [rng.randrange(2) for _ in range(plen)]
        req = Request(f"r{i}", prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=not eos), seed=i,
                      max_total_tokens=max_model_len, eos_token_ids=(0,))
        sched.add_request(req)
        reqs.append(req)
    run_to_completion(sched, rng, pipelined=pipelined)
    for req in reqs:
        limit = min(req.params.max_tokens, max_model_len - req.num_prompt_tokens)
        out = req.output_token_ids
        if eos and 0 in out:  # stops at the first EOS, nothing after it
            assert req.status == RequestStatus.FINISHED_STOPPED and out.index(0) == len(out) - 1
        else:
            assert req.status == RequestStatus.FINISHED_LENGTH and len(out) == limit
    assert kv.num_free_pages == kv.num_pages and all(c == 0 for c in kv.ref_cnt)
    assert not kv.tables


def test_a_tiny_pool_preempts_and_still_finishes_everything():
    cfg = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=32)
    kv = KVCacheManager(num_pages=8, page_size=4)
    sched = Scheduler(cfg, kv)
    for i in range(6):
        sched.add_request(Request(f"r{i}", [1, 2, 3, 4, 5, i], SamplingParams(max_tokens=20, ignore_eos=True),
                                  seed=i, max_total_tokens=32))
    run_to_completion(sched, random.Random(0), pipelined=True)
    assert sched.num_preemptions > 0
    assert kv.num_free_pages == kv.num_pages


def test_a_long_prompt_enters_in_chunks_of_the_budget():
    cfg = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=5, max_model_len=64)
    sched = Scheduler(cfg, KVCacheManager(32, 4))
    sched.add_request(Request("a", list(range(12)), SamplingParams(max_tokens=2), seed=0))
    chunks = []
    while True:
        out = sched.schedule()
        (seq,) = out.seqs
        chunks.append((seq.start_pos, len(seq.token_ids), seq.sample))
        sched.update(out, {"a": 3} if seq.sample else {})
        if seq.sample:
            break
    assert chunks == [(0, 5, False), (5, 5, False), (10, 2, True)]


def test_decodes_and_a_prefill_chunk_share_one_step():
    cfg = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=8, max_model_len=64)
    sched = Scheduler(cfg, KVCacheManager(32, 4))
    sched.add_request(Request("a", [1, 2, 3], SamplingParams(max_tokens=5), seed=0))
    out = sched.schedule()
    sched.update(out, {"a": 9})
    sched.add_request(Request("b", list(range(20)), SamplingParams(max_tokens=5), seed=0))
    out = sched.schedule()
    assert [(s.request_id, len(s.token_ids)) for s in out.seqs] == [("a", 1), ("b", 7)]


def test_requests_that_can_never_fit_are_rejected_with_a_clear_error():
    import pytest

    cfg = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=8, max_model_len=16)
    sched = Scheduler(cfg, KVCacheManager(2, 4))
    with pytest.raises(ValueError, match="max_model_len"):
        sched.add_request(Request("a", list(range(16)), SamplingParams(), seed=0))
    with pytest.raises(ValueError, match="never fit"):
        sched.add_request(Request("b", list(range(10)), SamplingParams(), seed=0))
    with pytest.raises(ValueError, match="empty"):
        sched.add_request(Request("c", [], SamplingParams(), seed=0))
    assert not sched.has_unfinished()


def test_n_siblings_wait_for_the_leader_and_share_its_prompt_pages():
    cfg = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64)
    kv = KVCacheManager(32, 4, enable_prefix_caching=False)
    sched = Scheduler(cfg, kv)
    params = SamplingParams(max_tokens=3)
    leader = Request("g#0", list(range(10)), params, seed=0)
    child = Request("g#1", list(range(10)), params, seed=1, leader=leader)
    sched.add_request(leader)
    sched.add_request(child)
    # with a tiny budget the leader's prompt takes two steps; the sibling waits for all of it
    sched.config = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=6, max_model_len=64)
    out = sched.schedule()
    assert [s.request_id for s in out.seqs] == ["g#0"]
    sched.update(out, {})
    sched.config = cfg
    # then joins in the step that computes the leader's last chunk: within a layer every K/V
    # write of a step lands before any attention read, so the shared pages are complete
    out = sched.schedule()
    assert [s.request_id for s in out.seqs] == ["g#0", "g#1"]
    child_seq = out.seqs[1]
    assert child_seq.start_pos == 8 and len(child_seq.token_ids) == 2  # only the partial page
    assert kv.tables["g#1"][:2] == kv.tables["g#0"][:2]
    kv.check_invariants()


def test_a_late_result_never_lands_on_a_new_request_that_reuses_an_aborted_id():
    cfg = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=16, max_model_len=64)
    sched = Scheduler(cfg, KVCacheManager(16, 4))
    sched.add_request(Request("x", [1, 2, 3], SamplingParams(max_tokens=5), seed=0))
    inflight = sched.schedule()  # dispatched; its token is not known yet
    sched.abort("x")
    fresh = Request("x", [4, 5, 6, 7], SamplingParams(max_tokens=5), seed=0)
    sched.add_request(fresh)
    sched.update(inflight, {"x": 9})  # the aborted request's token arrives late
    assert fresh.output_token_ids == [] and fresh.num_pending == 0
