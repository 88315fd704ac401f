"""EngineCore: the step loop.  schedule -> runner.execute -> update -> detokenize -> outputs.

Plain Python: the runner is handed in (anything with `execute(SchedulerOutput)` and
`release(request_ids)`), so this module never imports jax.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from typing import Any, Protocol

from jaxengine.engine.detokenizer import IncrementalDetokenizer
from jaxengine.engine.kv_cache_manager import KVCacheManager
from jaxengine.engine.request import Request, RequestStatus
from jaxengine.engine.scheduler import Scheduler, SchedulerOutput
from jaxengine.config import SchedulerConfig
from jaxengine.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from jaxengine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class Runner(Protocol):
    def dispatch(self, out: SchedulerOutput) -> Any: ...

    def collect(self, handle: Any) -> dict[str, Any]: ...

    def release(self, request_ids: list[str]) -> None: ...


@dataclasses.dataclass
class _Group:
    """A user request: n sibling sequences sharing one prompt."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    children: list[Request]
    detoks: list[IncrementalDetokenizer | None]

    @property
    def finished(self) -> bool:
        return all(c.status.finished for c in self.children)


class EngineCore:
    def __init__(self, scheduler_config: SchedulerConfig, kv: KVCacheManager, runner: Runner,
                 tokenizer: Any = None, eos_token_ids: tuple[int, ...] = (), seed: int = 0,
                 async_scheduling: bool = True):
        self.config = scheduler_config
        self.kv = kv
        self.scheduler = Scheduler(scheduler_config, kv)
        self.runner = runner
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self._rng = random.Random(seed)  # seeds of requests that bring none
        self._groups: dict[str, _Group] = {}
        self._child_group: dict[str, _Group] = {}
        self.num_steps = 0
        # Asynchronous scheduling: step N+1 is scheduled and dispatched before the tokens of step N
        # are read back, so host work (scheduling, detokenizing, building arrays) overlaps the device.
        self.async_scheduling = async_scheduling
        self._inflight: tuple[SchedulerOutput, Any] | None = None

    # ---------------------------------------------------------------------------- requests
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    prompt: str | None = None) -> None:
        if request_id in self._groups:
            raise ValueError(f"request_id {request_id!r} is already in use")
        if not prompt_token_ids:
            raise ValueError("prompt must not be empty")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer (skip_tokenizer_init=True was given)")
        vocab = getattr(self.runner, "vocab_size", None)
        if vocab is not None and any(not 0 <= t < vocab for t in prompt_token_ids):
            raise ValueError(f"prompt_token_ids must be in [0, {vocab})")
        max_logprobs = getattr(self.runner, "num_logprobs", None)
        if params.logprobs is not None and max_logprobs is not None and params.logprobs > max_logprobs:
            raise ValueError(f"logprobs: {params.logprobs} requested, more than this engine's max_logprobs "
                             f"{max_logprobs} (LLM(max_logprobs=...), --max-logprobs)")
        base_seed = params.seed if params.seed is not None else self._rng.getrandbits(31)
        children: list[Request] = []
        for i in range(params.n):
            child_id = request_id if params.n == 1 else f"{request_id}#{i}"
            # siblings get distinct, reproducible seeds derived from the request's seed
            seed = base_seed if i == 0 else hash((base_seed, i)) & 0x7FFFFFFF
            children.append(Request(child_id, prompt_token_ids, params, seed=seed,
                                    eos_token_ids=self.eos_token_ids,
                                    max_total_tokens=self.config.max_model_len, group_id=request_id,
                                    index=i, leader=children[0] if i else None))
        added = []
        try:
            for child in children:
                self.scheduler.add_request(child)
                added.append(child)
        except ValueError:
            for child in added:
                self.scheduler.abort(child.request_id)
            raise
        detoks = [IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params.skip_special_tokens,
                                         params.stop, params.include_stop_str_in_output)
                  if self.tokenizer is not None else None for _ in children]
        group = _Group(request_id, prompt, list(prompt_token_ids), params, children, detoks)
        self._groups[request_id] = group
        for child in children:
            self._child_group[child.request_id] = group

    def abort_request(self, request_id: str) -> None:
        group = self._groups.pop(request_id, None)
        if group is None:
            return
        for child in group.children:
            self.scheduler.abort(child.request_id)
            self._child_group.pop(child.request_id, None)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or self._inflight is not None

    @property
    def num_unfinished_requests(self) -> int:
        return len(self._groups)

    # -------------------------------------------------------------------------------- step
    def step(self, stream: bool = True) -> list[RequestOutput]:
        """One engine step.  Returns the outputs of requests that changed (stream=False: only of
        requests that finished, which saves building outputs nobody reads)."""
        budget = getattr(self.runner, "token_budget", None)  # lower while buckets still compile
        if budget is not None:
            self.scheduler.token_budget = budget
        out = self.scheduler.schedule()
        if (out.empty and self._inflight is None and self.scheduler.waiting
                and budget is not None and budget < self.config.max_num_batched_tokens):
            # nothing fits the buckets ready (a prompt longer than them with chunked prefill off):
            # wait for the next one instead of spinning
            self.runner.wait_for_budget(budget, timeout=1.0)
        handle = None
        if not out.empty:
            handle = self.runner.dispatch(out)
            self.num_steps += 1
        elif out.freed_request_ids:
            self.runner.release(out.freed_request_ids)
        if not self.async_scheduling:
            return self._process(out, self.runner.collect(handle), stream) if handle is not None else []
        prev, self._inflight = self._inflight, (out, handle) if handle is not None else None
        return self._process(prev[0], self.runner.collect(prev[1]), stream) if prev is not None else []

    def _process(self, out: SchedulerOutput, results: dict[str, Any], stream: bool) -> list[RequestOutput]:
        # one SampleResult per request, or (multi-step) a list of them
        tokens = {rid: ([x.token for x in r] if isinstance(r, list) else r.token) for rid, r in results.items()}
        updated = self.scheduler.update(out, tokens)
        changed: dict[str, _Group] = {}
        for req in updated:
            group = self._child_group.get(req.request_id)
            if group is None:
                continue
            res = results[req.request_id]
            res = res if isinstance(res, list) else [res]
            n_new = req.num_new_tokens
            first = req.num_tokens - n_new
            detok = group.detoks[req.index]
            for j in range(n_new):
                self._record_logprobs(req, res[j], req.token_ids[first + j])
                if detok is None:
                    continue
                stop = detok.add_token(req.token_ids[first + j])
                if stop is not None and req.num_output_tokens - (n_new - 1 - j) >= req.params.min_tokens:
                    req.drop_last_tokens(n_new - 1 - j)  # multi-step: sampled past the stop
                    req.stop_reason = stop
                    if req.status.finished:
                        req.status = RequestStatus.FINISHED_STOPPED
                    else:
                        self.scheduler.finish(req, RequestStatus.FINISHED_STOPPED)
                    break
            changed[group.request_id] = group
        outputs = []
        for group in changed.values():
            finished = group.finished
            if stream or finished:
                outputs.append(self._make_output(group))
            if finished:
                self._groups.pop(group.request_id, None)
                for child in group.children:
                    self._child_group.pop(child.request_id, None)
        return outputs

    def _record_logprobs(self, req: Request, res: Any, token: int) -> None:
        req.cumulative_logprob += res.logprob
        k = req.params.logprobs
        if k is None:
            return
        entry = {token: Logprob(res.logprob, res.rank, self._decode_one(token))}
        for rank, (tok, lp) in enumerate(res.top[:k], start=1):
            if tok not in entry:
                entry[tok] = Logprob(lp, rank, self._decode_one(tok))
        req.logprobs.append(entry)

    def _decode_one(self, token_id: int) -> str | None:
        if self.tokenizer is None:
            return None
        return self.tokenizer.decode([token_id])

    def _make_output(self, group: _Group) -> RequestOutput:
        outs = []
        for child, detok in zip(group.children, group.detoks):
            finished = child.status.finished
            logprobs = list(child.logprobs) if child.params.logprobs is not None else None
            outs.append(CompletionOutput(
                index=child.index,
                text=detok.visible_text(finished) if detok is not None else "",
                token_ids=list(child.output_token_ids),
                cumulative_logprob=child.cumulative_logprob,
                logprobs=logprobs,
                finish_reason=child.finish_reason,
                stop_reason=child.stop_reason,
            ))
        return RequestOutput(request_id=group.request_id, prompt=group.prompt,
                             prompt_token_ids=group.prompt_token_ids, outputs=outs,
                             finished=group.finished,
                             num_cached_tokens=group.children[0].num_cached_tokens,
                             metrics=_metrics(group.children))


