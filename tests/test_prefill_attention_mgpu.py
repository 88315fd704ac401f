"""Mosaic GPU prefill attention (pallas_kernels/ragged_paged_attention/gpu_prefill.py) against the
jnp reference: fresh random ragged batches (long requests from scratch and as chunks at a context,
short requests the kernel must leave alone, bucket padding it must zero), GQA 1/4/8, head_dim 64
and 128, pages smaller than, equal to and larger than the key block, bf16 and f16; in Mosaic GPU's
interpreter on CPU (output buffers start as NaN there, so an unwritten row fails), compiled on a
Hopper GPU.  Then the two-launch path of gpu.py with the long launch on this kernel, its work
list, and its lowering for sm_90 on any host."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxengine.pallas_kernels.env import hopper
from jaxengine.pallas_kernels.ragged_paged_attention import gpu_prefill
from test_ragged_paged_attention import check, make_batch, reference_out, rel_err

BACKEND = jax.default_backend()
INTERPRET = BACKEND != "gpu"
if BACKEND == "gpu" and not hopper():
    pytest.skip("TMA + wgmma kernels need a Hopper GPU", allow_module_level=True)
TOL = {jnp.bfloat16: 2e-2, jnp.float16: 2e-2}


@pytest.fixture(autouse=True)
def _interpreter_callbacks_done():
    """The interpreter runs kernels as io_callbacks; let each finish before the next test."""
    jax.effects_barrier()
    yield
    jax.effects_barrier()


# (q_lens, ctx_lens, short_q, group, head_dim, page_size, dtype, block_kv)
CASES = [
    # one request from scratch: a partial last item (150 = 128 + 22 rows: the second warpgroup
    # of item 2 has no rows), the causal diagonal inside a block
    ([150], [150], 0, 1, 64, 16, jnp.bfloat16, 128),
    # a chunk at a context and a prompt; page 64 (two TMA copies a block), f16, GQA 4
    ([200, 70], [460, 70], 0, 4, 64, 64, jnp.float16, 128),
    # short requests (decode tokens, a 3-token prefill) among long ones: left to the other launch;
    # page = block, GQA 8, head_dim 128
    ([1, 129, 3, 1, 64], [90, 129, 40, 7, 500], 4, 8, 128, 128, jnp.bfloat16, 128),
    # pages bigger than the key block (a block is a slice of a page), block_kv 64
    ([100, 33], [356, 33], 0, 2, 64, 256, jnp.bfloat16, 64),
]


@pytest.mark.parametrize("q_lens,ctx_lens,short_q,group,head_dim,page_size,dtype,block_kv", CASES)
def test_prefill_kernel_matches_reference(q_lens, ctx_lens, short_q, group, head_dim, page_size,
                                          dtype, block_kv):
    seed = sum(q_lens) + group + page_size
    b = make_batch(seed, q_lens, ctx_lens, num_kv_heads=2 if group < 8 else 1, group=group,
                   head_dim=head_dim, page_size=page_size, dtype=dtype, extra_tokens=40)
    kw = dict(sm_scale=head_dim ** -0.5)
    out = gpu_prefill.prefill_attention(*b.args(), short_q=short_q, block_kv=block_kv,
                                        interpret=INTERPRET, **kw)
    jax.effects_barrier()
    out = np.asarray(out.astype(jnp.float32))
    ref = np.asarray(reference_out(b, kw))
    real = sum(q_lens)
    assert np.all(out[real:] == 0), "bucket padding rows must be zero"
    starts = np.concatenate([[0], np.cumsum(q_lens)])
    long_rows = np.concatenate([np.arange(starts[i], starts[i + 1])
                                for i, n in enumerate(q_lens) if n > short_q])
    assert np.all(np.isfinite(out[long_rows]))
    err = rel_err(out[long_rows], ref[long_rows])
    assert err <= TOL[dtype], f"relative error {err:.3g} > {TOL[dtype]}"


@pytest.mark.parametrize("num_ctas,stages", [(2, 2), (5, 3)])
def test_persistent_ctas_walk_their_items_in_turn(num_ctas, stages):
    """Fewer CTAs than (q head, work item) pairs: each CTA walks several items in turn, the K/V
    ring, its barriers' phases and the block count running on from one item into the next
    (items of different lengths, a warpgroup without rows, ZERO and IDLE items in between); the
    output is the reference's."""
    q_lens, ctx_lens, short_q = [150, 1, 200, 2], [150, 30, 330, 2], 2
    b = make_batch(77 + num_ctas, q_lens, ctx_lens, num_kv_heads=1, group=2, head_dim=64,
                   page_size=16, dtype=jnp.bfloat16, extra_tokens=40)
    kw = dict(sm_scale=0.125)
    out = gpu_prefill.prefill_attention(*b.args(), short_q=short_q, stages=stages, num_ctas=num_ctas,
                                        interpret=INTERPRET, **kw)
    jax.effects_barrier()
    out = np.asarray(out.astype(jnp.float32))
    ref = np.asarray(reference_out(b, kw))
    assert np.all(out[sum(q_lens):] == 0), "bucket padding rows must be zero"
    long_rows = np.r_[0:150, 151:351]
    assert rel_err(out[long_rows], ref[long_rows]) <= TOL[jnp.bfloat16]


