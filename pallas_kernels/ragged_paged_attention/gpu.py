"""Ragged paged attention for NVIDIA GPUs: a Pallas kernel lowered through Triton.

One `pallas_call` serves a whole ragged step (prefill chunks and decode tokens together).

Work decomposition (padded to a static count; each program finds its own item from cu_q_lens with
a cumulative sum over the request rows, `_find_work`, so no XLA kernels run before the launch):
    work item = (request, block of `block_q` consecutive query tokens of that request)
    grid      = (work item, kv head, kv split)
Each program takes the `block_q` tokens x `group` q heads that share one kv head as the rows
of one matrix (M = block_q * group, padded to a power of two), so GQA reads each K/V row once
per kv head, and walks the request's context in blocks of `block_k` tokens, gathering K/V rows
through the page table, with an online softmax.  Causal and sliding-window bounds cut the
walk short; blocks that every row sees in full run without a mask, the boundary blocks (causal
diagonal, window edge) after them with one.  With kv splits > 1 (flash-decoding), split s
walks blocks s, s + splits, ... (round robin) and writes a normalised partial output plus its
log-sum-exp; a second small Pallas kernel (`combine`, shared with gpu_decode) merges them.

Layout reads: kv_pages [num_pages, page_size, 2 * num_kv_heads, head_dim] is viewed as rows
[num_pages * page_size * 2 * num_kv_heads, head_dim]; K of (page p, slot t, kv head h) is row
(p * page_size + t) * 2 * num_kv_heads + 2 * h and V the next row, each head_dim contiguous.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from ..env import check_choice, env_choice, hopper
from . import gpu_prefill

_LOG2E = math.log2(math.e)
# H100 SXM: 132 SMs.  Used only to pick how many kv splits a decode step needs to fill the chip.
_DEFAULT_NUM_SMS = 132


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


# Tiles of FAST_MATH_MIN_ROWS..FAST_MATH_MAX_ROWS rows take fast_math by default (fast_math_default).
FAST_MATH_MIN_ROWS, FAST_MATH_MAX_ROWS = 32, 128


def fast_math_default() -> bool | None:
    """Whether the compiled GPU kernel writes its online softmax's exponent as PTX (`fast_math`):
    p = ex2.approx.ftz(fma(s, scale, -m)) and alpha = ex2.approx.ftz(m_prev - m), where XLA's
    Triton pipeline contracts no multiply-add (Nsight Compute, fifteenth session: 0 fused of 64M
    FP32 instructions in the 4k prefill kernel) and lowers exp2 to libdevice's non-ftz
    `__nv_exp2f` (a range check and two predicated multiplies around the MUFU).
    $JAXENGINE_ATTN_FAST_MATH=1 / 0 forces it on / off for every tile; unset (None) it is on for
    tiles of FAST_MATH_MIN_ROWS to FAST_MATH_MAX_ROWS rows (the prefill tile of buckets under
    2,048 tokens: 128 rows).  H200, fifteenth session (device-timed, two calls each way): that
    tile's mixed step (512 prefill + 63 decodes) 296 -> 259 us; the 256-row long tile (255
    registers, spilling already) 511 -> 703 us at a 4k chunk, 1,880 -> 2,585 us at 8k; 16-row
    decode tiles within 1% (b64 ctx 2k 132 -> 133 us).  The interpreter (CPU tests) always takes
    the jnp path: inline PTX has no interpreter rule."""
    env = env_choice("JAXENGINE_ATTN_FAST_MATH", ("0", "1"), None)
    return None if env is None else env == "1"


def _f32_asm(asm: str, *args):
    """One float32 PTX instruction sequence applied elementwise ($0 the result, $1.. the args,
    all of one shape)."""
    shape = args[0].shape
    args = [jnp.broadcast_to(jnp.asarray(a, jnp.float32), shape) for a in args]
    [out] = plgpu.elementwise_inline_asm(
        asm, args=args, constraints="=f" + ",f" * len(args), pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(shape, jnp.float32)])
    return out


def exp2_fma(s, scale, neg_m, fast: bool):
    """exp2(s * scale + neg_m): with fast, one FMA and one MUFU.EX2 (subnormal results flush to
    0, a weight below 2**-126 of the row's largest)."""
    if not fast:
        return jnp.exp2((s * scale if scale != 1.0 else s) + neg_m)
    return _f32_asm("{ .reg .f32 t; fma.rn.f32 t, $1, $2, $3; ex2.approx.ftz.f32 $0, t; }",
                    s, scale, neg_m)


def exp2(x, fast: bool):
    return _f32_asm("ex2.approx.ftz.f32 $0, $1;", x) if fast else jnp.exp2(x)


def _kernel(
    # scalars-in-memory
    num_seqs_ref,  # i32[1]
    kv_lens_ref,  # i32[max_num_seqs]
    page_table_ref,  # i32[max_num_seqs * pages_per_seq]
    cu_q_lens_ref,  # i32[max_num_seqs + 1]
    # tensors
    q_ref,  # [num_tokens * num_q_heads, head_dim]
    kv_ref,  # [num_pages * page_size * 2 * num_kv_heads, head_dim]
    *rest,
    page_size: int,
    pages_per_seq: int,
    num_q_heads: int,
    num_kv_heads: int,
    group: int,
    block_q: int,
    block_m: int,
    block_k: int,
    rows_per_split: int,
    clamp_rows: bool,
    sm_scale: float,
    sliding_window: int | None,
    soft_cap: float | None,
    num_splits: int,
    prescale_q: bool,
    precision,
    max_num_seqs: int,
    short_q: int,
    select: str,
    fused_combine: bool = False,
    fast_math: bool = False,
):
    out_ref = cnt_ref = None
    if num_splits == 1:
        _zeros_in_ref, o_ref = rest  # output aliased onto a zeros buffer: padding rows stay 0
        lse_ref = None
    elif fused_combine:  # out and the per-(work item, kv head) counts aliased onto zeros
        _zeros_in_ref, _cnt_in_ref, o_ref, lse_ref, out_ref, cnt_ref = rest
    else:
        o_ref, lse_ref = rest  # [splits * num_tokens * num_q_heads, head_dim], [splits * ...]
    # Grid (kv head, split, work item): the kv heads of one (work item, split) launch next to
    # each other, so the 2 * num_kv_heads * head_dim row of each page slot is read by
    # neighbouring programs (one DRAM page, shared L2 lines) instead of at 8 distant times.
    # Work items go in reverse: a request's last q blocks see the most keys, start them first.
    h = pl.program_id(0)
    split = pl.program_id(1)
    w = pl.num_programs(2) - 1 - pl.program_id(2)

    seq, q_start, num_rows = _find_work(w, cu_q_lens_ref, num_seqs_ref, max_num_seqs=max_num_seqs,
                                        block_q=block_q, short_q=short_q, select=select)

    # Padding work items (and, with two launches, those of the other launch's requests) exit
    # after finding that out, before any q or K/V traffic: a short launch of a pure-prefill step
    # is all of them.
    @pl.when(num_rows > 0)
    def _program():
        kv_len = kv_lens_ref[seq]
        cu_start = cu_q_lens_ref[seq]
        q_len = cu_q_lens_ref[seq + 1] - cu_start
        first_pos = kv_len - q_len + (q_start - cu_start)  # position of the block's first query
        kv_hi = first_pos + num_rows  # keys [kv_lo, kv_hi) can be visible to this block
        if sliding_window is not None:
            kv_lo = jnp.maximum(first_pos - sliding_window + 1, 0)
            # Aligned to block_k so that, with page_size % block_k == 0, no block crosses a page.
            kv_lo = lax.div(kv_lo, block_k) * block_k
        else:
            kv_lo = jnp.int32(0)
        num_blocks = lax.div(kv_hi - kv_lo + block_k - 1, block_k)
        # Blocks [full_lo, full_hi) are visible to every row, so they skip the mask: they end at or
        # before the first query (whose own position is its last key) and, with a window, start
        # inside the last query's window.  The others (the diagonal, the window's edge) are masked.
        full_hi = jnp.clip(lax.div(first_pos + 1 - kv_lo, block_k), 0, num_blocks)
        if sliding_window is not None:
            # Ceil division; a negative numerator truncates towards 0, which the clip absorbs.
            full_lo = lax.div(kv_hi - sliding_window - kv_lo + block_k - 1, block_k)
            full_lo = jnp.clip(full_lo, 0, full_hi)
        else:
            full_lo = jnp.int32(0)
        # kv splits (flash-decoding) take the blocks round robin: split s walks blocks s + i * S
        # (S = num_splits), its full ones first, then its masked ones before and after them.
        # Round robin rather than equal contiguous shares: without a window a split's first block
        # is s, known before kv_len is, so its page-table read does not wait for the kv_lens read.
        def count_below(x):
            return split_blocks_below(x, split, num_splits)

        i_lo, i_hi = count_below(full_lo), count_below(full_hi)
        num_lead = i_lo
        num_masked = num_lead + count_below(num_blocks) - i_hi

        # Rows of the q block: row r is token q_start + r // group, q head h * group + r % group.
        r = lax.broadcasted_iota(jnp.int32, (block_m,), 0)
        tok_off = lax.div(r, group)
        row_valid = (r < block_q * group) & (tok_off < num_rows)
        q_row = (q_start + tok_off) * num_q_heads + h * group + lax.rem(r, group)
        if clamp_rows:
            q_row = jnp.where(row_valid, q_row, 0)
        # else: the buffers have spare token rows at the end and masked-off rows keep their own
        # (distinct) index: the interpreter implements a masked scatter as "write back the old
        # value", which must not land on a row that another lane of the same store writes.
        head_dim = q_ref.shape[-1]
        # Gathers index with two broadcast int arrays (rows [n, 1], columns [1, head_dim]): Triton
        # turns that into one pointer tensor, and the interpreter into a numpy-style gather.
        col = lax.broadcasted_iota(jnp.int32, (1, head_dim), 1)
        q = plgpu.load(q_ref.at[q_row[:, None], col], mask=row_valid[:, None], other=0.0)
        if soft_cap is None:
            # Scores go straight to base-2 logits: one multiply per score, or none with prescale_q
            # (q is scaled once and rounded back to its dtype: a bf16 rounding of the logits).
            qk_scale = sm_scale * _LOG2E
            if prescale_q:
                q = (q.astype(jnp.float32) * qk_scale).astype(q.dtype)
                qk_scale = 1.0
        q_pos = first_pos + tok_off  # [block_m]

        page_row0 = seq * pages_per_seq
        # page_size % block_k == 0 and kv_lo % block_k == 0: every block lies inside one page.
        block_in_page = page_size % block_k == 0
        k_iota = lax.broadcasted_iota(jnp.int32, (block_k,), 0)

        def block_pages(j, masked: bool):
            """Page of block j: one scalar when the block lies in one page, else one per key.  The
            index is clamped to the request's row: a look-ahead may name a block past the end."""
            k_start = kv_lo + j * block_k
            if block_in_page:
                idx = lax.div(k_start, page_size)
                return page_table_ref[page_row0 + jnp.clip(idx, 0, pages_per_seq - 1)]
            idx = page_row0 + jnp.clip(lax.div(k_start + k_iota, page_size), 0, pages_per_seq - 1)
            if masked:
                k_valid = k_start + k_iota < kv_hi
                return plgpu.load(page_table_ref.at[idx], mask=k_valid, other=0)
            return plgpu.load(page_table_ref.at[idx])

        def body(masked: bool, j, page, carry):
            acc, m_prev, l_prev = carry
            k_start = kv_lo + j * block_k
            k_pos = k_start + k_iota
            if block_in_page:
                slot = page * page_size + lax.rem(k_start, page_size) + k_iota
            else:
                slot = page * page_size + lax.rem(k_pos, page_size)
            k_row = slot * (2 * num_kv_heads) + 2 * h
            # Full blocks lie below kv_hi <= kv_len: no load masks.  Masked blocks can run past
            # kv_hi, where the slots hold stale values.
            load_mask = (k_pos < kv_hi)[:, None] if masked else None
            other = 0.0 if masked else None
            k = plgpu.load(kv_ref.at[k_row[:, None], col], mask=load_mask, other=other)  # [block_k, d]
            v = plgpu.load(kv_ref.at[k_row[:, None] + 1, col], mask=load_mask, other=other)
            s = plgpu.dot(q, k, trans_b=True, precision=precision)  # [block_m, block_k] f32
            # Scores become base-2 logits as s * scale; with fast_math the scale goes into the
            # exponent's FMA (the row max is taken on raw scores: scale > 0, and rounding is
            # monotonic, so max(s) * scale == max(s * scale) exactly).
            scale = 1.0
            if soft_cap is None:
                if fast_math:
                    scale = qk_scale
                elif qk_scale != 1.0:
                    s = s * qk_scale
            else:
                s = soft_cap * jnp.tanh(s * sm_scale / soft_cap) * _LOG2E
            if masked:
                visible = k_pos[None, :] <= q_pos[:, None]
                if sliding_window is not None:
                    visible &= q_pos[:, None] - k_pos[None, :] < sliding_window
                s = jnp.where(visible, s, -jnp.inf)
            m_blk = jnp.max(s, axis=1)
            m_next = jnp.maximum(m_prev, m_blk * scale if scale != 1.0 else m_blk)
            if masked:
                # Rows that have seen no visible key yet keep m = -inf; subtract 0 there instead.
                m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)
            else:
                m_safe = m_next  # every score of a full block is finite
            alpha = exp2(m_prev - m_safe, fast_math)
            p = exp2_fma(s, scale, -m_safe[:, None], fast_math)
            l_next = l_prev * alpha + jnp.sum(p, axis=1)
            pv = plgpu.dot(p.astype(v.dtype), v, precision=precision)
            # acc * alpha + pv stays jnp, so that Triton can fold the add into the p.v dot's
            # accumulator (an FMA written as PTX measured the same as without it, fifteenth session)
            return acc * alpha[:, None] + pv, m_next, l_next

        def full_body(i, carry):
            # The page of the split's next block is read one block ahead and carried: a K/V
            # address that depends on a load of the same iteration makes Triton's pipeliner spend
            # a stage on that load, leaving K/V one block of prefetch (issued after the dots,
            # awaited at once).  block_pages clamps a look-ahead past the end into the row.
            page, carry = carry
            j = split + i * num_splits
            next_page = block_pages(j + num_splits, False)
            return next_page, body(False, j, page, carry)

        def masked_body(i, carry):
            j = split + (i + jnp.where(i < num_lead, 0, i_hi - num_lead)) * num_splits
            return body(True, j, block_pages(j, True), carry)

        acc = jnp.zeros((block_m, head_dim), jnp.float32)
        m_i = jnp.full((block_m,), -jnp.inf, jnp.float32)
        l_i = jnp.zeros((block_m,), jnp.float32)
        _, carry = lax.fori_loop(i_lo, i_hi, full_body,
                                 (block_pages(split + i_lo * num_splits, False), (acc, m_i, l_i)))
        acc, m_i, l_i = lax.fori_loop(0, num_masked, masked_body, carry)

        store_output(o_ref, lse_ref, acc, m_i, l_i, q_row, col, row_valid, split, rows_per_split, num_splits)
        if fused_combine and num_splits > 1:  # each (work item, kv head)'s last split merges
            merge_splits_in_kernel(cnt_ref, h * pl.num_programs(2) + w, o_ref, lse_ref, out_ref, q_row,
                                   row_valid, row_valid, col, rows_per_split, num_splits,
                                   compiled=clamp_rows)