def _metrics(children: list[Request]) -> RequestMetrics:
    """A group's timings: first admission / first token of any child, last token of any child,
    finish of the last child (None until all have finished)."""
    def agg(name: str, fn: Any, require_all: bool = False) -> float | None:
        values = [getattr(c, name) for c in children]
        present = [v for v in values if v is not None]
        if not present or (require_all and len(present) < len(values)):
            return None
        return fn(present)

    return RequestMetrics(arrival_time=children[0].arrival_time,
                          first_scheduled_time=agg("first_scheduled_time", min),
                          first_token_time=agg("first_token_time", min),
                          last_token_time=agg("last_token_time", max),
                          finished_time=agg("finished_time", max, require_all=True))


class _SummedView:
    """Read-only numeric attributes summed over replicas (scheduler.num_waiting etc.)."""

    def __init__(self, parts: list[Any]):
        self._parts = parts

    def __getattr__(self, name: str) -> Any:
        return sum(getattr(p, name) for p in self._parts)


class DataParallelEngineCore:
    """dp independent EngineCores (one per model replica, each with its own KV pool and scheduler)
    behind one front with EngineCore's interface.  A new request goes to the replica with the fewest
    unfinished requests and stays there; step() steps every replica, in threads so the replicas'
    device work overlaps (JAX releases the GIL while a step runs)."""

    def __init__(self, cores: list[EngineCore]):
        from concurrent.futures import ThreadPoolExecutor

        self.cores = cores
        self.config = cores[0].config
        self.scheduler = _SummedView([c.scheduler for c in cores])
        self._owner: dict[str, EngineCore] = {}
        self._pool = ThreadPoolExecutor(len(cores), thread_name_prefix="dp-replica")

    @property
    def num_steps(self) -> int:
        return max(c.num_steps for c in self.cores)

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    prompt: str | None = None) -> None:
        if request_id in self._owner:
            raise ValueError(f"request_id {request_id!r} is already in use")
        core = min(self.cores, key=lambda c: c.num_unfinished_requests)
        core.add_request(request_id, prompt_token_ids, params, prompt=prompt)
        self._owner[request_id] = core

    def abort_request(self, request_id: str) -> None:
        core = self._owner.pop(request_id, None)
        if core is not None:
            core.abort_request(request_id)

    def has_unfinished_requests(self) -> bool:
        return any(c.has_unfinished_requests() for c in self.cores)

    @property
    def num_unfinished_requests(self) -> int:
        return sum(c.num_unfinished_requests for c in self.cores)

    def step(self, stream: bool = True) -> list[RequestOutput]:
        busy = [c for c in self.cores if c.has_unfinished_requests()]
        if len(busy) <= 1:
            results = [c.step(stream) for c in self.cores]  # idle ones only release freed pages
        else:
            results = list(self._pool.map(lambda c: c.step(stream), busy))
        outputs = [o for r in results for o in r]
        for o in outputs:
            if o.finished:
                self._owner.pop(o.request_id, None)
        return outputs
