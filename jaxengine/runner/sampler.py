"""On-device sampling.  Every per-request knob is an array in the batch, so no value recompiles.

Order (as vLLM): penalties -> (greedy: argmax) | temperature -> top-k -> top-p -> min-p -> sample.
Sampling is Gumbel-max with a key per row folded from (request seed, position of the new token),
so a request's sampled text depends only on its seed, never on the batch around it.
Logprobs are of the model's raw distribution (before penalties and temperature), as vLLM returns.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from ..pallas_kernels.env import check_choice, env_choice

_EPS = 1e-5

# Sampling modes, one compiled sampler each (static; chosen on the host per step), each a superset
# of the one before, so a batch runs the highest mode any of its rows needs:
# PLAIN: greedy / temperature only.  FILTER: also penalties and top-k/top-p/min-p.  FULL: also
# the sampled token's rank and the top-n logprobs (each applied only to the rows that ask for it).
# FILTER exists because the top-n is the dearest part of FULL where nobody asked for logprobs
# (H200, 128k vocabulary, b64: a segmented sort of every row, 0.98 of the FULL sampler's 1.81 ms;
# BENCHMARKS.md fourteenth session), and top_p without logprobs is the usual chat request.
PLAIN, FILTER, FULL = 0, 1, 2
MODES = (PLAIN, FILTER, FULL)


def mode_for(p, penalties: bool) -> int:
    """The lowest sampler mode a request with SamplingParams p (which uses penalties, or not) needs."""
    if p.logprobs is not None:
        return FULL
    if penalties or p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0.0:
        return FILTER
    return PLAIN


def init_penalty_state(num_slots: int, vocab_size: int) -> dict[str, jax.Array]:
    return {"counts": jnp.zeros((num_slots, vocab_size), jnp.int32),
            "prompt_mask": jnp.zeros((num_slots, vocab_size), jnp.bool_)}


def load_history(state: dict[str, jax.Array], slot: jax.Array, tokens: jax.Array,
                 prompt_len: jax.Array) -> dict[str, jax.Array]:
    """(Re)initialise one slot from a request's token history (padded with -1)."""
    vocab = state["counts"].shape[1]
    idx = jnp.arange(tokens.shape[0])
    valid = tokens >= 0
    safe = jnp.where(valid, tokens, vocab)  # out of range: dropped
    prompt_row = jnp.zeros((vocab,), jnp.bool_).at[jnp.where(idx < prompt_len, safe, vocab)].set(
        True, mode="drop")
    count_row = jnp.zeros((vocab,), jnp.int32).at[jnp.where(idx >= prompt_len, safe, vocab)].add(
        1, mode="drop")
    return {**state, "counts": state["counts"].at[slot].set(count_row),
            "prompt_mask": state["prompt_mask"].at[slot].set(prompt_row)}


def apply_penalties(logits: jax.Array, state: dict[str, jax.Array], s: dict[str, jax.Array]) -> jax.Array:
    counts = state["counts"][s["penalty_slot"]]  # [num_seqs, vocab]
    seen = (counts > 0) | state["prompt_mask"][s["penalty_slot"]]
    rep = s["repetition_penalty"][:, None]
    logits = jnp.where(seen, jnp.where(logits > 0, logits / rep, logits * rep), logits)
    logits = logits - s["frequency_penalty"][:, None] * counts
    logits = logits - s["presence_penalty"][:, None] * (counts > 0)
    return logits


# How top-k / top-p find their thresholds: "sort" sorts each row (two [rows, vocab] sorts in the
# FULL sampler with the logprobs' top-k; H200, twelfth session: FULL 0.56 ms a call at batch 1 and
# 2.19 ms at batch 64, PLAIN 0.06-0.09); "search" finds the same thresholds by a 16-way search over
# the floats' order, 8 passes of 15 pivots for each threshold (_keep_search); "candidates" takes
# them from each row's CANDIDATES largest values (one lax.top_k) where the kept tokens lie within
# them, as they do for a trained model's top_p, and falls back to "sort" through a lax.cond
# otherwise (_keep_candidates).  "auto": candidates on CPU, where the sort and the search cost
# tens of ms a step and the top_k ~2 ms (8 rows of 49,152, this 2-core machine), search elsewhere
# (an XLA:GPU conditional reads its predicate back to the host, and top_k beyond 16 sorts there).
# RunnerConfig.sampler_filter / $JAXENGINE_SAMPLER_FILTER picks one.
FILTER_IMPLS = ("sort", "search", "candidates")
CANDIDATES = 256


