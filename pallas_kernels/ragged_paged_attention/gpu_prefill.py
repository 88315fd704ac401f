"""Prefill attention over the paged KV cache for Hopper GPUs: Pallas on Mosaic GPU (TMA + wgmma).

The Triton kernel (`gpu.py`) gathers K/V through pointer tensors and multiplies with Triton's
dots; on an H200 its 4k prefill chunk reaches 34-38% of the bf16 matmul rate where cuDNN's and
jax's Mosaic GPU flash attention reach 62-64% (BENCHMARKS.md, sixteenth session).  This kernel is
the Hopper way: warp-specialised, K/V pages copied into shared memory by TMA, QK^T and PV on
wgmma.  It serves the long requests of a big prefill bucket (`gpu.py`'s long launch); decode
tokens and short requests stay with the Triton kernel's decode tile.

Work decomposition (`work_items`, a few small XLA ops before the launch):
    work item = (request, block of ITEM_ROWS = COMPUTE_WGS * BLOCK_Q query tokens)
    pairs     = (q head, work item), q heads fastest so the `group` q heads reading one kv head's
                pages run together (their K/V reads after the first come from L2)
    grid      = one CTA a pair (default), or `num_ctas` persistent CTAs each walking pairs c,
                c + num_ctas, ... in turn, the K/V ring running on from one item into the next
                (the next item's first blocks are copied while this one's last are computed)
Items are ordered by how many key blocks they walk, longest first, so the causal tail does not
leave one long program running alone at the end.  A CTA is three warpgroups: two compute
warpgroups of BLOCK_Q (= 64, wgmma's M) query rows each and a memory warpgroup that walks the
key blocks of the item, copying each block's K and V (BLOCK_KV keys: BLOCK_KV / page_size pages,
one TMA copy per page, or one slice of a bigger page; a block's page ids read together, one block
ahead) into a ring of `stages` slots.  The compute
warpgroups take blocks in order with an online softmax in base 2 (scores scaled by sm_scale *
log2(e) once, against a running max kept in those units), masking only the blocks on the causal
diagonal.  A warpgroup whose rows end earlier than the other's (the causal tail, or the request's
last partial item) keeps releasing the slots the memory warpgroup still fills.

Ragged rows: q is read in boxes of BLOCK_Q tokens from the flat [num_tokens, q heads, head_dim]
array at any row (rows past the request are another request's or out of bounds, computed and
dropped); Mosaic GPU's TMA into a swizzled buffer wants tile-aligned rows, so the box lands in an
untiled staging buffer and reaches wgmma's swizzled one through registers.  The output goes back
through the same staging buffer, and only the request's rows leave it: a ladder of TMA boxes of
64, 32, ..., 1 rows (the rows after the request belong to another program).  Bucket-padding rows
get zeros from ZERO items; short requests' rows are the decode-tile launch's.

Limits (`supported`): bf16/f16, head_dim 64 or 128, page_size a multiple of 8
(TMA boxes of whole swizzle tiles) that divides or is divided by BLOCK_KV, no sliding window and
no soft cap: everything else runs on the Triton kernel.  On Hopper GPUs this kernel is the long
launch's default (`prefill_kernel_default`).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from ..env import env_choice
from . import work

_LOG2E = math.log2(math.e)
BLOCK_Q = 64  # query rows of one compute warpgroup: wgmma's M
COMPUTE_WGS = 2
ITEM_ROWS = BLOCK_Q * COMPUTE_WGS
BLOCK_KV = 128
STAGES = 2  # K/V ring slots: 2 x 2 x 32 KB at head_dim 128, beside q (32 KB) and its staging (32 KB)
ATTEND, ZERO, IDLE = 0, 1, 2  # work item kinds


def supported(q: jax.Array, kv_pages: jax.Array, sliding_window, soft_cap,
              block_kv: int = BLOCK_KV) -> bool:
    """Whether this kernel takes the step (shapes and options only)."""
    head_dim = q.shape[-1]
    page_size = kv_pages.shape[1]
    # head_dim 64 or 128: at 256 the K/V ring (2 x 2 x 64 KB) and the accumulator's 128 registers
    # a thread no longer fit beside q and the scores.
    return (q.dtype in (jnp.bfloat16, jnp.float16) and kv_pages.dtype == q.dtype
            and head_dim in (64, 128) and page_size % 8 == 0
            and (page_size % block_kv == 0 or block_kv % page_size == 0)
            and sliding_window is None and soft_cap is None)


PREFILL_KERNELS = ("triton", "mgpu")


def prefill_kernel_default() -> str:
    """Which kernel runs the long launch of big prefill buckets on a Hopper GPU: "mgpu" (this
    module) or "triton" (gpu.py's 128-row tile).  $JAXENGINE_PREFILL_KERNEL picks it; default
    "mgpu" since the seventeenth session, H200, device-timed (BENCHMARKS.md): a 4k chunk 262.7-278.7
    us (62.8-66.6% of the bf16 matmul rate) against the Triton tile's 343-469 us and cuDNN's 275,
    8k 913-929 us (75-77%) against 1,721 and cuDNN's 928-931, mixed steps as fast or faster
    (1984 prefill + 64 decodes 239.7 us against 281.0); the engine's 8B 1024/128 x 64 run +0.9%
    (budget 8192) and 3,303 tok/s against 3,158 at the default budget.  Other GPUs, the interpreter
    (unless passed by argument) and what `supported` refuses stay on "triton" (gpu.py)."""
    return env_choice("JAXENGINE_PREFILL_KERNEL", PREFILL_KERNELS, "mgpu")


def work_items(cu_q_lens, kv_lens, num_seqs, *, num_tokens: int, num_work: int, short_q: int):
    """The launch's work list, [6, num_work] (kind, a, b, q_start, q_len, ctx) per item, longest
    walk first: ATTEND (request a, first query row b within it) for every block of ITEM_ROWS rows
    of each request of more than short_q tokens, a walk being the item's last row's context
    length; then ZERO (-, first token b) for every block of ITEM_ROWS bucket-padding rows (tokens
    past the last request), written as zeros; IDLE pads the list.  Short requests' rows are left
    to the decode-tile launch.  q_start, q_len and ctx (keys before the request's first query
    token) are the ATTEND item's request's, 0 for the others: a program reads its item in one
    load round, not the item and then its request's rows of cu_q_lens and kv_lens."""
    max_num_seqs = cu_q_lens.shape[0] - 1
    seq, start, end = work.work_items(cu_q_lens, num_seqs, ITEM_ROWS, num_work, longer_than=short_q)
    attend = end > start
    q_len = cu_q_lens[seq + 1] - cu_q_lens[seq]
    q0 = start - cu_q_lens[seq]
    walk = kv_lens[seq] - q_len + jnp.minimum(q0 + ITEM_ROWS, q_len)
    w = jnp.arange(num_work, dtype=jnp.int32)
    pad0 = cu_q_lens[jnp.minimum(num_seqs[0], max_num_seqs)] + (w - jnp.sum(attend)) * ITEM_ROWS
    zero = ~attend & (pad0 < num_tokens)
    kind = jnp.where(attend, ATTEND, jnp.where(zero, ZERO, IDLE))
    order = jnp.argsort(jnp.where(attend, -walk, jnp.where(zero, 0, 1)), stable=True)
    a = jnp.where(attend, seq, 0)
    b = jnp.where(attend, q0, jnp.where(zero, pad0, 0))
    q_start = jnp.where(attend, cu_q_lens[seq], 0)
    ctx = jnp.where(attend, kv_lens[seq] - q_len, 0)
    return jnp.stack([kind, a, b, q_start, jnp.where(attend, q_len, 0), ctx]).astype(jnp.int32)[:, order]


def num_work_items(num_tokens: int, max_num_seqs: int, short_q: int) -> int:
    """A bound on work_items' count: sum(ceil(q_len / R)) over the long requests plus
    ceil(padding / R) <= num_tokens // R + their number + 1."""
    return num_tokens // ITEM_ROWS + min(max_num_seqs, num_tokens // (short_q + 1)) + 1


def _store_rows(stage, o_ref, tok0, rows, head):
    """stage's first `rows` rows to o_ref[tok0 : tok0 + rows, head].  TMA boxes have static
    shapes: a ladder of 64, 32, ..., 1-row boxes, one per set bit of `rows` (a full warpgroup's
    64 rows: one box)."""
    plgpu.commit_smem()
    done = 0  # rows stored so far (traced after the first box)
    size = BLOCK_Q
    while size >= 1:
        take = (rows & size) != 0

        @pl.when(take)
        def _(size=size, done=done):
            plgpu.copy_smem_to_gmem(stage.at[pl.ds(done, size)], o_ref.at[pl.ds(tok0 + done, size), head])
        done = done + jnp.where(take, size, 0)
        size //= 2
    plgpu.wait_smem_to_gmem(0)


def _kernel(items_ref, pt_ref, q_ref, kv_ref, o_ref, *scoped, sm_scale: float,
            num_tokens: int, page_size: int, pages_per_seq: int, num_pages: int, group: int,
            block_kv: int, stages: int, num_heads: int, num_work: int, num_ctas: int):
    (q_smem, k_smem, v_smem, q_stage, p_smem), (k_ready, v_ready, q_ready), (k_free, v_free), sched = scoped
    cta = lax.axis_index("ctas")
    wg = lax.axis_index("wg")
    head_dim = q_smem.shape[-1]
    scale = sm_scale * _LOG2E
    # The (q head, work item) pairs, q heads fastest, are dealt to the CTAs round robin: CTA c
    # takes pairs c, c + num_ctas, ...  With num_ctas = every pair, a CTA takes one; with fewer
    # (persistent) the ring, its barriers' phases and the count of key blocks (`g0`, which gives
    # each block its ring slot) run on from one item into the next, so the memory warpgroup copies
    # the next item's first blocks while the compute warpgroups finish this one.
    mine = lax.div(num_heads * num_work - cta + num_ctas - 1, num_ctas)

    def item(k):
        pair = cta + k * num_ctas
        w = lax.div(pair, num_heads)
        kind = items_ref[0, w]
        it = dict(head=lax.rem(pair, num_heads), kind=kind, attend=kind == ATTEND, seq=items_ref[1, w],
                  # ATTEND: the item's first query row within the request; ZERO: first token
                  first=items_ref[2, w], q_start=items_ref[3, w], q_len=items_ref[4, w],
                  ctx=items_ref[5, w])  # ctx: keys before the request's first query token
        # Key blocks the item walks: up to its last row's causal horizon.
        item_rows = jnp.minimum(it["q_len"] - it["first"], ITEM_ROWS)
        it["steps"] = jnp.where(it["attend"],
                                lax.div(it["ctx"] + it["first"] + item_rows + block_kv - 1, block_kv), 0)
        return it

    def sync_schedule():
        # The two compute warpgroups take turns on the tensor cores: one's softmax runs under
        # the other's wgmma.
        plgpu.barrier_arrive(sched)
        plgpu.barrier_wait(sched)

    def zeros(it):
        tok0 = it["first"] + wg * BLOCK_Q
        stage = q_stage.at[wg]
        stage[...] = plgpu.layout_cast(jnp.zeros((BLOCK_Q, head_dim), q_stage.dtype), plgpu.Layout.WGMMA)
        _store_rows(stage, o_ref, tok0, jnp.clip(num_tokens - tok0, 0, BLOCK_Q), it["head"])

    def compute(it, g0):
        head, ctx, item_steps = it["head"], it["ctx"], it["steps"]
        base = it["first"] + wg * BLOCK_Q  # the warpgroup's first row within the request
        rows = jnp.clip(it["q_len"] - base, 0, BLOCK_Q)
        steps = jnp.where(rows > 0, lax.div(ctx + base + rows + block_kv - 1, block_kv), 0)
        # Blocks every row sees whole: keys < ctx + base + 1 (row 0's horizon).
        full = jnp.minimum(lax.div(ctx + base + 1, block_kv), steps)

        def slot_of(j):  # the ring slot of the item's key block j
            return lax.rem(g0 + j, stages)

        # q rows start anywhere: Mosaic GPU's TMA into a tiled (swizzled) buffer wants tile-aligned
        # rows, so q lands in an untiled staging buffer first and goes to the swizzled buffer
        # wgmma reads through registers (16 KB once an item).
        q_view = q_smem.at[wg]
        stage = q_stage.at[wg]
        plgpu.copy_gmem_to_smem(q_ref.at[pl.ds(it["q_start"] + base, BLOCK_Q), head], stage, q_ready.at[wg])
        plgpu.barrier_wait(q_ready.at[wg])
        q_view[...] = plgpu.load(stage, layout=plgpu.Layout.WGMMA, optimized=False)
        plgpu.commit_smem()

        m_i = plgpu.layout_cast(jnp.full((BLOCK_Q,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
        l_i = plgpu.layout_cast(jnp.full((BLOCK_Q,), 0.0, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
        acc = plgpu.layout_cast(jnp.full((BLOCK_Q, head_dim), 0.0, jnp.float32), plgpu.Layout.WGMMA)

        @pl.when(steps > 0)
        def _():
            plgpu.barrier_wait(k_ready.at[slot_of(0)])

        pl.when(wg == 1)(sync_schedule)

        def step(j, carry, masked: bool):
            acc, m_i, l_i = carry
            slot = slot_of(j)

            def qk_scope(s_ref):
                plgpu.wgmma(s_ref, q_view, k_smem.at[slot].transpose((1, 0)))
                sync_schedule()
                return s_ref[...]
            s = pl.run_scoped(qk_scope, plgpu.ACC((BLOCK_Q, block_kv), jnp.float32))
            plgpu.barrier_arrive(k_free.at[slot])
            if masked:
                r = plgpu.broadcasted_iota(jnp.int32, s.shape, 0, layout=plgpu.Layout.WGMMA)
                c = plgpu.broadcasted_iota(jnp.int32, s.shape, 1, layout=plgpu.Layout.WGMMA)
                s = jnp.where(j * block_kv + c <= ctx + base + r, s, -jnp.inf)
            # m is kept in scaled (base-2) units; every row sees key 0 in block 0, so from the
            # first block on m is finite and masked entries give exp2(-inf) = 0.
            m_new = jnp.maximum(m_i, s.max(axis=1) * scale)
            alpha = jnp.exp2(m_i - m_new)
            p = jnp.exp2(s * scale - lax.broadcast_in_dim(m_new, s.shape, [0]))
            acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
            l_i = l_i * alpha + p.sum(axis=1)
            p16 = p.astype(q_smem.dtype)
            acc, l_i, m_new, p16 = lax.optimization_barrier((acc, l_i, m_new, p16))
            plgpu.barrier_arrive(sched)  # softmax done
            plgpu.barrier_wait(v_ready.at[slot])
            plgpu.barrier_wait(sched)  # the tensor cores are ours

            def pv(acc_ref):
                if p_smem is None:
                    plgpu.wgmma(acc_ref, p16, v_smem.at[slot])  # P from registers (wgmma's A)
                else:
                    p_view = p_smem.at[wg]
                    p_view[...] = p16
                    plgpu.commit_smem()
                    plgpu.wgmma(acc_ref, p_view, v_smem.at[slot])
                nxt = j + 1

                @pl.when(nxt < steps)
                def _():
                    plgpu.barrier_wait(k_ready.at[slot_of(nxt)])
            if p_smem is None:
                acc = pl.run_state(pv)(plgpu.ACC.init(acc))
            else:
                def pv_scope(acc_ref):
                    pv(acc_ref)
                    return acc_ref[...]
                acc = acc + pl.run_scoped(pv_scope, plgpu.ACC((BLOCK_Q, head_dim), jnp.float32))
            plgpu.barrier_arrive(v_free.at[slot])
            return acc, m_new, l_i

        carry = lax.fori_loop(0, full, functools.partial(step, masked=False), (acc, m_i, l_i))
        acc, m_i, l_i = lax.fori_loop(full, steps, functools.partial(step, masked=True), carry)

        @pl.loop(steps, item_steps)
        def _release(j):
            # Blocks past this warpgroup's rows: released as if consumed, keeping the turn taking
            # in step with the other warpgroup (two schedule phases a block, as in `step`).  The
            # waits on their copies cost nothing here (the other warpgroup waits for them) and
            # keep every barrier phase observed by each warpgroup that waits on it, which
            # Mosaic GPU's interpreter checks (and the phases right for the next item).
            slot = slot_of(j)
            plgpu.barrier_wait(k_ready.at[slot])
            plgpu.barrier_wait(v_ready.at[slot])
            plgpu.barrier_arrive(k_free.at[slot])
            plgpu.barrier_arrive(v_free.at[slot])
            sync_schedule()
            sync_schedule()

        pl.when(wg == 0)(sync_schedule)
        l_safe = jnp.where(l_i == 0.0, 1.0, l_i)
        out = acc * lax.broadcast_in_dim(1.0 / l_safe, acc.shape, [0])
        stage[...] = out.astype(q_stage.dtype)  # untiled: row-exact boxes can leave it
        _store_rows(stage, o_ref, it["q_start"] + base, rows, head)

    def memory(it, g0):
        kv_head = lax.div(it["head"], group)
        seq = it["seq"]
        piece = min(page_size, block_kv)  # keys of one TMA copy

        def pages_of(j):
            """Page ids of the item's block j's copies (block_kv / piece of them), all loaded
            before any is used: the table reads of a block overlap each other instead of each
            waiting for the TMA issued after the one before.  Entries past the request's pages
            (the last block's tail, or a block past the walk when prefetching) are clamped:
            those keys are read and masked, or not copied at all."""
            ids = []
            for i in range(block_kv // piece):
                entry = jnp.minimum(lax.div(j * block_kv + i * piece, page_size), pages_per_seq - 1)
                ids.append(jnp.clip(pt_ref[seq, entry], 0, num_pages - 1))
            return tuple(ids)

        def fetch(j, slot, pages, which, ready):
            col = 2 * kv_head + which  # K at combined head 2h, V at 2h + 1
            for i, page in enumerate(pages):
                # (a block is a slice of a page only when pages are bigger than blocks)
                within = (0 if page_size <= block_kv
                          else pl.multiple_of(lax.rem(j * block_kv + i * piece, page_size), block_kv))
                src = kv_ref.at[page, pl.ds(within, piece), col]
                dst = (k_smem if which == 0 else v_smem).at[slot, pl.ds(i * piece, piece)]
                plgpu.copy_gmem_to_smem(src, dst, ready.at[slot])

        def step(j, pages):
            # The next block's page ids are read now, one block ahead: their latency passes
            # under this block's waits for free slots instead of delaying the next copies.
            nxt = pages_of(j + 1)
            g = g0 + j  # blocks this CTA has copied before this one
            slot = lax.rem(g, stages)

            @pl.when(g >= stages)
            def _():
                plgpu.barrier_wait(k_free.at[slot])
            fetch(j, slot, pages, 0, k_ready)  # K and V of a block: one read of the table

            @pl.when(g >= stages)
            def _():
                plgpu.barrier_wait(v_free.at[slot])
            fetch(j, slot, pages, 1, v_ready)
            return nxt

        lax.fori_loop(0, it["steps"], step, pages_of(0))

    @pl.when(wg < COMPUTE_WGS)
    def _compute_warpgroups():
        plgpu.set_max_registers(232, action="increase")

        def body(k, g0):
            it = item(k)
            pl.when(it["kind"] == ZERO)(lambda: zeros(it))
            pl.when(it["attend"])(lambda: compute(it, g0))
            return g0 + it["steps"]
        lax.fori_loop(0, mine, body, jnp.int32(0))

    @pl.when(wg == COMPUTE_WGS)
    def _memory_warpgroup():
        plgpu.set_max_registers(40, action="decrease")

        def body(k, g0):
            it = item(k)
            pl.when(it["attend"])(lambda: memory(it, g0))
            return g0 + it["steps"]
        blocks = lax.fori_loop(0, mine, body, jnp.int32(0))

        @pl.loop(jnp.maximum(blocks - stages, 0), blocks)
        def _(g):
            # The last blocks' releases, so that every phase of the free barriers is observed
            # (the interpreter's check; on the GPU a short wait at the end).
            plgpu.barrier_wait(k_free.at[lax.rem(g, stages)])
            plgpu.barrier_wait(v_free.at[lax.rem(g, stages)])


@functools.partial(jax.jit, static_argnames=("sm_scale", "short_q", "num_work", "block_kv", "stages",
                                             "num_ctas", "interpret"))
def _prefill(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, *, sm_scale: float,
             short_q: int, num_work: int, block_kv: int, stages: int, num_ctas: int | None,
             interpret: bool):
    num_tokens, num_q_heads, head_dim = q.shape
    num_pages, page_size, combined, _ = kv_pages.shape
    cu_q_lens = cu_q_lens.astype(jnp.int32)
    kv_lens = kv_lens.astype(jnp.int32)
    items = work_items(cu_q_lens, kv_lens, num_seqs, num_tokens=num_tokens, num_work=num_work,
                       short_q=short_q)
    tiles = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    copies = block_kv // min(page_size, block_kv)
    scratch = (
        (plgpu.SMEM((COMPUTE_WGS, BLOCK_Q, head_dim), q.dtype, transforms=tiles),
         plgpu.SMEM((stages, block_kv, head_dim), q.dtype, transforms=tiles),
         plgpu.SMEM((stages, block_kv, head_dim), q.dtype, transforms=tiles),
         plgpu.SMEM((COMPUTE_WGS, BLOCK_Q, head_dim), q.dtype),  # q / output staging (untiled)
         # Mosaic GPU's interpreter takes wgmma operands from shared memory only: there P goes
         # through it; compiled, P stays in registers (and the accumulator is wgmma's C).
         plgpu.SMEM((COMPUTE_WGS, BLOCK_Q, block_kv), q.dtype, transforms=tiles) if interpret else None),
        (plgpu.Barrier(num_arrivals=copies, num_barriers=stages),
         plgpu.Barrier(num_arrivals=copies, num_barriers=stages),
         plgpu.Barrier(num_barriers=COMPUTE_WGS)),
        (plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages),) * 2,
        plgpu.Barrier(num_arrivals=COMPUTE_WGS),
    )
    pairs = num_q_heads * num_work
    num_ctas = pairs if num_ctas is None else max(1, min(num_ctas, pairs))
    kernel = functools.partial(
        _kernel, sm_scale=sm_scale, num_tokens=num_tokens, page_size=page_size,
        pages_per_seq=page_indices.shape[1],
        num_pages=num_pages, group=num_q_heads // (combined // 2), block_kv=block_kv,
        stages=stages, num_heads=num_q_heads, num_work=num_work, num_ctas=num_ctas)
    return plgpu.kernel(
        kernel, out_type=jax.ShapeDtypeStruct(q.shape, q.dtype), scratch_types=scratch,
        grid=(num_ctas,), grid_names=("ctas",),
        num_threads=COMPUTE_WGS + 1, thread_name="wg", kernel_name="prefill_attention_mgpu",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=plgpu.InterpretGPUParams() if interpret else None,
    )(items, page_indices.astype(jnp.int32), q, kv_pages)


def prefill_attention(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, *, sm_scale: float,
                      short_q: int = 0, block_kv: int = BLOCK_KV, stages: int = STAGES,
                      num_ctas: int | None = None, interpret: bool | None = None) -> jax.Array:
    """Attention for the query rows of every request of more than short_q tokens (the reference's
    contract for those rows) and zeros in the bucket padding after the last request; the rows of
    shorter requests are left unwritten, for gpu.py's decode-tile launch, which writes them into
    this output (aliased).  Shapes as `reference.ragged_paged_attention`; `supported` must hold.
    num_ctas: None launches a CTA for every (q head, work item) pair; a number launches that many
    (persistent: e.g. the GPU's SM count), each walking its share of the pairs in turn."""
    if not supported(q, kv_pages, None, None, block_kv):
        raise ValueError(f"prefill_attention needs bf16/f16, head_dim 64 or 128 and "
                         f"page_size % 8 == 0 dividing or divided by block_kv {block_kv}; got "
                         f"{q.dtype}, head_dim {q.shape[-1]}, page_size {kv_pages.shape[1]}")
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    num_work = num_work_items(q.shape[0], page_indices.shape[0], short_q)
    return _prefill(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs,
                    sm_scale=float(sm_scale), short_q=int(short_q), num_work=num_work,
                    block_kv=block_kv, stages=stages, num_ctas=None if num_ctas is None else int(num_ctas),
                    interpret=bool(interpret))