def split_blocks_below(x, split, num_splits: int):
    """How many of a kv split's blocks (round robin: split, split + num_splits, ...) lie below
    block x: #{i >= 0 : split + i * num_splits < x}.  Shared by the ragged and the decode kernel."""
    return lax.div(jnp.maximum(x - split, 0) + num_splits - 1, num_splits)


def store_output(o_ref, lse_ref, acc, m_i, l_i, row, col, row_valid, split, rows_per_split: int,
                 num_splits: int):
    """A program's epilogue, shared by the ragged and the decode kernel: the normalised rows in
    the output dtype (one split), or a split's float32 partial rows and their log2-sum-exp (rows
    without keys: -inf) at split * rows_per_split + row for the combine."""
    has_keys = l_i > 0
    out = acc / jnp.where(has_keys, l_i, 1.0)[:, None]
    if num_splits == 1:
        plgpu.store(o_ref.at[row[:, None], col], out.astype(o_ref.dtype), mask=row_valid[:, None])
    else:
        o_row = split * rows_per_split + row
        plgpu.store(o_ref.at[o_row[:, None], col], out, mask=row_valid[:, None])
        lse = jnp.where(has_keys, m_i + jnp.log2(jnp.where(has_keys, l_i, 1.0)), -jnp.inf)
        plgpu.store(lse_ref.at[o_row], lse, mask=row_valid)


