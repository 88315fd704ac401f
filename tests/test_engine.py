"""Engine behaviour: a request's greedy output does not depend on what else is running."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import SMALL_ENGINE
from jaxengine import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)


def make_prompts(n: int, seed: int = 0, max_len: int = 60, vocab: int = 200) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"prompt_token_ids": rng.integers(3, vocab, rng.integers(1, max_len + 1)).tolist()}
            for _ in range(n)]


PROMPTS = make_prompts(32)


@pytest.fixture(scope="module")
def llm(llama_ckpt):
    return LLM(llama_ckpt, **SMALL_ENGINE)


@pytest.fixture(scope="module")
def alone(llm):
    """Each prompt run by itself: the reference every other schedule must reproduce."""
    return [llm.generate(p, GREEDY, use_tqdm=False)[0].outputs[0].token_ids for p in PROMPTS]


def tokens(outs):
    return [o.outputs[0].token_ids for o in outs]


def test_outputs_come_back_in_input_order_with_vllm_fields(llm):
    outs = llm.generate(PROMPTS[:3], GREEDY, use_tqdm=False)
    assert [o.prompt_token_ids for o in outs] == [p["prompt_token_ids"] for p in PROMPTS[:3]]
    for o in outs:
        assert o.finished and len(o.outputs) == 1
        c = o.outputs[0]
        assert c.index == 0 and c.finish_reason == "length" and len(c.token_ids) == 10
        assert c.cumulative_logprob is not None and c.cumulative_logprob < 0


def test_greedy_output_is_identical_alone_and_in_a_batch_of_32_mixed_lengths(llama_ckpt, alone):
    big = LLM(llama_ckpt, **{**SMALL_ENGINE, "max_num_seqs": 32, "max_num_batched_tokens": 128})
    assert tokens(big.generate(PROMPTS, GREEDY, use_tqdm=False)) == alone
    assert big.num_compilations_since_warmup() == 0


def test_greedy_output_is_identical_under_preemption(llama_ckpt, alone):
    # 24 pages of 16 tokens: 32 requests of up to 70 tokens cannot all stay resident
    tiny = LLM(llama_ckpt, **{**SMALL_ENGINE, "max_model_len": 128, "kv_cache_memory_bytes": 24 * 16384})
    assert tiny.runner.num_pages == 24
    assert tokens(tiny.generate(PROMPTS, GREEDY, use_tqdm=False)) == alone
    assert tiny.engine.scheduler.num_preemptions > 0
    assert tiny.kv_cache.num_free_pages == tiny.kv_cache.num_pages


def test_reused_runner_slots_carry_no_state_of_their_last_request(llm, alone):
    """The runner keeps each slot's page-table row and sampling knobs between steps; a slot that
    served a sampled request with penalties and long page tables then serves greedy ones, and a
    seeded request gives the same tokens in whichever slot it lands."""
    sampled = SamplingParams(temperature=0.9, top_k=7, top_p=0.8, repetition_penalty=1.3,
                             presence_penalty=0.5, max_tokens=40, ignore_eos=True, seed=11)
    first = tokens(llm.generate(PROMPTS[:6], sampled, use_tqdm=False))
    assert tokens(llm.generate(PROMPTS[6:12], GREEDY, use_tqdm=False)) == alone[6:12]
    # the same seeded requests, shifted by one so that each lands in another slot
    again = tokens(llm.generate([PROMPTS[12]] + PROMPTS[:6], sampled, use_tqdm=False))
    assert again[1:] == first
    assert tokens(llm.generate(PROMPTS[:6], GREEDY, use_tqdm=False)) == alone[:6]


def test_greedy_output_is_identical_with_prefix_cache_hits(llm, alone):
    shared = [1] + list(range(40, 80))  # 41 tokens: two full pages shared
    prompts = [{"prompt_token_ids": shared + p["prompt_token_ids"][:8]} for p in PROMPTS[:6]]
    alone_shared = [llm.generate(p, GREEDY, use_tqdm=False)[0] for p in prompts]
    hits_before = llm.kv_cache.num_hit_tokens
    batch = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert llm.kv_cache.num_hit_tokens - hits_before >= 6 * 32
    assert all(o.num_cached_tokens >= 32 for o in batch)
    assert tokens(batch) == tokens(alone_shared)


def test_greedy_output_is_identical_with_a_tiny_token_budget_forcing_chunked_prefill(llama_ckpt, alone):
    chunky = LLM(llama_ckpt, **{**SMALL_ENGINE, "max_num_batched_tokens": 8})
    assert chunky.runner.buckets == (8,)
    assert tokens(chunky.generate(PROMPTS[:12], GREEDY, use_tqdm=False)) == alone[:12]


def test_prefix_caching_off_gives_the_same_tokens(llama_ckpt, alone):
    off = LLM(llama_ckpt, **{**SMALL_ENGINE, "enable_prefix_caching": False})
    assert tokens(off.generate(PROMPTS[:8], GREEDY, use_tqdm=False)) == alone[:8]
    assert off.kv_cache.num_hit_tokens == 0


def test_serving_never_compiles_after_warmup(llm):
    llm.runner.compile_counter.mark()
    params = [SamplingParams(temperature=t, top_p=p, top_k=k, min_p=m, seed=s, max_tokens=6, logprobs=lp,
                             presence_penalty=pp, repetition_penalty=rp)
              for t, p, k, m, s, lp, pp, rp in [(0.0, 1.0, 0, 0.0, None, None, 0.0, 1.0),
                                                 (0.7, 0.9, 5, 0.0, 1, 3, 0.5, 1.1),
                                                 (1.3, 0.5, 0, 0.1, 2, 0, 0.0, 1.0),
                                                 (1.0, 1.0, 40, 0.05, 3, 5, -0.5, 0.8)]]
    llm.generate(PROMPTS[:4], params, use_tqdm=False)
    llm.generate(PROMPTS[4:20], SamplingParams(n=2, temperature=1.0, max_tokens=5), use_tqdm=False)
    # the FILTER sampler (filters and penalties without logprobs), at every request bucket
    llm.generate(PROMPTS[:20], [SamplingParams(temperature=0.8, top_p=0.9, seed=i, max_tokens=4,
                                               frequency_penalty=0.2 * (i % 2)) for i in range(20)], use_tqdm=False)
    assert llm.runner.compile_counter.since() == 0
    # and the counter does see compilations: a new shape outside the engine is counted
    import jax
    import jax.numpy as jnp
    jax.jit(lambda x: x * 3)(jnp.ones(7))
    assert llm.runner.compile_counter.since() > 0


def test_step_programs_hold_no_data_dependent_branch_and_the_host_picks_the_sampler(llm):
    """A lax.cond on a GPU reads its predicate back to the host mid-step, which stalls asynchronous
    scheduling; the runner's programs must have none, and the sampler mode is chosen per step."""
    from jaxengine.runner import sampler
    r = llm.runner
    t = r.buckets[-1]
    s = r.seqs_for(t)
    batch, samp = r._empty_arrays(t, s)
    ints, floats = r._put_inputs(*r._pack(batch, samp, r._layout(t, s)))
    lowered = r._forward.lower(r.params, r.kv_caches, r.penalty_state["last_tokens"], ints, floats, (t, s))
    _, logits, samp_ints, samp_floats = lowered.out_info
    texts = [lowered.as_text()]
    # the samplers as a GPU runs them (filter search or sort, no branches); on CPU the runner
    # filters by "candidates", whose fallback is a lax.cond, and lets an all-greedy batch skip
    # the Gumbel noise by one (branches are free there)
    cpu = jax.default_backend() == "cpu"
    assert r.sampler_filter == ("candidates" if cpu else "search") and r.sampler_branches == cpu
    knob = {k: jnp.asarray(v) for k, v in samp.items()}
    for impl in ("search", "sort"):
        for full, lp in ((False, False), (True, False), (True, True)):
            texts.append(jax.jit(lambda lg, st, k: sampler.sample(lg, st, k, 4, full=full, logprobs=lp,  # noqa: B023
                                                                  filter_impl=impl)).lower(
                jnp.zeros(logits.shape, jnp.float32), r.penalty_state, knob).as_text())
    for text in texts:  # (loops are fine: threefry's has a fixed trip count)
        assert "stablehlo.case" not in text and "stablehlo.if" not in text
    cand = jax.jit(lambda lg, st, k: sampler.sample(lg, st, k, 4, filter_impl="candidates")).lower(
        jnp.zeros(logits.shape, jnp.float32), r.penalty_state, knob).as_text()
    assert "stablehlo.case" in cand or "stablehlo.if" in cand  # the check above can see a branch
    plain = r._sample.lower(logits, r.penalty_state, samp_ints, samp_floats, s, sampler.PLAIN).as_text()
    assert ("stablehlo.case" in plain) == cpu  # the runner's own PLAIN sampler: a branch on CPU only
    modes = []
    inner = r._sample

    def spy(*args):
        modes.append(args[-1])
        return inner(*args)

    r._sample = spy
    try:
        llm.generate(PROMPTS[0], GREEDY, use_tqdm=False)
        assert set(modes) == {sampler.PLAIN}
        modes.clear()
        llm.generate(PROMPTS[0], SamplingParams(temperature=0.8, seed=1, max_tokens=3), use_tqdm=False)
        assert set(modes) == {sampler.PLAIN}
        # filters and penalties run the FILTER sampler, logprobs the FULL one (top-n and rank);
        # a batch runs the highest mode of its rows (PLAIN again once only greedy is left)
        for p, want in ((SamplingParams(top_p=0.9, max_tokens=3), sampler.FILTER),
                        (SamplingParams(top_k=5, max_tokens=3), sampler.FILTER),
                        (SamplingParams(logprobs=2, max_tokens=3), sampler.FULL),
                        (SamplingParams(presence_penalty=0.3, max_tokens=3), sampler.FILTER),
                        (SamplingParams(min_p=0.1, max_tokens=3), sampler.FILTER),
                        (SamplingParams(top_p=0.9, logprobs=0, max_tokens=3), sampler.FULL)):
            modes.clear()
            llm.generate([PROMPTS[0], PROMPTS[1]], [GREEDY, p], use_tqdm=False)
            assert max(modes) == want and set(modes) <= {sampler.PLAIN, want}, (p, modes)
        modes.clear()
        llm.generate([PROMPTS[0], PROMPTS[1]], [SamplingParams(top_p=0.9, max_tokens=3),
                                                SamplingParams(logprobs=1, max_tokens=3)], use_tqdm=False)
        assert set(modes) == {sampler.FULL}
    finally:
        r._sample = inner


