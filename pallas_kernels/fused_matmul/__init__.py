"""Fused weight-streaming matmuls for decode-sized steps (see reference.py for the contract).

`get_matmul(impl)` returns a namespace with norm_linear / norm_gate_up / linear_residual:
"reference" (pure jnp; on every backend) or "gpu" (Pallas/Triton).  "auto" picks "gpu" on an
NVIDIA GPU and "reference" elsewhere; the env var JAXENGINE_MATMUL or RunnerConfig.matmul_impl
overrides it.
"""

from __future__ import annotations

import os
import types

import jax

from . import reference

IMPLS = ("reference", "gpu")


def resolve_impl(impl: str = "auto") -> str:
    if impl == "auto":
        impl = os.environ.get("JAXENGINE_MATMUL", "auto")
    if impl == "auto":
        impl = "gpu" if jax.default_backend() in ("gpu", "cuda") else "reference"
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
