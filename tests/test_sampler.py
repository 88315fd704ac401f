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
