"""Prometheus metrics of one server, with vLLM's names under a `jaxengine:` prefix.

Each server owns its CollectorRegistry (two servers in one process, as in tests, never collide).
Gauges read the engine when scraped; latencies and token counts are recorded on the engine
thread by the StepObserver hooks of AsyncLLM.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from jaxengine.outputs import RequestOutput

_TTFT_BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                   7.5, 10.0, 20.0, 40.0, 80.0)
_TPOT_BUCKETS_S = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
                   2.5, 5.0, 7.5, 10.0)
_E2E_BUCKETS_S = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                  120.0, 240.0, 480.0)


@dataclasses.dataclass
class _Timing:
    arrival_s: float
    num_prompt_tokens: int
    first_token_s: float | None = None
    num_output_tokens: int = 0


class ServerMetrics:
    """The server's registry, and the AsyncLLM observer that fills it."""

    def __init__(self, llm: Any, async_llm_ref: Any, model_name: str):
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        # one KV pool per data-parallel replica (LLM.kv_caches); a single pool otherwise
        kvs = list(getattr(llm, "kv_caches", None) or [llm.kv_cache])

        def total(attr: str) -> Any:
            return sum(getattr(kv, attr) for kv in kvs)

        def usage() -> float:
            return 1.0 - total("num_free_pages") / total("num_pages")

        def hit_rate() -> float:
            queried = total("num_queried_tokens")
            return total("num_hit_tokens") / queried if queried else 0.0

        def gauge(name: str, doc: str, fn: Any) -> None:
            Gauge(name, doc, labels, registry=self.registry).labels(model_name).set_function(fn)

        gauge("jaxengine:num_requests_running", "Requests in the running batch.",
              lambda: async_llm_ref().num_running)
        gauge("jaxengine:num_requests_waiting", "Requests waiting to be scheduled.",
              lambda: async_llm_ref().num_waiting)
        gauge("jaxengine:kv_cache_usage_perc", "Fraction of KV-cache pages in use (1 = full); "
              "pages that only hold prefix-cache entries count as free.", usage)
        gauge("jaxengine:num_kv_cache_pages", "KV-cache pages in the pool.", lambda: total("num_pages"))
        gauge("jaxengine:num_free_kv_cache_pages", "KV-cache pages in the free queue.",
              lambda: total("num_free_pages"))
        gauge("jaxengine:prefix_cache_hit_rate", "Prefix-cache hits / queries, in tokens, since start.", hit_rate)
        gauge("jaxengine:prefix_cache_queries_tokens", "Prompt tokens looked up in the prefix cache.",
              lambda: total("num_queried_tokens"))
        gauge("jaxengine:prefix_cache_hits_tokens", "Prompt tokens found in the prefix cache.",
              lambda: total("num_hit_tokens"))
        gauge("jaxengine:num_preemptions", "Requests preempted since start.",
              lambda: llm.engine.scheduler.num_preemptions)
        runners = list(getattr(llm, "runners", None) or [llm.runner])
        gauge("jaxengine:step_token_budget", "Most tokens one step takes now: max_num_batched_tokens, or "
              "less while bigger buckets still compile in the background.",
              lambda: min(r.token_budget for r in runners))

        self.prompt_tokens = Counter("jaxengine:prompt_tokens", "Prompt tokens of admitted requests.",
                                     labels, registry=self.registry).labels(model_name)
        self.generation_tokens = Counter("jaxengine:generation_tokens", "Generated tokens.",
                                         labels, registry=self.registry).labels(model_name)
        self._success = Counter("jaxengine:request_success", "Finished requests by finish reason.",
                                labels + ["finished_reason"], registry=self.registry)
        self._model_name = model_name
        self.ttft = Histogram("jaxengine:time_to_first_token_seconds", "Time to first token.",
                              labels, buckets=_TTFT_BUCKETS_S, registry=self.registry).labels(model_name)
        self.tpot = Histogram("jaxengine:time_per_output_token_seconds",
                              "Mean time per output token after the first, per request.",
                              labels, buckets=_TPOT_BUCKETS_S, registry=self.registry).labels(model_name)
        self.e2e = Histogram("jaxengine:e2e_request_latency_seconds", "Arrival to finish.",
                             labels, buckets=_E2E_BUCKETS_S, registry=self.registry).labels(model_name)
        self._timings: dict[str, _Timing] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ StepObserver (engine thread)
    def on_request_added(self, request_id: str, num_prompt_tokens: int, arrival_s: float) -> None:
        with self._lock:
            self._timings[request_id] = _Timing(arrival_s, num_prompt_tokens)
        self.prompt_tokens.inc(num_prompt_tokens)

    def on_request_gone(self, request_id: str) -> None:
        with self._lock:
            self._timings.pop(request_id, None)
        self._success.labels(self._model_name, "abort").inc()

    def on_outputs(self, outputs: list[RequestOutput], now_s: float) -> None:
        for out in outputs:
            with self._lock:
                t = self._timings.get(out.request_id)
            if t is None:
                continue
            num_out = sum(len(c.token_ids) for c in out.outputs)
            new = num_out - t.num_output_tokens
            if new > 0:
                self.generation_tokens.inc(new)
                t.num_output_tokens = num_out
                if t.first_token_s is None:
                    t.first_token_s = now_s
                    self.ttft.observe(now_s - t.arrival_s)
            if out.finished:
                with self._lock:
                    self._timings.pop(out.request_id, None)
                self.e2e.observe(now_s - t.arrival_s)
                per_seq = max(len(c.token_ids) for c in out.outputs) if out.outputs else 0
                if t.first_token_s is not None and per_seq > 1:
                    self.tpot.observe((now_s - t.first_token_s) / (per_seq - 1))
                for c in out.outputs:
                    self._success.labels(self._model_name, c.finish_reason or "abort").inc()
