"""The OpenAI-compatible server, end to end: real uvicorn on 127.0.0.1, driven by the openai client.

One server (one engine) per module; a second, small-queue server only for the overload test.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
import time
from typing import Any, Iterator

import httpx
import openai
import pytest
import uvicorn

from conftest import SMALL_ENGINE
from jaxengine import LLM
from jaxengine.entrypoints.openai_server import build_app

API_KEY = "test-secret"
MODEL = "tiny-llama"
PROMPT = "Hello world"
MESSAGES = [{"role": "user", "content": "what is two plus two?"}]


class Server:
    def __init__(self, llm: LLM, **app_kwargs: Any):
        self.llm = llm
        self.app = build_app(llm, [MODEL], **app_kwargs)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port,
                                                    log_level="warning", timeout_keep_alive=5))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "Server":
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    def wait_idle(self, timeout_s: float = 30.0) -> None:
        """Until the engine has no request left (polling: the engine thread finishes aborts async)."""
        engine = self.llm.engine
        deadline = time.monotonic() + timeout_s
        while engine.num_unfinished_requests or engine.has_unfinished_requests():
            assert time.monotonic() < deadline, "engine did not go idle"
            time.sleep(0.01)


@pytest.fixture(scope="module")
def server(llama_ckpt) -> Iterator[Server]:
    llm = LLM(llama_ckpt, **SMALL_ENGINE)
    with Server(llm, api_key=API_KEY) as s:
        yield s


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEY}"}


def metric(server: Server, name: str, labels: str = "") -> float:
    text = httpx.get(server.url + "/metrics").text
    pattern = re.escape(name) + r"\{[^}]*" + re.escape(labels) + r"[^}]*\} ([0-9.e+-]+)"
    m = re.search(pattern, text)
    assert m, f"{name} {labels} not in /metrics"
    return float(m.group(1))


def num_aborted(server: Server) -> float:
    if 'finished_reason="abort"' not in httpx.get(server.url + "/metrics").text:
        return 0.0
    return metric(server, "jaxengine:request_success_total", 'finished_reason="abort"')


def assert_kv_pool_all_free(server: Server) -> None:
    server.wait_idle()
    kv = server.llm.kv_cache
    assert kv.num_free_pages == kv.num_pages  # prefix-cached pages sit in the free queue
    assert metric(server, "jaxengine:kv_cache_usage_perc") == 0.0


# ----------------------------------------------------------------------------------- basics
def test_models_lists_the_served_name(client, server):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert httpx.get(server.url + "/health").status_code == 200
    server.llm.wait_for_compilation()
    assert metric(server, "jaxengine:step_token_budget") == server.llm.config.scheduler.max_num_batched_tokens


def test_completion_usage_counts_prompt_and_generated_tokens(client, server):
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0,
                                  extra_body={"ignore_eos": True})
    prompt_ids = server.llm.tokenizer(PROMPT).input_ids
    assert r.usage.prompt_tokens == len(prompt_ids)
    assert r.usage.completion_tokens == 8
    assert r.usage.total_tokens == len(prompt_ids) + 8
    assert r.choices[0].finish_reason == "length"
    assert r.choices[0].text == server.llm.generate(PROMPT, _greedy(8), use_tqdm=False)[0].outputs[0].text


def _greedy(max_tokens: int):
    from jaxengine import SamplingParams
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def test_completion_accepts_every_prompt_shape(client, server):
    ids = server.llm.tokenizer(PROMPT).input_ids
    for prompt, num in [(PROMPT, 1), ([PROMPT, "Hello"], 2), (ids, 1), ([ids, ids[:3]], 2)]:
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0, n=2)
        assert sorted(c.index for c in r.choices) == list(range(2 * num))
    by_text = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0)
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=5, temperature=0)
    assert by_text.choices[0].text == by_ids.choices[0].text


def test_echo_prepends_the_prompt(client):
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, echo=True)
    plain = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0)
    assert r.choices[0].text == PROMPT + plain.choices[0].text


def test_completion_logprobs_has_one_entry_per_token(client):
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == r.usage.completion_tokens == 6
    assert all(1 <= len(top) <= 3 and all(v <= 0 for v in top.values()) for top in lp.top_logprobs)
    assert all(t <= 0 for t in lp.token_logprobs)


def test_chat_logprobs_and_top_logprobs(client):
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5, temperature=0,
                                       logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 5
    assert all(len(t.top_logprobs) == 2 for t in content)
    # greedy: the sampled token is the most likely one
    assert all(abs(t.logprob - t.top_logprobs[0].logprob) < 1e-4 for t in content)
    assert all(a.logprob >= b.logprob for t in content for a, b in zip(t.top_logprobs, t.top_logprobs[1:]))
    assert "".join(t.token for t in content) == r.choices[0].message.content


def test_stop_string_truncates_and_reports_stop(client):
    full = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = next(ch for ch in full[1:] if full.find(ch) > 0)
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop],
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == full[:full.find(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_chat_accepts_content_part_lists(client):
    parts = [{"role": "user", "content": [{"type": "text", "text": "what is two plus two?"}]}]
    a = client.chat.completions.create(model=MODEL, messages=parts, max_tokens=6, temperature=0)
    b = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.choices[0].message.role == "assistant"


def test_chat_prompt_tokens_match_the_chat_template(client, server):
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=3, temperature=0)
    tok = httpx.post(server.url + "/tokenize", json={"messages": MESSAGES}).json()
    assert r.usage.prompt_tokens == tok["count"] == len(tok["tokens"])
    assert r.usage.completion_tokens <= 3
    text = httpx.post(server.url + "/detokenize", json={"tokens": tok["tokens"]}).json()["prompt"]
    assert "what is two plus two?" in text


# ----------------------------------------------------------------------------------- streaming
def _stream_completion(client, **kw) -> tuple[dict[int, str], dict[int, str], Any]:
    texts: dict[int, str] = {}
    reasons: dict[int, str] = {}
    usage = None
    for chunk in client.completions.create(model=MODEL, stream=True, stream_options={"include_usage": True}, **kw):
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            if c.finish_reason:
                reasons[c.index] = c.finish_reason
    return texts, reasons, usage


@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=1.0, top_p=0.9, seed=1234)],
                         ids=["greedy", "seeded"])
def test_streamed_completion_equals_non_streamed(client, sampling):
    kw = dict(prompt=PROMPT, max_tokens=24, n=2, **sampling)
    full = client.completions.create(model=MODEL, **kw)
    texts, reasons, usage = _stream_completion(client, **kw)
    assert texts == {c.index: c.text for c in full.choices}
    assert reasons == {c.index: c.finish_reason for c in full.choices}
    assert usage.model_dump() == full.usage.model_dump()


@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=1.0, seed=7)], ids=["greedy", "seeded"])
def test_streamed_chat_equals_non_streamed(client, sampling):
    kw = dict(model=MODEL, messages=MESSAGES, max_tokens=24, n=2, **sampling)
    full = client.chat.completions.create(**kw)
    texts: dict[int, str] = {}
    reasons: dict[int, str] = {}
    roles = set()
    usage = None
    for chunk in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        usage = chunk.usage or usage
        for c in chunk.choices:
            roles.add(c.delta.role)
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
            if c.finish_reason:
                reasons[c.index] = c.finish_reason
    assert texts == {c.index: c.message.content for c in full.choices}
    assert reasons == {c.index: c.finish_reason for c in full.choices}
    assert "assistant" in roles
    assert usage.model_dump() == full.usage.model_dump()


def test_stream_is_server_sent_events_ending_in_done(server):
    with httpx.stream("POST", server.url + "/v1/completions", headers=auth(),
                      json={"model": MODEL, "prompt": PROMPT, "max_tokens": 4, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        body = r.read().decode()
    events = body.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    for e in events[:-2]:
        assert e.startswith("data: ")
        assert json.loads(e[len("data: "):])["object"] == "text_completion"


# ----------------------------------------------------------------------------------- bad inputs
GOOD = {"model": MODEL, "prompt": PROMPT, "max_tokens": 2}
CHAT = {"model": MODEL, "messages": MESSAGES, "max_tokens": 2}
BAD_REQUESTS = {
    # name: (path, json body or raw bytes, headers, status, param)
    "malformed_json": ("/v1/completions", b'{"model": "tiny-llama", "prompt": ', auth(), 400, None),
    "body_not_an_object": ("/v1/completions", b'[1, 2]', auth(), 400, None),
    "prompt_wrong_type": ("/v1/completions", {**GOOD, "prompt": 12}, auth(), 400, "prompt"),
    "max_tokens_wrong_type": ("/v1/completions", {**GOOD, "max_tokens": "many"}, auth(), 400, "max_tokens"),
    "missing_prompt": ("/v1/completions", {"model": MODEL}, auth(), 400, "prompt"),
    "negative_max_tokens": ("/v1/completions", {**GOOD, "max_tokens": -1}, auth(), 400, "max_tokens"),
    "negative_temperature": ("/v1/completions", {**GOOD, "temperature": -0.5}, auth(), 400, "temperature"),
    "top_p_above_one": ("/v1/completions", {**GOOD, "top_p": 1.5}, auth(), 400, "top_p"),
    "n_zero": ("/v1/completions", {**GOOD, "n": 0}, auth(), 400, "n"),
    "best_of_unsupported": ("/v1/completions", {**GOOD, "best_of": 3}, auth(), 400, "best_of"),
    "empty_prompt": ("/v1/completions", {**GOOD, "prompt": ""}, auth(), 400, "prompt"),
    "token_id_out_of_vocab": ("/v1/completions", {**GOOD, "prompt": [1, 10**6]}, auth(), 400, "prompt"),
    "unknown_model": ("/v1/completions", {**GOOD, "model": "gpt-17"}, auth(), 404, "model"),
    "prompt_too_long": ("/v1/completions", {**GOOD, "prompt": "hello " * 300}, auth(), 400, "prompt"),
    "max_tokens_past_context": ("/v1/completions", {**GOOD, "max_tokens": 10_000}, auth(), 400, "max_tokens"),
    "empty_messages": ("/v1/chat/completions", {**CHAT, "messages": []}, auth(), 400, "messages"),
    "message_without_role": ("/v1/chat/completions", {**CHAT, "messages": [{"content": "hi"}]}, auth(), 400,
                             "messages"),
    "image_content_part": ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}, auth(), 400, "messages"),
    "logprobs_above_max_logprobs": ("/v1/completions", {**GOOD, "logprobs": 21}, auth(), 400, "logprobs"),
    "top_logprobs_above_max_logprobs": ("/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 21},
                                        auth(), 400, "top_logprobs"),
    "top_logprobs_without_logprobs": ("/v1/chat/completions", {**CHAT, "top_logprobs": 2}, auth(), 400,
                                      "top_logprobs"),
    "chat_unknown_model": ("/v1/chat/completions", {**CHAT, "model": "nope"}, auth(), 404, "model"),
    "missing_auth": ("/v1/completions", GOOD, {}, 401, None),
    "wrong_auth": ("/v1/completions", GOOD, {"Authorization": "Bearer wrong"}, 401, None),
    "models_without_auth": ("/v1/models", None, {}, 401, None),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_request_gets_an_openai_error_and_the_server_keeps_serving(server, client, name):
    path, body, headers, status, param = BAD_REQUESTS[name]
    if body is None:
        r = httpx.get(server.url + path, headers=headers)
    elif isinstance(body, bytes):
        r = httpx.post(server.url + path, content=body, headers={**headers, "Content-Type": "application/json"})
    else:
        r = httpx.post(server.url + path, json=body, headers=headers)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param
    # ... and a good request right after succeeds
    assert client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2).choices[0].finish_reason


def test_openai_client_raises_its_own_exception_types(server, client):
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt=PROMPT, max_tokens=2)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=-1)
    assert e.value.body["param"] == "temperature"


# ----------------------------------------------------------------------------------- disconnects
def test_client_disconnect_mid_stream_aborts_and_frees_the_kv_pool(server):
    aborted = num_aborted(server)
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 200, "stream": True, "ignore_eos": True}
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", server.url + "/v1/chat/completions", json=body, headers=auth()) as r:
            assert r.status_code == 200
            next(r.iter_raw())  # one chunk, then hang up
    assert_kv_pool_all_free(server)
    assert num_aborted(server) == aborted + 1
    assert metric(server, "jaxengine:num_requests_running") == 0


def test_client_disconnect_on_a_non_streaming_request_aborts_it(server):
    aborted = num_aborted(server)
    body = json.dumps({"model": MODEL, "prompt": PROMPT, "max_tokens": 240, "ignore_eos": True}).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {API_KEY}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(head + body)
        deadline = time.monotonic() + 30
        while server.llm.engine.num_unfinished_requests == 0:  # admitted: now hang up
            assert time.monotonic() < deadline
            time.sleep(0.005)
    assert_kv_pool_all_free(server)
    assert num_aborted(server) == aborted + 1


def test_a_failing_engine_step_fails_its_requests_and_the_engine_keeps_serving(server, client, monkeypatch):
    runner = server.llm.engine.runner
    real_dispatch = runner.dispatch
    calls = []

    def dispatch_failing_once(out):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("simulated device failure")
        return real_dispatch(out)

    monkeypatch.setattr(runner, "dispatch", dispatch_failing_once)
    with pytest.raises(openai.InternalServerError):
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4)
    assert_kv_pool_all_free(server)
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 4


def test_metrics_count_tokens_and_latencies(server, client):
    before = metric(server, "jaxengine:generation_tokens_total")
    client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, extra_body={"ignore_eos": True})
    assert metric(server, "jaxengine:generation_tokens_total") == before + 5
    for name in ("jaxengine:time_to_first_token_seconds_count", "jaxengine:e2e_request_latency_seconds_count",
                 "jaxengine:time_per_output_token_seconds_count", "jaxengine:prompt_tokens_total"):
        assert metric(server, name) > 0
    for name in ("jaxengine:num_requests_waiting", "jaxengine:prefix_cache_hit_rate"):
        assert metric(server, name) >= 0


# ----------------------------------------------------------------------------------- overload
def test_full_waiting_queue_answers_503_and_admitted_requests_complete(llama_ckpt):
    llm = LLM(llama_ckpt, **SMALL_ENGINE)  # max_num_seqs=8
    with Server(llm, max_waiting_requests=1) as s:
        async def main() -> list[tuple[int, dict]]:
            async with httpx.AsyncClient(base_url=s.url, timeout=60) as http:
                async def one(i: int) -> tuple[int, dict]:
                    r = await http.post("/v1/completions", json={
                        "model": MODEL, "prompt": f"{PROMPT} {i}", "max_tokens": 32, "ignore_eos": True})
                    return r.status_code, r.json()
                return await asyncio.gather(*(one(i) for i in range(32)))

        results = asyncio.run(main())
        ok = [body for status, body in results if status == 200]
        overloaded = [body for status, body in results if status == 503]
        assert len(ok) + len(overloaded) == len(results)
        assert ok and overloaded
        assert all(b["usage"]["completion_tokens"] == 32 and b["choices"][0]["finish_reason"] == "length" for b in ok)
        assert all("overloaded" in b["error"]["message"] for b in overloaded)
        assert_kv_pool_all_free(s)
