"""Ragged paged attention for TPUs: a Pallas (Mosaic) kernel, plus jax's own as an option.

impl="ours" (default): grid over work items (request, block of `block_q` query tokens), built in
jnp from cu_q_lens as in gpu.py.  The work-item table, kv_lens and the page table are
scalar-prefetched into SMEM (`pltpu.PrefetchScalarGridSpec`); kv_pages stays in HBM and the
request's pages are brought in `pages_per_block` at a time with `pltpu.make_async_copy` into a
two-slot VMEM buffer: block j+1's DMAs are started before block j is computed.  One DMA per page
brings K and V of every kv head (the combined layout), and every kv head is computed from it.
q is gathered into [num_work, block_q, num_q_heads, head_dim] outside the kernel (so that its
BlockSpec is a plain block) and the per-work-item output is scattered back to token rows.

impl="jax": jax.experimental.pallas.ops.tpu.ragged_paged_attention (same layout, tuned by
Google for real TPUs).

Why "ours" is the default: it is the one verified here.  With jax 0.11.2, jax's kernel does not
run in TPU interpret mode on CPU (the interpreter rejects its ref reshapes: "'ReshapeTransform'
object has no attribute 'indices'"), and no TPU was available, so nothing in this repo has
checked it against the reference.  Ours passes the equivalence tests in TPU interpret mode but
has never been compiled by Mosaic or timed on a TPU; on real hardware jax's kernel is the
likely faster one and should be measured first (impl="jax").
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from .work import work_items


def _kernel(work_seq_ref, work_start_ref, work_end_ref, kv_lens_ref, page_table_ref,
            cu_q_lens_ref,  # scalar prefetch (SMEM)
            q_ref,  # [block_q, num_q_heads, head_dim] (VMEM block)
            kv_hbm,  # [num_pages, page_size, 2 * num_kv_heads, head_dim] (HBM)
            o_ref,  # [block_q, num_q_heads, head_dim]
            kv_buf,  # VMEM [2, pages_per_block, page_size, 2 * num_kv_heads, head_dim]
            sems,  # DMA [2, pages_per_block]
            *, page_size, pages_per_seq, pages_per_block, num_kv_heads, group, block_q,
            sm_scale, sliding_window, soft_cap):
    w = pl.program_id(0)
    seq = work_seq_ref[w]
    q_start = work_start_ref[w]
    num_rows = work_end_ref[w] - q_start
    kv_len = kv_lens_ref[seq]
    cu_start = cu_q_lens_ref[seq]
    q_len = cu_q_lens_ref[seq + 1] - cu_start
    first_pos = kv_len - q_len + (q_start - cu_start)
    kv_hi = first_pos + num_rows
    block_k = pages_per_block * page_size
    if sliding_window is not None:
        kv_lo = jnp.maximum(first_pos - sliding_window + 1, 0) // block_k * block_k
    else:
        kv_lo = jnp.int32(0)
    num_blocks = jnp.where(num_rows > 0, (kv_hi - kv_lo + block_k - 1) // block_k, 0)
    first_page = kv_lo // page_size

    def copies(j, slot):
        out = []
        for i in range(pages_per_block):
            idx = jnp.minimum(first_page + j * pages_per_block + i, pages_per_seq - 1)
            page = page_table_ref[seq * pages_per_seq + idx]
            out.append(pltpu.make_async_copy(kv_hbm.at[page], kv_buf.at[slot, i],
                                             sems.at[slot, i]))
        return out

    @pl.when(num_blocks > 0)
    def _():
        for c in copies(0, 0):
            c.start()

    head_dim = q_ref.shape[-1]
    rows = block_q * group
    tok_off = lax.broadcasted_iota(jnp.int32, (block_q, group), 0).reshape(rows)
    q_pos = first_pos + tok_off  # [rows]
    row_valid = tok_off < num_rows
    q_all = q_ref[...].astype(jnp.float32)  # [block_q, num_q_heads, head_dim]

    def body(j, carry):
        slot = j % 2

        @pl.when(j + 1 < num_blocks)
        def _():
            for c in copies(j + 1, 1 - slot):
                c.start()

        for c in copies(j, slot):
            c.wait()
        kv = kv_buf[slot].reshape(block_k, 2 * num_kv_heads, head_dim).astype(jnp.float32)
        k_pos = kv_lo + j * block_k + lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
        visible = (k_pos <= q_pos[:, None]) & (k_pos < kv_hi)
        if sliding_window is not None:
            visible &= q_pos[:, None] - k_pos < sliding_window
        new = []
        for h in range(num_kv_heads):
            acc, m_prev, l_prev = carry[h]
            q = q_all[:, h * group:(h + 1) * group, :].reshape(rows, head_dim)
            s = lax.dot_general(q, kv[:, 2 * h, :], (((1,), (1,)), ((), ())),
                                precision=lax.Precision.HIGHEST,
                                preferred_element_type=jnp.float32) * sm_scale
            if soft_cap is not None:
                s = soft_cap * jnp.tanh(s / soft_cap)
            s = jnp.where(visible, s, -jnp.inf)
            m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
            m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)
            alpha = jnp.exp(m_prev - m_safe)
            p = jnp.exp(s - m_safe)
            l_next = l_prev * alpha + jnp.sum(p, axis=1, keepdims=True)
            pv = lax.dot_general(p, kv[:, 2 * h + 1, :], (((1,), (0,)), ((), ())),
                                 precision=lax.Precision.HIGHEST,
                                 preferred_element_type=jnp.float32)
            new.append((acc * alpha + pv, m_next, l_next))
        return tuple(new)

    init = tuple((jnp.zeros((rows, head_dim), jnp.float32),
                  jnp.full((rows, 1), -jnp.inf, jnp.float32),
                  jnp.zeros((rows, 1), jnp.float32)) for _ in range(num_kv_heads))
    state = lax.fori_loop(0, num_blocks, body, init)
    outs = []
    for h in range(num_kv_heads):
        acc, _, l = state[h]
        o = jnp.where(row_valid[:, None] & (l > 0), acc / jnp.where(l > 0, l, 1.0), 0.0)
        outs.append(o.reshape(block_q, group, head_dim))
    o_ref[...] = jnp.concatenate(outs, axis=1).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("sm_scale", "sliding_window", "soft_cap",
                                             "block_q", "pages_per_block", "interpret"))
def _ours(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, *, sm_scale, sliding_window,
          soft_cap, block_q, pages_per_block, interpret):
    num_tokens, num_q_heads, head_dim = q.shape
    num_pages, page_size, combined, _ = kv_pages.shape
    num_kv_heads = combined // 2
    group = num_q_heads // num_kv_heads
    max_num_seqs, pages_per_seq = page_indices.shape
    num_work = min(num_tokens, num_tokens // block_q + max_num_seqs)
    work_seq, work_start, work_end = work_items(cu_q_lens, num_seqs, block_q, num_work)
    # q of each work item: [num_work, block_q, num_q_heads, head_dim] (rows past the end: 0)
    tok = work_start[:, None] + jnp.arange(block_q)[None, :]
    q_w = jnp.where((tok < work_end[:, None])[..., None, None],
                    q[jnp.minimum(tok, num_tokens - 1)], 0)
    kernel = functools.partial(
        _kernel, page_size=page_size, pages_per_seq=pages_per_seq,
        pages_per_block=pages_per_block, num_kv_heads=num_kv_heads, group=group,
        block_q=block_q, sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap)
    block = (None, block_q, num_q_heads, head_dim)
    out_w = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=6,
            grid=(num_work,),
            in_specs=[pl.BlockSpec(block, lambda w, *_: (w, 0, 0, 0)),
                      pl.BlockSpec(memory_space=pl.ANY)],
            out_specs=pl.BlockSpec(block, lambda w, *_: (w, 0, 0, 0)),
            scratch_shapes=[
                pltpu.VMEM((2, pages_per_block, page_size, combined, head_dim), kv_pages.dtype),
                pltpu.SemaphoreType.DMA((2, pages_per_block)),
            ]),
        out_shape=jax.ShapeDtypeStruct(q_w.shape, q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("arbitrary",)),
        interpret=interpret,
    )(work_seq, work_start, work_end, kv_lens.astype(jnp.int32),
      page_indices.reshape(-1).astype(jnp.int32), cu_q_lens.astype(jnp.int32), q_w, kv_pages)
    # Back to token rows: token t lives in work item (t's seq block) at offset t - start.
    t = jnp.arange(num_tokens)
    mine = (work_start[None, :] <= t[:, None]) & (t[:, None] < work_end[None, :])
    owner = jnp.sum(jnp.where(mine, jnp.arange(num_work)[None, :] + 1, 0), axis=1) - 1  # -1: pad
    out = out_w[jnp.maximum(owner, 0), t - work_start[jnp.maximum(owner, 0)]]
    return jnp.where((owner >= 0)[:, None, None], out, 0).astype(q.dtype)


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
    impl: str = "ours",
    block_q: int = 8,
    pages_per_block: int | None = None,
    interpret=None,
) -> jax.Array:
    """Same contract as `reference.ragged_paged_attention`.  impl: "ours" or "jax" (see the
    module docstring).  interpret defaults to TPU interpret mode on a non-TPU backend."""
    if interpret is None and jax.default_backend() != "tpu":
        interpret = pltpu.InterpretParams()
    page_size = kv_pages.shape[1]
    if pages_per_block is None:
        pages_per_block = max(1, 128 // page_size)
    if impl == "jax":
        from jax.experimental.pallas.ops.tpu.ragged_paged_attention import (
            ragged_paged_attention as jax_rpa)
        kw = {}
        if jax.default_backend() != "tpu":  # its tuned-size table needs a real TPU
            kw = dict(num_kv_pages_per_block=min(pages_per_block, page_indices.shape[1]),
                      num_queries_per_block=block_q, vmem_limit_bytes=64 * 1024 * 1024)
        call = functools.partial(jax_rpa, q, kv_pages, kv_lens, page_indices, cu_q_lens,
                                 num_seqs, sm_scale=sm_scale, sliding_window=sliding_window,
                                 soft_cap=soft_cap, **kw)
        if interpret:
            with pltpu.force_tpu_interpret_mode(interpret):
                return call()
        return call()
    if impl != "ours":
        raise ValueError(f"impl must be 'ours' or 'jax', got {impl!r}")
    pages_per_block = min(pages_per_block, page_indices.shape[1])
    return _ours(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs,
                 sm_scale=float(sm_scale), sliding_window=sliding_window,
                 soft_cap=None if soft_cap is None else float(soft_cap), block_q=block_q,
                 pages_per_block=pages_per_block, interpret=interpret or False)
