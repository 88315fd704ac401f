"""Pure-jnp fused matmuls for small token counts: the yardstick the GPU kernel is tested against.

A decode step multiplies a handful of token rows by every weight of the model, so its time is the
time to stream the weights from HBM.  Three shapes cover a Llama layer; each folds in the small
elementwise work around the matmul that would otherwise be its own kernel launch:

    norm_linear(x, norm_w, eps, ws)       [rms_norm(x) @ w.T for w in ws]   (q, k, v share one x)
    norm_gate_up(x, norm_w, eps, wg, wu)  silu(rms_norm(x) @ wg.T) * (rms_norm(x) @ wu.T)
    linear_residual(x, w, residual)       residual + x @ w.T               (o_proj, down_proj)

Weights keep Hugging Face's [out_features, in_features] orientation.  Rounding follows the
unfused model (models/llama.py): the norm in float32 cast back to x's dtype and then scaled, every
matmul result rounded to x's dtype before the next elementwise op.  `norm_w=None` skips the norm.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * x32.astype(x.dtype)


def _mm(x: jax.Array, w: jax.Array) -> jax.Array:
    return jnp.einsum("mk,nk->mn", x, w, preferred_element_type=jnp.float32).astype(x.dtype)


def norm_linear(x: jax.Array, norm_w: jax.Array | None, eps: float,
                ws: Sequence[jax.Array]) -> list[jax.Array]:
    h = x if norm_w is None else rms_norm(x, norm_w, eps)
    return [_mm(h, w) for w in ws]


def norm_gate_up(x: jax.Array, norm_w: jax.Array | None, eps: float, wg: jax.Array,
                 wu: jax.Array) -> jax.Array:
    h = x if norm_w is None else rms_norm(x, norm_w, eps)
    return jax.nn.silu(_mm(h, wg)) * _mm(h, wu)


def linear_residual(x: jax.Array, w: jax.Array, residual: jax.Array) -> jax.Array:
    return residual + _mm(x, w)
