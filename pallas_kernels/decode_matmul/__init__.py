"""Weight-streaming matmul for decode-sized steps (x [M, K] @ w [N, K].T, M = the step's token
rows): `reference.decode_matmul` (jnp, any backend) and `gpu.decode_matmul` (Pallas Mosaic GPU,
TMA + wgmma, Hopper).

`get_dense(impl)` gives models' `forward(dense=...)`: None for "xla" (XLA's einsum), else a
dense(x, w) that runs the kernel where it tiles the shape (x 2-D with at most 256 rows, bf16/f16,
N and K multiples of 64) and XLA's einsum elsewhere, with attributes models look for:
`gate_up_silu` (the MLP's gate/up matmul and SwiGLU in one kernel, gpu.decode_gate_up_silu) and
the norm epilogues, which move the residual adds and RMSNorms into the kernels
(decode_matmul_residual writes the new residual stream, the next norm's input with its weight
applied and partial sums of squares; decode_matmul_normed and decode_gate_up_silu with ss apply
each row's 1/rms: no residual-norm kernels between the matmuls).  "mgpu" (what "auto" picks on a
Hopper GPU) runs the norm epilogues where they measured faster (measured_norm_rule),
"mgpu_norm" wherever the kernels run, "mgpu_plain" never.  The engine's switch is
RunnerConfig.decode_matmul ($JAXENGINE_DECODE_MATMUL).
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

from ..env import hopper
from . import reference
from .reference import decode_matmul as reference_decode_matmul

IMPLS = ("xla", "mgpu", "mgpu_norm", "mgpu_plain")


_hopper = hopper  # (module-level, so tests can patch it)


def resolve_impl(impl: str = "auto") -> str:
    """"auto" = "mgpu" on a Hopper GPU, else "xla".  On the H200 the kernels won every decode
    A/B: the decode forward 8B b1 -2.4%/-5%, b64 -10%/-12%, 1B b1 -1%/-7%, b64 -5%/-9% against
    XLA before/after, and the engine at K = 8 8B b64 +3.5%/+5.3% (BENCHMARKS.md, tenth session).
    Other GPUs have no wgmma (Ampere) or want tcgen05 (Blackwell): XLA there."""
    if impl == "auto":
        impl = "mgpu" if _hopper() else "xla"
    if impl not in IMPLS:
        raise ValueError(f"decode matmul impl must be one of auto, {', '.join(IMPLS)}; got {impl!r}")
    if impl != "xla" and jax.default_backend() not in ("gpu", "cuda", "cpu"):
        raise ValueError(f"decode_matmul={impl!r} runs Mosaic GPU kernels (NVIDIA Hopper; the CPU "
                         f"backend interprets them): not on {jax.default_backend()!r}")
    return impl


def fits(x: jax.Array, w: jax.Array) -> bool:
    """Whether gpu.decode_matmul tiles x @ w.T (else the caller keeps XLA's einsum)."""
    from . import gpu

    return (x.ndim == 2 and w.ndim == 2 and 1 <= x.shape[0] <= 256 and x.dtype == w.dtype
            and x.dtype in (jnp.bfloat16, jnp.float16) and w.shape[0] % gpu.TILE_N == 0
            and x.shape[1] == w.shape[1] and x.shape[1] % 64 == 0)


def _xla(x: jax.Array, w: jax.Array) -> jax.Array:
    return jnp.einsum("...i,oi->...o", x, w)  # the model's own GEMM (models.llama.dense_einsum)


def _kernel_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    from . import gpu

    return gpu.decode_matmul(x, w) if fits(x, w) else _xla(x, w)


def mgpu_gate_up_silu(x: jax.Array, w: jax.Array) -> jax.Array:
    """silu(x @ w[:F].T) * (x @ w[F:].T) for the stacked [gate; up] weight w [2F, K]: one kernel
    (gpu.decode_gate_up_silu) where it tiles the shape, else XLA's einsum and SwiGLU."""
    from . import gpu

    if fits(x, w) and (w.shape[0] // 2) % gpu.TILE_N == 0:
        return gpu.decode_gate_up_silu(x, w)
    gu = _xla(x, w)
    f = w.shape[0] // 2
    return jax.nn.silu(gu[..., :f]) * gu[..., f:]


# the norm epilogues: the residual adds and RMSNorms ride in the matmul kernels ------------------
def _boxed(l2_next) -> tuple:
    """The regions of l2_next (models' l2_prefetch.windows) the kernels' 64-row TMA boxes tile: a
    prefetch is a hint, so one that does not fit is dropped, not an error."""
    return tuple((w, r) for w, r in l2_next if r[0] % 64 == 0 and math.prod(w.shape[:-1]) >= r[0])


def mgpu_residual(x: jax.Array, w: jax.Array, residual: jax.Array, norm_w: jax.Array,
                  l2_next=()) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(h, hg, ss) = residual + x @ w.T and the next RMSNorm's inputs (gpu.decode_matmul_residual);
    l2_next: regions of later GEMMs' weights its CTAs prefetch into L2 meanwhile."""
    from . import gpu

    if fits(x, w):
        return gpu.decode_matmul_residual(x, w, residual, norm_w, l2_next=_boxed(l2_next))
    return reference.decode_matmul_residual(x, w, residual, norm_w)


def mgpu_normed(x: jax.Array, w: jax.Array, ss: jax.Array, eps: float, l2_next=()) -> jax.Array:
    """rms_norm(h) @ w.T from hg and ss (gpu.decode_matmul_normed); l2_next: as mgpu_residual's."""
    from . import gpu

    if fits(x, w):
        return gpu.decode_matmul_normed(x, w, ss, eps, l2_next=_boxed(l2_next))
    return reference.decode_matmul_normed(x, w, ss, eps)


def mgpu_normed_gate_up_silu(x: jax.Array, w: jax.Array, ss: jax.Array, eps: float) -> jax.Array:
    """silu(gate) * up of rms_norm(h) from hg and ss (gpu.decode_gate_up_silu with ss)."""
    from . import gpu

    if fits(x, w) and (w.shape[0] // 2) % gpu.TILE_N == 0:
        return gpu.decode_gate_up_silu(x, w, ss=ss, eps=eps)
    return reference.decode_gate_up_silu(x, w, ss, eps)


# H200, tenth session (BENCHMARKS.md): the norm epilogues took 8B decode forward steps from 4.205 /
# 4.194 to 4.148 ms at 8 token rows, broke even at 16, lost 1% at 32 and 8% at 64 (each CTA's
# epilogue handles all rows); at 1B (hidden 2048: o and down split K, their epilogue is XLA's) they
# lost 1-2%.
NORM_EPILOGUE_MAX_ROWS = 16


def measured_norm_rule(rows: int, hidden: int) -> bool:
    """Where "mgpu" runs the norm epilogues: up to NORM_EPILOGUE_MAX_ROWS token rows, and a hidden
    size whose o/down kernels keep the epilogue in the kernel: one K split, or two split as a
    cluster of two CTAs (cluster_split_default).  H200 decode forward at batch 1 (BENCHMARKS.md):
    8B 4.148 ms with the epilogues against 4.194-4.205 without (tenth session); 1B with the
    cluster split 0.920 against 0.940, and without it (XLA's split-K reduction as the epilogue)
    0.989 against 0.976 (eleventh session)."""
    from . import gpu

    cfg = gpu.default_config(rows, hidden, hidden)
    in_kernel = cfg["splits"] == 1 or gpu._cluster(cfg, False, None)
    return rows <= NORM_EPILOGUE_MAX_ROWS and in_kernel


def mgpu_k_parts(n: int, k: int, gate_up: bool = False) -> int:
    """How many contiguous K ranges the kernels' CTAs walk for a weight [n, k]: its K splits
    (gpu.default_config, which the plain, residual and normed kernels share; a cluster pair walks
    the same two halves), 1 for the gate/up kernel (it never splits K).  Where their weights'
    first columns sit is what the L2 prefetch windows warm (pallas_kernels/l2_prefetch.plan)."""
    from . import gpu

    if gate_up or n % gpu.TILE_N or k % 64:
        return 1
    return gpu.default_config(8, n, k)["splits"]


def _make_dense(norm_rule: Callable[[int, int], bool] | None) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """A forward(dense=...): the matmul kernels; models look for its attributes: `gate_up_silu` (the
    MLP's gate/up matmul and SwiGLU as one call) and, with a norm_rule, the norm epilogues
    (`prenorm`, `residual`, `normed`, `normed_gate_up_silu`) with `use_norm_epilogues(rows,
    hidden)` saying where to run them: each layer's o and down kernels add the residual and write
    the next norm's inputs (hg, ss), the q/k/v and gate/up kernels apply its 1/rms, and no
    residual-norm kernels run between the matmuls."""
    def dense(x: jax.Array, w: jax.Array) -> jax.Array:
        return _kernel_matmul(x, w)

    dense.gate_up_silu = mgpu_gate_up_silu
    dense.k_parts = mgpu_k_parts
    if norm_rule is not None:
        dense.use_norm_epilogues = norm_rule
        dense.prenorm = reference.prenorm
        dense.residual = mgpu_residual
        dense.normed = mgpu_normed
        dense.accepts_l2_next = True  # residual and normed take l2_next= (l2_prefetch.windows)
        dense.normed_gate_up_silu = mgpu_normed_gate_up_silu
    return dense


mgpu_dense = _make_dense(measured_norm_rule)  # "mgpu" (auto on Hopper): the norm epilogues where they won
mgpu_norm_dense = _make_dense(lambda rows, hidden: True)  # "mgpu_norm": wherever the kernels run
mgpu_plain_dense = _make_dense(None)  # "mgpu_plain": the matmul kernels alone (A/B)


def get_dense(impl: str = "auto") -> Callable[[jax.Array, jax.Array], jax.Array] | None:
    return {"xla": None, "mgpu": mgpu_dense, "mgpu_norm": mgpu_norm_dense,
            "mgpu_plain": mgpu_plain_dense}[resolve_impl(impl)]


__all__ = ["get_dense", "resolve_impl", "fits", "mgpu_dense", "mgpu_gate_up_silu", "mgpu_k_parts", "mgpu_norm_dense",
           "mgpu_plain_dense", "measured_norm_rule", "NORM_EPILOGUE_MAX_ROWS",
           "reference_decode_matmul", "IMPLS"]
