"""Mosaic GPU decode attention (pallas_kernels/ragged_paged_attention/gpu_decode_mgpu.py) against
the jnp reference: fresh random decode batches (1, 3 and 8 requests, bucket-padding rows that must
come out zero), contexts from one key to several blocks with partial last pages and blocks, GQA
1/3/4/8 (3: the two-tile q path), head_dim 64 and 128, pages of 8, 16, 32 and 128 keys (128: a
block is a slice of a page), block_kv 64 and 128, one split and several (splits without keys
among them), bf16 and f16; in Mosaic GPU's interpreter on CPU (output buffers start as NaN there,
so an unwritten row fails), compiled on a Hopper GPU.  The cluster merge cannot run in the
interpreter (no rule for async_store_smem): on CPU its lowering for sm_90 is checked, its numbers
only on the GPU.  Then `supported`, the default config, the tiles' merge, and bench_attention's
--decode-mgpu table on a tiny shape."""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxengine.pallas_kernels.env import hopper
from jaxengine.pallas_kernels.ragged_paged_attention import gpu_decode_mgpu as mgpu
from test_ragged_paged_attention import make_batch, reference_out, rel_err

BACKEND = jax.default_backend()
INTERPRET = BACKEND != "gpu"
if BACKEND == "gpu" and not hopper():
    pytest.skip("TMA + wgmma kernels need a Hopper GPU", allow_module_level=True)
TOL = {jnp.bfloat16: 2e-2, jnp.float16: 2e-2}
MERGES = ["combine"] if INTERPRET else ["combine", "cluster"]


@pytest.fixture(autouse=True)
def _interpreter_callbacks_done():
    """The interpreter runs kernels as io_callbacks; let each finish before the next test."""
    jax.effects_barrier()
    yield
    jax.effects_barrier()


def _decode_batch(seed, ctx_lens, *, group, head_dim, page_size, dtype=jnp.bfloat16, pad_rows=2,
                  num_kv_heads=None):
    """One decode token a request (row j = request j), pad_rows padding rows after them."""
    return make_batch(seed, [1] * len(ctx_lens), ctx_lens, num_kv_heads=num_kv_heads or (1 if group == 8 else 2),
                      group=group, head_dim=head_dim, page_size=page_size, dtype=dtype, extra_tokens=pad_rows)


def _run(b, **kw):
    q, kv_pages, kv_lens, page_indices, _, num_seqs = b.args()
    return mgpu.decode_attention(q, kv_pages, kv_lens, page_indices, num_seqs, interpret=INTERPRET, **kw)


def _check(out, b, sm_scale, dtype=jnp.bfloat16):
    jax.effects_barrier()
    out = np.asarray(out.astype(jnp.float32))
    n = len(b.ctx_lens)
    assert out.shape == b.q.shape
    assert np.all(out[n:] == 0), "bucket padding rows must be zero"
    assert np.all(np.isfinite(out[:n])), "non-finite (unwritten?) rows"
    ref = np.asarray(reference_out(b, dict(sm_scale=sm_scale)))
    err = rel_err(out[:n], ref[:n])
    assert err <= TOL[dtype], f"relative error {err:.3g} > {TOL[dtype]}"
    for j in range(n):  # each request on its own, so a wrong short one does not hide among long ones
        assert rel_err(out[j], ref[j]) <= 3 * TOL[dtype], f"request {j} (context {b.ctx_lens[j]})"


