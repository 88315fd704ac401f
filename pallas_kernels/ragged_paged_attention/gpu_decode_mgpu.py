"""Decode attention over the paged KV cache for Hopper GPUs: Pallas on Mosaic GPU (TMA + wgmma).

Issue 3's batch-8 / 2k decode step reads 67 MB of K/V (8B shapes), ~16 us at the copy rate; the
Triton decode kernel (`gpu_decode.py`) takes 24.1 us there (67%).  Its losses are fixed costs, not
the stream: ~3 us of start (kv_lens, then the page ids, then the first K/V block, with one block
ahead in flight), the drain, and ~2.4 us of split merge (partials to global memory, an atomic,
the last split's loads).  This kernel is the design sketched in NOTES.md ("Design sketch for
issue 3's batch-8 / 2k goal"), adapted where Mosaic GPU forced it (NOTES.md, "Mosaic GPU decode
kernel").

Contract: `decode_attention(q, kv_pages, kv_lens, page_indices, num_seqs, *, sm_scale)` ->
[num_rows, num_q_heads, head_dim]: one decode token per request row (row j is request j, q
already rotated, its own key and value already in the cache), request j attends to its keys
0 .. kv_lens[j] - 1; rows >= num_seqs[0] (bucket padding) come out zero.  As
`reference.ragged_paged_attention` with cu_q_lens = arange.  Not wired into the engine.

Work decomposition:
    pair  = (kv head h, request row j); its `group` q heads are the columns of one tile
    grid  = S CTAs a pair (the kv splits); split s walks the pair's key blocks s, s + S, ...
            (round robin: the first blocks' page ids are known from the program ids alone, so
            they load together with kv_lens instead of after it)
Each CTA is one warpgroup.  At its start it copies q (TMA), reads kv_lens and the page ids of its
first `stages` blocks in one round of loads, and issues every ring slot's K and V copies at once
(one TMA copy a page, K and V each: a [page_size, head_dim] box of the [pages, page_size,
2 * kv heads, head_dim] cache, K of head h at combined head 2h, V at 2h + 1), then refills a slot
as soon as its block is consumed, carrying the next refill's page ids one block ahead.

Compute, swap-AB (wgmma's M is 64; the group's few q rows are its N = 8, not an M padded to 64):
    S^T [block_kv, N] = K [block_kv, d] @ Q^T          (K from the ring, Q^T the transposed
                                                         view of a swizzled [N, d] q tile)
    online softmax along axis 0 (keys) in base 2; the max is one cross-warp reduction a block,
    the denominator an elementwise [block_kv, N] running sum reduced once at the end
    O^T [d, N] += V^T [d, block_kv] @ P^T               (V's transposed smem view as A, P^T
                                                         through a swizzled [N, block_kv] tile)
q's rows come in 8-row tiles of the flat [num_rows * num_q_heads, head_dim] array, aligned (TMA
into a swizzled buffer reads whole tiles, and registers cannot be stored into an [8, d] swizzled
tile: layout inference finds no layout), so the group's rows sit at a column offset
(q_row0 % 8) of the tile; N = 16 (two tiles) where a group can straddle two tiles (groups that do
not divide 8, or q heads not a multiple of 8).

Merging the S splits (`merge`):
    "cluster": the S CTAs of a pair are one cluster; each other CTA sends its normalised
               partial O^T [d, N] and its log2-sum-exp (as a [64, N] tile) into CTA 0's shared
               memory (`plgpu.async_store_smem(..., cluster_idx=0)`, st.async with the receiver's
               barrier), CTA 0 merges them in registers (elementwise: every tile has the same
               layout) and stores the output: no global partials, no second kernel.  Mosaic GPU's
               interpreter has no rule for async_store_smem: CPU tests lower it only.
    "combine": each CTA stores its partial O^T [d, N] (float32) and log2-sum-exp [N] to global
               memory and a second small Pallas (Triton) kernel merges them (`merge_partials`
               of gpu.py).  The baseline; runs in the interpreter.
    With one split the CTA stores the output itself (no merge).
The default is "cluster" on a GPU (expected to win: no partial round trip through global memory,
no second launch; unmeasured) and "combine" in the interpreter.

Limits (`supported`): bf16/f16, head_dim 64 or 128, page_size a multiple of 8 that divides or is
divided by block_kv (64 or 128), group 1..8, no sliding window, no soft cap.

Status: CPU-tested (interpreter, lowering for sm_90) and compiled on an H100 (twenty-first
session: its compiled tests pass, `scripts/mgpu_decode_probe.py` ALL PASSED; the twentieth
session's hang was an in-progress copy's and did not recur).  Measured there (device time, copy
rate 2.95 TB/s): issue 3's b8 ctx 2k 28.2-28.3 us, **81%** of the copy rate at its default config
(2 splits x 128-key blocks, cluster merge), against the Triton decode kernel's 29.6-29.8 us (76-77%,
which also rotates and writes the token's K/V) and the ragged kernel's 31.8 us (72%); b8 ctx 4k
91%, b8 ctx 8k 96-97%, b16 ctx 2k 92%, b32 ctx 2k 98%.  The cluster merge beat "combine" at every
2-split config.  The two-pass header above (24.1 us, 67%) is an H200's figure.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from .gpu import _DEFAULT_NUM_SMS, _LOG2E, merge_partials, split_blocks_below

MERGES = ("cluster", "combine")
BLOCK_KV = 64  # keys a block: wgmma's M for S^T
TILE = 8  # rows of a swizzled q tile (Mosaic's (8, 64) tiling)
MAX_CLUSTER = 8  # Hopper's portable cluster size limit
MAX_SPLITS = 16  # with merge="combine"
SMEM_PER_SM = 228 * 1024  # H100 / H200 (a CTA may take 227 KB; the driver reserves 1 KB a CTA)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def supported(q: jax.Array, kv_pages: jax.Array, sliding_window=None, soft_cap=None,
              block_kv: int = BLOCK_KV) -> bool:
    """Whether this kernel takes the step (shapes and options only)."""
    if q.ndim != 3 or kv_pages.ndim != 4:
        return False
    head_dim = q.shape[-1]
    page_size = kv_pages.shape[1]
    num_kv_heads = kv_pages.shape[2] // 2
    num_q_heads = q.shape[1]
    group = num_q_heads // num_kv_heads if num_kv_heads else 0
    return (q.dtype in (jnp.bfloat16, jnp.float16) and kv_pages.dtype == q.dtype
            and head_dim in (64, 128) and kv_pages.shape[-1] == head_dim
            and block_kv in (64, 128) and page_size % 8 == 0
            and (page_size % block_kv == 0 or block_kv % page_size == 0)
            and num_kv_heads > 0 and num_q_heads == group * num_kv_heads and 1 <= group <= 8
            and sliding_window is None and soft_cap is None)


def q_cols(num_q_heads: int, group: int) -> int:
    """wgmma's N (the q tile's rows): 8 where each group's rows lie inside one aligned 8-row tile
    of the flat [rows * q heads, d] q (the group divides 8 and the q heads are a multiple of 8:
    then a group starts at a multiple of itself), else 16 (two tiles)."""
    return TILE if TILE % group == 0 and num_q_heads % TILE == 0 else 2 * TILE


def smem_bytes(head_dim: int, block_kv: int, stages: int, cols: int, splits: int, merge: str,
               itemsize: int = 2) -> int:
    """Shared memory of one CTA (the ring, q, P, the output staging, the cluster's landing
    buffers), plus Mosaic's reduction scratch, barriers and alignment: within ~1 KB above what
    Mosaic allocates (checked against its lowering in the tests)."""
    ring = stages * 2 * block_kv * head_dim * itemsize
    small = cols * head_dim * itemsize + cols * block_kv * itemsize
    if splits == 1:
        out = cols * head_dim * itemsize
    elif merge == "combine":
        out = head_dim * cols * 4 + cols * 4
    else:
        out = cols * head_dim * itemsize + (splits - 1) * (head_dim + 64) * cols * 4
    return ring + small + out + 2048 + 1152


def ctas_per_sm(smem: int) -> int:
    return max(1, SMEM_PER_SM // (smem + 1024))


def default_config(num_rows: int, num_kv_heads: int, num_q_heads: int, head_dim: int,
                   page_size: int, pages_per_seq: int, merge: str,
                   num_sms: int = _DEFAULT_NUM_SMS) -> dict:
    """Static (shape-only) choice of splits, block and ring depth.

    Where a wave of one CTA an SM holds 2 splits of every pair but not 4 (num_sms / 4 < pairs
    <= num_sms / 2: 8B's batch 8, 64 pairs), 2 splits of 128-key blocks with a 2-slot ring (one
    CTA an SM, 64 KB a slot): measured best on an H100 (twenty-first session, cluster merge,
    device time) at b8 ctx 2k 28.2-28.3 us (81% of the copy rate; this rule's former choice, 4
    splits of 64-key blocks, 34.2 us), ctx 4k 50.1 us (91%), ctx 8k 94.4-94.7 us (96-97%; 111.7
    before).  Elsewhere (measured no better at b16 / b32 ctx 2k, unmeasured at b1): the most
    splits (a power of two, at least one block each, at most the cluster limit with
    merge="cluster") whose CTAs are all resident at once with a 2-slot ring of 64-key blocks,
    and 4 slots where the CTAs fit one an SM (b1: 64 CTAs), else 2."""
    pairs = max(1, num_rows * num_kv_heads)
    if num_sms // 4 < pairs <= num_sms // 2 and pages_per_seq * page_size >= 2 * 128:
        return dict(num_splits=2, block_kv=128, stages=2)
    block_kv = BLOCK_KV
    max_blocks = max(1, _cdiv(pages_per_seq * page_size, block_kv))
    cols = q_cols(num_q_heads, num_q_heads // num_kv_heads)
    cap = MAX_CLUSTER if merge == "cluster" else MAX_SPLITS
    splits = 1
    while splits * 2 <= min(cap, max_blocks):
        s = splits * 2
        if pairs * s > num_sms * ctas_per_sm(smem_bytes(head_dim, block_kv, 2, cols, s, merge)):
            break
        splits = s
    stages = 4 if pairs * splits <= num_sms else 2
    return dict(num_splits=splits, block_kv=block_kv, stages=stages)


def merge_default(interpret: bool) -> str:
    """"cluster" compiled (the design's point; unmeasured), "combine" in the interpreter (no rule
    for the cluster's async_store_smem there)."""
    return "combine" if interpret else "cluster"


def _kernel(kv_lens_ref, pt_ref, num_seqs_ref, q_ref, kv_ref, *refs, merge: str, num_splits: int,
            block_kv: int, stages: int, page_size: int, group: int, cols: int, num_q_heads: int,
            num_pages: int, pages_per_seq: int, max_num_seqs: int, sm_scale: float, probe: int = 3,
            v_via_registers: bool = False):
    # probe < 3 truncates the kernel for scripts/mgpu_decode_probe.py (where a compiled run stops):
    # 0 = q's copy and the output / merge paths only (no K/V), 1 = + the ring's first copies
    # awaited (no compute), 2 = + the loop without PV; 3 = the kernel.  Only 3 is correct.
    # v_via_registers: PV's A operand is V^T transposed through registers into a K-major tile
    # (a transposed bf16 store, as decode_matmul's epilogue) instead of V's transposed smem view
    # (the MN-major A operand, which no kernel here has run on a device yet): the fallback if
    # the probe finds the transposed operand at fault.
    if num_splits == 1:
        (out_ref,), scratch = refs[:1], refs[1:]
    elif merge == "combine":
        (opart_ref, lse_ref), scratch = refs[:2], refs[2:]
    else:
        (out_ref,), scratch = refs[:1], refs[1:]
    (q_smem, k_smem, v_smem, p_smem, *stage), (q_ready, k_ready, v_ready), *landing = scratch
    if v_via_registers:
        *landing, (vt_smem,) = landing
    s = lax.axis_index("s")
    h = lax.axis_index("h")
    j = lax.axis_index("j")
    head_dim = q_smem.shape[-1]
    dtype = q_smem.dtype
    scale = sm_scale * _LOG2E

    # q: the tile(s) holding the pair's group rows (aligned 8-row boxes; rows past the array are
    # zero-filled by TMA, other heads' rows give columns that are computed and dropped).
    q_row0 = j * num_q_heads + h * group
    tile0 = pl.multiple_of(lax.div(q_row0, TILE) * TILE, TILE)
    offset = q_row0 - tile0  # the group's first column in the tile
    for t in range(cols // TILE):
        plgpu.copy_gmem_to_smem(q_ref.at[pl.ds(tile0 + t * TILE, TILE)], q_smem.at[pl.ds(t * TILE, TILE)],
                                q_ready)

    # One round of loads: kv_lens, num_seqs and the page ids of the first `stages` blocks (round
    # robin splits: block s + i * S, known without kv_lens).
    seq = jnp.minimum(j, max_num_seqs - 1)
    piece = min(page_size, block_kv)  # keys of one TMA copy
    copies = block_kv // piece

    def block(i):  # the split's i-th key block
        return s + i * num_splits

    def pages_of(b):
        """Page ids of block b's copies, clamped into the request's row of the table and into the
        pool: a block past the request's pages is never copied, and keys of the last, partial
        block past kv_len are copied (finite values of some page) and masked."""
        ids = []
        for i in range(copies):
            entry = jnp.minimum(lax.div(b * block_kv + i * piece, page_size), pages_per_seq - 1)
            ids.append(jnp.clip(pt_ref[seq, entry], 0, num_pages - 1))
        return tuple(ids)

    first_pages = [pages_of(block(i)) for i in range(stages)]
    refill_pages = pages_of(block(stages))
    valid = (j < num_seqs_ref[0]) & (j < max_num_seqs)
    kv_len = jnp.where(valid, kv_lens_ref[seq], 0)
    num_blocks = lax.div(kv_len + block_kv - 1, block_kv)
    count = split_blocks_below(num_blocks, s, num_splits)  # this split's blocks
    if probe == 0:
        count = jnp.int32(0)

    def fetch(b, slot, pages, which):
        buf, ready = (k_smem, k_ready) if which == 0 else (v_smem, v_ready)
        col = 2 * h + which  # K at combined head 2h, V at 2h + 1
        for i, page in enumerate(pages):
            within = (0 if page_size <= block_kv
                      else pl.multiple_of(lax.rem(b * block_kv, page_size), block_kv))
            plgpu.copy_gmem_to_smem(kv_ref.at[page, pl.ds(within, piece), col],
                                    buf.at[slot, pl.ds(i * piece, piece)], ready.at[slot])

    for i in range(stages):  # every slot's copies at once, block by block (K then V)
        @pl.when(i < count)
        def _(i=i):
            fetch(block(i), i, first_pages[i], 0)
            fetch(block(i), i, first_pages[i], 1)

    plgpu.barrier_wait(q_ready)
    if probe == 1:
        for i in range(stages):
            @pl.when(i < count)
            def _(i=i):
                plgpu.barrier_wait(k_ready.at[i])
                plgpu.barrier_wait(v_ready.at[i])
        count = jnp.int32(0)
    q_t = q_smem.T  # [d, cols]: wgmma's B for S^T = K Q^T
    p_t = p_smem.T  # [block_kv, cols]

    def step(i, carry):
        acc, m_i, l_acc, nxt = carry  # nxt: page ids of block i + stages (this step's refill)
        slot = lax.rem(i, stages)
        after = pages_of(block(i + stages + 1))  # the next step's refill, read a block ahead
        refill = i + stages < count
        plgpu.barrier_wait(k_ready.at[slot])

        def qk(acc_ref):
            plgpu.wgmma(acc_ref, k_smem.at[slot], q_t)
            return acc_ref[...]
        s_t = pl.run_scoped(qk, plgpu.ACC((block_kv, cols), jnp.float32))  # [keys, cols]
        key = block(i) * block_kv + plgpu.broadcasted_iota(jnp.int32, s_t.shape, 0, layout=plgpu.Layout.WGMMA)
        s_t = jnp.where(key < kv_len, s_t, -jnp.inf)  # keys past the context (the last block's tail)
        # m in base-2 units; block i of a split has a key below kv_len, so m_new is finite and
        # masked keys give exp2(-inf) = 0 (and alpha = 0 on the split's first block).
        m_new = jnp.maximum(m_i, s_t.max(axis=0) * scale)
        alpha = jnp.exp2(m_i - m_new)
        p = jnp.exp2(s_t * scale - lax.broadcast_in_dim(m_new, s_t.shape, [1]))
        l_acc = l_acc * lax.broadcast_in_dim(alpha, l_acc.shape, [1]) + p
        acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [1])
        p_t[...] = p.astype(dtype)
        plgpu.commit_smem()  # P^T visible to wgmma; every warp is past this block's QK
        pl.when(refill)(lambda: fetch(block(i + stages), slot, nxt, 0))
        plgpu.barrier_wait(v_ready.at[slot])

        if v_via_registers:
            vt_smem.T[...] = plgpu.load(v_smem.at[slot], layout=plgpu.Layout.WGMMA)  # [d, keys] K-major
            plgpu.commit_smem()

        def pv(acc_ref):
            plgpu.wgmma(acc_ref, vt_smem if v_via_registers else v_smem.at[slot].T, p_t)
            return acc_ref[...]
        if probe >= 3:
            acc = acc + pl.run_scoped(pv, plgpu.ACC((head_dim, cols), jnp.float32))
        plgpu.commit_smem()  # a warpgroup barrier: every warp's PV has read the V slot
        pl.when(refill)(lambda: fetch(block(i + stages), slot, nxt, 1))
        return acc, m_new, l_acc, after

    wgmma_cols = plgpu.Layout.WGMMA.reduce(0)
    m_i = plgpu.layout_cast(jnp.full((cols,), -jnp.inf, jnp.float32), wgmma_cols)
    l_acc = plgpu.layout_cast(jnp.zeros((block_kv, cols), jnp.float32), plgpu.Layout.WGMMA)
    acc = plgpu.layout_cast(jnp.zeros((head_dim, cols), jnp.float32), plgpu.Layout.WGMMA)
    acc, m_i, l_acc, _ = lax.fori_loop(0, count, step, (acc, m_i, l_acc, refill_pages))

    l_i = l_acc.sum(axis=0)
    has_keys = l_i > 0
    l_safe = jnp.where(has_keys, l_i, 1.0)
    o_t = acc * lax.broadcast_in_dim(1.0 / l_safe, acc.shape, [1])  # normalised; 0 without keys
    lse = jnp.where(has_keys, m_i + jnp.log2(l_safe), -jnp.inf)  # base 2, -inf without keys

    def store_out(o_t):
        (o_stage,) = stage[:1]  # untiled [cols, d]: a [group, d] box can leave from any row
        o_stage.T[...] = o_t.astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_stage.at[pl.ds(offset, group)], out_ref.at[pl.ds(q_row0, group)])
        plgpu.wait_smem_to_gmem(0)

    if num_splits == 1:
        store_out(o_t)
    elif merge == "combine":
        o_tile, lse_tile = stage
        o_tile[...] = o_t  # [d, cols] float32 as it is: a transposed float32 store finds no layout
        lse_tile[...] = lse
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_tile, opart_ref.at[s, h, j])
        plgpu.copy_smem_to_gmem(lse_tile, lse_ref.at[s, h, j])
        plgpu.wait_smem_to_gmem(0)
    else:
        (recv_o, recv_l), (o_bar, l_bar) = landing
        lse_t = lax.broadcast_in_dim(lse, (64, cols), [1])  # every row the same

        @pl.when(s != 0)
        def _send():
            plgpu.async_store_smem(o_t, recv_o.at[s - 1], o_bar.at[s - 1], cluster_idx=0, cluster_dim="s")
            plgpu.async_store_smem(lse_t, recv_l.at[s - 1], l_bar.at[s - 1], cluster_idx=0, cluster_dim="s")

        @pl.when(s == 0)
        def _merge():
            lses, parts = [lse_t], [o_t]
            for t in range(num_splits - 1):
                plgpu.barrier_wait(o_bar.at[t])
                plgpu.barrier_wait(l_bar.at[t])
                lses.append(plgpu.load(recv_l.at[t], layout=plgpu.Layout.WGMMA))
                parts.append(plgpu.load(recv_o.at[t], layout=plgpu.Layout.WGMMA))
            store_out(_merge_tiles(lses, parts, head_dim))


