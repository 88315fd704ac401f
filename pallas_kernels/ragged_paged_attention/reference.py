"""Pure-jnp ragged paged attention: the yardstick every kernel is tested against.

KV page layout (shared by every implementation, and the one jax's own TPU kernel reads):
    kv_pages: [num_pages, page_size, 2 * num_kv_heads, head_dim]
K of kv head h lives at combined head 2*h and V at 2*h + 1, so one page holds K and V of all
heads for `page_size` consecutive tokens and a single DMA/load brings in both.

A step is "ragged": the query tokens of all requests are flat in `q`, request i owning rows
cu_q_lens[i]:cu_q_lens[i+1]; its context after the step is kv_lens[i] tokens, the last
(cu_q_lens[i+1] - cu_q_lens[i]) of which are this step's queries (causal inside the request).
Rows past cu_q_lens[num_seqs[0]] are bucket padding; their output is zero.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def write_kv(kv_pages: jax.Array, k: jax.Array, v: jax.Array, slot_mapping: jax.Array) -> jax.Array:
    """Scatter this step's K/V into their slots (slot = page * page_size + offset).

    k, v: [num_tokens, num_kv_heads, head_dim]; slot_mapping: i32[num_tokens].  Padding tokens carry
    an out-of-range slot (>= num_pages * page_size) and are dropped, so no scratch page is needed.
    """
    num_pages, page_size, combined, head_dim = kv_pages.shape
    num_tokens, num_kv_heads, _ = k.shape
    # [num_tokens, 2 * num_kv_heads, head_dim], K/V interleaved per head
    kv = jnp.stack([k, v], axis=2).reshape(num_tokens, combined, head_dim).astype(kv_pages.dtype)
    flat = kv_pages.reshape(num_pages * page_size, combined, head_dim)
    flat = flat.at[slot_mapping].set(kv, mode="drop", unique_indices=False)
    return flat.reshape(num_pages, page_size, combined, head_dim)


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
) -> jax.Array:
    num_tokens, num_q_heads, head_dim = q.shape
    _, page_size, combined, _ = kv_pages.shape
    num_kv_heads = combined // 2
    group = num_q_heads // num_kv_heads
    max_num_seqs, pages_per_seq = page_indices.shape
    max_len = pages_per_seq * page_size

    token = jnp.arange(num_tokens, dtype=jnp.int32)
    # Request of each token (a compare-and-sum, not searchsorted: that lowers to a while loop);
    # padding tokens get max_num_seqs - 1 and are masked out below.
    seq = jnp.sum(cu_q_lens[1:][None, :] <= token[:, None], axis=1, dtype=jnp.int32)
    valid_token = token < cu_q_lens[num_seqs[0]]
    seq = jnp.minimum(seq, max_num_seqs - 1)
    q_len = cu_q_lens[seq + 1] - cu_q_lens[seq]
    q_pos = kv_lens[seq] - q_len + (token - cu_q_lens[seq])  # position of each query token
    kv_len = jnp.where(valid_token, kv_lens[seq], 0)  # padding tokens see nothing

    # Walk the pages with an online softmax, one page of every token's context per iteration, up
    # to the longest context in the step: work is O(tokens x context actually used), so bucket
    # padding and short contexts cost nothing (a static gather of max_len keys per token would).
    qg = q.reshape(num_tokens, num_kv_heads, group, head_dim).astype(jnp.float32) * sm_scale
    offsets = jnp.arange(page_size, dtype=jnp.int32)
    num_steps = (jnp.max(kv_len) + page_size - 1) // page_size

    def body(p, carry):
        m, l, acc = carry  # running max, denominator, numerator per (token, head)
        kv = kv_pages[page_indices[seq, p]].astype(jnp.float32)  # [num_tokens, page_size, combined, head_dim]
        k, v = kv[:, :, 0::2, :], kv[:, :, 1::2, :]
        scores = jnp.einsum("thgd,tphd->thgp", qg, k)
        if soft_cap is not None:
            scores = soft_cap * jnp.tanh(scores / soft_cap)
        kv_pos = p * page_size + offsets
        mask = (kv_pos[None, :] <= q_pos[:, None]) & (kv_pos[None, :] < kv_len[:, None])
        if sliding_window is not None:
            mask &= q_pos[:, None] - kv_pos[None, :] < sliding_window
        scores = jnp.where(mask[:, None, None, :], scores, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(scores, axis=-1))
        safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)  # rows that have seen no key yet
        alpha = jnp.exp(m - safe)
        probs = jnp.exp(scores - safe[..., None])
        l = l * alpha + jnp.sum(probs, axis=-1)
        acc = acc * alpha[..., None] + jnp.einsum("thgp,tphd->thgd", probs, v)
        return m_new, l, acc

    shape = (num_tokens, num_kv_heads, group)
    init = (jnp.full(shape, -jnp.inf, jnp.float32), jnp.zeros(shape, jnp.float32),
            jnp.zeros(shape + (head_dim,), jnp.float32))
    _, l, acc = jax.lax.fori_loop(0, num_steps, body, init)
    out = acc / jnp.where(l == 0, 1.0, l)[..., None]  # rows with no visible key: zero
    return out.reshape(num_tokens, num_q_heads, head_dim).astype(q.dtype)
