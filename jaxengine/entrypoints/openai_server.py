"""OpenAI-compatible HTTP server (FastAPI), a drop-in for `vllm serve`.

Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (both streaming as
server-sent events), POST /tokenize, POST /detokenize, GET /health, GET /metrics, GET /version.

Every error is a JSON body in OpenAI's shape {"error": {"message", "type", "param", "code"}}: 400
for anything wrong with the request (including FastAPI's validation errors and malformed JSON,
which would otherwise be 422s), 401 for a missing or wrong API key, 404 for an unknown model, 503
when the waiting queue is full.  A bad request never reaches the engine loop as an exception.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from typing import Any, AsyncIterator, Sequence

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

import jaxengine
from jaxengine.engine.async_llm import AsyncLLM, EngineDeadError, EngineOverloadedError, EngineStepError
from jaxengine.entrypoints import protocol as P
from jaxengine.outputs import CompletionOutput, Logprob, RequestOutput
from jaxengine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

_ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
                405: "invalid_request_error", 413: "invalid_request_error", 500: "server_error",
                503: "server_error"}


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _ERROR_TYPES.get(status, "invalid_request_error")

    def body(self) -> dict[str, Any]:
        return P.ErrorResponse(error=P.ErrorInfo(message=self.message, type=self.type, param=self.param,
                                                 code=self.code)).model_dump()

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


class ClientDisconnected(Exception):
    pass


# ------------------------------------------------------------------------------------ state
class ServerState:
    def __init__(self, llm: Any, served_model_names: Sequence[str], api_key: str | None,
                 max_waiting_requests: int, enable_metrics: bool = True):
        self.llm = llm
        self.tokenizer = llm.tokenizer
        self.served_model_names = list(served_model_names)
        self.api_key = api_key or None
        self.max_model_len = llm.config.scheduler.max_model_len
        self.max_logprobs = llm.runner.num_logprobs  # LLM(max_logprobs=...), at most the vocabulary
        self.defaults = llm.default_sampling_params()
        self.metrics = None
        observer = None
        if enable_metrics:
            from jaxengine.entrypoints.metrics import ServerMetrics
            self.metrics = observer = ServerMetrics(llm, lambda: self.engine, self.served_model_names[0])
        self.engine = AsyncLLM(llm, max_waiting_requests=max_waiting_requests, observer=observer)
        self._ids = 0

    def next_id(self, prefix: str) -> str:
        self._ids += 1
        return f"{prefix}-{self._ids}-{P.random_id('')[1:13]}"

    def check_model(self, name: str | None) -> str:
        if name is None or name == "":
            return self.served_model_names[0]
        if name not in self.served_model_names:
            raise OpenAIError(404, f"The model `{name}` does not exist.", param="model", code="model_not_found")
        return name


def _state(request: Request) -> ServerState:
    return request.app.state.jaxengine


async def _check_api_key(request: Request) -> None:
    key = _state(request).api_key
    if key is None:
        return
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise OpenAIError(401, "Incorrect or missing API key. Send it as 'Authorization: Bearer <key>'.",
                          code="invalid_api_key")


# ------------------------------------------------------------------------------------ parsing
async def _parse(request: Request, model: type[BaseModel]) -> Any:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise OpenAIError(400, f"The request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise OpenAIError(400, "The request body must be a JSON object.", code="invalid_json")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise _validation_error(e.errors()) from None


def _validation_error(errors: Sequence[Any]) -> OpenAIError:
    err = errors[0]
    loc = [str(x) for x in err.get("loc", ()) if x != "body"]
    param = loc[0] if loc else None
    where = ".".join(loc) or "body"
    return OpenAIError(400, f"Invalid value for '{where}': {err.get('msg')} (got {err.get('input')!r:.200})",
                       param=param, code="invalid_value")


def _sampling_params(state: ServerState, req: P.SamplingFields, max_tokens: int | None,
                     logprobs: int | None) -> SamplingParams:
    d = state.defaults
    n = 1 if req.n is None else req.n
    if req.best_of is not None and req.best_of != n:
        raise OpenAIError(400, f"best_of is not supported (it must equal n={n}; got {req.best_of})",
                          param="best_of")
    if req.logit_bias:
        raise OpenAIError(400, "logit_bias is not supported", param="logit_bias")

    def pick(value: Any, default: Any) -> Any:
        return default if value is None else value

    try:
        return SamplingParams(
            n=n, temperature=pick(req.temperature, d.temperature), top_p=pick(req.top_p, d.top_p),
            top_k=pick(req.top_k, d.top_k), min_p=pick(req.min_p, d.min_p), seed=req.seed,
            max_tokens=max_tokens, min_tokens=req.min_tokens or 0, stop=req.stop,
            stop_token_ids=req.stop_token_ids, ignore_eos=bool(req.ignore_eos), logprobs=logprobs,
            presence_penalty=pick(req.presence_penalty, 0.0),
            frequency_penalty=pick(req.frequency_penalty, 0.0),
            repetition_penalty=pick(req.repetition_penalty, d.repetition_penalty),
            skip_special_tokens=req.skip_special_tokens,
            include_stop_str_in_output=req.include_stop_str_in_output)
    except (ValueError, TypeError) as e:
        field = str(e).split(" ", 1)[0]
        raise OpenAIError(400, str(e), param=field if field.isidentifier() else None) from None


def _check_length(state: ServerState, num_prompt_tokens: int, max_tokens: int | None, what: str) -> None:
    m = state.max_model_len
    if num_prompt_tokens >= m:
        raise OpenAIError(400, f"This model's maximum context length is {m} tokens. However, your request "
                          f"has {num_prompt_tokens} input tokens, which leaves no room for output. Please "
                          f"reduce the length of the {what}.", param=what, code="context_length_exceeded")
    if max_tokens is not None and num_prompt_tokens + max_tokens > m:
        raise OpenAIError(400, f"This model's maximum context length is {m} tokens. However, you requested "
                          f"{num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the {what}, "
                          f"{max_tokens} in the completion). Please reduce the length of the {what} or "
                          "the completion.", param="max_tokens", code="context_length_exceeded")


def _check_max_tokens(value: int | None, name: str) -> None:
    if value is not None and value < 1:
        raise OpenAIError(400, f"{name} must be >= 1, got {value}", param=name, code="invalid_value")


def _tokenize_text(state: ServerState, text: str, add_special_tokens: bool) -> list[int]:
    if state.tokenizer is None:
        raise OpenAIError(400, "this server has no tokenizer; send prompts as token ids", param="prompt")
    return list(state.tokenizer(text, add_special_tokens=add_special_tokens).input_ids)


def _completion_prompts(state: ServerState, req: P.CompletionRequest) -> list[tuple[str | None, list[int]]]:
    p = req.prompt
    if isinstance(p, str):
        items: list[Any] = [p]
    elif p and all(isinstance(t, int) for t in p):
        items = [p]
    else:
        items = list(p)
    if not items:
        raise OpenAIError(400, "prompt must not be empty", param="prompt")
    prompts = []
    for item in items:
        if isinstance(item, str):
            if not item:
                raise OpenAIError(400, "prompt must not be empty", param="prompt")
            prompts.append((item, _tokenize_text(state, item, req.add_special_tokens)))
        else:
            if not item:
                raise OpenAIError(400, "prompt must not be empty", param="prompt")
            text = state.tokenizer.decode(item) if (state.tokenizer is not None and req.echo) else None
            prompts.append((text, list(item)))
    return prompts


def _chat_messages(req: P.ChatCompletionRequest | P.TokenizeRequest) -> list[dict[str, Any]]:
    if not req.messages:
        raise OpenAIError(400, "messages must be a non-empty list", param="messages")
    msgs = []
    for i, m in enumerate(req.messages):
        content = m.content
        if isinstance(content, list):
            texts = []
            for part in content:
                if part.type != "text" or part.text is None:
                    raise OpenAIError(400, f"messages[{i}]: content part type {part.type!r} is not supported "
                                      "(this server takes text parts only)", param="messages")
                texts.append(part.text)
            content = "\n".join(texts)
        msg: dict[str, Any] = {"role": m.role, "content": content if content is not None else ""}
        if m.name is not None:
            msg["name"] = m.name
        msgs.append(msg)
    return msgs


def _chat_prompt(state: ServerState, msgs: list[dict[str, Any]], add_generation_prompt: bool,
                 continue_final_message: bool = False, chat_template: str | None = None,
                 kwargs: dict[str, Any] | None = None) -> tuple[str, list[int]]:
    if state.tokenizer is None:
        raise OpenAIError(400, "chat needs a tokenizer, and this server has none", param="messages")
    extra = dict(kwargs or {})
    if continue_final_message:
        extra["continue_final_message"] = True
    try:
        text = state.llm.apply_chat_template(msgs, chat_template,
                                             add_generation_prompt and not continue_final_message, **extra)
    except ValueError as e:
        raise OpenAIError(400, str(e), param="messages") from None
    # the template already wrote the special tokens (BOS etc.)
    return text, _tokenize_text(state, text, add_special_tokens=False)


# ------------------------------------------------------------------------------------ running
async def _add_all(state: ServerState, base_id: str, prompts: list[tuple[str | None, list[int]]],
                   params: SamplingParams) -> tuple[asyncio.Queue, list[str]]:
    """Admit every prompt of one HTTP request, or none of them."""
    q: asyncio.Queue = asyncio.Queue()
    ids: list[str] = []
    try:
        for i, (text, token_ids) in enumerate(prompts):
            rid = f"{base_id}-{i}"
            await state.engine.add_request(rid, token_ids, params, text, out_queue=q)
            ids.append(rid)
    except BaseException as e:
        for rid in ids:
            state.engine.abort(rid)
        if isinstance(e, ValueError):
            raise OpenAIError(400, str(e), param="prompt") from None
        if isinstance(e, EngineOverloadedError):
            raise OpenAIError(503, str(e), code="engine_overloaded") from None
        if isinstance(e, EngineDeadError):
            raise OpenAIError(503, str(e), code="engine_dead") from None
        raise
    return q, ids


async def _outputs(state: ServerState, q: asyncio.Queue, ids: list[str]) -> AsyncIterator[list[RequestOutput]]:
    """Batches of the latest outputs of these requests until all have finished.  Outputs are
    cumulative, so when the consumer falls behind, only the newest output per request is kept.
    Leaving early (client gone, cancelled) aborts whatever has not finished."""
    pending = set(ids)
    try:
        while pending:
            items = [await q.get()]
            while not q.empty():
                items.append(q.get_nowait())
            latest: dict[str, RequestOutput] = {}
            for item in items:
                if isinstance(item, BaseException):
                    raise item
                latest[item.request_id] = item
                if item.finished:
                    pending.discard(item.request_id)
            yield list(latest.values())
    finally:
        for rid in pending:
            state.engine.abort(rid)


async def _until_disconnect(request: Request, coro: Any) -> Any:
    """Run coro, cancelling it (which aborts its requests) if the client goes away first."""
    task = asyncio.ensure_future(coro)

    async def watch() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(watch())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # this handler was cancelled (shutdown): take the work down with it
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    raise ClientDisconnected()


def _engine_error(e: BaseException) -> OpenAIError:
    return OpenAIError(500, str(e), code="engine_error")


def _sse(obj: Any) -> str:
    data = obj.model_dump_json() if isinstance(obj, BaseModel) else json.dumps(obj)
    return f"data: {data}\n\n"


def _usage(outs: Sequence[RequestOutput]) -> P.UsageInfo:
    prompt = sum(len(o.prompt_token_ids) for o in outs)
    completion = sum(len(c.token_ids) for o in outs for c in o.outputs)
    return P.UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


# ------------------------------------------------------------------------------------ logprobs
def _token_str(lp: Logprob | None, token_id: int, state: ServerState) -> str:
    if lp is not None and lp.decoded_token is not None:
        return lp.decoded_token
    if state.tokenizer is not None:
        return state.tokenizer.decode([token_id])
    return f"token_id:{token_id}"


def _top(entry: dict[int, Logprob], k: int) -> list[tuple[int, Logprob]]:
    top = [(t, lp) for t, lp in entry.items() if lp.rank is not None and lp.rank <= k]
    return sorted(top, key=lambda x: x[1].rank)[:k]


def _completion_logprobs(state: ServerState, token_ids: Sequence[int], entries: Sequence[dict[int, Logprob]],
                         k: int, offset: int) -> P.CompletionLogProbs:
    res = P.CompletionLogProbs()
    for tok, entry in zip(token_ids, entries):
        lp = entry.get(tok)
        s = _token_str(lp, tok, state)
        res.tokens.append(s)
        res.token_logprobs.append(lp.logprob if lp is not None else None)
        res.top_logprobs.append({_token_str(l, t, state): l.logprob for t, l in _top(entry, k)})
        res.text_offset.append(offset)
        offset += len(s)
    return res


def _chat_logprobs(state: ServerState, token_ids: Sequence[int], entries: Sequence[dict[int, Logprob]],
                   k: int) -> P.ChoiceLogprobs:
    content = []
    for tok, entry in zip(token_ids, entries):
        lp = entry.get(tok)
        s = _token_str(lp, tok, state)
        content.append(P.ChatTokenLogprob(
            token=s, logprob=lp.logprob if lp is not None else float("-inf"), bytes=list(s.encode()),
            top_logprobs=[P.TopLogprob(token=_token_str(l, t, state), logprob=l.logprob,
                                       bytes=list(_token_str(l, t, state).encode())) for t, l in _top(entry, k)]))
    return P.ChoiceLogprobs(content=content)


# ------------------------------------------------------------------------------------ handlers
router = APIRouter()
v1 = APIRouter(prefix="/v1", dependencies=[Depends(_check_api_key)])


@v1.get("/models")
async def list_models(request: Request) -> Any:
    state = _state(request)
    cards = [P.ModelCard(id=name, root=state.llm.config.model_path, max_model_len=state.max_model_len)
             for name in state.served_model_names]
    return P.ModelList(data=cards).model_dump()


@v1.post("/completions")
async def create_completion(request: Request) -> Any:
    state = _state(request)
    req: P.CompletionRequest = await _parse(request, P.CompletionRequest)
    model = state.check_model(req.model)
    _check_max_tokens(req.max_tokens, "max_tokens")
    if req.suffix:
        raise OpenAIError(400, "suffix is not supported", param="suffix")
    if req.logprobs is not None and not 0 <= req.logprobs <= state.max_logprobs:
        raise OpenAIError(400, f"logprobs must be an int in [0, {state.max_logprobs}], got {req.logprobs}",
                          param="logprobs")
    if req.echo and req.logprobs is not None:
        raise OpenAIError(400, "echo with logprobs needs prompt logprobs, which this server does not compute",
                          param="echo")
    params = _sampling_params(state, req, req.max_tokens, req.logprobs)
    prompts = _completion_prompts(state, req)
    for _, token_ids in prompts:
        _check_length(state, len(token_ids), req.max_tokens, "prompt")
    request_id = state.next_id("cmpl")
    q, ids = await _add_all(state, request_id, prompts, params)
    n = params.n
    echo = {rid: (text or "") if req.echo else "" for rid, (text, _) in zip(ids, prompts)}
    index0 = {rid: i * n for i, rid in enumerate(ids)}

    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        continuous = bool(req.stream_options and req.stream_options.continuous_usage_stats)
        return StreamingResponse(_stream_completion(state, q, ids, request_id, model, req, echo, index0,
                                                    include_usage, continuous), media_type="text/event-stream")

    async def collect() -> dict[str, RequestOutput]:
        finals: dict[str, RequestOutput] = {}
        async for batch in _outputs(state, q, ids):
            for out in batch:
                finals[out.request_id] = out
        return finals

    try:
        finals = await _until_disconnect(request, collect())
    except EngineStepError as e:
        raise _engine_error(e) from None
    choices = []
    for rid in ids:
        out = finals[rid]
        for c in out.outputs:
            lps = None
            if req.logprobs is not None and c.logprobs is not None:
                lps = _completion_logprobs(state, c.token_ids, c.logprobs, req.logprobs, len(echo[rid]))
            choices.append(P.CompletionChoice(index=index0[rid] + c.index, text=echo[rid] + c.text, logprobs=lps,
                                              finish_reason=c.finish_reason, stop_reason=c.stop_reason))
    resp = P.CompletionResponse(id=request_id, model=model, choices=choices,
                                usage=_usage([finals[rid] for rid in ids]))
    return JSONResponse(resp.model_dump())


class _ChoiceState:
    """What a stream has sent of one choice so far."""

    __slots__ = ("text_len", "num_tokens", "finished", "started")

    def __init__(self) -> None:
        self.text_len = 0
        self.num_tokens = 0
        self.finished = False
        self.started = False

    def delta(self, c: CompletionOutput) -> tuple[str, int, int]:
        text = c.text[self.text_len:]
        start, end = self.num_tokens, len(c.token_ids)
        self.text_len, self.num_tokens = len(c.text), end
        return text, start, end


async def _stream_completion(state: ServerState, q: asyncio.Queue, ids: list[str], request_id: str, model: str,
                             req: P.CompletionRequest, echo: dict[str, str], index0: dict[str, int],
                             include_usage: bool, continuous: bool) -> AsyncIterator[str]:
    sent: dict[tuple[str, int], _ChoiceState] = {}
    latest: dict[str, RequestOutput] = {}
    created = int(time.time())
    try:
        async for batch in _outputs(state, q, ids):
            for out in batch:
                latest[out.request_id] = out
                for c in out.outputs:
                    st = sent.setdefault((out.request_id, c.index), _ChoiceState())
                    if st.finished:
                        continue
                    text, start, end = st.delta(c)
                    if not st.started:
                        text, st.started = echo[out.request_id] + text, True
                    if not text and start == end and c.finish_reason is None:
                        continue
                    lps = None
                    if req.logprobs is not None and c.logprobs is not None:
                        lps = _completion_logprobs(state, c.token_ids[start:end], c.logprobs[start:end],
                                                   req.logprobs, st.text_len - len(text))
                    st.finished = c.finish_reason is not None
                    chunk = P.CompletionResponse(
                        id=request_id, created=created, model=model,
                        choices=[P.CompletionChoice(index=index0[out.request_id] + c.index, text=text,
                                                    logprobs=lps, finish_reason=c.finish_reason,
                                                    stop_reason=c.stop_reason)],
                        usage=_usage([out]) if continuous else None)
                    yield _sse(chunk)
        if include_usage:
            yield _sse(P.CompletionResponse(id=request_id, created=created, model=model, choices=[],
                                            usage=_usage([latest[rid] for rid in ids])))
    except EngineStepError as e:
        yield _sse(_engine_error(e).body())
    yield "data: [DONE]\n\n"


@v1.post("/chat/completions")
async def create_chat_completion(request: Request) -> Any:
    state = _state(request)
    req: P.ChatCompletionRequest = await _parse(request, P.ChatCompletionRequest)
    model = state.check_model(req.model)
    _check_max_tokens(req.max_tokens, "max_tokens")
    _check_max_tokens(req.max_completion_tokens, "max_completion_tokens")
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    if req.top_logprobs is not None:
        if not 0 <= req.top_logprobs <= state.max_logprobs:
            raise OpenAIError(400, f"top_logprobs must be an int in [0, {state.max_logprobs}], got "
                              f"{req.top_logprobs}", param="top_logprobs")
        if not req.logprobs:
            raise OpenAIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
    if req.response_format and req.response_format.get("type") not in (None, "text"):
        raise OpenAIError(400, f"response_format {req.response_format.get('type')!r} is not supported",
                          param="response_format")
    if req.tools and req.tool_choice != "none":
        raise OpenAIError(400, "tool calling is not supported", param="tools")
    k = (req.top_logprobs or 0) if req.logprobs else None
    params = _sampling_params(state, req, max_tokens, k)
    msgs = _chat_messages(req)
    text, token_ids = _chat_prompt(state, msgs, req.add_generation_prompt, req.continue_final_message,
                                   req.chat_template, req.chat_template_kwargs)
    _check_length(state, len(token_ids), max_tokens, "messages")
    request_id = state.next_id("chatcmpl")
    q, ids = await _add_all(state, request_id, [(text, token_ids)], params)

    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        continuous = bool(req.stream_options and req.stream_options.continuous_usage_stats)
        return StreamingResponse(_stream_chat(state, q, ids, request_id, model, k, params.n, include_usage,
                                              continuous), media_type="text/event-stream")

    async def collect() -> RequestOutput:
        final = None
        async for batch in _outputs(state, q, ids):
            final = batch[-1]
        return final

    try:
        out = await _until_disconnect(request, collect())
    except EngineStepError as e:
        raise _engine_error(e) from None
    choices = [P.ChatChoice(index=c.index, message=P.ChatResponseMessage(content=c.text),
                            logprobs=(_chat_logprobs(state, c.token_ids, c.logprobs, k)
                                      if k is not None and c.logprobs is not None else None),
                            finish_reason=c.finish_reason, stop_reason=c.stop_reason)
               for c in out.outputs]
    resp = P.ChatCompletionResponse(id=request_id, model=model, choices=choices, usage=_usage([out]))
    return JSONResponse(resp.model_dump())


async def _stream_chat(state: ServerState, q: asyncio.Queue, ids: list[str], request_id: str, model: str,
                       k: int | None, n: int, include_usage: bool, continuous: bool) -> AsyncIterator[str]:
    created = int(time.time())
    sent = [_ChoiceState() for _ in range(n)]
    latest = None

    def chunk(choices: list[P.ChatStreamChoice], usage: P.UsageInfo | None = None) -> str:
        return _sse(P.ChatCompletionChunk(id=request_id, created=created, model=model, choices=choices,
                                          usage=usage))

    try:
        # the role comes first, as OpenAI sends it
        yield chunk([P.ChatStreamChoice(index=i, delta=P.DeltaMessage(role="assistant", content=""))
                     for i in range(n)])
        async for batch in _outputs(state, q, ids):
            out = latest = batch[-1]
            for c in out.outputs:
                st = sent[c.index]
                if st.finished:
                    continue
                text, start, end = st.delta(c)
                if not text and start == end and c.finish_reason is None:
                    continue
                lps = (_chat_logprobs(state, c.token_ids[start:end], c.logprobs[start:end], k)
                       if k is not None and c.logprobs is not None and end > start else None)
                st.finished = c.finish_reason is not None
                yield chunk([P.ChatStreamChoice(index=c.index, delta=P.DeltaMessage(content=text or None),
                                                logprobs=lps, finish_reason=c.finish_reason,
                                                stop_reason=c.stop_reason)],
                            _usage([out]) if continuous else None)
        if include_usage and latest is not None:
            yield chunk([], _usage([latest]))
    except EngineStepError as e:
        yield _sse(_engine_error(e).body())
    yield "data: [DONE]\n\n"


# ------------------------------------------------------------------------------------ tokenizer routes
@router.post("/tokenize")
async def tokenize(request: Request) -> Any:
    state = _state(request)
    req: P.TokenizeRequest = await _parse(request, P.TokenizeRequest)
    state.check_model(req.model)
    if (req.prompt is None) == (req.messages is None):
        raise OpenAIError(400, "send exactly one of 'prompt' or 'messages'", param="prompt")
    if req.messages is not None:
        _, tokens = _chat_prompt(state, _chat_messages(req), req.add_generation_prompt)
    else:
        tokens = _tokenize_text(state, req.prompt, req.add_special_tokens)
    strs = state.tokenizer.convert_ids_to_tokens(tokens) if req.return_token_strs else None
    return P.TokenizeResponse(count=len(tokens), max_model_len=state.max_model_len, tokens=tokens,
                              token_strs=strs).model_dump()


@router.post("/detokenize")
async def detokenize(request: Request) -> Any:
    state = _state(request)
    req: P.DetokenizeRequest = await _parse(request, P.DetokenizeRequest)
    state.check_model(req.model)
    if state.tokenizer is None:
        raise OpenAIError(400, "this server has no tokenizer", param="tokens")
    vocab = len(state.tokenizer)
    if any(not 0 <= t < vocab for t in req.tokens):
        raise OpenAIError(400, f"tokens must be in [0, {vocab})", param="tokens")
    return P.DetokenizeResponse(prompt=state.tokenizer.decode(req.tokens)).model_dump()


@router.get("/health")
async def health(request: Request) -> Response:
    if not _state(request).engine.is_running:
        raise OpenAIError(503, "the engine is not running", code="engine_dead")
    return Response(status_code=200)


@router.get("/version")
async def version() -> Any:
    return {"version": jaxengine.__version__}


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    m = _state(request).metrics
    if m is None:
        raise OpenAIError(404, "metrics are disabled")
    return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)


# ------------------------------------------------------------------------------------ app
def build_app(llm: Any, served_model_names: Sequence[str] | None = None, api_key: str | None = None,
              max_waiting_requests: int = 1024, enable_metrics: bool = True) -> FastAPI:
    """The FastAPI app around an `LLM`.  The engine thread starts and stops with the app's lifespan."""
    names = list(served_model_names or [llm.config.model_path])
    state = ServerState(llm, names, api_key, max_waiting_requests, enable_metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.engine.start()
        try:
            yield
        finally:
            state.engine.shutdown()

    app = FastAPI(title="jaxengine OpenAI-compatible server", version=jaxengine.__version__, lifespan=lifespan)
    app.state.jaxengine = state
    app.include_router(v1)
    app.include_router(router)

    @app.exception_handler(OpenAIError)
    async def _openai_error(request: Request, exc: OpenAIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc.errors()).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return OpenAIError(exc.status_code, str(exc.detail)).response()

    @app.exception_handler(ClientDisconnected)
    async def _gone(request: Request, exc: ClientDisconnected) -> Response:
        return Response(status_code=499)  # nobody reads it; the requests were aborted

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error in %s %s", request.method, request.url.path)
        return OpenAIError(500, f"internal error: {exc!r}").response()

    return app


def run_server(llm: Any, host: str = "127.0.0.1", port: int = 8000, served_model_names: Sequence[str] | None = None,
               api_key: str | None = None, max_waiting_requests: int = 1024, log_level: str = "info") -> None:
    import uvicorn

    app = build_app(llm, served_model_names, api_key, max_waiting_requests)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_keep_alive=5)
