"""Weight-streaming matmul for decode-sized steps on Hopper: a Pallas Mosaic GPU kernel (TMA +
wgmma), y = x @ w.T with x [M, K] (M small: the step's token rows) and w [N, K] (the model's
[out, in] weight, K contiguous).

Why, next to XLA's GEMMs: in the decode program XLA's GEMMs stream the weights at ~93% of the
copy rate already (H200, ninth session), and these kernels match that; what they add is their own
epilogue: the output comes out in its final layout (no reduction or transpose kernel after it)
and neighbouring ops fold in (decode_gate_up_silu: the SwiGLU), fewer kernels a layer, which is
where decode steps lose time (NOTES.md).  Pallas-Triton kernels gather through pointer tensors
and stayed at 2.0-2.3 TB/s (fused_matmul/NOTES.md); TMA copies whole tiles.

Decomposition ("swap AB"): wgmma's M side is 64, so the weight is the A operand, a [64, tile_k]
tile of 64 output features, and x^T the B operand, [tile_k, m_pad] with m_pad the token rows
padded to a multiple of 8 (wgmma's N takes 8-256), so a batch-1 step reads an 8-row x tile, not a
64-row one.  A CTA owns 64 output features and one of `splits` equal K ranges; it streams its
weight tiles through a `stages`-deep TMA ring (plgpu.emit_pipeline) and accumulates y^T [64,
m_pad] in registers, stored transposed through shared memory so the output is y [m_pad, N]
itself.  splits > 1 (split-K, where N / 64 CTAs are too few) writes float32 partials of y^T that
one XLA fusion sums and transposes, as XLA's own split-K GEMMs have a reduction kernel.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

# H100 / H200 SXM: 132 SMs.  Used to pick splits (how many CTAs fill the chip).
_DEFAULT_NUM_SMS = 132
TILE_N = 64  # wgmma's M: output features a CTA owns


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def default_config(m: int, n: int, k: int, num_sms: int = _DEFAULT_NUM_SMS) -> dict:
    """tile_k, splits and stages for x [m, k] @ w[n, k].T.  One split where the N / 64 CTAs are at
    least ~60 (the output is then the kernel's own, no XLA reduction after it: on the H200 the 8B
    o GEMM at batch 1 ran 10.0 us with one split and 8 stages against 9.5 us with two, before the
    reduction's kernel), else the fewest that reach it; as many ring stages as fit in ~200 KiB."""
    tile_k = 128 if k % 128 == 0 else 64
    k_steps = k // tile_k
    n_tiles = n // TILE_N
    splits = next((s for s in range(1, 9) if k_steps % s == 0 and n_tiles * s >= 60),
                  max(s for s in range(1, 9) if k_steps % s == 0))
    stages = ring_stages(1, m, tile_k, k_steps // splits)
    return dict(tile_k=tile_k, splits=splits, stages=stages, warp_specialized=False)


def ring_stages(weight_tiles: int, m: int, tile_k: int, steps: int) -> int:
    """How many ring stages fit in ~200 KiB of shared memory (2-8, at most the K steps): a stage
    holds `weight_tiles` [64, tile_k] weight tiles and the [m padded to 8, tile_k] x tile."""
    stage_bytes = (weight_tiles * TILE_N + _round_up(m, 8)) * tile_k * 2
    return max(2, min(8, (200 << 10) // stage_bytes, steps))


def _smem_transforms(dtype, minor: int) -> tuple:
    """Tiling + swizzle of a shared-memory tile whose rows hold `minor` elements of dtype (the
    widest swizzle, up to 128 B, those rows allow): what TMA and wgmma want."""
    swizzle = plgpu.find_swizzle(minor * jnp.dtype(dtype).itemsize * 8)
    return (plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)),
            plgpu.SwizzleTransform(swizzle))


def _check(m, n, k, tile_k, splits):
    if n % TILE_N:
        raise ValueError(f"decode_matmul: N ({n}) must be a multiple of {TILE_N}")
    if tile_k % 64 or k % (tile_k * splits):
        raise ValueError(f"decode_matmul: K ({k}) must be a multiple of tile_k ({tile_k}, a "
                         f"multiple of 64) x splits ({splits})")
    if not 1 <= m <= 256:
        raise ValueError(f"decode_matmul: M ({m}) must be 1-256 (decode-sized)")


@functools.partial(jax.jit, static_argnames=("tile_k", "splits", "stages", "warp_specialized",
                                             "interpret"))
def _decode_matmul(x, w, *, tile_k: int, splits: int, stages: int, warp_specialized: bool,
                   interpret: bool):
    m, k = x.shape
    n = w.shape[0]
    m_pad = _round_up(m, 8)
    if m_pad != m:
        x = jnp.pad(x, [(0, m_pad - m), (0, 0)])
    k_steps = k // tile_k // splits
    transforms = _smem_transforms(w.dtype, 64)  # 128 B swizzle: 64 bf16 of K a row
    part_dtype = x.dtype if splits == 1 else jnp.float32
    in_specs = lambda n_idx, k0: [  # noqa: E731
        plgpu.BlockSpec((TILE_N, tile_k), lambda i: (n_idx, k0 + i), transforms=transforms,
                        delay_release=0 if warp_specialized else 1),
        plgpu.BlockSpec((m_pad, tile_k), lambda i: (0, k0 + i), transforms=transforms,
                        delay_release=0 if warp_specialized else 1),
    ]

    # The epilogue stores y^T's tile transposed into shared memory ([m_pad, 64]), so the output
    # is y itself ([m_pad, N], or [splits, m_pad, N] float32 partials): no transpose after it.
    # float32 partials (splits > 1) keep y^T's layout, [splits, N, m_pad]: Mosaic GPU finds no
    # register layout for the transposed float32 store on the device (H200: "Failed to infer a
    # possible set of layouts"); XLA's reduction transposes them for free.
    if splits == 1:
        o_smem_type = plgpu.SMEM((m_pad, TILE_N), part_dtype,
                                 transforms=_smem_transforms(part_dtype, TILE_N))
    else:
        o_smem_type = plgpu.SMEM((TILE_N, m_pad), part_dtype)

    def store(acc, o_smem, o_gmem, n_idx, s_idx):
        rows = pl.ds(n_idx * TILE_N, TILE_N)
        if splits == 1:
            o_smem.T[...] = acc.astype(part_dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[:, rows])
        else:
            o_smem[...] = acc
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[s_idx, rows])
        plgpu.wait_smem_to_gmem(0)

    def body_ws(w_gmem, x_gmem, o_gmem):
        # A memory warpgroup issues the TMA ring; one compute warpgroup runs the wgmmas.
        n_idx = lax.axis_index("n")
        s_idx = lax.axis_index("s")

        def mma(_, w_smem, x_smem, acc_ref):
            plgpu.wgmma(acc_ref, w_smem, x_smem.T)
            plgpu.wgmma_wait(0)
            return acc_ref

        def pipeline(step, context):
            return plgpu.emit_pipeline_warp_specialized(
                step, grid=(k_steps,), memory_registers=40, in_specs=in_specs(n_idx, s_idx * k_steps),
                wg_axis="wg", num_compute_wgs=1, max_concurrent_steps=stages,
                compute_context=context)

        ignore = lambda *_, **__: None  # noqa: E731

        @functools.partial(
            pl.run_scoped,
            allocs=pipeline(ignore, ignore).get_allocations(w_gmem, x_gmem),
            o_smem=o_smem_type,
            collective_axes="wg")
        def _scope(allocs, o_smem):
            def context(eval_pipeline):
                @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((TILE_N, m_pad), jnp.float32))
                def _acc(acc_ref):
                    eval_pipeline(acc_ref)
                    store(acc_ref[...], o_smem, o_gmem, n_idx, s_idx)

            pipeline(mma, context)(w_gmem, x_gmem, allocations=allocs)

    def body(w_gmem, x_gmem, o_gmem):
        n_idx = lax.axis_index("n")
        s_idx = lax.axis_index("s")
        k0 = s_idx * k_steps

        def acc_scope(acc_ref):
            def step(_, w_smem, x_smem):
                plgpu.wgmma(acc_ref, w_smem, x_smem.T)  # [64, tile_k] @ [tile_k, m_pad]
                plgpu.wgmma_wait(1)  # one wgmma in flight; its stage is released a step late

            plgpu.emit_pipeline(step, grid=(k_steps,), in_specs=in_specs(n_idx, k0),
                                max_concurrent_steps=stages)(w_gmem, x_gmem)
            return acc_ref[...]

        acc = pl.run_scoped(acc_scope, plgpu.ACC((TILE_N, m_pad), jnp.float32))

        pl.run_scoped(functools.partial(store, acc, o_gmem=o_gmem, n_idx=n_idx, s_idx=s_idx),
                      o_smem_type)

    ws = dict(num_threads=2, thread_name="wg") if warp_specialized else {}
    kernel = plgpu.kernel(
        body_ws if warp_specialized else body,
        out_type=jax.ShapeDtypeStruct((m_pad, n) if splits == 1 else (splits, n, m_pad), part_dtype),
        grid=(n // TILE_N, splits), grid_names=("n", "s"),
        interpret=plgpu.InterpretGPUParams() if interpret else None, **ws,
    )
    out = kernel(w, x)
    if splits > 1:  # one XLA reduction (+ transpose), as XLA's own split-K GEMMs have
        out = out.sum(0).T.astype(x.dtype)
    return out if m_pad == m else out[:m]  # the engine's decode buckets are multiples of 8 rows


def decode_matmul(x: jax.Array, w: jax.Array, *, tile_k: int | None = None,
                  splits: int | None = None, stages: int | None = None,
                  warp_specialized: bool | None = None, interpret: bool | None = None) -> jax.Array:
    """x [M, K] @ w[N, K].T -> [M, N] in x's dtype (float32 accumulation).  x and w bf16 or f16;
    N a multiple of 64, K of 64.  Tuning keywords override `default_config`; warp_specialized
    runs the TMA ring from a memory warpgroup beside the compute warpgroup.  `interpret`
    defaults to True on the CPU backend (Mosaic GPU's interpreter: tests)."""
    m, k = x.shape
    n, k2 = w.shape
    if k != k2:
        raise ValueError(f"decode_matmul: x has K = {k}, w has K = {k2}")
    if x.dtype != w.dtype or x.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"decode_matmul: x and w must both be bfloat16 or float16, got {x.dtype} "
                         f"and {w.dtype}")
    cfg = default_config(m, n, k)
    for key, value in (("tile_k", tile_k), ("splits", splits), ("stages", stages),
                       ("warp_specialized", warp_specialized)):
        if value is not None:
            cfg[key] = value
    _check(m, n, k, cfg["tile_k"], cfg["splits"])
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    return _decode_matmul(x, w, interpret=bool(interpret), **cfg)