def resolve_filter_impl(impl: str, backend: str) -> str:
    """RunnerConfig.sampler_filter for a backend: "auto" picks candidates on CPU, search elsewhere."""
    if impl == "auto":
        return "candidates" if backend == "cpu" else "search"
    if impl not in FILTER_IMPLS:
        raise ValueError(f"filter impl must be auto or one of {', '.join(FILTER_IMPLS)}; got {impl!r}")
    return impl


def _filter(logits: jax.Array, s: dict[str, jax.Array], impl: str = "sort") -> jax.Array:
    """top-k then top-p then min-p, on temperature-scaled logits."""
    if impl not in FILTER_IMPLS:
        raise ValueError(f"filter impl must be one of {', '.join(FILTER_IMPLS)}; got {impl!r}")
    if impl == "candidates":
        keep, ok = _keep_candidates(logits, s)
        keep = jax.lax.cond(jnp.all(ok), lambda: keep, lambda: _keep_sort(logits, s))
    else:
        keep = _keep_search(logits, s) if impl == "search" else _keep_sort(logits, s)
    logits = jnp.where(keep, logits, -jnp.inf)
    # min-p: drop tokens whose probability is below min_p times the top probability
    log_max = jnp.max(logits, axis=-1, keepdims=True)
    min_p_cut = log_max + jnp.log(jnp.maximum(s["min_p"][:, None], 1e-30))
    return jnp.where((s["min_p"][:, None] > 0) & (logits < min_p_cut), -jnp.inf, logits)


def _keep_candidates(logits: jax.Array, s: dict[str, jax.Array],
                     n: int = CANDIDATES) -> tuple[jax.Array, jax.Array]:
    """_keep_sort's tokens from each row's n largest values, and per row whether they are exact:
    when top_k <= n (the top-k and its top-p prefix lie within the n), or without top_k when
    top_p is off or the n's mass reaches top_p (the kept prefix ends within them).  A top_k
    above n needs the k-th value: not exact."""
    vocab = logits.shape[-1]
    n = min(n, vocab)
    vals = jax.lax.top_k(logits, n)[0]  # [rows, n], descending: _keep_sort's first n sorted values
    k = jnp.where(s["top_k"] > 0, jnp.minimum(s["top_k"], vocab), vocab)
    in_k = jnp.arange(n)[None, :] < k[:, None]
    kth = jnp.take_along_axis(vals, (jnp.minimum(k, n) - 1)[:, None], axis=-1)
    kth = jnp.where(k[:, None] >= vocab, -jnp.inf, kth)  # no top_k: every token passes it
    # the top-k's softmax over the candidates (k <= n) or the whole row (no top_k)
    # the row's max again, not vals[:, :1]: XLA:CPU fused the top_k into the [rows, vocab]
    # exp-sum below and ran it for every element (42 ms instead of 2 for 8 rows of 49,152)
    m = jnp.max(logits, axis=-1, keepdims=True)
    e = jnp.where(in_k, jnp.exp(vals - m), 0.0)
    z = jnp.where(k >= vocab, jnp.sum(jnp.exp(logits - m), axis=-1), jnp.sum(e, axis=-1))
    probs = e / z[:, None]
    cum = jnp.cumsum(probs, axis=-1)
    top_p = s["top_p"][:, None]
    keep = ((cum - probs < top_p) | (top_p >= 1.0)) & in_k
    p_thresh = jnp.min(jnp.where(keep, vals, jnp.inf), axis=-1, keepdims=True)
    p_thresh = jnp.where(top_p >= 1.0, -jnp.inf, p_thresh)  # top_p 1: off (as _keep_sort)
    ok = (k <= n) | ((k >= vocab) & ((s["top_p"] >= 1.0) | (cum[:, -1] >= s["top_p"])))
    return logits >= jnp.maximum(kth, p_thresh), ok


