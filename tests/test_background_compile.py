"""Background compilation of the bigger token buckets (RunnerConfig.background_compile_above):
LLM() returns once the small buckets are compiled, the scheduler's budget follows the buckets as
they become ready, what the thread compiled is what the steps run (serving compiles nothing), the
tokens do not depend on the budget, and a failure or a shutdown leaves the engine serving."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from conftest import SMALL_ENGINE
from jaxengine import LLM, SamplingParams
from jaxengine.config import RunnerConfig
from jaxengine.llm import default_max_num_batched_tokens
from jaxengine.runner import compile_watch
from jaxengine.runner.model_runner import ModelRunner

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
ENGINE = {**SMALL_ENGINE, "max_num_seqs": 16, "max_num_batched_tokens": 128, "background_compile_above": 16}


def make_prompts(n: int, seed: int = 0, max_len: int = 60) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"prompt_token_ids": rng.integers(3, 200, rng.integers(20, max_len + 1)).tolist()}
            for _ in range(n)]


class Gate:
    """Holds ModelRunner._compile_bucket at bucket sizes >= `hold` until opened; `fail` raises
    at that bucket instead."""

    def __init__(self, monkeypatch, hold: int, fail: int | None = None):
        self.open = threading.Event()
        self.compiled: list[int] = []
        original = ModelRunner._compile_bucket

        def compile_bucket(runner, t, *args):
            if t >= hold:
                assert self.open.wait(60), "test gate never opened"
            if t == fail:
                raise RuntimeError(f"injected failure compiling bucket {t}")
            original(runner, t, *args)
            self.compiled.append(t)
        monkeypatch.setattr(ModelRunner, "_compile_bucket", compile_bucket)


def step_budgets(llm):
    """Record every step's scheduled token count and the budget it was scheduled under."""
    sched = llm.engine.scheduler
    seen: list[tuple[int, int]] = []
    schedule = sched.schedule

    def record():
        out = schedule()
        seen.append((out.num_batched_tokens, sched.token_budget))
        return out
    sched.schedule = record
    return seen


def test_bigger_buckets_compile_in_the_background_while_the_engine_serves(llama_ckpt, monkeypatch):
    gate = Gate(monkeypatch, hold=32)
    llm = LLM(llama_ckpt, **ENGINE)
    runner = llm.runner
    assert runner.buckets == (8, 16, 32, 64, 128)
    assert runner.compiling and runner.token_budget == 16
    seen = step_budgets(llm)
    prompts = make_prompts(12)
    held = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
    assert seen and max(n for n, _ in seen) <= 16, "steps kept to the buckets ready"
    assert all(b == 16 for _, b in seen)

    background = compile_watch.num_background_compilations()
    gate.open.set()
    assert llm.wait_for_compilation(timeout=120)
    assert not runner.compiling and runner.background_compile_error is None
    assert runner.token_budget == 128 and gate.compiled == [32, 64, 128]
    assert compile_watch.num_background_compilations() > background
    seen.clear()
    full = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
    assert full == held, "greedy tokens do not depend on the step budget"
    assert max(n for n, _ in seen) > 64, "the biggest bucket ran once ready"
    # what the thread compiled is what the steps ran: serving lowered nothing
    assert llm.num_compilations_since_warmup() == 0


def test_without_chunked_prefill_a_long_prompt_waits_for_its_bucket(llama_ckpt, monkeypatch):
    """With chunking off a prompt must fit one step: a 60-token prompt waits for the 64-token
    bucket, the engine blocking on it (not spinning) and then serving it."""
    gate = Gate(monkeypatch, hold=64)
    llm = LLM(llama_ckpt, **{**ENGINE, "max_model_len": 128, "enable_chunked_prefill": False})
    assert llm.runner.token_budget <= 32
    seen = step_budgets(llm)
    threading.Timer(1.0, gate.open.set).start()
    start = time.monotonic()
    out = llm.generate({"prompt_token_ids": list(range(3, 63))}, GREEDY, use_tqdm=False)
    waited = time.monotonic() - start
    assert waited >= 0.9
    assert len(out[0].outputs[0].token_ids) == GREEDY.max_tokens
    empty = sum(1 for n, _ in seen if n == 0)
    # An empty step waits up to 1 s for the next bucket (less when one becomes ready): at most one
    # a second, plus a few wake-ups; a spinning engine runs thousands.  (Bounded by the wait, not
    # by a count: the 64 bucket's compile after the gate opens takes longer on a loaded machine.)
    assert empty <= waited + 3, f"{empty} empty steps in {waited:.1f} s: the engine spun instead of waiting"
    assert llm.wait_for_compilation(timeout=120)


def test_a_failed_background_compile_leaves_the_engine_serving_at_the_budget_reached(llama_ckpt, monkeypatch):
    gate = Gate(monkeypatch, hold=8, fail=64)
    gate.open.set()
    llm = LLM(llama_ckpt, **ENGINE)
    assert llm.wait_for_compilation(timeout=120)
    runner = llm.runner
    assert isinstance(runner.background_compile_error, RuntimeError)
    assert runner.token_budget == 32 and gate.compiled == [32]
    outs = llm.generate(make_prompts(8), GREEDY, use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == GREEDY.max_tokens for o in outs)
    assert llm.num_compilations_since_warmup() == 0
    assert llm.kv_cache.num_free_pages == llm.kv_cache.num_pages