def fused_combine_default(kernel: str = "ragged") -> bool:
    """Whether kv splits (flash-decoding) merge inside the attention kernel
    (merge_splits_in_kernel) instead of in a second, combine kernel.

    Measured on the H200 (BENCHMARKS.md, eleventh session): in the decode kernel
    (`kernel="decode"`) the merge saves the combine launch (8B batch-1 forward 4.025 ms against
    4.091/4.096, decode kernel b8 ctx 2k 23.8 us against 25.2), so it is that kernel's default; in
    the ragged kernel its decode steps got slower (b8 ctx 2k 32.8 us against 25.4, ctx 8k 102 us
    against 72), so the ragged kernel keeps the combine kernel.  $JAXENGINE_DECODE_COMBINE=kernel
    or =separate sets both kernels."""
    if kernel not in ("ragged", "decode"):
        raise ValueError(f"kernel must be 'ragged' or 'decode', got {kernel!r}")
    env = env_choice("JAXENGINE_DECODE_COMBINE", ("kernel", "separate"), None)
    return kernel == "decode" if env is None else env == "kernel"


def merge_partials(lses: list, parts: list) -> jax.Array:
    """The log-sum-exp merge of kv splits: lses[s] [rows] (log2 domain, -inf for a split without
    keys) and parts[s] [rows, head_dim] float32 -> [rows, head_dim]; rows no split saw come out 0.
    Shared by the combine kernel and the in-kernel merge."""
    lse_max = functools.reduce(jnp.maximum, lses)
    lse_max = jnp.where(lse_max == -jnp.inf, 0.0, lse_max)
    num = jnp.zeros(parts[0].shape, jnp.float32)
    total = jnp.zeros(lses[0].shape, jnp.float32)
    for lse, part in zip(lses, parts):
        w = jnp.exp2(lse - lse_max)  # 0 for splits without keys
        num += w[:, None] * part
        total += w
    return num / jnp.where(total == 0, 1.0, total)[:, None]


