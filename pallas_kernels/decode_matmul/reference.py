"""The contracts of the gpu.py kernels in plain jnp (float32 accumulation, x's dtype out)."""

import jax
import jax.numpy as jnp


def _dot(x: jax.Array, w: jax.Array) -> jax.Array:
    return jnp.einsum("mk,nk->mn", x, w, preferred_element_type=jnp.float32)


def decode_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    return _dot(x, w).astype(x.dtype)


def _m_pad(m: int) -> int:
    return -(-m // 8) * 8


def prenorm(x: jax.Array, norm_w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(hg, ss): the residual stream x with the RMSNorm weight applied, and [1, M rounded up to 8]
    float32 sums of x^2 per row (zero for the padding): an RMSNorm without its 1/rms yet."""
    xf = x.astype(jnp.float32)
    ss = jnp.pad(jnp.sum(xf * xf, -1), (0, _m_pad(x.shape[0]) - x.shape[0]))[None]
    return (xf * norm_w.astype(jnp.float32)).astype(x.dtype), ss


def residual_outputs(y: jax.Array, residual: jax.Array,
                     norm_w: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """h = residual + y in the residual's dtype, then prenorm(h, norm_w): the residual epilogue
    (also the kernels' XLA epilogue for split-K shapes)."""
    h = (y.astype(jnp.float32) + residual.astype(jnp.float32)).astype(residual.dtype)
    return (h, *prenorm(h, norm_w))


def decode_matmul_residual(x: jax.Array, w: jax.Array, residual: jax.Array,
                           norm_w: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """h = residual + x @ w.T in x's dtype, then prenorm(h, norm_w)."""
    return residual_outputs(_dot(x, w), residual, norm_w)


def inv_rms(ss: jax.Array, m: int, k: int, eps: float) -> jax.Array:
    """[m, 1] float32 1/rms of the first m rows from the partial sums of squares ss [T, m_pad]."""
    return jax.lax.rsqrt(ss.sum(0)[:m] / k + eps)[:, None]


def decode_matmul_normed(x: jax.Array, w: jax.Array, ss: jax.Array, eps: float) -> jax.Array:
    """rms_norm(h) @ w.T from x = hg and ss (prenorm's): each row of x @ w.T times its 1/rms."""
    m, k = x.shape
    return (_dot(x, w) * inv_rms(ss, m, k, eps)).astype(x.dtype)


def decode_gate_up_silu(x: jax.Array, w: jax.Array, ss: jax.Array | None = None,
                        eps: float = 0.0) -> jax.Array:
    """silu(gate) * up for w = [gate; up] [2F, K]; with ss, x is hg and rows are 1/rms-scaled first."""
    m, k = x.shape
    gu = _dot(x, w)
    if ss is not None:
        gu = gu * inv_rms(ss, m, k, eps)
    f = w.shape[0] // 2
    return (jax.nn.silu(gu[:, :f]) * gu[:, f:]).astype(x.dtype)