def test_shutdown_finishes_the_bucket_being_compiled_and_skips_the_rest(llama_ckpt, monkeypatch):
    gate = Gate(monkeypatch, hold=32)
    llm = LLM(llama_ckpt, **ENGINE)
    stopper = threading.Thread(target=llm.shutdown)
    stopper.start()
    deadline = time.monotonic() + 30
    while not llm.runner._stop_compile.is_set() and time.monotonic() < deadline:
        time.sleep(0.01)
    gate.open.set()
    stopper.join(60)
    assert not stopper.is_alive() and not llm.runner.compiling
    assert gate.compiled == [32] and llm.runner.token_budget == 32


def test_no_background_compile_when_switched_off(llama_ckpt):
    llm = LLM(llama_ckpt, **{**ENGINE, "background_compile_above": 0})
    assert not llm.runner.compiling and llm.runner.token_budget == 128
    assert llm.wait_for_compilation(timeout=0)
    # the start's parts, as bench_startup.py reports them: every bucket's step program was a warm-up call
    assert set(llm.startup_phases) == {"config", "weights", "layout", "runner", "warmup"}
    assert all(v >= 0 for v in llm.startup_phases.values())
    assert {t for p, t, _, _ in llm.runner.warmup_times if p == "step"} == set(llm.runner.buckets)
    assert sum(c[3] for c in llm.runner.warmup_times) <= llm.startup_phases["warmup"]


def test_default_token_budget_is_8192_on_a_gpu_with_background_compilation():
    assert default_max_num_batched_tokens("gpu", RunnerConfig()) == 8192  # auto: 256 on a GPU
    on = RunnerConfig(background_compile_above=2048)
    assert default_max_num_batched_tokens("gpu", on) == 8192
    assert default_max_num_batched_tokens("cpu", on) == 2048
    assert default_max_num_batched_tokens("tpu", on) == 2048
    assert default_max_num_batched_tokens("gpu", RunnerConfig(background_compile_above=None)) == 2048
    assert default_max_num_batched_tokens("gpu", RunnerConfig(background_compile_above=256)) == 8192
    assert default_max_num_batched_tokens("gpu", on, process_count=2) == 2048


def test_background_compile_switch(check_env_switch):
    read = lambda: RunnerConfig().background_compile_above  # noqa: E731
    check_env_switch("JAXENGINE_BACKGROUND_COMPILE_ABOVE", read, "auto", "4096", 4096)
    check_env_switch("JAXENGINE_BACKGROUND_COMPILE_ABOVE", read, "auto", "none", None)
    for bad in (-1, "sometimes", True):
        with pytest.raises(ValueError, match="background_compile_above"):
            RunnerConfig(background_compile_above=bad)
    # auto: the buckets up to 256 before the start on a GPU (its warm start, BENCHMARKS.md), 2048 elsewhere
    auto = RunnerConfig(background_compile_above="auto")
    assert auto.background_compile_limit("gpu") == 256
    assert auto.background_compile_limit("cpu") == auto.background_compile_limit("tpu") == 2048
    assert RunnerConfig(background_compile_above=0).background_compile_limit("gpu") is None
    assert RunnerConfig(background_compile_above=512).background_compile_limit("gpu") == 512


def test_engine_flags_take_background_compile_above_as_a_number_or_auto():
    from jaxengine.entrypoints.cli import make_parser
    for value, expected in (("auto", "auto"), ("512", 512), ("0", 0)):
        args = make_parser().parse_args(["serve", "m", "--background-compile-above", value])
        assert args.background_compile_above == expected


def test_warmup_compiles_on_a_thread_pool_what_the_serial_warmup_would(llama_ckpt):
    """RunnerConfig.compile_threads > 1: the warm-up's programs (every bucket's step with the
    sampler's modes, the multi-step program's decode buckets) are compiled by a pool first; the
    warm-up's calls then lower nothing more, serving lowers nothing, and the tokens are the serial
    start's."""
    engine = {**ENGINE, "background_compile_above": 0, "num_scheduler_steps": 4}
    prompts = make_prompts(6, seed=3)
    lowered, tokens, order = {}, {}, {}
    for threads in (1, 3):
        before, names = compile_watch.num_compilations(), len(compile_watch.lowered_names())
        llm = LLM(llama_ckpt, **engine, compile_threads=threads)
        lowered[threads] = compile_watch.num_compilations() - before
        order[threads] = [n for n in compile_watch.lowered_names()[names:]
                          if n in ("jit(forward)", "jit(sample)", "jit(multi_step)")]  # the runner's programs
        assert llm.runner.compile_threads() == threads
        assert (llm.runner.precompile_s > 0) == (threads > 1)
        assert 0 <= llm.runner.precompile_lower_s <= llm.runner.precompile_s
        tokens[threads] = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
        assert llm.num_compilations_since_warmup() == 0
        llm.shutdown()
    # the same programs, each lowered once (a call finding no compiled program would lower again)
    assert lowered[3] == lowered[1] > 0
    # ... in the serial warm-up's order (a fixed order keeps the persistent cache's keys stable)
    assert order[3] == order[1] and len(set(order[1])) == 3, order[1]
    assert tokens[3] == tokens[1]


def test_compile_threads_switch(check_env_switch):
    read = lambda: RunnerConfig().compile_threads  # noqa: E731
    check_env_switch("JAXENGINE_COMPILE_THREADS", read, None, "4", 4)
    with pytest.raises(ValueError, match="compile_threads"):
        RunnerConfig(compile_threads=0)


def test_a_failed_compile_on_the_pool_fails_the_start_with_its_error(llama_ckpt, monkeypatch):
    class Broken:
        def compile(self):
            raise RuntimeError("injected compile failure on the pool")
    monkeypatch.setattr(ModelRunner, "_lower_sampler", lambda *args: Broken())
    with pytest.raises(RuntimeError, match="injected compile failure on the pool"):
        LLM(llama_ckpt, **{**ENGINE, "background_compile_above": 0}, compile_threads=2)