def merge_splits_in_kernel(cnt_ref, cnt_idx, o_ref, lse_ref, out_ref, rows, load_ok, store_ok, col,
                           rows_per_split: int, num_splits: int, compiled: bool, active=None):
    """After store_output: the last of the num_splits programs of one output block to get here
    merges the splits' partial rows (as `combine` does) into out_ref, so no combine kernel runs.
    All threads' partial stores, a CTA barrier, then one acq_rel atomic count at GPU scope (the
    pattern of CUTLASS's semaphore): the last program's loads see every split's rows.  cnt_ref
    starts at zero (a zeros buffer aliased onto it) and, where every program of the launch counts,
    ends at zero: the last program resets its count after the merge, so the decode kernel can pass
    one count buffer from each layer's launch to the next (gpu_decode.LayerChain) instead of taking
    a fresh zeros buffer (a copy in the XLA program) a layer.  Rows where load_ok is false come out 0.
    `active` (a traced count, default num_splits): only splits 0 .. active - 1 of the output block
    take part (each calls this; the others must not), and the merge reads only theirs."""
    if compiled:  # the interpreter runs programs one after another (and has no barrier rule)
        plgpu.debug_barrier()
    done = plgpu.atomic_add(cnt_ref, cnt_idx, jnp.ones((), jnp.int32))
    count = num_splits if active is None else active

    @pl.when(done == count - 1)
    def _merge():
        ok = [load_ok if active is None or s == 0 else load_ok & (s < active) for s in range(num_splits)]
        lses = [plgpu.load(lse_ref.at[s * rows_per_split + rows], mask=ok[s], other=-jnp.inf)
                for s in range(num_splits)]
        parts = [plgpu.load(o_ref.at[(s * rows_per_split + rows)[:, None], col], mask=ok[s][:, None],
                            other=0.0) for s in range(num_splits)]
        out = jnp.where(load_ok[:, None], merge_partials(lses, parts), 0.0)
        plgpu.store(out_ref.at[rows[:, None], col], out.astype(out_ref.dtype), mask=store_ok[:, None])
        # back to zero (every split has counted: none touches it after this one); an add, not an
        # exchange, which Pallas' interpreter has no rule for
        plgpu.atomic_add(cnt_ref, cnt_idx, jnp.full((), -1, jnp.int32) * count)


def _find_work(w, cu_q_lens_ref, num_seqs_ref, *, max_num_seqs: int, block_q: int, short_q: int,
               select: str):
    """Work item w of the launch, found by the program itself: (seq, first token, rows; 0 rows
    for padding items).  Same numbering as `work.work_items` (each selected request's query rows in
    blocks of block_q tokens, requests in order), from a cumulative sum over the request rows, so
    no XLA ops build a work list before the launch (the jnp version is a few small ones
    a call)."""
    n = _next_pow2(max_num_seqs)
    i = lax.broadcasted_iota(jnp.int32, (n,), 0)
    in_range = i < max_num_seqs
    i_c = jnp.minimum(i, max_num_seqs - 1)
    lo = plgpu.load(cu_q_lens_ref.at[i_c])
    hi = plgpu.load(cu_q_lens_ref.at[i_c + 1])
    q_lens = hi - lo
    keep = in_range & (i < num_seqs_ref[0])
    if select == "long":
        keep &= q_lens > short_q
    elif select == "short":
        keep &= q_lens <= short_q
    blocks = jnp.where(keep, lax.div(q_lens + block_q - 1, block_q), 0)
    cum = jnp.cumsum(blocks)  # inclusive; non-decreasing
    # w's request is the first whose inclusive count passes w; past the total, w is padding.
    seq = jnp.sum((cum <= w).astype(jnp.int32))
    valid = seq < max_num_seqs
    seq = jnp.minimum(seq, max_num_seqs - 1)
    mine = i == seq
    before = jnp.sum(jnp.where(mine, cum - blocks, 0))
    q_start = jnp.sum(jnp.where(mine, lo, 0)) + (w - before) * block_q
    q_end = jnp.minimum(q_start + block_q, jnp.sum(jnp.where(mine, hi, 0)))
    num_rows = jnp.where(valid, q_end - q_start, 0)
    return seq, jnp.where(valid, q_start, 0), num_rows