def _keep_sort(logits: jax.Array, s: dict[str, jax.Array]) -> jax.Array:
    """top-k then top-p by sorting each row: which tokens stay."""
    vocab = logits.shape[-1]
    sorted_desc = -jnp.sort(-logits, axis=-1)  # [num_seqs, vocab]
    k = jnp.where(s["top_k"] > 0, jnp.minimum(s["top_k"], vocab), vocab)
    kth = jnp.take_along_axis(sorted_desc, (k - 1)[:, None], axis=-1)
    rank = jnp.arange(vocab)[None, :]
    sorted_desc = jnp.where(rank < k[:, None], sorted_desc, -jnp.inf)
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each token
    keep = (before < s["top_p"][:, None]) | (s["top_p"][:, None] >= 1.0)  # 1: off (rounding must not cut the tail)
    # the smallest kept logit is the threshold (rank 0 is always kept)
    p_thresh = jnp.min(jnp.where(keep, sorted_desc, jnp.inf), axis=-1, keepdims=True)
    return logits >= jnp.maximum(kth, p_thresh)


def _order_key(x: jax.Array) -> jax.Array:
    """uint32 keys in the order of the float32 values (-0.0 taken as +0.0; no NaNs)."""
    bits = jax.lax.bitcast_convert_type(jnp.where(x == 0, 0.0, x).astype(jnp.float32), jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))


def _key_value(key: jax.Array) -> jax.Array:
    bits = jnp.where(key >> 31 == 1, key ^ jnp.uint32(0x80000000), ~key)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


# Ways of the threshold search: 16 (8 passes of 15 pivots) by default.  On the H200 (fifteenth
# session) XLA:GPU's reduction of the [rows, 15, vocab] compare reads the row once per pivot, ~3 us
# a pivot at batch 64 (the count pass 45 us, the mass pass 26 us: 0.57 of the FILTER sampler's
# 0.81 ms), so fewer pivots a pass may win at big batches: 4 ways = 16 passes of 3 pivots (48
# reads of the row instead of 120, twice the launches).  Not yet measured:
# $JAXENGINE_SAMPLER_SEARCH_WAYS (2, 4, 8 or 16) picks it at trace time.
SEARCH_WAYS = (2, 4, 8, 16)


def search_ways() -> int:
    return int(env_choice("JAXENGINE_SAMPLER_SEARCH_WAYS", tuple(str(w) for w in SEARCH_WAYS), "16"))


