"""Residual add + RMSNorm (reference.py's contract): `get_residual_norm(impl)`.

"auto" picks the Pallas GPU kernel on a GPU backend and the jnp reference elsewhere (the kernel
exists for XLA:GPU, which launches the add and the norm as separate small kernels).  The engine's
switch is RunnerConfig.residual_norm ($JAXENGINE_RESIDUAL_NORM), which can also turn it off.
"""

from __future__ import annotations

from typing import Callable

import jax

from .reference import residual_rms_norm as reference_residual_rms_norm
from .reference import rms_norm

IMPLS = ("reference", "gpu")


def resolve_impl(impl: str = "auto") -> str:
    if impl == "auto":
        impl = "gpu" if jax.default_backend() in ("gpu", "cuda") else "reference"
    if impl not in IMPLS:
        raise ValueError(f"residual norm impl must be one of auto, {', '.join(IMPLS)}; got {impl!r}")
    return impl


def get_residual_norm(impl: str = "auto") -> Callable:
    impl = resolve_impl(impl)
    if impl == "reference":
        return reference_residual_rms_norm
    from .gpu import residual_rms_norm  # interpret mode on the CPU backend
    return residual_rms_norm


__all__ = ["get_residual_norm", "resolve_impl", "reference_residual_rms_norm", "rms_norm"]
