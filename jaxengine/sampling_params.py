"""SamplingParams: vLLM's names and meanings, validated at construction (no jax here)."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

_EPS = 1e-5


@dataclasses.dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self._validate()

    def _validate(self) -> None:
        def bad(field: str, cond: str, value: Any) -> ValueError:
            return ValueError(f"{field} must be {cond}, got {value!r}")

        if not isinstance(self.n, int) or self.n < 1:
            raise bad("n", "an int >= 1", self.n)
        if self.temperature < 0.0:
            raise bad("temperature", ">= 0", self.temperature)
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", "in (0, 1]", self.top_p)
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise bad("top_k", "-1, 0 (disabled) or a positive int", self.top_k)
        if not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", "in [0, 1]", self.min_p)
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise bad("max_tokens", "an int >= 1", self.max_tokens)
        if self.min_tokens < 0 or (self.max_tokens is not None and self.min_tokens > self.max_tokens):
            raise bad("min_tokens", ">= 0 and <= max_tokens", self.min_tokens)
        # the upper bound is the engine's max_logprobs (LLM(max_logprobs=...), 20 by default),
        # checked when the request is added
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or isinstance(self.logprobs, bool)
                                          or self.logprobs < 0):
            raise bad("logprobs", "an int >= 0", self.logprobs)
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise bad("presence_penalty", "in [-2, 2]", self.presence_penalty)
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise bad("frequency_penalty", "in [-2, 2]", self.frequency_penalty)
        if not 0.0 < self.repetition_penalty <= 2.0:
            raise bad("repetition_penalty", "in (0, 2]", self.repetition_penalty)
        if self.seed is not None and not isinstance(self.seed, int):
            raise bad("seed", "an int or None", self.seed)
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise bad("stop", "a non-empty string or a list of them", self.stop)
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "a list of non-negative ints", self.stop_token_ids)

    @property
    def greedy(self) -> bool:
        return self.temperature < _EPS

    def clone(self) -> "SamplingParams":
        return copy.deepcopy(self)

    @classmethod
    def from_generation_config(cls, gen: dict[str, Any], **overrides: Any) -> "SamplingParams":
        """Defaults from a checkpoint's generation_config.json, as vLLM does."""
        fields = {}
        if gen.get("do_sample") is False:
            fields["temperature"] = 0.0
        else:
            for key in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty"):
                if key in gen and gen[key] is not None:
                    fields[key] = gen[key]
        if "repetition_penalty" in gen and gen["repetition_penalty"] is not None:
            fields["repetition_penalty"] = gen["repetition_penalty"]
        if gen.get("max_new_tokens"):
            fields["max_tokens"] = int(gen["max_new_tokens"])
        fields.update(overrides)
        return cls(**fields)
