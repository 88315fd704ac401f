"""Continuous-batching scheduler.  Plain Python: no jax.

Prefill and decode are one thing here: each request has tokens it knows but has not computed yet
(the whole prompt at first, one sampled token per step later).  Every step shares one token budget
(max_num_batched_tokens) between running requests first and waiting ones after; a prompt longer
than what is left enters in chunks (chunked prefill).  When pages run out, the most recently
admitted running request is preempted: its pages are freed and it is recomputed later.

Asynchronous scheduling: a request's computed-token count advances when it is *scheduled*, and a
sampled token is "pending" until `update` learns its value.  So the next step can be scheduled
(and dispatched) while this one still runs on the device: a decode whose input is a pending token
carries PENDING_TOKEN in `token_ids`, and the runner takes the value from the device.  A request
whose pending tokens already reach max_tokens is not scheduled again; one that stops on EOS costs
at most one extra step, whose result is dropped.

Multi-step decoding (num_scheduler_steps = K > 1): a step in which every scheduled request decodes
one token and has room in max_model_len for K more positions becomes K decode iterations in one
device program (`SchedulerOutput.num_steps`): pages for K positions are allocated, K tokens become
pending, and `update` appends the K sampled tokens up to the first stop (max_tokens included: a
request that ends inside the K iterations joins when another needs all K, and its surplus tokens
are dropped).
The host's per-step work (scheduling, packing, launches) is then paid once per K tokens.
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque

from jaxengine.config import SchedulerConfig
from jaxengine.engine.kv_cache_manager import KVCacheManager
from jaxengine.engine.request import Request, RequestStatus
from jaxengine.sampling_params import SamplingParams

PENDING_TOKEN = -1  # an input token sampled by the step in flight, not yet known on the host


@dataclasses.dataclass
class ScheduledSeq:
    """What the runner needs of one request in one step."""

    request_id: str
    token_ids: list[int]  # the tokens to compute this step
    start_pos: int  # position of token_ids[0] (= tokens already computed)
    page_table: list[int]
    sample: bool  # the chunk ends at the last known token: sample the next one
    params: SamplingParams
    seed: int
    # full token history, sent when a request that uses penalties (re)starts
    penalty_history: tuple[list[int], int] | None = None
    serial: int = -1  # Request.serial of the request this was scheduled for


@dataclasses.dataclass
class SchedulerOutput:
    seqs: list[ScheduledSeq]
    num_batched_tokens: int
    freed_request_ids: list[str]  # finished or preempted since the last step
    num_preempted: int = 0
    num_steps: int = 1  # > 1: decode-only, that many decode iterations in one program

    @property
    def empty(self) -> bool:
        return not self.seqs


def uses_penalties(params: SamplingParams) -> bool:
    return (params.presence_penalty != 0.0 or params.frequency_penalty != 0.0
            or params.repetition_penalty != 1.0)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager):
        self.config = config
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self._freed: list[str] = []
        self.num_preemptions = 0
        # The token budget of the next step, at most max_num_batched_tokens: the engine lowers it
        # while the runner's bigger buckets are still compiling (ModelRunner.token_budget).
        self.token_budget = config.max_num_batched_tokens

    # ------------------------------------------------------------------------------ requests
    def add_request(self, req: Request) -> None:
        n = req.num_prompt_tokens
        if n == 0:
            raise ValueError("prompt must not be empty")
        if n >= self.config.max_model_len:
            raise ValueError(f"prompt is {n} tokens; it must be shorter than max_model_len "
                             f"({self.config.max_model_len}) to leave room for output")
        if self.kv.pages_needed(n + 1) > self.kv.num_pages:
            raise ValueError(f"prompt of {n} tokens can never fit in the KV cache "
                             f"({self.kv.num_pages} pages of {self.kv.page_size} tokens)")
        if req.request_id in self.requests:
            raise ValueError(f"request_id {req.request_id!r} is already in use")
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def abort(self, request_id: str) -> None:
        req = self.requests.get(request_id)
        if req is not None:
            self.finish(req, RequestStatus.FINISHED_ABORTED)

    def finish(self, req: Request, status: RequestStatus) -> None:
        if req.status.finished:
            return
        if req.status == RequestStatus.RUNNING:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        req.status = status
        req.finished_time = time.monotonic()
        self.kv.free(req.request_id)
        self._freed.append(req.request_id)
        self.requests.pop(req.request_id, None)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    # ------------------------------------------------------------------------------ schedule
    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.kv.free(req.request_id)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0  # a pending token still arrives through update()
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)
        self._freed.append(req.request_id)

    def _seq(self, req: Request, num_new: int, restarted: bool) -> ScheduledSeq:
        start = req.num_computed_tokens
        history = None
        if restarted and uses_penalties(req.params):
            history = (list(req.token_ids), req.num_prompt_tokens)
        token_ids = req.token_ids[start:start + num_new]
        token_ids += [PENDING_TOKEN] * (num_new - len(token_ids))
        sample = start + num_new == req.num_tokens + req.num_pending
        req.num_computed_tokens += num_new  # eagerly: the step is as good as done
        if sample:
            req.num_pending += 1
        return ScheduledSeq(
            request_id=req.request_id,
            token_ids=token_ids,
            start_pos=start,
            # the live table, not a copy: the runner reads it when the step is dispatched (right
            # after this schedule) and copies only pages it has not seen (tables only grow)
            page_table=self.kv.tables[req.request_id],
            sample=sample,
            params=req.params,
            seed=req.seed,
            penalty_history=history,
            serial=req.serial,
        )

    def _finishing(self, req: Request) -> bool:
        """Its pending tokens already reach a length limit: nothing more to compute."""
        n = req.num_tokens + req.num_pending
        max_tokens = req.params.max_tokens
        return ((max_tokens is not None and n - req.num_prompt_tokens >= max_tokens)
                or (req.max_total_tokens is not None and n >= req.max_total_tokens))

    def schedule(self) -> SchedulerOutput:
        cfg = self.config
        budget = step_budget = min(self.token_budget, cfg.max_num_batched_tokens)
        seqs: list[ScheduledSeq] = []
        preempted = 0

        # 1. running requests: decodes and unfinished prefill chunks, oldest first
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            num_new = min(req.num_tokens + req.num_pending - req.num_computed_tokens, budget)
            if num_new <= 0 or self._finishing(req):
                i += 1
                continue
            while not self.kv.allocate(req.request_id, req.num_computed_tokens + num_new):
                victim = self.running[-1]
                self._preempt(victim)
                preempted += 1
                if victim is req:
                    break
            else:
                seqs.append(self._seq(req, num_new, restarted=False))
                budget -= num_new
                i += 1
                continue
            break  # req itself was preempted: it was the last running request

        # 2. waiting requests, first come first served (no admission in a step that preempted)
        if preempted == 0:
            skipped: list[Request] = []
            while self.waiting and budget > 0 and len(self.running) < cfg.max_num_seqs:
                req = self.waiting[0]
                leader = req.leader
                if (leader is not None and not leader.status.finished
                        and leader.num_computed_tokens < leader.num_prompt_tokens):
                    skipped.append(self.waiting.popleft())  # wait to share the leader's prompt
                    continue
                shared = self.kv.get_cached_prefix(req.token_ids)
                if leader is not None and leader.request_id in self.kv.tables:
                    lead_pages = self.kv.tables[leader.request_id][:(req.num_prompt_tokens - 1)
                                                                   // self.kv.page_size]
                    if len(lead_pages) > len(shared):
                        shared = lead_pages
                num_computed = len(shared) * self.kv.page_size
                remaining = req.num_tokens - num_computed
                num_new = min(remaining, budget)
                if not cfg.enable_chunked_prefill and num_new < remaining:
                    break
                if not self.kv.allocate(req.request_id, num_computed + num_new, shared):
                    break
                self.waiting.popleft()
                if req.status == RequestStatus.WAITING:
                    req.num_cached_tokens = num_computed
                req.num_computed_tokens = num_computed
                req.status = RequestStatus.RUNNING
                if req.first_scheduled_time is None:
                    req.first_scheduled_time = time.monotonic()
                self.running.append(req)
                seqs.append(self._seq(req, num_new, restarted=True))
                budget -= num_new
            self.waiting.extendleft(reversed(skipped))

        num_steps = self._multi_step(seqs) if cfg.num_scheduler_steps > 1 and preempted == 0 else 1
        freed, self._freed = self._freed, []
        return SchedulerOutput(seqs=seqs, num_batched_tokens=step_budget - budget,
                               freed_request_ids=freed, num_preempted=preempted, num_steps=num_steps)

    def _room(self, req: Request) -> int:
        """How many more tokens req may still get beyond its known and pending ones."""
        n = req.num_tokens + req.num_pending
        room = self.config.max_model_len - n
        if req.params.max_tokens is not None:
            room = min(room, req.params.max_tokens - (n - req.num_prompt_tokens))
        return room

    def _multi_step(self, seqs: list[ScheduledSeq]) -> int:
        """Make this step K decode iterations if every request qualifies (see the module doc);
        returns the number of iterations (1: unchanged)."""
        k = self.config.num_scheduler_steps
        reqs = [self.requests[s.request_id] for s in seqs]
        # A request within K - 1 tokens of its max_tokens still joins when another request needs
        # all K: `update` stops it at its last token and drops the surplus (as a stop string
        # would), so one finishing request does not turn the whole batch back to single steps
        # (with mixed output lengths some request nearly always is), and no iteration runs that
        # no request needs.  The model's length bounds every request's K positions.
        if not seqs or not all(len(s.token_ids) == 1 and s.sample
                               and self.config.max_model_len - (r.num_tokens + r.num_pending) >= k - 1
                               for s, r in zip(seqs, reqs)):
            return 1
        if max(self._room(r) for r in reqs) < k - 1:
            return 1  # the whole batch ends inside K iterations: single steps waste nothing
        # pages for the K positions of every request, all or none (a partial allocation would
        # hold pages that this single step does not use)
        need = sum(max(0, self.kv.pages_needed(r.num_computed_tokens + k - 1) - len(self.kv.tables[r.request_id]))
                   for r in reqs)
        if need > self.kv.num_free_pages:
            return 1
        for req in reqs:
            if not self.kv.allocate(req.request_id, req.num_computed_tokens + k - 1):
                raise RuntimeError("KV pages counted free could not be allocated")  # a bug, not a state
        for seq, req in zip(seqs, reqs):
            req.num_computed_tokens += k - 1
            req.num_pending += k - 1
            seq.page_table = self.kv.tables[req.request_id]
        return k

    # -------------------------------------------------------------------------------- update
    def update(self, out: SchedulerOutput, sampled: dict[str, int]) -> list[Request]:
        """Advance computed counts, append sampled tokens, apply token-level stop checks.

        sampled: one token id per sampling request, or (multi-step) a list of out.num_steps ids.
        Returns the requests that received tokens this step (finished ones included); each one's
        `num_new_tokens` says how many (fewer than num_steps when a stop came first).
        """
        updated = []
        k = out.num_steps
        for seq in out.seqs:
            req = self.requests.get(seq.request_id)
            if req is None or req.serial != seq.serial:
                continue  # finished or aborted while the step ran: its result is dropped
            computed = seq.start_pos + len(seq.token_ids) + k - 1
            if req.status == RequestStatus.RUNNING and k == 1:
                self.kv.cache_pages(req.request_id, req.token_ids, computed)
            if not seq.sample:
                continue
            # a request preempted after this step was scheduled still keeps the tokens it sampled
            tokens = sampled[seq.request_id]
            tokens = tokens if isinstance(tokens, list) else [tokens]
            req.num_pending -= len(tokens)
            status = None
            req.num_new_tokens = 0
            for token in tokens:
                req.append_token(token)
                req.num_new_tokens += 1
                status = req.check_stop()
                if status is not None:
                    break
            now = time.monotonic()
            if req.first_token_time is None:
                req.first_token_time = now
            req.last_token_time = now
            if req.status == RequestStatus.RUNNING and k > 1:  # the K tokens' KV: known only now
                self.kv.cache_pages(req.request_id, req.token_ids, min(computed, req.num_tokens))
            updated.append(req)
            if status is not None:
                self.finish(req, status)
        return updated