@functools.partial(jax.jit, static_argnames=("tile_k", "stages", "interpret"))
def _decode_gate_up_silu(x, w, *, tile_k: int, stages: int, interpret: bool):
    m, k = x.shape
    f = w.shape[0] // 2
    m_pad = _round_up(m, 8)
    if m_pad != m:
        x = jnp.pad(x, [(0, m_pad - m), (0, 0)])
    transforms = _smem_transforms(w.dtype, 64)
    up0 = f // TILE_N  # the up rows' first tile: w is [gate; up]

    def body(w_gmem, x_gmem, o_gmem):
        n_idx = lax.axis_index("n")

        def acc_scope(acc_g, acc_u):
            def step(_, g_smem, u_smem, x_smem):
                plgpu.wgmma(acc_g, g_smem, x_smem.T)
                plgpu.wgmma(acc_u, u_smem, x_smem.T)
                plgpu.wgmma_wait(1)  # the previous step's wgmmas done: its stage is released

            spec = lambda first: plgpu.BlockSpec(  # noqa: E731
                (TILE_N, tile_k), lambda i: (first + n_idx, i), transforms=transforms, delay_release=1)
            plgpu.emit_pipeline(
                step, grid=(k // tile_k,),
                in_specs=[spec(0), spec(up0),
                          plgpu.BlockSpec((m_pad, tile_k), lambda i: (0, i), transforms=transforms,
                                          delay_release=1)],
                max_concurrent_steps=stages)(w_gmem, w_gmem, x_gmem)
            return acc_g[...], acc_u[...]

        g, u = pl.run_scoped(acc_scope, plgpu.ACC((TILE_N, m_pad), jnp.float32),
                             plgpu.ACC((TILE_N, m_pad), jnp.float32))
        h = g / (1.0 + jnp.exp(-g)) * u  # SwiGLU on the float32 accumulators

        def store(o_smem):
            o_smem.T[...] = h.astype(o_smem.dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[:, pl.ds(n_idx * TILE_N, TILE_N)])
            plgpu.wait_smem_to_gmem(0)

        pl.run_scoped(store, plgpu.SMEM((m_pad, TILE_N), x.dtype,
                                        transforms=_smem_transforms(x.dtype, TILE_N)))

    kernel = plgpu.kernel(
        body, out_type=jax.ShapeDtypeStruct((m_pad, f), x.dtype), grid=(f // TILE_N,),
        grid_names=("n",), interpret=plgpu.InterpretGPUParams() if interpret else None)
    out = kernel(w, x)
    return out if m_pad == m else out[:m]


def decode_gate_up_silu(x: jax.Array, w: jax.Array, *, tile_k: int | None = None,
                        stages: int | None = None, interpret: bool | None = None) -> jax.Array:
    """SwiGLU's first half in one kernel: silu(x @ w[:F].T) * (x @ w[F:].T) -> [M, F], w the
    stacked [gate; up] weight [2F, K] (the fused layout's gate_up_proj, reshaped for free).  Each
    CTA streams 64 gate rows and the 64 matching up rows, so the SwiGLU runs on its two float32
    accumulators in registers: no [M, 2F] intermediate and no XLA kernel for the SwiGLU."""
    m, k = x.shape
    two_f, k2 = w.shape
    if k != k2 or two_f % (2 * TILE_N):
        raise ValueError(f"decode_gate_up_silu: w must be [2F, K] with F a multiple of {TILE_N} and "
                         f"K = x's ({k}); got {w.shape}")
    if x.dtype != w.dtype or x.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"decode_gate_up_silu: x and w must both be bfloat16 or float16, got "
                         f"{x.dtype} and {w.dtype}")
    cfg = default_config(m, two_f, k)
    tile_k = tile_k or cfg["tile_k"]
    _check(m, two_f, k, tile_k, 1)
    if stages is None:  # a stage holds the gate and the up tile
        stages = ring_stages(2, m, tile_k, k // tile_k)
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    return _decode_gate_up_silu(x, w, tile_k=tile_k, stages=stages, interpret=bool(interpret))
