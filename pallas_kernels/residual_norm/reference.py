"""Residual add + RMSNorm, the step between two matmuls of a decoder layer, in plain jnp.

`residual_rms_norm(x, delta, weight, eps) -> (h, normed)`: h = x + delta in x's dtype (the
residual stream), normed = weight * rms_norm(h) with Hugging Face's numerics (normalise in float32,
cast back to h's dtype, then scale).  delta=None normalises x itself (h = x).  Rows are independent.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * x32.astype(x.dtype)


def residual_rms_norm(x: jax.Array, delta: jax.Array | None, weight: jax.Array,
                      eps: float) -> tuple[jax.Array, jax.Array]:
    h = x if delta is None else x + delta.astype(x.dtype)
    return h, rms_norm(h, weight, eps)