def _bench_configs():
    """bench_attention's MGPU_SWEEP kernel configs (block_kv, ring depth), one param each."""
    import os
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
    import bench_attention
    return [pytest.param(kw["mgpu_kernel"], id=name) for name, kw in bench_attention.MGPU_SWEEP.items()
            if "mgpu_kernel" in kw]


@pytest.mark.parametrize("cfg", _bench_configs())
def test_bench_sweep_configs_match_reference(cfg):
    """The configurations the GPU benchmark sweeps are correct ones: a chunk at a context over
    several key blocks and a prompt, GQA 4, page 16."""
    b = make_batch(41, [90, 40], [300, 40], num_kv_heads=1, group=4, head_dim=64, page_size=16,
                   dtype=jnp.bfloat16, extra_tokens=6)
    kw = dict(sm_scale=0.125)
    out = gpu_prefill.prefill_attention(*b.args(), interpret=INTERPRET, **cfg, **kw)
    jax.effects_barrier()
    check(out, b, reference_out(b, kw), jnp.bfloat16)


def test_two_launch_step_with_the_mgpu_long_launch_matches_reference():
    """gpu.ragged_paged_attention with prefill_kernel="mgpu": the long requests on this kernel,
    the decode tokens on the Triton kernel's decode tile written into its output, padding zero."""
    from jaxengine.pallas_kernels.ragged_paged_attention import gpu
    b = make_batch(77, [1, 140, 1, 2, 66], [300, 140, 12, 50, 200], num_kv_heads=2, group=4,
                   head_dim=64, page_size=16, dtype=jnp.bfloat16, extra_tokens=21)
    kw = dict(sm_scale=0.125)
    out = gpu.ragged_paged_attention(*b.args(), short_q=4, prefill_kernel="mgpu", **kw)
    jax.effects_barrier()
    check(out, b, reference_out(b, kw), jnp.bfloat16)


def test_prefill_kernel_choice(monkeypatch, check_env_switch):
    from jaxengine.pallas_kernels.ragged_paged_attention import gpu
    check_env_switch("JAXENGINE_PREFILL_KERNEL", gpu_prefill.prefill_kernel_default, "mgpu", "TRITON", "triton")
    b = make_batch(5, [20], [20], num_kv_heads=1, group=1, head_dim=64, page_size=16,
                   dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match="prefill_kernel"):
        gpu.ragged_paged_attention(*b.args(), sm_scale=0.125, prefill_kernel="cudnn")
    # The default (and the environment's choice) is for Hopper GPUs: the interpreter takes the
    # Mosaic GPU kernel only when asked by argument (the engine's jit on the CPU keeps the Triton
    # kernel), and a step without a long launch never takes it.
    calls = []
    monkeypatch.setattr(gpu_prefill, "prefill_attention", lambda q, *a, **k: calls.append(1) or jnp.zeros_like(q))
    gpu.ragged_paged_attention(*b.args(), sm_scale=0.125, short_q=4)
    assert calls == ([] if INTERPRET else [1])  # compiled here means a Hopper GPU (module skip)
    calls.clear()
    gpu.ragged_paged_attention(*b.args(), sm_scale=0.125, prefill_kernel="mgpu")  # one launch
    assert calls == []
    gpu.ragged_paged_attention(*b.args(), sm_scale=0.125, short_q=4, prefill_kernel="mgpu")
    assert calls == [1]
    calls.clear()
    monkeypatch.setenv("JAXENGINE_PREFILL_KERNEL", "triton")
    gpu.ragged_paged_attention(*b.args(), sm_scale=0.125, short_q=4)
    assert calls == []
    monkeypatch.undo()
    # What the kernel cannot take: float32, head_dim 32 or 256, a sliding window, a soft cap, page 4.
    q, kv = b.q, b.kv_pages
    assert gpu_prefill.supported(q, kv, None, None)
    assert not gpu_prefill.supported(q.astype(jnp.float32), kv.astype(jnp.float32), None, None)
    assert not gpu_prefill.supported(q[..., :32], kv[..., :32], None, None)
    wide = jnp.zeros(q.shape[:2] + (256,), q.dtype)  # the ring and accumulator do not fit at 256
    assert not gpu_prefill.supported(wide, jnp.zeros(kv.shape[:3] + (256,), kv.dtype), None, None)
    assert not gpu_prefill.supported(q, kv, 64, None)
    assert not gpu_prefill.supported(q, kv, None, 30.0)
    assert not gpu_prefill.supported(q, kv.reshape(-1, 4, *kv.shape[2:]), None, None)
    with pytest.raises(ValueError, match="head_dim"):
        gpu_prefill.prefill_attention(q[..., :32], kv[..., :32], *b.args()[2:], sm_scale=0.1)


