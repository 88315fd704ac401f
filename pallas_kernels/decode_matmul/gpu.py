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
import os

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from .. import l2_prefetch as l2pf
from . import reference

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


def ring_stages(weight_tiles: int, m: int, tile_k: int, steps: int, reserve: int = 0) -> int:
    """How many ring stages fit in ~200 KiB of shared memory less `reserve` bytes (2-8, at most
    the K steps): a stage holds `weight_tiles` [64, tile_k] weight tiles and the [m padded to 8,
    tile_k] x tile."""
    stage_bytes = (weight_tiles * TILE_N + _round_up(m, 8)) * tile_k * 2
    return max(2, min(8, ((200 << 10) - reserve) // stage_bytes, steps))


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


def pdl_default() -> int:
    """Programmatic dependent launch for the kernels, $JAXENGINE_MGPU_PDL (off until measured):
    1: each kernel lets the next one launch at once (griddepcontrol.launch_dependents) and waits
    for the previous one's memory only at its start (griddepcontrol.wait), so launch and set-up
    (barriers, descriptors) overlap the previous kernel's tail instead of following it (XLA's own
    kernels launch this way already; the ninth session measured ~1.3 us of gap per Mosaic
    launch).  2: also, before waiting, TMA-prefetch the CTA's first ring of weight tiles into L2
    (weights do not depend on the previous kernel), so the ring fills from L2."""
    value = os.environ.get("JAXENGINE_MGPU_PDL", "0").strip().lower()
    return {"": 0, "0": 0, "false": 0, "1": 1, "true": 1, "2": 2, "prefetch": 2}.get(value, 1)


def _with_pdl(body, pdl: int, prefetch=None):
    """body, first triggering the dependent launch, then (pdl 2) prefetch(*refs), then waiting for
    the prerequisite grids: every thread waits before touching memory the kernels around it
    write, so there is no hazard with them (weights are only read)."""
    if not pdl:
        return body

    @functools.wraps(body)
    def wrapped(*refs):
        plgpu.griddepcontrol_launch_dependents()
        if pdl >= 2 and prefetch is not None:
            prefetch(*refs)
        plgpu.griddepcontrol_wait()
        body(*refs)

    return wrapped


def ss_chunk_sum() -> bool:
    """$JAXENGINE_MGPU_SS_SUM=chunks: _row_sums in 64-row chunks (not yet run on a GPU; the row
    loop is what the tenth session measured).  Read by the wrappers: a static argument of the
    jitted kernels, so switching it retraces."""
    return os.environ.get("JAXENGINE_MGPU_SS_SUM", "rows").strip().lower() == "chunks"


def _row_sums(ss_smem, chunks: bool):
    """Column sums of the partial sums of squares ss_smem [T, m_pad] float32 -> [m_pad], in the
    accumulator's column layout (WGMMA.reduce(0), ready to scale y^T's columns): row by row (T
    dependent shared-memory loads and adds: 64 at 8B), or with ss_chunk_sum() in 64-row chunks
    loaded like an accumulator and summed across the warpgroup (a few shuffles and one exchange
    through shared memory) where T is a multiple of 64 (XLA's split-K epilogue gives T = 1)."""
    t = ss_smem.shape[0]
    if t % TILE_N or not chunks:
        col = plgpu.Layout.WGMMA.reduce(0)
        return lax.fori_loop(1, t, lambda i, a: a + plgpu.load(ss_smem.at[i], layout=col),
                             plgpu.load(ss_smem.at[0], layout=col))
    tot = None
    for c in range(t // TILE_N):
        part = jnp.sum(plgpu.load(ss_smem.at[pl.ds(c * TILE_N, TILE_N)], layout=plgpu.Layout.WGMMA), axis=0)
        tot = part if tot is None else tot + part
    return tot


def _l2_prefetch_regions(w_refs, regions, cta, num_ctas: int):
    """TMA L2 prefetches of this CTA's share of each region (l2_prefetch.Region) of the weights
    w_refs: [64, 128]-column boxes (64 where the region's width is not a multiple of 128), dealt
    round robin over the CTAs, the regions' boxes in turn.  Fire and forget: nothing waits."""
    offset = 0
    for w_ref, region in zip(w_refs, regions):
        tile = (TILE_N, 128 if (region[3] - region[2]) % 128 == 0 else 64)
        tiles = l2pf.num_tiles(region, tile)
        first, count = l2pf.deal(cta, num_ctas, offset, tiles)
        offset += tiles

        def body(i, carry, w_ref=w_ref, region=region, tile=tile, first=first):
            row0, col0, _ = l2pf.tile_origin(first + i * num_ctas, region, tile)
            plgpu.async_prefetch(w_ref.at[pl.ds(row0, tile[0]), pl.ds(col0, tile[1])])
            return carry

        lax.fori_loop(0, count, body, 0)


def _with_l2_next(body, num_inputs: int, regions: tuple, cta, num_ctas: int):
    """body, after this CTA's L2 prefetches of the next GEMMs' weight regions (the kernel's inputs
    after its own `num_inputs`, which body does not see).  At the start: the small GEMMs this is
    for (1B's q/k/v and o, 51-60% of the copy rate at batch 1) leave bandwidth to spare while they
    run."""
    if not regions:
        return body

    @functools.wraps(body)
    def wrapped(*refs):
        _l2_prefetch_regions(refs[num_inputs:num_inputs + len(regions)], regions, cta(), num_ctas)
        body(*refs[:num_inputs], *refs[num_inputs + len(regions):])

    return wrapped


def _prefetch_rows(w_gmem, row0, k0: int | jax.Array, tile_k: int, tiles: int):
    """L2 prefetch (TMA) of `tiles` [64, tile_k] weight tiles from row row0, column tile k0 on."""
    for i in range(tiles):
        plgpu.async_prefetch(w_gmem.at[pl.ds(row0, TILE_N), pl.ds((k0 + i) * tile_k, tile_k)])


@functools.partial(jax.jit, static_argnames=("tile_k", "splits", "stages", "warp_specialized",
                                             "interpret", "epilogue", "eps", "pdl", "ss_chunks", "cluster",
                                             "l2_next"))
def _decode_matmul(x, w, *extra, tile_k: int, splits: int, stages: int, warp_specialized: bool,
                   interpret: bool, epilogue: str = "plain", eps: float = 0.0, pdl: int = 0,
                   ss_chunks: bool = False, cluster: bool = False, next_ws=(), l2_next=()):
    """epilogue "plain": y.  "residual" (extra = residual [M, N], norm_w [N]): (h, hg, ss) with
    h = residual + y, hg = h * norm_w and ss [N / 64, m_pad] float32 each CTA's sum of h^2 over
    its 64 columns (the next RMSNorm's partial sums).  "normed" (extra = ss [T, m_pad]):
    y * rsqrt(sum(ss, 0) / K + eps) per row (the RMSNorm's 1/rms, its weight already in x).
    cluster (splits = 2): the two K halves run as a cluster of two CTAs; the second hands its
    accumulator to the first through distributed shared memory (async_store_smem) and the first
    runs the epilogue, so a split-K shape keeps its epilogue in the kernel (no XLA reduction).
    next_ws / l2_next: 2-D weights of later GEMMs and their l2_prefetch.Region each, which the
    CTAs TMA-prefetch into L2 at their start (_with_l2_next)."""
    assert not cluster or (splits == 2 and not warp_specialized and not interpret)
    m, k = x.shape
    n = w.shape[0]
    m_pad = _round_up(m, 8)
    if m_pad != m:
        x = jnp.pad(x, [(0, m_pad - m), (0, 0)])
        if epilogue == "residual":
            extra = (jnp.pad(extra[0], [(0, m_pad - m), (0, 0)]), extra[1])
    k_steps = k // tile_k // splits
    transforms = _smem_transforms(w.dtype, 64)  # 128 B swizzle: 64 bf16 of K a row
    single = splits == 1 or cluster  # one output tile a 64-feature block: the kernel's epilogue
    part_dtype = x.dtype if single else jnp.float32
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
    if single:
        o_smem_type = plgpu.SMEM((m_pad, TILE_N), part_dtype,
                                 transforms=_smem_transforms(part_dtype, TILE_N))
    else:
        o_smem_type = plgpu.SMEM((TILE_N, m_pad), part_dtype)

    def store(acc, o_smem, o_gmem, n_idx, s_idx):
        rows = pl.ds(n_idx * TILE_N, TILE_N)
        if single:
            o_smem.T[...] = acc.astype(part_dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[:, rows])
        else:
            o_smem[...] = acc
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[s_idx, rows])
        plgpu.wait_smem_to_gmem(0)

    def matmul_ws(w_gmem, x_gmem, o_gmem):
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

    def accumulate(w_gmem, x_gmem, n_idx, k0):
        def acc_scope(acc_ref):
            def step(_, w_smem, x_smem):
                plgpu.wgmma(acc_ref, w_smem, x_smem.T)  # [64, tile_k] @ [tile_k, m_pad]
                plgpu.wgmma_wait(1)  # one wgmma in flight; its stage is released a step late

            plgpu.emit_pipeline(step, grid=(k_steps,), in_specs=in_specs(n_idx, k0),
                                max_concurrent_steps=stages)(w_gmem, x_gmem)
            return acc_ref[...]

        return pl.run_scoped(acc_scope, plgpu.ACC((TILE_N, m_pad), jnp.float32))

    def first_only(fn):
        """fn() in the CTA that runs the epilogue: all of them, or a cluster's first."""
        if cluster:
            pl.when(lax.axis_index("s") == 0)(fn)
        else:
            fn()

    def split_k0():  # the CTA's first K tile: its cluster rank's half, or 0 with one split
        return lax.axis_index("s") * k_steps if cluster else 0

    def first_of_pair(acc, scratch, epilogue_fn):
        """epilogue_fn(acc) in the CTA that holds the whole sum: every CTA without a cluster; with
        one, the first, after the second's accumulator arrives (st.async into its shared memory,
        the landing buffer and barrier kernel-level scratch: initialised before the prologue's
        cluster sync, never aliasing the first CTA's ring)."""
        if not cluster:
            return epilogue_fn(acc)
        part_smem, part_bar = scratch
        second = lax.axis_index("s") == 1

        @pl.when(second)
        def _send():
            plgpu.async_store_smem(acc, part_smem, part_bar, cluster_idx=0, cluster_dim="s")

        @pl.when(jnp.logical_not(second))
        def _finish():
            plgpu.barrier_wait(part_bar)
            epilogue_fn(acc + part_smem[...])

    def matmul(w_gmem, x_gmem, o_gmem, *scratch):
        n_idx = lax.axis_index("n")
        s_idx = lax.axis_index("s")
        acc = accumulate(w_gmem, x_gmem, n_idx, s_idx * k_steps)
        first_of_pair(acc, scratch, lambda acc: pl.run_scoped(
            functools.partial(store, acc, o_gmem=o_gmem, n_idx=n_idx, s_idx=s_idx), o_smem_type))

    def tile_t(dtype):  # a [m_pad, 64] output tile, written through its transposed view
        return plgpu.SMEM((m_pad, TILE_N), dtype, transforms=_smem_transforms(dtype, TILE_N))

    def matmul_residual(w_gmem, x_gmem, res_gmem, g_gmem, h_gmem, hg_gmem, ss_gmem, *scratch):
        # The residual add and the next RMSNorm's inputs: the residual tile and the norm weight's
        # 64 entries arrive by TMA while the weights stream; everything stays in y^T's layout.
        n_idx = lax.axis_index("n")
        cols = pl.ds(n_idx * TILE_N, TILE_N)

        def scope(res_smem, g_smem, bar):
            def prefetch():
                plgpu.copy_gmem_to_smem(res_gmem.at[:, cols], res_smem, bar)
                plgpu.copy_gmem_to_smem(g_gmem.at[cols], g_smem, bar)

            first_only(prefetch)
            acc = accumulate(w_gmem, x_gmem, n_idx, split_k0())
            first_of_pair(acc, scratch, functools.partial(epilogue, res_smem, g_smem, bar))

        def epilogue(res_smem, g_smem, bar, acc):
            plgpu.barrier_wait(bar)
            h = (acc + res_smem.T[...].astype(jnp.float32)).astype(x.dtype)
            hf = h.astype(jnp.float32)  # the residual stream as stored: the norm sees these values
            g = plgpu.load(g_smem, layout=plgpu.Layout.WGMMA.reduce(1)).astype(jnp.float32)
            hg = (hf * lax.broadcast_in_dim(g, (TILE_N, m_pad), [0])).astype(x.dtype)
            ss = jnp.sum(hf * hf, axis=0)

            def out_scope(h_smem, hg_smem, ss_smem):  # after the ring: its shared memory is free
                h_smem.T[...] = h
                hg_smem.T[...] = hg
                ss_smem[...] = ss
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(h_smem, h_gmem.at[:, cols])
                plgpu.copy_smem_to_gmem(hg_smem, hg_gmem.at[:, cols])
                plgpu.copy_smem_to_gmem(ss_smem, ss_gmem.at[n_idx])
                plgpu.wait_smem_to_gmem(0)

            pl.run_scoped(out_scope, tile_t(x.dtype), tile_t(x.dtype), plgpu.SMEM((m_pad,), jnp.float32))

        pl.run_scoped(scope, tile_t(x.dtype), plgpu.SMEM((TILE_N,), x.dtype), plgpu.Barrier(num_arrivals=2))

    def matmul_normed(w_gmem, x_gmem, ss_gmem, o_gmem, *scratch):
        # x is the normed input without its 1/rms (the norm weight applied): each row's 1/rms,
        # from the partial sums of squares the previous kernel wrote, scales y^T's columns.
        n_idx = lax.axis_index("n")
        t = ss_gmem.shape[0]

        def scope(ss_smem, bar):
            first_only(lambda: plgpu.copy_gmem_to_smem(ss_gmem, ss_smem, bar))
            acc = accumulate(w_gmem, x_gmem, n_idx, split_k0())
            first_of_pair(acc, scratch, functools.partial(epilogue, ss_smem, bar))

        def epilogue(ss_smem, bar, acc):
            plgpu.barrier_wait(bar)
            r = lax.rsqrt(_row_sums(ss_smem, ss_chunks) * (1.0 / k) + eps)
            y = acc * lax.broadcast_in_dim(r, (TILE_N, m_pad), [1])
            pl.run_scoped(functools.partial(store, y, o_gmem=o_gmem, n_idx=n_idx, s_idx=0), o_smem_type)

        pl.run_scoped(scope, plgpu.SMEM((t, m_pad), jnp.float32), plgpu.Barrier(num_arrivals=1))

    def prefetch(w_gmem, *_):
        _prefetch_rows(w_gmem, lax.axis_index("n") * TILE_N, lax.axis_index("s") * k_steps, tile_k,
                       min(stages, k_steps))

    pdl = 0 if interpret else pdl  # the interpreter has no grids to overlap
    ws = dict(num_threads=2, thread_name="wg") if warp_specialized else {}
    ctas_n = 2 if cluster else (1 if single else splits)  # CTAs a 64-feature block

    def l2_next_of(body, num_inputs):
        if warp_specialized and l2_next:  # two warpgroups would each issue them: not wired (unused there)
            raise ValueError("l2_next: not with warp_specialized")
        return _with_l2_next(body, num_inputs, l2_next,
                             lambda: lax.axis_index("n") * ctas_n + lax.axis_index("s"),
                             n // TILE_N * ctas_n)

    interpret_params = plgpu.InterpretGPUParams() if interpret else None
    out_shape = jax.ShapeDtypeStruct((m_pad, n) if single else (splits, n, m_pad), part_dtype)
    # the grid: (64-feature blocks, K splits), or with a cluster the split axis is the cluster's
    launch = (dict(grid=(n // TILE_N,), grid_names=("n",), cluster=(2,), cluster_names=("s",),
                   scratch_types=(plgpu.SMEM((TILE_N, m_pad), jnp.float32), plgpu.Barrier(num_arrivals=1)))
              if cluster else dict(grid=(n // TILE_N, 1 if single else splits), grid_names=("n", "s")))
    if not single or epilogue == "plain":
        kernel = plgpu.kernel(
            _with_pdl(l2_next_of(matmul_ws if warp_specialized else matmul, 2), pdl, prefetch),
            out_type=out_shape, interpret=interpret_params, **launch, **ws)
        out = kernel(w, x, *next_ws)
        if not single:  # one XLA reduction (+ transpose), as XLA's own split-K GEMMs have
            out = out.sum(0).T
        return _xla_epilogue(out, x.dtype, m, epilogue, extra, k, eps)
    if epilogue == "residual":
        outs = plgpu.kernel(
            _with_pdl(l2_next_of(matmul_residual, 4), pdl, prefetch),
            out_type=(out_shape, out_shape, jax.ShapeDtypeStruct((n // TILE_N, m_pad), jnp.float32)),
            interpret=interpret_params, **launch)(w, x, *extra, *next_ws)
        h, hg, ss = outs
        return (h, hg, ss) if m_pad == m else (h[:m], hg[:m], ss)
    out = plgpu.kernel(_with_pdl(l2_next_of(matmul_normed, 3), pdl, prefetch), out_type=out_shape,
                       interpret=interpret_params, **launch)(w, x, *extra, *next_ws)
    return out if m_pad == m else out[:m]  # the engine's decode buckets are multiples of 8 rows


def _xla_epilogue(y, dtype, m: int, epilogue: str, extra, k: int, eps: float):
    """The epilogues as XLA ops on y [m_pad, N] (float32 split-K sums, or the plain kernel's
    output): one fusion with the split-K reduction."""
    if epilogue == "plain":
        y = y.astype(dtype)
        return y if y.shape[0] == m else y[:m]
    if epilogue == "normed":
        (ss,) = extra
        y = (y.astype(jnp.float32) * reference.inv_rms(ss, y.shape[0], k, eps)).astype(dtype)
        return y if y.shape[0] == m else y[:m]
    h, hg, ss = reference.residual_outputs(y, *extra)  # ss: [1, m_pad]
    return (h, hg, ss) if h.shape[0] == m else (h[:m], hg[:m], ss)


def decode_matmul(x: jax.Array, w: jax.Array, *, tile_k: int | None = None,
                  splits: int | None = None, stages: int | None = None,
                  warp_specialized: bool | None = None, interpret: bool | None = None,
                  pdl: int | None = None, cluster: bool | None = None) -> jax.Array:
    """x [M, K] @ w[N, K].T -> [M, N] in x's dtype (float32 accumulation).  x and w bf16 or f16;
    N a multiple of 64, K of 64.  Tuning keywords override `default_config`; warp_specialized
    runs the TMA ring from a memory warpgroup beside the compute warpgroup; pdl (0, 1 or 2,
    default pdl_default()) launches it with programmatic dependent launch.  `interpret`
    defaults to True on the CPU backend (Mosaic GPU's interpreter: tests; no PDL there)."""
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
    interpret = _interpret(interpret)
    return _decode_matmul(x, w, interpret=interpret, pdl=_pdl(pdl),
                          cluster=_cluster(cfg, interpret, cluster), **cfg)


def _check_inputs(name: str, x, w):
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"{name}: x must be [M, K] and w [N, K]; got {x.shape} and {w.shape}")
    if x.dtype != w.dtype or x.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"{name}: x and w must both be bfloat16 or float16, got {x.dtype} and {w.dtype}")


def _check_ss(name: str, ss, m: int):
    if ss.ndim != 2 or ss.shape[1] != _round_up(m, 8) or ss.dtype != jnp.float32:
        raise ValueError(f"{name}: ss must be float32 [T, M rounded up to 8 = {_round_up(m, 8)}] "
                         f"(a residual kernel's partial sums of squares); got {ss.dtype} {ss.shape}")


def _epilogue_config(m: int, n: int, k: int, tile_k, splits, stages, reserve: int, interpret: bool,
                     cluster: bool | None) -> dict:
    """default_config with the overrides given and the cluster decision; a ring whose kernel runs
    the epilogue (one split, or a cluster pair) leaves `reserve` bytes of shared memory for the
    epilogue's prefetched inputs (and the cluster's landing accumulator)."""
    cfg = default_config(m, n, k)
    cfg["tile_k"] = tile_k or cfg["tile_k"]
    cfg["splits"] = splits or cfg["splits"]
    _check(m, n, k, cfg["tile_k"], cfg["splits"])
    cfg["cluster"] = _cluster(cfg, interpret, cluster)
    if cfg["cluster"]:
        reserve += _round_up(m, 8) * TILE_N * 4
    if stages or cfg["splits"] == 1 or cfg["cluster"]:
        steps = k // cfg["tile_k"] // cfg["splits"]
        cfg["stages"] = stages or ring_stages(1, m, cfg["tile_k"], steps, reserve)
    return cfg


def _interpret(interpret: bool | None) -> bool:
    return jax.default_backend() == "cpu" if interpret is None else bool(interpret)


def _pdl(pdl: int | bool | None) -> int:
    return pdl_default() if pdl is None else int(pdl)


def cluster_split_default() -> bool:
    """Two-way split-K shapes (1B's q/k/v, o, down) run as clusters of two CTAs with the
    reduction and epilogue in the kernel; $JAXENGINE_MGPU_CLUSTER_SPLIT=0 turns it off (XLA then
    sums the two splits' partials and runs the epilogue).  On by default since the eleventh
    session (H200, BENCHMARKS.md): 1B batch-1 forward 0.920 ms against 0.989 with the norm
    epilogues and 0.940 against 0.976 without, 48 fewer launches a step (the engine at K = 8 kept
    1B batch 1's TPOT at 1.06 ms: its time outside the forward dominates).  Mosaic GPU's
    interpreter cannot run it, so CPU tests check its lowering and the compiled tests its
    numbers."""
    return os.environ.get("JAXENGINE_MGPU_CLUSTER_SPLIT", "1").strip().lower() not in ("0", "false")


def _cluster(cfg: dict, interpret: bool, cluster: bool | None) -> bool:
    want = cluster_split_default() if cluster is None else bool(cluster)
    return want and cfg["splits"] == 2 and not cfg["warp_specialized"] and not interpret


def decode_matmul_residual(x: jax.Array, w: jax.Array, residual: jax.Array, norm_w: jax.Array, *,
                           tile_k: int | None = None, splits: int | None = None,
                           stages: int | None = None, interpret: bool | None = None,
                           pdl: int | None = None, cluster: bool | None = None, l2_next=()
                           ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The o / down projection with the residual add and the next RMSNorm's inputs in its
    epilogue: h = residual + x @ w.T (the new residual stream, x's dtype), hg = h * norm_w (the
    next norm's input with its weight applied, not yet its 1/rms) and ss, float32 [T, M rounded
    up to 8], partial sums of h^2 over column blocks whose sum over T is each row's sum of h^2.
    Pass hg and ss to decode_matmul_normed / decode_gate_up_silu(ss=): with this kernel the
    RMSNorm needs no kernel of its own.  Split-K shapes (N / 64 < 60 CTAs) run the epilogue in
    XLA's split-K reduction.  l2_next: ((weight [..., K], l2_prefetch.Region), ...) of later GEMMs
    for the CTAs to prefetch into L2 while they run."""
    _check_inputs("decode_matmul_residual", x, w)
    m, k = x.shape
    n = w.shape[0]
    if residual.shape != (m, n) or residual.dtype != x.dtype or norm_w.shape != (n,):
        raise ValueError(f"decode_matmul_residual: residual must be {x.dtype} {(m, n)} and norm_w "
                         f"({n},); got {residual.dtype} {residual.shape} and {norm_w.shape}")
    # the residual tile and the norm weight (and with a cluster the landing accumulator) sit
    # beside the ring
    interpret = _interpret(interpret)
    reserve = _round_up(m, 8) * TILE_N * 2 + 1024
    cfg = _epilogue_config(m, n, k, tile_k, splits, stages, reserve, interpret, cluster)
    return _decode_matmul(x, w, residual, norm_w.astype(x.dtype), interpret=interpret,
                          epilogue="residual", pdl=_pdl(pdl), **_next_args(l2_next), **cfg)


def decode_matmul_normed(x: jax.Array, w: jax.Array, ss: jax.Array, eps: float, *,
                         tile_k: int | None = None, splits: int | None = None,
                         stages: int | None = None, interpret: bool | None = None,
                         pdl: int | None = None, cluster: bool | None = None, l2_next=()) -> jax.Array:
    """rms_norm(h) @ w.T for the q/k/v projection, given x = hg and ss from
    decode_matmul_residual (or reference.prenorm): each row of x @ w.T scaled by
    rsqrt(sum(ss, 0) / K + eps) in the epilogue.  l2_next: as decode_matmul_residual's."""
    _check_inputs("decode_matmul_normed", x, w)
    m, k = x.shape
    n = w.shape[0]
    _check_ss("decode_matmul_normed", ss, m)
    interpret = _interpret(interpret)
    cfg = _epilogue_config(m, n, k, tile_k, splits, stages, ss.size * 4 + 1024, interpret, cluster)
    return _decode_matmul(x, w, ss, interpret=interpret, epilogue="normed", eps=float(eps),
                          pdl=_pdl(pdl), ss_chunks=ss_chunk_sum(), **_next_args(l2_next), **cfg)


def _next_args(l2_next) -> dict:
    """_decode_matmul's next_ws / l2_next from ((weight [..., K], Region), ...), checked: each
    region inside its weight (2-D view), rows and columns in whole 64-row / 64-column boxes."""
    ws, regions = [], []
    for w, region in l2_next:
        w2 = w.reshape(-1, w.shape[-1])
        rows, parts, c0, c1, stride = region = tuple(int(v) for v in region)
        if (rows > w2.shape[0] or rows % TILE_N or parts * stride > w2.shape[1] or not 0 <= c0 < c1 <= stride
                or c0 % 64 or c1 % 64 or stride % 64):
            raise ValueError(f"l2_next: region {region} does not fit a weight {w2.shape} in 64-row / "
                             "64-column boxes")
        ws.append(w2)
        regions.append(region)
    return dict(next_ws=tuple(ws), l2_next=tuple(regions)) if ws else {}


@functools.partial(jax.jit, static_argnames=("tile_k", "stages", "interpret", "eps", "pdl", "ss_chunks"))
def _decode_gate_up_silu(x, w, *extra, tile_k: int, stages: int, interpret: bool, eps: float = 0.0,
                         pdl: int = 0, ss_chunks: bool = False):
    m, k = x.shape
    f = w.shape[0] // 2
    m_pad = _round_up(m, 8)
    if m_pad != m:
        x = jnp.pad(x, [(0, m_pad - m), (0, 0)])
    transforms = _smem_transforms(w.dtype, 64)
    up0 = f // TILE_N  # the up rows' first tile: w is [gate; up]

    def accumulate(w_gmem, x_gmem, n_idx):
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

        return pl.run_scoped(acc_scope, plgpu.ACC((TILE_N, m_pad), jnp.float32),
                             plgpu.ACC((TILE_N, m_pad), jnp.float32))

    def silu_store(g, u, o_gmem, n_idx):
        h = g / (1.0 + jnp.exp(-g)) * u  # SwiGLU on the float32 accumulators

        def store(o_smem):
            o_smem.T[...] = h.astype(o_smem.dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[:, pl.ds(n_idx * TILE_N, TILE_N)])
            plgpu.wait_smem_to_gmem(0)

        pl.run_scoped(store, plgpu.SMEM((m_pad, TILE_N), x.dtype,
                                        transforms=_smem_transforms(x.dtype, TILE_N)))

    def gate_up_silu(w_gmem, x_gmem, o_gmem):
        n_idx = lax.axis_index("n")
        silu_store(*accumulate(w_gmem, x_gmem, n_idx), o_gmem, n_idx)

    def gate_up_silu_normed(w_gmem, x_gmem, ss_gmem, o_gmem):  # as _decode_matmul's "normed" epilogue
        n_idx = lax.axis_index("n")
        t = ss_gmem.shape[0]

        def scope(ss_smem, bar):
            plgpu.copy_gmem_to_smem(ss_gmem, ss_smem, bar)
            g, u = accumulate(w_gmem, x_gmem, n_idx)
            plgpu.barrier_wait(bar)
            r = lax.rsqrt(_row_sums(ss_smem, ss_chunks) * (1.0 / k) + eps)
            r = lax.broadcast_in_dim(r, (TILE_N, m_pad), [1])
            silu_store(g * r, u * r, o_gmem, n_idx)

        pl.run_scoped(scope, plgpu.SMEM((t, m_pad), jnp.float32), plgpu.Barrier(num_arrivals=1))

    def prefetch(w_gmem, *_):  # the gate rows' and the up rows' first tiles
        n_idx = lax.axis_index("n")
        for first in (0, up0):
            _prefetch_rows(w_gmem, (first + n_idx) * TILE_N, 0, tile_k, min(stages, k // tile_k))

    kernel = plgpu.kernel(
        _with_pdl(gate_up_silu_normed if extra else gate_up_silu, 0 if interpret else pdl, prefetch),
        out_type=jax.ShapeDtypeStruct((m_pad, f), x.dtype),
        grid=(f // TILE_N,), grid_names=("n",), interpret=plgpu.InterpretGPUParams() if interpret else None)
    out = kernel(w, x, *extra)
    return out if m_pad == m else out[:m]


def decode_gate_up_silu(x: jax.Array, w: jax.Array, *, ss: jax.Array | None = None, eps: float = 0.0,
                        tile_k: int | None = None, stages: int | None = None,
                        interpret: bool | None = None, pdl: int | None = None) -> jax.Array:
    """SwiGLU's first half in one kernel: silu(x @ w[:F].T) * (x @ w[F:].T) -> [M, F], w the
    stacked [gate; up] weight [2F, K] (the fused layout's gate_up_proj, reshaped for free).  Each
    CTA streams 64 gate rows and the 64 matching up rows, so the SwiGLU runs on its two float32
    accumulators in registers: no [M, 2F] intermediate and no XLA kernel for the SwiGLU.  With
    ss (decode_matmul_residual's), x is hg and each row's 1/rms scales both accumulators first,
    as decode_matmul_normed: the post-attention RMSNorm in the same kernel."""
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
    if ss is not None:
        _check_ss("decode_gate_up_silu", ss, m)
    if stages is None:  # a stage holds the gate and the up tile
        stages = ring_stages(2, m, tile_k, k // tile_k, reserve=0 if ss is None else ss.size * 4 + 1024)
    extra = () if ss is None else (ss,)
    return _decode_gate_up_silu(x, w, *extra, tile_k=tile_k, stages=stages, interpret=_interpret(interpret),
                                eps=float(eps), pdl=_pdl(pdl), ss_chunks=ss is not None and ss_chunk_sum())