def _combine_kernel(*refs, num_splits: int, rows: int, block_rows: int, rows_per_token: int,
                    from_cu: bool):
    """Merge the splits' partial outputs of `block_rows` rows by log-sum-exp; rows of padding
    tokens (garbage in the partials) come out zero."""
    if from_cu:  # valid tokens: cu_q_lens[num_seqs]
        num_seqs_ref, cu_ref, o_part_ref, lse_ref, out_ref = refs
        num_valid = cu_ref[jnp.minimum(num_seqs_ref[0], cu_ref.shape[0] - 1)]
    else:
        num_valid_ref, o_part_ref, lse_ref, out_ref = refs
        num_valid = num_valid_ref[0]
    i = pl.program_id(0)
    row = i * block_rows + lax.broadcasted_iota(jnp.int32, (block_rows,), 0)
    valid = lax.div(row, rows_per_token) < num_valid
    head_dim = o_part_ref.shape[-1]
    col = lax.broadcasted_iota(jnp.int32, (1, head_dim), 1)
    # Unmasked loads (every row is inside the buffers), so that they do not wait for the valid
    # count's load (two dependent loads in from_cu mode); the rows of padding tokens, which no
    # split program wrote, hold garbage, and only the final select looks at `valid`.
    lses = [plgpu.load(lse_ref.at[s * rows + row]) for s in range(num_splits)]
    parts = [plgpu.load(o_part_ref.at[(s * rows + row)[:, None], col]) for s in range(num_splits)]
    out = jnp.where(valid[:, None], merge_partials(lses, parts), 0.0)
    plgpu.store(out_ref.at[row[:, None], col], out.astype(out_ref.dtype))


def combine(o_part: jax.Array, lse: jax.Array, num_valid_tokens: jax.Array | None, *, num_splits: int,
            num_tokens: int, num_q_heads: int, dtype, interpret: bool,
            cu_q_lens: jax.Array | None = None, num_seqs: jax.Array | None = None) -> jax.Array:
    """The kv splits' merge (flash-decoding), one Pallas kernel.  o_part: f32[num_splits * rows,
    head_dim], lse: f32[num_splits * rows], split s's row x at s * rows + x (rows >= num_tokens *
    num_q_heads; the first num_tokens * num_q_heads are read).  Returns [num_tokens,
    num_q_heads, head_dim] in `dtype`; tokens at or past num_valid_tokens[0] (or, given
    num_valid_tokens=None, cu_q_lens[num_seqs[0]]) come out zero."""
    head_dim = o_part.shape[-1]
    rows = lse.shape[0] // num_splits
    out_rows = num_tokens * num_q_heads
    # 8 rows a program: the one real token of a batch-1 bucket spreads over 4 programs (32 rows a
    # program measured 4.2 us a layer at 8B b1 against XLA's two kernels' 3.4, H100)
    block_rows = math.gcd(out_rows, 8)
    from_cu = num_valid_tokens is None
    kernel = functools.partial(_combine_kernel, num_splits=num_splits, rows=rows,
                               block_rows=block_rows, rows_per_token=num_q_heads, from_cu=from_cu)
    counts = ((num_seqs.reshape(1).astype(jnp.int32), cu_q_lens.astype(jnp.int32)) if from_cu
              else (num_valid_tokens.astype(jnp.int32).reshape(1),))
    out = pl.pallas_call(
        kernel, grid=(out_rows // block_rows,),
        out_shape=jax.ShapeDtypeStruct((out_rows, head_dim), dtype),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1), interpret=interpret,
        name=f"attention_split_combine_s{num_splits}",
    )(*counts, o_part, lse)
    return out.reshape(num_tokens, num_q_heads, head_dim)


def kv_splits(programs: int, max_blocks: int, num_sms: int = _DEFAULT_NUM_SMS) -> int:
    """Flash-decoding splits: double (up to 16) until about 2 programs per SM exist, keeping at
    least one key block per split."""
    num_splits = 1
    while num_splits < 16 and programs * num_splits < 2 * num_sms and num_splits * 2 <= max_blocks:
        num_splits *= 2
    return num_splits


