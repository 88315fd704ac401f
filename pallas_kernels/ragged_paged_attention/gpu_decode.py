"""Decode attention for NVIDIA GPUs: rope, KV write and attention in one Pallas (Triton) kernel.

The contract is `decode.py`'s.  Grid (kv head, kv split, request row).  Each program takes the
`group` q heads of one kv head for one request as the rows of a 16-row matrix (Triton's smallest
dot), rotates them in registers, and walks the request's *earlier* keys (positions below
kv_len - 1) in blocks of `block_k` through the page table with an online softmax.  The step's own
key never goes through memory: split 0 rotates it, scores it against q elementwise and starts
its softmax state from it (m = its score, l = 1, acc = its value), and writes it and its value
into their page slot.  No program of the launch reads that slot (every walk stops below it), so
the write cannot race a read.  With kv splits > 1 (flash-decoding) the partial outputs are merged
by `combine`, a second small Pallas kernel (XLA made two kernels of the jnp combine), or, with
fused_combine, by each row's last split inside this kernel (an atomic count per row and kv head).

Compared with the general path (q rope, K/V scatter, attention, two combine kernels) this is two
kernels a layer instead of five, one with a single split.

With l2_prefetch (pallas_kernels/l2_prefetch, $JAXENGINE_L2_PREFETCH, off by default) the launch
carries extra programs (more token rows of the grid, after the real ones) that read regions of the
next GEMMs' weights into L2 while the attention's latency-bound programs run.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from .. import l2_prefetch as l2pf
from ..env import check_choice, env_choice
from .decode import composite
from .gpu import (_DEFAULT_NUM_SMS, _LOG2E, _next_pow2, combine, fused_combine_default, kv_splits,
                  merge_splits_in_kernel, ragged_paged_attention, split_blocks_below, store_output)


def _decode_kernel(
    kv_lens_ref,  # i32[max_num_seqs]
    page_table_ref,  # i32[max_num_seqs * pages_per_seq]
    num_seqs_ref,  # i32[1]
    inv_freq_ref,  # f32[head_dim // 2]
    # q, k, v rows [.., head_dim] (q and k not rotated): three arrays, or one fused projection
    # passed three times; `rows` says where (token j, kv head h)'s rows are in each
    q_ref,
    k_ref,
    v_ref,
    kv_ref,  # [num_pages * page_size * 2 * num_kv_heads, head_dim], aliased to kv_out_ref
    *rest,
    rows: tuple[int, int, int, int, int, int],  # q (token, head) strides, k/v (token, head) strides, k/v offsets
    page_size: int,
    pages_per_seq: int,
    max_num_seqs: int,
    num_q_heads: int,
    num_kv_heads: int,
    group: int,
    block_m: int,
    block_k: int,
    num_splits: int,
    rows_per_split: int,
    clamp_rows: bool,
    sm_scale: float,
    sliding_window: int | None,
    soft_cap: float | None,
    precision,
    fused_combine: bool = False,
    contiguous_splits: bool = False,
    split_min_blocks: int = 0,
    pids=None,  # the program ids, read by a caller that runs this under a branch (the interpreter
    # cannot read them there)
):
    out_ref = cnt_ref = None
    if num_splits == 1:
        o_ref, kv_out_ref = rest  # every row written (padding tokens' as zeros)
        lse_ref = None
    elif fused_combine:
        _cnt_in_ref, o_ref, lse_ref, out_ref, cnt_ref, kv_out_ref = rest  # cnt aliased onto zeros
    else:
        o_ref, lse_ref, kv_out_ref = rest
    h, split, j = pids or (pl.program_id(0), pl.program_id(1), pl.program_id(2))  # j: request row
    head_dim = q_ref.shape[-1]
    half = head_dim // 2

    valid = (j < num_seqs_ref[0]) & (j < max_num_seqs)
    seq = jnp.minimum(j, max_num_seqs - 1)
    pos = jnp.where(valid, kv_lens_ref[seq] - 1, 0)  # this token's position = keys already paged
    if sliding_window is not None:
        kv_lo = lax.div(jnp.maximum(pos - sliding_window + 1, 0), block_k) * block_k
    else:
        kv_lo = jnp.int32(0)
    num_blocks = jnp.where(pos > kv_lo, lax.div(pos - kv_lo + block_k - 1, block_k), 0)
    # With split_min_blocks (and the in-kernel merge) a row uses only as many of the launch's
    # splits as give each at least that many blocks: at short contexts one split walks them all and
    # writes the output itself (no partial rows, no count, no merge), and the other programs of
    # the row return at once.  Without it every split takes part.  Off by default: measured
    # slower (H200, eighteenth session: one split walking 4-8 blocks in turn costs more than the
    # merge it saves; NOTES.md).
    adaptive = bool(split_min_blocks) and fused_combine and num_splits > 1
    if adaptive:
        active = jnp.clip(lax.div(num_blocks + split_min_blocks - 1, split_min_blocks), 1, num_splits)
    else:
        active = num_splits
    # kv splits take the blocks round robin: split s walks blocks s, s + num_splits, ...  Its
    # first block is then known from the program id alone (no window), so the page-table read
    # for it is issued at once, beside the kv_lens read, not after it: at short contexts (one
    # block a split) that is one memory latency off the kernel's critical path.  With
    # contiguous_splits (an experiment, split_layout="contiguous") split s walks one range of
    # ceil(num_blocks / num_splits) blocks instead, whose start waits for kv_lens.
    if contiguous_splits:
        per_split = lax.div(num_blocks + active - 1, active)
        first_block, block_stride = split * per_split, 1
        num_iters = jnp.clip(num_blocks - first_block, 0, per_split)
    else:
        first_block, block_stride = split, active
        num_iters = split_blocks_below(num_blocks, split, active)
        if adaptive:
            num_iters = jnp.where(split < active, num_iters, 0)

    # Rotary embedding, rotate-half layout, in float32 then rounded to the input dtype as the
    # unfused path does: out[c] = x[c] cos - x[c + half] sin (c < half), x[c] cos + x[c - half] sin.
    col = lax.broadcasted_iota(jnp.int32, (head_dim,), 0)
    partner = jnp.where(col < half, col + half, col - half)
    sign = jnp.where(col < half, -1.0, 1.0).astype(jnp.float32)
    angle = pos.astype(jnp.float32) * plgpu.load(inv_freq_ref.at[lax.rem(col, half)])
    cos, sin = jnp.cos(angle), jnp.sin(angle)

    def rotate(x, x_partner):
        return x.astype(jnp.float32) * cos + sign * x_partner.astype(jnp.float32) * sin

    q_tok, q_head, kv_tok, kv_head, k_off, v_off = rows
    r = lax.broadcasted_iota(jnp.int32, (block_m,), 0)
    row_valid = (r < group) & valid
    q_row = j * q_tok + h * q_head + r
    o_row = j * num_q_heads + h * group + r  # output rows: [num_tokens, num_q_heads] flat
    # q is loaded under the static row mask only (every token row of the bucket exists in q): a
    # mask on `valid` would make the load wait for num_seqs.  Rows past num_seqs are not stored.
    q_mask = r < group
    if clamp_rows:
        q_row = jnp.where(q_mask, q_row, 0)
        o_row = jnp.where(row_valid, o_row, 0)
    # else (interpreter): masked-off rows keep distinct indices (spare rows at the end), since the
    # interpreter writes a masked lane's old value back to its index.
    q_mask = q_mask[:, None]
    q = plgpu.load(q_ref.at[q_row[:, None], col[None, :]], mask=q_mask, other=0.0)
    q_p = plgpu.load(q_ref.at[q_row[:, None], partner[None, :]], mask=q_mask, other=0.0)
    q = rotate(q, q_p).astype(q_ref.dtype)  # [block_m, head_dim]

    kv_row_new = j * kv_tok + h * kv_head
    k_new = plgpu.load(k_ref.at[kv_row_new + k_off, col])
    k_new = rotate(k_new, plgpu.load(k_ref.at[kv_row_new + k_off, partner])).astype(kv_ref.dtype)
    v_new = plgpu.load(v_ref.at[kv_row_new + v_off, col])
    page_row0 = seq * pages_per_seq
    # Split 0 owns the new key: it writes it (rotated) and its value into their slot.
    slot_page = plgpu.load(page_table_ref.at[page_row0 + jnp.minimum(lax.div(pos, page_size),
                                                                     pages_per_seq - 1)])
    slot_row = (slot_page * page_size + lax.rem(pos, page_size)) * (2 * num_kv_heads) + 2 * h
    write = (col >= 0) & valid & (split == 0)
    plgpu.store(kv_out_ref.at[slot_row, col], k_new, mask=write)
    plgpu.store(kv_out_ref.at[slot_row + 1, col], v_new.astype(kv_ref.dtype), mask=write)

    def score(s):  # raw q.k -> log2-domain logits
        s = s * sm_scale
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        return s * _LOG2E

    s_new = score(jnp.sum(q.astype(jnp.float32) * k_new.astype(jnp.float32)[None, :], axis=1))
    first = jnp.broadcast_to(split == 0, (block_m,))
    m_i = jnp.where(first, s_new, -jnp.inf)  # [block_m]
    l_i = first.astype(jnp.float32)
    acc = l_i[:, None] * v_new.astype(jnp.float32)[None, :]  # [block_m, head_dim]

    one_page_per_block = page_size % block_k == 0  # blocks never straddle pages (kv_lo is aligned)
    kcol = col[None, :]
    k_iota = lax.broadcasted_iota(jnp.int32, (block_k,), 0)
    num_pages_total = kv_ref.shape[0] // (page_size * 2 * num_kv_heads)

    def block_pages(b):
        """Page(s) of block b, read unmasked at an index clamped into the request's row (a
        look-ahead can name a block past the end), the id clamped into the pool: keys past the
        end are masked at the K/V load, so a stale id there is never dereferenced."""
        start = kv_lo + b * block_k
        if one_page_per_block:
            idx = jnp.clip(lax.div(start, page_size), 0, pages_per_seq - 1)
            page = page_table_ref[page_row0 + idx]
        else:
            idx = jnp.clip(lax.div(start + k_iota, page_size), 0, pages_per_seq - 1)
            page = plgpu.load(page_table_ref.at[page_row0 + idx])
        return jnp.clip(page, 0, num_pages_total - 1)

    def body(i, carry):
        # The page(s) of the split's next block are read one block ahead and carried: a K/V
        # address that depends on a load of the same iteration costs Triton's pipeliner a stage.
        page, acc, m_prev, l_prev = carry
        b = first_block + i * block_stride
        next_page = block_pages(b + block_stride)
        start = kv_lo + b * block_k
        k_pos = start + k_iota
        k_valid = k_pos < pos
        if sliding_window is not None:
            k_valid &= pos - k_pos < sliding_window
        k_row = (page * page_size + lax.rem(k_pos, page_size)) * (2 * num_kv_heads) + 2 * h
        k = plgpu.load(kv_ref.at[k_row[:, None], kcol], mask=k_valid[:, None], other=0.0)
        v = plgpu.load(kv_ref.at[k_row[:, None] + 1, kcol], mask=k_valid[:, None], other=0.0)
        s = score(plgpu.dot(q, k, trans_b=True, precision=precision))  # [block_m, block_k] f32
        s = jnp.where(k_valid[None, :], s, -jnp.inf)
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
        m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)  # splits that have seen no key yet
        alpha = jnp.exp2(m_prev - m_safe)
        p = jnp.exp2(s - m_safe[:, None])
        l_next = l_prev * alpha + jnp.sum(p, axis=1)
        pv = plgpu.dot(p.astype(v.dtype), v, precision=precision)
        return next_page, acc * alpha[:, None] + pv, m_next, l_next

    _, acc, m_i, l_i = lax.fori_loop(0, num_iters, body, (block_pages(first_block), acc, m_i, l_i))

    if num_splits == 1:
        # Every token row of the bucket is written, padding tokens' as zeros, so the output needs
        # no zeros buffer aliased onto it (XLA copies a shared zeros constant into a new buffer
        # for each launch that writes it: one copy a layer in a decode program).
        keep = r < group
        rows_all = j * num_q_heads + h * group + r
        if clamp_rows:
            rows_all = jnp.where(keep, rows_all, 0)
        out = acc / jnp.where(l_i > 0, l_i, 1.0)[:, None]
        out = jnp.where(valid, out, 0.0)
        plgpu.store(o_ref.at[rows_all[:, None], kcol], out.astype(o_ref.dtype), mask=keep[:, None])
    elif not adaptive:
        store_output(o_ref, lse_ref, acc, m_i, l_i, o_row, kcol, row_valid, split, rows_per_split,
                     num_splits)
    if fused_combine and num_splits > 1:  # each (request row, kv head)'s last split merges
        rows = j * num_q_heads + h * group + r  # unclamped: padding tokens' rows get zeros
        keep = r < group
        if clamp_rows:
            rows = jnp.where(keep, rows, 0)
        cnt_idx = h * (cnt_ref.shape[0] // num_kv_heads) + j
        if not adaptive:
            merge_splits_in_kernel(cnt_ref, cnt_idx, o_ref, lse_ref, out_ref, rows, keep & valid, keep,
                                   kcol, rows_per_split, num_splits, compiled=clamp_rows)
        else:
            single = active == 1  # split 0 saw every key: its rows are the output (zeros if padding)
            out = jnp.where(valid, acc / jnp.where(l_i > 0, l_i, 1.0)[:, None], 0.0)
            plgpu.store(out_ref.at[rows[:, None], kcol], out.astype(out_ref.dtype),
                        mask=(keep & single & (split == 0))[:, None])

            @pl.when(~single & (split < active))
            def _partial_and_merge():
                store_output(o_ref, lse_ref, acc, m_i, l_i, o_row, kcol, row_valid, split,
                             rows_per_split, num_splits)
                merge_splits_in_kernel(cnt_ref, cnt_idx, o_ref, lse_ref, out_ref, rows, keep & valid,
                                       keep, kcol, rows_per_split, num_splits, compiled=clamp_rows,
                                       active=active)


def _l2_prefetch_body(w_refs, sums_ref, pid, num_programs: int, regions, tile: tuple[int, int],
                      eviction: str | None, clamp: bool):
    """Program `pid` of `num_programs` loads its share of each weight's region (l2_prefetch.Region;
    tiles of `tile` rows x columns, dealt round robin over the regions' tiles in turn) and stores
    their float32 sum: the loads bring the bytes into L2 for the GEMMs after the attention, and the
    sum keeps them alive (and lets the tests check that the programs covered the regions once)."""
    tile_rows, tile_cols = tile
    ri = lax.broadcasted_iota(jnp.int32, (tile_rows,), 0)
    ci = lax.broadcasted_iota(jnp.int32, (tile_cols,), 0)
    # column sums a tile: a [tile_cols] accumulator, a few registers a thread (a [tile] one would
    # raise the whole kernel's register count, and with it cost the attention programs occupancy)
    acc = jnp.zeros((tile_cols,), jnp.float32)
    offset = 0  # tiles of the regions before: the round robin runs on across regions
    for w_ref, region in zip(w_refs, regions):
        rows, _, c0, c1, _ = region
        tiles = l2pf.num_tiles(region, tile)
        last_row, last_col = w_ref.shape[0] - 1, w_ref.shape[1] - 1
        first, count = l2pf.deal(pid, num_programs, offset, tiles)
        offset += tiles

        def body(i, acc, region=region, rows=rows, width=c1 - c0, w_ref=w_ref, last_row=last_row,
                 last_col=last_col, first=first):
            row0, col0, local = l2pf.tile_origin(first + i * num_programs, region, tile)
            r, c = row0 + ri, col0 + ci
            mask = (r < rows)[:, None] & (local + ci < width)[None, :]
            if clamp:  # the interpreter reads masked lanes too; compiled, a clamp would cost the
                # loads their 16-byte vectors (Triton can no longer prove the columns contiguous)
                r, c = jnp.minimum(r, last_row), jnp.minimum(c, last_col)
            x = plgpu.load(w_ref.at[r[:, None], c[None, :]], mask=mask, other=0.0,
                           eviction_policy=eviction)
            return acc + jnp.sum(x.astype(jnp.float32), axis=0)

        acc = lax.fori_loop(0, count, body, acc)
    sums_ref[pid] = jnp.sum(acc)


def _decode_kernel_with_prefetch(*refs, num_inputs: int, num_tokens: int, prefetch: tuple,
                                 prefetch_tile: tuple[int, int], eviction: str | None, **kw):
    """_decode_kernel's programs (token rows j < num_tokens) beside L2 prefetch programs (the grid's
    extra token rows): refs = the kernel's inputs, the prefetched weights (prefetch: their
    l2_prefetch.Region each), its outputs, the prefetch sums.  At batch 1 the attention is ~8 us a layer of latency on ~0.5 MB, with most SMs
    idle and HBM quiet; the prefetch programs read (part of) the next GEMMs' weights meanwhile."""
    num_w = len(prefetch)
    inputs, w_refs = refs[:num_inputs], refs[num_inputs:num_inputs + num_w]
    outputs, sums_ref = refs[num_inputs + num_w:-1], refs[-1]
    h, split, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)

    @pl.when(j < num_tokens)
    def _attention():
        _decode_kernel(*inputs, *outputs, pids=(h, split, j), **kw)

    @pl.when(j >= num_tokens)
    def _prefetch():
        heads, splits = kw["num_kv_heads"], kw["num_splits"]
        pid = ((j - num_tokens) * splits + split) * heads + h
        _l2_prefetch_body(w_refs, sums_ref, pid, sums_ref.shape[0], prefetch, prefetch_tile, eviction,
                          clamp=not kw["clamp_rows"])


