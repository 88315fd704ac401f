"""Fused weight-streaming matmuls for decode-sized steps (see reference.py for the contract).

`get_matmul(impl)` returns a namespace with norm_linear / norm_gate_up / linear_residual:
"reference" (pure jnp: XLA's GEMMs and fusions; every backend) or "gpu" (Pallas/Triton).  "auto"
is "reference" everywhere: on the H100 the engine measured 157 tok/s (8B, batch 1) with XLA and
148 with these kernels (BENCHMARKS.md, "Fused decode matmuls"), so they are opt-in
(JAXENGINE_MATMUL=gpu or RunnerConfig.matmul_impl="gpu") until they beat XLA's GEMMs.
"""

from __future__ import annotations

import os
import types

from . import reference

IMPLS = ("reference", "gpu")


def resolve_impl(impl: str = "auto") -> str:
    if impl == "auto":
        impl = os.environ.get("JAXENGINE_MATMUL", "auto")
    if impl == "auto":
        impl = "reference"  # measured faster on the H100, see the module docstring
    if impl not in IMPLS:
        raise ValueError(f"matmul impl must be one of auto, {', '.join(IMPLS)}; got {impl!r}")
    return impl


def get_matmul(impl: str = "auto") -> types.ModuleType:
    impl = resolve_impl(impl)
    if impl == "reference":
        return reference
    from . import gpu
    return gpu


__all__ = ["get_matmul", "resolve_impl", "reference", "IMPLS"]