# (ctx_lens, group, head_dim, page_size, dtype, num_splits, block_kv, stages, pad_rows).  Every
# case but the last has a split that walks more blocks than its ring holds (the refills).
CASES = [
    # one request, one split (the CTA stores the output itself), GQA 1, a partial last page:
    # 7 blocks through 2 slots
    ([400], 1, 64, 16, jnp.bfloat16, 1, 64, 2, 2),
    # batch 3 + 3 padding rows, 2 splits: a 1-key context (split 1 has no keys), a whole block,
    # 8 blocks with a partial last one; GQA 4, head_dim 128 (the 8B shape)
    ([1, 64, 450], 4, 128, 16, jnp.bfloat16, 2, 64, 2, 3),
    # batch 8 (GQA 8, one kv head), page 32, 4 splits, a 3-slot ring: contexts around block edges
    ([5, 16, 17, 63, 64, 65, 1000, 129], 8, 64, 32, jnp.bfloat16, 4, 64, 3, 2),
    # block_kv < page_size (a block is a slice of a 128-key page), 3 splits, f16
    ([520, 20], 2, 128, 128, jnp.float16, 3, 64, 2, 1),
    # GQA 3: a group straddles two 8-row q tiles (N = 16)
    ([290, 33, 7], 3, 64, 16, jnp.bfloat16, 2, 64, 2, 1),
    # block_kv 128 (M = 128 for S^T), 8-key pages (16 TMA copies a block), 2 splits
    ([1, 129, 700], 4, 128, 8, jnp.bfloat16, 2, 128, 2, 2),
    # one split, the 8B shape (the batch-64 default): kv head 1's group sits at column 4 of its tile
    ([33, 300], 4, 128, 16, jnp.bfloat16, 1, 64, 3, 1),
    # one split, GQA 3 (two q tiles, the group at any column offset)
    ([150, 7], 3, 64, 16, jnp.bfloat16, 1, 64, 2, 2),
    # 8 splits of a short context: most splits have no keys; a ring deeper than any split's walk
    ([10, 70], 4, 64, 16, jnp.bfloat16, 8, 64, 4, 2),
]


def _case_id(case):
    ctx, group, d, ps, dtype, splits, bk, stages, _ = case
    return f"b{len(ctx)}-g{group}-d{d}-p{ps}-{jnp.dtype(dtype).name}-s{splits}-bk{bk}-st{stages}"


@pytest.mark.parametrize("merge", MERGES)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_decode_kernel_matches_reference(case, merge):
    ctx, group, head_dim, page_size, dtype, splits, block_kv, stages, pad = case
    if merge == "cluster" and splits == 1:
        pytest.skip("one split: no merge")
    b = _decode_batch(sum(ctx) + group + page_size, ctx, group=group, head_dim=head_dim, page_size=page_size,
                      dtype=dtype, pad_rows=pad)
    sm_scale = head_dim ** -0.5
    out = _run(b, sm_scale=sm_scale, num_splits=splits, block_kv=block_kv, stages=stages, merge=merge)
    _check(out, b, sm_scale, dtype)


@pytest.mark.parametrize("cfg", [{}, dict(num_splits=8, stages=4), dict(num_splits=2, block_kv=128, stages=2)],
                         ids=["default", "s8st4", "s2bk128"])
def test_cluster_merge_matches_reference(cfg):
    """merge="cluster" at issue 3's shape (8B: 32 q heads, 8 kv heads, head_dim 128, page 16; 8
    requests around a 2k context, 2 padding rows): each split's partial into split 0's shared
    memory (async_store_smem), merged there; the default config (4 splits, a 2-slot ring), the
    biggest cluster, 128-key blocks.  Compiled only: Mosaic GPU's interpreter has no rule for
    async_store_smem (on CPU the lowering tests below cover this path, and decode_attention
    refuses it in interpret mode)."""
    if INTERPRET:
        with pytest.raises(NotImplementedError, match="async_store_smem"):
            b = _decode_batch(1, [20], group=4, head_dim=64, page_size=16)
            _run(b, sm_scale=0.125, num_splits=2, merge="cluster")
        pytest.skip("Mosaic GPU's interpreter has no rule for async_store_smem: the cluster merge runs "
                    "compiled only (its lowering is checked on any host)")
    b = _decode_batch(7, [2048, 2047, 1, 64, 1000, 2049, 300, 129], group=4, head_dim=128, page_size=16,
                      num_kv_heads=8)
    out = _run(b, sm_scale=128 ** -0.5, merge="cluster", **cfg)
    _check(out, b, 128 ** -0.5)


@pytest.mark.parametrize("merge", MERGES)
def test_v_through_registers_matches_reference(merge):
    """v_via_registers (the fallback for PV's transposed shared-memory A operand: V^T through
    registers into a K-major tile): two splits, GQA 4, head_dim 128, a ring that wraps."""
    b = _decode_batch(11, [450, 1, 77], group=4, head_dim=128, page_size=16, pad_rows=2)
    out = _run(b, sm_scale=0.09, num_splits=2, stages=2, merge=merge, v_via_registers=True)
    _check(out, b, 0.09)


