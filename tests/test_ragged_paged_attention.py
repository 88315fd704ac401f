"""Ragged paged attention: every implementation against the jnp reference, and the reference
against a per-request float64 numpy loop.

On the CPU backend the Pallas kernels run in interpret mode (GPU kernel: Pallas' generic
interpreter; TPU kernels: TPU interpret mode, which simulates DMAs and semaphores).  On a GPU
backend the GPU kernel runs compiled and the TPU kernels are not run.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxengine.pallas_kernels.ragged_paged_attention import reference

BACKEND = jax.default_backend()
# Slots past a request's kv_len hold this: a kernel that reads them gets a visible error.
STALE_VALUE = 50.0


@dataclasses.dataclass
class Batch:
    q: jax.Array
    kv_pages: jax.Array
    kv_lens: jax.Array
    page_indices: jax.Array
    cu_q_lens: jax.Array
    num_seqs: jax.Array
    q_lens: list
    ctx_lens: list

    def args(self):
        return (self.q, self.kv_pages, self.kv_lens, self.page_indices, self.cu_q_lens,
                self.num_seqs)


def make_batch(seed, q_lens, ctx_lens, *, num_kv_heads, group, head_dim, page_size, dtype,
               extra_seqs=2, extra_tokens=3, pages_per_seq=None):
    """Random ragged step; request i has q_lens[i] new tokens and ctx_lens[i] >= q_lens[i]
    tokens of context after the step.  Bucket padding: extra_seqs unused request rows and
    extra_tokens unused token rows (with garbage q)."""
    rng = np.random.default_rng(seed)
    num_seqs = len(q_lens)
    max_num_seqs = num_seqs + extra_seqs
    need = [-(-c // page_size) for c in ctx_lens]
    if pages_per_seq is None:
        pages_per_seq = max(need) + 1
    num_pages = sum(need) + 3
    perm = rng.permutation(num_pages)
    page_indices = rng.integers(0, num_pages, (max_num_seqs, pages_per_seq)).astype(np.int32)
    at = 0
    for i, n in enumerate(need):
        page_indices[i, :n] = perm[at:at + n]
        at += n
    combined = 2 * num_kv_heads
    kv = np.full((num_pages, page_size, combined, head_dim), STALE_VALUE, np.float32)
    for i, c in enumerate(ctx_lens):
        for t in range(c):
            kv[page_indices[i, t // page_size], t % page_size] = rng.standard_normal(
                (combined, head_dim))
    num_tokens = sum(q_lens) + extra_tokens
    q = rng.standard_normal((num_tokens, num_kv_heads * group, head_dim)).astype(np.float32)
    cu = np.zeros(max_num_seqs + 1, np.int32)
    cu[1:num_seqs + 1] = np.cumsum(q_lens)
    cu[num_seqs + 1:] = cu[num_seqs]
    kv_lens = np.zeros(max_num_seqs, np.int32)
    kv_lens[:num_seqs] = ctx_lens
    kv_lens[num_seqs:] = rng.integers(1, page_size * pages_per_seq, extra_seqs)  # garbage
    return Batch(jnp.asarray(q, dtype), jnp.asarray(kv, dtype), jnp.asarray(kv_lens),
                 jnp.asarray(page_indices), jnp.asarray(cu), jnp.asarray([num_seqs], jnp.int32),
                 list(q_lens), list(ctx_lens))


def numpy_attention(b: Batch, sm_scale, sliding_window=None, soft_cap=None):
    """Dead-simple float64 loop: one request, one head at a time, context gathered by page."""
    q = np.asarray(b.q, np.float64)
    kv = np.asarray(b.kv_pages, np.float64)
    page_size = kv.shape[1]
    num_kv_heads = kv.shape[2] // 2
    group = q.shape[1] // num_kv_heads
    out = np.zeros_like(q)
    start = 0
    for i, (ql, cl) in enumerate(zip(b.q_lens, b.ctx_lens)):
        pages = np.asarray(b.page_indices)[i]
        ctx = np.stack([kv[pages[t // page_size], t % page_size] for t in range(cl)])
        for j in range(ql):
            pos = cl - ql + j
            keys = np.arange(cl)
            visible = keys <= pos
            if sliding_window is not None:
                visible &= pos - keys < sliding_window
            for hq in range(q.shape[1]):
                h = hq // group
                s = ctx[:, 2 * h] @ q[start + j, hq] * sm_scale
                if soft_cap is not None:
                    s = soft_cap * np.tanh(s / soft_cap)
                s = np.where(visible, s, -np.inf)
                p = np.exp(s - s.max())
                out[start + j, hq] = (p / p.sum()) @ ctx[:, 2 * h + 1]
        start += ql
    return out


def rel_err(out, ref):
    out = np.asarray(out, np.float64)
    ref = np.asarray(ref, np.float64)
    return np.linalg.norm(out - ref) / np.linalg.norm(ref)


TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def reference_out(b: Batch, kw):
    # "highest": XLA on GPU would otherwise run the reference's float32 einsums in tf32 (3e-4).
    with jax.default_matmul_precision("highest"):
        return reference.ragged_paged_attention(*b.args(), **kw).astype(jnp.float32)


def check(out, b: Batch, ref, dtype):
    out = np.asarray(out.astype(jnp.float32))
    real = sum(b.q_lens)
    assert out.shape == b.q.shape
    assert np.all(np.isfinite(out[:real])), "non-finite output in real rows"
    assert np.all(out[real:] == 0), "padding rows must be zero"
    err = rel_err(out[:real], np.asarray(ref, np.float64)[:real])
    assert err <= TOL[dtype], f"relative error {err:.3g} > {TOL[dtype]}"


# ---------------------------------------------------------------------------------------------
# Implementations under test


def _gpu(*args, **kw):
    from jaxengine.pallas_kernels.ragged_paged_attention import gpu
    return gpu.ragged_paged_attention(*args, **kw)


def _tpu(impl):
    def run(*args, **kw):
        from jaxengine.pallas_kernels.ragged_paged_attention import tpu
        return tpu.ragged_paged_attention(*args, impl=impl, **kw)
    return run


IMPLS = {"gpu": _gpu}
if BACKEND in ("cpu", "tpu"):
    IMPLS["tpu_ours"] = _tpu("ours")
if BACKEND == "tpu":
    IMPLS["tpu_jax"] = _tpu("jax")

# (name, q_lens, ctx_lens): decode only, prefill only, mixed; 1, 7 and 33 requests.
# Context lengths cover partial last pages and several pages (page_size 16 below).
SCENARIOS = {
    "decode_1": ([1], [37]),
    "prefill_1": ([40], [40]),
    "chunked_prefill_1": ([23], [61]),
    "decode_7": ([1] * 7, [1, 16, 17, 50, 3, 64, 33]),
    "mixed_7": ([1, 9, 1, 20, 1, 3, 1], [30, 9, 5, 47, 70, 19, 1]),
    "decode_33": ([1] * 33, [int(x) for x in np.random.default_rng(0).integers(1, 80, 33)]),
    "mixed_33": ([1] * 28 + [7, 12, 2, 17, 5],
                 [int(x) for x in np.random.default_rng(1).integers(17, 70, 28)]
                 + [7, 40, 2, 17, 33]),
}

# (scenario, group, head_dim, page_size, dtype, sliding_window, soft_cap); kv heads = 2
# (1 for group 8). Chosen to cover every axis without the full product (interpret mode is slow).
CASES = [
    ("decode_1", 1, 64, 16, jnp.float32, None, None),
    ("prefill_1", 4, 128, 16, jnp.float32, None, None),
    ("chunked_prefill_1", 8, 64, 32, jnp.bfloat16, None, None),
    ("decode_7", 4, 128, 16, jnp.bfloat16, None, None),
    ("decode_7", 8, 64, 16, jnp.float32, None, 5.0),
    ("mixed_7", 1, 64, 16, jnp.bfloat16, None, None),
    ("mixed_7", 4, 64, 16, jnp.float32, 12, None),
    ("mixed_7", 8, 128, 32, jnp.float32, None, None),
    ("decode_33", 4, 64, 16, jnp.bfloat16, 20, 10.0),
    ("mixed_33", 4, 64, 16, jnp.float32, None, None),
    ("mixed_33", 8, 128, 16, jnp.bfloat16, None, None),
]


def _case_id(case):
    name, group, head_dim, page_size, dtype, window, cap = case
    return (f"{name}-g{group}-d{head_dim}-p{page_size}-{jnp.dtype(dtype).name}"
            f"{'-win' + str(window) if window else ''}{'-cap' if cap else ''}")


def _case_batch(case, seed):
    name, group, head_dim, page_size, dtype, window, cap = case
    q_lens, ctx_lens = SCENARIOS[name]
    b = make_batch(seed, q_lens, ctx_lens, num_kv_heads=1 if group == 8 else 2, group=group,
                   head_dim=head_dim, page_size=page_size, dtype=dtype)
    return b, dict(sm_scale=head_dim ** -0.5, sliding_window=window, soft_cap=cap)


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_impl_matches_reference(impl, case):
    seed = zlib.crc32(f"{impl}-{_case_id(case)}".encode())
    b, kw = _case_batch(case, seed)
    if impl == "tpu_jax" and b.q.shape[-1] % 128:
        # jax's TPU kernel requires head_dim % 128 == 0: compare on a zero-padded copy, which
        # is what a caller of it has to do.
        pad = [(0, 0), (0, 0), (0, 128 - b.q.shape[-1] % 128)]
        out = IMPLS[impl](jnp.pad(b.q, pad), jnp.pad(b.kv_pages, [(0, 0)] + pad), *b.args()[2:],
                          **kw)[..., :b.q.shape[-1]]
    else:
        out = IMPLS[impl](*b.args(), **kw)
    check(out, b, reference_out(b, kw), case[4])


@pytest.mark.parametrize("num_splits,fused_combine", [(1, False), (2, False), (4, False), (2, True), (4, True)],
                         ids=["s1", "s2", "s4", "s2-merged", "s4-merged"])
def test_gpu_kv_splits_agree(num_splits, fused_combine):
    """Flash-decoding splits must not change the result (decode and a chunked prefill), merged by
    the combine kernel or inside the attention kernel (fused_combine: each block's last split)."""
    b = make_batch(7, [1, 1, 5, 1], [90, 3, 70, 33], num_kv_heads=2, group=4, head_dim=64,
                   page_size=16, dtype=jnp.float32)
    kw = dict(sm_scale=0.125, sliding_window=None, soft_cap=None)
    out = _gpu(*b.args(), num_splits=num_splits, block_q=4, block_k=16, fused_combine=fused_combine, **kw)
    check(out, b, reference_out(b, kw), jnp.float32)


MERGE_CASES = [CASES[i] for i in (3, 4, 6, 8, 10)]  # decode and mixed: 7 and 33 requests


@pytest.mark.parametrize("case", MERGE_CASES, ids=_case_id)
def test_gpu_merged_splits_match_reference(case):
    """Four kv splits merged inside the kernel: decode and mixed steps, windows, soft cap, bf16."""
    b, kw = _case_batch(case, 11)
    out = _gpu(*b.args(), num_splits=4, fused_combine=True, **kw)
    check(out, b, reference_out(b, kw), case[4])


# Page 16, block_q 16 (32 rows at group 2).  The 70-token chunk at context 130 gives every q block
# full blocks (unmasked loop) and diagonal ones (masked loop); with the windows, blocks at the
# window's edge are masked too, before the full ones; with splits, shares hold both kinds.
@pytest.mark.parametrize("block_k,window,num_splits", [
    (8, None, 1),  # block_k < page_size: one page-table read per block
    (8, 40, 2),  # window starts mid-page (kv_lo rounds down to block_k); kv splits
    (16, 48, 1),  # block_k == page_size, sliding window
    (32, 80, 3),  # block_k > page_size: per-key page-table reads; window and kv splits
    (16, None, 2),  # kv splits on a chunked prefill
])
def test_gpu_full_and_masked_blocks_match_reference(block_k, window, num_splits):
    b = make_batch(12, [70, 1, 9], [130, 75, 9], num_kv_heads=2, group=2, head_dim=32,
                   page_size=16, dtype=jnp.float32)
    kw = dict(sm_scale=32 ** -0.5, sliding_window=window)
    out = _gpu(*b.args(), block_q=16, block_k=block_k, num_splits=num_splits, **kw)
    check(out, b, reference_out(b, kw), jnp.float32)


# Two launches (short_q > 0): requests of more than short_q tokens in the first, the others in a
# second that writes into the first's output.  Lengths on both sides of each threshold; a window
# and a soft cap; groups 1, 2 and 8 (the short tile grows to 16 rows).
@pytest.mark.parametrize("group,short_q,window,cap", [
    (4, 1, None, None),  # decode tokens vs the rest
    (2, 3, 40, None),  # a 3-token request is short, a 4-token one long; sliding window
    (1, 8, None, 4.0),  # group 1: a 16-token short tile; soft cap
    (8, 5, None, None),
])
def test_gpu_long_short_launches_match_reference(group, short_q, window, cap):
    b = make_batch(21 + group, [150, 1, 3, 4, 40, 1, 9], [300, 90, 17, 4, 40, 1, 60],
                   num_kv_heads=2 if group < 8 else 1, group=group, head_dim=64, page_size=16,
                   dtype=jnp.float32)
    kw = dict(sm_scale=0.125, sliding_window=window, soft_cap=cap)
    out = _gpu(*b.args(), short_q=short_q, **kw)
    check(out, b, reference_out(b, kw), jnp.float32)
    # An explicit long tile with the split, too.
    out = _gpu(*b.args(), block_q=16, block_k=16, short_q=short_q, **kw)
    check(out, b, reference_out(b, kw), jnp.float32)


def test_gpu_default_config_splits_big_prefill_buckets():
    """Big prefill buckets get the 128-row prefill tile plus a decode-tile launch; decode buckets and
    small prefill buckets one launch; an explicit tile, one launch of that tile."""
    from jaxengine.pallas_kernels.ragged_paged_attention import gpu
    shape = dict(max_num_seqs=64, num_q_heads=32, num_kv_heads=8, head_dim=128, page_size=16,
                 pages_per_seq=512, dtype=jnp.bfloat16)
    big = gpu.default_config(4096, **shape)
    assert (big["block_q"], big["block_k"], big["num_warps"], big["short_q"]) == (32, 32, 8, 4)
    assert {k: v for k, v in big.items() if k != "short_q"} == {
        k: v for k, v in gpu.default_config(1024, **shape).items() if k != "short_q"}
    assert gpu.default_config(512, **shape)["short_q"] == 0
    assert gpu.default_config(64, **shape)["short_q"] == 0  # decode-only bucket
    assert gpu.default_config(4096, **shape, long_tile=False)["short_q"] == 0


def test_gpu_default_two_launch_bucket_matches_reference():
    """A 2048-token bucket through the default config (long/short launches): one long chunk,
    a short prefill and decode tokens at various contexts, bucket padding rows."""
    b = make_batch(31, [1900, 2, 1, 1, 100, 1], [1990, 2, 700, 33, 100, 5], num_kv_heads=1,
                   group=4, head_dim=32, page_size=16, dtype=jnp.bfloat16, extra_tokens=43)
    assert b.q.shape[0] == 2048
    kw = dict(sm_scale=32 ** -0.5)
    check(_gpu(*b.args(), **kw), b, reference_out(b, kw), jnp.bfloat16)


def _sweep_configs(*tables: str):
    """bench_attention's sweep tables (named), one param per distinct config.  Interpret mode
    ignores warps and stages, so on the CPU the entries that differ only in those run once."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
    import bench_attention

    configs = {}
    for table in tables:
        for name, kw in getattr(bench_attention, table).items():
            if BACKEND == "cpu":
                kw = {k: v for k, v in kw.items() if k not in ("num_warps", "num_stages")}
            configs.setdefault(tuple(sorted(kw.items())), []).append(name)
    return [pytest.param(dict(key), id="+".join(names)) for key, names in configs.items()]


@pytest.mark.parametrize("config", _sweep_configs("PREFILL_SWEEP", "LONG_TILE_SWEEP"))
def test_gpu_prefill_sweep_config_matches_reference(config):
    """Every tile config the GPU sweep times, on the bench's group (4), page size (32) and dtype,
    with a chunk long enough for full blocks at block_k 128."""
    b = make_batch(13, [150, 1, 7], [300, 90, 40], num_kv_heads=2, group=4, head_dim=128,
                   page_size=32, dtype=jnp.bfloat16)
    kw = dict(sm_scale=128 ** -0.5)
    check(_gpu(*b.args(), **config, **kw), b, reference_out(b, kw), jnp.bfloat16)


@pytest.mark.parametrize("config", _sweep_configs("DECODE_SWEEP"))
def test_gpu_decode_sweep_config_matches_reference(config):
    """Every decode tile config the GPU sweep times, on a decode step of the bench's group,
    page size and dtype (contexts of several blocks a split, a partial last page)."""
    b = make_batch(17, [1] * 3, [300, 65, 129], num_kv_heads=2, group=4, head_dim=128,
                   page_size=32, dtype=jnp.bfloat16)
    kw = dict(sm_scale=128 ** -0.5)
    check(_gpu(*b.args(), **config, **kw), b, reference_out(b, kw), jnp.bfloat16)


@pytest.mark.parametrize("bad", [dict(block_k=48), dict(block_q=0), dict(num_splits=0)])
def test_gpu_rejects_bad_tile_sizes(bad):
    b = make_batch(14, [3], [3], num_kv_heads=1, group=1, head_dim=16, page_size=16,
                   dtype=jnp.float32)
    with pytest.raises(ValueError, match=next(iter(bad))):
        _gpu(*b.args(), sm_scale=0.25, **bad)


def test_gpu_odd_head_dim_is_padded():
    b = make_batch(8, [1, 6], [20, 6], num_kv_heads=2, group=2, head_dim=80, page_size=16,
                   dtype=jnp.float32)
    kw = dict(sm_scale=80 ** -0.5)
    check(_gpu(*b.args(), **kw), b, reference_out(b, kw), jnp.float32)


@pytest.mark.parametrize("window,cap", [(None, None), (7, None), (None, 3.0)])
def test_reference_matches_numpy_loop(window, cap):
    b = make_batch(11, [1, 5, 1, 13], [20, 5, 1, 40], num_kv_heads=2, group=3, head_dim=32,
                   page_size=8, dtype=jnp.float32)
    kw = dict(sm_scale=0.3, sliding_window=window, soft_cap=cap)
    with jax.default_matmul_precision("highest"):
        ref = reference.ragged_paged_attention(*b.args(), **kw)
    expected = numpy_attention(b, **kw)
    real = sum(b.q_lens)
    assert rel_err(ref[:real], expected[:real]) < 1e-5
    assert np.all(np.asarray(ref)[real:] == 0)


def test_write_kv_scatters_k_and_v_and_drops_padding():
    rng = np.random.default_rng(3)
    num_pages, page_size, num_kv_heads, head_dim = 5, 4, 2, 8
    kv = rng.standard_normal((num_pages, page_size, 2 * num_kv_heads, head_dim)).astype(np.float32)
    k = rng.standard_normal((6, num_kv_heads, head_dim)).astype(np.float32)
    v = rng.standard_normal((6, num_kv_heads, head_dim)).astype(np.float32)
    slots = np.array([0, 5, 19, 7, num_pages * page_size, num_pages * page_size + 9], np.int32)
    new = np.asarray(reference.write_kv(jnp.asarray(kv), jnp.asarray(k), jnp.asarray(v),
                                        jnp.asarray(slots)))
    expected = kv.copy()
    for t, s in enumerate(slots[:4]):
        expected[s // page_size, s % page_size, 0::2] = k[t]
        expected[s // page_size, s % page_size, 1::2] = v[t]
    np.testing.assert_array_equal(new, expected)


def test_get_attention_dispatch():
    from jaxengine.pallas_kernels import ragged_paged_attention as rpa
    assert rpa.get_attention("reference") is reference.ragged_paged_attention
    assert "gpu" in rpa.available_impls()
    with pytest.raises(ValueError):
        rpa.get_attention("nope")


@pytest.mark.skipif(BACKEND != "cpu", reason="checks the CPU interpreter only")
@pytest.mark.xfail(strict=True,
                   reason="jax 0.11.2's TPU interpret mode rejects the ref reshapes of jax's own "
                          "ragged_paged_attention kernel ('ReshapeTransform' has no 'indices'); "
                          "strict, so a jax that fixes it makes this test fail and the kernel "
                          "joins IMPLS")
def test_jax_tpu_kernel_runs_in_tpu_interpret_mode():
    b = make_batch(5, [1, 9], [30, 9], num_kv_heads=2, group=4, head_dim=128, page_size=16,
                   dtype=jnp.float32)
    kw = dict(sm_scale=0.1)
    check(_tpu("jax")(*b.args(), **kw), b, reference_out(b, kw), jnp.float32)
