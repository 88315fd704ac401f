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
    # Request of each token; padding tokens get max_num_seqs - 1 and are masked out below.
    seq = jnp.searchsorted(cu_q_lens[1:], token, side="right").astype(jnp.int32)
    valid_token = token < cu_q_lens[num_seqs[0]]
    seq = jnp.minimum(seq, max_num_seqs - 1)
    q_len = cu_q_lens[seq + 1] - cu_q_lens[seq]
    q_pos = kv_lens[seq] - q_len + (token - cu_q_lens[seq])  # position of each query token

    # Gather every request's context: [max_num_seqs, max_len, 2 * num_kv_heads, head_dim]
    ctx = kv_pages[page_indices].reshape(max_num_seqs, max_len, combined, head_dim)
    k = ctx[:, :, 0::2, :][seq]  # [num_tokens, max_len, num_kv_heads, head_dim]
    v = ctx[:, :, 1::2, :][seq]

    qg = q.reshape(num_tokens, num_kv_heads, group, head_dim).astype(jnp.float32)
    scores = jnp.einsum("thgd,tlhd->thgl", qg, k.astype(jnp.float32)) * sm_scale
    if soft_cap is not None:
        scores = soft_cap * jnp.tanh(scores / soft_cap)
    kv_pos = jnp.arange(max_len, dtype=jnp.int32)
    mask = (kv_pos[None, :] <= q_pos[:, None]) & (kv_pos[None, :] < kv_lens[seq][:, None])
    if sliding_window is not None:
        mask &= q_pos[:, None] - kv_pos[None, :] < sliding_window
    mask &= valid_token[:, None]
    scores = jnp.where(mask[:, None, None, :], scores, -jnp.inf)
    # Rows with no visible key (padding) would be NaN; give them zero output.
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    p = jnp.exp(scores - row_max)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    out = jnp.einsum("thgl,tlhd->thgd", p, v.astype(jnp.float32)) / jnp.where(denom == 0, 1.0, denom)
    return out.reshape(num_tokens, num_q_heads, head_dim).astype(q.dtype)
