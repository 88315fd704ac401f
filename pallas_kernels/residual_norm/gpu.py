"""Residual add + RMSNorm in one Pallas (Triton) kernel for NVIDIA GPUs.

Between the matmuls of a decode step XLA runs the residual add and the RMSNorm as separate
kernels (an add, then a normalisation fusion: H100 trace of 2026-11-23, sixth session, ~4 small
kernels a layer of 1.5-2.5 us each, launch-bound at decode batch sizes).  This kernel does both
for one row per program: load x and delta, add, store h, reduce the row in float32, store the
scaled row.  Rows are whole in registers (hidden sizes up to 16k); a hidden size that is not a
power of two is a masked load of the next power of two.  Same numerics as reference.py up to the
float32 summation order of the mean.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from .reference import residual_rms_norm as reference_residual_rms_norm

MAX_HIDDEN = 16384


def _kernel(*refs, eps: float, hidden: int, block_h: int, has_delta: bool):
    if has_delta:
        x_ref, d_ref, w_ref, h_ref, n_ref = refs
    else:
        (x_ref, w_ref, n_ref), d_ref, h_ref = refs, None, None
    i = pl.program_id(0)
    col = lax.broadcasted_iota(jnp.int32, (block_h,), 0)
    mask = None if block_h == hidden else col < hidden
    load = functools.partial(plgpu.load, mask=mask, other=0.0) if mask is not None else plgpu.load
    x = load(x_ref.at[i, col])
    # The weight is loaded first thing, beside x: issued after the row's reduction (a barrier
    # across warps), its memory latency would come after the reduction's instead of with x's.
    w = load(w_ref.at[col])
    if has_delta:
        d = load(d_ref.at[i, col])
        x = (x.astype(jnp.float32) + d.astype(jnp.float32)).astype(h_ref.dtype)
        plgpu.store(h_ref.at[i, col], x, mask=mask)
    x32 = x.astype(jnp.float32)
    inv = lax.rsqrt(jnp.sum(x32 * x32) / hidden + eps)
    out = w * (x32 * inv).astype(x.dtype)
    plgpu.store(n_ref.at[i, col], out.astype(n_ref.dtype), mask=mask)


@functools.partial(jax.jit, static_argnames=("eps", "interpret"))
def _call(x, delta, weight, *, eps: float, interpret: bool):
    rows, hidden = x.shape
    block_h = pl.next_power_of_2(hidden)
    has_delta = delta is not None
    out_dtype = jnp.result_type(weight.dtype, x.dtype)
    kernel = functools.partial(_kernel, eps=eps, hidden=hidden, block_h=block_h, has_delta=has_delta)
    shapes = [jax.ShapeDtypeStruct((rows, hidden), out_dtype)]
    if has_delta:
        shapes.insert(0, jax.ShapeDtypeStruct((rows, hidden), x.dtype))
    args = (x, delta, weight) if has_delta else (x, weight)
    outs = pl.pallas_call(
        kernel, grid=(rows,), out_shape=tuple(shapes),
        # ~32 row elements a thread
        compiler_params=plgpu.CompilerParams(num_warps=min(16, max(1, block_h // 1024)), num_stages=1),
        interpret=interpret, name="residual_rms_norm" if has_delta else "rms_norm",
    )(*args)
    return (outs[0], outs[1]) if has_delta else (None, outs[0])


def residual_rms_norm(x: jax.Array, delta: jax.Array | None, weight: jax.Array, eps: float, *,
                      interpret: bool | None = None) -> tuple[jax.Array, jax.Array]:
    """reference.residual_rms_norm's contract; leading dims of x are flattened into rows.
    `interpret` defaults to True on the CPU backend."""
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    hidden = x.shape[-1]
    if hidden > MAX_HIDDEN or weight.shape != (hidden,) or (delta is not None and delta.shape != x.shape):
        return reference_residual_rms_norm(x, delta, weight, eps)
    lead = x.shape[:-1]
    flat = lambda a: None if a is None else a.reshape(-1, hidden)  # noqa: E731
    h, n = _call(flat(x), flat(delta), weight, eps=float(eps), interpret=interpret)
    return (x if h is None else h.reshape(*lead, hidden)), n.reshape(*lead, hidden)
