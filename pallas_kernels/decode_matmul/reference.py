"""The contract of gpu.decode_matmul in plain jnp: y = x @ w.T, float32 accumulation, x's dtype."""

import jax
import jax.numpy as jnp


def decode_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    return jnp.einsum("mk,nk->mn", x, w, preferred_element_type=jnp.float32).astype(x.dtype)
