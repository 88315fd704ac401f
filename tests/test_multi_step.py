"""Multi-step decoding (num_scheduler_steps = K): K decode iterations in one device program must give
exactly what K single steps give, stop where they stop, and leak nothing."""

from __future__ import annotations

import types

import jax
import numpy as np
import pytest

from conftest import SMALL_ENGINE
from test_engine import make_prompts
from jaxengine import LLM, SamplingParams
from jaxengine.config import RunnerConfig, SchedulerConfig
from jaxengine.engine.kv_cache_manager import KVCacheManager
from jaxengine.engine.request import Request
from jaxengine.engine.scheduler import Scheduler

K = 4


PROMPTS = make_prompts(12, max_len=39)


@pytest.fixture(scope="module")
def single(llama_ckpt):
    return LLM(llama_ckpt, **SMALL_ENGINE)


@pytest.fixture(scope="module")
def multi(llama_ckpt):
    # Exact equality with single steps needs the same attention arithmetic.  On CPU the decode
    # programs' attention is the composite of the single step's ops (bitwise the same); on a GPU it
    # is a different kernel (equal to rounding, checked by test_decode_attention.py and the greedy
    # test below), which can flip a seeded sample or a logprob's 4th decimal.
    fuse = jax.default_backend() == "cpu"
    return LLM(llama_ckpt, **SMALL_ENGINE, num_scheduler_steps=K, fuse_decode_attention=fuse)


def run(llm, prompts, params):
    steps = llm.engine.num_steps
    outs = llm.generate(prompts, params, use_tqdm=False)
    return outs, llm.engine.num_steps - steps


class _Close(float):
    """A cumulative logprob that equals another within 1e-4: a K-step program can batch a
    request with different neighbours (another batch bucket) than single steps do, and XLA's
    matmul of another row count may round differently in the last bits."""

    def __eq__(self, other):
        return abs(float(self) - float(other)) <= 1e-4

    __hash__ = float.__hash__


def comparable(outs):
    return [[(c.token_ids, c.text, c.finish_reason, c.stop_reason, _Close(c.cumulative_logprob))
             for c in o.outputs] for o in outs]


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.0, max_tokens=13, ignore_eos=True),  # 13 = 3 x 4 + 1
    SamplingParams(temperature=0.9, seed=5, max_tokens=11, ignore_eos=True),
    SamplingParams(temperature=0.8, max_tokens=9, ignore_eos=True, n=3, seed=1),
    SamplingParams(temperature=0.8, top_p=0.8, presence_penalty=0.5, seed=7, max_tokens=10, ignore_eos=True),
], ids=["greedy", "seeded-temperature", "parallel-n3", "top-p-penalty"])
def test_same_outputs_as_single_steps_in_fewer_steps(single, multi, params):
    want, single_steps = run(single, PROMPTS, params)
    got, multi_steps = run(multi, PROMPTS, params)
    assert comparable(got) == comparable(want)
    assert multi_steps < 0.6 * single_steps, (multi_steps, single_steps)
    assert multi.runner.compile_counter.since() == 0
    assert multi.engine.scheduler.kv.num_free_pages == multi.engine.scheduler.kv.num_pages


