"""Request: one sequence being generated (a parallel-sampling group of n is n Requests)."""

from __future__ import annotations

import enum
import itertools
import time

from jaxengine.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH,
                        RequestStatus.FINISHED_ABORTED)


_serials = itertools.count()


class Request:
    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 seed: int, eos_token_ids: tuple[int, ...] = (), max_total_tokens: int | None = None,
                 group_id: str | None = None, index: int = 0, leader: "Request | None" = None):
        self.request_id = request_id
        # unique per Request object: a step's late result never lands on a new request that
        # reuses the id of an aborted one
        self.serial = next(_serials)
        self.prompt_token_ids = list(prompt_token_ids)
        self.token_ids = list(prompt_token_ids)  # prompt + output, grows as tokens are sampled
        self.params = params
        self.seed = seed
        self.eos_token_ids = eos_token_ids
        self.max_total_tokens = max_total_tokens  # max_model_len
        self.group_id = group_id or request_id
        self.index = index  # position in the parallel-sampling group
        # n > 1: siblings wait for the leader's prompt pages and share them instead of recomputing
        self.leader = leader
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0  # advanced when a step is scheduled
        self.num_pending = 0  # tokens sampled by steps in flight, not yet appended
        self.num_new_tokens = 0  # tokens the last update appended (multi-step: up to K)
        self.num_cached_tokens = 0  # prompt tokens served from the prefix cache at first schedule
        self.num_preemptions = 0
        self.stop_reason: int | str | None = None
        # time.monotonic() seconds: arrival, first admission, first and last output token, finish
        self.arrival_time = time.monotonic()
        self.first_scheduled_time: float | None = None
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None
        self.finished_time: float | None = None
        self.cumulative_logprob = 0.0
        self.logprobs: list[dict] = []  # per output token: {token_id: outputs.Logprob}

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids):]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def finish_reason(self) -> str | None:
        return self.status.value if self.status.finished else None

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def drop_last_tokens(self, n: int) -> None:
        """Multi-step: forget the last n output tokens (sampled past a stop string)."""
        if n > 0:
            del self.token_ids[-n:]
            self.num_new_tokens -= n

    def check_stop(self) -> RequestStatus | None:
        """Stop conditions that depend on token ids only (stop strings live in the detokenizer)."""
        params = self.params
        last = self.token_ids[-1]
        n_out = self.num_output_tokens
        if n_out >= params.min_tokens:
            if not params.ignore_eos and last in self.eos_token_ids:
                self.stop_reason = None
                return RequestStatus.FINISHED_STOPPED
            if last in params.stop_token_ids:
                self.stop_reason = last
                return RequestStatus.FINISHED_STOPPED
        if params.max_tokens is not None and n_out >= params.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        if self.max_total_tokens is not None and self.num_tokens >= self.max_total_tokens:
            return RequestStatus.FINISHED_LENGTH
        return None

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, status={self.status.name}, "
                f"tokens={self.num_tokens}, computed={self.num_computed_tokens})")