@pytest.mark.parametrize("seed", range(6))
def test_work_items_cover_long_rows_and_padding_once_longest_first(seed):
    rng = np.random.default_rng(seed)
    max_num_seqs, short_q = 9, int(rng.integers(0, 5))
    num_seqs = int(rng.integers(1, max_num_seqs + 1))
    q_lens = rng.integers(1, 400, num_seqs) * (rng.random(num_seqs) < 0.7) + 1
    ctx = q_lens + rng.integers(0, 900, num_seqs)
    cu = np.zeros(max_num_seqs + 1, np.int32)
    cu[1:num_seqs + 1] = np.cumsum(q_lens)
    cu[num_seqs + 1:] = cu[num_seqs]
    num_tokens = int(cu[-1]) + int(rng.integers(0, 300))
    kv_lens = np.zeros(max_num_seqs, np.int32)
    kv_lens[:num_seqs] = ctx
    kv_lens[num_seqs:] = rng.integers(1, 99, max_num_seqs - num_seqs)  # garbage rows
    num_work = gpu_prefill.num_work_items(num_tokens, max_num_seqs, short_q)
    kind, a, first, q_start, q_len, ctx_of = np.asarray(gpu_prefill.work_items(
        jnp.asarray(cu), jnp.asarray(kv_lens), jnp.asarray([num_seqs], jnp.int32),
        num_tokens=num_tokens, num_work=num_work, short_q=short_q))
    rows = gpu_prefill.ITEM_ROWS
    covered = np.zeros(num_tokens, int)
    walks = []
    for k, s, f, qs, ql, c in zip(kind, a, first, q_start, q_len, ctx_of):
        if k == gpu_prefill.ATTEND:
            assert q_lens[s] > short_q and f % rows == 0
            assert (qs, ql, c) == (cu[s], q_lens[s], ctx[s] - q_lens[s])  # the item's request's
            covered[cu[s] + f:cu[s] + min(f + rows, q_lens[s])] += 1
            walks.append(ctx[s] - q_lens[s] + min(f + rows, q_lens[s]))
        else:
            assert qs == ql == c == 0
        if k == gpu_prefill.ZERO:
            covered[f:min(f + rows, num_tokens)] += 1
    want = np.zeros(num_tokens, int)
    for i in range(num_seqs):
        if q_lens[i] > short_q:
            want[cu[i]:cu[i + 1]] = 1
    want[cu[num_seqs]:] = 1
    np.testing.assert_array_equal(covered, want)  # every long row and padding row exactly once
    assert walks == sorted(walks, reverse=True), "longest walks first"
    assert list(kind) == sorted(kind), "attention items, then padding items, then idle ones"


def test_kernel_lowers_to_mosaic_gpu_on_any_host():
    """The compiled path (P from registers, the accumulator as wgmma's C, TMA page copies, the
    output ladder) lowers for a Hopper GPU on this host: a kernel Mosaic GPU cannot lower fails
    in CI, not first on the GPU."""
    from jax import export
    b = make_batch(9, [300, 1, 64], [700, 50, 64], num_kv_heads=2, group=4, head_dim=128,
                   page_size=16, dtype=jnp.bfloat16, extra_tokens=30)

    for num_ctas in (None, 132):  # a CTA a (head, item) pair; persistent CTAs (an H100's SMs)
        def fn(*args):
            return gpu_prefill.prefill_attention(*args, sm_scale=0.088, short_q=4, num_ctas=num_ctas,
                                                 interpret=False)
        exp = export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=[
            export.DisabledSafetyCheck.custom_call("mosaic_gpu_v2")])(*b.args())
        assert "mosaic_gpu" in exp.mlir_module()