def test_default_config_and_call_match_reference():
    """decode_attention with nothing but sm_scale: the shape's default splits and ring, the
    backend's default merge (combine in the interpreter, cluster compiled)."""
    b = _decode_batch(3, [200, 3, 77], group=4, head_dim=64, page_size=16)
    out = _run(b, sm_scale=0.125)
    _check(out, b, 0.125)


def _bench_variants():
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
    import bench_attention
    variants, seen = {}, set()
    for name, kw in {**bench_attention.DECODE_MGPU_SWEEP, **bench_attention.DECODE_MGPU_FOCUS["variants"]}.items():
        key = tuple(sorted(kw.items()))
        if key not in seen:  # the focus sweep repeats configs (the run-to-run spread): each tested once
            seen.add(key)
            variants[name] = kw
    return variants


def test_bench_sweep_configs_match_reference():
    """Every config bench_attention --decode-mgpu sweeps is a correct one (merge "combine" here;
    the cluster merge of the same configs is lowered below and compiled on the GPU): GQA 4, page
    16, contexts across several blocks."""
    b = _decode_batch(41, [300, 129, 2], group=4, head_dim=64, page_size=16, pad_rows=1, num_kv_heads=1)
    for name, kw in _bench_variants().items():
        out = _run(b, sm_scale=0.125, merge="combine", **kw)
        _check(out, b, 0.125)


def test_merge_tiles_is_merge_partials():
    """The cluster merge's arithmetic (elementwise on [64, N] log-sum-exp tiles and [d, N] partial
    tiles) is the combine kernel's (gpu.merge_partials on rows), splits without keys (-inf) and
    a column no split saw (0) included."""
    from jaxengine.pallas_kernels.ragged_paged_attention.gpu import merge_partials
    rng = np.random.default_rng(0)
    splits, cols, head_dim = 4, 8, 128
    lse = rng.normal(size=(splits, cols)).astype(np.float32) * 4
    lse[1, :3] = -np.inf  # split 1 saw no keys in columns 0-2
    lse[:, 5] = -np.inf  # column 5: no split saw a key
    parts = rng.normal(size=(splits, head_dim, cols)).astype(np.float32)
    parts[:, :, 5] = 0.0
    tiles = mgpu._merge_tiles([jnp.broadcast_to(jnp.asarray(x)[None], (64, cols)) for x in lse],
                              [jnp.asarray(p) for p in parts], head_dim)
    rows = merge_partials([jnp.asarray(x) for x in lse], [jnp.asarray(p.T) for p in parts])
    np.testing.assert_allclose(np.asarray(tiles).T, np.asarray(rows), rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(tiles)[:, 5] == 0)


def test_supported_and_refusals():
    b = _decode_batch(5, [20], group=4, head_dim=64, page_size=16)
    q, kv = b.q, b.kv_pages
    assert mgpu.supported(q, kv)
    assert mgpu.supported(q, kv, block_kv=128)
    assert not mgpu.supported(q.astype(jnp.float32), kv.astype(jnp.float32))
    assert not mgpu.supported(q, kv.astype(jnp.float16))  # mixed dtypes
    assert not mgpu.supported(q[..., :32], kv[..., :32])  # head_dim 32
    wide = jnp.zeros(q.shape[:2] + (256,), q.dtype)
    assert not mgpu.supported(wide, jnp.zeros(kv.shape[:3] + (256,), kv.dtype))  # head_dim 256
    assert not mgpu.supported(q, kv, sliding_window=64)
    assert not mgpu.supported(q, kv, soft_cap=30.0)
    assert not mgpu.supported(q, kv.reshape(-1, 4, *kv.shape[2:]))  # page 4: no whole TMA tile
    assert not mgpu.supported(q, jnp.zeros((4, 24) + kv.shape[2:], kv.dtype))  # page 24 vs block 64
    assert not mgpu.supported(q, kv, block_kv=32)  # wgmma's M is 64
    assert not mgpu.supported(jnp.zeros((q.shape[0], 16 * 2, 64), q.dtype), kv)  # GQA 16
    assert not mgpu.supported(jnp.zeros((q.shape[0], 7, 64), q.dtype), kv)  # q heads not a multiple
    args = b.args()[2:4] + (b.num_seqs,)
    with pytest.raises(ValueError, match="head_dim 64 or 128"):
        mgpu.decode_attention(q[..., :32], kv[..., :32], *args, sm_scale=0.1)
    with pytest.raises(ValueError, match="merge"):
        mgpu.decode_attention(q, kv, *args, sm_scale=0.1, merge="atomic")
    with pytest.raises(ValueError, match="at most 8"):
        mgpu.decode_attention(q, kv, *args, sm_scale=0.1, num_splits=16, merge="cluster", interpret=False)
    assert mgpu.merge_default(True) == "combine" and mgpu.merge_default(False) == "cluster"


