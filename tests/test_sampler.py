"""The on-device sampler: greedy, filters, seeds, penalties, and the distribution it samples."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxengine.runner import sampler

VOCAB = 12


def knobs(s: int, **over) -> dict[str, jnp.ndarray]:
    base = {
        "temperature": np.ones(s, np.float32), "top_k": np.zeros(s, np.int32),
        "top_p": np.ones(s, np.float32), "min_p": np.zeros(s, np.float32),
        "seed": np.arange(s, dtype=np.uint32), "rng_pos": np.zeros(s, np.int32),
        "presence_penalty": np.zeros(s, np.float32), "frequency_penalty": np.zeros(s, np.float32),
        "repetition_penalty": np.ones(s, np.float32), "penalty_slot": np.zeros(s, np.int32),
        "use_penalty": np.zeros(s, bool), "count_sampled": np.zeros(s, bool),
    }
    for k, v in over.items():
        base[k] = np.broadcast_to(np.asarray(v, base[k].dtype), (s,)).copy()
    return {k: jnp.asarray(v) for k, v in base.items()}


_sample = jax.jit(sampler.sample, static_argnums=3)


def draw(logits, state=None, **over):
    s = logits.shape[0]
    state = state or sampler.init_penalty_state(2, logits.shape[1])
    return jax.device_get(_sample(jnp.asarray(logits, jnp.float32), state, knobs(s, **over), 4))


@pytest.fixture
def logits():
    return np.random.default_rng(0).normal(size=(64, VOCAB)).astype(np.float32) * 2


def test_temperature_zero_is_argmax(logits):
    out = draw(logits, temperature=0.0)
    np.testing.assert_array_equal(out["tokens"], logits.argmax(-1))


def test_top_k_1_equals_greedy(logits):
    out = draw(logits, temperature=1.0, top_k=1, seed=np.arange(64))
    np.testing.assert_array_equal(out["tokens"], logits.argmax(-1))


def test_same_seed_same_tokens_and_other_seed_other_tokens(logits):
    a = draw(logits, seed=np.full(64, 5), rng_pos=np.arange(64))
    b = draw(logits, seed=np.full(64, 5), rng_pos=np.arange(64))
    c = draw(logits, seed=np.full(64, 6), rng_pos=np.arange(64))
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
    assert (a["tokens"] != c["tokens"]).any()


def test_top_p_keeps_only_the_nucleus():
    row = np.log(np.array([0.5, 0.3, 0.1, 0.05, 0.05] + [1e-6] * 7, np.float32))
    logits = np.tile(row, (256, 1))
    out = draw(logits, top_p=0.75, seed=np.arange(256))
    assert set(out["tokens"].tolist()) == {0, 1}  # 0.5 + 0.3 covers 0.75


def test_top_k_and_min_p_cut_the_tail():
    row = np.log(np.array([0.4, 0.3, 0.2, 0.1] + [1e-3] * 8, np.float32))
    logits = np.tile(row, (256, 1))
    assert set(draw(logits, top_k=2, seed=np.arange(256))["tokens"].tolist()) == {0, 1}
    # min_p 0.4: keep tokens with p >= 0.4 * 0.4 = 0.16
    assert set(draw(logits, min_p=0.4, seed=np.arange(256))["tokens"].tolist()) == {0, 1, 2}


def test_temperature_one_samples_the_softmax_distribution():
    """Chi-square goodness of fit on 20000 draws; the threshold is the 0.999 quantile (df=11)."""
    rng = np.random.default_rng(1)
    row = rng.normal(size=VOCAB).astype(np.float32)
    n = 20000
    logits = np.tile(row, (n, 1))
    out = draw(logits, seed=np.arange(n), rng_pos=np.zeros(n))
    counts = np.bincount(out["tokens"], minlength=VOCAB)
    p = np.exp(row - row.max())
    p /= p.sum()
    chi2 = ((counts - n * p) ** 2 / (n * p)).sum()
    assert chi2 < 31.26, (chi2, counts, n * p)
    # and a wrong distribution (temperature 2) is rejected by the same test
    hot = draw(logits, temperature=2.0, seed=np.arange(n))
    counts_hot = np.bincount(hot["tokens"], minlength=VOCAB)
    assert ((counts_hot - n * p) ** 2 / (n * p)).sum() > 31.26


def test_logprobs_are_of_the_raw_distribution(logits):
    out = draw(logits, temperature=0.0)
    ref = jax.nn.log_softmax(logits, axis=-1)
    np.testing.assert_allclose(out["logprob"], np.take_along_axis(np.asarray(ref), out["tokens"][:, None], 1)[:, 0],
                               rtol=1e-5)
    assert (out["rank"] == 1).all()
    np.testing.assert_allclose(out["top_logprobs"][:, 0], np.asarray(ref).max(-1), rtol=1e-5)


def test_penalties_follow_the_history_loaded_into_a_slot():
    state = sampler.init_penalty_state(2, VOCAB)
    tokens = np.full(16, -1, np.int32)
    tokens[:4] = [3, 3, 5, 7]  # prompt 3,3 ; output 5,7
    state = sampler.load_history(state, jnp.int32(1), jnp.asarray(tokens), jnp.int32(2))
    np.testing.assert_array_equal(np.asarray(state["prompt_mask"][1]).nonzero()[0], [3])
    np.testing.assert_array_equal(np.asarray(state["counts"][1]).nonzero()[0], [5, 7])
    logits = np.zeros((1, VOCAB), np.float32)
    logits[0, [3, 5, 7, 9]] = [2.0, 2.0, 2.0, 1.9]
    # repetition penalty divides positive logits of seen tokens (prompt and output): 9 wins
    out = draw(logits, state, temperature=0.0, repetition_penalty=1.2, penalty_slot=1, use_penalty=True)
    assert out["tokens"][0] == 9
    # presence penalty only hits output tokens: prompt token 3 wins
    out = draw(logits, state, temperature=0.0, presence_penalty=0.5, penalty_slot=1, use_penalty=True)
    assert out["tokens"][0] == 3
    # the same logits without penalties: the first maximum
    assert draw(logits, state, temperature=0.0)["tokens"][0] == 3


def test_filter_mode_is_full_mode_without_the_logprobs(logits):
    """FILTER (penalties and filters, no rank or top-n) samples exactly what FULL samples on rows
    with top-k/top-p/min-p and penalties, and its program holds no top-k over the vocabulary
    (the dearest part of FULL on a GPU); FULL's does."""
    s = logits.shape[0]
    temps = np.where(np.arange(s) % 2 == 0, 0.0, 0.8).astype(np.float32)
    k = knobs(s, temperature=temps, seed=np.arange(s), rng_pos=np.arange(s),
              top_k=np.where(np.arange(s) % 3 == 0, 5, 0), top_p=np.where(np.arange(s) % 3 == 1, 0.7, 1.0),
              min_p=np.where(np.arange(s) == 2, 0.05, 0.0), repetition_penalty=np.where(np.arange(s) == 5, 1.5, 1.0),
              use_penalty=np.arange(s) == 5)
    state = sampler.init_penalty_state(8, logits.shape[1])
    state = sampler.count_sampled(state, jnp.arange(s) % 8, jnp.arange(s) % 7, jnp.ones(s, bool))
    x = jnp.asarray(logits)
    run = lambda lp: jax.jit(lambda l, st, kk: sampler.sample(l, st, kk, 4, full=True, logprobs=lp,  # noqa: E731
                                                              filter_impl="search"))
    filt, full = jax.device_get(run(False)(x, state, k)), jax.device_get(run(True)(x, state, k))
    for key in ("tokens", "logprob"):
        np.testing.assert_array_equal(filt[key], full[key])
    assert (filt["rank"] == 0).all() and (filt["top_ids"] == 0).all() and (filt["top_logprobs"] == 0).all()
    assert (full["rank"] >= 1).all() and (full["top_ids"] != 0).any()
    assert "top_k" not in run(False).lower(x, state, k).as_text()
    assert "top_k" in run(True).lower(x, state, k).as_text()


