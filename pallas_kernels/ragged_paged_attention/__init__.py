"""Ragged paged attention: one call per layer serves a whole ragged step.

`get_attention(impl)` returns the implementation; "auto" picks by `jax.default_backend()`, and the
env var JAXENGINE_ATTENTION (or RunnerConfig.attention_impl) overrides it.  Every implementation
has the signature of `reference.ragged_paged_attention` and reads the page layout documented there.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import jax

from .reference import ragged_paged_attention as reference_ragged_paged_attention
from .reference import write_kv

IMPLS = ("reference", "gpu", "tpu")


def resolve_impl(impl: str = "auto") -> str:
    if impl == "auto":
        impl = os.environ.get("JAXENGINE_ATTENTION", "auto")
    if impl == "auto":
        backend = jax.default_backend()
        impl = {"gpu": "gpu", "cuda": "gpu", "tpu": "tpu"}.get(backend, "reference")
        if impl not in available_impls():
            impl = "reference"
    if impl not in IMPLS:
        raise ValueError(f"attention impl must be one of auto, {', '.join(IMPLS)}; got {impl!r}")
    return impl


def available_impls() -> tuple[str, ...]:
    found = ["reference"]
    for name in ("gpu", "tpu"):
        try:
            __import__(f"{__name__}.{name}")
            found.append(name)
        except ImportError:
            pass
    return tuple(found)


def get_attention(impl: str = "auto") -> Callable[..., jax.Array]:
    impl = resolve_impl(impl)
    if impl == "reference":
        return reference_ragged_paged_attention
    module = __import__(f"{__name__}.{impl}", fromlist=["ragged_paged_attention"])
    return module.ragged_paged_attention


def get_decode_attention(impl: str = "auto") -> Callable[..., tuple[jax.Array, jax.Array]]:
    """Decode-only attention with rope and the KV write folded in (decode.py's contract): the GPU
    kernel does all of it in one Pallas kernel; other implementations compose rope, write_kv
    and their ragged attention (`decode.composite`)."""
    from .decode import composite
    impl = resolve_impl(impl)
    if impl == "gpu":
        from .gpu_decode import decode_attention
        return decode_attention
    return composite(get_attention(impl))


def per_forward(decode_attention: Callable[..., Any]) -> Callable[..., Any]:
    """The decode attention to hand one forward pass while it is traced: for the GPU kernel a
    fresh gpu_decode.LayerChain (the layers' launches share one count buffer for the in-kernel
    split merge); any other implementation (the composite, a sharded wrapper) as it is."""
    from . import gpu_decode
    return gpu_decode.LayerChain() if decode_attention is gpu_decode.decode_attention else decode_attention


__all__ = ["get_attention", "get_decode_attention", "per_forward", "resolve_impl", "available_impls", "write_kv",
           "reference_ragged_paged_attention"]
