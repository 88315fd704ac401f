"""Runner pieces that need no engine: KV budget from device memory, token buckets."""

from __future__ import annotations

import dataclasses

import pytest

from jaxengine.config import (CacheConfig, EngineConfig, ModelConfig, ParallelConfig, RunnerConfig,
                              SchedulerConfig)
from jaxengine.runner.model_runner import kv_bytes_per_page, kv_cache_budget_bytes, token_buckets

MODEL = ModelConfig.from_hf_config(dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=256,
                                        hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2), "bfloat16")


def config(**cache) -> EngineConfig:
    return EngineConfig("m", MODEL, CacheConfig(**cache), SchedulerConfig(max_num_batched_tokens=1000),
                        ParallelConfig(), RunnerConfig(compilation_cache_dir=""))


class FakeGpu:
    platform = "gpu"

    def memory_stats(self):
        return {"bytes_limit": 10_000_000, "bytes_in_use": 2_000_000}  # 2 MB of weights loaded


def test_gpu_memory_utilization_takes_that_fraction_of_device_memory_minus_what_is_in_use():
    assert kv_cache_budget_bytes(config(gpu_memory_utilization=0.5), FakeGpu()) == 3_000_000
    assert kv_cache_budget_bytes(config(gpu_memory_utilization=0.9), FakeGpu()) == 7_000_000


def test_an_explicit_kv_cache_memory_bytes_wins():
    assert kv_cache_budget_bytes(config(kv_cache_memory_bytes=12345), FakeGpu()) == 12345


def test_a_page_holds_k_and_v_of_every_layer():
    # 2 layers x 16 tokens x (2 x 2 kv heads) x head_dim 16 x 2 bytes
    assert kv_bytes_per_page(config()) == 2 * 16 * 4 * 16 * 2


def test_token_buckets_are_powers_of_two_up_to_the_budget(monkeypatch):
    assert token_buckets(config()) == (8, 16, 32, 64, 128, 256, 512, 1000)
    custom = dataclasses.replace(config(), runner=RunnerConfig(token_buckets=(24, 96), compilation_cache_dir=""))
    assert token_buckets(custom) == (24, 96, 1000)
    # $JAXENGINE_MIN_TOKEN_BUCKET (an experiment switch): the smallest power-of-two bucket
    monkeypatch.setenv("JAXENGINE_MIN_TOKEN_BUCKET", "1")
    small = dataclasses.replace(config(), runner=RunnerConfig(compilation_cache_dir=""))
    assert token_buckets(small) == (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000)
    monkeypatch.setenv("JAXENGINE_MIN_TOKEN_BUCKET", "0")
    with pytest.raises(ValueError, match="min_token_bucket"):
        RunnerConfig(compilation_cache_dir="")
