"""Fused weight-streaming matmuls for NVIDIA GPUs: Pallas kernels lowered through Triton.

Same contract as `reference.py`.  At a decode step (a few to 64 token rows) every matmul is bound
by reading its weight once from HBM; XLA's Triton GEMMs reach 2.4-2.7 TB/s there on the H100
(2.95 is the copy ceiling) and the RMSNorm, SwiGLU and residual adds around them are separate
small kernels, each ~2 us of launch-bound time, 10 of them a layer.  Here each call is one kernel:

    grid = (output column blocks of every weight, row blocks)
    program: rows [block_m] x columns [block_n] of one weight; walks K in blocks of block_k,
             loading a [block_n, block_k] weight tile (rows contiguous in HBM) and the matching
             [block_m, block_k] slice of x (from L2: every program reads the same x), and
             accumulating a float32 [block_m, block_n] tile on the tensor cores.
    prologue (norm): one extra pass over the program's x rows for the sum of squares; x is then
             normalised block by block as it is loaded (x is tiny next to the weights).
    epilogue: round, then add the residual tile / apply silu(gate) * up, and store.

Several weights that share x (q, k, v) run as one grid: program p belongs to the weight whose
column-block range holds p (`pl.when` per weight), so one launch streams all three.  The gate and
up projections are walked together by the same program so that silu(gate) * up is local.

Rows past x's count are masked (the token bucket is padded to block_m >= 16, the smallest tile
Triton's dot takes).  Column and K sizes must be multiples of the blocks (`supports` checks).
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

_DEFAULT_NUM_SMS = 132  # H100 SXM


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


_SMEM_BUDGET = 180 * 1024  # bytes of pipelined tiles; the H100 allows 227 KiB a block


def default_config(m: int, ns: Sequence[int], k: int, gate_up: bool = False,
                   num_sms: int = _DEFAULT_NUM_SMS, itemsize: int = 2) -> dict:
    """Static choice of (block_m, block_n, block_k, num_warps, num_stages) from the shapes.

    block_n: at <= 16 rows, the largest power of two (16..128) that still gives every SM two
    programs: a decode matmul must keep weight loads in flight on all SMs at once to reach HBM
    bandwidth.  Above 16 rows, 64: every program re-reads its x rows from L2, so fewer, wider
    programs.  block_k: the largest that keeps `num_stages` copies of the x and weight tiles
    within shared memory."""
    block_m = min(max(16, _next_pow2(m)), 64)
    m_blocks = -(-m // block_m)
    n_w = 2 if gate_up else 1
    if m > 16:
        block_n = 64
    else:
        block_n = 128
        while block_n > 16 and sum(n // block_n for n in ns) * m_blocks < 2 * num_sms:
            block_n //= 2
    while block_n > 16 and any(n % block_n for n in ns):
        block_n //= 2
    num_stages = 3
    block_k = 512
    while block_k > 16 and (k % block_k
                            or num_stages * (block_m + n_w * block_n) * block_k * itemsize > _SMEM_BUDGET):
        block_k //= 2
    return dict(block_m=block_m, block_n=block_n, block_k=block_k, num_warps=4, num_stages=num_stages)


def supports(m: int, ns: Sequence[int], k: int, block_n: int = 16, block_k: int = 16) -> bool:
    return m >= 1 and all(n % block_n == 0 for n in ns) and k % block_k == 0


def _kernel(*refs, num_weights: int, starts: tuple[int, ...], gate_up: bool, has_norm: bool,
            has_residual: bool, eps: float, m: int, k_dim: int, block_m: int, block_n: int,
            block_k: int, clamp_rows: bool, precision):
    it = iter(refs)
    x_ref = next(it)
    norm_ref = next(it) if has_norm else None
    w_refs = [next(it) for _ in range(num_weights)]
    res_ref = next(it) if has_residual else None
    out_refs = list(it)

    pid = pl.program_id(0)
    rows = pl.program_id(1) * block_m + lax.broadcasted_iota(jnp.int32, (block_m,), 0)
    row_ok = rows < m
    x_rows = jnp.where(row_ok, rows, 0)[:, None]  # loads: clamp (masked lanes read row 0)
    out_rows = x_rows if clamp_rows else rows[:, None]  # stores: interpret mode has spare rows
    kcol = lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
    ncol = lax.broadcasted_iota(jnp.int32, (1, block_n), 1)
    num_k = k_dim // block_k
    dtype = x_ref.dtype

    def load_x(kb):
        return plgpu.load(x_ref.at[x_rows, kb * block_k + kcol], mask=row_ok[:, None], other=0.0)

    if has_norm:
        def sum_squares(kb, acc):
            xk = load_x(kb).astype(jnp.float32)
            return acc + jnp.sum(xk * xk, axis=1)

        ss = lax.fori_loop(0, num_k, sum_squares, jnp.zeros((block_m,), jnp.float32))
        scale = lax.rsqrt(ss / k_dim + eps)[:, None]

    def x_block(kb):
        xk = load_x(kb)
        if has_norm:
            g = norm_ref[pl.ds(kb * block_k, block_k)]
            xk = g[None, :] * (xk.astype(jnp.float32) * scale).astype(dtype)
        return xk

    def store(out_ref, n0, y):
        plgpu.store(out_ref.at[out_rows, n0 + ncol], y.astype(out_ref.dtype), mask=row_ok[:, None])

    if gate_up:
        wg_ref, wu_ref = w_refs
        n0 = pid * block_n

        def body(kb, carry):
            acc_g, acc_u = carry
            xk = x_block(kb)
            wg = wg_ref[pl.ds(n0, block_n), pl.ds(kb * block_k, block_k)]
            wu = wu_ref[pl.ds(n0, block_n), pl.ds(kb * block_k, block_k)]
            acc_g += plgpu.dot(xk, wg, trans_b=True, precision=precision)
            acc_u += plgpu.dot(xk, wu, trans_b=True, precision=precision)
            return acc_g, acc_u

        zeros = jnp.zeros((block_m, block_n), jnp.float32)
        acc_g, acc_u = lax.fori_loop(0, num_k, body, (zeros, zeros))
        gate = acc_g.astype(dtype).astype(jnp.float32)
        gate = (gate * jax.nn.sigmoid(gate)).astype(dtype)
        store(out_refs[0], n0, gate * acc_u.astype(dtype))
        return

    for i in range(num_weights):
        start, end = starts[i], starts[i + 1]

        @pl.when((pid >= start) & (pid < end))
        def _(i=i, start=start):
            w_ref = w_refs[i]
            n0 = (pid - start) * block_n

            def body(kb, acc):
                wk = w_ref[pl.ds(n0, block_n), pl.ds(kb * block_k, block_k)]
                return acc + plgpu.dot(x_block(kb), wk, trans_b=True, precision=precision)

            acc = lax.fori_loop(0, num_k, body, jnp.zeros((block_m, block_n), jnp.float32))
            y = acc.astype(dtype)
            if has_residual:
                r = plgpu.load(res_ref.at[x_rows, n0 + ncol], mask=row_ok[:, None], other=0.0)
                y = r + y
            store(out_refs[i], n0, y)


@functools.partial(jax.jit, static_argnames=("eps", "gate_up", "block_m", "block_n", "block_k",
                                             "num_warps", "num_stages", "interpret"))
def _fused(x, norm_w, ws, residual, *, eps, gate_up, block_m, block_n, block_k, num_warps,
           num_stages, interpret):
    m, k_dim = x.shape
    ns = [w.shape[0] for w in ws]
    m_blocks = -(-m // block_m)
    if gate_up:
        starts = (0, ns[0] // block_n)
        out_ns = [ns[0]]
    else:
        starts = [0]
        for n in ns:
            starts.append(starts[-1] + n // block_n)
        starts = tuple(starts)
        out_ns = ns
    out_rows = m if not interpret else m_blocks * block_m
    precision = lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
    kernel = functools.partial(
        _kernel, num_weights=len(ws), starts=starts, gate_up=gate_up, has_norm=norm_w is not None,
        has_residual=residual is not None, eps=eps, m=m, k_dim=k_dim, block_m=block_m,
        block_n=block_n, block_k=block_k, clamp_rows=not interpret, precision=precision)
    args = [x] + ([norm_w] if norm_w is not None else []) + list(ws)
    args += [residual] if residual is not None else []
    kind = "gate_up" if gate_up else ("residual" if residual is not None else "linear")
    outs = pl.pallas_call(
        kernel, grid=(starts[-1], m_blocks),
        out_shape=[jax.ShapeDtypeStruct((out_rows, n), x.dtype) for n in out_ns],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret, name=f"fused_matmul_{kind}_n{block_n}_k{block_k}",
    )(*args)
    return [o[:m] for o in outs]


def _call(x, norm_w, ws, residual, eps, gate_up, interpret, overrides):
    m, k_dim = x.shape
    ns = [w.shape[0] for w in ws]
    for w in ws:
        if w.shape[1] != k_dim:
            raise ValueError(f"weight in_features {w.shape[1]} != x features {k_dim}")
    cfg = default_config(m, ns, k_dim, gate_up=gate_up)
    cfg.update({key: v for key, v in overrides.items() if v is not None})
    if not supports(m, ns, k_dim, cfg["block_n"], cfg["block_k"]):
        raise ValueError(f"shapes m={m} ns={ns} k={k_dim} do not tile by block_n={cfg['block_n']}, "
                         f"block_k={cfg['block_k']}")
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    if norm_w is not None:
        norm_w = norm_w.astype(x.dtype)
    return _fused(x, norm_w, list(ws), residual, eps=float(eps), gate_up=gate_up,
                  interpret=bool(interpret), **cfg)


def norm_linear(x: jax.Array, norm_w: jax.Array | None, eps: float, ws: Sequence[jax.Array], *,
                interpret: bool | None = None, **overrides) -> list[jax.Array]:
    return _call(x, norm_w, ws, None, eps, False, interpret, overrides)


def norm_gate_up(x: jax.Array, norm_w: jax.Array | None, eps: float, wg: jax.Array, wu: jax.Array,
                 *, interpret: bool | None = None, **overrides) -> jax.Array:
    if wg.shape != wu.shape:
        raise ValueError(f"gate {wg.shape} and up {wu.shape} weights differ in shape")
    return _call(x, norm_w, [wg, wu], None, eps, True, interpret, overrides)[0]


def linear_residual(x: jax.Array, w: jax.Array, residual: jax.Array, *,
                    interpret: bool | None = None, **overrides) -> jax.Array:
    if residual.shape != (x.shape[0], w.shape[0]):
        raise ValueError(f"residual shape {residual.shape} != {(x.shape[0], w.shape[0])}")
    return _call(x, None, [w], residual.astype(x.dtype), 0.0, False, interpret, overrides)[0]
