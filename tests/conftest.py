"""Shared fixtures: tiny checkpoints built in tmp dirs, one compilation cache per test session."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import tiny_checkpoints  # noqa: E402


# The slowest files first (their seconds in a serial run on a 2-core CPU, twenty-second session:
# 166, 140, 123, 120, 116, 114, 103, 94, 77, 49, 36, 35, 35).  The README's command runs the suite
# on two workers with `--dist loadfile`, which hands out whole files in collection order: big files
# last would leave one worker running them alone at the end.
SLOW_FILES_FIRST = ("test_bench_scripts.py", "test_ragged_paged_attention.py", "test_prefill_attention_mgpu.py",
                    "test_decode_matmul.py", "test_parity.py", "test_decode_attention_mgpu.py",
                    "test_multi_step.py", "test_decode_attention.py", "test_sharding.py", "test_sampler.py",
                    "test_multihost.py", "test_background_compile.py", "test_engine.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOW_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's order is kept


@pytest.fixture(scope="session", autouse=True)
def _compilation_cache(tmp_path_factory):
    # One persistent XLA cache for the whole session: engines of the same shape compile once.
    os.environ["JAXENGINE_COMPILATION_CACHE_DIR"] = str(tmp_path_factory.mktemp("xla_cache"))
    yield


@pytest.fixture(scope="session")
def llama_ckpt(tmp_path_factory) -> str:
    return tiny_checkpoints.make_checkpoint(str(tmp_path_factory.mktemp("llama")), "llama",
                                            with_tokenizer=True)


# Small engine settings that keep CPU compile time to a few seconds.
SMALL_ENGINE = dict(dtype="float32", max_model_len=256, max_num_seqs=8, max_num_batched_tokens=64,
                    kv_cache_memory_bytes=1 << 20, use_tqdm_on_load=False)


@pytest.fixture
def check_env_switch(monkeypatch):
    """check(name, read, default, value, expected): read() gives `default` with $name unset,
    `expected` with $name = value (as a user may type it), and a ValueError naming $name for a
    value outside its choices."""
    def check(name, read, default, value, expected):
        monkeypatch.delenv(name, raising=False)
        assert read() == default
        monkeypatch.setenv(name, value)
        assert read() == expected
        monkeypatch.setenv(name, "no-such-choice")
        with pytest.raises(ValueError, match=name):
            read()
        monkeypatch.delenv(name)
    return check