@pytest.mark.parametrize("full", [False, True])
def test_branches_give_the_same_tokens_and_skip_the_noise_of_an_all_greedy_batch(logits, full):
    """branches=True (the CPU's sampler) samples exactly what the branch-free one does, greedy
    rows beside sampled ones or alone; its program holds the branch."""
    s = logits.shape[0]
    state = sampler.init_penalty_state(2, logits.shape[1])
    x = jnp.asarray(logits)
    run = lambda b: jax.jit(lambda l, st, kk: sampler.sample(l, st, kk, 4, full=full, branches=b))  # noqa: E731
    for temps in (np.where(np.arange(s) % 3 == 0, 0.0, 0.9), np.zeros(s)):
        k = knobs(s, temperature=temps.astype(np.float32), seed=np.arange(s), rng_pos=np.arange(s))
        want, got = jax.device_get(run(False)(x, state, k)), jax.device_get(run(True)(x, state, k))
        for key in ("tokens", "logprob", "rank"):
            np.testing.assert_array_equal(got[key], want[key])
        assert (want["tokens"][temps == 0] == logits[temps == 0].argmax(-1)).all()
    k = knobs(s)
    assert "stablehlo.case" in run(True).lower(x, state, k).as_text()
    assert "stablehlo.case" not in run(False).lower(x, state, k).as_text()


