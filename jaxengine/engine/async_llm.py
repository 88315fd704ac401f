"""AsyncLLM: the engine as an asyncio service, for the server.

EngineCore.step() is blocking work (it waits for the device), so it runs in one dedicated thread
that loops for as long as there are requests.  The event loop never touches the EngineCore:
it sends commands (add, abort) through a queue that the engine thread drains between steps, so
engine state is only ever mutated by that one thread and needs no lock.  Outputs travel back
through `loop.call_soon_threadsafe` into one asyncio.Queue per caller.

Failure policy: a bad request fails alone (add_request's ValueError goes back to the caller); a
step that raises fails the requests that were in flight with EngineStepError, frees their pages,
logs the traceback, and the loop carries on with the next request.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import queue
import threading
import time
from typing import Any, AsyncIterator, Protocol

from jaxengine.outputs import RequestOutput
from jaxengine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineOverloadedError(RuntimeError):
    """The waiting queue is full: the caller should retry later (HTTP 503)."""


class EngineStepError(RuntimeError):
    """The engine step that was computing this request raised (HTTP 500)."""


class EngineDeadError(RuntimeError):
    """The engine thread is not running."""


class StepObserver(Protocol):
    """Hooks for metrics, called on the engine thread."""

    def on_request_added(self, request_id: str, num_prompt_tokens: int, arrival_s: float) -> None: ...

    def on_outputs(self, outputs: list[RequestOutput], now_s: float) -> None: ...

    def on_request_gone(self, request_id: str) -> None: ...


@dataclasses.dataclass
class _Stream:
    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop


class AsyncLLM:
    """Wraps an `LLM` (its `engine`, `kv_cache`, `tokenizer`) for concurrent async callers."""

    def __init__(self, llm: Any, max_waiting_requests: int = 1024, observer: StepObserver | None = None):
        if max_waiting_requests < 1:
            raise ValueError(f"max_waiting_requests must be >= 1, got {max_waiting_requests}")
        self.llm = llm
        self.engine = llm.engine
        self.max_waiting_requests = max_waiting_requests
        self.observer = observer
        self._commands: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, _Stream] = {}  # engine-thread only
        self._num_pending_adds = 0  # adds sent but not yet drained; event-loop side only
        self._stop = False
        self._thread: threading.Thread | None = None
        self.num_step_errors = 0

    # ------------------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="jaxengine-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout_s: float = 10.0) -> None:
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ------------------------------------------------------------------------------ queries
    @property
    def num_waiting(self) -> int:
        # len() of the scheduler's deque is atomic under the GIL: a fine read for metrics
        return self.engine.scheduler.num_waiting + self._num_pending_adds

    @property
    def num_running(self) -> int:
        return self.engine.scheduler.num_running

    # ------------------------------------------------------------------------------ requests
    async def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                          prompt: str | None = None, out_queue: asyncio.Queue | None = None) -> asyncio.Queue:
        """Admit a request; returns the queue its RequestOutputs (or an exception) arrive on.

        Several requests may share one out_queue (a multi-prompt completion).  Raises ValueError
        for a request the engine refuses and EngineOverloadedError when the waiting queue is full.
        """
        if not self.is_running:
            raise EngineDeadError("the engine is not running")
        if self.num_waiting + max(params.n, 1) > self.max_waiting_requests:
            raise EngineOverloadedError(
                f"the server is overloaded: {self.num_waiting} requests are already waiting "
                f"(--max-waiting-requests {self.max_waiting_requests}); retry later")
        loop = asyncio.get_running_loop()
        out_queue = out_queue if out_queue is not None else asyncio.Queue()
        done: concurrent.futures.Future = concurrent.futures.Future()
        self._num_pending_adds += params.n
        try:
            self._commands.put(("add", request_id, prompt_token_ids, params, prompt,
                                _Stream(out_queue, loop), time.monotonic(), done))
            self._wake.set()
            await asyncio.wrap_future(done)
        finally:
            self._num_pending_adds -= params.n
        return out_queue

    def abort(self, request_id: str) -> None:
        """Abort a request (a no-op when it is unknown or finished); its pages free at once."""
        self._commands.put(("abort", request_id))
        self._wake.set()

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       prompt: str | None = None) -> AsyncIterator[RequestOutput]:
        """Outputs of one request as they change; the last has finished=True.  Leaving the loop
        early (or being cancelled) aborts the request."""
        q = await self.add_request(request_id, prompt_token_ids, params, prompt)
        finished = False
        try:
            while not finished:
                out = await q.get()
                if isinstance(out, BaseException):
                    finished = True
                    raise out
                finished = out.finished
                yield out
        finally:
            if not finished:
                self.abort(request_id)

    # ------------------------------------------------------------------------------ engine thread
    def _drain_commands(self) -> None:
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if cmd[0] == "add":
                _, rid, token_ids, params, prompt, stream, arrival_s, done = cmd
                try:
                    self.engine.add_request(rid, token_ids, params, prompt=prompt)
                except Exception as e:  # ValueError: a bad request; anything else: still its own
                    done.set_exception(e)
                    continue
                self._streams[rid] = stream
                if self.observer is not None:
                    self.observer.on_request_added(rid, len(token_ids), arrival_s)
                done.set_result(None)
            elif cmd[0] == "abort":
                rid = cmd[1]
                self.engine.abort_request(rid)
                if self._streams.pop(rid, None) is not None and self.observer is not None:
                    self.observer.on_request_gone(rid)

    def _deliver(self, items: list[tuple[_Stream, Any]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Any]]] = {}
        for stream, item in items:
            by_loop.setdefault(stream.loop, []).append((stream.queue, item))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, batch)
            except RuntimeError:  # the loop closed: nobody is listening any more
                pass

    def _fail_all(self, exc: BaseException) -> None:
        items = []
        for rid, stream in list(self._streams.items()):
            self.engine.abort_request(rid)
            items.append((stream, exc))
            if self.observer is not None:
                self.observer.on_request_gone(rid)
        self._streams.clear()
        self._deliver(items)

    def _loop(self) -> None:
        while not self._stop:
            self._drain_commands()
            if not self.engine.has_unfinished_requests():
                # one empty step hands freed requests' device state back to the runner
                try:
                    self.engine.step()
                except Exception:
                    logger.exception("engine idle step failed")
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:
                self.num_step_errors += 1
                logger.exception("engine step failed; failing the %d requests in flight", len(self._streams))
                self._fail_all(EngineStepError(f"the engine failed while computing this request: {e!r}"))
                continue
            if not outputs:
                continue
            now_s = time.monotonic()
            if self.observer is not None:
                try:
                    self.observer.on_outputs(outputs, now_s)
                except Exception:
                    logger.exception("metrics observer failed")
            items = []
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is None:
                    continue  # aborted in the meantime
                items.append((stream, out))
                if out.finished:
                    del self._streams[out.request_id]
            self._deliver(items)
        # shutting down: whoever still waits gets an error rather than hanging
        self._drain_commands()
        self._fail_all(EngineDeadError("the engine shut down"))


def _put_all(batch: list[tuple[asyncio.Queue, Any]]) -> None:
    for q, item in batch:
        q.put_nowait(item)