def test_stops_inside_a_multi_step_are_honoured(single, multi):
    """Stop token ids, stop strings and EOS that fall in the middle of K sampled tokens end the
    output exactly where single steps end it; min_tokens still holds them back."""
    base = single.generate(PROMPTS[:4], SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True),
                           use_tqdm=False)
    cases = []
    for o in base:
        toks, text = o.outputs[0].token_ids, o.outputs[0].text
        cases.append(SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, stop_token_ids=[toks[6]]))
        if len(text) > 8:
            cases.append(SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, stop=[text[5:8]]))
        cases.append(SamplingParams(temperature=0.0, max_tokens=16, min_tokens=6,
                                    stop_token_ids=list(range(300))))
    for prompt_i, params in enumerate(cases):
        prompt = PROMPTS[min(prompt_i // 3, 3)]
        want = single.generate(prompt, params, use_tqdm=False)
        got = multi.generate(prompt, params, use_tqdm=False)
        assert comparable(got) == comparable(want), params
    assert multi.engine.scheduler.kv.num_free_pages == multi.engine.scheduler.kv.num_pages


def test_full_sampler_steps_run_multi_step_with_the_same_results(single, multi):
    """top-k, repetition penalty (counts updated between iterations) and top logprobs inside a
    multi-step: same tokens, logprobs and ranks as single steps."""
    params = [SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True),
              SamplingParams(temperature=0.7, top_k=5, top_p=0.9, seed=2, max_tokens=9, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True, logprobs=2),
              SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True, repetition_penalty=1.3,
                             presence_penalty=0.5, frequency_penalty=0.2)]
    want, single_steps = run(single, PROMPTS[:4], params)
    programs = multi.runner.num_program_steps
    got, steps = run(multi, PROMPTS[:4], params)
    assert comparable(got) == comparable(want)
    # the decode steps ran as K-step programs (how many steps the prompts' prefill takes depends on
    # what the prefix cache holds from earlier tests, so the step counts are not compared by ratio)
    assert multi.runner.num_program_steps - programs >= 2 and steps < single_steps, (steps, single_steps)
    for g, w in zip(got, want):
        assert len(g.outputs[0].token_ids) == 9
        if w.outputs[0].logprobs is None:
            assert g.outputs[0].logprobs is None
            continue
        assert len(g.outputs[0].logprobs) == 9
        for eg, ew in zip(g.outputs[0].logprobs, w.outputs[0].logprobs):
            assert eg.keys() == ew.keys()
            for tok in ew:
                assert eg[tok].rank == ew[tok].rank and abs(eg[tok].logprob - ew[tok].logprob) < 1e-5


def test_abort_while_a_multi_step_is_in_flight_leaks_no_pages(multi):
    engine = multi.engine
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    for i, p in enumerate(PROMPTS[:6]):
        engine.add_request(f"abort-{i}", p["prompt_token_ids"], params)
    for _ in range(4):
        engine.step()
    for i in range(0, 6, 2):
        engine.abort_request(f"abort-{i}")
    while engine.has_unfinished_requests():
        engine.step()
    engine.step()  # the last in-flight step's result, and the freed pages
    assert multi.engine.scheduler.kv.num_free_pages == multi.engine.scheduler.kv.num_pages


@pytest.mark.parametrize("engine_args", [
    dict(num_scheduler_steps=K, fuse_decode_attention=False),
    dict(num_scheduler_steps=K, attention_impl="gpu"),
    dict(decode_program=True),
    dict(decode_program=True, attention_impl="gpu"),
    dict(num_scheduler_steps=K, attention_impl="gpu", residual_norm="gpu"),
    dict(num_scheduler_steps=K, multi_step_unroll=0),
    dict(num_scheduler_steps=K, multi_step_unroll=2),
], ids=["general-attention-path", "gpu-decode-kernel", "k1-decode-program", "k1-decode-program-gpu",
        "gpu-decode-kernel-residual-norm-kernel", "unrolled", "two-iterations-a-trip"])
def test_decode_attention_paths_give_the_same_greedy_outputs(single, llama_ckpt, engine_args):
    """The decode programs' attention (rope + KV write + attention in one call) against the
    general path, the GPU kernel (interpret mode on CPU) inside the engine, and K = 1 decode
    programs: the same greedy tokens as single steps with the reference attention."""
    params = SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True)
    want, _ = run(single, PROMPTS[:5], params)
    llm = LLM(llama_ckpt, **SMALL_ENGINE, **engine_args)
    assert llm.runner.decode_program == engine_args.get("decode_program", False)
    from jaxengine.runner.model_runner import residual_norm_impl  # auto: the kernel on a GPU, else off
    assert llm.runner.residual_norm_impl == engine_args.get("residual_norm", residual_norm_impl("auto"))
    got, _ = run(llm, PROMPTS[:5], params)
    assert [[c.token_ids for c in o.outputs] for o in got] == [[c.token_ids for c in o.outputs] for o in want]
    # the decode steps ran as decode programs: at K = 1 the 8 after the prefill's token, each one
    assert llm.runner.num_program_steps >= (8 if llm.runner.decode_program else 1)
    assert llm.runner.compile_counter.since() == 0
    assert llm.engine.scheduler.kv.num_free_pages == llm.engine.scheduler.kv.num_pages


