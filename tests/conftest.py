"""Shared fixtures: tiny checkpoints built in tmp dirs, one compilation cache per test session."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import tiny_checkpoints  # noqa: E402


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
