"""The `jaxengine` command line: flags derived from LLM(...), `generate` and `serve`."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys

import pytest

from conftest import SMALL_ENGINE
from jaxengine import LLM, SamplingParams
from jaxengine.entrypoints import cli

ENGINE_ARGS = [p for p in inspect.signature(LLM.__init__).parameters if p not in ("self", "model")]
SMALL_FLAGS = ["--dtype", "float32", "--max-model-len", "256", "--max-num-seqs", "8",
               "--max-num-batched-tokens", "64", "--kv-cache-memory-bytes", "1MiB", "--no-use-tqdm-on-load"]


def test_console_script_help_lists_the_commands():
    script = os.path.join(os.path.dirname(sys.executable), "jaxengine")
    out = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "serve" in out.stdout and "generate" in out.stdout


@pytest.mark.parametrize("command", ["serve", "generate"])
def test_help_documents_a_flag_for_every_llm_argument(command, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for name in ENGINE_ARGS:
        if command == "generate" and name == "seed":
            continue  # generate's --seed seeds the request (and the engine)
        assert "--" + name.replace("_", "-") in text, name
    if command == "serve":
        for flag in ("--host", "--port", "--served-model-name", "--api-key", "--max-waiting-requests"):
            assert flag in text


def test_every_llm_argument_has_help_text():
    assert set(ENGINE_ARGS) <= set(cli.ENGINE_ARG_HELP)


def test_engine_flags_parse_to_llm_keyword_arguments():
    args = cli.make_parser().parse_args([
        "serve", "/ckpt", "--max-model-len", "4096", "--max-num-seqs", "128", "--tensor-parallel-size", "1",
        "--no-enable-prefix-caching", "--kv-cache-memory-bytes", "2GiB", "--token-buckets", "16", "64",
        "--gpu-memory-utilization", "0.5", "--served-model-name", "a", "b", "--api-key", "k"])
    kw = cli.engine_kwargs(args)
    assert set(kw) == set(ENGINE_ARGS)
    assert kw["max_model_len"] == 4096 and kw["max_num_seqs"] == 128 and kw["tensor_parallel_size"] == 1
    assert kw["enable_prefix_caching"] is False and kw["enable_chunked_prefill"] is True
    assert kw["kv_cache_memory_bytes"] == 2 * 2**30
    assert kw["token_buckets"] == [16, 64]
    assert kw["gpu_memory_utilization"] == 0.5
    assert args.model_pos == "/ckpt" and args.served_model_name == ["a", "b"] and args.api_key == "k"
    # unset flags keep LLM's own defaults
    defaults = {n: p.default for n, p in inspect.signature(LLM.__init__).parameters.items()}
    assert kw["block_size"] == defaults["block_size"] and kw["dtype"] == defaults["dtype"]


@pytest.mark.parametrize("text,expected", [("1048576", 2**20), ("1MiB", 2**20), ("2G", 2 * 10**9),
                                           ("1.5GiB", 3 * 2**29)])
def test_parse_size(text, expected):
    assert cli.parse_size(text) == expected


def test_generate_prints_the_generated_text(llama_ckpt, capsys):
    rc = cli.main(["generate", llama_ckpt, "--prompt", "Hello world", "--max-tokens", "4", "--temperature", "0",
                   *SMALL_FLAGS])
    assert rc == 0
    printed = capsys.readouterr().out
    expected = LLM(llama_ckpt, **SMALL_ENGINE).generate(
        "Hello world", SamplingParams(max_tokens=4, temperature=0.0), use_tqdm=False)[0].outputs[0].text
    assert printed == expected + "\n"


def test_generate_with_chat_uses_the_chat_template(llama_ckpt, capsys):
    rc = cli.main(["generate", llama_ckpt, "--prompt", "hi", "--chat", "--max-tokens", "4", "--temperature", "0",
                   *SMALL_FLAGS])
    assert rc == 0
    printed = capsys.readouterr().out
    expected = LLM(llama_ckpt, **SMALL_ENGINE).chat(
        [{"role": "user", "content": "hi"}], SamplingParams(max_tokens=4, temperature=0.0),
        use_tqdm=False)[0].outputs[0].text
    assert printed == expected + "\n"


def test_a_bad_flag_value_is_an_error_message_not_a_traceback(llama_ckpt, capsys):
    rc = cli.main(["generate", llama_ckpt, "--prompt", "x", "--dtype", "int3"])
    assert rc == 2
    assert "dtype" in capsys.readouterr().err


def test_serve_builds_the_app_from_flags(llama_ckpt, monkeypatch):
    from fastapi.testclient import TestClient
    import uvicorn

    started = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: started.update(app=app, **kw))
    monkeypatch.setenv("JAXENGINE_API_KEY", "from-env")
    assert cli.main(["serve", llama_ckpt, "--served-model-name", "my-model", "--port", "8123",
                     "--max-waiting-requests", "7", *SMALL_FLAGS]) == 0
    assert started["port"] == 8123 and started["host"] == "127.0.0.1"
    state = started["app"].state.jaxengine
    assert state.engine.max_waiting_requests == 7
    with TestClient(started["app"]) as http:
        assert http.get("/v1/models").status_code == 401
        models = http.get("/v1/models", headers={"Authorization": "Bearer from-env"}).json()
        assert [m["id"] for m in models["data"]] == ["my-model"]