def test_bad_num_scheduler_steps_is_refused():
    with pytest.raises(ValueError, match="num_scheduler_steps"):
        SchedulerConfig(num_scheduler_steps=0)
    with pytest.raises(ValueError, match="multi_step_unroll"):
        RunnerConfig(multi_step_unroll=-1)


@pytest.mark.parametrize("unroll, trips", [(1, K), (2, K // 2), (0, 0), (8, 0)])
def test_multi_step_unroll_sets_the_device_loop(llama_ckpt, unroll, trips):
    """unroll 1: one loop of K trips; 2: K / 2 trips of two iterations; 0 or >= K: no loop in the
    multi-step program at all (what the knob is for: no predicate read back per trip on a GPU)."""
    llm = LLM(llama_ckpt, **{**SMALL_ENGINE, "warmup": False}, num_scheduler_steps=K,
              multi_step_unroll=unroll)
    r = llm.runner
    t, s = r.buckets[0], r.seqs_for(r.buckets[0])
    ints, floats = r._pack(*r._empty_arrays(t, s), r._layout(t, s))
    eqns = r._multi_step.trace(r.params, r.kv_caches, r.penalty_state, ints, floats, (t, s), K, 0).jaxpr.eqns
    loops = [e for e in eqns if e.primitive.name == "scan"]  # fori_loop of static bounds
    if trips == 0:
        assert not loops
    else:
        (loop,) = loops
        assert loop.params["length"] // loop.params["unroll"] == trips
    # the same tokens as the plain loop (the parametrized greedy test above runs a whole engine)
    params = SamplingParams(temperature=0.0, max_tokens=2 * K + 1, ignore_eos=True)
    got = llm.generate(PROMPTS[:3], params, use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 2 * K + 1 for o in got)
    assert llm.runner.num_program_steps >= 1



# ------------------------------------------------------------------------------- scheduler
def _scheduler(k: int, num_pages: int = 64, max_model_len: int = 64) -> Scheduler:
    cfg = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=max_model_len,
                          num_scheduler_steps=k)
    return Scheduler(cfg, KVCacheManager(num_pages, 4, enable_prefix_caching=True))


def _request(rid: str, n_prompt: int, max_tokens: int) -> Request:
    return Request(rid, list(range(3, 3 + n_prompt)), SamplingParams(temperature=0.0, max_tokens=max_tokens,
                                                                     ignore_eos=True),
                   seed=0, eos_token_ids=(), max_total_tokens=64)


def test_scheduler_accounts_for_k_pending_tokens_and_appends_up_to_a_stop():
    sched = _scheduler(K)
    req = _request("a", 6, max_tokens=10)
    sched.add_request(req)
    out = sched.schedule()  # prefill: single step
    assert out.num_steps == 1
    out2 = sched.schedule()  # scheduled before the prefill's token is known (async)
    assert out2.num_steps == K and out2.seqs[0].start_pos == 6
    assert req.num_computed_tokens == 6 + K and req.num_pending == 1 + K
    assert len(sched.kv.tables["a"]) * 4 >= 6 + K
    sched.update(out, {"a": 50})
    sched.update(out2, {"a": [51, 52, 53, 54]})
    assert req.output_token_ids == [50, 51, 52, 53, 54] and req.num_pending == 0 and req.num_new_tokens == K
    # 5 of 10 tokens: room for 4 more after the next pending one -> multi-step again (4 + 1 = 5 left)
    out3 = sched.schedule()
    assert out3.num_steps == K
    # the K tokens are appended up to max_tokens only... here all fit
    sched.update(out3, {"a": [55, 56, 57, 58]})
    assert req.num_output_tokens == 9
    out4 = sched.schedule()  # one token of room left and no other request: a single step
    assert out4.num_steps == 1
    sched.update(out4, {"a": 59})
    assert req.status.finished and req.num_output_tokens == 10


def test_scheduler_bounds_k_steps_by_the_model_length_and_skips_finishing_requests():
    """max_model_len bounds the K positions (a request 2 positions short of it gets single
    steps); a request whose pending tokens already reach max_tokens is not scheduled at all."""
    sched = _scheduler(K, max_model_len=16)
    req = _request("m", 10, max_tokens=50)
    req.max_total_tokens = 16  # the engine sets it to max_model_len
    sched.add_request(req)
    sched.update(sched.schedule(), {"m": 50})
    out = sched.schedule()  # 11 tokens known, 1 pending: 4 positions left of 16 -> K fits
    assert out.num_steps == K
    sched.update(out, {"m": [51, 52, 53, 54]})
    out = sched.schedule()  # 15 known + 1 pending = 16: no room for K - 1 more positions
    assert out.num_steps == 1
    sched.update(out, {"m": 55})
    assert req.status.finished and req.num_tokens == 16
    # two requests, one of which finishes inside the K-step while the other needs all K: both join
    # (the short one's surplus dropped), and the next step holds only the other
    sched = _scheduler(K)
    short, long_ = _request("s", 4, max_tokens=2), _request("l", 4, max_tokens=20)
    sched.add_request(short)
    sched.add_request(long_)
    first = sched.schedule()
    out = sched.schedule()  # both decode; "s" needs 1 more token and joins the K-step
    assert out.num_steps == K and {q.request_id for q in out.seqs} == {"s", "l"}
    nxt = sched.schedule()  # before any result: "s" is finishing (its pending reach max_tokens)
    assert [q.request_id for q in nxt.seqs] == ["l"] and nxt.num_steps == K
    sched.update(first, {"s": 7, "l": 8})
    sched.update(out, {"s": [9, 10, 11, 12], "l": [13, 14, 15, 16]})
    assert short.status.finished and short.output_token_ids == [7, 9] and short.num_new_tokens == 1
    assert long_.output_token_ids == [8, 13, 14, 15, 16]
    sched.update(nxt, {"l": [17, 18, 19, 20]})
    assert long_.num_output_tokens == 9 and sched.kv.num_free_pages == sched.kv.num_pages - len(
        sched.kv.tables["l"])


def test_scheduler_stops_appending_at_a_stop_token():
    sched = _scheduler(K)
    req = Request("s", [5, 6, 7], SamplingParams(temperature=0.0, max_tokens=20, stop_token_ids=[9]),
                  seed=0, eos_token_ids=(), max_total_tokens=64)
    sched.add_request(req)
    sched.update(sched.schedule(), {"s": 8})
    out = sched.schedule()
    assert out.num_steps == K
    sched.update(out, {"s": [8, 9, 8, 8]})
    assert req.output_token_ids == [8, 8, 9] and req.num_new_tokens == 2
    assert req.status.finished and req.stop_reason == 9
    assert sched.kv.num_free_pages == sched.kv.num_pages


def test_server_streams_multi_step_output_like_single_step_output(single, multi):
    """Through the OpenAI server and the real openai client: a multi-step engine streams several
    tokens per chunk at times, and the streamed text equals the single-step engine's text."""
    openai = pytest.importorskip("openai")  # installed in CI; absent on the GPU machine

    from test_server import MODEL, Server

    kw = dict(model=MODEL, prompt="Hello world", max_tokens=21, temperature=0, n=2)
    results = []
    for llm in (single, multi):
        with Server(llm) as s:
            client = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0, timeout=60)
            full = client.completions.create(**kw)
            streamed: dict[int, str] = {}
            for chunk in client.completions.create(stream=True, **kw):
                for c in chunk.choices:
                    streamed[c.index] = streamed.get(c.index, "") + c.text
            assert streamed == {c.index: c.text for c in full.choices}
            results.append((streamed, [c.finish_reason for c in full.choices], full.usage.model_dump()))
            s.wait_idle()
    assert results[0] == results[1]


def test_dispatch_thread_setting(monkeypatch):
    """$JAXENGINE_DISPATCH_THREAD: 1/0 force it, unset or "auto" leaves the runner to decide: a
    dispatching thread on a single-process GPU backend only."""
    from jaxengine.config import RunnerConfig
    from jaxengine.runner.model_runner import resolve_dispatch_thread

    for value, want in (("1", True), ("true", True), ("0", False), ("off", False), ("auto", None)):
        monkeypatch.setenv("JAXENGINE_DISPATCH_THREAD", value)
        assert RunnerConfig().dispatch_thread is want, value
    monkeypatch.delenv("JAXENGINE_DISPATCH_THREAD")
    assert RunnerConfig().dispatch_thread is None
    assert resolve_dispatch_thread(True) and not resolve_dispatch_thread(False)
    for backend, processes, want in (("gpu", 1, True), ("cuda", 1, True), ("gpu", 2, False),
                                     ("cpu", 1, False), ("tpu", 1, False)):
        with monkeypatch.context() as mp:
            mp.setattr(jax, "default_backend", lambda b=backend: b)
            mp.setattr(jax, "process_count", lambda p=processes: p)
            assert resolve_dispatch_thread(None) is want, (backend, processes)
            one = types.SimpleNamespace(devices=np.empty((1, 1)))
            eight = types.SimpleNamespace(devices=np.empty((2, 4)))
            assert resolve_dispatch_thread(None, one) is want
            assert resolve_dispatch_thread(None, eight) is False  # a multi-device mesh: unmeasured
            assert resolve_dispatch_thread(True, eight) is True


@pytest.mark.parametrize("k", [1, K], ids=["two-program-steps", "multi-step"])
def test_dispatch_thread_gives_the_same_outputs_and_leaks_nothing(single, llama_ckpt, monkeypatch, k):
    """$JAXENGINE_DISPATCH_THREAD=1: every device call (steps, multi-steps, penalty histories) goes
    through one worker thread in order; greedy, seeded and penalised requests come out as with
    single steps on the calling thread, and the KV pages all come back."""
    monkeypatch.setenv("JAXENGINE_DISPATCH_THREAD", "1")
    llm = LLM(llama_ckpt, **SMALL_ENGINE, num_scheduler_steps=k,
              fuse_decode_attention=jax.default_backend() == "cpu")
    assert llm.runner._worker is not None
    for params in (SamplingParams(temperature=0.0, max_tokens=13, ignore_eos=True),
                   SamplingParams(temperature=0.9, seed=5, max_tokens=11, ignore_eos=True),
                   SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True, repetition_penalty=1.3,
                                  frequency_penalty=0.5)):
        want, _ = run(single, PROMPTS, params)
        got, _ = run(llm, PROMPTS, params)
        assert comparable(got) == comparable(want)
    assert llm.runner.num_program_steps >= (1 if k > 1 else 0)
    assert llm.runner.compile_counter.since() == 0
    assert llm.engine.scheduler.kv.num_free_pages == llm.engine.scheduler.kv.num_pages