def default_config(num_tokens, max_num_seqs, num_q_heads, num_kv_heads, head_dim, page_size,
                   pages_per_seq, dtype, num_sms: int = _DEFAULT_NUM_SMS, long_tile: bool = True):
    """Static (shape-only) choice of block_q, block_k, kv splits, warps, stages, prescale_q and
    short_q (the long/short two-launch split of big prefill buckets; long_tile=False: never)."""
    group = num_q_heads // num_kv_heads
    decode_like = num_tokens <= max_num_seqs  # a bucket that holds only decode tokens
    if decode_like:
        # Smallest q block Triton's dot takes (16 rows): decode is bound by K/V bytes.
        block_q = max(1, 16 // group)
    else:
        # About 128 rows (tokens x group) per program for prefill.
        block_q = max(1, 128 // group)
    block_q = min(block_q, _next_pow2(num_tokens))
    # block_k 32: H100 sweep of 2026-11-23 (NOTES.md), 4k prefill 504 us vs 672 us at 64,
    # decode b8 ctx8192 133 us vs 159-184 us; b64 ctx2048 equal within noise.
    block_k = 32 if head_dim <= 128 else 16
    block_k = min(block_k, _next_pow2(pages_per_seq * page_size))
    num_work = min(num_tokens, num_tokens // block_q + max_num_seqs)
    programs = max(1, num_work * num_kv_heads)
    max_blocks = -(-pages_per_seq * page_size // block_k)
    num_splits = kv_splits(programs, max_blocks, num_sms) if decode_like else 1
    block_m = _next_pow2(block_q * group)
    num_warps = 4 if block_m <= 64 else 8
    # Prefill 3 stages: the K/V copy of the next block overlaps this block's dots (at 2 Triton
    # waits for it at once).  H100 sweep, fifth session: 4k chunk 495 -> 430 us (35.7 -> 41.2% of
    # the bf16 matmul rate), 8k 1608 -> 1497 us (44.0 -> 47.2%), page 16 alike.
    num_stages = 2 if decode_like else 3
    cfg = dict(block_q=block_q, block_k=block_k, num_splits=num_splits, num_warps=num_warps,
               num_stages=num_stages, prescale_q=False, short_q=0)
    if long_tile and not decode_like and num_tokens >= LONG_TILE_MIN_TOKENS and head_dim <= 128:
        # Big prefill buckets: two launches.  Requests of more than short_q tokens take the
        # prefill tile above (128 rows, block_k 32, 8 warps, 3 stages: fast_math's tile); the
        # short ones (decode tokens mixed into the step) a decode tile of 16 rows in a second
        # launch, since a 128-row tile spent on one decode token costs 8x the decode tile's
        # compute (H200, sixteenth session, device-timed: 1024 prefill at ctx 3072 + 1024
        # decodes 1,229 us in two launches against 1,996 us in one).  Until the sixteenth
        # session the long launch took a 256-row tile (block_k 64), 2-14% faster than the
        # 128-row tile before fast_math; with fast_math the 128-row tile in one launch is 9-11%
        # faster than that default on pure prefill (4k chunk 511 -> 464 us, 8k 1,881 -> 1,711
        # us, 2k 151 -> 135 us; BENCHMARKS.md sixteenth session), and fast_math makes the
        # 256-row tile slower (it spills).
        cfg.update(short_q=max(1, 16 // group))
    return cfg


# Prefill buckets of at least this many tokens use the two-launch long/short split (default_config).
LONG_TILE_MIN_TOKENS = 2048


@functools.partial(
    jax.jit,
    static_argnames=("sm_scale", "sliding_window", "soft_cap", "block_q", "block_k",
                     "num_splits", "num_warps", "num_stages", "prescale_q", "short_q",
                     "interpret", "fused_combine", "fast_math", "prefill_kernel"),
    donate_argnames=("long_out",),
)
def _ragged_paged_attention(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, *,
                            sm_scale, sliding_window, soft_cap, block_q, block_k, num_splits,
                            num_warps, num_stages, prescale_q, short_q, interpret,
                            fused_combine=False, fast_math=None, prefill_kernel="triton",
                            long_out=None):
    num_tokens, num_q_heads, head_dim = q.shape
    num_pages, page_size, combined, _ = kv_pages.shape
    num_kv_heads = combined // 2
    group = num_q_heads // num_kv_heads
    max_num_seqs, pages_per_seq = page_indices.shape

    q2 = q.reshape(num_tokens * num_q_heads, head_dim)
    # The short launch's tile: 16 rows (Triton's smallest dot) and at least short_q tokens, so
    # that a short request is one work item.
    short_tile = max(short_q, 16 // group, 1)
    # Interpret mode: spare token rows so that masked-off rows can keep distinct indices.
    spare_tokens = 0
    if interpret:
        spare_tokens = max(-(-_next_pow2(b * group) // group) for b in (block_q, short_tile))
        q2 = jnp.pad(q2, [(0, spare_tokens * num_q_heads), (0, 0)])
    rows = (num_tokens + spare_tokens) * num_q_heads
    kv2 = kv_pages.reshape(num_pages * page_size * combined, head_dim)
    scalars = [kv_lens.astype(jnp.int32), page_indices.reshape(-1).astype(jnp.int32),
               cu_q_lens.astype(jnp.int32)]
    precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None

    def launch(tile_q, tile_k, warps, stages, splits, num_work, select, out_init=None):
        kernel = functools.partial(
            _kernel, page_size=page_size, pages_per_seq=pages_per_seq, num_q_heads=num_q_heads,
            num_kv_heads=num_kv_heads, group=group, block_q=tile_q,
            block_m=_next_pow2(tile_q * group), block_k=tile_k, rows_per_split=rows,
            clamp_rows=not interpret, sm_scale=sm_scale, sliding_window=sliding_window,
            soft_cap=soft_cap, num_splits=splits, prescale_q=prescale_q, precision=precision,
            max_num_seqs=max_num_seqs, short_q=short_q, select=select,
            fused_combine=fused_combine and splits > 1,
            fast_math=not interpret and (
                FAST_MATH_MIN_ROWS <= _next_pow2(tile_q * group) <= FAST_MATH_MAX_ROWS
                if fast_math is None else fast_math))
        args = [num_seqs.reshape(1).astype(jnp.int32), *scalars, q2, kv2]
        params = plgpu.CompilerParams(num_warps=warps, num_stages=stages)
        grid = (num_kv_heads, splits, num_work)
        name = f"ragged_paged_attention_bq{tile_q}_bk{tile_k}_s{splits}"
        if splits == 1:
            # The output is aliased onto a zeros buffer (or the previous launch's output): rows
            # no program writes (bucket padding, the other launch's requests) keep it.
            if out_init is None:
                out_init = jnp.zeros((rows, head_dim), q.dtype)
            return pl.pallas_call(
                kernel, grid=grid, out_shape=jax.ShapeDtypeStruct((rows, head_dim), q.dtype),
                input_output_aliases={len(args): 0}, compiler_params=params,
                interpret=interpret, name=name,
            )(*args, out_init)
        parts = (jax.ShapeDtypeStruct((splits * rows, head_dim), jnp.float32),
                 jax.ShapeDtypeStruct((splits * rows,), jnp.float32))
        if fused_combine:  # merged by each block's last split: the final rows, no combine kernel
            counts = num_kv_heads * num_work
            return pl.pallas_call(
                kernel, grid=grid,
                out_shape=(*parts, jax.ShapeDtypeStruct((rows, head_dim), q.dtype),
                           jax.ShapeDtypeStruct((counts,), jnp.int32)),
                input_output_aliases={len(args): 2, len(args) + 1: 3}, compiler_params=params,
                interpret=interpret, name=name + "_merge",
            )(*args, jnp.zeros((rows, head_dim), q.dtype), jnp.zeros((counts,), jnp.int32))[2]
        return pl.pallas_call(
            kernel, grid=grid, out_shape=parts, compiler_params=params, interpret=interpret, name=name,
        )(*args)

    def finish(out):
        return out[:num_tokens * num_q_heads].reshape(num_tokens, num_q_heads, head_dim)

    if short_q:
        # Two launches over disjoint requests, the second writing into the first's output: the
        # long requests (> short_q tokens) with this tile, the short ones (decode tokens) with a
        # decode tile.  Work-item bounds: a long request has > short_q tokens, a short one fits
        # in one item.
        short_work = min(max_num_seqs, num_tokens)
        if prefill_kernel == "mgpu":
            # The long requests' rows came from the Mosaic GPU kernel (long_out, zeros in the padding,
            # donated): the decode tile writes the short requests' rows into it.
            out = jnp.pad(long_out.reshape(num_tokens * num_q_heads, head_dim),
                          [(0, rows - num_tokens * num_q_heads), (0, 0)])
            return finish(launch(short_tile, min(32, block_k), 4, 2, 1, short_work, "short", out))
        long_work = min(num_tokens, num_tokens // block_q
                        + min(max_num_seqs, num_tokens // (short_q + 1)))
        out = launch(block_q, block_k, num_warps, num_stages, 1, long_work, "long")
        out = launch(short_tile, min(32, block_k), 4, 2, 1, short_work, "short", out)
        return finish(out)

    num_work = min(num_tokens, num_tokens // block_q + max_num_seqs)
    if num_splits == 1:
        return finish(launch(block_q, block_k, num_warps, num_stages, 1, num_work, "all"))
    if fused_combine:
        return finish(launch(block_q, block_k, num_warps, num_stages, num_splits, num_work, "all"))
    o_part, lse = launch(block_q, block_k, num_warps, num_stages, num_splits, num_work, "all")
    # Merge the splits: one Pallas kernel (combine); rows of padding tokens come out zero.
    return combine(o_part, lse, None, num_splits=num_splits, num_tokens=num_tokens,
                   num_q_heads=num_q_heads, dtype=q.dtype, interpret=interpret,
                   cu_q_lens=cu_q_lens, num_seqs=num_seqs)


DECODE_KERNELS = ("mgpu", "ragged")


def _decode_only_mgpu(q, kv_pages, kv_lens, page_indices, num_seqs, *, sm_scale, sliding_window, soft_cap,
                      interpret, decode_kernel):
    """A decode step on the Mosaic GPU decode kernel where `ragged_paged_attention`'s decode_only
    routes it there (its docstring), else None."""
    from . import gpu_decode_mgpu
    explicit = decode_kernel is not None
    decode_kernel = check_choice("decode_kernel", decode_kernel or "mgpu", DECODE_KERNELS)
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    if decode_kernel != "mgpu" or q.shape[0] != page_indices.shape[0]:
        return None
    if not (hopper() and not interpret or interpret and explicit):
        return None
    merge = gpu_decode_mgpu.merge_default(bool(interpret))
    cfg = gpu_decode_mgpu.default_config(q.shape[0], kv_pages.shape[2] // 2, q.shape[1], q.shape[2],
                                         kv_pages.shape[1], page_indices.shape[1], merge)
    if not gpu_decode_mgpu.supported(q, kv_pages, sliding_window, soft_cap, cfg["block_kv"]):
        return None
    return gpu_decode_mgpu.decode_attention(q, kv_pages, kv_lens, page_indices, num_seqs, sm_scale=sm_scale,
                                            merge=merge, interpret=bool(interpret))


def ragged_paged_attention(
    q: jax.Array,  # [num_tokens, num_q_heads, head_dim]
    kv_pages: jax.Array,  # [num_pages, page_size, 2 * num_kv_heads, head_dim]
    kv_lens: jax.Array,  # i32[max_num_seqs]
    page_indices: jax.Array,  # i32[max_num_seqs, pages_per_seq]
    cu_q_lens: jax.Array,  # i32[max_num_seqs + 1]
    num_seqs: jax.Array,  # i32[1]
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
    num_splits: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    prescale_q: bool | None = None,
    short_q: int | None = None,
    interpret: bool | None = None,
    fused_combine: bool | None = None,
    fast_math: bool | None = None,
    prefill_kernel: str | None = None,
    decode_only: bool = False,
    decode_kernel: str | None = None,
) -> jax.Array:
    """Same contract as `reference.ragged_paged_attention`; the keyword tuning args override
    `default_config`.  block_q counts tokens (a program's rows are block_q * group, padded to a
    power of two); block_k (keys per step) must be a power of two; prescale_q folds sm_scale into
    q once instead of scaling every score (no effect with soft_cap).  short_q > 0 splits the step
    into two launches: requests of more than short_q tokens with the tile above, the others
    (decode tokens) with a 16-row decode tile; 0 makes one launch.  Left at None it is
    default_config's (two launches for big prefill buckets) unless a tile keyword is given, so a
    tile given is the tile every request gets.  fused_combine (default fused_combine_default())
    merges kv splits inside the kernel instead of a combine kernel.  fast_math (compiled kernels
    only) writes the softmax's exponent as PTX; None: fast_math_default() (the environment, else
    on for tiles of FAST_MATH_MIN_ROWS to FAST_MATH_MAX_ROWS rows).  prefill_kernel (default
    gpu_prefill.prefill_kernel_default()) runs the long launch of the two-launch split on the
    Triton kernel ("triton") or on the Mosaic GPU kernel of gpu_prefill ("mgpu": Hopper GPUs, and
    the interpreter when given as an argument; where gpu_prefill.supported fails, or on other
    GPUs, "triton").  decode_only (static): the caller guarantees a decode step, one query token
    a request with request j's at row j (cu_q_lens = arange clipped at num_seqs) and as many q
    rows as page-table rows; then decode_kernel "mgpu" (the default) runs the Mosaic GPU decode
    kernel (`gpu_decode_mgpu`: on an H100 at 8B b8 ctx 2k 81-82% of the copy rate, this ragged
    kernel 72%) on a Hopper GPU where it supports the step (bf16/f16, head_dim 64/128, group <= 8,
    no sliding window or soft cap; in the interpreter only when decode_kernel is given), else
    ("ragged", or unsupported) this kernel.
    `interpret` defaults to True on the CPU backend (tests)."""
    if decode_only:
        out = _decode_only_mgpu(q, kv_pages, kv_lens, page_indices, num_seqs, sm_scale=sm_scale,
                                sliding_window=sliding_window, soft_cap=soft_cap, interpret=interpret,
                                decode_kernel=decode_kernel)
        if out is not None:
            return out
    num_tokens, num_q_heads, head_dim = q.shape
    _, page_size, combined, _ = kv_pages.shape
    num_kv_heads = combined // 2
    if num_q_heads % num_kv_heads:
        raise ValueError(f"num_q_heads ({num_q_heads}) must be a multiple of num_kv_heads "
                         f"({num_kv_heads})")
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    padded_dim = _next_pow2(head_dim)
    if padded_dim != head_dim:
        # Triton blocks are powers of two.  Zero-padding head_dim leaves q.k and p.v unchanged
        # but copies the cache: a correctness path for odd head dims (80, 96), not a fast one.
        pad = [(0, 0), (0, 0), (0, padded_dim - head_dim)]
        out = ragged_paged_attention(
            jnp.pad(q, pad), jnp.pad(kv_pages, [(0, 0)] + pad), kv_lens, page_indices,
            cu_q_lens, num_seqs, sm_scale=sm_scale, sliding_window=sliding_window,
            soft_cap=soft_cap, block_q=block_q, block_k=block_k, num_splits=num_splits,
            num_warps=num_warps, num_stages=num_stages, prescale_q=prescale_q,
            short_q=short_q, interpret=interpret, fused_combine=fused_combine, fast_math=fast_math,
            prefill_kernel=prefill_kernel)
        return out[..., :head_dim]
    max_num_seqs, pages_per_seq = page_indices.shape
    cfg = default_config(num_tokens, max_num_seqs, num_q_heads, num_kv_heads, head_dim,
                         page_size, pages_per_seq, q.dtype)
    tile = (("block_q", block_q), ("block_k", block_k), ("num_splits", num_splits),
            ("num_warps", num_warps), ("num_stages", num_stages), ("prescale_q", prescale_q))
    if any(value is not None for _, value in tile):
        # An explicit tile replaces default_config's tile, long/short split included.
        cfg = default_config(num_tokens, max_num_seqs, num_q_heads, num_kv_heads, head_dim,
                             page_size, pages_per_seq, q.dtype, long_tile=False)
    for key, value in tile + (("short_q", short_q),):
        if value is not None:
            cfg[key] = value
    if cfg["block_q"] < 1:
        raise ValueError(f"block_q must be >= 1, got {cfg['block_q']}")
    if cfg["block_k"] < 1 or cfg["block_k"] & (cfg["block_k"] - 1):
        raise ValueError(f"block_k must be a power of two, got {cfg['block_k']}")
    if cfg["num_splits"] < 1:
        raise ValueError(f"num_splits must be >= 1, got {cfg['num_splits']}")
    if cfg["short_q"] < 0 or (cfg["short_q"] and cfg["num_splits"] > 1):
        raise ValueError(f"short_q must be >= 0, and 0 with kv splits; got {cfg['short_q']} "
                         f"with num_splits {cfg['num_splits']}")
    # The Mosaic GPU kernel takes the long launch where it can: a Hopper GPU, or the interpreter
    # when asked for by argument (tests; the environment's choice is for GPU runs).
    explicit = prefill_kernel is not None
    prefill_kernel = check_choice("prefill_kernel", prefill_kernel or gpu_prefill.prefill_kernel_default(),
                                  gpu_prefill.PREFILL_KERNELS)
    if prefill_kernel == "mgpu" and not (
            cfg["short_q"] and gpu_prefill.supported(q, kv_pages, sliding_window, soft_cap)
            and (hopper() and not interpret or interpret and explicit)):
        prefill_kernel = "triton"
    long_out = None
    if prefill_kernel == "mgpu":
        # The long requests on the Mosaic GPU kernel (TMA + wgmma), then the short ones on the
        # decode tile into its output.  A call of its own: inside the same jit on the CPU, the
        # interpreter's nested dispatches starved on 2 cores (a deadlock in the tests); inside
        # the engine's jit on a GPU both are inlined anyway.
        long_out = gpu_prefill.prefill_attention(
            q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, sm_scale=sm_scale,
            short_q=cfg["short_q"], interpret=interpret)
    return _ragged_paged_attention(
        q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, sm_scale=float(sm_scale),
        sliding_window=sliding_window, soft_cap=None if soft_cap is None else float(soft_cap),
        interpret=bool(interpret),
        fused_combine=fused_combine_default() if fused_combine is None else bool(fused_combine),
        fast_math=fast_math_default() if fast_math is None else bool(fast_math),
        prefill_kernel=prefill_kernel, long_out=long_out, **cfg)