def _widen(x, head_dim: int):
    """A [64, cols] tile whose rows are equal, as [head_dim, cols]."""
    return x if head_dim == 64 else jnp.concatenate([x] * (head_dim // 64), axis=0)


def _merge_tiles(lses, parts, head_dim: int):
    """merge_partials on tiles: lses[s] [64, cols] (rows equal), parts[s] [head_dim, cols]; every
    operation elementwise in one layout (no reductions)."""
    lse_max = functools.reduce(jnp.maximum, lses)
    lse_max = jnp.where(lse_max == -jnp.inf, 0.0, lse_max)
    ws = [jnp.exp2(lse - lse_max) for lse in lses]  # 0 for splits without keys
    total = functools.reduce(jnp.add, ws)
    num = functools.reduce(jnp.add, [_widen(w, head_dim) * part for w, part in zip(ws, parts)])
    return num / _widen(jnp.where(total == 0, 1.0, total), head_dim)


@functools.partial(jax.jit, static_argnames=("sm_scale", "num_splits", "block_kv", "stages", "merge",
                                             "interpret", "probe", "v_via_registers"))
def _attend(q, kv_pages, kv_lens, page_indices, num_seqs, *, sm_scale: float, num_splits: int,
            block_kv: int, stages: int, merge: str, interpret: bool, probe: int = 3,
            v_via_registers: bool = False):
    num_rows, num_q_heads, head_dim = q.shape
    num_pages, page_size, combined, _ = kv_pages.shape
    num_kv_heads = combined // 2
    group = num_q_heads // num_kv_heads
    max_num_seqs, pages_per_seq = page_indices.shape
    cols = q_cols(num_q_heads, group)
    rows = num_rows * num_q_heads
    q2 = q.reshape(rows, head_dim)  # free: a bitcast
    # The tiled view of q needs whole 8-row tiles; with two q tiles (cols 16) one more tile, so no
    # copy's box lies wholly past the array (TMA zero-fills that too, but it is an edge worth not
    # standing on).  Neither pads the 8B shape (32 q heads, cols 8).
    pad = -rows % TILE + (TILE if cols > TILE else 0)
    if pad:
        q2 = jnp.pad(q2, [(0, pad), (0, 0)])
    tiles = lambda minor: (plgpu.TilingTransform((8, min(minor, 64))),  # noqa: E731
                           plgpu.SwizzleTransform(min(minor, 64) * 2))
    copies = block_kv // min(page_size, block_kv)
    scratch = [
        (plgpu.SMEM((cols, head_dim), q.dtype, transforms=tiles(head_dim)),
         plgpu.SMEM((stages, block_kv, head_dim), q.dtype, transforms=tiles(head_dim)),
         plgpu.SMEM((stages, block_kv, head_dim), q.dtype, transforms=tiles(head_dim)),
         plgpu.SMEM((cols, block_kv), q.dtype, transforms=tiles(block_kv)),
         *((plgpu.SMEM((head_dim, cols), jnp.float32), plgpu.SMEM((cols,), jnp.float32))
           if num_splits > 1 and merge == "combine" else (plgpu.SMEM((cols, head_dim), q.dtype),))),
        (plgpu.Barrier(num_arrivals=cols // TILE),
         plgpu.Barrier(num_arrivals=copies, num_barriers=stages),
         plgpu.Barrier(num_arrivals=copies, num_barriers=stages)),
    ]
    launch = dict(grid=(num_kv_heads, num_rows), grid_names=("h", "j"))
    if num_splits == 1:
        out_type = jax.ShapeDtypeStruct((rows + pad, head_dim), q.dtype)
        launch = dict(grid=(1, num_kv_heads, num_rows), grid_names=("s", "h", "j"))
    elif merge == "combine":
        out_type = (jax.ShapeDtypeStruct((num_splits, num_kv_heads, num_rows, head_dim, cols), jnp.float32),
                    jax.ShapeDtypeStruct((num_splits, num_kv_heads, num_rows, cols), jnp.float32))
        launch = dict(grid=(num_splits, num_kv_heads, num_rows), grid_names=("s", "h", "j"))
    else:
        out_type = jax.ShapeDtypeStruct((rows + pad, head_dim), q.dtype)
        # The landing buffers and their barriers are kernel-level scratch: the barriers are
        # initialised before the prologue's cluster sync, and nothing else aliases them.
        scratch.append((plgpu.SMEM((num_splits - 1, head_dim, cols), jnp.float32),
                        plgpu.SMEM((num_splits - 1, 64, cols), jnp.float32)))
        scratch.append((plgpu.Barrier(num_barriers=num_splits - 1), plgpu.Barrier(num_barriers=num_splits - 1)))
        launch.update(cluster=(num_splits,), cluster_names=("s",))
    if v_via_registers:
        scratch.append((plgpu.SMEM((head_dim, block_kv), q.dtype, transforms=tiles(block_kv)),))
    kernel = functools.partial(
        _kernel, merge=merge, num_splits=num_splits, block_kv=block_kv, stages=stages,
        page_size=page_size, group=group, cols=cols, num_q_heads=num_q_heads, num_pages=num_pages,
        pages_per_seq=pages_per_seq, max_num_seqs=max_num_seqs, sm_scale=sm_scale, probe=probe,
        v_via_registers=v_via_registers)
    out = plgpu.kernel(
        kernel, out_type=out_type, scratch_types=scratch, **launch,
        kernel_name=(f"decode_attention_mgpu_s{num_splits}" + (f"_{merge}" if num_splits > 1 else "")
                     + (f"_probe{probe}" if probe < 3 else "") + ("_vreg" if v_via_registers else "")),
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=plgpu.InterpretGPUParams() if interpret else None,
    )(kv_lens.astype(jnp.int32), page_indices.astype(jnp.int32), num_seqs.astype(jnp.int32).reshape(1),
      q2, kv_pages)
    if num_splits > 1 and merge == "combine":
        return out
    return out[:rows].reshape(num_rows, num_q_heads, head_dim)


def _combine_kernel(o_part_ref, lse_ref, out_ref, *, num_splits: int, num_kv_heads: int, num_rows: int,
                    num_q_heads: int, group: int, block_rows: int):
    """Out rows x = j * num_q_heads + q head of one block: merge the splits' tiles' columns."""
    from jax.experimental.pallas import triton as pltr
    head_dim = out_ref.shape[-1]
    x = pl.program_id(0) * block_rows + lax.broadcasted_iota(jnp.int32, (block_rows,), 0)
    j = lax.div(x, num_q_heads)
    hq = lax.rem(x, num_q_heads)
    h = lax.div(hq, group)
    q_row0 = x - lax.rem(hq, group)  # the group's first row
    c = x - lax.div(q_row0, TILE) * TILE  # the row's column in its pair's tile
    col = lax.broadcasted_iota(jnp.int32, (head_dim,), 0)
    lses, parts = [], []
    for s in range(num_splits):
        tile = (s * num_kv_heads + h) * num_rows + j
        lses.append(pltr.load(lse_ref.at[tile, c]))
        parts.append(pltr.load(o_part_ref.at[(tile * head_dim)[:, None] + col[None, :], c[:, None]]))
    out = merge_partials(lses, parts)  # padding rows: every split -inf, so 0
    pltr.store(out_ref.at[x[:, None], col[None, :]], out.astype(out_ref.dtype))


@functools.partial(jax.jit, static_argnames=("group", "dtype", "interpret"))
def _combine(o_part, lse, *, group: int, dtype, interpret: bool):
    """The splits' merge for merge="combine": o_part f32[S, kv heads, rows, d, cols] (each tile
    O^T), lse f32[S, kv heads, rows, cols] -> [rows, q heads, d]."""
    from jax.experimental.pallas import triton as pltr
    num_splits, num_kv_heads, num_rows, head_dim, cols = o_part.shape
    num_q_heads = num_kv_heads * group
    rows = num_rows * num_q_heads
    block_rows = math.gcd(rows, 8)
    kernel = functools.partial(_combine_kernel, num_splits=num_splits, num_kv_heads=num_kv_heads,
                               num_rows=num_rows, num_q_heads=num_q_heads, group=group,
                               block_rows=block_rows)
    out = pl.pallas_call(
        kernel, grid=(rows // block_rows,), out_shape=jax.ShapeDtypeStruct((rows, head_dim), dtype),
        compiler_params=pltr.CompilerParams(num_warps=4, num_stages=1), interpret=interpret,
        name=f"decode_attention_mgpu_combine_s{num_splits}",
    )(o_part.reshape(-1, cols), lse.reshape(-1, cols))
    return out.reshape(num_rows, num_q_heads, head_dim)


def decode_attention(q, kv_pages, kv_lens, page_indices, num_seqs, *, sm_scale: float,
                     num_splits: int | None = None, block_kv: int | None = None,
                     stages: int | None = None, merge: str | None = None,
                     v_via_registers: bool = False, interpret: bool | None = None) -> jax.Array:
    """Attention of one decode token a request row (module docstring).  q [num_rows, q heads,
    head_dim] (rotated), kv_pages [num_pages, page_size, 2 * kv heads, head_dim] (the token's
    own K/V written), kv_lens [max_num_seqs], page_indices [max_num_seqs, pages_per_seq],
    num_seqs [1] -> [num_rows, q heads, head_dim] in q's dtype, rows >= num_seqs[0] zero.
    num_splits / block_kv / stages override `default_config`; merge: "cluster" or "combine"
    (default `merge_default`); v_via_registers: PV's A operand transposed through registers
    instead of V's transposed shared-memory view (the fallback; `_kernel`); interpret defaults to
    True on the CPU backend."""
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    interpret = bool(interpret)
    merge = merge_default(interpret) if merge is None else merge
    if merge not in MERGES:
        raise ValueError(f"merge must be one of {', '.join(MERGES)}; got {merge!r}")
    cfg = default_config(q.shape[0], kv_pages.shape[2] // 2, q.shape[1], q.shape[2], kv_pages.shape[1],
                         page_indices.shape[1], merge)
    for key, value in (("num_splits", num_splits), ("block_kv", block_kv), ("stages", stages)):
        if value is not None:
            cfg[key] = int(value)
    if not supported(q, kv_pages, None, None, cfg["block_kv"]):
        raise ValueError(
            f"decode_attention (Mosaic GPU) needs bf16/f16 q and pages, head_dim 64 or 128, block_kv 64 "
            f"or 128, page_size % 8 == 0 dividing or divided by block_kv, 1-8 q heads a kv head; got "
            f"{q.dtype}/{kv_pages.dtype}, head_dim {q.shape[-1]}, block_kv {cfg['block_kv']}, page_size "
            f"{kv_pages.shape[1]}, {q.shape[1]} q heads, {kv_pages.shape[2] // 2} kv heads")
    if cfg["num_splits"] < 1 or cfg["stages"] < 1:
        raise ValueError(f"num_splits and stages must be >= 1; got {cfg}")
    if cfg["num_splits"] > 1 and merge == "cluster":
        if interpret:
            raise NotImplementedError(
                "merge='cluster' cannot run in Mosaic GPU's interpreter (no rule for async_store_smem); "
                "use merge='combine' there (its lowering is checked on CPU, its numbers on a GPU)")
        if cfg["num_splits"] > MAX_CLUSTER:
            raise ValueError(f"merge='cluster' takes at most {MAX_CLUSTER} splits (Hopper's portable "
                             f"cluster size); got {cfg['num_splits']}")
    out = _attend(q, kv_pages, kv_lens, page_indices, num_seqs, sm_scale=float(sm_scale),
                  interpret=interpret, merge=merge, v_via_registers=bool(v_via_registers), **cfg)
    if cfg["num_splits"] > 1 and merge == "combine":
        # a separate jitted call: inside one jit the Mosaic interpreter's nested dispatches and
        # the Triton interpreter's starved on a 2-core CPU (NOTES.md, prefill); on a GPU the
        # caller's jit inlines both
        out = _combine(*out, group=q.shape[1] // (kv_pages.shape[2] // 2), dtype=q.dtype,
                       interpret=interpret)
    return out