def test_batch_one_on_a_one_row_bucket_with_the_l2_prefetch_gives_the_same_greedy_tokens(
        single, llama_ckpt, monkeypatch):
    """A request alone on the smallest buckets ($JAXENGINE_MIN_TOKEN_BUCKET=1: a 1-row decode program,
    no padding rows) through the GPU decode kernel (interpret mode on CPU) with the attention's L2
    prefetch programs ($JAXENGINE_L2_PREFETCH): the greedy tokens of the default single-step engine,
    the decode programs on the 1-row bucket, and no page leaked."""
    params = SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True)
    want, _ = run(single, PROMPTS[:1], params)
    from jaxengine.pallas_kernels import l2_prefetch
    from jaxengine.pallas_kernels.ragged_paged_attention import gpu_decode

    planned = []  # the attention windows the decode programs' layers were given

    def windows(stream, rows, gemm):
        win = l2_prefetch.windows(stream, rows, gemm)
        planned.append((rows, [region for _, region in win.get("attention", ())]))
        return win

    monkeypatch.setattr(gpu_decode.LayerChain, "l2_windows", staticmethod(windows))
    monkeypatch.setenv("JAXENGINE_MIN_TOKEN_BUCKET", "1")
    monkeypatch.setenv("JAXENGINE_L2_PREFETCH", "mb=1,programs=8,max_tokens=1")
    llm = LLM(llama_ckpt, **{**SMALL_ENGINE, "warmup": False}, num_scheduler_steps=K, attention_impl="gpu")
    assert llm.runner.buckets[0] == 1 and llm.runner.bucket_for(1) == 1
    got, _ = run(llm, PROMPTS[:1], params)
    assert planned and all(rows == 1 and regions for rows, regions in planned)
    assert [c.token_ids for c in got[0].outputs] == [c.token_ids for c in want[0].outputs]
    assert llm.runner.num_program_steps >= 1
    assert llm.engine.scheduler.kv.num_free_pages == llm.engine.scheduler.kv.num_pages