def test_mode_for_picks_the_lowest_mode_a_request_needs():
    from jaxengine import SamplingParams
    assert sampler.PLAIN < sampler.FILTER < sampler.FULL and sampler.MODES == (0, 1, 2)
    assert sampler.mode_for(SamplingParams(temperature=0.7), False) == sampler.PLAIN
    assert sampler.mode_for(SamplingParams(temperature=0.7), True) == sampler.FILTER  # penalties
    for p in (SamplingParams(top_p=0.9), SamplingParams(top_k=3), SamplingParams(min_p=0.1)):
        assert sampler.mode_for(p, False) == sampler.FILTER
    assert sampler.mode_for(SamplingParams(logprobs=0), False) == sampler.FULL
    assert sampler.mode_for(SamplingParams(top_p=0.5, logprobs=3), True) == sampler.FULL


def test_sampled_tokens_are_counted_for_frequency_penalty():
    state = sampler.init_penalty_state(3, VOCAB)
    state = sampler.count_sampled(state, jnp.array([1, 2]), jnp.array([4, 4]), jnp.array([True, False]))
    assert int(state["counts"][1, 4]) == 1 and int(state["counts"][2, 4]) == 0


def test_plain_mode_equals_full_mode_on_rows_without_filters_or_penalties(logits):
    """The PLAIN sampler (no penalties, filters or top-k logprobs) is the FULL one for such rows,
    and FULL leaves a row that asks for nothing exactly as PLAIN would, next to one that does."""
    s = logits.shape[0]
    temps = np.where(np.arange(s) % 2 == 0, 0.0, 0.8).astype(np.float32)
    k = knobs(s, temperature=temps, seed=np.arange(s), rng_pos=np.arange(s))
    state = sampler.init_penalty_state(2, logits.shape[1])
    x = jnp.asarray(logits)
    plain = jax.device_get(jax.jit(lambda l, st, kk: sampler.sample(l, st, kk, 4, full=False))(x, state, k))
    full = jax.device_get(_sample(x, state, k, 4))
    for key in ("tokens", "logprob"):
        np.testing.assert_array_equal(plain[key], full[key])
    # the rank is reported with logprobs only (FULL); PLAIN leaves it out
    assert (plain["rank"] == 0).all() and (full["rank"] >= 1).all()
    ref = np.asarray(jax.nn.log_softmax(x, axis=-1))
    want_rank = (ref > np.take_along_axis(ref, full["tokens"][:, None], 1)).sum(-1) + 1
    np.testing.assert_array_equal(full["rank"], want_rank)
    # one row with top_k=1 and a penalty beside the others: only that row may change
    mixed = knobs(s, temperature=temps, seed=np.arange(s), rng_pos=np.arange(s),
                  top_k=np.where(np.arange(s) == 3, 1, 0), repetition_penalty=np.where(np.arange(s) == 5, 1.5, 1.0),
                  use_penalty=np.arange(s) == 5)
    out = jax.device_get(_sample(x, state, mixed, 4))
    others = np.ones(s, bool)
    others[[3, 5]] = False
    np.testing.assert_array_equal(out["tokens"][others], plain["tokens"][others])
    assert out["tokens"][3] == logits[3].argmax()


