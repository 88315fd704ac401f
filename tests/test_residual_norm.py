"""Residual add + RMSNorm kernel (pallas_kernels/residual_norm) against its jnp reference: random
rows, with and without the residual, power-of-two and masked hidden sizes, bf16 and float32; in
interpret mode on CPU, compiled on a GPU; and lowered to Triton for an H100 on CPU."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxengine.pallas_kernels.residual_norm import get_residual_norm, reference_residual_rms_norm, resolve_impl
from jaxengine.pallas_kernels.residual_norm import gpu as rn_gpu

BACKEND = jax.default_backend()
INTERPRET = BACKEND != "gpu"
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("hidden", [64, 96, 256])  # 96: masked to 128 lanes
@pytest.mark.parametrize("with_delta", [True, False], ids=["residual", "norm-only"])
def test_kernel_matches_reference(dtype, hidden, with_delta):
    seed = hidden * 7 + (dtype == jnp.bfloat16) * 3 + with_delta
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    rows = 1 + seed % 13
    x = (jax.random.normal(k1, (rows, hidden), jnp.float32) * 3).astype(dtype)
    delta = jax.random.normal(k2, (rows, hidden), jnp.float32).astype(dtype) if with_delta else None
    w = (1 + 0.1 * jax.random.normal(k3, (hidden,), jnp.float32)).astype(dtype)
    want_h, want_n = reference_residual_rms_norm(x, delta, w, 1e-5)
    h, n = rn_gpu.residual_rms_norm(x, delta, w, 1e-5, interpret=INTERPRET)
    assert h.dtype == want_h.dtype and n.dtype == want_n.dtype and n.shape == (rows, hidden)
    tol = TOL[dtype]
    np.testing.assert_allclose(np.asarray(h, np.float32), np.asarray(want_h, np.float32), rtol=tol, atol=tol)
    np.testing.assert_allclose(np.asarray(n, np.float32), np.asarray(want_n, np.float32), rtol=tol, atol=tol)
    if not with_delta:
        assert h is x


def test_leading_dims_are_rows_and_out_of_range_shapes_fall_back():
    x = jax.random.normal(jax.random.key(0), (2, 3, 32), jnp.float32)
    d = jnp.ones_like(x)
    w = jnp.full((32,), 0.5, jnp.float32)
    h, n = rn_gpu.residual_rms_norm(x, d, w, 1e-6, interpret=INTERPRET)
    want_h, want_n = reference_residual_rms_norm(x, d, w, 1e-6)
    np.testing.assert_allclose(h, want_h, rtol=1e-6)
    np.testing.assert_allclose(n, want_n, rtol=1e-5, atol=1e-6)
    big = jnp.ones((2, rn_gpu.MAX_HIDDEN * 2), jnp.float32)  # beyond a row in registers: the reference
    h, n = rn_gpu.residual_rms_norm(big, big, jnp.ones((big.shape[1],)), 1e-6, interpret=INTERPRET)
    np.testing.assert_allclose(n, jnp.ones_like(big), rtol=1e-6)


def test_impl_selection(monkeypatch):
    from jaxengine.config import RunnerConfig
    from jaxengine.runner.model_runner import residual_norm_impl

    assert resolve_impl("reference") == "reference" and resolve_impl("gpu") == "gpu"
    assert resolve_impl() == ("gpu" if BACKEND == "gpu" else "reference")
    assert get_residual_norm("reference") is reference_residual_rms_norm
    assert get_residual_norm("gpu") is rn_gpu.residual_rms_norm
    # the engine's switch: auto is the kernel on a GPU and the model's own ops elsewhere
    assert residual_norm_impl("auto") == ("gpu" if BACKEND == "gpu" else "off")
    monkeypatch.setenv("JAXENGINE_RESIDUAL_NORM", "gpu")
    assert RunnerConfig().residual_norm == "gpu"
    with pytest.raises(ValueError, match="residual_norm must be one of"):
        RunnerConfig(residual_norm="xla")
    with pytest.raises(ValueError, match="residual norm impl"):
        get_residual_norm("triton")


@pytest.mark.parametrize("hidden", [2048, 4096, 3584])
def test_kernel_lowers_to_triton_for_h100(monkeypatch, hidden):
    if BACKEND != "gpu":
        from jax._src.pallas.triton import gpu_info
        monkeypatch.setattr(gpu_info, "get_gpu_info", lambda: gpu_info._get_gpu_info_impl(gpu_info.GpuVersion.H100))
    from jax import export
    sds = jax.ShapeDtypeStruct
    fn = lambda x, d, w: rn_gpu.residual_rms_norm(x, d, w, 1e-5, interpret=False)  # noqa: E731
    exp = export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=[
        export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(
        sds((64, hidden), jnp.bfloat16), sds((64, hidden), jnp.bfloat16), sds((hidden,), jnp.bfloat16))
    assert exp.mlir_module().count("xla.gpu.triton") == 1
