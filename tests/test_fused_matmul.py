"""Fused weight-streaming matmuls: the Pallas GPU kernel against the jnp reference.

On the CPU backend the kernel runs in Pallas' interpret mode; on a GPU backend compiled.  Fresh
random inputs per case; row counts that are not a multiple of the row block (masked rows), several
column blocks per weight and several K blocks per program (block sizes forced small), several
weights in one grid.
"""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxengine.pallas_kernels import fused_matmul
from jaxengine.pallas_kernels.fused_matmul import gpu, reference

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}
SMALL_BLOCKS = dict(block_n=16, block_k=32)  # several column and K blocks on small shapes


def _rand(seed, shape, dtype, scale=1.0, offset=0.0):
    rng = np.random.default_rng(seed)
    return jnp.asarray(offset + scale * rng.standard_normal(shape), dtype=jnp.float32).astype(dtype)


@pytest.fixture(autouse=True)
def _true_float32():
    # XLA's GPU matmuls default to TF32 for float32: the reference must be exact to be a yardstick.
    with jax.default_matmul_precision("highest"):
        yield


def _assert_close(got, want, dtype, what):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert got.shape == want.shape, what
    assert np.all(np.isfinite(got)), what
    err = np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-6)
    assert err <= TOL[dtype], f"{what}: relative error {err:.2e} > {TOL[dtype]:.0e}"


def _seed(*parts):
    return zlib.crc32(repr(parts).encode())


CASES = [(m, dtype) for m in (1, 7, 16, 33) for dtype in (jnp.float32, jnp.bfloat16)]


@pytest.mark.parametrize("m,dtype", CASES)
@pytest.mark.parametrize("with_norm", [True, False])
def test_norm_linear_several_weights(m, dtype, with_norm):
    k, ns = 128, (96, 32, 32)  # q, k, v of a GQA layer
    s = _seed("norm_linear", m, str(dtype), with_norm)
    x = _rand(s, (m, k), dtype, offset=0.5)  # an offset makes a wrong norm visible
    norm_w = _rand(s + 1, (k,), dtype, 0.2, 1.0) if with_norm else None
    ws = [_rand(s + 2 + i, (n, k), dtype, k ** -0.5) for i, n in enumerate(ns)]
    got = gpu.norm_linear(x, norm_w, 1e-6, ws, **SMALL_BLOCKS)
    want = reference.norm_linear(x, norm_w, 1e-6, ws)
    for i, (g, w) in enumerate(zip(got, want)):
        _assert_close(g, w, dtype, f"weight {i}")


@pytest.mark.parametrize("m,dtype", CASES)
def test_norm_gate_up(m, dtype):
    k, f = 64, 160
    s = _seed("gate_up", m, str(dtype))
    x = _rand(s, (m, k), dtype)
    norm_w = _rand(s + 1, (k,), dtype, 0.2, 1.0)
    wg, wu = _rand(s + 2, (f, k), dtype, 0.3), _rand(s + 3, (f, k), dtype, 0.3)
    _assert_close(gpu.norm_gate_up(x, norm_w, 1e-5, wg, wu, **SMALL_BLOCKS),
                  reference.norm_gate_up(x, norm_w, 1e-5, wg, wu), dtype, "silu(gate) * up")


@pytest.mark.parametrize("m,dtype", CASES)
def test_linear_residual(m, dtype):
    k, n = 192, 64
    s = _seed("residual", m, str(dtype))
    x = _rand(s, (m, k), dtype)
    w = _rand(s + 1, (n, k), dtype, k ** -0.5)
    res = _rand(s + 2, (m, n), dtype, 3.0)
    _assert_close(gpu.linear_residual(x, w, res, **SMALL_BLOCKS), reference.linear_residual(x, w, res),
                  dtype, "residual + x @ w.T")


def test_default_config_tiles_llama_shapes_and_fills_the_gpu():
    for m in (1, 8, 64):
        for ns, k in [((4096, 1024, 1024), 4096), ((14336,), 4096), ((4096,), 14336),
                      ((2048, 512, 512), 2048), ((8192,), 2048), ((2048,), 8192)]:
            cfg = gpu.default_config(m, ns, k)
            assert gpu.supports(m, ns, k, cfg["block_n"], cfg["block_k"]), (m, ns, k, cfg)
            programs = sum(n // cfg["block_n"] for n in ns) * -(-m // cfg["block_m"])
            if m <= 16:  # weight streaming: enough programs for every SM
                assert programs >= 2 * 132 or cfg["block_n"] == 16, (m, ns, k, cfg)
            assert cfg["block_m"] >= min(max(m, 16), 64)
            # the pipelined x and weight tiles fit in the H100's shared memory (227 KiB a block)
            for gate_up in (False, True):
                c = gpu.default_config(m, ns, k, gate_up=gate_up)
                tiles = c["num_stages"] * (c["block_m"] + (1 + gate_up) * c["block_n"]) * c["block_k"] * 2
                assert tiles <= 200 * 1024, (m, ns, k, c)


def test_bad_shapes_are_rejected():
    x = jnp.ones((4, 64), jnp.float32)
    with pytest.raises(ValueError, match="in_features"):
        gpu.norm_linear(x, None, 1e-6, [jnp.ones((32, 48), jnp.float32)])
    with pytest.raises(ValueError, match="do not tile"):
        gpu.norm_linear(x, None, 1e-6, [jnp.ones((40, 64), jnp.float32)])
    with pytest.raises(ValueError, match="residual shape"):
        gpu.linear_residual(x, jnp.ones((32, 64), jnp.float32), jnp.ones((4, 16), jnp.float32))
    with pytest.raises(ValueError, match="differ in shape"):
        gpu.norm_gate_up(x, None, 1e-6, jnp.ones((32, 64)), jnp.ones((16, 64)))


def test_impl_switch(monkeypatch):
    assert fused_matmul.get_matmul("reference") is reference
    assert fused_matmul.get_matmul("gpu") is gpu
    monkeypatch.setenv("JAXENGINE_MATMUL", "reference")
    assert fused_matmul.resolve_impl("auto") == "reference"
    monkeypatch.delenv("JAXENGINE_MATMUL")
    assert fused_matmul.resolve_impl("auto") == "reference"  # XLA measured faster on the H100
    with pytest.raises(ValueError, match="matmul impl"):
        fused_matmul.resolve_impl("cublas")
