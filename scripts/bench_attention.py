"""Benchmark ragged paged attention on the local accelerator; prints a table, writes JSON.

    python scripts/bench_attention.py --out bench_attention.json [--quick | --prefill-sweep]

Shapes are Llama-3-8B's attention (32 q heads, 8 kv heads, head_dim 128, bf16).  Each figure is
the median over repeats of the time per call, with every call inside one jitted fori_loop (so
host dispatch is not timed) and a warm-up first.  Ceilings are measured in the same run, as
bench_latency.py does: HBM bandwidth is the best of an XLA elementwise copy (bytes read + written),
an XLA read-only sum and, where torch is installed, torch's device copy; bf16 matmul rate the best
of XLA's and torch's 8192^3 product.  "bytes" counts what a step must read at least once (each request's K/V for
all kv heads, q) and write (out); "flops" counts 4 * head_dim per visible (q head, key) pair.
"rel err" is against the jnp reference where it fits in memory, else (one whole causal prefill)
against jax.nn.dot_product_attention on the same K/V gathered out of the pages.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from jaxengine.pallas_kernels.ragged_paged_attention import gpu, gpu_prefill, reference

NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM = 32, 8, 128
DTYPE = jnp.bfloat16
SM_SCALE = HEAD_DIM ** -0.5
MAX_CTX_TOKENS = 1 << 21  # per case: 2M tokens of K/V = 8.6 GB in bf16
# --kv-pool-gib: the page pool's size (0: just the pages the case reads).  An engine's pool is tens
# of GB with a request's pages anywhere in it; a pool of the case's own pages puts the whole K/V in
# one span the size of the L2 cache at batch 8 / context 2k (67 MB).
KV_POOL_BYTES = 0


def pool_pages(needed: int, page_size: int) -> int:
    """Pages in the pool: `needed` or, with --kv-pool-gib, the pool's size if that is more."""
    page_bytes = page_size * 2 * NUM_KV_HEADS * HEAD_DIM * jnp.dtype(DTYPE).itemsize
    return max(needed, KV_POOL_BYTES // page_bytes)


def pool_with(pages: jax.Array, num_pages: int, where: np.ndarray) -> jax.Array:
    """A pool of num_pages pages, zeros but for `pages` at page ids `where`."""
    if num_pages == pages.shape[0] and np.array_equal(where, np.arange(num_pages)):
        return pages
    return jnp.zeros((num_pages,) + pages.shape[1:], pages.dtype).at[jnp.asarray(where)].set(pages)
# Prefill tuning sweep (chunks 4096 and 8192; group 4, so rows = 4 * block_q).  The defaults are
# block_q 32 (128 rows), block_k 32, 8 warps, 2 stages, prescale_q off.  Every entry runs through
# the kernel in tests/test_ragged_paged_attention.py, so the sweep never times an untested config.
# Beside each: registers and shared memory from an offline Triton 3.6 compile for sm_90a (page 32).
# At 2 stages the next block's K/V copy is issued after this block's dots and awaited first thing
# in the next iteration (no overlap at 1 program per SM); 3+ stages keep a block in flight.
PREFILL_SWEEP = {
    "st3": dict(num_stages=3),  # 204 regs, 80 KB
    "st4": dict(num_stages=4),  # 204 regs, 96 KB
    "bq32bk64": dict(block_q=32, block_k=64),  # 234 regs, 96 KB
    "bk64st3": dict(block_k=64, num_stages=3),  # 255 regs, 128 KB
    "bk64st4": dict(block_k=64, num_stages=4),  # 255 regs, 160 KB
    "bk128w8": dict(block_k=128, num_warps=8),  # 255 regs (8 B spilled), 160 KB
    "bk128w8st3": dict(block_k=128, num_warps=8, num_stages=3),  # 40 B spilled, 224 KB
    "bq64bk64w8": dict(block_q=64, block_k=64, num_warps=8),  # 256 rows: 1.4 KB spilled
    "w4": dict(num_warps=4),  # 1 KB spilled
    "bk64w4st3": dict(block_k=64, num_warps=4, num_stages=3),  # 1.5 KB spilled
    "pq": dict(prescale_q=True),
    "bq64bk64w8st4": dict(block_q=64, block_k=64, num_warps=8, num_stages=4),
    "st3pq": dict(num_stages=3, prescale_q=True),
    "bk64st3pq": dict(block_k=64, num_stages=3, prescale_q=True),
}


def timed(fn, *args, inner=10, repeats=5):
    """(median seconds per call of fn(*args), its output), fn's calls chained in one jitted loop;
    the output doubles as the correctness check, so each config compiles once."""
    loop = _chained(fn, inner)
    out = jax.block_until_ready(loop(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(loop(*args))
        times.append((time.perf_counter() - t0) / (inner + 1))
    return statistics.median(times), out


def _chained(fn, inner):
    def loop(*args):
        q = args[0]
        out = fn(*args)
        for _ in range(inner):  # unrolled: an XLA while loop would add a host sync per trip
            # A false dependency on the previous output keeps the calls in order and alive.
            out = fn(q + (out.reshape(-1)[0] * 0).astype(q.dtype), *args[1:])
        return out
    return jax.jit(loop)


def device_time(fn, *args, inner=10):
    """Seconds of device kernel time per call of fn (the sum of its kernels' durations in a
    jax.profiler trace of one chained loop, less the loop's own dependency kernel, timed the same
    way on a loop of the identity), or None where the trace has no device kernels (CPU).  Unlike
    timed(), this leaves out host dispatch and the gaps between kernels."""
    import tempfile

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_forward import device_events

    def busy(f):
        loop = _chained(f, inner)
        jax.block_until_ready(loop(*args))
        with tempfile.TemporaryDirectory() as d:
            with jax.profiler.trace(d):
                jax.block_until_ready(loop(*args))
            events = device_events(d)
        return sum(float(e["dur"]) for e in events) * 1e-6 / (inner + 1) if events else None

    total = busy(fn)
    if total is None:
        return None
    harness = busy(lambda q, *rest: q) or 0.0
    return max(total - harness, 0.0)


def measure_ceilings():
    """The two ceilings, as bench_latency measures them: the best of XLA's copy / read-only sum and
    (where torch is installed) a cudaMemcpy-class copy; the best of XLA's and cuBLAS's bf16 matmul."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_latency import measure_ceilings as both

    c = both()
    print("ceilings: " + ", ".join(f"{k} {v / 1e12:.2f}T" for k, v in c.items()), flush=True)
    return c["copy_bytes_per_s"], c["matmul_flops_per_s"]


def make_step(q_lens, ctx_lens, page_size, seed=0, max_num_seqs=None):
    """A ragged step with random data: request i has q_lens[i] queries, ctx_lens[i] context."""
    rng = np.random.default_rng(seed)
    num_seqs = len(q_lens)
    max_num_seqs = max_num_seqs or num_seqs
    pages_per_seq = max(-(-c // page_size) for c in ctx_lens)
    need = [-(-c // page_size) for c in ctx_lens]
    num_pages = sum(need) + 1
    pool = pool_pages(num_pages, page_size)
    perm = rng.permutation(pool)[:num_pages].astype(np.int32)  # scattered pages, as in a real pool
    page_indices = np.zeros((max_num_seqs, pages_per_seq), np.int32)
    at = 0
    for i, n in enumerate(need):
        page_indices[i, :n] = perm[at:at + n]
        at += n
    key = jax.random.key(seed)
    kv_pages = jax.random.normal(key, (num_pages, page_size, 2 * NUM_KV_HEADS, HEAD_DIM), DTYPE)
    kv_pages = pool_with(kv_pages, pool, np.sort(perm))  # page ids of perm keep their data
    num_tokens = sum(q_lens)
    q = jax.random.normal(jax.random.fold_in(key, 1), (num_tokens, NUM_Q_HEADS, HEAD_DIM), DTYPE)
    cu = np.zeros(max_num_seqs + 1, np.int32)
    cu[1:num_seqs + 1] = np.cumsum(q_lens)
    cu[num_seqs + 1:] = cu[num_seqs]
    kv_lens = np.zeros(max_num_seqs, np.int32)
    kv_lens[:num_seqs] = ctx_lens
    args = (q, kv_pages, jnp.asarray(kv_lens), jnp.asarray(page_indices), jnp.asarray(cu),
            jnp.asarray([num_seqs], jnp.int32))
    kv_bytes = sum(ctx_lens) * 2 * NUM_KV_HEADS * HEAD_DIM * 2
    bytes_ = kv_bytes + 2 * q.nbytes
    visible = sum(sum(c - ql + j + 1 for j in range(ql)) if ql < 4096 else
                  ql * (c - ql) + ql * (ql + 1) // 2 for ql, c in zip(q_lens, ctx_lens))
    flops = 4 * HEAD_DIM * NUM_Q_HEADS * visible
    return args, bytes_, flops


def jax_gpu_paged_attention_peer(args, page_size):
    """jax.experimental.pallas.ops.gpu.paged_attention (decode only): K and V as separate
    [kv_heads, pages, page_size, head_dim] arrays (converted outside the timed region)."""
    from jax.experimental.pallas.ops.gpu import paged_attention as pa
    q, kv_pages, kv_lens, page_indices, _, _ = args
    k_pages = jnp.transpose(kv_pages[:, :, 0::2], (2, 0, 1, 3))
    v_pages = jnp.transpose(kv_pages[:, :, 1::2], (2, 0, 1, 3))
    pages_per_seq = page_indices.shape[1]
    k_splits = min(16, pages_per_seq)
    while pages_per_seq % k_splits:
        k_splits //= 2
    ppcb = max(1, min(8, 128 // page_size, pages_per_seq // k_splits))
    fn = lambda q, k, v, bt, lens: pa.paged_attention(
        q * SM_SCALE, k, v, bt, lens, k_splits=k_splits, pages_per_compute_block=ppcb)
    return fn, (q, k_pages, v_pages, page_indices, kv_lens)


def dense_causal_reference(args, num_tokens):
    """One request's whole causal prefill: its K/V gathered out of the pages into contiguous
    arrays, then jax.nn.dot_product_attention (XLA's: ~9 GB of f32 logits at 8192 tokens)."""
    q, kv_pages, _, page_indices, _, _ = args
    ctx = kv_pages[page_indices[0]].reshape(-1, 2 * NUM_KV_HEADS, HEAD_DIM)[None, :num_tokens]
    attend = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, is_causal=True, scale=SM_SCALE))
    return attend(q[None], ctx[:, :, 0::2], ctx[:, :, 1::2])[0]


def dense_kv(num_tokens):
    """Random K and V [1, num_tokens, kv heads, head_dim] for the dense prefill peers."""
    shape = (1, num_tokens, NUM_KV_HEADS, HEAD_DIM)
    return (jax.random.normal(jax.random.key(5), shape, DTYPE),
            jax.random.normal(jax.random.key(6), shape, DTYPE))


def run_case(rows, kind, name, q_lens, ctx_lens, page_size, hbm, mxu, peers=(), variants=None,
             max_num_seqs=None):
    args, bytes_, flops = make_step(q_lens, ctx_lens, page_size, max_num_seqs=max_num_seqs)
    impls = {"ours": lambda *a: gpu.ragged_paged_attention(*a, sm_scale=SM_SCALE)}
    for vname, kw in (variants or {}).items():
        if "mgpu_kernel" in kw:  # the Mosaic GPU prefill kernel alone (every request long)
            impls[f"ours[{vname}]"] = (lambda kw: lambda *a: gpu_prefill.prefill_attention(
                *a, sm_scale=SM_SCALE, **kw))(kw["mgpu_kernel"])
            continue
        impls[f"ours[{vname}]"] = (lambda kw: lambda *a: gpu.ragged_paged_attention(
            *a, sm_scale=SM_SCALE, **kw))(kw)
    ref_out = None
    for impl, fn in impls.items():
        row = dict(kind=kind, case=name, page_size=page_size, impl=impl, bytes=bytes_,
                   flops=flops)
        try:
            t, out = timed(fn, *args)
            row.update(time_us=t * 1e6, hbm_frac=bytes_ / t / hbm, mxu_frac=flops / t / mxu)
            if DEVICE_TIME:
                _add_device_time(row, device_time(fn, *args), bytes_, flops, hbm, mxu)
            if ref_out is None and sum(q_lens) * max(ctx_lens) <= 64 * 4096:
                ref_out = reference.ragged_paged_attention(*args, sm_scale=SM_SCALE)
            elif ref_out is None and len(q_lens) == 1 and q_lens == ctx_lens:
                ref_out = dense_causal_reference(args, q_lens[0])
            if ref_out is not None:
                o, r = np.asarray(out, np.float32), np.asarray(ref_out, np.float32)
                row["rel_err"] = float(np.linalg.norm(o - r) / np.linalg.norm(r))
        except Exception as e:  # record and go on: one failing shape must not end the run
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            traceback.print_exc(limit=3)
        rows.append(row)
        print_row(row)
    for peer in peers:
        row = dict(kind=kind, case=name, page_size=page_size, impl=peer, bytes=bytes_,
                   flops=flops)
        try:
            if peer == "jax_gpu_paged":
                fn, pargs = jax_gpu_paged_attention_peer(args, page_size)
            elif peer == "cudnn":
                q = args[0]
                k, v = dense_kv(q.shape[0])
                fn = lambda q, k, v: jax.nn.dot_product_attention(
                    q, k, v, is_causal=True, scale=SM_SCALE, implementation="cudnn")
                pargs = (q[None], k, v)
            elif peer == "mgpu_flash":
                # jax's Hopper flash attention (Mosaic GPU: TMA copies, wgmma, warpgroup
                # pipelining) on the dense equivalent, as for cuDNN: the yardstick for a Mosaic
                # version of our prefill kernel.
                from jax.experimental.pallas.ops.gpu import attention_mgpu
                q = args[0]
                k, v = dense_kv(q.shape[0])
                cfg = attention_mgpu.TuningConfig(block_q=64, block_kv=128, max_concurrent_steps=2,
                                                  causal=True)
                fn = lambda q, k, v: attention_mgpu.attention(q, k, v, cfg)  # noqa: E731  (unscaled q: time only)
                # float16: jax 0.11.2's kernel allocates its shared-memory tiles as f16 (bf16
                # inputs fail with "src had type bfloat16 and dst had type float16"); same speed class
                pargs = tuple(a.astype(jnp.float16) for a in (q[None], k, v))
            elif peer == "reference":
                fn = lambda *a: reference.ragged_paged_attention(*a, sm_scale=SM_SCALE)
                pargs = args
            t, _ = timed(fn, *pargs, inner=3 if peer == "reference" else 10)
            row.update(time_us=t * 1e6, hbm_frac=bytes_ / t / hbm, mxu_frac=flops / t / mxu)
            if DEVICE_TIME and peer != "reference":
                _add_device_time(row, device_time(fn, *pargs), bytes_, flops, hbm, mxu)
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            traceback.print_exc(limit=3)
        rows.append(row)
        print_row(row)
    del args


# --prefill-tiles: what the engine runs in its big prefill buckets (pure prefill, chunks at a long
# context, mixed steps whose decode rows would pay for a whole 128-row tile), the default (two
# launches from 2048 tokens: the 128-row prefill tile for the long requests, a decode tile for the
# short) beside one launch of the 128-row tile, one launch of the 256-row tile, the two-launch
# default of the seventh to fifteenth sessions (256-row long tile) and the long launch on the
# Mosaic GPU kernel (gpu_prefill).
# (name, q_lens, ctx_lens, max_num_seqs: the page table's rows, 64 in the engine by default)
PREFILL_TILE_CASES = [
    ("2x1024", [1024, 1024], [1024, 1024], 64), ("chunk2048", [2048], [2048], 64),
    ("chunk4096", [4096], [4096], 64), ("chunk8192", [8192], [8192], 64),
    ("chunk2048 at ctx8192", [2048], [8192], 64),
    ("512 prefill + 63 dec ctx2048", [512] + [1] * 63, [512] + [2048] * 63, 64),
    ("1984 prefill + 64 dec ctx2048", [1984] + [1] * 64, [1984] + [2048] * 64, 80),
    ("1024 prefill at ctx3072 + 1024 dec ctx1024", [1024] + [1] * 1024,
     [3072] + [1024] * 1024, 1025),
]
PREFILL_TILE_VARIANTS = {
    "1x128": dict(block_q=32, block_k=32, num_warps=8, num_stages=3),  # one launch, old default
    "1x256": PREFILL_SWEEP["bq64bk64w8"],  # one launch, the 256-row tile for every request
    "2x256": dict(PREFILL_SWEEP["bq64bk64w8"], num_stages=3, short_q=4, prefill_kernel="triton"),  # default until the 16th session
    # the Triton long launch of the sixteenth session (128-row fast_math tile), the default on Hopper
    # GPUs until the seventeenth made it the Mosaic GPU kernel's (and elsewhere still the default)
    "2xtriton": dict(prefill_kernel="triton"),
    # the long launch on the Mosaic GPU kernel (gpu_prefill: TMA + wgmma), decode tile as the default
    "2xmgpu": dict(prefill_kernel="mgpu"),
}


# --mgpu-sweep: the Mosaic GPU prefill kernel (gpu_prefill) on pure prefill chunks, through the
# engine's path (two launches, `2xmgpu`) and alone by key block and ring depth (shared memory at
# head_dim 128: q 32 KB + staging 32 KB + stages x 2 x block_kv x 256 B); `_p132`: persistent, 132
# CTAs (an H100's or H200's SMs) walking the (q head, work item) pairs in turn.
MGPU_SWEEP = {
    "2xmgpu": PREFILL_TILE_VARIANTS["2xmgpu"],
    "mgpu_bk128s2": dict(mgpu_kernel=dict(block_kv=128, stages=2)),
    "mgpu_bk64s2": dict(mgpu_kernel=dict(block_kv=64, stages=2)),
    "mgpu_bk64s3": dict(mgpu_kernel=dict(block_kv=64, stages=3)),
    "mgpu_bk64s4": dict(mgpu_kernel=dict(block_kv=64, stages=4)),
    "mgpu_bk128s2_p132": dict(mgpu_kernel=dict(block_kv=128, stages=2, num_ctas=132)),
    "mgpu_bk64s3_p132": dict(mgpu_kernel=dict(block_kv=64, stages=3, num_ctas=132)),
}
# --long-tile-sweep: the Triton long launch's tile of the two-launch split (short_q = 4 keeps the split),
# on the pure and mixed steps of the big prefill buckets.
LONG_TILE_SWEEP = {
    "2x256st4": dict(block_q=64, block_k=64, num_warps=8, num_stages=4, short_q=4, prefill_kernel="triton"),
    "2x256bk32": dict(block_q=64, block_k=32, num_warps=8, num_stages=3, short_q=4, prefill_kernel="triton"),
    "2x128bk64": dict(block_q=32, block_k=64, num_warps=8, num_stages=3, short_q=4, prefill_kernel="triton"),
    "2x128": dict(block_q=32, block_k=32, num_warps=8, num_stages=3, short_q=4, prefill_kernel="triton"),
    "2x256pq": dict(block_q=64, block_k=64, num_warps=8, num_stages=3, short_q=4, prescale_q=True, prefill_kernel="triton"),
    "2x256st2": dict(block_q=64, block_k=64, num_warps=8, num_stages=2, short_q=4, prefill_kernel="triton"),
}
# --fast-math-ab: the default kernel (fast_math, the softmax's exponent as PTX, on for tiles of
# 32-128 rows) against fast_math off and on for every tile, on the prefill-tile cases (cuDNN
# beside the pure chunks) and the decode sweep's cases.
FAST_MATH_AB = {"nofm": dict(fast_math=False), "allfm": dict(fast_math=True)}
LONG_TILE_CASES = [c for c in PREFILL_TILE_CASES
                   if c[0] in ("chunk2048", "chunk4096", "chunk8192", "1984 prefill + 64 dec ctx2048")]


DECODE_KERNEL_SWEEP = dict(batches=(1, 8, 64), contexts=(256, 1024, 2048, 4096), splits=(None, 1, 2, 4, 8),
                          page_size=16, pages_per_seq=512)  # an 8k-token page table, as a server has
# --decode-kernel-sweep --quick: the default split count only, at the engine's page size (16), at
# the contexts of the 128/128 and 1024/128 engine runs and issue 3's 2k.
DECODE_KERNEL_QUICK = dict(DECODE_KERNEL_SWEEP, contexts=(256, 1024, 2048), splits=(None,))
# --decode-short-sweep: the decode kernel where the engine's batch-1 runs spend it (one request, a
# 128/128 run's contexts of 128-256 and a few longer), by tile: kv splits, block_k, stages; "minN":
# the default splits, each row using only as many as give every split N blocks (split_min_blocks).
# The fixed cost of a launch at short contexts (~5.7 us device time at b1 ctx 256, eleventh
# session: 8 splits of one block and the merge) is ~5% of the 8B and ~12% of the 1B batch-1 step.
# token_rows: also a 1-row bucket (no padding rows; $JAXENGINE_MIN_TOKEN_BUCKET=1 in the engine).
DECODE_KERNEL_SHORT = dict(
    DECODE_KERNEL_SWEEP, batches=(1, 8), contexts=(128, 256, 2048), splits=(None,), token_rows=(None, 1),
    variants={"min2": dict(split_min_blocks=2), "min4": dict(split_min_blocks=4),
              "min8": dict(split_min_blocks=8),
              "s1bk32": dict(num_splits=1), "s1bk64": dict(num_splits=1, block_k=64),
              "s1bk128": dict(num_splits=1, block_k=128), "s2bk32": dict(num_splits=2),
              "s4bk32": dict(num_splits=4)})

# --decode-sweep: the ragged kernel's decode tile (issue 3's batch 8 / context 2k case, where the
# default falls short of 80% of the copy rate, and two reference points), device-timed with
# --device-time.  Default at b8 ctx 2k: 8 splits of 8 blocks, block_k 32, 2 stages, 4 warps.
DECODE_SWEEP = {"st3": dict(num_stages=3), "st4": dict(num_stages=4), "s4": dict(num_splits=4),
                "s4st3": dict(num_splits=4, num_stages=3), "s16": dict(num_splits=16),
                "s16st3": dict(num_splits=16, num_stages=3), "bk64": dict(block_k=64),
                "bk64st3": dict(block_k=64, num_stages=3), "s4bk64st3": dict(num_splits=4, block_k=64, num_stages=3),
                "bk16s16": dict(block_k=16, num_splits=16), "w2": dict(num_warps=2)}
DECODE_SWEEP_CASES = [(8, 2048), (8, 8192), (64, 2048)]


def decode_kernel_inputs(b: int, c: int, ps: int, width: int, rows: int | None = None):
    """The decode kernel's inputs for b requests of context c (pages ps tokens, a page table of
    width pages a row): (token bucket, fused q/k/v, pages, (kv_lens, page table, num_seqs,
    inv_freq)).  Request i's pages are contiguous, after a page 0 no request uses; with
    --kv-pool-gib they lie at random places in the pool instead.  rows: the token bucket (default
    the runner's: powers of two from 8)."""
    group = NUM_Q_HEADS // NUM_KV_HEADS
    inv_freq = 1.0 / (500000.0 ** (jnp.arange(0, HEAD_DIM, 2, dtype=jnp.float32) / HEAD_DIM))
    t = rows or max(8, 1 << (b - 1).bit_length())  # the runner's token bucket
    if t < b:
        raise ValueError(f"a token bucket of {t} rows cannot hold {b} requests")
    need = -(-(c + 1) // ps)
    pages = jax.random.normal(jax.random.key(c), (1 + b * need, ps, 2 * NUM_KV_HEADS, HEAD_DIM), DTYPE)
    pool = pool_pages(1 + b * need, ps)
    ids = np.arange(1 + b * need)
    if pool > ids.size:
        ids = np.random.default_rng(c).permutation(pool)[:ids.size]
        pages = pool_with(pages, pool, ids)
    table = np.zeros((t, width), np.int32)
    table[:b, :need] = ids[1:].reshape(b, need)
    kv_lens = np.zeros(t, np.int32)
    kv_lens[:b] = c + 1
    qkv = jax.random.normal(jax.random.key(1), (t, NUM_KV_HEADS, group + 2, HEAD_DIM), DTYPE)
    return t, qkv, pages, (jnp.asarray(kv_lens), jnp.asarray(table), jnp.asarray([b], jnp.int32), inv_freq)


def decode_kernel_sweep(rows, hbm, mxu, cfg=DECODE_KERNEL_SWEEP, inner=10, repeats=5):
    """The engine's decode-only kernel (gpu_decode: rope + KV write + attention, fused q/k/v
    input, with its split combine) at each batch, context and kv split count (None = the default
    heuristic), pages chained through a donated loop as the engine does.  The page table is as
    wide as a server's (pages_per_seq), so the default splits are what a server would run."""
    from jaxengine.pallas_kernels.ragged_paged_attention import gpu_decode

    ps, width = cfg["page_size"], cfg["pages_per_seq"]
    for b, c, bucket in [(b, c, r) for b in cfg["batches"] for c in cfg["contexts"]
                         for r in cfg.get("token_rows", (None,)) if r is None or r >= b]:
        t, qkv, pages, rest = decode_kernel_inputs(b, c, ps, width, bucket)
        kv_bytes = b * (c + 1) * 2 * NUM_KV_HEADS * HEAD_DIM * 2
        flops = 4 * HEAD_DIM * NUM_Q_HEADS * b * (c + 1)
        default = gpu_decode.default_config(t, NUM_KV_HEADS, HEAD_DIM, ps, width)["num_splits"]
        variants = [(f"splits={s or f'default({default})'}", {} if s is None else {"num_splits": s})
                    for s in cfg["splits"]] + list(cfg.get("variants", {}).items())
        for impl, kw in variants:
            row = dict(kind="decode-kernel", case=f"b{b} ctx{c}" + (f" rows{t}" if bucket else ""), page_size=ps,
                       impl=impl, bytes=kv_bytes, flops=flops)
            pages = _time_decode_kernel(row, qkv, pages, rest, inner, repeats, kv_bytes, flops, hbm, mxu,
                                        copy=False, **kw)
            rows.append(row)
            print_row(row)
        del pages


# --decode-mgpu: the Mosaic GPU decode kernel (gpu_decode_mgpu: TMA page ring + swap-AB wgmma, kv
# splits merged in a cluster or by a combine kernel; written without a GPU) beside the Triton decode
# kernel (gpu_decode, the engine's: rope + KV write + attention, splits merged in the kernel) and the
# ragged kernel's decode step (gpu.py), on the decode kernel sweep's inputs (page 16, a server-wide
# page table).  Issue 3's case is b8 ctx 2k (Triton decode kernel 24.1 us device time, 67% of the
# copy rate).  Each mgpu config runs with both merges ("mgpu[cluster...]", "mgpu[combine...]"); the
# variants only at `sweep_cases`.  Every variant runs through the kernel in
# tests/test_decode_attention_mgpu.py (interpreter, merge "combine"; the cluster path's lowering).
# At 8B b8 the default is 4 splits with a 2-slot ring (256 CTAs, 2 an SM: ~91 KB of shared memory
# each with the cluster's landing buffers).  The sweep: one split (64 CTAs, no merge), 2 splits with
# 4 slots (128 CTAs, one an SM, 128 KB in flight each), deeper rings or 8 splits (more than one
# wave of CTAs with the cluster merge), 128-key blocks, V^T through registers (`vreg`).
DECODE_MGPU_SWEEP = {"s1st4": dict(num_splits=1, block_kv=64, stages=4),
                     "s2st4": dict(num_splits=2, block_kv=64, stages=4),
                     "s4st3": dict(num_splits=4, block_kv=64, stages=3),
                     "s8st2": dict(num_splits=8, block_kv=64, stages=2),
                     "s2bk128st2": dict(num_splits=2, block_kv=128, stages=2),
                     "s4bk128st2": dict(num_splits=4, block_kv=128, stages=2),
                     "vreg": dict(v_via_registers=True)}  # PV's A operand through registers (the fallback)
DECODE_MGPU = dict(cases=[(b, c) for b in (1, 8, 64) for c in (512, 2048, 8192, 32768)], page_size=16,
                   pages_per_seq=512, merges=("cluster", "combine"), sweep_cases=((8, 2048),),
                   variants=DECODE_MGPU_SWEEP, triton=True, ragged=True)
# --decode-mgpu --quick: issue 3's case and its neighbours (gpu_suite.sh mgpudecode)
DECODE_MGPU_QUICK = dict(DECODE_MGPU, cases=[(8, 2048), (8, 8192), (64, 2048), (1, 2048)])
# --decode-mgpu-focus: the twenty-first session's H100 run found 2 splits of 128-key blocks with a
# 2-slot ring (cluster merge) at 27.8 us, 82% (the default config 34.2 us, 67%; Triton decode 29.6
# us): that config again (twice: the run-to-run spread), its ring depths and split counts, at b8
# ctx 2k / 4k / 8k and b16 / b32 ctx 2k, cluster merge only (combine lost at every 2-split config).
# Result (same session): 81% at b8 ctx 2k twice, now default_config's choice at batch 8.
DECODE_MGPU_FOCUS = dict(DECODE_MGPU, cases=[(8, 2048), (8, 4096), (8, 8192), (16, 2048), (32, 2048)],
                         merges=("cluster",), sweep_cases=((8, 2048), (8, 4096), (8, 8192), (16, 2048), (32, 2048)),
                         variants={"s2bk128st2": dict(num_splits=2, block_kv=128, stages=2),
                                   "s2bk128st2again": dict(num_splits=2, block_kv=128, stages=2),
                                   "s2bk128st3": dict(num_splits=2, block_kv=128, stages=3),
                                   "s1bk128st3": dict(num_splits=1, block_kv=128, stages=3),
                                   "s4bk128st2": dict(num_splits=4, block_kv=128, stages=2),
                                   "s8bk128st2": dict(num_splits=8, block_kv=128, stages=2),
                                   "s2bk64st3": dict(num_splits=2, block_kv=64, stages=3)})


def decode_mgpu_table(rows, hbm, mxu, cfg=DECODE_MGPU, inner=10, repeats=5):
    """Decode attention at each (batch, context) of cfg["cases"]: the Triton decode kernel
    (gpu_decode, timed as decode_kernel_sweep does), the ragged kernel (gpu.py) and the Mosaic GPU
    decode kernel (gpu_decode_mgpu) with each merge at its default config, then (at sweep_cases)
    each variant.  bytes = the K/V read; rel err against the jnp reference (small cases).  The
    Mosaic kernel takes q already rotated and the token's K/V already written (its contract), so it
    does less than the Triton decode kernel (rope of q and k, the KV write: ~1-2% of its bytes)."""
    from jaxengine.pallas_kernels.ragged_paged_attention import gpu_decode_mgpu

    ps, group = cfg["page_size"], NUM_Q_HEADS // NUM_KV_HEADS
    for b, c in cfg["cases"]:
        if b * c > MAX_CTX_TOKENS:
            continue
        width = max(cfg["pages_per_seq"], -(-(c + 1) // ps))
        t, qkv, pages, rest = decode_kernel_inputs(b, c, ps, width)
        kv_lens, table, num_seqs, _ = rest
        kv_bytes = b * (c + 1) * 2 * NUM_KV_HEADS * HEAD_DIM * 2
        flops = 4 * HEAD_DIM * NUM_Q_HEADS * b * (c + 1)
        case = f"b{b} ctx{c}"
        q = qkv[:, :, :group].reshape(t, NUM_Q_HEADS, HEAD_DIM)
        args = (q, pages, kv_lens, table, num_seqs)
        ref = None
        if b * c <= 64 * 4096:
            cu = jnp.minimum(jnp.arange(table.shape[0] + 1, dtype=jnp.int32), num_seqs[0])
            ref = np.asarray(reference.ragged_paged_attention(q, pages, kv_lens, table, cu, num_seqs,
                                                              sm_scale=SM_SCALE), np.float32)[:b]

        def record(row, fn):
            try:
                tm, out = timed(fn, *args, inner=inner, repeats=repeats)
                row.update(time_us=tm * 1e6, hbm_frac=kv_bytes / tm / hbm, mxu_frac=flops / tm / mxu)
                if DEVICE_TIME:
                    _add_device_time(row, device_time(fn, *args, inner=inner), kv_bytes, flops, hbm, mxu)
                if ref is not None:
                    o = np.asarray(out, np.float32)
                    row["rel_err"] = float(np.linalg.norm(o[:b] - ref) / np.linalg.norm(ref))
                    if not np.all(o[b:] == 0):
                        row["error"] = "padding rows not zero"
            except Exception as e:  # noqa: BLE001 - record and go on
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                traceback.print_exc(limit=3)
            rows.append(row)
            print_row(row)

        def new_row(impl):
            return dict(kind="decode-mgpu", case=case, page_size=ps, impl=impl, bytes=kv_bytes, flops=flops)

        if cfg.get("triton", True):
            row = new_row("triton_decode")
            _time_decode_kernel(row, qkv, pages, rest, inner, repeats, kv_bytes, flops, hbm, mxu)
            rows.append(row)
            print_row(row)
        if cfg.get("ragged", True):
            cu_t = jnp.minimum(jnp.arange(table.shape[0] + 1, dtype=jnp.int32), num_seqs[0])
            record(new_row("ragged"), lambda q, p, kl, pt, n, cu_t=cu_t: gpu.ragged_paged_attention(
                q, p, kl, pt, cu_t, n, sm_scale=SM_SCALE))
            # issue 3's interface told it is a decode step: the Mosaic kernel on Hopper, else the ragged one
            record(new_row("ragged decode_only"), lambda q, p, kl, pt, n, cu_t=cu_t: gpu.ragged_paged_attention(
                q, p, kl, pt, cu_t, n, sm_scale=SM_SCALE, decode_only=True))
        variants = [(None, {})] + (list(cfg["variants"].items()) if (b, c) in cfg["sweep_cases"] else [])
        for vname, kw in variants:
            single_done = False  # one split: no merge, so one row whatever the merge
            for merge in cfg["merges"]:
                d = dict(gpu_decode_mgpu.default_config(t, NUM_KV_HEADS, NUM_Q_HEADS, HEAD_DIM, ps, width, merge), **kw)
                if d["num_splits"] == 1:
                    if single_done:
                        continue
                    single_done = True
                how = merge if d["num_splits"] > 1 else "one split"
                # "mgpu[cluster] s4 st2 bk64" (the default config) or "mgpu[cluster,s4st3]" (a variant)
                label = (f"mgpu[{how}] s{d['num_splits']} st{d['stages']} bk{d['block_kv']}" if vname is None
                         else f"mgpu[{how},{vname}]")
                record(new_row(label), (lambda kw, merge: lambda *a: gpu_decode_mgpu.decode_attention(
                    *a, sm_scale=SM_SCALE, merge=merge, **kw))(kw, merge))
        del pages, args


def _time_decode_kernel(row, qkv, pages, rest, inner, repeats, kv_bytes, flops, hbm, mxu, copy=True, **kw):
    """The Triton decode kernel (gpu_decode: rope + KV write + attention, with its split combine) in
    a donated loop, pages chained through it as the engine does: host time a call, and with
    --device-time its kernels' (decode and combine) device time, into `row`.  Returns the pages
    (donated: a copy of the caller's with `copy`, else the caller's own, consumed)."""
    from jaxengine.pallas_kernels.ragged_paged_attention import gpu_decode

    def loop(qkv, pages, *rest):
        out = None
        for _ in range(inner):
            dep = 0 if out is None else (out.reshape(-1)[0] * 0).astype(qkv.dtype)
            out, pages = gpu_decode.decode_attention(qkv + dep, None, None, pages, *rest, sm_scale=SM_SCALE, **kw)
        return out, pages

    f = jax.jit(loop, donate_argnums=(1,))
    if copy:
        pages = jnp.copy(pages)  # donated: the caller's pages stay
    try:
        out, pages = f(qkv, pages, *rest)
        jax.block_until_ready(out)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            out, pages = f(qkv, pages, *rest)
            jax.block_until_ready(out)
            times.append((time.perf_counter() - t0) / inner)
        tm = statistics.median(times)
        row.update(time_us=tm * 1e6, hbm_frac=kv_bytes / tm / hbm, mxu_frac=flops / tm / mxu)
        if DEVICE_TIME:
            import tempfile
            with tempfile.TemporaryDirectory() as d:
                with jax.profiler.trace(d):
                    out, pages = f(qkv, pages, *rest)
                    jax.block_until_ready(out)
                events = [e for e in device_events_of(d)
                          if e.get("name", "").startswith(("decode_attention", "attention_split_combine"))]
            busy = sum(float(e["dur"]) for e in events) * 1e-6 / inner if events else None
            _add_device_time(row, busy, kv_bytes, flops, hbm, mxu)
    except Exception as e:  # noqa: BLE001 - record and go on
        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        traceback.print_exc(limit=3)
    return pages


# --device-time: also each case's device kernel time (device_time()), as device_us and the two
# fractions against it.
DEVICE_TIME = False


def device_events_of(trace_dir):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_forward import device_events
    return device_events(trace_dir)


def _add_device_time(row, t, bytes_, flops, hbm, mxu):
    if t:
        row.update(device_us=t * 1e6, device_hbm_frac=bytes_ / t / hbm, device_mxu_frac=flops / t / mxu)


def print_row(r):
    if "error" in r:
        print(f"| {r['kind']} | {r['case']} | {r['page_size']} | {r['impl']} | ERROR {r['error'][:80]} |",
              flush=True)
        return
    err = f"{r['rel_err']:.1e}" if "rel_err" in r else "-"
    dev = ""
    if "device_us" in r:
        dev = (f" {r['device_us']:.1f} | {r['device_hbm_frac'] * 100:.0f}% | "
               f"{r['device_mxu_frac'] * 100:.1f}% |")
    print(f"| {r['kind']} | {r['case']} | {r['page_size']} | {r['impl']} | {r['time_us']:.1f} | "
          f"{r['hbm_frac'] * 100:.0f}% | {r['mxu_frac'] * 100:.1f}% | {err} |{dev}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench_attention.json")
    ap.add_argument("--quick", action="store_true", help="a few shapes only")
    ap.add_argument("--table", action="store_true",
                    help="issue 3's table only: decode batch 1-256 x context 512-32k, prefill chunks 512-8192, "
                         "mixed steps, each with its peers, no tuning sweeps (fits one 10-minute device call)")
    ap.add_argument("--prefill-sweep", action="store_true",
                    help="prefill only: every chunk, PREFILL_SWEEP at 4096 and 8192, and those two "
                         "chunks with a few variants at the other --page-sizes")
    ap.add_argument("--mgpu-sweep", action="store_true",
                    help="pure prefill chunks 2k-8k: the Mosaic GPU prefill kernel (MGPU_SWEEP) beside the default and cuDNN")
    ap.add_argument("--prefill-tiles", action="store_true",
                    help="only PREFILL_TILE_CASES with PREFILL_TILE_VARIANTS beside the default (and cuDNN)")
    ap.add_argument("--long-tile-sweep", action="store_true",
                    help="only LONG_TILE_CASES with LONG_TILE_SWEEP (two-launch long tiles) beside the default")
    ap.add_argument("--decode-only", action="store_true",
                    help="only the decode table (batch 8 and 64 at context 2k and 8k with --quick), with the peers")
    ap.add_argument("--device-time", action="store_true",
                    help="also time each case's device kernels from a jax.profiler trace (no host dispatch, "
                         "no gaps between kernels, less the timing loop's own kernel): device us columns")
    ap.add_argument("--decode-kernel-sweep", action="store_true",
                    help="only the engine's decode kernel (gpu_decode) over batch x context x kv splits")
    ap.add_argument("--decode-short-sweep", action="store_true",
                    help="only the engine's decode kernel at batch 1 and 8, contexts 128-2k, by tile (DECODE_KERNEL_SHORT)")
    ap.add_argument("--decode-sweep", action="store_true",
                    help="only the ragged kernel's decode tile sweep (DECODE_SWEEP at DECODE_SWEEP_CASES)")
    ap.add_argument("--decode-mgpu", action="store_true",
                    help="only the Mosaic GPU decode kernel (gpu_decode_mgpu, both merges) beside the Triton decode "
                         "kernel and the ragged kernel: batch 1/8/64 x context 512-32k, a config sweep at b8 ctx 2k "
                         "(--quick: b8 ctx 2k/8k, b64 ctx 2k, b1 ctx 2k); Hopper only")
    ap.add_argument("--decode-mgpu-focus", action="store_true",
                    help="only the Mosaic GPU decode kernel around its best H100 config (DECODE_MGPU_FOCUS)")
    ap.add_argument("--fast-math-ab", action="store_true",
                    help="only PREFILL_TILE_CASES and DECODE_SWEEP_CASES, the default beside fast_math off / on")
    ap.add_argument("--page-sizes", default="16,32,64")
    ap.add_argument("--decode-page-size", type=int, default=32)
    ap.add_argument("--kv-pool-gib", type=float, default=0.0,
                    help="the K/V page pool's size (0: only the pages a case reads); a case's pages "
                         "at random places in it, as in an engine's pool")
    args = ap.parse_args()
    global DEVICE_TIME, KV_POOL_BYTES
    DEVICE_TIME = args.device_time
    KV_POOL_BYTES = int(args.kv_pool_gib * 2**30)
    dev = jax.devices()[0]
    hbm, mxu = measure_ceilings()
    print(f"device: {dev.device_kind}; jax {jax.__version__}; measured copy bandwidth "
          f"{hbm / 1e12:.2f} TB/s; measured bf16 matmul {mxu / 1e12:.0f} TFLOP/s", flush=True)
    dev_cols = " device us | of HBM bw (device) | of bf16 mm (device) |" if args.device_time else ""
    print("| kind | case | page | impl | time us | of HBM bw | of bf16 mm | rel err |" + dev_cols)
    print("| --- | --- | --- | --- | --- | --- | --- | --- |" + " --- |" * (3 if args.device_time else 0))
    rows = []

    def save():  # after every case too, so a run cut short still leaves its figures
        result = dict(device=dev.device_kind, jax=jax.__version__, hbm_bytes_per_s=hbm,
                      bf16_flops_per_s=mxu, argv=sys.argv, rows=rows)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)

    if args.decode_kernel_sweep:
        decode_kernel_sweep(rows, hbm, mxu, DECODE_KERNEL_QUICK if args.quick else DECODE_KERNEL_SWEEP)
        save()
        return
    if args.decode_short_sweep:
        decode_kernel_sweep(rows, hbm, mxu, DECODE_KERNEL_SHORT)
        save()
        return
    if args.decode_mgpu or args.decode_mgpu_focus:
        decode_mgpu_table(rows, hbm, mxu, DECODE_MGPU_FOCUS if args.decode_mgpu_focus
                          else DECODE_MGPU_QUICK if args.quick else DECODE_MGPU)
        save()
        return
    if args.decode_sweep:
        for b, c in DECODE_SWEEP_CASES:
            save(); run_case(rows, "decode-sweep", f"b{b} ctx{c}", [1] * b, [c] * b, args.decode_page_size,
                     hbm, mxu, variants=DECODE_SWEEP)
        save()
        return
    if args.long_tile_sweep:
        for name, q_lens, ctx_lens, max_seqs in LONG_TILE_CASES:
            save(); run_case(rows, "prefill", name, q_lens, ctx_lens, args.decode_page_size, hbm, mxu,
                     variants=LONG_TILE_SWEEP, max_num_seqs=max_seqs)
        save()
        return
    if args.fast_math_ab:
        for name, q_lens, ctx_lens, max_seqs in PREFILL_TILE_CASES:
            peers = ["cudnn"] if len(q_lens) == 1 and q_lens == ctx_lens else []
            save(); run_case(rows, "prefill", name, q_lens, ctx_lens, args.decode_page_size, hbm, mxu, peers,
                     variants=FAST_MATH_AB, max_num_seqs=max_seqs)
        for b, c in DECODE_SWEEP_CASES:
            save(); run_case(rows, "decode", f"b{b} ctx{c}", [1] * b, [c] * b, args.decode_page_size,
                     hbm, mxu, variants=FAST_MATH_AB)
        save()
        return
    if args.mgpu_sweep:
        for t in (2048, 4096, 8192):
            save(); run_case(rows, "prefill", f"chunk{t}", [t], [t], args.decode_page_size, hbm, mxu,
                     ["cudnn"], variants=MGPU_SWEEP)
        save()
        return
    if args.prefill_tiles:
        for name, q_lens, ctx_lens, max_seqs in PREFILL_TILE_CASES:
            peers = ["cudnn", "mgpu_flash"] if len(q_lens) == 1 and q_lens == ctx_lens else []
            save(); run_case(rows, "prefill", name, q_lens, ctx_lens, args.decode_page_size, hbm, mxu, peers,
                     variants=PREFILL_TILE_VARIANTS, max_num_seqs=max_seqs)
        save()
        return
    ps = args.decode_page_size
    other_pages = [p for p in (int(x) for x in args.page_sizes.split(",")) if p != ps]
    sweeps = not args.table  # --table: issue 3's grid and its peers, no tuning sweeps
    if not args.prefill_sweep:
        batches = [8, 64] if args.quick else [1, 8, 64, 256]
        ctxs = [2048, 8192] if args.quick else [512, 2048, 8192, 32768]
        for b in batches:
            for c in ctxs:
                if b * c > MAX_CTX_TOKENS:
                    continue
                peers = ["jax_gpu_paged"] + (["reference"] if b * c <= 8 * 2048 else [])
                # ours[decode_only]: the same entry told the step is a decode (the Mosaic GPU decode kernel on Hopper)
                save(); run_case(rows, "decode", f"b{b} ctx{c}", [1] * b, [c] * b, ps, hbm, mxu,
                         peers, variants={"decode_only": dict(decode_only=True)})
        # Tuning sweep on two decode shapes, then a page-size sweep.
        sweep = {"bk64": dict(block_k=64), "st3": dict(num_stages=3), "st4": dict(num_stages=4),
                 "s8": dict(num_splits=8), "s16": dict(num_splits=16),
                 "s16st3": dict(num_splits=16, num_stages=3),
                 "s32st3": dict(num_splits=32, num_stages=3),
                 "bk64st3": dict(block_k=64, num_stages=3), "s4": dict(num_splits=4)}
        if args.decode_only:
            save()
            return
        for b, c in [(8, 2048), (8, 8192), (64, 2048)] if sweeps else []:
            save(); run_case(rows, "decode-sweep", f"b{b} ctx{c}", [1] * b, [c] * b, ps, hbm, mxu,
                     variants=sweep)
        for p in other_pages if sweeps else []:
            for b, c in [(8, 8192), (64, 2048)]:
                save(); run_case(rows, "decode", f"b{b} ctx{c}", [1] * b, [c] * b, p, hbm, mxu)
    chunks = [512, 2048, 4096] if args.quick else [512, 2048, 4096, 8192]
    sweep_chunks = [4096] if args.quick else [4096, 8192]
    for t in chunks:
        peers = ["cudnn", "mgpu_flash"] + (["reference"] if t <= 512 else [])
        save(); run_case(rows, "prefill", f"chunk{t}", [t], [t], ps, hbm, mxu, peers,
                 variants=PREFILL_SWEEP if t in sweep_chunks and sweeps else None)
    if args.prefill_sweep:
        # The page size decides whether a block_k tile lies in one page (page_size % block_k == 0:
        # one page-table read per block) or takes the per-key gather.
        for p in other_pages:
            for t in sweep_chunks:
                save(); run_case(rows, "prefill", f"chunk{t}", [t], [t], p, hbm, mxu,
                         variants={k: PREFILL_SWEEP[k] for k in ("st3", "bk64st3", "bk128w8")})
    save(); run_case(rows, "prefill", "chunk2048 at ctx8192", [2048], [8192], ps, hbm, mxu)
    if not args.prefill_sweep:
        save(); run_case(rows, "mixed", "512 prefill + 63 dec ctx2048", [512] + [1] * 63,
                 [512] + [2048] * 63, ps, hbm, mxu)
        save(); run_case(rows, "mixed", "4x256 prefill + 60 dec ctx4096", [256] * 4 + [1] * 60,
                 [1024] * 4 + [4096] * 60, ps, hbm, mxu)
    save()


if __name__ == "__main__":
    main()