def test_default_config_fills_the_gpu_and_fits_shared_memory():
    """8B shapes (32 q heads, 8 kv heads, head_dim 128, page 16, a 512-page table): batch 8 (64
    pairs: 2 splits fill one wave of one CTA an SM, 4 would not) gets 2 splits of 128-key blocks
    with a 2-slot ring (the H100's best, 128 CTAs); batch 16 the most splits resident at once with
    64-key blocks (2: 256 CTAs, two an SM), batch 1 the most splits a cluster takes with a 4-slot
    ring (64 CTAs, one an SM), batch 64 one split; every default's shared memory fits a CTA (227 KB)."""
    cfg = lambda rows, merge: mgpu.default_config(rows, 8, 32, 128, 16, 512, merge)  # noqa: E731
    assert cfg(8, "cluster") == cfg(8, "combine") == dict(num_splits=2, block_kv=128, stages=2)
    assert 8 * 8 * 2 <= 132 < 8 * 8 * 4
    assert cfg(16, "cluster") == dict(num_splits=2, block_kv=64, stages=2)
    assert 16 * 8 * 2 <= 132 * mgpu.ctas_per_sm(mgpu.smem_bytes(128, 64, 2, 8, 2, "cluster"))
    assert cfg(4, "cluster")["block_kv"] == 64  # 32 pairs: not the batch-8 rule
    assert mgpu.default_config(8, 8, 32, 128, 16, 8, "cluster")["block_kv"] == 64  # 128 keys: too short for it
    assert cfg(1, "cluster") == dict(num_splits=8, block_kv=64, stages=4)
    assert cfg(1, "combine")["num_splits"] == 16
    assert cfg(64, "cluster")["num_splits"] == cfg(64, "combine")["num_splits"] == 1
    assert mgpu.default_config(8, 8, 32, 128, 16, 2, "cluster")["num_splits"] == 1  # 32 keys: one block
    for rows in (1, 8, 64, 256):
        for merge in mgpu.MERGES:
            c = cfg(rows, merge)
            assert mgpu.smem_bytes(128, c["block_kv"], c["stages"], 8, c["num_splits"], merge) <= 227 * 1024
    assert mgpu.q_cols(32, 4) == 8 and mgpu.q_cols(12, 3) == 16 and mgpu.q_cols(4, 4) == 16


def _lower(fn, *args) -> str:
    from jax import export
    if BACKEND != "gpu":  # the combine kernel's Triton lowering asks for the GPU's generation
        from jax._src.pallas.triton import gpu_info
        get = gpu_info.get_gpu_info
        gpu_info.get_gpu_info = lambda: gpu_info._get_gpu_info_impl(gpu_info.GpuVersion.H100)
    try:
        exp = export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=[
            export.DisabledSafetyCheck.custom_call("mosaic_gpu_v2"),
            export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*args)
    finally:
        if BACKEND != "gpu":
            gpu_info.get_gpu_info = get
    return exp.mlir_module()


def _sds(shape, dtype=jnp.int32):
    return jax.ShapeDtypeStruct(shape, dtype)


# (merge, num_splits, stages, block_kv, group, head_dim, page_size)
LOWERINGS = [
    ("cluster", 4, 2, 64, 4, 128, 16),  # issue 3's shape and the b8 default
    ("cluster", 8, 4, 64, 4, 128, 16),  # the b1 default: the biggest portable cluster
    ("cluster", 2, 2, 128, 3, 64, 128),  # two q tiles, block_kv 128, a block inside a page
    ("combine", 4, 2, 64, 4, 128, 16),
    ("combine", 16, 2, 64, 8, 64, 32),
    ("combine", 1, 3, 64, 1, 128, 16),  # one split: the output straight from the kernel
    ("cluster-vreg", 4, 2, 64, 4, 128, 16),  # v_via_registers (PV's A through registers)
]


