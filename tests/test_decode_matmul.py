"""Mosaic GPU decode matmul (pallas_kernels/decode_matmul) against its jnp reference: random x and
w, token rows 1-64 (padded to wgmma's multiple of 8 inside), one or several K splits, tile and
pipeline depths, bf16 and f16; in Mosaic GPU's interpreter on CPU, compiled on a Hopper GPU."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxengine.pallas_kernels.decode_matmul import gpu as dm_gpu
from jaxengine.pallas_kernels.decode_matmul import reference_decode_matmul

BACKEND = jax.default_backend()
INTERPRET = BACKEND != "gpu"
if BACKEND == "gpu" and "H100" not in jax.devices()[0].device_kind and "H200" not in jax.devices()[0].device_kind:
    pytest.skip("wgmma kernels need a Hopper GPU", allow_module_level=True)


@pytest.mark.parametrize("m,n,k,cfg", [
    (1, 64, 128, dict(tile_k=64, splits=1, stages=2)),
    (1, 192, 512, {}),  # default config
    (5, 128, 512, dict(tile_k=128, splits=2, stages=4)),
    (8, 64, 384, dict(tile_k=64, splits=3, stages=3)),
    (13, 256, 256, dict(tile_k=64, splits=4, stages=2)),
    (64, 128, 1024, dict(tile_k=256, splits=2, stages=2)),
    (37, 64, 128, dict(tile_k=128, splits=1, stages=4)),
    (3, 128, 512, dict(tile_k=128, splits=2, stages=3, warp_specialized=True)),
    (64, 64, 256, dict(tile_k=64, splits=1, stages=2, warp_specialized=True)),
])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "f16"])
def test_kernel_matches_reference(m, n, k, cfg, dtype):
    seed = m * 1000 + n + k + (dtype == jnp.float16)
    kx, kw = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (m, k), jnp.float32).astype(dtype)
    w = (jax.random.normal(kw, (n, k), jnp.float32) * 0.05).astype(dtype)
    got = dm_gpu.decode_matmul(x, w, interpret=INTERPRET, **cfg)
    want = reference_decode_matmul(x, w)
    assert got.shape == (m, n) and got.dtype == dtype
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               rtol=2e-2, atol=2e-2 * float(jnp.max(jnp.abs(want.astype(jnp.float32)))))


def test_default_config_fills_the_chip_and_divides_k():
    for n, k in [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (2048, 8192), (3072, 2048)]:
        cfg = dm_gpu.default_config(1, n, k)
        assert k % (cfg["tile_k"] * cfg["splits"]) == 0
        ctas = n // dm_gpu.TILE_N * cfg["splits"]
        assert ctas >= 128, (n, k, cfg)


@pytest.mark.parametrize("x_shape,w_shape,dtype,match", [
    ((1, 128), (96, 128), jnp.bfloat16, "N"),
    ((1, 96), (64, 96), jnp.bfloat16, "K"),
    ((1, 128), (64, 256), jnp.bfloat16, "K"),
    ((300, 128), (64, 128), jnp.bfloat16, "M"),
    ((1, 128), (64, 128), jnp.float32, "bfloat16"),
])
def test_bad_shapes_raise_value_error(x_shape, w_shape, dtype, match):
    with pytest.raises(ValueError, match=match):
        dm_gpu.decode_matmul(jnp.ones(x_shape, dtype), jnp.ones(w_shape, dtype), interpret=INTERPRET)
