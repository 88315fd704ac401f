"""Decode attention with the token's own rotary embedding and KV write folded in.

A decode-only step (every request brings exactly one token: row j of q/k/v is request j) is the
hot loop of generation.  Unfused, each layer runs q's rope, the K/V scatter (with k's rope), the
attention kernel and its split combine as separate device kernels; at batch 1 they are launch-
bound (~1.5-2 us each on an H100, fourth session's trace).  `decode_attention` takes q and k
before rope and returns the attention output together with the updated pages, so an
implementation may do all of it in one kernel (`gpu_decode.py`).  `composite` builds the same
function from any ragged attention implementation: rope, `write_kv`, attention, exactly the ops
the model runs on the general path (it is the reference, and the TPU/CPU implementation).

Contract, for every implementation:
    decode_attention(q, k, v, kv_pages, kv_lens, page_indices, num_seqs, inv_freq, *,
                     sm_scale, sliding_window=None, soft_cap=None) -> (out, kv_pages)
    q: [num_tokens, num_q_heads, head_dim], k, v: [num_tokens, num_kv_heads, head_dim] (q and k
    not yet rotated); row j < num_seqs[0] is request j, whose token sits at position
    kv_lens[j] - 1 (kv_lens counts this step's token); rows past num_seqs[0] are padding: their
    output is zero and nothing of theirs is written.  inv_freq: f32[head_dim // 2], the rotary
    frequencies (rotate-half layout, scaling already applied).
    Instead of q, k, v, q may be the fused projection [num_tokens, num_kv_heads, group + 2,
    head_dim] (per kv head: its q heads, then k, then v; the "fused" params layout's GEMM output)
    with k = v = None: a kernel then reads the three from one buffer, with no slicing kernels.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from .reference import ragged_paged_attention as reference_ragged_paged_attention
from .reference import write_kv


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x: [num_tokens, heads, head_dim]; cos/sin: [num_tokens, head_dim // 2] (rotate-half layout)."""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    c, s = cos[:, None, :], sin[:, None, :]
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(x.dtype)


def rope_cos_sin(positions: jax.Array, inv_freq: jax.Array) -> tuple[jax.Array, jax.Array]:
    angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]  # [num_tokens, head_dim // 2]
    return jnp.cos(angles), jnp.sin(angles)


def decode_slots(kv_lens: jax.Array, page_indices: jax.Array, num_seqs: jax.Array, num_tokens: int,
                 page_size: int, num_pages: int) -> tuple[jax.Array, jax.Array]:
    """(positions, slot_mapping) of a decode-only step: row j is request j at kv_lens[j] - 1;
    padding rows get position 0 and an out-of-range slot (dropped by write_kv)."""
    max_num_seqs, pages_per_seq = page_indices.shape
    row = jnp.arange(num_tokens, dtype=jnp.int32)
    seq = jnp.minimum(row, max_num_seqs - 1)
    real = (row < num_seqs[0]) & (row < max_num_seqs)
    pos = jnp.where(real, kv_lens[seq] - 1, 0)
    page = page_indices[seq, jnp.clip(pos // page_size, 0, pages_per_seq - 1)]
    slots = jnp.where(real, page * page_size + pos % page_size, num_pages * page_size)
    return pos, slots


def split_qkv(qkv: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """[num_tokens, num_kv_heads, group + 2, head_dim] -> q [num_tokens, num_q_heads, head_dim]
    (q head i belongs to kv head i // group), k, v [num_tokens, num_kv_heads, head_dim]."""
    t, n, g2, d = qkv.shape
    return qkv[:, :, :g2 - 2].reshape(t, n * (g2 - 2), d), qkv[:, :, g2 - 2], qkv[:, :, g2 - 1]


def composite(attention: Callable[..., jax.Array]) -> Callable[..., tuple[jax.Array, jax.Array]]:
    """`decode_attention` made of rope + write_kv + a ragged attention implementation."""

    def decode_attention(q, k, v, kv_pages, kv_lens, page_indices, num_seqs, inv_freq, *,
                         sm_scale, sliding_window=None, soft_cap=None):
        if k is None:
            q, k, v = split_qkv(q)
        num_tokens = q.shape[0]
        num_pages, page_size = kv_pages.shape[:2]
        max_num_seqs = page_indices.shape[0]
        pos, slots = decode_slots(kv_lens, page_indices, num_seqs, num_tokens, page_size, num_pages)
        cos, sin = rope_cos_sin(pos, inv_freq)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        kv_pages = write_kv(kv_pages, k, v, slots)
        cu_q_lens = jnp.minimum(jnp.arange(max_num_seqs + 1, dtype=jnp.int32), num_seqs[0])
        kwargs = {} if soft_cap is None else dict(soft_cap=soft_cap)
        out = attention(q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs, sm_scale=sm_scale,
                        sliding_window=sliding_window, **kwargs)
        return out, kv_pages

    return decode_attention


reference_decode_attention = composite(reference_ragged_paged_attention)