def _filter_rows(seed: int, rows: int, vocab: int):
    """Random rows with what trips a threshold search: ties (values on a 0.5 grid), -inf tails,
    and the knobs' edges (top_k 0, 1, >= vocab; top_p 1, tiny)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, vocab)).astype(np.float32) * rng.uniform(0.3, 8)
    if seed % 3 == 0:
        x = np.round(x * 2) / 2
    if seed % 5 == 1:
        x[:, : vocab // 3] = -np.inf
    knob = {"top_k": jnp.asarray(rng.choice([0, 1, 5, 50, vocab - 1, vocab, 2 * vocab], rows), jnp.int32),
            "top_p": jnp.asarray(rng.choice([1.0, 0.95, 0.9, 0.5, 0.1, 0.999, 1e-4], rows), jnp.float32),
            "min_p": jnp.zeros(rows, jnp.float32)}
    return jnp.asarray(x), knob


@pytest.mark.parametrize("seed", range(12))
def test_threshold_search_keeps_exactly_the_sorted_filters_tokens(seed):
    """The sort-free top-k/top-p (filter "search": a 16-way search over the floats' order) keeps
    the same tokens as the sorted cumulative sum, ties and -inf included."""
    x, knob = _filter_rows(seed, 8, 300 if seed % 2 else 1000)
    want = np.asarray(jax.jit(sampler._keep_sort)(x, knob))
    got = np.asarray(jax.jit(sampler._keep_search)(x, knob))
    np.testing.assert_array_equal(got, want)
    # and the filter is not vacuous: rows with a top-k below the vocabulary or a top-p below 1 cut
    cut = (np.asarray(knob["top_k"]) == 1) | (np.asarray(knob["top_p"]) <= 0.5)
    assert (got[cut].sum(-1) < x.shape[1]).all()


@pytest.mark.parametrize("ways", [2, 4, 8])
def test_threshold_search_with_fewer_ways_keeps_the_same_tokens(ways):
    """$JAXENGINE_SAMPLER_SEARCH_WAYS: fewer pivots a pass, more passes (32 / log2(ways)), the
    same exact thresholds as the sort (and the 16-way default)."""
    for seed in (0, 1, 3, 6):  # ties, -inf tails, both vocab sizes
        x, knob = _filter_rows(seed, 8, 300 if seed % 2 else 1000)
        want = np.asarray(jax.jit(sampler._keep_sort)(x, knob))
        got = np.asarray(jax.jit(lambda x, k: sampler._keep_search(x, k, ways))(x, knob))
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("ways", [16, 4])
def test_threshold_search_with_a_variadic_reduction_keeps_the_same_tokens(ways):
    """$JAXENGINE_SAMPLER_SEARCH_REDUCE=variadic: each pass's pivot sums as one lax.reduce with an
    accumulator per pivot; the same exact thresholds as the sort."""
    for seed in range(6):
        x, knob = _filter_rows(seed, 8, 300 if seed % 2 else 1000)
        want = np.asarray(jax.jit(sampler._keep_sort)(x, knob))
        got = np.asarray(jax.jit(lambda x, k: sampler._keep_search(x, k, ways, "variadic"))(x, knob))
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("name,read,default,given,want,bad", [
    ("JAXENGINE_SAMPLER_SEARCH_WAYS", "search_ways", 16, "4", 4, ("3", "32", "four")),
    ("JAXENGINE_SAMPLER_SEARCH_REDUCE", "search_reduce", "broadcast", "Variadic", "variadic", ("tree",)),
])
def test_search_settings_are_checked(monkeypatch, name, read, default, given, want, bad):
    read = getattr(sampler, read)
    monkeypatch.delenv(name, raising=False)
    assert read() == default
    monkeypatch.setenv(name, given)
    assert read() == want
    for value in bad:
        monkeypatch.setenv(name, value)
        with pytest.raises(ValueError, match=name):
            read()


def test_search_helpers_reject_unknown_arguments():
    with pytest.raises(ValueError, match="reduce"):
        sampler._pivot_sums(lambda p, ex: ex(jnp.zeros((1, 4))) > p, jnp.zeros((1, 3)), "tree")
    with pytest.raises(ValueError, match="ways"):
        sampler._largest_true(lambda p: p > 0, jnp.zeros(1, jnp.uint32), jnp.ones(1, jnp.uint32), 3)


def test_threshold_search_on_one_row_by_hand():
    """top_k 3 of [4, 3, 3, 3, 1, 0] keeps the value 3's ties (the threshold is a value); top_p 0.6
    of [log 0.5, log 0.3, log 0.2]: the mass above the 0.3 token is 0.5 < 0.6, above 0.2 it is 0.8."""
    x = jnp.asarray([[4.0, 3.0, 3.0, 3.0, 1.0, 0.0], list(np.log([0.5, 0.3, 0.2])) + [-np.inf] * 3], jnp.float32)
    knob = {"top_k": jnp.asarray([3, 0], jnp.int32), "top_p": jnp.asarray([1.0, 0.6], jnp.float32)}
    for keep in (sampler._keep_search, sampler._keep_sort):
        np.testing.assert_array_equal(np.asarray(keep(x, knob)),
                                      [[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]])


def test_full_sampler_gives_the_same_tokens_with_either_filter(logits):
    knob = knobs(64, top_k=np.arange(64) % 7, top_p=np.linspace(0.2, 1.0, 64), seed=np.arange(64))
    state = sampler.init_penalty_state(2, VOCAB)
    out = {impl: jax.device_get(jax.jit(lambda l, st, k, impl=impl: sampler.sample(l, st, k, 4, filter_impl=impl))(
        jnp.asarray(logits), state, knob)) for impl in sampler.FILTER_IMPLS}
    np.testing.assert_array_equal(out["search"]["tokens"], out["sort"]["tokens"])
    np.testing.assert_array_equal(out["candidates"]["tokens"], out["sort"]["tokens"])
    with pytest.raises(ValueError, match="filter impl"):
        sampler.sample(jnp.asarray(logits), state, knob, 4, filter_impl="bogus")


def test_sampler_filter_setting_is_checked():
    from jaxengine.config import RunnerConfig
    assert RunnerConfig(sampler_filter="sort").sampler_filter == "sort"
    assert RunnerConfig().sampler_filter == "auto"  # candidates on CPU, search on GPU/TPU
    assert sampler.resolve_filter_impl("auto", "cpu") == "candidates"
    assert sampler.resolve_filter_impl("auto", "gpu") == "search" == sampler.resolve_filter_impl("auto", "tpu")
    assert sampler.resolve_filter_impl("sort", "cpu") == "sort"
    with pytest.raises(ValueError, match="sampler_filter"):
        RunnerConfig(sampler_filter="heap")
    with pytest.raises(ValueError, match="filter impl"):
        sampler.resolve_filter_impl("heap", "cpu")


@pytest.mark.parametrize("seed", range(12))
def test_candidates_keep_exactly_the_sorted_filters_tokens_where_they_say_so(seed):
    """The "candidates" filter (each row's n largest values) keeps the sorted cumulative sum's
    tokens on every row it calls exact (ties and -inf included), calls rows exact and inexact in
    the cases it should, and through its fallback the whole filter equals the sort's."""
    vocab = 300 if seed % 2 else 1000
    x, knob = _filter_rows(seed, 8, vocab)
    if seed % 4 == 2:  # a trained model's rows: a few tokens hold most of the mass
        x = x.at[:, :5].add(25.0)
    n = 16
    want = np.asarray(jax.jit(sampler._keep_sort)(x, knob))
    got, ok = (np.asarray(a) for a in jax.jit(lambda x, k: sampler._keep_candidates(x, k, n))(x, knob))
    np.testing.assert_array_equal(got[ok], want[ok])
    k, p = np.asarray(knob["top_k"]), np.asarray(knob["top_p"])
    k = np.where(k > 0, np.minimum(k, vocab), vocab)
    assert ok[k <= n].all() and not ok[(k > n) & (k < vocab)].any()
    assert ok[(k >= vocab) & (p >= 1.0)].all()
    if seed % 4 == 2:  # the nucleus lies within the 16 candidates
        assert ok[(k >= vocab) & (p <= 0.999)].all()
    full = jax.jit(lambda x, k: sampler._filter(x, k, "candidates"))(x, {**knob, "min_p": jnp.zeros(8)})
    ref = jax.jit(lambda x, k: sampler._filter(x, k, "sort"))(x, {**knob, "min_p": jnp.zeros(8)})
    np.testing.assert_array_equal(np.isfinite(np.asarray(full)), np.isfinite(np.asarray(ref)))


def test_candidates_call_a_flat_row_without_top_k_inexact():
    """Without top_k, a row whose top_p nucleus reaches past the candidates (a flat
    distribution) is not exact: the fallback must run."""
    x = jnp.zeros((2, 64), jnp.float32).at[1, :3].set(30.0)
    knob = {"top_k": jnp.zeros(2, jnp.int32), "top_p": jnp.full(2, 0.9, jnp.float32)}
    keep, ok = sampler._keep_candidates(x, knob, 16)
    assert list(np.asarray(ok)) == [False, True]
    np.testing.assert_array_equal(np.asarray(keep)[1], np.arange(64) < 3)
    np.testing.assert_array_equal(np.asarray(sampler._filter(x, {**knob, "min_p": jnp.zeros(2)}, "candidates"))[0] > -1,
                                  np.asarray(sampler._keep_sort(x, knob))[0])


@pytest.mark.parametrize("n", [3, 16, 17, 20, 40])
def test_top_n_in_chunks_equals_lax_top_k(n):
    """$JAXENGINE_SAMPLER_TOPN=chunks: rounds of at most 16 give lax.top_k's ids and values,
    ties (lower index first) included."""
    rng = np.random.default_rng(n)
    x = rng.normal(size=(5, 300)).astype(np.float32)
    x[1, ::7] = 2.5  # a tie across the chunk boundary
    x[2, :] = np.round(x[2, :], 1)  # many ties
    x[3, 50:90] = x[3].max()  # more tied maxima than one round takes
    want_v, want_i = jax.lax.top_k(jnp.asarray(x), n)
    got_v, got_i = jax.jit(lambda a: sampler.top_n(a, n, "chunks"))(jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(got_i), np.asarray(want_i))
    np.testing.assert_array_equal(np.asarray(got_v), np.asarray(want_v))
    with pytest.raises(ValueError, match="top-n impl"):
        sampler.top_n(jnp.asarray(x), n, "heap")


def test_full_sampler_logprobs_are_the_same_with_top_n_in_chunks(monkeypatch):
    vocab = 64  # more than 20 top logprobs, so two rounds
    logits = np.random.default_rng(3).normal(size=(4, vocab)).astype(np.float32)
    knob = knobs(4, top_k=np.array([0, 5, 0, 2]), top_p=np.array([1.0, 0.9, 0.5, 1.0]), seed=np.arange(4))
    state = sampler.init_penalty_state(2, vocab)
    out = {}
    for impl in ("top_k", "chunks"):
        monkeypatch.setenv("JAXENGINE_SAMPLER_TOPN", impl)
        out[impl] = jax.device_get(jax.jit(lambda l, st, k: sampler.sample(l, st, k, 20))(
            jnp.asarray(logits), state, knob))
    for field in ("tokens", "top_ids", "top_logprobs", "logprob", "rank"):
        np.testing.assert_array_equal(out["chunks"][field], out["top_k"][field])
