"""Decode attention with rope and the KV write folded in (ragged_paged_attention/decode.py): the GPU
kernel against the composite of reference ops, on random decode steps, and every GPU kernel's
lowering to Triton for the H100 (checked on CPU, so a kernel that cannot lower fails here and not
on the device)."""

from __future__ import annotations

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_ragged_paged_attention import STALE_VALUE, TOL, make_batch, rel_err
from jaxengine.pallas_kernels import l2_prefetch as l2pf
from jaxengine.pallas_kernels.ragged_paged_attention import decode, get_decode_attention, gpu_decode

BACKEND = jax.default_backend()


def decode_step(seed, ctx_lens, *, num_kv_heads, group, head_dim, page_size, dtype, extra_seqs=2,
                extra_tokens=3):
    """A decode-only step: request j is row j with one new token at position ctx_lens[j] - 1.
    The new token's slot holds a stale value before the call: reading it instead of using the
    token's own k/v fails the comparison."""
    b = make_batch(seed, [1] * len(ctx_lens), ctx_lens, num_kv_heads=num_kv_heads, group=group,
                   head_dim=head_dim, page_size=page_size, dtype=jnp.float32,
                   extra_seqs=extra_seqs, extra_tokens=extra_tokens)
    kv = np.asarray(b.kv_pages).copy()
    pages = np.asarray(b.page_indices)
    for j, c in enumerate(ctx_lens):
        kv[pages[j, (c - 1) // page_size], (c - 1) % page_size] = STALE_VALUE
    rng = np.random.default_rng(seed + 1)
    num_tokens = b.q.shape[0]
    k = rng.standard_normal((num_tokens, num_kv_heads, head_dim))
    v = rng.standard_normal((num_tokens, num_kv_heads, head_dim))
    inv_freq = 1.0 / (10000.0 ** (np.arange(0, head_dim, 2) / head_dim))
    return (b.q.astype(dtype), jnp.asarray(k, dtype), jnp.asarray(v, dtype), jnp.asarray(kv, dtype),
            b.kv_lens, b.page_indices, b.num_seqs, jnp.asarray(inv_freq, jnp.float32))


# (ctx_lens, group, head_dim, page_size, dtype, window, cap, overrides)
CASES = [
    ([37], 1, 64, 16, jnp.float32, None, None, {}),
    ([1], 4, 64, 16, jnp.float32, None, None, {}),  # first token: no earlier key at all
    ([1, 16, 17, 50, 3, 64, 33], 4, 128, 16, jnp.bfloat16, None, None, {}),
    ([1, 16, 17, 50, 3, 64, 33], 4, 64, 16, jnp.float32, None, None, dict(num_splits=1)),
    ([1, 16, 17, 50, 3, 64, 33], 8, 64, 32, jnp.float32, None, None, dict(num_splits=4, block_k=16)),
    ([70, 5, 33], 4, 64, 16, jnp.float32, None, None, dict(block_k=16)),  # one page per block
    ([70, 5, 33], 4, 64, 64, jnp.float32, None, None, dict(block_k=32, num_splits=2)),  # 2 blocks a page
    ([70, 5, 33], 1, 64, 8, jnp.bfloat16, None, None, dict(block_k=32)),  # 4 pages a block
    ([60, 9, 41], 4, 64, 16, jnp.float32, 12, None, {}),
    ([60, 9, 41], 4, 64, 16, jnp.float32, 12, None, dict(num_splits=1)),
    ([60, 9, 41], 8, 128, 16, jnp.float32, None, 5.0, {}),
    # splits take blocks round robin: several blocks a split, a window starting mid-context
    ([300, 129, 65], 4, 64, 16, jnp.float32, 100, None, dict(num_splits=3, block_k=16)),
    ([int(x) for x in np.random.default_rng(0).integers(1, 80, 33)], 4, 64, 16, jnp.bfloat16, 20, 10.0, {}),
    # splits as contiguous ranges (split_layout="contiguous"): uneven shares, empty splits, a window
    ([300, 129, 65, 1], 4, 64, 16, jnp.float32, 100, None, dict(num_splits=3, block_k=16, split_layout="contiguous")),
    ([1, 16, 17, 50, 3, 64, 33], 8, 64, 32, jnp.bfloat16, None, None,
     dict(num_splits=8, block_k=16, split_layout="contiguous")),
    # as many splits a row as give each split_min_blocks blocks: rows of one split (output written
    # directly, no merge), of a few, and of all; round robin, contiguous, a window
    ([1, 16, 17, 50, 3, 300, 33, 140], 4, 64, 16, jnp.float32, None, None,
     dict(num_splits=8, block_k=16, split_min_blocks=2)),
    ([300, 129, 65, 1, 20], 4, 64, 16, jnp.bfloat16, 100, None,
     dict(num_splits=4, block_k=16, split_min_blocks=4, split_layout="contiguous")),
]


def _case_id(case):
    ctx, group, head_dim, page_size, dtype, window, cap, over = case
    return (f"n{len(ctx)}-g{group}-d{head_dim}-p{page_size}-{jnp.dtype(dtype).name}"
            f"{'-win' if window else ''}{'-cap' if cap else ''}"
            + "".join(f"-{k}{v}" for k, v in over.items()))


def fuse_qkv(q, k, v):
    """The fused layout's projection [num_tokens, num_kv_heads, group + 2, head_dim]."""
    t, n, d = k.shape
    return jnp.concatenate([q.reshape(t, n, -1, d), k[:, :, None], v[:, :, None]], axis=2)


# every case with separate q/k/v; some also with the fused projection as input
RUNS = [(c, False) for c in CASES] + [(CASES[i], True) for i in (0, 2, 4, 6, 9, 11)]


# the kv splits merged inside the kernel (fused_combine): cases with several splits
MERGED = [(CASES[i], i % 2 == 0) for i in (2, 4, 6, 8, 11, 12, 13, 14, 15, 16)]
RUNS_ALL = [(c, f, False) for c, f in RUNS] + [(c, f, True) for c, f in MERGED]


@pytest.mark.parametrize("case,fused_input,fused_combine", RUNS_ALL,
                         ids=[_case_id(c) + ("-fused-qkv" if f else "") + ("-merged" if m else "")
                              for c, f, m in RUNS_ALL])
def test_gpu_kernel_matches_composite_of_reference_ops(case, fused_input, fused_combine):
    ctx, group, head_dim, page_size, dtype, window, cap, over = case
    args = decode_step(len(ctx) * 7 + group, ctx, num_kv_heads=1 if group == 8 else 2, group=group,
                       head_dim=head_dim, page_size=page_size, dtype=dtype)
    kw = dict(sm_scale=head_dim ** -0.5, sliding_window=window, soft_cap=cap)
    with jax.default_matmul_precision("highest"):
        want_out, want_kv = decode.reference_decode_attention(*args, **kw)
    if fused_input:
        args = (fuse_qkv(*args[:3]), None, None) + args[3:]
        with jax.default_matmul_precision("highest"):  # the composite takes the fused input too
            again, _ = decode.reference_decode_attention(*args, **kw)
        np.testing.assert_array_equal(np.asarray(again), np.asarray(want_out))
    if fused_combine:
        num_tokens = args[0].shape[0]
        cfg = gpu_decode.default_config(num_tokens, args[3].shape[2] // 2, head_dim, page_size,
                                        args[5].shape[1])
        assert over.get("num_splits", cfg["num_splits"]) > 1, "a merged case needs several splits"
    out, kv, counts = gpu_decode.decode_attention_with_counters(*args, None, **kw, **over,
                                                                fused_combine=fused_combine)
    if fused_combine:  # every merge reset its count (and rows of one split never counted)
        assert counts is not None and not np.any(np.asarray(counts))
    n = len(ctx)
    out = np.asarray(out.astype(jnp.float32))
    assert out.shape == want_out.shape
    assert np.all(out[n:] == 0), "padding rows must be zero"
    assert np.all(np.isfinite(out[:n]))
    err = rel_err(out[:n], np.asarray(want_out.astype(jnp.float32))[:n])
    assert err <= TOL[dtype], f"relative error {err:.3g} > {TOL[dtype]}"
    # Pages: the new slots hold the rotated k and v (up to rope's float32 rounding), every other
    # slot is untouched, and padding rows wrote nothing.
    kv, want_kv, before = (np.asarray(a.astype(jnp.float32)) for a in (kv, want_kv, args[3]))
    changed = np.any(want_kv != before, axis=(2, 3))
    assert changed.sum() == n
    np.testing.assert_array_equal(kv[~changed], before[~changed])
    np.testing.assert_allclose(kv[changed], want_kv[changed], rtol=TOL[dtype], atol=TOL[dtype])


def test_composite_is_rope_then_write_then_attention():
    """The composite writes rotated k (not k) and attends with rotated q: checked against
    rotating by hand and calling the reference ragged attention on the written pages."""
    from jaxengine.pallas_kernels.ragged_paged_attention import reference
    ctx = [5, 20, 3]
    q, k, v, kv, kv_lens, pages, num_seqs, inv_freq = decode_step(3, ctx, num_kv_heads=2, group=2,
                                                                 head_dim=32, page_size=8, dtype=jnp.float32)
    out, new_kv = decode.reference_decode_attention(q, k, v, kv, kv_lens, pages, num_seqs, inv_freq,
                                                    sm_scale=0.3)
    pos = np.zeros(q.shape[0], np.int32)
    pos[:3] = np.asarray(ctx) - 1
    cos, sin = decode.rope_cos_sin(jnp.asarray(pos), inv_freq)
    k_rot = np.asarray(decode.apply_rope(k, cos, sin))
    for j, c in enumerate(ctx):
        slot = np.asarray(new_kv)[np.asarray(pages)[j, (c - 1) // 8], (c - 1) % 8]
        np.testing.assert_array_equal(slot[0::2], k_rot[j])
        np.testing.assert_array_equal(slot[1::2], np.asarray(v)[j])
    cu = np.minimum(np.arange(pages.shape[0] + 1), 3).astype(np.int32)
    want = reference.ragged_paged_attention(decode.apply_rope(q, cos, sin), new_kv, kv_lens, pages,
                                            jnp.asarray(cu), num_seqs, sm_scale=0.3)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(want))


def test_dispatch():
    assert get_decode_attention("gpu") is gpu_decode.decode_attention
    assert get_decode_attention("reference") is not gpu_decode.decode_attention
    with pytest.raises(ValueError, match="attention impl"):
        get_decode_attention("cuda-graphs")


# ---------------------------------------------------------------------------------------------
# Lowering to Triton for sm_90, without a GPU: Pallas lowers a kernel to Triton IR before XLA
# compiles it, and a kernel that uses something the Triton lowering lacks fails at this stage.
# The lowering asks the device for its compute capability; on CPU we name an H100.


@pytest.fixture
def as_h100(monkeypatch):
    if BACKEND != "gpu":
        from jax._src.pallas.triton import gpu_info
        monkeypatch.setattr(gpu_info, "get_gpu_info", lambda: gpu_info._get_gpu_info_impl(gpu_info.GpuVersion.H100))


def lower_for_cuda(fn, *shapes) -> str:
    from jax import export
    exp = export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=[
        export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*shapes)
    return exp.mlir_module()


def _sds(shape, dtype=jnp.bfloat16):
    return jax.ShapeDtypeStruct(shape, dtype)


T, HQ, HKV, D, PAGES, PS = 64, 32, 8, 128, 256, 16  # Llama-3-8B attention shapes


@pytest.mark.parametrize("fused_input", [False, True], ids=["qkv", "fused-qkv"])
@pytest.mark.parametrize("num_splits", [1, 8])
def test_decode_kernel_lowers_to_triton_for_h100(as_h100, num_splits, fused_input):
    i32 = jnp.int32
    if fused_input:
        qkv = (_sds((T, HKV, HQ // HKV + 2, D)),)
        fn = lambda qkv, *a: gpu_decode.decode_attention(qkv, None, None, *a, sm_scale=0.088,  # noqa: E731
                                                         num_splits=num_splits, interpret=False)
    else:
        qkv = (_sds((T, HQ, D)), _sds((T, HKV, D)), _sds((T, HKV, D)))
        fn = lambda *a: gpu_decode.decode_attention(*a, sm_scale=0.088, num_splits=num_splits,  # noqa: E731
                                                    interpret=False)
    mlir = lower_for_cuda(fn, *qkv, _sds((PAGES, PS, 2 * HKV, D)), _sds((T,), i32), _sds((T, 16), i32),
                          _sds((1,), i32), _sds((D // 2,), jnp.float32))
    # by default the kv splits merge inside the kernel: one launch either way
    assert mlir.count("xla.gpu.triton") == 1
    if num_splits == 1:  # the kernel writes every row (padding tokens' as zeros): no zeros to alias
        assert not [line for line in mlir.splitlines()
                    if "stablehlo.broadcast_in_dim" in line and f"-> tensor<{T * HQ}x{D}xbf16>" in line]
        assert mlir.count("#stablehlo.output_operand_alias") == 1  # the pages only
    if num_splits > 1:  # merged by a second, combine kernel: two launches
        kw = dict(sm_scale=0.088, num_splits=num_splits, interpret=False, fused_combine=False)
        if fused_input:
            fn2 = lambda qkv, *a: gpu_decode.decode_attention(qkv, None, None, *a, **kw)  # noqa: E731
        else:
            fn2 = lambda *a: gpu_decode.decode_attention(*a, **kw)  # noqa: E731
        mlir = lower_for_cuda(fn2, *qkv, _sds((PAGES, PS, 2 * HKV, D)), _sds((T,), i32), _sds((T, 16), i32),
                              _sds((1,), i32), _sds((D // 2,), jnp.float32))
        assert mlir.count("xla.gpu.triton") == 2


@pytest.mark.parametrize("num_tokens", [8, 2048])  # a decode bucket (splits) and a prefill bucket
def test_ragged_kernel_lowers_to_triton_for_h100(as_h100, num_tokens):
    from jaxengine.pallas_kernels.ragged_paged_attention import gpu
    i32 = jnp.int32
    mlir = lower_for_cuda(
        lambda *a: gpu.ragged_paged_attention(*a, sm_scale=0.088, interpret=False),
        _sds((num_tokens, HQ, D)), _sds((PAGES, PS, 2 * HKV, D)), _sds((T,), i32), _sds((T, 16), i32),
        _sds((T + 1,), i32), _sds((1,), i32))
    # the decode bucket: the attention kernel and the split combine; the 2048-token bucket: two
    # launches (long requests, then the short ones).  No XLA kernels build work lists.
    assert mlir.count("xla.gpu.triton") == 2
    assert "stablehlo.reduce_window" not in mlir and "stablehlo.while" not in mlir
    if num_tokens == 8:  # the splits merged inside the kernel: one launch
        merged = lower_for_cuda(
            lambda *a: gpu.ragged_paged_attention(*a, sm_scale=0.088, interpret=False, fused_combine=True),
            _sds((num_tokens, HQ, D)), _sds((PAGES, PS, 2 * HKV, D)), _sds((T,), i32), _sds((T, 16), i32),
            _sds((T + 1,), i32), _sds((1,), i32))
        assert merged.count("xla.gpu.triton") == 1


def test_ragged_kernel_fast_math_lowers_to_ptx_softmax(as_h100, monkeypatch):
    """fast_math writes the online softmax's exponent as PTX (XLA's Triton pipeline contracts no
    FMA and takes libdevice's non-ftz exp2).  By default only the 32-128-row tiles take it (H200:
    the 128-row prefill tile faster, the 256-row tile slower, 16-row decode tiles even): a
    512-token bucket's one launch, the long launch of a 2048-token bucket (128 rows since the
    sixteenth session) but not its decode-tile launch (16 rows), nor an explicit 256-row tile;
    $JAXENGINE_ATTN_FAST_MATH=1 / 0 forces every tile."""
    import re

    from jaxengine.pallas_kernels.ragged_paged_attention import gpu
    i32 = jnp.int32

    def launches(num_tokens, **kw):  # {kernel name: whether its Triton IR holds the PTX softmax}
        mlir = lower_for_cuda(
            lambda *a: gpu.ragged_paged_attention(*a, sm_scale=0.088, interpret=False, **kw),
            _sds((num_tokens, HQ, D)), _sds((PAGES, PS, 2 * HKV, D)), _sds((T,), i32), _sds((T, 16), i32),
            _sds((T + 1,), i32), _sds((1,), i32))
        calls = [line for line in mlir.splitlines() if "xla.gpu.triton" in line]
        return {re.findall(r'name = \\?"([a-z_0-9]+)', line)[0]:
                "ex2.approx.ftz.f32" in line and "fma.rn.f32" in line for line in calls}

    tile128, long_k, short_k = ("ragged_paged_attention_bq32_bk32_s1", "ragged_paged_attention_bq64_bk64_s1",
                                "ragged_paged_attention_bq4_bk32_s1")
    monkeypatch.delenv("JAXENGINE_ATTN_FAST_MATH", raising=False)
    assert gpu.fast_math_default() is None
    assert launches(512) == {tile128: True}
    assert launches(2048) == {tile128: True, short_k: False}
    assert launches(2048, fast_math=True) == {tile128: True, short_k: True}
    assert launches(2048, block_q=64, block_k=64, short_q=4) == {long_k: False, short_k: False}
    assert launches(512, fast_math=False) == {tile128: False}
    monkeypatch.setenv("JAXENGINE_ATTN_FAST_MATH", "0")
    assert gpu.fast_math_default() is False and launches(512) == {tile128: False}
    monkeypatch.setenv("JAXENGINE_ATTN_FAST_MATH", "1")
    assert launches(2048) == {tile128: True, short_k: True}
    assert launches(2048, block_q=64, block_k=64, short_q=4) == {long_k: True, short_k: True}
    monkeypatch.setenv("JAXENGINE_ATTN_FAST_MATH", "yes")
    with pytest.raises(ValueError, match="JAXENGINE_ATTN_FAST_MATH"):
        gpu.fast_math_default()


def test_split_layout_setting_and_lowering(as_h100, check_env_switch):
    """$JAXENGINE_DECODE_SPLIT_LAYOUT (round_robin by default, or contiguous) is checked, and the
    contiguous layout lowers to Triton for sm_90 as one launch like the default."""
    check_env_switch("JAXENGINE_DECODE_SPLIT_LAYOUT", gpu_decode.split_layout_default, "round_robin",
                     "Contiguous", "contiguous")
    i32 = jnp.int32
    args = (_sds((T, HQ, D)), _sds((T, HKV, D)), _sds((T, HKV, D)), _sds((PAGES, PS, 2 * HKV, D)),
            _sds((T,), i32), _sds((T, 16), i32), _sds((1,), i32), _sds((D // 2,), jnp.float32))
    with pytest.raises(ValueError, match="split_layout"):
        gpu_decode.decode_attention(*args, sm_scale=0.088, split_layout="striped", interpret=False)
    mlir = lower_for_cuda(lambda *a: gpu_decode.decode_attention(
        *a, sm_scale=0.088, num_splits=8, interpret=False, split_layout="contiguous"), *args)
    assert mlir.count("xla.gpu.triton") == 1


def test_split_merge_defaults_per_kernel(monkeypatch):
    """Where the kv splits merge (measured on the H200, eleventh session): inside the decode
    kernel, in a combine kernel after the ragged one; $JAXENGINE_DECODE_COMBINE sets both, and a
    value it does not know is an error naming the variable."""
    from jaxengine.pallas_kernels.ragged_paged_attention import gpu
    monkeypatch.delenv("JAXENGINE_DECODE_COMBINE", raising=False)
    assert gpu.fused_combine_default("decode") and not gpu.fused_combine_default("ragged")
    for value, want in (("kernel", True), ("separate", False), (" Kernel ", True)):
        monkeypatch.setenv("JAXENGINE_DECODE_COMBINE", value)
        assert gpu.fused_combine_default("decode") is want and gpu.fused_combine_default("ragged") is want
    monkeypatch.setenv("JAXENGINE_DECODE_COMBINE", "fused")
    with pytest.raises(ValueError, match="JAXENGINE_DECODE_COMBINE"):
        gpu.fused_combine_default("decode")
    monkeypatch.delenv("JAXENGINE_DECODE_COMBINE")
    with pytest.raises(ValueError, match="kernel"):
        gpu.fused_combine_default("prefill")


def test_layer_chain_passes_one_count_buffer_along_and_leaves_it_zero():
    """Three 'layers' through gpu_decode.LayerChain (the in-kernel split merge's count buffer passed
    from each launch to the next): the same outputs and pages as three independent calls, and the
    counts are zero after every launch (each row's last split resets its count).  A count left
    non-zero would make the next layer's rows merge at the wrong split: wrong outputs."""
    ctx, group, head_dim, page_size = [1, 16, 17, 50, 3, 64, 33], 4, 64, 16
    args = decode_step(11, ctx, num_kv_heads=2, group=group, head_dim=head_dim, page_size=page_size,
                       dtype=jnp.float32)
    q, k, v, kv, *rest = args
    kw = dict(sm_scale=head_dim ** -0.5, num_splits=4, block_k=16, fused_combine=True)
    rng = np.random.default_rng(3)
    qs = [q] + [jnp.asarray(rng.standard_normal(q.shape), q.dtype) for _ in range(2)]
    want, kv_want = [], kv
    for qi in qs:
        out, kv_want = gpu_decode.decode_attention(qi, k, v, kv_want, *rest, **kw)
        want.append(out)
    chain, got, kv_got = gpu_decode.LayerChain(), [], kv
    for qi in qs:
        out, kv_got = chain(qi, k, v, kv_got, *rest, **kw)
        got.append(out)
        assert chain.counters is not None and chain.counters.shape == (2 * q.shape[0],)
        np.testing.assert_array_equal(np.asarray(chain.counters), 0)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(kv_got), np.asarray(kv_want))
    # a non-zero count buffer does change the result: the counts are what the merge keys on
    chain.counters = jnp.ones_like(chain.counters)
    bad, _ = chain(qs[0], k, v, kv, *rest, **kw)
    assert not np.array_equal(np.asarray(bad), np.asarray(want[0]))


def test_layer_chain_threads_the_count_buffer_from_launch_to_launch():
    """Traced like the multi-step program's layers: the second and third launch take the previous
    launch's count output (XLA can then run them in the one buffer; a zeros constant shared by
    independent launches is copied into a new buffer for each, the memcpy nodes the H200 dump of
    the twelfth session showed: 15 a token at 1B), and only the first launch gets zeros."""
    i32 = jnp.int32
    shapes = (_sds((T, HQ, D)), _sds((T, HKV, D)), _sds((T, HKV, D)), _sds((PAGES, PS, 2 * HKV, D)),
              _sds((T,), i32), _sds((T, 16), i32), _sds((1,), i32), _sds((D // 2,), jnp.float32))
    kw = dict(sm_scale=0.088, num_splits=8, interpret=False, fused_combine=True)

    def layers(make):
        def fn(q, k, v, kv, *rest):
            attn, outs = make(), []
            for _ in range(3):
                out, kv = attn(q, k, v, kv, *rest, **kw)
                outs.append(out)
            return outs, kv
        return fn

    def launches(make):
        eqns = jax.make_jaxpr(layers(make))(*shapes).jaxpr.eqns
        calls = [e for e in eqns if e.primitive.name in ("pjit", "jit")]
        assert len(calls) == 3
        return calls

    chained = launches(gpu_decode.LayerChain)
    for prev, nxt in zip(chained, chained[1:]):
        assert nxt.invars[8] is prev.outvars[2]  # counters in = the previous launch's counters out
    plain = launches(lambda: gpu_decode.decode_attention)
    assert all(len(c.invars) == 8 for c in plain)  # each makes its own zeros inside


def test_env_tile_sets_every_launchs_tile_and_is_checked(as_h100, check_env_switch):
    """$JAXENGINE_DECODE_TILE (an experiment switch) replaces default_config's tile in launches that
    pass none (the lowered kernel's name carries block_k and the split count); a launch's own
    arguments still win; an unknown key or a value that is not a power of two is a ValueError."""
    check_env_switch("JAXENGINE_DECODE_TILE", gpu_decode.env_tile, {},
                     " num_splits=1 , block_k=64", {"num_splits": 1, "block_k": 64})
    i32 = jnp.int32
    args = (_sds((T, HQ, D)), _sds((T, HKV, D)), _sds((T, HKV, D)), _sds((PAGES, PS, 2 * HKV, D)),
            _sds((T,), i32), _sds((T, 16), i32), _sds((1,), i32), _sds((D // 2,), jnp.float32))

    def kernel_name(**kw):
        mlir = lower_for_cuda(lambda *a: gpu_decode.decode_attention(*a, sm_scale=0.088, interpret=False,
                                                                     **kw), *args)
        return set(re.findall(r"decode_attention_bk\d+_s\d+", mlir))

    default = gpu_decode.default_config(T, HKV, D, PS, 16)
    assert kernel_name() == {f"decode_attention_bk{default['block_k']}_s{default['num_splits']}"}
    os.environ["JAXENGINE_DECODE_TILE"] = "num_splits=1,block_k=16"
    try:
        assert kernel_name() == {"decode_attention_bk16_s1"}
        assert kernel_name(num_splits=2) == {"decode_attention_bk16_s2"}
        os.environ["JAXENGINE_DECODE_TILE"] = "num_splits=8,split_min_blocks=2"  # rows' own split count
        assert kernel_name() == {f"decode_attention_bk{default['block_k']}_s8"}
        for bad in ("num_splits=3", "splits=2", "block_k=0", "block_k"):
            os.environ["JAXENGINE_DECODE_TILE"] = bad
            with pytest.raises(ValueError, match="JAXENGINE_DECODE_TILE"):
                gpu_decode.env_tile()
    finally:
        del os.environ["JAXENGINE_DECODE_TILE"]


# ---------------------------------------------------------------------------------------------
# L2 prefetch (pallas_kernels/l2_prefetch, $JAXENGINE_L2_PREFETCH): extra programs of the decode
# launch read the next GEMMs' weights while the attention runs (the q/k/v and o GEMMs' share:
# tests/test_decode_matmul.py).


def _prefetch_weights(seed=5):
    """Positive random weights (so sums cannot cancel): an o-like [72, 256] whose GEMM walks two K
    halves, a gate/up-like [2, 64, 192] (128 rows of 192) and a down-like [64, 320]."""
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.random((72, 256)) + 0.5, jnp.bfloat16),
            jnp.asarray(rng.random((2, 64, 192)) + 0.5, jnp.bfloat16),
            jnp.asarray(rng.random((64, 320)) + 0.5, jnp.bfloat16))


SHAPES3 = [((72, 256), 2, 2), ((128, 192), 1, 2), ((64, 320), 1, 2)]


def test_plan_continues_window_after_window_over_whole_weights_then_leading_columns():
    """Each window takes the rest of the weight the window before stopped in, whole weights, then the
    same leading columns (a multiple of 64) of every K part of the next, and stops; a window that
    must not read a weight (the o GEMM's own) starts past it; the deal of tiles over programs
    covers each tile once and runs on across regions."""
    plan, half = l2pf.plan, 72 * 128 * 2  # bytes of 64 columns of both halves of the o-like weight
    assert plan(SHAPES3, [(0, 0)]) == [()]
    assert plan(SHAPES3, [(half - 1, 0)]) == [()]  # not one 64-column box of every part
    assert plan(SHAPES3, [(half, 0), (half + 128 * 64 * 2 + 100, 0), (10 ** 9, 1)]) == [
        ((0, (72, 2, 0, 64, 128)),),
        ((0, (72, 2, 64, 128, 128)), (1, (128, 1, 0, 64, 192))),
        ((1, (128, 1, 64, 192, 192)), (2, (64, 1, 0, 320, 320)))]
    assert plan(SHAPES3, [(10 ** 9, 0)]) == [((0, (72, 2, 0, 128, 128)), (1, (128, 1, 0, 192, 192)),
                                              (2, (64, 1, 0, 320, 320)))]
    assert plan(SHAPES3, [(half, 0), (10 ** 9, 1)])[1][0] == (1, (128, 1, 0, 192, 192))  # o's rest skipped
    with pytest.raises(ValueError, match="parts"):
        plan([((8, 192), 5, 2)], [(10 ** 6, 0)])
    for programs, offset, tiles in ((7, 0, 20), (7, 3, 20), (24, 10, 8), (5, 13, 3)):
        dealt = [(p, f + i * programs) for p in range(programs)
                 for f, n in [l2pf.deal(p, programs, offset, tiles)] for i in range(n)]
        assert sorted(t for _, t in dealt) == list(range(tiles))
        assert all((offset + t) % programs == p for p, t in dealt)
    region = (72, 2, 64, 192, 256)  # columns 64..191 of each of two 256-column parts, 16 x 64 tiles
    origins = {l2pf.tile_origin(t, region, (16, 64))[:2] for t in range(l2pf.num_tiles(region, (16, 64)))}
    assert origins == {(r, p * 256 + c) for r in range(0, 72, 16) for p in (0, 1) for c in (64, 128)}
    # the K ranges the Mosaic decode matmuls walk: 1B's o / down / q/k/v in two halves (32-48
    # 64-row tiles), 8B's whole (64+ tiles), gate/up never split, shapes they do not tile whole
    from jaxengine.pallas_kernels.decode_matmul import mgpu_k_parts
    assert [mgpu_k_parts(2048, 2048), mgpu_k_parts(2048, 8192), mgpu_k_parts(3072, 2048)] == [2, 2, 2]
    assert [mgpu_k_parts(4096, 4096), mgpu_k_parts(4096, 14336), mgpu_k_parts(16384, 2048, gate_up=True)] == [1, 1, 1]
    assert mgpu_k_parts(100, 2048) == 1


def test_windows_follow_the_setting_and_stop_at_unboxable_weights(monkeypatch):
    ws = _prefetch_weights()
    stream = ((ws[0], 2), (ws[1].reshape(128, 192), 1), (ws[2], 1))
    monkeypatch.delenv("JAXENGINE_L2_PREFETCH", raising=False)
    assert l2pf.windows(stream, 8) == {}
    monkeypatch.setenv("JAXENGINE_L2_PREFETCH", f"mb={72 * 128 * 2 / 2 ** 20},o_mb=1")
    win = l2pf.windows(stream, 8)
    assert [(k, [r for _, r in v]) for k, v in win.items()] == [
        ("attention", [(72, 2, 0, 64, 128)]), ("o", [(128, 1, 0, 192, 192), (64, 1, 0, 320, 320)])]
    assert win["o"][0][0] is stream[1][0]
    assert "o" not in l2pf.windows(stream, 8, gemm=False) and l2pf.windows(stream, 16) == {}  # max_tokens 8
    assert l2pf.windows(((ws[0], 3),) + stream[1:], 8) == {}  # 256 columns in 3 parts: nothing after


@pytest.mark.parametrize("num_splits,fused_combine,fused_input",
                         [(1, False, False), (4, True, True), (4, False, False)],
                         ids=["one-split", "merged-fused-qkv", "combine-kernel"])
def test_l2_prefetch_programs_read_their_regions_once_beside_an_unchanged_attention(
        num_splits, fused_combine, fused_input):
    """The launch with prefetch programs gives the same outputs, pages and counts as without (bit
    for bit: they are other programs), and its programs' sums add up to the regions' sum (a tile
    read twice or never, or a program that stores nothing, fails): the second window of the plan
    above (the o-like weight's second 64 columns of each half, rows not a multiple of the tile's;
    the gate/up-like one's first 64 columns, a partial column tile)."""
    args = decode_step(21, [37, 5, 80], num_kv_heads=2, group=4, head_dim=64, page_size=16,
                       dtype=jnp.float32)
    if fused_input:
        args = (fuse_qkv(*args[:3]), None, None) + args[3:]
    ws = _prefetch_weights()
    half = 72 * 128 * 2
    regions = l2pf.plan(SHAPES3, [(half, 0), (half + 128 * 64 * 2 + 100, 0)])[1]
    assert [i for i, _ in regions] == [0, 1]
    kw = dict(sm_scale=0.125, sliding_window=None, soft_cap=None, block_k=16, num_splits=num_splits,
              num_warps=4, num_stages=2, interpret=BACKEND == "cpu", fused_combine=fused_combine)
    out, kv, counts, none = gpu_decode._decode_attention(*args, None, **kw)
    assert none is None
    got = gpu_decode._decode_attention(*args, None, ws[:2], prefetch=tuple(r for _, r in regions),
                                       prefetch_rows=2, prefetch_tile=(16, 128), **kw)
    for a, b in zip(got[:2], (out, kv)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    if fused_combine:
        np.testing.assert_array_equal(np.asarray(got[2]), np.asarray(counts))
    sums = np.asarray(got[3])
    assert sums.shape == (2 * 2 * num_splits,)  # 2 extra token rows x kv heads x splits
    f32 = [np.asarray(w.astype(jnp.float32)).reshape(-1, w.shape[-1]) for w in ws]
    want = f32[0][:, 64:128].sum() + f32[0][:, 192:].sum() + f32[1][:, :64].sum()
    assert abs(sums.sum() - want) <= 1e-5 * want
    assert np.all(sums > 0), "every program has tiles (18 >= 16 programs here) and stores their sum"


def test_l2_prefetch_setting_is_parsed_and_checked(monkeypatch):
    monkeypatch.delenv("JAXENGINE_L2_PREFETCH", raising=False)
    assert l2pf.setting() == l2pf.L2Prefetch() and not l2pf.L2Prefetch().active(1)  # off by default
    monkeypatch.setenv("JAXENGINE_L2_PREFETCH",
                       " mb=12.5 , programs=128,max_tokens=16,evict=last,qkv_mb=4,o_mb=2,tile_rows=8")
    assert l2pf.setting() == l2pf.L2Prefetch(12.5, 4.0, 2.0, 128, 16, "last", 8)
    assert l2pf.setting().active(16) and not l2pf.setting().active(32)
    for bad in ("mb=-1", "programs=0", "max_tokens=x", "evict=first", "size=4", "mb", "tile_rows=32"):
        monkeypatch.setenv("JAXENGINE_L2_PREFETCH", bad)
        with pytest.raises(ValueError, match="JAXENGINE_L2_PREFETCH"):
            l2pf.setting()


def test_l2_prefetch_lowers_for_h100_with_the_programs_asked(as_h100, monkeypatch):
    """A launch given a region (8B shapes: half of each row of the 32 MiB o weight) takes the weight
    as one more operand and 256 / 64 = 4 more token rows of programs ($JAXENGINE_L2_PREFETCH's
    `programs`: 128 gives 2); without one it lowers as before."""
    i32 = jnp.int32
    h = 4096

    def launch(regions):
        args = (_sds((8, HKV, HQ // HKV + 2, D)), _sds((PAGES, PS, 2 * HKV, D)), _sds((8,), i32),
                _sds((8, 16), i32), _sds((1,), i32), _sds((D // 2,), jnp.float32), _sds((h, h)))

        def fn(qkv, kv, lens, pt, ns, inv, wo):
            return gpu_decode.decode_attention(qkv, None, None, kv, lens, pt, ns, inv, sm_scale=0.088,
                                               interpret=False, l2_prefetch=tuple((wo, r) for r in regions))
        calls = [line for line in lower_for_cuda(fn, *args).splitlines() if "xla.gpu.triton" in line]
        assert len(calls) == 1
        name = re.findall(r'name = \\?"([a-z_0-9]+)', calls[0])[0]
        operands = calls[0].split("xla.gpu.triton(")[1].split(")")[0].count("%")
        return name, operands, int(re.findall(r"grid_z = (\d+)", calls[0])[0])

    monkeypatch.delenv("JAXENGINE_L2_PREFETCH", raising=False)
    name, operands, grid_z = launch(())
    assert "l2pf" not in name and grid_z == 8
    region = (h, 1, 0, 2048, h)
    assert launch((region,)) == (name + "_l2pf256", operands + 1, 8 + 4)
    monkeypatch.setenv("JAXENGINE_L2_PREFETCH", "programs=128")
    assert launch((region,)) == (name + "_l2pf128", operands + 1, 8 + 2)


def test_forward_plans_the_layers_windows_and_hands_each_kernel_its_share(monkeypatch):
    """models.llama.forward asks a decode attention with `l2_windows` for each layer's plan over the
    layer's o, gate/up and down weights (in the order they run, with the K parts their kernels walk)
    and hands the attention its window on every layer loop; on the norm-epilogue loop the q/k/v
    and o GEMMs get theirs (dense.accepts_l2_next), elsewhere the plan is asked without them; an
    attention without `l2_windows` gets nothing."""
    from test_decode_matmul import _tiny_forward_inputs

    from jaxengine.pallas_kernels import decode_matmul
    from jaxengine.pallas_kernels.decode_matmul import gpu as dm_gpu
    from jaxengine.pallas_kernels.ragged_paged_attention import get_attention, get_decode_attention
    from jaxengine.pallas_kernels.residual_norm import get_residual_norm

    cfg, model, params, kv, inputs = _tiny_forward_inputs()
    composite = get_decode_attention("reference")
    asked, got_attention, got_gemm = [], [], []

    def spy(*a, l2_prefetch=(), **kw):
        got_attention.append([r for _, r in l2_prefetch])
        return composite(*a, **kw)

    def windows(stream, rows, gemm):
        asked.append(([(tuple(w.shape), parts) for w, parts in stream], rows, gemm))
        return l2pf.windows(stream, rows, gemm)

    spy.l2_windows = windows
    for name in ("decode_matmul_normed", "decode_matmul_residual"):
        inner = getattr(dm_gpu, name)
        monkeypatch.setattr(dm_gpu, name, lambda *a, _n=name, _f=inner, **kw: got_gemm.append(
            (_n, [r for _, r in kw.get("l2_next", ())])) or _f(*a, **kw))
    h, f, n = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    q = cfg.num_heads * cfg.head_dim
    o_parts, down_parts = decode_matmul.mgpu_k_parts(h, q), decode_matmul.mgpu_k_parts(h, f)
    o_bytes = h * q * 2
    gu_64 = 2 * f * 64 * 2  # 64 columns of the gate/up weight
    monkeypatch.setenv("JAXENGINE_L2_PREFETCH",
                       f"qkv_mb={o_bytes / 2 / 2 ** 20},mb={(o_bytes + gu_64) / 2 ** 20},o_mb=64")
    attention = get_attention("reference")
    runs = [(dict(), 1, 1, False), (dict(residual_norm=get_residual_norm("reference")), 1, 1, False),
            (dict(dense=decode_matmul.get_dense("mgpu_norm")), o_parts, down_parts, True)]
    for extra, po, pd, gemm in runs:
        for record in (asked, got_attention, got_gemm):
            record.clear()
        jax.jit(lambda p, kv, b: model.forward(p, cfg, b, kv, attention, decode_attention=spy, **extra))(
            params, kv, inputs)
        stream = [((h, q), po), ((2 * f, h), 1), ((h, f), pd)]
        assert asked == [(stream, 8, gemm)] * n, extra
        half = q // po // 2  # the q/k/v window: half of each of o's K parts
        if gemm:
            assert got_attention == [[(h, po, half, q // po, q // po), (2 * f, 1, 0, 64, h)]] * n
            assert got_gemm == [("decode_matmul_normed", [(h, po, 0, half, q // po)]),
                                ("decode_matmul_residual", [(2 * f, 1, 64, h, h), (h, pd, 0, f // pd, f // pd)]),
                                ("decode_matmul_residual", [])] * n
        else:  # no q/k/v or o window: the attention's starts at o's first column
            assert got_attention == [[(h, po, 0, q // po, q // po), (2 * f, 1, 0, 64, h)]] * n
    del spy.l2_windows
    got_attention.clear()
    jax.jit(lambda p, kv, b: model.forward(p, cfg, b, kv, attention, decode_attention=spy))(params, kv, inputs)
    assert got_attention == [[]] * n


def test_forward_through_the_gpu_decode_kernel_is_unchanged_by_the_prefetch(monkeypatch):
    """The engine's decode forward with the GPU decode kernel (interpreted) and $JAXENGINE_L2_PREFETCH
    set: every layer's launch carries prefetch programs, and the logits and pages are bit for bit
    those without."""
    from test_decode_matmul import _tiny_forward_inputs

    from jaxengine.pallas_kernels.ragged_paged_attention import get_attention, per_forward

    cfg, model, params, kv, inputs = _tiny_forward_inputs()
    attention = get_attention("reference")

    def run():
        fn = jax.jit(lambda p, kv, b: model.forward(p, cfg, b, kv, attention,
                                                    decode_attention=per_forward(gpu_decode.decode_attention)))
        names = re.findall(r"decode_attention_bk\d+_s\d+\w*", str(jax.make_jaxpr(fn)(params, kv, inputs)))
        return fn(params, kv, inputs), names

    monkeypatch.delenv("JAXENGINE_L2_PREFETCH", raising=False)
    (want, want_kv), names = run()
    assert names and not any("l2pf" in x for x in names)
    monkeypatch.setenv("JAXENGINE_L2_PREFETCH", "mb=1,programs=16")
    (got, got_kv), names = run()
    assert names and all("_l2pf" in x for x in names)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    for a, b in zip(got_kv, want_kv):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