def default_config(num_tokens: int, num_kv_heads: int, head_dim: int, page_size: int,
                   pages_per_seq: int, num_sms: int = _DEFAULT_NUM_SMS) -> dict:
    """Static (shape-only) choice of block_k and kv splits."""
    block_k = 32 if head_dim <= 128 else 16  # as gpu.py (H100 sweep, NOTES.md)
    block_k = min(block_k, _next_pow2(pages_per_seq * page_size))
    max_blocks = -(-pages_per_seq * page_size // block_k)
    num_splits = kv_splits(max(1, num_tokens * num_kv_heads), max_blocks, num_sms)
    return dict(block_k=block_k, num_splits=num_splits, num_warps=4, num_stages=2, split_min_blocks=0)


@functools.partial(jax.jit, static_argnames=("sm_scale", "sliding_window", "soft_cap", "block_k",
                                             "num_splits", "num_warps", "num_stages", "interpret",
                                             "fused_combine", "split_layout", "split_min_blocks",
                                             "prefetch", "prefetch_rows", "prefetch_tile", "eviction"))
def _decode_attention(q, k, v, kv_pages, kv_lens, page_indices, num_seqs, inv_freq, counters=None,
                      prefetch_ws=(), *, sm_scale, sliding_window, soft_cap, block_k, num_splits,
                      num_warps, num_stages, interpret, fused_combine=False, split_layout="round_robin",
                      split_min_blocks=0, prefetch=(), prefetch_rows=0, prefetch_tile=(16, 512),
                      eviction=None):
    """(out, kv_pages, counters, prefetch sums f32[programs] or None).  prefetch_ws: weights [...,
    K] whose `prefetch` regions (l2_prefetch.Region each) `prefetch_rows` extra token rows of
    programs (x kv heads x splits) load into L2 beside the attention."""
    num_pages, page_size, combined, head_dim = kv_pages.shape
    num_kv_heads = combined // 2
    num_tokens = q.shape[0]
    if k is None:  # one fused projection [num_tokens, num_kv_heads, group + 2, head_dim]
        group = q.shape[2] - 2
        per_head = group + 2
        rows = (num_kv_heads * per_head, per_head, num_kv_heads * per_head, per_head, group, group + 1)
    else:
        group = q.shape[1] // num_kv_heads
        rows = (num_kv_heads * group, group, num_kv_heads, 1, 0, 0)
    num_q_heads = num_kv_heads * group
    max_num_seqs, pages_per_seq = page_indices.shape
    block_m = max(16, _next_pow2(group))
    # interpreter: masked-off rows keep distinct, in-range indices (spare rows at the end)
    spare = block_m if interpret else 0
    out_rows = num_tokens * num_q_heads + spare
    q2 = q.reshape(-1, head_dim)
    if spare:
        q2 = jnp.pad(q2, [(0, spare), (0, 0)])
    if k is None:
        k2 = v2 = q2  # the same buffer three times: no copy, no slicing kernels
    else:
        k2, v2 = k.reshape(-1, head_dim), v.reshape(-1, head_dim)
    kv2 = kv_pages.reshape(num_pages * page_size * combined, head_dim)
    precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    kernel = functools.partial(
        _decode_kernel, rows=rows, page_size=page_size, pages_per_seq=pages_per_seq,
        max_num_seqs=max_num_seqs, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, group=group,
        block_m=block_m, block_k=block_k, num_splits=num_splits, rows_per_split=out_rows,
        clamp_rows=not interpret, sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap,
        precision=precision, fused_combine=fused_combine,
        contiguous_splits=split_layout == "contiguous", split_min_blocks=split_min_blocks)
    args = [kv_lens.astype(jnp.int32), page_indices.reshape(-1).astype(jnp.int32),
            num_seqs.astype(jnp.int32).reshape(1), inv_freq.astype(jnp.float32), q2, k2, v2, kv2]
    kv_index = len(args) - 1
    params = plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    name = f"decode_attention_bk{block_k}_s{num_splits}"
    kv_shape = jax.ShapeDtypeStruct(kv2.shape, kv2.dtype)
    if num_splits == 1:
        out_shape = (jax.ShapeDtypeStruct((out_rows, head_dim), q.dtype), kv_shape)
        aliases = {kv_index: 1}
    elif fused_combine:  # the splits' merge by each row's last split: no combine kernel
        cnt_shape = (num_kv_heads * num_tokens,)
        if counters is None or counters.shape != cnt_shape:
            counters = jnp.zeros(cnt_shape, jnp.int32)
        args.append(counters)  # zero again afterwards: each row's last split resets its count
        out_shape = (jax.ShapeDtypeStruct((num_splits * out_rows, head_dim), jnp.float32),
                     jax.ShapeDtypeStruct((num_splits * out_rows,), jnp.float32),
                     jax.ShapeDtypeStruct((out_rows, head_dim), q.dtype),
                     jax.ShapeDtypeStruct(cnt_shape, jnp.int32), kv_shape)
        aliases = {kv_index: 4, kv_index + 1: 3}
        name += "_merge"
    else:
        out_shape = (jax.ShapeDtypeStruct((num_splits * out_rows, head_dim), jnp.float32),
                     jax.ShapeDtypeStruct((num_splits * out_rows,), jnp.float32), kv_shape)
        aliases = {kv_index: 2}
    grid = (num_kv_heads, num_splits, num_tokens)
    if prefetch:
        num_inputs = len(args)
        kernel = functools.partial(_decode_kernel_with_prefetch, num_inputs=num_inputs,
                                   num_tokens=num_tokens, prefetch=prefetch,
                                   prefetch_tile=prefetch_tile, eviction=eviction, **kernel.keywords)
        args += [w.reshape(-1, w.shape[-1]) for w in prefetch_ws]
        programs = prefetch_rows * num_kv_heads * num_splits
        out_shape += (jax.ShapeDtypeStruct((programs,), jnp.float32),)
        grid = (num_kv_heads, num_splits, num_tokens + prefetch_rows)
        name += f"_l2pf{programs}"
    results = pl.pallas_call(kernel, grid=grid, out_shape=out_shape, input_output_aliases=aliases,
                             compiler_params=params, interpret=interpret, name=name)(*args)
    sums = results[-1] if prefetch else None
    if num_splits == 1:
        out, kv2 = results[:2]
    elif fused_combine:
        out, counters, kv2 = results[2:5]
    else:
        o_part, lse, kv2 = results[:3]
        num_valid = jnp.minimum(num_seqs.reshape(1), max_num_seqs)
        out = combine(o_part, lse, num_valid, num_splits=num_splits, num_tokens=num_tokens,
                      num_q_heads=num_q_heads, dtype=q.dtype, interpret=interpret)
    if num_splits == 1 or fused_combine:
        out = out[:num_tokens * num_q_heads].reshape(num_tokens, num_q_heads, head_dim)
    return out, kv2.reshape(kv_pages.shape), counters, sums


def decode_attention(q, k, v, kv_pages, kv_lens, page_indices, num_seqs, inv_freq, *, sm_scale,
                     sliding_window=None, soft_cap=None, block_k=None, num_splits=None,
                     num_warps=None, num_stages=None, interpret=None, fused_combine=None,
                     split_layout=None, split_min_blocks=None, l2_prefetch=()):
    """`decode.py`'s contract (q may be the fused projection with k = v = None); the keyword
    tuning args override `default_config`; fused_combine (default on: fused_combine_default("decode"))
    merges the kv splits inside the kernel; split_layout (default split_layout_default()) is how
    kv splits share a request's key blocks; l2_prefetch: regions of the weights of the GEMMs that
    run next for extra programs to read into L2 meanwhile (`decode_attention_with_counters`).
    `interpret` defaults to True on the CPU backend."""
    out, kv_pages, _ = decode_attention_with_counters(
        q, k, v, kv_pages, kv_lens, page_indices, num_seqs, inv_freq, None, sm_scale=sm_scale,
        sliding_window=sliding_window, soft_cap=soft_cap, block_k=block_k, num_splits=num_splits,
        num_warps=num_warps, num_stages=num_stages, interpret=interpret, fused_combine=fused_combine,
        split_layout=split_layout, split_min_blocks=split_min_blocks, l2_prefetch=l2_prefetch)
    return out, kv_pages


decode_attention.l2_windows = l2pf.windows  # as LayerChain's

TILE_KEYS = ("block_k", "num_splits", "num_warps", "num_stages", "split_min_blocks")


def env_tile() -> dict:
    """$JAXENGINE_DECODE_TILE, an experiment switch: "key=value,..." over block_k, num_splits,
    num_warps, num_stages and split_min_blocks (positive powers of two), replacing
    `default_config`'s choice in every launch that does not pass its own (so a whole engine or
    bench_step runs one tile); unset or empty: {}.  Anything else is a ValueError naming the
    variable."""
    text = os.environ.get("JAXENGINE_DECODE_TILE", "").strip()
    tile = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, _, value = item.partition("=")
        key = key.strip()
        if key not in TILE_KEYS or not value.strip().isdigit() or int(value) < 1 \
                or _next_pow2(int(value)) != int(value):
            raise ValueError(f"JAXENGINE_DECODE_TILE: {item!r} is not one of {', '.join(TILE_KEYS)} "
                             "= a power of two (e.g. 'num_splits=1,block_k=64')")
        tile[key] = int(value)
    return tile


SPLIT_LAYOUTS = ("round_robin", "contiguous")


def split_layout_default() -> str:
    """How the decode kernel's kv splits share a request's key blocks: "round_robin" (split s takes
    blocks s, s + S, ...: its first page-table read does not wait for kv_lens) or "contiguous"
    (one range each).  An experiment for issue 3's batch-8 / 2k case, where Nsight Compute saw the
    same bytes in flight as at batch 64 deliver 2.71 TB/s against 3.95 (fifteenth session).  H200,
    sixteenth session, device-timed: no difference (b8 ctx 2k 24.0 us against 24.1), so round robin
    stays.  $JAXENGINE_DECODE_SPLIT_LAYOUT picks it; default round_robin."""
    return env_choice("JAXENGINE_DECODE_SPLIT_LAYOUT", SPLIT_LAYOUTS, "round_robin")


class LayerChain:
    """`decode_attention` for the layers of one forward pass, called in layer order while it is
    traced: the in-kernel merge's count buffer (zero before and after each launch) passes from each
    layer's launch to the next.  With a fresh zeros buffer a launch (plain `decode_attention`),
    XLA copies one zeros constant into a new buffer for every layer (the kernel writes it), a
    memcpy node a layer in the multi-step program's command buffer (H200 dump, twelfth session:
    15 copies a token at 1B).  Make one per forward pass (a traced value must not outlive its
    trace)."""

    # models plan what the layer's kernels read into L2 with it and pass the attention's share as
    # l2_prefetch= (regions of the next GEMMs' weights)
    l2_windows = staticmethod(l2pf.windows)

    def __init__(self):
        self.counters = None

    def __call__(self, q, k, v, kv_pages, kv_lens, page_indices, num_seqs, inv_freq, **kwargs):
        out, kv_pages, self.counters = decode_attention_with_counters(
            q, k, v, kv_pages, kv_lens, page_indices, num_seqs, inv_freq, self.counters, **kwargs)
        return out, kv_pages


def decode_attention_with_counters(q, k, v, kv_pages, kv_lens, page_indices, num_seqs, inv_freq,
                                   counters, *, sm_scale, sliding_window=None, soft_cap=None,
                                   block_k=None, num_splits=None, num_warps=None, num_stages=None,
                                   interpret=None, fused_combine=None, split_layout=None,
                                   split_min_blocks=None, l2_prefetch=()):
    """`decode_attention`, taking and returning the in-kernel merge's count buffer
    (i32[num_kv_heads * num_tokens], all zeros; None: a fresh one): (out, kv_pages, counters), the
    counters zero again (the input passed through where the launch merges no splits).
    l2_prefetch: ((weight [..., K], l2_prefetch.Region), ...): what extra programs of the launch
    read into L2 for the GEMMs after it (models plan it with l2_prefetch.plan); their number and
    the loads' eviction priority come from $JAXENGINE_L2_PREFETCH (l2_prefetch.setting)."""
    num_kv_heads = kv_pages.shape[2] // 2
    head_dim = kv_pages.shape[3]
    num_q_heads = q.shape[1] if k is not None else num_kv_heads * (q.shape[2] - 2)
    if k is None and q.shape[1] != num_kv_heads:
        raise ValueError(f"fused q/k/v has {q.shape[1]} kv heads, the pages {num_kv_heads}")
    if num_q_heads % num_kv_heads:
        raise ValueError(f"num_q_heads ({num_q_heads}) must be a multiple of num_kv_heads "
                         f"({num_kv_heads})")
    if head_dim % 2 or _next_pow2(head_dim) != head_dim:
        # Triton blocks are powers of two and zero-padding would move rope's halves: odd head
        # dims take the composite path.
        return (*composite(ragged_paged_attention)(
            q, k, v, kv_pages, kv_lens, page_indices, num_seqs, inv_freq, sm_scale=sm_scale,
            sliding_window=sliding_window, soft_cap=soft_cap), counters)
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    cfg = default_config(q.shape[0], num_kv_heads, head_dim, kv_pages.shape[1], page_indices.shape[1])
    cfg.update(env_tile())
    for key, value in (("block_k", block_k), ("num_splits", num_splits), ("num_warps", num_warps),
                       ("num_stages", num_stages), ("split_min_blocks", split_min_blocks)):
        if value is not None:
            cfg[key] = value
    prefetch = {}
    if l2_prefetch:
        setting = l2pf.setting()
        prefetch = dict(prefetch_ws=tuple(w for w, _ in l2_prefetch),
                        prefetch=tuple(tuple(region) for _, region in l2_prefetch),
                        prefetch_rows=-(-setting.programs // (num_kv_heads * cfg["num_splits"])),
                        prefetch_tile=(setting.tile_rows, 512),
                        eviction="evict_last" if setting.evict == "last" else None)
    out, kv_pages, counters, _ = _decode_attention(
        q, k, v, kv_pages, kv_lens, page_indices, num_seqs, inv_freq, counters, sm_scale=float(sm_scale),
        sliding_window=sliding_window, soft_cap=None if soft_cap is None else float(soft_cap),
        interpret=bool(interpret),
        fused_combine=fused_combine_default("decode") if fused_combine is None else bool(fused_combine),
        split_layout=(split_layout_default() if split_layout is None
                      else check_choice("split_layout", split_layout, SPLIT_LAYOUTS)), **prefetch, **cfg)
    return out, kv_pages, counters