@pytest.mark.parametrize("merge,splits,stages,block_kv,group,head_dim,page_size", LOWERINGS)
def test_kernel_lowers_to_mosaic_gpu_on_any_host(merge, splits, stages, block_kv, group, head_dim, page_size):
    """The compiled paths (the TMA ring, swap-AB wgmma with the transposed V operand, the
    transposed P^T / output stores, the cluster's async_store_smem, the combine kernel) lower for
    sm_90 on this host: a kernel Mosaic GPU cannot lower fails in CI, not first on the GPU.  The
    cluster merge is one kernel and no combine; the combine path is two."""
    rows, kv_heads = 8, 8 if group != 3 else 4
    args = (_sds((rows, kv_heads * group, head_dim), jnp.bfloat16),
            _sds((300, page_size, 2 * kv_heads, head_dim), jnp.bfloat16),
            _sds((rows,)), _sds((rows, 4096 // page_size)), _sds((1,)))
    vreg = merge.endswith("-vreg")
    merge = merge.removesuffix("-vreg")
    fn = lambda *a: mgpu.decode_attention(*a, sm_scale=0.088, num_splits=splits, stages=stages,  # noqa: E731
                                          block_kv=block_kv, merge=merge, v_via_registers=vreg,
                                          interpret=False)
    module = _lower(fn, *args)
    assert module.count("mosaic_gpu") >= 1
    assert ("__gpu$xla.gpu.triton" in module) == (merge == "combine" and splits > 1)


def test_probe_levels_run_and_lower():
    """scripts/mgpu_decode_probe.py's truncated kernels (gpu_decode_mgpu._attend(probe=0|1|2): q
    only, + the ring's first copies awaited, + the loop without PV) keep every barrier phase
    observed (the interpreter checks it) and lower with both merges; the full kernel is level 3."""
    b = _decode_batch(2, [200, 9], group=4, head_dim=64, page_size=16, pad_rows=1)
    q, kv, kv_lens, table, _, num_seqs = b.args()
    for probe in (0, 1, 2):
        mgpu._attend(q, kv, kv_lens, table, num_seqs, sm_scale=0.125, num_splits=1, block_kv=64, stages=2,
                     merge="combine", interpret=INTERPRET, probe=probe)
        jax.effects_barrier()
    args = (_sds((8, 32, 128), jnp.bfloat16), _sds((300, 16, 16, 128), jnp.bfloat16), _sds((8,)),
            _sds((8, 256)), _sds((1,)))
    for merge in mgpu.MERGES:
        for probe in (0, 1, 2):
            _lower(lambda *a, merge=merge, probe=probe: mgpu._attend(  # noqa: E731
                *a, sm_scale=0.1, num_splits=4, block_kv=64, stages=2, merge=merge, interpret=False,
                probe=probe), *args)


def test_smem_estimate_covers_what_mosaic_allocates(monkeypatch):
    """default_config's occupancy model (`smem_bytes`) is at most ~1.5 KB above Mosaic's own
    count (read from its shared-memory check with the bound set to 1 byte), never below."""
    import re

    import jax.experimental.mosaic.gpu.core as mosaic_core
    monkeypatch.setattr(mosaic_core, "_SMEM_SIZE_BOUND", 1)
    for merge, splits, stages, block_kv, group in [("cluster", 4, 2, 64, 4), ("cluster", 8, 4, 64, 4),
                                                   ("combine", 4, 2, 64, 4), ("combine", 1, 2, 64, 4),
                                                   ("cluster", 2, 2, 128, 3)]:
        kv_heads = 8 if group != 3 else 4
        args = (_sds((8, kv_heads * group, 128), jnp.bfloat16), _sds((300, 16, 2 * kv_heads, 128), jnp.bfloat16),
                _sds((8,)), _sds((8, 256)), _sds((1,)))
        fn = lambda *a: mgpu._attend(*a, sm_scale=0.1, num_splits=splits, block_kv=block_kv,  # noqa: E731
                                     stages=stages, merge=merge, interpret=False)
        with pytest.raises(ValueError, match="exceeds available shared memory") as e:
            _lower(fn, *args)
        actual = int(re.search(r"smem_bytes=(\d+)", str(e.value)).group(1))
        estimate = mgpu.smem_bytes(128, block_kv, stages, mgpu.q_cols(kv_heads * group, group), splits, merge)
        assert actual <= estimate <= actual + 1536, (merge, splits, stages, block_kv, group, actual, estimate)


def test_bench_variants_lower_with_the_cluster_merge():
    """bench_attention's --decode-mgpu sweep at its 8B batch-8 shape, cluster merge, lowers."""
    args = (_sds((8, 32, 128), jnp.bfloat16), _sds((1100, 16, 16, 128), jnp.bfloat16),
            _sds((8,)), _sds((8, 512)), _sds((1,)))
    for name, kw in _bench_variants().items():
        _lower(lambda *a, kw=kw: mgpu.decode_attention(*a, sm_scale=0.088, merge="cluster", interpret=False,
                                                       **kw), *args)


def test_bench_decode_mgpu_table_on_a_tiny_shape(monkeypatch):
    """bench_attention --decode-mgpu's table (interpreter): one row per impl and case, each timed
    and checked against the reference, none failing."""
    _bench_variants()
    import bench_attention as ba
    for name, value in (("NUM_Q_HEADS", 4), ("NUM_KV_HEADS", 1), ("HEAD_DIM", 64), ("SM_SCALE", 0.125)):
        monkeypatch.setattr(ba, name, value)
    cfg = dict(cases=[(3, 70)], page_size=16, pages_per_seq=8, merges=("combine", "combine"),
               sweep_cases=((3, 70),), variants={"s1st2": dict(num_splits=1, stages=2)}, triton=True, ragged=True)
    rows = []
    ba.decode_mgpu_table(rows, hbm=1e12, mxu=1e14, cfg=cfg, inner=1, repeats=1)
    # (the merge named twice: a config of several splits runs once per merge, one split once)
    assert [(r["case"], r["impl"]) for r in rows] == [
        ("b3 ctx70", impl)
        for impl in ("triton_decode", "ragged", "ragged decode_only", "mgpu[combine] s2 st4 bk64",
                     "mgpu[combine] s2 st4 bk64")
    ] + [("b3 ctx70", "mgpu[one split,s1st2]")]
    assert all("error" not in r and r["time_us"] > 0 for r in rows), rows
    assert all(r["rel_err"] < 2e-2 for r in rows if r["impl"] != "triton_decode"), rows  # (it also ropes q)
    assert set(ba.DECODE_MGPU_QUICK["cases"]) == {(8, 2048), (8, 8192), (64, 2048), (1, 2048)}


def test_ragged_entry_routes_decode_only_steps_to_this_kernel(monkeypatch):
    """gpu.ragged_paged_attention(..., decode_only=True): the step runs this kernel where it
    applies (a Hopper GPU, or the interpreter when decode_kernel is given), the ragged kernel
    otherwise (decode_kernel "ragged", float32, an interpreter not asked); the same numbers."""
    from jaxengine.pallas_kernels.ragged_paged_attention import gpu

    calls = []
    original = mgpu.decode_attention
    monkeypatch.setattr(mgpu, "decode_attention", lambda *a, **k: calls.append(k) or original(*a, **k))
    sm_scale = 128 ** -0.5
    b = _decode_batch(11, [300, 70, 1], group=4, head_dim=128, page_size=16)
    args = b.args()
    assert args[0].shape[0] == args[3].shape[0]  # q rows = page-table rows: the decode contract
    attend = lambda dtype_batch, **kw: gpu.ragged_paged_attention(  # noqa: E731
        *dtype_batch.args(), sm_scale=sm_scale, decode_only=True, interpret=INTERPRET, **kw)
    _check(attend(b, decode_kernel="mgpu"), b, sm_scale)
    assert len(calls) == 1
    _check(attend(b), b, sm_scale)  # the default: this kernel compiled on Hopper, the ragged one interpreted
    assert len(calls) == (2 if hopper() and not INTERPRET else 1)
    _check(attend(b, decode_kernel="ragged"), b, sm_scale)
    f32 = _decode_batch(12, [90, 3], group=4, head_dim=64, page_size=16, dtype=jnp.float32)
    out = np.asarray(attend(f32, decode_kernel="mgpu"))  # unsupported here: the ragged kernel
    ref = np.asarray(reference_out(f32, dict(sm_scale=sm_scale)))
    assert rel_err(out[:2], ref[:2]) <= 1e-5 and len(calls) == (2 if hopper() and not INTERPRET else 1)
    with pytest.raises(ValueError, match="decode_kernel"):
        attend(b, decode_kernel="triton")