def _largest_true(pred, lo: jax.Array, hi: jax.Array, ways: int = 16) -> jax.Array:
    """Per row, the largest key u in [lo, hi] with pred(u), for a pred that holds up to some key
    and not after it, taken to hold at lo (lo comes back where it holds nowhere above).  Each pass
    evaluates pred at ways - 1 pivots splitting the range in `ways` (one XLA reduction, [rows,
    ways - 1, vocab] over its last axis), shrinking hi - lo to at most (hi - lo) // ways: 32 /
    log2(ways) passes end on the exact key of a 32-bit range.  The passes are unrolled: one fused
    program with no loop thunk between passes."""
    if ways not in SEARCH_WAYS:
        raise ValueError(f"ways must be one of {SEARCH_WAYS}; got {ways}")
    j = jnp.arange(1, ways, dtype=jnp.uint32)[None, :]
    for _ in range(32 // (ways.bit_length() - 1)):
        step = (hi - lo) // ways + 1
        piv = lo[:, None] + step[:, None] * j  # [rows, ways - 1]; at most hi + ways - 1: no wrap for float keys
        ok = pred(piv) & (piv <= hi[:, None])
        n = jnp.sum(ok, axis=-1).astype(jnp.uint32)  # pivots that hold: a prefix
        lo, hi = lo + step * n, jnp.where(n < ways - 1, jnp.minimum(lo + step * (n + 1) - 1, hi), hi)
    return lo


# How a pass sums over the vocabulary for its pivots: "broadcast" (default) reduces a [rows,
# pivots, vocab] array over its last axis, which XLA:GPU runs as one row reduction per (row,
# pivot), reading the row once per pivot (H200, fifteenth session); "variadic" is one lax.reduce
# with an accumulator per pivot, which XLA can emit as one loop over the row.  Not yet measured:
# $JAXENGINE_SAMPLER_SEARCH_REDUCE picks it at trace time (gpu_suite.sh absearch).
SEARCH_REDUCES = ("broadcast", "variadic")


def search_reduce() -> str:
    return env_choice("JAXENGINE_SAMPLER_SEARCH_REDUCE", SEARCH_REDUCES, "broadcast")


def _pivot_sums(per_element, piv: jax.Array, reduce: str) -> jax.Array:
    """[rows, pivots]: for each pivot column p of piv, the sum over the vocabulary of
    per_element(p, ex), where ex lays a [rows, vocab] array out against p (p is [rows, pivots, 1]
    with ex adding a pivot axis, or [rows, 1] with ex the identity)."""
    if check_choice("reduce", reduce, SEARCH_REDUCES) == "broadcast":
        return jnp.sum(per_element(piv[:, :, None], lambda a: a[:, None, :]), axis=-1)
    ops = tuple(per_element(piv[:, j:j + 1], lambda a: a) for j in range(piv.shape[1]))
    sums = jax.lax.reduce(ops, tuple(jnp.zeros((), o.dtype) for o in ops),
                          lambda acc, x: tuple(a + b for a, b in zip(acc, x)), (1,))
    return jnp.stack(sums, axis=-1)


def _keep_search(logits: jax.Array, s: dict[str, jax.Array], ways: int | None = None,
                 reduce: str | None = None) -> jax.Array:
    """_keep_sort's tokens without sorting: the k-th largest value is the largest v with
    count(x >= v) >= k, and the top-p threshold the smallest top-k value v whose mass above
    (strictly greater values, over the top-k's softmax) is below top_p, as the sorted cumulative
    sum puts it.  Both by _largest_true over the floats' order keys (ways: search_ways(); reduce:
    search_reduce())."""
    ways = search_ways() if ways is None else ways
    reduce = search_reduce() if reduce is None else reduce
    vocab = logits.shape[-1]
    key = _order_key(logits)
    lo, hi = jnp.min(key, axis=-1), jnp.max(key, axis=-1)
    k = jnp.where(s["top_k"] > 0, jnp.minimum(s["top_k"], vocab), vocab)
    kth_key = _largest_true(
        lambda piv: _pivot_sums(lambda p, ex: (ex(key) >= p).astype(jnp.int32), piv, reduce) >= k[:, None],
        lo, hi, ways)
    # the top-k's softmax normaliser: values above the k-th, and the k-th's ties up to k entries
    m = jnp.max(logits, axis=-1, keepdims=True)
    e = jnp.exp(logits - m)
    above = key > kth_key[:, None]
    kth_e = jnp.exp(_key_value(kth_key) - m[:, 0])
    z = jnp.sum(jnp.where(above, e, 0.0), axis=-1) + (k - jnp.sum(above, axis=-1)) * kth_e
    target = s["top_p"] * z

    def mass_above_reaches(piv):  # sum of e over keys > piv >= top_p * z
        mass = _pivot_sums(lambda p, ex: jnp.where(ex(key) > p, ex(e), 0.0), piv, reduce)
        return mass >= target[:, None]

    # the largest u whose mass above still reaches top_p: the threshold is the next key up
    p_key = _largest_true(mass_above_reaches, kth_key - 1, hi, ways) + 1
    p_key = jnp.where(s["top_p"] >= 1.0, kth_key, p_key)  # top_p 1: off (as _keep_sort)
    return key >= jnp.maximum(kth_key, p_key)[:, None]


# XLA:GPU replaces lax.top_k by its TopK kernel (one pass over the row) only for k <= 16; the
# logprobs' top-n (max_logprobs, 20 by default) may otherwise become a sort of the vocabulary.
# $JAXENGINE_SAMPLER_TOPN=chunks takes the top-n in rounds of at most 16 (each round's winners
# masked to -inf for the next), the same ids and values as one lax.top_k for finite logits;
# "top_k" (default) is one lax.top_k.  Not yet measured on a GPU (gpu_suite.sh samplerprof).
TOPN_CHUNK = 16


def top_n(x: jax.Array, n: int, impl: str | None = None) -> tuple[jax.Array, jax.Array]:
    """lax.top_k(x, n) over the last axis of a [rows, vocab] array of finite values."""
    impl = os.environ.get("JAXENGINE_SAMPLER_TOPN", "top_k").strip().lower() if impl is None else impl
    if impl not in ("top_k", "chunks"):
        raise ValueError(f"top-n impl must be top_k or chunks; got {impl!r}")
    if impl == "top_k" or n <= TOPN_CHUNK:
        return jax.lax.top_k(x, n)
    values, ids = [], []
    rows = jnp.arange(x.shape[0])[:, None]
    while n > 0:
        v, i = jax.lax.top_k(x, min(TOPN_CHUNK, n))
        values.append(v)
        ids.append(i)
        n -= v.shape[-1]
        if n > 0:
            x = x.at[rows, i].set(-jnp.inf)
    return jnp.concatenate(values, axis=-1), jnp.concatenate(ids, axis=-1)


def sample(logits: jax.Array, state: dict[str, jax.Array], s: dict[str, jax.Array],
           num_logprobs: int, *, full: bool = True, logprobs: bool | None = None,
           filter_impl: str = "sort", branches: bool = False) -> dict[str, jax.Array]:
    """logits: [num_seqs, vocab] float32.  s: per-row sampling arrays (see ModelRunner).

    filter_impl: how top-k/top-p find their thresholds (FILTER_IMPLS; the same tokens).
    full=False (the PLAIN mode) leaves out penalties, filtering, the top-k logprobs and the
    sampled token's rank (returned as 0): the host chooses it only for steps where no row asks
    for them.  logprobs (default: full) computes the rank and the top-k logprobs; full=True with
    logprobs=False is the FILTER mode.  The sampled token's logprob comes in every mode
    (cumulative_logprob).  branches=True (CPU, where a lax.cond costs nothing) skips work an
    all-greedy batch does not need; a GPU program must hold no branch (ModelRunner).
    """
    with_logprobs = full if logprobs is None else logprobs
    raw_logits = logits
    # log-probabilities are raw_logits - lse; no [rows, vocab] log_softmax is materialised
    lse = jax.nn.logsumexp(raw_logits, axis=-1)
    if full:
        logits = jnp.where(s["use_penalty"][:, None], apply_penalties(logits, state, s), logits)
    greedy_tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    temp = jnp.maximum(s["temperature"], _EPS)[:, None]
    scaled = logits / temp
    if full:
        row_filter = (s["top_k"] > 0) | (s["top_p"] < 1.0) | (s["min_p"] > 0.0)
        scaled = jnp.where(row_filter[:, None], _filter(scaled, s, filter_impl), scaled)

    def gumbel(seed, pos):
        key = jax.random.fold_in(jax.random.PRNGKey(seed), pos)
        return jax.random.gumbel(key, (logits.shape[-1],), jnp.float32)

    def sample_rows():
        noise = jax.vmap(gumbel)(s["seed"], s["rng_pos"])
        return jnp.argmax(scaled + noise, axis=-1).astype(jnp.int32)

    if branches:  # an all-greedy batch skips the [rows, vocab] Gumbel noise (threefry)
        sampled = jax.lax.cond(jnp.any(s["temperature"] >= _EPS), sample_rows, lambda: greedy_tokens)
    else:
        sampled = sample_rows()
    tokens = jnp.where(s["temperature"] < _EPS, greedy_tokens, sampled)

    token_logit = jnp.take_along_axis(raw_logits, tokens[:, None], axis=-1)[:, 0]
    token_lp = token_logit - lse  # every mode: the requests' cumulative_logprob
    if with_logprobs:
        # the rank and the top-k are only reported with logprobs, which only FULL serves
        token_rank = jnp.sum(raw_logits > token_logit[:, None], axis=-1).astype(jnp.int32) + 1
        top_logits, top_ids = top_n(raw_logits, num_logprobs)
        top_lp = top_logits - lse[:, None]
    else:
        token_rank = jnp.zeros_like(tokens)
        top_lp = jnp.zeros((logits.shape[0], num_logprobs), jnp.float32)
        top_ids = jnp.zeros((logits.shape[0], num_logprobs), jnp.int32)
    return {"tokens": tokens, "logprob": token_lp, "rank": token_rank,
            "top_ids": top_ids.astype(jnp.int32), "top_logprobs": top_lp}


def count_sampled(state: dict[str, jax.Array], slots: jax.Array, tokens: jax.Array,
                  valid: jax.Array) -> dict[str, jax.Array]:
    """Add each row's new token to its slot's output counts (rows without a slot are dropped)."""
    num_slots = state["counts"].shape[0]
    slots = jnp.where(valid, slots, num_slots)
    return {**state, "counts": state["counts"].at[slots, tokens].add(1, mode="drop")}