def test_n_samples_share_the_prompt_and_differ(llm):
    prompt = {"prompt_token_ids": list(range(3, 40))}
    out = llm.generate(prompt, SamplingParams(n=4, temperature=1.0, seed=7, max_tokens=8), use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2, 3]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    again = llm.generate(prompt, SamplingParams(n=4, temperature=1.0, seed=7, max_tokens=8), use_tqdm=False)[0]
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in out.outputs]
    assert llm.kv_cache.num_free_pages == llm.kv_cache.num_pages


def test_every_page_is_free_when_the_engine_is_idle(llm):
    llm.generate(PROMPTS[:10], GREEDY, use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
    assert llm.kv_cache.num_free_pages == llm.kv_cache.num_pages
    llm.kv_cache.check_invariants(live_request_ids=[])


def test_asynchronous_scheduling_gives_the_same_outputs_as_synchronous(llama_ckpt, llm):
    """Step N+1 is dispatched before step N's tokens are read back; outputs must not change."""
    sync = LLM(llama_ckpt, **SMALL_ENGINE, async_scheduling=False)
    params = [SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
              SamplingParams(temperature=0.9, top_p=0.9, seed=3, max_tokens=9, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=10, stop_token_ids=[7, 11, 13, 17]),
              SamplingParams(temperature=1.0, seed=5, max_tokens=8, presence_penalty=1.0,
                             repetition_penalty=1.3, ignore_eos=True)] * 3
    before = llm.runner.num_device_inputs
    a = llm.generate(PROMPTS[:12], params, use_tqdm=False)
    assert llm.runner.num_device_inputs > before  # inputs really came from the device
    b = sync.generate(PROMPTS[:12], params, use_tqdm=False)
    assert sync.runner.num_device_inputs == 0
    assert [(o.outputs[0].token_ids, o.outputs[0].finish_reason) for o in a] == \
        [(o.outputs[0].token_ids, o.outputs[0].finish_reason) for o in b]
    assert llm.kv_cache.num_free_pages == llm.kv_cache.num_pages


def test_without_chunked_prefill_whole_prompts_enter_in_one_step(llama_ckpt, alone):
    whole = LLM(llama_ckpt, **{k: v for k, v in SMALL_ENGINE.items() if k != "max_num_batched_tokens"},
                enable_chunked_prefill=False)
    assert whole.config.scheduler.max_num_batched_tokens >= whole.config.scheduler.max_model_len
    assert tokens(whole.generate(PROMPTS[:6], GREEDY, use_tqdm=False)) == alone[:6]


def test_fused_matmul_engine_reproduces_the_xla_engine(llama_ckpt, alone):
    """matmul_impl="gpu": decode-sized buckets run the fused Pallas matmuls (interpret mode on CPU),
    larger ones XLA's; greedy outputs are those of the all-XLA engine."""
    fused = LLM(llama_ckpt, **{**SMALL_ENGINE, "token_buckets": (8, 64)}, matmul_impl="gpu")
    r = fused.runner
    assert r.matmul_impl == "gpu" and r.fused_max_tokens == 64
    batch, samp = r._empty_arrays(8, r.seqs_for(8))
    ints, floats = r._put_inputs(*r._pack(batch, samp, r._layout(8, r.seqs_for(8))))
    text = r._forward.lower(r.params, r.kv_caches, r.penalty_state["last_tokens"], ints, floats,
                            (8, r.seqs_for(8))).as_text()
    assert "@_fused" in text  # the jitted kernel wrapper, inlined as a named call
    outs = fused.generate(PROMPTS[:8], GREEDY, use_tqdm=False)
    assert tokens(outs) == alone[:8]
    assert r.compile_counter.since() == 0


def test_compiled_steps_use_the_fused_weights_as_stored(llm):
    """The fused layout's q/k/v and gate/up GEMMs read the weights as they are: no program
    transposes or copies a weight every step (XLA:CPU did, for the 3-D einsums: most of a
    SmolLM2-135M decode step).  Checked on the optimized HLO of a decode-sized and a prefill-sized
    step: no instruction yields a q/k/v or gate/up weight's transposed shape [hidden, out]."""
    r = llm.runner
    m = llm.config.model
    layer = r.params["model"]["layers"]["0"]
    outs = [int(np.prod(layer["self_attn"]["qkv_proj"]["weight"].shape[:-1])),
            int(np.prod(layer["mlp"]["gate_up_proj"]["weight"].shape[:-1]))]
    transposed = [f"[{m.hidden_size},{n}]" for n in outs]
    for t in (8, 64):
        s = r.seqs_for(t)
        batch, samp = r._empty_arrays(t, s)
        ints, floats = r._put_inputs(*r._pack(batch, samp, r._layout(t, s)))
        hlo = r._forward.lower(r.params, r.kv_caches, r.penalty_state["last_tokens"], ints, floats,
                               (t, s)).compile().as_text()
        assert "qkv_proj" in hlo and "gate_up_proj" in hlo  # the names this check looks for
        copies = [line.strip()[:160] for line in hlo.splitlines()
                  if " = " in line and any(sh in line.split(" = ", 1)[1].split(" ", 1)[0] for sh in transposed)
                  and ("qkv_proj" in line or "gate_up_proj" in line)]
        assert not copies, (t, copies[:3])


def test_params_layouts_give_the_same_tokens_and_bad_layouts_are_refused(llm, llama_ckpt, alone):
    """The default engine runs the "fused" params layout (one q/k/v GEMM, one gate/up GEMM);
    param_layout="hf" runs the checkpoint's tensors as they are, to the same greedy tokens."""
    from jaxengine.models.llama import layout_of

    assert layout_of(llm.runner.params) == "fused"
    assert "qkv_proj" in llm.runner.params["model"]["layers"]["0"]["self_attn"]
    hf = LLM(llama_ckpt, **SMALL_ENGINE, param_layout="hf")
    assert layout_of(hf.runner.params) == "hf"
    assert tokens(hf.generate(PROMPTS[:8], GREEDY, use_tqdm=False)) == alone[:8]
    with pytest.raises(ValueError, match="param_layout must be one of auto, hf, fused; got 'packed'"):
        LLM(llama_ckpt, **SMALL_ENGINE, param_layout="packed")
    with pytest.raises(ValueError, match="param_layout='fused' cannot run with matmul_impl='gpu'"):
        LLM(llama_ckpt, **SMALL_ENGINE, param_layout="fused", matmul_impl="gpu")


def test_outputs_carry_request_timings_in_order(llm):
    """RequestOutput.metrics (vLLM's names): arrival <= first scheduled <= first token <= last token
    <= finished, for single requests and n > 1 groups; unfinished streams have no finish time."""
    outs = llm.generate(PROMPTS[:3], SamplingParams(temperature=0.8, seed=3, n=2, max_tokens=6, ignore_eos=True),
                        use_tqdm=False)
    for o in outs:
        m = o.metrics
        assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.last_token_time <= m.finished_time
        assert m.time_in_queue >= 0 and m.time_to_first_token > 0
    engine = llm.engine
    engine.add_request("timing-stream", PROMPTS[0]["prompt_token_ids"],
                       SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True))
    seen = []
    while engine.has_unfinished_requests():
        seen += [o for o in engine.step() if o.request_id == "timing-stream"]
    assert seen[0].metrics.finished_time is None and seen[0].metrics.first_token_time is not None
    assert seen[-1].finished and seen[-1].metrics.finished_time >= seen[-1].metrics.last_token_time
